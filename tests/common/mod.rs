//! Shared helpers for the integration tests: fixture paths, tensors, differences.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The device the parity tests run on: `IPCOMPOSE_TEST_DEVICE=cuda` (a `--features cuda`
/// build on a GPU machine; tools/gpu/device-check.sh) or the CPU.
pub fn device() -> Device {
    match std::env::var("IPCOMPOSE_TEST_DEVICE").as_deref() {
        Ok("cuda") => {
            Device::new_cuda(0).unwrap_or_else(|e| panic!("IPCOMPOSE_TEST_DEVICE=cuda: {e}"))
        }
        Ok("cpu") | Err(_) => Device::Cpu,
        Ok(other) => panic!("IPCOMPOSE_TEST_DEVICE={other}: expected cpu or cuda"),
    }
}

/// The dtype the end-to-end parity tests run the models in: `IPCOMPOSE_TEST_DTYPE=f16|bf16`
/// (on CUDA), f32 otherwise. Model-level tests always run in f32.
pub fn dtype() -> DType {
    match std::env::var("IPCOMPOSE_TEST_DTYPE").as_deref() {
        Ok("f16") => DType::F16,
        Ok("bf16") => DType::BF16,
        Ok("f32") | Err(_) => DType::F32,
        Ok(other) => panic!("IPCOMPOSE_TEST_DTYPE={other}: expected f32, f16 or bf16"),
    }
}

/// Half-precision bounds on final latents, relative to the largest reference value: the tiny
/// models' final latents in f16 / bf16 against diffusers' f32 fixtures (measured on an H200,
/// README "GPU"; bf16 keeps 8 mantissa bits to f16's 11). f32 on any device keeps the f32
/// bounds.
pub const F16_RELATIVE_TOLERANCE: f32 = 2e-2;
pub const BF16_RELATIVE_TOLERANCE: f32 = 1e-1;

/// The relative bound of the test dtype (0 in f32, where the absolute bounds apply).
pub fn half_relative_tolerance() -> f32 {
    match dtype() {
        DType::F16 => F16_RELATIVE_TOLERANCE,
        DType::BF16 => BF16_RELATIVE_TOLERANCE,
        _ => 0.0,
    }
}

/// `f32_bound` in f32; in f16/bf16 the larger of it and [`half_relative_tolerance`] of
/// `max |reference|`.
pub fn bound(f32_bound: f32, reference: &Tensor) -> f32 {
    if dtype() == DType::F32 {
        f32_bound
    } else {
        f32_bound.max(half_relative_tolerance() * max_abs(reference))
    }
}

/// Writes `text` as `dir/recipe.yaml` and plans it (relative paths against `dir`).
pub fn plan(
    dir: &std::path::Path,
    text: &str,
) -> ipcompose::pipeline::Result<ipcompose::pipeline::plan::Plan> {
    let path = dir.join("recipe.yaml");
    std::fs::write(&path, text).unwrap();
    let recipe = ipcompose::pipeline::Recipe::parse(text, &path)?;
    ipcompose::pipeline::plan::Plan::build(&recipe, text, &path, dir)
}

/// Run options for the test device and dtype (overwriting earlier outputs).
pub fn run_options() -> ipcompose::pipeline::RunOptions {
    ipcompose::pipeline::RunOptions {
        overwrite: true,
        device: device(),
        dtype: dtype(),
        ..Default::default()
    }
}

pub fn reference(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures().join("reference").join(name);
    candle_core::safetensors::load(&path, &device())
        .unwrap_or_else(|e| panic!("fixture {} unreadable: {e}", path.display()))
}

pub fn get<'a>(tensors: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    tensors
        .get(key)
        .unwrap_or_else(|| panic!("fixture tensor `{key}` missing"))
}

/// A tensor as f32 on the CPU, where every comparison happens.
fn host_f32(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (host_f32(a) - host_f32(b))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn max_abs(a: &Tensor) -> f32 {
    host_f32(a)
        .abs()
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
/// extra models, images and `generate` keys (which may replace `guidance`, and `prompt` with `negative_prompt`); checks and
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
{prompts}      size: [128, 128]
      steps: 4
      scheduler: {{kind: ddim}}
{guidance}      latents: init.safetensors
{generate_yaml}
outputs:
  - {{latents: gen, path: out.safetensors}}
"#,
        base = fx("tiny-sd15"),
        // Cases may set their own guidance; the fixtures' default is 7.5.
        // Cases may set their own prompts; the fixtures' default is the house at dusk.
        prompts = if generate_yaml.contains("      prompt:") {
            ""
        } else {
            "      prompt: \"a cozy house at dusk\"\n      negative_prompt: \"lowres, blurry\"\n"
        },
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
    let options = run_options();
    let written = ipcompose::pipeline::run_plan(&plan, &options, &mut |_, _| {})
        .unwrap_or_else(|e| panic!("{e}"));
    let latents =
        candle_core::safetensors::load(&written[0], &Device::Cpu).unwrap()["latents"].clone();
    let diff = max_abs_diff(&latents, get(&r, "final_latents"));
    eprintln!(
        "{case}: final latents max abs diff {diff:.2e} (max |x| {:.1})",
        max_abs(&latents)
    );
    let tolerance = bound(PIPELINE_TOLERANCE, get(&r, "final_latents"));
    assert!(
        diff < tolerance,
        "{case}: final latents differ by {diff} (bound {tolerance:.1e})"
    );
    latents
}

/// Runs the SDXL recipe case `case` on `tiny-sdxl` (64×64, 4 Euler steps, guidance 5, the
/// fixture's `init_latents`; prompts "a cozy house at dusk" / "lowres, blurry" unless
/// `generate_yaml` sets its own) with `models_yaml` and `images_yaml` added, and compares the
/// final latents with the reference's `final_latents`.
#[allow(dead_code)]
pub fn run_sdxl_case(case: &str, models_yaml: &str, images_yaml: &str, generate_yaml: &str) {
    let base = format!("  base: {{kind: sdxl, source: {}}}\n", fx("tiny-sdxl"));
    run_sdxl_case_with_base(case, &base, models_yaml, images_yaml, generate_yaml);
}

/// As [`run_sdxl_case`], with the `base` model line given (e.g. a single file).
#[allow(dead_code)]
pub fn run_sdxl_case_with_base(
    case: &str,
    base_yaml: &str,
    models_yaml: &str,
    images_yaml: &str,
    generate_yaml: &str,
) {
    let r = reference(&format!("{case}.safetensors"));
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = scratch(&format!("sdxl-case-{case}-{}-{run}", std::process::id()));
    candle_core::safetensors::save(
        &HashMap::from([("latents", get(&r, "init_latents").clone())]),
        dir.join("init.safetensors"),
    )
    .unwrap();
    let prompts = if generate_yaml.contains("      prompt:") {
        ""
    } else {
        "      prompt: \"a cozy house at dusk\"\n      negative_prompt: \"lowres, blurry\"\n"
    };
    let text = format!(
        "version: 1\nmodels:\n{base_yaml}{models_yaml}images:\n{images_yaml}nodes:\n  gen:\n    generate:\n      base: base\n{prompts}      size: [64, 64]\n      steps: 4\n      guidance: 5\n      latents: init.safetensors\n{generate_yaml}outputs:\n  - {{latents: gen, path: out.safetensors}}\n",
    );
    let plan = plan(&dir, &text).unwrap_or_else(|e| panic!("{case}: {e}"));
    let written = ipcompose::pipeline::run_plan(&plan, &run_options(), &mut |_, _| {})
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    let latents = candle_core::safetensors::load(&written[0], &candle_core::Device::Cpu).unwrap()
        ["latents"]
        .clone();
    let expected = get(&r, "final_latents");
    let diff = max_abs_diff(&latents, expected);
    eprintln!(
        "{case}: final latents max abs diff {diff:.2e} (max |x| {:.1})",
        max_abs(expected)
    );
    let tolerance = bound(PIPELINE_TOLERANCE, expected);
    assert!(diff < tolerance, "{case}: final latents differ by {diff}");
}
