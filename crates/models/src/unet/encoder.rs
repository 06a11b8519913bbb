//! The encoder half shared by the UNet and ControlNet: input conv, timestep embedding, the
//! down blocks and the mid block, built from the same config and weight names.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::winograd::Conv3x3;

use super::attention::{IpKeyValue, SpatialTransformer, SpatialTransformerConfig};
use super::config::{DownBlockKind, TextTimeEmbedding, UNetConfig};
use super::layers::{
    winograd_at_level, Downsample, ResnetBlock, TimestepEmbedding, TimestepFeatures,
};
use super::AddedConditioning;

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

/// SDXL's `add_time_proj` + `add_embedding`: pooled text embeddings and micro-conditioning time
/// ids mapped onto the time embedding.
struct AddedEmbedding {
    config: TextTimeEmbedding,
    time_proj: TimestepFeatures,
    embedding: TimestepEmbedding,
}

impl AddedEmbedding {
    /// `[B, 4·C0]` in `dtype` for `text_embeds` `[B, P]` and `time_ids` `[B, 6]`.
    fn forward(&self, added: &AddedConditioning, batch: usize, dtype: DType) -> Result<Tensor> {
        let ids = TextTimeEmbedding::TIME_IDS;
        let text_dim = self.config.text_embeds_dim();
        let (text_batch, width) = added.text_embeds.dims2()?;
        if (text_batch, width) != (batch, text_dim) {
            candle_core::bail!(
                "pooled text embeddings have shape [{text_batch}, {width}]; this UNet expects [{batch}, {text_dim}]"
            );
        }
        let (id_batch, count) = added.time_ids.dims2()?;
        if (id_batch, count) != (batch, ids) {
            candle_core::bail!(
                "time ids have shape [{id_batch}, {count}]; this UNet expects [{batch}, {ids}]"
            );
        }
        // diffusers: the sinusoids are f32 whatever the model dtype; the concatenation with the
        // pooled embedding is promoted to f32 and cast to the time embedding's dtype.
        let time = self
            .time_proj
            .forward(&added.time_ids.flatten_all()?)?
            .reshape((batch, ids * self.config.time_embed_dim))?;
        let input = Tensor::cat(&[&added.text_embeds.to_dtype(DType::F32)?, &time], 1)?;
        self.embedding.forward(&input.to_dtype(dtype)?)
    }
}

pub(crate) struct Encoder {
    conv_in: Conv3x3,
    time_embedding: TimestepEmbedding,
    added_embedding: Option<AddedEmbedding>,
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
        let added_embedding = match cfg.addition {
            None => None,
            Some(config) => Some(AddedEmbedding {
                config,
                time_proj: TimestepFeatures::new(
                    config.time_embed_dim,
                    cfg.flip_sin_to_cos,
                    cfg.freq_shift,
                    vb.device(),
                )?,
                embedding: TimestepEmbedding::new(
                    vb.pp("add_embedding"),
                    config.input_dim,
                    temb_c,
                )?,
            }),
        };

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
            added_embedding,
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

    /// The time embedding `[batch, 4·C0]` for one (possibly fractional) timestep, plus the
    /// added text/time embedding of `added` for a UNet that has one (SDXL). Giving `added` to
    /// a UNet without one, or none to a UNet with one, is an error.
    pub(crate) fn time_embedding(
        &self,
        timestep: f64,
        like: &Tensor,
        added: Option<&AddedConditioning>,
    ) -> Result<Tensor> {
        let batch = like.dim(0)?;
        let timesteps = Tensor::full(timestep as f32, batch, like.device())?;
        let features = self
            .timestep_features
            .forward(&timesteps)?
            .to_dtype(like.dtype())?;
        let temb = self.time_embedding.forward(&features)?;
        match (&self.added_embedding, added) {
            (None, None) => Ok(temb),
            (Some(embedding), Some(added)) => {
                let dtype = temb.dtype();
                temb + embedding.forward(added, batch, dtype)?
            }
            (Some(_), None) => candle_core::bail!(
                "this UNet has an added text/time embedding (SDXL's `addition_embed_type: text_time`) and needs pooled text embeddings and time ids"
            ),
            (None, Some(_)) => candle_core::bail!(
                "pooled text embeddings and time ids were given to a UNet without an added embedding (SD1.x / SD2.x)"
            ),
        }
    }

    pub(crate) fn down_block_count(&self) -> usize {
        self.down_blocks.len()
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
