//! Preprocessor nodes computed before the generations, and cached on disk by content (the
//! plan decides the cache key, see [`crate::plan::preprocess`]).

use crate::plan::preprocess::{CacheUse, PreprocessInput, PreprocessPlan};
use std::collections::BTreeSet;

use crate::error::{PipelineError, Result};
use crate::io::output::write_atomically;

/// The folder, next to the recipe, that holds preprocessed images.
pub const CACHE_DIR: &str = ".ipcompose-cache";

/// Names another cache folder (shared between recipes, or outside a read-only tree).
pub const CACHE_DIR_VARIABLE: &str = "IPCOMPOSE_CACHE_DIR";

/// Computes the preprocessors in `needed` (and the ones they read), in plan order, unless
/// their result is already cached. Those after a generation are computed once per run:
/// `fresh` remembers which were.
pub fn materialize(
    plans: &[PreprocessPlan],
    needed: &BTreeSet<String>,
    fresh: &mut BTreeSet<String>,
    networks: &mut ipcompose_preprocess::Networks,
) -> Result<Vec<(String, CacheUse)>> {
    let mut wanted = needed.clone();
    // Plans are ordered inputs-first, so walking backwards adds every upstream node.
    for plan in plans.iter().rev() {
        if wanted.contains(&plan.node) {
            if let PreprocessInput::Node(input) = &plan.input {
                wanted.insert(input.clone());
            }
        }
    }
    let mut report = Vec::new();
    for plan in plans.iter().filter(|p| wanted.contains(&p.node)) {
        let cached = if plan.after_generation {
            fresh.contains(&plan.node)
        } else {
            plan.cache_path.is_file()
        };
        if cached {
            report.push((plan.node.clone(), CacheUse::Hit));
            continue;
        }
        let source = match &plan.input {
            PreprocessInput::File(path) => path.clone(),
            PreprocessInput::Generated { path, .. } => path.clone(),
            PreprocessInput::Node(node) => plans
                .iter()
                .find(|p| &p.node == node)
                .map(|p| p.cache_path.clone())
                .ok_or_else(|| PipelineError::Plan(format!("unknown preprocessor `{node}`")))?,
        };
        let failed = |e| PipelineError::Plan(format!("preprocessor node `{}`: {e}", plan.node));
        let result = if plan.settings.operation.reads_image() {
            let image = ipcompose_preprocess::load_image(&source).map_err(failed)?;
            plan.settings.apply_with(&image, networks).map_err(failed)?
        } else {
            plan.settings.make(networks).map_err(failed)?
        };
        write_atomically(&plan.cache_path, |tmp| {
            ipcompose_preprocess::save_png(&result, tmp).map_err(|e| PipelineError::Output {
                path: plan.cache_path.clone(),
                message: e.to_string(),
            })
        })?;
        if plan.after_generation {
            fresh.insert(plan.node.clone());
        }
        report.push((plan.node.clone(), CacheUse::Computed));
    }
    Ok(report)
}
