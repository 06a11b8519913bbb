//! Executes a plan: loads each base model once, runs the generations, then writes outputs.

pub mod base_model;
pub mod batch;
pub mod clip_image;
pub mod control;
pub mod denoise;
pub mod ip;
pub mod mask;
pub mod noise;
pub mod preprocess;
pub mod resample;
pub mod text;

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Device};

use crate::error::{PipelineError, Result};
use crate::io::output::{save_latents, save_png, save_rgb_png};
use crate::plan::ip::IpSource;
use crate::plan::GenerationPlan;
use crate::plan::{OutputKind, Plan};
use crate::run::base_model::BaseModel;
use crate::run::denoise::{Conditions, Generated, Progress};
use crate::run::ip::{image_tokens, prepare, read_embeddings};
use crate::run::preprocess::materialize;
use ipcompose_models::clip_vision::{load_image_encoder, ClipVisionModel};
use ipcompose_models::ip_adapter::IpAdapter;
use std::path::PathBuf;
use std::rc::Rc;

use crate::plan::control::ControlKind;
use crate::run::control::{
    load_controlnet, load_t2i_adapter, prepare_hint, PreparedCondition, PreparedControlNet,
    PreparedT2I,
};
use ipcompose_models::controlnet::ControlNetModel;
use ipcompose_models::t2i_adapter::T2IAdapter;

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub device: Device,
    pub dtype: DType,
    /// Replace output files that already exist.
    pub overwrite: bool,
    /// Text embedded in every PNG written (the resolved recipe; see `provenance`).
    pub metadata: Option<String>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            overwrite: false,
            metadata: None,
        }
    }
}

/// Runs every preprocessor and generation the outputs need; nothing is written unless all of
/// them succeed (preprocessed images go to their cache as they are made).
pub fn run_plan(
    plan: &Plan,
    options: &RunOptions,
    progress: &mut dyn FnMut(&str, Progress),
) -> Result<Vec<std::path::PathBuf>> {
    Runner::new(options).run(plan, options.metadata.as_deref(), progress)
}

/// Runs several plans of one recipe (a sweep's combinations) with the models loaded once:
/// base models and adapters are kept by their recipe names between [`Runner::run`] calls.
pub struct Runner<'o> {
    options: &'o RunOptions,
    loaded: BTreeMap<String, BaseModel>,
    adapters: AdapterCache,
    networks: ipcompose_preprocess::Networks,
}

impl<'o> Runner<'o> {
    pub fn new(options: &'o RunOptions) -> Self {
        Self {
            options,
            loaded: BTreeMap::new(),
            adapters: AdapterCache::default(),
            networks: ipcompose_preprocess::Networks::default(),
        }
    }

    /// Fails before anything runs if an output exists and overwriting is off.
    pub fn check_outputs(&self, plan: &Plan) -> Result<()> {
        if !self.options.overwrite {
            if let Some(existing) = plan.outputs.iter().find(|o| o.path.exists()) {
                return Err(PipelineError::Output {
                    path: existing.path.clone(),
                    message: "already exists (pass --overwrite to replace it)".to_string(),
                });
            }
        }
        Ok(())
    }

    /// Runs `plan` and writes its outputs, with `metadata` in every PNG.
    pub fn run(
        &mut self,
        plan: &Plan,
        metadata: Option<&str>,
        progress: &mut dyn FnMut(&str, Progress),
    ) -> Result<Vec<PathBuf>> {
        let options = self.options;
        self.check_outputs(plan)?;
        // Preprocessors of input files first (cached across runs); those that read a
        // generated image right before the generation that needs them, once per run.
        let needed_preprocessors = |after_generation: bool, of: &dyn Fn(&str) -> bool| {
            plan.preprocessors
                .iter()
                .filter(|p| p.after_generation == after_generation && of(&p.node))
                .map(|p| p.node.clone())
                .collect::<BTreeSet<String>>()
        };
        let mut fresh = BTreeSet::new();
        let before = needed_preprocessors(false, &|node| plan.needed.contains(node));
        materialize(&plan.preprocessors, &before, &mut fresh, &mut self.networks)?;
        let mut results: BTreeMap<&str, Generated> = BTreeMap::new();
        for generation in &plan.generations {
            if !plan.needed.contains(&generation.node) {
                continue;
            }
            let reads = plan.dependencies.get(&generation.node);
            let inputs =
                needed_preprocessors(true, &|node| reads.is_some_and(|r| r.contains(node)));
            materialize(&plan.preprocessors, &inputs, &mut fresh, &mut self.networks)?;
            // A base with LoRAs is its own copy of the weights, kept per LoRA combination.
            let key = loaded_key(generation);
            if !self.loaded.contains_key(&key) {
                let base_plan = plan.models.get(&generation.base).ok_or_else(|| {
                    PipelineError::Plan(format!("unknown model `{}`", generation.base))
                })?;
                if !generation.loras.is_empty() {
                    // Only one LoRA-patched copy of a base is kept at a time.
                    let base = generation.base.clone();
                    self.loaded
                        .retain(|k, _| k == &base || !k.starts_with(&format!("{base}+")));
                }
                let mut model = BaseModel::load_with_loras(
                    base_plan,
                    &generation.loras,
                    &options.device,
                    options.dtype,
                )?;
                let embeddings: Vec<_> = plan
                    .embeddings
                    .values()
                    .map(|e| (e.token.as_str(), &e.embedding))
                    .collect();
                model.add_embeddings(&embeddings)?;
                self.loaded.insert(key.clone(), model);
            }
            let model = &self.loaded[&key];
            let conditions =
                prepare_conditions(plan, generation, model, &mut self.adapters, options)?;
            let generated = model.generate(generation, conditions, &mut |p| {
                progress(&generation.node, p)
            })?;
            if let Some(path) = plan.generated.get(&generation.node) {
                save_png(&generated.image, path, None)?;
            }
            results.insert(generation.node.as_str(), generated);
        }
        let outputs: BTreeSet<&str> = plan.outputs.iter().map(|o| o.node.as_str()).collect();
        let late = needed_preprocessors(true, &|node| outputs.contains(node));
        materialize(&plan.preprocessors, &late, &mut fresh, &mut self.networks)?;
        let mut written = Vec::new();
        for output in &plan.outputs {
            if let Some(preprocessor) = plan.preprocessor(&output.node) {
                let image = ipcompose_preprocess::load_image(&preprocessor.cache_path)
                    .map_err(|e| PipelineError::Plan(e.to_string()))?;
                save_rgb_png(&image, &output.path, metadata)?;
                written.push(output.path.clone());
                continue;
            }
            let generated = results.get(output.node.as_str()).ok_or_else(|| {
                PipelineError::Plan(format!(
                    "output refers to `{}`, which produced nothing",
                    output.node
                ))
            })?;
            match output.kind {
                OutputKind::Image => save_png(&generated.image, &output.path, metadata)?,
                OutputKind::Latents => save_latents(&generated.latents, &output.path)?,
            }
            written.push(output.path.clone());
        }
        Ok(written)
    }
}

/// The name a loaded base is kept under: the recipe's base name, plus its LoRAs and scales.
fn loaded_key(generation: &GenerationPlan) -> String {
    let mut key = generation.base.clone();
    for lora in &generation.loras {
        key.push_str(&format!("+{}@{}", lora.model, lora.scale));
    }
    key
}

/// Adapter weights and image encoders, each loaded once per run however many nodes use them.
#[derive(Default)]
struct AdapterCache {
    ip_adapters: BTreeMap<String, IpAdapter>,
    encoders: BTreeMap<PathBuf, ClipVisionModel>,
    controlnets: BTreeMap<(String, String), Rc<ControlNetModel>>,
    t2i_adapters: BTreeMap<String, T2IAdapter>,
}

fn prepare_conditions(
    plan: &Plan,
    generation: &GenerationPlan,
    model: &BaseModel,
    cache: &mut AdapterCache,
    options: &RunOptions,
) -> Result<Conditions> {
    let base = plan
        .models
        .get(&generation.base)
        .ok_or_else(|| PipelineError::Plan(format!("unknown model `{}`", generation.base)))?;
    let layout = base.unet.cross_attention_layout();
    let guided = generation.guidance > 1.0;
    let latent_size = model.latent_size(generation.width, generation.height);
    let mut conditions = Conditions::default();
    for ip in &generation.ip_adapters {
        let model_plan = plan.ip_models.get(&ip.model).ok_or_else(|| {
            PipelineError::Plan(format!("unknown IP-Adapter model `{}`", ip.model))
        })?;
        if !cache.ip_adapters.contains_key(&ip.model) {
            let adapter = IpAdapter::load(&model_plan.file, DType::F32, &options.device)?;
            cache.ip_adapters.insert(ip.model.clone(), adapter);
        }
        let adapter = &cache.ip_adapters[&ip.model];
        let tokens = match &ip.source {
            IpSource::Embeddings(path) => {
                read_embeddings(path, model_plan.info.cross_attention_dim, &options.device)?
            }
            IpSource::Images {
                images,
                negative_image,
                combine,
                fit,
            } => {
                let (dir, _) = model_plan.image_encoder.as_ref().ok_or_else(|| {
                    PipelineError::Plan(format!("IP-Adapter `{}` has no image encoder", ip.model))
                })?;
                if !cache.encoders.contains_key(dir) {
                    let encoder = load_image_encoder(dir, DType::F32, &options.device)?;
                    cache.encoders.insert(dir.clone(), encoder);
                }
                image_tokens(
                    adapter,
                    &cache.encoders[dir],
                    images,
                    negative_image.as_deref(),
                    *combine,
                    *fit,
                    &options.device,
                )?
            }
        };
        conditions.ip_adapters.push(prepare(
            adapter,
            tokens,
            ip,
            &layout,
            latent_size,
            (generation.width, generation.height),
            guided,
            options.dtype,
        )?);
    }
    for control in &generation.controls {
        let hint = prepare_hint(
            &control.image,
            generation.width,
            generation.height,
            control.resize,
            &options.device,
        )?
        .to_dtype(options.dtype)?;
        match &control.kind {
            ControlKind::ControlNet {
                plan: cn,
                guess_mode,
                union_type,
            } => {
                let key = (control.model.clone(), generation.base.clone());
                if !cache.controlnets.contains_key(&key) {
                    let model = load_controlnet(cn, options.dtype, &options.device)?;
                    cache.controlnets.insert(key.clone(), Rc::new(model));
                }
                let model = cache.controlnets[&key].clone();
                let condition = PreparedCondition {
                    hint,
                    union_type: *union_type,
                    step_scales: control.step_scales.clone(),
                };
                // A union model's controls are evaluated together, in recipe order.
                let joined = union_type.is_some().then(|| {
                    conditions
                        .controlnets
                        .iter_mut()
                        .find(|prepared| Rc::ptr_eq(&prepared.model, &model))
                });
                match joined.flatten() {
                    Some(prepared) => prepared.conditions.push(condition),
                    None => conditions.controlnets.push(PreparedControlNet {
                        model,
                        conditions: vec![condition],
                        // diffusers forces guess mode for models that pool their conditions.
                        guess_mode: *guess_mode || cn.config.global_pool_conditions,
                    }),
                }
            }
            ControlKind::T2IAdapter { plan: t2i, .. } => {
                if !cache.t2i_adapters.contains_key(&control.model) {
                    let adapter = load_t2i_adapter(t2i, options.dtype, &options.device)?;
                    cache.t2i_adapters.insert(control.model.clone(), adapter);
                }
                let features = cache.t2i_adapters[&control.model].forward(&hint)?;
                conditions.t2i_adapters.push(PreparedT2I {
                    features,
                    step_scales: control.step_scales.clone(),
                });
            }
        }
    }
    Ok(conditions)
}
