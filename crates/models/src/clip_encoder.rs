//! The transformer layer shared by CLIP's text and vision towers (transformers' `CLIPEncoderLayer`).

use candle_core::{Module, Result, Tensor};
use candle_nn::{layer_norm, linear, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

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

/// The sizes one encoder layer needs.
pub(crate) struct EncoderLayerConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub layer_norm_eps: f64,
    pub activation: Activation,
}

#[derive(Debug, Clone)]
pub(crate) struct EncoderLayer {
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
    pub(crate) fn new(vb: VarBuilder, cfg: &EncoderLayerConfig) -> Result<Self> {
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
            activation: cfg.activation,
        })
    }

    /// `mask` is added to the attention scores (the text encoder's causal mask).
    pub(crate) fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
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
        let mut scores = q.matmul(&k.t()?)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
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
