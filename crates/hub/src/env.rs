//! The settings huggingface_hub reads from the environment, read the same way.

use std::path::PathBuf;

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where the hub is, who we are to it, where the cache lies and whether to go online.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubEnv {
    /// `HF_ENDPOINT`, default `https://huggingface.co` (no trailing slash).
    pub endpoint: String,
    /// `HF_TOKEN` (or the older `HUGGING_FACE_HUB_TOKEN`), else the token file
    /// (`HF_TOKEN_PATH`, else `$HF_HOME/token`) that `hf auth login` writes.
    pub token: Option<String>,
    /// `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    pub cache: Option<PathBuf>,
    /// `HF_HUB_OFFLINE` set to 1 / true / yes / on.
    pub offline: bool,
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// huggingface_hub's `HF_HOME`: the variable, else `~/.cache/huggingface`.
pub fn hf_home() -> Option<PathBuf> {
    var("HF_HOME")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface")))
}

/// The hub cache folder (the rule `ipcompose_pipeline::source` resolves `source` with).
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = var("HF_HUB_CACHE") {
        return Some(PathBuf::from(dir));
    }
    if let Some(home) = var("HF_HOME") {
        return Some(PathBuf::from(home).join("hub"));
    }
    var("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// `HF_HUB_OFFLINE` as huggingface_hub reads it.
pub fn offline_from_env() -> bool {
    var("HF_HUB_OFFLINE").is_some_and(|v| {
        matches!(
            v.trim().to_ascii_uppercase().as_str(),
            "1" | "ON" | "YES" | "TRUE"
        )
    })
}

impl HubEnv {
    pub fn from_env() -> Self {
        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let file = var("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .or_else(|| hf_home().map(|h| h.join("token")))?;
                std::fs::read_to_string(file)
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
            })
            .map(|t| t.trim().to_string());
        Self {
            endpoint: var("HF_ENDPOINT")
                .map(|e| e.trim().trim_end_matches('/').to_string())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
            token,
            cache: cache_dir(),
            offline: offline_from_env(),
        }
    }

    /// The repository's page, where a gated model's license is accepted.
    pub fn page(&self, repo: &str) -> String {
        format!("{}/{repo}", self.endpoint)
    }
}
