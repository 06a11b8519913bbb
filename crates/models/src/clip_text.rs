//! The CLIP text encoder (transformers' `CLIPTextModel`), read from its `config.json`.
//!
//! Written here rather than taken from candle-transformers because SD2.x's encoder uses
//! exact GELU and callers need hidden states from any layer (clip skip).

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, VarBuilder};
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

    fn causal_mask(n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let mask: Vec<f32> = (0..n)
            .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(mask, (n, n), device)?.to_dtype(dtype)
    }

    /// The context diffusers' SD pipelines use: the final-layer-normed output of layer
    /// `num_layers - clip_skip` (clip_skip 0 = `last_hidden_state`).
    pub fn encode(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let n = input_ids.dim(D::Minus1)?;
        if clip_skip >= self.layers.len() {
            candle_core::bail!(
                "clip skip {clip_skip} needs more than the text encoder's {} layers",
                self.layers.len()
            );
        }
        let positions = Tensor::arange(0u32, n as u32, input_ids.device())?;
        let mut xs = self
            .token_embedding
            .forward(input_ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = Self::causal_mask(n, xs.dtype(), xs.device())?;
        for layer in &self.layers[..self.layers.len() - clip_skip] {
            xs = layer.forward(&xs, Some(&mask))?;
        }
        self.final_layer_norm.forward(&xs)
    }
}
