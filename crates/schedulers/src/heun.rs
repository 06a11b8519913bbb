//! `HeunDiscreteScheduler` (Karras et al. 2022, algorithm 1 with s_churn = 0), reference-addons.md
//! VI: the Euler sigmas with every one but the first repeated, so a step takes two model
//! evaluations (an Euler step to σ_{k+1}, then the trapezoidal correction from the model at
//! σ_{k+1}); the last step, to σ = 0, is the Euler half alone. `2N − 1` evaluations for N steps.

use candle_core::Tensor;

use crate::config::{CommonSettings, SchedulerConfig};
use crate::error::SchedulerError;
use crate::euler::{euler_sigma_schedule, predicted_original, scale_by_sigma, FinalSigma};
use crate::ops::{divide, scale, sub};
use crate::{
    check_step_index, check_step_order, NoiseSource, PredictionType, Scheduler, SchedulerKind,
};

const KIND: SchedulerKind = SchedulerKind::Heun;

/// What the first (Euler) half of a step leaves for the second.
struct FirstHalf {
    derivative: Tensor,
    dt: f32,
    sample: Tensor,
}

pub(crate) struct HeunScheduler {
    /// `t_0, t_1, t_1, t_2, t_2, …, t_{N−1}, t_{N−1}`.
    timesteps: Vec<f64>,
    /// `σ_0, σ_1, σ_1, …, σ_{N−1}, σ_{N−1}, 0`, float32 like diffusers'.
    sigmas: Vec<f32>,
    sigmas_wide: Vec<f64>,
    init_noise_sigma: f32,
    prediction: PredictionType,
    clip_range: Option<f32>,
    pending: Option<FirstHalf>,
    last_call: Option<usize>,
}

/// `[x_0, x_1, x_1, x_2, x_2, …]`: every element but the first twice (torch's
/// `cat([x[:1], x[1:].repeat_interleave(2)])`).
fn repeat_all_but_first<T: Copy>(values: &[T]) -> Vec<T> {
    let mut repeated = Vec::with_capacity(values.len() * 2);
    if let Some((first, rest)) = values.split_first() {
        repeated.push(*first);
        for value in rest {
            repeated.extend([*value, *value]);
        }
    }
    repeated
}

impl HeunScheduler {
    pub(crate) fn new(
        config: &SchedulerConfig,
        common: CommonSettings,
        num_inference_steps: usize,
    ) -> Result<Self, SchedulerError> {
        // Karras from the interpolated sigmas' own ends (the class has no sigma_min/max) and
        // always a zero final sigma.
        let karras = config
            .bool(KIND, "use_karras_sigmas")?
            .then(Default::default);
        let schedule = euler_sigma_schedule(&common, num_inference_steps, karras, FinalSigma::Zero);
        let clip_range = if config.bool(KIND, "clip_sample")? {
            Some(config.float(KIND, "clip_sample_range")? as f32)
        } else {
            None
        };
        // The last sigma (0) is not repeated: σ_0, then σ_1 … σ_{N−1} twice, then 0.
        let (last_sigma, inner) = schedule
            .sigmas
            .split_last()
            .expect("a schedule has at least one step");
        let mut sigmas = repeat_all_but_first(inner);
        sigmas.push(*last_sigma);
        Ok(Self {
            timesteps: repeat_all_but_first(&schedule.timesteps),
            sigmas_wide: sigmas.iter().copied().map(f64::from).collect(),
            sigmas,
            init_noise_sigma: schedule.init_noise_sigma,
            prediction: common.prediction,
            clip_range,
            pending: None,
            last_call: None,
        })
    }
}

impl Scheduler for HeunScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn inference_step(&self, index: usize) -> usize {
        // Evaluation 0 is step 0's Euler half, 1 its correction, 2 step 1's Euler half, …
        index / 2
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
        if check_step_order(KIND, self.last_call, step_index)? {
            self.pending = None;
        }
        // Evaluations alternate Euler half / correction, starting with an Euler half.
        let correction = step_index % 2 == 1;
        if correction != self.pending.is_some() {
            return Err(SchedulerError::StepOutOfOrder {
                kind: KIND,
                expected: step_index.saturating_sub(1),
                got: step_index,
            });
        }
        let clip = |original: Tensor| -> Result<Tensor, SchedulerError> {
            Ok(match self.clip_range {
                Some(range) => original.clamp(-range, range)?,
                None => original,
            })
        };
        let previous = match self.pending.take() {
            None => {
                let sigma = self.sigmas[step_index];
                let sigma_next = self.sigmas[step_index + 1];
                let original = clip(predicted_original(
                    self.prediction,
                    model_output,
                    sample,
                    sigma,
                )?)?;
                let derivative = divide(&sub(sample, &original)?, sigma)?;
                let dt = sigma_next - sigma;
                let previous = sample.add(&scale(&derivative, dt)?)?;
                self.pending = Some(FirstHalf {
                    derivative,
                    dt,
                    sample: sample.clone(),
                });
                previous
            }
            Some(first) => {
                let sigma_next = self.sigmas[step_index];
                let original = clip(predicted_original(
                    self.prediction,
                    model_output,
                    sample,
                    sigma_next,
                )?)?;
                let derivative = divide(&sub(sample, &original)?, sigma_next)?;
                // (d + d') / 2, a true division like torch's.
                let derivative = divide(&first.derivative.add(&derivative)?, 2.0)?;
                first.sample.add(&scale(&derivative, first.dt)?)?
            }
        };
        self.last_call = Some(step_index);
        Ok(previous)
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas_wide)
    }
}

#[cfg(test)]
mod tests {
    use super::repeat_all_but_first;

    #[test]
    fn repeats_follow_torch() {
        assert_eq!(repeat_all_but_first(&[3, 2, 1]), [3, 2, 2, 1, 1]);
        assert_eq!(repeat_all_but_first(&[7]), [7]);
    }
}
