//! Models from the Hugging Face hub, in the cache layout huggingface_hub writes.
//!
//! - [`request`]: what a recipe needs from a repository, turned into files by the loaders'
//!   rules (configs, the `variant`'s weights, safetensors before pickles, sharded indexes);
//! - [`cache`]: the standard cache (`models--owner--name/{blobs,refs,snapshots}`), shared
//!   with diffusers and `hf`, and what it holds of a request;
//! - [`listing`]: the hub's description of a repository (commit, files, sizes, SHA-256s);
//! - `download` (feature `download`): the client that fills the cache: resumable
//!   (`.incomplete` files and HTTP ranges), every LFS file checked against its SHA-256, lock
//!   files against concurrent runs, `HF_ENDPOINT` / `HF_TOKEN` / `HF_HUB_OFFLINE` honoured.
//!
//! Without the `download` feature nothing here touches the network.

pub mod cache;
#[cfg(feature = "download")]
pub mod download;
pub mod env;
pub mod error;
pub mod listing;
pub mod request;

pub use cache::{check, CacheCheck, RepoCache};
pub use env::HubEnv;
pub use error::{HubError, Result};
pub use listing::{Listing, RemoteFile};
pub use request::{Item, RepoRequest, Shape};

/// Sizes as people read them: `541 B`, `3.44 MB`, `4.27 GB` (powers of 1000, as the hub's
/// pages show them).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1000.0;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    let digits = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    };
    format!("{value:.digits$} {}", UNITS[unit])
}

/// Reports a download as it goes (the command line draws progress bars with it).
pub trait Progress {
    /// Before the first byte: the files about to be downloaded with their sizes.
    fn begin(&mut self, _repo: &str, _commit: &str, _files: &[(String, u64)]) {}
    /// A file starts; `done` bytes of it were already there (a resumed download).
    fn file_start(&mut self, _name: &str, _size: u64, _done: u64) {}
    fn advance(&mut self, _bytes: u64) {}
    /// Bytes counted for the current file are dropped (a download restarted from zero).
    fn rewind(&mut self, _bytes: u64) {}
    fn file_done(&mut self, _name: &str) {}
    /// Something worth saying (a lost connection being resumed).
    fn note(&mut self, _message: &str) {}
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_as_the_hub_shows_them() {
        assert_eq!(super::human_size(541), "541 B");
        assert_eq!(super::human_size(3_438_167_536), "3.44 GB");
        assert_eq!(super::human_size(334_643_268), "335 MB");
        assert_eq!(super::human_size(12_345), "12.3 kB");
    }
}
