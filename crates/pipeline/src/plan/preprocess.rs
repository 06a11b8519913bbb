//! Preprocessor nodes (`canny`, `invert`, `threshold`, `blur`, `shuffle`, `depth`, `pose`) as a
//! plan holds them: inputs resolved, settings checked, cache keys from content hashes.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ipcompose_preprocess::Settings;
use sha2::{Digest, Sha256};

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

pub(super) fn plan_error(keys: &[&str], message: impl Into<String>) -> PlanError {
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
                    crate::recipe::suggest::did_you_mean(image, &candidates)
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
                let hash = crate::io::provenance::sha256_file(&file).map_err(|e| {
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
                let hash = crate::io::provenance::sha256_file(path)
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

/// Models that preprocessor nodes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreprocessorModelKind {
    DepthAnything,
    OpenPose,
}

impl PreprocessorModelKind {
    pub(super) fn parse(kind: &str) -> Option<Self> {
        match kind.to_ascii_lowercase().as_str() {
            "depth-anything" | "depth_anything" | "depth-anything-v2" => Some(Self::DepthAnything),
            "openpose" | "open-pose" | "openpose-body" => Some(Self::OpenPose),
            _ => None,
        }
    }

    /// The node operation that uses this kind.
    pub(super) fn operation(self) -> &'static str {
        match self {
            Self::DepthAnything => "depth",
            Self::OpenPose => "pose",
        }
    }

    /// Reads headers and configs only: the file must be a checkpoint of this kind.
    pub(super) fn check(self, source: &Path) -> std::result::Result<(), String> {
        match self {
            Self::DepthAnything => ipcompose_models::depth_anything::resolve_depth_anything(source)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Self::OpenPose => ipcompose_models::openpose::BodyPoseModel::inspect(source)
                .map(|_| ())
                .map_err(|e| e.to_string()),
        }
    }
}
