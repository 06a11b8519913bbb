//! Stable Diffusion models for ipcompose: a UNet with explicit injection points, the CLIP text
//! encoder and tokenizer, the VAE, and loading from diffusers folders.

mod clip_encoder;
pub mod clip_text;
pub mod clip_vision;
pub use clip_encoder::Activation;
pub mod controlnet;
pub mod depth_anything;
pub mod embedding;
pub mod error;
pub mod folder;
pub mod ip_adapter;
mod legacy_pth;
pub mod lora;
pub mod openpose;
pub mod single_file;
pub mod single_file_base;
pub mod t2i_adapter;
pub mod unet;
pub mod vae;
pub mod weights;

pub use error::{ModelError, Result};
pub mod tokenizer;
