//! IP-Adapters as a plan holds them: the models declared and each use in a generation.

use std::path::{Path, PathBuf};

use ipcompose_models::clip_vision::ClipVisionConfig;
use ipcompose_models::ip_adapter::IpAdapterInfo;

use crate::error::Result;
use crate::plan::source::resolve_model_source;
use crate::recipe::ip_scale::resolve_scales;
use crate::recipe::schedule::window;
use crate::recipe::{IpAdapterSpec, ModelSpec};

use super::*;

/// An IP-Adapter model declared in a recipe, checked at plan time.
#[derive(Debug, Clone)]
pub struct IpModelPlan {
    pub file: PathBuf,
    pub info: IpAdapterInfo,
    /// The image encoder folder and its config (absent when only embeddings are used).
    pub image_encoder: Option<(PathBuf, ClipVisionConfig)>,
}

/// How several reference images of one adapter are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Combine {
    /// Each image's tokens side by side (diffusers' behaviour): one joint attention.
    #[default]
    Concat,
    /// The images' encoder features averaged before the projection.
    Average,
}

/// Where an adapter's image tokens come from.
#[derive(Debug, Clone)]
pub enum IpSource {
    Images {
        images: Vec<PathBuf>,
        negative_image: Option<PathBuf>,
        combine: Combine,
        fit: Fit,
    },
    /// A file written by `ipcompose embed`: `tokens` and `negative_tokens`, `[images, T, D]`.
    Embeddings(PathBuf),
}

/// One adapter as a generation uses it.
#[derive(Debug, Clone)]
pub struct IpAdapterUse {
    pub model: String,
    pub source: IpSource,
    /// One scale per cross-attention layer (1.0 each unless per-layer values were given) ...
    pub layer_scales: Vec<f64>,
    /// ... times one weight per step (0 outside the `start`..`end` window).
    pub step_scales: Vec<f64>,
    pub start: f64,
    pub end: f64,
    /// None, one mask for all images, or one per image.
    pub masks: Vec<PathBuf>,
}

pub(super) fn is_ip_adapter_kind(kind: &str) -> bool {
    matches!(
        kind.to_ascii_lowercase().as_str(),
        "ip-adapter" | "ip_adapter" | "ipadapter"
    )
}

pub(super) fn plan_ip_model(
    cx: &Context,
    name: &str,
    spec: &ModelSpec,
    base_dir: &Path,
) -> Result<IpModelPlan> {
    let file = resolve_model_source(&spec.source, spec.revision.as_deref(), base_dir)
        .map_err(|e| cx.error(&["models", name, "source"], e))?;
    if !file.is_file() {
        return Err(cx.error(
            &["models", name, "source"],
            format!("IP-Adapter source `{}` is not a file", file.display()),
        ));
    }
    let info = ipcompose_models::ip_adapter::inspect(&file)
        .map_err(|e| cx.error(&["models", name, "source"], e))?;
    let image_encoder = match &spec.image_encoder {
        None => None,
        Some(dir) => {
            let dir = resolve_model_source(dir, spec.revision.as_deref(), base_dir)
                .map_err(|e| cx.error(&["models", name, "image_encoder"], e))?;
            let config = ipcompose_models::clip_vision::ClipVisionConfig::from_file(
                &dir.join("config.json"),
            )
            .map_err(|e| cx.error(&["models", name, "image_encoder"], e))?;
            let expected = if info.projection.uses_penultimate() {
                config.hidden_size
            } else {
                config.projection_dim
            };
            if expected != info.image_feature_width {
                return Err(cx.error(
                    &["models", name, "image_encoder"],
                    format!(
                        "the {} adapter expects image features of width {}, but this encoder gives {expected} (wrong image encoder: e.g. ViT-H vs ViT-bigG)",
                        info.projection.name(),
                        info.image_feature_width
                    ),
                ));
            }
            Some((dir, config))
        }
    };
    Ok(IpModelPlan {
        file,
        info,
        image_encoder,
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn plan_ip_use(
    cx: &Context,
    node: &str,
    index: usize,
    spec: &IpAdapterSpec,
    known: &Known,
    base: &BaseModelPlan,
    base_dir: &Path,
    steps: usize,
) -> Result<IpAdapterUse> {
    let i = index.to_string();
    let at = |k: &'static str| ["nodes", node, "generate", "ip_adapters", k];
    let ip_names: Vec<String> = known.ip_models.keys().cloned().collect();
    let model = known.ip_models.get(&spec.model).ok_or_else(|| {
        cx.error(
            &at("model"),
            format!(
                "ip_adapters[{i}]: unknown IP-Adapter model `{}`{}",
                spec.model,
                did_you_mean(&spec.model, &ip_names)
            ),
        )
    })?;
    let layout = base.unet.cross_attention_layout();
    let info = &model.info;
    if info.cross_attention_dim != base.unet.cross_attention_dim
        || info.layer_channels.len() != layout.len()
    {
        return Err(cx.error(
            &at("model"),
            format!(
                "IP-Adapter `{}` was made for a base with cross_attention_dim {} and {} cross-attention layers; the base model `{}` has {} and {}",
                spec.model,
                info.cross_attention_dim,
                info.layer_channels.len(),
                base.name,
                base.unet.cross_attention_dim,
                layout.len()
            ),
        ));
    }
    if let Some((l, layer)) = layout
        .iter()
        .enumerate()
        .find(|(l, layer)| info.layer_channels[*l] != layer.channels)
    {
        return Err(cx.error(
            &at("model"),
            format!(
                "IP-Adapter `{}` layer {} has width {}, but the base's {} has {}",
                spec.model,
                2 * l + 1,
                info.layer_channels[l],
                layer.name(),
                layer.channels
            ),
        ));
    }
    let image_names: Vec<String> = known.images.keys().cloned().collect();
    let image = |key: &'static str, name: &String| -> Result<PathBuf> {
        known.images.get(name).cloned().ok_or_else(|| {
            cx.error(
                &at(key),
                format!("unknown image `{name}`{}", did_you_mean(name, &image_names)),
            )
        })
    };
    let mut images: Vec<PathBuf> = Vec::new();
    for name in spec.image.iter().flat_map(|i| i.names()) {
        images.push(image("image", &name)?);
    }
    for name in &spec.images {
        images.push(image("images", name)?);
    }
    let source = match (&spec.embeds, images.is_empty()) {
        (Some(_), false) => {
            return Err(cx.error(
                &at("embeds"),
                "give either `embeds` or `image`/`images`, not both",
            ));
        }
        (None, true) => {
            return Err(cx.error(
                &at("model"),
                format!("ip_adapters[{i}] needs `image`, `images` or `embeds`"),
            ));
        }
        (Some(file), true) => {
            let path = base_dir.join(file);
            if !path.is_file() {
                return Err(cx.error(
                    &at("embeds"),
                    format!("embeddings file `{}` not found", path.display()),
                ));
            }
            IpSource::Embeddings(path)
        }
        (None, false) => {
            if model.image_encoder.is_none() {
                return Err(cx.error(
                    &at("model"),
                    format!(
                        "IP-Adapter model `{}` has no `image_encoder`, which reference images need",
                        spec.model
                    ),
                ));
            }
            let combine = match spec.combine.as_deref() {
                None | Some("concat") => Combine::Concat,
                Some("average") => Combine::Average,
                Some(other) => {
                    return Err(cx.error(
                        &at("combine"),
                        format!("unknown combine `{other}` (valid: concat, average)"),
                    ));
                }
            };
            let fit: Fit = match &spec.fit {
                None => Fit::Crop,
                Some(f) => f.parse().map_err(|e: String| cx.error(&at("fit"), e))?,
            };
            let negative_image = match &spec.negative_image {
                Some(name) => Some(image("negative_image", name)?),
                None => None,
            };
            IpSource::Images {
                images,
                negative_image,
                combine,
                fit,
            }
        }
    };
    let scale_spec = spec
        .scale
        .clone()
        .unwrap_or(crate::recipe::ip_scale::ScaleSpec::Uniform(1.0));
    let layer_scales =
        resolve_scales(&scale_spec, &layout).map_err(|e| cx.error(&at("scale"), e))?;
    let (start, end) = step_window(cx, &at("start"), spec.start, spec.end)?;
    let step_scales = scale_spec
        .strength()
        .per_step(&window(steps, start, end))
        .map_err(|e| cx.error(&at("scale"), format!("ip_adapters[{i}]: {e}")))?;
    let mut masks = Vec::new();
    if let Some(name) = &spec.mask {
        masks.push(image("mask", name)?);
    }
    for name in &spec.masks {
        masks.push(image("masks", name)?);
    }
    Ok(IpAdapterUse {
        model: spec.model.clone(),
        source,
        layer_scales,
        step_scales,
        start,
        end,
        masks,
    })
}

/// How a non-square reference image becomes the encoder's square input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fit {
    /// Shortest side to the input size, then a centre crop (diffusers' behaviour).
    #[default]
    Crop,
    /// Letterbox onto a black square, then resize: nothing is cut off.
    Pad,
    /// Resize straight to the square, changing the aspect ratio.
    Squash,
}

impl std::str::FromStr for Fit {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "crop" => Ok(Fit::Crop),
            "pad" => Ok(Fit::Pad),
            "squash" => Ok(Fit::Squash),
            other => Err(format!("unknown fit `{other}` (valid: crop, pad, squash)")),
        }
    }
}
