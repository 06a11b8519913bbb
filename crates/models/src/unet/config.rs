//! `UNet2DConditionModel`'s `config.json`, validated against what this implementation builds.

use std::path::Path;

use serde::Deserialize;

use crate::error::{read_json, ModelError, Result};

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    fn expand(&self, n: usize, field: &str, path: &Path) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(ModelError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "`{field}` has {} entries, expected one per block ({n})",
                    v.len()
                ),
            }),
        }
    }
}

/// The fields of diffusers' config as written on disk.
#[derive(Debug, Clone, Deserialize)]
struct RawUNetConfig {
    #[serde(default = "default_channels")]
    in_channels: usize,
    #[serde(default = "default_channels")]
    out_channels: usize,
    #[serde(default)]
    sample_size: Option<usize>,
    block_out_channels: Vec<usize>,
    down_block_types: Vec<String>,
    /// Required for a UNet; absent from encoder-only configs (ControlNet).
    #[serde(default)]
    up_block_types: Option<Vec<String>>,
    #[serde(default)]
    mid_block_type: Option<String>,
    layers_per_block: PerBlock<usize>,
    #[serde(default = "default_groups")]
    norm_num_groups: usize,
    #[serde(default = "default_norm_eps")]
    norm_eps: f64,
    cross_attention_dim: PerBlock<usize>,
    #[serde(default)]
    attention_head_dim: Option<PerBlock<usize>>,
    #[serde(default)]
    num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    transformer_layers_per_block: Option<PerBlock<usize>>,
    #[serde(default)]
    use_linear_projection: bool,
    #[serde(default = "default_true")]
    flip_sin_to_cos: bool,
    #[serde(default)]
    freq_shift: f64,
    #[serde(default)]
    center_input_sample: bool,
    #[serde(default)]
    downsample_padding: Option<usize>,
    #[serde(default)]
    mid_block_scale_factor: Option<f64>,
    #[serde(default)]
    upcast_attention: Option<bool>,
    #[serde(default)]
    class_embed_type: Option<String>,
    #[serde(default)]
    addition_embed_type: Option<String>,
    #[serde(default)]
    time_embedding_type: Option<String>,
    #[serde(default)]
    resnet_time_scale_shift: Option<String>,
    #[serde(default)]
    only_cross_attention: Option<PerBlock<bool>>,
    #[serde(default)]
    dual_cross_attention: Option<bool>,
    #[serde(default)]
    encoder_hid_dim: Option<usize>,
    #[serde(default)]
    num_class_embeds: Option<usize>,
    #[serde(default)]
    addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default)]
    time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    time_embedding_dim: Option<usize>,
    #[serde(default)]
    time_embedding_act_fn: Option<String>,
    #[serde(default)]
    timestep_post_act: Option<String>,
}

fn default_channels() -> usize {
    4
}
fn default_groups() -> usize {
    32
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}

/// Whether a config describes a whole UNet or only its encoder half (ControlNet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Halves {
    Whole,
    EncoderOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownBlockKind {
    CrossAttn,
    Plain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpBlockKind {
    CrossAttn,
    Plain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UNetPart {
    Down,
    Up,
    Mid,
}

/// Where one cross-attention layer sits (diffusers' `{part}_blocks.{block}.attentions.{attention}
/// .transformer_blocks.{transformer}.attn2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrossAttentionLayer {
    pub part: UNetPart,
    pub block: usize,
    pub attention: usize,
    pub transformer: usize,
    /// Query width of the layer.
    pub channels: usize,
    /// How many times the latent has been downsampled at this layer.
    pub level: usize,
}

impl CrossAttentionLayer {
    /// diffusers' module name, e.g. `up_blocks.1.attentions.2.transformer_blocks.0.attn2`.
    pub fn name(&self) -> String {
        let prefix = match self.part {
            UNetPart::Down => format!("down_blocks.{}", self.block),
            UNetPart::Up => format!("up_blocks.{}", self.block),
            UNetPart::Mid => "mid_block".to_string(),
        };
        format!(
            "{prefix}.attentions.{}.transformer_blocks.{}.attn2",
            self.attention, self.transformer
        )
    }
}

/// SDXL's added embedding (`addition_embed_type: text_time`): each of the six micro-conditioning
/// time ids becomes a sinusoid of `time_embed_dim`, they follow the pooled text embedding, and
/// `add_embedding` (linear, SiLU, linear) maps the whole `input_dim` vector onto the time
/// embedding, to which it is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextTimeEmbedding {
    /// `addition_time_embed_dim` (256 in SDXL).
    pub time_embed_dim: usize,
    /// `projection_class_embeddings_input_dim` (2816 in SDXL = 1280 + 6 × 256).
    pub input_dim: usize,
}

impl TextTimeEmbedding {
    /// Original size (h, w), crop top-left (top, left), target size (h, w).
    pub const TIME_IDS: usize = 6;

    /// The width of the pooled text embedding this UNet expects (SDXL: text_encoder_2's
    /// `projection_dim`, 1280).
    pub fn text_embeds_dim(&self) -> usize {
        self.input_dim - Self::TIME_IDS * self.time_embed_dim
    }
}

/// A resolved UNet configuration: every per-block value expanded.
#[derive(Debug, Clone)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub sample_size: Option<usize>,
    pub block_out_channels: Vec<usize>,
    pub down_blocks: Vec<DownBlockKind>,
    /// Empty for an encoder-only config (ControlNet).
    pub up_blocks: Vec<UpBlockKind>,
    pub layers_per_block: Vec<usize>,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    /// Attention heads per down block (the up path uses them reversed).
    pub num_attention_heads: Vec<usize>,
    pub transformer_layers_per_block: Vec<usize>,
    pub use_linear_projection: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    /// SDXL's added text/time embedding; `None` for SD1.x / SD2.x.
    pub addition: Option<TextTimeEmbedding>,
}

impl UNetConfig {
    /// Reads and validates `config.json`; errors name the file and the offending field.
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: RawUNetConfig = read_json(path, "a UNet2DConditionModel config")?;
        Self::resolve(raw, path, Halves::Whole)
    }

    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let raw: RawUNetConfig = serde_json::from_str(text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            what: "a UNet2DConditionModel config",
            source,
        })?;
        Self::resolve(raw, path, Halves::Whole)
    }

    /// Resolves the UNet-like fields of a model that has only the encoder half (ControlNet's
    /// `config.json`): the same validation, no `up_block_types` expected, `up_blocks` empty.
    /// `what` names the model in JSON errors.
    pub(crate) fn encoder_only_from_json_str(
        text: &str,
        path: &Path,
        what: &'static str,
    ) -> Result<Self> {
        let raw: RawUNetConfig = serde_json::from_str(text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            what,
            source,
        })?;
        Self::resolve(raw, path, Halves::EncoderOnly)
    }

    fn resolve(raw: RawUNetConfig, path: &Path, halves: Halves) -> Result<Self> {
        let err = |message: String| ModelError::Config {
            path: path.to_path_buf(),
            message,
        };
        let n = raw.block_out_channels.len();
        if n == 0 {
            return Err(err("`block_out_channels` is empty".to_string()));
        }
        let up_block_types = match halves {
            Halves::Whole => raw
                .up_block_types
                .clone()
                .ok_or_else(|| err("missing field `up_block_types`".to_string()))?,
            Halves::EncoderOnly => Vec::new(),
        };
        let up_count_ok = halves == Halves::EncoderOnly || up_block_types.len() == n;
        if raw.down_block_types.len() != n || !up_count_ok {
            return Err(err(format!(
                "`down_block_types` ({}) and `up_block_types` ({}) must have one entry per `block_out_channels` ({n})",
                raw.down_block_types.len(),
                up_block_types.len()
            )));
        }
        let down_blocks = raw
            .down_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnDownBlock2D" => Ok(DownBlockKind::CrossAttn),
                "DownBlock2D" => Ok(DownBlockKind::Plain),
                other => Err(err(format!(
                    "unknown down block type `{other}` in `down_block_types` (supported: CrossAttnDownBlock2D, DownBlock2D)"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        let up_blocks = up_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnUpBlock2D" => Ok(UpBlockKind::CrossAttn),
                "UpBlock2D" => Ok(UpBlockKind::Plain),
                other => Err(err(format!(
                    "unknown up block type `{other}` in `up_block_types` (supported: CrossAttnUpBlock2D, UpBlock2D)"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(mid) = raw.mid_block_type.as_deref() {
            if mid != "UNetMidBlock2DCrossAttn" {
                return Err(err(format!(
                    "unknown `mid_block_type` `{mid}` (supported: UNetMidBlock2DCrossAttn)"
                )));
            }
        }
        if let Some(v) = raw.class_embed_type.as_deref() {
            return Err(err(format!(
                "`class_embed_type: {v}` is not supported (SD1.x, SD2.x and SDXL UNets have none)"
            )));
        }
        let addition = match raw.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let field = |name: &str, value: Option<usize>| {
                    value.filter(|&v| v > 0).ok_or_else(|| {
                        err(format!(
                            "`addition_embed_type: text_time` needs a positive `{name}`"
                        ))
                    })
                };
                let time_embed_dim = field("addition_time_embed_dim", raw.addition_time_embed_dim)?;
                let input_dim = field(
                    "projection_class_embeddings_input_dim",
                    raw.projection_class_embeddings_input_dim,
                )?;
                if input_dim <= TextTimeEmbedding::TIME_IDS * time_embed_dim {
                    return Err(err(format!(
                        "`projection_class_embeddings_input_dim` {input_dim} leaves no room for the pooled text embedding next to {} time ids of width {time_embed_dim}",
                        TextTimeEmbedding::TIME_IDS
                    )));
                }
                if time_embed_dim % 2 != 0 {
                    return Err(err(format!(
                        "`addition_time_embed_dim` {time_embed_dim} must be even (a sine and a cosine half)"
                    )));
                }
                Some(TextTimeEmbedding {
                    time_embed_dim,
                    input_dim,
                })
            }
            Some(other) => {
                return Err(err(format!(
                    "`addition_embed_type: {other}` is not supported (supported: text_time, SDXL's)"
                )))
            }
        };
        let unsupported_values = [
            (
                "reverse_transformer_layers_per_block",
                raw.reverse_transformer_layers_per_block
                    .as_ref()
                    .filter(|v| !v.is_null())
                    .map(|v| v.to_string()),
            ),
            (
                "time_cond_proj_dim",
                raw.time_cond_proj_dim.map(|v| v.to_string()),
            ),
            (
                "time_embedding_dim",
                raw.time_embedding_dim.map(|v| v.to_string()),
            ),
            ("time_embedding_act_fn", raw.time_embedding_act_fn.clone()),
            ("timestep_post_act", raw.timestep_post_act.clone()),
        ];
        for (field, value) in unsupported_values {
            if let Some(v) = value {
                return Err(err(format!(
                    "`{field}: {v}` is not supported (SD1.x, SD2.x and SDXL UNets leave it null)"
                )));
            }
        }
        if let Some(t) = raw.time_embedding_type.as_deref() {
            if t != "positional" {
                return Err(err(format!(
                    "`time_embedding_type: {t}` is not supported (only positional)"
                )));
            }
        }
        if let Some(t) = raw.resnet_time_scale_shift.as_deref() {
            if t != "default" {
                return Err(err(format!(
                    "`resnet_time_scale_shift: {t}` is not supported (only default)"
                )));
            }
        }
        if raw.dual_cross_attention == Some(true) {
            return Err(err(
                "`dual_cross_attention: true` is not supported".to_string()
            ));
        }
        if let Some(oca) = &raw.only_cross_attention {
            if oca
                .expand(n, "only_cross_attention", path)?
                .iter()
                .any(|&b| b)
            {
                return Err(err(
                    "`only_cross_attention: true` is not supported".to_string()
                ));
            }
        }
        if raw.encoder_hid_dim.is_some() || raw.num_class_embeds.is_some() {
            return Err(err(
                "`encoder_hid_dim` / `num_class_embeds` are not supported".to_string(),
            ));
        }
        let cross_attention_dim = match raw.cross_attention_dim {
            PerBlock::One(d) => d,
            PerBlock::Each(v) => {
                let first = v.first().copied().unwrap_or(0);
                if v.iter().any(|&d| d != first) {
                    return Err(err(
                        "per-block `cross_attention_dim` values must all be equal".to_string(),
                    ));
                }
                first
            }
        };
        // diffusers: `num_attention_heads` falls back to `attention_head_dim` (a historical misnomer:
        // for SD1.x/2.x that field holds the head count).
        let heads = raw
            .num_attention_heads
            .or(raw.attention_head_dim)
            .ok_or_else(|| {
                err("neither `num_attention_heads` nor `attention_head_dim` is set".to_string())
            })?;
        let num_attention_heads = heads.expand(n, "attention_head_dim", path)?;
        let transformer_layers_per_block = raw
            .transformer_layers_per_block
            .unwrap_or(PerBlock::One(1))
            .expand(n, "transformer_layers_per_block", path)?;
        let layers_per_block = raw.layers_per_block.expand(n, "layers_per_block", path)?;
        for (i, &c) in raw.block_out_channels.iter().enumerate() {
            if !c.is_multiple_of(raw.norm_num_groups) {
                return Err(err(format!(
                    "`block_out_channels[{i}]` = {c} is not divisible by `norm_num_groups` = {}",
                    raw.norm_num_groups
                )));
            }
            if !c.is_multiple_of(num_attention_heads[i]) {
                return Err(err(format!(
                    "`block_out_channels[{i}]` = {c} is not divisible by its head count {}",
                    num_attention_heads[i]
                )));
            }
        }
        let _ = raw.upcast_attention; // attention runs in f32 softmax regardless
        let _ = raw.center_input_sample;
        Ok(Self {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            sample_size: raw.sample_size,
            block_out_channels: raw.block_out_channels,
            down_blocks,
            up_blocks,
            layers_per_block,
            norm_num_groups: raw.norm_num_groups,
            norm_eps: raw.norm_eps,
            cross_attention_dim,
            num_attention_heads,
            transformer_layers_per_block,
            use_linear_projection: raw.use_linear_projection,
            flip_sin_to_cos: raw.flip_sin_to_cos,
            freq_shift: raw.freq_shift,
            downsample_padding: raw.downsample_padding.unwrap_or(1),
            mid_block_scale_factor: raw.mid_block_scale_factor.unwrap_or(1.0),
            addition,
        })
    }

    /// Channels of each skip tensor the down path records (the `conv_in` output, every
    /// resnet/attention pair, every downsampler): one ControlNet residual each, in order.
    pub fn skip_channels(&self) -> Vec<usize> {
        let n = self.block_out_channels.len();
        let mut channels = vec![self.block_out_channels[0]];
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            channels.extend(std::iter::repeat_n(c, self.layers_per_block[i]));
            if i + 1 < n {
                channels.push(c);
            }
        }
        channels
    }

    /// Every cross-attention layer in diffusers' `attn_processors` order (down, up, mid): the
    /// order IP-Adapter weights (`ip_adapter.{2i+1}`) and per-layer scales follow.
    pub fn cross_attention_layout(&self) -> Vec<CrossAttentionLayer> {
        let n = self.block_out_channels.len();
        let mut layers = Vec::new();
        let mut push = |part: UNetPart,
                        block: usize,
                        attentions: usize,
                        depth: usize,
                        channels: usize,
                        level: usize| {
            for attention in 0..attentions {
                for transformer in 0..depth {
                    layers.push(CrossAttentionLayer {
                        part,
                        block,
                        attention,
                        transformer,
                        channels,
                        level,
                    });
                }
            }
        };
        for (i, kind) in self.down_blocks.iter().enumerate() {
            if *kind == DownBlockKind::CrossAttn {
                let depth = self.transformer_layers_per_block[i];
                push(
                    UNetPart::Down,
                    i,
                    self.layers_per_block[i],
                    depth,
                    self.block_out_channels[i],
                    i,
                );
            }
        }
        for (i, kind) in self.up_blocks.iter().enumerate() {
            if *kind == UpBlockKind::CrossAttn {
                let level = n - 1 - i;
                let depth = self.transformer_layers_per_block[level];
                push(
                    UNetPart::Up,
                    i,
                    self.layers_per_block[level] + 1,
                    depth,
                    self.block_out_channels[level],
                    level,
                );
            }
        }
        push(
            UNetPart::Mid,
            0,
            1,
            self.transformer_layers_per_block[n - 1],
            self.block_out_channels[n - 1],
            n - 1,
        );
        layers
    }

    /// The number of cross-attention layers, i.e. the number of IP-Adapter key/value slots.
    pub fn cross_attention_layers(&self) -> usize {
        self.cross_attention_layout().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENCODER_ONLY: &str = r#"{
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "layers_per_block": 1, "cross_attention_dim": 16, "attention_head_dim": 2,
        "norm_num_groups": 8
    }"#;

    /// stabilityai/stable-diffusion-xl-base-1.0 `unet/config.json` (the fields that matter).
    const SDXL_BASE: &str = r#"{
        "_class_name": "UNet2DConditionModel",
        "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280], "class_embed_type": null,
        "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "layers_per_block": 2, "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_num_groups": 32, "num_attention_heads": null,
        "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "upcast_attention": null, "use_linear_projection": true,
        "reverse_transformer_layers_per_block": null, "time_cond_proj_dim": null
    }"#;

    #[test]
    fn sdxl_base_config_has_the_text_time_embedding_and_70_cross_attentions() {
        let cfg = UNetConfig::from_json_str(SDXL_BASE, Path::new("unet/config.json")).unwrap();
        let addition = cfg.addition.unwrap();
        assert_eq!((addition.time_embed_dim, addition.input_dim), (256, 2816));
        assert_eq!(addition.text_embeds_dim(), 1280);
        assert_eq!(cfg.num_attention_heads, [5, 10, 20]);
        let layout = cfg.cross_attention_layout();
        // docs/reference-formats.md A.2: keys 1…139.
        assert_eq!(layout.len(), 70);
        assert_eq!(
            layout[1].name(),
            "down_blocks.1.attentions.0.transformer_blocks.1.attn2"
        );
        assert_eq!(
            layout[2].name(),
            "down_blocks.1.attentions.1.transformer_blocks.0.attn2"
        );
        // Up block 0 sits at level 2: 3 attentions of 10 transformer blocks, 1280 wide.
        let up0: Vec<_> = layout
            .iter()
            .filter(|l| l.part == UNetPart::Up && l.block == 0)
            .collect();
        assert_eq!(up0.len(), 30);
        assert!(up0.iter().all(|l| l.channels == 1280));
        assert_eq!(
            layout[69].name(),
            "mid_block.attentions.0.transformer_blocks.9.attn2"
        );
        assert_eq!(cfg.skip_channels().len(), 9);
    }

    #[test]
    fn unsupported_added_embeddings_are_named() {
        let path = Path::new("unet/config.json");
        let bad = |from: &str, to: &str| {
            assert!(SDXL_BASE.contains(from), "{from}");
            UNetConfig::from_json_str(&SDXL_BASE.replace(from, to), path)
                .unwrap_err()
                .to_string()
        };
        let message = bad(
            "\"addition_embed_type\": \"text_time\"",
            "\"addition_embed_type\": \"image\"",
        );
        assert!(
            message.contains("`addition_embed_type: image`"),
            "{message}"
        );
        let message = bad(
            "\"addition_time_embed_dim\": 256",
            "\"addition_time_embed_dim\": null",
        );
        assert!(message.contains("addition_time_embed_dim"), "{message}");
        let message = bad(
            "\"projection_class_embeddings_input_dim\": 2816",
            "\"projection_class_embeddings_input_dim\": 1536",
        );
        assert!(message.contains("no room"), "{message}");
        let message = bad(
            "\"time_cond_proj_dim\": null",
            "\"time_cond_proj_dim\": 256",
        );
        assert!(message.contains("time_cond_proj_dim"), "{message}");
        let message = bad(
            "\"reverse_transformer_layers_per_block\": null",
            "\"reverse_transformer_layers_per_block\": [[1, 1, 1], [2, 2, 2], [10, 10, 10]]",
        );
        assert!(
            message.contains("reverse_transformer_layers_per_block"),
            "{message}"
        );
    }

    #[test]
    fn a_unet_needs_up_blocks_an_encoder_does_not() {
        let path = Path::new("model/config.json");
        let message = UNetConfig::from_json_str(ENCODER_ONLY, path)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("model/config.json") && message.contains("up_block_types"),
            "{message}"
        );
        let encoder =
            UNetConfig::encoder_only_from_json_str(ENCODER_ONLY, path, "a test config").unwrap();
        assert!(encoder.up_blocks.is_empty());
        assert_eq!(encoder.skip_channels(), [32, 32, 32, 64]);
        assert_eq!(encoder.cross_attention_layers(), 2);
    }
}
