//! Preprocessor nodes (`canny`, `invert`, `threshold`, `blur`, `shuffle`): planned with the
//! recipe, computed before the generations, and cached on disk by content.
//!
//! A node's result is named by a SHA-256 of its settings ([`Settings::describe`]) and of its
//! input: the bytes of an input file, or the key of the preprocessor node it reads. The plan
//! therefore knows every result's path before anything runs, so a preprocessor node can stand
//! wherever an image name is expected (`controls[].image`, IP-Adapter images and masks), and
//! a re-run with the same inputs and settings reuses the files in `.ipcompose-cache/`
//! next to the recipe (or in `$IPCOMPOSE_CACHE_DIR`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ipcompose_preprocess::Settings;
use sha2::{Digest, Sha256};

use crate::error::{PipelineError, Result};
use crate::output::write_atomically;

/// The folder, next to the recipe, that holds preprocessed images.
pub const CACHE_DIR: &str = ".ipcompose-cache";

/// Names another cache folder (shared between recipes, or outside a read-only tree).
pub const CACHE_DIR_VARIABLE: &str = "IPCOMPOSE_CACHE_DIR";

/// `$IPCOMPOSE_CACHE_DIR` when set, else `.ipcompose-cache` in the recipe's folder.
pub fn cache_dir(base_dir: &Path) -> PathBuf {
    match std::env::var_os(CACHE_DIR_VARIABLE) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => base_dir.join(CACHE_DIR),
    }
}

/// What a preprocessor reads.
#[derive(Debug, Clone, PartialEq)]
pub enum PreprocessInput {
    /// A file from `images:`.
    File(PathBuf),
    /// The result of another preprocessor node.
    Node(String),
    /// The image a generate node makes in this run, saved at `path`.
    Generated { node: String, path: PathBuf },
}

#[derive(Debug, Clone)]
pub struct PreprocessPlan {
    pub node: String,
    pub settings: Settings,
    pub input: PreprocessInput,
    /// Hex SHA-256 of the settings and the input's content.
    pub key: String,
    /// Where the result is (or will be) cached.
    pub cache_path: PathBuf,
    /// Reads (maybe through other preprocessors) an image generated in this run: computed
    /// again every run, after that generation.
    pub after_generation: bool,
}

/// Whether [`materialize`] computed a node or found it cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheUse {
    Computed,
    Hit,
}

/// A preprocessor node as the recipe names it, before planning.
pub struct Declared<'a> {
    pub node: &'a str,
    /// The image (or node) it reads; `None` for operations that read no image.
    pub image: Option<&'a str>,
    pub settings: Settings,
}

/// Why planning failed, with the recipe keys to point at.
pub struct PlanError {
    pub keys: Vec<String>,
    pub message: String,
}

fn plan_error(keys: &[&str], message: impl Into<String>) -> PlanError {
    PlanError {
        keys: keys.iter().map(|k| k.to_string()).collect(),
        message: message.into(),
    }
}

/// Orders the declared preprocessors so that each comes after the node it reads, checks
/// their inputs and settings, and names their cached results.
pub fn plan_preprocessors(
    declared: Vec<Declared>,
    images: &BTreeMap<String, PathBuf>,
    generated: &BTreeMap<String, PathBuf>,
    cache_dir: &Path,
) -> std::result::Result<Vec<PreprocessPlan>, PlanError> {
    let by_name: BTreeMap<&str, &Declared> = declared.iter().map(|d| (d.node, d)).collect();
    for d in &declared {
        let at = ["nodes", d.node, d.settings.operation.name()];
        d.settings
            .validate()
            .map_err(|e| plan_error(&at, e.to_string()))?;
        if images.contains_key(d.node) {
            return Err(plan_error(
                &["nodes", d.node],
                format!(
                    "`{}` names both an image and a node; rename one so that image references are unambiguous",
                    d.node
                ),
            ));
        }
        let Some(image) = d.image else {
            continue;
        };
        if !images.contains_key(image)
            && !by_name.contains_key(image)
            && !generated.contains_key(image)
        {
            let candidates: Vec<String> = images
                .keys()
                .cloned()
                .chain(by_name.keys().map(|n| n.to_string()))
                .chain(generated.keys().cloned())
                .collect();
            return Err(plan_error(
                &["nodes", d.node, d.settings.operation.name(), "image"],
                format!(
                    "unknown image `{image}`{}",
                    crate::plan::did_you_mean(image, &candidates)
                ),
            ));
        }
    }

    // Depth-first, inputs before the nodes that read them; a node met again while its own
    // inputs are still being visited closes a cycle.
    let mut order: Vec<&str> = Vec::new();
    let mut done: BTreeSet<&str> = BTreeSet::new();
    for d in &declared {
        let mut path: Vec<&str> = Vec::new();
        let mut current = d.node;
        while !done.contains(current) {
            if let Some(start) = path.iter().position(|n| *n == current) {
                let mut cycle: Vec<&str> = path[start..].to_vec();
                cycle.push(current);
                return Err(plan_error(
                    &["nodes", current],
                    format!("preprocessor nodes form a cycle: {}", cycle.join(" → ")),
                ));
            }
            path.push(current);
            match by_name[current].image.and_then(|image| by_name.get(image)) {
                Some(input) => current = input.node,
                None => break,
            }
        }
        for node in path.into_iter().rev() {
            if done.insert(node) {
                order.push(node);
            }
        }
    }

    let mut planned: BTreeMap<&str, PreprocessPlan> = BTreeMap::new();
    let mut result = Vec::with_capacity(order.len());
    for node in order {
        let d = by_name[node];
        let mut after_generation = false;
        let image = d.image.unwrap_or_default();
        let (input, input_key) = match images.get(image) {
            // Drawn from a file named in the settings (keypoints): that file is the input.
            _ if d.image.is_none() => {
                let file = match &d.settings.operation {
                    ipcompose_preprocess::Operation::PoseKeypoints { file, .. } => file.clone(),
                    _ => PathBuf::new(),
                };
                let hash = crate::provenance::sha256_file(&file).map_err(|e| {
                    plan_error(
                        &["nodes", d.node, d.settings.operation.name()],
                        e.to_string(),
                    )
                })?;
                (PreprocessInput::File(file), format!("file {hash}"))
            }
            _ if generated.contains_key(image) => {
                after_generation = true;
                let path = generated[image].clone();
                let key = format!("generated {}", path.display());
                let node = image.to_string();
                (PreprocessInput::Generated { node, path }, key)
            }
            Some(path) => {
                // Decoding problems surface now, before any weights load.
                image::image_dimensions(path).map_err(|e| {
                    plan_error(
                        &["images", image],
                        format!("cannot read image `{}`: {e}", path.display()),
                    )
                })?;
                let hash = crate::provenance::sha256_file(path)
                    .map_err(|e| plan_error(&["images", image], e.to_string()))?;
                (PreprocessInput::File(path.clone()), format!("file {hash}"))
            }
            None => {
                let upstream = &planned[image];
                after_generation = upstream.after_generation;
                (
                    PreprocessInput::Node(image.to_string()),
                    format!("node {}", upstream.key),
                )
            }
        };
        let key = format!(
            "{:x}",
            Sha256::digest(format!("{}\n{input_key}", d.settings.describe()))
        );
        let cache_path = cache_dir.join(format!("{}-{key}.png", d.settings.operation.name()));
        let plan = PreprocessPlan {
            node: node.to_string(),
            settings: d.settings.clone(),
            input,
            key,
            cache_path,
            after_generation,
        };
        planned.insert(node, plan.clone());
        result.push(plan);
    }
    Ok(result)
}

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
