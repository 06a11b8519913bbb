//! `DPMSolverSinglestepScheduler` (Lu et al. 2022), first or second order, with
//! `algorithm_type` `dpmsolver++` (default) or `sde-dpmsolver++` (reference-addons.md VI).
//!
//! A second-order step goes from the sample of the preceding first-order step over two
//! intervals, using that step's x₀ and the current one as its two evaluations: one model
//! call per listed step, orders `[1, 2, 1, 2, …]` ending in 1.

use candle_core::Tensor;

use crate::config::{CommonSettings, SchedulerConfig};
use crate::dpm::{
    alpha_sigma, apply_update, data_prediction, dpm_schedule, half_log_snr, last_timestep,
    update_coefficients, SecondOrderRule,
};
use crate::error::SchedulerError;
use crate::euler::FinalSigma;
use crate::ops::{promote, scale};
use crate::schedule::TimestepSpacing;
use crate::{
    check_step_index, check_step_order, NoiseSource, PredictionType, Scheduler, SchedulerKind,
};

const KIND: SchedulerKind = SchedulerKind::DpmPp2s;

pub(crate) struct DpmSinglestepScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    sigmas_wide: Vec<f64>,
    prediction: PredictionType,
    stochastic: bool,
    second_order_rule: SecondOrderRule,
    /// The solver order of each step.
    orders: Vec<usize>,
    /// x₀ of the previous step.
    previous_denoised: Option<Tensor>,
    /// The sample at the last first-order step, where a second-order step starts from.
    anchor: Option<Tensor>,
    last_step: Option<usize>,
}

/// diffusers' `get_order_list` for orders 1 and 2.
fn order_list(
    steps: usize,
    solver_order: usize,
    lower_order_final: bool,
    final_sigma: FinalSigma,
) -> Vec<usize> {
    let mut orders: Vec<usize> = match (solver_order, lower_order_final) {
        (1, _) => vec![1; steps],
        (_, true) if steps.is_multiple_of(2) => {
            let mut orders = [1, 2].repeat(steps / 2 - 1);
            orders.extend([1, 1]);
            orders
        }
        (_, true) => {
            let mut orders = [1, 2].repeat(steps / 2);
            orders.push(1);
            orders
        }
        (_, false) => [1, 2].repeat(steps / 2),
    };
    if final_sigma == FinalSigma::Zero {
        if let Some(last) = orders.last_mut() {
            *last = 1;
        }
    }
    orders
}

impl DpmSinglestepScheduler {
    pub(crate) fn new(
        config: &SchedulerConfig,
        mut common: CommonSettings,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
        let final_sigma = FinalSigma::read(config, KIND)?;
        let solver_order = config.solver_order(KIND, 2)?;
        // The class has no spacing setting: linspace over N + 1 points without the last.
        common.spacing = TimestepSpacing::Linspace;
        common.steps_offset = 0;
        let last_timestep = last_timestep(
            &common.schedule.alphas_cumprod,
            config.float(KIND, "lambda_min_clipped")?,
        );
        let (timesteps, sigmas) = dpm_schedule(
            &common,
            last_timestep,
            num_inference_steps,
            config.bool(KIND, "use_karras_sigmas")?,
            final_sigma,
        );
        // `set_timesteps` turns `lower_order_final` on for an uneven step count or a zero
        // final sigma.
        let lower_order_final = config.bool(KIND, "lower_order_final")?
            || !num_inference_steps.is_multiple_of(solver_order)
            || final_sigma == FinalSigma::Zero;
        Ok(Self {
            orders: order_list(
                num_inference_steps,
                solver_order,
                lower_order_final,
                final_sigma,
            ),
            timesteps,
            sigmas_wide: sigmas.iter().copied().map(f64::from).collect(),
            sigmas,
            prediction: common.prediction,
            stochastic: config.choice(KIND, "algorithm_type")? == "sde-dpmsolver++",
            second_order_rule: SecondOrderRule::read(config, KIND)?,
            previous_denoised: None,
            anchor: None,
            last_step: None,
        })
    }
}

impl Scheduler for DpmSinglestepScheduler {
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
        if check_step_order(KIND, self.last_step, step_index)? {
            self.previous_denoised = None;
            self.anchor = None;
        }
        let denoised = data_prediction(
            self.prediction,
            model_output,
            sample,
            self.sigmas[step_index],
        )?;
        // Noise in the model output's dtype, drawn at every step of the SDE variant.
        let fresh_noise = if self.stochastic {
            Some(
                noise
                    .sample(model_output.dims(), model_output.device())?
                    .to_dtype(model_output.dtype())?,
            )
        } else {
            None
        };
        // A run started mid-schedule has no earlier x₀: the first step is first order.
        let order = match (&self.previous_denoised, &self.anchor) {
            (Some(_), Some(_)) => self.orders[step_index],
            _ => 1,
        };
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step_index + 1]);
        let lambda_t = half_log_snr(alpha_t, sigma_t);
        let previous = match (order, &self.previous_denoised, &self.anchor) {
            (2, Some(previous_denoised), Some(anchor)) => {
                let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[step_index]);
                let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[step_index - 1]);
                let lambda_s0 = half_log_snr(alpha_s0, sigma_s0);
                let lambda_s1 = half_log_snr(alpha_s1, sigma_s1);
                let h = lambda_t - lambda_s1;
                let ratio = (lambda_s0 - lambda_s1) / h;
                let (current, earlier) = promote(&denoised, previous_denoised)?;
                let difference = scale(&current.sub(&earlier)?, 1.0 / ratio)?;
                let coefficients = update_coefficients(
                    self.stochastic,
                    self.second_order_rule,
                    sigma_t / sigma_s1,
                    alpha_t,
                    sigma_t,
                    h,
                );
                apply_update(
                    &coefficients,
                    anchor,
                    &earlier,
                    Some(&difference),
                    fresh_noise.as_ref(),
                )?
            }
            _ => {
                let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[step_index]);
                let h = lambda_t - half_log_snr(alpha_s, sigma_s);
                let coefficients = update_coefficients(
                    self.stochastic,
                    self.second_order_rule,
                    sigma_t / sigma_s,
                    alpha_t,
                    sigma_t,
                    h,
                );
                self.anchor = Some(sample.clone());
                apply_update(&coefficients, sample, &denoised, None, fresh_noise.as_ref())?
            }
        };
        self.previous_denoised = Some(denoised);
        self.last_step = Some(step_index);
        Ok(previous)
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas_wide)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_lists_follow_diffusers() {
        // [checked in source] reference-addons.md VI: even N → [1,2]·(N/2 − 1) + [1,1],
        // odd N → [1,2]·(N div 2) + [1].
        assert_eq!(order_list(6, 2, true, FinalSigma::Zero), [1, 2, 1, 2, 1, 1]);
        assert_eq!(order_list(5, 2, true, FinalSigma::Zero), [1, 2, 1, 2, 1]);
        assert_eq!(order_list(1, 2, true, FinalSigma::Zero), [1]);
        assert_eq!(
            order_list(4, 2, false, FinalSigma::TrainingMinimum),
            [1, 2, 1, 2]
        );
        assert_eq!(order_list(3, 1, true, FinalSigma::Zero), [1, 1, 1]);
    }
}
