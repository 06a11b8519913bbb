//! The Hugging Face cache layout, as huggingface_hub writes it (so diffusers, `hf` and
//! ipcompose share one copy of every file):
//!
//! ```text
//! {cache}/models--{owner}--{name}/
//!     blobs/{etag}                          the file's bytes (etag: SHA-256 for LFS files,
//!                                           the git blob id for the others)
//!     blobs/{etag}.incomplete               a download under way (resumed from its length)
//!     refs/{revision}                       the commit a branch or tag pointed at
//!     snapshots/{commit}/{path}             relative symlink to ../../blobs/{etag}
//! {cache}/.locks/models--{owner}--{name}/{etag}.lock
//! ```

use std::path::{Path, PathBuf};

use crate::error::{io_error, HubError, Result};
use crate::request::{join, looks_like_file, RepoRequest, Want};

/// `models--owner--name`.
pub fn repo_folder(repo: &str) -> String {
    format!("models--{}", repo.replace('/', "--"))
}

/// One repository's folder in the cache.
#[derive(Debug, Clone)]
pub struct RepoCache {
    pub cache: PathBuf,
    pub repo: String,
    pub dir: PathBuf,
}

impl RepoCache {
    pub fn new(cache: &Path, repo: &str) -> Self {
        Self {
            cache: cache.to_path_buf(),
            repo: repo.to_string(),
            dir: cache.join(repo_folder(repo)),
        }
    }

    /// The commit `revision` points at in the cache: `refs/{revision}`, else the revision
    /// itself when a snapshot has that name (a commit hash).
    pub fn commit_of(&self, revision: &str) -> Option<String> {
        if revision.split('/').any(|c| c == ".." || c.is_empty()) {
            return None;
        }
        match std::fs::read_to_string(self.dir.join("refs").join(revision)) {
            Ok(text) => Some(text.trim().to_string()).filter(|c| !c.is_empty()),
            Err(_) => self
                .dir
                .join("snapshots")
                .join(revision)
                .is_dir()
                .then(|| revision.to_string()),
        }
    }

    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    pub fn blob(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(etag)
    }

    pub fn incomplete(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("{etag}.incomplete"))
    }

    pub fn lock_file(&self, etag: &str) -> PathBuf {
        self.cache
            .join(".locks")
            .join(repo_folder(&self.repo))
            .join(format!("{etag}.lock"))
    }

    /// Points `refs/{revision}` at `commit` (nothing for a revision that is the commit).
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        if revision == commit {
            return Ok(());
        }
        let path = self.dir.join("refs").join(revision);
        if std::fs::read_to_string(&path).is_ok_and(|c| c.trim() == commit) {
            return Ok(());
        }
        let parent = path.parent().unwrap_or(&self.dir);
        std::fs::create_dir_all(parent).map_err(io_error(parent))?;
        let temp = parent.join(format!(".ref-{}.tmp", std::process::id()));
        std::fs::write(&temp, commit).map_err(io_error(&temp))?;
        std::fs::rename(&temp, &path).map_err(io_error(&path))
    }

    /// Makes `snapshots/{commit}/{file}` point at `blobs/{etag}` (a relative symlink, as
    /// huggingface_hub makes it; a copy where symlinks are not available).
    pub fn link(&self, commit: &str, file: &str, etag: &str) -> Result<PathBuf> {
        let pointer = self.snapshot(commit).join(file);
        let blob = self.blob(etag);
        if pointer.is_file()
            && std::fs::canonicalize(&pointer).ok() == std::fs::canonicalize(&blob).ok()
        {
            return Ok(pointer);
        }
        let parent = pointer.parent().unwrap_or(&self.dir).to_path_buf();
        std::fs::create_dir_all(&parent).map_err(io_error(&parent))?;
        let name = pointer
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = parent.join(format!(".{name}.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&temp);
        #[cfg(unix)]
        {
            // snapshots/{commit}/a/b/file -> ../../../../blobs/{etag}
            let depth = 2 + file.matches('/').count();
            let target = format!("{}blobs/{etag}", "../".repeat(depth));
            std::os::unix::fs::symlink(&target, &temp).map_err(io_error(&temp))?;
        }
        #[cfg(not(unix))]
        {
            std::fs::copy(&blob, &temp).map_err(io_error(&temp))?;
        }
        std::fs::rename(&temp, &pointer).map_err(io_error(&pointer))?;
        Ok(pointer)
    }
}

/// What the cache holds of a request.
#[derive(Debug, Clone, Default)]
pub struct CacheCheck {
    /// The repository's folder in the cache (it may not exist).
    pub repo_dir: PathBuf,
    /// The snapshot the revision points at, when there is one.
    pub snapshot: Option<PathBuf>,
    /// Files the request needs that are there, with their sizes.
    pub present: Vec<(String, u64)>,
    /// What is missing, named for messages.
    pub missing: Vec<String>,
}

impl CacheCheck {
    pub fn is_complete(&self) -> bool {
        self.snapshot.is_some() && self.missing.is_empty()
    }

    /// The error for a cache that lacks files when nothing may be fetched.
    pub fn not_cached(&self, request: &RepoRequest, offline: bool) -> HubError {
        HubError::NotCached {
            repo: request.repo.clone(),
            revision: request.revision.clone(),
            repo_dir: self.repo_dir.clone(),
            missing: self.missing.clone(),
            offline,
        }
    }
}

fn size_of(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Checks `request` against the cache at `cache`: which of its files are there.
pub fn check(cache: &Path, request: &RepoRequest) -> CacheCheck {
    let repo = RepoCache::new(cache, &request.repo);
    let snapshot = repo
        .commit_of(&request.revision)
        .map(|c| repo.snapshot(&c))
        .filter(|s| s.is_dir());
    let mut result = CacheCheck {
        repo_dir: repo.dir.clone(),
        snapshot: snapshot.clone(),
        ..CacheCheck::default()
    };
    for item in &request.items {
        let is_file = match (&item.path, &snapshot) {
            (None, _) => false,
            (Some(path), Some(snapshot)) if snapshot.join(path).is_file() => true,
            (Some(path), Some(snapshot)) if snapshot.join(path).is_dir() => false,
            (Some(path), _) => looks_like_file(path),
        };
        for want in item.wants(is_file) {
            match &snapshot {
                Some(root) => check_want(root, &want, &mut result),
                None => result.missing.extend(want.describe()),
            }
        }
    }
    result.missing.dedup();
    result.present.sort();
    result.present.dedup();
    result
}

fn check_want(root: &Path, want: &Want, result: &mut CacheCheck) {
    match want {
        Want::File(path) | Want::Optional(path) => {
            let file = root.join(path);
            if file.is_file() {
                result.present.push((path.clone(), size_of(&file)));
            } else if matches!(want, Want::File(_)) {
                result.missing.push(path.clone());
            }
        }
        Want::Configs(dir) => {
            if let Ok(entries) = std::fs::read_dir(root.join(dir)) {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let path = entry.path();
                    if (name.ends_with(".json") || name.ends_with(".txt")) && path.is_file() {
                        result.present.push((join(dir, &name), size_of(&path)));
                    }
                }
            }
        }
        Want::Weights {
            dir,
            stems,
            variant,
        } => {
            for stem in stems {
                for name in Want::weight_candidates(stem, variant.as_deref()) {
                    let path = join(dir, &name);
                    let file = root.join(&path);
                    if !file.is_file() {
                        continue;
                    }
                    result.present.push((path.clone(), size_of(&file)));
                    if name.ends_with(".index.json") {
                        let text = std::fs::read_to_string(&file).unwrap_or_default();
                        match crate::request::shards("cache", &path, &text) {
                            Ok(shards) => {
                                for shard in shards {
                                    let file = root.join(&shard);
                                    if file.is_file() {
                                        result.present.push((shard, size_of(&file)));
                                    } else {
                                        result.missing.push(shard);
                                    }
                                }
                            }
                            Err(_) => result.missing.push(path),
                        }
                    }
                    return;
                }
            }
            result.missing.extend(want.describe());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{Item, Shape};

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ipcompose-hub-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn links_like_huggingface_hub_and_checks_what_is_there() {
        let cache = scratch("layout");
        let repo = RepoCache::new(&cache, "o/n");
        std::fs::create_dir_all(repo.dir.join("blobs")).unwrap();
        std::fs::write(repo.blob("e1"), b"{}").unwrap();
        std::fs::write(repo.blob("e2"), b"weights").unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        repo.link(commit, "m/config.json", "e1").unwrap();
        let pointer = repo.link(commit, "m/model.safetensors", "e2").unwrap();
        #[cfg(unix)]
        assert_eq!(
            std::fs::read_link(&pointer).unwrap(),
            PathBuf::from("../../../blobs/e2")
        );
        assert_eq!(std::fs::read(&pointer).unwrap(), b"weights");
        repo.write_ref("main", commit).unwrap();
        assert_eq!(repo.commit_of("main").as_deref(), Some(commit));
        assert_eq!(repo.commit_of(commit).as_deref(), Some(commit));
        assert_eq!(repo.commit_of("../x"), None);

        let mut request = RepoRequest {
            repo: "o/n".into(),
            revision: "main".into(),
            items: vec![Item {
                path: Some("m".into()),
                shape: Shape::Model,
                variant: None,
                origin: vec![],
            }],
        };
        let found = check(&cache, &request);
        assert!(found.is_complete(), "{found:?}");
        assert_eq!(
            found.present,
            [
                ("m/config.json".to_string(), 2),
                ("m/model.safetensors".to_string(), 7)
            ]
        );
        request.items[0].path = Some("other/x.safetensors".into());
        let found = check(&cache, &request);
        assert_eq!(found.missing, ["other/x.safetensors"]);
        request.revision = "v2".into();
        let found = check(&cache, &request);
        assert!(found.snapshot.is_none() && !found.is_complete());
        let message = found.not_cached(&request, true).to_string();
        assert!(
            message.starts_with("offline: `o/n` (revision v2)")
                && message.contains("models--o--n")
                && message.contains("other/x.safetensors"),
            "{message}"
        );
        std::fs::remove_dir_all(&cache).unwrap();
    }
}
