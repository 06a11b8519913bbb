# Sourced by build-cuda.sh and .ci/run: puts CUDA 13.0's nvcc and headers from PyPI wheels on
# PATH/CPATH (installed once into $NVCC_VENV). Only candle's kernels are compiled with them.
venv=${NVCC_VENV:-/tmp/nvcc-venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if [ ! -x "$venv/lib/python3"*/site-packages/nvidia/cu13/bin/nvcc ] 2>/dev/null; then
  "$venv/bin/pip" install -q "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-runtime==13.0.*"
fi
cu13=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
export CUDA_ROOT="$cu13" CUDA_PATH="$cu13" PATH="$cu13/bin:$PATH"
export CPATH="$cu13/include${CPATH:+:$CPATH}"
export LIBRARY_PATH="$cu13/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
