//! Fetching models from a hub: the `ipcompose` binary against a real HTTP server started here
//! on 127.0.0.1, which serves the tiny fixture models in the Hugging Face hub's URL layout:
//!
//! - `GET /api/models/{repo}/revision/{rev}?blobs=true`: `{sha, siblings: [{rfilename, size,
//!   blobId, lfs: {sha256, size}}]}`;
//! - `HEAD`/`GET /{repo}/resolve/{rev}/{file}`: files outside LFS answered directly with
//!   `ETag` and `X-Repo-Commit`; LFS files (weights) with a 302 to `/storage/…` carrying
//!   `X-Linked-Etag` (the SHA-256), `X-Linked-Size` and `X-Repo-Commit`, as the hub
//!   redirects to its storage; `Range: bytes=N-` answered with 206.
//!
//! The server counts requests, and can drop a connection mid-file once, serve wrong bytes
//! for one file, ask for a token, list an unsafe file name, or leave blob ids out of its
//! listing. Nothing here reaches any other host.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use common::{fixtures, scratch};
use sha2::{Digest, Sha256};

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

fn is_lfs(name: &str) -> bool {
    [".safetensors", ".bin", ".ckpt", ".pth"]
        .iter()
        .any(|e| name.ends_with(e))
}

struct Repo {
    commit: String,
    files: BTreeMap<String, Vec<u8>>,
}

impl Repo {
    fn new(files: BTreeMap<String, Vec<u8>>) -> Self {
        let mut hasher = Sha256::new();
        for (name, bytes) in &files {
            hasher.update(name.as_bytes());
            hasher.update(sha256_hex(bytes).as_bytes());
        }
        let commit = format!("{:x}", hasher.finalize())[..40].to_string();
        Self { commit, files }
    }

    /// The git blob id stand-in of a file (what the cache names files outside LFS by).
    fn blob_id(name: &str, bytes: &[u8]) -> String {
        let mut hasher = Sha256::new();
        hasher.update(b"blob ");
        hasher.update(name.as_bytes());
        hasher.update(bytes);
        format!("{:x}", hasher.finalize())[..40].to_string()
    }

    fn etag(name: &str, bytes: &[u8]) -> String {
        if is_lfs(name) {
            sha256_hex(bytes)
        } else {
            Self::blob_id(name, bytes)
        }
    }
}

/// Every file under `dir`, as repository paths under `prefix`.
fn files_of(dir: &Path, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![(dir.to_path_buf(), prefix.to_string())];
    while let Some((dir, prefix)) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            if entry.path().is_dir() {
                stack.push((entry.path(), path));
            } else {
                files.insert(path, std::fs::read(entry.path()).unwrap());
            }
        }
    }
    files
}

/// tiny-sd15 as the SD1.5 repository holds it: the diffusers folder with `.bin` duplicates,
/// an fp16 UNet, a single-file checkpoint and a README, of which a recipe needs only some.
fn sd15_repo() -> Repo {
    let fx = fixtures();
    let mut files = files_of(&fx.join("tiny-sd15"), "");
    for name in [
        "unet/diffusion_pytorch_model.bin",
        "vae/diffusion_pytorch_model.bin",
        "text_encoder/pytorch_model.bin",
    ] {
        files.insert(
            name.to_string(),
            std::fs::read(fx.join("tiny-sd15-bin").join(name)).unwrap(),
        );
    }
    files.insert(
        "unet/diffusion_pytorch_model.fp16.safetensors".to_string(),
        std::fs::read(fx.join("tiny-sd15-fp16/unet/diffusion_pytorch_model.fp16.safetensors"))
            .unwrap(),
    );
    files.insert(
        "v1-5-pruned-emaonly.safetensors".to_string(),
        std::fs::read(fx.join("single-file/tiny-sd15.safetensors")).unwrap(),
    );
    files.insert("README.md".to_string(), b"# tiny sd15\n".to_vec());
    Repo::new(files)
}

/// An IP-Adapter repository (h94/IP-Adapter's layout) with a single-file base beside it.
fn adapters_repo() -> Repo {
    let fx = fixtures();
    let mut files = BTreeMap::new();
    for (name, path) in [
        (
            "models/ip-adapter_tiny.safetensors",
            "ip-adapter/ip-adapter_tiny.safetensors",
        ),
        (
            "models/ip-adapter-plus_tiny.safetensors",
            "ip-adapter/ip-adapter-plus_tiny.safetensors",
        ),
        (
            "models/image_encoder/config.json",
            "ip-adapter/image_encoder/config.json",
        ),
        (
            "models/image_encoder/model.safetensors",
            "ip-adapter/image_encoder/model.safetensors",
        ),
        (
            "models/image_encoder/pytorch_model.bin",
            "ip-adapter/image_encoder_bin/pytorch_model.bin",
        ),
        ("tiny-sd15.safetensors", "single-file/tiny-sd15.safetensors"),
        ("tiny-sd15.ckpt", "single-file/tiny-sd15.ckpt"),
    ] {
        files.insert(name.to_string(), std::fs::read(fx.join(path)).unwrap());
    }
    Repo::new(files)
}

#[derive(Default)]
struct Behaviour {
    /// (file, bytes): the first GET of the file's bytes sends this many, then closes.
    drop_once: Option<(String, usize)>,
    /// Serve this file with one byte changed.
    corrupt: Option<String>,
    /// Answer 401 to requests without `Authorization: Bearer {token}`.
    token: Option<String>,
    /// Names added to every listing.
    extra_names: Vec<String>,
    /// Leave `blobId` out of the listing (the client then asks with HEAD).
    no_blob_ids: bool,
}

#[derive(Debug, Clone)]
struct Logged {
    method: String,
    path: String,
    range: Option<String>,
}

struct Server {
    endpoint: String,
    repos: Arc<BTreeMap<String, Repo>>,
    behaviour: Arc<Mutex<Behaviour>>,
    log: Arc<Mutex<Vec<Logged>>>,
}

impl Server {
    fn start(repos: Vec<(&str, Repo)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let server = Self {
            endpoint,
            repos: Arc::new(repos.into_iter().map(|(k, v)| (k.to_string(), v)).collect()),
            behaviour: Arc::new(Mutex::new(Behaviour::default())),
            log: Arc::new(Mutex::new(Vec::new())),
        };
        let (repos, behaviour, log) = (
            server.repos.clone(),
            server.behaviour.clone(),
            server.log.clone(),
        );
        // The thread ends with the test process.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (repos, behaviour, log) = (repos.clone(), behaviour.clone(), log.clone());
                std::thread::spawn(move || {
                    let _ = handle(stream, &repos, &behaviour, &log);
                });
            }
        });
        server
    }

    fn requests(&self) -> Vec<Logged> {
        self.log.lock().unwrap().clone()
    }

    fn clear(&self) {
        self.log.lock().unwrap().clear();
    }

    fn set(&self, change: impl FnOnce(&mut Behaviour)) {
        change(&mut self.behaviour.lock().unwrap());
    }

    /// The files whose bytes were requested (resolve answers and storage downloads), by name.
    fn fetched(&self, repo: &str) -> Vec<String> {
        let prefix = format!("/{repo}/resolve/");
        let mut names: Vec<String> = self
            .requests()
            .iter()
            .filter(|r| r.method == "GET")
            .filter_map(|r| r.path.strip_prefix(&prefix).map(str::to_string))
            .filter_map(|rest| rest.split_once('/').map(|(_, f)| f.to_string()))
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(
    stream: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
    head_only: bool,
) -> std::io::Result<()> {
    let mut text = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(text.as_bytes())?;
    if !head_only {
        stream.write_all(body)?;
    }
    stream.flush()
}

fn handle(
    mut stream: TcpStream,
    repos: &BTreeMap<String, Repo>,
    behaviour: &Mutex<Behaviour>,
    log: &Mutex<Vec<Logged>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let (path, _query) = target.split_once('?').unwrap_or((&target, ""));
    let path = percent_decode(path);
    log.lock().unwrap().push(Logged {
        method: method.clone(),
        path: path.clone(),
        range: headers.get("range").cloned(),
    });
    let head_only = method == "HEAD";
    let mut behaviour = behaviour.lock().unwrap();
    // A gated model: its listing is public, its files need the token.
    if let Some(token) = behaviour
        .token
        .as_ref()
        .filter(|_| !path.starts_with("/api/"))
    {
        if headers.get("authorization") != Some(&format!("Bearer {token}")) {
            return respond(
                &mut stream,
                "401 Unauthorized",
                &[("X-Error-Code", "GatedRepo".to_string())],
                b"{\"error\": \"Access to model is restricted\"}",
                head_only,
            );
        }
    }
    let not_found = |stream: &mut TcpStream| {
        respond(
            stream,
            "404 Not Found",
            &[],
            b"{\"error\": \"not found\"}",
            head_only,
        )
    };
    // GET /api/models/{owner}/{name}/revision/{rev}
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let Some((repo_id, revision)) = rest.split_once("/revision/") else {
            return not_found(&mut stream);
        };
        let Some(repo) = repos.get(repo_id) else {
            // The hub's answer to an anonymous request for a repository it does not have.
            return respond(
                &mut stream,
                "401 Unauthorized",
                &[("X-Error-Code", "RepoNotFound".to_string())],
                b"{\"error\": \"Repository not found\"}",
                head_only,
            );
        };
        if revision != "main" && revision != repo.commit {
            return not_found(&mut stream);
        }
        let mut siblings: Vec<serde_json::Value> = repo
            .files
            .iter()
            .map(|(name, bytes)| {
                let mut entry = serde_json::json!({"rfilename": name, "size": bytes.len()});
                if !behaviour.no_blob_ids {
                    entry["blobId"] = Repo::blob_id(name, bytes).into();
                }
                if is_lfs(name) {
                    entry["lfs"] = serde_json::json!({
                        "sha256": sha256_hex(bytes), "size": bytes.len(), "pointerSize": 134
                    });
                }
                entry
            })
            .collect();
        for name in &behaviour.extra_names {
            siblings.push(serde_json::json!({"rfilename": name, "size": 4, "blobId": "0000"}));
        }
        let body = serde_json::json!({
            "id": repo_id, "modelId": repo_id, "sha": repo.commit, "siblings": siblings
        });
        return respond(
            &mut stream,
            "200 OK",
            &[("Content-Type", "application/json".to_string())],
            body.to_string().as_bytes(),
            head_only,
        );
    }
    // GET /storage/{repo}/{sha256}: LFS bytes, with ranges.
    let (repo_id, name, bytes, commit, redirect) =
        if let Some(rest) = path.strip_prefix("/storage/") {
            let Some((repo_id, sha)) = rest.rsplit_once('/') else {
                return not_found(&mut stream);
            };
            let Some(repo) = repos.get(repo_id) else {
                return not_found(&mut stream);
            };
            let Some((name, bytes)) = repo.files.iter().find(|(_, b)| sha256_hex(b) == sha) else {
                return not_found(&mut stream);
            };
            (
                repo_id,
                name.clone(),
                bytes.clone(),
                repo.commit.clone(),
                false,
            )
        } else {
            // /{owner}/{name}/resolve/{rev}/{file}
            let Some((repo_id, rest)) = path[1..].split_once("/resolve/") else {
                return not_found(&mut stream);
            };
            let Some(repo) = repos.get(repo_id) else {
                return not_found(&mut stream);
            };
            let Some((revision, file)) = rest.split_once('/') else {
                return not_found(&mut stream);
            };
            if revision != "main" && revision != repo.commit {
                return not_found(&mut stream);
            }
            let Some(bytes) = repo.files.get(file) else {
                return not_found(&mut stream);
            };
            (
                repo_id,
                file.to_string(),
                bytes.clone(),
                repo.commit.clone(),
                is_lfs(file),
            )
        };
    let repo_id = repo_id.to_string();
    let etag = Repo::etag(&name, &bytes);
    if redirect {
        return respond(
            &mut stream,
            "302 Found",
            &[
                ("Location", format!("/storage/{repo_id}/{etag}")),
                ("X-Linked-Etag", format!("\"{etag}\"")),
                ("X-Linked-Size", bytes.len().to_string()),
                ("X-Repo-Commit", commit.clone()),
                ("ETag", format!("\"{}\"", Repo::blob_id(&name, &bytes))),
            ],
            b"",
            head_only,
        );
    }
    let mut body = bytes.clone();
    if behaviour.corrupt.as_deref() == Some(name.as_str()) {
        let middle = body.len() / 2;
        body[middle] ^= 0x55;
    }
    let start = headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|s| s.parse::<usize>().ok());
    let mut response_headers = vec![
        ("ETag", format!("\"{etag}\"")),
        ("X-Repo-Commit", commit),
        ("Accept-Ranges", "bytes".to_string()),
    ];
    let (status, part) = match start {
        Some(start) if start >= body.len() => {
            response_headers.push(("Content-Range", format!("bytes */{}", body.len())));
            ("416 Range Not Satisfiable", Vec::new())
        }
        Some(start) => {
            response_headers.push((
                "Content-Range",
                format!("bytes {start}-{}/{}", body.len() - 1, body.len()),
            ));
            ("206 Partial Content", body[start..].to_vec())
        }
        None => ("200 OK", body),
    };
    if !head_only {
        if let Some((file, cut)) = behaviour.drop_once.clone() {
            if file == name {
                behaviour.drop_once = None;
                drop(behaviour);
                // Promise the whole file, send `cut` bytes, hang up.
                let mut text = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
                for (h, v) in &response_headers {
                    text.push_str(&format!("{h}: {v}\r\n"));
                }
                text.push_str(&format!("Content-Length: {}\r\n\r\n", part.len()));
                stream.write_all(text.as_bytes())?;
                stream.write_all(&part[..cut.min(part.len())])?;
                stream.flush()?;
                return stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }
    drop(behaviour);
    respond(&mut stream, status, &response_headers, &part, head_only)
}

/// The binary with the hub pointed at `server` and the cache at `cache`, and nothing of the
/// caller's hub settings (tokens, offline mode, proxies) leaking in.
fn ipcompose(server: &Server, cache: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ipcompose"));
    command.args(args);
    for var in [
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_TOKEN_PATH",
        "HF_HUB_OFFLINE",
        "HF_HOME",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        command.env_remove(var);
    }
    command
        .env("HF_ENDPOINT", &server.endpoint)
        .env("HF_HUB_CACHE", cache)
        // No token file either.
        .env("HF_HOME", cache.join("hf-home"));
    command
}

fn output(mut command: Command) -> (bool, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = command.output().expect("run ipcompose");
    (
        status.success(),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

const RECIPE: &str = "version: 1
models:
  base: {kind: sd15, source: tiny/sd15}
nodes:
  gen:
    generate:
      base: base
      prompt: \"a cozy house at dusk\"
      negative_prompt: \"lowres, blurry\"
      size: [64, 64]
      steps: 3
      scheduler: {kind: ddim}
      guidance: 7.5
      seed: 42
outputs:
  - {image: gen, path: out/house.png}
  - {latents: gen, path: out/house-latents.safetensors}
";

fn write_recipe(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The files a plain SD1.5 recipe needs of the repository.
const SD15_NEEDED: [&str; 12] = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
];

fn latents(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    tensors.tensor("latents").unwrap().data().to_vec()
}

#[test]
fn first_run_fetches_what_the_recipe_needs_and_the_second_asks_nothing() {
    let server = Server::start(vec![("tiny/sd15", sd15_repo())]);
    let dir = scratch("hub-first-run");
    let cache = dir.join("cache");
    let recipe = write_recipe(&dir, "house.yaml", RECIPE);
    let (ok, _, stderr) = output(ipcompose(
        &server,
        &cache,
        &["run", recipe.to_str().unwrap()],
    ));
    assert!(ok, "{stderr}");
    // The list of files and their sizes, with the total, before the download.
    assert!(
        stderr.contains("fetching 12 files of tiny/sd15")
            && stderr.contains("unet/diffusion_pytorch_model.safetensors")
            && stderr.contains("3.39 MB")
            && stderr.contains("in all"),
        "{stderr}"
    );
    // Exactly the needed files: no .bin duplicates, no fp16 UNet, no single file, no README.
    assert_eq!(server.fetched("tiny/sd15"), SD15_NEEDED);
    let listings = server
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/api/"))
        .count();
    assert_eq!(listings, 1);

    // The same latents as from the fixture folder itself.
    let local = dir.join("local");
    std::fs::create_dir_all(&local).unwrap();
    let local_recipe = write_recipe(
        &local,
        "house.yaml",
        &RECIPE.replace(
            "source: tiny/sd15",
            &format!("source: {}", fixtures().join("tiny-sd15").display()),
        ),
    );
    let (ok, _, stderr) = output(ipcompose(
        &server,
        &dir.join("unused-cache"),
        &["run", local_recipe.to_str().unwrap(), "--quiet"],
    ));
    assert!(ok, "{stderr}");
    assert_eq!(
        latents(&dir.join("out/house-latents.safetensors")),
        latents(&local.join("out/house-latents.safetensors")),
        "a model from the hub and the same folder on disk must give identical latents"
    );

    // The cache as huggingface_hub lays it out.
    let repo_dir = cache.join("models--tiny--sd15");
    let commit = std::fs::read_to_string(repo_dir.join("refs/main")).unwrap();
    assert_eq!(commit, sd15_repo().commit);
    let snapshot = repo_dir.join("snapshots").join(&commit);
    let unet = std::fs::read(fixtures().join("tiny-sd15/unet/diffusion_pytorch_model.safetensors"))
        .unwrap();
    let pointer = snapshot.join("unet/diffusion_pytorch_model.safetensors");
    assert_eq!(
        std::fs::read_link(&pointer).unwrap(),
        PathBuf::from(format!("../../../blobs/{}", sha256_hex(&unet)))
    );
    assert_eq!(
        std::fs::read_link(snapshot.join("model_index.json")).unwrap(),
        PathBuf::from(format!(
            "../../blobs/{}",
            Repo::blob_id(
                "model_index.json",
                &std::fs::read(fixtures().join("tiny-sd15/model_index.json")).unwrap()
            )
        ))
    );
    let blobs: Vec<String> = std::fs::read_dir(repo_dir.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(blobs.len(), 12, "{blobs:?}");
    assert!(blobs.iter().all(|b| !b.ends_with(".incomplete")));
    assert!(cache.join(".locks/models--tiny--sd15").is_dir());
    // The planner's resolver reads it.
    assert_eq!(
        ipcompose::pipeline::plan::source::resolve_in_cache(&cache, "tiny/sd15", "main").unwrap(),
        snapshot
    );

    // Second run: everything is cached, the hub is not asked anything.
    server.clear();
    let (ok, _, stderr) = output(ipcompose(
        &server,
        &cache,
        &["run", recipe.to_str().unwrap(), "--overwrite"],
    ));
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("fetching"), "{stderr}");
    let (ok, stdout, stderr) = output(ipcompose(
        &server,
        &cache,
        &["pull", recipe.to_str().unwrap()],
    ));
    assert!(
        ok && stdout.contains("tiny/sd15 (revision main): 12 files")
            && stdout.contains("all in the cache already"),
        "{stdout}{stderr}"
    );
    assert!(server.requests().is_empty(), "{:?}", server.requests());
}

#[test]
fn pull_takes_the_variant_single_files_and_sub_folders_only() {
    let server = Server::start(vec![
        ("tiny/sd15", sd15_repo()),
        ("tiny/adapters", adapters_repo()),
    ]);
    let dir = scratch("hub-pull");
    let recipe = write_recipe(
        &dir,
        "fp16.yaml",
        &RECIPE.replace("source: tiny/sd15}", "source: tiny/sd15, variant: fp16}"),
    );
    let cache = dir.join("cache-fp16");
    let (ok, stdout, stderr) = output(ipcompose(
        &server,
        &cache,
        &["pull", recipe.to_str().unwrap()],
    ));
    assert!(ok, "{stderr}");
    let fetched = server.fetched("tiny/sd15");
    assert!(
        fetched.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string())
            && !fetched.contains(&"unet/diffusion_pytorch_model.safetensors".to_string()),
        "{fetched:?}"
    );
    // The text encoder and VAE have no fp16 files: their plain ones, as the loaders fall back.
    assert!(fetched.contains(&"vae/diffusion_pytorch_model.safetensors".to_string()));
    assert!(
        stdout.contains("fetched 12 (") && stdout.contains("in all: 12 files"),
        "{stdout}"
    );
    // Planned from the cache alone.
    let (ok, stdout, stderr) = output(ipcompose(
        &server,
        &cache,
        &["validate", recipe.to_str().unwrap(), "--offline"],
    ));
    assert!(ok && stdout.contains("model base"), "{stdout}{stderr}");

    // A single-file base (its configs from the SD1.5 repository, no weights of it) and an
    // IP-Adapter file with its image encoder folder; blob ids left out of the listing, so
    // files outside LFS are named by the hub's HEAD answer.
    server.clear();
    server.set(|b| b.no_blob_ids = true);
    let recipe = write_recipe(
        &dir,
        "single.yaml",
        &RECIPE
            .replace(
                "  base: {kind: sd15, source: tiny/sd15}",
                "  base: {kind: sd15, source: tiny/adapters/tiny-sd15.safetensors, config: tiny/sd15}\n  \
                 style: {kind: ip-adapter, source: tiny/adapters/models/ip-adapter_tiny.safetensors, image_encoder: tiny/adapters/models/image_encoder}",
            ),
    );
    let cache = dir.join("cache-single");
    let (ok, stdout, stderr) = output(ipcompose(
        &server,
        &cache,
        &["pull", recipe.to_str().unwrap()],
    ));
    assert!(ok, "{stdout}{stderr}");
    assert_eq!(
        server.fetched("tiny/adapters"),
        [
            "models/image_encoder/config.json",
            "models/image_encoder/model.safetensors",
            "models/ip-adapter_tiny.safetensors",
            "tiny-sd15.safetensors"
        ]
    );
    assert_eq!(
        server.fetched("tiny/sd15"),
        [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "tokenizer/merges.txt",
            "tokenizer/special_tokens_map.json",
            "tokenizer/tokenizer_config.json",
            "tokenizer/vocab.json",
            "unet/config.json",
            "vae/config.json",
        ]
    );
    assert!(server
        .requests()
        .iter()
        .any(|r| r.method == "HEAD" && r.path.ends_with("models/image_encoder/config.json")));
    let (ok, stdout, stderr) = output(ipcompose(
        &server,
        &cache,
        &["validate", recipe.to_str().unwrap(), "--offline"],
    ));
    assert!(
        ok && stdout.contains("ip-adapter style"),
        "{stdout}{stderr}"
    );
}

#[test]
fn an_interrupted_download_resumes_with_a_range_request() {
    let server = Server::start(vec![("tiny/sd15", sd15_repo())]);
    let dir = scratch("hub-resume");
    let cache = dir.join("cache");
    let recipe = write_recipe(&dir, "house.yaml", RECIPE);
    let unet_name = "unet/diffusion_pytorch_model.safetensors";
    let unet = std::fs::read(fixtures().join("tiny-sd15").join(unet_name)).unwrap();
    let vae_name = "vae/diffusion_pytorch_model.safetensors";
    let vae = std::fs::read(fixtures().join("tiny-sd15").join(vae_name)).unwrap();
    // A previous run stopped after 100000 bytes of the VAE.
    let blobs = cache.join("models--tiny--sd15/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::write(
        blobs.join(format!("{}.incomplete", sha256_hex(&vae))),
        &vae[..100_000],
    )
    .unwrap();
    // This run loses its connection 1 MB into the UNet.
    server.set(|b| b.drop_once = Some((unet_name.to_string(), 1_000_000)));
    let (ok, stdout, stderr) = output(ipcompose(
        &server,
        &cache,
        &["pull", recipe.to_str().unwrap()],
    ));
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!("{vae_name}: resuming at 100 kB"))
            && stderr.contains("at 1.00 MB of 3.39 MB; resuming"),
        "{stderr}"
    );
    let storage = |data: &[u8]| format!("/storage/tiny/sd15/{}", sha256_hex(data));
    let ranges: Vec<(String, Option<String>)> = server
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/storage/"))
        .map(|r| (r.path, r.range))
        .collect();
    assert!(
        ranges.contains(&(storage(&unet), None))
            && ranges.contains(&(storage(&unet), Some("bytes=1000000-".to_string())))
            && ranges.contains(&(storage(&vae), Some("bytes=100000-".to_string())))
            && !ranges.contains(&(storage(&vae), None)),
        "{ranges:?}"
    );
    // Whole and verified.
    assert_eq!(std::fs::read(blobs.join(sha256_hex(&unet))).unwrap(), unet);
    assert_eq!(std::fs::read(blobs.join(sha256_hex(&vae))).unwrap(), vae);
}

#[test]
fn a_corrupt_download_is_deleted_and_named() {
    let server = Server::start(vec![("tiny/sd15", sd15_repo())]);
    let dir = scratch("hub-corrupt");
    let cache = dir.join("cache");
    let recipe = write_recipe(&dir, "house.yaml", RECIPE);
    let vae_name = "vae/diffusion_pytorch_model.safetensors";
    let vae = std::fs::read(fixtures().join("tiny-sd15").join(vae_name)).unwrap();
    server.set(|b| b.corrupt = Some(vae_name.to_string()));
    let (ok, stdout, stderr) = output(ipcompose(
        &server,
        &cache,
        &["run", recipe.to_str().unwrap()],
    ));
    assert!(!ok, "{stdout}{stderr}");
    assert!(
        stderr.contains(vae_name)
            && stderr.contains("SHA-256")
            && stderr.contains(&sha256_hex(&vae))
            && stderr.contains("house.yaml:3"),
        "{stderr}"
    );
    let blobs = cache.join("models--tiny--sd15/blobs");
    assert!(!blobs.join(sha256_hex(&vae)).exists());
    assert!(!blobs
        .join(format!("{}.incomplete", sha256_hex(&vae)))
        .exists());
    assert!(!dir.join("out/house.png").exists());
    // Served right, the next run fetches it.
    server.set(|b| b.corrupt = None);
    let (ok, _, stderr) = output(ipcompose(
        &server,
        &cache,
        &["pull", recipe.to_str().unwrap()],
    ));
    assert!(ok, "{stderr}");
    assert_eq!(std::fs::read(blobs.join(sha256_hex(&vae))).unwrap(), vae);
}

#[test]
fn a_gated_model_asks_for_the_license_and_a_token() {
    let server = Server::start(vec![("tiny/sd15", sd15_repo())]);
    server.set(|b| b.token = Some("hf_test_token".to_string()));
    let dir = scratch("hub-token");
    let cache = dir.join("cache");
    let recipe = write_recipe(&dir, "house.yaml", RECIPE);
    let (ok, _, stderr) = output(ipcompose(
        &server,
        &cache,
        &["pull", recipe.to_str().unwrap()],
    ));
    assert!(!ok);
    let page = format!("{}/tiny/sd15", server.endpoint);
    assert!(
        stderr.contains("HTTP 401")
            && stderr.contains("the model is gated: accept its license")
            && stderr.contains(&page)
            && stderr.contains("HF_TOKEN"),
        "{stderr}"
    );
    let mut wrong = ipcompose(&server, &cache, &["pull", recipe.to_str().unwrap()]);
    wrong.env("HF_TOKEN", "hf_wrong");
    let (ok, _, stderr) = output(wrong);
    assert!(!ok && stderr.contains("does not give access"), "{stderr}");
    let mut right = ipcompose(&server, &cache, &["pull", recipe.to_str().unwrap()]);
    right.env("HF_TOKEN", "hf_test_token");
    let (ok, _, stderr) = output(right);
    assert!(ok, "{stderr}");
    // A repository the hub does not know (perhaps a local path with a typo).
    let missing = write_recipe(
        &dir,
        "missing.yaml",
        &RECIPE.replace("tiny/sd15", "nobody/missing"),
    );
    let (ok, _, stderr) = output(ipcompose(
        &server,
        &cache,
        &["pull", missing.to_str().unwrap()],
    ));
    assert!(
        !ok && stderr.contains(
            "nobody/missing does not exist, and the hub has no repository `nobody/missing`"
        ),
        "{stderr}"
    );
    // The token file `hf auth login` writes ($HF_HOME/token) works as well.
    let cache = dir.join("cache-2");
    std::fs::create_dir_all(cache.join("hf-home")).unwrap();
    std::fs::write(cache.join("hf-home/token"), "hf_test_token\n").unwrap();
    let (ok, _, stderr) = output(ipcompose(
        &server,
        &cache,
        &["pull", recipe.to_str().unwrap()],
    ));
    assert!(ok, "{stderr}");
}

#[test]
fn offline_mode_names_the_missing_files_and_asks_nothing() {
    let server = Server::start(vec![("tiny/sd15", sd15_repo())]);
    let dir = scratch("hub-offline");
    let cache = dir.join("cache");
    let recipe = write_recipe(&dir, "house.yaml", RECIPE);
    let (ok, _, stderr) = output(ipcompose(
        &server,
        &cache,
        &["run", recipe.to_str().unwrap(), "--offline"],
    ));
    assert!(!ok);
    for needle in [
        "house.yaml:3",
        "offline: `tiny/sd15`",
        "models--tiny--sd15",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "tokenizer/vocab.json",
    ] {
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }
    let mut validate = ipcompose(&server, &cache, &["validate", recipe.to_str().unwrap()]);
    validate.env("HF_HUB_OFFLINE", "1");
    let (ok, _, stderr) = output(validate);
    assert!(!ok && stderr.contains("offline: `tiny/sd15`"), "{stderr}");
    assert!(server.requests().is_empty(), "{:?}", server.requests());
}

#[test]
fn validate_lists_what_is_missing_with_sizes() {
    let server = Server::start(vec![("tiny/sd15", sd15_repo())]);
    let dir = scratch("hub-validate");
    let cache = dir.join("cache");
    let recipe = write_recipe(&dir, "house.yaml", RECIPE);
    let (ok, _, stderr) = output(ipcompose(
        &server,
        &cache,
        &["validate", recipe.to_str().unwrap()],
    ));
    assert!(!ok);
    assert!(
        stderr.contains("12 files of `tiny/sd15`")
            && stderr.contains("unet/diffusion_pytorch_model.safetensors (3.39 MB)")
            && stderr.contains("ipcompose pull"),
        "{stderr}"
    );
    // Sizes come from the listing; no file was downloaded.
    assert!(server
        .requests()
        .iter()
        .all(|r| r.path.starts_with("/api/models/tiny/sd15/revision/main")));
    assert!(!cache.join("models--tiny--sd15/snapshots").exists());
}

#[test]
fn unsafe_names_in_the_listing_are_refused() {
    let server = Server::start(vec![("tiny/sd15", sd15_repo())]);
    server.set(|b| b.extra_names = vec!["../../evil.safetensors".to_string()]);
    let dir = scratch("hub-unsafe");
    let cache = dir.join("cache");
    let recipe = write_recipe(&dir, "house.yaml", RECIPE);
    let (ok, _, stderr) = output(ipcompose(
        &server,
        &cache,
        &["pull", recipe.to_str().unwrap()],
    ));
    assert!(!ok);
    assert!(
        stderr.contains("`../../evil.safetensors`") && stderr.contains("outside the repository"),
        "{stderr}"
    );
    assert!(server
        .requests()
        .iter()
        .all(|r| r.path.starts_with("/api/")));
    assert!(!cache.join("models--tiny--sd15/blobs").exists());
}

#[test]
fn concurrent_pulls_share_one_copy() {
    let server = Server::start(vec![("tiny/sd15", sd15_repo())]);
    let dir = scratch("hub-concurrent");
    let cache = dir.join("cache");
    let recipe = write_recipe(&dir, "house.yaml", RECIPE);
    let children: Vec<_> = (0..3)
        .map(|_| {
            let mut command = ipcompose(&server, &cache, &["pull", recipe.to_str().unwrap()]);
            command
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            command.spawn().unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Each LFS blob was downloaded once: the others waited on its lock, then found it.
    let mut storage: BTreeMap<String, usize> = BTreeMap::new();
    for r in server.requests() {
        if r.path.starts_with("/storage/") {
            *storage.entry(r.path).or_default() += 1;
        }
    }
    assert_eq!(storage.len(), 3, "{storage:?}");
    assert!(storage.values().all(|&n| n == 1), "{storage:?}");
    let snapshot = cache
        .join("models--tiny--sd15/snapshots")
        .join(sd15_repo().commit);
    for name in SD15_NEEDED {
        assert_eq!(
            std::fs::read(snapshot.join(name)).unwrap(),
            std::fs::read(fixtures().join("tiny-sd15").join(name)).unwrap(),
            "{name}"
        );
    }
}
