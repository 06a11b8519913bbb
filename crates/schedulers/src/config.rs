//! `scheduler_config.json` plus user overrides, resolved the way diffusers' `from_config` does.
//!
//! The raw key/values are kept as read. A scheduler class only looks at the keys its
//! constructor accepts; a key absent from the map takes that class's own default, which is why
//! the same SD1.5 file gives DDIM `leading` spacing but Euler/DPM `linspace`
//! (reference-formats.md F.1 and pitfall H.4).

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::SchedulerError;
use crate::schedule::{BetaSchedule, TimestepSpacing, TrainingSchedule};
use crate::{PredictionType, SchedulerKind};

use SchedulerKind::{
    Ddim, Ddpm, DpmPp2m, DpmPp2mSde, DpmPp2s, Euler, EulerAncestral, Heun, Lcm, Lms, UniPc,
};

const ALL_KINDS: &[SchedulerKind] = &[
    Ddim,
    Euler,
    EulerAncestral,
    DpmPp2m,
    DpmPp2mSde,
    DpmPp2s,
    UniPc,
    Heun,
    Lms,
    Ddpm,
    Lcm,
];
/// The classes with `timestep_spacing` and `steps_offset` (not DPM singlestep, whose spacing
/// is fixed, nor LCM, whose schedule comes from `original_inference_steps`).
const SPACED_KINDS: &[SchedulerKind] = &[
    Ddim,
    Euler,
    EulerAncestral,
    DpmPp2m,
    DpmPp2mSde,
    UniPc,
    Heun,
    Lms,
    Ddpm,
];
/// The classes with `use_karras_sigmas` (and the exponential / beta sigma options).
const KARRAS_KINDS: &[SchedulerKind] = &[Euler, DpmPp2m, DpmPp2mSde, DpmPp2s, UniPc, Heun, Lms];
const DPM_MULTISTEP: &[SchedulerKind] = &[DpmPp2m, DpmPp2mSde];
const DPM_KINDS: &[SchedulerKind] = &[DpmPp2m, DpmPp2mSde, DpmPp2s];
const DPM_AND_UNIPC: &[SchedulerKind] = &[DpmPp2m, DpmPp2mSde, DpmPp2s, UniPc];
const CLIPPING_KINDS: &[SchedulerKind] = &[Ddim, Heun, Ddpm, Lcm];

/// The shape a setting's value must have.
#[derive(Debug, Clone, Copy)]
enum ValueShape {
    Integer,
    Float,
    /// A float or `null` (diffusers `Optional[float]`).
    OptionalFloat,
    Bool,
    /// One of the listed strings.
    Choice(&'static [&'static str]),
    /// An integer from the listed values.
    IntegerChoice(&'static [i64]),
    /// A list of floats or `null` (`trained_betas`).
    OptionalFloatList,
}

impl ValueShape {
    fn describe(self) -> String {
        match self {
            ValueShape::Integer => "an integer".to_owned(),
            ValueShape::Float => "a number".to_owned(),
            ValueShape::OptionalFloat => "a number or null".to_owned(),
            ValueShape::Bool => "true or false".to_owned(),
            ValueShape::Choice(choices) => format!("one of {}", choices.join(", ")),
            ValueShape::IntegerChoice(choices) => {
                let names: Vec<String> = choices.iter().map(i64::to_string).collect();
                format!("one of {}", names.join(", "))
            }
            ValueShape::OptionalFloatList => "a list of numbers or null".to_owned(),
        }
    }
}

/// A setting this crate implements, with the scheduler classes whose constructor accepts it.
struct SettingSpec {
    key: &'static str,
    shape: ValueShape,
    used_by: &'static [SchedulerKind],
}

const SPACINGS: &[&str] = &["leading", "trailing", "linspace"];

/// Every setting that may be overridden. `eta` is not a diffusers config key (it is a
/// `DDIMScheduler.step` argument) but is accepted here so a recipe can carry it.
const SETTINGS: &[SettingSpec] = &[
    SettingSpec {
        key: "num_train_timesteps",
        shape: ValueShape::Integer,
        used_by: ALL_KINDS,
    },
    SettingSpec {
        key: "beta_start",
        shape: ValueShape::Float,
        used_by: ALL_KINDS,
    },
    SettingSpec {
        key: "beta_end",
        shape: ValueShape::Float,
        used_by: ALL_KINDS,
    },
    SettingSpec {
        key: "beta_schedule",
        shape: ValueShape::Choice(&["linear", "scaled_linear"]),
        used_by: ALL_KINDS,
    },
    SettingSpec {
        key: "trained_betas",
        shape: ValueShape::OptionalFloatList,
        used_by: ALL_KINDS,
    },
    SettingSpec {
        key: "prediction_type",
        shape: ValueShape::Choice(&["epsilon", "v_prediction"]),
        used_by: ALL_KINDS,
    },
    SettingSpec {
        key: "timestep_spacing",
        shape: ValueShape::Choice(SPACINGS),
        used_by: SPACED_KINDS,
    },
    SettingSpec {
        key: "steps_offset",
        shape: ValueShape::Integer,
        used_by: SPACED_KINDS,
    },
    SettingSpec {
        key: "clip_sample",
        shape: ValueShape::Bool,
        used_by: CLIPPING_KINDS,
    },
    SettingSpec {
        key: "clip_sample_range",
        shape: ValueShape::Float,
        used_by: CLIPPING_KINDS,
    },
    SettingSpec {
        key: "set_alpha_to_one",
        shape: ValueShape::Bool,
        used_by: &[Ddim, Lcm],
    },
    SettingSpec {
        key: "eta",
        shape: ValueShape::Float,
        used_by: &[Ddim],
    },
    SettingSpec {
        key: "use_karras_sigmas",
        shape: ValueShape::Bool,
        used_by: KARRAS_KINDS,
    },
    SettingSpec {
        key: "sigma_min",
        shape: ValueShape::OptionalFloat,
        used_by: &[Euler, UniPc],
    },
    SettingSpec {
        key: "sigma_max",
        shape: ValueShape::OptionalFloat,
        used_by: &[Euler, UniPc],
    },
    SettingSpec {
        key: "final_sigmas_type",
        shape: ValueShape::Choice(&["zero", "sigma_min"]),
        used_by: &[Euler, DpmPp2m, DpmPp2mSde, DpmPp2s, UniPc],
    },
    SettingSpec {
        key: "solver_order",
        shape: ValueShape::IntegerChoice(&[1, 2, 3]),
        used_by: DPM_AND_UNIPC,
    },
    SettingSpec {
        // DPM-Solver takes midpoint | heun, UniPC bh1 | bh2; each class maps the other
        // family's names (and logrho) to its default, as diffusers' constructors do.
        key: "solver_type",
        shape: ValueShape::Choice(&["midpoint", "heun", "bh1", "bh2", "logrho"]),
        used_by: DPM_AND_UNIPC,
    },
    SettingSpec {
        key: "lower_order_final",
        shape: ValueShape::Bool,
        used_by: DPM_AND_UNIPC,
    },
    SettingSpec {
        key: "euler_at_final",
        shape: ValueShape::Bool,
        used_by: DPM_MULTISTEP,
    },
    SettingSpec {
        key: "lambda_min_clipped",
        shape: ValueShape::Float,
        used_by: DPM_KINDS,
    },
    SettingSpec {
        // dpmpp-2m and dpmpp-2m-sde fix it by their name; the singlestep class takes either.
        key: "algorithm_type",
        shape: ValueShape::Choice(&["dpmsolver++", "sde-dpmsolver++"]),
        used_by: &[DpmPp2s],
    },
    SettingSpec {
        key: "variance_type",
        shape: ValueShape::Choice(&["fixed_small", "fixed_small_log", "fixed_large"]),
        used_by: &[Ddpm],
    },
    SettingSpec {
        key: "original_inference_steps",
        shape: ValueShape::Integer,
        used_by: &[Lcm],
    },
    SettingSpec {
        key: "timestep_scaling",
        shape: ValueShape::Float,
        used_by: &[Lcm],
    },
];

/// Short names accepted by `with_override`, mapped to the diffusers key.
const ALIASES: &[(&str, &str)] = &[
    ("karras", "use_karras_sigmas"),
    ("spacing", "timestep_spacing"),
];

/// The values of a guarded setting this crate implements.
#[derive(Debug, Clone, Copy)]
enum OnlySupported {
    False,
    True,
    Text(&'static str),
    Null,
    EmptyList,
    /// Anything but the listed strings (which the class treats specially).
    NoneOf(&'static [&'static str]),
}

impl OnlySupported {
    fn accepts(self, value: &Value) -> bool {
        match self {
            Self::False => read_bool(value) == Some(false),
            Self::True => read_bool(value) == Some(true),
            Self::Text(expected) => value.as_str() == Some(expected),
            Self::Null => value.is_null(),
            Self::EmptyList => value.is_null() || value.as_array().is_some_and(Vec::is_empty),
            Self::NoneOf(refused) => !value.as_str().is_some_and(|text| refused.contains(&text)),
        }
    }

    fn describe(self) -> String {
        match self {
            Self::False => "false".to_owned(),
            Self::True => "true".to_owned(),
            Self::Text(expected) => format!("\"{expected}\""),
            Self::Null => "null".to_owned(),
            Self::EmptyList => "[]".to_owned(),
            Self::NoneOf(refused) => format!("anything but {}", refused.join(", ")),
        }
    }
}

/// Keys the diffusers classes accept whose non-default values this crate does not implement.
/// A config that sets one of them otherwise is refused instead of being sampled wrongly.
struct GuardedSetting {
    key: &'static str,
    only_supported: OnlySupported,
    used_by: &'static [SchedulerKind],
}

const GUARDED: &[GuardedSetting] = &[
    GuardedSetting {
        key: "rescale_betas_zero_snr",
        only_supported: OnlySupported::False,
        used_by: &[
            Ddim,
            Euler,
            EulerAncestral,
            DpmPp2m,
            DpmPp2mSde,
            UniPc,
            Ddpm,
            Lcm,
        ],
    },
    GuardedSetting {
        key: "thresholding",
        only_supported: OnlySupported::False,
        used_by: &[Ddim, DpmPp2m, DpmPp2mSde, DpmPp2s, UniPc, Ddpm, Lcm],
    },
    GuardedSetting {
        key: "use_exponential_sigmas",
        only_supported: OnlySupported::False,
        used_by: KARRAS_KINDS,
    },
    GuardedSetting {
        key: "use_beta_sigmas",
        only_supported: OnlySupported::False,
        used_by: KARRAS_KINDS,
    },
    GuardedSetting {
        key: "use_lu_lambdas",
        only_supported: OnlySupported::False,
        used_by: DPM_MULTISTEP,
    },
    GuardedSetting {
        key: "use_flow_sigmas",
        only_supported: OnlySupported::False,
        used_by: DPM_AND_UNIPC,
    },
    GuardedSetting {
        key: "use_dynamic_shifting",
        only_supported: OnlySupported::False,
        used_by: DPM_AND_UNIPC,
    },
    GuardedSetting {
        key: "interpolation_type",
        only_supported: OnlySupported::Text("linear"),
        used_by: &[Euler],
    },
    GuardedSetting {
        key: "timestep_type",
        only_supported: OnlySupported::Text("discrete"),
        used_by: &[Euler],
    },
    GuardedSetting {
        key: "algorithm_type",
        only_supported: OnlySupported::Text("dpmsolver++"),
        used_by: &[DpmPp2m],
    },
    GuardedSetting {
        // "learned" variances need a UNet with twice the output channels.
        key: "variance_type",
        only_supported: OnlySupported::NoneOf(&["learned", "learned_range"]),
        used_by: DPM_KINDS,
    },
    GuardedSetting {
        key: "predict_x0",
        only_supported: OnlySupported::True,
        used_by: &[UniPc],
    },
    GuardedSetting {
        key: "disable_corrector",
        only_supported: OnlySupported::EmptyList,
        used_by: &[UniPc],
    },
    GuardedSetting {
        key: "solver_p",
        only_supported: OnlySupported::Null,
        used_by: &[UniPc],
    },
];

/// The default of `key` in the constructor of `kind`'s diffusers class.
fn class_default(kind: SchedulerKind, key: &str) -> Value {
    match (key, kind) {
        ("num_train_timesteps", _) => Value::from(1000),
        // Heun and LCM default to the Stable Diffusion betas.
        ("beta_start", Heun | Lcm) => Value::from(0.00085),
        ("beta_start", _) => Value::from(0.0001),
        ("beta_end", Heun | Lcm) => Value::from(0.012),
        ("beta_end", _) => Value::from(0.02),
        ("beta_schedule", Lcm) => Value::from("scaled_linear"),
        ("beta_schedule", _) => Value::from("linear"),
        ("prediction_type", _) => Value::from("epsilon"),
        ("timestep_spacing", Ddim | Ddpm | Lcm) => Value::from("leading"),
        ("timestep_spacing", _) => Value::from("linspace"),
        ("steps_offset", _) => Value::from(0),
        // DDIM's and DDPM's class default is `true`; the SD files set it to false (pitfall H.4).
        ("clip_sample", Heun | Lcm) => Value::Bool(false),
        ("clip_sample", _) => Value::Bool(true),
        ("clip_sample_range", _) => Value::from(1.0),
        ("set_alpha_to_one", _) => Value::Bool(true),
        ("eta", _) => Value::from(0.0),
        ("use_karras_sigmas", _) => Value::Bool(false),
        ("final_sigmas_type", _) => Value::from("zero"),
        ("solver_order", _) => Value::from(2),
        ("solver_type", UniPc) => Value::from("bh2"),
        ("solver_type", _) => Value::from("midpoint"),
        ("lower_order_final", DpmPp2s) => Value::Bool(false),
        ("lower_order_final", _) => Value::Bool(true),
        ("euler_at_final", _) => Value::Bool(false),
        // JSON has no infinities; the float reader accepts this spelling.
        ("lambda_min_clipped", _) => Value::from("-Infinity"),
        ("algorithm_type", _) => Value::from("dpmsolver++"),
        ("variance_type", Ddpm) => Value::from("fixed_small"),
        ("original_inference_steps", _) => Value::from(50),
        ("timestep_scaling", _) => Value::from(10.0),
        // trained_betas, sigma_min, sigma_max default to None.
        _ => Value::Null,
    }
}

/// What every scheduler class reads from its config.
#[derive(Debug, Clone)]
pub(crate) struct CommonSettings {
    pub schedule: TrainingSchedule,
    pub num_train_timesteps: usize,
    pub prediction: PredictionType,
    pub spacing: TimestepSpacing,
    pub steps_offset: i64,
}

/// `scheduler_config.json` as read, plus overrides.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    values: Map<String, Value>,
    /// Keys set through `with_override`; building a scheduler that ignores one is an error,
    /// because the user asked for an effect that would silently not happen.
    overridden: BTreeSet<String>,
    /// Where the values came from, for error messages.
    origin: String,
}

impl Default for SchedulerConfig {
    /// An empty config: every class default applies.
    fn default() -> Self {
        Self {
            values: Map::new(),
            overridden: BTreeSet::new(),
            origin: "<empty config>".to_owned(),
        }
    }
}

impl SchedulerConfig {
    /// Reads a diffusers `scheduler_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, SchedulerError> {
        let text = std::fs::read_to_string(path).map_err(|source| SchedulerError::ConfigRead {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path.display().to_string())
    }

    /// Parses the text of a `scheduler_config.json`.
    pub fn from_json_str(text: &str) -> Result<Self, SchedulerError> {
        Self::parse(text, "<inline JSON>".to_owned())
    }

    fn parse(text: &str, origin: String) -> Result<Self, SchedulerError> {
        // Python's json module writes -Infinity/NaN (e.g. DPM's `lambda_min_clipped`), which
        // serde_json rejects; they are turned into strings the float reader understands.
        let text = quote_non_finite_literals(text);
        let parsed: Value =
            serde_json::from_str(&text).map_err(|source| SchedulerError::ConfigParse {
                origin: origin.clone(),
                source,
            })?;
        match parsed {
            Value::Object(values) => Ok(Self {
                values,
                overridden: BTreeSet::new(),
                origin,
            }),
            _ => Err(SchedulerError::ConfigNotObject { origin }),
        }
    }

    /// Sets `key` (a diffusers key, or the aliases `karras`, `spacing`; `eta` for DDIM).
    /// The value is checked now so a bad recipe fails before any model is loaded.
    pub fn with_override(mut self, key: &str, value: Value) -> Result<Self, SchedulerError> {
        let canonical = ALIASES
            .iter()
            .find(|(alias, _)| *alias == key)
            .map_or(key, |(_, canonical)| *canonical);
        let spec = find_setting(canonical).ok_or_else(|| SchedulerError::UnknownKey {
            key: key.to_owned(),
            accepted: accepted_override_keys(),
        })?;
        validate(spec, &value, "override")?;
        self.values.insert(canonical.to_owned(), value);
        self.overridden.insert(canonical.to_owned());
        Ok(self)
    }

    /// The prediction type the model was trained with, as `kind` would read it.
    pub fn prediction_type(&self, kind: SchedulerKind) -> Result<PredictionType, SchedulerError> {
        match self.choice(kind, "prediction_type")?.as_str() {
            "v_prediction" => Ok(PredictionType::VPrediction),
            _ => Ok(PredictionType::Epsilon),
        }
    }

    /// The settings every class shares, with the training schedule built from them.
    pub(crate) fn common_settings(
        &self,
        kind: SchedulerKind,
        num_inference_steps: usize,
    ) -> Result<CommonSettings, SchedulerError> {
        let num_train_timesteps = self.integer(kind, "num_train_timesteps")?;
        let num_train_timesteps =
            usize::try_from(num_train_timesteps).map_err(|_| SchedulerError::InvalidSchedule {
                reason: format!("num_train_timesteps must be positive, got {num_train_timesteps}"),
            })?;
        if num_inference_steps == 0 || num_inference_steps > num_train_timesteps {
            return Err(SchedulerError::InvalidStepCount {
                steps: num_inference_steps,
                max: num_train_timesteps,
            });
        }
        let betas = match self.optional_float_list(kind, "trained_betas")? {
            Some(betas) => BetaSchedule::Trained(betas),
            None => {
                let start = self.float(kind, "beta_start")?;
                let end = self.float(kind, "beta_end")?;
                match self.choice(kind, "beta_schedule")?.as_str() {
                    "scaled_linear" => BetaSchedule::ScaledLinear { start, end },
                    _ => BetaSchedule::Linear { start, end },
                }
            }
        };
        // Classes without the setting get a placeholder they never read.
        let spacing_name = if uses(kind, "timestep_spacing") {
            self.choice(kind, "timestep_spacing")?
        } else {
            "linspace".to_owned()
        };
        let spacing = TimestepSpacing::from_name(&spacing_name).ok_or_else(|| {
            SchedulerError::Unsupported {
                kind,
                key: "timestep_spacing".to_owned(),
                value: spacing_name.clone(),
                supported: SPACINGS.join(", "),
            }
        })?;
        let steps_offset = if uses(kind, "steps_offset") {
            self.integer(kind, "steps_offset")?
        } else {
            0
        };
        Ok(CommonSettings {
            schedule: TrainingSchedule::new(&betas, num_train_timesteps)?,
            num_train_timesteps,
            prediction: self.prediction_type(kind)?,
            spacing,
            steps_offset,
        })
    }

    /// Refuses overrides `kind` does not use and file values this crate cannot honour.
    pub(crate) fn check_for(&self, kind: SchedulerKind) -> Result<(), SchedulerError> {
        for key in &self.overridden {
            if let Some(spec) = find_setting(key) {
                if !spec.used_by.contains(&kind) {
                    let applies_to: Vec<String> =
                        spec.used_by.iter().map(ToString::to_string).collect();
                    return Err(SchedulerError::OverrideNotApplicable {
                        key: key.clone(),
                        kind,
                        applies_to: applies_to.join(", "),
                    });
                }
            }
        }
        for guarded in GUARDED
            .iter()
            .filter(|guarded| guarded.used_by.contains(&kind))
        {
            if let Some(value) = self.values.get(guarded.key) {
                if !guarded.only_supported.accepts(value) {
                    return Err(SchedulerError::Unsupported {
                        kind,
                        key: guarded.key.to_owned(),
                        value: value.to_string(),
                        supported: guarded.only_supported.describe(),
                    });
                }
            }
        }
        for spec in SETTINGS.iter().filter(|spec| spec.used_by.contains(&kind)) {
            if let Some(value) = self.values.get(spec.key) {
                validate(spec, value, &self.origin)?;
            }
        }
        Ok(())
    }

    /// `solver_order` for a class implemented up to order `max`.
    pub(crate) fn solver_order(
        &self,
        kind: SchedulerKind,
        max: usize,
    ) -> Result<usize, SchedulerError> {
        let order = self.integer(kind, "solver_order")?;
        match usize::try_from(order) {
            Ok(order) if (1..=max).contains(&order) => Ok(order),
            _ => Err(SchedulerError::Unsupported {
                kind,
                key: "solver_order".to_owned(),
                value: order.to_string(),
                supported: (1..=max)
                    .map(|order| order.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// `solver_type` as `kind`'s class resolves it. A file value outside `native` becomes
    /// `native[0]` (the class default), as diffusers' constructor re-registers it (a UniPC
    /// config read by DPM-Solver gives midpoint, and the other way round bh2); an override
    /// must be one of `native`.
    pub(crate) fn solver_type(
        &self,
        kind: SchedulerKind,
        native: &[&'static str],
    ) -> Result<&'static str, SchedulerError> {
        let value = self.choice(kind, "solver_type")?;
        if let Some(found) = native.iter().find(|name| **name == value) {
            return Ok(found);
        }
        if self.is_overridden("solver_type") {
            return Err(SchedulerError::Unsupported {
                kind,
                key: "solver_type".to_owned(),
                value: format!("\"{value}\""),
                supported: native.join(", "),
            });
        }
        Ok(native[0])
    }

    /// Whether `key` was set through [`SchedulerConfig::with_override`].
    pub(crate) fn is_overridden(&self, key: &str) -> bool {
        self.overridden.contains(key)
    }

    /// The value `kind` sees for `key`: the config's, or the class default.
    fn resolved(&self, kind: SchedulerKind, key: &str) -> Value {
        match self.values.get(key) {
            // diffusers passes an explicit null through, which for the keys below means
            // "use the default behaviour", same as absent.
            Some(Value::Null) | None => class_default(kind, key),
            Some(value) => value.clone(),
        }
    }

    pub(crate) fn integer(&self, kind: SchedulerKind, key: &str) -> Result<i64, SchedulerError> {
        let value = self.resolved(kind, key);
        read_integer(&value).ok_or_else(|| self.invalid(key, &value, ValueShape::Integer))
    }

    pub(crate) fn float(&self, kind: SchedulerKind, key: &str) -> Result<f64, SchedulerError> {
        let value = self.resolved(kind, key);
        read_float(&value).ok_or_else(|| self.invalid(key, &value, ValueShape::Float))
    }

    pub(crate) fn optional_float(
        &self,
        kind: SchedulerKind,
        key: &str,
    ) -> Result<Option<f64>, SchedulerError> {
        match self.resolved(kind, key) {
            Value::Null => Ok(None),
            value => read_float(&value)
                .map(Some)
                .ok_or_else(|| self.invalid(key, &value, ValueShape::OptionalFloat)),
        }
    }

    pub(crate) fn bool(&self, kind: SchedulerKind, key: &str) -> Result<bool, SchedulerError> {
        let value = self.resolved(kind, key);
        read_bool(&value).ok_or_else(|| self.invalid(key, &value, ValueShape::Bool))
    }

    /// A string setting, checked against the choices this crate implements.
    pub(crate) fn choice(&self, kind: SchedulerKind, key: &str) -> Result<String, SchedulerError> {
        let value = self.resolved(kind, key);
        let spec = find_setting(key);
        let text = value.as_str().map(str::to_owned);
        match (text, spec.map(|spec| spec.shape)) {
            (Some(text), Some(ValueShape::Choice(choices))) if choices.contains(&text.as_str()) => {
                Ok(text)
            }
            (Some(text), Some(ValueShape::Choice(choices))) => Err(SchedulerError::Unsupported {
                kind,
                key: key.to_owned(),
                value: format!("\"{text}\""),
                supported: choices.join(", "),
            }),
            (Some(text), _) => Ok(text),
            (None, Some(shape)) => Err(self.invalid(key, &value, shape)),
            (None, None) => Err(SchedulerError::InvalidValue {
                origin: self.origin.clone(),
                key: key.to_owned(),
                value: value.to_string(),
                expected: "a string".to_owned(),
            }),
        }
    }

    pub(crate) fn optional_float_list(
        &self,
        kind: SchedulerKind,
        key: &str,
    ) -> Result<Option<Vec<f64>>, SchedulerError> {
        match self.resolved(kind, key) {
            Value::Null => Ok(None),
            value => read_float_list(&value)
                .map(Some)
                .ok_or_else(|| self.invalid(key, &value, ValueShape::OptionalFloatList)),
        }
    }

    fn invalid(&self, key: &str, value: &Value, shape: ValueShape) -> SchedulerError {
        SchedulerError::InvalidValue {
            origin: self.origin.clone(),
            key: key.to_owned(),
            value: value.to_string(),
            expected: shape.describe(),
        }
    }
}

/// Whether `kind`'s class reads `key`.
fn uses(kind: SchedulerKind, key: &str) -> bool {
    find_setting(key).is_some_and(|spec| spec.used_by.contains(&kind))
}

fn find_setting(key: &str) -> Option<&'static SettingSpec> {
    SETTINGS.iter().find(|spec| spec.key == key)
}

fn accepted_override_keys() -> String {
    let mut keys: Vec<String> = SETTINGS.iter().map(|spec| spec.key.to_owned()).collect();
    keys.extend(
        ALIASES
            .iter()
            .map(|(alias, canonical)| format!("{alias} (= {canonical})")),
    );
    keys.join(", ")
}

fn validate(spec: &SettingSpec, value: &Value, origin: &str) -> Result<(), SchedulerError> {
    let valid = match spec.shape {
        ValueShape::Integer => read_integer(value).is_some(),
        ValueShape::Float => read_float(value).is_some(),
        ValueShape::OptionalFloat => value.is_null() || read_float(value).is_some(),
        ValueShape::Bool => read_bool(value).is_some(),
        ValueShape::Choice(choices) => value.as_str().is_some_and(|text| choices.contains(&text)),
        ValueShape::IntegerChoice(choices) => {
            read_integer(value).is_some_and(|number| choices.contains(&number))
        }
        ValueShape::OptionalFloatList => value.is_null() || read_float_list(value).is_some(),
    };
    if valid {
        Ok(())
    } else {
        Err(SchedulerError::InvalidValue {
            origin: origin.to_owned(),
            key: spec.key.to_owned(),
            value: value.to_string(),
            expected: spec.shape.describe(),
        })
    }
}

/// Overrides often come from a command line as strings, so numeric and boolean strings are read too.
fn read_float(value: &Value) -> Option<f64> {
    match value {
        Value::Number(number) => number.as_f64(),
        Value::String(text) => match text.trim() {
            "-Infinity" | "-inf" => Some(f64::NEG_INFINITY),
            "Infinity" | "inf" => Some(f64::INFINITY),
            other => other.parse().ok().filter(|number: &f64| number.is_finite()),
        },
        _ => None,
    }
}

fn read_integer(value: &Value) -> Option<i64> {
    match value {
        Value::Number(number) => number.as_i64().or_else(|| {
            number
                .as_f64()
                .filter(|float| float.fract() == 0.0)
                .map(|float| float as i64)
        }),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

fn read_bool(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(flag) => Some(*flag),
        Value::String(text) => match text.trim().to_ascii_lowercase().as_str() {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

fn read_float_list(value: &Value) -> Option<Vec<f64>> {
    value.as_array()?.iter().map(read_float).collect()
}

/// Replaces the bare `NaN`, `Infinity` and `-Infinity` that Python's json module emits (outside
/// strings) by quoted strings, leaving everything else untouched.
fn quote_non_finite_literals(text: &str) -> String {
    const LITERALS: &[&str] = &["-Infinity", "Infinity", "NaN"];
    let mut output = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(character) = rest.chars().next() {
        if in_string {
            output.push(character);
            if escaped {
                escaped = false;
            } else if character == '\\' {
                escaped = true;
            } else if character == '"' {
                in_string = false;
            }
            rest = &rest[character.len_utf8()..];
            continue;
        }
        if character == '"' {
            in_string = true;
        } else if let Some(literal) = LITERALS.iter().find(|literal| rest.starts_with(**literal)) {
            output.push('"');
            output.push_str(literal);
            output.push('"');
            rest = &rest[literal.len()..];
            continue;
        }
        output.push(character);
        rest = &rest[character.len_utf8()..];
    }
    output
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD15: &str = r#"{
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
        "steps_offset": 1, "trained_betas": null, "clip_sample": false
    }"#;

    #[test]
    fn absent_keys_take_the_class_default() {
        let config = SchedulerConfig::from_json_str(SD15).expect("valid config");
        assert_eq!(
            config.choice(Ddim, "timestep_spacing").expect("spacing"),
            "leading"
        );
        assert_eq!(
            config.choice(Euler, "timestep_spacing").expect("spacing"),
            "linspace"
        );
        assert_eq!(
            config.choice(DpmPp2m, "timestep_spacing").expect("spacing"),
            "linspace"
        );
        assert!(!config.bool(Ddim, "clip_sample").expect("clip"));
        let bare = SchedulerConfig::from_json_str("{}").expect("valid config");
        assert!(bare.bool(Ddim, "clip_sample").expect("clip"));
        assert_eq!(
            config.prediction_type(Euler).expect("prediction"),
            PredictionType::Epsilon
        );
    }

    #[test]
    fn overrides_accept_aliases_and_reject_unknown_keys() {
        let config = SchedulerConfig::from_json_str(SD15)
            .and_then(|config| config.with_override("karras", Value::Bool(true)))
            .and_then(|config| config.with_override("spacing", Value::from("trailing")))
            .expect("valid overrides");
        assert!(config.bool(Euler, "use_karras_sigmas").expect("karras"));
        assert_eq!(
            config.choice(Euler, "timestep_spacing").expect("spacing"),
            "trailing"
        );

        let error = SchedulerConfig::default()
            .with_override("karas", Value::Bool(true))
            .expect_err("unknown key");
        let message = error.to_string();
        assert!(
            message.contains("use_karras_sigmas") && message.contains("karras (="),
            "{message}"
        );

        let error = SchedulerConfig::default()
            .with_override("timestep_spacing", Value::from("sideways"))
            .expect_err("bad value");
        assert!(error.to_string().contains("leading"), "{error}");
    }

    #[test]
    fn override_for_another_scheduler_is_refused() {
        let config = SchedulerConfig::from_json_str(SD15)
            .and_then(|config| config.with_override("eta", Value::from(0.5)))
            .expect("valid override");
        assert!(config.check_for(Ddim).is_ok());
        assert!(matches!(
            config.check_for(Euler),
            Err(SchedulerError::OverrideNotApplicable { .. })
        ));
    }

    #[test]
    fn unsupported_file_values_are_refused() {
        let config = SchedulerConfig::from_json_str(r#"{"algorithm_type": "sde-dpmsolver++"}"#)
            .expect("json");
        assert!(matches!(
            config.check_for(DpmPp2m),
            Err(SchedulerError::Unsupported { .. })
        ));
        assert!(config.check_for(Euler).is_ok());
    }

    #[test]
    fn python_non_finite_literals_are_read() {
        let config = SchedulerConfig::from_json_str(
            r#"{"lambda_min_clipped": -Infinity, "x": "NaN -Infinity"}"#,
        )
        .expect("python-style json");
        assert_eq!(
            config.float(DpmPp2m, "lambda_min_clipped").expect("float"),
            f64::NEG_INFINITY
        );
        assert_eq!(
            config.values.get("x").and_then(Value::as_str),
            Some("NaN -Infinity")
        );
    }
}
