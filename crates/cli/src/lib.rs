//! ipcompose: structure-guided Stable Diffusion with image prompts, from YAML recipes.
//!
//! The library crates, re-exported: `models` (UNet with injection points, CLIP, VAE, loading),
//! `schedulers` (DDIM, DDPM, Euler, Euler a, Heun, LMS, DPM++, UniPC, LCM), `pipeline`
//! (recipes, plans, the loop), `preprocess` (hint images as the ControlNet annotators make them)
//! and `hub` (the Hugging Face cache and the downloader that fills it).

pub use ipcompose_hub as hub;
pub use ipcompose_models as models;
pub use ipcompose_pipeline as pipeline;
pub use ipcompose_preprocess as preprocess;
pub use ipcompose_schedulers as schedulers;
