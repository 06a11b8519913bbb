//! `LMSDiscreteScheduler`: the linear multistep method of order 4 over the Euler sigmas
//! (reference-addons.md VI). The derivative `d_k = (x − x₀)/σ_k` of the last (up to) four
//! steps is combined with coefficients `c_j = ∫_{σ_k}^{σ_{k+1}} ℓ_j(τ) dτ`, ℓ_j the Lagrange
//! basis polynomial over σ_k, σ_{k−1}, …. diffusers integrates with `scipy.integrate.quad`; the
//! integrand is a polynomial of degree ≤ 3, integrated here exactly from its coefficients.

use std::collections::VecDeque;

use candle_core::Tensor;

use crate::config::{CommonSettings, SchedulerConfig};
use crate::error::SchedulerError;
use crate::euler::{euler_sigma_schedule, predicted_original, scale_by_sigma, FinalSigma};
use crate::ops::{add, divide, scale, sub};
use crate::{
    check_step_index, check_step_order, NoiseSource, PredictionType, Scheduler, SchedulerKind,
};

const KIND: SchedulerKind = SchedulerKind::Lms;

/// diffusers' default `order` argument of `step`.
const ORDER: usize = 4;

pub(crate) struct LmsScheduler {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    sigmas_wide: Vec<f64>,
    init_noise_sigma: f32,
    prediction: PredictionType,
    /// The latest derivative first.
    derivatives: VecDeque<Tensor>,
    last_step: Option<usize>,
}

/// `∫_from^to Π_{m ≠ j} (τ − nodes[m]) / (nodes[j] − nodes[m]) dτ`, exactly: the product is
/// expanded into monomial coefficients (float64) and its antiderivative evaluated at both ends.
pub(crate) fn lagrange_basis_integral(nodes: &[f64], j: usize, from: f64, to: f64) -> f64 {
    // coefficients[i] multiplies τ^i.
    let mut coefficients = vec![1.0f64];
    for (m, &node) in nodes.iter().enumerate() {
        if m == j {
            continue;
        }
        let denominator = nodes[j] - node;
        let mut next = vec![0.0; coefficients.len() + 1];
        for (power, &coefficient) in coefficients.iter().enumerate() {
            next[power + 1] += coefficient / denominator;
            next[power] -= coefficient * node / denominator;
        }
        coefficients = next;
    }
    let antiderivative = |tau: f64| -> f64 {
        // Horner on Σ c_i τ^{i+1}/(i+1).
        coefficients
            .iter()
            .enumerate()
            .rev()
            .fold(0.0, |total, (power, &coefficient)| {
                total * tau + coefficient / (power + 1) as f64
            })
            * tau
    };
    antiderivative(to) - antiderivative(from)
}

impl LmsScheduler {
    pub(crate) fn new(
        config: &SchedulerConfig,
        common: CommonSettings,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
        // Karras from the interpolated sigmas' own ends; the final sigma is always 0.
        let karras = config
            .bool(KIND, "use_karras_sigmas")?
            .then(Default::default);
        let schedule = euler_sigma_schedule(&common, num_inference_steps, karras, FinalSigma::Zero);
        Ok(Self {
            timesteps: schedule.timesteps,
            sigmas_wide: schedule.sigmas.iter().copied().map(f64::from).collect(),
            sigmas: schedule.sigmas,
            init_noise_sigma: schedule.init_noise_sigma,
            prediction: common.prediction,
            derivatives: VecDeque::with_capacity(ORDER),
            last_step: None,
        })
    }

    /// The coefficients of `d_k, d_{k−1}, …` at step `k` (order `min(k + 1, 4)`), rounded to
    /// float32 as torch rounds a Python float multiplying a float32 tensor.
    fn coefficients(&self, step_index: usize, order: usize) -> Vec<f32> {
        let nodes: Vec<f64> = (0..order)
            .map(|back| f64::from(self.sigmas[step_index - back]))
            .collect();
        let from = f64::from(self.sigmas[step_index]);
        let to = f64::from(self.sigmas[step_index + 1]);
        (0..order)
            .map(|j| lagrange_basis_integral(&nodes, j, from, to) as f32)
            .collect()
    }
}

impl Scheduler for LmsScheduler {
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
        if check_step_order(KIND, self.last_step, step_index)? {
            self.derivatives.clear();
        }
        let sigma = self.sigmas[step_index];
        let original = predicted_original(self.prediction, model_output, sample, sigma)?;
        let derivative = divide(&sub(sample, &original)?, sigma)?;
        self.derivatives.push_front(derivative);
        self.derivatives.truncate(ORDER);
        // diffusers takes min(step_index + 1, 4); a run started mid-schedule has fewer
        // derivatives, so the order is also capped by the history kept.
        let order = (step_index + 1).min(ORDER).min(self.derivatives.len());
        let coefficients = self.coefficients(step_index, order);
        // `sample + sum(c_j·d_{k−j})`, the sum accumulated from d_k on.
        let mut total: Option<Tensor> = None;
        for (coefficient, derivative) in coefficients.iter().zip(&self.derivatives) {
            let term = scale(derivative, *coefficient)?;
            total = Some(match total {
                None => term,
                Some(total) => add(&total, &term)?,
            });
        }
        let previous = match total {
            Some(total) => add(sample, &total)?,
            None => sample.clone(),
        };
        self.last_step = Some(step_index);
        Ok(previous)
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas_wide)
    }
}

#[cfg(test)]
mod tests {
    use super::lagrange_basis_integral;

    #[test]
    fn basis_integrals_are_exact_for_polynomials() {
        // The basis over n nodes reproduces polynomials of degree < n: Σ_j c_j·p(node_j) = ∫p.
        let nodes = [14.6, 9.8, 4.1, 1.3];
        let (from, to) = (1.3, 0.6);
        let p = |x: f64| 2.0 * x * x * x - x * x + 0.5 * x - 3.0;
        let exact = |x: f64| 0.5 * x.powi(4) - x.powi(3) / 3.0 + 0.25 * x * x - 3.0 * x;
        let combined: f64 = (0..4)
            .map(|j| lagrange_basis_integral(&nodes, j, from, to) * p(nodes[j]))
            .sum();
        let expected = exact(to) - exact(from);
        assert!(
            (combined - expected).abs() < 1e-10 * expected.abs(),
            "{combined} vs {expected}"
        );
        // One node: the constant 1, so the integral is the interval length.
        assert!((lagrange_basis_integral(&[5.0], 0, 5.0, 2.0) + 3.0).abs() < 1e-15);
    }
}
