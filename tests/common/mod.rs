//! Shared helpers for the integration tests: fixture paths, tensors, differences.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn reference(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join("reference").join(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("fixture {} unreadable: {e}", path.display()))
}

pub fn get<'a>(tensors: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    tensors
        .get(key)
        .unwrap_or_else(|| panic!("fixture tensor `{key}` missing"))
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a.to_dtype(candle_core::DType::F32).unwrap() - b.to_dtype(candle_core::DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn max_abs(a: &Tensor) -> f32 {
    a.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A scratch directory unique to one test, removed first if it exists.
pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copies a directory tree (fixture folders are small).
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A fixture path as text, for recipes written by tests.
pub fn fx(path: &str) -> String {
    fixtures().join(path).display().to_string()
}

/// Latent tolerance for the adapter pipelines: DDIM, 4 steps, CFG 7.5 on the tiny model
/// (latents up to |x| ≈ 30; see parity_sd15.rs for why absolute figures scale with σ).
pub const PIPELINE_TOLERANCE: f32 = 5e-4;

/// Writes and runs a recipe for the diffusers case `reference/{case}.safetensors` (the
/// tiny SD1.5 base, the case's prompt, DDIM 4 steps, CFG 7.5, its initial latents) with
/// extra models, images and `generate` keys (which may replace `guidance`); checks and
/// returns the final latents.
pub fn run_generate_case(
    case: &str,
    models_yaml: &str,
    images_yaml: &str,
    generate_yaml: &str,
) -> Tensor {
    let r = reference(&format!("{case}.safetensors"));
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = scratch(&format!("case-{case}-{}-{run}", std::process::id()));
    candle_core::safetensors::save(
        &HashMap::from([("latents", get(&r, "init_latents").clone())]),
        dir.join("init.safetensors"),
    )
    .unwrap();
    let text = format!(
        r#"version: 1
models:
  base: {{kind: sd15, source: {base}}}
{models_yaml}
images:
{images_yaml}
nodes:
  gen:
    generate:
      base: base
      prompt: "a cozy house at dusk"
      negative_prompt: "lowres, blurry"
      size: [128, 128]
      steps: 4
      scheduler: {{kind: ddim}}
{guidance}      latents: init.safetensors
{generate_yaml}
outputs:
  - {{latents: gen, path: out.safetensors}}
"#,
        base = fx("tiny-sd15"),
        // Cases may set their own guidance; the fixtures' default is 7.5.
        guidance = if generate_yaml.contains("      guidance:") {
            ""
        } else {
            "      guidance: 7.5\n"
        },
    );
    let path = dir.join("recipe.yaml");
    std::fs::write(&path, &text).unwrap();
    let recipe = ipcompose::pipeline::Recipe::parse(&text, &path).unwrap_or_else(|e| panic!("{e}"));
    let plan = ipcompose::pipeline::plan::Plan::build(&recipe, &text, &path, &dir)
        .unwrap_or_else(|e| panic!("{e}"));
    let options = ipcompose::pipeline::RunOptions {
        overwrite: true,
        ..Default::default()
    };
    let written = ipcompose::pipeline::run_plan(&plan, &options, &mut |_, _| {})
        .unwrap_or_else(|e| panic!("{e}"));
    let latents =
        candle_core::safetensors::load(&written[0], &Device::Cpu).unwrap()["latents"].clone();
    let diff = max_abs_diff(&latents, get(&r, "final_latents"));
    eprintln!(
        "{case}: final latents max abs diff {diff:.2e} (max |x| {:.1})",
        max_abs(&latents)
    );
    assert!(
        diff < PIPELINE_TOLERANCE,
        "{case}: final latents differ by {diff}"
    );
    latents
}
