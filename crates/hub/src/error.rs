use std::path::PathBuf;

use crate::human_size;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The cache lacks files and nothing may be downloaded (offline, or a library build).
    #[error(
        "{}`{repo}` (revision {revision}) is not in the hub cache at {}{}; {}",
        if *offline { "offline: " } else { "" },
        repo_dir.display(),
        missing_list(missing),
        fetch_hint(repo, missing, *offline)
    )]
    NotCached {
        repo: String,
        revision: String,
        repo_dir: PathBuf,
        missing: Vec<String>,
        /// Downloading was turned off (`--offline`, `HF_HUB_OFFLINE=1`).
        offline: bool,
    },
    /// Validation found files to fetch (online, with their sizes from the hub's listing).
    #[error(
        "{} of `{repo}` (revision {revision}, {total}) not in the hub cache yet: {}; `ipcompose pull` (or `run`) fetches them",
        count(files.len()),
        files.iter().map(|(f, s)| format!("{f} ({})", human_size(*s))).collect::<Vec<_>>().join(", "),
        total = human_size(files.iter().map(|(_, s)| s).sum())
    )]
    Missing {
        repo: String,
        revision: String,
        files: Vec<(String, u64)>,
    },
    #[error("could not reach {url}: {message} (to work from the cache only, pass --offline or set HF_HUB_OFFLINE=1)")]
    Network { url: String, message: String },
    #[error("the hub refused `{repo}` (HTTP {status} for {url}): {}", refusal(page, *gated, *token_sent))]
    Unauthorized {
        repo: String,
        status: u16,
        url: String,
        /// The repository's page, where a gated model's license is accepted.
        page: String,
        /// A file of a repository whose listing was readable (or the hub said `GatedRepo`):
        /// a gated model. Otherwise the repository may as well not exist, or be private.
        gated: bool,
        token_sent: bool,
    },
    #[error("the hub has no repository `{repo}` with revision `{revision}` ({url} answered 404; a private repository also needs HF_TOKEN)")]
    RepoNotFound {
        repo: String,
        revision: String,
        url: String,
    },
    #[error("`{path}` is not in `{repo}` at commit {commit}{}", did_you_mean(near))]
    NotInRepo {
        repo: String,
        commit: String,
        path: String,
        near: Vec<String>,
    },
    #[error("`{repo}` has no weights in `{dir}` (looked for {looked_for})")]
    NoWeights {
        repo: String,
        dir: String,
        looked_for: String,
    },
    #[error("the hub's listing of `{repo}` names `{name}`, a path outside the repository folder; refused")]
    UnsafeName { repo: String, name: String },
    #[error("{file} of `{repo}` has SHA-256 {found}, but the hub says {expected}: the download is corrupt and was deleted; run again to fetch it anew")]
    Checksum {
        repo: String,
        file: String,
        expected: String,
        found: String,
    },
    #[error("{file} of `{repo}` is {found} bytes, but the hub says {expected}: the download was deleted; run again to fetch it anew")]
    Size {
        repo: String,
        file: String,
        expected: u64,
        found: u64,
    },
    #[error("{url}: {message}")]
    BadResponse { url: String, message: String },
}

pub type Result<T> = std::result::Result<T, HubError>;

pub(crate) fn io_error(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> HubError {
    let path = path.into();
    move |source| HubError::Io { path, source }
}

fn count(n: usize) -> String {
    if n == 1 {
        "1 file".to_string()
    } else {
        format!("{n} files")
    }
}

fn refusal(page: &str, gated: bool, token_sent: bool) -> String {
    match (gated, token_sent) {
        (true, false) => format!("the model is gated: accept its license on {page} (logged in), then set HF_TOKEN to an access token (or run `hf auth login`, which writes the token file)"),
        (true, true) => format!("the token that was sent (HF_TOKEN or the token file) does not give access: check that it can read the repository and that its account accepted the license on {page}"),
        (false, false) => format!("the repository does not exist, or it is private or gated; a private or gated one needs HF_TOKEN set to an access token (for a gated model, accept its license on {page} first)"),
        (false, true) => format!("the repository does not exist, or the token that was sent (HF_TOKEN or the token file) does not give access to it (a gated model's license is accepted on {page})"),
    }
}

fn fetch_hint(repo: &str, missing: &[String], offline: bool) -> String {
    let files = if missing.len() <= 3 {
        missing
            .iter()
            .map(|m| format!(" {}", m.split(' ').next().unwrap_or(m)))
            .collect::<String>()
    } else {
        String::new()
    };
    format!(
        "{}fetch it with `ipcompose pull RECIPE` (or `hf download {repo}{files}`), or point `source` at a folder",
        if offline {
            "run without --offline / HF_HUB_OFFLINE to download it, or "
        } else {
            ""
        }
    )
}

fn missing_list(missing: &[String]) -> String {
    if missing.is_empty() {
        String::new()
    } else {
        format!(" (missing: {})", missing.join(", "))
    }
}

fn did_you_mean(near: &[String]) -> String {
    if near.is_empty() {
        String::new()
    } else {
        format!(" (it has: {})", near.join(", "))
    }
}
