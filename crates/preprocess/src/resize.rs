//! The annotators' resizing, reproduced from OpenCV's `modules/imgproc/src/resize.cpp` for
//! 8-bit images:
//!
//! - [`resize_image`]: controlnet_aux 0.0.10's `resize_image(img, resolution)`: the short side
//!   to `resolution`, each side then rounded (half to even, as `np.round`) to a multiple of 64;
//!   `INTER_LANCZOS4` when that enlarges (`k > 1`), `INTER_AREA` otherwise. (The newer
//!   `resize_image_with_pad` of comfyui_controlnet_aux, with `INTER_CUBIC` and edge padding to a
//!   multiple of 64, is not what the PyPI package does.)
//! - [`resize`]: `cv2.resize` with `INTER_AREA` (the exact-integer-factor fast path, the
//!   general weighted path, and the enlarging variant), `INTER_LANCZOS4` and `INTER_LINEAR`,
//!   with OpenCV's 11-bit fixed-point coefficients, its `cvRound` (half to even) and its
//!   replicated borders. `INTER_LINEAR`'s vertical pass reproduces the vector arithmetic
//!   (`((a >> 4) · β) >> 16`, summed, `+ 2 >> 2`) that x86 builds of OpenCV run, not the
//!   scalar formula of its C++ fallback.
//!
//! Every path is checked bit for bit against opencv-python-headless 5.0 in
//! `tests/opencv_parity.rs`.

use image::RgbImage;

use crate::{PreprocessError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpolation {
    Area,
    Lanczos4,
    Linear,
}

/// OpenCV's `INTER_RESIZE_COEF_BITS`.
const COEF_BITS: u32 = 11;
const COEF_SCALE: f32 = (1 << COEF_BITS) as f32;

/// The size controlnet_aux's `resize_image` gives `(width, height)` for `resolution`, and
/// whether it enlarges.
pub fn detect_size(width: u32, height: u32, resolution: u32) -> (u32, u32, bool) {
    let (h, w) = (height as f64, width as f64);
    let k = resolution as f64 / h.min(w);
    let round64 = |side: f64| ((side * k / 64.0).round_ties_even() as i64).max(0) as u32 * 64;
    (round64(w), round64(h), k > 1.0)
}

/// controlnet_aux's `resize_image`: see the module documentation.
pub fn resize_image(image: &RgbImage, resolution: u32) -> Result<RgbImage> {
    let (w, h, enlarges) = detect_size(image.width(), image.height(), resolution);
    if w == 0 || h == 0 {
        return Err(PreprocessError::Invalid(format!(
            "a {}x{} image at detect resolution {resolution} rounds to {w}x{h} (each side is rounded to a multiple of 64); use a larger detect resolution",
            image.width(),
            image.height()
        )));
    }
    let interpolation = if enlarges {
        Interpolation::Lanczos4
    } else {
        Interpolation::Area
    };
    Ok(resize(image, w, h, interpolation))
}

/// `cv2.resize(image, (width, height), interpolation=...)` for an RGB image.
pub fn resize(image: &RgbImage, width: u32, height: u32, interpolation: Interpolation) -> RgbImage {
    let src = Plane {
        data: image.as_raw(),
        width: image.width() as usize,
        height: image.height() as usize,
        channels: 3,
    };
    let data = resize_interleaved(&src, width as usize, height as usize, interpolation);
    RgbImage::from_raw(width, height, data).expect("three channels per pixel")
}

/// An interleaved 8-bit image.
#[derive(Clone, Copy)]
pub struct Plane<'a> {
    pub data: &'a [u8],
    pub width: usize,
    pub height: usize,
    pub channels: usize,
}

impl Plane<'_> {
    fn row(&self, y: usize) -> &[u8] {
        let stride = self.width * self.channels;
        &self.data[y * stride..(y + 1) * stride]
    }
}

pub fn resize_interleaved(
    src: &Plane,
    width: usize,
    height: usize,
    interpolation: Interpolation,
) -> Vec<u8> {
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

    let mut interpolation = interpolation;
    // OpenCV: halving with INTER_LINEAR is the same as INTER_AREA's fast path, and takes it.
    if interpolation == Interpolation::Linear && is_area_fast && iscale_x == 2 && iscale_y == 2 {
        interpolation = Interpolation::Area;
    }
    if interpolation == Interpolation::Area && scale_x >= 1.0 && scale_y >= 1.0 {
        return if is_area_fast {
            area_fast(src, width, height, iscale_x as usize, iscale_y as usize)
        } else {
            area_general(src, width, height, scale_x, scale_y)
        };
    }
    fixed_point(src, width, height, interpolation, &axes)
}

/// OpenCV's `resize` scale factors for a `src_w × src_h` to `width × height` resize.
pub(crate) struct Axes {
    pub inv_scale_x: f64,
    pub inv_scale_y: f64,
    pub scale_x: f64,
    pub scale_y: f64,
    /// The rounded scales, and whether they are exact (`INTER_AREA`'s fast path).
    pub iscale_x: i64,
    pub iscale_y: i64,
    pub is_area_fast: bool,
}

impl Axes {
    pub(crate) fn new(src_w: usize, src_h: usize, width: usize, height: usize) -> Self {
        let inv_scale_x = width as f64 / src_w as f64;
        let inv_scale_y = height as f64 / src_h as f64;
        let scale_x = 1.0 / inv_scale_x;
        let scale_y = 1.0 / inv_scale_y;
        let iscale_x = scale_x.round_ties_even() as i64;
        let iscale_y = scale_y.round_ties_even() as i64;
        Self {
            inv_scale_x,
            inv_scale_y,
            scale_x,
            scale_y,
            iscale_x,
            iscale_y,
            is_area_fast: (scale_x - iscale_x as f64).abs() < f64::EPSILON
                && (scale_y - iscale_y as f64).abs() < f64::EPSILON,
        }
    }
}

/// `cvRound` of a float into a saturated `uchar`.
fn saturate_u8(v: f32) -> u8 {
    v.round_ties_even().clamp(0.0, 255.0) as u8
}

/// OpenCV's `resizeAreaFast_`: each output is the mean of an exact `sx × sy` block.
fn area_fast(src: &Plane, width: usize, height: usize, sx: usize, sy: usize) -> Vec<u8> {
    let cn = src.channels;
    let mut out = vec![0u8; width * height * cn];
    let area = (sx * sy) as i32;
    let scale = 1.0f32 / area as f32;
    for dy in 0..height {
        for dx in 0..width {
            for c in 0..cn {
                let mut sum = 0i32;
                for y in dy * sy..dy * sy + sy {
                    let row = src.row(y);
                    for x in dx * sx..dx * sx + sx {
                        sum += row[x * cn + c] as i32;
                    }
                }
                // The factor-2 case runs OpenCV's vector code, which rounds half up.
                out[(dy * width + dx) * cn + c] = if sx == 2 && sy == 2 {
                    ((sum + 2) >> 2) as u8
                } else {
                    saturate_u8(sum as f32 * scale)
                };
            }
        }
    }
    out
}

pub(crate) struct AreaWeight {
    pub(crate) dst: usize,
    pub(crate) src: usize,
    pub(crate) alpha: f32,
}

/// OpenCV's `computeResizeAreaTab`: which source cells (and how much of each) make each
/// output cell along one axis.
pub(crate) fn area_table(ssize: usize, dsize: usize, scale: f64) -> Vec<AreaWeight> {
    let mut tab = Vec::new();
    for d in 0..dsize {
        let fs1 = d as f64 * scale;
        let fs2 = fs1 + scale;
        let cell_width = scale.min(ssize as f64 - fs1);
        let mut s1 = fs1.ceil() as i64;
        let mut s2 = fs2.floor() as i64;
        s2 = s2.min(ssize as i64 - 1);
        s1 = s1.min(s2);
        if s1 as f64 - fs1 > 1e-3 {
            tab.push(AreaWeight {
                dst: d,
                src: (s1 - 1) as usize,
                alpha: ((s1 as f64 - fs1) / cell_width) as f32,
            });
        }
        for s in s1..s2 {
            tab.push(AreaWeight {
                dst: d,
                src: s as usize,
                alpha: (1.0 / cell_width) as f32,
            });
        }
        if fs2 - s2 as f64 > 1e-3 {
            tab.push(AreaWeight {
                dst: d,
                src: s2 as usize,
                alpha: ((fs2 - s2 as f64).min(1.0).min(cell_width) / cell_width) as f32,
            });
        }
    }
    tab
}

/// OpenCV's `ResizeArea_Invoker` with float accumulators, in its order of operations.
fn area_general(src: &Plane, width: usize, height: usize, scale_x: f64, scale_y: f64) -> Vec<u8> {
    let cn = src.channels;
    let xtab = area_table(src.width, width, scale_x);
    let ytab = area_table(src.height, height, scale_y);
    let row_len = width * cn;
    let mut out = vec![0u8; height * row_len];
    let mut buf = vec![0f32; row_len];
    let mut sum = vec![0f32; row_len];
    let mut prev_dy = ytab.first().map_or(0, |t| t.dst);
    for yw in &ytab {
        let row = src.row(yw.src);
        buf.iter_mut().for_each(|b| *b = 0.0);
        for xw in &xtab {
            for c in 0..cn {
                let d = xw.dst * cn + c;
                buf[d] += row[xw.src * cn + c] as f32 * xw.alpha;
            }
        }
        if yw.dst != prev_dy {
            let target = &mut out[prev_dy * row_len..(prev_dy + 1) * row_len];
            for ((t, s), b) in target.iter_mut().zip(sum.iter_mut()).zip(&buf) {
                *t = saturate_u8(*s);
                *s = yw.alpha * b;
            }
            prev_dy = yw.dst;
        } else {
            for (s, b) in sum.iter_mut().zip(&buf) {
                *s += yw.alpha * b;
            }
        }
    }
    let target = &mut out[prev_dy * row_len..(prev_dy + 1) * row_len];
    for (t, s) in target.iter_mut().zip(&sum) {
        *t = saturate_u8(*s);
    }
    out
}

/// OpenCV's `interpolateLanczos4`, in its float/double mix.
pub(crate) fn lanczos4_coefficients(x: f32) -> [f32; 8] {
    use std::f64::consts::PI;
    const S45: f64 = std::f64::consts::FRAC_1_SQRT_2;
    const CS: [[f64; 2]; 8] = [
        [1.0, 0.0],
        [-S45, -S45],
        [0.0, 1.0],
        [S45, -S45],
        [-1.0, 0.0],
        [S45, S45],
        [0.0, -1.0],
        [-S45, S45],
    ];
    let mut coeffs = [0f32; 8];
    let mut sum = 0f32;
    let y0 = -((x + 3.0) as f64) * PI * 0.25;
    let (s0, c0) = (y0.sin(), y0.cos());
    for (i, coeff) in coeffs.iter_mut().enumerate() {
        let yi = x + 3.0 - i as f32;
        *coeff = if yi.abs() >= 1e-6 {
            let y = -(yi as f64) * PI * 0.25;
            ((CS[i][0] * s0 + CS[i][1] * c0) / (y * y)) as f32
        } else {
            1e30
        };
        sum += *coeff;
    }
    let inv = 1.0 / sum;
    coeffs.iter_mut().for_each(|c| *c *= inv);
    coeffs
}

/// OpenCV's `saturate_cast<short>(coefficient * INTER_RESIZE_COEF_SCALE)`.
fn fixed(c: f32) -> i32 {
    (c * COEF_SCALE)
        .round_ties_even()
        .clamp(i16::MIN as f32, i16::MAX as f32) as i32
}

/// Source position and fixed-point weights of each output position along one axis.
struct Taps {
    /// First source index of the kernel (may lie outside the image; reads are clamped).
    start: Vec<i64>,
    weights: Vec<i32>,
}

/// `resizeGeneric_`'s taps for one axis: per destination index, the first source index and
/// `ksize` float coefficients (8 for Lanczos4, else 2), exactly as OpenCV computes them (the
/// 8-bit path then converts them to fixed point, the float path uses them as they are).
pub(crate) fn tap_positions(
    dsize: usize,
    ssize: usize,
    scale: f64,
    inv_scale: f64,
    horizontal: bool,
    interpolation: Interpolation,
) -> (Vec<i64>, Vec<f32>) {
    let area_mode = interpolation == Interpolation::Area;
    let ksize: usize = if interpolation == Interpolation::Lanczos4 {
        8
    } else {
        2
    };
    let ksize2 = (ksize / 2) as i64;
    let mut start = Vec::with_capacity(dsize);
    let mut weights = Vec::with_capacity(dsize * ksize);
    for d in 0..dsize {
        let (mut s, mut f) = if area_mode {
            let s = (d as f64 * scale).floor() as i64;
            let f = ((d + 1) as f64 - (s + 1) as f64 * inv_scale) as f32;
            (s, if f <= 0.0 { 0.0 } else { f - f.floor() })
        } else {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let s = f.floor() as i64;
            (s, f - s as f32)
        };
        // Only the horizontal axis pins linear taps at the borders; vertically OpenCV clamps
        // the rows instead, which gives the same values because the two weights sum to one.
        if horizontal && ksize == 2 {
            if s < 0 {
                (s, f) = (0, 0.0);
            }
            if s >= ssize as i64 - 1 {
                (s, f) = (ssize as i64 - 1, 0.0);
            }
        }
        if ksize == 8 {
            weights.extend(lanczos4_coefficients(f));
        } else {
            weights.extend([1.0 - f, f]);
        }
        start.push(s - ksize2 + 1);
    }
    (start, weights)
}

/// `resizeGeneric_` for 8-bit images: separable fixed-point kernels, horizontal pass into
/// integers, then vertical pass with rounding back to 8 bits.
fn fixed_point(
    src: &Plane,
    width: usize,
    height: usize,
    interpolation: Interpolation,
    axes: &Axes,
) -> Vec<u8> {
    let ksize: usize = if interpolation == Interpolation::Lanczos4 {
        8
    } else {
        2
    };
    let taps = |dsize: usize, ssize: usize, scale: f64, inv_scale: f64, horizontal: bool| {
        let (start, coefficients) =
            tap_positions(dsize, ssize, scale, inv_scale, horizontal, interpolation);
        Taps {
            start,
            weights: coefficients.into_iter().map(fixed).collect(),
        }
    };
    let xt = taps(width, src.width, axes.scale_x, axes.inv_scale_x, true);
    let yt = taps(height, src.height, axes.scale_y, axes.inv_scale_y, false);

    let cn = src.channels;
    let row_len = width * cn;
    let clamp = |i: i64, n: usize| i.clamp(0, n as i64 - 1) as usize;
    let horizontal = |y: usize| -> Vec<i32> {
        let row = src.row(y);
        let mut out = vec![0i32; row_len];
        for dx in 0..width {
            let w = &xt.weights[dx * ksize..(dx + 1) * ksize];
            for c in 0..cn {
                out[dx * cn + c] = w
                    .iter()
                    .enumerate()
                    .map(|(k, &a)| {
                        row[clamp(xt.start[dx] + k as i64, src.width) * cn + c] as i32 * a
                    })
                    .sum();
            }
        }
        out
    };
    let rows: Vec<Vec<i32>> = (0..src.height).map(horizontal).collect();

    let mut out = vec![0u8; height * row_len];
    for dy in 0..height {
        let b = &yt.weights[dy * ksize..(dy + 1) * ksize];
        let srows: Vec<&Vec<i32>> = (0..ksize)
            .map(|k| &rows[clamp(yt.start[dy] + k as i64, src.height)])
            .collect();
        let target = &mut out[dy * row_len..(dy + 1) * row_len];
        if ksize == 2 {
            vertical_linear(srows[0], srows[1], b[0], b[1], target);
        } else {
            for (x, t) in target.iter_mut().enumerate() {
                let s: i64 = (0..ksize).map(|k| srows[k][x] as i64 * b[k] as i64).sum();
                *t = ((s + (1 << 21)) >> 22).clamp(0, 255) as u8;
            }
        }
    }
    out
}

/// `VResizeLinear<uchar>` as `VResizeLinearVec_32s8u` computes it: each row value shifted
/// right by 4, multiplied by its weight keeping the high 16 bits, summed, then `(v + 2) >> 2`.
/// OpenCV 5 uses this arithmetic for every value of a row, the last ones included (checked on
/// a 903-value row against opencv-python-headless 5.0); the scalar formula
/// `(a·β0 + b·β1 + 2^21) >> 22` differs from it by one in about one value in eight.
fn vertical_linear(s0: &[i32], s1: &[i32], b0: i32, b1: i32, out: &mut [u8]) {
    for ((o, &a), &b) in out.iter_mut().zip(s0).zip(s1) {
        let a = ((a >> 4) * b0) >> 16;
        let b = ((b >> 4) * b1) >> 16;
        *o = ((a + b + 2) >> 2).clamp(0, 255) as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detect_sizes_follow_controlnet_aux() {
        // 256x171 at 512: k = 2.994, 766.5 / 64 = 11.98 → 768; 171 · k = 512.
        assert_eq!(detect_size(256, 171, 512), (768, 512, true));
        // 600x400 at 512: k = 1.28 → 768x512.
        assert_eq!(detect_size(600, 400, 512), (768, 512, true));
        // 1024x1024 at 512: halving, INTER_AREA.
        assert_eq!(detect_size(1024, 1024, 512), (512, 512, false));
        // A short side that already equals the resolution is not enlarged.
        assert_eq!(detect_size(700, 512, 512), (704, 512, false));
    }

    #[test]
    fn lanczos_coefficients_sum_to_one_and_peak_at_the_sample() {
        let c = lanczos4_coefficients(0.0);
        assert!((c.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((c[3] - 1.0).abs() < 1e-6);
        let c = lanczos4_coefficients(0.5);
        assert!((c[3] - c[4]).abs() < 1e-6);
    }

    #[test]
    fn halving_rounds_half_up() {
        // 1 + 2 + 3 + 4 = 10 → (10 + 2) >> 2 = 3 (the float path would give round(2.5) = 2).
        let src = [1u8, 2, 3, 4];
        let plane = Plane {
            data: &src,
            width: 2,
            height: 2,
            channels: 1,
        };
        assert_eq!(resize_interleaved(&plane, 1, 1, Interpolation::Area), [3]);
    }
}
