//! Where a model's files come from: a local folder, or a hub id found in the standard
//! Hugging Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
//! Nothing is downloaded here: a hub id that is not cached is an error that says where we looked.

use std::path::{Path, PathBuf};

use crate::error::{PipelineError, Result};

pub fn hub_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(dir));
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(home).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

fn looks_like_hub_id(source: &str) -> bool {
    let mut parts = source.split('/');
    let (Some(owner), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let valid = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    valid(owner) && valid(name)
}

/// The repository (`owner/name`) and the path inside it when `source` is a hub id rather
/// than a local path, read as [`resolve_model_source`] reads it.
pub fn hub_reference(source: &str, base_dir: &Path) -> Option<(String, Option<String>)> {
    if base_dir.join(source).exists() || source.starts_with('.') || source.starts_with('/') {
        return None;
    }
    let mut parts = source.splitn(3, '/');
    let repo = match (parts.next(), parts.next()) {
        (Some(owner), Some(name)) => format!("{owner}/{name}"),
        _ => return None,
    };
    let inside = parts
        .next()
        .map(|p| p.trim_end_matches('/').to_string())
        .filter(|p| !p.is_empty());
    looks_like_hub_id(&repo).then_some((repo, inside))
}

/// Resolves `source` (relative paths against `base_dir`) to a file or folder on disk.
pub fn resolve_model_source(
    source: &str,
    revision: Option<&str>,
    base_dir: &Path,
) -> Result<PathBuf> {
    let local = base_dir.join(source);
    if local.exists() {
        return Ok(local);
    }
    // `owner/name` is a repository; `owner/name/path/in/repo` a file or folder inside it
    // (e.g. `h94/IP-Adapter/models/image_encoder`).
    let mut parts = source.splitn(3, '/');
    let repo = match (parts.next(), parts.next()) {
        (Some(owner), Some(name)) => format!("{owner}/{name}"),
        _ => String::new(),
    };
    let inside = parts.next();
    if !looks_like_hub_id(&repo) || source.starts_with('.') || source.starts_with('/') {
        return Err(PipelineError::Plan(format!(
            "`{}` does not exist",
            local.display()
        )));
    }
    let cache = hub_cache_dir().ok_or_else(|| {
        PipelineError::Plan(format!(
            "`{source}` is not a local path and no hub cache directory is known"
        ))
    })?;
    let snapshot = resolve_in_cache(&cache, &repo, revision.unwrap_or("main"))?;
    match inside {
        None => Ok(snapshot),
        Some(path) => {
            let target = snapshot.join(path);
            if target.exists() {
                Ok(target)
            } else {
                Err(PipelineError::Plan(format!(
                    "`{path}` is not in the cached snapshot of `{repo}` at {} (offline: download it first, e.g. `huggingface-cli download {repo} {path}`)",
                    snapshot.display()
                )))
            }
        }
    }
}

/// The snapshot folder of `repo` at `revision` (a branch/tag name in `refs/`, or a commit hash).
pub fn resolve_in_cache(cache: &Path, repo: &str, revision: &str) -> Result<PathBuf> {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let not_cached = || {
        PipelineError::Plan(format!(
            "`{repo}` (revision {revision}) is neither a local folder nor in the hub cache at {}; \
             download it first (e.g. `huggingface-cli download {repo}`) or point `source` at a folder",
            repo_dir.display()
        ))
    };
    if !repo_dir.is_dir() {
        return Err(not_cached());
    }
    let ref_file = repo_dir.join("refs").join(revision);
    let commit = match std::fs::read_to_string(&ref_file) {
        Ok(text) => text.trim().to_string(),
        Err(_) => revision.to_string(),
    };
    let snapshot = repo_dir.join("snapshots").join(&commit);
    if snapshot.is_dir() {
        Ok(snapshot)
    } else {
        Err(not_cached())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_owner_slash_name() {
        assert!(looks_like_hub_id(
            "stable-diffusion-v1-5/stable-diffusion-v1-5"
        ));
        assert!(!looks_like_hub_id("../models/sd15"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("plainname"));
    }

    #[test]
    fn resolves_refs_and_reports_missing_snapshots() {
        let tmp = std::env::temp_dir().join(format!("ipcompose-hub-{}", std::process::id()));
        let repo = tmp.join("models--org--model");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(repo.join("snapshots/abc123")).unwrap();
        std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
        assert_eq!(
            resolve_in_cache(&tmp, "org/model", "main").unwrap(),
            repo.join("snapshots/abc123")
        );
        assert_eq!(
            resolve_in_cache(&tmp, "org/model", "abc123").unwrap(),
            repo.join("snapshots/abc123")
        );
        std::fs::create_dir_all(repo.join("snapshots/abc123/models")).unwrap();
        std::fs::write(
            repo.join("snapshots/abc123/models/adapter.safetensors"),
            b"x",
        )
        .unwrap();
        std::env::set_var("HF_HUB_CACHE", &tmp);
        let base = std::path::Path::new("/nonexistent");
        assert_eq!(
            resolve_model_source("org/model/models/adapter.safetensors", None, base).unwrap(),
            repo.join("snapshots/abc123/models/adapter.safetensors")
        );
        let missing = resolve_model_source("org/model/models/other.bin", None, base)
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("models/other.bin") && missing.contains("offline"),
            "{missing}"
        );
        assert_eq!(
            resolve_model_source("org/model", None, base).unwrap(),
            repo.join("snapshots/abc123")
        );
        let err = resolve_in_cache(&tmp, "org/other", "main")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("org/other") && err.contains("models--org--other"),
            "{err}"
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
