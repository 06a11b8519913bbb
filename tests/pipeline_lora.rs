//! LoRAs end to end (recipe → plan → run) against diffusers: kohya LoRA (UNet attention and
//! text encoder, alpha ≠ rank) at 0.7; a kohya LoCon file and a diffusers/peft file together;
//! LyCORIS LoHa and LoKr (reference: the weights merged with LyCORIS' formulas). Fixtures:
//! tests/fixtures/make_lora_fixtures.py.

mod common;

use common::{fx, run_generate_case};

fn lora_models(files: &[(&str, &str)]) -> String {
    files
        .iter()
        .map(|(name, file)| {
            format!(
                "  {name}: {{kind: lora, source: {}}}\n",
                fx(&format!("lora/{file}"))
            )
        })
        .collect()
}

fn loras(uses: &[(&str, f64)]) -> String {
    let mut text = "      loras:\n".to_string();
    for (model, scale) in uses {
        text.push_str(&format!("        - {{model: {model}, scale: {scale}}}\n"));
    }
    text
}

#[test]
fn kohya_lora_on_unet_and_text_encoder() {
    run_generate_case(
        "lora_kohya",
        &lora_models(&[("detail", "kohya_attn_te.safetensors")]),
        "",
        &loras(&[("detail", 0.7)]),
    );
}

#[test]
fn kohya_locon_and_peft_files_together() {
    run_generate_case(
        "lora_two_formats",
        &lora_models(&[
            ("locon", "kohya_locon.safetensors"),
            ("peft", "peft_unet_te.safetensors"),
        ]),
        "",
        &loras(&[("locon", 1.0), ("peft", 0.5)]),
    );
}

/// peft DoRA (`lora_magnitude_vector`) on UNet linears and 3×3 convolutions at 0.8, with a
/// plain LoRA on the text encoder, against diffusers' `load_lora_weights` + `set_adapters`
/// (make_dora_fixtures.py).
#[test]
fn peft_dora() {
    run_generate_case(
        "lora_dora",
        &lora_models(&[("dora", "peft_dora.safetensors")]),
        "",
        &loras(&[("dora", 0.8)]),
    );
}

#[test]
fn lycoris_loha() {
    run_generate_case(
        "lora_loha",
        &lora_models(&[("loha", "loha.safetensors")]),
        "",
        &loras(&[("loha", 0.8)]),
    );
}

#[test]
fn lycoris_lokr() {
    run_generate_case(
        "lora_lokr",
        &lora_models(&[("lokr", "lokr.safetensors")]),
        "",
        &loras(&[("lokr", 1.0)]),
    );
}

/// Writes `tensors` as a LoRA file and plans (and, if planning succeeds, runs) a one-step
/// recipe using it; returns the first error.
fn error_with_lora(name: &str, tensors: &[(&str, Vec<usize>)], scale: f64) -> String {
    use candle_core::{Device, Tensor};
    let dir = common::scratch(&format!("lora-error-{name}"));
    let map: std::collections::HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, shape)| {
            (
                k.to_string(),
                Tensor::ones(shape.as_slice(), candle_core::DType::F32, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let file = dir.join("bad.safetensors");
    candle_core::safetensors::save(&map, &file).unwrap();
    let text = format!(
        "version: 1\nmodels:\n  base: {{kind: sd15, source: {}}}\n  bad: {{kind: lora, source: {}}}\nnodes:\n  gen:\n    generate:\n      base: base\n      prompt: x\n      size: [64, 64]\n      steps: 1\n      loras:\n        - {{model: bad, scale: {scale}}}\noutputs:\n  - {{latents: gen, path: out.safetensors}}\n",
        fx("tiny-sd15"),
        file.display()
    );
    let plan = match common::plan(&dir, &text) {
        Ok(plan) => plan,
        Err(e) => return e.to_string(),
    };
    match ipcompose::pipeline::run_plan(&plan, &common::run_options(), &mut |_, _| {}) {
        Ok(_) => panic!("{name}: the run succeeded"),
        Err(e) => {
            assert!(
                !dir.join("out.safetensors").exists(),
                "{name}: partial output"
            );
            e.to_string()
        }
    }
}

#[test]
fn a_key_that_matches_no_layer_is_named() {
    let message = error_with_lora(
        "unmatched",
        &[
            (
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
                vec![2, 32, 1, 1],
            ),
            (
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
                vec![32, 2, 1, 1],
            ),
            (
                "lora_unet_down_blocks_7_attentions_0_to_q.lora_down.weight",
                vec![2, 32],
            ),
            (
                "lora_unet_down_blocks_7_attentions_0_to_q.lora_up.weight",
                vec![32, 2],
            ),
        ],
        1.0,
    );
    assert!(
        message.contains("match no layer") && message.contains("down_blocks_7_attentions_0_to_q"),
        "{message}"
    );
}

#[test]
fn a_lora_for_another_base_is_refused_at_plan_time() {
    let message = error_with_lora(
        "sdxl",
        &[
            (
                "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight",
                vec![4, 2048],
            ),
            (
                "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight",
                vec![640, 4],
            ),
        ],
        1.0,
    );
    assert!(
        message.contains("recipe.yaml:")
            && message.contains("SDXL")
            && message.contains("2048")
            && message.contains("has width 32"),
        "{message}"
    );
}

#[test]
fn an_unknown_format_lists_its_keys() {
    let message = error_with_lora("format", &[("something.weird", vec![2])], 1.0);
    assert!(
        message.contains("not a LoRA file") && message.contains("something.weird"),
        "{message}"
    );
}

#[test]
fn a_shape_mismatch_names_the_weight() {
    let message = error_with_lora(
        "shape",
        &[
            (
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
                vec![2, 7, 1, 1],
            ),
            (
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
                vec![32, 2, 1, 1],
            ),
        ],
        1.0,
    );
    assert!(
        message.contains("down_blocks.0.attentions.0.proj_in.weight")
            && message.contains("[32, 2, 1, 1] · [2, 7, 1, 1]")
            && message.contains("the base weight is"),
        "{message}"
    );
}

/// Plans `lora` (a file of tests/fixtures/lora) on the base `kind` / `base` and returns the error.
fn plan_error_with(kind: &str, base: &str, lora: &str) -> String {
    let dir = common::scratch(&format!("lora-family-{kind}-{}", std::process::id()));
    let text = format!(
        "version: 1\nmodels:\n  base: {{kind: {kind}, source: {}}}\n  detail: {{kind: lora, source: {}}}\nnodes:\n  gen:\n    generate:\n      base: base\n      prompt: x\n      loras: [{{model: detail}}]\noutputs:\n  - {{latents: gen, path: out.safetensors}}\n",
        fx(base),
        fx(&format!("lora/{lora}"))
    );
    common::plan(&dir, &text)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
}

#[test]
fn a_lora_of_the_other_family_is_refused_naming_both_widths() {
    let message = plan_error_with("sdxl", "tiny-sdxl", "kohya_attn_te.safetensors");
    assert!(
        message.contains("recipe.yaml:") && message.contains("32") && message.contains("80"),
        "{message}"
    );
    let message = plan_error_with("sd15", "tiny-sd15", "sdxl_kohya.safetensors");
    assert!(
        message.contains("recipe.yaml:") && message.contains("SDXL") && message.contains("32"),
        "{message}"
    );
}

/// kohya's SDXL names (UNet modules in the original SGM layout, `lora_te1_` / `lora_te2_`)
/// at 0.7, against diffusers' `load_lora_weights` (make_sdxl_lora_fixtures.py).
#[test]
fn sdxl_kohya_lora_on_unet_and_both_text_encoders() {
    common::run_sdxl_case(
        "sdxl_lora_kohya",
        &lora_models(&[("detail", "sdxl_kohya.safetensors")]),
        "",
        &loras(&[("detail", 0.7)]),
    );
}

/// The kohya file at 1.0 with a diffusers/peft SDXL file (`text_encoder_2.` keys) at 0.5.
#[test]
fn sdxl_kohya_and_peft_loras_together() {
    common::run_sdxl_case(
        "sdxl_lora_two",
        &lora_models(&[
            ("kohya", "sdxl_kohya.safetensors"),
            ("peft", "sdxl_peft.safetensors"),
        ]),
        "",
        &loras(&[("kohya", 1.0), ("peft", 0.5)]),
    );
}

/// The same kohya file on the SDXL single file (the tiny folder's weights in the SGM layout,
/// OpenCLIP's fused q/k/v split at load): the folder's reference holds.
#[test]
fn sdxl_kohya_lora_on_a_single_file_base() {
    let models = lora_models(&[("detail", "sdxl_kohya.safetensors")]);
    let text_base = format!(
        "  base: {{kind: sdxl, source: {}, config: {}}}\n",
        fx("single-file/tiny-sdxl.safetensors"),
        fx("tiny-sdxl")
    );
    common::run_sdxl_case_with_base(
        "sdxl_lora_kohya",
        &text_base,
        &models,
        "",
        &loras(&[("detail", 0.7)]),
    );
}

/// A LoRA on a single-file base (the tiny SD1.5 checkpoint in the original layout) patches the
/// same weights as on its folder: diffusers' reference for the folder holds.
#[test]
fn kohya_lora_on_a_single_file_base() {
    use candle_core::Device;
    use common::{get, max_abs_diff, reference, scratch};
    let r = reference("lora_kohya.safetensors");
    let dir = scratch(&format!("lora-single-file-{}", std::process::id()));
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents", get(&r, "init_latents").clone())]),
        dir.join("init.safetensors"),
    )
    .unwrap();
    let text = format!(
        "version: 1\nmodels:\n  base: {{kind: sd15, source: {}, config: {}}}\n{}nodes:\n  gen:\n    generate:\n      base: base\n      prompt: \"a cozy house at dusk\"\n      negative_prompt: \"lowres, blurry\"\n      size: [128, 128]\n      steps: 4\n      scheduler: {{kind: ddim}}\n      guidance: 7.5\n      latents: init.safetensors\n{}outputs:\n  - {{latents: gen, path: out.safetensors}}\n",
        fx("single-file/tiny-sd15.safetensors"),
        fx("tiny-sd15"),
        lora_models(&[("detail", "kohya_attn_te.safetensors")]),
        loras(&[("detail", 0.7)]),
    );
    let plan = common::plan(&dir, &text).unwrap_or_else(|e| panic!("{e}"));
    let written = ipcompose::pipeline::run_plan(&plan, &common::run_options(), &mut |_, _| {})
        .unwrap_or_else(|e| panic!("{e}"));
    let latents =
        candle_core::safetensors::load(&written[0], &Device::Cpu).unwrap()["latents"].clone();
    let diff = max_abs_diff(&latents, get(&r, "final_latents"));
    eprintln!("lora_kohya on the single file: final latents max abs diff {diff:.2e}");
    let tolerance = common::bound(common::PIPELINE_TOLERANCE, get(&r, "final_latents"));
    assert!(diff < tolerance, "final latents differ by {diff}");
}
