//! Single-file Stable Diffusion checkpoints as the community shares them (CompVis / A1111
//! layout, `.safetensors` or `.ckpt`): the UNet, VAE and CLIP text encoder of one file read
//! under diffusers' names through rename tables, the kind detected from the keys.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};
use crate::single_file::{unet_key_from_original, RenamedWeights, UNET_PREFIX};
use crate::weights::WeightStore;

pub const VAE_PREFIX: &str = "first_stage_model.";
pub const TEXT_ENCODER_PREFIX: &str = "cond_stage_model.transformer.";

/// What a single-file checkpoint holds, judged from its tensor names and shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointKind {
    /// SD 1.x: CLIP-L text encoder, 768-wide context.
    Sd15,
    Sd2,
    Sdxl,
    Unknown(String),
}

/// Opens a `.safetensors` file, or a `.ckpt` / `.pth` pickle with or without `state_dict`.
pub fn open_checkpoint(path: &Path) -> Result<WeightStore> {
    let pickle = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("ckpt" | "pt" | "pth" | "bin")
    );
    if pickle {
        WeightStore::open_pickle_state_dict(path)
    } else {
        WeightStore::open(&[path.to_path_buf()])
    }
}

pub fn detect_kind(store: &WeightStore) -> CheckpointKind {
    let names = store.tensor_names();
    let has_prefix = |p: &str| names.iter().any(|n| n.starts_with(p));
    if has_prefix("conditioner.embedders.") {
        return CheckpointKind::Sdxl;
    }
    if has_prefix("cond_stage_model.model.") {
        return CheckpointKind::Sd2;
    }
    // The CLIP-L layout (`cond_stage_model.transformer.`) marks SD 1.x; sizes come from the
    // configs paired with the file and are checked when the weights load.
    if has_prefix(TEXT_ENCODER_PREFIX) && has_prefix(UNET_PREFIX) {
        return CheckpointKind::Sd15;
    }
    let sample: Vec<_> = names.iter().take(3).cloned().collect();
    CheckpointKind::Unknown(format!(
        "no `{UNET_PREFIX}` / `{TEXT_ENCODER_PREFIX}` tensors (e.g. {sample:?})"
    ))
}

/// Original VAE name (prefix stripped) → diffusers name; `levels` = VAE block count.
pub fn vae_key_from_original(key: &str, levels: usize) -> Option<String> {
    let (part, rest) = key.split_once('.')?;
    match part {
        "quant_conv" | "post_quant_conv" => return Some(key.to_string()),
        "encoder" | "decoder" => {}
        _ => return None,
    }
    let resnet = |r: &str| r.replace("nin_shortcut", "conv_shortcut");
    let mapped = if let Some(r) = rest.strip_prefix("norm_out") {
        format!("conv_norm_out{r}")
    } else if rest.starts_with("conv_in") || rest.starts_with("conv_out") {
        rest.to_string()
    } else if let Some(r) = rest.strip_prefix("mid.block_1") {
        format!("mid_block.resnets.0{}", resnet(r))
    } else if let Some(r) = rest.strip_prefix("mid.block_2") {
        format!("mid_block.resnets.1{}", resnet(r))
    } else if let Some(r) = rest.strip_prefix("mid.attn_1.") {
        let (module, tail) = r.split_once('.')?;
        let module = match module {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        format!("mid_block.attentions.0.{module}.{tail}")
    } else {
        let (level_kind, tail) = if part == "encoder" {
            ("down", rest.strip_prefix("down.")?)
        } else {
            ("up", rest.strip_prefix("up.")?)
        };
        let (index, tail) = tail.split_once('.')?;
        let index: usize = index.parse().ok()?;
        // The decoder's `up.{k}` runs from the lowest resolution: diffusers reverses it.
        let block = if part == "decoder" {
            levels.checked_sub(1 + index)?
        } else {
            index
        };
        if let Some(t) = tail.strip_prefix("block.") {
            let (j, t) = t.split_once('.')?;
            format!("{level_kind}_blocks.{block}.resnets.{j}.{}", resnet(t))
        } else if let Some(t) = tail.strip_prefix("downsample.conv") {
            format!("down_blocks.{block}.downsamplers.0.conv{t}")
        } else if let Some(t) = tail.strip_prefix("upsample.conv") {
            format!("up_blocks.{block}.upsamplers.0.conv{t}")
        } else {
            return None;
        }
    };
    Some(format!("{part}.{mapped}"))
}

/// Every tensor under `prefix` whose stripped name `map` accepts, keyed by the new name.
fn renamed(
    store: &WeightStore,
    prefix: &str,
    map: impl Fn(&str) -> Option<String>,
) -> HashMap<String, String> {
    store
        .tensor_names()
        .into_iter()
        .filter_map(|original| {
            let stripped = original.strip_prefix(prefix)?;
            map(stripped).map(|new| (new, original.clone()))
        })
        .collect()
}

/// One component of a single-file checkpoint, served under diffusers' names.
pub fn unet_weights(path: &Path, layers_per_block: &[usize]) -> Result<RenamedWeights> {
    let store = open_checkpoint(path)?;
    let map = renamed(&store, UNET_PREFIX, |k| {
        unet_key_from_original(k, layers_per_block)
    });
    non_empty(path, "UNet", UNET_PREFIX, RenamedWeights::new(store, map))
}

pub fn vae_weights(path: &Path, levels: usize) -> Result<RenamedWeights> {
    let store = open_checkpoint(path)?;
    let map = renamed(&store, VAE_PREFIX, |k| vae_key_from_original(k, levels));
    non_empty(path, "VAE", VAE_PREFIX, RenamedWeights::new(store, map))
}

pub fn text_encoder_weights(path: &Path) -> Result<RenamedWeights> {
    let store = open_checkpoint(path)?;
    // `position_ids` is a buffer (sometimes stored as floats with wrong values): positions are
    // always 0..n.
    let map = renamed(&store, TEXT_ENCODER_PREFIX, |k| {
        (!k.ends_with("position_ids")).then(|| k.to_string())
    });
    non_empty(
        path,
        "text encoder",
        TEXT_ENCODER_PREFIX,
        RenamedWeights::new(store, map),
    )
}

fn non_empty(
    path: &Path,
    what: &str,
    prefix: &str,
    weights: RenamedWeights,
) -> Result<RenamedWeights> {
    if weights.names().next().is_none() {
        return Err(ModelError::Weights(format!(
            "{}: no {what} tensors (`{prefix}*`) in this checkpoint",
            path.display()
        )));
    }
    Ok(weights)
}

/// A checked single-file base checkpoint.
#[derive(Debug, Clone)]
pub struct SingleFileCheckpoint {
    pub file: PathBuf,
    pub kind: CheckpointKind,
}

impl SingleFileCheckpoint {
    /// Reads the header and refuses kinds this build cannot run.
    pub fn open(path: &Path) -> Result<Self> {
        let store = open_checkpoint(path)?;
        let kind = detect_kind(&store);
        match &kind {
            CheckpointKind::Sd15 => Ok(Self {
                file: path.to_path_buf(),
                kind,
            }),
            CheckpointKind::Sd2 => Err(ModelError::Weights(format!(
                "{}: an SD 2.x single-file checkpoint (OpenCLIP text encoder); not supported yet: use its diffusers folder",
                path.display()
            ))),
            CheckpointKind::Sdxl => Err(ModelError::Weights(format!(
                "{}: an SDXL checkpoint; SDXL is not supported yet",
                path.display()
            ))),
            CheckpointKind::Unknown(why) => Err(ModelError::Weights(format!(
                "{}: not a Stable Diffusion checkpoint: {why}",
                path.display()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vae_names() {
        let v = |k: &str| vae_key_from_original(k, 4);
        assert_eq!(
            v("decoder.up.0.block.1.conv1.weight").as_deref(),
            Some("decoder.up_blocks.3.resnets.1.conv1.weight")
        );
        assert_eq!(
            v("decoder.up.3.upsample.conv.bias").as_deref(),
            Some("decoder.up_blocks.0.upsamplers.0.conv.bias")
        );
        assert_eq!(
            v("encoder.down.1.block.0.nin_shortcut.weight").as_deref(),
            Some("encoder.down_blocks.1.resnets.0.conv_shortcut.weight")
        );
        assert_eq!(
            v("encoder.mid.attn_1.proj_out.weight").as_deref(),
            Some("encoder.mid_block.attentions.0.to_out.0.weight")
        );
        assert_eq!(
            v("decoder.norm_out.bias").as_deref(),
            Some("decoder.conv_norm_out.bias")
        );
        assert_eq!(
            v("post_quant_conv.weight").as_deref(),
            Some("post_quant_conv.weight")
        );
        assert_eq!(v("model_ema.decay"), None);
    }
}
