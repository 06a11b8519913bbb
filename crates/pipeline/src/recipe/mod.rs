//! The recipe file, version 1: a YAML graph of named models, images, nodes and outputs.
//!
//! Parsing is strict: unknown keys are rejected (serde reports the valid ones and the YAML
//! line and column).

pub mod ip_scale;
pub mod locate;
pub mod prompt_syntax;
pub mod schedule;
pub mod suggest;
pub mod sweep;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{PipelineError, Result};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub version: u32,
    #[serde(default)]
    pub models: BTreeMap<String, ModelSpec>,
    #[serde(default)]
    pub images: BTreeMap<String, String>,
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<OutputSpec>,
    /// Written by ipcompose into the PNGs it makes: which version ran it, with which inputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    pub ipcompose_version: String,
    /// Input file → SHA-256 of its bytes.
    pub inputs: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub kind: String,
    pub source: String,
    /// Hub revision (branch, tag or commit) when `source` is a hub id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Weight file variant, e.g. `fp16` for `*.fp16.safetensors`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// IP-Adapters: the CLIP image encoder folder (e.g. h94/IP-Adapter `models/image_encoder`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_encoder: Option<String>,
    /// Single-file base checkpoints: the diffusers folder (or hub id) whose configs, tokenizer
    /// and scheduler to use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// Base models: a VAE replacing the base's own, as a diffusers `AutoencoderKL` folder (or hub
    /// id) or a single VAE file (original or diffusers names).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vae: Option<String>,
    /// Single-file ControlNets: whether it pools its conditions (shuffle); folders say so in
    /// their config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_pool: Option<bool>,
    /// Embeddings (`kind: embedding`): the word that stands for it in prompts; default the
    /// token a diffusers file stores, else the file's stem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// A node is a map with exactly one key naming what it does (`generate: {...}`,
/// `canny: {...}`, ...).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate: Option<GenerateSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canny: Option<CannySpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invert: Option<InvertSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<ThresholdSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blur: Option<BlurSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shuffle: Option<ShuffleSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<DepthSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pose: Option<PoseSpec>,
}

/// The operation keys a node may have.
pub const NODE_OPERATIONS: [&str; 8] = [
    "generate",
    "canny",
    "invert",
    "threshold",
    "blur",
    "shuffle",
    "depth",
    "pose",
];

#[derive(Debug, Clone)]
pub enum Node<'a> {
    Generate(&'a GenerateSpec),
    /// A preprocessor: `image` names an input image or another node. A network preprocessor
    /// names its `model` (from `models:`); its settings hold that name as the model path
    /// until planning puts the model's files there.
    Preprocess {
        /// `None` for operations that read no image (pose from keypoints).
        image: Option<&'a str>,
        settings: ipcompose_preprocess::Settings,
        model: Option<&'a str>,
    },
}

impl NodeSpec {
    /// What this node does; `None` when it names no operation or several.
    pub fn operation(&self) -> Option<Node<'_>> {
        use ipcompose_preprocess::Operation;
        let mut preprocessors: Vec<(Option<&str>, Operation, Option<u32>)> = Vec::new();
        let mut model = None;
        if let Some(s) = &self.canny {
            let operation = Operation::Canny {
                low: s.low,
                high: s.high,
            };
            preprocessors.push((Some(&s.image), operation, s.detect_resolution));
        }
        if let Some(s) = &self.invert {
            preprocessors.push((Some(&s.image), Operation::Invert, s.detect_resolution));
        }
        if let Some(s) = &self.threshold {
            let operation = Operation::Threshold { level: s.level };
            preprocessors.push((Some(&s.image), operation, s.detect_resolution));
        }
        if let Some(s) = &self.blur {
            let operation = Operation::Blur { factor: s.factor };
            preprocessors.push((Some(&s.image), operation, s.detect_resolution));
        }
        if let Some(s) = &self.shuffle {
            let operation = Operation::Shuffle { seed: s.seed };
            preprocessors.push((Some(&s.image), operation, s.detect_resolution));
        }
        if let Some(s) = &self.depth {
            let operation = Operation::Depth {
                model: s.model.clone().into(),
                input_size: s.input_size,
            };
            model = Some(s.model.as_str());
            preprocessors.push((Some(&s.image), operation, s.detect_resolution));
        }
        if let Some(s) = &self.pose {
            let operation = match &s.keypoints {
                Some(file) if s.image.is_none() && s.model.is_none() => Operation::PoseKeypoints {
                    file: file.into(),
                    size: s.size.map(|[w, h]| (w, h)),
                },
                _ => {
                    model = s.model.as_deref();
                    Operation::Pose {
                        model: s.model.clone().unwrap_or_default().into(),
                    }
                }
            };
            preprocessors.push((s.image.as_deref(), operation, s.detect_resolution));
        }
        match (&self.generate, preprocessors.len()) {
            (Some(spec), 0) => Some(Node::Generate(spec)),
            (None, 1) => {
                let (image, operation, detect) = preprocessors.pop()?;
                let mut settings = ipcompose_preprocess::Settings::new(operation);
                // Absent: the annotator's default; 0: keep the input's size.
                match detect {
                    Some(0) => settings.detect_resolution = None,
                    Some(resolution) => settings.detect_resolution = Some(resolution),
                    None => {}
                }
                Some(Node::Preprocess {
                    image,
                    settings,
                    model,
                })
            }
            _ => None,
        }
    }
}

/// `canny: {image, low, high, detect_resolution}`: OpenCV Canny on RGB, as the annotator.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CannySpec {
    /// A name from `images:` or another preprocessor node.
    pub image: String,
    #[serde(default = "default_canny_low")]
    pub low: f64,
    #[serde(default = "default_canny_high")]
    pub high: f64,
    /// Short side before detection (default 512, as the annotator; 0 keeps the input size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_resolution: Option<u32>,
}

/// `invert: {image}`: 255 minus every value.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InvertSpec {
    pub image: String,
    /// Default: the input's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_resolution: Option<u32>,
}

/// `threshold: {image, level}`: white where the gray value is above `level` (scribble).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdSpec {
    pub image: String,
    #[serde(default = "default_threshold_level")]
    pub level: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_resolution: Option<u32>,
}

/// `blur: {image, factor}`: down by `factor` (INTER_AREA) and back up (Lanczos), for tile.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BlurSpec {
    pub image: String,
    #[serde(default = "default_blur_factor")]
    pub factor: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_resolution: Option<u32>,
}

/// `shuffle: {image, seed}`: content shuffle for the shuffle ControlNet.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShuffleSpec {
    pub image: String,
    #[serde(default)]
    pub seed: u64,
    /// Default 512, as the annotator; 0 keeps the input size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_resolution: Option<u32>,
}

/// `depth: {image, model, input_size}`: Depth Anything V2, near = bright.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DepthSpec {
    pub image: String,
    /// A model of `kind: depth-anything`.
    pub model: String,
    /// The network's short side (multiple of 14), as `infer_image`'s `input_size`.
    #[serde(default = "default_depth_input_size")]
    pub input_size: u32,
    /// Default: the input's size (the network resizes internally).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_resolution: Option<u32>,
}

/// `pose: {image, model}` (the OpenPose body network) or `pose: {keypoints: FILE.json}`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoseSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// A model of `kind: openpose`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// An OpenPose JSON file (`people[].pose_keypoints_2d`), drawn without a network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keypoints: Option<String>,
    /// Keypoints: the canvas `[width, height]` (default the file's `canvas_width/height`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<[u32; 2]>,
    /// Default 512, as the annotator; 0 keeps the input size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect_resolution: Option<u32>,
}

impl PoseSpec {
    /// Either `image` + `model`, or `keypoints` (+ `size`).
    pub fn check(&self) -> std::result::Result<(), String> {
        match (&self.image, &self.model, &self.keypoints) {
            (Some(_), Some(_), None) if self.size.is_none() => Ok(()),
            (None, None, Some(_)) if self.detect_resolution.is_none() => Ok(()),
            _ => Err(
                "pose takes either `image` and `model` (the body network), or `keypoints` (an OpenPose JSON file, with an optional `size`)"
                    .to_string(),
            ),
        }
    }
}

fn default_depth_input_size() -> u32 {
    ipcompose_preprocess::depth::INPUT_SIZE
}

fn default_canny_low() -> f64 {
    100.0
}
fn default_canny_high() -> f64 {
    200.0
}
fn default_threshold_level() -> u8 {
    127
}
fn default_blur_factor() -> f64 {
    4.0
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateSpec {
    pub base: String,
    /// The prompt (SDXL: for the first text encoder).
    pub prompt: String,
    /// SDXL: the prompt of the second text encoder (default, or when empty: `prompt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_2: Option<String>,
    /// Absent: "" for SD1.x / SD2.x; for SDXL zero embeddings when the folder's
    /// `model_index.json` says `force_zeros_for_empty_prompt`. An explicit "" is encoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    /// SDXL: the negative prompt of the second text encoder (default, or when empty:
    /// `negative_prompt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt_2: Option<String>,
    /// How prompts are read: `a1111` (default: attention weights, `BREAK`, chunks of 75
    /// tokens), `comfy` (ComfyUI's weights and chunks) or `plain` (as diffusers). See
    /// `prompt_syntax.rs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_syntax: Option<String>,
    /// `[width, height]` in pixels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<[usize; 2]>,
    /// SDXL micro-conditioning: the size `[width, height]` the image is said to come from
    /// (default: `size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_size: Option<[usize; 2]>,
    /// SDXL micro-conditioning: `[top, left]` of the crop (diffusers' order; default `[0, 0]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crops_coords_top_left: Option<[usize; 2]>,
    /// SDXL micro-conditioning: `[width, height]` (default: `size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_size: Option<[usize; 2]>,
    #[serde(default = "default_steps")]
    pub steps: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<SchedulerSpec>,
    #[serde(default = "default_guidance", alias = "cfg")]
    pub guidance: f64,
    #[serde(default)]
    pub guidance_rescale: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// A safetensors file with key `latents`: the initial noise, before `init_noise_sigma`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latents: Option<String>,
    #[serde(default)]
    pub clip_skip: usize,
    /// Image prompts, any number, each with its own images and settings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_adapters: Vec<IpAdapterSpec>,
    /// Structural conditions: ControlNets and T2I-Adapters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controls: Vec<ControlSpec>,
    /// LoRAs (models of `kind: lora`) applied to this generation's UNet and text encoder.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraSpec>,
}

/// One LoRA in a `generate` node.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    /// A model of `kind: lora`.
    pub model: String,
    /// The multiplier on the LoRA's update, for the UNet and text encoder alike (default 1).
    #[serde(default = "default_lora_scale")]
    pub scale: f64,
}

fn default_lora_scale() -> f64 {
    1.0
}

/// One ControlNet or T2I-Adapter in a `generate` node.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSpec {
    /// A model of `kind: controlnet` or `kind: t2i-adapter`.
    pub model: String,
    /// The hint image (a name from `images:` or a preprocessor node).
    pub image: String,
    /// Conditioning scale (ControlNet) or adapter weight (T2I), default 1.0: a number, one
    /// value per step, or `{ramp: [from, to]}` (see `schedule.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<crate::recipe::schedule::Strength>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<f64>,
    /// ControlNet guess mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guess_mode: Option<bool>,
    /// Union ControlNets: the condition type of this image (`canny`, `depth`, `openpose`, …).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub union_type: Option<String>,
    /// T2I-Adapter: the fraction of steps it applies to (default 1.0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// `resize` (stretch, default), `crop`, `fill`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<String>,
}

/// A name or a list of names.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn names(&self) -> Vec<String> {
        match self {
            OneOrMany::One(name) => vec![name.clone()],
            OneOrMany::Many(names) => names.clone(),
        }
    }
}

/// One IP-Adapter in a `generate` node.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IpAdapterSpec {
    /// A model of `kind: ip-adapter`.
    pub model: String,
    /// One reference image (a name from `images:`), or a list of them ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<OneOrMany>,
    /// ... or several.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
    /// Or precomputed tokens from `ipcompose embed` (no image encoder is loaded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embeds: Option<String>,
    /// An image whose tokens replace the default negative (unconditional) tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_image: Option<String>,
    /// `concat` (default, as diffusers) or `average` for several images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub combine: Option<String>,
    /// A number, `style`, `style-and-layout`, or `{down: {block_N: v | [v…]}, mid: v, up: …}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<crate::recipe::ip_scale::ScaleSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<f64>,
    /// Regional prompt: a mask image name (white = where this adapter acts) ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    /// ... or one per image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub masks: Vec<String>,
    /// How non-square references become square: `crop` (default), `pad`, `squash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fit: Option<String>,
}

fn default_steps() -> usize {
    25
}
fn default_guidance() -> f64 {
    7.5
}

/// `{kind: ddim, ...overrides of scheduler_config.json}`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct SchedulerSpec {
    pub kind: String,
    #[serde(flatten)]
    pub overrides: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// Writes the decoded image of this node as PNG.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Writes this node's final latents (before the VAE) as safetensors, key `latents`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latents: Option<String>,
    pub path: String,
}

impl Recipe {
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        let recipe: Recipe = serde_yaml::from_str(text).map_err(|e| PipelineError::Recipe {
            path: origin.to_path_buf(),
            message: e.to_string(),
        })?;
        if recipe.version != 1 {
            return Err(PipelineError::Recipe {
                path: origin.to_path_buf(),
                message: format!(
                    "unsupported recipe version {} (this ipcompose reads version 1)",
                    recipe.version
                ),
            });
        }
        Ok(recipe)
    }

    /// Parses `text` after applying `--set key.path=value` overrides (values are YAML, e.g.
    /// `7`, `[512, 768]`, `{kind: euler}`; numeric path segments index lists).
    pub fn parse_with_overrides(text: &str, origin: &Path, overrides: &[String]) -> Result<Self> {
        if overrides.is_empty() {
            return Self::parse(text, origin);
        }
        let document = Self::document(text, origin, overrides)?;
        Self::from_document(document, origin).map_err(|e| match e {
            PipelineError::Recipe { path, message } => PipelineError::Recipe {
                path,
                message: format!("after --set overrides: {message}"),
            },
            other => other,
        })
    }

    /// The recipe as a YAML document with `--set` overrides applied, before typed parsing
    /// (sweeps are expanded at this level).
    pub fn document(text: &str, origin: &Path, overrides: &[String]) -> Result<serde_yaml::Value> {
        let err = |message: String| PipelineError::Recipe {
            path: origin.to_path_buf(),
            message,
        };
        let mut value: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| err(e.to_string()))?;
        for assignment in overrides {
            apply_override(&mut value, assignment)
                .map_err(|e| err(format!("--set {assignment}: {e}")))?;
        }
        Ok(value)
    }

    /// Parses a document made by [`Recipe::document`] (or a sweep's combination). serde
    /// cannot give lines for a document, so messages name the key instead.
    pub fn from_document(document: serde_yaml::Value, origin: &Path) -> Result<Self> {
        let err = |message: String| PipelineError::Recipe {
            path: origin.to_path_buf(),
            message,
        };
        let recipe: Recipe = serde_yaml::from_value(document).map_err(|e| err(e.to_string()))?;
        if recipe.version != 1 {
            return Err(err(format!(
                "unsupported recipe version {} (this ipcompose reads version 1)",
                recipe.version
            )));
        }
        Ok(recipe)
    }

    pub fn from_file(path: &Path) -> Result<(Self, PathBuf)> {
        let text = std::fs::read_to_string(path).map_err(|source| PipelineError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let recipe = Self::parse(&text, path)?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok((recipe, dir))
    }
}

/// Sets `path.to.key=value` in a YAML document, creating missing mapping keys.
pub fn apply_override(
    root: &mut serde_yaml::Value,
    assignment: &str,
) -> std::result::Result<(), String> {
    let (path, raw) = assignment
        .split_once('=')
        .ok_or_else(|| "expected KEY.PATH=VALUE".to_string())?;
    let value: serde_yaml::Value =
        serde_yaml::from_str(raw).map_err(|e| format!("value is not YAML: {e}"))?;
    let mut node = root;
    let segments: Vec<&str> = path.split('.').collect();
    for (i, segment) in segments.iter().enumerate() {
        if segment.is_empty() {
            return Err(format!("empty segment in `{path}`"));
        }
        let last = i + 1 == segments.len();
        node = match node {
            serde_yaml::Value::Sequence(items) => {
                let index: usize = segment
                    .parse()
                    .map_err(|_| format!("`{segment}` indexes a list; use a number"))?;
                let len = items.len();
                items
                    .get_mut(index)
                    .ok_or_else(|| format!("index {index} is past the end of a list of {len}"))?
            }
            serde_yaml::Value::Mapping(map) => {
                let key = serde_yaml::Value::String(segment.to_string());
                if !map.contains_key(&key) {
                    if !last {
                        map.insert(key.clone(), serde_yaml::Value::Mapping(Default::default()));
                    } else {
                        map.insert(key.clone(), serde_yaml::Value::Null);
                    }
                }
                map.get_mut(&key)
                    .ok_or_else(|| format!("cannot set `{segment}`"))?
            }
            _ => {
                return Err(format!(
                    "`{}` is not a mapping or list",
                    segments[..i].join(".")
                ))
            }
        };
    }
    *node = value;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_replace_nested_values_and_list_items() {
        let text = "version: 1\nnodes:\n  gen:\n    generate: {base: b, prompt: p, seed: 1}\noutputs:\n  - {image: gen, path: a.png}\n";
        let sets = [
            "nodes.gen.generate.seed=7".to_string(),
            "outputs.0.path=b.png".to_string(),
            "nodes.gen.generate.size=[64, 96]".to_string(),
        ];
        let recipe = Recipe::parse_with_overrides(text, Path::new("r.yaml"), &sets).unwrap();
        let gen = recipe.nodes["gen"].generate.as_ref().unwrap();
        assert_eq!(gen.seed, Some(7));
        assert_eq!(gen.size, Some([64, 96]));
        assert_eq!(recipe.outputs[0].path, "b.png");
        let bad = ["outputs.3.path=x".to_string()];
        let err = Recipe::parse_with_overrides(text, Path::new("r.yaml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--set outputs.3.path=x"), "{err}");
        assert!(err.contains("past the end"), "{err}");
    }
}
