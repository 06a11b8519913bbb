//! `UNet2DConditionModel` (SD1.x / SD2.x / SDXL) with explicit injection points.
//!
//! The base model is frozen; everything an adapter or control contributes comes in through
//! [`Injections`]: image-prompt keys/values per cross-attention layer, residuals added to the
//! skip connections and the mid block (ControlNet), and features added inside the down blocks
//! (T2I-Adapter). With nothing injected this is diffusers' UNet.
//!
//! What differs between families is read from the config, not written twice: SDXL's UNet is
//! the same code with linear projections, transformer depth above 1, a first down block without
//! attention and the added text/time embedding ([`TextContext::added`]).

mod attention;
mod config;
pub mod cuda_ops;
pub(crate) mod encoder;
mod fused_attention;
mod geglu;
pub(crate) mod im2col;
pub(crate) mod layers;
mod softmax_block;
pub(crate) mod winograd;

pub use attention::{multi_head_attention, unfused_attention, IpKeyValue};
pub use config::{
    CrossAttentionLayer, DownBlockKind, TextTimeEmbedding, UNetConfig, UNetPart, UpBlockKind,
};

use candle_core::{CpuStorage, Layout, Module, Result, Tensor};
use candle_nn::VarBuilder;

use attention::SpatialTransformer;
use encoder::{time_embedding_channels, transformer, Encoder};
use layers::{group_norm, winograd_at_level, GroupNorm, ResnetBlock, Upsample};
use winograd::Conv3x3;

/// The contiguous `f32` slice of a CPU tensor's storage, or `None` for another dtype or a
/// strided layout: what the CPU kernels (attention, GEGLU, convolutions) read.
pub(crate) fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Option<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Some(&data[start..end]),
        _ => None,
    }
}

/// Helpers shared by the kernels' unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use candle_core::Tensor;

    /// `max |a - b|` over all elements.
    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// `max |t|` over all elements.
    pub fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The best of five timed calls after one untimed, in seconds.
    pub fn best_of_five(f: &dyn Fn() -> Tensor) -> f64 {
        f();
        (0..5)
            .map(|_| {
                let start = std::time::Instant::now();
                f();
                start.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    }
}

/// The base model's added conditioning (SDXL, `addition_embed_type: text_time`), batched like
/// the text context (`[uncond, cond]` under guidance). Constant over the steps of a run.
#[derive(Debug, Clone)]
pub struct AddedConditioning {
    /// `[B, P]`: the second text encoder's pooled projection (`text_embeds`).
    pub text_embeds: Tensor,
    /// `[B, 6]`, f32: original size (h, w), crop top-left (top, left), target size (h, w).
    pub time_ids: Tensor,
}

/// What the base UNet is conditioned on besides the timestep: the cross-attention context and,
/// for SDXL, the added text/time conditioning. A plain `&Tensor` converts into a context
/// without added conditioning (SD1.x / SD2.x).
#[derive(Debug, Clone, Copy)]
pub struct TextContext<'a> {
    /// `[B, tokens, D]`.
    pub hidden: &'a Tensor,
    pub added: Option<&'a AddedConditioning>,
}

impl<'a> From<&'a Tensor> for TextContext<'a> {
    fn from(hidden: &'a Tensor) -> Self {
        Self {
            hidden,
            added: None,
        }
    }
}

/// Everything added to the frozen UNet for one step. Empty by default.
#[derive(Debug, Default, Clone, Copy)]
pub struct Injections<'a> {
    /// Per cross-attention layer, in diffusers' `attn_processors` order (down, up, mid):
    /// one entry per IP-Adapter. Shorter (or empty) means no adapters on the remaining layers.
    pub ip_layers: &'a [Vec<IpKeyValue>],
    /// Added to each skip tensor after the whole down path (ControlNet; 12 for SD1.5).
    pub down_residuals: Option<&'a [Tensor]>,
    /// Added to the mid block output (ControlNet).
    pub mid_residual: Option<&'a Tensor>,
    /// Added inside the down blocks, one per block (T2I-Adapter); one more is added to the
    /// mid block's output (SDXL's `full_adapter_xl`).
    pub down_block_features: Option<&'a [Tensor]>,
}

struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    upsampler: Option<Upsample>,
}

pub struct UNet2DConditionModel {
    config: UNetConfig,
    encoder: Encoder,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv3x3,
}

impl UNet2DConditionModel {
    pub fn new(vb: VarBuilder, config: &UNetConfig) -> Result<Self> {
        let cfg = config;
        let channels = &cfg.block_out_channels;
        let n = channels.len();
        let temb_c = time_embedding_channels(cfg);
        let groups = cfg.norm_num_groups;
        let eps = cfg.norm_eps;
        // IP layer numbering follows diffusers' attn_processors walk: down, then up, then mid.
        let layout = cfg.cross_attention_layout();
        let mut next_layer = layout.iter().filter(|l| l.part == UNetPart::Down).count();
        let mid_first_layer = layout.iter().filter(|l| l.part != UNetPart::Mid).count();
        let encoder = Encoder::new(&vb, cfg, mid_first_layer)?;
        let mut up_blocks = Vec::with_capacity(n);
        let rev = |v: &Vec<usize>, i: usize| v[n - 1 - i];
        let mut out_c = channels[n - 1];
        for i in 0..n {
            let prev_out_c = out_c;
            out_c = rev(channels, i);
            let in_c = rev(channels, (i + 1).min(n - 1));
            let layers = rev(&cfg.layers_per_block, i) + 1;
            let vb_block = vb.pp("up_blocks").pp(i);
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for l in 0..layers {
                let skip_c = if l == layers - 1 { in_c } else { out_c };
                let rin = if l == 0 { prev_out_c } else { out_c };
                resnets.push(ResnetBlock::new(
                    vb_block.pp("resnets").pp(l),
                    rin + skip_c,
                    out_c,
                    temb_c,
                    groups,
                    eps,
                    winograd_at_level(n - 1 - i, n),
                )?);
                if cfg.up_blocks[i] == UpBlockKind::CrossAttn {
                    let depth = rev(&cfg.transformer_layers_per_block, i);
                    attentions.push(transformer(
                        vb_block.pp("attentions").pp(l),
                        cfg,
                        out_c,
                        rev(&cfg.num_attention_heads, i),
                        depth,
                        next_layer,
                    )?);
                    next_layer += depth;
                }
            }
            let upsampler = if i + 1 < n {
                Some(Upsample::new(vb_block.pp("upsamplers.0"), out_c)?)
            } else {
                None
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }

        Ok(Self {
            config: config.clone(),
            encoder,
            up_blocks,
            conv_norm_out: group_norm(groups, channels[0], eps, vb.pp("conv_norm_out"))?,
            conv_out: Conv3x3::new(channels[0], cfg.out_channels, 1, vb.pp("conv_out"))?,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Predicts the model output for `sample` `[B, C, h, w]` at `timestep` given the text
    /// `context` (`[B, tokens, D]`, with SDXL's added conditioning where the UNet has an added
    /// embedding), with whatever `injections` the caller supplies.
    pub fn forward<'c>(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: impl Into<TextContext<'c>>,
        injections: &Injections,
    ) -> Result<Tensor> {
        let TextContext {
            hidden: context,
            added,
        } = context.into();
        let _param_cache = cuda_ops::DeviceParamCache::enable(sample.device());
        let temb = self.encoder.time_embedding(timestep, sample, added)?;
        let ip = injections.ip_layers;
        let (mut xs, mut skips) = self.encoder.down(
            self.encoder.conv_in(sample)?,
            &temb,
            context,
            ip,
            injections.down_block_features,
        )?;

        if let Some(residuals) = injections.down_residuals {
            if residuals.len() != skips.len() {
                candle_core::bail!(
                    "expected {} down-block residuals, got {}",
                    skips.len(),
                    residuals.len()
                );
            }
            for (skip, residual) in skips.iter_mut().zip(residuals) {
                *skip = skip.broadcast_add(residual)?;
            }
        }

        xs = self.encoder.mid_block.forward(&xs, &temb, context, ip)?;
        // A T2I-Adapter with one feature more than down blocks (SDXL's `full_adapter_xl`)
        // adds the last one to the mid block's output, as diffusers does when shapes match
        // (the planner checks they do).
        if let Some(feature) = injections
            .down_block_features
            .and_then(|f| f.get(self.encoder.down_block_count()))
        {
            xs = xs.broadcast_add(feature)?;
        }
        if let Some(residual) = injections.mid_residual {
            xs = xs.broadcast_add(residual)?;
        }

        for block in &self.up_blocks {
            for (l, resnet) in block.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| candle_core::Error::Msg("UNet skip stack underflow".into()))?;
                xs = Tensor::cat(&[&xs, &skip], 1)?;
                xs = resnet.forward(&xs, &temb)?;
                if let Some(attn) = block.attentions.get(l) {
                    xs = attn.forward(&xs, context, ip)?;
                }
            }
            if let Some(up) = &block.upsampler {
                // Odd latent sizes: upsample to the next skip tensor's size, as diffusers does.
                let size = skips.last().map(|s| (s.dim(2), s.dim(3)));
                let size = match size {
                    Some((Ok(h), Ok(w))) => Some((h, w)),
                    _ => None,
                };
                xs = up.forward(&xs, size)?;
            }
        }

        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}
