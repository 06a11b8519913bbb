//! The CLIP text encoders (transformers' `CLIPTextModel` and SDXL's second encoder,
//! `CLIPTextModelWithProjection`), read from their `config.json`.
//!
//! Written here rather than taken from candle-transformers because SD2.x's encoder uses
//! exact GELU and callers need hidden states from any layer (clip skip), with or without the
//! final layer norm (SD1.x/2.x apply it, SDXL does not).

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{embedding, layer_norm, linear_no_bias, Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use crate::clip_encoder::{Activation, EncoderLayer, EncoderLayerConfig};
use crate::error::{read_json, ModelError};

#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_activation")]
    pub hidden_act: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Where the pooled output is read: `2` (the value of older configs, the real SD/SDXL
    /// files included) means the position of the largest id, as transformers does; any other
    /// value, the first position holding it. Absent or null: transformers' default, 49407.
    #[serde(default)]
    pub eos_token_id: Option<i64>,
    /// Width of `text_projection` (`CLIPTextModelWithProjection`, SDXL's second encoder).
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

fn default_positions() -> usize {
    77
}
fn default_activation() -> Activation {
    Activation::QuickGelu
}
fn default_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    pub fn from_file(path: &Path) -> crate::error::Result<Self> {
        let config: Self = read_json(path, "a CLIPTextModel config")?;
        if !config
            .hidden_size
            .is_multiple_of(config.num_attention_heads)
        {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "`hidden_size` {} is not divisible by `num_attention_heads` {}",
                    config.hidden_size, config.num_attention_heads
                ),
            });
        }
        Ok(config)
    }
}

/// `CLIPTextModel`. Weights may be stored with or without the `text_model.` prefix.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    config: ClipTextConfig,
}

impl ClipTextModel {
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let emb = vb.pp("embeddings");
        let layer_cfg = EncoderLayerConfig {
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_attention_heads: cfg.num_attention_heads,
            layer_norm_eps: cfg.layer_norm_eps,
            activation: cfg.hidden_act,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(vb.pp("encoder.layers").pp(i), &layer_cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding: embedding(cfg.vocab_size, cfg.hidden_size, emb.pp("token_embedding"))?,
            position_embedding: embedding(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                emb.pp("position_embedding"),
            )?,
            layers,
            final_layer_norm: layer_norm(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("final_layer_norm"),
            )?,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Puts `rows` `[n, hidden]` at token ids `first_id..first_id + n` of the token embedding
    /// (textual inversion), as diffusers' `resize_token_embeddings` then assignment: rows from
    /// `first_id` on are replaced.
    pub fn set_token_rows(&mut self, first_id: usize, rows: &Tensor) -> Result<()> {
        let weight = self.token_embedding.embeddings();
        let hidden = weight.dim(1)?;
        if rows.dim(1)? != hidden {
            candle_core::bail!(
                "embedding vectors of width {} for a text encoder of width {hidden}",
                rows.dim(1)?
            );
        }
        let kept = weight.narrow(0, 0, first_id.min(weight.dim(0)?))?;
        if kept.dim(0)? != first_id {
            candle_core::bail!(
                "new token id {first_id} is past the text encoder's {} token rows",
                weight.dim(0)?
            );
        }
        let rows = rows.to_dtype(weight.dtype())?.to_device(weight.device())?;
        let weight = Tensor::cat(&[&kept, &rows], 0)?;
        self.token_embedding = Embedding::new(weight, hidden);
        Ok(())
    }

    fn causal_mask(n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(mask, (n, n), device)?.to_dtype(dtype)
    }

    /// The context diffusers' SD pipelines use: the final-layer-normed output of layer
    /// `num_layers - clip_skip` (clip_skip 0 = `last_hidden_state`).
    pub fn encode(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        if clip_skip >= self.layers.len() {
            candle_core::bail!(
                "clip skip {clip_skip} needs more than the text encoder's {} layers",
                self.layers.len()
            );
        }
        let (hidden, _) = self.hidden_states(input_ids, self.layers.len() - clip_skip, false)?;
        self.final_layer_norm.forward(&hidden)
    }

    /// The context SDXL's pipelines take from each encoder: `hidden_states[-(clip_skip + 2)]`,
    /// the output of layer `num_layers - 1 - clip_skip` **without** the final layer norm.
    pub fn penultimate(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        Ok(self
            .hidden_states(input_ids, self.penultimate_layers(clip_skip)?, false)?
            .0)
    }

    /// How many layers `hidden_states[-(clip_skip + 2)]` has gone through.
    fn penultimate_layers(&self, clip_skip: usize) -> Result<usize> {
        let n = self.layers.len();
        if clip_skip + 1 > n {
            candle_core::bail!(
                "clip skip {clip_skip} needs more than the text encoder's {n} layers (SDXL reads layer {n} - 1 - clip skip)"
            );
        }
        Ok(n - 1 - clip_skip)
    }

    /// The hidden state after the embeddings and the first `layers` encoder layers
    /// (transformers' `hidden_states[layers]`), and with `last` also `last_hidden_state`
    /// (every layer and the final layer norm): one pass for both.
    fn hidden_states(
        &self,
        input_ids: &Tensor,
        layers: usize,
        last: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let n = input_ids.dim(D::Minus1)?;
        let positions = Tensor::arange(0u32, n as u32, input_ids.device())?;
        let mut xs = self
            .token_embedding
            .forward(input_ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = Self::causal_mask(n, xs.dtype(), xs.device())?;
        let run = if last { self.layers.len() } else { layers };
        let mut kept = (layers == 0).then(|| xs.clone());
        for (i, layer) in self.layers[..run].iter().enumerate() {
            xs = layer.forward(&xs, Some(&mask))?;
            if i + 1 == layers {
                kept = Some(xs.clone());
            }
        }
        let kept = kept.ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "hidden state {layers} requested from a text encoder with {} layers",
                self.layers.len()
            ))
        })?;
        let last = if last {
            Some(self.final_layer_norm.forward(&xs)?)
        } else {
            None
        };
        Ok((kept, last))
    }

    /// Per batch row, the position the pooled output is read at (transformers'
    /// `CLIPTextTransformer`): the largest id when the config's `eos_token_id` is 2, else the
    /// first position holding `eos_token_id`.
    fn pooled_positions(&self, input_ids: &Tensor) -> Result<Vec<usize>> {
        let rows = input_ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        // transformers' `CLIPTextConfig` default.
        let eos = self.config.eos_token_id.unwrap_or(49407);
        rows.iter()
            .map(|ids| {
                pooled_position(ids, eos).ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "no end-of-text token ({eos}) in the token ids to pool at"
                    ))
                })
            })
            .collect()
    }
}

/// transformers' pooling position for one row of ids (see [`ClipTextConfig::eos_token_id`]).
fn pooled_position(ids: &[i64], eos_token_id: i64) -> Option<usize> {
    if eos_token_id == 2 {
        // torch.argmax: the first of equal maxima.
        ids.iter()
            .enumerate()
            .fold(None, |best: Option<(usize, i64)>, (i, &id)| match best {
                Some((_, b)) if b >= id => best,
                _ => Some((i, id)),
            })
            .map(|(i, _)| i)
    } else {
        ids.iter().position(|&id| id == eos_token_id)
    }
}

/// `CLIPTextModelWithProjection`: SDXL's second text encoder (OpenCLIP ViT-bigG in the real
/// model), whose pooled, projected output (`text_embeds`) feeds the UNet's added embedding.
#[derive(Debug, Clone)]
pub struct ClipTextModelWithProjection {
    text: ClipTextModel,
    text_projection: Linear,
}

impl ClipTextModelWithProjection {
    /// As [`ClipTextModel::set_token_rows`].
    pub fn set_token_rows(&mut self, first_id: usize, rows: &Tensor) -> Result<()> {
        self.text.set_token_rows(first_id, rows)
    }

    /// `text_projection.weight` sits next to the `text_model` weights (with or without their
    /// `text_model.` prefix); its width is the config's `projection_dim`.
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let projection_dim = cfg.projection_dim.ok_or_else(|| {
            candle_core::Error::Msg(
                "a CLIPTextModelWithProjection config needs `projection_dim`".to_string(),
            )
        })?;
        Ok(Self {
            text_projection: linear_no_bias(
                cfg.hidden_size,
                projection_dim,
                vb.pp("text_projection"),
            )?,
            text: ClipTextModel::new(vb, cfg)?,
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        self.text.config()
    }

    /// SDXL's reading of this encoder for `input_ids` `[B, tokens]`: the context
    /// `hidden_states[-(clip_skip + 2)]` `[B, tokens, hidden]` (no final layer norm) and the
    /// pooled `text_embeds` `[B, projection_dim]` = `text_projection(final_layer_norm(last
    /// hidden)[eos])`, which clip skip does not change.
    pub fn encode_with_pooled(
        &self,
        input_ids: &Tensor,
        clip_skip: usize,
    ) -> Result<(Tensor, Tensor)> {
        let layers = self.text.penultimate_layers(clip_skip)?;
        let (hidden, last) = self.text.hidden_states(input_ids, layers, true)?;
        let last = last.ok_or_else(|| candle_core::Error::Msg("no last hidden state".into()))?;
        let pooled = self
            .text
            .pooled_positions(input_ids)?
            .into_iter()
            .enumerate()
            .map(|(row, position)| last.get(row)?.get(position))
            .collect::<Result<Vec<_>>>()?;
        let pooled = Tensor::stack(&pooled, 0)?;
        Ok((hidden, self.text_projection.forward(&pooled)?))
    }
}

#[cfg(test)]
mod tests {
    use super::pooled_position;

    #[test]
    fn pooling_reads_the_first_eos_either_way() {
        // BOS, two tokens, EOS, then padding with EOS (tokenizer 1) or `!` = 0 (tokenizer 2).
        let padded_with_eos = [49406, 320, 2368, 49407, 49407, 49407];
        let padded_with_bang = [49406, 320, 2368, 49407, 0, 0];
        for ids in [&padded_with_eos[..], &padded_with_bang[..]] {
            assert_eq!(pooled_position(ids, 2), Some(3), "argmax, first maximum");
            assert_eq!(pooled_position(ids, 49407), Some(3), "first eos_token_id");
        }
        // Only the legacy id 2 means "largest id": any other value is looked up.
        assert_eq!(pooled_position(&[5, 9, 7], 7), Some(2));
        assert_eq!(pooled_position(&[5, 9, 7], 3), None);
    }
}
