//! ControlNets and T2I-Adapters end to end (recipe → plan → run) against diffusers'
//! StableDiffusionControlNetPipeline / StableDiffusionAdapterPipeline, alone and composed
//! with an IP-Adapter. Fixtures: tests/fixtures/make_adapter_fixtures.py.

mod common;

use common::{fixtures, fx, get, max_abs_diff, reference, run_generate_case};
use ipcompose::pipeline::plan::control::ResizeMode;
use ipcompose::pipeline::run::control::prepare_hint;

fn models() -> String {
    [
        format!(
            "  canny: {{kind: controlnet, source: {}}}",
            fx("controlnet/tiny-canny")
        ),
        format!(
            "  depth: {{kind: controlnet, source: {}}}",
            fx("controlnet/tiny-depth")
        ),
        format!(
            "  shuffle: {{kind: controlnet, source: {}}}",
            fx("controlnet/tiny-shuffle")
        ),
        format!(
            "  canny_single: {{kind: controlnet, source: {}}}",
            fx("controlnet/tiny-canny-single.safetensors")
        ),
        format!(
            "  full: {{kind: t2i-adapter, source: {}}}",
            fx("t2i/tiny-full")
        ),
        format!(
            "  light: {{kind: t2i-adapter, source: {}}}",
            fx("t2i/tiny-light")
        ),
        format!(
            "  ipa: {{kind: ip-adapter, source: {}, image_encoder: {}}}",
            fx("ip-adapter/ip-adapter_tiny.safetensors"),
            fx("ip-adapter/image_encoder")
        ),
    ]
    .join("\n")
}

fn images() -> String {
    [
        ("edges", "controlnet/inputs/edges.png"),
        ("depthmap", "controlnet/inputs/depth.png"),
        ("sketch", "controlnet/inputs/sketch.png"),
        ("edges_wide", "controlnet/inputs/edges_wide.png"),
        ("ref_a", "ip-adapter/inputs/ref_a.png"),
    ]
    .iter()
    .map(|(n, f)| format!("  {n}: {}", fx(f)))
    .collect::<Vec<_>>()
    .join("\n")
}

fn controls(case: &str, body: &str) {
    run_generate_case(
        &format!("cn_{case}"),
        &models(),
        &images(),
        &format!("      controls:\n{body}"),
    );
}

#[test]
fn one_controlnet_with_scale_and_window() {
    controls(
        "one",
        "        - {model: canny, image: edges, scale: 0.8, start: 0.0, end: 0.75}",
    );
}

#[test]
fn single_file_controlnet_equals_its_folder_twin() {
    controls(
        "one",
        "        - {model: canny_single, image: edges, scale: 0.8, start: 0.0, end: 0.75}",
    );
}

#[test]
fn two_controlnets_with_different_scales() {
    controls(
        "two",
        "        - {model: canny, image: edges, scale: 0.8}\n        - {model: depth, image: depthmap, scale: 0.5}",
    );
}

#[test]
fn guess_mode() {
    controls(
        "guess",
        "        - {model: canny, image: edges, scale: 1.0, guess_mode: true}",
    );
}

#[test]
fn global_pool_controlnet_forces_guess_mode() {
    controls("shuffle", "        - {model: shuffle, image: edges}");
}

#[test]
fn t2i_full_adapter() {
    controls(
        "t2i_full",
        "        - {model: full, image: sketch, scale: 0.9}",
    );
}

#[test]
fn t2i_adapter_factor() {
    controls(
        "t2i_full_factor",
        "        - {model: full, image: sketch, scale: 0.9, factor: 0.75}",
    );
}

#[test]
fn t2i_light_adapter() {
    controls("t2i_light", "        - {model: light, image: sketch}");
}

#[test]
fn two_t2i_adapters() {
    controls(
        "t2i_two",
        "        - {model: full, image: sketch, scale: 0.6}\n        - {model: light, image: depthmap, scale: 0.4}",
    );
}

#[test]
fn ip_adapter_with_two_controlnets() {
    run_generate_case(
        "cn_compose",
        &models(),
        &images(),
        "      ip_adapters:\n        - {model: ipa, image: ref_a, scale: 0.6}\n      controls:\n        - {model: canny, image: edges, scale: 0.8, start: 0.0, end: 0.75}\n        - {model: depth, image: depthmap, scale: 0.5}",
    );
}

#[test]
fn hint_is_stretched_like_diffusers() {
    let r = reference("cn_wide_resize.safetensors");
    let hint = prepare_hint(
        &fixtures().join("controlnet/inputs/edges_wide.png"),
        128,
        128,
        ResizeMode::Resize,
        &common::device(),
    )
    .unwrap();
    let diff = max_abs_diff(&hint, get(&r, "hint"));
    eprintln!("wide hint (Pillow Lanczos): max abs diff {diff:.2e}");
    assert!(diff < 1e-6, "hint differs by {diff}");
    controls(
        "wide_resize",
        "        - {model: canny, image: edges_wide, scale: 0.8}",
    );
}

#[test]
fn crop_and_fill_keep_the_aspect_ratio() {
    let path = fixtures().join("controlnet/inputs/edges_wide.png");
    let crop = prepare_hint(&path, 128, 128, ResizeMode::Crop, &common::device()).unwrap();
    let fill = prepare_hint(&path, 128, 128, ResizeMode::Fill, &common::device()).unwrap();
    assert_eq!(crop.dims(), &[1, 3, 128, 128]);
    // 160x96 fitted into 128x128 is 128x77: black bars of 25 and 26 rows.
    let top: f32 = fill
        .narrow(2, 0, 25)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    let middle: f32 = fill
        .narrow(2, 40, 40)
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(top, 0.0);
    assert!(middle > 0.0);
    assert!(max_abs_diff(&crop, &fill) > 0.1);
}

/// Per-step strength (the schedule language) against diffusers runs whose scales were set
/// per step (tests/fixtures/make_schedule_fixtures.py); same bound as the other cases.
fn schedule(case: &str, body: &str) {
    run_generate_case(&format!("schedule_{case}"), &models(), &images(), body);
}

#[test]
fn schedule_ip_adapter_list() {
    schedule(
        "ip_list",
        "      ip_adapters:\n        - {model: ipa, image: ref_a, scale: [0.2, 0.9, 0.5, 0.0]}",
    );
}

#[test]
fn schedule_controlnet_ramp() {
    schedule(
        "cn_ramp",
        "      controls:\n        - {model: canny, image: edges, scale: {ramp: [1.0, 0.3]}, start: 0.0, end: 1.0}",
    );
}

#[test]
fn schedule_controlnet_ramp_inside_window() {
    schedule(
        "cn_ramp_window",
        "      controls:\n        - {model: canny, image: edges, scale: {ramp: [1.0, 0.3]}, start: 0.25, end: 1.0}",
    );
}

#[test]
fn schedule_t2i_ramp() {
    schedule(
        "t2i_ramp",
        "      controls:\n        - {model: full, image: sketch, scale: {ramp: [1.2, 0.0]}}",
    );
}

#[test]
fn schedule_ip_ramp_with_controlnet_list() {
    schedule(
        "compose",
        "      ip_adapters:\n        - {model: ipa, image: ref_a, scale: {ramp: [0.8, 0.2]}}\n      controls:\n        - {model: canny, image: edges, scale: [0.5, 1.0, 1.0, 0.5]}",
    );
}
