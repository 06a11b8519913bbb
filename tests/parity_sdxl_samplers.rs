//! The community samplers on SDXL: `StableDiffusionXLPipeline` on the tiny random-weight
//! `tiny-sdxl` with each new scheduler (and Lightning / Turbo trailing settings), the
//! stochastic ones replaying the noise diffusers drew. Fixtures:
//! tests/fixtures/make_sdxl_sampler_fixtures.py (the SD1.5 runs are in parity_sd15.rs).

mod common;

use candle_core::Tensor;
use common::{fixtures, get, max_abs, max_abs_diff, reference};
use ipcompose::pipeline::plan::family::MicroConditioning;
use ipcompose::pipeline::plan::{GenerationPlan, InitialNoise};
use ipcompose::pipeline::run::denoise::{denoise, Conditions};
use ipcompose::pipeline::BaseModel;
use ipcompose::schedulers::{build_scheduler, ReplayNoise, SchedulerConfig, SchedulerKind};

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    prompt: String,
    negative_prompt: Option<String>,
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

fn cases() -> Vec<Case> {
    let path = fixtures().join("reference/sdxl_sampler_cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Runs `name` through the one denoising loop with SDXL's added conditioning and returns the
/// final latents' max abs diff against diffusers'.
fn check(name: &str) {
    let case = cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name}"));
    let model = BaseModel::from_folder(
        &fixtures().join("tiny-sdxl"),
        &common::device(),
        common::dtype(),
    )
    .unwrap();
    let r = reference(&format!("sdxl_pipe_{name}.safetensors"));
    let mut config =
        SchedulerConfig::from_file(&fixtures().join("tiny-sdxl/scheduler/scheduler_config.json"))
            .unwrap();
    for (k, v) in &case.scheduler.overrides {
        config = config.with_override(k, v.clone()).unwrap();
    }
    let kind: SchedulerKind = case.scheduler.kind.parse().unwrap();
    let request = GenerationPlan {
        node: case.name.clone(),
        base: "tiny-sdxl".into(),
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone(),
        prompt_2: None,
        negative_prompt_2: None,
        prompt_syntax: Default::default(),
        micro_conditioning: Some(MicroConditioning::defaults(64, 64)),
        width: 64,
        height: 64,
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
    let (text, added) = model.text_conditioning(&request).unwrap();
    assert!(added.is_some(), "SDXL takes added conditioning");
    let mut scheduler = build_scheduler(kind, &config, case.steps).unwrap();
    let noise: Vec<Tensor> = (0..)
        .map_while(|k| r.get(&format!("noise.{k}")).cloned())
        .collect();
    let conditions = Conditions {
        added,
        ..Default::default()
    };
    let latents = denoise(
        &model.unet,
        scheduler.as_mut(),
        &get(&r, "init_latents").to_dtype(common::dtype()).unwrap(),
        &text,
        &conditions,
        &mut ReplayNoise::new(noise),
        &mut |_| {},
    )
    .unwrap();
    let expected = get(&r, "final_latents");
    let diff = max_abs_diff(&latents, expected);
    eprintln!(
        "sdxl {name}: final latents max abs diff {diff:.2e} (max |x| {:.1})",
        max_abs(expected)
    );
    let tolerance = common::bound(common::PIPELINE_TOLERANCE, expected);
    assert!(
        diff < tolerance,
        "sdxl {name}: final latents differ by {diff}"
    );
}

#[test]
fn sdxl_dpmpp_2m_sde_karras() {
    check("dpmpp2m_sde_karras");
}

#[test]
fn sdxl_dpmpp_2s() {
    check("dpmpp2s");
}

#[test]
fn sdxl_unipc() {
    check("unipc");
}

#[test]
fn sdxl_heun() {
    check("heun");
}

#[test]
fn sdxl_lms() {
    check("lms");
}

#[test]
fn sdxl_ddpm() {
    check("ddpm");
}

#[test]
fn sdxl_lcm_without_guidance() {
    check("lcm_g1");
}

#[test]
fn sdxl_lightning_style_euler_trailing() {
    check("euler_trailing_g1");
}

#[test]
fn sdxl_turbo_style_euler_a_one_trailing_step() {
    check("euler_a_trailing_g0");
}

#[test]
fn every_sdxl_sampler_case_has_a_test() {
    let tested = [
        "dpmpp2m_sde_karras",
        "dpmpp2s",
        "unipc",
        "heun",
        "lms",
        "ddpm",
        "lcm_g1",
        "euler_trailing_g1",
        "euler_a_trailing_g0",
    ];
    for case in cases() {
        assert!(
            tested.contains(&case.name.as_str()),
            "{} untested",
            case.name
        );
    }
}
