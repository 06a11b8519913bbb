//! IP-Adapters in a generation: reference images → CLIP features → image tokens → every
//! layer's key/value projections, all computed once per run; per step only the scales
//! (window, per-layer InstantStyle values) decide which of them the UNet sees.

use crate::plan::ip::{Combine, IpAdapterUse};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ipcompose_models::clip_vision::ClipVisionModel;
use ipcompose_models::ip_adapter::IpAdapter;
use ipcompose_models::unet::{CrossAttentionLayer, IpKeyValue};

use crate::error::{PipelineError, Result};
use crate::plan::ip::Fit;
use crate::run::clip_image::{fit_image, load_rgb, normalize};
use crate::run::mask::BinaryMask;

/// The image encoder's features of one preprocessed image: the projected embedding for plain
/// adapters, the penultimate hidden states for the others.
fn encoder_features(
    encoder: &ClipVisionModel,
    pixels: &Tensor,
    penultimate: bool,
) -> Result<Tensor> {
    let out = encoder.forward(pixels)?;
    Ok(if penultimate {
        out.penultimate
    } else {
        out.image_embeds
    })
}

/// The preprocessed encoder input for each image (what `embed --debug-input` writes).
pub fn encoder_inputs(paths: &[PathBuf], size: u32, fit: Fit) -> Result<Vec<image::RgbImage>> {
    paths
        .iter()
        .map(|p| Ok(fit_image(&load_rgb(p)?, size, fit)))
        .collect()
}

/// Positive and negative image tokens, one `[1, T, D]` pair per (combined) image.
pub fn image_tokens(
    adapter: &IpAdapter,
    encoder: &ClipVisionModel,
    images: &[PathBuf],
    negative_image: Option<&Path>,
    combine: Combine,
    fit: Fit,
    device: &Device,
) -> Result<Vec<(Tensor, Tensor)>> {
    let penultimate = adapter.info().projection.uses_penultimate();
    let size = encoder.config().image_size as u32;
    let dtype = DType::F32;
    let encode = |img: &image::RgbImage| -> Result<Tensor> {
        let pixels = normalize(img, device)?.to_dtype(dtype)?;
        encoder_features(encoder, &pixels, penultimate)
    };
    let positives = encoder_inputs(images, size, fit)?
        .iter()
        .map(encode)
        .collect::<Result<Vec<_>>>()?;
    let negative = match negative_image {
        Some(path) => encode(&encoder_inputs(&[path.to_path_buf()], size, fit)?[0])?,
        // diffusers: plain adapters project a zero embedding; the others encode an input that
        // is zero after normalisation.
        None if !penultimate => positives[0].zeros_like()?,
        None => {
            let zeros = Tensor::zeros((1, 3, size as usize, size as usize), dtype, device)?;
            encoder_features(encoder, &zeros, true)?
        }
    };
    let features = match combine {
        Combine::Concat => positives,
        Combine::Average => vec![Tensor::stack(&positives, 0)?.mean(0)?],
    };
    let negative_tokens = adapter.image_tokens(&negative)?;
    features
        .iter()
        .map(|f| Ok((adapter.image_tokens(f)?, negative_tokens.clone())))
        .collect()
}

/// Reads an `ipcompose embed` file: per-image `(tokens, negative_tokens)`.
pub fn read_embeddings(
    path: &Path,
    expected_width: usize,
    device: &Device,
) -> Result<Vec<(Tensor, Tensor)>> {
    let tensors =
        candle_core::safetensors::load(path, device).map_err(|e| PipelineError::Output {
            path: path.to_path_buf(),
            message: format!("cannot read embeddings: {e}"),
        })?;
    let get = |key: &str| {
        tensors.get(key).cloned().ok_or_else(|| PipelineError::Output {
            path: path.to_path_buf(),
            message: format!("no tensor `{key}` (expected `tokens` and `negative_tokens` from `ipcompose embed`)"),
        })
    };
    let (pos, neg) = (get("tokens")?, get("negative_tokens")?);
    if pos.rank() != 3 || pos.dims() != neg.dims() || pos.dim(2)? != expected_width {
        return Err(PipelineError::Output {
            path: path.to_path_buf(),
            message: format!(
                "`tokens` {:?} / `negative_tokens` {:?} should both be [images, tokens, {expected_width}]",
                pos.dims(),
                neg.dims()
            ),
        });
    }
    (0..pos.dim(0)?)
        .map(|i| Ok((pos.narrow(0, i, 1)?, neg.narrow(0, i, 1)?)))
        .collect()
}

/// Writes per-image tokens as `ipcompose embed` does.
pub fn write_embeddings(path: &Path, tokens: &[(Tensor, Tensor)]) -> Result<()> {
    let pos: Vec<Tensor> = tokens.iter().map(|(p, _)| p.clone()).collect();
    let neg: Vec<Tensor> = tokens.iter().map(|(_, n)| n.clone()).collect();
    let map = HashMap::from([
        ("tokens", Tensor::cat(&pos, 0)?.to_dtype(DType::F32)?),
        (
            "negative_tokens",
            Tensor::cat(&neg, 0)?.to_dtype(DType::F32)?,
        ),
    ]);
    crate::io::output::write_atomically(path, |tmp| {
        candle_core::safetensors::save(&map, tmp).map_err(|e| PipelineError::Output {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    })
}

struct LayerEntry {
    key: Tensor,
    value: Tensor,
    mask: Option<Tensor>,
}

/// An adapter ready for the loop: every layer's keys and values, computed once.
pub struct PreparedIpAdapter {
    /// Per layer, one entry (joint attention over all images) or one per image (masked).
    layers: Vec<Vec<LayerEntry>>,
    layer_scales: Vec<f64>,
    step_scales: Vec<f64>,
}

/// Token count of each level of the UNet for a latent of `h`×`w` (stride-2 convs round up).
fn level_tokens(mut h: usize, mut w: usize, levels: usize) -> Vec<usize> {
    let mut tokens = Vec::with_capacity(levels);
    for _ in 0..levels {
        tokens.push(h * w);
        h = h.div_ceil(2);
        w = w.div_ceil(2);
    }
    tokens
}

#[allow(clippy::too_many_arguments)]
pub fn prepare(
    adapter: &IpAdapter,
    tokens: Vec<(Tensor, Tensor)>,
    use_: &IpAdapterUse,
    layout: &[CrossAttentionLayer],
    latent_size: (usize, usize),
    output_size: (usize, usize),
    guided: bool,
    dtype: DType,
) -> Result<PreparedIpAdapter> {
    // Tokens and the adapter's projections stay in f32 (the adapter is loaded in f32); the
    // projected keys and values take the UNet's dtype below.
    let batch = |(pos, neg): &(Tensor, Tensor)| -> Result<Tensor> {
        let t = if guided {
            Tensor::cat(&[neg, pos], 0)?
        } else {
            pos.clone()
        };
        Ok(t.to_dtype(DType::F32)?)
    };
    let masked = !use_.masks.is_empty();
    if masked && use_.masks.len() != 1 && use_.masks.len() != tokens.len() {
        return Err(PipelineError::Plan(format!(
            "IP-Adapter `{}`: {} masks for {} images (give one mask, or one per image)",
            use_.model,
            use_.masks.len(),
            tokens.len()
        )));
    }
    // Masked: each image attends separately under its own mask; unmasked: one joint attention.
    let groups: Vec<Tensor> = if masked {
        tokens.iter().map(batch).collect::<Result<_>>()?
    } else {
        let all = tokens.iter().map(batch).collect::<Result<Vec<_>>>()?;
        vec![Tensor::cat(&all, 1)?]
    };
    let masks: Vec<BinaryMask> = use_
        .masks
        .iter()
        .map(|p| {
            let img = image::open(p)
                .map_err(|e| PipelineError::Output {
                    path: p.clone(),
                    message: format!("cannot read mask: {e}"),
                })?
                .to_luma8();
            Ok(BinaryMask::from_image(&img, output_size.0, output_size.1))
        })
        .collect::<Result<_>>()?;
    let levels = layout.iter().map(|l| l.level + 1).max().unwrap_or(1);
    let tokens_at = level_tokens(latent_size.1, latent_size.0, levels);
    let device = groups[0].device().clone();
    let mut layer_masks: HashMap<(usize, usize), Tensor> = HashMap::new();
    let per_group_kv: Vec<Vec<(Tensor, Tensor)>> = groups
        .iter()
        .map(|g| {
            adapter
                .layer_key_values(g)?
                .into_iter()
                .map(|(k, v)| Ok((k.to_dtype(dtype)?, v.to_dtype(dtype)?)))
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<_>>()?;
    let mut layers = Vec::with_capacity(layout.len());
    for (l, layer) in layout.iter().enumerate() {
        let mut entries = Vec::with_capacity(groups.len());
        for (g, kv) in per_group_kv.iter().enumerate() {
            let mask = if masked {
                let m = if masks.len() == 1 { 0 } else { g };
                let n = tokens_at[layer.level];
                let tensor = match layer_masks.get(&(m, n)) {
                    Some(t) => t.clone(),
                    None => {
                        let t = masks[m].for_layer(n, &device)?.to_dtype(dtype)?;
                        layer_masks.insert((m, n), t.clone());
                        t
                    }
                };
                Some(tensor)
            } else {
                None
            };
            entries.push(LayerEntry {
                key: kv[l].0.clone(),
                value: kv[l].1.clone(),
                mask,
            });
        }
        layers.push(entries);
    }
    Ok(PreparedIpAdapter {
        layers,
        layer_scales: use_.layer_scales.clone(),
        step_scales: use_.step_scales.clone(),
    })
}

/// The IP key/value sets of every layer for one step, over all adapters.
pub fn step_injections(adapters: &[PreparedIpAdapter], step: usize) -> Vec<Vec<IpKeyValue>> {
    let layers = adapters.iter().map(|a| a.layers.len()).max().unwrap_or(0);
    let mut out: Vec<Vec<IpKeyValue>> = (0..layers).map(|_| Vec::new()).collect();
    for adapter in adapters {
        let weight = adapter.step_scales.get(step).copied().unwrap_or(0.0);
        if weight == 0.0 {
            continue;
        }
        for (l, entries) in adapter.layers.iter().enumerate() {
            let scale = adapter.layer_scales[l] * weight;
            if scale == 0.0 {
                continue;
            }
            for e in entries {
                out[l].push(IpKeyValue {
                    key: e.key.clone(),
                    value: e.value.clone(),
                    scale,
                    mask: e.mask.clone(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_latents_round_up_per_level() {
        assert_eq!(level_tokens(8, 12, 4), vec![96, 24, 6, 2]);
    }
}
