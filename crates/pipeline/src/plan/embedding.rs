//! Textual-inversion embeddings.

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::plan::source::resolve_model_source;
use crate::recipe::ModelSpec;

use super::*;

/// A model of `kind: embedding` (textual inversion), read at plan time.
#[derive(Debug, Clone)]
pub struct EmbeddingPlan {
    pub file: PathBuf,
    /// The word prompts use for it.
    pub token: String,
    pub embedding: ipcompose_models::embedding::TextualInversion,
}

/// A `kind: embedding` model: the file is read (a few kilobytes) for its vectors and token.
pub(super) fn plan_embedding(
    cx: &Context,
    name: &str,
    spec: &ModelSpec,
    base_dir: &Path,
) -> Result<EmbeddingPlan> {
    let at = ["models", name, "source"];
    let file = resolve_model_source(&spec.source, spec.revision.as_deref(), base_dir)
        .map_err(|e| cx.error(&at, e))?;
    let embedding =
        ipcompose_models::embedding::TextualInversion::open(&file).map_err(|e| cx.error(&at, e))?;
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| name.to_string());
    let token = spec
        .token
        .clone()
        .or_else(|| embedding.stored_token.clone())
        .unwrap_or(stem);
    if token.trim().is_empty() || token.contains(char::is_whitespace) {
        return Err(cx.error(
            &["models", name, "token"],
            format!("token `{token}` must be one word"),
        ));
    }
    Ok(EmbeddingPlan {
        file,
        token,
        embedding,
    })
}
