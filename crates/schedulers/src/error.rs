//! Errors of config parsing, schedule construction and stepping.

use std::path::PathBuf;

use crate::SchedulerKind;

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("cannot read scheduler config {path}: {source}")]
    ConfigRead {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("scheduler config {origin} is not valid JSON: {source}")]
    ConfigParse {
        origin: String,
        source: serde_json::Error,
    },

    #[error("scheduler config {origin} is not a JSON object")]
    ConfigNotObject { origin: String },

    #[error("unknown scheduler setting `{key}`; accepted settings: {accepted}")]
    UnknownKey { key: String, accepted: String },

    #[error("invalid value {value} for scheduler setting `{key}` ({origin}): expected {expected}")]
    InvalidValue {
        origin: String,
        key: String,
        value: String,
        expected: String,
    },

    #[error("the {kind} scheduler does not support `{key}` = {value} (supported: {supported})")]
    Unsupported {
        kind: SchedulerKind,
        key: String,
        value: String,
        supported: String,
    },

    #[error("setting `{key}` has no effect on the {kind} scheduler; it applies to: {applies_to}")]
    OverrideNotApplicable {
        key: String,
        kind: SchedulerKind,
        applies_to: String,
    },

    #[error("unknown scheduler `{name}`; valid names: {valid}")]
    UnknownKind { name: String, valid: String },

    #[error("the number of inference steps must be between 1 and {max}, got {steps}")]
    InvalidStepCount { steps: usize, max: usize },

    #[error("invalid noise schedule: {reason}")]
    InvalidSchedule { reason: String },

    #[error("step index {index} is out of range for a schedule of {len} steps")]
    StepIndexOutOfRange { index: usize, len: usize },

    #[error("the {kind} scheduler keeps history between steps and must step in order: expected step {expected}, got {got}")]
    StepOutOfOrder {
        kind: SchedulerKind,
        expected: usize,
        got: usize,
    },

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
