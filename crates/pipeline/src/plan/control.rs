//! ControlNets and T2I-Adapters as a plan holds them: the models declared, each use in a
//! generation, and how a hint is fitted to the output size.

use std::path::PathBuf;

use ipcompose_models::controlnet::{union_type_index, union_type_names, ControlNetConfig};
use ipcompose_models::t2i_adapter::T2IAdapterConfig;

use crate::error::Result;
use crate::recipe::schedule::t2i_active_at;
use crate::recipe::schedule::{window, Strength};
use crate::recipe::ControlSpec;

use super::*;

/// How a hint image is brought to the output size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResizeMode {
    /// Stretch to the output size (diffusers' behaviour; Pillow Lanczos).
    #[default]
    Resize,
    /// Scale to cover the output, then centre-crop the overflow.
    Crop,
    /// Scale to fit inside the output, then pad with black (no condition) around it.
    Fill,
}

impl std::str::FromStr for ResizeMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "resize" | "stretch" => Ok(Self::Resize),
            "crop" => Ok(Self::Crop),
            "fill" | "pad" => Ok(Self::Fill),
            other => Err(format!(
                "unknown resize mode `{other}` (valid: resize, crop, fill)"
            )),
        }
    }
}

/// A ControlNet model declared in a recipe, checked against its base at plan time.
#[derive(Debug, Clone)]
pub struct ControlNetPlan {
    pub source: PathBuf,
    pub single_file: bool,
    pub variant: Option<String>,
    pub config: ControlNetConfig,
}

#[derive(Debug, Clone)]
pub struct T2IAdapterPlan {
    pub source: PathBuf,
    pub variant: Option<String>,
    pub config: T2IAdapterConfig,
}

/// A ControlNet or T2I-Adapter model declared in a recipe (`kind: controlnet | t2i-adapter`).
/// Its config is resolved against the base model that uses it.
#[derive(Debug, Clone)]
pub struct ControlModelSource {
    pub is_controlnet: bool,
    pub source: PathBuf,
    pub variant: Option<String>,
    /// Single-file ControlNets do not record it (true for shuffle models).
    pub global_pool: Option<bool>,
}

/// The kind-specific settings of one control in a generation.
#[derive(Debug, Clone)]
pub enum ControlKind {
    ControlNet {
        plan: Box<ControlNetPlan>,
        guess_mode: bool,
        /// Union models: the condition type index (`control_mode`).
        union_type: Option<usize>,
    },
    T2IAdapter {
        plan: T2IAdapterPlan,
        /// Fraction of the steps the features apply to (diffusers' `adapter_conditioning_factor`).
        factor: f64,
    },
}

/// One control as a generation uses it.
#[derive(Debug, Clone)]
pub struct ControlUse {
    pub model: String,
    pub image: PathBuf,
    /// Conditioning scale (ControlNet) or feature weight (T2I) per step; 0 where inactive
    /// (outside `start`..`end`, and for T2I-Adapters past `factor`).
    pub step_scales: Vec<f64>,
    pub start: f64,
    pub end: f64,
    pub resize: ResizeMode,
    pub kind: ControlKind,
}

/// `Some(true)` for ControlNets, `Some(false)` for T2I-Adapters.
pub(super) fn control_kind(kind: &str) -> Option<bool> {
    match kind.to_ascii_lowercase().as_str() {
        "controlnet" | "control-net" | "control_net" => Some(true),
        "t2i-adapter" | "t2i_adapter" | "t2iadapter" | "t2i" => Some(false),
        _ => None,
    }
}

pub(super) fn plan_control(
    cx: &Context,
    node: &str,
    index: usize,
    spec: &ControlSpec,
    known: &Known,
    base: &BaseModelPlan,
    steps: usize,
) -> Result<ControlUse> {
    let at = |k: &'static str| ["nodes", node, "generate", "controls", k];
    let names: Vec<String> = known.control_models.keys().cloned().collect();
    let source = known.control_models.get(&spec.model).ok_or_else(|| {
        cx.error(
            &at("model"),
            format!(
                "controls[{index}]: unknown ControlNet / T2I-Adapter model `{}`{}",
                spec.model,
                did_you_mean(&spec.model, &names)
            ),
        )
    })?;
    let image_names: Vec<String> = known.images.keys().cloned().collect();
    let image = known.images.get(&spec.image).cloned().ok_or_else(|| {
        cx.error(
            &at("image"),
            format!(
                "unknown image `{}`{}",
                spec.image,
                did_you_mean(&spec.image, &image_names)
            ),
        )
    })?;
    let model_error =
        |e: ipcompose_models::ModelError| cx.error(&at("model"), format!("`{}`: {e}", spec.model));
    let kind = if source.is_controlnet {
        if spec.factor.is_some() {
            return Err(cx.error(
                &at("factor"),
                "`factor` is for T2I-Adapters; ControlNets take start/end",
            ));
        }
        let single_file = source.source.is_file();
        let config = if single_file {
            ControlNetConfig::from_single_file(
                &source.source,
                &base.unet,
                source.global_pool.unwrap_or(false),
            )
            .map_err(model_error)?
        } else {
            let config = ControlNetConfig::from_folder(&source.source).map_err(model_error)?;
            ipcompose_models::controlnet::check_compatible(&config, &base.unet)
                .map_err(model_error)?;
            config
        };
        let guess_mode = spec.guess_mode.unwrap_or(false);
        let union_type = match (&config.union, &spec.union_type) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(cx.error(
                    &at("type"),
                    format!(
                        "controls[{index}]: `type` is for union ControlNets; `{}` is a plain ControlNet",
                        spec.model
                    ),
                ))
            }
            (Some(union), None) => {
                return Err(cx.error(
                    &at("model"),
                    format!(
                        "controls[{index}]: `{}` is a union ControlNet: name the image's condition `type:` ({})",
                        spec.model,
                        union_type_names(union.num_control_type)
                    ),
                ));
            }
            (Some(union), Some(name)) => {
                if guess_mode {
                    return Err(cx.error(
                        &at("guess_mode"),
                        format!(
                            "controls[{index}]: guess mode is not supported for union ControlNets (diffusers' union pipeline fails with it)"
                        ),
                    ));
                }
                Some(
                    union_type_index(name, union.num_control_type)
                        .map_err(|e| cx.error(&at("type"), format!("controls[{index}]: {e}")))?,
                )
            }
        };
        ControlKind::ControlNet {
            plan: Box::new(ControlNetPlan {
                source: source.source.clone(),
                single_file,
                variant: source.variant.clone(),
                config,
            }),
            guess_mode,
            union_type,
        }
    } else {
        if spec.guess_mode.is_some() {
            return Err(cx.error(&at("guess_mode"), "`guess_mode` is for ControlNets"));
        }
        if spec.union_type.is_some() {
            return Err(cx.error(&at("type"), "`type` is for union ControlNets"));
        }
        let config = T2IAdapterConfig::from_folder(&source.source).map_err(model_error)?;
        ipcompose_models::t2i_adapter::check_compatible(&config, &base.unet)
            .map_err(model_error)?;
        let factor = spec.factor.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&factor) {
            return Err(cx.error(
                &at("factor"),
                format!("factor {factor} must be between 0 and 1"),
            ));
        }
        ControlKind::T2IAdapter {
            plan: T2IAdapterPlan {
                source: source.source.clone(),
                variant: source.variant.clone(),
                config,
            },
            factor,
        }
    };
    let (start, end) = step_window(cx, &at("start"), spec.start, spec.end)?;
    let active: Vec<bool> = match &kind {
        ControlKind::T2IAdapter { factor, .. } => (0..steps)
            .map(|i| t2i_active_at(i, steps, start, end, *factor))
            .collect(),
        ControlKind::ControlNet { .. } => window(steps, start, end),
    };
    let step_scales = spec
        .scale
        .clone()
        .unwrap_or(Strength::Constant(1.0))
        .per_step(&active)
        .map_err(|e| cx.error(&at("scale"), format!("controls[{index}]: {e}")))?;
    let resize: ResizeMode = match &spec.resize {
        None => ResizeMode::Resize,
        Some(r) => r.parse().map_err(|e: String| cx.error(&at("resize"), e))?,
    };
    Ok(ControlUse {
        model: spec.model.clone(),
        image,
        step_scales,
        start,
        end,
        resize,
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_modes_parse() {
        assert_eq!("crop".parse::<ResizeMode>().unwrap(), ResizeMode::Crop);
        assert!("zoom"
            .parse::<ResizeMode>()
            .unwrap_err()
            .contains("resize, crop, fill"));
    }
}
