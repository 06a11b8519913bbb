//! The Depth Anything V2 depth preprocessor against transformers 5.24 and the original
//! repository's `infer_image`, on a tiny random-weight model.
//! Fixtures: tests/fixtures/make_depth_fixtures.py (`depth/`, fp32, CPU).
//!
//! Tolerances (measured figures are printed with `-- --nocapture`):
//! - network: max abs diff ≤ 1e-4 × the output's max (fp32 CPU; outputs are about 1.2);
//! - preprocessing (float64 INTER_CUBIC + normalisation, cast to f32): bit-exact;
//! - map from the reference network output: bit-exact;
//! - map from our own network output: at most one level off, on at most 1% of the pixels (the
//!   network's float noise moves values across the `astype(uint8)` truncation boundaries).

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, get, max_abs, max_abs_diff, scratch};
use ipcompose::models::depth_anything::{
    load_depth_anything, load_depth_anything_with_config, original_name, resolve_depth_anything,
    DepthAnything, DepthAnythingConfig, DepthAnythingFormat, DepthAnythingVariant,
    DepthEstimationType, PosEmbedInterpolation,
};
use ipcompose::models::ModelError;
use ipcompose::preprocess::depth::{depth_map, depth_to_map, network_size, prepare, INPUT_SIZE};

const RELATIVE_TOLERANCE: f32 = 1e-4;

fn depth_dir() -> PathBuf {
    fixtures().join("depth")
}

fn load_tensors(name: &str) -> std::collections::HashMap<String, Tensor> {
    let path = depth_dir().join(name);
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("fixture {} unreadable: {e}", path.display()))
}

fn input_image() -> image::RgbImage {
    ipcompose::preprocess::load_image(&depth_dir().join("input.png"))
        .unwrap_or_else(|e| panic!("fixture input: {e}"))
}

fn hf_model() -> DepthAnything {
    load_depth_anything(&depth_dir().join("tiny-hf"), DType::F32, &Device::Cpu)
        .unwrap_or_else(|e| panic!("fixture tiny-hf: {e}"))
}

/// The tiny original-layout `.pth` has no preset width, so it takes the folder's config with
/// the original interpolation (what `load_depth_anything` picks for detected original files).
fn original_model() -> DepthAnything {
    let mut config = DepthAnythingConfig::from_file(&depth_dir().join("tiny-hf/config.json"))
        .unwrap_or_else(|e| panic!("fixture config: {e}"));
    config.pos_embed_interpolation = PosEmbedInterpolation::Original;
    load_depth_anything_with_config(
        &depth_dir().join("tiny_original.pth"),
        &config,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_or_else(|e| panic!("fixture tiny_original.pth: {e}"))
}

fn check_network(model: &DepthAnything, reference_key: &str) {
    let pixels = load_tensors("pixel_values.safetensors");
    let depth = load_tensors("depth.safetensors");
    let expected = get(&depth, reference_key);
    let out = model.forward(get(&pixels, "pixel_values")).unwrap();
    let diff = max_abs_diff(&out, expected);
    let scale = max_abs(expected);
    println!("{reference_key}: max abs diff {diff:e} (output max {scale})");
    assert!(
        diff <= RELATIVE_TOLERANCE * scale,
        "{reference_key}: max abs diff {diff} > {RELATIVE_TOLERANCE} × {scale}"
    );
}

#[test]
fn network_matches_transformers_folder() {
    let model = hf_model();
    assert_eq!(
        model.config().pos_embed_interpolation,
        PosEmbedInterpolation::Transformers
    );
    assert_eq!(model.config().out_indices, vec![1, 2, 3, 4]);
    assert_eq!(model.config().layer_norm_eps, 1e-6);
    check_network(&model, "depth_transformers");
}

#[test]
fn network_matches_original_pth() {
    check_network(&original_model(), "depth_original");
}

/// The two position-embedding interpolations give different networks on a non-square input, so
/// each layout must use its own (the fixture's outputs differ by about 4% of their range).
#[test]
fn interpolation_modes_differ() {
    let pixels = load_tensors("pixel_values.safetensors");
    let depth = load_tensors("depth.safetensors");
    let out = hf_model().forward(get(&pixels, "pixel_values")).unwrap();
    let other = get(&depth, "depth_original");
    let diff = max_abs_diff(&out, other);
    assert!(
        diff > 100.0 * RELATIVE_TOLERANCE * max_abs(other),
        "transformers-mode output is within {diff} of the original-mode reference"
    );
}

/// An original-layout file of a public size is recognised from its shapes alone (only the
/// tensors the detection reads are written; the full vits network is not built).
#[test]
fn original_layout_size_is_detected_from_shapes() {
    let dir = scratch("depth-detect-vits");
    let path = dir.join("depth_anything_v2_vits.safetensors");
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    let mut tensors = std::collections::HashMap::new();
    tensors.insert("pretrained.cls_token".to_string(), zeros(&[1, 1, 384]));
    tensors.insert("pretrained.pos_embed".to_string(), zeros(&[1, 1370, 384]));
    for i in 0..12 {
        tensors.insert(format!("pretrained.blocks.{i}.norm1.weight"), zeros(&[384]));
    }
    for (i, c) in [48, 96, 192, 384].into_iter().enumerate() {
        tensors.insert(
            format!("depth_head.projects.{i}.weight"),
            zeros(&[c, 384, 1, 1]),
        );
    }
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let (_, files) = resolve_depth_anything(&path).unwrap();
    assert_eq!(files.format, DepthAnythingFormat::Original);
    let mut expected = DepthAnythingVariant::Small.config();
    expected.pos_embed_interpolation = PosEmbedInterpolation::Original;
    assert_eq!(files.config, expected);

    // The metric releases differ only by name.
    let metric = dir.join("depth_anything_v2_metric_vkitti_vitl.safetensors");
    std::fs::copy(&path, &metric).unwrap();
    let (_, files) = resolve_depth_anything(&metric).unwrap();
    assert_eq!(
        files.config.depth_estimation_type,
        DepthEstimationType::Metric
    );
    assert_eq!(files.config.max_depth, 80.0);

    // One block short: named, with what was expected.
    tensors.remove("pretrained.blocks.11.norm1.weight");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let message = resolve_depth_anything(&path)
        .err()
        .expect("11 blocks")
        .to_string();
    assert!(message.contains("11 blocks, expected 12"), "{message}");
    assert!(message.contains(&path.display().to_string()), "{message}");
}

#[test]
fn preprocessing_matches_image2tensor() {
    let pixels = load_tensors("pixel_values.safetensors");
    let expected = get(&pixels, "pixel_values");
    let image = input_image();
    let input = prepare(&image, INPUT_SIZE).unwrap();
    assert_eq!(
        network_size(image.width(), image.height(), INPUT_SIZE),
        (686, 518)
    );
    assert_eq!(expected.dims(), &[1, 3, input.height, input.width]);
    let expected: Vec<f32> = expected.flatten_all().unwrap().to_vec1().unwrap();
    let mismatches = expected
        .iter()
        .zip(&input.data)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    let max = expected
        .iter()
        .zip(&input.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    println!(
        "preprocessing: {mismatches} of {} values differ, max abs diff {max:e}",
        expected.len()
    );
    assert_eq!(mismatches, 0, "max abs diff {max}");
}

fn reference_map() -> image::RgbImage {
    image::open(depth_dir().join("map.png"))
        .unwrap_or_else(|e| panic!("fixture map.png: {e}"))
        .to_rgb8()
}

#[test]
fn map_from_reference_depth_is_exact() {
    let depth = load_tensors("depth.safetensors");
    let d = get(&depth, "depth_original");
    let (_, h, w) = d.dims3().unwrap();
    let values: Vec<f32> = d.flatten_all().unwrap().to_vec1().unwrap();
    let image = input_image();
    let map = depth_to_map(&values, w, h, image.width(), image.height(), false);
    let expected = reference_map();
    let differing = map
        .as_raw()
        .iter()
        .zip(expected.as_raw())
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(differing, 0, "{differing} channel values differ");
}

#[test]
fn depth_map_end_to_end_matches_annotator() {
    let image = input_image();
    let map = depth_map(&original_model(), &image, INPUT_SIZE).unwrap();
    let expected = reference_map();
    assert_eq!(map.dimensions(), expected.dimensions());
    let (mut off, mut worst) = (0usize, 0u8);
    for (a, b) in map.pixels().zip(expected.pixels()) {
        assert!(a.0[0] == a.0[1] && a.0[1] == a.0[2], "map is not gray");
        let d = a.0[0].abs_diff(b.0[0]);
        worst = worst.max(d);
        off += (d != 0) as usize;
    }
    let pixels = (image.width() * image.height()) as usize;
    println!("end to end: {off} of {pixels} pixels differ, by at most {worst}");
    assert!(worst <= 1, "a pixel is {worst} levels off");
    assert!(off * 100 <= pixels, "{off} of {pixels} pixels differ");
}

#[test]
fn original_names_follow_the_conversion_table() {
    for (hf, original) in [
        ("backbone.embeddings.cls_token", "pretrained.cls_token"),
        (
            "backbone.embeddings.position_embeddings",
            "pretrained.pos_embed",
        ),
        (
            "backbone.embeddings.patch_embeddings.projection.weight",
            "pretrained.patch_embed.proj.weight",
        ),
        (
            "backbone.encoder.layer.11.layer_scale2.lambda1",
            "pretrained.blocks.11.ls2.gamma",
        ),
        (
            "backbone.encoder.layer.0.attention.qkv.bias",
            "pretrained.blocks.0.attn.qkv.bias",
        ),
        (
            "backbone.encoder.layer.3.attention.output.dense.weight",
            "pretrained.blocks.3.attn.proj.weight",
        ),
        (
            "backbone.encoder.layer.3.mlp.fc1.weight",
            "pretrained.blocks.3.mlp.fc1.weight",
        ),
        ("backbone.layernorm.bias", "pretrained.norm.bias"),
        (
            "neck.reassemble_stage.layers.3.resize.weight",
            "depth_head.resize_layers.3.weight",
        ),
        ("neck.convs.0.weight", "depth_head.scratch.layer1_rn.weight"),
        (
            "neck.fusion_stage.layers.0.residual_layer2.convolution1.bias",
            "depth_head.scratch.refinenet4.resConfUnit2.conv1.bias",
        ),
        (
            "neck.fusion_stage.layers.3.projection.weight",
            "depth_head.scratch.refinenet1.out_conv.weight",
        ),
        ("head.conv3.bias", "depth_head.scratch.output_conv2.2.bias"),
    ] {
        assert_eq!(original_name(hf), original, "{hf}");
    }
}

#[test]
fn presets_match_the_hub_configs() {
    let s = DepthAnythingVariant::Small.config();
    assert_eq!(
        (
            s.hidden_size,
            s.num_hidden_layers,
            s.num_attention_heads,
            s.fusion_hidden_size
        ),
        (384, 12, 6, 64)
    );
    assert_eq!(s.out_indices, vec![3, 6, 9, 12]);
    let l = DepthAnythingVariant::Large.config();
    assert_eq!(l.out_indices, vec![5, 12, 18, 24]);
    assert_eq!(l.neck_hidden_sizes, vec![256, 512, 1024, 1024]);
    for v in [
        DepthAnythingVariant::Small,
        DepthAnythingVariant::Base,
        DepthAnythingVariant::Large,
    ] {
        v.config().validate().unwrap();
        assert_eq!(
            DepthAnythingVariant::from_hidden_size(v.config().hidden_size),
            Some(v)
        );
    }
}

#[test]
fn original_pth_of_unknown_width_asks_for_a_config() {
    let path = depth_dir().join("tiny_original.pth");
    let err = load_depth_anything(&path, DType::F32, &Device::Cpu)
        .err()
        .expect("a width-32 original file has no preset");
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("width 32"), "{message}");
}

#[test]
fn wrong_kind_of_file_is_named() {
    let unet = fixtures().join("tiny-sd15/unet/diffusion_pytorch_model.safetensors");
    let err = load_depth_anything(&unet, DType::F32, &Device::Cpu)
        .err()
        .expect("a UNet is not a depth model");
    assert!(matches!(err, ModelError::Config { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&unet.display().to_string()), "{message}");
    assert!(
        message.contains("not a Depth Anything V2 checkpoint"),
        "{message}"
    );

    // A folder whose config.json is some other model.
    let dir = scratch("depth-wrong-config");
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "clip_vision_model", "hidden_size": 32}"#,
    )
    .unwrap();
    std::fs::copy(
        depth_dir().join("tiny-hf/model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let err = load_depth_anything(&dir, DType::F32, &Device::Cpu)
        .err()
        .expect("wrong config");
    let message = err.to_string();
    assert!(message.contains("config.json"), "{message}");
    assert!(message.contains("depth_anything"), "{message}");
}

/// The recipe node and `ipcompose preprocess depth` run the same map as the library; a file
/// of the wrong kind named as a depth model stops the plan at its line, before anything runs.
#[test]
fn depth_node_and_command_line_use_the_model() {
    let dir = scratch("depth-node");
    let expected = depth_map(&hf_model(), &input_image(), INPUT_SIZE).unwrap();
    let recipe = |model: &std::path::Path| {
        format!(
            "version: 1\nmodels:\n  depth_small: {{kind: depth-anything, source: {}}}\nimages:\n  photo: {}\nnodes:\n  depthmap: {{depth: {{image: photo, model: depth_small}}}}\noutputs:\n  - {{image: depthmap, path: depth.png}}\n",
            model.display(),
            depth_dir().join("input.png").display()
        )
    };
    let path = dir.join("recipe.yaml");
    let text = recipe(&depth_dir().join("tiny-hf"));
    std::fs::write(&path, &text).unwrap();
    std::env::set_var("IPCOMPOSE_CACHE_DIR", dir.join("cache"));
    let batch = ipcompose::pipeline::run::batch::Batch::plan(&text, &path, &[]).unwrap();
    batch
        .run(&Default::default(), &mut |_, _| {})
        .unwrap_or_else(|e| panic!("{e}"));
    let written = image::open(dir.join("depth.png")).unwrap().to_rgb8();
    assert_eq!(written.as_raw(), expected.as_raw(), "recipe node");

    let out = dir.join("cli.png");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_ipcompose"))
        .args(["preprocess", "depth"])
        .arg(depth_dir().join("input.png"))
        .arg(&out)
        .arg("--model")
        .arg(depth_dir().join("tiny-hf"))
        .output()
        .unwrap();
    assert!(status.status.success(), "{status:?}");
    let cli = image::open(&out).unwrap().to_rgb8();
    assert_eq!(cli.as_raw(), expected.as_raw(), "command line");

    let unet = fixtures().join("tiny-sd15/unet/diffusion_pytorch_model.safetensors");
    let text = recipe(&unet);
    let err = match ipcompose::pipeline::run::batch::Batch::plan(
        &text,
        &path,
        &["outputs.0.path=bad.png".into()],
    ) {
        Ok(_) => panic!("a UNet was accepted as a depth model"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("recipe.yaml:3"), "{err}");
    assert!(err.contains("not a Depth Anything V2 checkpoint"), "{err}");
    assert!(!dir.join("bad.png").exists());
}
