//! `LCMScheduler` (Luo et al. 2023), for latent consistency models and LCM-LoRAs
//! (reference-addons.md VI). The timesteps are picked from the distillation schedule of
//! `original_inference_steps` (50: 999, 979, …, 19); each step returns the boundary-condition
//! denoised sample, re-noised to the next timestep with fresh noise except after the last.

use candle_core::Tensor;

use crate::config::{CommonSettings, SchedulerConfig};
use crate::error::SchedulerError;
use crate::ops::{add, divide, promote, scale};
use crate::{check_step_index, NoiseSource, PredictionType, Scheduler, SchedulerKind};

const KIND: SchedulerKind = SchedulerKind::Lcm;

/// σ_data of the consistency boundary condition.
const SIGMA_DATA: f32 = 0.5;

pub(crate) struct LcmScheduler {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    integer_timesteps: Vec<i64>,
    timesteps: Vec<f64>,
    prediction: PredictionType,
    clip_range: Option<f32>,
    timestep_scaling: f32,
}

/// diffusers' LCM `set_timesteps` (strength 1): `k = T div original_steps`, the distillation
/// timesteps `k − 1, 2k − 1, …, original_steps·k − 1` reversed, then `N` of them at the indices
/// `floor(linspace(0, original_steps, N, endpoint = False))`.
pub(crate) fn lcm_timesteps(
    num_train_timesteps: usize,
    original_steps: usize,
    num_inference_steps: usize,
) -> Result<Vec<i64>, SchedulerError> {
    if original_steps == 0 || original_steps > num_train_timesteps {
        return Err(SchedulerError::InvalidSchedule {
            reason: format!(
                "original_inference_steps must be between 1 and num_train_timesteps \
                 ({num_train_timesteps}), got {original_steps}"
            ),
        });
    }
    if num_inference_steps > original_steps {
        return Err(SchedulerError::InvalidSchedule {
            reason: format!(
                "LCM takes at most original_inference_steps = {original_steps} steps (its \
                 timesteps are a subset of that schedule), got {num_inference_steps}"
            ),
        });
    }
    let skip = (num_train_timesteps / original_steps) as i64;
    let origin: Vec<i64> = (1..=original_steps as i64)
        .rev()
        .map(|index| index * skip - 1)
        .collect();
    // np.linspace(0, len, N, endpoint=False): i·(len/N) in float64, floored.
    let step = origin.len() as f64 / num_inference_steps as f64;
    Ok((0..num_inference_steps)
        .map(|index| origin[(index as f64 * step).floor() as usize])
        .collect())
}

impl LcmScheduler {
    pub(crate) fn new(
        config: &SchedulerConfig,
        common: CommonSettings,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
        let original_steps = config.integer(KIND, "original_inference_steps")?;
        let original_steps =
            usize::try_from(original_steps).map_err(|_| SchedulerError::InvalidSchedule {
                reason: format!("original_inference_steps must be positive, got {original_steps}"),
            })?;
        let integer_timesteps = lcm_timesteps(
            common.num_train_timesteps,
            original_steps,
            num_inference_steps,
        )?;
        let clip_range = if config.bool(KIND, "clip_sample")? {
            Some(config.float(KIND, "clip_sample_range")? as f32)
        } else {
            None
        };
        let alphas_cumprod = common.schedule.alphas_cumprod;
        let final_alpha_cumprod = if config.bool(KIND, "set_alpha_to_one")? {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            timesteps: integer_timesteps.iter().map(|&t| t as f64).collect(),
            integer_timesteps,
            alphas_cumprod,
            final_alpha_cumprod,
            prediction: common.prediction,
            clip_range,
            timestep_scaling: config.float(KIND, "timestep_scaling")? as f32,
        })
    }

    /// `(c_skip, c_out)` at an integer timestep, float32 like diffusers' tensors.
    fn boundary_scalings(&self, timestep: i64) -> (f32, f32) {
        let scaled = timestep as f32 * self.timestep_scaling;
        let denominator = scaled * scaled + SIGMA_DATA * SIGMA_DATA;
        let skip = SIGMA_DATA * SIGMA_DATA / denominator;
        let out = scaled / denominator.sqrt();
        (skip, out)
    }
}

impl Scheduler for LcmScheduler {
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
        let previous_timestep = self
            .integer_timesteps
            .get(step_index + 1)
            .copied()
            .unwrap_or(timestep);
        let alpha_prod = self.alphas_cumprod[timestep as usize];
        let alpha_prod_previous = if previous_timestep >= 0 {
            self.alphas_cumprod[previous_timestep as usize]
        } else {
            self.final_alpha_cumprod
        };
        let beta_prod = 1.0 - alpha_prod;
        let beta_prod_previous = 1.0 - alpha_prod_previous;
        let (skip, out) = self.boundary_scalings(timestep);

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
        let denoised = scale(&original, out)?.add(&scale(&sample, skip)?)?;
        if step_index + 1 == self.integer_timesteps.len() {
            return Ok(denoised);
        }
        let fresh_noise = noise
            .sample(model_output.dims(), model_output.device())?
            .to_dtype(denoised.dtype())?;
        Ok(add(
            &scale(&denoised, alpha_prod_previous.sqrt())?,
            &scale(&fresh_noise, beta_prod_previous.sqrt())?,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::lcm_timesteps;

    #[test]
    fn reference_timesteps() {
        // [checked] reference-addons.md VI: N = 4 → 999, 759, 499, 259.
        assert_eq!(
            lcm_timesteps(1000, 50, 4).expect("timesteps"),
            [999, 759, 499, 259]
        );
        assert_eq!(lcm_timesteps(1000, 50, 1).expect("timesteps"), [999]);
        assert_eq!(lcm_timesteps(1000, 50, 50).expect("timesteps")[49], 19);
        assert!(lcm_timesteps(1000, 50, 51).is_err());
    }
}
