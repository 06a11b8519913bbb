//! controlnet_aux 0.0.10's `Body.__call__` around the network: the input scaling and padding,
//! and the post-processing of the network's outputs into `candidate` and `subset`.

use image::RgbImage;

use super::fresize::{resize_f32, PlaneF32};
use crate::resize::{resize, Interpolation};
use crate::{PreprocessError, Result};

const BOXSIZE: f64 = 368.0;
const SCALE: f64 = 0.5;
/// The network's output stride.
pub const STRIDE: usize = 8;
const PAD_VALUE: u8 = 128;
const THRE1: f64 = 0.1;
const THRE2: f64 = 0.05;
const MID_NUM: usize = 10;
pub use ipcompose_models::openpose::{HEATMAP_CHANNELS, PAF_CHANNELS};

/// `limbSeq` of `Body.__call__` (1-based part numbers); drawing uses the first 17.
pub(super) const LIMB_SEQ: [[usize; 2]; 19] = [
    [2, 3],
    [2, 6],
    [3, 4],
    [4, 5],
    [6, 7],
    [7, 8],
    [2, 9],
    [9, 10],
    [10, 11],
    [2, 12],
    [12, 13],
    [13, 14],
    [2, 1],
    [1, 15],
    [15, 17],
    [1, 16],
    [16, 18],
    [3, 17],
    [6, 18],
];
/// `mapIdx`: the PAF channels (plus 19) of each limb.
const MAP_IDX: [[usize; 2]; 19] = [
    [31, 32],
    [39, 40],
    [33, 34],
    [35, 36],
    [41, 42],
    [43, 44],
    [19, 20],
    [21, 22],
    [23, 24],
    [25, 26],
    [27, 28],
    [29, 30],
    [47, 48],
    [49, 50],
    [53, 54],
    [51, 52],
    [55, 56],
    [37, 38],
    [45, 46],
];

/// The network input made from an image, with the geometry needed to undo it.
#[derive(Debug, Clone)]
pub struct NetInput {
    /// `1 × 3 × height × width`, channels in BGR order, `value / 256 - 0.5`.
    pub data: Vec<f32>,
    /// Padded size (multiples of [`STRIDE`]).
    pub width: usize,
    pub height: usize,
    /// Size of the scaled image before padding.
    pub scaled_width: usize,
    pub scaled_height: usize,
    /// Size of the image the keypoints refer to.
    pub image_width: usize,
    pub image_height: usize,
}

/// The network's two outputs at stride resolution, channel-major.
#[derive(Debug, Clone)]
pub struct NetOutput {
    /// `38 × height × width`.
    pub paf: Vec<f32>,
    /// `19 × height × width`.
    pub heatmap: Vec<f32>,
    pub width: usize,
    pub height: usize,
}

/// The raw result of `Body.__call__`.
#[derive(Debug, Clone, PartialEq)]
pub struct BodyEstimate {
    /// Rows of `x, y, score, id`.
    pub candidate: Vec<[f64; 4]>,
    /// Rows of 18 candidate indices (`-1` for missing), total score, part count.
    pub subset: Vec<[f64; 20]>,
}

/// `cv2.resize` choice of `smart_resize`: `INTER_AREA` when `k < 1`, else `INTER_LANCZOS4`.
fn smart_interpolation(from: (usize, usize), to: (usize, usize)) -> Interpolation {
    let k = (to.0 + to.1) as f64 / (from.0 + from.1) as f64;
    if k < 1.0 {
        Interpolation::Area
    } else {
        Interpolation::Lanczos4
    }
}

/// Scales the image to a height of 184 (`0.5 · 368`), pads right and down to multiples of 8
/// with 128, and makes the network's float input from its BGR channels.
pub fn prepare_input(image: &RgbImage) -> Result<NetInput> {
    let (w0, h0) = (image.width() as usize, image.height() as usize);
    if w0 == 0 || h0 == 0 {
        return Err(PreprocessError::Invalid("the image is empty".to_string()));
    }
    let scale = SCALE * BOXSIZE / h0 as f64;
    let ht = h0 as f64 * scale;
    let wt = w0 as f64 * scale;
    let (sw, sh) = (wt as usize, ht as usize);
    if sw == 0 || sh == 0 {
        return Err(PreprocessError::Invalid(format!(
            "a {w0}x{h0} image is too narrow for pose detection (it scales to {sw}x{sh})"
        )));
    }
    let k = (ht + wt) / (h0 + w0) as f64;
    let interpolation = if k < 1.0 {
        Interpolation::Area
    } else {
        Interpolation::Lanczos4
    };
    let scaled = resize(image, sw as u32, sh as u32, interpolation);
    let pad = |n: usize| {
        if n.is_multiple_of(STRIDE) {
            0
        } else {
            STRIDE - n % STRIDE
        }
    };
    let (pw, ph) = (sw + pad(sw), sh + pad(sh));
    let mut data = vec![0f32; 3 * pw * ph];
    for y in 0..ph {
        for x in 0..pw {
            let rgb = if x < sw && y < sh {
                scaled.get_pixel(x as u32, y as u32).0
            } else {
                [PAD_VALUE; 3]
            };
            for (c, &v) in [rgb[2], rgb[1], rgb[0]].iter().enumerate() {
                data[(c * ph + y) * pw + x] = v as f32 / 256.0 - 0.5;
            }
        }
    }
    Ok(NetInput {
        data,
        width: pw,
        height: ph,
        scaled_width: sw,
        scaled_height: sh,
        image_width: w0,
        image_height: h0,
    })
}

/// One output channel brought back to the image: up by the stride (`INTER_LANCZOS4`), the
/// padding cropped, then to the image size (`smart_resize`).
fn to_image_plane(plane: &[f32], out: &NetOutput, input: &NetInput) -> Vec<f32> {
    let (uw, uh) = (out.width * STRIDE, out.height * STRIDE);
    let up = resize_f32(
        &PlaneF32 {
            data: plane,
            width: out.width,
            height: out.height,
        },
        uw,
        uh,
        Interpolation::Lanczos4,
    );
    // heatmap[:padded_h - pad_down, :padded_w - pad_right]
    let (cw, ch) = (input.scaled_width.min(uw), input.scaled_height.min(uh));
    let mut cropped = Vec::with_capacity(cw * ch);
    for y in 0..ch {
        cropped.extend_from_slice(&up[y * uw..y * uw + cw]);
    }
    let to = (input.image_width, input.image_height);
    resize_f32(
        &PlaneF32 {
            data: &cropped,
            width: cw,
            height: ch,
        },
        to.0,
        to.1,
        smart_interpolation((cw, ch), to),
    )
}

/// `gaussian_filter(plane, sigma=3)` of scipy.ndimage in float64: radius 12, mode `reflect`,
/// rows (axis 0) first, then columns, each with the symmetric-kernel loop of `NI_Correlate1D`.
fn gaussian_filter(plane: &[f64], width: usize, height: usize) -> Vec<f64> {
    const RADIUS: usize = 12;
    let kernel = gaussian_kernel(3.0, RADIUS);
    let reflect = |i: i64, n: usize| -> usize {
        let n = n as i64;
        let period = 2 * n;
        let mut i = i.rem_euclid(period);
        if i >= n {
            i = period - 1 - i;
        }
        i as usize
    };
    let filter_line = |line: &[f64], out: &mut [f64]| {
        let n = line.len();
        let ext: Vec<f64> = (-(RADIUS as i64)..(n + RADIUS) as i64)
            .map(|i| line[reflect(i, n)])
            .collect();
        for (l, o) in out.iter_mut().enumerate() {
            let c = l + RADIUS;
            let mut v = ext[c] * kernel[RADIUS];
            for j in (1..=RADIUS).rev() {
                v += (ext[c - j] + ext[c + j]) * kernel[RADIUS - j];
            }
            *o = v;
        }
    };
    let mut tmp = vec![0f64; width * height];
    let mut column = vec![0f64; height];
    let mut filtered = vec![0f64; height];
    for x in 0..width {
        for y in 0..height {
            column[y] = plane[y * width + x];
        }
        filter_line(&column, &mut filtered);
        for y in 0..height {
            tmp[y * width + x] = filtered[y];
        }
    }
    let mut out = vec![0f64; width * height];
    for y in 0..height {
        filter_line(
            &tmp[y * width..(y + 1) * width],
            &mut out[y * width..(y + 1) * width],
        );
    }
    out
}

/// scipy's `_gaussian_kernel1d(sigma, 0, radius)`: `exp((-0.5/σ²·x)·x)` normalised by numpy's
/// pairwise sum.
fn gaussian_kernel(sigma: f64, radius: usize) -> Vec<f64> {
    let c2 = -0.5 / (sigma * sigma);
    let phi: Vec<f64> = (-(radius as i64)..=radius as i64)
        .map(|x| {
            let x = x as f64;
            ((c2 * x) * x).exp()
        })
        .collect();
    let sum = numpy_sum(&phi);
    phi.iter().map(|v| v / sum).collect()
}

/// numpy's pairwise summation for fewer than 128 values: eight accumulators, combined
/// pairwise, then the remainder added in order.
fn numpy_sum(values: &[f64]) -> f64 {
    let n = values.len();
    if n < 8 {
        return values.iter().fold(0.0, |a, v| a + v);
    }
    let mut r = [0f64; 8];
    r.copy_from_slice(&values[..8]);
    let mut i = 8;
    while i < n - n % 8 {
        for j in 0..8 {
            r[j] += values[i + j];
        }
        i += 8;
    }
    let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    while i < n {
        res += values[i];
        i += 1;
    }
    res
}

#[derive(Clone, Copy)]
struct Peak {
    x: i64,
    y: i64,
    score: f64,
    id: usize,
}

/// `Body.__call__` after the network: see the module documentation.
pub fn estimate(input: &NetInput, output: &NetOutput) -> Result<BodyEstimate> {
    let plane = output.width * output.height;
    if output.heatmap.len() != HEATMAP_CHANNELS * plane || output.paf.len() != PAF_CHANNELS * plane
    {
        return Err(PreprocessError::Invalid(format!(
            "pose network outputs must be {HEATMAP_CHANNELS} heatmaps and {PAF_CHANNELS} PAF channels of {}x{}, got {} and {} values",
            output.width,
            output.height,
            output.heatmap.len(),
            output.paf.len()
        )));
    }
    if output.width * STRIDE < input.scaled_width || output.height * STRIDE < input.scaled_height {
        return Err(PreprocessError::Invalid(format!(
            "pose network output {}x{} is smaller than the input {}x{} over stride {STRIDE}",
            output.width, output.height, input.scaled_width, input.scaled_height
        )));
    }
    let (w, h) = (input.image_width, input.image_height);
    let heatmaps: Vec<Vec<f32>> = (0..18)
        .map(|c| to_image_plane(&output.heatmap[c * plane..(c + 1) * plane], output, input))
        .collect();
    let pafs: Vec<Vec<f32>> = (0..PAF_CHANNELS)
        .map(|c| to_image_plane(&output.paf[c * plane..(c + 1) * plane], output, input))
        .collect();

    // Peaks.
    let mut all_peaks: Vec<Vec<Peak>> = Vec::with_capacity(18);
    let mut counter = 0usize;
    for map_ori in &heatmaps {
        let map64: Vec<f64> = map_ori.iter().map(|&v| v as f64).collect();
        let one = gaussian_filter(&map64, w, h);
        let at = |x: i64, y: i64| -> f64 {
            if x < 0 || y < 0 || x >= w as i64 || y >= h as i64 {
                0.0
            } else {
                one[y as usize * w + x as usize]
            }
        };
        let mut peaks = Vec::new();
        for y in 0..h as i64 {
            for x in 0..w as i64 {
                let v = at(x, y);
                if v >= at(x, y - 1)
                    && v >= at(x, y + 1)
                    && v >= at(x - 1, y)
                    && v >= at(x + 1, y)
                    && v > THRE1
                {
                    peaks.push(Peak {
                        x,
                        y,
                        score: map64[y as usize * w + x as usize],
                        id: counter,
                    });
                    counter += 1;
                }
            }
        }
        all_peaks.push(peaks);
    }

    // Connections.
    let mut connection_all: Vec<Vec<[f64; 5]>> = Vec::with_capacity(MAP_IDX.len());
    let mut special_k = Vec::new();
    for (k, (limb, idx)) in LIMB_SEQ.iter().zip(MAP_IDX.iter()).enumerate() {
        let paf_x = &pafs[idx[0] - 19];
        let paf_y = &pafs[idx[1] - 19];
        let cand_a = &all_peaks[limb[0] - 1];
        let cand_b = &all_peaks[limb[1] - 1];
        let (na, nb) = (cand_a.len(), cand_b.len());
        if na == 0 || nb == 0 {
            special_k.push(k);
            connection_all.push(Vec::new());
            continue;
        }
        let mut candidates: Vec<(usize, usize, f64)> = Vec::new();
        for (i, a) in cand_a.iter().enumerate() {
            for (j, b) in cand_b.iter().enumerate() {
                let (vx, vy) = (b.x - a.x, b.y - a.y);
                let norm = ((vx * vx + vy * vy) as f64).sqrt().max(0.001);
                let (ux, uy) = (vx as f64 / norm, vy as f64 / norm);
                let xs = linspace(a.x as f64, b.x as f64);
                let ys = linspace(a.y as f64, b.y as f64);
                let mut sum = 0f64;
                let mut above = 0usize;
                for (&sx, &sy) in xs.iter().zip(&ys) {
                    let px = python_round(sx);
                    let py = python_round(sy);
                    let (px, py) = (index(px, w)?, index(py, h)?);
                    let v = paf_x[py * w + px] as f64 * ux + paf_y[py * w + px] as f64 * uy;
                    sum += v;
                    if v > THRE2 {
                        above += 1;
                    }
                }
                let prior = (0.5 * h as f64 / norm - 1.0).min(0.0);
                let score = sum / MID_NUM as f64 + prior;
                let criterion1 = above as f64 > 0.8 * MID_NUM as f64;
                if criterion1 && score > 0.0 {
                    candidates.push((i, j, score));
                }
            }
        }
        // sorted(..., key=score, reverse=True) is stable.
        candidates.sort_by(|p, q| q.2.partial_cmp(&p.2).unwrap_or(std::cmp::Ordering::Equal));
        let mut connection: Vec<[f64; 5]> = Vec::new();
        for &(i, j, s) in &candidates {
            let used_i = connection.iter().any(|c| c[3] == i as f64);
            let used_j = connection.iter().any(|c| c[4] == j as f64);
            if !used_i && !used_j {
                connection.push([
                    cand_a[i].id as f64,
                    cand_b[j].id as f64,
                    s,
                    i as f64,
                    j as f64,
                ]);
                if connection.len() >= na.min(nb) {
                    break;
                }
            }
        }
        connection_all.push(connection);
    }

    // Subsets.
    let candidate: Vec<[f64; 4]> = all_peaks
        .iter()
        .flatten()
        .map(|p| [p.x as f64, p.y as f64, p.score, p.id as f64])
        .collect();
    let mut subset: Vec<[f64; 20]> = Vec::new();
    for (k, limb) in LIMB_SEQ.iter().enumerate() {
        if special_k.contains(&k) {
            continue;
        }
        let (ia, ib) = (limb[0] - 1, limb[1] - 1);
        for conn in &connection_all[k] {
            let (part_a, part_b, score) = (conn[0], conn[1], conn[2]);
            let mut found = 0;
            let mut subset_idx = [0usize; 2];
            for (j, row) in subset.iter().enumerate() {
                if row[ia] == part_a || row[ib] == part_b {
                    // Python would raise an IndexError on a third match; keep the first two.
                    if found < 2 {
                        subset_idx[found] = j;
                    }
                    found += 1;
                }
            }
            let b_score = candidate[part_b as usize][2];
            if found == 1 {
                let row = &mut subset[subset_idx[0]];
                if row[ib] != part_b {
                    row[ib] = part_b;
                    row[19] += 1.0;
                    row[18] += b_score + score;
                }
            } else if found >= 2 {
                let (j1, j2) = (subset_idx[0], subset_idx[1]);
                let r1 = subset[j1];
                let r2 = subset[j2];
                let overlap = (0..18).any(|c| r1[c] >= 0.0 && r2[c] >= 0.0);
                if !overlap {
                    let row = &mut subset[j1];
                    for c in 0..18 {
                        row[c] += r2[c] + 1.0;
                    }
                    row[18] += r2[18];
                    row[19] += r2[19];
                    row[18] += score;
                    subset.remove(j2);
                } else {
                    let row = &mut subset[j1];
                    row[ib] = part_b;
                    row[19] += 1.0;
                    row[18] += b_score + score;
                }
            } else if k < 17 {
                let mut row = [-1f64; 20];
                row[ia] = part_a;
                row[ib] = part_b;
                row[19] = 2.0;
                row[18] = (0.0 + candidate[part_a as usize][2] + b_score) + score;
                subset.push(row);
            }
        }
    }
    subset.retain(|row| !(row[19] < 4.0 || row[18] / row[19] < 0.4));
    Ok(BodyEstimate { candidate, subset })
}

fn index(v: i64, n: usize) -> Result<usize> {
    if v < 0 || v >= n as i64 {
        return Err(PreprocessError::Invalid(format!(
            "pose limb sample {v} outside 0..{n}"
        )));
    }
    Ok(v as usize)
}

/// `np.linspace(start, stop, num=10)` for integer endpoints.
fn linspace(start: f64, stop: f64) -> [f64; MID_NUM] {
    let div = (MID_NUM - 1) as f64;
    let delta = stop - start;
    let step = delta / div;
    let mut out = [0f64; MID_NUM];
    for (i, o) in out.iter_mut().enumerate() {
        *o = if step == 0.0 {
            (i as f64 / div) * delta + start
        } else {
            i as f64 * step + start
        };
    }
    out[MID_NUM - 1] = stop;
    out
}

/// `int(round(v))` on a numpy float64: half to even.
fn python_round(v: f64) -> i64 {
    v.round_ties_even() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_ends_exactly() {
        let l = linspace(3.0, 10.0);
        assert_eq!(l[0], 3.0);
        assert_eq!(l[9], 10.0);
        assert_eq!(python_round(2.5), 2);
        assert_eq!(python_round(3.5), 4);
    }

    #[test]
    fn gaussian_kernel_sums_to_one() {
        let k = gaussian_kernel(3.0, 12);
        assert_eq!(k.len(), 25);
        assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
}
