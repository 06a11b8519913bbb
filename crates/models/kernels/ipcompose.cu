// ipcompose's own CUDA kernels (the `cuda` feature): the UNet passes candle runs as many
// small kernels, fused into one pass each. Compiled to PTX by crates/models/build.rs and
// loaded by src/unet/cuda_ops.rs. Every kernel computes in f32 whatever the storage type.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16(v);
}

// Sum of `v` over the block; every thread gets the result. `shared` holds 32 floats.
__device__ float block_sum(float v, float *shared) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = (lane < warps) ? shared[lane] : 0.f;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    __syncthreads();  // `shared` is free again for the next call
    return v;
}

// GroupNorm (+ SiLU) of x [B, C, spatial] contiguous, one block per (batch, group): the mean,
// then the mean squared deviation (two passes, as torch and candle_nn), then the affine map
// with the per-channel weight and bias, all in f32, rounded once on the store.
template <typename T>
__device__ void group_norm(const T *x, T *y, const T *weight, const T *bias, int channels,
                           int spatial, int groups, float eps, int silu) {
    __shared__ float shared[32];
    const int batch = blockIdx.x / groups;
    const int group = blockIdx.x % groups;
    const int per_group = channels / groups;
    const size_t n = (size_t)per_group * spatial;
    const size_t offset = ((size_t)batch * channels + (size_t)group * per_group) * spatial;
    const T *xg = x + offset;
    T *yg = y + offset;
    float sum = 0.f;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) sum += to_f32(xg[i]);
    const float mean = block_sum(sum, shared) / (float)n;
    float squares = 0.f;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) {
        const float d = to_f32(xg[i]) - mean;
        squares += d * d;
    }
    const float var = block_sum(squares, shared) / (float)n;
    const float inv_std = 1.f / sqrtf(var + eps);
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) {
        const int c = group * per_group + (int)(i / spatial);
        float v = (to_f32(xg[i]) - mean) * inv_std * to_f32(weight[c]) + to_f32(bias[c]);
        if (silu) v = v / (1.f + expf(-v));
        yg[i] = from_f32<T>(v);
    }
}

// GEGLU's gate: out[r, j] = h[r, j] * gelu_erf(h[r, half + j]) for h [rows, 2 * half].
template <typename T>
__device__ void geglu(const T *h, T *out, size_t rows, size_t half) {
    const size_t total = rows * half;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / half, j = i % half;
        const float value = to_f32(h[r * 2 * half + j]);
        const float gate = to_f32(h[r * 2 * half + half + j]);
        const float gelu = 0.5f * gate * (1.f + erff(gate * 0.70710678118654752440f));
        out[i] = from_f32<T>(value * gelu);
    }
}

#define INSTANTIATE(T, SUFFIX)                                                                  \
    extern "C" __global__ void group_norm_##SUFFIX(const T *x, T *y, const T *weight,          \
                                                   const T *bias, int channels, int spatial,   \
                                                   int groups, float eps, int silu) {          \
        group_norm<T>(x, y, weight, bias, channels, spatial, groups, eps, silu);               \
    }                                                                                           \
    extern "C" __global__ void geglu_##SUFFIX(const T *h, T *out, size_t rows, size_t half) {  \
        geglu<T>(h, out, rows, half);                                                           \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)
