//! The training noise schedule and the inference timestep/sigma tables.
//!
//! diffusers mixes torch float32 (betas, `alphas_cumprod`, the sigma table) with numpy
//! float64 (timestep spacings, `np.interp`, Karras). Each helper says which one it mirrors and
//! reproduces that library's arithmetic order so the tables match to the last bit where the
//! underlying libm does.

use crate::error::SchedulerError;

/// How the betas of the training schedule are given.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum BetaSchedule {
    Linear {
        start: f64,
        end: f64,
    },
    /// Linear in sqrt(beta), the Stable Diffusion schedule.
    ScaledLinear {
        start: f64,
        end: f64,
    },
    Trained(Vec<f64>),
}

/// `timestep_spacing`, "Common Diffusion Noise Schedules and Sample Steps are Flawed", table 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

impl TimestepSpacing {
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        match name {
            "leading" => Some(Self::Leading),
            "trailing" => Some(Self::Trailing),
            "linspace" => Some(Self::Linspace),
            _ => None,
        }
    }
}

/// The discrete training schedule every scheduler class builds in its constructor.
#[derive(Debug, Clone)]
pub(crate) struct TrainingSchedule {
    /// `torch.cumprod(1 - betas)`, float32.
    pub alphas_cumprod: Vec<f32>,
}

impl TrainingSchedule {
    pub(crate) fn new(
        betas: &BetaSchedule,
        num_train_timesteps: usize,
    ) -> Result<Self, SchedulerError> {
        if num_train_timesteps < 2 {
            return Err(SchedulerError::InvalidSchedule {
                reason: format!(
                    "num_train_timesteps must be at least 2, got {num_train_timesteps}"
                ),
            });
        }
        let betas = betas_f32(betas, num_train_timesteps)?;
        let alphas: Vec<f32> = betas.iter().map(|beta| 1.0 - beta).collect();
        Ok(Self {
            alphas_cumprod: torch_cumprod_f32(&alphas),
        })
    }

    /// `((1 - ᾱ) / ᾱ) ** 0.5` in float32, ascending in t.
    pub(crate) fn sigmas(&self) -> Vec<f32> {
        self.alphas_cumprod
            .iter()
            .map(|&alpha| sigma_from_alpha_cumprod(alpha))
            .collect()
    }

    /// `np.log` of the float32 sigma table (numpy keeps float32).
    pub(crate) fn log_sigmas(&self) -> Vec<f32> {
        // Rounding the float64 logarithm gives the correctly rounded float32 value.
        self.sigmas()
            .iter()
            .map(|&sigma| (f64::from(sigma)).ln() as f32)
            .collect()
    }
}

pub(crate) fn sigma_from_alpha_cumprod(alpha_cumprod: f32) -> f32 {
    ((1.0 - alpha_cumprod) / alpha_cumprod).sqrt()
}

fn betas_f32(schedule: &BetaSchedule, count: usize) -> Result<Vec<f32>, SchedulerError> {
    match schedule {
        BetaSchedule::Linear { start, end } => Ok(torch_linspace_f32(*start, *end, count)),
        BetaSchedule::ScaledLinear { start, end } => {
            // Python computes `beta_start**0.5` in float64, torch squares in float32.
            let roots = torch_linspace_f32(start.powf(0.5), end.powf(0.5), count);
            Ok(roots.iter().map(|root| root * root).collect())
        }
        BetaSchedule::Trained(betas) => {
            if betas.len() != count {
                return Err(SchedulerError::InvalidSchedule {
                    reason: format!(
                        "trained_betas has {} entries but num_train_timesteps is {count}",
                        betas.len()
                    ),
                });
            }
            Ok(betas.iter().map(|&beta| beta as f32).collect())
        }
    }
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` as computed on CPU: a float32
/// step, the first half counted up from `start`, the second half back from `end`. torch's
/// kernel is compiled with floating-point contraction, so `start + step·i` is one fused
/// multiply-add; with it the SD1.5 `alphas_cumprod` match torch bit for bit (checked against
/// the fixture), without it 121 of the 1000 values differ in the last bit.
pub(crate) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let start = start as f32;
    let end = end as f32;
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|index| {
            if index < halfway {
                step.mul_add(index as f32, start)
            } else {
                (-step).mul_add((steps - index - 1) as f32, end)
            }
        })
        .collect()
}

/// `torch.cumprod` of a float32 tensor on CPU: the running product is kept in double
/// (`acc_type<float>`) and each output rounded to float32.
pub(crate) fn torch_cumprod_f32(values: &[f32]) -> Vec<f32> {
    let mut running = 1.0f64;
    values
        .iter()
        .map(|&value| {
            running *= f64::from(value);
            running as f32
        })
        .collect()
}

/// `np.linspace(start, stop, num)` in float64: `i·step + start`, last element exactly `stop`.
pub(crate) fn numpy_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut values: Vec<f64> = (0..num).map(|index| index as f64 * step + start).collect();
    values[num - 1] = stop;
    values
}

/// `np.arange(start, stop, step)` for floats: length `ceil((stop - start) / step)`, element
/// `i ≥ 2` is `start + i·((start + step) - start)`. The length can exceed the intended step count
/// by one for some step counts (e.g. 61 with trailing spacing), which diffusers inherits.
pub(crate) fn numpy_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let length = ((stop - start) / step).ceil();
    // Also catches NaN (a zero step).
    if length.is_nan() || length <= 0.0 {
        return Vec::new();
    }
    let length = length as usize;
    let second = start + step;
    let delta = second - start;
    (0..length)
        .map(|index| match index {
            0 => start,
            1 => second,
            _ => start + index as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, arange(len(table)), table)`; `table` is float32, promoted to float64 as numpy does.
pub(crate) fn numpy_interp_on_indices(x: f64, table: &[f32]) -> f64 {
    let last = table.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x < 0.0 {
        return f64::from(table[0]);
    }
    if x >= last as f64 {
        return f64::from(table[last]);
    }
    let lower = x.floor() as usize;
    let lower_value = f64::from(table[lower]);
    if lower as f64 == x {
        return lower_value;
    }
    let slope = f64::from(table[lower + 1]) - lower_value;
    slope * (x - lower as f64) + lower_value
}

/// Karras et al. (2022) sigmas, ρ = 7, from `sigma_max` down to `sigma_min`, float64.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, count: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / RHO);
    let max_inv_rho = sigma_max.powf(1.0 / RHO);
    numpy_linspace(0.0, 1.0, count)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(RHO))
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose sigma is `sigma`, by
/// linear interpolation in log σ between neighbouring training indices. `log_sigmas` is the
/// float32 table; mixed float32/float64 arithmetic follows numpy's promotion.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // numpy: cumsum(dists >= 0).argmax() is the last index whose log σ does not exceed
    // log_sigma, or 0 if there is none; then clipped so a neighbour above exists.
    let last_not_above = log_sigmas
        .iter()
        .rposition(|&entry| log_sigma - f64::from(entry) >= 0.0)
        .unwrap_or(0);
    let low_index = last_not_above.min(log_sigmas.len() - 2);
    let high_index = low_index + 1;
    let low = log_sigmas[low_index];
    let high = log_sigmas[high_index];
    // `low - high` is a float32 subtraction in numpy (both operands float32 scalars).
    let weight = ((f64::from(low) - log_sigma) / f64::from(low - high)).clamp(0.0, 1.0);
    (1.0 - weight) * low_index as f64 + weight * high_index as f64
}

/// The timesteps DDIM and Euler produce (before their own dtype casts), float64.
pub(crate) fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: i64,
) -> Vec<f64> {
    let train = num_train_timesteps as f64;
    match spacing {
        TimestepSpacing::Linspace => {
            let mut values = numpy_linspace(0.0, train - 1.0, num_inference_steps);
            values.reverse();
            values
        }
        TimestepSpacing::Leading => {
            let ratio = num_train_timesteps / num_inference_steps;
            (0..num_inference_steps)
                .rev()
                .map(|index| (index * ratio) as f64 + steps_offset as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = train / num_inference_steps as f64;
            numpy_arange(train, 0.0, -ratio)
                .into_iter()
                .map(|value| value.round_ties_even() - 1.0)
                .collect()
        }
    }
}

/// DPM-Solver's integer timesteps: its linspace and leading spacings split the range into
/// `N + 1` parts and drop the last point.
pub(crate) fn dpm_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    last_timestep: usize,
    num_inference_steps: usize,
    steps_offset: i64,
) -> Vec<i64> {
    match spacing {
        TimestepSpacing::Linspace => {
            let mut values =
                numpy_linspace(0.0, last_timestep as f64 - 1.0, num_inference_steps + 1);
            values.reverse();
            values.pop();
            values
                .into_iter()
                .map(|value| value.round_ties_even() as i64)
                .collect()
        }
        TimestepSpacing::Leading => {
            let ratio = last_timestep / (num_inference_steps + 1);
            (1..=num_inference_steps)
                .rev()
                .map(|index| (index * ratio) as i64 + steps_offset)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train_timesteps as f64 / num_inference_steps as f64;
            numpy_arange(last_timestep as f64, 0.0, -ratio)
                .into_iter()
                .map(|value| value.round_ties_even() as i64 - 1)
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd_schedule() -> TrainingSchedule {
        TrainingSchedule::new(
            &BetaSchedule::ScaledLinear {
                start: 0.00085,
                end: 0.012,
            },
            1000,
        )
        .expect("schedule")
    }

    fn assert_close(actual: f64, expected: f64, relative: f64) {
        assert!(
            (actual - expected).abs() <= relative * expected.abs().max(1e-12),
            "{actual} vs {expected}"
        );
    }

    #[test]
    fn sd_training_schedule_matches_reference_values() {
        // [checked] values of reference-formats.md F.2.
        let schedule = sd_schedule();
        assert_close(f64::from(schedule.alphas_cumprod[999]), 0.0046601, 1e-4);
        assert_close(f64::from(schedule.alphas_cumprod[0]), 0.99915, 1e-5);
        let sigmas = schedule.sigmas();
        assert_close(f64::from(sigmas[999]), 14.6146, 1e-5);
        assert_close(f64::from(sigmas[0]), 0.029168, 1e-4);
    }

    #[test]
    fn alphas_cumprod_match_torch_bit_for_bit() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/reference/schedulers.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|error| {
            panic!(
                "fixture {} is missing ({error}); run make_fixtures.py",
                path.display()
            )
        });
        let reference: serde_json::Value =
            serde_json::from_str(&text).expect("schedulers.json is JSON");
        let expected: Vec<f32> = reference["alphas_cumprod"]
            .as_array()
            .expect("alphas_cumprod list")
            .iter()
            .map(|value| value.as_f64().expect("number") as f32)
            .collect();
        let actual = sd_schedule().alphas_cumprod;
        assert_eq!(actual.len(), expected.len());
        let mismatches: Vec<usize> = (0..actual.len())
            .filter(|&index| actual[index] != expected[index])
            .collect();
        assert!(
            mismatches.is_empty(),
            "{} of 1000 differ, first at {:?}",
            mismatches.len(),
            mismatches.first()
        );
    }

    #[test]
    fn torch_linspace_hits_both_ends() {
        let values = torch_linspace_f32(0.00085f64.sqrt(), 0.012f64.sqrt(), 1000);
        assert_eq!(values[0], 0.00085f64.sqrt() as f32);
        assert_eq!(values[999], 0.012f64.sqrt() as f32);
        assert!(values.windows(2).all(|pair| pair[0] < pair[1]));
    }

    #[test]
    fn arange_length_follows_numpy() {
        assert_eq!(numpy_arange(1000.0, 0.0, -1000.0 / 30.0).len(), 30);
        // numpy's ceil((stop - start) / step) gives one extra element here.
        assert_eq!(numpy_arange(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
    }

    #[test]
    fn spacings_match_reference_examples() {
        let leading = spaced_timesteps(TimestepSpacing::Leading, 1000, 50, 1);
        assert_eq!(leading.first(), Some(&981.0));
        assert_eq!(leading.get(1), Some(&961.0));
        assert_eq!(leading.last(), Some(&1.0));
        let trailing = spaced_timesteps(TimestepSpacing::Trailing, 1000, 30, 0);
        assert_eq!(&trailing[..3], &[999.0, 966.0, 932.0]);
        assert_eq!(trailing.last(), Some(&32.0));
    }

    #[test]
    fn sigma_to_t_inverts_the_table() {
        let schedule = sd_schedule();
        let log_sigmas = schedule.log_sigmas();
        let sigmas = schedule.sigmas();
        for index in [0usize, 1, 250, 998, 999] {
            let t = sigma_to_t(f64::from(sigmas[index]), &log_sigmas);
            assert!((t - index as f64).abs() < 1e-3, "t({index}) = {t}");
        }
        assert_eq!(sigma_to_t(0.0, &log_sigmas), 0.0);
    }
}
