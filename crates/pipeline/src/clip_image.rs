//! Preparing reference images for the CLIP image encoder, as diffusers' `CLIPImageProcessor`
//! does by default (`crop`), or letterboxed (`pad`) / stretched (`squash`) for the non-square
//! references that cropping would cut.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::{imageops::FilterType, DynamicImage, RgbImage};

use crate::error::{PipelineError, Result};

const CLIP_MEAN: [f64; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const CLIP_STD: [f64; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// How a non-square reference image becomes the encoder's square input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fit {
    /// Shortest side to the input size, then a centre crop (diffusers' behaviour).
    #[default]
    Crop,
    /// Letterbox onto a black square, then resize: nothing is cut off.
    Pad,
    /// Resize straight to the square, changing the aspect ratio.
    Squash,
}

impl std::str::FromStr for Fit {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "crop" => Ok(Fit::Crop),
            "pad" => Ok(Fit::Pad),
            "squash" => Ok(Fit::Squash),
            other => Err(format!("unknown fit `{other}` (valid: crop, pad, squash)")),
        }
    }
}

pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let image = image::open(path).map_err(|e| PipelineError::Output {
        path: path.to_path_buf(),
        message: format!("cannot read image: {e}"),
    })?;
    Ok(flatten_alpha_on_white(image))
}

/// transformers 5 composites transparent pixels onto white before dropping alpha.
fn flatten_alpha_on_white(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.to_rgb8();
    }
    let rgba = image.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y).0;
        let a = p[3] as f32 / 255.0;
        let blend = |c: u8| (c as f32 * a + 255.0 * (1.0 - a)).round() as u8;
        image::Rgb([blend(p[0]), blend(p[1]), blend(p[2])])
    })
}

/// Antialiased bicubic resize as transformers' CLIP processor does it with its torchvision
/// backend: torch's 8-bit path (a = −0.5, weights in 16-bit fixed point, a horizontal pass
/// rounded to 8 bits, then a vertical pass). Matches torchvision exactly on the fixtures.
fn resize(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    if image.width() == width && image.height() == height {
        return image.clone();
    }
    let (w, h) = (image.width() as usize, image.height() as usize);
    let (ow, oh) = (width as usize, height as usize);
    let src = image.as_raw();
    let (precision_x, taps_x) = fixed_point(aa_taps(w, ow));
    let mut mid = vec![0u8; h * ow * 3];
    for y in 0..h {
        for (x, (start, weights)) in taps_x.iter().enumerate() {
            for c in 0..3 {
                let acc = weights
                    .iter()
                    .enumerate()
                    .fold(1i64 << (precision_x - 1), |acc, (k, wt)| {
                        acc + src[(y * w + start + k) * 3 + c] as i64 * *wt as i64
                    });
                mid[(y * ow + x) * 3 + c] = (acc >> precision_x).clamp(0, 255) as u8;
            }
        }
    }
    let (precision_y, taps_y) = fixed_point(aa_taps(h, oh));
    let mut out = vec![0u8; oh * ow * 3];
    for (y, (start, weights)) in taps_y.iter().enumerate() {
        for x in 0..ow {
            for c in 0..3 {
                let acc = weights
                    .iter()
                    .enumerate()
                    .fold(1i64 << (precision_y - 1), |acc, (k, wt)| {
                        acc + mid[((start + k) * ow + x) * 3 + c] as i64 * *wt as i64
                    });
                out[(y * ow + x) * 3 + c] = (acc >> precision_y).clamp(0, 255) as u8;
            }
        }
    }
    RgbImage::from_raw(width, height, out)
        .unwrap_or_else(|| image::imageops::resize(image, width, height, FilterType::CatmullRom))
}

/// torch's 16-bit weights: the largest precision (≤ 22 bits) at which the largest weight
/// still fits, each weight rounded half away from zero.
fn fixed_point(taps: Vec<(usize, Vec<f64>)>) -> (u32, Vec<(usize, Vec<i16>)>) {
    let max_weight = taps
        .iter()
        .flat_map(|(_, w)| w.iter().copied())
        .fold(0f64, f64::max);
    let mut precision = 0u32;
    while precision < 22
        && ((0.5 + max_weight * (1u64 << (precision + 1)) as f64) as i64) < (1 << 15)
    {
        precision += 1;
    }
    let scale = (1u64 << precision) as f64;
    let quantised = taps
        .into_iter()
        .map(|(start, w)| {
            let q = w
                .iter()
                .map(|&v| {
                    if v < 0.0 {
                        (-0.5 + v * scale) as i16
                    } else {
                        (0.5 + v * scale) as i16
                    }
                })
                .collect();
            (start, q)
        })
        .collect();
    (precision, quantised)
}

/// For each output index: the first input index and the normalised weights.
fn aa_taps(input: usize, output: usize) -> Vec<(usize, Vec<f64>)> {
    let cubic = |x: f64| {
        let x = x.abs();
        let a = -0.5f64;
        if x < 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * a
        } else {
            0.0
        }
    };
    let scale = input as f64 / output as f64;
    let (support, inv_scale) = if scale >= 1.0 {
        (2.0 * scale, 1.0 / scale)
    } else {
        (2.0, 1.0)
    };
    (0..output)
        .map(|i| {
            let center = scale * (i as f64 + 0.5);
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let mut weights: Vec<f64> = (xmin..xmax)
                .map(|j| cubic((j as f64 - center + 0.5) * inv_scale))
                .collect();
            let total: f64 = weights.iter().sum();
            if total != 0.0 {
                weights.iter_mut().for_each(|w| *w /= total);
            }
            (xmin, weights)
        })
        .collect()
}

/// The `size`×`size` RGB image the encoder sees.
pub fn fit_image(image: &RgbImage, size: u32, fit: Fit) -> RgbImage {
    let (w, h) = (image.width(), image.height());
    match fit {
        Fit::Squash => resize(image, size, size),
        Fit::Pad => {
            let side = w.max(h);
            let mut canvas = RgbImage::new(side, side);
            image::imageops::overlay(
                &mut canvas,
                image,
                ((side - w) / 2) as i64,
                ((side - h) / 2) as i64,
            );
            resize(&canvas, size, size)
        }
        Fit::Crop => {
            let short = w.min(h);
            // transformers: the long side is int(size * long / short), truncated.
            let (rw, rh) = if w <= h {
                (size, (size as u64 * h as u64 / short as u64) as u32)
            } else {
                ((size as u64 * w as u64 / short as u64) as u32, size)
            };
            let resized = resize(image, rw, rh);
            let left = (rw - size) / 2;
            let top = (rh - size) / 2;
            image::imageops::crop_imm(&resized, left, top, size, size).to_image()
        }
    }
}

/// Rescale to [0, 1] and normalise with CLIP's mean and std: `[1, 3, S, S]`.
pub fn normalize(image: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let mut data = vec![0f32; 3 * w * h];
    for (x, y, p) in image.enumerate_pixels() {
        for c in 0..3 {
            let v = (p.0[c] as f64 / 255.0) as f32;
            data[c * w * h + y as usize * w + x as usize] =
                (v - CLIP_MEAN[c] as f32) / CLIP_STD[c] as f32;
        }
    }
    Ok(Tensor::from_vec(data, (1, 3, h, w), device)?)
}
