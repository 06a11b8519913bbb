//! Parity with diffusers on tiny random-weight models saved in the real folder layouts.
//! Fixtures: tests/fixtures/make_fixtures.py (diffusers, fp32, CPU).
//!
//! Tolerances (fp32 on CPU): text embeddings and single UNet/VAE forwards 1e-4 max abs diff,
//! final latents 1e-4; the figures measured when these tests were written are in each assert
//! message's neighbourhood and in the README.

mod common;

use candle_core::{DType, Tensor};
use common::{fixtures, get, max_abs, max_abs_diff, reference};
use ipcompose::models::unet::Injections;
use ipcompose::pipeline::plan::{GenerationPlan, InitialNoise};
use ipcompose::pipeline::run::denoise::{denoise, Conditions, TextConditioning};
use ipcompose::pipeline::BaseModel;
use ipcompose::schedulers::{build_scheduler, ReplayNoise, SchedulerConfig, SchedulerKind};

fn tiny(folder: &str) -> BaseModel {
    tiny_in(folder, DType::F32)
}

/// The model on the test device in `dtype` (the end-to-end cases run in the test dtype).
fn tiny_in(folder: &str, dtype: DType) -> BaseModel {
    BaseModel::from_folder(&fixtures().join(folder), &common::device(), dtype)
        .unwrap_or_else(|e| panic!("loading {folder}: {e}"))
}

/// Final latents: absolute bound, and relative to the largest latent value. A random-weight
/// UNet does not denoise, so its latents stay at σ_max scale (|x| up to ~70) and CFG 7.5 × σ
/// amplifies float rounding of a single step (2e-6) by ~100; measured 2e-5 (DDIM) to 2.8e-4
/// (Euler a), i.e. ≤ 4e-6 relative.
const LATENT_TOLERANCE: f32 = 5e-4;
const LATENT_RELATIVE_TOLERANCE: f32 = 1e-5;

#[test]
fn token_ids_and_text_embeddings_match_diffusers() {
    let model = tiny("tiny-sd15");
    let r = reference("text_embeddings.safetensors");
    let ids = model.tokenize("a cozy house at dusk").unwrap();
    let expected = get(&r, "ids_cond").to_dtype(DType::U32).unwrap();
    assert_eq!(
        ids.to_vec2::<u32>().unwrap(),
        expected.to_vec2::<u32>().unwrap()
    );
    let ids_neg = model.tokenize("lowres, blurry").unwrap();
    let expected = get(&r, "ids_uncond").to_dtype(DType::U32).unwrap();
    assert_eq!(
        ids_neg.to_vec2::<u32>().unwrap(),
        expected.to_vec2::<u32>().unwrap()
    );

    let cond = model.encode_prompt("a cozy house at dusk", 0).unwrap();
    let uncond = model.encode_prompt("lowres, blurry", 0).unwrap();
    let d_cond = max_abs_diff(&cond, get(&r, "cond"));
    let d_uncond = max_abs_diff(&uncond, get(&r, "uncond"));
    eprintln!("text embeddings: max abs diff {d_cond:.2e} / {d_uncond:.2e}");
    assert!(
        d_cond < 1e-4 && d_uncond < 1e-4,
        "text embeddings differ: {d_cond} / {d_uncond}"
    );
}

#[test]
fn one_unet_forward_matches_diffusers() {
    let model = tiny("tiny-sd15");
    let r = reference("unet_step.safetensors");
    let sample = get(&r, "sample");
    let context = get(&r, "context");
    for (t_key, out_key) in [("timestep", "out"), ("timestep_frac", "out_frac")] {
        let t = get(&r, t_key)
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let out = model
            .unet
            .forward(sample, t, context, &Injections::default())
            .unwrap();
        let expected = get(&r, out_key);
        let diff = max_abs_diff(&out, expected);
        eprintln!("UNet t={t}: max abs diff {diff:.2e}");
        assert!(
            diff < 1e-4,
            "UNet output at t={t} differs by {diff} (scale {})",
            max_abs(expected)
        );
    }
}

#[test]
fn vae_decode_matches_diffusers() {
    let model = tiny("tiny-sd15");
    let r = reference("vae_decode.safetensors");
    let decoded = model.vae.decode_raw(get(&r, "latents")).unwrap();
    let diff = max_abs_diff(&decoded, get(&r, "decoded"));
    eprintln!("VAE decode: max abs diff {diff:.2e}");
    assert!(diff < 1e-4, "VAE decode differs by {diff}");
}

#[test]
fn pytorch_bin_folder_equals_safetensors_folder() {
    let st = tiny("tiny-sd15");
    let bin = tiny("tiny-sd15-bin");
    let r = reference("unet_step.safetensors");
    let (sample, context) = (get(&r, "sample"), get(&r, "context"));
    let a = st
        .unet
        .forward(sample, 981.0, context, &Injections::default())
        .unwrap();
    let b = bin
        .unet
        .forward(sample, 981.0, context, &Injections::default())
        .unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let ids = st.tokenize("a cozy house at dusk").unwrap();
    let ea = st.text_encoder.encode(&ids, 0).unwrap();
    let eb = bin.text_encoder.encode(&ids, 0).unwrap();
    assert_eq!(max_abs_diff(&ea, &eb), 0.0);
}

#[test]
fn fp16_variant_weights_load_and_stay_close() {
    use ipcompose::models::folder::DiffusersFolder;
    let folder = DiffusersFolder::open(&fixtures().join("tiny-sd15")).unwrap();
    let config = folder.unet_config().unwrap();
    // The fp16 folder holds only the UNet; read it through the same loader.
    let fp16_folder_unet = fixtures().join("tiny-sd15-fp16/unet");
    let files = ipcompose::models::weights::find_component_weights(
        &fp16_folder_unet,
        "diffusion_pytorch_model",
        Some("fp16"),
    )
    .unwrap();
    assert!(
        files[0].to_string_lossy().ends_with(".fp16.safetensors"),
        "{files:?}"
    );
    let vb = ipcompose::models::weights::WeightStore::open(&files)
        .unwrap()
        .var_builder(DType::F32, &common::device());
    let unet16 = ipcompose::models::unet::UNet2DConditionModel::new(vb, &config).unwrap();
    let unet32 = folder
        .load_unet(&config, DType::F32, &common::device())
        .unwrap();
    let r = reference("unet_step.safetensors");
    let (sample, context) = (get(&r, "sample"), get(&r, "context"));
    let a = unet32
        .forward(sample, 981.0, context, &Injections::default())
        .unwrap();
    let b = unet16
        .forward(sample, 981.0, context, &Injections::default())
        .unwrap();
    let diff = max_abs_diff(&a, &b);
    // fp16 rounding of the weights only (activations stay f32): about 1e-3 relative.
    assert!(
        diff < 2e-2 * max_abs(&a).max(1.0),
        "fp16 weights drift by {diff}"
    );
}

/// One pipeline case from `reference/cases.json`.
#[derive(serde::Deserialize)]
struct Case {
    name: String,
    folder: String,
    prompt: String,
    negative_prompt: Option<String>,
    width: usize,
    height: usize,
    steps: usize,
    guidance: f64,
    scheduler: CaseScheduler,
}

#[derive(serde::Deserialize)]
struct CaseScheduler {
    kind: String,
    #[serde(default)]
    overrides: serde_json::Map<String, serde_json::Value>,
}

/// Final latents max abs diff, relative to the largest latent, and the decoded image's max abs
/// diff where the fixture has the image.
fn run_case(case: &Case) -> (f32, f32, Option<f32>) {
    let model = tiny_in(&case.folder, common::dtype());
    let r = reference(&format!("pipe_{}.safetensors", case.name));
    let mut config = SchedulerConfig::from_file(
        &fixtures()
            .join(&case.folder)
            .join("scheduler/scheduler_config.json"),
    )
    .unwrap();
    for (k, v) in &case.scheduler.overrides {
        config = config.with_override(k, v.clone()).unwrap();
    }
    let kind: SchedulerKind = case.scheduler.kind.parse().unwrap();
    let request = GenerationPlan {
        node: case.name.clone(),
        base: case.folder.clone(),
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone(),
        prompt_2: None,
        negative_prompt_2: None,
        prompt_syntax: Default::default(),
        micro_conditioning: None,
        width: case.width,
        height: case.height,
        steps: case.steps,
        scheduler_kind: kind,
        scheduler_config: config.clone(),
        guidance: case.guidance,
        guidance_rescale: 0.0,
        init: InitialNoise::Seed(0),
        clip_skip: 0,
        ip_adapters: Vec::new(),
        controls: Vec::new(),
        loras: Vec::new(),
    };
    let (text, added): (TextConditioning, _) = model.text_conditioning(&request).unwrap();
    assert!(
        added.is_none(),
        "an SD1.x/2.x base takes no added conditioning"
    );
    let mut scheduler = build_scheduler(kind, &config, case.steps).unwrap();
    let noise: Vec<Tensor> = (0..case.steps)
        .map_while(|k| r.get(&format!("noise.{k}")).cloned())
        .collect();
    let latents = denoise(
        &model.unet,
        scheduler.as_mut(),
        &get(&r, "init_latents").to_dtype(common::dtype()).unwrap(),
        &text,
        &Conditions::default(),
        &mut ReplayNoise::new(noise),
        &mut |_| {},
    )
    .unwrap();
    let latent_diff = max_abs_diff(&latents, get(&r, "final_latents"));
    let relative = latent_diff / max_abs(get(&r, "final_latents"));
    let image_diff = r.get("image").map(|expected| {
        let image = model
            .vae
            .decode_to_unit(&latents)
            .unwrap()
            .permute((0, 2, 3, 1))
            .unwrap();
        max_abs_diff(&image, expected)
    });
    (latent_diff, relative, image_diff)
}

fn cases() -> Vec<Case> {
    let path = fixtures().join("reference/cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn check_case(name: &str) {
    let cases = cases();
    let case = cases
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name} in cases.json"));
    let (latent_diff, relative, image_diff) = run_case(case);
    let image_diff = image_diff.expect("the pipeline fixtures of make_fixtures.py have the image");
    eprintln!("{name}: final latents max abs diff {latent_diff:.2e} ({relative:.1e} relative), image {image_diff:.2e}");
    if common::dtype() != DType::F32 {
        // Half precision: one relative bound on the latents (tests/common), the image
        // through the same bound on its [0, 1] scale.
        let half = common::half_relative_tolerance();
        assert!(
            relative < half,
            "{name}: final latents differ by {relative} relative"
        );
        assert!(
            image_diff < half,
            "{name}: decoded image differs by {image_diff}"
        );
        return;
    }
    assert!(
        latent_diff < LATENT_TOLERANCE,
        "{name}: final latents differ by {latent_diff}"
    );
    assert!(
        relative < LATENT_RELATIVE_TOLERANCE,
        "{name}: final latents differ by {relative} relative"
    );
    assert!(
        image_diff < 1e-3,
        "{name}: decoded image differs by {image_diff}"
    );
}

#[test]
fn ddim_with_guidance() {
    check_case("ddim_cfg");
}

#[test]
fn ddim_trailing_spacing() {
    check_case("ddim_trailing");
}

#[test]
fn ddim_without_guidance() {
    check_case("ddim_g1");
}

#[test]
fn ddim_non_square() {
    check_case("ddim_96x64");
}

#[test]
fn euler_with_guidance() {
    check_case("euler_cfg");
}

#[test]
fn euler_karras() {
    check_case("euler_karras_cfg");
}

#[test]
fn euler_ancestral_with_recorded_noise() {
    check_case("euler_a_cfg");
}

#[test]
fn dpmpp_2m() {
    check_case("dpmpp2m_cfg");
}

#[test]
fn dpmpp_2m_karras() {
    check_case("dpmpp2m_karras_cfg");
}

#[test]
fn sd2_v_prediction_ddim() {
    check_case("sd2_ddim_v");
}

#[test]
fn sd2_v_prediction_euler() {
    check_case("sd2_euler_v");
}

#[test]
fn every_fixture_case_has_a_test() {
    let tested = [
        "ddim_cfg",
        "ddim_trailing",
        "ddim_g1",
        "ddim_96x64",
        "euler_cfg",
        "euler_karras_cfg",
        "euler_a_cfg",
        "dpmpp2m_cfg",
        "dpmpp2m_karras_cfg",
        "sd2_ddim_v",
        "sd2_euler_v",
    ];
    for case in cases() {
        assert!(
            tested.contains(&case.name.as_str()),
            "case {} has no test",
            case.name
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Community samplers and trailing spacing (tests/fixtures/make_sampler_fixtures.py): 64×64,
// latents [1, 4, 8, 8]; the stochastic samplers replay the noise diffusers drew.

fn sampler_cases() -> Vec<Case> {
    let path = fixtures().join("reference/sampler_cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn sampler_case(name: &str) -> Case {
    sampler_cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name} in sampler_cases.json"))
}

fn assert_sampler_latents(name: &str, latent_diff: f32, relative: f32) {
    eprintln!("{name}: final latents max abs diff {latent_diff:.2e} ({relative:.1e} relative)");
    if common::dtype() != DType::F32 {
        let half = common::half_relative_tolerance();
        assert!(
            relative < half,
            "{name}: final latents differ by {relative} relative"
        );
        return;
    }
    // The same bounds as the cases above (CFG 7.5 at σ_max scale; without guidance the
    // measured differences are ten times smaller).
    assert!(
        latent_diff < LATENT_TOLERANCE,
        "{name}: final latents differ by {latent_diff}"
    );
    assert!(
        relative < LATENT_RELATIVE_TOLERANCE,
        "{name}: final latents differ by {relative} relative"
    );
}

/// Through the pipeline API with the recorded noise (stochastic samplers).
fn check_sampler_case(name: &str) {
    let case = sampler_case(name);
    let (latent_diff, relative, _) = run_case(&case);
    assert_sampler_latents(name, latent_diff, relative);
}

/// Through a recipe, planned and run as `ipcompose run` does (deterministic samplers).
fn check_sampler_recipe(name: &str) {
    let case = sampler_case(name);
    let r = reference(&format!("pipe_{name}.safetensors"));
    let dir = common::scratch(&format!("sampler-{name}-{}", std::process::id()));
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents", get(&r, "init_latents").clone())]),
        dir.join("init.safetensors"),
    )
    .unwrap();
    let mut scheduler = case.scheduler.overrides.clone();
    scheduler.insert("kind".to_owned(), case.scheduler.kind.clone().into());
    // JSON is YAML.
    let scheduler = serde_json::Value::Object(scheduler).to_string();
    let negative = case
        .negative_prompt
        .as_ref()
        .map(|n| format!("      negative_prompt: {n:?}\n"))
        .unwrap_or_default();
    let text = format!(
        r#"version: 1
models:
  base: {{kind: sd15, source: {base}}}
nodes:
  gen:
    generate:
      base: base
      prompt: {prompt:?}
{negative}      size: [{w}, {h}]
      steps: {steps}
      guidance: {guidance}
      scheduler: {scheduler}
      latents: init.safetensors
outputs:
  - {{latents: gen, path: out.safetensors}}
"#,
        base = common::fx(&case.folder),
        prompt = case.prompt,
        w = case.width,
        h = case.height,
        steps = case.steps,
        guidance = case.guidance,
    );
    let plan = common::plan(&dir, &text).unwrap_or_else(|e| panic!("{e}"));
    let written = ipcompose::pipeline::run_plan(&plan, &common::run_options(), &mut |_, _| {})
        .unwrap_or_else(|e| panic!("{e}"));
    let latents = candle_core::safetensors::load(&written[0], &candle_core::Device::Cpu).unwrap()
        ["latents"]
        .clone();
    let latent_diff = max_abs_diff(&latents, get(&r, "final_latents"));
    let relative = latent_diff / max_abs(get(&r, "final_latents"));
    assert_sampler_latents(name, latent_diff, relative);
}

#[test]
fn dpmpp_2m_sde_karras_with_recorded_noise() {
    check_sampler_case("dpmpp2m_sde_karras_cfg");
}

#[test]
fn dpmpp_2s_through_a_recipe() {
    check_sampler_recipe("dpmpp2s_cfg");
}

#[test]
fn unipc_through_a_recipe() {
    check_sampler_recipe("unipc_cfg");
}

#[test]
fn heun_through_a_recipe() {
    check_sampler_recipe("heun_cfg");
}

#[test]
fn lms_through_a_recipe() {
    check_sampler_recipe("lms_cfg");
}

#[test]
fn ddpm_with_recorded_noise() {
    check_sampler_case("ddpm_cfg");
}

#[test]
fn lcm_without_guidance_with_recorded_noise() {
    check_sampler_case("lcm_g1");
}

#[test]
fn lightning_style_euler_trailing_through_a_recipe() {
    check_sampler_recipe("euler_trailing_g1");
}

#[test]
fn lightning_style_dpmpp_2m_trailing_through_a_recipe() {
    check_sampler_recipe("dpmpp2m_trailing_g1");
}

#[test]
fn turbo_style_euler_a_one_trailing_step_with_recorded_noise() {
    check_sampler_case("euler_a_trailing_g0");
}

/// Heun evaluates the UNet twice per step: each evaluation must get its step's ControlNet
/// weight (diffusers applies the full-window scale at all 2N − 1 calls).
#[test]
fn heun_applies_a_controlnet_at_both_evaluations_of_a_step() {
    let r = reference("pipe_heun_controlnet.safetensors");
    let dir = common::scratch(&format!("sampler-heun-controlnet-{}", std::process::id()));
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents", get(&r, "init_latents").clone())]),
        dir.join("init.safetensors"),
    )
    .unwrap();
    let text = format!(
        r#"version: 1
models:
  base: {{kind: sd15, source: {base}}}
  canny: {{kind: controlnet, source: {canny}}}
images:
  edges: {edges}
nodes:
  gen:
    generate:
      base: base
      prompt: "a cozy house at dusk"
      negative_prompt: "lowres, blurry"
      size: [128, 128]
      steps: 3
      guidance: 7.5
      scheduler: {{kind: heun}}
      latents: init.safetensors
      controls:
        - {{model: canny, image: edges, scale: 0.8}}
outputs:
  - {{latents: gen, path: out.safetensors}}
"#,
        base = common::fx("tiny-sd15"),
        canny = common::fx("controlnet/tiny-canny"),
        edges = common::fx("controlnet/inputs/edges.png"),
    );
    let plan = common::plan(&dir, &text).unwrap_or_else(|e| panic!("{e}"));
    let written = ipcompose::pipeline::run_plan(&plan, &common::run_options(), &mut |_, _| {})
        .unwrap_or_else(|e| panic!("{e}"));
    let latents = candle_core::safetensors::load(&written[0], &candle_core::Device::Cpu).unwrap()
        ["latents"]
        .clone();
    let latent_diff = max_abs_diff(&latents, get(&r, "final_latents"));
    let relative = latent_diff / max_abs(get(&r, "final_latents"));
    assert_sampler_latents("heun_controlnet", latent_diff, relative);
}

#[test]
fn every_sampler_case_has_a_test() {
    let tested = [
        "dpmpp2m_sde_karras_cfg",
        "dpmpp2s_cfg",
        "unipc_cfg",
        "heun_cfg",
        "lms_cfg",
        "ddpm_cfg",
        "lcm_g1",
        "euler_trailing_g1",
        "dpmpp2m_trailing_g1",
        "euler_a_trailing_g0",
    ];
    for case in sampler_cases() {
        assert!(
            tested.contains(&case.name.as_str()),
            "case {} has no test",
            case.name
        );
    }
}
