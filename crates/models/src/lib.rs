//! Stable Diffusion models for ipcompose: a UNet with explicit injection points, the CLIP text
//! encoder and tokenizer, the VAE, and loading from diffusers folders.

pub mod clip_text;
pub mod error;
pub mod folder;
pub mod unet;
pub mod vae;
pub mod weights;

pub use error::{ModelError, Result};
pub mod tokenizer;
