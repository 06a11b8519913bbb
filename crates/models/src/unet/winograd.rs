//! 3×3 convolutions (stride 1, padding 1) on the CPU by Winograd's F(2×2, 3×3).
//!
//! candle's CPU conv2d lowers to im2col + one matrix multiply, 9·C_in·C_out multiply-adds
//! per output pixel. F(2×2, 3×3) computes each 2×2 output tile from a 4×4 input patch with
//! 16 multiply-adds per (C_in, C_out) pair instead of 36: the weights are transformed once,
//! `U = G g Gᵀ` (16 matrices `[C_in × C_out]`), every input patch per channel becomes
//! `V = Bᵀ d B` (16 matrices `[tiles × C_in]`), the 16 products `M_i = V_i · U_i` are plain
//! GEMMs (the `gemm` crate, as candle's), and each tile's output is `Y = Aᵀ M A`.
//!
//! The tiles are processed in blocks (input transform, 16 GEMMs, output transform per block)
//! so the transformed blocks stay in cache; blocks run in parallel on rayon's pool. With too
//! few tiles for that (the 8×8 and 16×16 latent levels) the 16 GEMMs run in parallel instead.
//! F(2, 3)'s transforms only add, subtract and halve, so results match the direct
//! convolution to float rounding (about 1e-6 relative).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{conv2d, Conv2d, Conv2dConfig, VarBuilder};
use gemm::Parallelism;
use rayon::prelude::*;

use super::im2col::PlainConv;

/// Tiles per block. Measured on 320 channels, 64×64, batch 2, 2 threads (AMD EPYC, AVX2,
/// 512 KiB L2), with `U_i` read in place: 32 tiles 67–84 ms, 64 tiles 64–68 ms, 128 tiles
/// 105–116 ms (the 16 transformed blocks leave L2).
const TILE_BLOCK: usize = 64;

/// The transformed weights of one 3×3 convolution: `u[i][c_out][c_in]` for the 16 entries
/// of `G g Gᵀ`, and the bias (zeros when the layer has none). Each `U_i` is the right-hand
/// operand of a product with unit row stride, which `gemm` reads in place; stored
/// `[c_in][c_out]` it was repacked on every call, 7% of a UNet step.
#[derive(Debug, Clone)]
pub struct TransformedWeights {
    u: Vec<f32>,
    bias: Vec<f32>,
    c_in: usize,
    c_out: usize,
}

impl TransformedWeights {
    /// From a `[C_out, C_in, 3, 3]` weight and an optional `[C_out]` bias (any device and
    /// dtype; they are read as f32).
    pub fn new(weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (c_out, c_in, kh, kw) = weight.dims4()?;
        if (kh, kw) != (3, 3) {
            candle_core::bail!("winograd: a 3x3 kernel is needed, got {kh}x{kw}");
        }
        let weight = weight.to_dtype(DType::F32)?.contiguous()?;
        // Read in place: a copy of every 3x3 weight would double the load's memory traffic.
        let (storage, layout) = weight.storage_and_layout();
        let g: &[f32] = match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) => {
                &data[start..end]
            }
            _ => candle_core::bail!("winograd: the weight must be an f32 CPU tensor"),
        };
        let mut u = vec![0f32; 16 * c_in * c_out];
        let u_addr = u.as_mut_ptr() as usize;
        // Blocks of input channels per task: for each output channel the block's kernels are
        // one contiguous read, and its transformed entries are runs of consecutive channels.
        const CHANNELS: usize = 16;
        (0..c_in.div_ceil(CHANNELS))
            .into_par_iter()
            .for_each(|block| {
                let channels = block * CHANNELS..((block + 1) * CHANNELS).min(c_in);
                for o in 0..c_out {
                    for c in channels.clone() {
                        let k = &g[(o * c_in + c) * 9..][..9];
                        // G g (4×3), then (G g) Gᵀ (4×4); G = [[1,0,0],[½,½,½],[½,-½,½],[0,0,1]].
                        let mut gg = [[0f32; 3]; 4];
                        for j in 0..3 {
                            let (a, b, d) = (k[j], k[3 + j], k[6 + j]);
                            gg[0][j] = a;
                            gg[1][j] = 0.5 * (a + b + d);
                            gg[2][j] = 0.5 * (a - b + d);
                            gg[3][j] = d;
                        }
                        for (r, row) in gg.iter().enumerate() {
                            let (a, b, d) = (row[0], row[1], row[2]);
                            let t = [a, 0.5 * (a + b + d), 0.5 * (a - b + d), d];
                            for (s, v) in t.into_iter().enumerate() {
                                // SAFETY: index < 16 · C_in · C_out, and only this block writes the
                                // elements of its channels.
                                unsafe {
                                    *(u_addr as *mut f32)
                                        .add(((4 * r + s) * c_out + o) * c_in + c) = v;
                                }
                            }
                        }
                    }
                }
            });
        drop(storage);
        let bias = match bias {
            Some(b) => b.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            None => vec![0f32; c_out],
        };
        Ok(Self {
            u,
            bias,
            c_in,
            c_out,
        })
    }

    /// The convolution of a `[B, C_in, H, W]` tensor, or `None` when it is not a contiguous
    /// f32 CPU tensor of the right width (callers then use candle's conv2d).
    pub fn forward(&self, xs: &Tensor) -> Result<Option<Tensor>> {
        let usable = xs.device().is_cpu()
            && xs.dtype() == DType::F32
            && xs.is_contiguous()
            && xs.rank() == 4
            && xs.dim(1)? == self.c_in;
        if !usable {
            return Ok(None);
        }
        Ok(Some(xs.apply_op1_no_bwd(self)?))
    }
}

/// The tiles `[t0, t1)` of a block as row segments `(batch, tile row, first tile column,
/// last tile column + 1, index of the first tile in the block)`.
fn row_segments(
    t0: usize,
    t1: usize,
    th: usize,
    tw: usize,
) -> Vec<(usize, usize, usize, usize, usize)> {
    let mut out = Vec::new();
    let mut t = t0;
    while t < t1 {
        let row = t / tw;
        let x0 = t % tw;
        let x1 = tw.min(x0 + (t1 - t));
        out.push((row / th, row % th, x0, x1, t - t0));
        t += x1 - x0;
    }
    out
}

struct Geometry {
    c_in: usize,
    c_out: usize,
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
}

/// Scratch buffers of one block: transformed input `v[i][c_in][tile]`, products
/// `m[i][c_out][tile]`, and four padded input rows.
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
    rows: Vec<f32>,
}

impl Scratch {
    fn new(tiles: usize, g: &Geometry) -> Self {
        Self {
            v: vec![0f32; 16 * tiles * g.c_in],
            m: vec![0f32; 16 * tiles * g.c_out],
            rows: vec![0f32; 24 * (g.tw + 1)],
        }
    }
}

/// `V = Bᵀ d B` for the tiles `[t0, t1)`: `v[i][c][t - t0]`, block width `n = t1 - t0`.
fn input_transform(x: &[f32], g: &Geometry, t0: usize, t1: usize, v: &mut [f32], rows: &mut [f32]) {
    let n = t1 - t0;
    let (h, w) = (g.h, g.w);
    for (b, ty, x0, x1, k0) in row_segments(t0, t1, g.th, g.tw) {
        // Input columns 2·x0 - 1 ..= 2·x1 (zero outside the image), split into even and odd
        // columns: tile q's patch is columns (even q, odd q, even q+1, odd q+1).
        let len = x1 - x0;
        let width = 2 * len + 2;
        let half = len + 1;
        let col0 = 2 * x0 as isize - 1;
        let lo = (-col0).max(0) as usize;
        let hi = (w as isize - col0).min(width as isize) as usize;
        let (padded, rest) = rows.split_at_mut(width);
        let (eo, s) = rest.split_at_mut(8 * half);
        for c in 0..g.c_in {
            let plane = &x[(b * g.c_in + c) * h * w..][..h * w];
            for j in 0..4 {
                let (even, odd) = eo[2 * j * half..][..2 * half].split_at_mut(half);
                let y = 2 * ty as isize - 1 + j as isize;
                if y < 0 || y >= h as isize {
                    even.fill(0.0);
                    odd.fill(0.0);
                    continue;
                }
                let src = &plane[y as usize * w..][..w];
                padded[..lo].fill(0.0);
                padded[lo..hi].copy_from_slice(&src[(col0 + lo as isize) as usize..][..hi - lo]);
                padded[hi..].fill(0.0);
                for (k, pair) in padded.chunks_exact(2).enumerate() {
                    even[k] = pair[0];
                    odd[k] = pair[1];
                }
            }
            // Bᵀ d: rows d0 - d2, d1 + d2, d2 - d1, d1 - d3 (even and odd columns alike).
            {
                let d = |j: usize| &eo[2 * j * half..][..2 * half];
                let (d0, d1, d2, d3) = (d(0), d(1), d(2), d(3));
                let (s0, rest) = s.split_at_mut(2 * half);
                let (s1, rest) = rest.split_at_mut(2 * half);
                let (s2, s3) = rest.split_at_mut(2 * half);
                for k in 0..2 * half {
                    s0[k] = d0[k] - d2[k];
                    s1[k] = d1[k] + d2[k];
                    s2[k] = d2[k] - d1[k];
                    s3[k] = d1[k] - d3[k];
                }
            }
            // (Bᵀ d) B along the columns: e0 - e1, o0 + e1, e1 - o0, o0 - o1 per tile.
            let stride = g.c_in * n;
            for a in 0..4 {
                let (e, o) = s[2 * a * half..][..2 * half].split_at(half);
                let base = (4 * a * g.c_in + c) * n + k0;
                let (v0, rest) = v[base..].split_at_mut(stride);
                let (v1, rest) = rest.split_at_mut(stride);
                let (v2, v3) = rest.split_at_mut(stride);
                let (v0, v1, v2, v3) = (
                    &mut v0[..len],
                    &mut v1[..len],
                    &mut v2[..len],
                    &mut v3[..len],
                );
                for q in 0..len {
                    v0[q] = e[q] - e[q + 1];
                    v1[q] = o[q] + e[q + 1];
                    v2[q] = e[q + 1] - o[q];
                    v3[q] = o[q] - o[q + 1];
                }
            }
        }
    }
}

/// `M_i = V_i · U_i` for the 16 entries; in parallel over them when `parallel`.
fn products(u: &[f32], g: &Geometry, n: usize, v: &[f32], m: &mut [f32], parallel: bool) {
    let (ci, co) = (g.c_in, g.c_out);
    let one = |(i, mi): (usize, &mut [f32])| {
        let vi = &v[i * ci * n..][..ci * n];
        let ui = &u[i * ci * co..][..ci * co];
        // SAFETY: m_i is [co][n] (column stride n), v_i is [ci][n], u_i is [co][ci]; all
        // addressed within their slices.
        unsafe {
            gemm::gemm(
                n,
                co,
                ci,
                mi.as_mut_ptr(),
                n as isize,
                1,
                false,
                vi.as_ptr(),
                n as isize,
                1,
                ui.as_ptr(),
                ci as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
    };
    let m = &mut m[..16 * co * n];
    if parallel {
        m.par_chunks_exact_mut(co * n).enumerate().for_each(one);
    } else {
        m.chunks_exact_mut(co * n).enumerate().for_each(one);
    }
}

/// Tiles per chunk of the output transform (stack buffers).
const OUT_CHUNK: usize = 64;

/// `Y = Aᵀ M A` plus bias for the tiles `[t0, t1)`, written into `y` (`[B, C_out, H, W]`)
/// through `y_addr`, cropping the last row/column of odd sizes.
fn output_transform(y_addr: usize, bias: &[f32], g: &Geometry, t0: usize, t1: usize, m: &[f32]) {
    let n = t1 - t0;
    let (h, w) = (g.h, g.w);
    let stride = g.c_out * n;
    let mut out = [[0f32; 2 * OUT_CHUNK]; 2];
    for (b, ty, x0, x1, k0) in row_segments(t0, t1, g.th, g.tw) {
        let oy = 2 * ty;
        let out_rows = if oy + 1 < h { 2 } else { 1 };
        for (o, &bo) in bias.iter().enumerate().take(g.c_out) {
            let mut q0 = 0;
            while q0 < x1 - x0 {
                let len = OUT_CHUNK.min(x1 - x0 - q0);
                let e = |i: usize| &m[i * stride + o * n + k0 + q0..][..len];
                // Aᵀ M: rows m0 + m1 + m2 and m1 - m2 - m3, per column; then the same along
                // the columns.
                let mut r = [[0f32; OUT_CHUNK]; 8];
                for col in 0..4 {
                    let (a, bb, c, d) = (e(col), e(4 + col), e(8 + col), e(12 + col));
                    let (r0, r1) = r.split_at_mut(4);
                    let (r0, r1) = (&mut r0[col][..len], &mut r1[col][..len]);
                    for q in 0..len {
                        r0[q] = a[q] + bb[q] + c[q];
                        r1[q] = bb[q] - c[q] - d[q];
                    }
                }
                for (p, row) in out.iter_mut().enumerate() {
                    let rp = &r[4 * p..4 * p + 4];
                    for q in 0..len {
                        row[2 * q] = rp[0][q] + rp[1][q] + rp[2][q] + bo;
                        row[2 * q + 1] = rp[1][q] - rp[2][q] - rp[3][q] + bo;
                    }
                }
                let ox = 2 * (x0 + q0);
                let cols = (2 * len).min(w - ox);
                for (p, row) in out.iter().enumerate().take(out_rows) {
                    // SAFETY: this block's tiles own these output pixels; the buffer outlives
                    // the parallel loop.
                    unsafe {
                        let dst =
                            (y_addr as *mut f32).add(((b * g.c_out + o) * h + oy + p) * w + ox);
                        std::ptr::copy_nonoverlapping(row.as_ptr(), dst, cols);
                    }
                }
                q0 += len;
            }
        }
    }
}

impl CustomOp1 for TransformedWeights {
    fn name(&self) -> &'static str {
        "winograd-conv3x3"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (bsz, c_in, h, w) = layout.shape().dims4()?;
        let Some(x) = super::contiguous_f32(storage, layout) else {
            candle_core::bail!("winograd conv takes a contiguous f32 tensor")
        };
        if c_in != self.c_in {
            candle_core::bail!(
                "winograd conv: {c_in} input channels, expected {}",
                self.c_in
            );
        }
        let g = Geometry {
            c_in,
            c_out: self.c_out,
            h,
            w,
            th: h.div_ceil(2),
            tw: w.div_ceil(2),
        };
        let tiles = bsz * g.th * g.tw;
        let mut y = vec![0f32; bsz * self.c_out * h * w];
        let y_addr = y.as_mut_ptr() as usize;
        let threads = rayon::current_num_threads();
        if tiles >= 32 * threads {
            // Blocks of tiles in parallel, each block entirely on one thread.
            let block = TILE_BLOCK.min(tiles.div_ceil(threads));
            let blocks = tiles.div_ceil(block);
            (0..blocks).into_par_iter().for_each_init(
                || Scratch::new(block, &g),
                |s, k| {
                    let t0 = k * block;
                    let t1 = tiles.min(t0 + block);
                    let n = t1 - t0;
                    input_transform(x, &g, t0, t1, &mut s.v, &mut s.rows);
                    products(&self.u, &g, n, &s.v, &mut s.m, false);
                    output_transform(y_addr, &self.bias, &g, t0, t1, &s.m);
                },
            );
        } else {
            // Few tiles: one block, the 16 products in parallel.
            let mut s = Scratch::new(tiles, &g);
            input_transform(x, &g, 0, tiles, &mut s.v, &mut s.rows);
            products(&self.u, &g, tiles, &s.v, &mut s.m, threads > 1);
            output_transform(y_addr, &self.bias, &g, 0, tiles, &s.m);
        }
        Ok((CpuStorage::F32(y), Shape::from((bsz, self.c_out, h, w))))
    }
}

/// A 3×3 convolution with padding 1, loaded like candle's `conv2d` (same `weight`/`bias`
/// names). Stride-1 layers with f32 CPU weights keep only the Winograd-transformed weights
/// (the original is dropped: the transformed copy is 16/9 its size) and take any f32 CPU
/// input; everything else (other dtypes or devices, stride 2) is candle's conv2d.
#[derive(Debug, Clone)]
pub enum Conv3x3 {
    Winograd(TransformedWeights),
    /// Plain weights, stride 1: one im2col product on the CPU in f32, candle's conv2d otherwise.
    Im2Col(PlainConv),
    Candle(Conv2d),
}

impl Conv3x3 {
    /// A stride-1 convolution that keeps the weights as loaded (no transform, no copy).
    pub fn direct(in_c: usize, out_c: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self::Im2Col(PlainConv::new(conv2d(
            in_c, out_c, 3, cfg, vb,
        )?)?))
    }

    pub fn new(in_c: usize, out_c: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            stride,
            ..Default::default()
        };
        let conv = conv2d(in_c, out_c, 3, cfg, vb)?;
        let weight = conv.weight();
        if stride == 1 && weight.device().is_cpu() && weight.dtype() == DType::F32 {
            Ok(Self::Winograd(TransformedWeights::new(
                weight,
                conv.bias(),
            )?))
        } else {
            Ok(Self::Candle(conv))
        }
    }
}

impl Module for Conv3x3 {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(conv) => conv.forward(xs),
            Self::Im2Col(conv) => conv.forward(xs),
            Self::Winograd(winograd) => match winograd.forward(&xs.contiguous()?)? {
                Some(ys) => Ok(ys),
                // As candle's conv2d with f32 CPU weights would.
                None => candle_core::bail!(
                    "conv3x3: f32 CPU weights, input {:?} on {:?} with shape {:?}",
                    xs.dtype(),
                    xs.device().location(),
                    xs.dims()
                ),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unet::test_support::{best_of_five, max_abs, max_abs_diff};
    use candle_core::Device;

    fn reference(xs: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
        let ys = xs.conv2d(w, 1, 1, 1, 1).unwrap();
        match b {
            Some(b) => ys
                .broadcast_add(&b.reshape((1, b.dim(0).unwrap(), 1, 1)).unwrap())
                .unwrap(),
            None => ys,
        }
    }

    /// Against candle's conv2d: odd and even sizes, C_in ≠ C_out, batch 2, with and without
    /// bias, both the blocked and the few-tiles paths. Tolerance 1e-5 of the output's scale.
    #[test]
    fn matches_candle_conv2d() {
        let device = Device::Cpu;
        for (b, ci, co, h, w, bias) in [
            (2, 5, 7, 9, 11, true),
            (2, 16, 24, 64, 64, true),
            (1, 3, 8, 1, 1, true),
            (2, 12, 4, 2, 3, false),
            (2, 32, 48, 45, 37, true),
            (1, 8, 8, 8, 8, false),
        ] {
            let xs = Tensor::randn(0f32, 1.0, (b, ci, h, w), &device).unwrap();
            let wt = Tensor::randn(0f32, 0.2, (co, ci, 3, 3), &device).unwrap();
            let bt = Tensor::randn(0f32, 1.0, co, &device).unwrap();
            let bt = bias.then_some(&bt);
            let tw = TransformedWeights::new(&wt, bt).unwrap();
            let ys = tw.forward(&xs).unwrap().unwrap();
            let expected = reference(&xs, &wt, bt);
            assert_eq!(ys.dims(), expected.dims());
            let (scale, diff) = (max_abs(&expected), max_abs_diff(&ys, &expected));
            println!(
                "b{b} ci{ci} co{co} {h}x{w}: max diff {diff:.2e}, relative {:.2e}",
                diff / scale
            );
            assert!(
                diff <= 1e-5 * scale,
                "b{b} ci{ci} co{co} {h}x{w}: max diff {diff}, scale {scale}"
            );
        }
    }

    #[test]
    fn other_inputs_take_candles_conv() {
        let device = Device::Cpu;
        let wt = Tensor::randn(0f32, 1.0, (4, 4, 3, 3), &device).unwrap();
        let tw = TransformedWeights::new(&wt, None).unwrap();
        let half = Tensor::zeros((1, 4, 5, 5), DType::F16, &device).unwrap();
        assert!(tw.forward(&half).unwrap().is_none());
        let transposed = Tensor::zeros((1, 4, 5, 6), DType::F32, &device)
            .unwrap()
            .transpose(2, 3)
            .unwrap();
        assert!(tw.forward(&transposed).unwrap().is_none());
    }

    /// One 320→320, 64×64, batch-2 convolution: candle's conv2d against this one. Timing
    /// only, no assertion: `cargo test --release -p ipcompose-models winograd -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore]
    fn speed_320_64x64() {
        let device = Device::Cpu;
        let xs = Tensor::randn(0f32, 1.0, (2, 320, 64, 64), &device).unwrap();
        let wt = Tensor::randn(0f32, 0.05, (320, 320, 3, 3), &device).unwrap();
        let bt = Tensor::randn(0f32, 1.0, 320, &device).unwrap();
        let tw = TransformedWeights::new(&wt, Some(&bt)).unwrap();
        let flops = 2.0 * 2.0 * 64.0 * 64.0 * 320.0 * 320.0 * 9.0;
        let candle = best_of_five(&|| reference(&xs, &wt, Some(&bt)));
        let ours = best_of_five(&|| tw.forward(&xs).unwrap().unwrap());
        println!(
            "conv 320->320 64x64 batch 2, {} threads: candle conv2d {:.1} ms ({:.0} GFLOP/s), \
             winograd {:.1} ms ({:.0} effective GFLOP/s)",
            rayon::current_num_threads(),
            candle * 1e3,
            flops / candle / 1e9,
            ours * 1e3,
            flops / ours / 1e9
        );
    }
}
