#!/usr/bin/env bash
# Builds the CUDA binary of ipcompose (and, with TESTS=1, the CUDA test binaries) and puts
# them in .gpu/ (ignored by git), ready to be carried to a GPU machine that has no Rust
# toolchain.
#
# Needs cargo and CUDA's nvcc. Without a system CUDA toolkit (PIP_NVCC=1), nvcc, cicc and the
# headers come from the CUDA 13.0 PyPI wheels (the `-cu12` nvcc wheels hold only ptxas). 13.0
# matches driver 580: a newer nvcc may emit PTX an older driver refuses. The binary loads the
# GPU machine's libcuda, cuBLAS, cuRAND, NVRTC (and cuDNN) at run time; here it links against
# stand-ins with the same sonames (link-stubs.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${PIP_NVCC:-0}" = 1 ]; then
  source tools/gpu/nvcc-env.sh
fi
nvcc --version | tail -1
# Link-time stand-ins for CUDA's libraries (see link-stubs.sh); the real ones load at run time.
LIBRARY_PATH="$(bash tools/gpu/link-stubs.sh)${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LIBRARY_PATH
# sm_90 (H100/H200) by default; set CUDA_COMPUTE_CAP for other cards.
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
features=${FEATURES:-cuda}
cargo build --release --features "$features"
mkdir -p .gpu
# Carried compressed: what travels to the GPU machine is limited to 64 MiB with the fixtures.
# NAME: the carried binary's name (e.g. NAME=ipcompose-cudnn FEATURES=cudnn for a second one).
name=${NAME:-ipcompose}
strip -o ".gpu/$name" target/release/ipcompose
if [ "${TESTS:-0}" = 1 ]; then
  # The parity tests in one binary (tests/gpu_parity.rs), run there with IPCOMPOSE_TEST_DEVICE=cuda.
  exe=$(cargo test --release --features "$features" --test gpu_parity --no-run --message-format=json \
    | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu_parity":
        print(m["executable"])
')
  strip -o .gpu/gpu_parity "$exe"
  # Where the tests look for tests/fixtures (CARGO_MANIFEST_DIR, fixed at compile time).
  pwd > .gpu/built-in.txt
fi
for f in ".gpu/$name" .gpu/gpu_parity; do
  [ -f "$f" ] && xz -T2 -9 -f "$f"
done
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
ls -l .gpu/
