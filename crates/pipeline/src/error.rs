use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Recipe { path: PathBuf, message: String },
    #[error("{0}")]
    Plan(String),
    #[error(transparent)]
    Model(#[from] ipcompose_models::ModelError),
    #[error(transparent)]
    Scheduler(#[from] ipcompose_schedulers::SchedulerError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{path}: {message}")]
    Output { path: PathBuf, message: String },
}

pub type Result<T> = std::result::Result<T, PipelineError>;
