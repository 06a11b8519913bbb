//! 8-bit image resampling that reproduces the reference libraries exactly: Pillow's `resize`
//! (Lanczos, used by diffusers' image and mask processors) and torch's antialiased bicubic
//! (used by transformers' CLIP processor with its torchvision backend). Both are separable,
//! horizontal pass first, with the intermediate rounded to 8 bits and integer weights.

/// Which library's filter and fixed-point rules to follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resampler {
    /// `PIL.Image.resize(..., Image.LANCZOS)`: sinc·sinc(x/3), 22-bit weights.
    PilLanczos,
    /// torch `interpolate(mode="bicubic", antialias=True)` on uint8: a = −0.5, 16-bit weights.
    TorchBicubicAntialias,
}

impl Resampler {
    fn support(self) -> f64 {
        match self {
            Resampler::PilLanczos => 3.0,
            Resampler::TorchBicubicAntialias => 2.0,
        }
    }

    fn filter(self, x: f64) -> f64 {
        match self {
            Resampler::PilLanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
            Resampler::TorchBicubicAntialias => {
                let x = x.abs();
                let a = -0.5;
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
        }
    }

    /// Float weights → integer weights and their precision in bits.
    fn quantise(self, taps: Vec<(usize, Vec<f64>)>) -> (u32, Vec<(usize, Vec<i64>)>) {
        let precision = match self {
            Resampler::PilLanczos => 22,
            Resampler::TorchBicubicAntialias => {
                // torch: the largest precision ≤ 22 at which the largest weight fits 16 bits.
                let max_weight = taps
                    .iter()
                    .flat_map(|(_, w)| w.iter().copied())
                    .fold(0f64, f64::max);
                let mut p = 0u32;
                while p < 22 && ((0.5 + max_weight * (1u64 << (p + 1)) as f64) as i64) < (1 << 15) {
                    p += 1;
                }
                p
            }
        };
        let scale = (1u64 << precision) as f64;
        let quantised = taps
            .into_iter()
            .map(|(start, w)| {
                let q = w
                    .iter()
                    .map(|&v| {
                        if v < 0.0 {
                            (-0.5 + v * scale) as i64
                        } else {
                            (0.5 + v * scale) as i64
                        }
                    })
                    .collect();
                (start, q)
            })
            .collect();
        (precision, quantised)
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// For each output index: the first input index and the normalised weights (identical
/// bounds and centring in Pillow and torch).
fn taps(resampler: Resampler, input: usize, output: usize) -> Vec<(usize, Vec<f64>)> {
    let scale = input as f64 / output as f64;
    let filter_scale = scale.max(1.0);
    let support = resampler.support() * filter_scale;
    (0..output)
        .map(|i| {
            let center = scale * (i as f64 + 0.5);
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let mut weights: Vec<f64> = (xmin..xmax)
                .map(|j| resampler.filter((j as f64 - center + 0.5) / filter_scale))
                .collect();
            let total: f64 = weights.iter().sum();
            if total != 0.0 {
                weights.iter_mut().for_each(|w| *w /= total);
            }
            (xmin, weights)
        })
        .collect()
}

/// Resamples interleaved 8-bit pixels (`channels` per pixel) from `w`×`h` to `ow`×`oh`.
pub fn resize_u8(
    src: &[u8],
    (w, h): (usize, usize),
    (ow, oh): (usize, usize),
    channels: usize,
    resampler: Resampler,
) -> Vec<u8> {
    let horizontal = if ow != w {
        let (precision, taps) = resampler.quantise(taps(resampler, w, ow));
        let mut out = vec![0u8; h * ow * channels];
        for y in 0..h {
            for (x, (start, weights)) in taps.iter().enumerate() {
                for c in 0..channels {
                    let acc = weights
                        .iter()
                        .enumerate()
                        .fold(1i64 << (precision - 1), |acc, (k, wt)| {
                            acc + src[(y * w + start + k) * channels + c] as i64 * wt
                        });
                    out[(y * ow + x) * channels + c] = (acc >> precision).clamp(0, 255) as u8;
                }
            }
        }
        out
    } else {
        src.to_vec()
    };
    if oh == h {
        return horizontal;
    }
    let (precision, taps) = resampler.quantise(taps(resampler, h, oh));
    let mut out = vec![0u8; oh * ow * channels];
    for (y, (start, weights)) in taps.iter().enumerate() {
        for x in 0..ow {
            for c in 0..channels {
                let acc =
                    weights
                        .iter()
                        .enumerate()
                        .fold(1i64 << (precision - 1), |acc, (k, wt)| {
                            acc + horizontal[((start + k) * ow + x) * channels + c] as i64 * wt
                        });
                out[(y * ow + x) * channels + c] = (acc >> precision).clamp(0, 255) as u8;
            }
        }
    }
    out
}

/// Resizes an 8-bit image of any channel count (RGB, grey, ...).
pub fn resize_image<P>(
    image: &image::ImageBuffer<P, Vec<u8>>,
    width: u32,
    height: u32,
    resampler: Resampler,
) -> image::ImageBuffer<P, Vec<u8>>
where
    P: image::Pixel<Subpixel = u8>,
{
    if image.dimensions() == (width, height) {
        return image.clone();
    }
    let data = resize_u8(
        image.as_raw(),
        (image.width() as usize, image.height() as usize),
        (width as usize, height as usize),
        P::CHANNEL_COUNT as usize,
        resampler,
    );
    image::ImageBuffer::from_raw(width, height, data)
        .unwrap_or_else(|| image::ImageBuffer::new(width, height))
}

pub fn resize_rgb(
    image: &image::RgbImage,
    width: u32,
    height: u32,
    resampler: Resampler,
) -> image::RgbImage {
    resize_image(image, width, height, resampler)
}

pub fn resize_gray(
    image: &image::GrayImage,
    width: u32,
    height: u32,
    resampler: Resampler,
) -> image::GrayImage {
    resize_image(image, width, height, resampler)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_images_stay_constant() {
        for r in [Resampler::PilLanczos, Resampler::TorchBicubicAntialias] {
            let src = vec![77u8; 10 * 7 * 3];
            let out = resize_u8(&src, (10, 7), (23, 4), 3, r);
            assert!(out.iter().all(|&v| v == 77), "{r:?}");
        }
    }
}
