//! LoRA models and their use in a generation.

use std::path::Path;

use crate::error::Result;
use crate::plan::source::resolve_model_source;
use crate::recipe::ModelSpec;

use super::*;

/// A LoRA of a generation: its file (read once, at plan time) and multiplier.
#[derive(Debug, Clone)]
pub struct LoraUse {
    pub model: String,
    pub lora: std::sync::Arc<ipcompose_models::lora::LoraFile>,
    pub scale: f64,
}

/// A model of `kind: lora`, read and checked at plan time (format, which base it fits).
#[derive(Debug, Clone)]
pub struct LoraModelPlan {
    pub lora: std::sync::Arc<ipcompose_models::lora::LoraFile>,
}

/// A `kind: lora` model: the file is read (LoRA files are small) to know its format and the
/// base it fits; its keys are matched to the base's layers when the base loads.
pub(super) fn plan_lora_model(
    cx: &Context,
    name: &str,
    spec: &ModelSpec,
    base_dir: &Path,
) -> Result<LoraModelPlan> {
    let at = ["models", name, "source"];
    let file = resolve_model_source(&spec.source, spec.revision.as_deref(), base_dir)
        .map_err(|e| cx.error(&at, e))?;
    if !file.is_file() {
        return Err(cx.error(
            &at,
            format!("LoRA source `{}` is not a file", file.display()),
        ));
    }
    let lora = ipcompose_models::lora::LoraFile::open(&file).map_err(|e| cx.error(&at, e))?;
    Ok(LoraModelPlan {
        lora: std::sync::Arc::new(lora),
    })
}

pub(super) fn plan_lora_use(
    cx: &Context,
    node: &str,
    index: usize,
    spec: &crate::recipe::LoraSpec,
    known: &Known,
    base: &BaseModelPlan,
) -> Result<LoraUse> {
    let at = |k: &'static str| ["nodes", node, "generate", "loras", k];
    let names: Vec<String> = known.lora_models.keys().cloned().collect();
    let model = known.lora_models.get(&spec.model).ok_or_else(|| {
        cx.error(
            &at("model"),
            format!(
                "loras[{index}]: unknown LoRA model `{}`{}",
                spec.model,
                did_you_mean(&spec.model, &names)
            ),
        )
    })?;
    if !spec.scale.is_finite() {
        return Err(cx.error(
            &at("scale"),
            format!("loras[{index}]: scale must be a number"),
        ));
    }
    let summary = &model.lora.summary();
    let expected = base.unet.cross_attention_dim;
    // A file for a second text encoder needs a base that has one (SDXL).
    let second_encoder_missing = summary
        .components
        .contains(&ipcompose_models::lora::Component::TextEncoder2)
        && base.text_encoder_2.is_none();
    let width_differs = summary.cross_attention_width.is_some_and(|w| w != expected);
    if width_differs || second_encoder_missing {
        return Err(cx.error(
            &at("model"),
            format!(
                "loras[{index}]: `{}` is a {} for {} (cross-attention width {}), but the base `{}` has width {expected}",
                spec.model,
                summary.format.describe(),
                summary.base(),
                summary
                    .cross_attention_width
                    .map_or("unknown".to_string(), |w| w.to_string()),
                base.name
            ),
        ));
    }
    Ok(LoraUse {
        model: spec.model.clone(),
        lora: model.lora.clone(),
        scale: spec.scale,
    })
}
