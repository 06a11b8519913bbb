//! Multi-head attention on the CPU without materialising the score matrix.
//!
//! The unfused form (`softmax(QKᵀ)V` from stock ops) writes a `4096 × 4096` score matrix per
//! head at the 64×64 latent level, 1 GiB per self-attention layer with CFG, and reads it back
//! three times; it is memory-bound. Here each thread takes a block of 16 query rows of one
//! head, computes that block's scores into a key-major buffer that stays in cache (256 KiB
//! with 4096 keys), takes the softmax down the keys on whole vectors and multiplies it with
//! V, reading Q, K, V and writing the output in their `[B, N, heads · d]` layout directly (no
//! head transposes or copies). The softmax is the same exact per-row
//! softmax as the unfused path (max, exp, sum over the whole row), so results agree to float
//! rounding.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::contiguous_f32;
use super::softmax_block::{softmax_numerators, LANES as QUERY_BLOCK};

struct FusedAttention {
    heads: usize,
    scale: f32,
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, n, c) = lq.shape().dims3()?;
        let m = lk.shape().dims3()?.1;
        let (q, k, v) = match (
            contiguous_f32(sq, lq),
            contiguous_f32(sk, lk),
            contiguous_f32(sv, lv),
        ) {
            (Some(q), Some(k), Some(v)) => (q, k, v),
            _ => candle_core::bail!("fused attention takes contiguous f32 tensors"),
        };
        let d = c / self.heads;
        let mut out = vec![0f32; b * n * c];
        // One task per (batch, head, query block); each writes its own rows and columns.
        let blocks = n.div_ceil(QUERY_BLOCK);
        // An address rather than a pointer, so the closure is Send + Sync.
        let out_addr = out.as_mut_ptr() as usize;
        (0..b * self.heads * blocks).into_par_iter().for_each_init(
            || vec![0f32; QUERY_BLOCK * m],
            |scores, task| {
                let (bh, block) = (task / blocks, task % blocks);
                let (batch, head) = (bh / self.heads, bh % self.heads);
                let row0 = block * QUERY_BLOCK;
                let rows = QUERY_BLOCK.min(n - row0);
                let q = &q[batch * n * c + row0 * c + head * d..];
                let k = &k[batch * m * c + head * d..];
                let v = &v[batch * m * c + head * d..];
                // SAFETY: tasks write disjoint (row, head-column) ranges of `out`, and the
                // pointer outlives the parallel loop.
                let out =
                    unsafe { (out_addr as *mut f32).add(batch * n * c + row0 * c + head * d) };
                attend_block(q, k, v, out, scores, rows, m, d, c, self.scale);
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, n, c))))
    }
}

/// `rows` query rows of one head: `out = softmax(scale · q kᵀ) v`. Rows of `q`, `k`, `v` and
/// `out` are `stride` apart; each row's head slice is `d` wide.
///
/// The scores are stored key-major, `scores[key][row]` (16 rows per key): the first product
/// writes them so without repacking, the softmax runs down the keys on whole vectors, and
/// the second product reads them as an already column-major left operand. With the rows
/// side by side (`scores[row][key]`) the second product had to transpose the whole block
/// into its packed layout, 5% of a UNet step.
#[allow(clippy::too_many_arguments)]
fn attend_block(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: *mut f32,
    scores: &mut [f32],
    rows: usize,
    m: usize,
    d: usize,
    stride: usize,
    scale: f32,
) {
    let stride = stride as isize;
    let lanes = QUERY_BLOCK as isize;
    // SAFETY: the slices start at this head's first element and hold at least
    // `(rows or m - 1) * stride + d` elements, as the strides below address; `scores` holds
    // `QUERY_BLOCK * m`.
    unsafe {
        // scores[m × rows, key-major] = (q[rows × d] · kᵀ[d × m])ᵀ
        gemm::gemm(
            rows,
            m,
            d,
            scores.as_mut_ptr(),
            lanes,
            1,
            false,
            q.as_ptr(),
            1,
            stride,
            k.as_ptr(),
            stride,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
    let sums = softmax_numerators(scores, m, scale);
    unsafe {
        // out[rows × d] = probs[rows × m] · v[m × d]
        gemm::gemm(
            rows,
            d,
            m,
            out,
            1,
            stride,
            false,
            scores.as_ptr(),
            lanes,
            1,
            v.as_ptr(),
            1,
            stride,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
        for (r, sum) in sums.iter().take(rows).enumerate() {
            let inv = 1.0 / sum;
            let row = out.offset(r as isize * stride);
            for j in 0..d {
                *row.add(j) *= inv;
            }
        }
    }
}

/// `softmax(QKᵀ/√d)V` per head for `[B, N, heads·d]` queries and `[B, M, heads·d]` keys and
/// values, computed blockwise on the CPU for contiguous f32 inputs; `None` otherwise (other
/// devices and dtypes take the unfused path).
pub fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Option<Tensor>> {
    let usable = |t: &Tensor| {
        t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous()
    };
    if !(usable(q) && usable(k) && usable(v)) || q.rank() != 3 {
        return Ok(None);
    }
    let c = q.dim(2)?;
    if c % heads != 0 || k.dims() != v.dims() || k.dim(2)? != c || k.dim(0)? != q.dim(0)? {
        return Ok(None);
    }
    let scale = 1.0 / ((c / heads) as f32).sqrt();
    Ok(Some(q.apply_op3_no_bwd(
        k,
        v,
        &FusedAttention { heads, scale },
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unet::test_support::max_abs_diff;
    use candle_core::Device;

    /// Against the stock-op path on odd sizes (a partial last query block, more keys than a
    /// block, self- and cross-attention shapes, a large score range).
    #[test]
    fn matches_the_unfused_attention() {
        let device = Device::Cpu;
        for (b, n, m, heads, d, spread) in [
            (2, 37, 37, 3, 8, 1.0),
            (1, 16, 77, 2, 40, 4.0),
            (2, 70, 5, 4, 16, 12.0),
        ] {
            let c = heads * d;
            let q = (Tensor::randn(0f32, 1.0, (b, n, c), &device).unwrap() * spread).unwrap();
            let k = Tensor::randn(0f32, 1.0, (b, m, c), &device).unwrap();
            let v = Tensor::randn(0f32, 1.0, (b, m, c), &device).unwrap();
            let fused = fused_attention(&q, &k, &v, heads).unwrap().unwrap();
            let reference = crate::unet::unfused_attention(&q, &k, &v, heads).unwrap();
            let diff = max_abs_diff(&fused, &reference);
            // Rounding only: the unfused path divides by the sum before the second product.
            assert!(diff < 1e-5, "b{b} n{n} m{m} heads{heads} d{d}: {diff}");
        }
    }

    #[test]
    fn other_layouts_take_the_unfused_path() {
        let device = Device::Cpu;
        let q = Tensor::zeros((1, 4, 8), candle_core::DType::F32, &device).unwrap();
        let transposed = Tensor::zeros((1, 8, 4), candle_core::DType::F32, &device)
            .unwrap()
            .t()
            .unwrap();
        assert!(fused_attention(&q, &transposed, &q, 2).unwrap().is_none());
        let half = q.to_dtype(candle_core::DType::F16).unwrap();
        assert!(fused_attention(&half, &half, &half, 2).unwrap().is_none());
    }
}
