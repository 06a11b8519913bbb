//! Recipe → plan: every reference resolved, every file found and every size checked against
//! the model configs, before a single weight is loaded.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ipcompose_models::clip_text::ClipTextConfig;
use ipcompose_models::controlnet::{union_type_index, union_type_names, ControlNetConfig};
use ipcompose_models::folder::DiffusersFolder;
use ipcompose_models::t2i_adapter::T2IAdapterConfig;
use ipcompose_models::unet::UNetConfig;
use ipcompose_models::vae::VaeConfig;
use ipcompose_schedulers::{SchedulerConfig, SchedulerKind};

use crate::clip_image::Fit;
use crate::control::{
    t2i_active_at, ControlKind, ControlModelSource, ControlNetPlan, ControlUse, ResizeMode,
    T2IAdapterPlan,
};
use crate::error::{PipelineError, Result};
use crate::ip::{Combine, IpAdapterUse, IpModelPlan, IpSource};
use crate::ip_scale::resolve_scales;
use crate::locate::line_of;
use crate::preprocess::{cache_dir, plan_preprocessors, Declared, PreprocessPlan};
pub use crate::prompt_syntax::PromptSyntax;
use crate::recipe::ControlSpec;
use crate::recipe::{GenerateSpec, IpAdapterSpec, ModelSpec, Node, Recipe, NODE_OPERATIONS};
use crate::schedule::{window, Strength};
use crate::source::resolve_model_source;

pub use crate::family::BaseKind;
use crate::family::{AddedConditioning, Family, MicroConditioning, TextEncoding};

#[derive(Debug, Clone)]
pub struct BaseModelPlan {
    pub name: String,
    /// The family (`family.rs`): how text is encoded, which added conditioning the UNet takes.
    pub kind: BaseKind,
    /// The diffusers folder (for a single-file checkpoint: where configs, tokenizer and
    /// scheduler come from).
    pub folder: DiffusersFolder,
    /// A single-file checkpoint holding the weights, when the source is one.
    pub single_file: Option<PathBuf>,
    pub unet: UNetConfig,
    /// The VAE's config: the base's, or the `vae:` folder's when one replaces it.
    pub vae: VaeConfig,
    /// The recipe's `vae:`, replacing the base's own VAE.
    pub vae_source: Option<VaeSource>,
    pub text_encoder: ClipTextConfig,
    /// SDXL's second text encoder (with `projection_dim`); `None` for one-encoder families.
    pub text_encoder_2: Option<ClipTextConfig>,
    /// `model_index.json`'s `force_zeros_for_empty_prompt` (two-encoder families; diffusers'
    /// default true when the file does not say).
    pub force_zeros_for_empty_prompt: bool,
    pub scheduler_config: SchedulerConfig,
}

/// Where a base's VAE comes from when the recipe's `vae:` replaces it.
#[derive(Debug, Clone, PartialEq)]
pub enum VaeSource {
    /// A diffusers `AutoencoderKL` folder: its `config.json` and weights.
    Folder(PathBuf),
    /// A single VAE file (original or diffusers names), read with the base's VAE config, as
    /// diffusers' `AutoencoderKL.from_single_file(file, config=base, subfolder="vae")`.
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
pub enum InitialNoise {
    /// Drawn from ipcompose's own generator (ChaCha20, see `noise.rs`).
    Seed(u64),
    /// Read from a safetensors file, key `latents`.
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct GenerationPlan {
    pub node: String,
    pub base: String,
    pub prompt: String,
    /// SDXL's second-encoder prompts (`None`: the first ones).
    pub prompt_2: Option<String>,
    pub negative_prompt: Option<String>,
    pub negative_prompt_2: Option<String>,
    /// How the prompts are read (weights, `BREAK`, long prompts).
    pub prompt_syntax: PromptSyntax,
    /// SDXL's micro-conditioning with its defaults filled in; `None` for families without it.
    pub micro_conditioning: Option<MicroConditioning>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub scheduler_kind: SchedulerKind,
    pub scheduler_config: SchedulerConfig,
    pub guidance: f64,
    pub guidance_rescale: f64,
    pub init: InitialNoise,
    pub clip_skip: usize,
    pub ip_adapters: Vec<IpAdapterUse>,
    pub controls: Vec<ControlUse>,
    /// LoRAs patched into the base's weights for this generation, in recipe order.
    pub loras: Vec<LoraUse>,
}

/// A LoRA of a generation: its file (read once, at plan time) and multiplier.
#[derive(Debug, Clone)]
pub struct LoraUse {
    pub model: String,
    pub lora: std::sync::Arc<ipcompose_models::lora::LoraFile>,
    pub scale: f64,
}

/// A model of `kind: embedding` (textual inversion), read at plan time.
#[derive(Debug, Clone)]
pub struct EmbeddingPlan {
    pub file: PathBuf,
    /// The word prompts use for it.
    pub token: String,
    pub embedding: ipcompose_models::embedding::TextualInversion,
}

/// A model of `kind: lora`, read and checked at plan time (format, which base it fits).
#[derive(Debug, Clone)]
pub struct LoraModelPlan {
    pub lora: std::sync::Arc<ipcompose_models::lora::LoraFile>,
}

impl GenerationPlan {
    /// Every condition's weight at every step, one row per step, as the loop will apply
    /// them (0 = not applied); `None` when the generation has no conditions.
    pub fn weight_table(&self) -> Option<String> {
        let mut columns: Vec<(String, &[f64])> = Vec::new();
        for ip in &self.ip_adapters {
            columns.push((format!("ip:{}", ip.model), &ip.step_scales));
        }
        for control in &self.controls {
            let kind = match control.kind {
                ControlKind::ControlNet { .. } => "cn",
                ControlKind::T2IAdapter { .. } => "t2i",
            };
            columns.push((format!("{kind}:{}", control.model), &control.step_scales));
        }
        if columns.is_empty() {
            return None;
        }
        let widths: Vec<usize> = columns.iter().map(|(name, _)| name.len().max(6)).collect();
        let mut table = String::from("step");
        for ((name, _), width) in columns.iter().zip(&widths) {
            table.push_str(&format!("  {name:>width$}"));
        }
        table.push('\n');
        for step in 0..self.steps {
            table.push_str(&format!("{step:>4}"));
            for ((_, weights), width) in columns.iter().zip(&widths) {
                let weight = weights.get(step).copied().unwrap_or(0.0);
                let cell = if weight == 0.0 {
                    "-".to_string()
                } else {
                    format!("{weight:.3}")
                };
                table.push_str(&format!("  {cell:>width$}"));
            }
            table.push('\n');
        }
        Some(table)
    }
}

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

/// The closest name by edit distance, offered as "did you mean".
pub fn did_you_mean<'a>(name: &str, candidates: impl IntoIterator<Item = &'a String>) -> String {
    let best = candidates
        .into_iter()
        .map(|c| (edit_distance(name, c), c))
        .min_by_key(|(d, _)| *d);
    match best {
        Some((d, c)) if d <= name.len().max(2) / 2 + 1 => format!(" (did you mean `{c}`?)"),
        _ => String::new(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
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

/// A base model of `kind` (`models.NAME`): its folder, or a single-file checkpoint with the
/// folder its configs come from, every config read and checked against the family, and the
/// `vae:` that replaces its VAE.
fn plan_base_model(
    cx: &Context,
    name: &str,
    spec: &ModelSpec,
    kind: BaseKind,
    base_dir: &Path,
) -> Result<BaseModelPlan> {
    let family = kind.family();
    let root = resolve_model_source(&spec.source, spec.revision.as_deref(), base_dir)
        .map_err(|e| cx.error(&["models", name, "source"], e))?;
    // A single file carries weights only; like diffusers' `from_single_file`, the configs,
    // tokenizers and scheduler come from a diffusers folder of the same base (`config:`, by
    // default the family's reference repo in the local hub cache).
    let single_file = if root.is_file() {
        Some(plan_single_file(cx, name, family, &root)?)
    } else {
        if spec.config.is_some() {
            return Err(cx.error(
                &["models", name, "config"],
                "`config` is for single-file checkpoints; this source is a folder",
            ));
        }
        None
    };
    let config_root = match (&single_file, &spec.config, family.single_file) {
        (None, _, _) => root.clone(),
        (Some(_), Some(config), _) => resolve_model_source(config, None, base_dir)
            .map_err(|e| cx.error(&["models", name, "config"], e))?,
        // `plan_single_file` refuses families without single files.
        (Some(_), None, repo) => {
            let repo = repo.unwrap_or_default();
            resolve_model_source(repo, None, base_dir).map_err(|e| {
                cx.error(
                    &["models", name, "source"],
                    format!("a single-file checkpoint needs the configs and tokenizers of its base: give `config: FOLDER`, or have {repo} in the hub cache ({e})"),
                )
            })?
        }
    };
    let mut folder = DiffusersFolder::open(&config_root)
        .map_err(|e| cx.error(&["models", name, "source"], e))?;
    folder.variant = spec.variant.clone();
    let at = |e: ipcompose_models::ModelError| cx.error(&["models", name], e);
    let unet = folder.unet_config().map_err(at)?;
    let vae = folder.vae_config().map_err(at)?;
    let text_encoder = folder.text_encoder_config().map_err(at)?;
    let scheduler_config = SchedulerConfig::from_file(&folder.scheduler_config_path())
        .map_err(|e| cx.error(&["models", name], e))?;
    let (text_encoder_2, force_zeros_for_empty_prompt) =
        plan_base_family(cx, name, family, &folder, &unet, &text_encoder)?;
    if vae.latent_channels != unet.in_channels {
        return Err(cx.error(
            &["models", name],
            format!(
                "VAE latent channels {} do not match the UNet's in_channels {}",
                vae.latent_channels, unet.in_channels
            ),
        ));
    }
    let (vae, vae_source) = match &spec.vae {
        None => (vae, None),
        Some(source) => {
            let (config, vae_source) = plan_vae(cx, name, spec, source, &vae, base_dir)?;
            (config, Some(vae_source))
        }
    };
    Ok(BaseModelPlan {
        name: name.to_string(),
        kind,
        folder,
        single_file,
        unet,
        vae,
        vae_source,
        text_encoder,
        text_encoder_2,
        force_zeros_for_empty_prompt,
        scheduler_config,
    })
}

/// A single-file checkpoint as the source of a base of `family`: it must hold that family
/// (an SDXL file under `kind: sd15` names `kind: sdxl`, and the reverse); files of families
/// ipcompose does not run (SD3, Flux, …) are named as such.
fn plan_single_file(cx: &Context, name: &str, family: &Family, file: &Path) -> Result<PathBuf> {
    let checkpoint = ipcompose_models::single_file_base::SingleFileCheckpoint::open(file)
        .map_err(|e| cx.error(&["models", name, "source"], e))?;
    match checkpoint.kind.recipe_kind() {
        Some(kind) if kind == family.name => {}
        Some(kind) => {
            return Err(cx.error(
                &["models", name, "kind"],
                format!(
                    "`{}` is {}; use `kind: {kind}` (the recipe says `kind: {}`)",
                    file.display(),
                    checkpoint.kind.describe(),
                    family.name
                ),
            ));
        }
        None => {
            return Err(cx.error(
                &["models", name, "source"],
                format!("`{}` is {}", file.display(), checkpoint.kind.describe()),
            ));
        }
    }
    if family.single_file.is_none() {
        return Err(cx.error(
            &["models", name, "kind"],
            format!(
                "single-file checkpoints are not supported for {} bases; use a diffusers folder",
                family.name
            ),
        ));
    }
    Ok(checkpoint.file)
}

/// The recipe's `vae:` of a base: a diffusers `AutoencoderKL` folder (or a pipeline folder's
/// `vae/`) or a single VAE file; its latent channels must be the base VAE's (`base_vae`).
/// Returns the VAE config to run with (the folder's; a file uses the base's) and the source.
fn plan_vae(
    cx: &Context,
    name: &str,
    spec: &ModelSpec,
    source: &str,
    base_vae: &VaeConfig,
    base_dir: &Path,
) -> Result<(VaeConfig, VaeSource)> {
    let at = ["models", name, "vae"];
    let path = resolve_model_source(source, None, base_dir).map_err(|e| cx.error(&at, e))?;
    let (config, latent_channels, vae_source) = if path.is_file() {
        let latent = ipcompose_models::single_file_base::vae_file_latent_channels(&path)
            .map_err(|e| cx.error(&at, e))?;
        (base_vae.clone(), latent, VaeSource::File(path.clone()))
    } else {
        // A pipeline folder stands for its `vae/`.
        let dir = if !path.join("config.json").is_file() && path.join("vae/config.json").is_file() {
            path.join("vae")
        } else {
            path.clone()
        };
        let config = VaeConfig::from_file(&dir.join("config.json")).map_err(|e| {
            cx.error(
                &at,
                format!("not a diffusers AutoencoderKL folder or a VAE file: {e}"),
            )
        })?;
        ipcompose_models::weights::find_component_weights(
            &dir,
            "diffusion_pytorch_model",
            spec.variant.as_deref(),
        )
        .map_err(|e| cx.error(&at, e))?;
        let latent = config.latent_channels;
        (config, latent, VaeSource::Folder(dir))
    };
    if latent_channels != base_vae.latent_channels {
        return Err(cx.error(
            &at,
            format!(
                "the VAE `{}` has {latent_channels} latent channels, the base model `{name}` {}",
                path.display(),
                base_vae.latent_channels
            ),
        ));
    }
    Ok((config, vae_source))
}

/// Checks a base folder against its family (text encoders, added embedding, widths); returns
/// the second text encoder's config and `force_zeros_for_empty_prompt`.
fn plan_base_family(
    cx: &Context,
    name: &str,
    family: &Family,
    folder: &DiffusersFolder,
    unet: &UNetConfig,
    text_encoder: &ClipTextConfig,
) -> Result<(Option<ClipTextConfig>, bool)> {
    let at = |e: ipcompose_models::ModelError| cx.error(&["models", name], e);
    let holds_sdxl = unet.addition.is_some() || folder.has_component("text_encoder_2");
    match (family.added, unet.addition) {
        (AddedConditioning::None, _) if holds_sdxl => {
            return Err(cx.error(
                &["models", name, "kind"],
                format!(
                    "`{}` holds an SDXL model (a second text encoder and an added text/time embedding); use `kind: sdxl`",
                    folder.root().display()
                ),
            ));
        }
        (AddedConditioning::TextTime, None) => {
            return Err(cx.error(
                &["models", name, "kind"],
                format!(
                    "`{}` is not an SDXL model: its UNet has no added text/time embedding (`addition_embed_type: text_time`); use `kind: sd15` or `sd2` for it",
                    folder.root().display()
                ),
            ));
        }
        _ => {}
    }
    match family.text {
        TextEncoding::Single => {
            if text_encoder.hidden_size != unet.cross_attention_dim {
                return Err(cx.error(
                    &["models", name],
                    format!(
                        "text encoder width {} does not match the UNet's cross_attention_dim {}",
                        text_encoder.hidden_size, unet.cross_attention_dim
                    ),
                ));
            }
            Ok((None, false))
        }
        TextEncoding::Dual => {
            let missing: Vec<&str> = ["text_encoder_2", "tokenizer_2"]
                .into_iter()
                .filter(|c| !folder.has_component(c))
                .collect();
            if !missing.is_empty() {
                return Err(cx.error(
                    &["models", name, "source"],
                    format!(
                        "an sdxl base needs both text encoders; `{}` has no sub-folder {}",
                        folder.root().display(),
                        missing.join(", ")
                    ),
                ));
            }
            let second = folder.text_encoder_2_config().map_err(at)?;
            let context = text_encoder.hidden_size + second.hidden_size;
            if context != unet.cross_attention_dim {
                return Err(cx.error(
                    &["models", name],
                    format!(
                        "the text encoders' widths {} + {} = {context} do not match the UNet's cross_attention_dim {}",
                        text_encoder.hidden_size, second.hidden_size, unet.cross_attention_dim
                    ),
                ));
            }
            if let (Some(addition), Some(projection)) = (unet.addition, second.projection_dim) {
                if addition.text_embeds_dim() != projection {
                    return Err(cx.error(
                        &["models", name],
                        format!(
                            "the UNet's added embedding takes pooled text embeddings of width {} (projection_class_embeddings_input_dim {} minus 6 time ids × {}), but text_encoder_2 projects to {projection}",
                            addition.text_embeds_dim(),
                            addition.input_dim,
                            addition.time_embed_dim
                        ),
                    ));
                }
            }
            let index = folder.model_index().map_err(at)?;
            Ok((
                Some(second),
                index.force_zeros_for_empty_prompt.unwrap_or(true),
            ))
        }
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

/// `Some(true)` for ControlNets, `Some(false)` for T2I-Adapters.
fn control_kind(kind: &str) -> Option<bool> {
    match kind.to_ascii_lowercase().as_str() {
        "controlnet" | "control-net" | "control_net" => Some(true),
        "t2i-adapter" | "t2i_adapter" | "t2iadapter" | "t2i" => Some(false),
        _ => None,
    }
}

fn plan_control(
    cx: &Context,
    node: &str,
    index: usize,
    spec: &ControlSpec,
    known: &Known,
    base: &BaseModelPlan,
    steps: usize,
) -> Result<ControlUse> {
    let at = |k: &'static str| ["nodes", node, "generate", "controls", k];
    let names: Vec<String> = known.control_models.keys().cloned().collect();
    let source = known.control_models.get(&spec.model).ok_or_else(|| {
        cx.error(
            &at("model"),
            format!(
                "controls[{index}]: unknown ControlNet / T2I-Adapter model `{}`{}",
                spec.model,
                did_you_mean(&spec.model, &names)
            ),
        )
    })?;
    let image_names: Vec<String> = known.images.keys().cloned().collect();
    let image = known.images.get(&spec.image).cloned().ok_or_else(|| {
        cx.error(
            &at("image"),
            format!(
                "unknown image `{}`{}",
                spec.image,
                did_you_mean(&spec.image, &image_names)
            ),
        )
    })?;
    let model_error =
        |e: ipcompose_models::ModelError| cx.error(&at("model"), format!("`{}`: {e}", spec.model));
    let kind = if source.is_controlnet {
        if spec.factor.is_some() {
            return Err(cx.error(
                &at("factor"),
                "`factor` is for T2I-Adapters; ControlNets take start/end",
            ));
        }
        let single_file = source.source.is_file();
        let config = if single_file {
            ControlNetConfig::from_single_file(
                &source.source,
                &base.unet,
                source.global_pool.unwrap_or(false),
            )
            .map_err(model_error)?
        } else {
            let config = ControlNetConfig::from_folder(&source.source).map_err(model_error)?;
            ipcompose_models::controlnet::check_compatible(&config, &base.unet)
                .map_err(model_error)?;
            config
        };
        let guess_mode = spec.guess_mode.unwrap_or(false);
        let union_type = match (&config.union, &spec.union_type) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(cx.error(
                    &at("type"),
                    format!(
                        "controls[{index}]: `type` is for union ControlNets; `{}` is a plain ControlNet",
                        spec.model
                    ),
                ))
            }
            (Some(union), None) => {
                return Err(cx.error(
                    &at("model"),
                    format!(
                        "controls[{index}]: `{}` is a union ControlNet: name the image's condition `type:` ({})",
                        spec.model,
                        union_type_names(union.num_control_type)
                    ),
                ));
            }
            (Some(union), Some(name)) => {
                if guess_mode {
                    return Err(cx.error(
                        &at("guess_mode"),
                        format!(
                            "controls[{index}]: guess mode is not supported for union ControlNets (diffusers' union pipeline fails with it)"
                        ),
                    ));
                }
                Some(
                    union_type_index(name, union.num_control_type)
                        .map_err(|e| cx.error(&at("type"), format!("controls[{index}]: {e}")))?,
                )
            }
        };
        ControlKind::ControlNet {
            plan: Box::new(ControlNetPlan {
                source: source.source.clone(),
                single_file,
                variant: source.variant.clone(),
                config,
            }),
            guess_mode,
            union_type,
        }
    } else {
        if spec.guess_mode.is_some() {
            return Err(cx.error(&at("guess_mode"), "`guess_mode` is for ControlNets"));
        }
        if spec.union_type.is_some() {
            return Err(cx.error(&at("type"), "`type` is for union ControlNets"));
        }
        let config = T2IAdapterConfig::from_folder(&source.source).map_err(model_error)?;
        ipcompose_models::t2i_adapter::check_compatible(&config, &base.unet)
            .map_err(model_error)?;
        let factor = spec.factor.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&factor) {
            return Err(cx.error(
                &at("factor"),
                format!("factor {factor} must be between 0 and 1"),
            ));
        }
        ControlKind::T2IAdapter {
            plan: T2IAdapterPlan {
                source: source.source.clone(),
                variant: source.variant.clone(),
                config,
            },
            factor,
        }
    };
    let (start, end) = step_window(cx, &at("start"), spec.start, spec.end)?;
    let active: Vec<bool> = match &kind {
        ControlKind::T2IAdapter { factor, .. } => (0..steps)
            .map(|i| t2i_active_at(i, steps, start, end, *factor))
            .collect(),
        ControlKind::ControlNet { .. } => window(steps, start, end),
    };
    let step_scales = spec
        .scale
        .clone()
        .unwrap_or(Strength::Constant(1.0))
        .per_step(&active)
        .map_err(|e| cx.error(&at("scale"), format!("controls[{index}]: {e}")))?;
    let resize: ResizeMode = match &spec.resize {
        None => ResizeMode::Resize,
        Some(r) => r.parse().map_err(|e: String| cx.error(&at("resize"), e))?,
    };
    Ok(ControlUse {
        model: spec.model.clone(),
        image,
        step_scales,
        start,
        end,
        resize,
        kind,
    })
}

/// A `kind: embedding` model: the file is read (a few kilobytes) for its vectors and token.
fn plan_embedding(
    cx: &Context,
    name: &str,
    spec: &ModelSpec,
    base_dir: &Path,
) -> Result<EmbeddingPlan> {
    let at = ["models", name, "source"];
    let file = resolve_model_source(&spec.source, spec.revision.as_deref(), base_dir)
        .map_err(|e| cx.error(&at, e))?;
    let embedding =
        ipcompose_models::embedding::TextualInversion::open(&file).map_err(|e| cx.error(&at, e))?;
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| name.to_string());
    let token = spec
        .token
        .clone()
        .or_else(|| embedding.stored_token.clone())
        .unwrap_or(stem);
    if token.trim().is_empty() || token.contains(char::is_whitespace) {
        return Err(cx.error(
            &["models", name, "token"],
            format!("token `{token}` must be one word"),
        ));
    }
    Ok(EmbeddingPlan {
        file,
        token,
        embedding,
    })
}

/// A `kind: lora` model: the file is read (LoRA files are small) to know its format and the
/// base it fits; its keys are matched to the base's layers when the base loads.
fn plan_lora_model(
    cx: &Context,
    name: &str,
    spec: &ModelSpec,
    base_dir: &Path,
) -> Result<LoraModelPlan> {
    let at = ["models", name, "source"];
    let file = resolve_model_source(&spec.source, spec.revision.as_deref(), base_dir)
        .map_err(|e| cx.error(&at, e))?;
    if !file.is_file() {
        return Err(cx.error(
            &at,
            format!("LoRA source `{}` is not a file", file.display()),
        ));
    }
    let lora = ipcompose_models::lora::LoraFile::open(&file).map_err(|e| cx.error(&at, e))?;
    Ok(LoraModelPlan {
        lora: std::sync::Arc::new(lora),
    })
}

fn plan_lora_use(
    cx: &Context,
    node: &str,
    index: usize,
    spec: &crate::recipe::LoraSpec,
    known: &Known,
    base: &BaseModelPlan,
) -> Result<LoraUse> {
    let at = |k: &'static str| ["nodes", node, "generate", "loras", k];
    let names: Vec<String> = known.lora_models.keys().cloned().collect();
    let model = known.lora_models.get(&spec.model).ok_or_else(|| {
        cx.error(
            &at("model"),
            format!(
                "loras[{index}]: unknown LoRA model `{}`{}",
                spec.model,
                did_you_mean(&spec.model, &names)
            ),
        )
    })?;
    if !spec.scale.is_finite() {
        return Err(cx.error(
            &at("scale"),
            format!("loras[{index}]: scale must be a number"),
        ));
    }
    let summary = &model.lora.summary();
    let expected = base.unet.cross_attention_dim;
    // A file for a second text encoder needs a base that has one (SDXL).
    let second_encoder_missing = summary
        .components
        .contains(&ipcompose_models::lora::Component::TextEncoder2)
        && base.text_encoder_2.is_none();
    let width_differs = summary.cross_attention_width.is_some_and(|w| w != expected);
    if width_differs || second_encoder_missing {
        return Err(cx.error(
            &at("model"),
            format!(
                "loras[{index}]: `{}` is a {} for {} (cross-attention width {}), but the base `{}` has width {expected}",
                spec.model,
                summary.format.describe(),
                summary.base(),
                summary
                    .cross_attention_width
                    .map_or("unknown".to_string(), |w| w.to_string()),
                base.name
            ),
        ));
    }
    Ok(LoraUse {
        model: spec.model.clone(),
        lora: model.lora.clone(),
        scale: spec.scale,
    })
}

fn is_ip_adapter_kind(kind: &str) -> bool {
    matches!(
        kind.to_ascii_lowercase().as_str(),
        "ip-adapter" | "ip_adapter" | "ipadapter"
    )
}

fn plan_ip_model(
    cx: &Context,
    name: &str,
    spec: &ModelSpec,
    base_dir: &Path,
) -> Result<IpModelPlan> {
    let file = resolve_model_source(&spec.source, spec.revision.as_deref(), base_dir)
        .map_err(|e| cx.error(&["models", name, "source"], e))?;
    if !file.is_file() {
        return Err(cx.error(
            &["models", name, "source"],
            format!("IP-Adapter source `{}` is not a file", file.display()),
        ));
    }
    let info = ipcompose_models::ip_adapter::inspect(&file)
        .map_err(|e| cx.error(&["models", name, "source"], e))?;
    let image_encoder = match &spec.image_encoder {
        None => None,
        Some(dir) => {
            let dir = resolve_model_source(dir, spec.revision.as_deref(), base_dir)
                .map_err(|e| cx.error(&["models", name, "image_encoder"], e))?;
            let config = ipcompose_models::clip_vision::ClipVisionConfig::from_file(
                &dir.join("config.json"),
            )
            .map_err(|e| cx.error(&["models", name, "image_encoder"], e))?;
            let expected = if info.projection.uses_penultimate() {
                config.hidden_size
            } else {
                config.projection_dim
            };
            if expected != info.image_feature_width {
                return Err(cx.error(
                    &["models", name, "image_encoder"],
                    format!(
                        "the {} adapter expects image features of width {}, but this encoder gives {expected} (wrong image encoder: e.g. ViT-H vs ViT-bigG)",
                        info.projection.name(),
                        info.image_feature_width
                    ),
                ));
            }
            Some((dir, config))
        }
    };
    Ok(IpModelPlan {
        file,
        info,
        image_encoder,
    })
}

#[allow(clippy::too_many_arguments)]
fn plan_ip_use(
    cx: &Context,
    node: &str,
    index: usize,
    spec: &IpAdapterSpec,
    known: &Known,
    base: &BaseModelPlan,
    base_dir: &Path,
    steps: usize,
) -> Result<IpAdapterUse> {
    let i = index.to_string();
    let at = |k: &'static str| ["nodes", node, "generate", "ip_adapters", k];
    let ip_names: Vec<String> = known.ip_models.keys().cloned().collect();
    let model = known.ip_models.get(&spec.model).ok_or_else(|| {
        cx.error(
            &at("model"),
            format!(
                "ip_adapters[{i}]: unknown IP-Adapter model `{}`{}",
                spec.model,
                did_you_mean(&spec.model, &ip_names)
            ),
        )
    })?;
    let layout = base.unet.cross_attention_layout();
    let info = &model.info;
    if info.cross_attention_dim != base.unet.cross_attention_dim
        || info.layer_channels.len() != layout.len()
    {
        return Err(cx.error(
            &at("model"),
            format!(
                "IP-Adapter `{}` was made for a base with cross_attention_dim {} and {} cross-attention layers; the base model `{}` has {} and {}",
                spec.model,
                info.cross_attention_dim,
                info.layer_channels.len(),
                base.name,
                base.unet.cross_attention_dim,
                layout.len()
            ),
        ));
    }
    if let Some((l, layer)) = layout
        .iter()
        .enumerate()
        .find(|(l, layer)| info.layer_channels[*l] != layer.channels)
    {
        return Err(cx.error(
            &at("model"),
            format!(
                "IP-Adapter `{}` layer {} has width {}, but the base's {} has {}",
                spec.model,
                2 * l + 1,
                info.layer_channels[l],
                layer.name(),
                layer.channels
            ),
        ));
    }
    let image_names: Vec<String> = known.images.keys().cloned().collect();
    let image = |key: &'static str, name: &String| -> Result<PathBuf> {
        known.images.get(name).cloned().ok_or_else(|| {
            cx.error(
                &at(key),
                format!("unknown image `{name}`{}", did_you_mean(name, &image_names)),
            )
        })
    };
    let mut images: Vec<PathBuf> = Vec::new();
    for name in spec.image.iter().flat_map(|i| i.names()) {
        images.push(image("image", &name)?);
    }
    for name in &spec.images {
        images.push(image("images", name)?);
    }
    let source = match (&spec.embeds, images.is_empty()) {
        (Some(_), false) => {
            return Err(cx.error(
                &at("embeds"),
                "give either `embeds` or `image`/`images`, not both",
            ));
        }
        (None, true) => {
            return Err(cx.error(
                &at("model"),
                format!("ip_adapters[{i}] needs `image`, `images` or `embeds`"),
            ));
        }
        (Some(file), true) => {
            let path = base_dir.join(file);
            if !path.is_file() {
                return Err(cx.error(
                    &at("embeds"),
                    format!("embeddings file `{}` not found", path.display()),
                ));
            }
            IpSource::Embeddings(path)
        }
        (None, false) => {
            if model.image_encoder.is_none() {
                return Err(cx.error(
                    &at("model"),
                    format!(
                        "IP-Adapter model `{}` has no `image_encoder`, which reference images need",
                        spec.model
                    ),
                ));
            }
            let combine = match spec.combine.as_deref() {
                None | Some("concat") => Combine::Concat,
                Some("average") => Combine::Average,
                Some(other) => {
                    return Err(cx.error(
                        &at("combine"),
                        format!("unknown combine `{other}` (valid: concat, average)"),
                    ));
                }
            };
            let fit: Fit = match &spec.fit {
                None => Fit::Crop,
                Some(f) => f.parse().map_err(|e: String| cx.error(&at("fit"), e))?,
            };
            let negative_image = match &spec.negative_image {
                Some(name) => Some(image("negative_image", name)?),
                None => None,
            };
            IpSource::Images {
                images,
                negative_image,
                combine,
                fit,
            }
        }
    };
    let scale_spec = spec
        .scale
        .clone()
        .unwrap_or(crate::ip_scale::ScaleSpec::Uniform(1.0));
    let layer_scales =
        resolve_scales(&scale_spec, &layout).map_err(|e| cx.error(&at("scale"), e))?;
    let (start, end) = step_window(cx, &at("start"), spec.start, spec.end)?;
    let step_scales = scale_spec
        .strength()
        .per_step(&window(steps, start, end))
        .map_err(|e| cx.error(&at("scale"), format!("ip_adapters[{i}]: {e}")))?;
    let mut masks = Vec::new();
    if let Some(name) = &spec.mask {
        masks.push(image("mask", name)?);
    }
    for name in &spec.masks {
        masks.push(image("masks", name)?);
    }
    Ok(IpAdapterUse {
        model: spec.model.clone(),
        source,
        layer_scales,
        step_scales,
        start,
        end,
        masks,
    })
}

fn plan_generate(
    cx: &Context,
    name: &str,
    spec: &GenerateSpec,
    known: &Known,
    base_dir: &Path,
) -> Result<GenerationPlan> {
    let models = known.models;
    let key = |k: &'static str| ["nodes", name, "generate", k];
    let model_names: Vec<String> = models.keys().cloned().collect();
    let base = models.get(&spec.base).ok_or_else(|| {
        cx.error(
            &key("base"),
            format!(
                "unknown model `{}`{}",
                spec.base,
                did_you_mean(&spec.base, &model_names)
            ),
        )
    })?;
    let factor = base.vae.downscale_factor();
    let (width, height) = match spec.size {
        Some([w, h]) => (w, h),
        None => {
            let side = base.unet.sample_size.unwrap_or(64) * factor;
            (side, side)
        }
    };
    if width == 0 || height == 0 || !width.is_multiple_of(factor) || !height.is_multiple_of(factor)
    {
        return Err(cx.error(
            &key("size"),
            format!("size [{width}, {height}] must be positive multiples of {factor} (the VAE's downscale factor)"),
        ));
    }
    if spec.steps == 0 {
        return Err(cx.error(&key("steps"), "steps must be at least 1"));
    }
    if !spec.guidance.is_finite() || spec.guidance < 0.0 {
        return Err(cx.error(
            &key("guidance"),
            format!("guidance {} must be a number ≥ 0", spec.guidance),
        ));
    }
    let family = base.kind.family();
    let micro_conditioning = plan_family_keys(cx, name, spec, base, width, height)?;
    let (scheduler_kind, scheduler_config) = match &spec.scheduler {
        None => (family.default_scheduler, base.scheduler_config.clone()),
        Some(s) => {
            let kind: SchedulerKind = s
                .kind
                .parse()
                .map_err(|e| cx.error(&["nodes", name, "generate", "scheduler", "kind"], e))?;
            let mut config = base.scheduler_config.clone();
            for (k, v) in &s.overrides {
                config = config.with_override(k, v.clone()).map_err(|e| {
                    cx.error(&["nodes", name, "generate", "scheduler", k.as_str()], e)
                })?;
            }
            (kind, config)
        }
    };
    // Build once so that a bad override combination fails now, not after loading weights.
    ipcompose_schedulers::build_scheduler(scheduler_kind, &scheduler_config, spec.steps)
        .map_err(|e| cx.error(&key("scheduler"), e))?;
    let init = match (&spec.seed, &spec.latents) {
        (Some(_), Some(_)) => {
            return Err(cx.error(&key("latents"), "give either `seed` or `latents`, not both"));
        }
        (Some(seed), None) => InitialNoise::Seed(*seed),
        (None, None) => InitialNoise::Seed(0),
        (None, Some(file)) => {
            let path = base_dir.join(file);
            let expected = [1, base.unet.in_channels, height / factor, width / factor];
            check_latents_file(&path, &expected).map_err(|e| cx.error(&key("latents"), e))?;
            InitialNoise::File(path)
        }
    };
    let layers = base
        .text_encoder_2
        .iter()
        .map(|c| c.num_hidden_layers)
        .fold(base.text_encoder.num_hidden_layers, usize::min);
    if spec.clip_skip >= layers {
        return Err(cx.error(
            &key("clip_skip"),
            format!(
                "clip_skip {} must be smaller than the text encoder's {layers} layers",
                spec.clip_skip
            ),
        ));
    }
    let prompt_syntax = plan_prompt_syntax(cx, name, spec)?;
    // An embedding's word in a prompt: its width must be the base text encoder's.
    for (model, e) in known.embeddings {
        let prompts = [
            ("prompt", Some(&spec.prompt)),
            ("negative_prompt", spec.negative_prompt.as_ref()),
            ("prompt_2", spec.prompt_2.as_ref()),
            ("negative_prompt_2", spec.negative_prompt_2.as_ref()),
        ];
        for (field, text) in prompts {
            if !text.is_some_and(|t| t.contains(e.token.as_str())) {
                continue;
            }
            if !family.embeddings {
                return Err(cx.error(
                    &key(field),
                    format!(
                        "textual-inversion embeddings (`{}`) are not supported on {} bases yet",
                        e.token, family.name
                    ),
                ));
            }
            let width = base.text_encoder.hidden_size;
            let width_2 = base.text_encoder_2.as_ref().map(|c| c.hidden_size);
            if e.embedding.width() != width || e.embedding.width_2() != width_2 {
                let encoders = match width_2 {
                    Some(w2) => format!("the text encoders of `{}` are clip_l {width} + clip_g {w2} wide (an SDXL embedding has `clip_l` and `clip_g` vectors)", spec.base),
                    None => format!("the text encoder of `{}` is {width} wide", spec.base),
                };
                return Err(cx.error(
                    &key(field),
                    format!(
                        "embedding `{model}` ({}) has vectors of width {}, but {encoders}",
                        e.token,
                        e.embedding.describe_widths(),
                    ),
                ));
            }
        }
    }
    if !family.loras && !spec.loras.is_empty() {
        return Err(cx.error(
            &key("loras"),
            format!(
                "LoRAs are not supported on {} bases yet (`{}`); they work on sd15 and sd2 bases",
                family.name, spec.base
            ),
        ));
    }
    if !family.ip_adapters && !spec.ip_adapters.is_empty() {
        return Err(cx.error(
            &key("ip_adapters"),
            format!(
                "IP-Adapters are not supported on {} bases yet (`{}`)",
                family.name, spec.base
            ),
        ));
    }
    if !family.adapters && !spec.controls.is_empty() {
        return Err(cx.error(
            &key("controls"),
            format!(
                "ControlNets and T2I-Adapters are not supported on {} bases yet (`{}`); they work on sd15 and sd2 bases",
                family.name, spec.base
            ),
        ));
    }
    let ip_adapters = spec
        .ip_adapters
        .iter()
        .enumerate()
        .map(|(i, ip)| plan_ip_use(cx, name, i, ip, known, base, base_dir, spec.steps))
        .collect::<Result<Vec<_>>>()?;
    let controls = spec
        .controls
        .iter()
        .enumerate()
        .map(|(i, c)| plan_control(cx, name, i, c, known, base, spec.steps))
        .collect::<Result<Vec<_>>>()?;
    let loras = spec
        .loras
        .iter()
        .enumerate()
        .map(|(i, l)| plan_lora_use(cx, name, i, l, known, base))
        .collect::<Result<Vec<_>>>()?;
    Ok(GenerationPlan {
        node: name.to_string(),
        ip_adapters,
        controls,
        loras,
        base: spec.base.clone(),
        prompt: spec.prompt.clone(),
        prompt_2: spec.prompt_2.clone(),
        negative_prompt: spec.negative_prompt.clone(),
        negative_prompt_2: spec.negative_prompt_2.clone(),
        prompt_syntax,
        micro_conditioning,
        width,
        height,
        steps: spec.steps,
        scheduler_kind,
        scheduler_config,
        guidance: spec.guidance,
        guidance_rescale: spec.guidance_rescale,
        init,
        clip_skip: spec.clip_skip,
    })
}

/// `prompt_syntax` and every prompt read in it: a prompt A1111 cannot read (a weight that is
/// no number) is an error, an unbalanced bracket a warning, each with its column.
fn plan_prompt_syntax(cx: &Context, name: &str, spec: &GenerateSpec) -> Result<PromptSyntax> {
    let key = |k: &'static str| ["nodes", name, "generate", k];
    let syntax = match &spec.prompt_syntax {
        None => PromptSyntax::default(),
        Some(value) => PromptSyntax::parse(value).ok_or_else(|| {
            cx.error(
                &key("prompt_syntax"),
                format!(
                    "unknown prompt_syntax `{value}` (valid: {})",
                    PromptSyntax::NAMES
                ),
            )
        })?,
    };
    let prompts = [
        ("prompt", Some(&spec.prompt)),
        ("prompt_2", spec.prompt_2.as_ref()),
        ("negative_prompt", spec.negative_prompt.as_ref()),
        ("negative_prompt_2", spec.negative_prompt_2.as_ref()),
    ];
    for (field, text) in prompts {
        let Some(text) = text else { continue };
        let parsed = crate::prompt_syntax::parse(text, syntax).map_err(|e| {
            cx.error(
                &key(field),
                format!("{e} (prompt_syntax: {})", syntax.name()),
            )
        })?;
        for warning in parsed.warnings {
            cx.warn(
                &key(field),
                format!(
                    "column {}: {} (prompt_syntax: {})",
                    warning.column,
                    warning.message,
                    syntax.name()
                ),
            );
        }
    }
    Ok(syntax)
}

/// The `generate` keys that only some families take (`prompt_2`, `negative_prompt_2`, the
/// micro-conditioning sizes), checked against the base's family; returns the resolved
/// micro-conditioning of a family that takes it.
fn plan_family_keys(
    cx: &Context,
    name: &str,
    spec: &GenerateSpec,
    base: &BaseModelPlan,
    width: usize,
    height: usize,
) -> Result<Option<MicroConditioning>> {
    let key = |k: &'static str| ["nodes", name, "generate", k];
    let family = base.kind.family();
    let not_for = |k: &'static str, what: &str| {
        cx.error(
            &key(k),
            format!(
                "`{k}` is for {what} (kind: sdxl); the base `{}` is {}",
                spec.base, family.name
            ),
        )
    };
    if family.text != TextEncoding::Dual {
        for (k, given) in [
            ("prompt_2", spec.prompt_2.is_some()),
            ("negative_prompt_2", spec.negative_prompt_2.is_some()),
        ] {
            if given {
                return Err(not_for(k, "bases with two text encoders"));
            }
        }
    } else if spec.negative_prompt_2.is_some()
        && spec.negative_prompt.is_none()
        && base.force_zeros_for_empty_prompt
    {
        return Err(cx.error(
            &key("negative_prompt_2"),
            format!(
                "`negative_prompt_2` needs a `negative_prompt`: without one `{}` uses zero negative embeddings (its model_index.json sets force_zeros_for_empty_prompt) and would ignore it, as diffusers does; add `negative_prompt: \"\"` to encode the empty text for the first encoder",
                spec.base
            ),
        ));
    }
    let sizes = [
        ("original_size", spec.original_size),
        ("crops_coords_top_left", spec.crops_coords_top_left),
        ("target_size", spec.target_size),
    ];
    if family.added != AddedConditioning::TextTime {
        if let Some((k, _)) = sizes.iter().find(|(_, v)| v.is_some()) {
            return Err(not_for(k, "SDXL's micro-conditioning"));
        }
        return Ok(None);
    }
    // Time ids are f32 in the UNet: integers up to 2^24 stay exact.
    const LARGEST: usize = 1 << 24;
    for (k, value) in sizes {
        if let Some([a, b]) = value {
            let is_crop = k == "crops_coords_top_left";
            if (!is_crop && (a == 0 || b == 0)) || a > LARGEST || b > LARGEST {
                let expected = if is_crop {
                    "[top, left] in pixels, each at most 16777216"
                } else {
                    "[width, height] in pixels, positive and at most 16777216"
                };
                return Err(cx.error(&key(k), format!("{k} [{a}, {b}] must be {expected}")));
            }
        }
    }
    let defaults = MicroConditioning::defaults(width, height);
    Ok(Some(MicroConditioning {
        original_size: spec.original_size.unwrap_or(defaults.original_size),
        crops_coords_top_left: spec
            .crops_coords_top_left
            .unwrap_or(defaults.crops_coords_top_left),
        target_size: spec.target_size.unwrap_or(defaults.target_size),
    }))
}

/// Models that preprocessor nodes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreprocessorModelKind {
    DepthAnything,
    OpenPose,
}

impl PreprocessorModelKind {
    fn parse(kind: &str) -> Option<Self> {
        match kind.to_ascii_lowercase().as_str() {
            "depth-anything" | "depth_anything" | "depth-anything-v2" => Some(Self::DepthAnything),
            "openpose" | "open-pose" | "openpose-body" => Some(Self::OpenPose),
            _ => None,
        }
    }

    /// The node operation that uses this kind.
    fn operation(self) -> &'static str {
        match self {
            Self::DepthAnything => "depth",
            Self::OpenPose => "pose",
        }
    }

    /// Reads headers and configs only: the file must be a checkpoint of this kind.
    fn check(self, source: &Path) -> std::result::Result<(), String> {
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

/// Where a generate node's image is saved for the nodes that read it: the cache folder,
/// named by the node and a hash of its settings (rewritten by every run).
fn generated_path(base_dir: &Path, node: &str, spec: &GenerateSpec) -> PathBuf {
    use sha2::{Digest, Sha256};
    let settings = serde_yaml::to_string(spec).unwrap_or_default();
    let hash = format!("{:x}", Sha256::digest(settings.as_bytes()));
    cache_dir(base_dir)
        .join("generated")
        .join(format!("{node}-{}.png", &hash[..16]))
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

/// Reads only the safetensors header: the file must hold `latents` of the expected shape.
pub fn check_latents_file(path: &Path, expected: &[usize]) -> std::result::Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| format!("{}: not a safetensors file: {e}", path.display()))?;
    let info = meta
        .tensors()
        .get("latents")
        .cloned()
        .ok_or_else(|| format!("{}: no tensor named `latents`", path.display()))?;
    if info.shape != expected {
        return Err(format!(
            "{}: `latents` has shape {:?}, expected {:?} for this size",
            path.display(),
            info.shape,
            expected
        ));
    }
    Ok(())
}
