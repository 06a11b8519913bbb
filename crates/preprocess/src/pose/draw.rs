//! controlnet_aux 0.0.10's `util.draw_bodypose`, with OpenCV's `ellipse2Poly`,
//! `fillConvexPoly` (8-connected outline, 16-bit fixed-point edges) and filled `circle`
//! reproduced from `modules/imgproc/src/drawing.cpp`.

use image::RgbImage;

use super::Person;

const STICKWIDTH: i32 = 4;

/// `limbSeq` of `draw_bodypose`: the first 17 of the estimator's limbs (1-based).
const LIMB_SEQ: &[[usize; 2]] = super::body::LIMB_SEQ.split_at(17).0;

const COLORS: [[u8; 3]; 18] = [
    [255, 0, 0],
    [255, 85, 0],
    [255, 170, 0],
    [255, 255, 0],
    [170, 255, 0],
    [85, 255, 0],
    [0, 255, 0],
    [0, 255, 85],
    [0, 255, 170],
    [0, 255, 255],
    [0, 170, 255],
    [0, 85, 255],
    [0, 0, 255],
    [85, 0, 255],
    [170, 0, 255],
    [255, 0, 255],
    [255, 0, 170],
    [255, 0, 85],
];

/// `draw_poses(poses, H, W, draw_body=True, draw_hand=False, draw_face=False)`: a black
/// `width × height` canvas with every person's limbs, then joints.
pub fn draw_poses(people: &[Person], width: u32, height: u32) -> RgbImage {
    let mut canvas = RgbImage::new(width, height);
    for person in people {
        draw_bodypose(&mut canvas, person);
    }
    canvas
}

/// `util.draw_bodypose(canvas, keypoints)` with normalised keypoints.
pub fn draw_bodypose(canvas: &mut RgbImage, person: &Person) {
    let w = canvas.width() as f64;
    let h = canvas.height() as f64;
    for (limb, color) in LIMB_SEQ.iter().zip(COLORS.iter()) {
        let (Some(k1), Some(k2)) = (
            &person.keypoints[limb[0] - 1],
            &person.keypoints[limb[1] - 1],
        ) else {
            continue;
        };
        let ys = [k1.x * w, k2.x * w];
        let xs = [k1.y * h, k2.y * h];
        let m_x = (xs[0] + xs[1]) / 2.0;
        let m_y = (ys[0] + ys[1]) / 2.0;
        let dx = xs[0] - xs[1];
        let dy = ys[0] - ys[1];
        let length = (dx * dx + dy * dy).powf(0.5);
        let angle = dx.atan2(dy).to_degrees();
        let polygon = ellipse2poly(
            (m_y as i32, m_x as i32),
            ((length / 2.0) as i32, STICKWIDTH),
            angle as i32,
            0,
            360,
            1,
        );
        let fill = color.map(|c| (c as f64 * 0.6) as u8);
        fill_convex_poly(canvas, &polygon, fill);
    }
    for (keypoint, color) in person.keypoints.iter().zip(COLORS.iter()) {
        let Some(k) = keypoint else { continue };
        let x = (k.x * w) as i32;
        let y = (k.y * h) as i32;
        fill_circle(canvas, (x, y), 4, *color);
    }
}

/// OpenCV's `SinTable` (sin of whole degrees, 0..=450, as 7-decimal float literals).
#[rustfmt::skip]
#[allow(clippy::excessive_precision, clippy::approx_constant)]
static SIN_TABLE: [f32; 451] = [
    0.0000000, 0.0174524, 0.0348995, 0.0523360, 0.0697565, 0.0871557,
    0.1045285, 0.1218693, 0.1391731, 0.1564345, 0.1736482, 0.1908090,
    0.2079117, 0.2249511, 0.2419219, 0.2588190, 0.2756374, 0.2923717,
    0.3090170, 0.3255682, 0.3420201, 0.3583679, 0.3746066, 0.3907311,
    0.4067366, 0.4226183, 0.4383711, 0.4539905, 0.4694716, 0.4848096,
    0.5000000, 0.5150381, 0.5299193, 0.5446390, 0.5591929, 0.5735764,
    0.5877853, 0.6018150, 0.6156615, 0.6293204, 0.6427876, 0.6560590,
    0.6691306, 0.6819984, 0.6946584, 0.7071068, 0.7193398, 0.7313537,
    0.7431448, 0.7547096, 0.7660444, 0.7771460, 0.7880108, 0.7986355,
    0.8090170, 0.8191520, 0.8290376, 0.8386706, 0.8480481, 0.8571673,
    0.8660254, 0.8746197, 0.8829476, 0.8910065, 0.8987940, 0.9063078,
    0.9135455, 0.9205049, 0.9271839, 0.9335804, 0.9396926, 0.9455186,
    0.9510565, 0.9563048, 0.9612617, 0.9659258, 0.9702957, 0.9743701,
    0.9781476, 0.9816272, 0.9848078, 0.9876883, 0.9902681, 0.9925462,
    0.9945219, 0.9961947, 0.9975641, 0.9986295, 0.9993908, 0.9998477,
    1.0000000, 0.9998477, 0.9993908, 0.9986295, 0.9975641, 0.9961947,
    0.9945219, 0.9925462, 0.9902681, 0.9876883, 0.9848078, 0.9816272,
    0.9781476, 0.9743701, 0.9702957, 0.9659258, 0.9612617, 0.9563048,
    0.9510565, 0.9455186, 0.9396926, 0.9335804, 0.9271839, 0.9205049,
    0.9135455, 0.9063078, 0.8987940, 0.8910065, 0.8829476, 0.8746197,
    0.8660254, 0.8571673, 0.8480481, 0.8386706, 0.8290376, 0.8191520,
    0.8090170, 0.7986355, 0.7880108, 0.7771460, 0.7660444, 0.7547096,
    0.7431448, 0.7313537, 0.7193398, 0.7071068, 0.6946584, 0.6819984,
    0.6691306, 0.6560590, 0.6427876, 0.6293204, 0.6156615, 0.6018150,
    0.5877853, 0.5735764, 0.5591929, 0.5446390, 0.5299193, 0.5150381,
    0.5000000, 0.4848096, 0.4694716, 0.4539905, 0.4383711, 0.4226183,
    0.4067366, 0.3907311, 0.3746066, 0.3583679, 0.3420201, 0.3255682,
    0.3090170, 0.2923717, 0.2756374, 0.2588190, 0.2419219, 0.2249511,
    0.2079117, 0.1908090, 0.1736482, 0.1564345, 0.1391731, 0.1218693,
    0.1045285, 0.0871557, 0.0697565, 0.0523360, 0.0348995, 0.0174524,
    0.0000000, -0.0174524, -0.0348995, -0.0523360, -0.0697565, -0.0871557,
    -0.1045285, -0.1218693, -0.1391731, -0.1564345, -0.1736482, -0.1908090,
    -0.2079117, -0.2249511, -0.2419219, -0.2588190, -0.2756374, -0.2923717,
    -0.3090170, -0.3255682, -0.3420201, -0.3583679, -0.3746066, -0.3907311,
    -0.4067366, -0.4226183, -0.4383711, -0.4539905, -0.4694716, -0.4848096,
    -0.5000000, -0.5150381, -0.5299193, -0.5446390, -0.5591929, -0.5735764,
    -0.5877853, -0.6018150, -0.6156615, -0.6293204, -0.6427876, -0.6560590,
    -0.6691306, -0.6819984, -0.6946584, -0.7071068, -0.7193398, -0.7313537,
    -0.7431448, -0.7547096, -0.7660444, -0.7771460, -0.7880108, -0.7986355,
    -0.8090170, -0.8191520, -0.8290376, -0.8386706, -0.8480481, -0.8571673,
    -0.8660254, -0.8746197, -0.8829476, -0.8910065, -0.8987940, -0.9063078,
    -0.9135455, -0.9205049, -0.9271839, -0.9335804, -0.9396926, -0.9455186,
    -0.9510565, -0.9563048, -0.9612617, -0.9659258, -0.9702957, -0.9743701,
    -0.9781476, -0.9816272, -0.9848078, -0.9876883, -0.9902681, -0.9925462,
    -0.9945219, -0.9961947, -0.9975641, -0.9986295, -0.9993908, -0.9998477,
    -1.0000000, -0.9998477, -0.9993908, -0.9986295, -0.9975641, -0.9961947,
    -0.9945219, -0.9925462, -0.9902681, -0.9876883, -0.9848078, -0.9816272,
    -0.9781476, -0.9743701, -0.9702957, -0.9659258, -0.9612617, -0.9563048,
    -0.9510565, -0.9455186, -0.9396926, -0.9335804, -0.9271839, -0.9205049,
    -0.9135455, -0.9063078, -0.8987940, -0.8910065, -0.8829476, -0.8746197,
    -0.8660254, -0.8571673, -0.8480481, -0.8386706, -0.8290376, -0.8191520,
    -0.8090170, -0.7986355, -0.7880108, -0.7771460, -0.7660444, -0.7547096,
    -0.7431448, -0.7313537, -0.7193398, -0.7071068, -0.6946584, -0.6819984,
    -0.6691306, -0.6560590, -0.6427876, -0.6293204, -0.6156615, -0.6018150,
    -0.5877853, -0.5735764, -0.5591929, -0.5446390, -0.5299193, -0.5150381,
    -0.5000000, -0.4848096, -0.4694716, -0.4539905, -0.4383711, -0.4226183,
    -0.4067366, -0.3907311, -0.3746066, -0.3583679, -0.3420201, -0.3255682,
    -0.3090170, -0.2923717, -0.2756374, -0.2588190, -0.2419219, -0.2249511,
    -0.2079117, -0.1908090, -0.1736482, -0.1564345, -0.1391731, -0.1218693,
    -0.1045285, -0.0871557, -0.0697565, -0.0523360, -0.0348995, -0.0174524,
    -0.0000000, 0.0174524, 0.0348995, 0.0523360, 0.0697565, 0.0871557,
    0.1045285, 0.1218693, 0.1391731, 0.1564345, 0.1736482, 0.1908090,
    0.2079117, 0.2249511, 0.2419219, 0.2588190, 0.2756374, 0.2923717,
    0.3090170, 0.3255682, 0.3420201, 0.3583679, 0.3746066, 0.3907311,
    0.4067366, 0.4226183, 0.4383711, 0.4539905, 0.4694716, 0.4848096,
    0.5000000, 0.5150381, 0.5299193, 0.5446390, 0.5591929, 0.5735764,
    0.5877853, 0.6018150, 0.6156615, 0.6293204, 0.6427876, 0.6560590,
    0.6691306, 0.6819984, 0.6946584, 0.7071068, 0.7193398, 0.7313537,
    0.7431448, 0.7547096, 0.7660444, 0.7771460, 0.7880108, 0.7986355,
    0.8090170, 0.8191520, 0.8290376, 0.8386706, 0.8480481, 0.8571673,
    0.8660254, 0.8746197, 0.8829476, 0.8910065, 0.8987940, 0.9063078,
    0.9135455, 0.9205049, 0.9271839, 0.9335804, 0.9396926, 0.9455186,
    0.9510565, 0.9563048, 0.9612617, 0.9659258, 0.9702957, 0.9743701,
    0.9781476, 0.9816272, 0.9848078, 0.9876883, 0.9902681, 0.9925462,
    0.9945219, 0.9961947, 0.9975641, 0.9986295, 0.9993908, 0.9998477,
    1.0000000,
];

/// `cv::ellipse2Poly(Point center, Size axes, angle, arc_start, arc_end, delta)`.
pub(crate) fn ellipse2poly(
    center: (i32, i32),
    axes: (i32, i32),
    angle: i32,
    arc_start: i32,
    arc_end: i32,
    delta: i32,
) -> Vec<(i32, i32)> {
    let mut angle = angle;
    while angle < 0 {
        angle += 360;
    }
    while angle > 360 {
        angle -= 360;
    }
    let (mut arc_start, mut arc_end) = if arc_start > arc_end {
        (arc_end, arc_start)
    } else {
        (arc_start, arc_end)
    };
    while arc_start < 0 {
        arc_start += 360;
        arc_end += 360;
    }
    while arc_end > 360 {
        arc_end -= 360;
        arc_start -= 360;
    }
    if arc_end - arc_start > 360 {
        arc_start = 0;
        arc_end = 360;
    }
    // sincos(angle, alpha, beta): alpha = cos, beta = sin, as floats.
    let a = if angle < 0 { angle + 360 } else { angle } as usize;
    let beta = SIN_TABLE[a] as f64;
    let alpha = SIN_TABLE[450 - a] as f64;
    let (cx, cy) = (center.0 as f64, center.1 as f64);
    let (aw, ah) = (axes.0 as f64, axes.1 as f64);
    let mut points: Vec<(i32, i32)> = Vec::new();
    let mut count = 0;
    let mut i = arc_start;
    while i < arc_end + delta {
        let mut t = i;
        if t > arc_end {
            t = arc_end;
        }
        if t < 0 {
            t += 360;
        }
        let x = aw * SIN_TABLE[(450 - t) as usize] as f64;
        let y = ah * SIN_TABLE[t as usize] as f64;
        let px = cx + x * alpha - y * beta;
        let py = cy + x * beta + y * alpha;
        let pt = (cv_round(px), cv_round(py));
        count += 1;
        if points.last() != Some(&pt) {
            points.push(pt);
        }
        i += delta;
    }
    if count == 1 || points.len() == 1 {
        points = vec![center, center];
    }
    points
}

/// `cvRound` of a double: nearest, ties to even.
fn cv_round(v: f64) -> i32 {
    v.round_ties_even() as i32
}

const XY_SHIFT: i64 = 16;
const XY_ONE: i64 = 1 << XY_SHIFT;

fn hline(canvas: &mut RgbImage, y: i64, x1: i64, x2: i64, color: [u8; 3]) {
    let width = canvas.width() as usize;
    let row = &mut canvas.as_mut()[y as usize * width * 3..(y as usize + 1) * width * 3];
    for x in x1..=x2 {
        row[x as usize * 3..x as usize * 3 + 3].copy_from_slice(&color);
    }
}

fn put(canvas: &mut RgbImage, x: i64, y: i64, color: [u8; 3]) {
    canvas.put_pixel(x as u32, y as u32, image::Rgb(color));
}

/// `cv::clipLine(Size2l, Point2l&, Point2l&)`.
fn clip_line(width: i64, height: i64, p1: &mut (i64, i64), p2: &mut (i64, i64)) -> bool {
    let (right, bottom) = (width - 1, height - 1);
    if width <= 0 || height <= 0 {
        return false;
    }
    let (x1, y1) = (&mut p1.0, &mut p1.1);
    let (x2, y2) = (&mut p2.0, &mut p2.1);
    let code = |x: i64, y: i64| {
        (x < 0) as i32 + (x > right) as i32 * 2 + (y < 0) as i32 * 4 + (y > bottom) as i32 * 8
    };
    let mut c1 = code(*x1, *y1);
    let mut c2 = code(*x2, *y2);
    if (c1 & c2) == 0 && (c1 | c2) != 0 {
        if c1 & 12 != 0 {
            let a = if c1 < 8 { 0 } else { bottom };
            *x1 += ((a - *y1) as f64 * (*x2 - *x1) as f64 / (*y2 - *y1) as f64) as i64;
            *y1 = a;
            c1 = (*x1 < 0) as i32 + (*x1 > right) as i32 * 2;
        }
        if c2 & 12 != 0 {
            let a = if c2 < 8 { 0 } else { bottom };
            *x2 += ((a - *y2) as f64 * (*x2 - *x1) as f64 / (*y2 - *y1) as f64) as i64;
            *y2 = a;
            c2 = (*x2 < 0) as i32 + (*x2 > right) as i32 * 2;
        }
        if (c1 & c2) == 0 && (c1 | c2) != 0 {
            if c1 != 0 {
                let a = if c1 == 1 { 0 } else { right };
                *y1 += ((a - *x1) as f64 * (*y2 - *y1) as f64 / (*x2 - *x1) as f64) as i64;
                *x1 = a;
                c1 = 0;
            }
            if c2 != 0 {
                let a = if c2 == 1 { 0 } else { right };
                *y2 += ((a - *x2) as f64 * (*y2 - *y1) as f64 / (*x2 - *x1) as f64) as i64;
                *x2 = a;
                c2 = 0;
            }
        }
    }
    (c1 | c2) == 0
}

/// `Line(img, pt1, pt2, color, 8)`: `LineIterator` with 8-connectivity, left to right.
fn line8(canvas: &mut RgbImage, p1: (i64, i64), p2: (i64, i64), color: [u8; 3]) {
    let (w, h) = (canvas.width() as i64, canvas.height() as i64);
    let (mut p1, mut p2) = (p1, p2);
    let outside = |p: (i64, i64)| p.0 < 0 || p.0 >= w || p.1 < 0 || p.1 >= h;
    if (outside(p1) || outside(p2)) && !clip_line(w, h, &mut p1, &mut p2) {
        return;
    }
    let (mut dx, mut dy) = (p2.0 - p1.0, p2.1 - p1.1);
    let (mut step_x, mut step_y) = (1i64, 1i64);
    if dx < 0 {
        dx = -dx;
        dy = -dy;
        p1 = p2;
    }
    if dy < 0 {
        dy = -dy;
        step_y = -1;
    }
    let vert = dy > dx;
    if vert {
        std::mem::swap(&mut dx, &mut dy);
        std::mem::swap(&mut step_x, &mut step_y);
    }
    let mut err = dx - (dy + dy);
    let plus_delta = dx + dx;
    let minus_delta = -(dy + dy);
    let count = dx + 1;
    let (mut x, mut y) = p1;
    for _ in 0..count {
        put(canvas, x, y, color);
        let minor = err < 0;
        err += minus_delta + if minor { plus_delta } else { 0 };
        if vert {
            // Main axis is y (sign step_x after the swap), minor axis x (sign step_y).
            y += step_x;
            if minor {
                x += step_y;
            }
        } else {
            x += step_x;
            if minor {
                y += step_y;
            }
        }
    }
}

/// `cv::fillConvexPoly(img, pts, color, LINE_8, 0)`.
pub(crate) fn fill_convex_poly(canvas: &mut RgbImage, v: &[(i32, i32)], color: [u8; 3]) {
    let npts = v.len();
    if npts == 0 {
        return;
    }
    let v: Vec<(i64, i64)> = v.iter().map(|&(x, y)| (x as i64, y as i64)).collect();
    let size_w = canvas.width() as i64;
    let size_h = canvas.height() as i64;
    let delta1 = XY_ONE >> 1;
    let delta2 = XY_ONE >> 1;
    let mut p0 = v[npts - 1];
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (v[0].0, v[0].0, v[0].1, v[0].1);
    let mut imin = 0usize;
    for (i, &p) in v.iter().enumerate() {
        if p.1 < ymin {
            ymin = p.1;
            imin = i;
        }
        ymax = ymax.max(p.1);
        xmax = xmax.max(p.0);
        xmin = xmin.min(p.0);
        line8(canvas, p0, p, color);
        p0 = p;
    }
    if npts < 3 || xmax < 0 || ymax < 0 || xmin >= size_w || ymin >= size_h {
        return;
    }
    let ymax = ymax.min(size_h - 1);

    #[derive(Clone, Copy)]
    struct Edge {
        idx: usize,
        di: usize,
        x: i64,
        dx: i64,
        ye: i64,
    }
    let mut edge = [Edge {
        idx: imin,
        di: 1,
        x: -XY_ONE,
        dx: 0,
        ye: ymin,
    }; 2];
    edge[1].di = npts - 1;
    let mut edges = npts as i64;
    let mut y = ymin;
    loop {
        for e in edge.iter_mut() {
            if y >= e.ye {
                let mut idx0 = e.idx;
                let mut idx = idx0 + e.di;
                if idx >= npts {
                    idx -= npts;
                }
                loop {
                    let more = edges > 0;
                    edges -= 1;
                    if !more {
                        break;
                    }
                    let ty = v[idx].1;
                    if ty > y {
                        let xs = v[idx0].0 << XY_SHIFT;
                        let xe = v[idx].0 << XY_SHIFT;
                        e.ye = ty;
                        e.dx = ((xe - xs) * 2 + (ty - y)) / (2 * (ty - y));
                        e.x = xs;
                        e.idx = idx;
                        break;
                    }
                    idx0 = idx;
                    idx += e.di;
                    if idx >= npts {
                        idx -= npts;
                    }
                }
            }
        }
        if edges < 0 {
            break;
        }
        if y >= 0 {
            let (left, right) = if edge[0].x > edge[1].x {
                (1, 0)
            } else {
                (0, 1)
            };
            let mut xx1 = (edge[left].x + delta1) >> XY_SHIFT;
            let mut xx2 = (edge[right].x + delta2) >> XY_SHIFT;
            if xx2 >= 0 && xx1 < size_w {
                if xx1 < 0 {
                    xx1 = 0;
                }
                if xx2 >= size_w {
                    xx2 = size_w - 1;
                }
                hline(canvas, y, xx1, xx2, color);
            }
        }
        edge[0].x += edge[0].dx;
        edge[1].x += edge[1].dx;
        y += 1;
        if y > ymax {
            break;
        }
    }
}

/// `cv::circle(img, center, radius, color, thickness=-1)` (`Circle` with `fill`).
pub(crate) fn fill_circle(canvas: &mut RgbImage, center: (i32, i32), radius: i32, color: [u8; 3]) {
    let (w, h) = (canvas.width() as i64, canvas.height() as i64);
    let (cx, cy) = (center.0 as i64, center.1 as i64);
    let mut err: i64 = 0;
    let mut dx = radius as i64;
    let mut dy: i64 = 0;
    let mut plus: i64 = 1;
    let mut minus: i64 = ((radius as i64) << 1) - 1;
    let span = |canvas: &mut RgbImage, y: i64, x1: i64, x2: i64| {
        if y < 0 || y >= h {
            return;
        }
        let (x1, x2) = (x1.max(0), x2.min(w - 1));
        if x1 <= x2 {
            hline(canvas, y, x1, x2, color);
        }
    };
    while dx >= dy {
        let (y11, y12, y21, y22) = (cy - dy, cy + dy, cy - dx, cy + dx);
        let (x11, x12, x21, x22) = (cx - dx, cx + dx, cx - dy, cx + dy);
        if x11 < w && x12 >= 0 && y21 < h && y22 >= 0 {
            span(canvas, y11, x11, x12);
            span(canvas, y12, x11, x12);
            if x21 < w && x22 >= 0 {
                span(canvas, y21, x21, x22);
                span(canvas, y22, x21, x22);
            }
        }
        dy += 1;
        err += plus;
        plus += 2;
        let mask: i64 = if err <= 0 { 0 } else { -1 };
        err -= minus & mask;
        dx += mask;
        minus -= mask & 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ellipse_of_zero_length_is_a_small_polygon() {
        let p = ellipse2poly((10, 10), (0, 4), 90, 0, 360, 1);
        assert!(p.len() >= 2);
        assert!(p
            .iter()
            .all(|&(x, y)| (x - 10).abs() <= 4 && (y - 10).abs() <= 4));
    }

    #[test]
    fn circle_is_clipped_at_the_border() {
        let mut c = RgbImage::new(5, 5);
        fill_circle(&mut c, (0, 0), 4, [1, 2, 3]);
        assert_eq!(c.get_pixel(0, 0).0, [1, 2, 3]);
        assert_eq!(c.get_pixel(4, 4).0, [0, 0, 0]);
    }
}
