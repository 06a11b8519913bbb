//! SDXL single-file (SGM) checkpoints and the `vae:` override of a base, against diffusers'
//! `StableDiffusionXLPipeline.from_single_file(file, config=tiny-sdxl)` and the pipeline with
//! `vae=` swapped. Fixtures: tests/fixtures/make_sdxl_single_file_fixtures.py.
//!
//! Tolerances (fp32): final latents [`LATENT_TOLERANCE`] (the 4-step Euler run with CFG 5 of
//! parity_sdxl.rs), decoded images [`IMAGE_TOLERANCE`]. The measured figures are printed
//! (`cargo test --test parity_sdxl_single_file -- --nocapture`).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::{Device, Tensor};
use common::{fixtures, fx, get, max_abs, max_abs_diff, plan, reference, scratch};
use ipcompose::pipeline::BaseModel;

const LATENT_TOLERANCE: f32 = 1e-4;
const IMAGE_TOLERANCE: f32 = 1e-3;

/// A recipe for the fixture run (the prompts of make_sdxl_single_file_fixtures.py, 4 steps, CFG
/// 5, the initial latents in `init.safetensors`) on `base` (a `models:` entry's flow mapping).
fn recipe(base: &str, size: usize) -> String {
    format!(
        "version: 1\nmodels:\n  base: {base}\nnodes:\n  gen:\n    generate:\n      base: base\n      prompt: \"a cozy house at dusk\"\n      prompt_2: \"an oil painting, warm light\"\n      negative_prompt: \"lowres, blurry\"\n      size: [{size}, {size}]\n      steps: 4\n      guidance: 5\n      latents: init.safetensors\noutputs:\n  - {{latents: gen, path: out.safetensors}}\n"
    )
}

/// Plans and runs `text` in a fresh scratch dir holding `init`; returns the final latents.
fn run(name: &str, text: &str, init: &Tensor) -> Tensor {
    let dir = scratch(&format!("sdxl-single-{name}-{}", std::process::id()));
    candle_core::safetensors::save(
        &HashMap::from([("latents", init.clone())]),
        dir.join("init.safetensors"),
    )
    .unwrap();
    let plan = plan(&dir, text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let written = ipcompose::pipeline::run_plan(&plan, &common::run_options(), &mut |_, _| {})
        .unwrap_or_else(|e| panic!("{e}"));
    candle_core::safetensors::load(&written[0], &Device::Cpu).unwrap()["latents"].clone()
}

/// The plan's error for `text`.
fn plan_error(name: &str, text: &str) -> String {
    let dir = scratch(&format!("sdxl-single-err-{name}-{}", std::process::id()));
    match plan(&dir, text) {
        Ok(_) => panic!("{name}: planned without error:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn sdxl_single_file_equals_its_folder_and_diffusers() {
    let r = reference("sdxl_single_file.safetensors");
    let init = get(&r, "init_latents");
    let single = run(
        "file",
        &recipe(
            &format!(
                "{{kind: sdxl, source: {}, config: {}}}",
                fx("single-file/tiny-sdxl.safetensors"),
                fx("tiny-sdxl")
            ),
            64,
        ),
        init,
    );
    let expected = get(&r, "final_latents");
    let diff = max_abs_diff(&single, expected);
    eprintln!(
        "sdxl single file: final latents max abs diff {diff:.2e} vs diffusers from_single_file (max |x| {:.1})",
        max_abs(expected)
    );
    let bound = common::bound(LATENT_TOLERANCE, expected);
    assert!(diff < bound, "single file: final latents differ by {diff}");
    let folder = run(
        "folder",
        &recipe(&format!("{{kind: sdxl, source: {}}}", fx("tiny-sdxl")), 64),
        init,
    );
    assert_eq!(
        max_abs_diff(&single, &folder),
        0.0,
        "the single file and its folder hold the same weights"
    );
}

/// A safetensors file of zeros with the given tensor names (shape [2, 2]).
fn write_file(path: &Path, names: &[&str]) {
    let zeros = Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    let tensors: HashMap<&str, Tensor> = names.iter().map(|n| (*n, zeros.clone())).collect();
    candle_core::safetensors::save(&tensors, path).unwrap();
}

#[test]
fn single_files_of_another_family_are_refused_naming_it() {
    let base = |kind: &str, source: &str| {
        recipe(
            &format!(
                "{{kind: {kind}, source: {source}, config: {}}}",
                fx("tiny-sdxl")
            ),
            64,
        )
    };
    let err = plan_error(
        "sd15-on-sdxl-file",
        &base("sd15", &fx("single-file/tiny-sdxl.safetensors")),
    );
    assert!(
        err.contains("recipe.yaml:3")
            && err.contains("an SDXL single-file checkpoint")
            && err.contains("use `kind: sdxl`"),
        "{err}"
    );
    let err = plan_error(
        "sdxl-on-sd15-file",
        &base("sdxl", &fx("single-file/tiny-sd15.safetensors")),
    );
    assert!(
        err.contains("Stable Diffusion 1.x single-file checkpoint")
            && err.contains("use `kind: sd15`"),
        "{err}"
    );
    // The SDXL file with an SD1.5 folder for its configs.
    let err = plan_error(
        "sdxl-file-sd15-config",
        &recipe(
            &format!(
                "{{kind: sdxl, source: {}, config: {}}}",
                fx("single-file/tiny-sdxl.safetensors"),
                fx("tiny-sd15")
            ),
            64,
        ),
    );
    assert!(err.contains("is not an SDXL model"), "{err}");

    let dir = scratch(&format!("sdxl-single-families-{}", std::process::id()));
    for (file, names, family) in [
        (
            "sd3.safetensors",
            &[
                "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
                "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
            ][..],
            "Stable Diffusion 3",
        ),
        (
            "flux.safetensors",
            &["double_blocks.0.img_attn.qkv.weight"][..],
            "Flux",
        ),
        (
            "flux-prefixed.safetensors",
            &["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"][..],
            "Flux",
        ),
        (
            "refiner.safetensors",
            &["conditioner.embedders.0.model.text_projection"][..],
            "SDXL refiner",
        ),
    ] {
        let path = dir.join(file);
        write_file(&path, names);
        let err = plan_error(file, &base("sdxl", &path.display().to_string()));
        assert!(
            err.contains("recipe.yaml:3")
                && err.contains(&format!("a {family}"))
                && err.contains("single-file checkpoint"),
            "{file}: {err}"
        );
    }
}

fn ipcompose(args: &[&str], hub_cache: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ipcompose"))
        .args(args)
        .env("HF_HUB_CACHE", hub_cache)
        .output()
        .expect("run ipcompose");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn without_config_the_sdxl_reference_repo_is_named_and_inspect_names_the_files() {
    let dir = scratch(&format!("sdxl-single-noconfig-{}", std::process::id()));
    let text = recipe(
        &format!(
            "{{kind: sdxl, source: {}}}",
            fx("single-file/tiny-sdxl.safetensors")
        ),
        64,
    );
    let path = dir.join("recipe.yaml");
    std::fs::write(&path, text).unwrap();
    let (ok, _, stderr) = ipcompose(
        &["validate", path.to_str().unwrap()],
        &dir.join("empty-cache"),
    );
    assert!(
        !ok && stderr.contains("stabilityai/stable-diffusion-xl-base-1.0")
            && stderr.contains("config: FOLDER"),
        "{stderr}"
    );
    for (file, expected) in [
        (
            "single-file/tiny-sdxl.safetensors",
            "SDXL single-file checkpoint",
        ),
        (
            "single-file/tiny-sdxl-vae.safetensors",
            "VAE single file (4 latent channels)",
        ),
        ("tiny-vae-alt", "VAE (AutoencoderKL), 4 latent channels"),
    ] {
        let (ok, stdout, stderr) = ipcompose(
            &["inspect", fixtures().join(file).to_str().unwrap()],
            &dir.join("empty-cache"),
        );
        assert!(ok && stdout.contains(expected), "{file}: {stdout}{stderr}");
    }
}

/// The base planned from `base` (recipe at 32×32), loaded; its VAE decodes diffusers' final
/// latents and the image is compared with diffusers' `key`.
fn check_vae(name: &str, base: &str, key: &str) -> BaseModel {
    let r = reference("sdxl_vae_override.safetensors");
    let dir = scratch(&format!("sdxl-vae-{name}-{}", std::process::id()));
    candle_core::safetensors::save(
        &HashMap::from([("latents", get(&r, "init_latents").clone())]),
        dir.join("init.safetensors"),
    )
    .unwrap();
    let text = recipe(base, 32);
    let plan = plan(&dir, &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let model = BaseModel::load(&plan.models["base"], &common::device(), common::dtype())
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let latents = get(&r, "final_latents");
    let image = model
        .vae
        .decode_to_unit(latents)
        .unwrap()
        .permute((0, 2, 3, 1))
        .unwrap();
    let diff = max_abs_diff(&image, get(&r, key));
    eprintln!("{name}: decoded image max abs diff {diff:.2e} vs diffusers with vae= swapped");
    let bound = IMAGE_TOLERANCE.max(common::half_relative_tolerance());
    assert!(diff < bound, "{name}: decoded image differs by {diff}");
    model
}

#[test]
fn a_vae_folder_replaces_the_base_vae() {
    let model = check_vae(
        "folder",
        &format!(
            "{{kind: sdxl, source: {}, vae: {}}}",
            fx("tiny-sdxl"),
            fx("tiny-vae-alt")
        ),
        "image_vae_folder",
    );
    // The folder's own config: its scaling factor and its (smaller) widths.
    assert_eq!(model.vae.config().scaling_factor, 0.2);
    assert_eq!(model.vae.config().block_out_channels, vec![4, 4, 8, 8]);
    // The VAE only decodes: the denoising loop is the base's.
    let r = reference("sdxl_vae_override.safetensors");
    let latents = run(
        "vae-folder-run",
        &recipe(
            &format!(
                "{{kind: sdxl, source: {}, vae: {}}}",
                fx("tiny-sdxl"),
                fx("tiny-vae-alt")
            ),
            32,
        ),
        get(&r, "init_latents"),
    );
    let diff = max_abs_diff(&latents, get(&r, "final_latents"));
    eprintln!("vae folder: final latents max abs diff {diff:.2e}");
    assert!(diff < common::bound(LATENT_TOLERANCE, get(&r, "final_latents")));
}

#[test]
fn a_vae_file_replaces_the_base_vae_of_a_folder_or_a_single_file() {
    check_vae(
        "file-on-folder",
        &format!(
            "{{kind: sdxl, source: {}, vae: {}}}",
            fx("tiny-sdxl"),
            fx("single-file/tiny-sdxl-vae.safetensors")
        ),
        "image_vae_file",
    );
    check_vae(
        "file-on-file",
        &format!(
            "{{kind: sdxl, source: {}, config: {}, vae: {}}}",
            fx("single-file/tiny-sdxl.safetensors"),
            fx("tiny-sdxl"),
            fx("single-file/tiny-sdxl-vae.safetensors")
        ),
        "image_vae_file",
    );
}

#[test]
fn any_base_takes_a_vae_and_mismatched_latent_channels_are_refused() {
    // An SD1.5 base with the SDXL pipeline folder's VAE (`vae/` of the folder): it decodes as
    // tiny-sdxl does.
    let dir = scratch(&format!("sdxl-vae-sd15-{}", std::process::id()));
    let text = format!(
        "version: 1\nmodels:\n  base: {{kind: sd15, source: {}, vae: {}}}\nnodes:\n  gen:\n    generate: {{base: base, prompt: x}}\noutputs:\n  - {{latents: gen, path: out.safetensors}}\n",
        fx("tiny-sd15"),
        fx("tiny-sdxl")
    );
    let plan = plan(&dir, &text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plan.models["base"].vae.scaling_factor, 0.13025);
    let sd15 = BaseModel::load(&plan.models["base"], &Device::Cpu, candle_core::DType::F32)
        .unwrap_or_else(|e| panic!("{e}"));
    let sdxl = BaseModel::from_folder(
        &fixtures().join("tiny-sdxl"),
        &Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let r = reference("sdxl_vae_override.safetensors");
    let latents = get(&r, "final_latents").to_device(&Device::Cpu).unwrap();
    let a = sd15.vae.decode_to_unit(&latents).unwrap();
    let b = sdxl.vae.decode_to_unit(&latents).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);

    // 16 latent channels: a folder (only its config is read at plan time) and a file.
    let folder = dir.join("vae16");
    std::fs::create_dir_all(&folder).unwrap();
    let config = std::fs::read_to_string(fixtures().join("tiny-vae-alt/config.json")).unwrap();
    let config = config.replace("\"latent_channels\": 4", "\"latent_channels\": 16");
    std::fs::write(folder.join("config.json"), config).unwrap();
    std::fs::copy(
        fixtures().join("tiny-vae-alt/diffusion_pytorch_model.safetensors"),
        folder.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let file = dir.join("vae16.safetensors");
    let post_quant = Tensor::zeros((16, 16, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &HashMap::from([
            ("post_quant_conv.weight", post_quant),
            (
                "decoder.up.0.block.0.conv1.weight",
                Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap(),
            ),
        ]),
        &file,
    )
    .unwrap();
    for vae in [&folder, &file] {
        let text = recipe(
            &format!(
                "{{kind: sdxl, source: {}, vae: {}}}",
                fx("tiny-sdxl"),
                vae.display()
            ),
            64,
        );
        let err = plan_error("latent16", &text);
        assert!(
            err.contains("recipe.yaml:3")
                && err.contains("models.base.vae")
                && err.contains(&vae.display().to_string())
                && err.contains("16 latent channels")
                && err.contains("the base model `base` 4"),
            "{err}"
        );
    }
    // Not a VAE at all.
    let err = plan_error(
        "not-a-vae",
        &recipe(
            &format!(
                "{{kind: sdxl, source: {}, vae: {}}}",
                fx("tiny-sdxl"),
                fx("ip-adapter/ip-adapter_tiny.safetensors")
            ),
            64,
        ),
    );
    assert!(err.contains("not a VAE file"), "{err}");
}
