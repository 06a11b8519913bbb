//! Recipes, plans and the denoising loop: parse, then plan, then run.

pub mod batch;
pub mod clip_image;
pub mod control;
pub mod error;
pub mod family;
pub mod fetch;
pub mod generate;
pub mod ip;
pub mod ip_scale;
pub mod locate;
pub mod mask;
pub mod noise;
pub mod output;
pub mod plan;
pub mod preprocess;
pub mod provenance;
pub mod recipe;
pub mod resample;
pub mod run;
pub mod schedule;
pub mod source;
pub mod sweep;
pub mod text;

pub use error::{PipelineError, Result};
pub use generate::{BaseModel, Generated, Progress};
pub use plan::Plan;
pub use recipe::Recipe;
pub use run::{run_plan, RunOptions, Runner};
