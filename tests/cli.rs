//! End-to-end through the `ipcompose` binary: the example recipe on the tiny models, and bad
//! input that must fail early, name what is wrong, exit non-zero and write nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{copy_dir, fixtures, scratch};

fn ipcompose(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ipcompose"))
        .args(args)
        .output()
        .expect("run ipcompose");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A copy of the tiny model and the example recipe in a scratch dir, so tests can break them.
fn workspace(name: &str) -> (PathBuf, PathBuf) {
    let dir = scratch(name);
    copy_dir(&fixtures().join("tiny-sd15"), &dir.join("tiny-sd15"));
    copy_dir(
        &fixtures().join("recipes/inputs"),
        &dir.join("recipes/inputs"),
    );
    let recipe = dir.join("recipes/house.yaml");
    std::fs::copy(fixtures().join("recipes/house.yaml"), &recipe).unwrap();
    (dir, recipe)
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.contains(from),
        "{} does not contain {from:?}",
        path.display()
    );
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

fn outputs(dir: &Path) -> Vec<PathBuf> {
    let out = dir.join("recipes/out");
    match std::fs::read_dir(&out) {
        Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn example_recipe_writes_png_and_latents() {
    let (dir, recipe) = workspace("cli-example");
    let (ok, stdout, stderr) = ipcompose(&["run", recipe.to_str().unwrap(), "--quiet"]);
    assert!(ok, "run failed: {stderr}");
    assert!(stdout.is_empty(), "--quiet printed {stdout}");
    let png = dir.join("recipes/out/house.png");
    let img = image::open(&png).expect("PNG written").to_rgb8();
    assert_eq!(img.dimensions(), (128, 128));
    let latents = candle_core::safetensors::load(
        dir.join("recipes/out/house-latents.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(latents["latents"].dims(), &[1, 4, 16, 16]);
    assert_eq!(
        outputs(&dir).len(),
        2,
        "only the two outputs, no temporary files"
    );

    // Same seed, same result; an existing output is not replaced without --overwrite.
    let (ok, _, stderr) = ipcompose(&["run", recipe.to_str().unwrap(), "--quiet"]);
    assert!(!ok && stderr.contains("already exists"), "{stderr}");
    let before = std::fs::read(&png).unwrap();
    let (ok, _, stderr) = ipcompose(&["run", recipe.to_str().unwrap(), "--quiet", "--overwrite"]);
    assert!(ok, "{stderr}");
    assert_eq!(
        before,
        std::fs::read(&png).unwrap(),
        "same seed must give the same image"
    );
}

#[test]
fn latents_file_as_initial_noise_is_reproducible() {
    let (dir, recipe) = workspace("cli-latents");
    let init = fixtures().join("reference/pipe_ddim_cfg.safetensors");
    let tensors = candle_core::safetensors::load(&init, &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents", tensors["init_latents"].clone())]),
        dir.join("recipes/init.safetensors"),
    )
    .unwrap();
    edit(&recipe, "seed: 42 ", "latents: init.safetensors ");
    let (ok, _, stderr) = ipcompose(&["run", recipe.to_str().unwrap(), "--quiet"]);
    assert!(ok, "{stderr}");
    assert_eq!(outputs(&dir).len(), 2);
}

#[test]
fn sdxl_recipe_runs_through_the_binary() {
    let dir = scratch("cli-sdxl");
    let recipe = dir.join("xl.yaml");
    let text = format!(
        r#"version: 1
models:
  xl: {{kind: sdxl, source: {}}}
nodes:
  gen:
    generate:
      base: xl
      prompt: "a cozy house at dusk"
      prompt_2: "an oil painting"
      size: [80, 48]
      original_size: [160, 96]
      crops_coords_top_left: [8, 0]
      steps: 3
      guidance: 5.0
      seed: 3
outputs:
  - {{image: gen, path: out/xl.png}}
  - {{latents: gen, path: out/xl.safetensors}}
"#,
        fixtures().join("tiny-sdxl").display()
    );
    std::fs::write(&recipe, text).unwrap();
    let (ok, stdout, stderr) = ipcompose(&["validate", recipe.to_str().unwrap()]);
    assert!(
        ok && stdout.contains("Sdxl") && stdout.contains("steps of euler,"),
        "{stdout}{stderr}"
    );
    let (ok, _, stderr) = ipcompose(&["run", recipe.to_str().unwrap(), "--quiet"]);
    assert!(ok, "{stderr}");
    let img = image::open(dir.join("out/xl.png"))
        .expect("PNG written")
        .to_rgb8();
    assert_eq!(img.dimensions(), (80, 48));
    let latents =
        candle_core::safetensors::load(dir.join("out/xl.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert_eq!(latents["latents"].dims(), &[1, 4, 6, 10]);
}

fn assert_fails(recipe: &Path, dir: &Path, needles: &[&str]) {
    let (ok, _, stderr) = ipcompose(&["run", recipe.to_str().unwrap(), "--quiet"]);
    assert!(!ok, "expected failure");
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "error should mention {needle:?}: {stderr}"
        );
    }
    assert!(
        outputs(dir).is_empty(),
        "no output may be written: {:?}",
        outputs(dir)
    );
}

#[test]
fn missing_model_folder_is_named() {
    let (dir, recipe) = workspace("cli-missing-folder");
    edit(&recipe, "source: ../tiny-sd15", "source: ../no-such-model");
    assert_fails(
        &recipe,
        &dir,
        &["no-such-model", "house.yaml:4", "does not exist"],
    );
}

#[test]
fn unknown_block_type_names_config_file_and_value() {
    let (dir, recipe) = workspace("cli-block-type");
    let config = dir.join("tiny-sd15/unet/config.json");
    edit(&config, "\"DownBlock2D\"", "\"FancyDownBlock\"");
    assert_fails(
        &recipe,
        &dir,
        &["unet/config.json", "FancyDownBlock", "down_block_types"],
    );
}

#[test]
fn weights_disagreeing_with_config_name_tensor_and_shapes() {
    let (dir, recipe) = workspace("cli-shape");
    let config = dir.join("tiny-sd15/unet/config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["out_channels"] = serde_json::json!(8);
    std::fs::write(&config, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    assert_fails(
        &recipe,
        &dir,
        &[
            "diffusion_pytorch_model.safetensors",
            "tensor `",
            "has shape",
            "expects",
        ],
    );
}

#[test]
fn size_not_multiple_of_8_points_at_the_line() {
    let (dir, recipe) = workspace("cli-size");
    edit(&recipe, "size: [128, 128]", "size: [130, 128]");
    assert_fails(&recipe, &dir, &["house.yaml:13", "size", "multiples of 8"]);
}

#[test]
fn unknown_key_is_rejected_with_valid_keys() {
    let (dir, recipe) = workspace("cli-unknown-key");
    edit(&recipe, "steps: 4", "stepz: 4");
    assert_fails(&recipe, &dir, &["stepz", "steps", "line"]);
}

#[test]
fn unknown_model_reference_suggests_a_name() {
    let (dir, recipe) = workspace("cli-unknown-ref");
    edit(&recipe, "base: base\n", "base: bsae\n");
    assert_fails(&recipe, &dir, &["bsae", "did you mean `base`"]);
}

#[test]
fn validate_prints_the_plan_without_loading_weights() {
    let (dir, recipe) = workspace("cli-validate");
    // Weights are not read by validate: remove them and it still succeeds.
    std::fs::remove_file(dir.join("tiny-sd15/unet/diffusion_pytorch_model.safetensors")).unwrap();
    let (ok, stdout, stderr) = ipcompose(&["validate", recipe.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("16 cross-attention layers"), "{stdout}");
    assert!(stdout.contains("128x128"), "{stdout}");
}

#[test]
fn png_carries_the_recipe_and_from_reruns_it() {
    let (dir, recipe) = workspace("cli-from-png");
    let (ok, _, stderr) = ipcompose(&[
        "run",
        recipe.to_str().unwrap(),
        "--quiet",
        "--set",
        "nodes.gen.generate.seed=9",
    ]);
    assert!(ok, "{stderr}");
    let png = dir.join("recipes/out/house.png");
    let embedded = ipcompose::pipeline::io::provenance::read_embedded(&png).unwrap();
    assert!(
        embedded.contains("seed: 9"),
        "the --set value is what ran:\n{embedded}"
    );
    assert!(embedded.contains("ipcompose_version"), "{embedded}");
    assert!(embedded.contains(
        &dir.join("recipes/inputs/house.png")
            .canonicalize()
            .unwrap()
            .display()
            .to_string()
    ));
    let again = dir.join("again.png");
    let again_latents = dir.join("again.safetensors");
    let (ok, _, stderr) = ipcompose(&[
        "run",
        "--from",
        png.to_str().unwrap(),
        "--quiet",
        "--set",
        &format!("outputs.0.path={}", again.display()),
        "--set",
        &format!("outputs.1.path={}", again_latents.display()),
    ]);
    assert!(ok, "{stderr}");
    let a = image::open(&png).unwrap().to_rgb8();
    let b = image::open(&again).unwrap().to_rgb8();
    assert_eq!(
        a.as_raw(),
        b.as_raw(),
        "re-running from the PNG reproduces the image"
    );
    // A PNG without a recipe is refused clearly.
    let (ok, _, stderr) = ipcompose(&[
        "run",
        "--from",
        fixtures()
            .join("recipes/inputs/house.png")
            .to_str()
            .unwrap(),
    ]);
    assert!(
        !ok && stderr.contains("not written by ipcompose"),
        "{stderr}"
    );
}

#[test]
fn single_file_checkpoint_equals_its_folder_twin() {
    for file in ["tiny-sd15.safetensors", "tiny-sd15.ckpt"] {
        let (dir, recipe) = workspace(&format!("cli-single-{file}"));
        let source = fixtures().join("single-file").join(file);
        let set_source = format!("models.base.source={}", source.display());
        let set_config = format!(
            "models.base.config={}",
            fixtures().join("tiny-sd15").display()
        );
        let (ok, _, stderr) = ipcompose(&[
            "run",
            recipe.to_str().unwrap(),
            "--quiet",
            "--set",
            &set_source,
            "--set",
            &set_config,
        ]);
        assert!(ok, "{file}: {stderr}");
        let single = candle_core::safetensors::load(
            dir.join("recipes/out/house-latents.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let (twin_dir, twin_recipe) = workspace(&format!("cli-twin-{file}"));
        let (ok, _, stderr) = ipcompose(&["run", twin_recipe.to_str().unwrap(), "--quiet"]);
        assert!(ok, "{stderr}");
        let folder = candle_core::safetensors::load(
            twin_dir.join("recipes/out/house-latents.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let diff: f32 = (&single["latents"] - &folder["latents"])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(
            diff, 0.0,
            "{file}: single file and folder must give identical latents"
        );
    }
    // Without a config source (and no hub cache), the error says what is needed.
    let (dir, recipe) = workspace("cli-single-noconfig");
    let set_source = format!(
        "models.base.source={}",
        fixtures()
            .join("single-file/tiny-sd15.safetensors")
            .display()
    );
    let out = Command::new(env!("CARGO_BIN_EXE_ipcompose"))
        .args([
            "run",
            recipe.to_str().unwrap(),
            "--quiet",
            "--set",
            &set_source,
        ])
        .env("HF_HUB_CACHE", dir.join("empty-cache"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("config: FOLDER"),
        "{stderr}"
    );
    assert!(outputs(&dir).is_empty());
}

#[test]
fn inspect_names_each_checkpoint_kind() {
    let cases = [
        ("tiny-sd15", "diffusers Stable Diffusion folder"),
        ("tiny-sdxl", "diffusers Stable Diffusion folder, SDXL"),
        ("controlnet/tiny-canny", "ControlNet"),
        (
            "controlnet/tiny-canny-single.safetensors",
            "ControlNet (original single file)",
        ),
        ("t2i/tiny-full", "T2I-Adapter"),
        ("controlnet/tiny-sdxl-union", "union of 6 condition types"),
        ("t2i/tiny-sdxl-full", "FullXl adapter"),
        ("ip-adapter/image_encoder", "CLIP image encoder"),
        (
            "ip-adapter/ip-adapter-plus_tiny.safetensors",
            "plus (resampler)",
        ),
        (
            "single-file/tiny-sd15.safetensors",
            "Stable Diffusion 1.x single-file checkpoint",
        ),
        ("depth/tiny-hf", "Depth Anything V2 (Transformers layout)"),
        ("pose/tiny_body_pose.pth", "OpenPose body model"),
    ];
    for (path, expected) in cases {
        let (ok, stdout, stderr) = ipcompose(&["inspect", fixtures().join(path).to_str().unwrap()]);
        assert!(ok, "{path}: {stderr}");
        assert!(
            stdout.contains(expected) && stdout.contains("parameters"),
            "{path}: {stdout}"
        );
    }
    let (ok, _, stderr) = ipcompose(&[
        "inspect",
        fixtures()
            .join("ip-adapter/ip-adapter-faceid_tiny.safetensors")
            .to_str()
            .unwrap(),
    ]);
    assert!(!ok && stderr.contains("FaceID"), "{stderr}");
}

#[test]
fn sweep_writes_every_combination_and_a_labelled_grid() {
    let (dir, recipe) = workspace("cli-sweep");
    let sets = [
        "--set",
        "nodes.gen.generate.seed=[1, 2]",
        "--set",
        "nodes.gen.generate.guidance={sweep: [1.0, 7.5]}",
        "--set",
        "nodes.gen.generate.size=[64, 64]",
    ];
    let mut args = vec!["validate", recipe.to_str().unwrap()];
    args.extend(sets);
    let (ok, stdout, stderr) = ipcompose(&args);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("sweep: 4 combinations over seed of `gen` (2 values) x guidance"),
        "{stdout}"
    );
    let mut args = vec!["run", recipe.to_str().unwrap(), "--quiet"];
    args.extend(sets);
    let (ok, _, stderr) = ipcompose(&args);
    assert!(ok, "{stderr}");
    let out = dir.join("recipes/out");
    let mut cells = Vec::new();
    for guidance in ["1.0", "7.5"] {
        for seed in ["1", "2"] {
            let png = out.join(format!("house_seed-{seed}_guidance-{guidance}.png"));
            let embedded = ipcompose::pipeline::io::provenance::read_embedded(&png)
                .unwrap_or_else(|e| panic!("{}: {e}", png.display()));
            // Each image carries its own single-valued recipe, so `run --from` redoes it.
            assert!(embedded.contains(&format!("seed: {seed}\n")), "{embedded}");
            cells.push(image::open(&png).unwrap().to_rgb8());
        }
        let latents = out.join(format!(
            "house-latents_seed-1_guidance-{guidance}.safetensors"
        ));
        assert!(latents.is_file(), "{}", latents.display());
    }
    assert_ne!(cells[0].as_raw(), cells[1].as_raw(), "seeds differ");
    assert_ne!(cells[0].as_raw(), cells[2].as_raw(), "guidance differs");
    let grid = image::open(out.join("house_grid.png")).unwrap().to_rgb8();
    // Two columns (seeds) and two rows (guidance) of 64x64 cells, with label bands.
    assert!(
        grid.width() > 2 * 64 && grid.width() < 2 * 64 + 200,
        "{}",
        grid.width()
    );
    assert!(
        grid.height() > 2 * 64 && grid.height() < 2 * 64 + 60,
        "{}",
        grid.height()
    );
    let found = |cell: &image::RgbImage| {
        (0..=grid.width() - 64).any(|x| {
            (0..=grid.height() - 64).any(|y| {
                image::imageops::crop_imm(&grid, x, y, 64, 64)
                    .to_image()
                    .as_raw()
                    == cell.as_raw()
            })
        })
    };
    assert!(cells.iter().all(found), "every image appears in the grid");
    // Re-running refuses to overwrite any of them.
    let (ok, _, stderr) = ipcompose(&args);
    assert!(!ok && stderr.contains("already exists"), "{stderr}");
}

#[test]
fn schedule_table_is_printed_by_validate() {
    let (dir, recipe) = workspace("cli-schedule-table");
    let text = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace("outputs:", "  edges: {canny: {image: house}}\noutputs:");
    std::fs::write(&recipe, text).unwrap();
    copy_dir(
        &fixtures().join("controlnet/tiny-canny"),
        &dir.join("canny"),
    );
    let (ok, stdout, stderr) = ipcompose(&[
        "validate",
        recipe.to_str().unwrap(),
        "--set",
        "models.canny={kind: controlnet, source: ../canny}",
        "--set",
        "nodes.gen.generate.controls=[{model: canny, image: edges, scale: {ramp: [1.0, 0.4]}, start: 0.25}]",
    ]);
    assert!(ok, "{stderr}");
    let table: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.contains("weight per step"))
        .skip(1)
        .take(5)
        .map(str::trim)
        .collect();
    assert_eq!(
        table,
        [
            "step  cn:canny",
            "0         -",
            "1     1.000",
            "2     0.700",
            "3     0.400"
        ],
        "{stdout}"
    );
    // A list with the wrong length is refused at its line.
    let (ok, _, stderr) = ipcompose(&[
        "validate",
        recipe.to_str().unwrap(),
        "--set",
        "models.canny={kind: controlnet, source: ../canny}",
        "--set",
        "nodes.gen.generate.controls=[{model: canny, image: edges, scale: [1, 0.5]}]",
    ]);
    assert!(!ok && stderr.contains("2 values for 4 steps"), "{stderr}");
}

/// One case per error class: the message names the place (file:line, or line and column for
/// parse errors), the offending name or value and the valid choices, the exit status is
/// non-zero and nothing is written.
#[test]
fn every_error_class_names_the_place_and_writes_nothing() {
    let cases: &[(&str, &str, &str, &[&str])] = &[
        // wrong kind of value (serde: line and column)
        (
            "wrong-type",
            "steps: 4",
            "steps: many",
            &["steps", "invalid type", "line 14 column"],
        ),
        (
            "wrong-shape",
            "size: [128, 128]",
            "size: 128",
            &["size", "invalid type", "line 13"],
        ),
        // YAML that does not parse
        (
            "yaml-syntax",
            "steps: 4",
            "steps: [4",
            &["house.yaml", "line"],
        ),
        // unknown model kind, with the valid kinds
        (
            "model-kind",
            "kind: sd15",
            "kind: sdxxl",
            &[
                "house.yaml:4",
                "unknown model kind `sdxxl`",
                "sd15, sd2, sdxl, ip-adapter",
            ],
        ),
        // unknown scheduler, with the valid ones
        (
            "scheduler",
            "kind: ddim",
            "kind: dddim",
            &["house.yaml:15", "dddim", "euler"],
        ),
        // an operation that is not one, with the valid ones
        (
            "node-op",
            "    generate:\n",
            "    generat:\n",
            &["generat", "generate"],
        ),
        // a reference to a missing image, with a suggestion
        (
            "image-ref",
            "outputs:",
            "  edges: {canny: {image: huose}}\noutputs:",
            &[
                "nodes.edges.canny.image",
                "unknown image `huose`",
                "did you mean `house`",
            ],
        ),
        // a cycle, spelled out
        (
            "cycle",
            "outputs:",
            "  a: {invert: {image: b}}\n  b: {invert: {image: a}}\noutputs:",
            &["cycle", "a → b → a"],
        ),
        // a malformed sweep
        (
            "sweep",
            "seed: 42",
            "seed: {sweep: []}",
            &["nodes.gen.generate.seed", "non-empty list"],
        ),
        // an output of the wrong type
        (
            "output-ext",
            "path: out/house.png",
            "path: out/house.jpg",
            &["house.yaml:19", "must be a .png file"],
        ),
    ];
    for (name, from, to, needles) in cases {
        let (dir, recipe) = workspace(&format!("cli-error-{name}"));
        edit(&recipe, from, to);
        let (ok, _, stderr) = ipcompose(&["run", recipe.to_str().unwrap(), "--quiet"]);
        assert!(!ok, "{name}: expected failure");
        for needle in *needles {
            assert!(
                stderr.contains(needle),
                "{name}: error should mention {needle:?}: {stderr}"
            );
        }
        assert!(outputs(&dir).is_empty(), "{name}: {:?}", outputs(&dir));
        assert!(
            !dir.join("recipes/.ipcompose-cache").exists(),
            "{name}: nothing cached either"
        );
    }
}

#[test]
fn uncached_hub_id_and_bad_overrides_say_what_is_missing() {
    let (dir, recipe) = workspace("cli-hub-missing");
    edit(
        &recipe,
        "source: ../tiny-sd15",
        "source: someone/some-model",
    );
    let empty_cache = dir.join("hub");
    std::fs::create_dir_all(&empty_cache).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ipcompose"))
        .args(["run", recipe.to_str().unwrap(), "--quiet"])
        .env("HF_HUB_CACHE", &empty_cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for needle in [
        "house.yaml:4",
        "`someone/some-model`",
        "models--someone--some-model",
        "hf download someone/some-model",
    ] {
        assert!(stderr.contains(needle), "{needle:?}: {stderr}");
    }
    assert!(outputs(&dir).is_empty());
    let (ok, _, stderr) = ipcompose(&[
        "run",
        recipe.to_str().unwrap(),
        "--set",
        "outputs.5.path=x.png",
    ]);
    assert!(
        !ok && stderr.contains("--set outputs.5.path=x.png") && stderr.contains("past the end"),
        "{stderr}"
    );
}

#[test]
fn progress_is_plain_lines_off_a_terminal() {
    let (_, recipe) = workspace("cli-progress");
    let (ok, stdout, stderr) = ipcompose(&["run", recipe.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    for step in 1..=4 {
        assert!(
            stderr.contains(&format!("gen: step {step}/4 (")),
            "step {step}: {stderr}"
        );
    }
    assert!(stderr.contains("s/step"), "{stderr}");
    assert!(stdout.contains("wrote"), "{stdout}");
}

#[test]
fn verbose_lines_count_host_device_copies_only_in_cuda_builds() {
    let (_, recipe) = workspace("cli-verbose");
    let (ok, _, stderr) = ipcompose(&["run", recipe.to_str().unwrap(), "--verbose"]);
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains(": step ")).collect();
    assert_eq!(lines.len(), 4, "{stderr}");
    // A CPU-only build copies nothing to a GPU and says nothing about copies; a CUDA build run
    // on the CPU counts zero bytes.
    for line in &lines {
        if cfg!(feature = "cuda") {
            assert!(
                line.contains("host->device 0 B, device->host 0 B"),
                "{line}"
            );
        } else {
            assert!(!line.contains("host->device"), "{line}");
        }
    }
    let (ok, _, stderr) = ipcompose(&["run", recipe.to_str().unwrap(), "--verbose", "--quiet"]);
    assert!(!ok && stderr.contains("--quiet"), "{stderr}");
}

#[test]
fn inspect_says_what_a_lora_file_is() {
    for (file, expected) in [
        ("kohya_attn_te.safetensors", "kohya/A1111 LoRA for a base of cross-attention width 32, touches the UNet and text encoder; rank 4"),
        ("peft_unet_te.safetensors", "diffusers/peft LoRA"),
        ("loha.safetensors", "LyCORIS LoHa"),
        ("lokr.safetensors", "LyCORIS LoKr"),
    ] {
        let path = common::fx(&format!("lora/{file}"));
        let (ok, stdout, stderr) = ipcompose(&["inspect", &path]);
        assert!(ok && stdout.contains(expected), "{file}: {stdout} {stderr}");
    }
}
