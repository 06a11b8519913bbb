//! `DPMSolverMultistepScheduler` with `algorithm_type = "dpmsolver++"` (Lu et al. 2022),
//! first or second order, reference-formats.md F.5, and its stochastic variant
//! `"sde-dpmsolver++"` (DPM++ 2M SDE, reference-addons.md VI), which adds
//! `σ_t·sqrt(1 − e^{−2h})·ε` with fresh noise ε at every step.

use candle_core::{DType, Tensor};

use crate::config::{CommonSettings, SchedulerConfig};
use crate::error::SchedulerError;
use crate::euler::FinalSigma;
use crate::ops::{add, divide, promote, scale, sub};
use crate::schedule::{dpm_timesteps, karras_sigmas, numpy_interp_on_indices, sigma_to_t};
use crate::{
    check_step_index, check_step_order, NoiseSource, PredictionType, Scheduler, SchedulerKind,
};

/// How the second-order update weighs the divided difference D1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SecondOrderRule {
    Midpoint,
    Heun,
}

impl SecondOrderRule {
    pub(crate) fn read(
        config: &SchedulerConfig,
        kind: SchedulerKind,
    ) -> Result<Self, SchedulerError> {
        Ok(match config.solver_type(kind, &["midpoint", "heun"])? {
            "heun" => Self::Heun,
            _ => Self::Midpoint,
        })
    }
}

/// The coefficients of one DPM-Solver++ update from λ_s to λ_t = λ_s + h, as diffusers
/// evaluates them in float32 (deterministic: `x = (σ_t/σ_s)·x − α_t(e^{−h} − 1)·D`;
/// SDE: `x = (σ_t/σ_s·e^{−h})·x + α_t(1 − e^{−2h})·D + σ_t·sqrt(1 − e^{−2h})·ε`).
pub(crate) struct UpdateCoefficients {
    pub sample: f32,
    /// Of D0 (x₀, or the earlier x₀ for singlestep).
    pub denoised: f32,
    /// Of D1 = (m0 − m1)/r0.
    pub difference: f32,
    /// Of ε, 0 for the deterministic solver.
    pub noise: f32,
}

/// The update coefficients for the sample at σ_s, the target σ_t and `h = λ_t − λ_s`.
pub(crate) fn update_coefficients(
    stochastic: bool,
    rule: SecondOrderRule,
    sigma_ratio: f32,
    alpha_t: f32,
    sigma_t: f32,
    h: f32,
) -> UpdateCoefficients {
    if stochastic {
        let decay = (-h).exp();
        let decay_twice = (-2.0 * h).exp();
        let denoised = alpha_t * (1.0 - decay_twice);
        UpdateCoefficients {
            sample: sigma_ratio * decay,
            denoised,
            difference: match rule {
                SecondOrderRule::Midpoint => 0.5 * denoised,
                SecondOrderRule::Heun => alpha_t * ((1.0 - decay_twice) / (-2.0 * h) + 1.0),
            },
            noise: sigma_t * (1.0 - decay_twice).sqrt(),
        }
    } else {
        let exp_term = (-h).exp() - 1.0;
        // Written with the sign diffusers subtracts: x − coefficient·D.
        let denoised = -(alpha_t * exp_term);
        UpdateCoefficients {
            sample: sigma_ratio,
            denoised,
            difference: match rule {
                SecondOrderRule::Midpoint => -(0.5 * (alpha_t * exp_term)),
                SecondOrderRule::Heun => alpha_t * (exp_term / h + 1.0),
            },
            noise: 0.0,
        }
    }
}

/// `c_s·x + c_0·D0 (+ c_1·D1) (+ c_ε·ε)` in diffusers' order of additions. Negative
/// coefficients are applied as subtractions of the positive product, which is exact.
pub(crate) fn apply_update(
    coefficients: &UpdateCoefficients,
    sample: &Tensor,
    first: &Tensor,
    difference: Option<&Tensor>,
    noise: Option<&Tensor>,
) -> Result<Tensor, SchedulerError> {
    let weighted = |tensor: &Tensor, coefficient: f32| -> candle_core::Result<(Tensor, bool)> {
        if coefficient.is_sign_negative() {
            Ok((scale(tensor, -coefficient)?, true))
        } else {
            Ok((scale(tensor, coefficient)?, false))
        }
    };
    let accumulate = |total: Tensor, term: (Tensor, bool)| -> candle_core::Result<Tensor> {
        if term.1 {
            sub(&total, &term.0)
        } else {
            add(&total, &term.0)
        }
    };
    let mut total = scale(sample, coefficients.sample)?;
    total = accumulate(total, weighted(first, coefficients.denoised)?)?;
    if let Some(difference) = difference {
        total = accumulate(total, weighted(difference, coefficients.difference)?)?;
    }
    if let Some(noise) = noise {
        total = add(&total, &scale(noise, coefficients.noise)?)?;
    }
    Ok(total)
}

pub(crate) struct DpmSolverScheduler {
    kind: SchedulerKind,
    /// `sde-dpmsolver++`: fresh noise at every step.
    stochastic: bool,
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
pub(crate) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// λ = log α_t − log σ_t (+∞ at σ = 0, which turns the last step into x₀ exactly).
pub(crate) fn half_log_snr(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// λ at the VP point of `sigma`.
pub(crate) fn lambda_of(sigma: f32) -> f32 {
    let (alpha, sigma) = alpha_sigma(sigma);
    half_log_snr(alpha, sigma)
}

/// The data prediction x₀ of the DPM-Solver++ family (and UniPC) at `sigma`.
pub(crate) fn data_prediction(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor, SchedulerError> {
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    let (output, sample) = promote(model_output, sample)?;
    Ok(match prediction {
        PredictionType::Epsilon => divide(&sample.sub(&scale(&output, sigma_t)?)?, alpha_t)?,
        PredictionType::VPrediction => scale(&sample, alpha_t)?.sub(&scale(&output, sigma_t)?)?,
    })
}

/// The training timesteps whose λ falls below `lambda_min_clipped` are cut off the top of
/// the range (diffusers' `searchsorted` over the flipped λ table).
pub(crate) fn last_timestep(alphas_cumprod: &[f32], lambda_min_clipped: f64) -> usize {
    let clipped = alphas_cumprod
        .iter()
        .filter(|&&alpha_cumprod| {
            let lambda = half_log_snr(alpha_cumprod.sqrt(), (1.0 - alpha_cumprod).sqrt());
            f64::from(lambda) < lambda_min_clipped
        })
        .count();
    alphas_cumprod.len() - clipped
}

/// The DPM-Solver timesteps and sigmas (plus the final sigma), diffusers' `set_timesteps` of
/// the multistep and singlestep classes: Karras over the whole training range with rounded
/// timesteps, or the interpolated sigmas of the integer timesteps.
pub(crate) fn dpm_schedule(
    common: &CommonSettings,
    last_timestep: usize,
    num_inference_steps: usize,
    karras: bool,
    final_sigma: FinalSigma,
) -> (Vec<f64>, Vec<f32>) {
    let mut integer_timesteps = dpm_timesteps(
        common.spacing,
        common.num_train_timesteps,
        last_timestep,
        num_inference_steps,
        common.steps_offset,
    );
    let table = common.schedule.sigmas();
    let mut sigmas: Vec<f64> = if karras {
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
    sigmas.push(final_sigma.value(&common.schedule.alphas_cumprod));
    (
        integer_timesteps.iter().map(|&t| t as f64).collect(),
        sigmas.into_iter().map(|sigma| sigma as f32).collect(),
    )
}

impl DpmSolverScheduler {
    pub(crate) fn new(
        kind: SchedulerKind,
        config: &SchedulerConfig,
        common: CommonSettings,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
        let alphas_cumprod = &common.schedule.alphas_cumprod;
        let last_timestep =
            last_timestep(alphas_cumprod, config.float(kind, "lambda_min_clipped")?);
        let final_sigma = FinalSigma::read(config, kind)?;
        let (timesteps, sigmas) = dpm_schedule(
            &common,
            last_timestep,
            num_inference_steps,
            config.bool(kind, "use_karras_sigmas")?,
            final_sigma,
        );
        Ok(Self {
            kind,
            stochastic: kind == SchedulerKind::DpmPp2mSde,
            timesteps,
            sigmas_wide: sigmas.iter().copied().map(f64::from).collect(),
            sigmas,
            prediction: common.prediction,
            solver_order: config.solver_order(kind, 2)?,
            second_order_rule: SecondOrderRule::read(config, kind)?,
            lower_order_final: config.bool(kind, "lower_order_final")?,
            euler_at_final: config.bool(kind, "euler_at_final")?,
            final_sigma,
            previous_denoised: None,
            last_step: None,
        })
    }

    fn first_order_update(
        &self,
        denoised: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
        step_index: usize,
    ) -> Result<Tensor, SchedulerError> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step_index + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[step_index]);
        let h = half_log_snr(alpha_t, sigma_t) - half_log_snr(alpha_s, sigma_s);
        let coefficients = update_coefficients(
            self.stochastic,
            self.second_order_rule,
            sigma_t / sigma_s,
            alpha_t,
            sigma_t,
            h,
        );
        apply_update(&coefficients, sample, denoised, None, noise)
    }

    fn second_order_update(
        &self,
        denoised: &Tensor,
        previous_denoised: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
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
        let coefficients = update_coefficients(
            self.stochastic,
            self.second_order_rule,
            sigma_t / sigma_s0,
            alpha_t,
            sigma_t,
            h,
        );
        apply_update(
            &coefficients,
            sample,
            &denoised,
            Some(&first_difference),
            noise,
        )
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
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, SchedulerError> {
        let step_count = self.timesteps.len();
        check_step_index(step_index, step_count)?;
        if check_step_order(self.kind, self.last_step, step_index)? {
            self.previous_denoised = None;
        }
        let is_last = step_index == step_count - 1;
        // With a zero final sigma the last step is first order, which lands exactly on x₀.
        let first_order_at_end = is_last
            && (self.euler_at_final
                || (self.lower_order_final && step_count < 15)
                || self.final_sigma == FinalSigma::Zero);

        let denoised = data_prediction(
            self.prediction,
            model_output,
            sample,
            self.sigmas[step_index],
        )?;
        let sample = sample.to_dtype(DType::F32)?;
        // The SDE variant draws float32 noise at every step, the last (where σ = 0 cancels it)
        // included.
        let noise = if self.stochastic {
            Some(
                noise
                    .sample(model_output.dims(), model_output.device())?
                    .to_dtype(DType::F32)?,
            )
        } else {
            None
        };
        let previous = match &self.previous_denoised {
            Some(previous_denoised) if self.solver_order >= 2 && !first_order_at_end => self
                .second_order_update(
                    &denoised,
                    previous_denoised,
                    &sample,
                    noise.as_ref(),
                    step_index,
                )?,
            _ => self.first_order_update(&denoised, &sample, noise.as_ref(), step_index)?,
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
