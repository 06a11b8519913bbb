//! The one denoising loop and what it takes: text conditioning, guidance, the conditions
//! prepared once (added conditioning, IP-Adapters, ControlNets, T2I-Adapters), the initial
//! latents.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ipcompose_models::unet::{AddedConditioning, Injections, TextContext, UNet2DConditionModel};
use ipcompose_schedulers::{NoiseSource, Scheduler};

use crate::error::{PipelineError, Result};
use crate::run::control::{controlnet_residuals, t2i_features, PreparedControlNet, PreparedT2I};
use crate::run::ip::{step_injections, PreparedIpAdapter};

/// Everything besides the text context that steers a generation, prepared once before the
/// loop.
#[derive(Default)]
pub struct Conditions {
    /// The base family's added conditioning (SDXL: pooled text embeddings and micro-conditioning
    /// time ids), batched like the context; `None` for SD1.x / SD2.x.
    pub added: Option<AddedConditioning>,
    pub ip_adapters: Vec<PreparedIpAdapter>,
    pub controlnets: Vec<PreparedControlNet>,
    pub t2i_adapters: Vec<PreparedT2I>,
}

pub struct TextConditioning {
    /// `[2, tokens, D]` (`[uncond, cond]`) when guided, else `[1, tokens, D]`.
    pub context: Tensor,
    pub guided: bool,
    pub guidance: Guidance,
}

#[derive(Debug, Clone, Copy)]
pub struct Guidance {
    pub scale: f64,
    /// diffusers' `guidance_rescale` (φ); 0 disables it.
    pub rescale: f64,
}

/// Denoising progress in UNet evaluations (one per step, two per step but the last for Heun).
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub step: usize,
    pub total: usize,
}

pub struct Generated {
    pub latents: Tensor,
    /// `[1, 3, H, W]` in [0, 1].
    pub image: Tensor,
}

/// Reads `latents` from a safetensors file and checks its shape.
pub fn load_latents(path: &Path, shape: &[usize], device: &Device) -> Result<Tensor> {
    let tensors =
        candle_core::safetensors::load(path, device).map_err(|e| PipelineError::Output {
            path: path.to_path_buf(),
            message: format!("cannot read latents: {e}"),
        })?;
    let latents = tensors
        .get("latents")
        .ok_or_else(|| PipelineError::Output {
            path: path.to_path_buf(),
            message: "no tensor named `latents`".to_string(),
        })?;
    if latents.dims() != shape {
        return Err(PipelineError::Output {
            path: path.to_path_buf(),
            message: format!(
                "`latents` has shape {:?}, expected {shape:?}",
                latents.dims()
            ),
        });
    }
    Ok(latents.to_dtype(DType::F32)?)
}

/// The denoising loop. `init` is unit-variance noise; it is scaled by the scheduler's
/// `init_noise_sigma` here, as diffusers does for user-supplied latents too.
///
/// The latents, the guidance arithmetic and the scheduler stay in f32 whatever the models'
/// dtype: only the UNet's (and ControlNets') input is cast to it, and their prediction back.
/// In f32 this changes nothing; in f16/bf16 it keeps the rounding of 20–50 steps out of the
/// latents (diffusers keeps its latents in the model dtype).
pub fn denoise(
    unet: &UNet2DConditionModel,
    scheduler: &mut dyn Scheduler,
    init: &Tensor,
    text: &TextConditioning,
    conditions: &Conditions,
    noise: &mut dyn NoiseSource,
    progress: &mut dyn FnMut(Progress),
) -> Result<Tensor> {
    let model_dtype = text.context.dtype();
    let mut latents = (init.to_dtype(DType::F32)? * scheduler.init_noise_sigma())?;
    let timesteps = scheduler.timesteps().to_vec();
    let total = timesteps.len();
    for (index, &t) in timesteps.iter().enumerate() {
        // Per-step condition weights go by inference step; Heun evaluates the model twice
        // per step.
        let step = scheduler.inference_step(index);
        let model_input = if text.guided {
            Tensor::cat(&[&latents, &latents], 0)?
        } else {
            latents.clone()
        };
        let model_input = scheduler
            .scale_model_input(&model_input, index)?
            .to_dtype(model_dtype)?;
        let ip_layers = step_injections(&conditions.ip_adapters, step);
        let context = TextContext {
            hidden: &text.context,
            added: conditions.added.as_ref(),
        };
        let residuals = controlnet_residuals(
            &conditions.controlnets,
            step,
            &model_input,
            t,
            context,
            text.guided,
        )?;
        let features = t2i_features(&conditions.t2i_adapters, step)?;
        let injections = Injections {
            ip_layers: &ip_layers,
            down_residuals: residuals.as_ref().map(|(down, _)| down.as_slice()),
            mid_residual: residuals.as_ref().map(|(_, mid)| mid),
            down_block_features: features.as_deref(),
        };
        let prediction = unet
            .forward(&model_input, t, context, &injections)?
            .to_dtype(DType::F32)?;
        let prediction = if text.guided {
            apply_guidance(&prediction, &text.guidance)?
        } else {
            prediction
        };
        latents = scheduler.step(&prediction, index, &latents, noise)?;
        progress(Progress {
            step: index + 1,
            total,
        });
    }
    Ok(latents)
}

/// `ε = ε_u + g·(ε_c − ε_u)`, then diffusers' optional guidance rescale.
fn apply_guidance(prediction: &Tensor, guidance: &Guidance) -> Result<Tensor> {
    let uncond = prediction.narrow(0, 0, 1)?;
    let cond = prediction.narrow(0, 1, 1)?;
    let guided = (&uncond + ((&cond - &uncond)? * guidance.scale)?)?;
    if guidance.rescale == 0.0 {
        return Ok(guided);
    }
    let std_cond = unbiased_std(&cond)?;
    let std_guided = unbiased_std(&guided)?;
    let rescaled = guided.broadcast_mul(&(std_cond / std_guided)?)?;
    Ok(((rescaled * guidance.rescale)? + (guided * (1.0 - guidance.rescale))?)?)
}

/// Standard deviation over all but the batch dimension (torch's default, unbiased), keepdim.
fn unbiased_std(x: &Tensor) -> Result<Tensor> {
    let b = x.dim(0)?;
    let flat = x.reshape((b, ()))?;
    let n = flat.dim(1)? as f64;
    let mean = flat.mean_keepdim(1)?;
    let var = (flat.broadcast_sub(&mean)?.sqr()?.sum_keepdim(1)? / (n - 1.0))?;
    let mut shape = vec![b];
    shape.extend(std::iter::repeat_n(1, x.rank() - 1));
    Ok(var.sqrt()?.reshape(shape)?)
}
