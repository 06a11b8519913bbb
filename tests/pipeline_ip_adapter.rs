//! IP-Adapter compositions end to end (recipe → plan → run) against diffusers' pipelines:
//! each case's recipe is written here, the initial latents come from the fixture, and the
//! final latents are compared. Fixtures: tests/fixtures/make_adapter_fixtures.py.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::{fixtures, get, max_abs, max_abs_diff, reference, scratch};
use ipcompose::pipeline::clip_image::{fit_image, load_rgb, normalize, Fit};
use ipcompose::pipeline::{plan::Plan, run_plan, Recipe, RunOptions};

/// Latent tolerance: DDIM, 4 steps, CFG 7.5 on the tiny model (see parity_sd15.rs).
const TOLERANCE: f32 = 5e-4;

fn fx(path: &str) -> String {
    fixtures().join(path).display().to_string()
}

/// Runs `ip_adapters_yaml` (the body of `ip_adapters:`) with the case's initial latents and
/// returns the final latents.
fn run_case(case: &str, models_yaml: &str, images_yaml: &str, ip_adapters_yaml: &str) -> Tensor {
    let r = reference(&format!("ipa_{case}.safetensors"));
    let dir = scratch(&format!("ipa-{case}"));
    let init = dir.join("init.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents", get(&r, "init_latents").clone())]),
        &init,
    )
    .unwrap();
    let recipe = format!(
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
      guidance: 7.5
      latents: init.safetensors
      ip_adapters:
{ip_adapters_yaml}
outputs:
  - {{latents: gen, path: out.safetensors}}
"#,
        base = fx("tiny-sd15"),
    );
    let path = dir.join("recipe.yaml");
    std::fs::write(&path, &recipe).unwrap();
    let out = run(&path, &recipe, &dir);
    let latents = candle_core::safetensors::load(out, &Device::Cpu).unwrap()["latents"].clone();
    let diff = max_abs_diff(&latents, get(&r, "final_latents"));
    eprintln!(
        "{case}: final latents max abs diff {diff:.2e} (max |x| {:.1})",
        max_abs(&latents)
    );
    assert!(diff < TOLERANCE, "{case}: final latents differ by {diff}");
    latents
}

fn run(path: &Path, text: &str, dir: &Path) -> PathBuf {
    let recipe = Recipe::parse(text, path).unwrap();
    let plan = Plan::build(&recipe, text, path, dir).unwrap_or_else(|e| panic!("{e}"));
    let written =
        run_plan(&plan, &RunOptions::default(), &mut |_, _| {}).unwrap_or_else(|e| panic!("{e}"));
    written[0].clone()
}

fn adapter_model(name: &str, file: &str) -> String {
    format!(
        "  {name}: {{kind: ip-adapter, source: {}, image_encoder: {}}}",
        fx(&format!("ip-adapter/{file}")),
        fx("ip-adapter/image_encoder")
    )
}

fn images() -> String {
    [
        ("ref_a", "ref_a.png"),
        ("ref_b", "ref_b.png"),
        ("ref_wide", "ref_wide.png"),
        ("left", "mask_left.png"),
        ("right", "mask_right.png"),
    ]
    .iter()
    .map(|(n, f)| format!("  {n}: {}", fx(&format!("ip-adapter/inputs/{f}"))))
    .collect::<Vec<_>>()
    .join("\n")
}

const PLAIN: &str = "ip-adapter_tiny.safetensors";
const PLUS: &str = "ip-adapter-plus_tiny.safetensors";

#[test]
fn plain_adapter() {
    run_case(
        "plain",
        &adapter_model("ipa", PLAIN),
        &images(),
        "        - {model: ipa, image: ref_a, scale: 0.6}",
    );
}

#[test]
fn plus_adapter() {
    run_case(
        "plus",
        &adapter_model("ipa", PLUS),
        &images(),
        "        - {model: ipa, image: ref_a, scale: 0.8}",
    );
}

#[test]
fn full_face_adapter() {
    run_case(
        "full_face",
        &adapter_model("ipa", "ip-adapter-full-face_tiny.safetensors"),
        &images(),
        "        - {model: ipa, image: ref_a, scale: 0.5}",
    );
}

#[test]
fn two_adapters_at_once() {
    let models = [adapter_model("plain", PLAIN), adapter_model("plus", PLUS)].join("\n");
    run_case(
        "two_adapters",
        &models,
        &images(),
        "        - {model: plain, image: ref_a, scale: 0.6}\n        - {model: plus, image: ref_b, scale: 0.4}",
    );
}

#[test]
fn several_images_for_one_adapter() {
    run_case(
        "multi_image",
        &adapter_model("ipa", PLAIN),
        &images(),
        "        - {model: ipa, images: [ref_a, ref_b], scale: 0.6}",
    );
}

#[test]
fn instantstyle_per_block_scales() {
    run_case(
        "instantstyle",
        &adapter_model("ipa", PLUS),
        &images(),
        "        - {model: ipa, image: ref_a, scale: {up: {block_1: [0.0, 1.0, 0.0]}}}",
    );
    // The named preset selects the same blocks.
    run_case(
        "instantstyle",
        &adapter_model("ipa", PLUS),
        &images(),
        "        - {model: ipa, image: ref_a, scale: style}",
    );
}

#[test]
fn instantstyle_style_and_layout() {
    run_case(
        "instantstyle_layout",
        &adapter_model("ipa", PLUS),
        &images(),
        "        - {model: ipa, image: ref_a, scale: style-and-layout}",
    );
}

#[test]
fn regional_masks_one_per_adapter() {
    run_case(
        "masked",
        &adapter_model("ipa", PLAIN),
        &images(),
        "        - {model: ipa, image: ref_a, scale: 0.7, mask: left}\n        - {model: ipa, image: ref_b, scale: 0.7, mask: right}",
    );
}

#[test]
fn regional_masks_one_per_image() {
    run_case(
        "masked_one_adapter",
        &adapter_model("ipa", PLAIN),
        &images(),
        "        - {model: ipa, images: [ref_a, ref_b], scale: 0.7, masks: [left, right]}",
    );
}

#[test]
fn start_end_window() {
    run_case(
        "window",
        &adapter_model("ipa", PLAIN),
        &images(),
        "        - {model: ipa, image: ref_a, scale: 0.6, start: 0.25, end: 0.75}",
    );
}

#[test]
fn non_square_reference_is_cropped_like_diffusers() {
    // diffusers (transformers 5, torchvision backend) resizes with torch's antialiased bicubic,
    // which clip_image::resize reproduces; a level (1/255) is 0.015 in normalised units.
    let enc = reference("ip_encoder.safetensors");
    let image = load_rgb(&fixtures().join("ip-adapter/inputs/ref_wide.png")).unwrap();
    let pixels = normalize(&fit_image(&image, 224, Fit::Crop), &Device::Cpu).unwrap();
    let diff = max_abs_diff(&pixels, get(&enc, "pixel_values_wide"));
    eprintln!("wide crop: encoder input max abs diff {diff:.3}");
    assert!(diff < 1e-4, "crop preprocessing differs by {diff}");
    run_case(
        "wide_crop",
        &adapter_model("ipa", PLAIN),
        &images(),
        "        - {model: ipa, image: ref_wide, scale: 0.6}",
    );
}
