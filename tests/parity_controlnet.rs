//! ControlNet and T2I-Adapter parity with diffusers on tiny random-weight models.
//! Fixtures: tests/fixtures/make_adapter_fixtures.py (diffusers, fp32, CPU): `controlnet/`,
//! `t2i/`, `reference/cn_forward.safetensors` and `reference/t2i_features.safetensors`.
//!
//! Tolerance: 1e-4 max abs diff for every forward (fp32 on CPU); the measured figures are
//! printed (`cargo test --test parity_controlnet -- --nocapture`).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use common::{fixtures, get, max_abs, max_abs_diff, reference, scratch};
use ipcompose::models::controlnet::{
    check_compatible, ControlCondition, ControlNetConfig, ControlNetModel, ControlNetResiduals,
};
use ipcompose::models::folder::DiffusersFolder;
use ipcompose::models::single_file::controlnet_key_from_original;
use ipcompose::models::t2i_adapter::{self, T2IAdapter, T2IAdapterConfig};
use ipcompose::models::unet::{Injections, UNet2DConditionModel, UNetConfig};
use ipcompose::models::ModelError;

const TOLERANCE: f32 = 1e-4;

fn controlnet_dir(name: &str) -> PathBuf {
    fixtures().join("controlnet").join(name)
}

fn base_folder() -> DiffusersFolder {
    DiffusersFolder::open(&fixtures().join("tiny-sd15"))
        .unwrap_or_else(|e| panic!("fixture tiny-sd15: {e}"))
}

fn base_unet_config() -> UNetConfig {
    base_folder()
        .unet_config()
        .unwrap_or_else(|e| panic!("fixture tiny-sd15 UNet config: {e}"))
}

fn base_unet() -> UNet2DConditionModel {
    base_folder()
        .load_unet(&base_unet_config(), DType::F32, &common::device())
        .unwrap_or_else(|e| panic!("fixture tiny-sd15 UNet: {e}"))
}

fn folder_controlnet(name: &str) -> ControlNetModel {
    let dir = controlnet_dir(name);
    let config = ControlNetConfig::from_folder(&dir)
        .unwrap_or_else(|e| panic!("fixture controlnet/{name}: {e}"));
    ControlNetModel::load_folder(&dir, &config, None, DType::F32, &common::device())
        .unwrap_or_else(|e| panic!("fixture controlnet/{name}: {e}"))
}

fn single_file_controlnet(path: &Path) -> ControlNetModel {
    let config = ControlNetConfig::from_single_file(path, &base_unet_config(), false)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    ControlNetModel::load_single_file(path, &config, DType::F32, &common::device())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn timestep(r: &HashMap<String, Tensor>) -> f64 {
    get(r, "timestep")
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn scalar(r: &HashMap<String, Tensor>, key: &str) -> f64 {
    get(r, key)
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Runs a ControlNet on the `cn_forward` inputs.
fn run(
    net: &ControlNetModel,
    r: &HashMap<String, Tensor>,
    guess_mode: bool,
) -> ControlNetResiduals {
    net.forward(
        get(r, "sample"),
        timestep(r),
        get(r, "context"),
        &[ControlCondition {
            image: get(r, "cond"),
            union_type: None,
            scale: scalar(r, "scale"),
        }],
        guess_mode,
    )
    .unwrap()
}

/// Largest difference over all residuals against `{prefix}down.{i}` and `{prefix}mid`.
fn residual_diff(out: &ControlNetResiduals, r: &HashMap<String, Tensor>, prefix: &str) -> f32 {
    let mut worst = 0f32;
    for (i, down) in out.down.iter().enumerate() {
        let expected = get(r, &format!("{prefix}down.{i}"));
        let d = max_abs_diff(down, expected);
        assert!(
            max_abs(expected) > 0.0,
            "{prefix}down.{i} is all zeros: the test would prove nothing"
        );
        worst = worst.max(d);
    }
    worst.max(max_abs_diff(&out.mid, get(r, &format!("{prefix}mid"))))
}

#[test]
fn controlnet_residuals_match_diffusers() {
    let r = reference("cn_forward.safetensors");
    let net = folder_controlnet("tiny-canny");
    let out = run(&net, &r, false);
    // One residual per skip connection of the UNet it is for (12 for the SD1.5 layout).
    assert_eq!(out.down.len(), base_unet_config().skip_channels().len());
    assert_eq!(out.down.len(), 12);
    let diff = residual_diff(&out, &r, "");
    eprintln!("ControlNet residuals (scale 0.8): max abs diff {diff:.2e}");
    assert!(diff <= TOLERANCE, "ControlNet residuals differ by {diff}");
}

#[test]
fn controlnet_guess_mode_weights_match_diffusers() {
    let r = reference("cn_forward.safetensors");
    let net = folder_controlnet("tiny-canny");
    let out = run(&net, &r, true);
    let diff = residual_diff(&out, &r, "guess.");
    eprintln!("ControlNet guess mode: max abs diff {diff:.2e}");
    assert!(diff <= TOLERANCE, "guess-mode residuals differ by {diff}");
}

#[test]
fn global_pool_controlnet_averages_and_ignores_guess_weights() {
    let r = reference("cn_forward.safetensors");
    let net = folder_controlnet("tiny-shuffle");
    assert!(net.config().global_pool_conditions);
    // diffusers ran it with guess_mode=True; its weights are not applied to pooled models.
    let out = run(&net, &r, true);
    for d in &out.down {
        assert_eq!(&d.dims()[2..], [1, 1]);
    }
    let diff = residual_diff(&out, &r, "shuffle.");
    eprintln!("ControlNet global pool: max abs diff {diff:.2e}");
    assert!(diff <= TOLERANCE, "pooled residuals differ by {diff}");
}

#[test]
fn unet_with_controlnet_residuals_matches_diffusers() {
    let r = reference("cn_forward.safetensors");
    let out = run(&folder_controlnet("tiny-canny"), &r, false);
    let unet = base_unet();
    let injections = Injections {
        down_residuals: Some(&out.down),
        mid_residual: Some(&out.mid),
        ..Default::default()
    };
    let prediction = unet
        .forward(
            get(&r, "sample"),
            timestep(&r),
            get(&r, "context"),
            &injections,
        )
        .unwrap();
    let expected = get(&r, "unet_out");
    let diff = max_abs_diff(&prediction, expected);
    let moved = max_abs_diff(expected, get(&r, "unet_out_plain"));
    eprintln!(
        "UNet + ControlNet: max abs diff {diff:.2e} (control moves the output by {moved:.2e})"
    );
    assert!(moved > 1e-2, "the residuals should change the UNet output");
    assert!(
        diff <= TOLERANCE,
        "UNet output with ControlNet differs by {diff}"
    );
}

#[test]
fn single_file_controlnet_equals_its_folder_twin() {
    let r = reference("cn_forward.safetensors");
    let folder = folder_controlnet("tiny-canny");
    let expected = run(&folder, &r, false);
    for file in ["tiny-canny-single.safetensors", "tiny-canny-single.pth"] {
        let path = controlnet_dir(file);
        let net = single_file_controlnet(&path);
        let (a, b) = (&net.config(), &folder.config());
        assert_eq!(a.encoder.block_out_channels, b.encoder.block_out_channels);
        assert_eq!(a.encoder.layers_per_block, b.encoder.layers_per_block);
        assert_eq!(a.encoder.cross_attention_dim, b.encoder.cross_attention_dim);
        assert_eq!(a.encoder.down_blocks, b.encoder.down_blocks);
        assert_eq!(
            a.encoder.use_linear_projection,
            b.encoder.use_linear_projection
        );
        assert_eq!(
            a.conditioning_embedding_out_channels,
            b.conditioning_embedding_out_channels
        );
        assert_eq!(a.conditioning_channels, b.conditioning_channels);
        let out = run(&net, &r, false);
        let mut diff = max_abs_diff(&out.mid, &expected.mid);
        for (x, y) in out.down.iter().zip(&expected.down) {
            diff = diff.max(max_abs_diff(x, y));
        }
        eprintln!("{file} vs folder: max abs diff {diff:.2e}");
        assert_eq!(diff, 0.0, "{file} differs from the folder by {diff}");
    }
}

#[test]
fn single_file_controlnet_without_prefix_loads_the_same() {
    let source = controlnet_dir("tiny-canny-single.safetensors");
    let tensors = candle_core::safetensors::load(&source, &common::device())
        .unwrap_or_else(|e| panic!("fixture {}: {e}", source.display()));
    let bare: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| {
            let k = k
                .strip_prefix("control_model.")
                .unwrap_or_else(|| panic!("fixture key `{k}` lacks control_model."))
                .to_string();
            (k, v)
        })
        .collect();
    let path = scratch("controlnet-bare").join("bare.safetensors");
    candle_core::safetensors::save(&bare, &path).unwrap();
    let r = reference("cn_forward.safetensors");
    let out = run(&single_file_controlnet(&path), &r, false);
    let expected = run(&folder_controlnet("tiny-canny"), &r, false);
    let diff =
        max_abs_diff(&out.down[5], &expected.down[5]).max(max_abs_diff(&out.mid, &expected.mid));
    assert_eq!(diff, 0.0);
}

#[test]
fn controlnet_renaming_matches_the_fixture_table() {
    let path = controlnet_dir("tiny-canny-single.renaming.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let table = json["diffusers_to_original"]
        .as_object()
        .unwrap_or_else(|| panic!("{}: no diffusers_to_original", path.display()));
    assert!(table.len() > 100, "suspiciously small table");
    let hint_convs = [0, 2, 4, 6, 8, 10, 12, 14];
    for (diffusers, original) in table {
        let original = original.as_str().unwrap();
        assert_eq!(
            controlnet_key_from_original(original, &[2, 2, 2, 2], &hint_convs).as_deref(),
            Some(diffusers.as_str()),
            "renaming `{original}`"
        );
    }
}

fn write_modified_config(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let source = controlnet_dir("tiny-canny").join("config.json");
    let text = std::fs::read_to_string(&source)
        .unwrap_or_else(|e| panic!("fixture {}: {e}", source.display()));
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut json);
    let dir = scratch(name);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
    dir
}

#[test]
fn controlnet_for_another_base_is_refused() {
    let base = base_unet_config();
    let canny = ControlNetConfig::from_folder(&controlnet_dir("tiny-canny")).unwrap();
    check_compatible(&canny, &base).unwrap();

    let dir = write_modified_config("controlnet-sd2-width", |j| {
        j["cross_attention_dim"] = 1024.into()
    });
    let config = ControlNetConfig::from_folder(&dir).unwrap();
    let err = check_compatible(&config, &base).unwrap_err();
    assert!(matches!(err, ModelError::Incompatible { .. }), "{err:?}");
    let message = err.to_string();
    eprintln!("{message}");
    assert!(
        message.contains(&dir.join("config.json").display().to_string()),
        "{message}"
    );
    assert!(
        message.contains("cross_attention_dim 1024, the base model has 32"),
        "{message}"
    );

    let dir = write_modified_config("controlnet-wider", |j| {
        j["block_out_channels"] = serde_json::json!([32, 32, 64, 64])
    });
    let config = ControlNetConfig::from_folder(&dir).unwrap();
    let message = check_compatible(&config, &base).unwrap_err().to_string();
    assert!(
        message
            .contains("block_out_channels [32, 32, 64, 64], the base model has [16, 32, 32, 32]"),
        "{message}"
    );
}

#[test]
fn single_file_controlnet_for_another_base_is_refused() {
    let path = controlnet_dir("tiny-canny-single.safetensors");
    let mut other_base = base_unet_config();
    other_base.cross_attention_dim = 64;
    let message = ControlNetConfig::from_single_file(&path, &other_base, false)
        .unwrap_err()
        .to_string();
    eprintln!("{message}");
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(
        message.contains("cross_attention_dim 32, the base model has 64"),
        "{message}"
    );
}

fn adapter(name: &str) -> T2IAdapter {
    let dir = fixtures().join("t2i").join(name);
    let config =
        T2IAdapterConfig::from_folder(&dir).unwrap_or_else(|e| panic!("fixture t2i/{name}: {e}"));
    t2i_adapter::check_compatible(&config, &base_unet_config())
        .unwrap_or_else(|e| panic!("fixture t2i/{name}: {e}"));
    T2IAdapter::load_folder(&dir, &config, None, DType::F32, &common::device())
        .unwrap_or_else(|e| panic!("fixture t2i/{name}: {e}"))
}

#[test]
fn t2i_adapter_features_match_diffusers() {
    let r = reference("t2i_features.safetensors");
    // The sketch hint `[1, 3, 128, 128]` in [0, 1]; features before any scaling.
    let hint = get(&r, "hint");
    for (name, prefix) in [("tiny-full", "full"), ("tiny-light", "light")] {
        let features = adapter(name).forward(hint).unwrap();
        assert_eq!(features.len(), 4, "{name}");
        let mut worst = 0f32;
        for (i, f) in features.iter().enumerate() {
            worst = worst.max(max_abs_diff(f, get(&r, &format!("{prefix}.{i}"))));
        }
        eprintln!("T2I {name}: max abs diff {worst:.2e}");
        assert!(worst <= TOLERANCE, "{name} features differ by {worst}");
    }
}

#[test]
fn unet_with_t2i_features_matches_diffusers() {
    let r = reference("t2i_features.safetensors");
    let scale = scalar(&r, "unet_scale");
    // As the adapter pipeline: features × scale, the same for both guidance halves.
    let features: Vec<Tensor> = adapter("tiny-full")
        .forward(get(&r, "hint"))
        .unwrap()
        .into_iter()
        .map(|f| {
            let f = f.affine(scale, 0.0).unwrap();
            Tensor::cat(&[&f, &f], 0).unwrap()
        })
        .collect();
    let injections = Injections {
        down_block_features: Some(&features),
        ..Default::default()
    };
    let prediction = base_unet()
        .forward(
            get(&r, "sample"),
            timestep(&r),
            get(&r, "context"),
            &injections,
        )
        .unwrap();
    let expected = get(&r, "unet_out_full");
    let diff = max_abs_diff(&prediction, expected);
    eprintln!("UNet + T2I full: max abs diff {diff:.2e}");
    assert!(max_abs_diff(expected, get(&r, "unet_out_plain")) > 1e-2);
    assert!(
        diff <= TOLERANCE,
        "UNet output with T2I features differs by {diff}"
    );
}

#[test]
fn bgr_controlnet_flips_the_control_image() {
    let r = reference("cn_forward.safetensors");
    let dir = write_modified_config("controlnet-bgr", |j| {
        j["controlnet_conditioning_channel_order"] = "bgr".into()
    });
    let weights = "diffusion_pytorch_model.safetensors";
    std::fs::copy(
        controlnet_dir("tiny-canny").join(weights),
        dir.join(weights),
    )
    .unwrap();
    let config = ControlNetConfig::from_folder(&dir).unwrap();
    let bgr =
        ControlNetModel::load_folder(&dir, &config, None, DType::F32, &common::device()).unwrap();
    let flipped = get(&r, "cond").flip(&[1]).unwrap();
    let out = bgr
        .forward(
            get(&r, "sample"),
            timestep(&r),
            get(&r, "context"),
            &[ControlCondition {
                image: &flipped,
                union_type: None,
                scale: scalar(&r, "scale"),
            }],
            false,
        )
        .unwrap();
    let diff = residual_diff(&out, &r, "");
    assert!(diff <= TOLERANCE, "bgr residuals differ by {diff}");
}

#[test]
fn a_unet_file_is_not_taken_for_a_controlnet() {
    let path = fixtures().join("tiny-sd15/unet/diffusion_pytorch_model.safetensors");
    let message = ControlNetConfig::from_single_file(&path, &base_unet_config(), false)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains(&path.display().to_string()) && message.contains("not a ControlNet"),
        "{message}"
    );
}
