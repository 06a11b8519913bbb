//! Stride-1 "same" convolutions (square odd kernel k, padding k/2) on the CPU as matrix
//! products with the weights read in place: the coarse UNet levels that keep their plain 3×3
//! weights, and the OpenPose body network's 3×3 and 7×7 layers.
//!
//! The input becomes a `[pixels, C_in·k·k]` patch matrix, built for a chunk of pixels at a
//! time (all of them at the UNet's 8×8 level; bounded memory on large images), and
//! `out[p][o] = Σ_j patches[p][j] · weight[o][j]` is one GEMM per chunk whose right operand
//! is the `[C_out, C_in·k·k]` weight with unit row stride, which `gemm` reads without
//! repacking. candle's conv2d does one product per batch item (64 rows each at 8×8) through
//! its tiled im2col: 156 ms against 37 ms for 1280 channels at 8×8, batch 2.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::Conv2d;
use gemm::Parallelism;
use rayon::prelude::*;

/// Pixels per patch chunk: with 64 channels and a 3×3 kernel a chunk's patches are 9 MiB.
const PIXEL_CHUNK: usize = 4096;

/// A stride-1 "same" convolution that keeps its weights as loaded: the im2col kernel on f32
/// CPU tensors for kernels wider than 1×1 (candle's own 1×1 path is already one GEMM),
/// candle's conv2d otherwise.
#[derive(Debug, Clone)]
pub struct PlainConv {
    conv: Conv2d,
    /// The bias as read once for the CPU kernel (`None` off the f32 CPU path).
    bias: Option<Vec<f32>>,
}

impl PlainConv {
    /// `conv` must have stride 1 and padding `k / 2`.
    pub fn new(conv: Conv2d) -> Result<Self> {
        let bias = match conv.bias() {
            Some(b) if b.device().is_cpu() && b.dtype() == DType::F32 => Some(b.to_vec1()?),
            _ => None,
        };
        Ok(Self { conv, bias })
    }
}

impl Module for PlainConv {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let wide = self.conv.weight().dim(3)? > 1;
        if wide && self.bias.is_some() == self.conv.bias().is_some() {
            let weight = self.conv.weight();
            if let Some(ys) = conv_im2col(&xs.contiguous()?, weight, self.bias.as_deref())? {
                return Ok(ys);
            }
        }
        self.conv.forward(xs)
    }
}

struct Im2ColConv<'a> {
    bias: Option<&'a [f32]>,
}

/// The convolution of a contiguous f32 CPU `[B, C_in, H, W]` tensor with a contiguous f32 CPU
/// `[C_out, C_in, k, k]` weight (k odd, padding k/2, stride 1) plus `bias` (`C_out` values),
/// or `None` for any other input (callers use candle's conv2d).
pub fn conv_im2col(xs: &Tensor, weight: &Tensor, bias: Option<&[f32]>) -> Result<Option<Tensor>> {
    let usable = |t: &Tensor| {
        t.device().is_cpu()
            && t.dtype() == candle_core::DType::F32
            && t.is_contiguous()
            && t.rank() == 4
    };
    if !(usable(xs) && usable(weight)) || xs.dim(1)? != weight.dim(1)? {
        return Ok(None);
    }
    let (kh, kw) = (weight.dim(2)?, weight.dim(3)?);
    if kh != kw || kh % 2 == 0 || bias.is_some_and(|b| b.len() != weight.dim(0).unwrap_or(0)) {
        return Ok(None);
    }
    Ok(Some(xs.apply_op2_no_bwd(weight, &Im2ColConv { bias })?))
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    match super::contiguous_f32(storage, layout) {
        Some(data) => Ok(data),
        None => candle_core::bail!("im2col conv takes contiguous f32 tensors"),
    }
}

impl CustomOp2 for Im2ColConv<'_> {
    fn name(&self) -> &'static str {
        "im2col-conv"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c_in, h, wd) = xs_l.shape().dims4()?;
        let (c_out, _, k, _) = w_l.shape().dims4()?;
        let (x, w) = (contiguous_f32(xs, xs_l)?, contiguous_f32(w, w_l)?);
        let (pixels, taps, pad) = (b * h * wd, k * k, k / 2);
        let depth = c_in * taps;
        let chunk = PIXEL_CHUNK.min(pixels).max(1);
        let mut patches = vec![0f32; chunk * depth];
        let mut out_t = vec![0f32; pixels * c_out];
        for (index, out_rows) in out_t.chunks_mut(chunk * c_out).enumerate() {
            let first = index * chunk;
            let rows = out_rows.len() / c_out;
            // patches[p][c·k² + dy·k + dx] = x[b][c][y + dy - pad][x + dx - pad], zero outside.
            patches[..rows * depth]
                .par_chunks_mut(depth)
                .enumerate()
                .for_each(|(r, row)| {
                    let p = first + r;
                    let (batch, y, xx) = (p / (h * wd), p / wd % h, p % wd);
                    for c in 0..c_in {
                        let plane = &x[(batch * c_in + c) * h * wd..][..h * wd];
                        let taps_of_c = &mut row[c * taps..][..taps];
                        for dy in 0..k {
                            let sy = y + dy;
                            let line = &mut taps_of_c[dy * k..][..k];
                            if sy < pad || sy >= h + pad {
                                line.fill(0.0);
                                continue;
                            }
                            let src = &plane[(sy - pad) * wd..][..wd];
                            for (dx, v) in line.iter_mut().enumerate() {
                                let sx = xx + dx;
                                *v = if sx >= pad && sx < wd + pad {
                                    src[sx - pad]
                                } else {
                                    0.0
                                };
                            }
                        }
                    }
                });
            // SAFETY: out_rows is [rows][c_out], patches [rows][depth], w [c_out][depth] (read
            // as the depth × c_out right operand with row stride 1); all within their lengths.
            unsafe {
                gemm::gemm(
                    rows,
                    c_out,
                    depth,
                    out_rows.as_mut_ptr(),
                    1,
                    c_out as isize,
                    false,
                    patches.as_ptr(),
                    1,
                    depth as isize,
                    w.as_ptr(),
                    depth as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::Rayon(rayon::current_num_threads()),
                );
            }
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
    use crate::unet::test_support::{best_of_five, max_abs, max_abs_diff};
    use candle_core::Device;

    /// Against candle's conv2d on odd sizes, batch 2, kernels 1, 3 and 7, and an image of more
    /// than one pixel chunk (relative 1e-5 of the output's scale).
    #[test]
    fn matches_candle_conv2d() {
        let device = Device::Cpu;
        for (b, ci, co, h, w, k) in [
            (2, 5, 7, 9, 11, 3),
            (1, 16, 24, 8, 8, 3),
            (2, 3, 4, 1, 2, 3),
            (1, 6, 5, 13, 10, 7),
            (2, 4, 3, 5, 6, 1),
            (1, 3, 8, 70, 61, 3),
        ] {
            let xs = Tensor::randn(0f32, 1.0, (b, ci, h, w), &device).unwrap();
            let wt = Tensor::randn(0f32, 0.2, (co, ci, k, k), &device).unwrap();
            let bias: Vec<f32> = (0..co).map(|o| o as f32 * 0.1 - 0.3).collect();
            let ours = conv_im2col(&xs, &wt, Some(&bias)).unwrap().unwrap();
            let bias_t = Tensor::from_vec(bias, (1, co, 1, 1), &device).unwrap();
            let expected = xs.conv2d(&wt, k / 2, 1, 1, 1).unwrap();
            let expected = expected.broadcast_add(&bias_t).unwrap();
            let (scale, diff) = (max_abs(&expected), max_abs_diff(&ours, &expected));
            assert!(
                diff <= 1e-5 * scale,
                "b{b} ci{ci} co{co} {h}x{w} k{k}: {diff}"
            );
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
        let candle = best_of_five(&|| xs.conv2d(&wt, 1, 1, 1, 1).unwrap());
        let ours = best_of_five(&|| conv_im2col(&xs, &wt, None).unwrap().unwrap());
        println!(
            "conv 1280->1280 8x8 batch 2: candle conv2d {:.1} ms, im2col {:.1} ms",
            candle * 1e3,
            ours * 1e3
        );
    }
}
