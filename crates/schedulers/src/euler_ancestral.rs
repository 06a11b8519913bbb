//! `EulerAncestralDiscreteScheduler`: the Euler step to σ_down plus fresh noise of σ_up,
//! reference-formats.md F.4.

use candle_core::{DType, Tensor};

use crate::config::CommonSettings;
use crate::error::SchedulerError;
use crate::euler::{euler_sigma_schedule, predicted_original, scale_by_sigma, FinalSigma};
use crate::ops::{add, divide, scale, sub};
use crate::{check_step_index, NoiseSource, PredictionType, Scheduler};

pub(crate) struct EulerAncestralScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    sigmas_wide: Vec<f64>,
    init_noise_sigma: f32,
    prediction: PredictionType,
}

impl EulerAncestralScheduler {
    pub(crate) fn new(common: CommonSettings, num_inference_steps: usize) -> Self {
        // The class has no Karras option and always ends at σ = 0.
        let schedule = euler_sigma_schedule(&common, num_inference_steps, None, FinalSigma::Zero);
        Self {
            timesteps: schedule.timesteps,
            sigmas_wide: schedule.sigmas.iter().copied().map(f64::from).collect(),
            sigmas: schedule.sigmas,
            init_noise_sigma: schedule.init_noise_sigma,
            prediction: common.prediction,
        }
    }
}

impl Scheduler for EulerAncestralScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        f64::from(self.init_noise_sigma)
    }

    fn scale_model_input(
        &self,
        sample: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, SchedulerError> {
        check_step_index(step_index, self.timesteps.len())?;
        scale_by_sigma(sample, self.sigmas[step_index])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, SchedulerError> {
        check_step_index(step_index, self.timesteps.len())?;
        let sigma_from = self.sigmas[step_index];
        let sigma_to = self.sigmas[step_index + 1];
        // float32 scalar arithmetic in diffusers' order.
        let sigma_up = (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
            / (sigma_from * sigma_from))
            .sqrt();
        // σ_to² − σ_up² = σ_to⁴/σ_from² ≥ 0; the clamp only guards against rounding.
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).max(0.0).sqrt();

        let sample = sample.to_dtype(DType::F32)?;
        let original = predicted_original(self.prediction, model_output, &sample, sigma_from)?;
        let derivative = divide(&sub(&sample, &original)?, sigma_from)?;
        let previous = sample.add(&scale(&derivative, sigma_down - sigma_from)?)?;
        // diffusers draws the noise on every step, the last included, in the model's dtype.
        let fresh_noise = noise
            .sample(model_output.dims(), model_output.device())?
            .to_dtype(model_output.dtype())?;
        let previous = add(&previous, &scale(&fresh_noise, sigma_up)?)?;
        Ok(previous.to_dtype(model_output.dtype())?)
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas_wide)
    }
}
