//! SDXL parity with diffusers on the tiny random-weight `tiny-sdxl` folder (two text encoders,
//! `text_time` added embedding, transformer depth 2, linear projections).
//! Fixtures: tests/fixtures/make_sdxl_fixtures.py (`StableDiffusionXLPipeline`, fp32, CPU).
//!
//! Tolerances (fp32): text embeddings, pooled embeddings and one UNet forward 1e-4 max abs
//! diff; the pipeline cases' final latents [`LATENT_TOLERANCE`], their decoded images 1e-3.
//! The measured figures are printed (`cargo test --test parity_sdxl -- --nocapture`) and
//! written down in the README.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, fx, get, max_abs, max_abs_diff, plan, reference, scratch};
use ipcompose::models::unet::{AddedConditioning, Injections, TextContext};
use ipcompose::pipeline::plan::GenerationPlan;
use ipcompose::pipeline::BaseModel;

/// Final latents of the 4-step Euler runs with CFG 5 (|x| up to ~19).
const LATENT_TOLERANCE: f32 = 1e-4;
const EMBEDDING_TOLERANCE: f32 = 1e-4;

const PROMPT: &str = "a cozy house at dusk";
const PROMPT_2: &str = "an oil painting, warm light";
const NEGATIVE: &str = "lowres, blurry";
const NEGATIVE_2: &str = "jpeg artifacts, cartoon";

fn tiny_sdxl(dtype: DType) -> BaseModel {
    BaseModel::from_folder(&fixtures().join("tiny-sdxl"), &common::device(), dtype)
        .unwrap_or_else(|e| panic!("loading tiny-sdxl: {e}"))
}

fn check(what: &str, ours: &Tensor, expected: &Tensor, tolerance: f32) -> f32 {
    let diff = max_abs_diff(ours, expected);
    eprintln!(
        "{what}: max abs diff {diff:.2e} (max |x| {:.2})",
        max_abs(expected)
    );
    assert!(
        diff < tolerance,
        "{what} differs by {diff} (bound {tolerance:.1e})"
    );
    diff
}

#[test]
fn token_ids_text_embeddings_and_pooled_match_diffusers() {
    let model = tiny_sdxl(DType::F32);
    let r = reference("sdxl_text_embeddings.safetensors");
    let second = model
        .text_encoder_2
        .as_ref()
        .expect("a second text encoder");
    let ids = |tokenizer: &ipcompose::models::tokenizer::ClipTokenizer, text: &str| {
        tokenizer.encode(text).unwrap()
    };
    let expected_ids = |key: &str| -> Vec<u32> {
        get(&r, key)
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec2::<u32>()
            .unwrap()[0]
            .clone()
    };
    assert_eq!(ids(&model.tokenizer, PROMPT), expected_ids("ids_1"));
    assert_eq!(ids(&second.tokenizer, PROMPT), expected_ids("ids_2"));
    assert_eq!(
        ids(&model.tokenizer, NEGATIVE),
        expected_ids("ids_1_negative")
    );
    assert_eq!(
        ids(&second.tokenizer, NEGATIVE),
        expected_ids("ids_2_negative")
    );
    assert_eq!(second.tokenizer.pad_id(), 0, "tokenizer_2 pads with `!`");

    let cases = [
        (PROMPT, PROMPT, 0, "prompt_embeds", "pooled"),
        (
            NEGATIVE,
            NEGATIVE,
            0,
            "negative_prompt_embeds",
            "negative_pooled",
        ),
        (
            PROMPT,
            PROMPT_2,
            0,
            "prompt_2.prompt_embeds",
            "prompt_2.pooled",
        ),
        (
            NEGATIVE,
            NEGATIVE_2,
            0,
            "prompt_2.negative_prompt_embeds",
            "prompt_2.negative_pooled",
        ),
        (
            "",
            "",
            0,
            "empty_negative.negative_prompt_embeds",
            "empty_negative.negative_pooled",
        ),
        // clip skip changes the context, not the pooled embeddings.
        (PROMPT, PROMPT, 1, "clip_skip_1.prompt_embeds", "pooled"),
    ];
    for (prompt, prompt_2, clip_skip, context_key, pooled_key) in cases {
        let (context, pooled) = model
            .encode_prompt_pair(prompt, prompt_2, clip_skip)
            .unwrap();
        check(
            context_key,
            &context,
            get(&r, context_key),
            EMBEDDING_TOLERANCE,
        );
        check(
            pooled_key,
            &pooled,
            get(&r, pooled_key),
            EMBEDDING_TOLERANCE,
        );
    }
}

#[test]
fn one_unet_forward_with_added_conditioning_matches_diffusers() {
    let model = tiny_sdxl(DType::F32);
    let r = reference("sdxl_unet_step.safetensors");
    let added = AddedConditioning {
        text_embeds: get(&r, "text_embeds").clone(),
        time_ids: get(&r, "time_ids").clone(),
    };
    let context = TextContext {
        hidden: get(&r, "context"),
        added: Some(&added),
    };
    for (t_key, out_key) in [("timestep", "out"), ("timestep_frac", "out_frac")] {
        let t = get(&r, t_key)
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let out = model
            .unet
            .forward(get(&r, "sample"), t, context, &Injections::default())
            .unwrap();
        check(
            &format!("SDXL UNet t={t}"),
            &out,
            get(&r, out_key),
            EMBEDDING_TOLERANCE,
        );
    }
    // The added embedding is not optional for this UNet.
    let err = model
        .unet
        .forward(
            get(&r, "sample"),
            801.0,
            get(&r, "context"),
            &Injections::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("added text/time embedding"), "{err}");
}

/// One pipeline case of `reference/sdxl_cases.json`.
#[derive(serde::Deserialize)]
struct Case {
    name: String,
    prompt: String,
    prompt_2: Option<String>,
    negative_prompt: Option<String>,
    negative_prompt_2: Option<String>,
    width: usize,
    height: usize,
    steps: usize,
    guidance: f64,
    /// diffusers' (height, width).
    original_size_hw: Option<[usize; 2]>,
    crops_coords_top_left: [usize; 2],
    target_size_hw: Option<[usize; 2]>,
    clip_skip: Option<usize>,
}

#[derive(serde::Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

fn case(name: &str) -> Case {
    let path = fixtures().join("reference/sdxl_cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let cases: Cases = serde_json::from_str(&text).unwrap();
    cases
        .cases
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name} in sdxl_cases.json"))
}

/// The recipe for a case, in the pinned syntax: sizes `[width, height]`, crop `[top, left]`.
/// The scheduler is not named: an sdxl base defaults to its folder's Euler.
fn case_recipe(c: &Case) -> String {
    let quoted = |key: &str, value: &Option<String>| match value {
        Some(v) => format!("      {key}: {v:?}\n"),
        None => String::new(),
    };
    let wh = |key: &str, hw: Option<[usize; 2]>| match hw {
        Some([h, w]) => format!("      {key}: [{w}, {h}]\n"),
        None => String::new(),
    };
    let mut generate = format!(
        "      base: base\n      prompt: {:?}\n      size: [{}, {}]\n      steps: {}\n      guidance: {}\n      latents: init.safetensors\n",
        c.prompt, c.width, c.height, c.steps, c.guidance
    );
    generate += &quoted("prompt_2", &c.prompt_2);
    generate += &quoted("negative_prompt", &c.negative_prompt);
    generate += &quoted("negative_prompt_2", &c.negative_prompt_2);
    generate += &wh("original_size", c.original_size_hw);
    generate += &wh("target_size", c.target_size_hw);
    if c.crops_coords_top_left != [0, 0] {
        let [top, left] = c.crops_coords_top_left;
        generate += &format!("      crops_coords_top_left: [{top}, {left}]\n");
    }
    if let Some(skip) = c.clip_skip {
        generate += &format!("      clip_skip: {skip}\n");
    }
    format!(
        "version: 1\nmodels:\n  base: {{kind: sdxl, source: {}}}\nnodes:\n  gen:\n    generate:\n{generate}outputs:\n  - {{latents: gen, path: out.safetensors}}\n",
        fx("tiny-sdxl")
    )
}

/// Runs a case through `ipcompose run`'s path (recipe → plan → run) and checks the final
/// latents; checks the added conditioning the plan gives the loop and the decoded image.
fn check_case(name: &str) {
    let c = case(name);
    let r = reference(&format!("{name}.safetensors"));
    let dir = scratch(&format!("sdxl-{name}-{}", std::process::id()));
    candle_core::safetensors::save(
        &HashMap::from([("latents", get(&r, "init_latents").clone())]),
        dir.join("init.safetensors"),
    )
    .unwrap();
    let text = case_recipe(&c);
    let plan = plan(&dir, &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let generation: &GenerationPlan = &plan.generations[0];

    // The conditioning the loop gets: time ids exact, pooled embeddings (zeros for no negative).
    let model = tiny_sdxl(common::dtype());
    let (conditioning, added) = model.text_conditioning(generation).unwrap();
    let added = added.expect("an sdxl base has added conditioning");
    assert_eq!(
        max_abs_diff(&added.time_ids, get(&r, "add_time_ids")),
        0.0,
        "{name}: time ids"
    );
    let tolerance = common::bound(EMBEDDING_TOLERANCE, get(&r, "add_text_embeds"));
    check(
        &format!("{name}: pooled text embeddings"),
        &added.text_embeds,
        get(&r, "add_text_embeds"),
        tolerance,
    );
    if c.negative_prompt.is_none() {
        let uncond = conditioning.context.narrow(0, 0, 1).unwrap();
        assert_eq!(max_abs(&uncond), 0.0, "{name}: negative context not zero");
        let pooled = added.text_embeds.narrow(0, 0, 1).unwrap();
        assert_eq!(max_abs(&pooled), 0.0, "{name}: negative pooled not zero");
    }

    let written = ipcompose::pipeline::run_plan(&plan, &common::run_options(), &mut |_, _| {})
        .unwrap_or_else(|e| panic!("{e}"));
    let latents =
        candle_core::safetensors::load(&written[0], &Device::Cpu).unwrap()["latents"].clone();
    let expected = get(&r, "final_latents");
    let diff = max_abs_diff(&latents, expected);
    let relative = diff / max_abs(expected);
    let image = model
        .vae
        .decode_to_unit(&latents.to_device(&model.device).unwrap())
        .unwrap()
        .permute((0, 2, 3, 1))
        .unwrap();
    let image_diff = max_abs_diff(&image, get(&r, "image"));
    eprintln!(
        "{name}: final latents max abs diff {diff:.2e} ({relative:.1e} relative, max |x| {:.1}), image {image_diff:.2e}",
        max_abs(expected)
    );
    let latent_bound = common::bound(LATENT_TOLERANCE, expected);
    assert!(
        diff < latent_bound,
        "{name}: final latents differ by {diff} (bound {latent_bound:.1e})"
    );
    // The image is [0, 1]: its half-precision bound is the relative one.
    let image_bound = 1e-3f32.max(common::half_relative_tolerance());
    assert!(
        image_diff < image_bound,
        "{name}: decoded image differs by {image_diff}"
    );
}

#[test]
fn sdxl_txt2img_with_guidance() {
    check_case("sdxl_base");
}

#[test]
fn sdxl_second_prompts_differ() {
    check_case("sdxl_prompt_2");
}

#[test]
fn sdxl_absent_negative_prompt_is_zeros() {
    check_case("sdxl_no_negative");
}

#[test]
fn sdxl_micro_conditioning() {
    check_case("sdxl_micro");
}

#[test]
fn sdxl_non_square() {
    check_case("sdxl_80x48");
}

#[test]
fn sdxl_clip_skip() {
    check_case("sdxl_clip_skip");
}

/// A recipe on `folder` (`kind`) with extra `generate` lines, planned only.
fn plan_error(name: &str, kind: &str, folder: &str, generate: &str) -> String {
    let dir = scratch(&format!("sdxl-err-{name}-{}", std::process::id()));
    let text = format!(
        "version: 1\nmodels:\n  base: {{kind: {kind}, source: {}}}\nnodes:\n  gen:\n    generate:\n      base: base\n      prompt: \"a cat\"\n      size: [64, 64]\n{generate}outputs:\n  - {{latents: gen, path: out.safetensors}}\n",
        fx(folder)
    );
    match plan(&dir, &text) {
        Ok(_) => panic!("{name}: planned without error:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn sdxl_recipe_keys_are_checked_at_plan_time() {
    // Each error names the recipe line and says what was expected.
    let err = plan_error(
        "sd15-prompt-2",
        "sd15",
        "tiny-sd15",
        "      prompt_2: \"x\"\n",
    );
    assert!(
        err.contains("recipe.yaml:10")
            && err.contains("`prompt_2` is for bases with two text encoders"),
        "{err}"
    );
    let err = plan_error(
        "sd15-micro",
        "sd15",
        "tiny-sd15",
        "      target_size: [64, 64]\n",
    );
    assert!(
        err.contains("recipe.yaml:10") && err.contains("micro-conditioning"),
        "{err}"
    );
    let err = plan_error(
        "zero-size",
        "sdxl",
        "tiny-sdxl",
        "      original_size: [0, 64]\n",
    );
    assert!(
        err.contains("recipe.yaml:10") && err.contains("[width, height] in pixels, positive"),
        "{err}"
    );
    let err = plan_error(
        "negative-2-alone",
        "sdxl",
        "tiny-sdxl",
        "      negative_prompt_2: \"blurry\"\n",
    );
    assert!(
        err.contains("recipe.yaml:10") && err.contains("needs a `negative_prompt`"),
        "{err}"
    );
    let err = plan_error("clip-skip", "sdxl", "tiny-sdxl", "      clip_skip: 3\n");
    assert!(
        err.contains("clip_skip 3 must be smaller than the text encoder's 3 layers"),
        "{err}"
    );
    // serde: a size that is not a pair names the line.
    let err = plan_error(
        "crop-scalar",
        "sdxl",
        "tiny-sdxl",
        "      crops_coords_top_left: 16\n",
    );
    assert!(
        err.contains("crops_coords_top_left") && err.contains("line 10"),
        "{err}"
    );
}

#[test]
fn base_kind_and_folder_must_agree() {
    let err = plan_error("sd15-on-sdxl", "sd15", "tiny-sdxl", "");
    assert!(
        err.contains("recipe.yaml:3") && err.contains("use `kind: sdxl`"),
        "{err}"
    );
    let err = plan_error("sdxl-on-sd15", "sdxl", "tiny-sd15", "");
    assert!(err.contains("is not an SDXL model"), "{err}");
}

#[test]
fn sdxl_defaults_to_its_euler_scheduler_and_size() {
    let dir = scratch(&format!("sdxl-defaults-{}", std::process::id()));
    let text = format!(
        "version: 1\nmodels:\n  base: {{kind: sdxl, source: {}}}\nnodes:\n  gen:\n    generate: {{base: base, prompt: \"a cat\"}}\noutputs:\n  - {{latents: gen, path: out.safetensors}}\n",
        fx("tiny-sdxl")
    );
    let plan = plan(&dir, &text).unwrap_or_else(|e| panic!("{e}"));
    let g = &plan.generations[0];
    assert_eq!(
        g.scheduler_kind,
        ipcompose::schedulers::SchedulerKind::Euler
    );
    // UNet sample_size 8 × VAE factor 8.
    assert_eq!((g.width, g.height), (64, 64));
    let micro = g.micro_conditioning.expect("micro-conditioning resolved");
    assert_eq!(micro.time_ids(), [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]);
    assert!(plan.models["base"].force_zeros_for_empty_prompt);
}

/// An IP-Adapter on the SDXL base through a recipe, against diffusers' `load_ip_adapter` +
/// `set_ip_adapter_scale` (tests/fixtures/make_sdxl_adapter_fixtures.py): 17 cross-attention
/// layers (transformer depth 2 in places), context width 80.
fn sdxl_ip_case(case: &str, adapter: &str, image: &str, scale: &str) {
    let r = reference(&format!("{case}.safetensors"));
    let dir = scratch(&format!("sdxl-{case}-{}", std::process::id()));
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents", get(&r, "init_latents").clone())]),
        dir.join("init.safetensors"),
    )
    .unwrap();
    let text = format!(
        "version: 1\nmodels:\n  base: {{kind: sdxl, source: {}}}\n  ip: {{kind: ip-adapter, source: {}, image_encoder: {}}}\nimages:\n  ref: {}\nnodes:\n  gen:\n    generate:\n      base: base\n      prompt: \"a cozy house at dusk\"\n      negative_prompt: \"lowres, blurry\"\n      size: [64, 64]\n      steps: 4\n      guidance: 5\n      latents: init.safetensors\n      ip_adapters:\n        - {{model: ip, image: ref, scale: {scale}}}\noutputs:\n  - {{latents: gen, path: out.safetensors}}\n",
        fx("tiny-sdxl"),
        fx(&format!("ip-adapter/{adapter}")),
        fx("ip-adapter/image_encoder"),
        fx(&format!("ip-adapter/inputs/{image}")),
    );
    let plan = plan(&dir, &text).unwrap_or_else(|e| panic!("{e}"));
    let written = ipcompose::pipeline::run_plan(&plan, &common::run_options(), &mut |_, _| {})
        .unwrap_or_else(|e| panic!("{e}"));
    let latents = candle_core::safetensors::load(&written[0], &candle_core::Device::Cpu).unwrap()
        ["latents"]
        .clone();
    let expected = get(&r, "final_latents");
    let diff = max_abs_diff(&latents, expected);
    eprintln!(
        "{case}: final latents max abs diff {diff:.2e} (max |x| {:.1})",
        max_abs(expected)
    );
    let tolerance = common::bound(common::PIPELINE_TOLERANCE, expected);
    assert!(diff < tolerance, "{case}: final latents differ by {diff}");
}

#[test]
fn sdxl_plain_ip_adapter() {
    sdxl_ip_case(
        "sdxl_ipa_plain",
        "ip-adapter_sdxl_tiny.safetensors",
        "ref_a.png",
        "0.6",
    );
}

/// The plus (Resampler) adapter with the `style` preset: InstantStyle's SDXL block
/// `up_blocks.0.attentions.1` (diffusers `{"up": {"block_0": [0.0, 1.0, 0.0]}}`).
#[test]
fn sdxl_plus_ip_adapter_with_the_style_preset() {
    sdxl_ip_case(
        "sdxl_ipa_plus_style",
        "ip-adapter-plus_sdxl_tiny.safetensors",
        "ref_b.png",
        "style",
    );
}

#[test]
fn an_sd15_ip_adapter_on_the_sdxl_base_is_refused_naming_both_widths() {
    let dir = scratch(&format!("sdxl-ipa-sd15-{}", std::process::id()));
    let text = format!(
        "version: 1\nmodels:\n  base: {{kind: sdxl, source: {}}}\n  ip: {{kind: ip-adapter, source: {}, image_encoder: {}}}\nimages:\n  ref: {}\nnodes:\n  gen:\n    generate:\n      base: base\n      prompt: x\n      ip_adapters: [{{model: ip, image: ref}}]\noutputs:\n  - {{latents: gen, path: out.safetensors}}\n",
        fx("tiny-sdxl"),
        fx("ip-adapter/ip-adapter_tiny.safetensors"),
        fx("ip-adapter/image_encoder"),
        fx("ip-adapter/inputs/ref_a.png"),
    );
    let err = plan(&dir, &text)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("32") && err.contains("80"), "{err}");
}
