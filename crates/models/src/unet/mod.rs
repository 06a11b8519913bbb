//! `UNet2DConditionModel` (SD1.x / SD2.x) with explicit injection points.
//!
//! The base model is frozen; everything an adapter or control contributes comes in through
//! [`Injections`]: image-prompt keys/values per cross-attention layer, residuals added to the
//! skip connections and the mid block (ControlNet), and features added inside the down blocks
//! (T2I-Adapter). With nothing injected this is diffusers' UNet.

mod attention;
mod config;
mod layers;

pub use attention::{multi_head_attention, IpKeyValue};
pub use config::{DownBlockKind, UNetConfig, UpBlockKind};

use candle_core::{Module, Result, Tensor};
use candle_nn::{conv2d, group_norm, Conv2d, Conv2dConfig, GroupNorm, VarBuilder};

use attention::{SpatialTransformer, SpatialTransformerConfig};
use layers::{timestep_features, Downsample, ResnetBlock, TimestepEmbedding, Upsample};

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
    /// Added inside the down blocks, one per block (T2I-Adapter).
    pub down_block_features: Option<&'a [Tensor]>,
}

struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    downsampler: Option<Downsample>,
}

struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    upsampler: Option<Upsample>,
}

struct MidBlock {
    resnet_in: ResnetBlock,
    attention: SpatialTransformer,
    resnet_out: ResnetBlock,
}

pub struct UNet2DConditionModel {
    config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    pub fn new(vb: VarBuilder, config: &UNetConfig) -> Result<Self> {
        let cfg = config;
        let channels = &cfg.block_out_channels;
        let n = channels.len();
        let temb_c = channels[0] * 4;
        let groups = cfg.norm_num_groups;
        let eps = cfg.norm_eps;
        let conv_cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_in = conv2d(cfg.in_channels, channels[0], 3, conv_cfg, vb.pp("conv_in"))?;
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), channels[0], temb_c)?;
        let transformer = |vb: VarBuilder, c: usize, heads: usize, depth: usize, first: usize| {
            SpatialTransformer::new(
                vb,
                &SpatialTransformerConfig {
                    channels: c,
                    heads,
                    depth,
                    context_dim: cfg.cross_attention_dim,
                    groups,
                    use_linear_projection: cfg.use_linear_projection,
                    first_layer: first,
                },
            )
        };

        // IP layer numbering follows diffusers' attn_processors walk: down, then up, then mid.
        let mut next_layer = 0usize;
        let mut down_blocks = Vec::with_capacity(n);
        let mut out_c = channels[0];
        for (i, &block_c) in channels.iter().enumerate() {
            let in_c = out_c;
            out_c = block_c;
            let vb_block = vb.pp("down_blocks").pp(i);
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for l in 0..cfg.layers_per_block[i] {
                let rin = if l == 0 { in_c } else { out_c };
                resnets.push(ResnetBlock::new(
                    vb_block.pp("resnets").pp(l),
                    rin,
                    out_c,
                    temb_c,
                    groups,
                    eps,
                )?);
                if cfg.down_blocks[i] == DownBlockKind::CrossAttn {
                    let depth = cfg.transformer_layers_per_block[i];
                    attentions.push(transformer(
                        vb_block.pp("attentions").pp(l),
                        out_c,
                        cfg.num_attention_heads[i],
                        depth,
                        next_layer,
                    )?);
                    next_layer += depth;
                }
            }
            let downsampler = if i + 1 < n {
                Some(Downsample::new(
                    vb_block.pp("downsamplers.0"),
                    out_c,
                    cfg.downsample_padding,
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

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
                )?);
                if cfg.up_blocks[i] == UpBlockKind::CrossAttn {
                    let depth = rev(&cfg.transformer_layers_per_block, i);
                    attentions.push(transformer(
                        vb_block.pp("attentions").pp(l),
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

        let mid_c = channels[n - 1];
        let vb_mid = vb.pp("mid_block");
        let mid_block = MidBlock {
            resnet_in: ResnetBlock::new(vb_mid.pp("resnets.0"), mid_c, mid_c, temb_c, groups, eps)?,
            attention: transformer(
                vb_mid.pp("attentions.0"),
                mid_c,
                cfg.num_attention_heads[n - 1],
                cfg.transformer_layers_per_block[n - 1],
                next_layer,
            )?,
            resnet_out: ResnetBlock::new(
                vb_mid.pp("resnets.1"),
                mid_c,
                mid_c,
                temb_c,
                groups,
                eps,
            )?,
        };

        Ok(Self {
            config: config.clone(),
            conv_in,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(groups, channels[0], eps, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(
                channels[0],
                cfg.out_channels,
                3,
                conv_cfg,
                vb.pp("conv_out"),
            )?,
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Predicts the model output for `sample` `[B, C, h, w]` at `timestep` given the text
    /// `context` `[B, tokens, D]`, with whatever `injections` the caller supplies.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        injections: &Injections,
    ) -> Result<Tensor> {
        let batch = sample.dim(0)?;
        let dtype = sample.dtype();
        let device = sample.device();
        let timesteps = Tensor::full(timestep as f32, batch, device)?;
        let t_features = timestep_features(
            &timesteps,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?
        .to_dtype(dtype)?;
        let temb = self.time_embedding.forward(&t_features)?;

        let mut xs = self.conv_in.forward(sample)?;
        let mut skips = vec![xs.clone()];
        let ip = injections.ip_layers;
        for (i, block) in self.down_blocks.iter().enumerate() {
            let feature = injections.down_block_features.and_then(|f| f.get(i));
            for (l, resnet) in block.resnets.iter().enumerate() {
                xs = resnet.forward(&xs, &temb)?;
                if let Some(attn) = block.attentions.get(l) {
                    xs = attn.forward(&xs, context, ip)?;
                }
                // T2I features: a cross-attention block adds them after its last
                // resnet/attention pair, before that output is kept as a skip.
                if l + 1 == block.resnets.len() && !block.attentions.is_empty() {
                    if let Some(f) = feature {
                        xs = (xs + f)?;
                    }
                }
                skips.push(xs.clone());
            }
            if let Some(down) = &block.downsampler {
                xs = down.forward(&xs)?;
                skips.push(xs.clone());
            }
            // A plain block adds them to its output in place, so its last skip carries them too.
            if block.attentions.is_empty() {
                if let Some(f) = feature {
                    xs = (xs + f)?;
                    if let Some(last) = skips.last_mut() {
                        *last = xs.clone();
                    }
                }
            }
        }

        if let Some(residuals) = injections.down_residuals {
            if residuals.len() != skips.len() {
                candle_core::bail!(
                    "expected {} down-block residuals, got {}",
                    skips.len(),
                    residuals.len()
                );
            }
            for (skip, residual) in skips.iter_mut().zip(residuals) {
                *skip = (&*skip + residual)?;
            }
        }

        let mid = &self.mid_block;
        xs = mid.resnet_in.forward(&xs, &temb)?;
        xs = mid.attention.forward(&xs, context, ip)?;
        xs = mid.resnet_out.forward(&xs, &temb)?;
        if let Some(residual) = injections.mid_residual {
            xs = (xs + residual)?;
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

        let xs = self.conv_norm_out.forward(&xs)?.silu()?;
        self.conv_out.forward(&xs)
    }
}
