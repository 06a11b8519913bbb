//! Textual-inversion embeddings end to end against diffusers' `load_textual_inversion`: an
//! A1111 `.pt` with two vectors and an A1111 `.safetensors` in the prompt, a diffusers
//! `learned_embeds.safetensors` in the negative prompt. Fixtures:
//! tests/fixtures/make_embedding_fixtures.py.

mod common;

use candle_core::DType;
use common::{fx, get, reference, run_generate_case};

/// The three embeddings, named so that they load in diffusers' order (ids match).
fn models() -> String {
    format!(
        "  a_cozy: {{kind: embedding, source: {}, token: \"<cozy>\"}}\n  b_dusk: {{kind: embedding, source: {}, token: \"<dusk>\"}}\n  c_blurry: {{kind: embedding, source: {}}}\n",
        fx("embedding/cozy.pt"),
        fx("embedding/dusk.safetensors"),
        fx("embedding/blurry")
    )
}

fn prompts(prompt: &str, negative: &str) -> String {
    format!("      prompt: \"{prompt}\"\n      negative_prompt: \"{negative}\"\n")
}

#[test]
fn multi_vector_and_single_vector_embeddings_in_the_prompt() {
    run_generate_case(
        "ti_multi_vector",
        &models(),
        "",
        &prompts("a <cozy> house at <dusk>", "lowres, blurry"),
    );
}

#[test]
fn an_embedding_in_the_negative_prompt() {
    run_generate_case(
        "ti_negative",
        &models(),
        "",
        &prompts("a cozy house at dusk", "lowres, <blurry>"),
    );
}

#[test]
fn token_ids_match_diffusers() {
    let mut model = ipcompose::pipeline::BaseModel::from_folder(
        &common::fixtures().join("tiny-sd15"),
        &candle_core::Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let files = [
        ("<cozy>", "embedding/cozy.pt"),
        ("<dusk>", "embedding/dusk.safetensors"),
        ("<blurry>", "embedding/blurry"),
    ];
    let loaded: Vec<_> = files
        .iter()
        .map(|(token, file)| {
            let e = ipcompose::models::embedding::TextualInversion::open(
                &common::fixtures().join(file),
            )
            .unwrap();
            (*token, e)
        })
        .collect();
    assert_eq!(loaded[0].1.len(), 2);
    assert_eq!(loaded[2].1.stored_token.as_deref(), Some("<blurry>"));
    let refs: Vec<_> = loaded.iter().map(|(t, e)| (*t, e)).collect();
    model.add_embeddings(&refs).unwrap();
    for (case, prompt, negative) in [
        (
            "ti_multi_vector",
            "a <cozy> house at <dusk>",
            "lowres, blurry",
        ),
        ("ti_negative", "a cozy house at dusk", "lowres, <blurry>"),
    ] {
        let r = reference(&format!("{case}.safetensors"));
        for (text, key) in [(prompt, "ids_cond"), (negative, "ids_uncond")] {
            let ids = model.tokenize(text).unwrap().to_vec2::<u32>().unwrap();
            let expected = get(&r, key)
                .to_device(&candle_core::Device::Cpu)
                .unwrap()
                .to_dtype(DType::U32)
                .unwrap()
                .to_vec2::<u32>()
                .unwrap();
            assert_eq!(ids, expected, "{case}: {text}");
        }
    }
}

#[test]
fn an_embedding_of_another_width_is_refused_where_the_prompt_uses_it() {
    let dir = common::scratch("ti-width");
    let wide = candle_core::Tensor::zeros((1, 768), DType::F32, &candle_core::Device::Cpu).unwrap();
    let file = dir.join("wide.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("emb_params", wide)]),
        &file,
    )
    .unwrap();
    let text = format!(
        "version: 1\nmodels:\n  base: {{kind: sd15, source: {}}}\n  wide: {{kind: embedding, source: {}}}\nnodes:\n  gen:\n    generate:\n      base: base\n      prompt: \"a wide house\"\noutputs:\n  - {{latents: gen, path: out.safetensors}}\n",
        fx("tiny-sd15"),
        file.display()
    );
    let message = common::plan(&dir, &text)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        message.contains("recipe.yaml:9")
            && message.contains("width 768")
            && message.contains("32 wide"),
        "{message}"
    );
}

/// An SDXL embedding (`clip_l` + `clip_g`) as diffusers loads it: the same word in both
/// tokenizers, each encoder its own vectors (make_sdxl_embedding_fixtures.py).
fn sdxl_glow() -> String {
    format!(
        "  glow: {{kind: embedding, source: {}, token: \"<glow>\"}}\n",
        fx("embedding/sdxl-glow.safetensors")
    )
}

#[test]
fn an_sdxl_embedding_in_the_prompt() {
    common::run_sdxl_case(
        "sdxl_ti_prompt",
        &sdxl_glow(),
        "",
        &prompts("a <glow> house at dusk", "lowres, blurry"),
    );
}

#[test]
fn an_sdxl_embedding_in_the_negative_prompt() {
    common::run_sdxl_case(
        "sdxl_ti_negative",
        &sdxl_glow(),
        "",
        &prompts("a cozy house at dusk", "lowres, <glow>"),
    );
}

#[test]
fn sdxl_token_ids_match_diffusers_in_both_tokenizers() {
    let mut model = ipcompose::pipeline::BaseModel::from_folder(
        &common::fixtures().join("tiny-sdxl"),
        &candle_core::Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let glow = ipcompose::models::embedding::TextualInversion::open(
        &common::fixtures().join("embedding/sdxl-glow.safetensors"),
    )
    .unwrap();
    assert_eq!(glow.describe_widths(), "clip_l 32 + clip_g 48");
    model.add_embeddings(&[("<glow>", &glow)]).unwrap();
    let r = reference("sdxl_ti_prompt.safetensors");
    let text = "a <glow> house at dusk";
    let second = model.text_encoder_2.as_ref().unwrap();
    for (ids, key) in [
        (model.tokenizer.encode(text).unwrap(), "ids_1"),
        (second.tokenizer.encode(text).unwrap(), "ids_2"),
    ] {
        let expected: Vec<u32> = get(&r, key)
            .to_dtype(DType::U32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(ids, expected, "{key}");
    }
}

#[test]
fn embeddings_for_the_other_family_are_refused_naming_both_widths() {
    let dir = common::scratch("ti-family");
    let plan_error = |kind: &str, base: &str, models: String| {
        let text = format!(
            "version: 1\nmodels:\n  base: {{kind: {kind}, source: {}}}\n{models}nodes:\n  gen:\n    generate:\n      base: base\n      prompt: \"a <e> house\"\noutputs:\n  - {{latents: gen, path: out.safetensors}}\n",
            fx(base),
        );
        common::plan(&dir, &text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let sd15_file = format!(
        "  e: {{kind: embedding, source: {}, token: \"<e>\"}}\n",
        fx("embedding/dusk.safetensors")
    );
    let message = plan_error("sdxl", "tiny-sdxl", sd15_file);
    assert!(
        message.contains("width 32") && message.contains("clip_l 32 + clip_g 48"),
        "{message}"
    );
    let sdxl_file = format!(
        "  e: {{kind: embedding, source: {}, token: \"<e>\"}}\n",
        fx("embedding/sdxl-glow.safetensors")
    );
    let message = plan_error("sd15", "tiny-sd15", sdxl_file);
    assert!(
        message.contains("clip_l 32 + clip_g 48") && message.contains("32 wide"),
        "{message}"
    );
}
