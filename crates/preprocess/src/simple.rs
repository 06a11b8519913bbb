//! The cheap preprocessors: `invert`, `threshold` (scribble), `blur` (tile) and `shuffle`
//! (content shuffle).

use image::RgbImage;
use rand::{Rng, SeedableRng};

use crate::canny::rgb_to_gray;
use crate::resize::{resize, Interpolation};
use crate::Result;

/// `255 - value` in every channel (`cv2.bitwise_not`): black lines on white become the
/// white-on-black lines that line-art and scribble ControlNets expect.
pub fn invert(image: &RgbImage) -> RgbImage {
    let mut out = image.clone();
    out.iter_mut().for_each(|v| *v = 255 - *v);
    out
}

/// Scribble-style binarisation: OpenCV's gray value (`cvtColor(RGB2GRAY)`), then
/// `cv2.threshold(gray, level, 255, THRESH_BINARY)`: white where gray > level, black
/// elsewhere, in all three channels. Dark strokes on white paper need `invert` after this.
pub fn threshold(image: &RgbImage, level: u8) -> RgbImage {
    let gray = rgb_to_gray(image);
    RgbImage::from_fn(image.width(), image.height(), |x, y| {
        let v = if gray.get_pixel(x, y).0[0] > level {
            255
        } else {
            0
        };
        image::Rgb([v, v, v])
    })
}

/// Tile hint: `cv2.resize` down with `INTER_AREA` to `round(width / factor)` ×
/// `round(height / factor)` (at least 1×1), then up to the original size with
/// `INTER_LANCZOS4`. This is the webui's `tile_resample` (downsampling by a rate) made
/// self-contained; controlnet_aux's noisy pyramid variant is not reproduced.
pub fn blur(image: &RgbImage, factor: f64) -> Result<RgbImage> {
    let (w, h) = image.dimensions();
    let small_w = ((w as f64 / factor).round() as u32).max(1);
    let small_h = ((h as f64 / factor).round() as u32).max(1);
    let small = resize(image, small_w, small_h, Interpolation::Area);
    Ok(resize(&small, w, h, Interpolation::Lanczos4))
}

/// controlnet_aux's `make_noise_disk` frequency: one random value per 256 pixels.
const SHUFFLE_FREQUENCY: usize = 256;

/// Content shuffle as controlnet_aux's `ContentShuffleDetector` (h = H, w = W, f = 256): two
/// smooth noise fields (uniform values on a grid every 256 pixels, bicubic-upsampled, cropped,
/// scaled to [0, 1]) give each output pixel the source position
/// `(noise_x · (W − 1), noise_y · (H − 1))`, read with bilinear interpolation at OpenCV
/// `remap`'s 1/32-pixel precision.
///
/// The uniform values come from ChaCha20 seeded with `seed`, not numpy's global Mersenne
/// Twister, so the same seed cannot give the annotator's image; it gives the same kind of
/// image, and the same one on every machine.
pub fn shuffle(image: &RgbImage, seed: u64) -> RgbImage {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    let noise_x = noise_disk(w, h, SHUFFLE_FREQUENCY, &mut rng);
    let noise_y = noise_disk(w, h, SHUFFLE_FREQUENCY, &mut rng);
    let mut out = RgbImage::new(w as u32, h as u32);
    for y in 0..h {
        for x in 0..w {
            let sx = noise_x[y * w + x] * (w - 1) as f64;
            let sy = noise_y[y * w + x] * (h - 1) as f64;
            out.put_pixel(
                x as u32,
                y as u32,
                remap_bilinear(image, sx as f32, sy as f32),
            );
        }
    }
    out
}

/// `make_noise_disk(H, W, 1, F)`: uniform noise on a `(H/F + 2) × (W/F + 2)` grid, resized
/// bicubically (OpenCV's `INTER_CUBIC`, A = −0.75, on doubles) to `(H + 2F) × (W + 2F)`,
/// cropped to the middle `H × W`, then scaled to [0, 1].
fn noise_disk(w: usize, h: usize, f: usize, rng: &mut impl Rng) -> Vec<f64> {
    let (gw, gh) = (w / f + 2, h / f + 2);
    let grid: Vec<f64> = (0..gw * gh).map(|_| rng.gen::<f64>()).collect();
    let (bw, bh) = (w + 2 * f, h + 2 * f);
    let xt = cubic_taps(gw, bw);
    let yt = cubic_taps(gh, bh);
    let mut noise = Vec::with_capacity(w * h);
    // Only the middle `h × w` of the enlarged field is kept.
    for (ys, yw) in &yt[f..f + h] {
        for (xs, xw) in &xt[f..f + w] {
            let mut v = 0.0;
            for (j, &wy) in yw.iter().enumerate() {
                let row = clamp_index(ys + j as i64, gh) * gw;
                for (i, &wx) in xw.iter().enumerate() {
                    v += grid[row + clamp_index(xs + i as i64, gw)] * wx * wy;
                }
            }
            noise.push(v);
        }
    }
    let min = noise.iter().copied().fold(f64::INFINITY, f64::min);
    noise.iter_mut().for_each(|v| *v -= min);
    let max = noise.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max > 0.0 {
        noise.iter_mut().for_each(|v| *v /= max);
    }
    noise
}

fn clamp_index(i: i64, n: usize) -> usize {
    i.clamp(0, n as i64 - 1) as usize
}

/// First source index and the four weights of OpenCV's `interpolateCubic` per output index.
fn cubic_taps(ssize: usize, dsize: usize) -> Vec<(i64, [f64; 4])> {
    const A: f32 = -0.75;
    let scale = ssize as f64 / dsize as f64;
    (0..dsize)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let s = f.floor();
            let x = f - s;
            let c0 = ((A * (x + 1.0) - 5.0 * A) * (x + 1.0) + 8.0 * A) * (x + 1.0) - 4.0 * A;
            let c1 = ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
            let c2 = ((A + 2.0) * (1.0 - x) - (A + 3.0)) * (1.0 - x) * (1.0 - x) + 1.0;
            let c3 = 1.0 - c0 - c1 - c2;
            (s as i64 - 1, [c0 as f64, c1 as f64, c2 as f64, c3 as f64])
        })
        .collect()
}

/// `cv2.remap(..., INTER_LINEAR)` at one point: the position rounded to 1/32 pixel, integer
/// bilinear weights summing to 2^15, taps outside the image read as 0 (`BORDER_CONSTANT`).
fn remap_bilinear(image: &RgbImage, x: f32, y: f32) -> image::Rgb<u8> {
    const BITS: i32 = 5;
    let (w, h) = (image.width() as i32, image.height() as i32);
    let ix = (x * (1 << BITS) as f32).round_ties_even() as i32;
    let iy = (y * (1 << BITS) as f32).round_ties_even() as i32;
    let (x0, fx) = (ix >> BITS, ix & 31);
    let (y0, fy) = (iy >> BITS, iy & 31);
    let weights = [
        (0, 0, 32 * (32 - fx) * (32 - fy)),
        (1, 0, 32 * fx * (32 - fy)),
        (0, 1, 32 * (32 - fx) * fy),
        (1, 1, 32 * fx * fy),
    ];
    let mut out = [0u8; 3];
    for (c, o) in out.iter_mut().enumerate() {
        let mut sum = 0i32;
        for &(ox, oy, weight) in &weights {
            let (px, py) = (x0 + ox, y0 + oy);
            if px >= 0 && py >= 0 && px < w && py < h {
                sum += image.get_pixel(px as u32, py as u32).0[c] as i32 * weight;
            }
        }
        *o = ((sum + (1 << 14)) >> 15).clamp(0, 255) as u8;
    }
    image::Rgb(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient() -> RgbImage {
        RgbImage::from_fn(40, 30, |x, y| {
            image::Rgb([(x * 6) as u8, (y * 8) as u8, 77])
        })
    }

    #[test]
    fn invert_twice_is_identity() {
        let img = gradient();
        assert_eq!(invert(&invert(&img)), img);
        assert_eq!(invert(&img).get_pixel(0, 0).0, [255, 255, 178]);
    }

    #[test]
    fn threshold_is_strictly_above_the_level() {
        let img = RgbImage::from_fn(3, 1, |x, _| {
            let v = [127u8, 128, 200][x as usize];
            image::Rgb([v, v, v])
        });
        let out = threshold(&img, 127);
        let row: Vec<u8> = out.pixels().map(|p| p.0[0]).collect();
        assert_eq!(row, [0, 255, 255]);
    }

    #[test]
    fn blur_keeps_the_size_and_flat_images() {
        let flat = RgbImage::from_pixel(37, 23, image::Rgb([90, 140, 10]));
        let out = blur(&flat, 4.0).unwrap();
        assert_eq!(out, flat);
        assert_eq!(blur(&gradient(), 3.0).unwrap().dimensions(), (40, 30));
    }

    #[test]
    fn shuffle_is_seeded_and_moves_pixels() {
        let img = gradient();
        let a = shuffle(&img, 7);
        assert_eq!(a, shuffle(&img, 7));
        assert_ne!(a, shuffle(&img, 8));
        assert_ne!(a, img);
        assert_eq!(a.dimensions(), img.dimensions());
        // Every value is read from the source: blue is 77 everywhere.
        assert!(a.pixels().all(|p| p.0[2] == 77));
    }
}
