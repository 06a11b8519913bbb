//! Noise schedulers matching diffusers: DDIM, Euler, Euler ancestral and DPM-Solver++ 2M.
//!
//! Tables (timesteps, sigmas) are computed on the host exactly as diffusers does (see
//! `schedule`); the per-step update runs on the sample's device.
//!
//! ```no_run
//! # fn run() -> Result<(), ipcompose_schedulers::SchedulerError> {
//! use ipcompose_schedulers::{build_scheduler, SchedulerConfig, SchedulerKind};
//! let config = SchedulerConfig::from_file("scheduler/scheduler_config.json".as_ref())?
//!     .with_override("karras", serde_json::Value::Bool(true))?;
//! let scheduler = build_scheduler(SchedulerKind::DpmPp2m, &config, 25)?;
//! assert_eq!(scheduler.timesteps().len(), 25);
//! # Ok(()) }
//! ```

mod config;
mod ddim;
mod dpm;
mod error;
mod euler;
mod euler_ancestral;
mod noise;
mod ops;
mod schedule;

use std::fmt;
use std::str::FromStr;

use candle_core::{Device, Tensor};

pub use config::SchedulerConfig;
pub use error::SchedulerError;
pub use noise::{GaussianNoise, ReplayNoise};

/// The sampler families implemented here, named as on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `DDIMScheduler`.
    Ddim,
    /// `EulerDiscreteScheduler`.
    Euler,
    /// `EulerAncestralDiscreteScheduler`.
    EulerAncestral,
    /// `DPMSolverMultistepScheduler` (dpmsolver++, second order).
    DpmPp2m,
}

impl SchedulerKind {
    /// The canonical command-line names.
    pub const NAMES: &'static [&'static str] = &["ddim", "euler", "euler-a", "dpmpp-2m"];

    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::DpmPp2m => "dpmpp-2m",
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = SchedulerError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name.trim().to_ascii_lowercase().as_str() {
            "ddim" => Ok(Self::Ddim),
            "euler" => Ok(Self::Euler),
            "euler-a" | "euler_a" | "euler-ancestral" => Ok(Self::EulerAncestral),
            "dpmpp-2m" | "dpm++2m" | "dpmpp_2m" => Ok(Self::DpmPp2m),
            _ => Err(SchedulerError::UnknownKind {
                name: name.to_owned(),
                valid:
                    "ddim, euler, euler-a (euler_a, euler-ancestral), dpmpp-2m (dpm++2m, dpmpp_2m)"
                        .to_owned(),
            }),
        }
    }
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The added noise ε.
    Epsilon,
    /// v = α·ε − σ·x₀ (Salimans & Ho); SD 2.x 768 models.
    VPrediction,
}

/// Fresh standard-normal noise for stochastic steps.
pub trait NoiseSource {
    fn sample(&mut self, shape: &[usize], device: &Device) -> candle_core::Result<Tensor>;
}

/// One configured sampling schedule. Step `i` feeds `timesteps()[i]` to the UNet.
pub trait Scheduler: Send {
    /// The timestep the UNet gets at each step (fractional for Euler with Karras sigmas).
    fn timesteps(&self) -> &[f64];

    /// Multiply the initial N(0, 1) latents (user-supplied ones too) by this.
    fn init_noise_sigma(&self) -> f64;

    /// The UNet input for step `step_index`.
    fn scale_model_input(
        &self,
        sample: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, SchedulerError>;

    /// Advances `sample` by one step given the model output at `step_index`.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, SchedulerError>;

    /// The sigma at each step plus the final one, for sigma-based schedulers.
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }
}

/// Builds `kind` from `config` (class defaults for absent keys) for `num_inference_steps` steps.
pub fn build_scheduler(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    num_inference_steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    config.check_for(kind)?;
    let common = config.common_settings(kind, num_inference_steps)?;
    Ok(match kind {
        SchedulerKind::Ddim => Box::new(ddim::DdimScheduler::new(
            config,
            common,
            num_inference_steps,
        )?),
        SchedulerKind::Euler => Box::new(euler::EulerScheduler::new(
            config,
            common,
            num_inference_steps,
        )?),
        SchedulerKind::EulerAncestral => Box::new(euler_ancestral::EulerAncestralScheduler::new(
            common,
            num_inference_steps,
        )),
        SchedulerKind::DpmPp2m => Box::new(dpm::DpmSolverScheduler::new(
            config,
            common,
            num_inference_steps,
        )?),
    })
}

fn check_step_index(step_index: usize, len: usize) -> Result<(), SchedulerError> {
    if step_index < len {
        Ok(())
    } else {
        Err(SchedulerError::StepIndexOutOfRange {
            index: step_index,
            len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_round_trip_and_aliases_parse() {
        for name in SchedulerKind::NAMES {
            let kind: SchedulerKind = name.parse().expect("canonical name");
            assert_eq!(kind.name(), *name);
        }
        assert_eq!(
            "euler_a".parse::<SchedulerKind>().ok(),
            Some(SchedulerKind::EulerAncestral)
        );
        assert_eq!(
            "DPM++2M".parse::<SchedulerKind>().ok(),
            Some(SchedulerKind::DpmPp2m)
        );
        let error = "lms".parse::<SchedulerKind>().expect_err("unknown");
        assert!(error.to_string().contains("dpmpp-2m"), "{error}");
    }
}
