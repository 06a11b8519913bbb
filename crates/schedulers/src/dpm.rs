//! `DPMSolverMultistepScheduler` with `algorithm_type = "dpmsolver++"` (Lu et al. 2022),
//! first or second order, reference-formats.md F.5.

use candle_core::{DType, Tensor};

use crate::config::{CommonSettings, SchedulerConfig};
use crate::error::SchedulerError;
use crate::euler::FinalSigma;
use crate::ops::{divide, promote, scale, sub};
use crate::schedule::{dpm_timesteps, karras_sigmas, numpy_interp_on_indices, sigma_to_t};
use crate::{check_step_index, NoiseSource, PredictionType, Scheduler, SchedulerKind};

const KIND: SchedulerKind = SchedulerKind::DpmPp2m;

/// How the second-order update weighs the divided difference D1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SecondOrderRule {
    Midpoint,
    Heun,
}

pub(crate) struct DpmSolverScheduler {
    timesteps: Vec<f64>,
    /// float32 like diffusers' `self.sigmas`; one more than the timesteps.
    sigmas: Vec<f32>,
    sigmas_wide: Vec<f64>,
    prediction: PredictionType,
    solver_order: usize,
    second_order_rule: SecondOrderRule,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma: FinalSigma,
    /// x₀ predicted at the previous step, the multistep history.
    previous_denoised: Option<Tensor>,
    last_step: Option<usize>,
}

/// α_t = 1/sqrt(σ² + 1) and σ_t = σ·α_t of the VP parameterisation, in float32.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// λ = log α_t − log σ_t (+∞ at σ = 0, which turns the last step into x₀ exactly).
fn half_log_snr(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl DpmSolverScheduler {
    pub(crate) fn new(
        config: &SchedulerConfig,
        common: CommonSettings,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
        let alphas_cumprod = &common.schedule.alphas_cumprod;
        let last_timestep =
            Self::last_timestep(alphas_cumprod, config.float(KIND, "lambda_min_clipped")?);
        let mut integer_timesteps = dpm_timesteps(
            common.spacing,
            common.num_train_timesteps,
            last_timestep,
            num_inference_steps,
            common.steps_offset,
        );
        let table = common.schedule.sigmas();
        let mut sigmas: Vec<f64> = if config.bool(KIND, "use_karras_sigmas")? {
            // Karras over the whole training range (not the spaced sigmas, unlike Euler), and
            // the timesteps rounded to integers (pitfall H.6).
            let karras = karras_sigmas(
                f64::from(table[0]),
                f64::from(table[table.len() - 1]),
                num_inference_steps,
            );
            let log_sigmas = common.schedule.log_sigmas();
            integer_timesteps = karras
                .iter()
                .map(|&sigma| sigma_to_t(sigma, &log_sigmas).round_ties_even() as i64)
                .collect();
            karras
        } else {
            integer_timesteps
                .iter()
                .map(|&timestep| numpy_interp_on_indices(timestep as f64, &table))
                .collect()
        };
        let final_sigma = FinalSigma::read(config, KIND)?;
        sigmas.push(final_sigma.value(alphas_cumprod));
        let sigmas: Vec<f32> = sigmas.into_iter().map(|sigma| sigma as f32).collect();
        let second_order_rule = match config.choice(KIND, "solver_type")?.as_str() {
            "heun" => SecondOrderRule::Heun,
            _ => SecondOrderRule::Midpoint,
        };
        Ok(Self {
            timesteps: integer_timesteps.iter().map(|&t| t as f64).collect(),
            sigmas_wide: sigmas.iter().copied().map(f64::from).collect(),
            sigmas,
            prediction: common.prediction,
            solver_order: config.integer(KIND, "solver_order")? as usize,
            second_order_rule,
            lower_order_final: config.bool(KIND, "lower_order_final")?,
            euler_at_final: config.bool(KIND, "euler_at_final")?,
            final_sigma,
            previous_denoised: None,
            last_step: None,
        })
    }

    /// The training timesteps whose λ falls below `lambda_min_clipped` are cut off the top of
    /// the range (diffusers' `searchsorted` over the flipped λ table).
    fn last_timestep(alphas_cumprod: &[f32], lambda_min_clipped: f64) -> usize {
        let clipped = alphas_cumprod
            .iter()
            .filter(|&&alpha_cumprod| {
                let lambda = half_log_snr(alpha_cumprod.sqrt(), (1.0 - alpha_cumprod).sqrt());
                f64::from(lambda) < lambda_min_clipped
            })
            .count();
        alphas_cumprod.len() - clipped
    }

    /// The data prediction x₀ the solver integrates.
    fn denoised(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        sigma: f32,
    ) -> Result<Tensor, SchedulerError> {
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        let (output, sample) = promote(model_output, sample)?;
        Ok(match self.prediction {
            PredictionType::Epsilon => divide(&sample.sub(&scale(&output, sigma_t)?)?, alpha_t)?,
            PredictionType::VPrediction => {
                scale(&sample, alpha_t)?.sub(&scale(&output, sigma_t)?)?
            }
        })
    }

    fn first_order_update(
        &self,
        denoised: &Tensor,
        sample: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, SchedulerError> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step_index + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[step_index]);
        let h = half_log_snr(alpha_t, sigma_t) - half_log_snr(alpha_s, sigma_s);
        let denoised_coefficient = alpha_t * ((-h).exp() - 1.0);
        Ok(sub(
            &scale(sample, sigma_t / sigma_s)?,
            &scale(denoised, denoised_coefficient)?,
        )?)
    }

    fn second_order_update(
        &self,
        denoised: &Tensor,
        previous_denoised: &Tensor,
        sample: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, SchedulerError> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step_index + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[step_index]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[step_index - 1]);
        let lambda_t = half_log_snr(alpha_t, sigma_t);
        let lambda_s0 = half_log_snr(alpha_s0, sigma_s0);
        let lambda_s1 = half_log_snr(alpha_s1, sigma_s1);
        let h = lambda_t - lambda_s0;
        let h_previous = lambda_s0 - lambda_s1;
        let ratio = h_previous / h;
        let (denoised, previous_denoised) = promote(denoised, previous_denoised)?;
        let first_difference = scale(&denoised.sub(&previous_denoised)?, 1.0 / ratio)?;
        let exp_term = (-h).exp() - 1.0;
        let denoised_coefficient = alpha_t * exp_term;
        let partial = sub(
            &scale(sample, sigma_t / sigma_s0)?,
            &scale(&denoised, denoised_coefficient)?,
        )?;
        Ok(match self.second_order_rule {
            SecondOrderRule::Midpoint => sub(
                &partial,
                &scale(&first_difference, 0.5 * denoised_coefficient)?,
            )?,
            SecondOrderRule::Heun => {
                let difference_coefficient = alpha_t * (exp_term / h + 1.0);
                crate::ops::add(&partial, &scale(&first_difference, difference_coefficient)?)?
            }
        })
    }
}

impl Scheduler for DpmSolverScheduler {
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, SchedulerError> {
        let step_count = self.timesteps.len();
        check_step_index(step_index, step_count)?;
        match self.last_step {
            // Step 0 starts a new run; a first step elsewhere starts mid-schedule (img2img).
            _ if step_index == 0 => self.previous_denoised = None,
            None => self.previous_denoised = None,
            Some(last) if step_index == last + 1 => {}
            Some(last) => {
                return Err(SchedulerError::StepOutOfOrder {
                    kind: KIND,
                    expected: last + 1,
                    got: step_index,
                })
            }
        }
        let is_last = step_index == step_count - 1;
        // With a zero final sigma the last step is first order, which lands exactly on x₀.
        let first_order_at_end = is_last
            && (self.euler_at_final
                || (self.lower_order_final && step_count < 15)
                || self.final_sigma == FinalSigma::Zero);

        let denoised = self.denoised(model_output, sample, self.sigmas[step_index])?;
        let sample = sample.to_dtype(DType::F32)?;
        let previous = match &self.previous_denoised {
            Some(previous_denoised) if self.solver_order >= 2 && !first_order_at_end => {
                self.second_order_update(&denoised, previous_denoised, &sample, step_index)?
            }
            _ => self.first_order_update(&denoised, &sample, step_index)?,
        };
        self.previous_denoised = Some(denoised);
        self.last_step = Some(step_index);
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
        "steps_offset": 1, "set_alpha_to_one": false, "clip_sample": false}"#;

    fn assert_close(actual: f64, expected: f64, relative: f64) {
        assert!(
            (actual - expected).abs() <= relative * expected.abs(),
            "{actual} vs {expected}"
        );
    }

    #[test]
    fn reference_timesteps() {
        // [checked] examples of reference-formats.md F.5.
        let config = SchedulerConfig::from_json_str(SD15).expect("config");
        let scheduler = build_scheduler(SchedulerKind::DpmPp2m, &config, 25).expect("scheduler");
        let timesteps = scheduler.timesteps();
        assert_eq!(timesteps.len(), 25);
        assert_eq!(&timesteps[..3], &[999.0, 959.0, 919.0]);
        assert_eq!(&timesteps[23..], &[80.0, 40.0]);

        let karras = config
            .clone()
            .with_override("karras", true.into())
            .expect("override");
        let scheduler = build_scheduler(SchedulerKind::DpmPp2m, &karras, 25).expect("scheduler");
        let timesteps = scheduler.timesteps();
        assert_eq!(&timesteps[..3], &[999.0, 970.0, 938.0]);
        assert_eq!(&timesteps[22..], &[4.0, 1.0, 0.0]);
        let sigmas = scheduler.sigmas().expect("sigmas");
        assert_close(sigmas[0], 14.61465, 1e-6);
        assert_close(sigmas[1], 12.28304, 1e-6);
        assert_close(sigmas[24], 0.029168, 1e-4);
        assert_eq!(sigmas[25], 0.0);

        let sdxl = config
            .with_override("timestep_spacing", "leading".into())
            .expect("override");
        let scheduler = build_scheduler(SchedulerKind::DpmPp2m, &sdxl, 25).expect("scheduler");
        let timesteps = scheduler.timesteps();
        assert_eq!(&timesteps[..3], &[951.0, 913.0, 875.0]);
        assert_eq!(&timesteps[23..], &[77.0, 39.0]);
    }
}
