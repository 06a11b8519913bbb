//! Canny and the annotator resizing against OpenCV 5.0 (opencv-python-headless) on four
//! photographs from scikit-image's data (sources and licences: tests/fixtures/README.md,
//! `preprocess/`). Fixtures: tests/fixtures/make_preprocess_fixtures.py.

use std::path::PathBuf;

use image::{GrayImage, RgbImage};
use ipcompose_preprocess::canny::{canny, canny_gray, rgb_to_gray};
use ipcompose_preprocess::resize::{resize, resize_image, Interpolation};
use ipcompose_preprocess::{Operation, Settings};

const PHOTOS: [&str; 4] = ["astronaut", "coffee", "chelsea", "rocket"];
const THRESHOLDS: [(u32, u32); 2] = [(100, 200), (50, 150)];

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/preprocess")
        .join(path)
}

fn rgb(path: &str) -> RgbImage {
    image::open(fixture(path))
        .unwrap_or_else(|e| panic!("fixture {path}: {e}"))
        .to_rgb8()
}

fn gray(path: &str) -> GrayImage {
    image::open(fixture(path))
        .unwrap_or_else(|e| panic!("fixture {path}: {e}"))
        .to_luma8()
}

fn edge_set(image: &GrayImage) -> Vec<bool> {
    image.pixels().map(|p| p.0[0] > 127).collect()
}

/// Share of `a`'s edge pixels that have an edge pixel of `b` within `tolerance` pixels
/// (Chebyshev distance).
fn matched(a: &[bool], b: &[bool], width: usize, tolerance: isize) -> (usize, usize) {
    let height = a.len() / width;
    let mut hits = 0;
    let mut total = 0;
    for y in 0..height as isize {
        for x in 0..width as isize {
            if !a[y as usize * width + x as usize] {
                continue;
            }
            total += 1;
            let found = (-tolerance..=tolerance).any(|dy| {
                (-tolerance..=tolerance).any(|dx| {
                    let (nx, ny) = (x + dx, y + dy);
                    nx >= 0
                        && ny >= 0
                        && nx < width as isize
                        && ny < height as isize
                        && b[ny as usize * width + nx as usize]
                })
            });
            hits += usize::from(found);
        }
    }
    (hits, total)
}

/// Edge-pixel F1 of `ours` against `reference` with a pixel tolerance.
fn f1(ours: &GrayImage, reference: &GrayImage, tolerance: isize) -> f64 {
    assert_eq!(ours.dimensions(), reference.dimensions());
    let width = ours.width() as usize;
    let (a, b) = (edge_set(ours), edge_set(reference));
    let (ph, pt) = matched(&a, &b, width, tolerance);
    let (rh, rt) = matched(&b, &a, width, tolerance);
    if pt == 0 && rt == 0 {
        return 1.0;
    }
    let precision = ph as f64 / pt.max(1) as f64;
    let recall = rh as f64 / rt.max(1) as f64;
    if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    }
}

fn iou(a: &GrayImage, b: &GrayImage) -> f64 {
    let (a, b) = (edge_set(a), edge_set(b));
    let both = a.iter().zip(&b).filter(|(x, y)| **x && **y).count();
    let either = a.iter().zip(&b).filter(|(x, y)| **x || **y).count();
    both as f64 / either.max(1) as f64
}

fn first_channel(image: &RgbImage) -> GrayImage {
    GrayImage::from_fn(image.width(), image.height(), |x, y| {
        image::Luma([image.get_pixel(x, y).0[0]])
    })
}

fn max_abs_diff(a: &RgbImage, b: &RgbImage) -> (u8, usize) {
    assert_eq!(a.dimensions(), b.dimensions());
    let diffs = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y));
    let max = diffs.clone().max().unwrap_or(0);
    (max, diffs.filter(|d| *d > 0).count())
}

/// Measured: F1 = 1.0000 (every edge pixel identical, tolerance 0) for all four photographs
/// and both threshold pairs.
#[test]
fn canny_matches_opencv_on_photographs() {
    for photo in PHOTOS {
        let input = rgb(&format!("inputs/{photo}.png"));
        for (low, high) in THRESHOLDS {
            let reference = gray(&format!("canny/{photo}_{low}_{high}.png"));
            let ours = first_channel(&canny(&input, low as f64, high as f64));
            let tolerant = f1(&ours, &reference, 1);
            let exact = f1(&ours, &reference, 0);
            eprintln!("{photo} ({low}, {high}): F1 {tolerant:.4} (1 px), {exact:.4} (exact)");
            assert!(
                tolerant >= 0.95,
                "{photo} ({low}, {high}): F1 {tolerant:.4} is below 0.95"
            );
            assert_eq!(
                ours, reference,
                "{photo} ({low}, {high}): not bit-identical"
            );
        }
    }
}

/// The reason for running Canny on RGB: OpenCV's own gray-copy edges overlap its RGB edges
/// with IoU 0.74 / 0.63 / 0.61 / 0.42 on these photographs.
#[test]
fn canny_on_a_gray_copy_differs_from_canny_on_rgb() {
    for photo in PHOTOS {
        let input = rgb(&format!("inputs/{photo}.png"));
        let opencv_rgb = gray(&format!("canny/{photo}_100_200.png"));
        let opencv_gray = gray(&format!("canny_gray/{photo}_100_200.png"));
        let ours_gray = canny_gray(&rgb_to_gray(&input), 100.0, 200.0);
        assert_eq!(ours_gray, opencv_gray, "{photo}: gray Canny not identical");
        let overlap = iou(&opencv_rgb, &opencv_gray);
        eprintln!("{photo}: IoU(RGB Canny, gray Canny) = {overlap:.2}");
        assert!(overlap < 0.8, "{photo}: IoU {overlap:.2}");
    }
}

#[test]
fn detect_resolution_resizing_matches_opencv() {
    let cases = [
        ("astronaut", 128, "resize/astronaut_area_128.png"),
        ("coffee", 128, "resize/coffee_area_128.png"),
        ("chelsea", 192, "resize/chelsea_lanczos_192.png"),
    ];
    for (photo, resolution, reference) in cases {
        let input = rgb(&format!("inputs/{photo}.png"));
        let ours = resize_image(&input, resolution).unwrap();
        let (max, count) = max_abs_diff(&ours, &rgb(reference));
        eprintln!("{reference}: max abs diff {max} ({count} values differ)");
        assert_eq!(max, 0, "{reference}");
    }
}

#[test]
fn plain_resizes_match_opencv() {
    let astronaut = rgb("inputs/astronaut.png");
    let cropped = image::imageops::crop_imm(&astronaut, 0, 0, 255, 255).to_image();
    let cases = [
        (
            "chelsea",
            None,
            301,
            203,
            Interpolation::Linear,
            "chelsea_linear_301x203",
        ),
        (
            "coffee",
            None,
            264,
            160,
            Interpolation::Area,
            "coffee_area_264x160",
        ),
        (
            "astronaut",
            Some(&cropped),
            85,
            85,
            Interpolation::Area,
            "astronaut_area_85",
        ),
        (
            "astronaut",
            None,
            64,
            64,
            Interpolation::Area,
            "astronaut_area_64",
        ),
        (
            "rocket",
            None,
            333,
            250,
            Interpolation::Lanczos4,
            "rocket_lanczos_333x250",
        ),
    ];
    for (photo, source, w, h, interpolation, reference) in cases {
        let input = source
            .cloned()
            .unwrap_or_else(|| rgb(&format!("inputs/{photo}.png")));
        let ours = resize(&input, w, h, interpolation);
        let (max, count) = max_abs_diff(&ours, &rgb(&format!("resize/{reference}.png")));
        eprintln!("{reference}: max abs diff {max} ({count} values differ)");
        assert_eq!(max, 0, "{reference}");
    }
    // OpenCV halves with INTER_LINEAR through INTER_AREA's fast path.
    let halved = resize(&astronaut, 128, 128, Interpolation::Linear);
    assert_eq!(halved, rgb("resize/astronaut_area_128.png"));
}

/// controlnet_aux's CannyDetector at detect 192, image 256: Canny at 320x192, then
/// INTER_LINEAR to 448x256.
#[test]
fn annotator_output_resize_matches_opencv() {
    let input = rgb("inputs/chelsea.png");
    let settings = Settings {
        operation: Operation::Canny {
            low: 100.0,
            high: 200.0,
        },
        detect_resolution: Some(192),
        output_size: Some((448, 256)),
    };
    let ours = settings.apply(&input).unwrap();
    let (max, count) = max_abs_diff(&ours, &rgb("resize/chelsea_canny_192_to_256.png"));
    eprintln!("linear resize of the edge map: max abs diff {max} ({count} values differ)");
    assert_eq!(max, 0);
    // The same path through `resize` directly.
    let detected = canny(&resize_image(&input, 192).unwrap(), 100.0, 200.0);
    assert_eq!(resize(&detected, 448, 256, Interpolation::Linear), ours);
}

/// The whole annotator at its defaults (detect resolution 512, Lanczos enlargement).
#[test]
fn canny_annotator_matches_controlnet_aux() {
    let input = rgb("inputs/rocket.png");
    let ours = Settings::new(Operation::Canny {
        low: 100.0,
        high: 200.0,
    })
    .apply(&input)
    .unwrap();
    let reference = gray("annotator/rocket_512.png");
    let ours = first_channel(&ours);
    let score = f1(&ours, &reference, 1);
    eprintln!("annotator rocket 512: F1 {score:.4}");
    assert_eq!(ours, reference);
}
