//! The CLIP text encoder (transformers' `CLIPTextModel`), read from its `config.json`.
//!
//! Written here rather than taken from candle-transformers because SD2.x's encoder uses
//! exact GELU and callers need hidden states from any layer (clip skip).

use std::path::Path;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use crate::error::{read_json, ModelError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Activation {
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    #[serde(rename = "gelu")]
    Gelu,
}

impl Activation {
    fn apply(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Activation::Gelu => xs.gelu_erf(),
        }
    }
}

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

#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    activation: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let attn = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: layer_norm(h, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            q_proj: linear(h, h, attn.pp("q_proj"))?,
            k_proj: linear(h, h, attn.pp("k_proj"))?,
            v_proj: linear(h, h, attn.pp("v_proj"))?,
            out_proj: linear(h, h, attn.pp("out_proj"))?,
            layer_norm2: layer_norm(h, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear(h, cfg.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(cfg.intermediate_size, h, vb.pp("mlp.fc2"))?,
            heads: cfg.num_attention_heads,
            activation: cfg.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let (b, n, c) = xs.dims3()?;
        let head_dim = c / self.heads;
        let normed = self.layer_norm1.forward(xs)?;
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, n, self.heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((self.q_proj.forward(&normed)? * (head_dim as f64).powf(-0.5))?)?;
        let k = split(self.k_proj.forward(&normed)?)?;
        let v = split(self.v_proj.forward(&normed)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(causal_mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let attn = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        let xs = (xs + self.out_proj.forward(&attn)?)?;
        let normed = self.layer_norm2.forward(&xs)?;
        let mlp = self
            .fc2
            .forward(&self.activation.apply(&self.fc1.forward(&normed)?)?)?;
        xs + mlp
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
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(vb.pp("encoder.layers").pp(i), cfg))
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
            xs = layer.forward(&xs, &mask)?;
        }
        self.final_layer_norm.forward(&xs)
    }
}
