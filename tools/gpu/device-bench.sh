#!/usr/bin/env bash
# The one-shot GPU comparison, run ON the device machine (about 5 minutes on an H100):
# ipcompose (the binary from tools/gpu/build-cuda.sh, carried as .gpu/) against diffusers'
# fp16 on the same card, both at 512x512 with CFG, written to $OUT and printed side by side.
#
# From this workplace (see the device tool's README), after build-cuda.sh and fetching the
# diffusers wheel into .whl/ (pip download --no-deps ... diffusers==0.42.1):
#   run(command="bash tools/gpu/device-bench.sh", carry=[".gpu", ".whl"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-bench}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
figures=unet_step,unet_step_ip,unet_step_cn1,unet_step_cn2,run_20,load
for dtype in f16 bf16; do
  ./.gpu/ipcompose bench --device cuda --dtype "$dtype" --figures "$figures" --repeats 5 --json \
    | tee "$OUT/ipcompose-$dtype.jsonl"
done
for dtype in fp16 bf16; do
  PYTHONUNBUFFERED=1 python3 tools/bench_diffusers.py --device cuda --dtype "$dtype" \
    --figures "$figures" --repeats 5 --json | tee "$OUT/diffusers-$dtype.jsonl"
done
python3 tools/bench_diffusers.py --compare "$OUT/ipcompose-f16.jsonl" "$OUT/diffusers-fp16.jsonl" | tee "$OUT/compare-fp16.txt"
python3 tools/bench_diffusers.py --compare "$OUT/ipcompose-bf16.jsonl" "$OUT/diffusers-bf16.jsonl" | tee "$OUT/compare-bf16.txt"
