//! The CLIP image encoder IP-Adapters use (transformers' `CLIPVisionModelWithProjection`,
//! e.g. h94/IP-Adapter `models/image_encoder`, OpenCLIP ViT-H/14 with exact GELU).

use std::path::Path;

use candle_core::{Module, Result, Tensor};
use candle_nn::{
    conv2d_no_bias, embedding, layer_norm, linear_no_bias, Conv2d, Conv2dConfig, Embedding,
    LayerNorm, Linear, VarBuilder,
};
use serde::Deserialize;

use crate::clip_encoder::{Activation, EncoderLayer, EncoderLayerConfig};
use crate::error::{read_json, ModelError};

#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "default_projection")]
    pub projection_dim: usize,
    #[serde(default = "default_activation")]
    pub hidden_act: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
}

fn default_projection() -> usize {
    512
}
fn default_activation() -> Activation {
    Activation::QuickGelu
}
fn default_eps() -> f64 {
    1e-5
}
fn default_channels() -> usize {
    3
}

impl ClipVisionConfig {
    /// Reads a `CLIPVisionModelWithProjection` config, or the `vision_config` of a full
    /// `CLIPConfig` (with its top-level `projection_dim`).
    pub fn from_file(path: &Path) -> crate::error::Result<Self> {
        let json: serde_json::Value = read_json(path, "a CLIP vision config")?;
        let parse = |value: serde_json::Value| {
            serde_json::from_value::<Self>(value).map_err(|source| ModelError::Json {
                path: path.to_path_buf(),
                what: "a CLIP vision config",
                source,
            })
        };
        let mut config = match json.get("vision_config") {
            Some(vision) => {
                let mut config = parse(vision.clone())?;
                if let Some(p) = json.get("projection_dim").and_then(|p| p.as_u64()) {
                    config.projection_dim = p as usize;
                }
                config
            }
            None => parse(json)?,
        };
        if config.patch_size == 0 || config.image_size % config.patch_size != 0 {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "`image_size` {} is not a multiple of `patch_size` {}",
                    config.image_size, config.patch_size
                ),
            });
        }
        config.num_channels = config.num_channels.max(1);
        Ok(config)
    }

    /// Patch tokens plus the class token (257 for ViT-H/14 at 224).
    pub fn num_tokens(&self) -> usize {
        let side = self.image_size / self.patch_size;
        side * side + 1
    }
}

/// What IP-Adapters read from the encoder.
pub struct ClipVisionOutput {
    /// `visual_projection(post_layernorm(last_hidden[:, 0]))`, `[B, projection_dim]`.
    pub image_embeds: Tensor,
    /// `hidden_states[-2]`: the second-to-last layer's output, `[B, tokens, hidden]`.
    pub penultimate: Tensor,
}

pub struct ClipVisionModel {
    class_embedding: Tensor,
    patch_embedding: Conv2d,
    position_embedding: Embedding,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    visual_projection: Linear,
    config: ClipVisionConfig,
}

impl ClipVisionModel {
    pub fn new(vb: VarBuilder, cfg: &ClipVisionConfig) -> Result<Self> {
        let root = vb.clone();
        let vb = if vb.contains_tensor("vision_model.embeddings.class_embedding") {
            vb.pp("vision_model")
        } else {
            vb
        };
        let h = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let patch_cfg = Conv2dConfig {
            stride: cfg.patch_size,
            ..Default::default()
        };
        let layer_cfg = EncoderLayerConfig {
            hidden_size: h,
            intermediate_size: cfg.intermediate_size,
            num_attention_heads: cfg.num_attention_heads,
            layer_norm_eps: cfg.layer_norm_eps,
            activation: cfg.hidden_act,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(vb.pp("encoder.layers").pp(i), &layer_cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            class_embedding: emb.get(h, "class_embedding")?,
            patch_embedding: conv2d_no_bias(
                cfg.num_channels,
                h,
                cfg.patch_size,
                patch_cfg,
                emb.pp("patch_embedding"),
            )?,
            position_embedding: embedding(cfg.num_tokens(), h, emb.pp("position_embedding"))?,
            pre_layrnorm: layer_norm(h, cfg.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            layers,
            post_layernorm: layer_norm(h, cfg.layer_norm_eps, vb.pp("post_layernorm"))?,
            visual_projection: linear_no_bias(h, cfg.projection_dim, root.pp("visual_projection"))?,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// `pixel_values` `[B, 3, S, S]`, already normalised with CLIP's mean and std.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<ClipVisionOutput> {
        let b = pixel_values.dim(0)?;
        let h = self.config.hidden_size;
        let patches = self
            .patch_embedding
            .forward(pixel_values)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let class = self
            .class_embedding
            .reshape((1, 1, h))?
            .broadcast_as((b, 1, h))?
            .to_dtype(patches.dtype())?;
        let tokens = Tensor::cat(&[&class, &patches], 1)?;
        let positions = Tensor::arange(0u32, tokens.dim(1)? as u32, tokens.device())?;
        let mut xs = tokens.broadcast_add(&self.position_embedding.forward(&positions)?)?;
        xs = self.pre_layrnorm.forward(&xs)?;
        let mut penultimate = xs.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs, None)?;
            if i + 2 == self.layers.len() {
                penultimate = xs.clone();
            }
        }
        let pooled = self
            .post_layernorm
            .forward(&xs.narrow(1, 0, 1)?.squeeze(1)?)?;
        let image_embeds = self.visual_projection.forward(&pooled)?;
        Ok(ClipVisionOutput {
            image_embeds,
            penultimate,
        })
    }
}

/// Loads an image encoder folder (`config.json` + `model.safetensors` or `pytorch_model.bin`).
pub fn load_image_encoder(
    dir: &Path,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> crate::error::Result<ClipVisionModel> {
    let config = ClipVisionConfig::from_file(&dir.join("config.json"))?;
    let files = crate::weights::find_component_weights(dir, "model", None)
        .or_else(|_| crate::weights::find_component_weights(dir, "pytorch_model", None))?;
    let vb = crate::weights::WeightStore::open(&files)?.var_builder(dtype, device);
    Ok(ClipVisionModel::new(vb, &config)?)
}
