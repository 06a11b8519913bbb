//! `DDIMScheduler` (Song et al. 2020), reference-formats.md F.3.

use candle_core::Tensor;

use crate::config::{CommonSettings, SchedulerConfig};
use crate::error::SchedulerError;
use crate::ops::{add, divide, promote, scale};
use crate::schedule::{spaced_timesteps, TimestepSpacing};
use crate::{check_step_index, NoiseSource, PredictionType, Scheduler, SchedulerKind};

const KIND: SchedulerKind = SchedulerKind::Ddim;

pub(crate) struct DdimScheduler {
    /// float32, like the torch tensor diffusers indexes.
    alphas_cumprod: Vec<f32>,
    /// ᾱ used when the previous timestep falls below 0.
    final_alpha_cumprod: f32,
    integer_timesteps: Vec<i64>,
    timesteps: Vec<f64>,
    /// `num_train_timesteps div num_inference_steps`: the distance to the previous timestep
    /// whatever the spacing (pitfall H.5).
    step_ratio: i64,
    prediction: PredictionType,
    clip_range: Option<f32>,
    eta: f32,
}

impl DdimScheduler {
    pub(crate) fn new(
        config: &SchedulerConfig,
        common: CommonSettings,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
        let eta = config.float(KIND, "eta")?;
        if eta < 0.0 {
            return Err(SchedulerError::InvalidSchedule {
                reason: format!("DDIM eta must not be negative, got {eta}"),
            });
        }
        let clip_range = if config.bool(KIND, "clip_sample")? {
            Some(config.float(KIND, "clip_sample_range")? as f32)
        } else {
            None
        };
        let alphas_cumprod = common.schedule.alphas_cumprod.clone();
        let final_alpha_cumprod = if config.bool(KIND, "set_alpha_to_one")? {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let spaced = spaced_timesteps(
            common.spacing,
            common.num_train_timesteps,
            num_inference_steps,
            common.steps_offset,
        );
        let integer_timesteps: Vec<i64> = spaced
            .iter()
            .map(|&value| match common.spacing {
                TimestepSpacing::Linspace => value.round_ties_even() as i64,
                TimestepSpacing::Leading | TimestepSpacing::Trailing => value as i64,
            })
            .collect();
        let scheduler = Self {
            timesteps: integer_timesteps.iter().map(|&t| t as f64).collect(),
            integer_timesteps,
            step_ratio: (common.num_train_timesteps / num_inference_steps) as i64,
            alphas_cumprod,
            final_alpha_cumprod,
            prediction: common.prediction,
            clip_range,
            eta: eta as f32,
        };
        for &timestep in &scheduler.integer_timesteps {
            scheduler.alpha_cumprod_at(timestep)?;
        }
        Ok(scheduler)
    }

    /// `alphas_cumprod[t]` with torch indexing: a negative index counts from the end. diffusers
    /// can produce timestep −1 with trailing spacing for some step counts (see
    /// `schedule::numpy_arange`); reproducing the wrap keeps parity with it.
    fn alpha_cumprod_at(&self, timestep: i64) -> Result<f32, SchedulerError> {
        let len = self.alphas_cumprod.len() as i64;
        let index = if timestep < 0 {
            timestep + len
        } else {
            timestep
        };
        if (0..len).contains(&index) {
            Ok(self.alphas_cumprod[index as usize])
        } else {
            Err(SchedulerError::InvalidSchedule {
                reason: format!("timestep {timestep} is outside the {len} training timesteps"),
            })
        }
    }
}

impl Scheduler for DdimScheduler {
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
        let previous_timestep = timestep - self.step_ratio;
        // Scalars in float32, as diffusers' 0-d torch tensors are.
        let alpha_prod = self.alpha_cumprod_at(timestep)?;
        let alpha_prod_previous = if previous_timestep >= 0 {
            self.alpha_cumprod_at(previous_timestep)?
        } else {
            self.final_alpha_cumprod
        };
        let beta_prod = 1.0 - alpha_prod;
        let sqrt_alpha_prod = alpha_prod.sqrt();
        let sqrt_beta_prod = beta_prod.sqrt();

        let (output, sample) = promote(model_output, sample)?;
        let (predicted_original, predicted_noise) = match self.prediction {
            PredictionType::Epsilon => {
                let signal = sample.sub(&scale(&output, sqrt_beta_prod)?)?;
                (divide(&signal, sqrt_alpha_prod)?, output.clone())
            }
            PredictionType::VPrediction => (
                scale(&sample, sqrt_alpha_prod)?.sub(&scale(&output, sqrt_beta_prod)?)?,
                scale(&output, sqrt_alpha_prod)?.add(&scale(&sample, sqrt_beta_prod)?)?,
            ),
        };
        let predicted_original = match self.clip_range {
            Some(range) => predicted_original.clamp(-range, range)?,
            None => predicted_original,
        };

        let beta_prod_previous = 1.0 - alpha_prod_previous;
        let variance = (beta_prod_previous / beta_prod) * (1.0 - alpha_prod / alpha_prod_previous);
        let noise_std = self.eta * variance.sqrt();
        // Mathematically ≥ 0; rounding could make it a hair negative at η = 1, where torch
        // would return NaN.
        let direction_coefficient = (1.0 - alpha_prod_previous - noise_std * noise_std)
            .max(0.0)
            .sqrt();
        let previous_sample = scale(&predicted_original, alpha_prod_previous.sqrt())?
            .add(&scale(&predicted_noise, direction_coefficient)?)?;
        if self.eta > 0.0 {
            let variance_noise = noise
                .sample(model_output.dims(), model_output.device())?
                .to_dtype(model_output.dtype())?;
            return Ok(add(&previous_sample, &scale(&variance_noise, noise_std)?)?);
        }
        Ok(previous_sample)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::{DdimScheduler, KIND};
    use crate::{build_scheduler, ReplayNoise, Scheduler, SchedulerConfig, SchedulerKind};

    #[test]
    fn eta_adds_scaled_noise() {
        // F.3 with η = 1, evaluated in f64 on one element.
        let config = SchedulerConfig::from_json_str(
            r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false}"#,
        )
        .and_then(|config| config.with_override("eta", 1.0.into()))
        .expect("config");
        let common = config.common_settings(KIND, 10).expect("settings");
        let mut scheduler = DdimScheduler::new(&config, common, 10).expect("scheduler");
        let (x, eps, noise) = (0.5f64, 0.1f64, -0.7f64);
        let device = Device::Cpu;
        let tensor =
            |value: f64| Tensor::full(value as f32, (1, 1, 1, 1), &device).expect("tensor");
        let mut replay = ReplayNoise::new([tensor(noise)]);
        let result = scheduler
            .step(&tensor(eps), 0, &tensor(x), &mut replay)
            .and_then(|t| Ok(t.flatten_all()?.to_vec1::<f32>()?))
            .expect("step");
        assert_eq!(replay.remaining(), 0, "η > 0 must draw noise");

        let t = scheduler.integer_timesteps[0] as usize;
        let alpha = f64::from(scheduler.alphas_cumprod[t]);
        let alpha_previous = f64::from(scheduler.alphas_cumprod[t - 100]);
        let x0 = (x - (1.0 - alpha).sqrt() * eps) / alpha.sqrt();
        let variance = (1.0 - alpha_previous) / (1.0 - alpha) * (1.0 - alpha / alpha_previous);
        let expected = alpha_previous.sqrt() * x0
            + (1.0 - alpha_previous - variance).sqrt() * eps
            + variance.sqrt() * noise;
        assert!(
            (f64::from(result[0]) - expected).abs() < 1e-5,
            "{} vs {expected}",
            result[0]
        );
    }

    fn timesteps(spacing: &str, steps: usize) -> Vec<f64> {
        let config = SchedulerConfig::from_json_str(
            r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}"#,
        )
        .and_then(|config| config.with_override("timestep_spacing", spacing.into()))
        .expect("config");
        build_scheduler(SchedulerKind::Ddim, &config, steps)
            .expect("scheduler")
            .timesteps()
            .to_vec()
    }

    #[test]
    fn reference_timesteps() {
        // [checked] examples of reference-formats.md F.2.
        let leading = timesteps("leading", 50);
        assert_eq!(
            (leading[0], leading[1], leading[48], leading[49]),
            (981.0, 961.0, 21.0, 1.0)
        );
        let trailing = timesteps("trailing", 30);
        assert_eq!(
            (trailing[0], trailing[1], trailing[2], trailing[29]),
            (999.0, 966.0, 932.0, 32.0)
        );
        let linspace = timesteps("linspace", 30);
        assert_eq!(
            (linspace[0], linspace[1], linspace[2], linspace[29]),
            (999.0, 965.0, 930.0, 0.0)
        );
    }
}
