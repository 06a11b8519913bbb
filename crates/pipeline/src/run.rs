//! Executes a plan: loads each base model once, runs the generations, then writes outputs.

use std::collections::BTreeMap;

use candle_core::{DType, Device};

use crate::error::{PipelineError, Result};
use crate::generate::{BaseModel, Generated, Progress};
use crate::output::{save_latents, save_png};
use crate::plan::{OutputKind, Plan};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub device: Device,
    pub dtype: DType,
    /// Replace output files that already exist.
    pub overwrite: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            overwrite: false,
        }
    }
}

/// Runs every generation the outputs need; nothing is written unless all of them succeed.
pub fn run_plan(
    plan: &Plan,
    options: &RunOptions,
    progress: &mut dyn FnMut(&str, Progress),
) -> Result<Vec<std::path::PathBuf>> {
    if !options.overwrite {
        if let Some(existing) = plan.outputs.iter().find(|o| o.path.exists()) {
            return Err(PipelineError::Output {
                path: existing.path.clone(),
                message: "already exists (pass --overwrite to replace it)".to_string(),
            });
        }
    }
    let mut loaded: BTreeMap<&str, BaseModel> = BTreeMap::new();
    let mut results: BTreeMap<&str, Generated> = BTreeMap::new();
    for generation in &plan.generations {
        if !plan.outputs.iter().any(|o| o.node == generation.node) {
            continue;
        }
        if !loaded.contains_key(generation.base.as_str()) {
            let base_plan = plan.models.get(&generation.base).ok_or_else(|| {
                PipelineError::Plan(format!("unknown model `{}`", generation.base))
            })?;
            loaded.insert(
                generation.base.as_str(),
                BaseModel::load(base_plan, &options.device, options.dtype)?,
            );
        }
        let model = &loaded[generation.base.as_str()];
        let generated = model.generate(generation, &mut |p| progress(&generation.node, p))?;
        results.insert(generation.node.as_str(), generated);
    }
    let mut written = Vec::new();
    for output in &plan.outputs {
        let generated = results.get(output.node.as_str()).ok_or_else(|| {
            PipelineError::Plan(format!(
                "output refers to `{}`, which produced nothing",
                output.node
            ))
        })?;
        match output.kind {
            OutputKind::Image => save_png(&generated.image, &output.path)?,
            OutputKind::Latents => save_latents(&generated.latents, &output.path)?,
        }
        written.push(output.path.clone());
    }
    Ok(written)
}
