//! With the `cuda` feature, compiles kernels/ipcompose.cu to PTX (CUDA's nvcc, as candle's own
//! kernels need) for src/unet/cuda_ops.rs. Nothing happens without the feature.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels/ipcompose.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ptx = out.join("ipcompose.ptx");
    // PTX for the card's architecture (CUDA_COMPUTE_CAP, as candle-kernels reads it), 8.0
    // otherwise; the driver compiles PTX forward to newer cards.
    let cap = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .and_then(|c| c.trim().parse::<u32>().ok())
        .unwrap_or(80);
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let status = Command::new(&nvcc)
        .args([
            "--ptx",
            "-O3",
            "-std=c++17",
            &format!("-arch=compute_{cap}"),
            "-o",
        ])
        .arg(&ptx)
        .arg("kernels/ipcompose.cu")
        .status()
        .unwrap_or_else(|e| panic!("the `cuda` feature needs CUDA's nvcc (`{nvcc}`): {e}"));
    assert!(status.success(), "nvcc failed on kernels/ipcompose.cu");
}
