//! T2I-Adapter (diffusers `T2IAdapter`: `full_adapter`, `light_adapter` and SDXL's
//! `full_adapter_xl`): a small conv net that turns a control image into one feature per UNet
//! down level, added inside the down blocks (`Injections::down_block_features`; the XL
//! adapter's last feature goes to the mid block's output).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{conv2d, Conv2d, Conv2dConfig, VarBuilder};
use serde::Deserialize;

use crate::error::{ModelError, Result};
use crate::unet::{DownBlockKind, UNetConfig};
use crate::weights::{find_component_weights, WeightStore};

/// Every Stable Diffusion VAE (SD1.x, SD2.x, SDXL) makes latents 8× smaller than the image.
const LATENT_DOWNSCALE: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterType {
    /// `full_adapter` (SD1.x): `conv_in`, then per level residual blocks of 3×3 + 1×1 convs.
    Full,
    /// `light_adapter`: per level a 1×1 conv to a quarter width, 3×3 residual blocks, a 1×1 conv
    /// back; one more level than `channels` entries.
    Light,
    /// `full_adapter_xl` (SDXL): the full adapter's blocks, but only the third level
    /// downsamples (features at 1, 1, 2, 2 × the unshuffle factor for four levels).
    FullXl,
}

#[derive(Debug, Deserialize)]
struct RawT2IAdapterConfig {
    #[serde(rename = "_class_name", default)]
    class_name: Option<String>,
    #[serde(default = "default_in_channels")]
    in_channels: usize,
    #[serde(default = "default_channels")]
    channels: Vec<usize>,
    #[serde(default = "default_num_res_blocks")]
    num_res_blocks: usize,
    #[serde(default = "default_downscale_factor")]
    downscale_factor: usize,
    #[serde(default = "default_adapter_type")]
    adapter_type: String,
}

fn default_in_channels() -> usize {
    3
}
fn default_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn default_num_res_blocks() -> usize {
    2
}
fn default_downscale_factor() -> usize {
    8
}
fn default_adapter_type() -> String {
    "full_adapter".to_string()
}

#[derive(Debug, Clone)]
pub struct T2IAdapterConfig {
    pub adapter_type: AdapterType,
    /// Channels of the control image (3 RGB, 1 grey).
    pub in_channels: usize,
    pub channels: Vec<usize>,
    pub num_res_blocks: usize,
    /// The pixel-unshuffle factor applied first.
    pub downscale_factor: usize,
    /// The `config.json` this came from, for messages.
    pub source: PathBuf,
}

impl T2IAdapterConfig {
    /// Reads `config.json` of a diffusers `T2IAdapter` folder.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("config.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_json_str(&crate::error::read_text(path)?, path)
    }

    /// Parses and validates a config; errors name `path` and the offending field.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let err = |message: String| ModelError::Config {
            path: path.to_path_buf(),
            message,
        };
        let raw: RawT2IAdapterConfig =
            serde_json::from_str(text).map_err(|source| ModelError::Json {
                path: path.to_path_buf(),
                what: "a T2IAdapter config",
                source,
            })?;
        if let Some(class) = raw.class_name.as_deref() {
            if class != "T2IAdapter" {
                return Err(err(format!(
                    "`_class_name` is `{class}`, expected `T2IAdapter`"
                )));
            }
        }
        let adapter_type = match raw.adapter_type.as_str() {
            "full_adapter" => AdapterType::Full,
            "light_adapter" => AdapterType::Light,
            "full_adapter_xl" => AdapterType::FullXl,
            other => {
                return Err(err(format!(
                "unknown `adapter_type` `{other}` (full_adapter, light_adapter, full_adapter_xl)"
            )))
            }
        };
        // diffusers' FullAdapterXL: level i ≥ 3 takes `channels[i]` in, so it must follow a
        // level of that width.
        if adapter_type == AdapterType::FullXl {
            if let Some(i) =
                (3..raw.channels.len()).find(|&i| raw.channels[i] != raw.channels[i - 1])
            {
                return Err(err(format!(
                    "`channels` {:?}: a full_adapter_xl level {i} must keep the width of level {}",
                    raw.channels,
                    i - 1
                )));
            }
        }
        if raw.channels.is_empty() {
            return Err(err("`channels` is empty".to_string()));
        }
        if raw.in_channels == 0 || raw.downscale_factor == 0 {
            return Err(err(
                "`in_channels` and `downscale_factor` must be positive".to_string()
            ));
        }
        if adapter_type == AdapterType::Light {
            if let Some(c) = raw.channels.iter().find(|&&c| c < 4) {
                return Err(err(format!(
                    "`channels` entry {c} is too small for a light adapter (it works at a quarter width)"
                )));
            }
        }
        Ok(Self {
            adapter_type,
            in_channels: raw.in_channels,
            channels: raw.channels,
            num_res_blocks: raw.num_res_blocks,
            downscale_factor: raw.downscale_factor,
            source: path.to_path_buf(),
        })
    }

    /// Channels of each feature, in order (the light adapter repeats its last width once more).
    pub fn feature_channels(&self) -> Vec<usize> {
        let mut channels = self.channels.clone();
        if self.adapter_type == AdapterType::Light {
            channels.push(channels[channels.len() - 1]);
        }
        channels
    }

    /// How much smaller than the control image each feature is.
    pub fn feature_downscales(&self) -> Vec<usize> {
        (0..self.feature_channels().len())
            .map(|i| match self.adapter_type {
                AdapterType::FullXl => self.downscale_factor << usize::from(i >= 2),
                AdapterType::Full | AdapterType::Light => self.downscale_factor << i,
            })
            .collect()
    }
}

/// Checks, from configs only, that an adapter's features fit the UNet's down blocks: one per
/// level, with that level's channels and size where it is added.
pub fn check_compatible(adapter: &T2IAdapterConfig, base: &UNetConfig) -> Result<()> {
    let mismatch = |field: &'static str, found: String, expected: String| {
        Err(ModelError::Incompatible {
            what: "T2I-Adapter",
            path: adapter.source.clone(),
            field,
            found,
            expected,
        })
    };
    let channels = adapter.feature_channels();
    let levels = base.block_out_channels.len();
    // One feature per down block, and at most one more for the mid block's output (diffusers
    // adds a leftover feature there when its shape matches: SDXL's `full_adapter_xl`).
    if channels.len() > levels + 1 {
        return mismatch(
            "feature levels",
            channels.len().to_string(),
            format!(
                "{levels} (one per down block) or {} (and the mid block)",
                levels + 1
            ),
        );
    }
    let deepest = base.block_out_channels[levels - 1];
    let expected_channels: Vec<usize> = (0..channels.len())
        .map(|i| base.block_out_channels.get(i).copied().unwrap_or(deepest))
        .collect();
    if channels != expected_channels {
        return mismatch(
            "feature channels",
            format!("{channels:?}"),
            format!("{expected_channels:?}"),
        );
    }
    // A cross-attention block takes its feature before downsampling, a plain block after; the
    // mid block works at the deepest level's size.
    let expected_downscales: Vec<usize> = (0..channels.len())
        .map(|i| {
            if i >= levels {
                return LATENT_DOWNSCALE << (levels - 1);
            }
            let after_downsampler = base.down_blocks[i] == DownBlockKind::Plain && i + 1 < levels;
            LATENT_DOWNSCALE << (i + usize::from(after_downsampler))
        })
        .collect();
    let downscales = adapter.feature_downscales();
    if downscales != expected_downscales {
        return mismatch(
            "feature downscale factors",
            format!("{downscales:?}"),
            format!("{expected_downscales:?}"),
        );
    }
    Ok(())
}

/// `x + block2(relu(block1(x)))`; `block2` is 1×1 in the full adapter, 3×3 in the light one.
struct ResBlock {
    block1: Conv2d,
    block2: Conv2d,
}

impl ResBlock {
    fn new(vb: VarBuilder, channels: usize, block2_kernel: usize) -> candle_core::Result<Self> {
        let cfg = |kernel: usize| Conv2dConfig {
            padding: kernel / 2,
            ..Default::default()
        };
        Ok(Self {
            block1: conv2d(channels, channels, 3, cfg(3), vb.pp("block1"))?,
            block2: conv2d(
                channels,
                channels,
                block2_kernel,
                cfg(block2_kernel),
                vb.pp("block2"),
            )?,
        })
    }
}

impl Module for ResBlock {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.block2.forward(&self.block1.forward(xs)?.relu()?)?;
        h + xs
    }
}

/// One level (`AdapterBlock` / `LightAdapterBlock`): optional 2×2 average pool, optional 1×1
/// `in_conv`, residual blocks, and for the light adapter a 1×1 `out_conv`.
struct Level {
    downsample: bool,
    in_conv: Option<Conv2d>,
    resnets: Vec<ResBlock>,
    out_conv: Option<Conv2d>,
}

impl Level {
    fn full(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        res_blocks: usize,
        downsample: bool,
    ) -> candle_core::Result<Self> {
        let in_conv = if in_c != out_c {
            Some(conv2d(
                in_c,
                out_c,
                1,
                Default::default(),
                vb.pp("in_conv"),
            )?)
        } else {
            None
        };
        let resnets = (0..res_blocks)
            .map(|r| ResBlock::new(vb.pp("resnets").pp(r), out_c, 1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            downsample,
            in_conv,
            resnets,
            out_conv: None,
        })
    }

    fn light(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        res_blocks: usize,
        downsample: bool,
    ) -> candle_core::Result<Self> {
        let mid_c = out_c / 4;
        let resnets = (0..res_blocks)
            .map(|r| ResBlock::new(vb.pp("resnets").pp(r), mid_c, 3))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            downsample,
            in_conv: Some(conv2d(
                in_c,
                mid_c,
                1,
                Default::default(),
                vb.pp("in_conv"),
            )?),
            resnets,
            out_conv: Some(conv2d(
                mid_c,
                out_c,
                1,
                Default::default(),
                vb.pp("out_conv"),
            )?),
        })
    }
}

impl Module for Level {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = if self.downsample {
            avg_pool_2x2_ceil(xs)?
        } else {
            xs.clone()
        };
        if let Some(conv) = &self.in_conv {
            xs = conv.forward(&xs)?;
        }
        for resnet in &self.resnets {
            xs = resnet.forward(&xs)?;
        }
        match &self.out_conv {
            Some(conv) => conv.forward(&xs),
            None => Ok(xs),
        }
    }
}

/// torch's `AvgPool2d(2, stride=2, ceil_mode=True)`: an odd last row/column is averaged over
/// the pixels it has, which is what repeating the edge before pooling gives.
fn avg_pool_2x2_ceil(xs: &Tensor) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = xs.dims4()?;
    let xs = if h % 2 == 1 {
        xs.pad_with_same(2, 0, 1)?
    } else {
        xs.clone()
    };
    let xs = if w % 2 == 1 {
        xs.pad_with_same(3, 0, 1)?
    } else {
        xs
    };
    xs.avg_pool2d(2)
}

/// torch's `PixelUnshuffle(r)`: `[B, C, H, W]` → `[B, C·r², H/r, W/r]`, channel `c·r² + i·r + j`
/// holding pixel `(y·r + i, x·r + j)`.
fn pixel_unshuffle(xs: &Tensor, r: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = xs.dims4()?;
    if h % r != 0 || w % r != 0 {
        candle_core::bail!(
            "the T2I-Adapter image is {h}×{w}, which is not a multiple of its downscale factor {r}"
        );
    }
    xs.reshape((b, c, h / r, r, w / r, r))?
        .permute((0, 1, 3, 5, 2, 4))?
        .reshape((b, c * r * r, h / r, w / r))
}

pub struct T2IAdapter {
    config: T2IAdapterConfig,
    /// Only the full adapter has one; the light adapter's first level starts with `in_conv`.
    conv_in: Option<Conv2d>,
    levels: Vec<Level>,
}

impl T2IAdapter {
    pub fn new(vb: VarBuilder, config: &T2IAdapterConfig) -> candle_core::Result<Self> {
        let vb = vb.pp("adapter");
        let channels = &config.channels;
        let unshuffled = config.in_channels * config.downscale_factor * config.downscale_factor;
        let res_blocks = config.num_res_blocks;
        let body = |i: usize| vb.pp("body").pp(i);
        let (conv_in, levels) = match config.adapter_type {
            AdapterType::Full => {
                let cfg = Conv2dConfig {
                    padding: 1,
                    ..Default::default()
                };
                let conv_in = conv2d(unshuffled, channels[0], 3, cfg, vb.pp("conv_in"))?;
                let mut levels = vec![Level::full(
                    body(0),
                    channels[0],
                    channels[0],
                    res_blocks,
                    false,
                )?];
                for i in 1..channels.len() {
                    levels.push(Level::full(
                        body(i),
                        channels[i - 1],
                        channels[i],
                        res_blocks,
                        true,
                    )?);
                }
                (Some(conv_in), levels)
            }
            AdapterType::FullXl => {
                let cfg = Conv2dConfig {
                    padding: 1,
                    ..Default::default()
                };
                let conv_in = conv2d(unshuffled, channels[0], 3, cfg, vb.pp("conv_in"))?;
                // diffusers' FullAdapterXL: level 1 widens, level 2 widens and downsamples,
                // the others keep their width.
                let levels = (0..channels.len())
                    .map(|i| {
                        let (in_c, down) = match i {
                            1 => (channels[0], false),
                            2 => (channels[1], true),
                            _ => (channels[i], false),
                        };
                        Level::full(body(i), in_c, channels[i], res_blocks, down)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                (Some(conv_in), levels)
            }
            AdapterType::Light => {
                let mut levels = vec![Level::light(
                    body(0),
                    unshuffled,
                    channels[0],
                    res_blocks,
                    false,
                )?];
                for i in 1..channels.len() {
                    levels.push(Level::light(
                        body(i),
                        channels[i - 1],
                        channels[i],
                        res_blocks,
                        true,
                    )?);
                }
                let last = channels[channels.len() - 1];
                levels.push(Level::light(
                    body(channels.len()),
                    last,
                    last,
                    res_blocks,
                    true,
                )?);
                (None, levels)
            }
        };
        Ok(Self {
            config: config.clone(),
            conv_in,
            levels,
        })
    }

    /// Loads the weights of a diffusers folder (`diffusion_pytorch_model[.variant].safetensors`
    /// or `.bin`); `config` usually comes from [`T2IAdapterConfig::from_folder`].
    pub fn load_folder(
        dir: &Path,
        config: &T2IAdapterConfig,
        variant: Option<&str>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let files = find_component_weights(dir, "diffusion_pytorch_model", variant)?;
        let vb = WeightStore::open(&files)?.var_builder(dtype, device);
        Ok(Self::new(vb, config)?)
    }

    pub fn config(&self) -> &T2IAdapterConfig {
        &self.config
    }

    /// The features of `image` `[B, in_channels, H, W]` in [0, 1], one per level, unscaled
    /// (diffusers multiplies them by `adapter_conditioning_scale` afterwards).
    pub fn forward(&self, image: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let channels = image.dim(1)?;
        if channels != self.config.in_channels {
            candle_core::bail!(
                "the T2I-Adapter expects images with {} channels, got {channels}",
                self.config.in_channels
            );
        }
        let mut xs = pixel_unshuffle(image, self.config.downscale_factor)?;
        if let Some(conv) = &self.conv_in {
            xs = conv.forward(&xs)?;
        }
        let mut features = Vec::with_capacity(self.levels.len());
        for level in &self.levels {
            xs = level.forward(&xs)?;
            features.push(xs.clone());
        }
        Ok(features)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn pixel_unshuffle_orders_channels_as_torch() {
        // One channel 4×4 holding 0..16, factor 2: channel i·2+j takes pixels (2y+i, 2x+j).
        let xs = Tensor::arange(0f32, 16., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 4, 4))
            .unwrap();
        let out = pixel_unshuffle(&xs, 2).unwrap();
        assert_eq!(out.dims(), [1, 4, 2, 2]);
        let v = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(
            v,
            [0., 2., 8., 10., 1., 3., 9., 11., 4., 6., 12., 14., 5., 7., 13., 15.]
        );
    }

    #[test]
    fn ceil_mode_pool_averages_partial_windows() {
        // 3×3: windows {0,1,3,4}, {2,5}, {6,7}, {8}.
        let xs = Tensor::arange(0f32, 9., &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 3, 3))
            .unwrap();
        let v = avg_pool_2x2_ceil(&xs)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(v, [2.0, 3.5, 6.5, 8.0]);
    }

    fn config(text: &str) -> Result<T2IAdapterConfig> {
        T2IAdapterConfig::from_json_str(text, Path::new("t2i/config.json"))
    }

    fn sd15_unet() -> UNetConfig {
        let text = r#"{
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                 "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                               "CrossAttnUpBlock2D"],
            "layers_per_block": 2, "cross_attention_dim": 768, "attention_head_dim": 8
        }"#;
        UNetConfig::from_json_str(text, Path::new("unet/config.json")).unwrap()
    }

    fn sdxl_unet() -> UNetConfig {
        let text = r#"{
            "block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "layers_per_block": 2, "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20],
            "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": true,
            "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816
        }"#;
        UNetConfig::from_json_str(text, Path::new("unet/config.json")).unwrap()
    }

    #[test]
    fn each_adapter_type_fits_its_family_only() {
        let full = config(r#"{"_class_name": "T2IAdapter"}"#).unwrap();
        check_compatible(&full, &sd15_unet()).unwrap();
        let light = config(
            r#"{"adapter_type": "light_adapter", "channels": [320, 640, 1280], "num_res_blocks": 4}"#,
        )
        .unwrap();
        assert_eq!(light.feature_channels(), [320, 640, 1280, 1280]);
        check_compatible(&light, &sd15_unet()).unwrap();
        // TencentARC/t2i-adapter-*-sdxl-1.0: four features for three down blocks + the mid block.
        let xl = config(
            r#"{"adapter_type": "full_adapter_xl", "channels": [320, 640, 1280, 1280], "downscale_factor": 16}"#,
        )
        .unwrap();
        assert_eq!(xl.feature_downscales(), [16, 16, 32, 32]);
        check_compatible(&xl, &sdxl_unet()).unwrap();
        let message = check_compatible(&xl, &sd15_unet()).unwrap_err().to_string();
        assert!(message.contains("feature downscale factors"), "{message}");
        // The SD1.5 adapter's widths happen to fit; its sizes do not.
        let message = check_compatible(&full, &sdxl_unet())
            .unwrap_err()
            .to_string();
        assert!(message.contains("[8, 16, 32, 64]"), "{message}");
        let bad = config(r#"{"adapter_type": "full_adapter_xl", "channels": [8, 16, 16, 32]}"#)
            .unwrap_err()
            .to_string();
        assert!(bad.contains("level 3"), "{bad}");
    }

    #[test]
    fn wrong_widths_are_refused_naming_both() {
        // Fewer levels than the UNet is fine: diffusers adds features while it has some.
        let short = config(r#"{"channels": [320, 640, 1280]}"#).unwrap();
        check_compatible(&short, &sd15_unet()).unwrap();
        let wide = config(r#"{"channels": [640, 640, 1280, 1280]}"#).unwrap();
        let message = check_compatible(&wide, &sd15_unet())
            .unwrap_err()
            .to_string();
        assert_eq!(
            message,
            "T2I-Adapter t2i/config.json was made for a base with feature channels \
             [640, 640, 1280, 1280], the base model has [320, 640, 1280, 1280]"
        );
    }
}
