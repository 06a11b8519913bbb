#!/usr/bin/env bash
# The one prepared GPU check, run ON a GPU machine that has CUDA's driver, PyTorch and
# transformers but no Rust toolchain and no network (at most BUDGET=530 s):
#   (a) the parity tests on --device cuda: f32 with the CPU bounds, then the end-to-end cases
#       in f16 and bf16 with the half-precision bound (tests/common);
#   (b) `ipcompose bench --device cuda` against tools/bench_diffusers.py on the same card, f16
#       and bf16, SD1.5 512x512 with CFG: UNet step, + IP-Adapter, + 1 and 2 ControlNets,
#       20-step run with VAE decode, load; host<->device bytes per step;
#   (c) $OUT/report.md and $OUT/report.json (tools/gpu/report.py), printed last.
#
# From a workplace without a GPU: build with `PIP_NVCC=1 TESTS=1 bash tools/gpu/build-cuda.sh`
# (puts .gpu/ipcompose.xz and .gpu/gpu_parity.xz in .gpu/), fetch the diffusers wheel into
# .whl/ (README "GPU"), then run this script there with .gpu and .whl carried.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
started=$(date +%s)
# Everything ends by BUDGET seconds (one 10-minute device call, with room for the report).
BUDGET=${BUDGET:-530}
log() { echo "[$(( $(date +%s) - started ))s] $*"; }
# A phase's time limit: at most $1 seconds, and never past the budget.
limit() {
  local left=$(( BUDGET - ($(date +%s) - started) ))
  [ "$left" -lt "$1" ] && echo $(( left > 5 ? left : 5 )) || echo "$1"
}

# --- Python side: diffusers from the carried wheels -------------------------------------------
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi

# --- Binaries: carried compressed (the carried tree is limited to 64 MiB) ---------------------
mkdir -p /tmp/gpu-bin
for f in .gpu/*.xz; do
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    "$f" "/tmp/gpu-bin/$(basename "$f" .xz)"
done
chmod +x /tmp/gpu-bin/*
# CUDA's user-space libraries the binaries were linked against: PyTorch's nvidia-* wheels.
LIBDIRS=$(python3 - <<'PY'
import glob, os, site
names = ["libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcurand.so.10", "libnvrtc.so.13", "libcudnn.so.9"]
dirs = []
for name in names:
    for root in site.getsitepackages():
        hits = glob.glob(os.path.join(root, "nvidia", "**", name), recursive=True)
        if hits:
            d = os.path.dirname(hits[0])
            if d not in dirs:
                dirs.append(d)
            break
print(":".join(dirs))
PY
)
export LD_LIBRARY_PATH="$LIBDIRS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The test binary finds its fixtures through the path it was built in.
built_in=$(cat .gpu/built-in.txt 2>/dev/null)
if [ -n "$built_in" ] && [ ! -e "$built_in" ]; then mkdir -p "$(dirname "$built_in")" && ln -sfn "$PWD" "$built_in"; fi
mkdir -p target/tmp

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nvcc --version 2>/dev/null | tail -1
  python3 -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)'
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  echo "fixtures built in: $built_in"
  ldd /tmp/gpu-bin/ipcompose | grep -E 'cu|nvrtc|not found'
  lscpu | grep -E 'Model name|^CPU\(s\)'
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

# --- (a) parity on the GPU ---------------------------------------------------------------------
log "parity f32"
# (pytorch_bin: its fixture folder stays home; the device run's tree is trimmed to fit.)
IPCOMPOSE_TEST_DEVICE=cuda timeout "$(limit 120)" /tmp/gpu-bin/gpu_parity --nocapture --test-threads 4 \
  --skip pytorch_bin --skip embed_command > "$OUT/parity-f32.log" 2>&1
echo "exit $?" >> "$OUT/parity-f32.log"
tail -3 "$OUT/parity-f32.log"

# --- (b) benchmarks ------------------------------------------------------------------------------
figures=unet_step,unet_step_ip,unet_step_cn1,unet_step_cn2,run_20,load
: > "$OUT/ipcompose.jsonl"; : > "$OUT/diffusers.jsonl"; : > "$OUT/bench.log"
for pair in "f16 fp16" "bf16 bf16"; do
  set -- $pair
  log "bench ipcompose $1"
  timeout "$(limit 120)" /tmp/gpu-bin/ipcompose bench --device cuda --dtype "$1" --figures "$figures,precision" \
    --repeats 5 --warmup 1 --json >> "$OUT/ipcompose.jsonl" 2>> "$OUT/bench.log" \
    || echo "ipcompose bench $1: exit $?" >> "$OUT/bench.log"
  log "bench diffusers $2"
  PYTHONUNBUFFERED=1 timeout "$(limit 100)" python3 tools/bench_diffusers.py --device cuda --dtype "$2" \
    --figures "$figures" --repeats 5 --warmup 1 --json >> "$OUT/diffusers.jsonl" 2>> "$OUT/bench.log" \
    || echo "diffusers bench $2: exit $?" >> "$OUT/bench.log"
  # Half precision parity right after the first bench pair (the bench is what must not be lost).
  if [ "$1" = f16 ] && [ "${VARIANTS:-1}" = 1 ]; then
    # Variants of the same f16 figures: candle's ops instead of ipcompose's fused kernels, and
    # a cuDNN build (--features cudnn) if one was carried.
    log "bench ipcompose f16, fused kernels off"
    IPCOMPOSE_CUDA_KERNELS=0 timeout "$(limit 60)" /tmp/gpu-bin/ipcompose bench --device cuda --dtype f16 \
      --figures unet_step,unet_step_cn1,run_20 --repeats 5 --warmup 1 --json 2>> "$OUT/bench.log" \
      | sed 's/"tool":"ipcompose"/"tool":"ipcompose-no-fused-kernels"/' >> "$OUT/ipcompose.jsonl"
    if [ -x /tmp/gpu-bin/ipcompose-cudnn ]; then
      log "bench ipcompose-cudnn f16"
      timeout "$(limit 60)" /tmp/gpu-bin/ipcompose-cudnn bench --device cuda --dtype f16 \
        --figures unet_step,unet_step_cn1,run_20 --repeats 5 --warmup 1 --json 2>> "$OUT/bench.log" \
        | sed 's/"tool":"ipcompose"/"tool":"ipcompose-cudnn"/' >> "$OUT/ipcompose.jsonl"
    fi
  fi
  if [ "$1" = f16 ]; then
    : > "$OUT/parity-half.log"
    for dt in f16 bf16; do
      log "parity $dt"
      echo "=== dtype $dt" >> "$OUT/parity-half.log"
      IPCOMPOSE_TEST_DEVICE=cuda IPCOMPOSE_TEST_DTYPE=$dt timeout "$(limit 60)" /tmp/gpu-bin/gpu_parity \
        --nocapture --test-threads 4 --skip pytorch_bin --skip embed_command parity_sd15:: parity_sdxl:: pipeline_ \
        >> "$OUT/parity-half.log" 2>&1
      echo "exit $? ($dt)" >> "$OUT/parity-half.log"
      tail -2 "$OUT/parity-half.log"
    done
  fi
done

# --- (c) report ------------------------------------------------------------------------------------
log "report"
python3 tools/gpu/report.py "$OUT" | tee "$OUT/report.md"
log "done"
