//! The hub's description of a repository at a revision: `GET /api/models/{repo}/revision/{rev}?blobs=true`,
//! as huggingface_hub's `model_info(files_metadata=True)` reads it: the commit `sha` and the
//! `siblings`, each `{rfilename, size, blobId, lfs: {sha256, size}}`.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::{HubError, Result};

/// One file of the repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    /// The path inside the repository.
    pub name: String,
    pub size: Option<u64>,
    /// The git blob id: the cache's blob name for files outside LFS.
    pub blob_id: Option<String>,
    /// An LFS file's SHA-256: its blob name in the cache, and what its bytes must hash to.
    pub sha256: Option<String>,
}

impl RemoteFile {
    /// The name of this file's blob in the cache (huggingface_hub's "etag"): the SHA-256 for
    /// LFS files, the git blob id for the others.
    pub fn etag(&self) -> Option<&str> {
        self.sha256.as_deref().or(self.blob_id.as_deref())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The commit the revision points at.
    pub commit: String,
    pub files: BTreeMap<String, RemoteFile>,
}

#[derive(Deserialize)]
struct Info {
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default, rename = "blobId")]
    blob_id: Option<String>,
    #[serde(default)]
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    sha256: String,
    #[serde(default)]
    size: Option<u64>,
}

/// Refuses repository paths that could leave the snapshot folder: absolute paths, `..`,
/// backslashes, empty or `.` components.
pub fn check_name(repo: &str, name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name.starts_with('/')
        || name.contains('\\')
        || name.contains('\0')
        || name.as_bytes().get(1) == Some(&b':')
        || name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        Err(HubError::UnsafeName {
            repo: repo.to_string(),
            name: name.to_string(),
        })
    } else {
        Ok(())
    }
}

/// Commit hashes and blob names become file names in the cache: letters, digits, `-`, `_`.
pub fn check_token(repo: &str, what: &str, value: &str) -> Result<()> {
    if !value.is_empty()
        && value.len() <= 128
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        Ok(())
    } else {
        Err(HubError::UnsafeName {
            repo: repo.to_string(),
            name: format!("{what} `{value}`"),
        })
    }
}

impl Listing {
    /// Parses the JSON the hub answered for `repo`; every name and hash is checked before
    /// anything is written.
    pub fn parse(repo: &str, text: &str) -> Result<Self> {
        let bad = |message: String| HubError::BadResponse {
            url: format!("the listing of {repo}"),
            message,
        };
        let info: Info = serde_json::from_str(text)
            .map_err(|e| bad(format!("not the hub's repository JSON: {e}")))?;
        let commit = info
            .sha
            .ok_or_else(|| bad("no commit `sha` in the repository JSON".to_string()))?;
        check_token(repo, "commit", &commit)?;
        let mut files = BTreeMap::new();
        for sibling in info.siblings {
            check_name(repo, &sibling.rfilename)?;
            let (sha256, lfs_size) = match sibling.lfs {
                Some(lfs) => (Some(lfs.sha256.to_ascii_lowercase()), lfs.size),
                None => (None, None),
            };
            if let Some(sha) = &sha256 {
                if sha.len() != 64 || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(bad(format!(
                        "`{}`: `{sha}` is not a SHA-256",
                        sibling.rfilename
                    )));
                }
            }
            if let Some(blob) = &sibling.blob_id {
                check_token(repo, "blob id", blob)?;
            }
            files.insert(
                sibling.rfilename.clone(),
                RemoteFile {
                    name: sibling.rfilename,
                    size: sibling.size.or(lfs_size),
                    blob_id: sibling.blob_id,
                    sha256,
                },
            );
        }
        Ok(Self { commit, files })
    }

    /// Whether some file lies under `folder/`.
    pub fn has_folder(&self, folder: &str) -> bool {
        let prefix = format!("{}/", folder.trim_end_matches('/'));
        self.files.keys().any(|f| f.starts_with(&prefix))
    }

    /// A few names next to `path`, for "not found" messages: the files of its folder (or
    /// of the root).
    pub fn near(&self, path: &str) -> Vec<String> {
        let mut dir = path.trim_end_matches('/');
        loop {
            dir = dir.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
            let prefix = if dir.is_empty() {
                String::new()
            } else {
                format!("{dir}/")
            };
            let names: Vec<String> = self
                .files
                .keys()
                .filter(|f| f.starts_with(&prefix))
                .take(12)
                .cloned()
                .collect();
            if !names.is_empty() || dir.is_empty() {
                return names;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_hub_json_and_refuses_escaping_names() {
        let text = r#"{"id": "o/n", "sha": "0123456789abcdef0123456789abcdef01234567",
            "siblings": [
              {"rfilename": "model_index.json", "size": 541, "blobId": "a1b2"},
              {"rfilename": "unet/diffusion_pytorch_model.safetensors", "size": 3438167536, "blobId": "c3d4",
               "lfs": {"sha256": "19DA7AAA4B880E59D56843F1FCB4DD9B599C28A1D9D9AF7C1143057C8FFAE9F1", "size": 3438167536, "pointerSize": 135}}
            ]}"#;
        let listing = Listing::parse("o/n", text).unwrap();
        let unet = &listing.files["unet/diffusion_pytorch_model.safetensors"];
        assert_eq!(
            unet.etag(),
            Some("19da7aaa4b880e59d56843f1fcb4dd9b599c28a1d9d9af7c1143057c8ffae9f1")
        );
        assert_eq!(listing.files["model_index.json"].etag(), Some("a1b2"));
        assert!(listing.has_folder("unet"));
        assert!(!listing.has_folder("vae"));
        for evil in [
            "../x.bin",
            "a/../../x",
            "/etc/passwd",
            "a//b",
            "C:x",
            "a\\..\\b",
        ] {
            let text = format!(
                r#"{{"sha": "abc", "siblings": [{{"rfilename": {}}}]}}"#,
                serde_json::to_string(evil).unwrap()
            );
            let err = Listing::parse("o/n", &text).unwrap_err();
            assert!(matches!(err, HubError::UnsafeName { .. }), "{evil}: {err}");
        }
        let text = r#"{"sha": "../../x", "siblings": []}"#;
        assert!(Listing::parse("o/n", text).is_err());
    }
}
