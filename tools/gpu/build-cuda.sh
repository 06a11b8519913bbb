#!/usr/bin/env bash
# Builds the CUDA binary of ipcompose and puts it in .gpu/ (ignored by git), ready to be
# carried to a GPU machine that has no Rust toolchain (this workplace's device machines).
#
# Needs cargo and CUDA's nvcc. Without a system CUDA toolkit, nvcc and the CUDA headers can
# come from PyPI wheels (set PIP_NVCC=1): they only compile candle's kernels to PTX; the
# binary loads the driver's libcuda at run time, so it runs on any newer driver.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${PIP_NVCC:-0}" = 1 ]; then
  venv=${NVCC_VENV:-/tmp/nvcc-venv}
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q nvidia-cuda-nvcc-cu12 nvidia-cuda-runtime-cu12 nvidia-cublas-cu12 nvidia-curand-cu12
  nv=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))')/nvidia
  export CUDA_ROOT="$nv/cuda_nvcc" PATH="$nv/cuda_nvcc/bin:$PATH"
  export CPATH="$nv/cuda_runtime/include:$nv/cublas/include:$nv/curand/include:$nv/cuda_nvcc/include"
fi
nvcc --version | tail -1
# PTX for Volta and newer, so the H100/H200 JIT-compile what they need.
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-70}
cargo build --release --features cuda
mkdir -p .gpu
cp target/release/ipcompose .gpu/ipcompose
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
ls -l .gpu/ipcompose
