//! The depth hint as the ControlNet depth annotator for Depth Anything V2 makes it.
//!
//! Reference: the original repository's `DepthAnythingV2.infer_image(raw_bgr, input_size=518)`
//! (DepthAnything/Depth-Anything-V2, `depth_anything_v2/dpt.py`), followed by the map step of
//! comfyui_controlnet_aux's `DepthAnythingV2Detector` — the annotator people pair with the
//! depth ControlNets:
//!
//! 1. RGB `/ 255` in float64; `Resize(518, 518, keep_aspect_ratio=True, ensure_multiple_of=14,
//!    resize_method="lower_bound")`: both sides at least 518, each rounded (half to even) to a
//!    multiple of 14, rounded up instead where that would fall below 518 ([`network_size`]);
//!    `cv2.resize(..., INTER_CUBIC)` on the float64 image ([`resize_cubic_f64`]); ImageNet
//!    mean/std; CHW float32 ([`prepare`]).
//! 2. The network ([`ipcompose_models::depth_anything::DepthAnything`]; the original `.pth`
//!    files use the original position-embedding interpolation).
//! 3. `F.interpolate(depth, (h, w), mode="bilinear", align_corners=True)` back to the input's
//!    size in float32, then `(d - min) / (max - min) * 255` truncated to `u8`, repeated into
//!    three channels ([`depth_to_map`]). Relative models give inverse depth, so near is bright;
//!    metric models (depth in metres) are inverted as the detector does (`255 - map`).
//!
//! The detector's last step, `resize_image_with_pad` to its detect resolution, is not done: the
//! map keeps the input's resolution, and the pipeline resizes hints to the generation size.
//!
//! diffusers' ControlNet examples use transformers' `pipeline("depth-estimation")` instead, whose
//! preprocessing (PIL or torchvision bicubic with antialiasing) and bicubic post-resize differ;
//! that route is not reproduced.

use image::RgbImage;

use ipcompose_models::depth_anything::{DepthAnything, DepthEstimationType};

use crate::{PreprocessError, Result};

/// `infer_image`'s default `input_size`.
pub const INPUT_SIZE: u32 = 518;
/// The network's patch size; both input sides are multiples of it.
pub const MULTIPLE: u32 = 14;

const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const STD: [f64; 3] = [0.229, 0.224, 0.225];

/// The network input for a `width × height` image: the original `Resize` with
/// `keep_aspect_ratio`, `ensure_multiple_of = 14`, `resize_method = "lower_bound"`.
pub fn network_size(width: u32, height: u32, input_size: u32) -> (u32, u32) {
    let target = input_size as f64;
    let scale_h = target / height as f64;
    let scale_w = target / width as f64;
    // lower_bound: the larger scale, so that both sides reach the target.
    let scale = if scale_w > scale_h { scale_w } else { scale_h };
    let m = MULTIPLE as f64;
    let side = |x: f64| -> u32 {
        let y = (x / m).round_ties_even() * m;
        let y = if y < target { (x / m).ceil() * m } else { y };
        y as u32
    };
    (side(scale * width as f64), side(scale * height as f64))
}

/// The network input: `[3, height, width]` float32, ImageNet-normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkInput {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

/// Step 1 of the module docs: the original `image2tensor`.
pub fn prepare(image: &RgbImage, input_size: u32) -> Result<NetworkInput> {
    if image.width() == 0 || image.height() == 0 {
        return Err(PreprocessError::Invalid("the image is empty".to_string()));
    }
    if input_size == 0 {
        return Err(PreprocessError::Invalid(
            "depth input size must be positive".to_string(),
        ));
    }
    let (w, h) = network_size(image.width(), image.height(), input_size);
    let src: Vec<f64> = image.as_raw().iter().map(|&v| v as f64 / 255.0).collect();
    let resized = resize_cubic_f64(
        &src,
        image.width() as usize,
        image.height() as usize,
        3,
        w as usize,
        h as usize,
    );
    let (w, h) = (w as usize, h as usize);
    let mut data = vec![0f32; 3 * w * h];
    for (i, px) in resized.chunks_exact(3).enumerate() {
        for c in 0..3 {
            data[c * w * h + i] = ((px[c] - MEAN[c]) / STD[c]) as f32;
        }
    }
    Ok(NetworkInput {
        width: w,
        height: h,
        data,
    })
}

/// OpenCV's cubic weights, computed in `f32` as `interpolateCubic` does.
fn opencv_cubic(x: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let c0 = ((A * (x + 1.0) - 5.0 * A) * (x + 1.0) + 8.0 * A) * (x + 1.0) - 4.0 * A;
    let c1 = ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = ((A + 2.0) * (1.0 - x) - (A + 3.0)) * (1.0 - x) * (1.0 - x) + 1.0;
    [c0, c1, c2, 1.0 - c0 - c1 - c2]
}

/// Source taps and weights along one axis: `f = (float)((d + 0.5) · scale - 0.5)`,
/// `s = floor(f)`, taps `s - 1 ..= s + 2` clamped to the edge (replicated border).
fn cubic_axis(src: usize, dst: usize) -> Vec<([usize; 4], [f64; 4])> {
    let scale = 1.0 / (dst as f64 / src as f64);
    (0..dst)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let s = f.floor();
            let w = opencv_cubic(f - s);
            let s = s as i64;
            let idx = |k: i64| (s - 1 + k).clamp(0, src as i64 - 1) as usize;
            (
                [idx(0), idx(1), idx(2), idx(3)],
                [w[0] as f64, w[1] as f64, w[2] as f64, w[3] as f64],
            )
        })
        .collect()
}

/// `cv2.resize(src, (dst_w, dst_h), interpolation=INTER_CUBIC)` for an interleaved float64
/// image: OpenCV's generic path (`HResizeCubic` / `VResizeCubic` with double sums and float
/// weights, summed left to right, rows and columns clamped at the borders).
pub fn resize_cubic_f64(
    src: &[f64],
    width: usize,
    height: usize,
    channels: usize,
    dst_w: usize,
    dst_h: usize,
) -> Vec<f64> {
    assert_eq!(src.len(), width * height * channels);
    if (dst_w, dst_h) == (width, height) {
        return src.to_vec();
    }
    let xs = cubic_axis(width, dst_w);
    let ys = cubic_axis(height, dst_h);
    // Horizontal pass on every source row.
    let row_len = dst_w * channels;
    let mut rows = vec![0f64; height * row_len];
    for y in 0..height {
        let s = &src[y * width * channels..(y + 1) * width * channels];
        let d = &mut rows[y * row_len..(y + 1) * row_len];
        for (dx, (ix, a)) in xs.iter().enumerate() {
            for c in 0..channels {
                let at = |k: usize| s[ix[k] * channels + c];
                d[dx * channels + c] = at(0) * a[0] + at(1) * a[1] + at(2) * a[2] + at(3) * a[3];
            }
        }
    }
    let mut out = vec![0f64; dst_h * row_len];
    for (dy, (iy, b)) in ys.iter().enumerate() {
        let r = |k: usize| &rows[iy[k] * row_len..(iy[k] + 1) * row_len];
        let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
        let d = &mut out[dy * row_len..(dy + 1) * row_len];
        for x in 0..row_len {
            d[x] = r0[x] * b[0] + r1[x] * b[1] + r2[x] * b[2] + r3[x] * b[3];
        }
    }
    out
}

/// One axis of torch's float32 `upsample_bilinear2d(align_corners=True)`:
/// `(i0, i1, λ0, λ1)` per output index.
fn bilinear_axis(src: usize, dst: usize) -> Vec<(usize, usize, f32, f32)> {
    let scale = if dst > 1 {
        (src - 1) as f32 / (dst - 1) as f32
    } else {
        0.0
    };
    (0..dst)
        .map(|d| {
            let real = scale * d as f32;
            let i0 = (real as usize).min(src - 1);
            let l1 = (real - i0 as f32).min(1.0);
            let i1 = if i0 < src - 1 { i0 + 1 } else { i0 };
            (i0, i1, 1.0 - l1, l1)
        })
        .collect()
}

/// `F.interpolate(depth[None, None], (height, width), mode="bilinear", align_corners=True)` in
/// float32, with the fused multiply-adds torch's CPU kernel performs (checked bit for bit on
/// the fixture sizes).
pub fn resize_bilinear_align_corners(
    depth: &[f32],
    src_w: usize,
    src_h: usize,
    width: usize,
    height: usize,
) -> Vec<f32> {
    assert_eq!(depth.len(), src_w * src_h);
    if (src_w, src_h) == (width, height) {
        return depth.to_vec();
    }
    let xs = bilinear_axis(src_w, width);
    let ys = bilinear_axis(src_h, height);
    let mut out = Vec::with_capacity(width * height);
    for &(y0, y1, a0, a1) in &ys {
        let r0 = &depth[y0 * src_w..(y0 + 1) * src_w];
        let r1 = &depth[y1 * src_w..(y1 + 1) * src_w];
        for &(x0, x1, b0, b1) in &xs {
            let top = r0[x0].mul_add(b0, r0[x1] * b1);
            let bottom = r1[x0].mul_add(b0, r1[x1] * b1);
            out.push(top.mul_add(a0, bottom * a1));
        }
    }
    out
}

/// Step 3 of the module docs: the network output `[src_h, src_w]` to the `width × height` map.
/// A constant depth (max = min, where numpy would divide by zero) gives a black map.
pub fn depth_to_map(
    depth: &[f32],
    src_w: usize,
    src_h: usize,
    width: u32,
    height: u32,
    invert: bool,
) -> RgbImage {
    let d = resize_bilinear_align_corners(depth, src_w, src_h, width as usize, height as usize);
    let min = d.iter().copied().fold(f32::INFINITY, f32::min);
    let max = d.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let range = max - min;
    let mut raw = Vec::with_capacity(d.len() * 3);
    for &v in &d {
        let level = if range > 0.0 {
            // numpy float32: ((d - min) / (max - min)) * 255.0, then astype(uint8) truncates.
            ((v - min) / range * 255.0) as u8
        } else {
            0
        };
        let level = if invert { 255 - level } else { level };
        raw.extend_from_slice(&[level; 3]);
    }
    RgbImage::from_raw(width, height, raw).expect("three channels per pixel")
}

/// The Depth Anything V2 depth hint of `image`, at the image's resolution, near = bright (see
/// the module docs for the annotator it reproduces). `input_size` is `infer_image`'s (518).
pub fn depth_map(model: &DepthAnything, image: &RgbImage, input_size: u32) -> Result<RgbImage> {
    let input = prepare(image, input_size)?;
    let depth = predict(model, &input)?;
    let invert = model.config().depth_estimation_type == DepthEstimationType::Metric;
    Ok(depth_to_map(
        &depth,
        input.width,
        input.height,
        image.width(),
        image.height(),
        invert,
    ))
}

/// The network's `predicted_depth` for a prepared input, `[height · width]` row-major.
pub fn predict(model: &DepthAnything, input: &NetworkInput) -> Result<Vec<f32>> {
    let run = || -> candle_core::Result<Vec<f32>> {
        let pixels = candle_core::Tensor::from_slice(
            &input.data,
            (1, 3, input.height, input.width),
            model.device(),
        )?;
        model
            .forward(&pixels)?
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()
    };
    run().map_err(|e| PreprocessError::Model(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_size_lower_bound() {
        // From the fixture script (the original Resize).
        assert_eq!(network_size(200, 150, 518), (686, 518));
        assert_eq!(network_size(150, 200, 518), (518, 686));
        assert_eq!(network_size(512, 512, 518), (518, 518));
        assert_eq!(network_size(640, 427, 518), (770, 518));
        assert_eq!(network_size(37, 1000, 518), (518, 14000));
    }

    #[test]
    fn bilinear_corners_are_kept() {
        let d = [1.0, 2.0, 3.0, 4.0];
        let out = resize_bilinear_align_corners(&d, 2, 2, 3, 3);
        assert_eq!(out, vec![1.0, 1.5, 2.0, 2.0, 2.5, 3.0, 3.0, 3.5, 4.0]);
    }

    #[test]
    fn flat_depth_is_black() {
        let map = depth_to_map(&[0.5; 4], 2, 2, 3, 2, false);
        assert!(map.as_raw().iter().all(|&v| v == 0));
    }
}
