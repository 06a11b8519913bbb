//! 3×3 convolutions (stride 1, padding 1) on the CPU as one matrix product with the weights
//! read in place, for the coarse UNet levels that keep their plain weights.
//!
//! The input of the whole batch becomes one `[B·H·W, C_in·9]` patch matrix (small at these
//! levels: 8×8 latents), and `out[p][o] = Σ_k patches[p][k] · weight[o][k]` is a single GEMM
//! whose right operand is the `[C_out, C_in·3·3]` weight with unit row stride, which `gemm`
//! reads without repacking. candle's conv2d does one product per batch item (64 rows each at
//! 8×8) through its tiled im2col: 156 ms against 37 ms for 1280 channels at 8×8, batch 2.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

struct Im2ColConv<'a> {
    bias: Option<&'a [f32]>,
}

/// The convolution of a contiguous f32 CPU `[B, C_in, H, W]` tensor with a contiguous f32 CPU
/// `[C_out, C_in, 3, 3]` weight plus `bias` (`C_out` values), or `None` for any other input
/// (callers use candle's conv2d).
pub fn conv3x3_im2col(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&[f32]>,
) -> Result<Option<Tensor>> {
    let usable = |t: &Tensor| {
        t.device().is_cpu()
            && t.dtype() == candle_core::DType::F32
            && t.is_contiguous()
            && t.rank() == 4
    };
    if !(usable(xs) && usable(weight)) || xs.dim(1)? != weight.dim(1)? {
        return Ok(None);
    }
    if weight.dims()[2..] != [3, 3] || bias.is_some_and(|b| b.len() != weight.dim(0).unwrap_or(0)) {
        return Ok(None);
    }
    Ok(Some(xs.apply_op2_no_bwd(weight, &Im2ColConv { bias })?))
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => candle_core::bail!("im2col conv takes contiguous f32 tensors"),
    }
}

impl CustomOp2 for Im2ColConv<'_> {
    fn name(&self) -> &'static str {
        "im2col-conv3x3"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c_in, h, wd) = xs_l.shape().dims4()?;
        let c_out = w_l.shape().dims4()?.0;
        let (x, w) = (contiguous_f32(xs, xs_l)?, contiguous_f32(w, w_l)?);
        let (pixels, k) = (b * h * wd, c_in * 9);
        // patches[p][c·9 + dy·3 + dx] = x[b][c][y + dy - 1][x + dx - 1], zero outside.
        let mut patches = vec![0f32; pixels * k];
        patches.par_chunks_mut(k).enumerate().for_each(|(p, row)| {
            let (batch, y, xx) = (p / (h * wd), p / wd % h, p % wd);
            for c in 0..c_in {
                let plane = &x[(batch * c_in + c) * h * wd..][..h * wd];
                for dy in 0..3 {
                    let sy = y + dy;
                    if sy < 1 || sy > h {
                        continue;
                    }
                    for dx in 0..3 {
                        let sx = xx + dx;
                        if sx >= 1 && sx <= wd {
                            row[c * 9 + dy * 3 + dx] = plane[(sy - 1) * wd + sx - 1];
                        }
                    }
                }
            }
        });
        let mut out_t = vec![0f32; pixels * c_out];
        // SAFETY: out_t is [pixels][c_out], patches [pixels][k], w [c_out][k] (read as the
        // k × c_out right operand with row stride 1); all addressed within their lengths.
        unsafe {
            gemm::gemm(
                pixels,
                c_out,
                k,
                out_t.as_mut_ptr(),
                1,
                c_out as isize,
                false,
                patches.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        // [B·H·W, C_out] -> [B, C_out, H, W], plus the bias.
        let mut out = vec![0f32; pixels * c_out];
        out.par_chunks_mut(h * wd)
            .enumerate()
            .for_each(|(bo, plane)| {
                let (batch, o) = (bo / c_out, bo % c_out);
                let bias = self.bias.map_or(0.0, |b| b[o]);
                for (i, v) in plane.iter_mut().enumerate() {
                    *v = out_t[(batch * h * wd + i) * c_out + o] + bias;
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c_out, h, wd))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against candle's conv2d on odd sizes and batch 2 (relative 1e-5 of the output's scale).
    #[test]
    fn matches_candle_conv2d() {
        let device = Device::Cpu;
        for (b, ci, co, h, w) in [(2, 5, 7, 9, 11), (1, 16, 24, 8, 8), (2, 3, 4, 1, 2)] {
            let xs = Tensor::randn(0f32, 1.0, (b, ci, h, w), &device).unwrap();
            let wt = Tensor::randn(0f32, 0.2, (co, ci, 3, 3), &device).unwrap();
            let bias: Vec<f32> = (0..co).map(|o| o as f32 * 0.1 - 0.3).collect();
            let ours = conv3x3_im2col(&xs, &wt, Some(&bias)).unwrap().unwrap();
            let bias_t = Tensor::from_vec(bias, (1, co, 1, 1), &device).unwrap();
            let expected = xs.conv2d(&wt, 1, 1, 1, 1).unwrap();
            let expected = expected.broadcast_add(&bias_t).unwrap();
            let scale = expected.abs().unwrap().max_all().unwrap();
            let scale = scale.to_scalar::<f32>().unwrap();
            let diff = (ours - expected).unwrap().abs().unwrap().max_all().unwrap();
            let diff = diff.to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-5 * scale, "b{b} ci{ci} co{co} {h}x{w}: {diff}");
        }
    }

    /// One 1280→1280, 8×8, batch-2 convolution: candle's conv2d against this one. Timing
    /// only: `cargo test --release -p ipcompose-models im2col -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn speed_1280_8x8() {
        let device = Device::Cpu;
        let xs = Tensor::randn(0f32, 1.0, (2, 1280, 8, 8), &device).unwrap();
        let wt = Tensor::randn(0f32, 0.02, (1280, 1280, 3, 3), &device).unwrap();
        let time = |f: &dyn Fn() -> Tensor| {
            f();
            let mut best = f64::MAX;
            for _ in 0..5 {
                let start = std::time::Instant::now();
                f();
                best = best.min(start.elapsed().as_secs_f64());
            }
            best
        };
        let candle = time(&|| xs.conv2d(&wt, 1, 1, 1, 1).unwrap());
        let ours = time(&|| conv3x3_im2col(&xs, &wt, None).unwrap().unwrap());
        println!(
            "conv 1280->1280 8x8 batch 2: candle conv2d {:.1} ms, im2col {:.1} ms",
            candle * 1e3,
            ours * 1e3
        );
    }
}
