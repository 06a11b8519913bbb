//! The encoder half shared by the UNet and ControlNet: input conv, timestep embedding, the
//! down blocks and the mid block, built from the same config and weight names.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::winograd::Conv3x3;

use super::attention::{IpKeyValue, SpatialTransformer, SpatialTransformerConfig};
use super::config::{DownBlockKind, UNetConfig};
use super::layers::{
    winograd_at_level, Downsample, ResnetBlock, TimestepEmbedding, TimestepFeatures,
};

pub(crate) fn transformer(
    vb: VarBuilder,
    cfg: &UNetConfig,
    channels: usize,
    heads: usize,
    depth: usize,
    first_layer: usize,
) -> Result<SpatialTransformer> {
    SpatialTransformer::new(
        vb,
        &SpatialTransformerConfig {
            channels,
            heads,
            depth,
            context_dim: cfg.cross_attention_dim,
            groups: cfg.norm_num_groups,
            use_linear_projection: cfg.use_linear_projection,
            first_layer,
        },
    )
}

pub(crate) fn time_embedding_channels(cfg: &UNetConfig) -> usize {
    cfg.block_out_channels[0] * 4
}

pub(crate) struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
    downsampler: Option<Downsample>,
}

pub(crate) struct MidBlock {
    resnet_in: ResnetBlock,
    attention: SpatialTransformer,
    resnet_out: ResnetBlock,
}

impl MidBlock {
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        ip: &[Vec<IpKeyValue>],
    ) -> Result<Tensor> {
        let xs = self.resnet_in.forward(xs, temb)?;
        let xs = self.attention.forward(&xs, context, ip)?;
        self.resnet_out.forward(&xs, temb)
    }
}

pub(crate) struct Encoder {
    conv_in: Conv3x3,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    pub(crate) mid_block: MidBlock,
    timestep_features: TimestepFeatures,
}

impl Encoder {
    /// `mid_first_layer` is the IP layer index of the mid block's first cross-attention
    /// (diffusers numbers down, then up, then mid).
    pub(crate) fn new(vb: &VarBuilder, cfg: &UNetConfig, mid_first_layer: usize) -> Result<Self> {
        let channels = &cfg.block_out_channels;
        let n = channels.len();
        let temb_c = time_embedding_channels(cfg);
        let (groups, eps) = (cfg.norm_num_groups, cfg.norm_eps);
        let conv_in = Conv3x3::new(cfg.in_channels, channels[0], 1, vb.pp("conv_in"))?;
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), channels[0], temb_c)?;

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
                    winograd_at_level(i, n),
                )?);
                if cfg.down_blocks[i] == DownBlockKind::CrossAttn {
                    let depth = cfg.transformer_layers_per_block[i];
                    attentions.push(transformer(
                        vb_block.pp("attentions").pp(l),
                        cfg,
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

        let mid_c = channels[n - 1];
        let vb_mid = vb.pp("mid_block");
        let mid_resnet = |name: &str| {
            let winograd = winograd_at_level(n - 1, n);
            ResnetBlock::new(vb_mid.pp(name), mid_c, mid_c, temb_c, groups, eps, winograd)
        };
        let mid_block = MidBlock {
            resnet_in: mid_resnet("resnets.0")?,
            attention: transformer(
                vb_mid.pp("attentions.0"),
                cfg,
                mid_c,
                cfg.num_attention_heads[n - 1],
                cfg.transformer_layers_per_block[n - 1],
                mid_first_layer,
            )?,
            resnet_out: mid_resnet("resnets.1")?,
        };
        Ok(Self {
            conv_in,
            time_embedding,
            down_blocks,
            mid_block,
            timestep_features: TimestepFeatures::new(
                channels[0],
                cfg.flip_sin_to_cos,
                cfg.freq_shift,
                vb.device(),
            )?,
        })
    }

    /// The time embedding `[batch, 4·C0]` for one (possibly fractional) timestep.
    pub(crate) fn time_embedding(&self, timestep: f64, like: &Tensor) -> Result<Tensor> {
        let batch = like.dim(0)?;
        let timesteps = Tensor::full(timestep as f32, batch, like.device())?;
        let features = self
            .timestep_features
            .forward(&timesteps)?
            .to_dtype(like.dtype())?;
        self.time_embedding.forward(&features)
    }

    pub(crate) fn conv_in(&self, sample: &Tensor) -> Result<Tensor> {
        self.conv_in.forward(sample)
    }

    /// Runs the down blocks on the `conv_in` output; returns the last hidden state and every
    /// skip tensor (the `conv_in` output first). `features` are T2I-Adapter additions.
    pub(crate) fn down(
        &self,
        mut xs: Tensor,
        temb: &Tensor,
        context: &Tensor,
        ip: &[Vec<IpKeyValue>],
        features: Option<&[Tensor]>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut skips = vec![xs.clone()];
        for (i, block) in self.down_blocks.iter().enumerate() {
            let feature = features.and_then(|f| f.get(i));
            for (l, resnet) in block.resnets.iter().enumerate() {
                xs = resnet.forward(&xs, temb)?;
                if let Some(attn) = block.attentions.get(l) {
                    xs = attn.forward(&xs, context, ip)?;
                }
                // T2I features: a cross-attention block adds them after its last
                // resnet/attention pair, before that output is kept as a skip.
                if l + 1 == block.resnets.len() && !block.attentions.is_empty() {
                    if let Some(f) = feature {
                        xs = xs.broadcast_add(f)?;
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
                    xs = xs.broadcast_add(f)?;
                    if let Some(last) = skips.last_mut() {
                        *last = xs.clone();
                    }
                }
            }
        }
        Ok((xs, skips))
    }
}
