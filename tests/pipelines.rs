//! Every recipe in `pipelines/` runs as written on the tiny test models: the CLI's `--set`
//! points its models and images at the fixtures and shrinks size and steps.

mod common;

use std::process::Command;

use common::{fx, scratch};

/// The fixture standing in for each model kind, for a recipe on an SDXL base or not.
fn tiny_source(kind: &str, source: &str, sdxl: bool) -> Vec<(String, String)> {
    match kind {
        "sd15" if source.ends_with(".safetensors") => vec![
            ("source".into(), fx("single-file/tiny-sd15.safetensors")),
            ("config".into(), fx("tiny-sd15")),
        ],
        "sd15" => vec![("source".into(), fx("tiny-sd15"))],
        "sdxl" => vec![("source".into(), fx("tiny-sdxl"))],
        "ip-adapter" => {
            let file = match (sdxl, source.contains("plus")) {
                (false, true) => "ip-adapter/ip-adapter-plus_tiny.safetensors",
                (false, false) => "ip-adapter/ip-adapter_tiny.safetensors",
                (true, true) => "ip-adapter/ip-adapter-plus_sdxl_tiny.safetensors",
                (true, false) => "ip-adapter/ip-adapter_sdxl_tiny.safetensors",
            };
            vec![
                ("source".into(), fx(file)),
                ("image_encoder".into(), fx("ip-adapter/image_encoder")),
            ]
        }
        "controlnet" if sdxl && source.contains("union") => {
            vec![("source".into(), fx("controlnet/tiny-sdxl-union"))]
        }
        "controlnet" if sdxl => vec![("source".into(), fx("controlnet/tiny-sdxl-canny"))],
        "controlnet" => vec![("source".into(), fx("controlnet/tiny-canny"))],
        "t2i-adapter" if sdxl => vec![("source".into(), fx("t2i/tiny-sdxl-full"))],
        "t2i-adapter" => vec![("source".into(), fx("t2i/tiny-full"))],
        "lora" if source.contains("detail") => {
            vec![("source".into(), fx("lora/kohya_attn_te.safetensors"))]
        }
        "lora" => vec![("source".into(), fx("lora/peft_unet_te.safetensors"))],
        "embedding" => vec![("source".into(), fx("embedding/dusk.safetensors"))],
        "depth-anything" => vec![("source".into(), fx("depth/tiny-hf"))],
        "openpose" => vec![("source".into(), fx("pose/tiny_body_pose.pth"))],
        other => panic!("no tiny stand-in for model kind {other}"),
    }
}

#[test]
fn every_pipeline_recipe_runs_on_the_tiny_models() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    let mut recipes: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    recipes.sort();
    assert!(
        recipes.len() >= 5,
        "pipelines/ should hold at least five recipes"
    );
    for recipe in recipes {
        let text = std::fs::read_to_string(&recipe).unwrap();
        let yaml: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let out = scratch(&format!(
            "pipeline-{}",
            recipe.file_stem().unwrap().to_string_lossy()
        ));
        let mut sets = Vec::new();
        let models = yaml["models"].as_mapping().unwrap();
        let sdxl = models.values().any(|m| m["kind"].as_str() == Some("sdxl"));
        for (name, model) in models {
            let name = name.as_str().unwrap();
            let kind = model["kind"].as_str().unwrap();
            for (key, value) in tiny_source(kind, model["source"].as_str().unwrap(), sdxl) {
                sets.push(format!("models.{name}.{key}={value}"));
            }
        }
        let images = [
            "controlnet/inputs/edges.png",
            "ip-adapter/inputs/ref_a.png",
            "ip-adapter/inputs/mask_left.png",
        ];
        let no_images = serde_yaml::Mapping::new();
        let declared = yaml["images"].as_mapping().unwrap_or(&no_images);
        for (i, name) in declared.keys().enumerate() {
            let name = name.as_str().unwrap();
            let image = if name.contains("mask") {
                images[2]
            } else {
                images[i % 2]
            };
            sets.push(format!("images.{name}={}", fx(image)));
        }
        for (node, spec) in yaml["nodes"].as_mapping().unwrap() {
            if spec.get("generate").is_none() {
                continue; // preprocessor nodes have no size or steps
            }
            let node = node.as_str().unwrap();
            sets.push(format!("nodes.{node}.generate.size=[128, 128]"));
            sets.push(format!("nodes.{node}.generate.steps=2"));
        }
        for (i, output) in yaml["outputs"].as_sequence().unwrap().iter().enumerate() {
            let original = output["path"].as_str().unwrap();
            let ext = original.rsplit('.').next().unwrap();
            sets.push(format!("outputs.{i}.path={}/out-{i}.{ext}", out.display()));
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ipcompose"));
        // Preprocessed images go to the scratch folder, not next to the recipe in pipelines/.
        cmd.env("IPCOMPOSE_CACHE_DIR", out.join("cache"));
        cmd.args(["run", "--quiet"]).arg(&recipe);
        for set in &sets {
            cmd.args(["--set", set]);
        }
        let result = cmd.output().unwrap();
        assert!(
            result.status.success(),
            "{}: {}",
            recipe.display(),
            String::from_utf8_lossy(&result.stderr)
        );
        // A sweep writes one image per combination and a grid instead of `out-0.png`.
        let swept = text.contains("sweep") || text.contains("seed: [");
        let png = if swept {
            assert!(out.join("out-0_grid.png").is_file(), "{}", recipe.display());
            std::fs::read_dir(&out)
                .unwrap()
                .map(|e| e.unwrap().path())
                .find(|p| {
                    let name = p.file_name().unwrap().to_string_lossy();
                    name.starts_with("out-0_seed-") && name.ends_with(".png")
                })
                .unwrap_or_else(|| panic!("{}: no sweep image", recipe.display()))
        } else {
            out.join("out-0.png")
        };
        let image = image::open(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
        assert_eq!(
            (image.width(), image.height()),
            (128, 128),
            "{}",
            recipe.display()
        );
    }
}
