//! The OpenPose body annotator against controlnet_aux 0.0.10 (fixtures from
//! `tests/fixtures/make_pose_fixtures.py`): the network on a tiny random-weight model, the
//! input preparation, post-processing and drawing on synthetic network outputs, the JSON
//! keypoint path, and the errors for wrong files.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, max_abs_diff, scratch};
use ipcompose::models::openpose::{BodyPoseConfig, BodyPoseModel};
use ipcompose::preprocess::pose::{self, NetInput, NetOutput};
use ipcompose::preprocess::{load_image, resize, PreprocessError};

fn pose_dir() -> PathBuf {
    fixtures().join("pose")
}

fn tensors(path: PathBuf) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("fixture {} unreadable: {e}", path.display()))
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn png(path: PathBuf) -> image::RgbImage {
    load_image(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// Fraction of differing bytes, and the first differing pixel.
fn mismatch(a: &image::RgbImage, b: &image::RgbImage) -> (f64, Option<(u32, u32)>) {
    assert_eq!(a.dimensions(), b.dimensions(), "image sizes differ");
    let differing = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .filter(|(x, y)| x != y)
        .count();
    let first = a
        .enumerate_pixels()
        .find(|(x, y, p)| *p != b.get_pixel(*x, *y))
        .map(|(x, y, _)| (x, y));
    (differing as f64 / a.as_raw().len() as f64, first)
}

#[test]
fn network_matches_pytorch_on_the_tiny_model() {
    let model = BodyPoseModel::load(&pose_dir().join("tiny_body_pose.pth"), &Device::Cpu)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(model.config(), &BodyPoseConfig::tiny());
    let t = tensors(pose_dir().join("network.safetensors"));
    let (paf, heat) = model.forward(&t["input"]).unwrap();
    let dp = max_abs_diff(&paf, &t["paf"]);
    let dh = max_abs_diff(&heat, &t["heatmap"]);
    println!("paf max abs diff {dp:e}, heatmap max abs diff {dh:e}");
    // Measured 1e-7-ish (fp32, CPU); outputs are up to ~0.9.
    assert!(dp < 1e-5 && dh < 1e-5, "paf {dp}, heatmap {dh}");
}

#[test]
fn the_real_preset_has_the_published_widths() {
    let c = BodyPoseConfig::default();
    assert_eq!(c.vgg_channels, [64, 128, 256, 512]);
    assert_eq!((c.paf_channels, c.heatmap_channels), (38, 19));
    // Building the real-size network against random weights checks every shape.
    let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
    let model = BodyPoseModel::new(vb, &c).unwrap();
    let (paf, heat) = model
        .forward(&Tensor::zeros((1, 3, 16, 24), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(paf.dims(), &[1, 38, 2, 3]);
    assert_eq!(heat.dims(), &[1, 19, 2, 3]);
}

/// The downloadable body_pose_model.pth predates torch's zip format; the same weights saved
/// that way load and give the same outputs.
#[test]
fn legacy_torch_files_load() {
    let path = pose_dir().join("tiny_body_pose_legacy.pth");
    let model = BodyPoseModel::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(model.config(), &BodyPoseConfig::tiny());
    let t = tensors(pose_dir().join("network.safetensors"));
    let (paf, heat) = model.forward(&t["input"]).unwrap();
    assert!(max_abs_diff(&paf, &t["paf"]) < 1e-5);
    assert!(max_abs_diff(&heat, &t["heatmap"]) < 1e-5);
}

/// A state dict saved from controlnet_aux's module (`model0.conv1_1.weight`, …) loads too.
#[test]
fn module_layout_files_load() {
    let original = candle_core::pickle::read_all(pose_dir().join("tiny_body_pose.pth")).unwrap();
    let renamed: std::collections::HashMap<String, Tensor> = original
        .into_iter()
        .map(|(name, t)| {
            let layer = name.split('.').next().unwrap().to_string();
            let block = if let Some(rest) = layer.strip_prefix("Mconv") {
                let stage = &rest[rest.find("_stage").unwrap() + 6..][..1];
                format!(
                    "model{stage}_{}",
                    if layer.ends_with("_L1") { 1 } else { 2 }
                )
            } else if layer.starts_with("conv5_") {
                format!("model1_{}", if layer.ends_with("_L1") { 1 } else { 2 })
            } else {
                "model0".to_string()
            };
            (format!("{block}.{name}"), t)
        })
        .collect();
    assert!(renamed.contains_key("model6_2.Mconv7_stage6_L2.weight"));
    let path = scratch("pose-module-layout").join("module.safetensors");
    candle_core::safetensors::save(&renamed, &path).unwrap();
    let model = BodyPoseModel::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
    let t = tensors(pose_dir().join("network.safetensors"));
    let (paf, _) = model.forward(&t["input"]).unwrap();
    assert!(max_abs_diff(&paf, &t["paf"]) < 1e-5);
}

#[test]
fn wrong_model_files_are_refused_with_their_name() {
    let hand = pose_dir().join("tiny_hand_pose.pth");
    let text = BodyPoseModel::load(&hand, &Device::Cpu)
        .err()
        .expect("hand model refused")
        .to_string();
    assert!(text.contains("tiny_hand_pose.pth"), "{text}");
    assert!(text.contains("not an OpenPose body model"), "{text}");
    assert!(text.contains("hand model"), "{text}");

    let unet = fixtures().join("tiny-sd15/unet/diffusion_pytorch_model.safetensors");
    let text = BodyPoseModel::load(&unet, &Device::Cpu)
        .err()
        .expect("UNet refused")
        .to_string();
    assert!(
        text.contains("diffusion_pytorch_model.safetensors"),
        "{text}"
    );
    assert!(
        text.contains("expected tensors such as conv4_4_CPM.weight"),
        "{text}"
    );

    let missing = pose_dir().join("no_such_model.pth");
    let text = BodyPoseModel::load(&missing, &Device::Cpu)
        .err()
        .expect("missing file refused")
        .to_string();
    assert!(text.contains("no_such_model.pth"), "{text}");
}

/// The detect-resolution image and the network input controlnet_aux made from it.
fn detect_input() -> (image::RgbImage, NetInput) {
    let photo = png(pose_dir().join("detect/input.png"));
    let detect = resize::resize_image(&photo, 512).unwrap();
    let input = pose::prepare_input(&detect).unwrap();
    (detect, input)
}

fn synthetic_output() -> NetOutput {
    let t = tensors(pose_dir().join("detect/net_output.safetensors"));
    let (_, _, h, w) = t["paf"].dims4().unwrap();
    NetOutput {
        paf: flat(&t["paf"]),
        heatmap: flat(&t["heatmap"]),
        width: w,
        height: h,
    }
}

#[test]
fn network_input_is_exactly_the_reference_tensor() {
    let (detect, input) = detect_input();
    assert_eq!(detect.dimensions(), (768, 512));
    let reference = tensors(pose_dir().join("detect/net_input.safetensors"));
    assert_eq!(
        reference["input"].dims(),
        &[1, 3, input.height, input.width]
    );
    let expected = flat(&reference["input"]);
    let differing = expected
        .iter()
        .zip(&input.data)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(differing, 0, "of {} values", expected.len());
}

/// Rows of numbers from a JSON array of arrays, parsed with `str::parse` (correctly rounded;
/// serde_json's default float parser may be one ulp off).
fn read_rows(name: &str) -> Vec<Vec<f64>> {
    let text = std::fs::read_to_string(pose_dir().join(name)).unwrap();
    let inner = text.trim().trim_start_matches('[').trim_end_matches(']');
    if inner.trim().is_empty() {
        return Vec::new();
    }
    inner
        .split("], [")
        .map(|row| {
            row.trim_matches(|c| c == '[' || c == ']')
                .split(',')
                .map(|v| v.trim().parse::<f64>().unwrap())
                .collect()
        })
        .collect()
}

#[test]
fn post_processing_reproduces_candidate_and_subset() {
    let (_, input) = detect_input();
    let estimate = pose::estimate(&input, &synthetic_output()).unwrap();
    let candidate = read_rows("detect/candidate.json");
    let subset = read_rows("detect/subset.json");
    assert_eq!(estimate.candidate.len(), candidate.len());
    let mut worst_score = 0f64;
    for (got, want) in estimate.candidate.iter().zip(&candidate) {
        assert_eq!(
            (got[0], got[1], got[3]),
            (want[0], want[1], want[3]),
            "peak position / id"
        );
        worst_score = worst_score.max((got[2] - want[2]).abs());
    }
    assert_eq!(estimate.subset.len(), subset.len());
    let mut worst_total = 0f64;
    for (got, want) in estimate.subset.iter().zip(&subset) {
        assert_eq!(&got[..18], &want[..18], "person parts");
        assert_eq!(got[19], want[19], "part count");
        worst_total = worst_total.max((got[18] - want[18]).abs());
    }
    println!(
        "candidate score max diff {worst_score:e}, subset total-score max diff {worst_total:e}"
    );
    assert_eq!(worst_score, 0.0, "heatmap values at peaks are bit-exact");
    assert_eq!(worst_total, 0.0, "person scores are bit-exact");
}

#[test]
fn drawing_reproduces_the_reference_skeleton_image() {
    let (detect, input) = detect_input();
    let estimate = pose::estimate(&input, &synthetic_output()).unwrap();
    let people = pose::people(&estimate, detect.width() as usize, detect.height() as usize);
    assert_eq!(people.len(), 2);
    let canvas = pose::draw_poses(&people, detect.width(), detect.height());
    let expected = png(pose_dir().join("detect/canvas.png"));
    let (fraction, first) = mismatch(&canvas, &expected);
    assert_eq!(fraction, 0.0, "first differing pixel {first:?}");
    // The annotator's output at image_resolution 512 is this canvas.
    let (w, h, _) = resize::detect_size(768, 512, 512);
    let map = resize::resize(&canvas, w, h, resize::Interpolation::Linear);
    assert_eq!(map, png(pose_dir().join("detect/pose.png")));
}

#[test]
fn json_keypoints_draw_the_same_image_as_the_network_path() {
    let (detect, input) = detect_input();
    let estimate = pose::estimate(&input, &synthetic_output()).unwrap();
    let people = pose::people(&estimate, detect.width() as usize, detect.height() as usize);
    let canvas = pose::draw_poses(&people, detect.width(), detect.height());

    let dir = scratch("pose-json");
    let path = dir.join("pose.json");
    std::fs::write(
        &path,
        pose::keypoints_to_json(&people, detect.width(), detect.height()),
    )
    .unwrap();
    let (back, size) = pose::read_keypoints_json(&path, None).unwrap();
    assert_eq!(size, (768, 512));
    let from_json = pose::draw_poses(&back, size.0, size.1);
    assert_eq!(
        from_json, canvas,
        "JSON path == network path, byte for byte"
    );

    // The JSON controlnet_aux's keypoints were written to by the fixture script.
    let text = std::fs::read_to_string(pose_dir().join("detect/keypoints.json")).unwrap();
    let from_reference = pose::pose_map_from_keypoints(&text, "keypoints.json", None).unwrap();
    assert_eq!(from_reference, canvas);
}

#[test]
fn drawing_matches_opencv_on_edge_cases_and_random_skeletons() {
    let text = std::fs::read_to_string(pose_dir().join("draw/keypoints.json")).unwrap();
    let drawn = pose::pose_map_from_keypoints(&text, "draw/keypoints.json", None).unwrap();
    let expected = png(pose_dir().join("draw/pose.png"));
    let (fraction, first) = mismatch(&drawn, &expected);
    println!("draw mismatch fraction {fraction:e}, first {first:?}");
    assert_eq!(fraction, 0.0, "first differing pixel {first:?}");
}

#[test]
fn bad_keypoint_files_and_images_are_refused_clearly() {
    let dir = scratch("pose-bad");
    let cases = [
        (
            r#"{"people": [{"pose_keypoints_2d": [1, 2, 3]}], "canvas_width": 8, "canvas_height": 8}"#,
            "has 3 numbers; expected 54",
        ),
        (
            r#"{"canvas_width": 8, "canvas_height": 8}"#,
            "expected a `people` array",
        ),
        (
            r#"{"people": [{"pose_keypoints_2d": "x"}], "canvas_width": 8, "canvas_height": 8}"#,
            "expected a `pose_keypoints_2d` array",
        ),
        (r#"{"people": []}"#, "canvas size is unknown"),
        ("not json", "not valid JSON"),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.json"));
        std::fs::write(&path, text).unwrap();
        let err = pose::read_keypoints_json(&path, None).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, PreprocessError::Keypoints { .. }),
            "{message}"
        );
        assert!(message.contains(expected), "{message}");
        assert!(message.contains(&format!("bad{i}.json")), "{message}");
    }
    let err = pose::read_keypoints_json(&dir.join("absent.json"), None).unwrap_err();
    assert!(err.to_string().contains("absent.json"));

    let garbage = dir.join("photo.png");
    std::fs::write(&garbage, b"not a png").unwrap();
    let err = load_image(&garbage).unwrap_err();
    assert!(matches!(err, PreprocessError::Read { .. }));
    assert!(err.to_string().contains("photo.png"));
}

/// Compares an estimate with the reference files in `dir`; returns (positions equal, max score
/// difference).
fn compare_estimate(estimate: &pose::BodyEstimate, dir: &str) -> (bool, f64) {
    let candidate = read_rows(&format!("{dir}/candidate.json"));
    let subset = read_rows(&format!("{dir}/subset.json"));
    let mut same =
        estimate.candidate.len() == candidate.len() && estimate.subset.len() == subset.len();
    let mut worst = 0f64;
    if same {
        for (got, want) in estimate.candidate.iter().zip(&candidate) {
            same &= (got[0], got[1], got[3]) == (want[0], want[1], want[3]);
            worst = worst.max((got[2] - want[2]).abs());
        }
        for (got, want) in estimate.subset.iter().zip(&subset) {
            same &= got[..18] == want[..18] && got[19] == want[19];
            worst = worst.max((got[18] - want[18]).abs());
        }
    }
    (same, worst)
}

/// A small image (Lanczos up of the image, INTER_AREA of the maps) and a crowd of overlapping
/// noisy skeletons: merges, conflicts and deletions in the person assembly.
#[test]
fn post_processing_reproduces_a_noisy_crowd_on_a_small_image() {
    let input = pose::prepare_input(&image::RgbImage::new(150, 110)).unwrap();
    let t = tensors(pose_dir().join("crowd/net_output.safetensors"));
    let (_, _, h, w) = t["paf"].dims4().unwrap();
    let output = NetOutput {
        paf: flat(&t["paf"]),
        heatmap: flat(&t["heatmap"]),
        width: w,
        height: h,
    };
    let estimate = pose::estimate(&input, &output).unwrap();
    let (same, worst) = compare_estimate(&estimate, "crowd");
    println!(
        "crowd: {} candidates, {} people, max score diff {worst:e}",
        estimate.candidate.len(),
        estimate.subset.len()
    );
    assert!(same, "candidate / subset structure differs");
    assert_eq!(worst, 0.0);
}

/// The whole annotator with the tiny network (offset so that it finds ~1000 peaks and ~75
/// "people"): detect resolution 256, map resized to image resolution 384.
#[test]
fn full_annotator_matches_controlnet_aux_with_the_tiny_model() {
    let model = BodyPoseModel::load(&pose_dir().join("tiny_body_pose.pth"), &Device::Cpu).unwrap();
    let photo = png(pose_dir().join("detect/input.png"));
    let (map, people) = pose::pose_map(&model, &photo, 256, Some(384)).unwrap();
    let expected = png(pose_dir().join("end_to_end/pose.png"));
    let (fraction, first) = mismatch(&map, &expected);
    let subset = read_rows("end_to_end/subset.json");
    println!(
        "end to end: {} people (reference {}), map mismatch fraction {fraction:e}, first {first:?}",
        people.len(),
        subset.len()
    );
    assert_eq!(people.len(), subset.len());
    assert_eq!(fraction, 0.0, "first differing pixel {first:?}");
}

/// The recipe nodes (`pose: {image, model}` and `pose: {keypoints}`) and `ipcompose
/// preprocess pose` make the same maps as the library; keypoints files of the wrong shape stop
/// the plan at their line before anything runs.
#[test]
fn pose_nodes_and_command_line() {
    let dir = common::scratch("pose-nodes");
    std::env::set_var("IPCOMPOSE_CACHE_DIR", dir.join("cache"));
    let model_file = pose_dir().join("tiny_body_pose.pth");
    let photo_file = pose_dir().join("detect/input.png");
    let text = format!(
        "version: 1\nmodels:\n  openpose: {{kind: openpose, source: {}}}\nimages:\n  dancer: {}\nnodes:\n  skeleton: {{pose: {{image: dancer, model: openpose, detect_resolution: 256}}}}\n  drawn: {{pose: {{keypoints: {}}}}}\noutputs:\n  - {{image: skeleton, path: skeleton.png}}\n  - {{image: drawn, path: drawn.png}}\n",
        model_file.display(),
        photo_file.display(),
        pose_dir().join("draw/keypoints.json").display(),
    );
    let path = dir.join("recipe.yaml");
    std::fs::write(&path, &text).unwrap();
    let batch = ipcompose::pipeline::run::batch::Batch::plan(&text, &path, &[]).unwrap();
    batch
        .run(&Default::default(), &mut |_, _| {})
        .unwrap_or_else(|e| panic!("{e}"));
    let model = BodyPoseModel::load(&model_file, &Device::Cpu).unwrap();
    let (expected, _) = pose::pose_map(&model, &png(photo_file.clone()), 256, None).unwrap();
    assert_eq!(png(dir.join("skeleton.png")).as_raw(), expected.as_raw());
    // The keypoints node reproduces controlnet_aux's drawing of the same file.
    let reference = png(pose_dir().join("draw/pose.png"));
    assert_eq!(png(dir.join("drawn.png")).as_raw(), reference.as_raw());

    // The command line: detect and save the keypoints, then draw them back.
    let cli = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ipcompose"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    let (map, json) = (dir.join("cli.png"), dir.join("cli.json"));
    cli(&[
        "preprocess".as_ref(),
        "pose".as_ref(),
        photo_file.as_os_str(),
        map.as_os_str(),
        "--model".as_ref(),
        model_file.as_os_str(),
        "--detect-resolution".as_ref(),
        "256".as_ref(),
        "--keypoints-out".as_ref(),
        json.as_os_str(),
    ]);
    assert_eq!(png(map.clone()).as_raw(), expected.as_raw());
    let redrawn = dir.join("redrawn.png");
    cli(&[
        "preprocess".as_ref(),
        "pose".as_ref(),
        "-".as_ref(),
        redrawn.as_os_str(),
        "--keypoints".as_ref(),
        json.as_os_str(),
    ]);
    assert_eq!(png(redrawn).as_raw(), expected.as_raw(), "JSON round trip");

    // 53 numbers is not a pose.
    let bad = dir.join("bad.json");
    let numbers: Vec<String> = (0..53).map(|i| i.to_string()).collect();
    std::fs::write(
        &bad,
        format!(
            "{{\"canvas_width\": 64, \"canvas_height\": 64, \"people\": [{{\"pose_keypoints_2d\": [{}]}}]}}",
            numbers.join(", ")
        ),
    )
    .unwrap();
    let text = text
        .replace(
            &pose_dir().join("draw/keypoints.json").display().to_string(),
            &bad.display().to_string(),
        )
        .replace("path: drawn.png", "path: never.png");
    let err = match ipcompose::pipeline::run::batch::Batch::plan(&text, &path, &[]) {
        Ok(_) => panic!("53 keypoint numbers were accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("recipe.yaml:8"), "{err}");
    assert!(err.contains("53"), "{err}");
    assert!(!dir.join("never.png").exists());
}
