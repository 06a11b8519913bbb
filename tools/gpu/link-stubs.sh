#!/usr/bin/env bash
# Makes link-time stand-ins for the CUDA libraries candle links against (cudarc's
# `dynamic-linking`): libcuda, libnvrtc, libcurand, libcublas, libcublasLt, libcudnn (and the real libcudart). Each
# stand-in defines every function cudarc declares, under the real library's soname, so the
# binary links here without CUDA's multi-gigabyte libraries; at run time the GPU machine's
# real libraries (the driver's libcuda, PyTorch's nvidia-* wheels) are loaded instead, as
# NVIDIA's own `lib/stubs` are used. Prints the folder to put on LIBRARY_PATH.
set -euo pipefail
out=${1:-/tmp/cuda-link-stubs}
cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort -V | tail -1)
mkdir -p "$out"
while read -r module soname link; do
  src="$cudarc/src/$module/sys/mod.rs"
  c="$out/$link.c"
  grep -oE 'pub unsafe fn [A-Za-z0-9_]+\(' "$src" | sed -E 's/pub unsafe fn ([A-Za-z0-9_]+)\(/void \1(void) {}/' | sort -u > "$c"
  gcc -shared -fPIC -o "$out/$soname" -Wl,-soname,"$soname" "$c"
  ln -sf "$soname" "$out/lib$link.so"
done <<'LIBS'
driver libcuda.so.1 cuda
nvrtc libnvrtc.so.13 nvrtc
curand libcurand.so.10 curand
cublas libcublas.so.13 cublas
cublaslt libcublasLt.so.13 cublasLt
cudnn libcudnn.so.9 cudnn
LIBS
# candle-kernels' static GGUF kernels link the CUDA runtime: the real one from the wheel
# (nvcc-env.sh), under the unversioned name the linker looks for.
for dir in ${CUDA_ROOT:+"$CUDA_ROOT/lib"} ${CUDA_ROOT:+"$CUDA_ROOT/lib64"}; do
  if [ -e "$dir/libcudart.so.13" ]; then ln -sf "$dir/libcudart.so.13" "$out/libcudart.so"; fi
done
echo "$out"
