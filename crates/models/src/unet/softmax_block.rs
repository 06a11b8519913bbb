//! The softmax of a block of attention scores stored key-major (`scores[key][row]`), 16 query
//! rows side by side, as the fused attention lays them out.
//!
//! In that layout every step over the keys touches the 16 rows at once, so the running
//! maximum, the exponentials and the sums are whole-vector operations with no horizontal
//! reduction. The exponential is the Cephes single-precision polynomial (the one torch's
//! vectorised CPU kernels and `avx_mathfun` use, about 1 ulp): with AVX2 + FMA it runs eight
//! lanes at a time; glibc's scalar `expf` took 7% of a UNet step.

/// Query rows per block: two AVX2 vectors.
pub const LANES: usize = 16;

/// Replaces each `scores[j * LANES + r]` (for `j < keys`) by `exp(scale · (s - max_r))` with
/// `max_r` the row's largest score, and returns each row's sum of the exponentials. Every
/// lane is computed; lanes past the block's real rows hold finite leftovers and are ignored
/// by the caller.
pub fn softmax_numerators(scores: &mut [f32], keys: usize, scale: f32) -> [f32; LANES] {
    let scores = &mut scores[..keys * LANES];
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { avx2::softmax_numerators(scores, keys, scale) };
    }
    softmax_numerators_scalar(scores, keys, scale)
}

fn softmax_numerators_scalar(scores: &mut [f32], keys: usize, scale: f32) -> [f32; LANES] {
    let mut max = [f32::NEG_INFINITY; LANES];
    for key in scores.chunks_exact(LANES).take(keys) {
        for (m, &s) in max.iter_mut().zip(key) {
            *m = m.max(s);
        }
    }
    let mut sums = [0f32; LANES];
    for key in scores.chunks_exact_mut(LANES).take(keys) {
        for ((s, m), sum) in key.iter_mut().zip(&max).zip(sums.iter_mut()) {
            *s = (scale * (*s - m)).exp();
            *sum += *s;
        }
    }
    sums
}

#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::exp as exp_avx2;

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::LANES;
    use std::arch::x86_64::*;

    /// Cephes `expf`: `exp(x) = 2^n · e^r` with `n = round(x · log2 e)`, `r = x - n ln 2`
    /// (ln 2 split in two for exactness) and a degree-5 polynomial for `e^r`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn exp(x: __m256) -> __m256 {
        let x = _mm256_min_ps(x, _mm256_set1_ps(88.376_26));
        let x = _mm256_max_ps(x, _mm256_set1_ps(-88.376_26));
        let n = _mm256_floor_ps(_mm256_fmadd_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(0.5),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let p = _mm256_fmadd_ps(
            p,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let exponent = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(p, _mm256_castsi256_ps(exponent))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax_numerators(
        scores: &mut [f32],
        keys: usize,
        scale: f32,
    ) -> [f32; LANES] {
        debug_assert!(scores.len() >= keys * LANES);
        let base = scores.as_mut_ptr();
        let (mut max0, mut max1) = (
            _mm256_set1_ps(f32::NEG_INFINITY),
            _mm256_set1_ps(f32::NEG_INFINITY),
        );
        for j in 0..keys {
            let p = base.add(j * LANES);
            max0 = _mm256_max_ps(max0, _mm256_loadu_ps(p));
            max1 = _mm256_max_ps(max1, _mm256_loadu_ps(p.add(8)));
        }
        let scale = _mm256_set1_ps(scale);
        // exp(scale · s - scale · max), one FMA for the argument.
        let (shift0, shift1) = (_mm256_mul_ps(scale, max0), _mm256_mul_ps(scale, max1));
        let (mut sum0, mut sum1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for j in 0..keys {
            let p = base.add(j * LANES);
            let e0 = exp(_mm256_fmsub_ps(scale, _mm256_loadu_ps(p), shift0));
            let e1 = exp(_mm256_fmsub_ps(scale, _mm256_loadu_ps(p.add(8)), shift1));
            _mm256_storeu_ps(p, e0);
            _mm256_storeu_ps(p.add(8), e1);
            sum0 = _mm256_add_ps(sum0, e0);
            sum1 = _mm256_add_ps(sum1, e1);
        }
        let mut sums = [0f32; LANES];
        _mm256_storeu_ps(sums.as_mut_ptr(), sum0);
        _mm256_storeu_ps(sums.as_mut_ptr().add(8), sum1);
        sums
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(keys: usize, spread: f32) -> Vec<f32> {
        // A deterministic spread of values, positive and negative, some far below the max.
        (0..keys * LANES)
            .map(|i| spread * (((i * 7919) % 1009) as f32 / 1009.0 - 0.5) * 2.0)
            .collect()
    }

    /// The vector path against the softmax in f64. Forming the argument `scale · s - scale ·
    /// max` in f32 costs up to an ulp of each term, so the tolerance grows with them; the
    /// polynomial itself adds about one ulp of the result; below f32's normal range both
    /// paths flush to (near) zero.
    #[test]
    fn matches_the_softmax_in_f64() {
        for (keys, spread, scale) in [(1, 1.0, 1.0), (77, 30.0, 0.16), (4096, 200.0, 0.5)] {
            let original = scores(keys, spread);
            let mut fast = original.clone();
            let fast_sums = softmax_numerators(&mut fast, keys, scale);
            let mut scalar = original.clone();
            let scalar_sums = softmax_numerators_scalar(&mut scalar, keys, scale);
            for r in 0..LANES {
                let column = || (0..keys).map(|j| j * LANES + r);
                let max = column().map(|i| original[i]).fold(f32::MIN, f32::max);
                let mut sum = 0f64;
                for i in column() {
                    let exact = (scale as f64 * (original[i] as f64 - max as f64)).exp();
                    sum += exact;
                    let tolerance =
                        exact * 1.2e-7 * (2.0 + (scale * (original[i].abs() + max.abs())) as f64)
                            + 1e-37;
                    for (path, got) in [("vector", fast[i]), ("scalar", scalar[i])] {
                        let diff = (got as f64 - exact).abs();
                        assert!(diff <= tolerance, "{path} {got} vs {exact}");
                    }
                }
                for (path, got) in [("vector", fast_sums[r]), ("scalar", scalar_sums[r])] {
                    assert!(
                        (got as f64 - sum).abs() <= 1e-5 * sum,
                        "{path} sum {got} vs {sum}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_largest_score_of_each_row_maps_to_one() {
        let keys = 33;
        let mut s = scores(keys, 5.0);
        s[5 * LANES + 3] = 100.0;
        softmax_numerators(&mut s, keys, 1.0);
        assert_eq!(s[5 * LANES + 3], 1.0);
        assert!(s.iter().all(|&x| (0.0..=1.0).contains(&x)));
    }
}
