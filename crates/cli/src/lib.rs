//! ipcompose: structure-guided Stable Diffusion with image prompts, from YAML recipes.
//!
//! The library crates, re-exported: `models` (UNet with injection points, CLIP, VAE, loading),
//! `schedulers` (DDIM, DDPM, Euler, Euler a, Heun, LMS, DPM++, UniPC, LCM), `pipeline`
//! (recipes, plans, the loop) and `preprocess` (hint images as the ControlNet annotators make them).

pub use ipcompose_models as models;
pub use ipcompose_pipeline as pipeline;
pub use ipcompose_preprocess as preprocess;
pub use ipcompose_schedulers as schedulers;
