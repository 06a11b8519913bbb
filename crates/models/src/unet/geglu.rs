//! GEGLU's gate, `value · gelu(gate)`, in one pass over the projection on the CPU.
//!
//! The stock form narrows the `[.., 2·inner]` projection into two strided halves, runs
//! candle's scalar `gelu_erf` (libm's `erff`, 3.5% of a UNet step) over one into a new tensor
//! and multiplies it with the other into a third. Here each row is read once and the product
//! written once, with `erf` vectorised under AVX2 + FMA.
//!
//! `gelu(x) = ½ x (1 + erf(x/√2))`, and `1 + erf(±z) = 2 - erfc(z)` or `erfc(z)`; `erfc` is
//! Abramowitz & Stegun 7.1.26 (absolute error ≤ 1.5e-7), so the result is within
//! `|x| · 1e-7` of the exact GELU: float rounding for the activations it sees.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};

const P: f32 = 0.327_591_1;
const A: [f32; 5] = [
    0.254_829_6,
    -0.284_496_74,
    1.421_413_8,
    -1.453_152_1,
    1.061_405_4,
];

struct GegluGate;

/// `value · gelu_erf(gate)` for a projection whose last dimension is `[value | gate]`; the
/// fused CPU kernel for contiguous f32 input, candle's ops otherwise.
pub fn geglu_gate(projected: &Tensor) -> Result<Tensor> {
    let width = projected.dim(D::Minus1)?;
    if width % 2 != 0 {
        candle_core::bail!("geglu: the projection's last dimension {width} is odd");
    }
    if projected.device().is_cpu() && projected.dtype() == DType::F32 && projected.is_contiguous() {
        return projected.apply_op1_no_bwd(&GegluGate);
    }
    if super::cuda_ops::fused_kernels_for(projected) && projected.dtype().is_float() {
        return super::cuda_ops::geglu(projected);
    }
    let half = width / 2;
    let value = projected.narrow(D::Minus1, 0, half)?;
    let gate = projected.narrow(D::Minus1, half, half)?;
    value * gate.gelu_erf()?
}

impl CustomOp1 for GegluGate {
    fn name(&self) -> &'static str {
        "geglu-gate"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some(input) = super::contiguous_f32(storage, layout) else {
            candle_core::bail!("geglu takes a contiguous f32 tensor")
        };
        let mut dims = layout.shape().dims().to_vec();
        let half = dims.last().copied().unwrap_or(0) / 2;
        if let Some(last) = dims.last_mut() {
            *last = half;
        }
        let mut out = vec![0f32; input.len() / 2];
        if half > 0 {
            use rayon::prelude::*;
            out.par_chunks_mut(half)
                .zip(input.par_chunks(2 * half))
                .for_each(|(out, row)| {
                    let (value, gate) = row.split_at(half);
                    gated_row(value, gate, out);
                });
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

fn gated_row(value: &[f32], gate: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { avx2::gated_row(value, gate, out) };
    }
    for ((o, &v), &g) in out.iter_mut().zip(value).zip(gate) {
        *o = v * gelu(g);
    }
}

/// The scalar GELU, the same formula as the vector path.
fn gelu(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + P * z);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let erfc = poly * (-z * z).exp();
    let one_plus_erf = if x >= 0.0 { 2.0 - erfc } else { erfc };
    0.5 * x * one_plus_erf
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{A, P};
    use crate::unet::softmax_block::exp_avx2 as exp;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn gelu(x: __m256) -> __m256 {
        let sign_bit = _mm256_set1_ps(-0.0);
        let z = _mm256_mul_ps(
            _mm256_andnot_ps(sign_bit, x),
            _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
        );
        let one = _mm256_set1_ps(1.0);
        let t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(P), z, one));
        let mut poly = _mm256_set1_ps(A[4]);
        for a in [A[3], A[2], A[1], A[0]] {
            poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(a));
        }
        let poly = _mm256_mul_ps(poly, t);
        let neg_z2 = _mm256_xor_ps(_mm256_mul_ps(z, z), sign_bit);
        let erfc = _mm256_mul_ps(poly, exp(neg_z2));
        let positive = _mm256_cmp_ps::<_CMP_GE_OQ>(x, _mm256_setzero_ps());
        let one_plus_erf =
            _mm256_blendv_ps(erfc, _mm256_sub_ps(_mm256_set1_ps(2.0), erfc), positive);
        _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5), x), one_plus_erf)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gated_row(value: &[f32], gate: &[f32], out: &mut [f32]) {
        let n = out.len().min(value.len()).min(gate.len());
        let vectors = n / 8 * 8;
        for i in (0..vectors).step_by(8) {
            let g = gelu(_mm256_loadu_ps(gate.as_ptr().add(i)));
            let v = _mm256_loadu_ps(value.as_ptr().add(i));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(v, g));
        }
        for i in vectors..n {
            out[i] = value[i] * super::gelu(gate[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unet::test_support::max_abs_diff;
    use candle_core::Device;

    /// Against candle's `value · gelu_erf(gate)` in f64 (libm's `erf`), on rows whose width is
    /// not a multiple of the vector width; the error bound is `|x| · 1.5e-7` plus rounding.
    #[test]
    fn matches_gelu_erf_in_f64() {
        let device = Device::Cpu;
        let (rows, half) = (3, 37);
        let projected: Vec<f32> = (0..rows * 2 * half)
            .map(|i| ((i * 7919) % 997) as f32 / 997.0 * 16.0 - 8.0)
            .collect();
        let input = Tensor::from_vec(projected, (1, rows, 2 * half), &device).unwrap();
        let fused = geglu_gate(&input).unwrap();
        let reference = {
            let x = input.to_dtype(DType::F64).unwrap();
            let value = x.narrow(D::Minus1, 0, half).unwrap();
            let gate = x.narrow(D::Minus1, half, half).unwrap();
            (value * gate.gelu_erf().unwrap()).unwrap()
        };
        let fused = fused.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let reference = reference.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let input = input.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (i, (f, r)) in fused.iter().zip(&reference).enumerate() {
            let (row, col) = (i / half, i % half);
            let value = input[row * 2 * half + col] as f64;
            let gate = input[row * 2 * half + half + col] as f64;
            let tolerance = value.abs() * (gate.abs() * 1.5e-7 + 2.4e-7 * gate.abs()) + 1e-7;
            assert!(
                (*f as f64 - r).abs() <= tolerance,
                "value {value} gate {gate}: {f} vs {r}"
            );
        }
        for x in [-9.0f32, -3.0, -0.5, 0.0, 1e-3, 2.0, 9.0] {
            let mut out = [0f32; 9];
            gated_row(&[1.0; 9], &[x; 9], &mut out);
            // The tail is the scalar formula without FMA: equal to rounding.
            let tail = out[8];
            assert!(
                out.iter()
                    .all(|&o| (o - tail).abs() <= 1e-6 * tail.abs() + 1e-9),
                "vector and tail lanes differ at {x}: {out:?}"
            );
        }
    }

    #[test]
    fn other_inputs_take_candles_ops() {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 6), &device).unwrap();
        let transposed = x.t().unwrap().contiguous().unwrap().t().unwrap();
        let fused = geglu_gate(&x).unwrap();
        let stock = geglu_gate(&transposed).unwrap();
        let diff = max_abs_diff(&fused, &stock);
        assert!(diff < 1e-5, "{diff}");
        assert!(geglu_gate(&Tensor::zeros((2, 5), DType::F32, &device).unwrap()).is_err());
    }
}
