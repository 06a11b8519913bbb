//! The parity tests, gathered into one binary for GPU machines (`--features cuda` only): a GPU
//! machine has no Rust toolchain, so tools/gpu/build-cuda.sh builds this one binary, and
//! tools/gpu/device-check.sh runs it there with `IPCOMPOSE_TEST_DEVICE=cuda` (f32: the CPU
//! bounds) and `IPCOMPOSE_TEST_DTYPE=f16|bf16` (the end-to-end cases, half-precision bound).
//! On the CPU the same tests run from their own files.

// Each gathered file declares `mod common;` as it does when built alone.
#![allow(clippy::duplicate_mod)]

#[path = "parity_sd15.rs"]
mod parity_sd15;

#[path = "parity_ip_adapter.rs"]
mod parity_ip_adapter;

#[path = "parity_controlnet.rs"]
mod parity_controlnet;

#[path = "pipeline_controls.rs"]
mod pipeline_controls;

#[path = "pipeline_ip_adapter.rs"]
mod pipeline_ip_adapter;

#[path = "pipeline_chain.rs"]
mod pipeline_chain;

#[path = "pipeline_lora.rs"]
mod pipeline_lora;

#[path = "parity_sdxl.rs"]
mod parity_sdxl;

#[path = "parity_sdxl_control.rs"]
mod parity_sdxl_control;

#[path = "parity_sdxl_samplers.rs"]
mod parity_sdxl_samplers;

#[path = "pipeline_embedding.rs"]
mod pipeline_embedding;
