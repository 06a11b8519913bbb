//! Base models: a diffusers folder or a single file, checked against its family, its VAE.

use std::path::{Path, PathBuf};

use ipcompose_models::clip_text::ClipTextConfig;
use ipcompose_models::folder::DiffusersFolder;
use ipcompose_models::unet::UNetConfig;
use ipcompose_models::vae::VaeConfig;
use ipcompose_schedulers::SchedulerConfig;

use crate::error::Result;
use crate::plan::family::BaseKind;
use crate::plan::family::{AddedConditioning, Family, TextEncoding};
use crate::plan::source::resolve_model_source;
use crate::recipe::ModelSpec;

use super::*;

#[derive(Debug, Clone)]
pub struct BaseModelPlan {
    pub name: String,
    /// The family (`family.rs`): how text is encoded, which added conditioning the UNet takes.
    pub kind: BaseKind,
    /// The diffusers folder (for a single-file checkpoint: where configs, tokenizer and
    /// scheduler come from).
    pub folder: DiffusersFolder,
    /// A single-file checkpoint holding the weights, when the source is one.
    pub single_file: Option<PathBuf>,
    pub unet: UNetConfig,
    /// The VAE's config: the base's, or the `vae:` folder's when one replaces it.
    pub vae: VaeConfig,
    /// The recipe's `vae:`, replacing the base's own VAE.
    pub vae_source: Option<VaeSource>,
    pub text_encoder: ClipTextConfig,
    /// SDXL's second text encoder (with `projection_dim`); `None` for one-encoder families.
    pub text_encoder_2: Option<ClipTextConfig>,
    /// `model_index.json`'s `force_zeros_for_empty_prompt` (two-encoder families; diffusers'
    /// default true when the file does not say).
    pub force_zeros_for_empty_prompt: bool,
    pub scheduler_config: SchedulerConfig,
}

/// Where a base's VAE comes from when the recipe's `vae:` replaces it.
#[derive(Debug, Clone, PartialEq)]
pub enum VaeSource {
    /// A diffusers `AutoencoderKL` folder: its `config.json` and weights.
    Folder(PathBuf),
    /// A single VAE file (original or diffusers names), read with the base's VAE config, as
    /// diffusers' `AutoencoderKL.from_single_file(file, config=base, subfolder="vae")`.
    File(PathBuf),
}

/// A base model of `kind` (`models.NAME`): its folder, or a single-file checkpoint with the
/// folder its configs come from, every config read and checked against the family, and the
/// `vae:` that replaces its VAE.
pub(super) fn plan_base_model(
    cx: &Context,
    name: &str,
    spec: &ModelSpec,
    kind: BaseKind,
    base_dir: &Path,
) -> Result<BaseModelPlan> {
    let family = kind.family();
    let root = resolve_model_source(&spec.source, spec.revision.as_deref(), base_dir)
        .map_err(|e| cx.error(&["models", name, "source"], e))?;
    // A single file carries weights only; like diffusers' `from_single_file`, the configs,
    // tokenizers and scheduler come from a diffusers folder of the same base (`config:`, by
    // default the family's reference repo in the local hub cache).
    let single_file = if root.is_file() {
        Some(plan_single_file(cx, name, family, &root)?)
    } else {
        if spec.config.is_some() {
            return Err(cx.error(
                &["models", name, "config"],
                "`config` is for single-file checkpoints; this source is a folder",
            ));
        }
        None
    };
    let config_root = match (&single_file, &spec.config, family.single_file) {
        (None, _, _) => root.clone(),
        (Some(_), Some(config), _) => resolve_model_source(config, None, base_dir)
            .map_err(|e| cx.error(&["models", name, "config"], e))?,
        // `plan_single_file` refuses families without single files.
        (Some(_), None, repo) => {
            let repo = repo.unwrap_or_default();
            resolve_model_source(repo, None, base_dir).map_err(|e| {
                cx.error(
                    &["models", name, "source"],
                    format!("a single-file checkpoint needs the configs and tokenizers of its base: give `config: FOLDER`, or have {repo} in the hub cache ({e})"),
                )
            })?
        }
    };
    let mut folder = DiffusersFolder::open(&config_root)
        .map_err(|e| cx.error(&["models", name, "source"], e))?;
    folder.variant = spec.variant.clone();
    let at = |e: ipcompose_models::ModelError| cx.error(&["models", name], e);
    let unet = folder.unet_config().map_err(at)?;
    let vae = folder.vae_config().map_err(at)?;
    let text_encoder = folder.text_encoder_config().map_err(at)?;
    let scheduler_config = SchedulerConfig::from_file(&folder.scheduler_config_path())
        .map_err(|e| cx.error(&["models", name], e))?;
    let (text_encoder_2, force_zeros_for_empty_prompt) =
        plan_base_family(cx, name, family, &folder, &unet, &text_encoder)?;
    if vae.latent_channels != unet.in_channels {
        return Err(cx.error(
            &["models", name],
            format!(
                "VAE latent channels {} do not match the UNet's in_channels {}",
                vae.latent_channels, unet.in_channels
            ),
        ));
    }
    let (vae, vae_source) = match &spec.vae {
        None => (vae, None),
        Some(source) => {
            let (config, vae_source) = plan_vae(cx, name, spec, source, &vae, base_dir)?;
            (config, Some(vae_source))
        }
    };
    Ok(BaseModelPlan {
        name: name.to_string(),
        kind,
        folder,
        single_file,
        unet,
        vae,
        vae_source,
        text_encoder,
        text_encoder_2,
        force_zeros_for_empty_prompt,
        scheduler_config,
    })
}

/// A single-file checkpoint as the source of a base of `family`: it must hold that family
/// (an SDXL file under `kind: sd15` names `kind: sdxl`, and the reverse); files of families
/// ipcompose does not run (SD3, Flux, …) are named as such.
pub(super) fn plan_single_file(
    cx: &Context,
    name: &str,
    family: &Family,
    file: &Path,
) -> Result<PathBuf> {
    let checkpoint = ipcompose_models::single_file_base::SingleFileCheckpoint::open(file)
        .map_err(|e| cx.error(&["models", name, "source"], e))?;
    match checkpoint.kind.recipe_kind() {
        Some(kind) if kind == family.name => {}
        Some(kind) => {
            return Err(cx.error(
                &["models", name, "kind"],
                format!(
                    "`{}` is {}; use `kind: {kind}` (the recipe says `kind: {}`)",
                    file.display(),
                    checkpoint.kind.describe(),
                    family.name
                ),
            ));
        }
        None => {
            return Err(cx.error(
                &["models", name, "source"],
                format!("`{}` is {}", file.display(), checkpoint.kind.describe()),
            ));
        }
    }
    if family.single_file.is_none() {
        return Err(cx.error(
            &["models", name, "kind"],
            format!(
                "single-file checkpoints are not supported for {} bases; use a diffusers folder",
                family.name
            ),
        ));
    }
    Ok(checkpoint.file)
}

/// The recipe's `vae:` of a base: a diffusers `AutoencoderKL` folder (or a pipeline folder's
/// `vae/`) or a single VAE file; its latent channels must be the base VAE's (`base_vae`).
/// Returns the VAE config to run with (the folder's; a file uses the base's) and the source.
pub(super) fn plan_vae(
    cx: &Context,
    name: &str,
    spec: &ModelSpec,
    source: &str,
    base_vae: &VaeConfig,
    base_dir: &Path,
) -> Result<(VaeConfig, VaeSource)> {
    let at = ["models", name, "vae"];
    let path = resolve_model_source(source, None, base_dir).map_err(|e| cx.error(&at, e))?;
    let (config, latent_channels, vae_source) = if path.is_file() {
        let latent = ipcompose_models::single_file_base::vae_file_latent_channels(&path)
            .map_err(|e| cx.error(&at, e))?;
        (base_vae.clone(), latent, VaeSource::File(path.clone()))
    } else {
        // A pipeline folder stands for its `vae/`.
        let dir = if !path.join("config.json").is_file() && path.join("vae/config.json").is_file() {
            path.join("vae")
        } else {
            path.clone()
        };
        let config = VaeConfig::from_file(&dir.join("config.json")).map_err(|e| {
            cx.error(
                &at,
                format!("not a diffusers AutoencoderKL folder or a VAE file: {e}"),
            )
        })?;
        ipcompose_models::weights::find_component_weights(
            &dir,
            "diffusion_pytorch_model",
            spec.variant.as_deref(),
        )
        .map_err(|e| cx.error(&at, e))?;
        let latent = config.latent_channels;
        (config, latent, VaeSource::Folder(dir))
    };
    if latent_channels != base_vae.latent_channels {
        return Err(cx.error(
            &at,
            format!(
                "the VAE `{}` has {latent_channels} latent channels, the base model `{name}` {}",
                path.display(),
                base_vae.latent_channels
            ),
        ));
    }
    Ok((config, vae_source))
}

/// Checks a base folder against its family (text encoders, added embedding, widths); returns
/// the second text encoder's config and `force_zeros_for_empty_prompt`.
pub(super) fn plan_base_family(
    cx: &Context,
    name: &str,
    family: &Family,
    folder: &DiffusersFolder,
    unet: &UNetConfig,
    text_encoder: &ClipTextConfig,
) -> Result<(Option<ClipTextConfig>, bool)> {
    let at = |e: ipcompose_models::ModelError| cx.error(&["models", name], e);
    let holds_sdxl = unet.addition.is_some() || folder.has_component("text_encoder_2");
    match (family.added, unet.addition) {
        (AddedConditioning::None, _) if holds_sdxl => {
            return Err(cx.error(
                &["models", name, "kind"],
                format!(
                    "`{}` holds an SDXL model (a second text encoder and an added text/time embedding); use `kind: sdxl`",
                    folder.root().display()
                ),
            ));
        }
        (AddedConditioning::TextTime, None) => {
            return Err(cx.error(
                &["models", name, "kind"],
                format!(
                    "`{}` is not an SDXL model: its UNet has no added text/time embedding (`addition_embed_type: text_time`); use `kind: sd15` or `sd2` for it",
                    folder.root().display()
                ),
            ));
        }
        _ => {}
    }
    match family.text {
        TextEncoding::Single => {
            if text_encoder.hidden_size != unet.cross_attention_dim {
                return Err(cx.error(
                    &["models", name],
                    format!(
                        "text encoder width {} does not match the UNet's cross_attention_dim {}",
                        text_encoder.hidden_size, unet.cross_attention_dim
                    ),
                ));
            }
            Ok((None, false))
        }
        TextEncoding::Dual => {
            let missing: Vec<&str> = ["text_encoder_2", "tokenizer_2"]
                .into_iter()
                .filter(|c| !folder.has_component(c))
                .collect();
            if !missing.is_empty() {
                return Err(cx.error(
                    &["models", name, "source"],
                    format!(
                        "an sdxl base needs both text encoders; `{}` has no sub-folder {}",
                        folder.root().display(),
                        missing.join(", ")
                    ),
                ));
            }
            let second = folder.text_encoder_2_config().map_err(at)?;
            let context = text_encoder.hidden_size + second.hidden_size;
            if context != unet.cross_attention_dim {
                return Err(cx.error(
                    &["models", name],
                    format!(
                        "the text encoders' widths {} + {} = {context} do not match the UNet's cross_attention_dim {}",
                        text_encoder.hidden_size, second.hidden_size, unet.cross_attention_dim
                    ),
                ));
            }
            if let (Some(addition), Some(projection)) = (unet.addition, second.projection_dim) {
                if addition.text_embeds_dim() != projection {
                    return Err(cx.error(
                        &["models", name],
                        format!(
                            "the UNet's added embedding takes pooled text embeddings of width {} (projection_class_embeddings_input_dim {} minus 6 time ids × {}), but text_encoder_2 projects to {projection}",
                            addition.text_embeds_dim(),
                            addition.input_dim,
                            addition.time_embed_dim
                        ),
                    ));
                }
            }
            let index = folder.model_index().map_err(at)?;
            Ok((
                Some(second),
                index.force_zeros_for_empty_prompt.unwrap_or(true),
            ))
        }
    }
}
