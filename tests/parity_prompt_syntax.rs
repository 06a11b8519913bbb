//! Prompt syntax (`prompt_syntax: a1111 | comfy | plain`): attention weights, `BREAK`, escapes
//! and prompts longer than 75 tokens, against tests/fixtures/make_prompt_fixtures.py's
//! transcription of A1111 (`prompt_parser` + `sd_hijack_clip` + `sd_emphasis`) and ComfyUI
//! (`sd1_clip`) over transformers' CLIP on the tiny SD1.5 and SDXL models, then through diffusers'
//! pipelines with `prompt_embeds`.
//!
//! Tolerances (f32): prompt embeddings [`EMBEDDING_TOLERANCE`], final latents
//! [`common::PIPELINE_TOLERANCE`] (SD1.5, DDIM 4 steps, CFG 7.5) and [`SDXL_LATENT_TOLERANCE`]
//! (SDXL, Euler 4 steps, CFG 5). The measured figures are printed
//! (`cargo test --test parity_prompt_syntax -- --nocapture`).

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, fx, get, max_abs, max_abs_diff, plan, reference, scratch};
use ipcompose::models::embedding::TextualInversion;
use ipcompose::pipeline::recipe::prompt_syntax::{tokenize_prompt, PromptSyntax};
use ipcompose::pipeline::BaseModel;

const EMBEDDING_TOLERANCE: f32 = 1e-5;
const SDXL_LATENT_TOLERANCE: f32 = 1e-4;

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    base: String,
    syntax: String,
    prompt: String,
    /// Per encoder, per chunk: the prompt's own tokens.
    tokens: Vec<Vec<usize>>,
    /// Per encoder, per chunk: the 77 ids.
    #[serde(default)]
    ids: Vec<Vec<Vec<u32>>>,
    #[serde(default)]
    negative_prompt: Option<String>,
}

#[derive(serde::Deserialize)]
struct Cases {
    cases: Vec<Case>,
    pipelines: Vec<Case>,
}

fn cases() -> Cases {
    let path = fixtures().join("reference/prompt_syntax_cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn syntax(case: &Case) -> PromptSyntax {
    PromptSyntax::parse(&case.syntax).unwrap_or_else(|| panic!("syntax {}", case.syntax))
}

/// The embeddings the fixture script loads into the `sd15_ti` base, in its order (ids match).
const EMBEDDINGS: [(&str, &str); 2] = [
    ("<cozy>", "embedding/cozy.pt"),
    ("<dusk>", "embedding/dusk.safetensors"),
];

/// The case's base: tiny SD1.5 (`sd15`, `sd15_ti` with the two embeddings) or tiny SDXL.
fn model(base: &str, device: &Device, dtype: DType) -> BaseModel {
    let folder = if base == "sdxl" {
        "tiny-sdxl"
    } else {
        "tiny-sd15"
    };
    let mut model = BaseModel::from_folder(&fixtures().join(folder), device, dtype)
        .unwrap_or_else(|e| panic!("loading {folder}: {e}"));
    if base == "sd15_ti" {
        let loaded: Vec<(&str, TextualInversion)> = EMBEDDINGS
            .iter()
            .map(|(token, file)| {
                (
                    *token,
                    TextualInversion::open(&fixtures().join(file)).unwrap(),
                )
            })
            .collect();
        let refs: Vec<_> = loaded.iter().map(|(t, e)| (*t, e)).collect();
        model.add_embeddings(&refs).unwrap();
    }
    model
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
fn chunks_and_their_ids_match_the_transcription() {
    let mut models: HashMap<String, BaseModel> = HashMap::new();
    for case in cases().cases {
        let model = models
            .entry(case.base.clone())
            .or_insert_with(|| model(&case.base, &Device::Cpu, DType::F32));
        let mut tokenizers = vec![&model.tokenizer];
        if let Some(second) = &model.text_encoder_2 {
            tokenizers.push(&second.tokenizer);
        }
        assert_eq!(tokenizers.len(), case.tokens.len(), "{}", case.name);
        for (encoder, tokenizer) in tokenizers.into_iter().enumerate() {
            let tokenized = tokenize_prompt(tokenizer, &case.prompt, syntax(&case))
                .unwrap_or_else(|e| panic!("{}: {e}", case.name));
            let counts: Vec<usize> = tokenized.chunks.iter().map(|c| c.tokens).collect();
            assert_eq!(
                counts, case.tokens[encoder],
                "{} encoder {encoder}",
                case.name
            );
            let ids: Vec<Vec<u32>> = tokenized.chunks.iter().map(|c| c.ids.clone()).collect();
            assert_eq!(ids, case.ids[encoder], "{} encoder {encoder}", case.name);
        }
    }
}

#[test]
fn prompt_embeddings_match_the_transcription() {
    let device = common::device();
    let dtype = common::dtype();
    let r = reference("prompt_syntax_embeds.safetensors");
    let mut models: HashMap<String, BaseModel> = HashMap::new();
    for case in cases().cases {
        let model = models
            .entry(case.base.clone())
            .or_insert_with(|| model(&case.base, &device, dtype));
        let expected = get(&r, &format!("{}.embeds", case.name));
        let tolerance = common::bound(EMBEDDING_TOLERANCE, expected);
        if case.base == "sdxl" {
            let (context, pooled) = model
                .encode_prompt_pair_with(&case.prompt, &case.prompt, syntax(&case), 0)
                .unwrap();
            check(&case.name, &context, expected, tolerance);
            let expected = get(&r, &format!("{}.pooled", case.name));
            check(
                &format!("{} pooled", case.name),
                &pooled,
                expected,
                tolerance,
            );
        } else {
            let context = model
                .encode_prompt_with(&case.prompt, syntax(&case), 0)
                .unwrap();
            check(&case.name, &context, expected, tolerance);
        }
    }
}

/// A prompt of one chunk without weights is diffusers' encoding to the last bit, in every
/// syntax (the existing parity tests run in the default, `a1111`).
#[test]
fn short_unweighted_prompts_stay_bit_identical() {
    let device = Device::Cpu;
    let sd15 = model("sd15_ti", &device, DType::F32);
    let sdxl = model("sdxl", &device, DType::F32);
    for syntax in [
        PromptSyntax::A1111,
        PromptSyntax::Comfy,
        PromptSyntax::Plain,
    ] {
        for prompt in [
            "a cozy house at dusk",
            "lowres, blurry",
            "",
            "a <cozy> house",
        ] {
            let ours = sd15.encode_prompt_with(prompt, syntax, 0).unwrap();
            let diffusers = sd15.encode_prompt(prompt, 0).unwrap();
            assert_eq!(
                max_abs_diff(&ours, &diffusers),
                0.0,
                "{syntax:?} {prompt:?}"
            );
            let ours = sd15.encode_prompt_with(prompt, syntax, 1).unwrap();
            let diffusers = sd15.encode_prompt(prompt, 1).unwrap();
            assert_eq!(max_abs_diff(&ours, &diffusers), 0.0, "clip skip {prompt:?}");
            let (ours, ours_pooled) = sdxl
                .encode_prompt_pair_with(prompt, "an oil painting", syntax, 0)
                .unwrap();
            let (theirs, pooled) = sdxl
                .encode_prompt_pair(prompt, "an oil painting", 0)
                .unwrap();
            assert_eq!(
                max_abs_diff(&ours, &theirs),
                0.0,
                "sdxl {syntax:?} {prompt:?}"
            );
            assert_eq!(max_abs_diff(&ours_pooled, &pooled), 0.0);
        }
    }
}

/// YAML single-quoted (backslashes stay as they are).
fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn pipeline(name: &str) -> Case {
    cases()
        .pipelines
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no pipeline {name} in prompt_syntax_cases.json"))
}

/// A long weighted prompt with an embedding inside a weight, and a short negative prompt, run
/// through the recipe path.
fn sd15_pipeline(name: &str) {
    let c = pipeline(name);
    let models = format!(
        "  a_cozy: {{kind: embedding, source: {}, token: \"<cozy>\"}}\n  b_dusk: {{kind: embedding, source: {}, token: \"<dusk>\"}}\n",
        fx(EMBEDDINGS[0].1),
        fx(EMBEDDINGS[1].1)
    );
    let generate = format!(
        "      prompt: {}\n      negative_prompt: {}\n      prompt_syntax: {}\n",
        quoted(&c.prompt),
        quoted(c.negative_prompt.as_deref().unwrap_or("")),
        c.syntax
    );
    common::run_generate_case(name, &models, "", &generate);
}

#[test]
fn sd15_a1111_long_weighted_prompt_with_an_embedding() {
    sd15_pipeline("ps_sd15_a1111");
}

#[test]
fn sd15_comfy_long_weighted_prompt_with_an_embedding() {
    sd15_pipeline("ps_sd15_comfy");
}

#[test]
fn sdxl_a1111_long_weighted_prompt() {
    sdxl_pipeline("ps_sdxl_a1111");
}

#[test]
fn sdxl_comfy_long_weighted_prompt() {
    sdxl_pipeline("ps_sdxl_comfy");
}

/// The long weighted prompt on SDXL through a recipe (both encoders chunked and weighted, the
/// pooled embedding of the first chunk).
fn sdxl_pipeline(name: &str) {
    let c = pipeline(name);
    let r = reference(&format!("{name}.safetensors"));
    let dir = scratch(&format!("prompt-syntax-{name}-{}", std::process::id()));
    candle_core::safetensors::save(
        &HashMap::from([("latents", get(&r, "init_latents").clone())]),
        dir.join("init.safetensors"),
    )
    .unwrap();
    let text = format!(
        "version: 1\nmodels:\n  base: {{kind: sdxl, source: {}}}\nnodes:\n  gen:\n    generate:\n      base: base\n      prompt: {}\n      negative_prompt: {}\n      prompt_syntax: {}\n      size: [64, 64]\n      steps: 4\n      guidance: 5.0\n      latents: init.safetensors\noutputs:\n  - {{latents: gen, path: out.safetensors}}\n",
        fx("tiny-sdxl"),
        quoted(&c.prompt),
        quoted(c.negative_prompt.as_deref().unwrap_or("")),
        c.syntax
    );
    let plan = plan(&dir, &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let written = ipcompose::pipeline::run_plan(&plan, &common::run_options(), &mut |_, _| {})
        .unwrap_or_else(|e| panic!("{e}"));
    let latents =
        candle_core::safetensors::load(&written[0], &Device::Cpu).unwrap()["latents"].clone();
    let expected = get(&r, "final_latents");
    check(
        &format!("{name} final latents"),
        &latents,
        expected,
        common::bound(SDXL_LATENT_TOLERANCE, expected),
    );
}

fn recipe(generate: &str) -> String {
    format!(
        "version: 1\nmodels:\n  base: {{kind: sd15, source: {}}}\nnodes:\n  gen:\n    generate:\n      base: base\n{generate}outputs:\n  - {{latents: gen, path: out.safetensors}}\n",
        fx("tiny-sd15")
    )
}

#[test]
fn an_unknown_prompt_syntax_lists_the_valid_ones_with_its_line() {
    let dir = scratch("prompt-syntax-unknown");
    let text = recipe("      prompt: \"a house\"\n      prompt_syntax: compel\n");
    let message = plan(&dir, &text)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        message.contains("recipe.yaml:9")
            && message.contains("prompt_syntax")
            && message.contains("compel")
            && message.contains("a1111, comfy, plain"),
        "{message}"
    );
}

#[test]
fn unbalanced_brackets_warn_with_line_and_column() {
    let dir = scratch("prompt-syntax-unbalanced");
    let text = recipe("      prompt: \"a (cozy house\"\n      negative_prompt: \"lowres)\"\n");
    let plan = plan(&dir, &text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plan.warnings.len(), 2, "{:?}", plan.warnings);
    assert!(
        plan.warnings[0].contains("recipe.yaml:8")
            && plan.warnings[0].contains("column 3")
            && plan.warnings[0].contains("never closed"),
        "{}",
        plan.warnings[0]
    );
    assert!(
        plan.warnings[1].contains("recipe.yaml:9") && plan.warnings[1].contains("column 7"),
        "{}",
        plan.warnings[1]
    );
    // ComfyUI reads the same prompt differently, and says so.
    let comfy = recipe("      prompt: \"a (cozy house\"\n      prompt_syntax: comfy\n");
    let plan = common::plan(&dir, &comfy).unwrap();
    assert!(
        plan.warnings[0].contains("ComfyUI") && plan.warnings[0].contains("column 3"),
        "{:?}",
        plan.warnings
    );
    // Plain reads no syntax: nothing to warn about.
    let plain = recipe("      prompt: \"a (cozy house\"\n      prompt_syntax: plain\n");
    assert!(common::plan(&dir, &plain).unwrap().warnings.is_empty());
}

#[test]
fn a_weight_that_is_no_number_is_an_error_with_line_and_column() {
    let dir = scratch("prompt-syntax-bad-weight");
    let text = recipe("      prompt: \"a (cozy:1.2.3) house\"\n");
    let message = plan(&dir, &text)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        message.contains("recipe.yaml:8")
            && message.contains("column 9")
            && message.contains("1.2.3"),
        "{message}"
    );
}

#[test]
fn validate_prints_chunks_weighted_spans_and_warnings() {
    let dir = scratch("prompt-syntax-validate");
    let long = cases()
        .cases
        .into_iter()
        .find(|c| c.name == "a1111_long")
        .expect("a1111_long");
    let text = recipe(&format!(
        "      prompt: {}\n      negative_prompt: 'lowres, (blurry'\n      guidance: 7.5\n",
        quoted(&format!("{} BREAK (house:0.5)", long.prompt))
    ));
    let path = dir.join("recipe.yaml");
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ipcompose"))
        .args(["validate", path.to_str().unwrap()])
        .output()
        .expect("run ipcompose");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let counts: Vec<String> = long.tokens[0].iter().map(|n| n.to_string()).collect();
    let expected = format!(
        "  prompt (a1111): 4 chunks of {} + 1 tokens; \"highly detailed\" ×1.2, \"seabirds\" ×0.9091",
        counts.join(" + ")
    );
    assert!(stdout.contains(&expected), "{expected}\n{stdout}");
    assert!(
        stdout.contains("\"volumetric lighting\" ×1.21, BREAK, \"house\" ×0.5\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  negative_prompt (a1111): 1 chunk of 6 tokens; \"blurry\" ×1.1\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "  the negative prompt continues with 3 chunks of the empty prompt's encoding, to 4\n"
        ),
        "{stdout}"
    );
    assert!(
        stderr.contains(
            "recipe.yaml:9: `nodes.gen.generate.negative_prompt`: column 9: `(` is never closed"
        ),
        "{stderr}"
    );
}
