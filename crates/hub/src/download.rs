//! Fills the cache from the hub (`HF_ENDPOINT`): one listing per repository
//! (`GET /api/models/{repo}/revision/{revision}?blobs=true`), then each file the request
//! needs from `GET /{repo}/resolve/{commit}/{path}`, following the hub's redirects to its
//! storage.
//!
//! - A file downloads into `blobs/{etag}.incomplete`; an interrupted transfer is resumed
//!   from that file's length with an HTTP `Range` request, within the run (a few retries)
//!   and by the next run.
//! - LFS files are hashed as they arrive; a SHA-256 other than the listing's (and the
//!   `X-Linked-Etag` header's) deletes the file and fails naming it.
//! - `.locks/models--owner--name/{etag}.lock` is held (an OS file lock, as huggingface_hub's
//!   `filelock`) while a blob is written, so concurrent runs wait for each other instead of
//!   writing the same file twice; snapshot links and refs are replaced atomically.
//! - `HF_TOKEN` goes along as a bearer token to the endpoint's host only, never to the
//!   storage host a redirect leads to.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::cache::RepoCache;
use crate::env::HubEnv;
use crate::error::{io_error, HubError, Result};
use crate::listing::{check_token, Listing, RemoteFile};
use crate::request::{select, shards, RepoRequest};
use crate::Progress;

/// Attempts per file before an interrupted download is left for the next run to resume.
const ATTEMPTS: u32 = 5;
const MAX_REDIRECTS: usize = 10;

/// A file of a fetched request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedFile {
    pub name: String,
    pub size: u64,
    /// Downloaded now (false: it was in the cache already).
    pub downloaded: bool,
}

/// What [`Client::fetch`] did for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchReport {
    pub repo: String,
    pub revision: String,
    pub commit: String,
    pub files: Vec<FetchedFile>,
}

/// The hub client.
pub struct Client {
    env: HubEnv,
    agent: ureq::Agent,
}

struct Reply {
    status: u16,
    /// Headers of the first answer (the hub's own, before a redirect to storage).
    first: ureq::http::HeaderMap,
    response: ureq::http::Response<ureq::Body>,
    url: String,
}

fn header(map: &ureq::http::HeaderMap, name: &str) -> Option<String> {
    map.get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
}

/// An ETag without `W/` and quotes, as huggingface_hub normalises it.
fn plain_etag(value: &str) -> String {
    value
        .trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

/// `scheme://host[:port]` of a URL.
fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

/// Resolves a `Location` header against the URL that answered it.
fn redirect_target(url: &str, location: &str) -> String {
    if location.starts_with("http://") || location.starts_with("https://") {
        location.to_string()
    } else if let Some(rest) = location.strip_prefix("//") {
        let scheme = url.split("://").next().unwrap_or("https");
        format!("{scheme}://{rest}")
    } else if location.starts_with('/') {
        format!("{}{location}", origin(url))
    } else {
        let path = url.split('?').next().unwrap_or(url);
        match path.rfind('/') {
            Some(i) if i + 1 > origin(url).len() => format!("{}{location}", &path[..=i]),
            _ => format!("{}/{location}", origin(url)),
        }
    }
}

/// Percent-encodes a repository path for a URL (`/` kept), as Python's `quote`.
fn encode_path(path: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(path.len());
    for byte in path.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(byte as char)
            }
            b'/' if keep_slash => out.push('/'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

impl Client {
    pub fn new(env: HubEnv) -> Self {
        let config = ureq::Agent::config_builder()
            .max_redirects(0)
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .timeout_per_read(Some(Duration::from_secs(120)))
            .user_agent(format!(
                "ipcompose/{}; hf_hub-compatible",
                env!("CARGO_PKG_VERSION")
            ))
            .build();
        Self {
            env,
            agent: ureq::Agent::new_with_config(config),
        }
    }

    pub fn env(&self) -> &HubEnv {
        &self.env
    }

    fn cache(&self, repo: &str) -> Result<RepoCache> {
        let cache = self.env.cache.as_deref().ok_or_else(|| HubError::Io {
            path: "~/.cache/huggingface/hub".into(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no hub cache folder is known (set HF_HUB_CACHE or HF_HOME)",
            ),
        })?;
        Ok(RepoCache::new(cache, repo))
    }

    /// One request with `method`, following redirects by hand: the token goes to the
    /// endpoint's host only, and the first answer's headers are kept.
    fn send(&self, method: &str, url: &str, range_from: u64) -> Result<Reply> {
        let endpoint_origin = origin(&self.env.endpoint).to_string();
        let mut url = url.to_string();
        let mut first: Option<ureq::http::HeaderMap> = None;
        for _ in 0..=MAX_REDIRECTS {
            let mut request = match method {
                "HEAD" => self.agent.head(&url),
                _ => self.agent.get(&url),
            };
            if origin(&url) == endpoint_origin {
                if let Some(token) = &self.env.token {
                    request = request.header("Authorization", format!("Bearer {token}"));
                }
            }
            if range_from > 0 {
                request = request.header("Range", format!("bytes={range_from}-"));
            }
            let response = request.call().map_err(|e| HubError::Network {
                url: url.clone(),
                message: e.to_string(),
            })?;
            let status = response.status().as_u16();
            if first.is_none() {
                first = Some(response.headers().clone());
            }
            if matches!(status, 301 | 302 | 303 | 307 | 308) {
                let location = header(response.headers(), "location").ok_or_else(|| {
                    HubError::BadResponse {
                        url: url.clone(),
                        message: format!("HTTP {status} without a Location"),
                    }
                })?;
                url = redirect_target(&url, &location);
                continue;
            }
            return Ok(Reply {
                status,
                first: first.unwrap_or_default(),
                response,
                url,
            });
        }
        Err(HubError::BadResponse {
            url,
            message: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }

    /// The error for a 401/403: `listing` when the repository's listing was refused (the
    /// repository may not exist, or be private), else a file of a readable repository (a
    /// gated model). The hub's `X-Error-Code` decides where it says.
    fn refused(&self, repo: &str, revision: &str, reply: &Reply, listing: bool) -> HubError {
        let code = header(&reply.first, "x-error-code").unwrap_or_default();
        if code == "RepoNotFound" || code == "RevisionNotFound" {
            return HubError::RepoNotFound {
                repo: repo.to_string(),
                revision: revision.to_string(),
                url: reply.url.clone(),
            };
        }
        HubError::Unauthorized {
            repo: repo.to_string(),
            status: reply.status,
            url: reply.url.clone(),
            page: self.env.page(repo),
            gated: code == "GatedRepo" || !listing,
            token_sent: self.env.token.is_some(),
        }
    }

    /// The hub's listing of `repo` at `revision`: its commit, files, sizes and hashes.
    pub fn listing(&self, repo: &str, revision: &str) -> Result<Listing> {
        let url = format!(
            "{}/api/models/{repo}/revision/{}?blobs=true",
            self.env.endpoint,
            encode_path(revision, false)
        );
        let reply = self.send("GET", &url, 0)?;
        match reply.status {
            200 => {}
            401 | 403 => return Err(self.refused(repo, revision, &reply, true)),
            404 => {
                return Err(HubError::RepoNotFound {
                    repo: repo.to_string(),
                    revision: revision.to_string(),
                    url: reply.url,
                })
            }
            other => {
                return Err(HubError::BadResponse {
                    url: reply.url,
                    message: format!("HTTP {other}"),
                })
            }
        }
        let text = reply
            .response
            .into_body()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .map_err(|e| HubError::Network {
                url: url.clone(),
                message: e.to_string(),
            })?;
        Listing::parse(repo, &text)
    }

    fn resolve_url(&self, repo: &str, commit: &str, file: &str) -> String {
        format!(
            "{}/{repo}/resolve/{commit}/{}",
            self.env.endpoint,
            encode_path(file, true)
        )
    }

    /// The files of `request` that the cache lacks, with their sizes (for `validate`);
    /// shards of a sharded index that is not cached yet are not known and not listed.
    pub fn missing(&self, request: &RepoRequest) -> Result<Vec<(String, u64)>> {
        let listing = self.listing(&request.repo, &request.revision)?;
        let selection = select(request, &listing)?;
        let cache = self.cache(&request.repo)?;
        let snapshot = cache.snapshot(&listing.commit);
        let mut missing = Vec::new();
        let mut names: Vec<String> = selection.files.iter().cloned().collect();
        for index in &selection.indexes {
            if let Ok(text) = std::fs::read_to_string(snapshot.join(index)) {
                names.extend(shards(&request.repo, index, &text)?);
            }
        }
        for name in names {
            if !snapshot.join(&name).is_file() {
                let size = listing.files.get(&name).and_then(|f| f.size).unwrap_or(0);
                missing.push((name, size));
            }
        }
        Ok(missing)
    }

    /// Brings every file of `request` into the cache (those there already are only linked
    /// into the revision's snapshot) and points `refs/{revision}` at the commit.
    pub fn fetch(&self, request: &RepoRequest, progress: &mut dyn Progress) -> Result<FetchReport> {
        let listing = self.listing(&request.repo, &request.revision)?;
        let selection = select(request, &listing)?;
        let cache = self.cache(&request.repo)?;
        let mut report = FetchReport {
            repo: request.repo.clone(),
            revision: request.revision.clone(),
            commit: listing.commit.clone(),
            files: Vec::new(),
        };
        // Shard indexes first (small): their shards join the files to fetch.
        let mut names: Vec<String> = selection.files.iter().cloned().collect();
        let indexes: Vec<String> = selection.indexes.iter().cloned().collect();
        let mut pending = Vec::new();
        for index in &indexes {
            let file = self.remote(&request.repo, &listing, index)?;
            pending.push(self.prepare(&cache, &listing, file)?);
        }
        self.transfer_all(&cache, &listing, &pending, progress, &mut report)?;
        for index in &indexes {
            let path = cache.snapshot(&listing.commit).join(index);
            let text = std::fs::read_to_string(&path).map_err(io_error(&path))?;
            names.extend(shards(&request.repo, index, &text)?);
        }
        names.retain(|n| !indexes.contains(n));
        names.sort();
        names.dedup();
        let mut pending = Vec::new();
        for name in &names {
            let file = self.remote(&request.repo, &listing, name)?;
            pending.push(self.prepare(&cache, &listing, file)?);
        }
        self.transfer_all(&cache, &listing, &pending, progress, &mut report)?;
        cache.write_ref(&request.revision, &listing.commit)?;
        report.files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(report)
    }

    fn remote(&self, repo: &str, listing: &Listing, name: &str) -> Result<RemoteFile> {
        listing
            .files
            .get(name)
            .cloned()
            .ok_or_else(|| HubError::NotInRepo {
                repo: repo.to_string(),
                commit: listing.commit.clone(),
                path: name.to_string(),
                near: listing.near(name),
            })
    }

    /// The file with its blob name: the listing's, else the hub's `HEAD` answer.
    fn prepare(&self, cache: &RepoCache, listing: &Listing, file: RemoteFile) -> Result<Pending> {
        let mut file = file;
        if file.etag().is_none() {
            let url = self.resolve_url(&cache.repo, &listing.commit, &file.name);
            let reply = self.send("HEAD", &url, 0)?;
            match reply.status {
                200..=299 => {}
                401 | 403 => return Err(self.refused(&cache.repo, &listing.commit, &reply, false)),
                status => {
                    return Err(HubError::BadResponse {
                        url,
                        message: format!("HTTP {status} to HEAD"),
                    })
                }
            }
            let etag = header(&reply.first, "x-linked-etag")
                .or_else(|| header(&reply.first, "etag"))
                .map(|e| plain_etag(&e))
                .ok_or_else(|| HubError::BadResponse {
                    url: url.clone(),
                    message: "no ETag for a file the listing gives no blob id for".into(),
                })?;
            if file.size.is_none() {
                file.size = header(&reply.first, "x-linked-size")
                    .or_else(|| header(&reply.first, "content-length"))
                    .and_then(|s| s.parse().ok());
            }
            file.blob_id = Some(etag);
        }
        let etag = file.etag().unwrap_or_default().to_string();
        check_token(&cache.repo, "blob name", &etag)?;
        Ok(Pending { file, etag })
    }

    fn transfer_all(
        &self,
        cache: &RepoCache,
        listing: &Listing,
        pending: &[Pending],
        progress: &mut dyn Progress,
        report: &mut FetchReport,
    ) -> Result<()> {
        let snapshot = cache.snapshot(&listing.commit);
        let mut to_download = Vec::new();
        for p in pending {
            let size = p.file.size.unwrap_or(0);
            if snapshot.join(&p.file.name).is_file() {
                report.files.push(FetchedFile {
                    name: p.file.name.clone(),
                    size,
                    downloaded: false,
                });
            } else if cache.blob(&p.etag).is_file() {
                cache.link(&listing.commit, &p.file.name, &p.etag)?;
                report.files.push(FetchedFile {
                    name: p.file.name.clone(),
                    size,
                    downloaded: false,
                });
            } else {
                to_download.push(p);
            }
        }
        if to_download.is_empty() {
            return Ok(());
        }
        let sizes: Vec<(String, u64)> = to_download
            .iter()
            .map(|p| (p.file.name.clone(), p.file.size.unwrap_or(0)))
            .collect();
        progress.begin(&cache.repo, &listing.commit, &sizes);
        for p in to_download {
            let downloaded = self.download_blob(cache, &listing.commit, p, progress)?;
            cache.link(&listing.commit, &p.file.name, &p.etag)?;
            report.files.push(FetchedFile {
                name: p.file.name.clone(),
                size: p.file.size.unwrap_or(0),
                downloaded,
            });
        }
        Ok(())
    }

    /// Writes `blobs/{etag}` under its lock; false when another run wrote it meanwhile.
    fn download_blob(
        &self,
        cache: &RepoCache,
        commit: &str,
        pending: &Pending,
        progress: &mut dyn Progress,
    ) -> Result<bool> {
        let blob = cache.blob(&pending.etag);
        let lock_path = cache.lock_file(&pending.etag);
        if let Some(parent) = lock_path.parent() {
            std::fs::create_dir_all(parent).map_err(io_error(parent))?;
        }
        let blobs = cache.dir.join("blobs");
        std::fs::create_dir_all(&blobs).map_err(io_error(&blobs))?;
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error(&lock_path))?;
        let mut lock = fd_lock::RwLock::new(lock_file);
        let _guard = lock.write().map_err(io_error(&lock_path))?;
        if blob.is_file() {
            return Ok(false);
        }
        let incomplete = cache.incomplete(&pending.etag);
        self.transfer(cache, commit, pending, &incomplete, progress)?;
        std::fs::rename(&incomplete, &blob).map_err(io_error(&blob))?;
        Ok(true)
    }

    /// Downloads into `incomplete`, resuming from its length, then checks size and SHA-256.
    fn transfer(
        &self,
        cache: &RepoCache,
        commit: &str,
        pending: &Pending,
        incomplete: &Path,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        let file = &pending.file;
        let repo = &cache.repo;
        let url = self.resolve_url(repo, commit, &file.name);
        let expected_size = file.size;
        let mut started = false;
        let mut attempt = 0;
        let mut hasher;
        loop {
            attempt += 1;
            let mut out = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(incomplete)
                .map_err(io_error(incomplete))?;
            let mut offset = out.metadata().map_err(io_error(incomplete))?.len();
            if expected_size.is_some_and(|s| offset > s) {
                out.set_len(0).map_err(io_error(incomplete))?;
                offset = 0;
            }
            hasher = Sha256::new();
            if offset > 0 {
                hash_prefix(&mut out, offset, &mut hasher).map_err(io_error(incomplete))?;
            }
            if !started {
                progress.file_start(&file.name, expected_size.unwrap_or(0), offset);
                started = true;
            }
            if expected_size == Some(offset) && offset > 0 {
                break;
            }
            let reply = match self.send("GET", &url, offset) {
                Ok(reply) => reply,
                Err(e @ HubError::Network { .. }) if attempt < ATTEMPTS => {
                    progress.note(&format!("{}: {e}; retrying", file.name));
                    std::thread::sleep(backoff(attempt));
                    continue;
                }
                Err(e) => return Err(e),
            };
            match reply.status {
                200 => {
                    if offset > 0 {
                        progress.rewind(offset);
                        out.set_len(0).map_err(io_error(incomplete))?;
                        hasher = Sha256::new();
                    }
                }
                206 => {
                    let range = header(reply.response.headers(), "content-range");
                    let start = range
                        .as_deref()
                        .and_then(|r| r.strip_prefix("bytes "))
                        .and_then(|r| r.split('-').next())
                        .and_then(|s| s.trim().parse::<u64>().ok());
                    if start != Some(offset) {
                        progress.rewind(offset);
                        out.set_len(0).map_err(io_error(incomplete))?;
                        if attempt < ATTEMPTS {
                            continue;
                        }
                        return Err(HubError::BadResponse {
                            url,
                            message: format!(
                                "asked for bytes from {offset}, got the range {range:?}"
                            ),
                        });
                    }
                }
                416 => {
                    // The range starts at or past the end: start again from zero.
                    progress.rewind(offset);
                    out.set_len(0).map_err(io_error(incomplete))?;
                    if attempt < ATTEMPTS {
                        continue;
                    }
                    return Err(HubError::BadResponse {
                        url,
                        message: "HTTP 416 for a fresh download".into(),
                    });
                }
                401 | 403 => return Err(self.refused(repo, commit, &reply, false)),
                404 => {
                    return Err(HubError::NotInRepo {
                        repo: repo.clone(),
                        commit: commit.to_string(),
                        path: file.name.clone(),
                        near: Vec::new(),
                    })
                }
                status if (status == 429 || status >= 500) && attempt < ATTEMPTS => {
                    progress.note(&format!("{}: HTTP {status}; retrying", file.name));
                    std::thread::sleep(backoff(attempt));
                    continue;
                }
                status => {
                    return Err(HubError::BadResponse {
                        url: reply.url,
                        message: format!("HTTP {status}"),
                    })
                }
            }
            if let (Some(expected), Some(linked)) = (
                &file.sha256,
                header(&reply.first, "x-linked-etag").map(|e| plain_etag(&e)),
            ) {
                if !linked.eq_ignore_ascii_case(expected) {
                    return Err(HubError::BadResponse {
                        url,
                        message: format!(
                            "the listing gives {} the SHA-256 {expected}, the file's headers {linked}",
                            file.name
                        ),
                    });
                }
            }
            out.seek(SeekFrom::End(0)).map_err(io_error(incomplete))?;
            let mut body = reply.response.into_body().into_reader();
            let mut buffer = vec![0u8; 1 << 18];
            let interrupted = loop {
                match body.read(&mut buffer) {
                    Ok(0) => break None,
                    Ok(n) => {
                        out.write_all(&buffer[..n]).map_err(io_error(incomplete))?;
                        hasher.update(&buffer[..n]);
                        progress.advance(n as u64);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => break Some(e.to_string()),
                }
            };
            out.flush().map_err(io_error(incomplete))?;
            let length = out.metadata().map_err(io_error(incomplete))?.len();
            let short = expected_size.is_some_and(|s| length < s);
            if interrupted.is_some() || short {
                let why = interrupted.unwrap_or_else(|| "the connection closed early".into());
                if attempt < ATTEMPTS {
                    progress.note(&format!(
                        "{}: {why} at {} of {}; resuming",
                        file.name,
                        crate::human_size(length),
                        crate::human_size(expected_size.unwrap_or(0))
                    ));
                    std::thread::sleep(backoff(attempt));
                    continue;
                }
                return Err(HubError::Network {
                    url,
                    message: format!(
                        "{why} ({} of {} kept in {}; the next run resumes it)",
                        crate::human_size(length),
                        file.name,
                        incomplete.display()
                    ),
                });
            }
            break;
        }
        let length = std::fs::metadata(incomplete)
            .map_err(io_error(incomplete))?
            .len();
        if let Some(expected) = expected_size {
            if length != expected {
                let _ = std::fs::remove_file(incomplete);
                return Err(HubError::Size {
                    repo: repo.clone(),
                    file: file.name.clone(),
                    expected,
                    found: length,
                });
            }
        }
        if let Some(expected) = &file.sha256 {
            let found = format!("{:x}", hasher.finalize());
            if !found.eq_ignore_ascii_case(expected) {
                let _ = std::fs::remove_file(incomplete);
                return Err(HubError::Checksum {
                    repo: repo.clone(),
                    file: file.name.clone(),
                    expected: expected.clone(),
                    found,
                });
            }
        }
        progress.file_done(&file.name);
        Ok(())
    }
}

struct Pending {
    file: RemoteFile,
    etag: String,
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(250 * u64::from(attempt.min(8)))
}

fn hash_prefix(file: &mut File, length: u64, hasher: &mut Sha256) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(0))?;
    let mut left = length;
    let mut buffer = vec![0u8; 1 << 18];
    while left > 0 {
        let n = file.read(&mut buffer[..(left.min(1 << 18)) as usize])?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        left -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_redirects() {
        assert_eq!(
            encode_path("unet/diffusion model+1.safetensors", true),
            "unet/diffusion%20model%2B1.safetensors"
        );
        assert_eq!(encode_path("refs/pr/1", false), "refs%2Fpr%2F1");
        let url = "https://huggingface.co/o/n/resolve/abc/unet/x.safetensors";
        assert_eq!(origin(url), "https://huggingface.co");
        assert_eq!(
            redirect_target(url, "https://cdn.example/x?sig=1"),
            "https://cdn.example/x?sig=1"
        );
        assert_eq!(
            redirect_target(url, "/api/o/m"),
            "https://huggingface.co/api/o/m"
        );
        assert_eq!(
            redirect_target(url, "y.safetensors"),
            "https://huggingface.co/o/n/resolve/abc/unet/y.safetensors"
        );
        assert_eq!(plain_etag("W/\"abc\""), "abc");
    }
}
