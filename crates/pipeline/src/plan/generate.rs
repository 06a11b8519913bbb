//! `generate` nodes: prompts, size, steps, scheduler, initial noise, and the family's keys.

use std::path::{Path, PathBuf};

use ipcompose_schedulers::{SchedulerConfig, SchedulerKind};

use crate::error::Result;
use crate::plan::control::{ControlKind, ControlUse};
use crate::plan::family::{AddedConditioning, MicroConditioning, TextEncoding};
use crate::plan::ip::IpAdapterUse;
use crate::plan::preprocess::cache_dir;
use crate::recipe::prompt_syntax::PromptSyntax;
use crate::recipe::GenerateSpec;

use super::*;

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

pub(super) fn plan_generate(
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
pub(super) fn plan_prompt_syntax(
    cx: &Context,
    name: &str,
    spec: &GenerateSpec,
) -> Result<PromptSyntax> {
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
        let parsed = crate::recipe::prompt_syntax::parse(text, syntax).map_err(|e| {
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
pub(super) fn plan_family_keys(
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

/// Where a generate node's image is saved for the nodes that read it: the cache folder,
/// named by the node and a hash of its settings (rewritten by every run).
pub(super) fn generated_path(base_dir: &Path, node: &str, spec: &GenerateSpec) -> PathBuf {
    use sha2::{Digest, Sha256};
    let settings = serde_yaml::to_string(spec).unwrap_or_default();
    let hash = format!("{:x}", Sha256::digest(settings.as_bytes()));
    cache_dir(base_dir)
        .join("generated")
        .join(format!("{node}-{}.png", &hash[..16]))
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
