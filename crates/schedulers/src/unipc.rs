//! `UniPCMultistepScheduler` (Zhao et al. 2023) with the data prediction (`predict_x0`),
//! B(h) = e^{−h} − 1 (`bh2`, default) or −h (`bh1`), orders 1 to 3 (reference-addons.md VI).
//!
//! Each step first corrects the previous step's result with the new model output (UniC, no
//! extra model call), then predicts the next sample (UniP).

use std::collections::VecDeque;

use candle_core::{DType, Tensor};

use crate::config::{CommonSettings, SchedulerConfig};
use crate::dpm::{alpha_sigma, data_prediction, lambda_of};
use crate::error::SchedulerError;
use crate::euler::FinalSigma;
use crate::ops::{add, scale, sub};
use crate::schedule::{dpm_timesteps, karras_sigmas, numpy_interp_on_indices, sigma_to_t};
use crate::{
    check_step_index, check_step_order, NoiseSource, PredictionType, Scheduler, SchedulerKind,
};

const KIND: SchedulerKind = SchedulerKind::UniPc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BFunction {
    /// B(h) = h (of −h here, the data-prediction sign).
    Bh1,
    /// B(h) = e^h − 1.
    Bh2,
}

pub(crate) struct UniPcScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    sigmas_wide: Vec<f64>,
    prediction: PredictionType,
    solver_order: usize,
    lower_order_final: bool,
    b_function: BFunction,
    /// x₀ of the latest steps, the newest first (at most `solver_order`).
    history: VecDeque<Tensor>,
    /// The sample the last predictor started from, and that predictor's order.
    last_prediction: Option<(Tensor, usize)>,
    last_step: Option<usize>,
}

/// The float32 quantities of one UniP/UniC update from σ_s0 to σ_t.
struct Update {
    alpha_t: f32,
    sigma_ratio: f32,
    /// h·φ₁(h) = e^{hh} − 1 with hh = −h.
    h_phi_1: f32,
    b_h: f32,
    /// Row i − 1 of R (`rks^(i−1)`) and entry of b, for i = 1..=order.
    r_rows: Vec<Vec<f32>>,
    b: Vec<f32>,
}

impl UniPcScheduler {
    pub(crate) fn new(
        config: &SchedulerConfig,
        common: CommonSettings,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
        let mut integer_timesteps = dpm_timesteps(
            common.spacing,
            common.num_train_timesteps,
            common.num_train_timesteps,
            num_inference_steps,
            common.steps_offset,
        );
        let table = common.schedule.sigmas();
        let final_sigma = FinalSigma::read(config, KIND)?;
        let sigmas: Vec<f64> = if config.bool(KIND, "use_karras_sigmas")? {
            // Over the whole training range unless sigma_min / sigma_max are set; the final
            // sigma for `sigma_min` is the last Karras sigma here (not the training minimum).
            let sigma_min = config
                .optional_float(KIND, "sigma_min")?
                .unwrap_or(f64::from(table[0]));
            let sigma_max = config
                .optional_float(KIND, "sigma_max")?
                .unwrap_or(f64::from(table[table.len() - 1]));
            let mut karras = karras_sigmas(sigma_min, sigma_max, num_inference_steps);
            let log_sigmas = common.schedule.log_sigmas();
            integer_timesteps = karras
                .iter()
                .map(|&sigma| sigma_to_t(sigma, &log_sigmas).round_ties_even() as i64)
                .collect();
            let last = match final_sigma {
                FinalSigma::Zero => 0.0,
                FinalSigma::TrainingMinimum => karras[karras.len() - 1],
            };
            karras.push(last);
            karras
        } else {
            let mut sigmas: Vec<f64> = integer_timesteps
                .iter()
                .map(|&timestep| numpy_interp_on_indices(timestep as f64, &table))
                .collect();
            sigmas.push(final_sigma.value(&common.schedule.alphas_cumprod));
            sigmas
        };
        let sigmas: Vec<f32> = sigmas.into_iter().map(|sigma| sigma as f32).collect();
        let b_function = match config.solver_type(KIND, &["bh2", "bh1"])? {
            "bh1" => BFunction::Bh1,
            _ => BFunction::Bh2,
        };
        if b_function == BFunction::Bh1 && final_sigma == FinalSigma::Zero {
            // B(h) = −h is −∞ at σ = 0, and diffusers' last step multiplies it by 0: NaN.
            return Err(SchedulerError::Unsupported {
                kind: KIND,
                key: "solver_type".to_owned(),
                value: "\"bh1\" with final_sigmas_type \"zero\" (diffusers returns NaN)".to_owned(),
                supported: "bh2, or bh1 with final_sigmas_type \"sigma_min\"".to_owned(),
            });
        }
        Ok(Self {
            timesteps: integer_timesteps.iter().map(|&t| t as f64).collect(),
            sigmas_wide: sigmas.iter().copied().map(f64::from).collect(),
            sigmas,
            prediction: common.prediction,
            solver_order: config.solver_order(KIND, 3)?,
            lower_order_final: config.bool(KIND, "lower_order_final")?,
            b_function,
            history: VecDeque::new(),
            last_prediction: None,
            last_step: None,
        })
    }

    /// The scalars of an update from `sigmas[from]` to `sigmas[to]` of order `order`, whose
    /// earlier points are `sigmas[from − 1]`, `sigmas[from − 2]`, … (diffusers' `rks`).
    fn update(&self, from: usize, to: usize, order: usize) -> Update {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[to]);
        let (_, sigma_s0) = alpha_sigma(self.sigmas[from]);
        let lambda_t = lambda_of(self.sigmas[to]);
        let lambda_s0 = lambda_of(self.sigmas[from]);
        let h = lambda_t - lambda_s0;
        let mut rks: Vec<f32> = (1..order)
            .map(|i| (lambda_of(self.sigmas[from - i]) - lambda_s0) / h)
            .collect();
        rks.push(1.0);
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0f32;
        let b_h = match self.b_function {
            BFunction::Bh1 => hh,
            BFunction::Bh2 => hh.exp_m1(),
        };
        let mut r_rows = Vec::with_capacity(order);
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            r_rows.push(rks.iter().map(|rk| rk.powi(i as i32 - 1)).collect());
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f32;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        Update {
            alpha_t,
            sigma_ratio: sigma_t / sigma_s0,
            h_phi_1,
            b_h,
            r_rows,
            b,
        }
    }

    /// `D1_i = (m_{−i} − m_0)/r_i` for the history entries behind `m0`.
    fn differences(
        &self,
        update: &Update,
        order: usize,
        history: &VecDeque<Tensor>,
    ) -> Result<Vec<Tensor>, SchedulerError> {
        let m0 = &history[0];
        (1..order)
            .map(|i| {
                let rk = update.r_rows[1][i - 1];
                Ok(crate::ops::divide(&sub(&history[i], m0)?, rk)?)
            })
            .collect()
    }

    /// `x_t_ = (σ_t/σ_s0)·x − α_t·hφ₁·m0`.
    fn base(update: &Update, sample: &Tensor, m0: &Tensor) -> Result<Tensor, SchedulerError> {
        Ok(sub(
            &scale(sample, update.sigma_ratio)?,
            &scale(m0, update.alpha_t * update.h_phi_1)?,
        )?)
    }
}

/// Σ_k ρ_k·D_k in order.
fn weighted_sum(rhos: &[f32], differences: &[Tensor]) -> Result<Option<Tensor>, SchedulerError> {
    let mut total: Option<Tensor> = None;
    for (rho, difference) in rhos.iter().zip(differences) {
        let term = scale(difference, *rho)?;
        total = Some(match total {
            None => term,
            Some(total) => add(&total, &term)?,
        });
    }
    Ok(total)
}

/// Solves `a·x = b` (row-major, n ≤ 3) by LU with partial pivoting in float32, as LAPACK's
/// `sgesv` behind `torch.linalg.solve` (multipliers by the pivot's reciprocal).
fn solve(mut a: Vec<Vec<f32>>, mut b: Vec<f32>) -> Vec<f32> {
    let n = b.len();
    for column in 0..n {
        let pivot = (column..n).fold(column, |best, row| {
            if a[row][column].abs() > a[best][column].abs() {
                row
            } else {
                best
            }
        });
        a.swap(column, pivot);
        b.swap(column, pivot);
        let reciprocal = 1.0 / a[column][column];
        let (upper, lower) = a.split_at_mut(column + 1);
        let pivot_row = &upper[column];
        for (offset, row) in lower.iter_mut().enumerate() {
            let multiplier = row[column] * reciprocal;
            row[column] = multiplier;
            for (value, pivot_value) in row.iter_mut().zip(pivot_row).skip(column + 1) {
                *value -= multiplier * pivot_value;
            }
            b[column + 1 + offset] -= multiplier * b[column];
        }
    }
    let mut x = vec![0.0f32; n];
    for row in (0..n).rev() {
        let mut total = b[row];
        for k in row + 1..n {
            total -= a[row][k] * x[k];
        }
        x[row] = total / a[row][row];
    }
    x
}

impl Scheduler for UniPcScheduler {
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
        if check_step_order(KIND, self.last_step, step_index)? {
            self.history.clear();
            self.last_prediction = None;
        }
        let sample = sample.to_dtype(DType::F32)?;
        let denoised = data_prediction(
            self.prediction,
            model_output,
            &sample,
            self.sigmas[step_index],
        )?;

        // UniC: redo the previous update with the new x₀ (the history still ends before it).
        let sample = match self.last_prediction.take() {
            Some((last_sample, order)) if step_index > 0 => {
                let update = self.update(step_index - 1, step_index, order);
                let differences = self.differences(&update, order, &self.history)?;
                let rhos = if order == 1 {
                    vec![0.5]
                } else {
                    solve(update.r_rows.clone(), update.b.clone())
                };
                let base = Self::base(&update, &last_sample, &self.history[0])?;
                let correction = weighted_sum(&rhos[..order - 1], &differences)?;
                let newest = scale(&sub(&denoised, &self.history[0])?, rhos[order - 1])?;
                let correction = match correction {
                    Some(correction) => add(&correction, &newest)?,
                    None => newest,
                };
                sub(&base, &scale(&correction, update.alpha_t * update.b_h)?)?
            }
            _ => sample,
        };

        self.history.push_front(denoised);
        self.history.truncate(self.solver_order);
        let order = if self.lower_order_final {
            self.solver_order.min(step_count - step_index)
        } else {
            self.solver_order
        };
        // Warm-up: no more points than the steps taken.
        let order = order.min(self.history.len());

        // UniP.
        let update = self.update(step_index, step_index + 1, order);
        let differences = self.differences(&update, order, &self.history)?;
        let base = Self::base(&update, &sample, &self.history[0])?;
        let previous = if differences.is_empty() {
            base
        } else {
            let rhos = if order == 2 {
                vec![0.5]
            } else {
                let rows: Vec<Vec<f32>> = update.r_rows[..order - 1]
                    .iter()
                    .map(|row| row[..order - 1].to_vec())
                    .collect();
                solve(rows, update.b[..order - 1].to_vec())
            };
            let prediction = weighted_sum(&rhos, &differences)?.expect("at least one difference");
            sub(&base, &scale(&prediction, update.alpha_t * update.b_h)?)?
        };
        self.last_prediction = Some((sample, order));
        self.last_step = Some(step_index);
        Ok(previous.to_dtype(model_output.dtype())?)
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas_wide)
    }
}

#[cfg(test)]
mod tests {
    use super::solve;

    #[test]
    fn small_systems_solve() {
        let x = solve(vec![vec![1.0, 1.0], vec![-2.0, 1.0]], vec![3.0, 0.0]);
        assert!(
            (x[0] - 1.0).abs() < 1e-6 && (x[1] - 2.0).abs() < 1e-6,
            "{x:?}"
        );
        let x = solve(
            vec![
                vec![1.0, 1.0, 1.0],
                vec![-0.5, -1.5, 1.0],
                vec![0.25, 2.25, 1.0],
            ],
            vec![3.0, 0.0, 5.5],
        );
        let residual = [
            x[0] + x[1] + x[2] - 3.0,
            -0.5 * x[0] - 1.5 * x[1] + x[2],
            0.25 * x[0] + 2.25 * x[1] + x[2] - 5.5,
        ];
        assert!(residual.iter().all(|r| r.abs() < 1e-5), "{residual:?}");
    }
}
