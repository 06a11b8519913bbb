//! Regional image prompts: a mask image per adapter (or per image), prepared as diffusers'
//! `IPAdapterMaskProcessor` does and resized to each attention layer's token grid.

use candle_core::{Device, Tensor};
use image::GrayImage;

use crate::run::resample::{resize_gray, Resampler};

use crate::error::Result;

/// A binary mask at the output size, row-major, values 0 or 1.
#[derive(Debug, Clone)]
pub struct BinaryMask {
    pub width: usize,
    pub height: usize,
    pub values: Vec<f32>,
}

impl BinaryMask {
    /// Resize to the output size (Lanczos), grey, /255, then `< 0.5 → 0`, else 1.
    pub fn from_image(image: &GrayImage, width: usize, height: usize) -> Self {
        let resized = resize_gray(image, width as u32, height as u32, Resampler::PilLanczos);
        let values = resized
            .pixels()
            .map(|p| {
                if (p.0[0] as f32 / 255.0) < 0.5 {
                    0.0
                } else {
                    1.0
                }
            })
            .collect();
        Self {
            width,
            height,
            values,
        }
    }

    /// The mask for a layer with `tokens` query positions, `[1, tokens, 1]`: diffusers picks a
    /// grid with the mask's aspect ratio, resizes bicubically (torch, a = −0.75, not clamped)
    /// and pads or truncates to `tokens`.
    pub fn for_layer(&self, tokens: usize, device: &Device) -> Result<Tensor> {
        let ratio = self.width as f64 / self.height as f64;
        let mut mh = (tokens as f64 / ratio).sqrt().floor() as usize;
        mh = mh.max(1);
        if !tokens.is_multiple_of(mh) {
            mh += 1;
        }
        let mw = (tokens / mh).max(1);
        let resized = bicubic_resize(&self.values, self.height, self.width, mh, mw);
        let mut flat = resized;
        flat.resize(tokens, 0.0);
        Ok(Tensor::from_vec(flat, (1, tokens, 1), device)?)
    }
}

/// torch `F.interpolate(mode="bicubic", align_corners=False)` without antialiasing.
fn bicubic_resize(src: &[f32], h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    let rows = resample_axis(src, h, w, out_h, true);
    resample_axis(&rows, out_h, w, out_w, false)
}

fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// Resamples along rows (`vertical`) or columns of an `h`×`w` grid to `out` samples.
fn resample_axis(src: &[f32], h: usize, w: usize, out: usize, vertical: bool) -> Vec<f32> {
    let input = if vertical { h } else { w };
    let scale = input as f64 / out as f64;
    let (oh, ow) = if vertical { (out, w) } else { (h, out) };
    let mut dst = vec![0f32; oh * ow];
    for o in 0..out {
        let real = (o as f64 + 0.5) * scale - 0.5;
        let base = real.floor();
        let weights = cubic_weights(real - base);
        let taps: Vec<(usize, f64)> = (0..4)
            .map(|k| {
                let index = (base as i64 - 1 + k as i64).clamp(0, input as i64 - 1) as usize;
                (index, weights[k])
            })
            .collect();
        if vertical {
            for x in 0..w {
                let v: f64 = taps.iter().map(|&(i, wt)| src[i * w + x] as f64 * wt).sum();
                dst[o * w + x] = v as f32;
            }
        } else {
            for y in 0..h {
                let v: f64 = taps.iter().map(|&(i, wt)| src[y * w + i] as f64 * wt).sum();
                dst[y * out + o] = v as f32;
            }
        }
    }
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_grid_follows_the_aspect_ratio() {
        let mask = BinaryMask {
            width: 8,
            height: 4,
            values: (0..32).map(|i| if i % 8 < 4 { 1.0 } else { 0.0 }).collect(),
        };
        let t = mask.for_layer(8, &Device::Cpu).unwrap();
        // 8 tokens at ratio 2: a 2×4 grid, left half ones.
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v.len(), 8);
        assert!(
            v[0] > 0.9 && v[3] < 0.1 && v[4] > 0.9 && v[7] < 0.1,
            "{v:?}"
        );
    }

    #[test]
    fn same_size_bicubic_is_identity() {
        let src: Vec<f32> = (0..12).map(|i| i as f32).collect();
        assert_eq!(bicubic_resize(&src, 3, 4, 3, 4), src);
    }
}
