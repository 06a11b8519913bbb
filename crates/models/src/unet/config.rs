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
        let unsupported = [
            ("class_embed_type", raw.class_embed_type.as_deref()),
            ("addition_embed_type", raw.addition_embed_type.as_deref()),
        ];
        for (field, value) in unsupported {
            if let Some(v) = value {
                return Err(err(format!(
                    "`{field}: {v}` is not supported yet (SD1.x / SD2.x UNets have none)"
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
