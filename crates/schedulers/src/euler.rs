//! `EulerDiscreteScheduler` (Karras et al. 2022, algorithm 2 with s_churn = 0),
//! reference-formats.md F.4.

use candle_core::{DType, Tensor};

use crate::config::{CommonSettings, SchedulerConfig};
use crate::error::SchedulerError;
use crate::ops::{divide, scale, sub};
use crate::schedule::{
    karras_sigmas, numpy_interp_on_indices, sigma_from_alpha_cumprod, sigma_to_t, spaced_timesteps,
    TimestepSpacing,
};
use crate::{check_step_index, NoiseSource, PredictionType, Scheduler, SchedulerKind};

const KIND: SchedulerKind = SchedulerKind::Euler;

/// The end points of a Karras schedule; `None` takes them from the interpolated sigmas.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct KarrasBounds {
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
}

/// What the sigma list ends with after the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FinalSigma {
    Zero,
    /// The smallest training sigma, σ(t = 0).
    TrainingMinimum,
}

impl FinalSigma {
    pub(crate) fn read(
        config: &SchedulerConfig,
        kind: SchedulerKind,
    ) -> Result<Self, SchedulerError> {
        Ok(match config.choice(kind, "final_sigmas_type")?.as_str() {
            "sigma_min" => Self::TrainingMinimum,
            _ => Self::Zero,
        })
    }

    pub(crate) fn value(self, alphas_cumprod: &[f32]) -> f64 {
        match self {
            Self::Zero => 0.0,
            Self::TrainingMinimum => f64::from(sigma_from_alpha_cumprod(alphas_cumprod[0])),
        }
    }
}

/// Timesteps and sigmas of the Euler-family `set_timesteps`, both stored as float32 by
/// diffusers and widened here.
pub(crate) struct SigmaSchedule {
    pub timesteps: Vec<f64>,
    /// One more than `timesteps`: the final sigma.
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f32,
}

pub(crate) fn euler_sigma_schedule(
    common: &CommonSettings,
    num_inference_steps: usize,
    karras: Option<KarrasBounds>,
    final_sigma: FinalSigma,
) -> SigmaSchedule {
    // Spacing computed in float64 by numpy, then cast to float32.
    let mut timesteps: Vec<f32> = spaced_timesteps(
        common.spacing,
        common.num_train_timesteps,
        num_inference_steps,
        common.steps_offset,
    )
    .into_iter()
    .map(|value| value as f32)
    .collect();
    let table = common.schedule.sigmas();
    let mut sigmas: Vec<f64> = timesteps
        .iter()
        .map(|&timestep| numpy_interp_on_indices(f64::from(timestep), &table))
        .collect();
    if let Some(bounds) = karras {
        let sigma_min = bounds.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
        let sigma_max = bounds.sigma_max.unwrap_or(sigmas[0]);
        sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps);
        let log_sigmas = common.schedule.log_sigmas();
        // Fractional timesteps, not rounded (pitfall H.6).
        timesteps = sigmas
            .iter()
            .map(|&sigma| sigma_to_t(sigma, &log_sigmas) as f32)
            .collect();
    }
    sigmas.push(final_sigma.value(&common.schedule.alphas_cumprod));
    let sigmas: Vec<f32> = sigmas.into_iter().map(|sigma| sigma as f32).collect();
    let max_sigma = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let init_noise_sigma = match common.spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
        TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
    };
    SigmaSchedule {
        timesteps: timesteps.into_iter().map(f64::from).collect(),
        sigmas,
        init_noise_sigma,
    }
}

/// `x / sqrt(σ² + 1)`, the input scaling of the Euler family.
pub(crate) fn scale_by_sigma(sample: &Tensor, sigma: f32) -> Result<Tensor, SchedulerError> {
    Ok(divide(sample, (sigma * sigma + 1.0).sqrt())?)
}

/// The denoised estimate x₀ of the Euler family, with `sample` already float32.
pub(crate) fn predicted_original(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor, SchedulerError> {
    Ok(match prediction {
        PredictionType::Epsilon => sub(sample, &scale(model_output, sigma)?)?,
        PredictionType::VPrediction => {
            // c_out·v + c_skip·x, as in k-diffusion.
            let sigma_squared_plus_one = sigma * sigma + 1.0;
            let output_coefficient = -sigma / sigma_squared_plus_one.sqrt();
            let weighted_output = scale(model_output, output_coefficient)?;
            let weighted_sample = divide(sample, sigma_squared_plus_one)?;
            crate::ops::add(&weighted_output, &weighted_sample)?
        }
    })
}

pub(crate) struct EulerScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    sigmas_wide: Vec<f64>,
    init_noise_sigma: f32,
    prediction: PredictionType,
}

impl EulerScheduler {
    pub(crate) fn new(
        config: &SchedulerConfig,
        common: CommonSettings,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
        let karras = if config.bool(KIND, "use_karras_sigmas")? {
            Some(KarrasBounds {
                sigma_min: config.optional_float(KIND, "sigma_min")?,
                sigma_max: config.optional_float(KIND, "sigma_max")?,
            })
        } else {
            None
        };
        let schedule = euler_sigma_schedule(
            &common,
            num_inference_steps,
            karras,
            FinalSigma::read(config, KIND)?,
        );
        Ok(Self {
            timesteps: schedule.timesteps,
            sigmas_wide: schedule.sigmas.iter().copied().map(f64::from).collect(),
            sigmas: schedule.sigmas,
            init_noise_sigma: schedule.init_noise_sigma,
            prediction: common.prediction,
        })
    }
}

impl Scheduler for EulerScheduler {
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, SchedulerError> {
        check_step_index(step_index, self.timesteps.len())?;
        let sigma = self.sigmas[step_index];
        let sigma_next = self.sigmas[step_index + 1];
        // diffusers upcasts the sample for the update and casts the result back.
        let sample = sample.to_dtype(DType::F32)?;
        let original = predicted_original(self.prediction, model_output, &sample, sigma)?;
        let derivative = divide(&sub(&sample, &original)?, sigma)?;
        let previous = sample.add(&scale(&derivative, sigma_next - sigma)?)?;
        Ok(previous.to_dtype(model_output.dtype())?)
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas_wide)
    }
}

#[cfg(test)]
mod tests {
    use crate::{build_scheduler, SchedulerConfig, SchedulerKind};

    const SD15: &str = r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
        "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false, "skip_prk_steps": true}"#;
    const SDXL: &str = r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
        "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear",
        "use_karras_sigmas": false, "prediction_type": "epsilon"}"#;

    fn assert_close(actual: f64, expected: f64, relative: f64) {
        assert!(
            (actual - expected).abs() <= relative * expected.abs(),
            "{actual} vs {expected}"
        );
    }

    #[test]
    fn sd15_linspace_reference() {
        // [checked] examples of reference-formats.md F.4.
        let config = SchedulerConfig::from_json_str(SD15).expect("config");
        let scheduler = build_scheduler(SchedulerKind::Euler, &config, 30).expect("scheduler");
        let timesteps = scheduler.timesteps();
        assert_eq!(timesteps[0], 999.0);
        assert_close(timesteps[1], 964.5517, 1e-6);
        assert_close(timesteps[2], 930.1035, 1e-6);
        let sigmas = scheduler.sigmas().expect("sigmas");
        assert_eq!(sigmas.len(), 31);
        assert_close(sigmas[0], 14.61465, 1e-6);
        assert_close(sigmas[1], 11.91756, 1e-6);
        assert_close(sigmas[2], 9.81418, 1e-6);
        assert_close(sigmas[29], 0.029168, 1e-4);
        assert_eq!(sigmas[30], 0.0);
        assert_close(scheduler.init_noise_sigma(), 14.6146, 1e-5);
    }

    #[test]
    fn sdxl_leading_reference() {
        let config = SchedulerConfig::from_json_str(SDXL).expect("config");
        let scheduler = build_scheduler(SchedulerKind::Euler, &config, 30).expect("scheduler");
        let timesteps = scheduler.timesteps();
        assert_eq!(&timesteps[..3], &[958.0, 925.0, 892.0]);
        assert_eq!(&timesteps[28..], &[34.0, 1.0]);
        let sigmas = scheduler.sigmas().expect("sigmas");
        assert_close(sigmas[0], 11.47685, 1e-6);
        assert_close(sigmas[1], 9.54359, 1e-6);
        assert_close(sigmas[29], 0.041314, 1e-4);
        assert_close(scheduler.init_noise_sigma(), 11.52033, 1e-6);
    }

    #[test]
    fn karras_timesteps_are_fractional() {
        let config = SchedulerConfig::from_json_str(SD15)
            .and_then(|config| config.with_override("use_karras_sigmas", true.into()))
            .expect("config");
        let scheduler = build_scheduler(SchedulerKind::Euler, &config, 25).expect("scheduler");
        let timesteps = scheduler.timesteps();
        assert!(timesteps.iter().any(|t| t.fract() != 0.0), "{timesteps:?}");
        let sigmas = scheduler.sigmas().expect("sigmas");
        assert_close(sigmas[0], 14.61465, 1e-6);
        assert_close(sigmas[24], 0.029168, 1e-4);
    }
}
