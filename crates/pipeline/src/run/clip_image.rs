//! Preparing reference images for the CLIP image encoder, as diffusers' `CLIPImageProcessor`
//! does by default (`crop`), or letterboxed (`pad`) / stretched (`squash`) for the non-square
//! references that cropping would cut.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::{DynamicImage, RgbImage};

use crate::run::resample::{resize_rgb, Resampler};

use crate::error::{PipelineError, Result};
use crate::plan::ip::Fit;

const CLIP_MEAN: [f64; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const CLIP_STD: [f64; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

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

/// transformers' CLIP processor resizes with its torchvision backend when torchvision is
/// installed (the usual case): torch's antialiased bicubic on 8-bit images.
fn resize(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    resize_rgb(image, width, height, Resampler::TorchBicubicAntialias)
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
