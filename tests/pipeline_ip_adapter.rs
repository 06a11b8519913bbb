//! IP-Adapter compositions end to end (recipe → plan → run) against diffusers' pipelines:
//! each case's recipe is written here, the initial latents come from the fixture, and the
//! final latents are compared. Fixtures: tests/fixtures/make_adapter_fixtures.py.

mod common;

use candle_core::{Device, Tensor};
use common::{fixtures, fx, get, max_abs_diff, reference, run_generate_case, scratch};
use ipcompose::pipeline::plan::ip::Fit;
use ipcompose::pipeline::run::clip_image::{fit_image, load_rgb, normalize};
use ipcompose::pipeline::{plan::Plan, Recipe};

/// Runs the case with `ip_adapters_yaml` as the body of `ip_adapters:`.
fn run_case(case: &str, models_yaml: &str, images_yaml: &str, ip_adapters_yaml: &str) -> Tensor {
    run_generate_case(
        &format!("ipa_{case}"),
        models_yaml,
        images_yaml,
        &format!("      ip_adapters:\n{ip_adapters_yaml}"),
    )
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
    let pixels = normalize(&fit_image(&image, 224, Fit::Crop), &common::device()).unwrap();
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

#[test]
fn embed_command_tokens_reproduce_the_image_run() {
    let dir = scratch("ipa-embed");
    let out = dir.join("ref_a.safetensors");
    let debug = dir.join("seen");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_ipcompose"))
        .args(["embed", "--adapter"])
        .arg(fixtures().join("ip-adapter").join(PLAIN))
        .arg("--image-encoder")
        .arg(fixtures().join("ip-adapter/image_encoder"))
        .arg("--out")
        .arg(&out)
        .arg("--debug-input")
        .arg(&debug)
        .arg(fixtures().join("ip-adapter/inputs/ref_a.png"))
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let seen = image::open(debug.join("ref_a.png")).unwrap();
    assert_eq!((seen.width(), seen.height()), (224, 224));
    let models = format!(
        "  ipa: {{kind: ip-adapter, source: {}}}",
        fx(&format!("ip-adapter/{PLAIN}"))
    );
    // No image encoder declared: the tokens come from the file.
    run_case(
        "plain",
        &models,
        &images(),
        &format!(
            "        - {{model: ipa, embeds: {}, scale: 0.6}}",
            out.display()
        ),
    );
}

#[test]
fn adapter_for_another_base_is_refused_before_loading() {
    let dir = scratch("ipa-wrong-base");
    let text = format!(
        "version: 1\nmodels:\n  base: {{kind: sd2, source: {}}}\n{}\nimages:\n{}\nnodes:\n  gen:\n    generate:\n      base: base\n      prompt: x\n      ip_adapters:\n        - {{model: ipa, image: ref_a}}\n",
        fx("tiny-sd2"),
        adapter_model("ipa", PLAIN),
        images()
    );
    let path = dir.join("recipe.yaml");
    let recipe = Recipe::parse(&text, &path).unwrap();
    let err = Plan::build(&recipe, &text, &path, &dir)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cross_attention_dim 32") && err.contains("has 48"),
        "{err}"
    );
    assert!(
        err.contains("recipe.yaml:"),
        "error should carry the line: {err}"
    );
}

#[test]
fn pad_and_squash_keep_the_whole_reference() {
    let image = load_rgb(&fixtures().join("ip-adapter/inputs/ref_wide.png")).unwrap();
    let padded = fit_image(&image, 224, Fit::Pad);
    assert_eq!(padded.dimensions(), (224, 224));
    // 320x200 letterboxed to 320x320: 60 black rows above and below, 42 at 224.
    assert!(padded.rows().next().unwrap().all(|p| p.0 == [0, 0, 0]));
    assert!(padded.get_pixel(112, 112).0 != [0, 0, 0]);
    assert!(padded.get_pixel(112, 40).0 == [0, 0, 0] && padded.get_pixel(112, 44).0 != [0, 0, 0]);
    let squashed = fit_image(&image, 224, Fit::Squash);
    assert_eq!(squashed.dimensions(), (224, 224));
    assert!(squashed.rows().next().unwrap().any(|p| p.0 != [0, 0, 0]));
    // Crop and squash see different content on a wide image.
    let cropped = fit_image(&image, 224, Fit::Crop);
    assert_ne!(cropped.as_raw(), squashed.as_raw());
}

#[test]
fn averaging_identical_images_equals_one_image() {
    let dev = Device::Cpu;
    let adapter = ipcompose::models::ip_adapter::IpAdapter::load(
        &fixtures().join("ip-adapter").join(PLUS),
        candle_core::DType::F32,
        &dev,
    )
    .unwrap();
    let encoder = ipcompose::models::clip_vision::load_image_encoder(
        &fixtures().join("ip-adapter/image_encoder"),
        candle_core::DType::F32,
        &dev,
    )
    .unwrap();
    let a = fixtures().join("ip-adapter/inputs/ref_a.png");
    let b = fixtures().join("ip-adapter/inputs/ref_b.png");
    use ipcompose::pipeline::plan::ip::Combine;
    use ipcompose::pipeline::run::ip::image_tokens;
    let one = image_tokens(
        &adapter,
        &encoder,
        std::slice::from_ref(&a),
        None,
        Combine::Concat,
        Fit::Crop,
        &dev,
    )
    .unwrap();
    let twice = image_tokens(
        &adapter,
        &encoder,
        &[a.clone(), a.clone()],
        None,
        Combine::Average,
        Fit::Crop,
        &dev,
    )
    .unwrap();
    assert_eq!(twice.len(), 1);
    assert!(max_abs_diff(&one[0].0, &twice[0].0) < 1e-5);
    let mixed = image_tokens(
        &adapter,
        &encoder,
        &[a.clone(), b],
        None,
        Combine::Average,
        Fit::Crop,
        &dev,
    )
    .unwrap();
    assert!(max_abs_diff(&one[0].0, &mixed[0].0) > 1e-3);
    // An explicit negative image replaces the default negative tokens.
    let with_negative = image_tokens(
        &adapter,
        &encoder,
        std::slice::from_ref(&a),
        Some(&a),
        Combine::Concat,
        Fit::Crop,
        &dev,
    )
    .unwrap();
    assert!(max_abs_diff(&with_negative[0].0, &with_negative[0].1) < 1e-5);
    assert!(max_abs_diff(&one[0].1, &with_negative[0].1) > 1e-3);
}

#[test]
fn plain_adapter_without_guidance() {
    // guidance 1.0: the conditional batch only, so no negative image tokens at all.
    run_generate_case(
        "ipa_plain_g1",
        &adapter_model("ipa", PLAIN),
        &images(),
        "      guidance: 1.0\n      ip_adapters:\n        - {model: ipa, image: ref_a, scale: 0.6}",
    );
}
