//! The VAE (`AutoencoderKL`) from candle-transformers, configured from its `config.json`.

use std::path::Path;

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use serde::Deserialize;

use crate::error::{read_json, ModelError};

#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_io")]
    pub in_channels: usize,
    #[serde(default = "default_io")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers")]
    pub layers_per_block: usize,
    #[serde(default = "default_latent")]
    pub latent_channels: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// diffusers' `force_upcast` (its default is true): SDXL pipelines decode in f32 when the
    /// model runs in half precision, as the original SDXL VAE overflows in f16.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
}

fn default_io() -> usize {
    3
}
fn default_layers() -> usize {
    1
}
fn default_latent() -> usize {
    4
}
fn default_groups() -> usize {
    32
}
fn default_scaling() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

impl VaeConfig {
    pub fn from_file(path: &Path) -> crate::error::Result<Self> {
        let config: Self = read_json(path, "an AutoencoderKL config")?;
        let err = |message: String| ModelError::Config {
            path: path.to_path_buf(),
            message,
        };
        for t in &config.down_block_types {
            if t != "DownEncoderBlock2D" {
                return Err(err(format!(
                    "unknown block type `{t}` in `down_block_types` (supported: DownEncoderBlock2D)"
                )));
            }
        }
        for t in &config.up_block_types {
            if t != "UpDecoderBlock2D" {
                return Err(err(format!(
                    "unknown block type `{t}` in `up_block_types` (supported: UpDecoderBlock2D)"
                )));
            }
        }
        if let Some(c) = config
            .block_out_channels
            .iter()
            .find(|&&c| !c.is_multiple_of(config.norm_num_groups))
        {
            return Err(err(format!(
                "`block_out_channels` entry {c} is not divisible by `norm_num_groups` {}",
                config.norm_num_groups
            )));
        }
        Ok(config)
    }

    /// How many pixels one latent covers along each axis.
    pub fn downscale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

pub struct Vae {
    inner: AutoEncoderKL,
    config: VaeConfig,
    /// The weights' dtype: latents (kept in f32 by the denoising loop) are cast to it.
    dtype: candle_core::DType,
}

impl Vae {
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let dtype = vb.dtype();
        let inner = AutoEncoderKL::new(
            vb,
            config.in_channels,
            config.out_channels,
            AutoEncoderKLConfig {
                block_out_channels: config.block_out_channels.clone(),
                layers_per_block: config.layers_per_block,
                latent_channels: config.latent_channels,
                norm_num_groups: config.norm_num_groups,
                use_quant_conv: config.use_quant_conv,
                use_post_quant_conv: config.use_post_quant_conv,
            },
        )?;
        Ok(Self {
            inner,
            config: config.clone(),
            dtype,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Raw decoder output for already-unscaled latents (`vae.decode(z).sample`).
    pub fn decode_raw(&self, latents: &Tensor) -> Result<Tensor> {
        self.inner.decode(&latents.to_dtype(self.dtype)?)
    }

    /// Pipeline latents to an image in [0, 1]: undo the scaling factor, decode, rescale.
    pub fn decode_to_unit(&self, latents: &Tensor) -> Result<Tensor> {
        let mut z = (latents / self.config.scaling_factor)?;
        if let Some(shift) = self.config.shift_factor {
            z = (z + shift)?;
        }
        let image = self.decode_raw(&z)?;
        ((image / 2.0)? + 0.5)?.clamp(0.0, 1.0)
    }
}
