//! OpenCV's `cv::Canny(src, dst, low, high)` with its defaults (aperture 3, L1 gradient), on
//! images of any channel count, reproduced step by step from `modules/imgproc/src/canny.cpp`:
//!
//! 1. 3×3 Sobel `dx`, `dy` per channel in integers, `BORDER_REPLICATE` at the image edges.
//! 2. Per pixel the L1 magnitude `|dx| + |dy|` of each channel; the channel with the largest
//!    one gives the pixel's magnitude and direction (the first channel wins ties, as OpenCV's
//!    strict `>` scan). This is why Canny on RGB differs from Canny on a gray copy.
//! 3. Non-maximum suppression in OpenCV's four sectors, decided in fixed point with
//!    `tan 22.5° = 13573 / 2^15`; magnitudes outside the image count as 0. Horizontal and
//!    vertical sectors compare `>` against one neighbour and `>=` against the other, diagonal
//!    ones `>` against both, exactly as OpenCV does.
//! 4. Thresholds: `low` and `high` are swapped if needed and floored to integers; a maximum is
//!    a candidate when its magnitude is `> low` and an edge seed when `> high`.
//! 5. Hysteresis: every candidate 8-connected to a seed becomes an edge (OpenCV's stack
//!    traversal reaches exactly this set, in whatever order its threads run).
//!
//! imageproc's `canny` is not used: it takes one gray channel, smooths with a Gaussian first
//! and uses floating-point angles, so it cannot give OpenCV's result.

use image::{GrayImage, RgbImage};

/// `round(tan(22.5°) · 2^15)`, OpenCV's `TG22`.
const TG22: i64 = 13573;
const CANNY_SHIFT: u32 = 15;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mark {
    NotEdge,
    Candidate,
    Edge,
}

/// The canny map of an RGB image as the ControlNet annotator makes it: white edges on black,
/// the same value in all three channels.
pub fn canny(image: &RgbImage, low: f64, high: f64) -> RgbImage {
    let (w, h) = image.dimensions();
    let edges = canny_interleaved(image.as_raw(), w as usize, h as usize, 3, low, high);
    let data = edges.iter().flat_map(|&v| [v, v, v]).collect();
    RgbImage::from_raw(w, h, data).expect("three channels per pixel")
}

/// OpenCV's Canny on a single-channel image.
pub fn canny_gray(image: &GrayImage, low: f64, high: f64) -> GrayImage {
    let (w, h) = image.dimensions();
    let edges = canny_interleaved(image.as_raw(), w as usize, h as usize, 1, low, high);
    GrayImage::from_raw(w, h, edges).expect("one channel per pixel")
}

/// OpenCV's `cvtColor(RGB2GRAY)` for 8-bit images: `(9798 R + 19235 G + 3735 B + 2^14) >> 15`
/// (checked against OpenCV 5.0 by the fixture script).
pub fn rgb_to_gray(image: &RgbImage) -> GrayImage {
    GrayImage::from_fn(image.width(), image.height(), |x, y| {
        let [r, g, b] = image.get_pixel(x, y).0;
        let v = (9798 * r as u32 + 19235 * g as u32 + 3735 * b as u32 + (1 << 14)) >> 15;
        image::Luma([v as u8])
    })
}

/// Canny on an interleaved 8-bit buffer of `channels` channels; one byte per pixel out, 255 on
/// edges and 0 elsewhere.
pub fn canny_interleaved(
    data: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    low: f64,
    high: f64,
) -> Vec<u8> {
    assert_eq!(data.len(), width * height * channels, "buffer size");
    if width == 0 || height == 0 {
        return Vec::new();
    }
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    // cvFloor of a double into an int; thresholds beyond i32 saturate as OpenCV's do.
    let low = low.floor().clamp(i32::MIN as f64, i32::MAX as f64) as i64;
    let high = high.floor().clamp(i32::MIN as f64, i32::MAX as f64) as i64;

    let gradients = strongest_channel_gradients(data, width, height, channels);
    let magnitude = |x: isize, y: isize| -> i64 {
        if x < 0 || y < 0 || x >= width as isize || y >= height as isize {
            0
        } else {
            gradients[y as usize * width + x as usize].magnitude as i64
        }
    };

    let mut marks = vec![Mark::NotEdge; width * height];
    let mut seeds = Vec::new();
    for y in 0..height {
        for x in 0..width {
            let g = gradients[y * width + x];
            let m = g.magnitude as i64;
            if m <= low {
                continue;
            }
            let (xi, yi) = (x as isize, y as isize);
            let ax = (g.dx as i64).abs();
            let ay = (g.dy as i64).abs() << CANNY_SHIFT;
            let tg22x = ax * TG22;
            let is_maximum = if ay < tg22x {
                // Mostly horizontal gradient: compare left and right.
                m > magnitude(xi - 1, yi) && m >= magnitude(xi + 1, yi)
            } else {
                let tg67x = tg22x + (ax << (CANNY_SHIFT + 1));
                if ay > tg67x {
                    m > magnitude(xi, yi - 1) && m >= magnitude(xi, yi + 1)
                } else {
                    // Diagonal: the sign of dx·dy picks which diagonal (y grows downwards).
                    let s: isize = if (g.dx ^ g.dy) < 0 { -1 } else { 1 };
                    m > magnitude(xi - s, yi - 1) && m > magnitude(xi + s, yi + 1)
                }
            };
            if !is_maximum {
                continue;
            }
            let i = y * width + x;
            if m > high {
                marks[i] = Mark::Edge;
                seeds.push(i);
            } else {
                marks[i] = Mark::Candidate;
            }
        }
    }

    while let Some(i) = seeds.pop() {
        let (x, y) = ((i % width) as isize, (i / width) as isize);
        for (ox, oy) in [
            (-1, -1),
            (0, -1),
            (1, -1),
            (-1, 0),
            (1, 0),
            (-1, 1),
            (0, 1),
            (1, 1),
        ] {
            let (nx, ny) = (x + ox, y + oy);
            if nx < 0 || ny < 0 || nx >= width as isize || ny >= height as isize {
                continue;
            }
            let n = ny as usize * width + nx as usize;
            if marks[n] == Mark::Candidate {
                marks[n] = Mark::Edge;
                seeds.push(n);
            }
        }
    }
    marks
        .into_iter()
        .map(|m| if m == Mark::Edge { 255 } else { 0 })
        .collect()
}

#[derive(Clone, Copy, Default)]
struct Gradient {
    dx: i32,
    dy: i32,
    magnitude: i32,
}

/// Sobel 3×3 per channel with replicated borders; per pixel the channel with the largest L1
/// magnitude.
fn strongest_channel_gradients(
    data: &[u8],
    width: usize,
    height: usize,
    channels: usize,
) -> Vec<Gradient> {
    let mut out = vec![Gradient::default(); width * height];
    let at = |x: usize, y: usize, c: usize| data[(y * width + x) * channels + c] as i32;
    for y in 0..height {
        let (up, down) = (y.saturating_sub(1), (y + 1).min(height - 1));
        for x in 0..width {
            let (left, right) = (x.saturating_sub(1), (x + 1).min(width - 1));
            let mut best = Gradient::default();
            for c in 0..channels {
                let dx = (at(right, up, c) - at(left, up, c))
                    + 2 * (at(right, y, c) - at(left, y, c))
                    + (at(right, down, c) - at(left, down, c));
                let dy = (at(left, down, c) - at(left, up, c))
                    + 2 * (at(x, down, c) - at(x, up, c))
                    + (at(right, down, c) - at(right, up, c));
                let magnitude = dx.abs() + dy.abs();
                if c == 0 || magnitude > best.magnitude {
                    best = Gradient { dx, dy, magnitude };
                }
            }
            out[y * width + x] = best;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vertical_step_gives_one_vertical_line() {
        // Left half 0, right half 200: |dx| = 800 at columns 3 and 4; non-maximum suppression
        // keeps the left one (`>` left, `>=` right), as OpenCV does.
        let img = GrayImage::from_fn(8, 6, |x, _| image::Luma([if x < 4 { 0 } else { 200 }]));
        let edges = canny_gray(&img, 100.0, 200.0);
        for y in 0..6 {
            let row: Vec<u8> = (0..8).map(|x| edges.get_pixel(x, y).0[0]).collect();
            assert_eq!(row, [0, 0, 0, 255, 0, 0, 0, 0], "row {y}");
        }
    }

    #[test]
    fn thresholds_are_strict_and_swapped() {
        // |dx| = 4 · 50 = 200 on the step: not above high = 200, so no seed, no edge.
        let img = GrayImage::from_fn(8, 4, |x, _| image::Luma([if x < 4 { 0 } else { 50 }]));
        assert!(canny_gray(&img, 100.0, 200.0).pixels().all(|p| p.0[0] == 0));
        assert!(canny_gray(&img, 199.9, 100.0)
            .pixels()
            .any(|p| p.0[0] == 255));
    }

    #[test]
    fn the_strongest_channel_decides() {
        // Only the blue channel has a step; a gray copy would see a third of it.
        let img = RgbImage::from_fn(8, 4, |x, _| {
            image::Rgb([10, 10, if x < 4 { 0 } else { 90 }])
        });
        let rgb_edges = canny(&img, 100.0, 200.0);
        assert!(rgb_edges.pixels().any(|p| p.0 == [255, 255, 255]));
        let gray_edges = canny_gray(&rgb_to_gray(&img), 100.0, 200.0);
        assert!(gray_edges.pixels().all(|p| p.0[0] == 0));
    }
}
