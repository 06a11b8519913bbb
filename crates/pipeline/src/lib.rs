//! Recipes, plans and the denoising loop: parse, then plan, then run. The folders are the data
//! path, each stage depending only on the ones before it:
//!
//! - [`recipe`]: what a user writes (the YAML schema, `--set` overrides, sweeps, the per-step
//!   schedule language, prompt syntax, YAML line lookup for messages);
//! - [`plan`]: a recipe checked against the files and model configs before any weight loads
//!   (one module per model and node kind; base-model families in `plan/family.rs`);
//! - [`run`]: the loaders, the one denoising loop and the contributions computed for it
//!   (IP-Adapter tokens, ControlNet residuals, T2I features), preprocessors, batches of runs;
//! - [`io`]: files written (images, latents, the recipe embedded in each PNG), used by the
//!   plan (cache keys) and the run.

pub mod error;
pub mod io;
pub mod plan;
pub mod recipe;
pub mod run;

pub use error::{PipelineError, Result};
pub use plan::Plan;
pub use recipe::Recipe;
pub use run::base_model::BaseModel;
pub use run::denoise::{Generated, Progress};
pub use run::{run_plan, RunOptions, Runner};
