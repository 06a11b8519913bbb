//! `cv2.resize` of single-channel float32 planes, as the OpenPose body estimator resizes its
//! heatmaps and part-affinity fields (`smart_resize`, `smart_resize_k`): `INTER_LANCZOS4` when
//! enlarging, `INTER_AREA` otherwise.
//!
//! The float paths of OpenCV 5's `resize.cpp`: float Lanczos coefficients (not the 11-bit
//! fixed point of 8-bit images); the horizontal pass sums the eight taps left to right; the
//! vertical pass runs `VResizeLanczos4Vec_32f` on 4-lane SSE vectors, which nests the sums
//! right to left (`s0·b0 + (s1·b1 + (… + s7·b7))`, separate multiply and add), and the scalar
//! tail (the last `width % 4` values of a row) sums left to right. Checked bit for bit against
//! opencv-python-headless 5.0 on a 23×31 → 184×251 plane.

use crate::resize::{area_table, Axes, Interpolation};

/// A row-major float32 plane.
pub(crate) struct PlaneF32<'a> {
    pub data: &'a [f32],
    pub width: usize,
    pub height: usize,
}

/// `cv2.resize(plane, (width, height), interpolation)` for `Area` or `Lanczos4`
/// (`Linear` is served by the same generic path with two taps).
pub(crate) fn resize_f32(
    src: &PlaneF32,
    width: usize,
    height: usize,
    interpolation: Interpolation,
) -> Vec<f32> {
    assert!(src.width > 0 && src.height > 0 && width > 0 && height > 0);
    if (width, height) == (src.width, src.height) {
        return src.data.to_vec();
    }
    let axes = Axes::new(src.width, src.height, width, height);
    let Axes {
        scale_x,
        scale_y,
        iscale_x,
        iscale_y,
        is_area_fast,
        ..
    } = axes;
    if interpolation == Interpolation::Area && scale_x >= 1.0 && scale_y >= 1.0 {
        return if is_area_fast {
            area_fast(src, width, height, iscale_x as usize, iscale_y as usize)
        } else {
            area_general(src, width, height, scale_x, scale_y)
        };
    }
    generic(src, width, height, interpolation, &axes)
}

/// `resizeAreaFast_<float, float>` (scalar form): the mean of each exact block, summed row by
/// row, times `1/area`.
fn area_fast(src: &PlaneF32, width: usize, height: usize, sx: usize, sy: usize) -> Vec<f32> {
    let scale = 1.0f32 / (sx * sy) as f32;
    let mut out = vec![0f32; width * height];
    for dy in 0..height {
        for dx in 0..width {
            let mut sum = 0f32;
            for y in dy * sy..dy * sy + sy {
                for x in dx * sx..dx * sx + sx {
                    sum += src.data[y * src.width + x];
                }
            }
            out[dy * width + dx] = sum * scale;
        }
    }
    out
}

/// `ResizeArea_Invoker` with float accumulators.
fn area_general(
    src: &PlaneF32,
    width: usize,
    height: usize,
    scale_x: f64,
    scale_y: f64,
) -> Vec<f32> {
    let xtab = area_table(src.width, width, scale_x);
    let ytab = area_table(src.height, height, scale_y);
    let mut out = vec![0f32; height * width];
    let mut buf = vec![0f32; width];
    let mut sum = vec![0f32; width];
    let mut prev_dy = ytab.first().map_or(0, |t| t.dst);
    for yw in &ytab {
        let row = &src.data[yw.src * src.width..(yw.src + 1) * src.width];
        buf.iter_mut().for_each(|b| *b = 0.0);
        for xw in &xtab {
            buf[xw.dst] += row[xw.src] * xw.alpha;
        }
        if yw.dst != prev_dy {
            let target = &mut out[prev_dy * width..(prev_dy + 1) * width];
            for ((t, s), b) in target.iter_mut().zip(sum.iter_mut()).zip(&buf) {
                *t = *s;
                *s = yw.alpha * b;
            }
            prev_dy = yw.dst;
        } else {
            for (s, b) in sum.iter_mut().zip(&buf) {
                *s += yw.alpha * b;
            }
        }
    }
    out[prev_dy * width..(prev_dy + 1) * width].copy_from_slice(&sum);
    out
}

/// `resizeGeneric_` for float planes: Lanczos4 (8 taps) or linear / area-enlarging (2 taps).
fn generic(
    src: &PlaneF32,
    width: usize,
    height: usize,
    interpolation: Interpolation,
    axes: &Axes,
) -> Vec<f32> {
    let ksize: usize = if interpolation == Interpolation::Lanczos4 {
        8
    } else {
        2
    };
    let taps = |dsize: usize, ssize: usize, scale: f64, inv_scale: f64, horizontal: bool| {
        crate::resize::tap_positions(dsize, ssize, scale, inv_scale, horizontal, interpolation)
    };
    let (xs, xw) = taps(width, src.width, axes.scale_x, axes.inv_scale_x, true);
    let (ys, yw) = taps(height, src.height, axes.scale_y, axes.inv_scale_y, false);
    let clamp = |i: i64, n: usize| i.clamp(0, n as i64 - 1) as usize;

    let rows: Vec<Vec<f32>> = (0..src.height)
        .map(|y| {
            let row = &src.data[y * src.width..(y + 1) * src.width];
            (0..width)
                .map(|dx| {
                    let w = &xw[dx * ksize..(dx + 1) * ksize];
                    let mut v = 0f32;
                    for (k, &a) in w.iter().enumerate() {
                        v += row[clamp(xs[dx] + k as i64, src.width)] * a;
                    }
                    v
                })
                .collect()
        })
        .collect();

    let mut out = vec![0f32; width * height];
    let vector_end = width - width % 4;
    for dy in 0..height {
        let b = &yw[dy * ksize..(dy + 1) * ksize];
        let srows: Vec<&[f32]> = (0..ksize)
            .map(|k| rows[clamp(ys[dy] + k as i64, src.height)].as_slice())
            .collect();
        let target = &mut out[dy * width..(dy + 1) * width];
        for (x, t) in target.iter_mut().enumerate() {
            *t = if ksize == 2 {
                srows[0][x] * b[0] + srows[1][x] * b[1]
            } else if x < vector_end {
                // VResizeLanczos4Vec_32f: nested v_muladd, innermost last (float addition
                // commutes exactly, so `+=` is `s·b + v`).
                let mut v = srows[7][x] * b[7];
                for k in (0..7).rev() {
                    v += srows[k][x] * b[k];
                }
                v
            } else {
                let mut v = srows[0][x] * b[0];
                for k in 1..8 {
                    v += srows[k][x] * b[k];
                }
                v
            };
        }
    }
    out
}
