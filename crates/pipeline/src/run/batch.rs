//! A recipe as the runs it asks for: one plan, or one per sweep combination (see
//! [`crate::recipe::sweep`]). Everything is parsed and planned here, before any weight loads.

use std::path::{Path, PathBuf};

use crate::error::{PipelineError, Result};
use crate::io::output::save_rgb_png;
use crate::io::provenance::embedded_text;
use crate::plan::fetch::{ensure_models, CacheOnly, ModelFetcher};
use crate::plan::Plan;
use crate::recipe::sweep::{expand, Sweep};
use crate::recipe::Recipe;
use crate::run::denoise::Progress;
use crate::run::{RunOptions, Runner};

/// One run of a recipe.
pub struct PlannedRun {
    /// The sweep choices (`seed 1, guidance 5`); empty without a sweep.
    pub label: String,
    pub recipe: Recipe,
    pub plan: Plan,
    /// The resolved recipe embedded in the PNGs this run writes.
    pub metadata: String,
}

pub struct Batch {
    pub runs: Vec<PlannedRun>,
    pub sweep: Option<Sweep>,
}

impl Batch {
    /// Parses `text` (read from `origin`), applies `--set` overrides, expands sweeps and plans
    /// every run. Relative paths resolve against `origin`'s folder. Hub ids must be in the hub
    /// cache (nothing is downloaded: see [`Batch::plan_with`]).
    pub fn plan(text: &str, origin: &Path, sets: &[String]) -> Result<Self> {
        Self::plan_with(text, origin, sets, &mut CacheOnly { offline: false })
    }

    /// As [`Batch::plan`], with `fetcher` bringing the hub models every run needs into the
    /// cache before planning (see [`crate::fetch`]).
    pub fn plan_with(
        text: &str,
        origin: &Path,
        sets: &[String],
        fetcher: &mut dyn ModelFetcher,
    ) -> Result<Self> {
        let base_dir = origin.parent().map(Path::to_path_buf).unwrap_or_default();
        let document = Recipe::document(text, origin, sets)?;
        let sweep = expand(&document, &base_dir).map_err(|message| PipelineError::Recipe {
            path: origin.to_path_buf(),
            message,
        })?;
        let Some(sweep) = sweep else {
            // Parsed from the text so that serde's messages carry YAML lines.
            let recipe = Recipe::parse_with_overrides(text, origin, sets)?;
            ensure_models(&[&recipe], text, origin, &base_dir, fetcher)?;
            let plan = Plan::build(&recipe, text, origin, &base_dir)?;
            let metadata = embedded_text(&recipe, &base_dir)?;
            return Ok(Self {
                runs: vec![PlannedRun {
                    label: String::new(),
                    recipe,
                    plan,
                    metadata,
                }],
                sweep: None,
            });
        };
        let mut recipes = Vec::with_capacity(sweep.combinations.len());
        for combination in &sweep.combinations {
            let label = combination.labels.join(", ");
            let recipe = Recipe::from_document(combination.document.clone(), origin).map_err(
                |e| match e {
                    PipelineError::Recipe { path, message } => PipelineError::Recipe {
                        path,
                        message: format!("sweep combination ({label}): {message}"),
                    },
                    other => other,
                },
            )?;
            recipes.push((label, recipe));
        }
        let all: Vec<&Recipe> = recipes.iter().map(|(_, r)| r).collect();
        ensure_models(&all, text, origin, &base_dir, fetcher)?;
        let mut runs = Vec::with_capacity(recipes.len());
        for (label, recipe) in recipes {
            let plan = Plan::build(&recipe, text, origin, &base_dir)
                .map_err(|e| PipelineError::Plan(format!("sweep combination ({label}): {e}")))?;
            let metadata = embedded_text(&recipe, &base_dir)?;
            runs.push(PlannedRun {
                label,
                recipe,
                plan,
                metadata,
            });
        }
        Ok(Self {
            runs,
            sweep: Some(sweep),
        })
    }

    /// Every file the batch writes, the grids included.
    pub fn output_paths(&self) -> Vec<PathBuf> {
        let mut paths: Vec<PathBuf> = self
            .runs
            .iter()
            .flat_map(|r| r.plan.outputs.iter().map(|o| o.path.clone()))
            .collect();
        if let Some(sweep) = &self.sweep {
            paths.extend(sweep.grids.iter().map(|g| g.path.clone()));
        }
        paths
    }

    /// Runs every plan (models loaded once), then writes the sweep's grids. Refuses to start
    /// when any output exists and overwriting is off.
    pub fn run(
        &self,
        options: &RunOptions,
        progress: &mut dyn FnMut(&str, Progress),
    ) -> Result<Vec<PathBuf>> {
        if !options.overwrite {
            if let Some(existing) = self.output_paths().into_iter().find(|p| p.exists()) {
                return Err(PipelineError::Output {
                    path: existing,
                    message: "already exists (pass --overwrite to replace it)".to_string(),
                });
            }
        }
        let mut runner = Runner::new(options);
        let mut written = Vec::new();
        for run in &self.runs {
            let node_label = |node: &str| {
                if run.label.is_empty() {
                    node.to_string()
                } else {
                    format!("{node} [{}]", run.label)
                }
            };
            written.extend(runner.run(&run.plan, Some(&run.metadata), &mut |node, p| {
                progress(&node_label(node), p)
            })?);
        }
        if let Some(sweep) = &self.sweep {
            for grid in &sweep.grids {
                let sheet = sweep.compose_grid(grid)?;
                save_rgb_png(&sheet, &grid.path, None)?;
                written.push(grid.path.clone());
            }
        }
        Ok(written)
    }
}
