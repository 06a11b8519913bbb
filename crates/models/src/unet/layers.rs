//! The convolutional pieces of the UNet: timestep embedding, resnet blocks, down/up samplers.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{conv2d, linear, Conv2d, Conv2dConfig, Linear, VarBuilder};

use super::winograd::Conv3x3;

/// Sinusoidal timestep features as diffusers' `get_timestep_embedding` computes them (in f32).
/// The frequencies are made once, on the model's device, so a step sends nothing to it.
#[derive(Debug, Clone)]
pub struct TimestepFeatures {
    /// `[1, dim / 2]`, f32.
    freqs: Tensor,
    flip_sin_to_cos: bool,
}

impl TimestepFeatures {
    pub fn new(
        dim: usize,
        flip_sin_to_cos: bool,
        freq_shift: f64,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let half = dim / 2;
        let exponent = (Tensor::arange(0u32, half as u32, device)?.to_dtype(DType::F32)?
            * (-(10000f64.ln()) / (half as f64 - freq_shift)))?;
        Ok(Self {
            freqs: exponent.exp()?.unsqueeze(0)?,
            flip_sin_to_cos,
        })
    }

    /// `[B, dim]` features of `timesteps` `[B]`.
    pub fn forward(&self, timesteps: &Tensor) -> Result<Tensor> {
        let args = timesteps
            .to_dtype(DType::F32)?
            .unsqueeze(1)?
            .broadcast_mul(&self.freqs)?;
        let (sin, cos) = (args.sin()?, args.cos()?);
        if self.flip_sin_to_cos {
            Tensor::cat(&[cos, sin], D::Minus1)
        } else {
            Tensor::cat(&[sin, cos], D::Minus1)
        }
    }
}

/// `TimestepEmbedding`: linear, SiLU, linear.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_dim, out_dim, vb.pp("linear_1"))?,
            linear_2: linear(out_dim, out_dim, vb.pp("linear_2"))?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(xs)?.silu()?)
    }
}

/// A 3×3, padding-1, stride-1 convolution: Winograd on the CPU for f32 when `winograd`,
/// one im2col product on the plain weights otherwise.
pub fn conv_3x3(in_c: usize, out_c: usize, vb: VarBuilder, winograd: bool) -> Result<Conv3x3> {
    if winograd {
        Conv3x3::new(in_c, out_c, 1, vb)
    } else {
        Conv3x3::direct(in_c, out_c, vb)
    }
}

/// Whether the resnets of UNet level `level` (0 = full latent resolution, `levels - 1` = the
/// coarsest, with the mid block) use the Winograd convolution. The coarsest level holds the
/// most 3×3 weights (1.06 GB of SD1.5's UNet: 1280 channels at 8×8) and the least work; its
/// transformed weights would add 0.83 GB (16/9 of the originals), so it keeps the plain
/// weights and convolves by im2col (see `im2col.rs`).
pub fn winograd_at_level(level: usize, levels: usize) -> bool {
    level + 1 < levels
}

/// diffusers' `GroupNorm` (affine), optionally followed by SiLU as every resnet and the
/// output norm use it: one fused kernel on contiguous CUDA tensors (statistics and affine map
/// in f32), candle_nn's GroupNorm (+ `silu`) everywhere else.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

/// A [`GroupNorm`] over `channels` in `groups`, weights `weight` / `bias` under `vb`.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let inner = candle_nn::group_norm(groups, channels, eps, vb.clone())?;
    Ok(GroupNorm {
        inner,
        weight: vb.get(channels, "weight")?,
        bias: vb.get(channels, "bias")?,
        groups,
        eps,
    })
}

impl GroupNorm {
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.apply(xs, false)
    }

    /// `silu(group_norm(xs))`.
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        self.apply(xs, true)
    }

    fn apply(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        if super::cuda_ops::fused_kernels_for(xs)
            && xs.dtype() == self.weight.dtype()
            && xs.dtype().is_float()
        {
            return super::cuda_ops::group_norm(
                xs,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                silu,
            );
        }
        let ys = self.inner.forward(xs)?;
        if silu {
            ys.silu()
        } else {
            Ok(ys)
        }
    }
}

/// `ResnetBlock2D` with the default time-embedding handling (added after the first conv).
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv3x3,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv3x3,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    /// `winograd` picks the convolution algorithm (see [`winograd_at_level`]).
    pub fn new(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        temb_c: usize,
        groups: usize,
        eps: f64,
        winograd: bool,
    ) -> Result<Self> {
        let conv_shortcut = if in_c != out_c {
            Some(conv2d(
                in_c,
                out_c,
                1,
                Default::default(),
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(groups, in_c, eps, vb.pp("norm1"))?,
            conv1: conv_3x3(in_c, out_c, vb.pp("conv1"), winograd)?,
            time_emb_proj: linear(temb_c, out_c, vb.pp("time_emb_proj"))?,
            norm2: group_norm(groups, out_c, eps, vb.pp("norm2"))?,
            conv2: conv_3x3(out_c, out_c, vb.pp("conv2"), winograd)?,
            conv_shortcut,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        let t = self
            .time_emb_proj
            .forward(&temb.silu()?)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        let h = h.broadcast_add(&t)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        shortcut + h
    }
}

/// `Downsample2D` with a convolution (stride 2).
#[derive(Debug, Clone)]
pub struct Downsample {
    conv: Conv2d,
}

impl Downsample {
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding,
            stride: 2,
            ..Default::default()
        };
        Ok(Self {
            conv: conv2d(channels, channels, 3, cfg, vb.pp("conv"))?,
        })
    }
}

impl Module for Downsample {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.conv.forward(xs)
    }
}

/// `Upsample2D`: nearest-neighbour upsampling (to the skip tensor's size when given) and a conv.
#[derive(Debug, Clone)]
pub struct Upsample {
    conv: Conv3x3,
}

impl Upsample {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            // Runs after the upsampling, at the next finer level.
            conv: conv_3x3(channels, channels, vb.pp("conv"), true)?,
        })
    }

    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let up = nearest_resize(xs, th, tw)?;
        self.conv.forward(&up)
    }
}

/// torch's `F.interpolate(mode="nearest")`: source index = floor(dst * in / out).
fn nearest_resize(xs: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, _, h, w) = xs.dims4()?;
    if out_h == 2 * h && out_w == 2 * w {
        return xs.upsample_nearest2d(out_h, out_w);
    }
    let device = xs.device();
    let index = |out: usize, inp: usize| -> Result<Tensor> {
        let scale = inp as f64 / out as f64;
        let idx: Vec<u32> = (0..out)
            .map(|i| ((i as f64 * scale).floor() as usize).min(inp - 1) as u32)
            .collect();
        Tensor::new(idx, device)
    };
    xs.index_select(&index(out_h, h)?, 2)?
        .index_select(&index(out_w, w)?, 3)
}
