//! SDXL structural conditions at parity with diffusers, through recipes on the tiny random-weight
//! `tiny-sdxl` folder: a ControlNet (window; guess mode; with an IP-Adapter), a union
//! ControlNet (one condition with a window; two conditions in one call) and a T2I-Adapter XL.
//! Fixtures: tests/fixtures/make_sdxl_control_fixtures.py (`StableDiffusionXLControlNetPipeline`,
//! `StableDiffusionXLControlNetUnionPipeline`, `StableDiffusionXLAdapterPipeline`, fp32, CPU).

mod common;

use common::{fx, plan, scratch};

fn sdxl_case(case: &str, models: &str, images: &str, extra: &str) {
    common::run_sdxl_case(&format!("sdxl_{case}"), models, images, extra);
}

fn controlnet_model() -> String {
    format!(
        "  cn: {{kind: controlnet, source: {}}}\n",
        fx("controlnet/tiny-sdxl-canny")
    )
}

fn union_model() -> String {
    format!(
        "  union: {{kind: controlnet, source: {}}}\n",
        fx("controlnet/tiny-sdxl-union")
    )
}

fn image(name: &str, file: &str) -> String {
    format!("  {name}: {}\n", fx(&format!("controlnet/inputs/{file}")))
}

#[test]
fn sdxl_controlnet_with_a_window() {
    sdxl_case(
        "cn",
        &controlnet_model(),
        &image("edges", "edges.png"),
        "      controls:\n        - {model: cn, image: edges, scale: 0.8, end: 0.75}\n",
    );
}

/// Guess mode: the ControlNet sees the conditional half only, its added conditioning too.
#[test]
fn sdxl_controlnet_in_guess_mode() {
    sdxl_case(
        "cn_guess",
        &controlnet_model(),
        &image("edges", "edges.png"),
        "      controls:\n        - {model: cn, image: edges, scale: 0.8, guess_mode: true}\n",
    );
}

#[test]
fn sdxl_controlnet_with_an_ip_adapter() {
    let models = format!(
        "{}  ip: {{kind: ip-adapter, source: {}, image_encoder: {}}}\n",
        controlnet_model(),
        fx("ip-adapter/ip-adapter_sdxl_tiny.safetensors"),
        fx("ip-adapter/image_encoder"),
    );
    let images = format!(
        "{}  ref: {}\n",
        image("edges", "edges.png"),
        fx("ip-adapter/inputs/ref_a.png")
    );
    sdxl_case(
        "cn_ipa",
        &models,
        &images,
        "      controls:\n        - {model: cn, image: edges, scale: 0.8}\n      ip_adapters:\n        - {model: ip, image: ref, scale: 0.6}\n",
    );
}

#[test]
fn sdxl_union_controlnet_with_one_condition() {
    sdxl_case(
        "union_one",
        &union_model(),
        &image("depth", "depth.png"),
        "      controls:\n        - {model: union, image: depth, type: depth, scale: 0.7, start: 0.25}\n",
    );
}

/// Two controls naming the same union model run in one evaluation, each condition scaled.
#[test]
fn sdxl_union_controlnet_with_two_conditions() {
    let images = format!(
        "{}{}",
        image("edges", "edges.png"),
        image("depth", "depth.png")
    );
    sdxl_case(
        "union_two",
        &union_model(),
        &images,
        "      controls:\n        - {model: union, image: edges, type: canny, scale: 0.9}\n        - {model: union, image: depth, type: depth, scale: 0.5}\n",
    );
}

#[test]
fn sdxl_t2i_adapter_xl() {
    sdxl_case(
        "t2i",
        &format!(
            "  t2i: {{kind: t2i-adapter, source: {}}}\n",
            fx("t2i/tiny-sdxl-full")
        ),
        &image("sketch", "sketch.png"),
        "      controls:\n        - {model: t2i, image: sketch, scale: 0.9, factor: 0.75}\n",
    );
}

/// Plans `controls` on the SDXL base (or `base_folder`) and returns the error text.
fn plan_error(case: &str, base_folder: &str, models: &str, controls: &str) -> String {
    let dir = scratch(&format!("sdxl-control-err-{case}-{}", std::process::id()));
    let text = format!(
        "version: 1\nmodels:\n  base: {{kind: {}, source: {}}}\n{models}images:\n{}nodes:\n  gen:\n    generate:\n      base: base\n      prompt: x\n      controls:\n{controls}outputs:\n  - {{latents: gen, path: out.safetensors}}\n",
        if base_folder == "tiny-sdxl" { "sdxl" } else { "sd15" },
        fx(base_folder),
        image("edges", "edges.png"),
    );
    plan(&dir, &text)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_else(|| panic!("{case}: planned"))
}

#[test]
fn controls_for_the_other_family_are_refused_naming_both_widths() {
    let sd15_cn = format!(
        "  cn: {{kind: controlnet, source: {}}}\n",
        fx("controlnet/tiny-canny")
    );
    let err = plan_error(
        "sd15-cn",
        "tiny-sdxl",
        &sd15_cn,
        "        - {model: cn, image: edges}\n",
    );
    assert!(
        err.contains("cross_attention_dim 32") && err.contains("80"),
        "{err}"
    );
    let err = plan_error(
        "sdxl-cn-on-sd15",
        "tiny-sd15",
        &controlnet_model(),
        "        - {model: cn, image: edges}\n",
    );
    assert!(
        err.contains("cross_attention_dim 80") && err.contains("32"),
        "{err}"
    );
    let err = plan_error(
        "sd15-t2i",
        "tiny-sdxl",
        &format!(
            "  t2i: {{kind: t2i-adapter, source: {}}}\n",
            fx("t2i/tiny-full")
        ),
        "        - {model: t2i, image: edges}\n",
    );
    assert!(err.contains("feature channels"), "{err}");
}

#[test]
fn union_types_are_checked_at_plan_time() {
    let err = plan_error(
        "union-no-type",
        "tiny-sdxl",
        &union_model(),
        "        - {model: union, image: edges}\n",
    );
    assert!(
        err.contains("name the image's condition `type:`") && err.contains("openpose"),
        "{err}"
    );
    let err = plan_error(
        "union-bad-type",
        "tiny-sdxl",
        &union_model(),
        "        - {model: union, image: edges, type: cany}\n",
    );
    assert!(
        err.contains("unknown union condition type `cany`") && err.contains("canny"),
        "{err}"
    );
    // The model knows 6 types; tile (6) is ProMax's.
    let err = plan_error(
        "union-promax-type",
        "tiny-sdxl",
        &union_model(),
        "        - {model: union, image: edges, type: tile}\n",
    );
    assert!(err.contains("ProMax"), "{err}");
    let err = plan_error(
        "union-guess",
        "tiny-sdxl",
        &union_model(),
        "        - {model: union, image: edges, type: canny, guess_mode: true}\n",
    );
    assert!(err.contains("guess mode is not supported"), "{err}");
    let err = plan_error(
        "plain-type",
        "tiny-sdxl",
        &controlnet_model(),
        "        - {model: cn, image: edges, type: canny}\n",
    );
    assert!(err.contains("`type` is for union ControlNets"), "{err}");
}

/// A single `.safetensors` ControlNet in diffusers' names (as SDXL ControlNets are often
/// shared): its config comes from the tensors and the SDXL base, and it runs as its folder.
#[test]
fn sdxl_controlnet_single_file_equals_its_folder() {
    let dir = scratch(&format!("sdxl-cn-single-{}", std::process::id()));
    let file = dir.join("controlnet-tiny-sdxl.safetensors");
    std::fs::copy(
        common::fixtures().join("controlnet/tiny-sdxl-canny/diffusion_pytorch_model.safetensors"),
        &file,
    )
    .unwrap();
    sdxl_case(
        "cn",
        &format!("  cn: {{kind: controlnet, source: {}}}\n", file.display()),
        &image("edges", "edges.png"),
        "      controls:\n        - {model: cn, image: edges, scale: 0.8, end: 0.75}\n",
    );
}
