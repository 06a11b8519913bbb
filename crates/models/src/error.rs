use std::path::PathBuf;

/// Errors raised while reading configs and weights or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON for {what}: {source}")]
    Json {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: no weights found (looked for {looked_for})")]
    MissingWeights { path: PathBuf, looked_for: String },
    #[error("{0}")]
    Weights(String),
    /// A ControlNet or adapter made for a different base model.
    #[error(
        "{what} {path} was made for a base with {field} {found}, the base model has {expected}"
    )]
    Incompatible {
        what: &'static str,
        path: PathBuf,
        field: &'static str,
        found: String,
        expected: String,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Image resizing, pose post-processing or drawing (`openpose`).
    #[error(transparent)]
    Preprocess(#[from] ipcompose_preprocess::PreprocessError),
}

pub type Result<T> = std::result::Result<T, ModelError>;

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    what: &'static str,
) -> Result<T> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.to_path_buf(),
        what,
        source,
    })
}

/// A config file's text; the error names the file.
pub(crate) fn read_text(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}
