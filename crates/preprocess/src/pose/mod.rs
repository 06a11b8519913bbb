//! The OpenPose body hint (controlnet_aux 0.0.10's `OpenposeDetector` with
//! `include_body=True, include_hand=False, include_face=False`), without the network:
//!
//! - [`prepare_input`]: `Body.__call__`'s scaling (height 184), padding and BGR float input.
//! - [`estimate`]: the post-processing of the network's heatmaps and part-affinity fields into
//!   `candidate` / `subset` (peaks of the σ=3 Gaussian-smoothed heatmaps, PAF line scores,
//!   greedy limb matching, person assembly), float for float as numpy, scipy and OpenCV do it.
//! - [`people`]: `format_body_result` with keypoints normalised by the image size.
//! - [`draw_poses`]: `draw_poses` / `util.draw_bodypose` with OpenCV's polygon and circle fill.
//! - [`parse_keypoints_json`] / [`keypoints_to_json`]: OpenPose JSON (`pose_keypoints_2d`) in
//!   and out, so edited or saved poses draw the same way.
//!
//! The network itself lives in `ipcompose_models::openpose`; [`pose_map`] joins the pieces.

mod body;
mod draw;
mod fresize;
mod network;

use std::path::Path;

pub use body::{
    estimate, prepare_input, BodyEstimate, NetInput, NetOutput, HEATMAP_CHANNELS, PAF_CHANNELS,
    STRIDE,
};
pub use draw::{draw_bodypose, draw_poses};
pub use network::{detect_people, pose_map, run_network};

use crate::{PreprocessError, Result};

/// The 18 body parts, in the COCO order OpenPose's body model (and the ControlNet) uses.
pub const PART_NAMES: [&str; 18] = [
    "nose",
    "neck",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "right_hip",
    "right_knee",
    "right_ankle",
    "left_hip",
    "left_knee",
    "left_ankle",
    "right_eye",
    "left_eye",
    "right_ear",
    "left_ear",
];

/// BODY_25 index of each COCO-18 part (BODY_25 adds the mid hip at 8 and six foot points).
const BODY25_TO_COCO18: [usize; 18] = [
    0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18,
];

/// One body keypoint, `x` and `y` normalised by the canvas size (`x / W`, `y / H`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Keypoint {
    pub x: f64,
    pub y: f64,
    pub score: f64,
    /// The candidate id the detector gave it, or -1.
    pub id: i64,
}

/// One person: 18 optional keypoints in [`PART_NAMES`] order.
#[derive(Debug, Clone, PartialEq)]
pub struct Person {
    pub keypoints: [Option<Keypoint>; 18],
    pub total_score: f64,
    pub total_parts: f64,
}

/// `format_body_result` followed by `detect_poses`' normalisation by the image size.
pub fn people(estimate: &BodyEstimate, image_width: usize, image_height: usize) -> Vec<Person> {
    let (w, h) = (image_width as f64, image_height as f64);
    estimate
        .subset
        .iter()
        .map(|row| {
            let mut keypoints = [None; 18];
            for (part, slot) in keypoints.iter_mut().enumerate() {
                let index = row[part] as i64;
                if index != -1 {
                    let c = estimate.candidate[index as usize];
                    *slot = Some(Keypoint {
                        x: c[0] / w,
                        y: c[1] / h,
                        score: c[2],
                        id: c[3] as i64,
                    });
                }
            }
            Person {
                keypoints,
                total_score: row[18],
                total_parts: row[19],
            }
        })
        .collect()
}

fn json_error(source: &str, message: String) -> PreprocessError {
    PreprocessError::Keypoints {
        file: source.to_string(),
        message,
    }
}

/// Reads OpenPose JSON: `{"people": [{"pose_keypoints_2d": [x, y, c, …]}], "canvas_width": W,
/// "canvas_height": H}` with pixel coordinates, as pose editors and OpenPose export it.
/// Each person has 18 (COCO) or 25 (BODY_25, mapped to COCO-18) keypoints; a confidence of 0
/// or less marks a missing keypoint. `canvas` gives the size the coordinates refer to when the
/// file has no `canvas_width`/`canvas_height`. `source` names the file in errors.
///
/// Returns the people (keypoints normalised by the canvas) and the canvas size.
pub fn parse_keypoints_json(
    text: &str,
    source: &str,
    canvas: Option<(u32, u32)>,
) -> Result<(Vec<Person>, (u32, u32))> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| json_error(source, format!("not valid JSON: {e}")))?;
    let object = value.as_object().ok_or_else(|| {
        json_error(
            source,
            "expected a JSON object with a `people` array (OpenPose format)".to_string(),
        )
    })?;
    let dimension = |key: &str| -> Result<Option<u32>> {
        match object.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(n) if n >= 1.0 && n.fract() == 0.0 && n <= u32::MAX as f64 => {
                    Ok(Some(n as u32))
                }
                _ => Err(json_error(
                    source,
                    format!("`{key}` must be a positive whole number of pixels, found {v}"),
                )),
            },
        }
    };
    let size = match (dimension("canvas_width")?, dimension("canvas_height")?, canvas) {
        (Some(w), Some(h), _) => (w, h),
        (None, None, Some(size)) => size,
        (w, h, _) => {
            return Err(json_error(
                source,
                format!(
                    "the canvas size is unknown: expected both `canvas_width` and `canvas_height` (found {}, {}) or a size given with the file",
                    w.map_or("none".to_string(), |v| v.to_string()),
                    h.map_or("none".to_string(), |v| v.to_string())
                ),
            ))
        }
    };
    let people = object
        .get("people")
        .and_then(|p| p.as_array())
        .ok_or_else(|| {
            json_error(
                source,
                format!(
                    "expected a `people` array, found {}",
                    object
                        .get("people")
                        .map_or("no `people` key".to_string(), |v| format!("`people`: {v}"))
                ),
            )
        })?;
    let (w, h) = (size.0 as f64, size.1 as f64);
    let mut out = Vec::with_capacity(people.len());
    for (n, person) in people.iter().enumerate() {
        let numbers = person
            .get("pose_keypoints_2d")
            .and_then(|k| k.as_array())
            .ok_or_else(|| {
                json_error(
                    source,
                    format!("person {n}: expected a `pose_keypoints_2d` array"),
                )
            })?;
        let values: Vec<f64> = numbers
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| {
                    json_error(
                        source,
                        format!("person {n}: pose_keypoints_2d[{i}] is not a number: {v}"),
                    )
                })
            })
            .collect::<Result<_>>()?;
        let mapping: Vec<usize> = match values.len() {
            54 => (0..18).collect(),
            75 => BODY25_TO_COCO18.to_vec(),
            found => {
                return Err(json_error(
                    source,
                    format!(
                        "person {n}: pose_keypoints_2d has {found} numbers; expected 54 (18 COCO keypoints × x, y, confidence) or 75 (25 BODY_25 keypoints × 3)"
                    ),
                ))
            }
        };
        let mut keypoints = [None; 18];
        for (slot, &from) in keypoints.iter_mut().zip(&mapping) {
            let (x, y, c) = (values[3 * from], values[3 * from + 1], values[3 * from + 2]);
            if c > 0.0 {
                *slot = Some(Keypoint {
                    x: x / w,
                    y: y / h,
                    score: c,
                    id: -1,
                });
            }
        }
        let parts = keypoints.iter().flatten().count();
        out.push(Person {
            keypoints,
            total_score: keypoints.iter().flatten().map(|k| k.score).sum(),
            total_parts: parts as f64,
        });
    }
    Ok((out, size))
}

/// Reads an OpenPose JSON file: see [`parse_keypoints_json`].
pub fn read_keypoints_json(
    path: &Path,
    canvas: Option<(u32, u32)>,
) -> Result<(Vec<Person>, (u32, u32))> {
    let text = std::fs::read_to_string(path).map_err(|e| PreprocessError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    parse_keypoints_json(&text, &path.display().to_string(), canvas)
}

/// Writes people as OpenPose JSON with pixel coordinates on a `width × height` canvas
/// (detected keypoints are whole pixels and are written as such), confidence 1 for present
/// keypoints and `0, 0, 0` for missing ones.
pub fn keypoints_to_json(people: &[Person], width: u32, height: u32) -> String {
    let (w, h) = (width as f64, height as f64);
    let pixel = |v: f64| {
        let r = v.round();
        if (v - r).abs() < 1e-6 {
            r
        } else {
            v
        }
    };
    let people: Vec<serde_json::Value> = people
        .iter()
        .map(|p| {
            let numbers: Vec<f64> = p
                .keypoints
                .iter()
                .flat_map(|k| match k {
                    Some(k) => [pixel(k.x * w), pixel(k.y * h), 1.0],
                    None => [0.0, 0.0, 0.0],
                })
                .collect();
            serde_json::json!({ "pose_keypoints_2d": numbers })
        })
        .collect();
    let doc = serde_json::json!({
        "people": people,
        "canvas_width": width,
        "canvas_height": height,
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// Draws the poses of an OpenPose JSON text on a black canvas of `size` (default: the
/// file's canvas size), as [`draw_poses`].
pub fn pose_map_from_keypoints(
    text: &str,
    source: &str,
    size: Option<(u32, u32)>,
) -> Result<image::RgbImage> {
    let (people, canvas) = parse_keypoints_json(text, source, size)?;
    let (w, h) = size.unwrap_or(canvas);
    if w == 0 || h == 0 {
        return Err(PreprocessError::Invalid(format!(
            "pose canvas {w}x{h} must be positive"
        )));
    }
    Ok(draw_poses(&people, w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(numbers: usize) -> String {
        let values: Vec<String> = (0..numbers).map(|i| (i % 7 + 1).to_string()).collect();
        format!(
            r#"{{"people": [{{"pose_keypoints_2d": [{}]}}], "canvas_width": 64, "canvas_height": 32}}"#,
            values.join(",")
        )
    }

    #[test]
    fn wrong_keypoint_counts_are_refused() {
        for n in [53, 57, 0, 51] {
            let err = parse_keypoints_json(&doc(n), "x.json", None).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(&format!("has {n} numbers")), "{text}");
            assert!(text.contains("expected 54"), "{text}");
        }
        assert!(parse_keypoints_json(&doc(54), "x.json", None).is_ok());
        assert!(parse_keypoints_json(&doc(75), "x.json", None).is_ok());
    }

    #[test]
    fn missing_people_and_canvas_are_explained() {
        let err = parse_keypoints_json(r#"{"canvas_width": 4, "canvas_height": 4}"#, "a", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`people` array"), "{err}");
        let err = parse_keypoints_json(r#"{"people": []}"#, "a", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("canvas size is unknown"), "{err}");
        assert!(parse_keypoints_json(r#"{"people": []}"#, "a", Some((8, 8))).is_ok());
        let err = parse_keypoints_json("[1, 2]", "a", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("JSON object"), "{err}");
    }

    #[test]
    fn body25_maps_to_coco18() {
        let mut values = vec![0.0; 75];
        // BODY_25 part 9 (right hip) → COCO 8; part 8 (mid hip) is dropped.
        values[27] = 10.0;
        values[28] = 20.0;
        values[29] = 1.0;
        values[24] = 5.0;
        values[25] = 5.0;
        values[26] = 1.0;
        let text = serde_json::json!({"people": [{"pose_keypoints_2d": values}], "canvas_width": 100, "canvas_height": 50}).to_string();
        let (people, _) = parse_keypoints_json(&text, "b", None).unwrap();
        let k = people[0].keypoints[8].unwrap();
        assert_eq!((k.x, k.y), (0.1, 0.4));
        assert_eq!(people[0].keypoints.iter().flatten().count(), 1);
    }

    #[test]
    fn json_round_trip_keeps_whole_pixels() {
        let mut keypoints = [None; 18];
        keypoints[1] = Some(Keypoint {
            x: 37.0 / 96.0,
            y: 11.0 / 64.0,
            score: 0.5,
            id: 0,
        });
        let p = Person {
            keypoints,
            total_score: 0.5,
            total_parts: 1.0,
        };
        let text = keypoints_to_json(&[p.clone()], 96, 64);
        let (back, size) = parse_keypoints_json(&text, "c", None).unwrap();
        assert_eq!(size, (96, 64));
        let k = back[0].keypoints[1].unwrap();
        assert_eq!(
            (k.x, k.y),
            (p.keypoints[1].unwrap().x, p.keypoints[1].unwrap().y)
        );
    }
}
