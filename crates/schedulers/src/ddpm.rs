//! `DDPMScheduler` (Ho et al. 2020), ancestral sampling with the posterior variance
//! (reference-addons.md VI). The previous timestep is the next entry of the schedule (−1 after
//! the last); noise is added at every step whose timestep is above 0.

use candle_core::Tensor;

use crate::config::{CommonSettings, SchedulerConfig};
use crate::error::SchedulerError;
use crate::ops::{add, divide, promote, scale};
use crate::schedule::{spaced_timesteps, TimestepSpacing};
use crate::{check_step_index, NoiseSource, PredictionType, Scheduler, SchedulerKind};

const KIND: SchedulerKind = SchedulerKind::Ddpm;

/// `variance_type`: how the noise of a step is scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variance {
    /// The posterior variance β̃_t (clamped at 1e-20); its square root scales the noise
    /// (`fixed_small`).
    Small,
    /// The same, through `exp(0.5·log β̃_t)` (`fixed_small_log`).
    SmallLog,
    /// β_t itself (`fixed_large`).
    Large,
}

pub(crate) struct DdpmScheduler {
    alphas_cumprod: Vec<f32>,
    integer_timesteps: Vec<i64>,
    timesteps: Vec<f64>,
    prediction: PredictionType,
    clip_range: Option<f32>,
    variance: Variance,
}

impl DdpmScheduler {
    pub(crate) fn new(
        config: &SchedulerConfig,
        common: CommonSettings,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
        let clip_range = if config.bool(KIND, "clip_sample")? {
            Some(config.float(KIND, "clip_sample_range")? as f32)
        } else {
            None
        };
        let variance = match config.choice(KIND, "variance_type")?.as_str() {
            "fixed_small_log" => Variance::SmallLog,
            "fixed_large" => Variance::Large,
            _ => Variance::Small,
        };
        // The same integer timesteps as DDIM's.
        let integer_timesteps: Vec<i64> = spaced_timesteps(
            common.spacing,
            common.num_train_timesteps,
            num_inference_steps,
            common.steps_offset,
        )
        .into_iter()
        .map(|value| match common.spacing {
            TimestepSpacing::Linspace => value.round_ties_even() as i64,
            TimestepSpacing::Leading | TimestepSpacing::Trailing => value as i64,
        })
        .collect();
        let len = common.schedule.alphas_cumprod.len() as i64;
        if let Some(&bad) = integer_timesteps
            .iter()
            .find(|&&timestep| !(0..len).contains(&timestep))
        {
            return Err(SchedulerError::InvalidSchedule {
                reason: format!("timestep {bad} is outside the {len} training timesteps"),
            });
        }
        Ok(Self {
            timesteps: integer_timesteps.iter().map(|&t| t as f64).collect(),
            integer_timesteps,
            alphas_cumprod: common.schedule.alphas_cumprod,
            prediction: common.prediction,
            clip_range,
            variance,
        })
    }
}

impl Scheduler for DdpmScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(
        &self,
        sample: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, SchedulerError> {
        check_step_index(step_index, self.timesteps.len())?;
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, SchedulerError> {
        check_step_index(step_index, self.timesteps.len())?;
        let timestep = self.integer_timesteps[step_index];
        // float32 scalars, as diffusers' 0-d tensors.
        let alpha_prod = self.alphas_cumprod[timestep as usize];
        let alpha_prod_previous = match self.integer_timesteps.get(step_index + 1) {
            Some(&previous) => self.alphas_cumprod[previous as usize],
            None => 1.0,
        };
        let beta_prod = 1.0 - alpha_prod;
        let beta_prod_previous = 1.0 - alpha_prod_previous;
        let current_alpha = alpha_prod / alpha_prod_previous;
        let current_beta = 1.0 - current_alpha;

        let (output, sample) = promote(model_output, sample)?;
        let original = match self.prediction {
            PredictionType::Epsilon => divide(
                &sample.sub(&scale(&output, beta_prod.sqrt())?)?,
                alpha_prod.sqrt(),
            )?,
            PredictionType::VPrediction => {
                scale(&sample, alpha_prod.sqrt())?.sub(&scale(&output, beta_prod.sqrt())?)?
            }
        };
        let original = match self.clip_range {
            Some(range) => original.clamp(-range, range)?,
            None => original,
        };
        let original_coefficient = (alpha_prod_previous.sqrt() * current_beta) / beta_prod;
        let sample_coefficient = current_alpha.sqrt() * beta_prod_previous / beta_prod;
        let previous =
            scale(&original, original_coefficient)?.add(&scale(&sample, sample_coefficient)?)?;
        if timestep <= 0 {
            return Ok(previous);
        }
        let variance_noise = noise
            .sample(model_output.dims(), model_output.device())?
            .to_dtype(model_output.dtype())?;
        let posterior =
            ((1.0 - alpha_prod_previous) / (1.0 - alpha_prod) * current_beta).max(1e-20);
        let noise_scale = match self.variance {
            Variance::Small => posterior.sqrt(),
            Variance::SmallLog => (0.5 * posterior.ln()).exp(),
            Variance::Large => current_beta.sqrt(),
        };
        Ok(add(&previous, &scale(&variance_noise, noise_scale)?)?)
    }
}
