//! ControlNet (diffusers `ControlNetModel`): a copy of the UNet's encoder half that also reads a
//! control image, and returns one residual per skip connection of the frozen UNet plus one for
//! its mid block (`Injections::down_residuals` / `mid_residual`). SDXL ControlNets also read the
//! base's added text/time conditioning.
//!
//! Union models (diffusers `ControlNetUnionModel`, xinsir's `controlnet-union-sdxl-1.0` and
//! ProMax) take several condition types in one model: each control image is tagged with its
//! type, a small transformer fuses the images' pooled embeddings with the latents', and the
//! set of types present is embedded onto the time embedding ([`UnionParts`]).
//!
//! Loads from a diffusers folder (`config.json` + `diffusion_pytorch_model.*`) or from an
//! original single file (`control_*.pth` / `.safetensors`, keys under `control_model.` or bare),
//! whose config is the base UNet's plus what the tensors tell.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{conv2d, Conv2d, VarBuilder};
use serde::Deserialize;

use crate::error::{ModelError, Result};
use crate::single_file::{
    controlnet_key_from_original, layers_per_block_from_input_blocks, numbered_children,
    RenamedWeights, CONTROLNET_PREFIX,
};
use crate::unet::encoder::Encoder;
use crate::unet::layers::{TimestepEmbedding, TimestepFeatures};
use crate::unet::winograd::Conv3x3;
use crate::unet::{multi_head_attention, DownBlockKind, IpKeyValue, TextContext, UNetConfig};
use crate::weights::{find_component_weights, WeightStore};

/// Channel order the control image is expected in; `Bgr` models get it flipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelOrder {
    Rgb,
    Bgr,
}

/// The ControlNet-only fields of `config.json` (the UNet-like ones are read by `UNetConfig`).
#[derive(Debug, Deserialize)]
struct RawControlNetFields {
    #[serde(rename = "_class_name", default)]
    class_name: Option<String>,
    #[serde(default = "default_conditioning_channels")]
    conditioning_channels: usize,
    /// diffusers' default when absent (or null).
    #[serde(default)]
    conditioning_embedding_out_channels: Option<Vec<usize>>,
    #[serde(default)]
    global_pool_conditions: bool,
    #[serde(default)]
    controlnet_conditioning_channel_order: Option<String>,
    #[serde(default)]
    num_control_type: Option<usize>,
    #[serde(default)]
    num_trans_channel: Option<usize>,
    #[serde(default)]
    num_trans_head: Option<usize>,
    #[serde(default)]
    num_trans_layer: Option<usize>,
    #[serde(default)]
    num_proj_channel: Option<usize>,
    #[serde(default)]
    addition_time_embed_dim: Option<usize>,
}

/// The union-only settings of a `ControlNetUnionModel` config (diffusers' defaults where absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnionConfig {
    /// Condition types the model knows (6 for xinsir's union model, 8 for ProMax).
    pub num_control_type: usize,
    /// Width of the fusion transformer (= the first block's width).
    pub num_trans_channel: usize,
    pub num_trans_head: usize,
    pub num_trans_layer: usize,
    /// Width of the per-condition offset added to its embedding (= the first block's width).
    pub num_proj_channel: usize,
    /// Sinusoid width of each entry of the control-type vector.
    pub type_embed_dim: usize,
}

/// The condition types of xinsir's union models as diffusers documents them (`control_mode`),
/// by the names a recipe uses; the first name of each index is the canonical one.
pub const UNION_TYPES: &[(&str, usize)] = &[
    ("openpose", 0),
    ("pose", 0),
    ("depth", 1),
    ("hed", 2),
    ("pidi", 2),
    ("scribble", 2),
    ("ted", 2),
    ("softedge", 2),
    ("canny", 3),
    ("lineart", 3),
    ("anime_lineart", 3),
    ("mlsd", 3),
    ("normal", 4),
    ("segment", 5),
    ("seg", 5),
    ("tile", 6),
    ("repaint", 7),
    ("inpaint", 7),
];

/// The condition type names a union model with `num_control_type` types accepts.
pub fn union_type_names(num_control_type: usize) -> String {
    UNION_TYPES
        .iter()
        .filter(|(_, i)| *i < num_control_type)
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `control_mode` index of a union condition type named in a recipe, for a model with
/// `num_control_type` types; the error lists the valid names.
pub fn union_type_index(name: &str, num_control_type: usize) -> std::result::Result<usize, String> {
    match UNION_TYPES.iter().find(|(n, _)| *n == name) {
        Some((_, i)) if *i < num_control_type => Ok(*i),
        Some((_, i)) => Err(format!(
            "union condition type `{name}` (index {i}) needs a model with more than {num_control_type} types (ProMax has 8); this one knows: {}",
            union_type_names(num_control_type)
        )),
        None => Err(format!(
            "unknown union condition type `{name}` (valid: {})",
            union_type_names(num_control_type)
        )),
    }
}

fn default_conditioning_channels() -> usize {
    3
}

const DEFAULT_CONDITIONING_EMBEDDING_OUT_CHANNELS: [usize; 4] = [16, 32, 96, 256];
const UNION_CONDITIONING_EMBEDDING_OUT_CHANNELS: [usize; 4] = [48, 96, 192, 384];

#[derive(Debug, Clone)]
pub struct ControlNetConfig {
    /// The UNet-like part: `conv_in`, time embedding, down and mid blocks (no up blocks).
    pub encoder: UNetConfig,
    /// Channels of the control image (3 for RGB hints).
    pub conditioning_channels: usize,
    /// Widths of the control-image embedding's levels; each level after the first halves the size.
    pub conditioning_embedding_out_channels: Vec<usize>,
    /// Shuffle-type models: every residual is averaged over space.
    pub global_pool_conditions: bool,
    pub channel_order: ChannelOrder,
    /// `Some` for union models (`ControlNetUnionModel`).
    pub union: Option<UnionConfig>,
    /// The file the config came from (`config.json`, or the single weight file), for messages.
    pub source: PathBuf,
}

impl ControlNetConfig {
    /// Reads `config.json` of a diffusers `ControlNetModel` folder.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_json_str(&crate::error::read_text(path)?, path)
    }

    /// Parses and validates a config; errors name `path` and the offending field.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        const WHAT: &str = "a ControlNetModel config";
        let err = |message: String| ModelError::Config {
            path: path.to_path_buf(),
            message,
        };
        let raw: RawControlNetFields =
            serde_json::from_str(text).map_err(|source| ModelError::Json {
                path: path.to_path_buf(),
                what: WHAT,
                source,
            })?;
        // xinsir's union folders say `ControlNetModel_Union` (their own class); diffusers reads
        // them as `ControlNetUnionModel`.
        let is_union = match raw.class_name.as_deref() {
            None | Some("ControlNetModel") => false,
            Some("ControlNetUnionModel") | Some("ControlNetModel_Union") => true,
            Some(class) => {
                return Err(err(format!(
                "`_class_name` is `{class}`, expected `ControlNetModel` or `ControlNetUnionModel`"
            )))
            }
        };
        let encoder = UNetConfig::encoder_only_from_json_str(text, path, WHAT)?;
        let union = if is_union {
            let width = encoder.block_out_channels[0];
            let union = UnionConfig {
                num_control_type: raw.num_control_type.unwrap_or(6),
                num_trans_channel: raw.num_trans_channel.unwrap_or(320),
                num_trans_head: raw.num_trans_head.unwrap_or(8),
                num_trans_layer: raw.num_trans_layer.unwrap_or(1),
                num_proj_channel: raw.num_proj_channel.unwrap_or(320),
                type_embed_dim: raw.addition_time_embed_dim.ok_or_else(|| {
                    err("a union ControlNet needs `addition_time_embed_dim` (its control-type embedding uses it)".to_string())
                })?,
            };
            if union.num_trans_channel != width || union.num_proj_channel != width {
                return Err(err(format!(
                    "`num_trans_channel` {} and `num_proj_channel` {} must equal the first block's width {width}",
                    union.num_trans_channel, union.num_proj_channel
                )));
            }
            if union.num_control_type == 0
                || union.num_trans_head == 0
                || !union.num_trans_channel.is_multiple_of(union.num_trans_head)
            {
                return Err(err(format!(
                    "`num_control_type` {} / `num_trans_head` {} do not fit a fusion transformer of width {}",
                    union.num_control_type, union.num_trans_head, union.num_trans_channel
                )));
            }
            Some(union)
        } else {
            None
        };
        let channel_order = match raw.controlnet_conditioning_channel_order.as_deref() {
            None | Some("rgb") => ChannelOrder::Rgb,
            Some("bgr") => ChannelOrder::Bgr,
            Some(other) => {
                return Err(err(format!(
                    "unknown `controlnet_conditioning_channel_order` `{other}` (rgb or bgr)"
                )))
            }
        };
        let conditioning_embedding_out_channels =
            raw.conditioning_embedding_out_channels.unwrap_or_else(|| {
                if union.is_some() {
                    UNION_CONDITIONING_EMBEDDING_OUT_CHANNELS.to_vec()
                } else {
                    DEFAULT_CONDITIONING_EMBEDDING_OUT_CHANNELS.to_vec()
                }
            });
        if union.is_some() && channel_order != ChannelOrder::Rgb {
            return Err(err(
                "a union ControlNet takes RGB control images only (diffusers refuses `bgr`)"
                    .to_string(),
            ));
        }
        if conditioning_embedding_out_channels.is_empty() {
            return Err(err(
                "`conditioning_embedding_out_channels` is empty".to_string()
            ));
        }
        if raw.conditioning_channels == 0 {
            return Err(err("`conditioning_channels` is 0".to_string()));
        }
        Ok(Self {
            encoder,
            conditioning_channels: raw.conditioning_channels,
            conditioning_embedding_out_channels,
            global_pool_conditions: raw.global_pool_conditions,
            channel_order,
            union,
            source: path.to_path_buf(),
        })
    }

    /// The config of an original single-file ControlNet: sizes from the tensor shapes (no
    /// data is loaded), the rest (head counts, norms, time embedding) from the `base` UNet it
    /// is meant for. `global_pool_conditions` (true for shuffle models) is not recorded in
    /// the file. Refuses a file made for another base (see [`check_compatible`]).
    pub fn from_single_file(
        path: &Path,
        base: &UNetConfig,
        global_pool_conditions: bool,
    ) -> Result<Self> {
        let weights = open_single_file(path)?;
        let config = config_from_tensors(&weights, path, base, global_pool_conditions)?;
        check_compatible(&config, base)?;
        Ok(config)
    }

    /// The number of down residuals (= skip connections of the matching UNet; 12 for SD1.5).
    pub fn down_residuals(&self) -> usize {
        self.encoder.skip_channels().len()
    }
}

/// Checks, from configs only, that a ControlNet fits `base`: same context width, same
/// levels and layers (so its residuals match the UNet's skip tensors one for one), and the
/// base's latent channels.
pub fn check_compatible(controlnet: &ControlNetConfig, base: &UNetConfig) -> Result<()> {
    let cn = &controlnet.encoder;
    let mismatch = |field: &'static str, found: String, expected: String| {
        Err(ModelError::Incompatible {
            what: "ControlNet",
            path: controlnet.source.clone(),
            field,
            found,
            expected,
        })
    };
    if cn.cross_attention_dim != base.cross_attention_dim {
        return mismatch(
            "cross_attention_dim",
            cn.cross_attention_dim.to_string(),
            base.cross_attention_dim.to_string(),
        );
    }
    if cn.block_out_channels != base.block_out_channels {
        return mismatch(
            "block_out_channels",
            format!("{:?}", cn.block_out_channels),
            format!("{:?}", base.block_out_channels),
        );
    }
    if cn.layers_per_block != base.layers_per_block {
        return mismatch(
            "layers_per_block",
            format!("{:?}", cn.layers_per_block),
            format!("{:?}", base.layers_per_block),
        );
    }
    // The ControlNet reads the plain latents, also for bases whose UNet takes extra input
    // channels (inpainting: 9 in, 4 out).
    if cn.in_channels != base.out_channels {
        return mismatch(
            "latent channels",
            cn.in_channels.to_string(),
            base.out_channels.to_string(),
        );
    }
    Ok(())
}

/// What one ControlNet evaluation adds to the UNet, already scaled.
#[derive(Debug, Clone)]
pub struct ControlNetResiduals {
    /// One per UNet skip tensor, in the UNet's order.
    pub down: Vec<Tensor>,
    pub mid: Tensor,
}

/// `ControlNetConditioningEmbedding`: the control image down to latent size and the UNet's
/// first width, SiLU after every conv but the last.
struct ConditioningEmbedding {
    conv_in: Conv3x3,
    blocks: Vec<Conv3x3>,
    conv_out: Conv3x3,
}

impl ConditioningEmbedding {
    fn new(
        vb: VarBuilder,
        in_channels: usize,
        channels: &[usize],
        out_channels: usize,
    ) -> candle_core::Result<Self> {
        // Stride-1 convs take the Winograd path on the CPU; the stride-2 ones candle's conv2d.
        let conv = Conv3x3::new;
        let conv_in = conv(in_channels, channels[0], 1, vb.pp("conv_in"))?;
        let mut blocks = Vec::with_capacity(2 * channels.len());
        for (i, pair) in channels.windows(2).enumerate() {
            let (c, next) = (pair[0], pair[1]);
            blocks.push(conv(c, c, 1, vb.pp("blocks").pp(2 * i))?);
            blocks.push(conv(c, next, 2, vb.pp("blocks").pp(2 * i + 1))?);
        }
        let last = channels[channels.len() - 1];
        let conv_out = conv(last, out_channels, 1, vb.pp("conv_out"))?;
        Ok(Self {
            conv_in,
            blocks,
            conv_out,
        })
    }
}

impl Module for ConditioningEmbedding {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?.silu()?;
        for block in &self.blocks {
            xs = block.forward(&xs)?.silu()?;
        }
        self.conv_out.forward(&xs)
    }
}

/// One block of the union models' fusion transformer (OpenAI CLIP's `ResidualAttentionBlock`:
/// pre-norm `nn.MultiheadAttention` and a QuickGELU MLP).
///
/// Its `nn.MultiheadAttention` is not batch-first, but is given `[batch, conditions, C]`: it
/// attends across the *batch* for each condition slot (with guidance, the unconditional and
/// conditional rows see each other). Kept as diffusers and xinsir's code compute it.
struct FusionBlock {
    ln_1: candle_nn::LayerNorm,
    in_proj: candle_nn::Linear,
    out_proj: candle_nn::Linear,
    ln_2: candle_nn::LayerNorm,
    c_fc: candle_nn::Linear,
    c_proj: candle_nn::Linear,
    heads: usize,
}

impl FusionBlock {
    fn new(vb: VarBuilder, width: usize, heads: usize) -> candle_core::Result<Self> {
        let attn = vb.pp("attn");
        let in_proj = candle_nn::Linear::new(
            attn.get((3 * width, width), "in_proj_weight")?,
            Some(attn.get(3 * width, "in_proj_bias")?),
        );
        Ok(Self {
            ln_1: candle_nn::layer_norm(width, 1e-5, vb.pp("ln_1"))?,
            in_proj,
            out_proj: candle_nn::linear(width, width, attn.pp("out_proj"))?,
            ln_2: candle_nn::layer_norm(width, 1e-5, vb.pp("ln_2"))?,
            c_fc: candle_nn::linear(width, 4 * width, vb.pp("mlp").pp("c_fc"))?,
            c_proj: candle_nn::linear(4 * width, width, vb.pp("mlp").pp("c_proj"))?,
            heads,
        })
    }

    /// `xs` `[B, L, C]`.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let width = xs.dim(2)?;
        // Sequence = the batch axis: attend over dim 0 for each of the L slots.
        let seq_first = self.ln_1.forward(xs)?.transpose(0, 1)?.contiguous()?;
        let qkv = self.in_proj.forward(&seq_first)?;
        let q = qkv.narrow(2, 0, width)?.contiguous()?;
        let k = qkv.narrow(2, width, width)?.contiguous()?;
        let v = qkv.narrow(2, 2 * width, width)?.contiguous()?;
        let attended = multi_head_attention(&q, &k, &v, self.heads)?;
        let attended = self.out_proj.forward(&attended)?.transpose(0, 1)?;
        let xs = (xs + attended)?;
        let h = self.c_fc.forward(&self.ln_2.forward(&xs)?)?;
        let h = (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?;
        xs + self.c_proj.forward(&h)?
    }
}

/// What a union model has besides a plain ControlNet.
struct UnionParts {
    config: UnionConfig,
    /// `[num_control_type, C]`: added to each condition's pooled embedding.
    task_embedding: Tensor,
    /// `transformer_layes` (sic, diffusers' name).
    fusion: Vec<FusionBlock>,
    spatial_ch_projs: candle_nn::Linear,
    control_type_proj: TimestepFeatures,
    control_add_embedding: TimestepEmbedding,
}

impl UnionParts {
    fn new(
        vb: &VarBuilder,
        config: UnionConfig,
        encoder: &UNetConfig,
        time_embed_dim: usize,
    ) -> candle_core::Result<Self> {
        let width = config.num_trans_channel;
        Ok(Self {
            task_embedding: vb.get((config.num_control_type, width), "task_embedding")?,
            fusion: (0..config.num_trans_layer)
                .map(|i| {
                    FusionBlock::new(
                        vb.pp("transformer_layes").pp(i),
                        width,
                        config.num_trans_head,
                    )
                })
                .collect::<candle_core::Result<Vec<_>>>()?,
            spatial_ch_projs: candle_nn::linear(
                width,
                config.num_proj_channel,
                vb.pp("spatial_ch_projs"),
            )?,
            control_type_proj: TimestepFeatures::new(
                config.type_embed_dim,
                encoder.flip_sin_to_cos,
                encoder.freq_shift,
                vb.device(),
            )?,
            control_add_embedding: TimestepEmbedding::new(
                vb.pp("control_add_embedding"),
                config.type_embed_dim * config.num_control_type,
                time_embed_dim,
            )?,
            config,
        })
    }

    /// The embedding of the set of condition types present, `[batch, 4·C0]`: each entry of
    /// the 0/1 type vector as sinusoids, concatenated, through `control_add_embedding`.
    fn type_embedding(
        &self,
        types: &[usize],
        batch: usize,
        like: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let mut present = vec![0f32; self.config.num_control_type];
        for &t in types {
            present[t] = 1.0;
        }
        let present = Tensor::from_vec(present, self.config.num_control_type, like.device())?;
        let features = self
            .control_type_proj
            .forward(&present)?
            .reshape((1, self.config.num_control_type * self.config.type_embed_dim))?
            .to_dtype(like.dtype())?;
        self.control_add_embedding
            .forward(&features)?
            .broadcast_as((batch, like.dim(1)?))?
            .contiguous()
    }
}

/// One control image for one ControlNet evaluation.
#[derive(Debug, Clone, Copy)]
pub struct ControlCondition<'a> {
    /// `[1 or B, conditioning_channels, 8h, 8w]` in [0, 1].
    pub image: &'a Tensor,
    /// Union models: the condition's type index (`control_mode`); `None` for plain models.
    pub union_type: Option<usize>,
    /// This condition's conditioning scale at this step.
    pub scale: f64,
}

pub struct ControlNetModel {
    config: ControlNetConfig,
    encoder: Encoder,
    cond_embedding: ConditioningEmbedding,
    /// `controlnet_down_blocks`: a 1×1 conv per skip tensor.
    down_convs: Vec<Conv2d>,
    /// `controlnet_mid_block`.
    mid_conv: Conv2d,
    union: Option<UnionParts>,
}

/// ControlNets never see image-prompt tokens (diffusers passes them text embeddings only).
const NO_IP: &[Vec<IpKeyValue>] = &[];

impl ControlNetModel {
    pub fn new(vb: VarBuilder, config: &ControlNetConfig) -> candle_core::Result<Self> {
        let cfg = &config.encoder;
        // ControlNets never see image tokens, so the IP layer numbering is irrelevant here.
        let encoder = Encoder::new(&vb, cfg, 0)?;
        let cond_embedding = ConditioningEmbedding::new(
            vb.pp("controlnet_cond_embedding"),
            config.conditioning_channels,
            &config.conditioning_embedding_out_channels,
            cfg.block_out_channels[0],
        )?;
        let down_convs = cfg
            .skip_channels()
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                conv2d(
                    c,
                    c,
                    1,
                    Default::default(),
                    vb.pp("controlnet_down_blocks").pp(i),
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mid_c = cfg.block_out_channels[cfg.block_out_channels.len() - 1];
        let mid_conv = conv2d(
            mid_c,
            mid_c,
            1,
            Default::default(),
            vb.pp("controlnet_mid_block"),
        )?;
        let union = config
            .union
            .map(|u| UnionParts::new(&vb, u, cfg, 4 * cfg.block_out_channels[0]))
            .transpose()?;
        Ok(Self {
            config: config.clone(),
            encoder,
            cond_embedding,
            down_convs,
            mid_conv,
            union,
        })
    }

    /// Loads the weights of a diffusers folder (`diffusion_pytorch_model[.variant].safetensors`
    /// or `.bin`); `config` usually comes from [`ControlNetConfig::from_folder`].
    pub fn load_folder(
        dir: &Path,
        config: &ControlNetConfig,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let files = find_component_weights(dir, "diffusion_pytorch_model", variant)?;
        let vb = WeightStore::open(&files)?.var_builder(dtype, device);
        Ok(Self::new(vb, config)?)
    }

    /// Loads an original single file; `config` comes from [`ControlNetConfig::from_single_file`].
    pub fn load_single_file(
        path: &Path,
        config: &ControlNetConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let vb = open_single_file(path)?.var_builder(dtype, device);
        Ok(Self::new(vb, config)?)
    }

    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    /// The control image embedded to the first block's width, checked against the latents'.
    fn embed_condition(&self, image: &Tensor, like: &Tensor) -> candle_core::Result<Tensor> {
        let image = match self.config.channel_order {
            ChannelOrder::Rgb => image.clone(),
            ChannelOrder::Bgr => image.flip(&[1])?,
        };
        let hint = self.cond_embedding.forward(&image)?;
        if hint.dims()[1..] != like.dims()[1..] {
            candle_core::bail!(
                "the control image {:?} embeds to {:?}, but the latents give {:?}: the control \
                 image must be {}× the latent size",
                image.dims(),
                hint.dims(),
                like.dims(),
                1usize << (self.config.conditioning_embedding_out_channels.len() - 1)
            );
        }
        Ok(hint)
    }

    /// Residuals for the UNet at `timestep`, given the (scaled) latents `sample` `[B, C, h, w]`,
    /// the text `context` (`[B, tokens, D]`, with the base's added conditioning for SDXL) and
    /// the control images (batch 1 broadcasts).
    ///
    /// A plain ControlNet takes exactly one condition, without a type. As diffusers'
    /// `ControlNetModel.forward`: every residual × the condition's scale; in guess mode the
    /// down residuals are weighted 0.1 … 1.0 geometrically (the mid one 1.0), except for
    /// `global_pool_conditions` models, which diffusers scales uniformly. Running only the
    /// conditional half under guidance is the caller's part.
    ///
    /// A union model takes one or more typed conditions, as diffusers'
    /// `ControlNetUnionModel.forward` with `control_mode` = their types: with one condition
    /// the residuals are scaled as a plain model's; with several, each condition's embedding
    /// is scaled instead and the residuals are not (diffusers' `from_multi=False`).
    pub fn forward<'c>(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: impl Into<TextContext<'c>>,
        conditions: &[ControlCondition],
        guess_mode: bool,
    ) -> candle_core::Result<ControlNetResiduals> {
        let TextContext {
            hidden: context,
            added,
        } = context.into();
        let _param_cache = crate::unet::cuda_ops::DeviceParamCache::enable(sample.device());
        let mut temb = self.encoder.time_embedding(timestep, sample, added)?;
        let xs = self.encoder.conv_in(sample)?;
        let (xs, residual_scale) = match (&self.union, conditions) {
            (None, [condition]) => {
                if condition.union_type.is_some() {
                    candle_core::bail!(
                        "a condition type was given to a ControlNet that is not a union model"
                    );
                }
                let hint = self.embed_condition(condition.image, &xs)?;
                (xs.broadcast_add(&hint)?, Some(condition.scale))
            }
            (None, _) => candle_core::bail!(
                "a ControlNet takes one control image per evaluation, got {}",
                conditions.len()
            ),
            (Some(union), _) => {
                let types = conditions
                    .iter()
                    .map(|c| {
                        c.union_type.filter(|&t| t < union.config.num_control_type).ok_or_else(|| {
                            candle_core::Error::Msg(format!(
                                "a union ControlNet needs a condition type below {} for each control image",
                                union.config.num_control_type
                            ))
                        })
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                if types.is_empty() {
                    candle_core::bail!("a union ControlNet needs at least one control image");
                }
                if guess_mode {
                    candle_core::bail!("guess mode is not supported for union ControlNets");
                }
                let batch = xs.dim(0)?;
                let type_embedding = union.type_embedding(&types, batch, &temb)?;
                temb = (temb + type_embedding)?;
                let several = conditions.len() > 1;
                let mut slots = Vec::with_capacity(conditions.len() + 1);
                let mut embedded = Vec::with_capacity(conditions.len());
                for (condition, &t) in conditions.iter().zip(&types) {
                    let hint = self.embed_condition(condition.image, &xs)?;
                    let hint = hint.broadcast_as(xs.shape())?.contiguous()?;
                    let pooled = hint
                        .mean((2, 3))?
                        .broadcast_add(&union.task_embedding.get(t)?.unsqueeze(0)?)?;
                    if several {
                        slots.push((pooled * condition.scale)?);
                        embedded.push((hint * condition.scale)?);
                    } else {
                        slots.push(pooled);
                        embedded.push(hint);
                    }
                }
                slots.push(xs.mean((2, 3))?);
                let mut fused = Tensor::stack(&slots, 1)?;
                for block in &union.fusion {
                    fused = block.forward(&fused)?;
                }
                let mut fuser = xs.zeros_like()?;
                for (i, (hint, condition)) in embedded.iter().zip(conditions).enumerate() {
                    let alpha = union.spatial_ch_projs.forward(&fused.get_on_dim(1, i)?)?;
                    let alpha = if several {
                        (alpha * condition.scale)?
                    } else {
                        alpha
                    };
                    let alpha = alpha.unsqueeze(2)?.unsqueeze(3)?;
                    fuser = (fuser + hint.broadcast_add(&alpha)?)?;
                }
                let xs = (&xs + fuser)?;
                (xs, (!several).then(|| conditions[0].scale))
            }
        };
        let (xs, skips) = self.encoder.down(xs, &temb, context, NO_IP, None)?;
        let mid = self.encoder.mid_block.forward(&xs, &temb, context, NO_IP)?;

        let down = skips
            .iter()
            .zip(&self.down_convs)
            .map(|(skip, conv)| conv.forward(skip))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mid = self.mid_conv.forward(&mid)?;

        let (mut down, mut mid) = match residual_scale {
            Some(scale) => {
                let weights = residual_weights(
                    down.len(),
                    scale,
                    guess_mode,
                    self.config.global_pool_conditions,
                );
                let down = down
                    .iter()
                    .zip(&weights)
                    .map(|(r, &w)| r.affine(w, 0.0))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let mid = mid.affine(weights[weights.len() - 1], 0.0)?;
                (down, mid)
            }
            None => (down, mid),
        };
        if self.config.global_pool_conditions {
            for r in down.iter_mut() {
                *r = r.mean_keepdim((2, 3))?;
            }
            mid = mid.mean_keepdim((2, 3))?;
        }
        Ok(ControlNetResiduals { down, mid })
    }
}

/// The factor of each of `n_down` down residuals, then of the mid residual, as diffusers
/// applies them: uniform, or in guess mode `logspace(-1, 0, n_down + 1)` (0.1 … 1.0) — but
/// never for `global_pool_conditions` models, whose pipelines force guess mode.
fn residual_weights(
    n_down: usize,
    conditioning_scale: f64,
    guess_mode: bool,
    global_pool_conditions: bool,
) -> Vec<f64> {
    (0..=n_down)
        .map(|i| {
            if guess_mode && !global_pool_conditions {
                10f64.powf(-1.0 + i as f64 / n_down as f64) * conditioning_scale
            } else {
                conditioning_scale
            }
        })
        .collect()
}

/// Opens a single ControlNet file and names its tensors as diffusers does.
fn open_single_file(path: &Path) -> Result<RenamedWeights> {
    let store = WeightStore::open(&[path.to_path_buf()])?;
    let names = store.tensor_names();
    // With the prefix, the file may bundle other models (e.g. a base UNet): only the
    // prefixed tensors are the ControlNet's.
    let prefixed = names.iter().any(|n| n.starts_with(CONTROLNET_PREFIX));
    let keys: Vec<(&str, &str)> = names
        .iter()
        .filter_map(|full| {
            if prefixed {
                full.strip_prefix(CONTROLNET_PREFIX)
                    .map(|k| (full.as_str(), k))
            } else {
                Some((full.as_str(), full.as_str()))
            }
        })
        .collect();
    let not_controlnet = |why: String| {
        ModelError::Weights(format!(
            "{}: not a ControlNet checkpoint: {why}",
            path.display()
        ))
    };
    let stripped = || keys.iter().map(|(_, k)| *k);

    let to_original: HashMap<String, String> = if stripped()
        .any(|k| k.starts_with("controlnet_cond_embedding."))
    {
        // Already in diffusers' names (as some redistributed single files are).
        keys.iter()
            .map(|(full, k)| (k.to_string(), full.to_string()))
            .collect()
    } else {
        let hint_convs = numbered_children(stripped(), "input_hint_block.");
        if hint_convs.is_empty() {
            return Err(not_controlnet(format!(
                "no `{CONTROLNET_PREFIX}input_hint_block.*` or `controlnet_cond_embedding.*` tensors"
            )));
        }
        let input_blocks = numbered_children(stripped(), "input_blocks.");
        if input_blocks.iter().enumerate().any(|(i, &b)| i != b) {
            return Err(not_controlnet(format!(
                "`input_blocks` are not numbered 0..{}: {input_blocks:?}",
                input_blocks.len()
            )));
        }
        let downsamplers: Vec<usize> = input_blocks
            .iter()
            .copied()
            .filter(|i| {
                let op = format!("input_blocks.{i}.0.op.weight");
                stripped().any(|k| k == op)
            })
            .collect();
        let layers_per_block =
            layers_per_block_from_input_blocks(input_blocks.len(), &downsamplers).ok_or_else(
                || {
                    not_controlnet(format!(
                "{} `input_blocks` with downsamplers at {downsamplers:?} do not form levels",
                input_blocks.len()
            ))
                },
            )?;
        keys.iter()
            .filter_map(|(full, k)| {
                controlnet_key_from_original(k, &layers_per_block, &hint_convs)
                    .map(|d| (d, full.to_string()))
            })
            .collect()
    };
    Ok(RenamedWeights::new(store, to_original))
}

/// A ControlNet config from the shapes of a single file's tensors (diffusers names), with the
/// settings tensors do not record taken from `base`.
fn config_from_tensors(
    weights: &RenamedWeights,
    path: &Path,
    base: &UNetConfig,
    global_pool_conditions: bool,
) -> Result<ControlNetConfig> {
    let shape = |name: &str| -> Result<Vec<usize>> {
        weights.shape(name).ok_or_else(|| {
            ModelError::Weights(format!(
                "{}: no tensor for `{name}` (diffusers name) in the ControlNet file",
                path.display()
            ))
        })
    };
    let names: Vec<&str> = weights.names().collect();
    let children = |prefix: &str| numbered_children(names.iter().copied(), prefix);

    let conv_in = shape("conv_in.weight")?;
    let levels = children("down_blocks.").len();
    if levels == 0 {
        return Err(ModelError::Weights(format!(
            "{}: the ControlNet file has no down blocks",
            path.display()
        )));
    }
    let mut block_out_channels = Vec::with_capacity(levels);
    let mut layers_per_block = Vec::with_capacity(levels);
    let mut down_blocks = Vec::with_capacity(levels);
    let mut transformer_layers_per_block = Vec::with_capacity(levels);
    for b in 0..levels {
        layers_per_block.push(children(&format!("down_blocks.{b}.resnets.")).len());
        block_out_channels.push(shape(&format!("down_blocks.{b}.resnets.0.conv1.weight"))?[0]);
        let depth = children(&format!("down_blocks.{b}.attentions.0.transformer_blocks.")).len();
        down_blocks.push(if depth > 0 {
            DownBlockKind::CrossAttn
        } else {
            DownBlockKind::Plain
        });
        transformer_layers_per_block.push(depth.max(1));
    }
    // The mid block's transformer depth is the last level's entry (unused by a plain level).
    let mid_depth = children("mid_block.attentions.0.transformer_blocks.").len();
    if down_blocks[levels - 1] == DownBlockKind::Plain {
        transformer_layers_per_block[levels - 1] = mid_depth.max(1);
    }
    let cross_attention_dim =
        shape("mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight")?[1];
    let use_linear_projection = shape("mid_block.attentions.0.proj_in.weight")?.len() == 2;
    let num_attention_heads = (0..levels)
        .map(|b| {
            let heads = &base.num_attention_heads;
            heads.get(b).or(heads.last()).copied().unwrap_or(1)
        })
        .collect();

    let hint_in = shape("controlnet_cond_embedding.conv_in.weight")?;
    let hint_blocks = children("controlnet_cond_embedding.blocks.").len();
    if hint_blocks % 2 != 0 {
        return Err(ModelError::Weights(format!(
            "{}: the control-image embedding has {hint_blocks} inner convolutions, expected pairs",
            path.display()
        )));
    }
    let mut conditioning_embedding_out_channels = vec![hint_in[0]];
    for k in 0..hint_blocks / 2 {
        conditioning_embedding_out_channels.push(
            shape(&format!(
                "controlnet_cond_embedding.blocks.{}.weight",
                2 * k + 1
            ))?[0],
        );
    }

    let encoder = UNetConfig {
        in_channels: conv_in[1],
        block_out_channels,
        down_blocks,
        up_blocks: Vec::new(),
        layers_per_block,
        cross_attention_dim,
        num_attention_heads,
        transformer_layers_per_block,
        use_linear_projection,
        ..base.clone()
    };
    Ok(ControlNetConfig {
        encoder,
        conditioning_channels: hint_in[1],
        conditioning_embedding_out_channels,
        global_pool_conditions,
        channel_order: ChannelOrder::Rgb,
        union: None,
        source: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD15_CONTROLNET: &str = r#"{
        "_class_name": "ControlNetModel",
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                             "CrossAttnDownBlock2D", "DownBlock2D"],
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "conditioning_embedding_out_channels": [16, 32, 96, 256],
        "global_pool_conditions": false,
        "controlnet_conditioning_channel_order": "rgb",
        "mid_block_type": "UNetMidBlock2DCrossAttn"
    }"#;

    fn sd15_controlnet(text: &str) -> Result<ControlNetConfig> {
        ControlNetConfig::from_json_str(text, Path::new("cn/config.json"))
    }

    #[test]
    fn sd15_config_has_twelve_residuals() {
        let cfg = sd15_controlnet(SD15_CONTROLNET).unwrap();
        assert_eq!(cfg.down_residuals(), 12);
        assert_eq!(cfg.encoder.up_blocks.len(), 0);
        assert_eq!(
            cfg.encoder.skip_channels(),
            [320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280]
        );
        assert_eq!(cfg.conditioning_channels, 3);
        assert_eq!(cfg.channel_order, ChannelOrder::Rgb);
    }

    #[test]
    fn other_base_is_refused_naming_both_values() {
        let cn = sd15_controlnet(&SD15_CONTROLNET.replace("768", "1024")).unwrap();
        let base = sd15_controlnet(SD15_CONTROLNET).unwrap().encoder;
        let message = check_compatible(&cn, &base).unwrap_err().to_string();
        assert_eq!(
            message,
            "ControlNet cn/config.json was made for a base with cross_attention_dim 1024, \
             the base model has 768"
        );
    }

    #[test]
    fn wrong_class_and_channel_order_are_refused() {
        let unet = SD15_CONTROLNET.replace("ControlNetModel", "UNet2DConditionModel");
        let message = sd15_controlnet(&unet).unwrap_err().to_string();
        assert!(message.contains("cn/config.json") && message.contains("_class_name"));
        let order = SD15_CONTROLNET.replace("\"rgb\"", "\"rbg\"");
        let message = sd15_controlnet(&order).unwrap_err().to_string();
        assert!(message.contains("controlnet_conditioning_channel_order"));
    }

    #[test]
    fn guess_mode_weights_match_torch_logspace() {
        // torch.logspace(-1, 0, 13) × 0.5, as listed in the reference doc.
        let expected = [
            0.1, 0.12115, 0.14678, 0.17783, 0.21544, 0.26102, 0.31623, 0.38312, 0.46416, 0.56234,
            0.68129, 0.82540, 1.0,
        ];
        let weights = residual_weights(12, 0.5, true, false);
        assert_eq!(weights.len(), 13);
        for (i, (w, e)) in weights.iter().zip(expected).enumerate() {
            assert!((w - 0.5 * e).abs() < 1e-5, "{i}: {w} vs {}", 0.5 * e);
        }
        // Shuffle-type models: diffusers skips the guess-mode weights.
        assert_eq!(residual_weights(12, 0.5, true, true), vec![0.5; 13]);
        assert_eq!(residual_weights(12, 0.8, false, false), vec![0.8; 13]);
    }
}
