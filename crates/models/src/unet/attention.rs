//! `Transformer2DModel` and its blocks, with the decoupled cross-attention injection point.

use candle_core::{Module, Result, Tensor};
use candle_nn::{
    conv2d, layer_norm, linear, linear_no_bias, Conv2d, LayerNorm, Linear, VarBuilder,
};

use super::layers::{group_norm, GroupNorm};

/// Image-prompt keys and values for one cross-attention layer, from one IP-Adapter.
///
/// The projections `to_k_ip` / `to_v_ip` of the image tokens do not change across steps, so
/// callers compute them once per run and hand them in here.
#[derive(Debug, Clone)]
pub struct IpKeyValue {
    /// `[batch, tokens, channels]`, already projected by the adapter's `to_k_ip`.
    pub key: Tensor,
    /// `[batch, tokens, channels]`, already projected by the adapter's `to_v_ip`.
    pub value: Tensor,
    /// Multiplies this adapter's attention output before `to_out`.
    pub scale: f64,
    /// Optional spatial mask `[batch, query_positions, 1]` multiplied into the attention output.
    pub mask: Option<Tensor>,
}

/// Multi-head scaled dot-product attention, `[B, N, C]` in, `[B, N, C]` out.
pub fn multi_head_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    if let Some(out) = super::fused_attention::fused_attention(q, k, v, heads)? {
        return Ok(out);
    }
    unfused_attention(q, k, v, heads)
}

/// `softmax(QKᵀ/√d)V` from stock candle ops: any device and dtype.
pub fn unfused_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = q.dims3()?;
    let m = k.dim(1)?;
    let head_dim = c / heads;
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        t.reshape((b, len, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (split(q, n)?, split(k, m)?, split(v, m)?);
    // The scale goes on the queries (N×d) rather than the scores (N×M): one pass less over
    // the largest tensor of the layer.
    let scale = 1.0 / (head_dim as f64).sqrt();
    let scores = (q * scale)?.matmul(&k.t()?)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))
}

/// diffusers' `Attention` as used by the UNet: bias-free q/k/v, biased output projection.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    pub fn new(vb: VarBuilder, query_dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            to_q: linear_no_bias(query_dim, query_dim, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, query_dim, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, query_dim, vb.pp("to_v"))?,
            to_out: linear(query_dim, query_dim, vb.pp("to_out.0"))?,
            heads,
        })
    }

    /// Self-attention when `context` is `None`; decoupled cross-attention adds every
    /// IP-Adapter's attention output, times its scale (and mask), before `to_out`.
    pub fn forward(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        ip: &[IpKeyValue],
    ) -> Result<Tensor> {
        let context = context.unwrap_or(xs);
        let q = self.to_q.forward(xs)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let mut out = multi_head_attention(&q, &k, &v, self.heads)?;
        for adapter in ip {
            if adapter.scale == 0.0 {
                continue;
            }
            let mut extra = multi_head_attention(&q, &adapter.key, &adapter.value, self.heads)?;
            if let Some(mask) = &adapter.mask {
                extra = extra.broadcast_mul(mask)?;
            }
            out = (out + (extra * adapter.scale)?)?;
        }
        self.to_out.forward(&out)
    }
}

/// GEGLU feed-forward: `proj` to twice the inner width, value · gelu(gate), then down.
#[derive(Debug, Clone)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: linear(dim, inner * 2, vb.pp("net.0.proj"))?,
            out: linear(inner, dim, vb.pp("net.2"))?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let projected = self.proj.forward(xs)?;
        self.out.forward(&super::geglu::geglu_gate(&projected)?)
    }
}

/// `BasicTransformerBlock`: self-attention, cross-attention, feed-forward, each pre-normed.
#[derive(Debug, Clone)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    fn new(vb: VarBuilder, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads)?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, context_dim, heads)?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor, ip: &[IpKeyValue]) -> Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None, &[])? + xs)?;
        let xs = (self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context), ip)?
            + xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// `Transformer2DModel` for continuous inputs: group norm, project in, transformer blocks,
/// project out, residual.
#[derive(Debug, Clone)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
    /// Index of this transformer's first cross-attention in diffusers' `attn_processors` order.
    first_layer: usize,
}

pub struct SpatialTransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub depth: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
    pub first_layer: usize,
}

impl SpatialTransformer {
    pub fn new(vb: VarBuilder, cfg: &SpatialTransformerConfig) -> Result<Self> {
        let c = cfg.channels;
        let projection = |name: &str| -> Result<Projection> {
            if cfg.use_linear_projection {
                Ok(Projection::Linear(linear(c, c, vb.pp(name))?))
            } else {
                Ok(Projection::Conv(conv2d(
                    c,
                    c,
                    1,
                    Default::default(),
                    vb.pp(name),
                )?))
            }
        };
        let blocks = (0..cfg.depth)
            .map(|i| {
                TransformerBlock::new(
                    vb.pp("transformer_blocks").pp(i),
                    c,
                    cfg.context_dim,
                    cfg.heads,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(cfg.groups, c, 1e-6, vb.pp("norm"))?,
            proj_in: projection("proj_in")?,
            blocks,
            proj_out: projection("proj_out")?,
            first_layer: cfg.first_layer,
        })
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor, ip: &[Vec<IpKeyValue>]) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let tokens =
            |t: Tensor| -> Result<Tensor> { t.permute((0, 2, 3, 1))?.reshape((b, h * w, c)) };
        let mut hidden = match &self.proj_in {
            Projection::Conv(conv) => tokens(conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&tokens(normed)?)?,
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_ip = ip
                .get(self.first_layer + i)
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            hidden = block.forward(&hidden, context, layer_ip)?;
        }
        let spatial =
            |t: Tensor| -> Result<Tensor> { t.reshape((b, h, w, c))?.permute((0, 3, 1, 2)) };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&spatial(hidden)?.contiguous()?)?,
            Projection::Linear(lin) => spatial(lin.forward(&hidden)?)?,
        };
        out + xs
    }
}
