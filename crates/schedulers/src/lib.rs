//! Noise schedulers matching diffusers: DDIM, DDPM, Euler, Euler ancestral, Heun, LMS,
//! DPM-Solver++ 2M (and its SDE variant), DPM-Solver++ singlestep, UniPC and LCM.
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
mod ddpm;
mod dpm;
mod dpm_singlestep;
mod error;
mod euler;
mod euler_ancestral;
mod heun;
mod lcm;
mod lms;
mod noise;
mod ops;
mod schedule;
mod unipc;

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
    /// `DPMSolverMultistepScheduler` with `algorithm_type = "sde-dpmsolver++"` (stochastic).
    DpmPp2mSde,
    /// `DPMSolverSinglestepScheduler` (dpmsolver++, second order): diffusers' closest match to
    /// A1111's "DPM++ 2S a", which diffusers does not have.
    DpmPp2s,
    /// `UniPCMultistepScheduler` (bh2 predictor-corrector).
    UniPc,
    /// `HeunDiscreteScheduler`: two model evaluations per step.
    Heun,
    /// `LMSDiscreteScheduler` (linear multistep, order 4).
    Lms,
    /// `DDPMScheduler` (ancestral, stochastic).
    Ddpm,
    /// `LCMScheduler`, for latent consistency models and LCM-LoRAs.
    Lcm,
}

/// Canonical name (as [`SchedulerKind::name`]) and accepted aliases of each kind.
const KIND_NAMES: &[(SchedulerKind, &str, &[&str])] = &[
    (SchedulerKind::Ddim, "ddim", &[]),
    (SchedulerKind::Euler, "euler", &[]),
    (
        SchedulerKind::EulerAncestral,
        "euler-a",
        &["euler_a", "euler-ancestral"],
    ),
    (SchedulerKind::DpmPp2m, "dpmpp-2m", &["dpm++2m", "dpmpp_2m"]),
    (
        SchedulerKind::DpmPp2mSde,
        "dpmpp-2m-sde",
        &["dpm++2m-sde", "dpmpp_2m_sde"],
    ),
    (
        SchedulerKind::DpmPp2s,
        "dpmpp-2s",
        &[
            "dpmpp-2s-a",
            "dpm++2s",
            "dpm++2s-a",
            "dpmpp_2s",
            "dpmpp_2s_a",
        ],
    ),
    (SchedulerKind::UniPc, "unipc", &["uni-pc", "uni_pc"]),
    (SchedulerKind::Heun, "heun", &[]),
    (SchedulerKind::Lms, "lms", &[]),
    (SchedulerKind::Ddpm, "ddpm", &[]),
    (SchedulerKind::Lcm, "lcm", &[]),
];

impl SchedulerKind {
    /// The canonical command-line names.
    pub const NAMES: &'static [&'static str] = &[
        "ddim",
        "euler",
        "euler-a",
        "dpmpp-2m",
        "dpmpp-2m-sde",
        "dpmpp-2s",
        "unipc",
        "heun",
        "lms",
        "ddpm",
        "lcm",
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::DpmPp2m => "dpmpp-2m",
            Self::DpmPp2mSde => "dpmpp-2m-sde",
            Self::DpmPp2s => "dpmpp-2s",
            Self::UniPc => "unipc",
            Self::Heun => "heun",
            Self::Lms => "lms",
            Self::Ddpm => "ddpm",
            Self::Lcm => "lcm",
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
        let wanted = name.trim().to_ascii_lowercase();
        KIND_NAMES
            .iter()
            .find(|(_, canonical, aliases)| {
                *canonical == wanted || aliases.contains(&wanted.as_str())
            })
            .map(|(kind, _, _)| *kind)
            .ok_or_else(|| SchedulerError::UnknownKind {
                name: name.to_owned(),
                valid: KIND_NAMES
                    .iter()
                    .map(|(_, canonical, aliases)| {
                        if aliases.is_empty() {
                            (*canonical).to_owned()
                        } else {
                            format!("{canonical} ({})", aliases.join(", "))
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            })
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

/// One configured sampling schedule. Step `i` feeds `timesteps()[i]` to the UNet: one model
/// evaluation per entry, as diffusers' denoising loop does. A scheduler that evaluates the
/// model twice per step (Heun) lists the timesteps of both evaluations, so `timesteps()` can
/// be longer than the number of inference steps.
pub trait Scheduler: Send {
    /// The timestep the UNet gets at each model evaluation (fractional for Euler with Karras
    /// sigmas).
    fn timesteps(&self) -> &[f64];

    /// The inference step (`0..num_inference_steps`) that model evaluation `index` belongs to,
    /// for per-step settings such as condition strengths. The identity except for schedulers
    /// with several evaluations per step.
    fn inference_step(&self, index: usize) -> usize {
        index
    }

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
        SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mSde => Box::new(
            dpm::DpmSolverScheduler::new(kind, config, common, num_inference_steps)?,
        ),
        SchedulerKind::DpmPp2s => Box::new(dpm_singlestep::DpmSinglestepScheduler::new(
            config,
            common,
            num_inference_steps,
        )?),
        SchedulerKind::UniPc => Box::new(unipc::UniPcScheduler::new(
            config,
            common,
            num_inference_steps,
        )?),
        SchedulerKind::Heun => Box::new(heun::HeunScheduler::new(
            config,
            common,
            num_inference_steps,
        )?),
        SchedulerKind::Lms => {
            Box::new(lms::LmsScheduler::new(config, common, num_inference_steps)?)
        }
        SchedulerKind::Ddpm => Box::new(ddpm::DdpmScheduler::new(
            config,
            common,
            num_inference_steps,
        )?),
        SchedulerKind::Lcm => {
            Box::new(lcm::LcmScheduler::new(config, common, num_inference_steps)?)
        }
    })
}

/// Refuses a step that does not follow the previous one, for schedulers that keep history
/// between steps; `last` is the previous step taken, if any. Returns whether this step starts
/// a new run (step 0, or a first step elsewhere, which starts mid-schedule without history).
fn check_step_order(
    kind: SchedulerKind,
    last: Option<usize>,
    step_index: usize,
) -> Result<bool, SchedulerError> {
    match last {
        _ if step_index == 0 => Ok(true),
        None => Ok(true),
        Some(last) if step_index == last + 1 => Ok(false),
        Some(last) => Err(SchedulerError::StepOutOfOrder {
            kind,
            expected: last + 1,
            got: step_index,
        }),
    }
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
        assert_eq!(
            "DPMPP-2S-A".parse::<SchedulerKind>().ok(),
            Some(SchedulerKind::DpmPp2s)
        );
        let error = "lmss".parse::<SchedulerKind>().expect_err("unknown");
        let message = error.to_string();
        for name in SchedulerKind::NAMES {
            assert!(message.contains(name), "{message}");
        }
    }
}
