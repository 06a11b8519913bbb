//! Files the pipeline writes: images and latents (atomically), and the recipe embedded in each
//! PNG (provenance, content hashes).

pub mod output;
pub mod provenance;
