//! A loaded base model (UNet, VAE, text encoders, tokenizers), with this run's LoRAs added to
//! its weights as they load; generation through the one loop in [`crate::run::denoise`].

use crate::run::denoise::{denoise, load_latents, Conditions, Generated, Progress};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ipcompose_models::clip_text::{ClipTextModel, ClipTextModelWithProjection};
use ipcompose_models::folder::DiffusersFolder;
use ipcompose_models::tokenizer::{ClipTokenizer, TokenizerError};
use ipcompose_models::unet::UNet2DConditionModel;
use ipcompose_models::vae::Vae;
use ipcompose_schedulers::{build_scheduler, NoiseSource};

use crate::error::{PipelineError, Result};
use crate::plan::family::{BaseKind, TextEncoding};
use crate::plan::{BaseModelPlan, GenerationPlan, InitialNoise, LoraUse, VaeSource};
use crate::run::noise::SeededNoise;
use crate::run::text::SecondTextEncoder;
use ipcompose_models::lora::{Component, ComponentWeights, WeightPatches};

/// A frozen Stable Diffusion base model, loaded once and shared by every generation. Its
/// prompt encoding is in `run/text.rs`.
pub struct BaseModel {
    /// The family: how prompts are encoded, which added conditioning the UNet takes.
    pub kind: BaseKind,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    /// SDXL's second text encoder; `None` for single-encoder families.
    pub text_encoder_2: Option<SecondTextEncoder>,
    /// `model_index.json`'s `force_zeros_for_empty_prompt` (two-encoder families).
    pub force_zeros_for_empty_prompt: bool,
    pub unet: UNet2DConditionModel,
    pub vae: Vae,
    pub device: Device,
    pub dtype: DType,
}

impl BaseModel {
    pub fn load(plan: &BaseModelPlan, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with_loras(plan, &[], device, dtype)
    }

    /// The base with `loras` added to its UNet and text encoder weights as they load (this
    /// run's copy; the files are untouched). Every key of each LoRA must match a layer.
    pub fn load_with_loras(
        plan: &BaseModelPlan,
        loras: &[LoraUse],
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let LoraPatches {
            unet: unet_patches,
            text_encoder: text_patches,
            text_encoder_2: text_2_patches,
        } = lora_patches(plan, loras)?;
        let mut folder = plan.folder.clone();
        for (component, patches) in [
            ("unet", &unet_patches),
            ("text_encoder", &text_patches),
            ("text_encoder_2", &text_2_patches),
        ] {
            if let Some(patches) = patches {
                folder = folder.with_patches(component, patches.clone());
            }
        }
        let folder = &folder;
        let family = plan.kind.family();
        let vae_dtype = family.vae_dtype(&plan.vae, dtype);
        let vae = load_vae(plan, folder, vae_dtype, device)?;
        let Some(file) = &plan.single_file else {
            let text_encoder_2 = match &plan.text_encoder_2 {
                Some(config) => Some(SecondTextEncoder {
                    tokenizer: folder.tokenizer_2()?,
                    encoder: folder.load_text_encoder_2(config, dtype, device)?,
                }),
                None => None,
            };
            return Ok(Self {
                kind: plan.kind,
                tokenizer: folder.tokenizer()?,
                text_encoder: folder.load_text_encoder(&plan.text_encoder, dtype, device)?,
                text_encoder_2,
                force_zeros_for_empty_prompt: plan.force_zeros_for_empty_prompt,
                unet: folder.load_unet(&plan.unet, dtype, device)?,
                vae,
                device: device.clone(),
                dtype,
            });
        };
        if family.single_file.is_none() {
            return Err(PipelineError::Plan(format!(
                "single-file checkpoints are not supported for {} bases",
                family.name
            )));
        }
        use ipcompose_models::single_file_base::{
            open_clip_text_encoder_weights, text_encoder_weights, unet_weights,
        };
        let unet_vb = unet_weights(file, &plan.unet.layers_per_block)?
            .with_patches(unet_patches)
            .var_builder(dtype, device);
        let text_vb = text_encoder_weights(file)?
            .with_patches(text_patches)
            .var_builder(dtype, device);
        // SDXL's second encoder: OpenCLIP bigG under transformers' names.
        let text_encoder_2 = match &plan.text_encoder_2 {
            Some(config) => Some(SecondTextEncoder {
                tokenizer: folder.tokenizer_2()?,
                encoder: ClipTextModelWithProjection::new(
                    open_clip_text_encoder_weights(file)?
                        .with_patches(text_2_patches)
                        .var_builder(dtype, device),
                    config,
                )?,
            }),
            None => None,
        };
        Ok(Self {
            kind: plan.kind,
            tokenizer: folder.tokenizer()?,
            text_encoder: ClipTextModel::new(text_vb, &plan.text_encoder)?,
            text_encoder_2,
            force_zeros_for_empty_prompt: plan.force_zeros_for_empty_prompt,
            unet: UNet2DConditionModel::new(unet_vb, &plan.unet)?,
            vae,
            device: device.clone(),
            dtype,
        })
    }

    /// Adds textual-inversion `embeddings` (token, vectors) as new words of the tokenizer and
    /// rows of the text encoder's token embedding, in order, as diffusers'
    /// `load_textual_inversion` does; those of another width are skipped (the plan refuses
    /// prompts that use them).
    pub fn add_embeddings(
        &mut self,
        embeddings: &[(&str, &ipcompose_models::embedding::TextualInversion)],
    ) -> Result<()> {
        if !self.kind.family().embeddings {
            return Ok(());
        }
        for (token, embedding) in embeddings {
            if embedding.width() != self.text_encoder.config().hidden_size {
                continue;
            }
            let word_error = |e: TokenizerError| {
                PipelineError::Plan(format!("{}: {e}", embedding.path.display()))
            };
            let tokens = embedding.tokens(token);
            // An SDXL file's `clip_g` goes to the second encoder as the same word; a file for
            // one encoder only fits a one-encoder base (the plan refuses the others' prompts).
            match (&mut self.text_encoder_2, &embedding.vectors_2) {
                (Some(second), Some(vectors_2)) => {
                    let first = second.tokenizer.add_word(&tokens).map_err(word_error)?;
                    second.encoder.set_token_rows(first as usize, vectors_2)?;
                }
                (None, None) => {}
                _ => continue,
            }
            let first = self.tokenizer.add_word(&tokens).map_err(word_error)?;
            self.text_encoder
                .set_token_rows(first as usize, &embedding.vectors)?;
        }
        Ok(())
    }

    /// Loads a diffusers folder directly (library use, without a recipe); its family is read
    /// from the folder ([`BaseKind::detect`]).
    pub fn from_folder(root: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let folder = DiffusersFolder::open(root)?;
        let kind = BaseKind::detect(&folder)?;
        let family = kind.family();
        let unet = folder.unet_config()?;
        let vae = folder.vae_config()?;
        let text = folder.text_encoder_config()?;
        let vae_dtype = family.vae_dtype(&vae, dtype);
        let text_encoder_2 = match family.text {
            TextEncoding::Single => None,
            TextEncoding::Dual => Some(SecondTextEncoder {
                tokenizer: folder.tokenizer_2()?,
                encoder: folder.load_text_encoder_2(
                    &folder.text_encoder_2_config()?,
                    dtype,
                    device,
                )?,
            }),
        };
        Ok(Self {
            kind,
            tokenizer: folder.tokenizer()?,
            text_encoder: folder.load_text_encoder(&text, dtype, device)?,
            text_encoder_2,
            force_zeros_for_empty_prompt: folder
                .model_index()?
                .force_zeros_for_empty_prompt
                .unwrap_or(true),
            unet: folder.load_unet(&unet, dtype, device)?,
            vae: folder.load_vae(&vae, vae_dtype, device)?,
            device: device.clone(),
            dtype,
        })
    }

    /// `(width, height)` of the latent for an output size.
    pub fn latent_size(&self, width: usize, height: usize) -> (usize, usize) {
        let factor = self.vae.config().downscale_factor();
        (width / factor, height / factor)
    }

    /// Runs one generation with its prepared `conditions`; returns the final latents and the
    /// decoded image in [0, 1].
    /// `conditions` holds the adapters' contributions; the text conditioning (and SDXL's added
    /// conditioning, which replaces `conditions.added`) is encoded here.
    pub fn generate(
        &self,
        request: &GenerationPlan,
        conditions: Conditions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Generated> {
        let factor = self.vae.config().downscale_factor();
        let shape = [
            1,
            self.unet.config().in_channels,
            request.height / factor,
            request.width / factor,
        ];
        let (init, mut noise): (Tensor, Box<dyn NoiseSource>) = match &request.init {
            InitialNoise::Seed(seed) => {
                let mut source = SeededNoise::new(*seed);
                let init = source.sample(&shape, &self.device)?;
                (init, Box::new(source))
            }
            InitialNoise::File(path) => (
                load_latents(path, &shape, &self.device)?,
                Box::new(SeededNoise::new(0)),
            ),
        };
        let (conditioning, added) = self.text_conditioning(request)?;
        let conditions = Conditions {
            added,
            ..conditions
        };
        let mut scheduler = build_scheduler(
            request.scheduler_kind,
            &request.scheduler_config,
            request.steps,
        )?;
        let latents = denoise(
            &self.unet,
            scheduler.as_mut(),
            &init,
            &conditioning,
            &conditions,
            noise.as_mut(),
            progress,
        )?;
        let image = self.vae.decode_to_unit(&latents)?;
        Ok(Generated { latents, image })
    }
}

/// The base's VAE: the recipe's `vae:` (a folder or a VAE file) when it names one, else the
/// single-file checkpoint's or the folder's own.
fn load_vae(
    plan: &BaseModelPlan,
    folder: &DiffusersFolder,
    dtype: DType,
    device: &Device,
) -> Result<Vae> {
    use ipcompose_models::single_file_base::{vae_file_weights, vae_weights};
    let levels = plan.vae.block_out_channels.len();
    let vb = match (&plan.vae_source, &plan.single_file) {
        (Some(VaeSource::Folder(dir)), _) => {
            let files = ipcompose_models::weights::find_component_weights(
                dir,
                "diffusion_pytorch_model",
                folder.variant.as_deref(),
            )?;
            ipcompose_models::weights::WeightStore::open(&files)?.var_builder(dtype, device)
        }
        (Some(VaeSource::File(file)), _) => {
            vae_file_weights(file, levels)?.var_builder(dtype, device)
        }
        (None, Some(file)) => vae_weights(file, levels)?.var_builder(dtype, device),
        (None, None) => return Ok(folder.load_vae(&plan.vae, dtype, device)?),
    };
    Ok(Vae::new(vb, &plan.vae)?)
}

type Patches = Option<std::sync::Arc<WeightPatches>>;

/// The summed LoRA updates of a generation for the base's UNet and text encoder, each LoRA's
/// keys resolved against the base's own weight names (a key that matches none is an error).
/// The summed LoRA updates of a generation for each patched component.
#[derive(Default)]
struct LoraPatches {
    unet: Patches,
    text_encoder: Patches,
    text_encoder_2: Patches,
}

fn lora_patches(plan: &BaseModelPlan, loras: &[LoraUse]) -> Result<LoraPatches> {
    if loras.is_empty() {
        return Ok(LoraPatches::default());
    }
    // The base's weight names and shapes (headers only), per component.
    type ShapeOf = Box<dyn Fn(&str) -> Option<Vec<usize>>>;
    let mut components: Vec<(Component, Vec<String>, ShapeOf)> = Vec::new();
    match &plan.single_file {
        None => {
            let mut add = |component: Component, folder_name: &str| -> Result<()> {
                let store = plan.folder.component_weights(folder_name)?;
                components.push((
                    component,
                    store.tensor_names(),
                    Box::new(move |n: &str| store.shape(n)),
                ));
                Ok(())
            };
            add(Component::Unet, "unet")?;
            add(Component::TextEncoder, "text_encoder")?;
            if plan.text_encoder_2.is_some() {
                add(Component::TextEncoder2, "text_encoder_2")?;
            }
        }
        Some(file) => {
            use ipcompose_models::single_file_base::{
                open_clip_text_encoder_weights, text_encoder_weights, unet_weights,
            };
            let mut add =
                |component: Component, weights: ipcompose_models::single_file::RenamedWeights| {
                    components.push((
                        component,
                        weights.names().map(str::to_string).collect(),
                        Box::new(move |n: &str| weights.shape(n)),
                    ));
                };
            add(
                Component::Unet,
                unet_weights(file, &plan.unet.layers_per_block)?,
            );
            add(Component::TextEncoder, text_encoder_weights(file)?);
            if plan.text_encoder_2.is_some() {
                add(
                    Component::TextEncoder2,
                    open_clip_text_encoder_weights(file)?,
                );
            }
        }
    }
    let bases: Vec<ComponentWeights> = components
        .iter()
        .map(|(component, names, _)| ComponentWeights {
            component: *component,
            names,
            layers_per_block: if *component == Component::Unet {
                &plan.unet.layers_per_block
            } else {
                &[]
            },
        })
        .collect();
    let mut resolved = Vec::with_capacity(loras.len());
    for lora in loras {
        resolved.push((lora.lora.resolve(&bases)?, lora.scale));
    }
    let mut patches = LoraPatches::default();
    for (component, _, shape_of) in &components {
        let built = WeightPatches::build(&resolved, *component, |n| shape_of(n))?;
        let built = (!built.is_empty()).then(|| std::sync::Arc::new(built));
        match component {
            Component::Unet => patches.unet = built,
            Component::TextEncoder => patches.text_encoder = built,
            Component::TextEncoder2 => patches.text_encoder_2 = built,
        }
    }
    Ok(patches)
}
