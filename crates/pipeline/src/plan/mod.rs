//! Recipe → plan: every reference resolved, every file found and every size checked against
//! the model configs, before a single weight is loaded.

pub mod base;
pub mod control;
pub mod embedding;
pub mod family;
pub mod fetch;
pub mod generate;
pub mod ip;
pub mod lora;
pub mod preprocess;
pub mod source;

pub use crate::recipe::prompt_syntax::PromptSyntax;
pub use base::{BaseModelPlan, VaeSource};
pub use embedding::EmbeddingPlan;
pub use family::BaseKind;
pub use generate::{check_latents_file, GenerationPlan, InitialNoise};
pub use lora::{LoraModelPlan, LoraUse};
pub use preprocess::PreprocessorModelKind;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::error::{PipelineError, Result};
use crate::plan::ip::IpModelPlan;
use crate::plan::preprocess::{cache_dir, plan_preprocessors, Declared, PreprocessPlan};
use crate::plan::source::resolve_model_source;
use crate::recipe::locate::line_of;
use crate::recipe::suggest::did_you_mean;
use crate::recipe::{Node, Recipe, NODE_OPERATIONS};
use base::plan_base_model;
use control::{control_kind, plan_control, ControlModelSource};
use embedding::plan_embedding;
use generate::{generated_path, plan_generate};
use ip::{is_ip_adapter_kind, plan_ip_model, plan_ip_use};
use lora::{plan_lora_model, plan_lora_use};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    Image,
    Latents,
}

#[derive(Debug, Clone)]
pub struct OutputPlan {
    pub kind: OutputKind,
    pub node: String,
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub models: BTreeMap<String, BaseModelPlan>,
    pub ip_models: BTreeMap<String, IpModelPlan>,
    pub control_models: BTreeMap<String, ControlModelSource>,
    pub lora_models: BTreeMap<String, LoraModelPlan>,
    /// Textual-inversion embeddings: every one is added to the tokenizer and text encoder of
    /// each base whose width it fits.
    pub embeddings: BTreeMap<String, EmbeddingPlan>,
    /// Named input images, resolved to files that exist.
    pub images: BTreeMap<String, PathBuf>,
    /// Preprocessor nodes, each after the node it reads.
    pub preprocessors: Vec<PreprocessPlan>,
    /// Generate nodes, each after every node it reads.
    pub generations: Vec<GenerationPlan>,
    pub outputs: Vec<OutputPlan>,
    /// Generate nodes whose image another needed node reads, and where it is saved for it.
    pub generated: BTreeMap<String, PathBuf>,
    /// Node → the nodes it reads.
    pub dependencies: BTreeMap<String, BTreeSet<String>>,
    /// The nodes the outputs need, directly or through others.
    pub needed: BTreeSet<String>,
    /// What the recipe asks that is read differently from what it may mean (an unbalanced
    /// bracket in a prompt), each naming its YAML line; the run goes on.
    pub warnings: Vec<String>,
}

/// Errors and warnings that point at a place in the recipe file.
struct Context<'a> {
    text: &'a str,
    path: &'a Path,
    warnings: std::cell::RefCell<Vec<String>>,
}

impl Context<'_> {
    fn place(&self, keys: &[&str]) -> String {
        let place = match line_of(self.text, keys) {
            Some(line) => format!("{}:{line}", self.path.display()),
            None => self.path.display().to_string(),
        };
        format!("{place}: `{}`", keys.join("."))
    }

    fn error(&self, keys: &[&str], message: impl std::fmt::Display) -> PipelineError {
        PipelineError::Plan(format!("{}: {message}", self.place(keys)))
    }

    fn warn(&self, keys: &[&str], message: impl std::fmt::Display) {
        let warning = format!("{}: {message}", self.place(keys));
        let mut warnings = self.warnings.borrow_mut();
        if !warnings.contains(&warning) {
            warnings.push(warning);
        }
    }
}

impl Plan {
    /// Builds the plan for `recipe` (whose text is `text`, read from `recipe_path`); relative
    /// paths resolve against `base_dir`.
    pub fn build(recipe: &Recipe, text: &str, recipe_path: &Path, base_dir: &Path) -> Result<Self> {
        let cx = Context {
            text,
            path: recipe_path,
            warnings: Default::default(),
        };
        let mut models = BTreeMap::new();
        let mut ip_models = BTreeMap::new();
        let mut control_models = BTreeMap::new();
        let mut lora_models = BTreeMap::new();
        let mut embeddings = BTreeMap::new();
        let mut preprocessor_models = BTreeMap::new();
        for (name, spec) in &recipe.models {
            if spec.kind.eq_ignore_ascii_case("embedding") {
                embeddings.insert(name.clone(), plan_embedding(&cx, name, spec, base_dir)?);
                continue;
            }
            if spec.kind.eq_ignore_ascii_case("lora") {
                lora_models.insert(name.clone(), plan_lora_model(&cx, name, spec, base_dir)?);
                continue;
            }
            if let Some(kind) = PreprocessorModelKind::parse(&spec.kind) {
                let source = resolve_model_source(&spec.source, spec.revision.as_deref(), base_dir)
                    .map_err(|e| cx.error(&["models", name, "source"], e))?;
                kind.check(&source)
                    .map_err(|e| cx.error(&["models", name, "source"], e))?;
                preprocessor_models.insert(name.clone(), (kind, source));
                continue;
            }
            if is_ip_adapter_kind(&spec.kind) {
                ip_models.insert(name.clone(), plan_ip_model(&cx, name, spec, base_dir)?);
                continue;
            }
            if let Some(is_controlnet) = control_kind(&spec.kind) {
                let source = resolve_model_source(&spec.source, spec.revision.as_deref(), base_dir)
                    .map_err(|e| cx.error(&["models", name, "source"], e))?;
                control_models.insert(
                    name.clone(),
                    ControlModelSource {
                        is_controlnet,
                        source,
                        variant: spec.variant.clone(),
                        global_pool: spec.global_pool,
                    },
                );
                continue;
            }
            let kind = BaseKind::parse(&spec.kind).ok_or_else(|| {
                cx.error(
                    &["models", name, "kind"],
                    format!(
                        "unknown model kind `{}` (supported: {}, ip-adapter, controlnet, t2i-adapter, lora, embedding, depth-anything, openpose)",
                        spec.kind,
                        BaseKind::NAMES
                    ),
                )
            })?;
            models.insert(
                name.clone(),
                plan_base_model(&cx, name, spec, kind, base_dir)?,
            );
        }

        let mut images = BTreeMap::new();
        for (name, file) in &recipe.images {
            let path = base_dir.join(file);
            if !path.is_file() {
                return Err(cx.error(
                    &["images", name],
                    format!("image file `{}` not found", path.display()),
                ));
            }
            images.insert(name.clone(), path);
        }

        let mut declared = Vec::new();
        let mut generate_nodes = BTreeSet::new();
        // A generate node read by another node saves its image here during the run.
        let mut generated = BTreeMap::new();
        for (name, node) in &recipe.nodes {
            match node.operation() {
                Some(Node::Generate(spec)) => {
                    generate_nodes.insert(name.clone());
                    generated.insert(name.clone(), generated_path(base_dir, name, spec));
                }
                Some(Node::Preprocess {
                    image,
                    mut settings,
                    model,
                }) => {
                    if let Some(spec) = &node.pose {
                        spec.check()
                            .map_err(|e| cx.error(&["nodes", name, "pose"], e))?;
                    }
                    if let ipcompose_preprocess::Operation::PoseKeypoints { file, size } =
                        &settings.operation
                    {
                        let path = base_dir.join(file);
                        let at = ["nodes", name.as_str(), "pose", "keypoints"];
                        // The file's shape is checked now, before anything runs.
                        ipcompose_preprocess::pose::read_keypoints_json(&path, *size)
                            .map_err(|e| cx.error(&at, e))?;
                        settings.operation = ipcompose_preprocess::Operation::PoseKeypoints {
                            file: path,
                            size: *size,
                        };
                    }
                    if let Some(model) = model {
                        let op = settings.operation.name();
                        let names: Vec<String> = preprocessor_models.keys().cloned().collect();
                        let (kind, path) = preprocessor_models.get(model).ok_or_else(|| {
                            cx.error(
                                &["nodes", name, op, "model"],
                                format!(
                                    "unknown {op} model `{model}`{}",
                                    did_you_mean(model, &names)
                                ),
                            )
                        })?;
                        if kind.operation() != op {
                            return Err(cx.error(
                                &["nodes", name, op, "model"],
                                format!(
                                    "`{model}` is a {} model; `{op}` needs a {op} model",
                                    kind.operation()
                                ),
                            ));
                        }
                        settings.operation.set_model(path.clone());
                    }
                    declared.push(Declared {
                        node: name,
                        image,
                        settings,
                    })
                }
                None => {
                    return Err(cx.error(
                        &["nodes", name],
                        format!(
                            "a node needs exactly one operation key (valid: {})",
                            NODE_OPERATIONS.join(", ")
                        ),
                    ))
                }
            }
        }
        let preprocessors = plan_preprocessors(declared, &images, &generated, &cache_dir(base_dir))
            .map_err(|e| {
                let keys: Vec<&str> = e.keys.iter().map(String::as_str).collect();
                cx.error(&keys, e.message)
            })?;
        // Wherever an image name is expected, a preprocessor node names its cached result.
        let mut image_sources = images.clone();
        for p in &preprocessors {
            image_sources.insert(p.node.clone(), p.cache_path.clone());
        }
        // ... and a generate node names the image it makes (a second pass, a reference).
        for (node, path) in &generated {
            image_sources.insert(node.clone(), path.clone());
        }
        let dependencies = node_dependencies(recipe);
        let order = dependency_order(&dependencies)
            .map_err(|(node, message)| cx.error(&["nodes", node.as_str()], message))?;

        let mut generations = Vec::new();
        for name in &order {
            if let Some(Node::Generate(spec)) = recipe.nodes[name].operation() {
                let known = Known {
                    models: &models,
                    ip_models: &ip_models,
                    control_models: &control_models,
                    lora_models: &lora_models,
                    embeddings: &embeddings,
                    images: &image_sources,
                };
                generations.push(plan_generate(&cx, name, spec, &known, base_dir)?);
            }
        }

        let mut outputs = Vec::new();
        let mut seen_paths = BTreeSet::new();
        let node_names: Vec<String> = recipe.nodes.keys().cloned().collect();
        for (i, out) in recipe.outputs.iter().enumerate() {
            let index = i.to_string();
            let keys = ["outputs", index.as_str()];
            let (kind, node, field, ext) = match (&out.image, &out.latents) {
                (Some(n), None) => (OutputKind::Image, n, "image", "png"),
                (None, Some(n)) => (OutputKind::Latents, n, "latents", "safetensors"),
                _ => {
                    return Err(cx.error(
                        &["outputs"],
                        format!("output {i} needs exactly one of `image: NODE` or `latents: NODE`"),
                    ))
                }
            };
            if !recipe.nodes.contains_key(node) {
                return Err(cx.error(
                    &[keys[0], field],
                    format!(
                        "output {i} refers to unknown node `{node}`{}",
                        did_you_mean(node, &node_names)
                    ),
                ));
            }
            if kind == OutputKind::Latents && !generate_nodes.contains(node) {
                return Err(cx.error(
                    &[keys[0], field],
                    format!("output {i}: `{node}` is a preprocessor node; it has an image but no latents"),
                ));
            }
            let path = base_dir.join(&out.path);
            let actual_ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if !actual_ext.eq_ignore_ascii_case(ext) {
                return Err(cx.error(
                    &[keys[0], "path"],
                    format!(
                        "output {i} ({field}) must be a .{ext} file, got `{}`",
                        out.path
                    ),
                ));
            }
            if !seen_paths.insert(path.clone()) {
                return Err(cx.error(
                    &[keys[0], "path"],
                    format!("two outputs write `{}`", out.path),
                ));
            }
            outputs.push(OutputPlan {
                kind,
                node: node.clone(),
                path,
            });
        }
        let needed = needed_nodes(&dependencies, outputs.iter().map(|o| o.node.as_str()));
        generated.retain(|node, _| {
            dependencies
                .iter()
                .any(|(reader, reads)| needed.contains(reader) && reads.contains(node))
        });
        Ok(Self {
            models,
            ip_models,
            control_models,
            lora_models,
            embeddings,
            images,
            preprocessors,
            generations,
            outputs,
            generated,
            dependencies,
            needed,
            warnings: cx.warnings.into_inner(),
        })
    }

    pub fn preprocessor(&self, node: &str) -> Option<&PreprocessPlan> {
        self.preprocessors.iter().find(|p| p.node == node)
    }

    pub fn generation(&self, node: &str) -> Option<&GenerationPlan> {
        self.generations.iter().find(|g| g.node == node)
    }
}

/// `start` / `end` (defaults 0 and 1), checked to be fractions of the steps with start < end.
fn step_window(
    cx: &Context,
    keys: &[&str],
    start: Option<f64>,
    end: Option<f64>,
) -> Result<(f64, f64)> {
    let (start, end) = (start.unwrap_or(0.0), end.unwrap_or(1.0));
    if !(0.0..=1.0).contains(&start) || !(0.0..=1.0).contains(&end) || start >= end {
        return Err(cx.error(
            keys,
            format!("start {start} and end {end} must be fractions of the steps with start < end"),
        ));
    }
    Ok((start, end))
}

/// What a node may refer to.
struct Known<'a> {
    models: &'a BTreeMap<String, BaseModelPlan>,
    ip_models: &'a BTreeMap<String, IpModelPlan>,
    control_models: &'a BTreeMap<String, ControlModelSource>,
    lora_models: &'a BTreeMap<String, LoraModelPlan>,
    embeddings: &'a BTreeMap<String, EmbeddingPlan>,
    images: &'a BTreeMap<String, PathBuf>,
}

/// Every node's references to other nodes (which may not exist: planning reports those).
fn node_dependencies(recipe: &Recipe) -> BTreeMap<String, BTreeSet<String>> {
    let mut dependencies = BTreeMap::new();
    for (name, node) in &recipe.nodes {
        let mut reads: Vec<String> = Vec::new();
        match node.operation() {
            Some(Node::Generate(spec)) => {
                for control in &spec.controls {
                    reads.push(control.image.clone());
                }
                for ip in &spec.ip_adapters {
                    reads.extend(ip.image.iter().flat_map(|i| i.names()));
                    reads.extend(ip.images.iter().cloned());
                    reads.extend(ip.mask.iter().cloned());
                    reads.extend(ip.masks.iter().cloned());
                    reads.extend(ip.negative_image.iter().cloned());
                }
            }
            Some(Node::Preprocess { image, .. }) => reads.extend(image.map(str::to_string)),
            None => {}
        }
        let reads = reads
            .into_iter()
            .filter(|r| recipe.nodes.contains_key(r))
            .collect();
        dependencies.insert(name.clone(), reads);
    }
    dependencies
}

/// The nodes in an order where each comes after the nodes it reads, or the cycle that
/// prevents one (`node`, message).
fn dependency_order(
    dependencies: &BTreeMap<String, BTreeSet<String>>,
) -> std::result::Result<Vec<String>, (String, String)> {
    fn visit(
        node: &str,
        dependencies: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) -> std::result::Result<(), (String, String)> {
        if done.contains(node) {
            return Ok(());
        }
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_string());
            return Err((
                node.to_string(),
                format!("nodes form a cycle: {}", cycle.join(" → ")),
            ));
        }
        path.push(node.to_string());
        for input in dependencies.get(node).into_iter().flatten() {
            visit(input, dependencies, path, done, order)?;
        }
        path.pop();
        done.insert(node.to_string());
        order.push(node.to_string());
        Ok(())
    }
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    for node in dependencies.keys() {
        visit(node, dependencies, &mut Vec::new(), &mut done, &mut order)?;
    }
    Ok(order)
}

/// `roots` and every node they read, directly or through others.
fn needed_nodes<'a>(
    dependencies: &BTreeMap<String, BTreeSet<String>>,
    roots: impl Iterator<Item = &'a str>,
) -> BTreeSet<String> {
    let mut needed = BTreeSet::new();
    let mut stack: Vec<String> = roots.map(str::to_string).collect();
    while let Some(node) = stack.pop() {
        if needed.insert(node.clone()) {
            stack.extend(dependencies.get(&node).into_iter().flatten().cloned());
        }
    }
    needed
}
