//! Hint-image preprocessors, made the way the ControlNet annotators (controlnet_aux 0.0.10 on
//! PyPI) make the images the ControlNets were trained on.
//!
//! - [`canny`]: OpenCV's `Canny` on the 3-channel RGB image, bit for bit (see that module).
//! - [`simple`]: `invert`, `threshold` (scribble), `blur` (tile) and `shuffle` (content shuffle).
//! - [`depth`]: the Depth Anything V2 depth map, as the original repository's `infer_image` and
//!   the ControlNet depth annotator make it (the network is in `ipcompose-models`).
//! - [`pose`]: the OpenPose body hint's post-processing and drawing (the network is in
//!   `ipcompose_models::openpose`), and OpenPose JSON keypoints.
//! - [`resize`]: the annotators' detect-resolution step (`resize_image`) and OpenCV's
//!   `INTER_AREA`, `INTER_LANCZOS4` and `INTER_LINEAR` resampling of 8-bit images.
//!
//! [`Settings::apply`] runs one preprocessor as an annotator does: resize to the detect
//! resolution, run, and optionally resize the map to an output size.

pub mod canny;
pub mod depth;
pub mod pose;
pub mod resize;
pub mod simple;

use std::path::{Path, PathBuf};

use image::{DynamicImage, RgbImage};

#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("{path}: cannot read image: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path}: cannot write image: {message}")]
    Write { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    /// A network preprocessor (depth) failed to run.
    #[error(transparent)]
    Model(#[from] ipcompose_models::ModelError),
    /// OpenPose keypoints (JSON) that cannot be used; `file` names it.
    #[error("{file}: {message}")]
    Keypoints { file: String, message: String },
}

pub type Result<T> = std::result::Result<T, PreprocessError>;

/// What a preprocessor does, with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum Operation {
    /// OpenCV `Canny(rgb, low, high)`: aperture 3, L1 gradient.
    Canny { low: f64, high: f64 },
    /// `255 - value` in every channel.
    Invert,
    /// White where OpenCV's gray value is above `level`, black elsewhere.
    Threshold { level: u8 },
    /// Tile hint: `INTER_AREA` down by `factor`, then `INTER_LANCZOS4` back to the size it had.
    Blur { factor: f64 },
    /// Content shuffle: a smooth random remap drawn from `seed`.
    Shuffle { seed: u64 },
    /// Depth Anything V2 depth map (near = bright) from the checkpoint at `model` (a
    /// transformers folder or an original `.pth`); `input_size` is the network's short side.
    Depth { model: PathBuf, input_size: u32 },
    /// OpenPose body skeleton detected by the body model at `model` (`body_pose_model.pth`).
    Pose { model: PathBuf },
    /// OpenPose skeleton drawn from an OpenPose JSON file (no image, no network), on its
    /// canvas size or on `size`.
    PoseKeypoints {
        file: PathBuf,
        size: Option<(u32, u32)>,
    },
}

/// The names accepted for [`Operation`]s, for messages and the command line.
pub const KINDS: [&str; 7] = [
    "canny",
    "invert",
    "threshold",
    "blur",
    "shuffle",
    "depth",
    "pose",
];

/// Networks that preprocessors run, each loaded once (by its file) however many nodes use it.
#[derive(Default)]
pub struct Networks {
    depth: std::collections::BTreeMap<PathBuf, ipcompose_models::depth_anything::DepthAnything>,
    pose: std::collections::BTreeMap<PathBuf, ipcompose_models::openpose::BodyPoseModel>,
}

impl Networks {
    fn depth(&mut self, model: &Path) -> Result<&ipcompose_models::depth_anything::DepthAnything> {
        if !self.depth.contains_key(model) {
            let network = ipcompose_models::depth_anything::load_depth_anything(
                model,
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )?;
            self.depth.insert(model.to_path_buf(), network);
        }
        Ok(&self.depth[model])
    }

    fn pose(&mut self, model: &Path) -> Result<&ipcompose_models::openpose::BodyPoseModel> {
        if !self.pose.contains_key(model) {
            let network =
                ipcompose_models::openpose::BodyPoseModel::load(model, &candle_core::Device::Cpu)?;
            self.pose.insert(model.to_path_buf(), network);
        }
        Ok(&self.pose[model])
    }
}

impl Operation {
    pub fn name(&self) -> &'static str {
        match self {
            Operation::Canny { .. } => "canny",
            Operation::Invert => "invert",
            Operation::Threshold { .. } => "threshold",
            Operation::Blur { .. } => "blur",
            Operation::Shuffle { .. } => "shuffle",
            Operation::Depth { .. } => "depth",
            Operation::Pose { .. } | Operation::PoseKeypoints { .. } => "pose",
        }
    }

    /// The annotators resize to 512 on the short side before detecting; the plain image
    /// operations are not annotators and keep the input's size.
    pub fn default_detect_resolution(&self) -> Option<u32> {
        match self {
            Operation::Canny { .. } | Operation::Shuffle { .. } | Operation::Pose { .. } => {
                Some(512)
            }
            // Depth maps come out at the input's size; the network resizes internally.
            Operation::Invert
            | Operation::Threshold { .. }
            | Operation::Blur { .. }
            | Operation::Depth { .. }
            | Operation::PoseKeypoints { .. } => None,
        }
    }

    /// Points a network operation at its model's files (planning resolves recipe names).
    pub fn set_model(&mut self, path: PathBuf) {
        match self {
            Operation::Depth { model, .. } | Operation::Pose { model } => *model = path,
            _ => {}
        }
    }

    /// Whether it reads an input image (drawing from keypoints does not).
    pub fn reads_image(&self) -> bool {
        !matches!(self, Operation::PoseKeypoints { .. })
    }

    pub fn validate(&self) -> Result<()> {
        match *self {
            Operation::Canny { low, high } => {
                if !low.is_finite() || !high.is_finite() || low < 0.0 || high < 0.0 {
                    return Err(PreprocessError::Invalid(format!(
                        "canny thresholds must be numbers ≥ 0, got low {low} and high {high}"
                    )));
                }
            }
            Operation::Blur { factor } => {
                if !factor.is_finite() || factor < 1.0 {
                    return Err(PreprocessError::Invalid(format!(
                        "blur factor must be a number ≥ 1, got {factor}"
                    )));
                }
            }
            Operation::Depth { input_size, .. } => {
                if input_size < depth::MULTIPLE {
                    return Err(PreprocessError::Invalid(format!(
                        "depth input size must be at least {}, got {input_size}",
                        depth::MULTIPLE
                    )));
                }
            }
            Operation::PoseKeypoints {
                size: Some((w, h)), ..
            } if w == 0 || h == 0 => {
                return Err(PreprocessError::Invalid(format!(
                    "pose canvas {w}x{h} must be positive"
                )));
            }
            Operation::Invert
            | Operation::Threshold { .. }
            | Operation::Shuffle { .. }
            | Operation::Pose { .. }
            | Operation::PoseKeypoints { .. } => {}
        }
        Ok(())
    }

    fn run(&self, image: &RgbImage, networks: &mut Networks) -> Result<RgbImage> {
        Ok(match *self {
            Operation::Depth {
                ref model,
                input_size,
            } => depth::depth_map(networks.depth(model)?, image, input_size)?,
            Operation::Pose { ref model } => {
                let people = pose::detect_people(networks.pose(model)?, image)?;
                pose::draw_poses(&people, image.width(), image.height())
            }
            Operation::PoseKeypoints { ref file, size } => {
                let text = std::fs::read_to_string(file).map_err(|e| PreprocessError::Read {
                    path: file.clone(),
                    message: e.to_string(),
                })?;
                pose::pose_map_from_keypoints(&text, &file.display().to_string(), size)?
            }
            Operation::Canny { low, high } => canny::canny(image, low, high),
            Operation::Invert => simple::invert(image),
            Operation::Threshold { level } => simple::threshold(image, level),
            Operation::Blur { factor } => simple::blur(image, factor)?,
            Operation::Shuffle { seed } => simple::shuffle(image, seed),
        })
    }
}

/// One preprocessor run as the annotators run it.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub operation: Operation,
    /// Short side to this many pixels (each side rounded to a multiple of 64) before the
    /// operation, as controlnet_aux's `resize_image`; `None` keeps the input's size.
    pub detect_resolution: Option<u32>,
    /// Resize the result to exactly `(width, height)` with `INTER_LINEAR`, as the annotators'
    /// last step does; `None` keeps the size the operation produced.
    pub output_size: Option<(u32, u32)>,
}

impl Settings {
    /// The operation with its default detect resolution and no output resize.
    pub fn new(operation: Operation) -> Self {
        Self {
            detect_resolution: operation.default_detect_resolution(),
            operation,
            output_size: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        self.operation.validate()?;
        if self.detect_resolution == Some(0) {
            return Err(PreprocessError::Invalid(
                "detect resolution must be at least 1 (leave it out to keep the input size)"
                    .to_string(),
            ));
        }
        if let Some((w, h)) = self.output_size {
            if w == 0 || h == 0 {
                return Err(PreprocessError::Invalid(format!(
                    "output size {w}x{h} must be positive"
                )));
            }
        }
        Ok(())
    }

    /// Runs the preprocessor; a network it needs is loaded for this call only.
    pub fn apply(&self, image: &RgbImage) -> Result<RgbImage> {
        self.apply_with(image, &mut Networks::default())
    }

    /// Makes the result of an operation that reads no image (see
    /// [`Operation::reads_image`]).
    pub fn make(&self, networks: &mut Networks) -> Result<RgbImage> {
        if self.operation.reads_image() {
            return Err(PreprocessError::Invalid(format!(
                "`{}` needs an input image",
                self.operation.name()
            )));
        }
        let made = self.operation.run(&RgbImage::new(0, 0), networks)?;
        Ok(match self.output_size {
            Some((w, h)) => resize::resize(&made, w, h, resize::Interpolation::Linear),
            None => made,
        })
    }

    /// Runs the preprocessor with networks kept in `networks` between calls.
    pub fn apply_with(&self, image: &RgbImage, networks: &mut Networks) -> Result<RgbImage> {
        self.validate()?;
        if image.width() == 0 || image.height() == 0 {
            return Err(PreprocessError::Invalid("the image is empty".to_string()));
        }
        let detected = match self.detect_resolution {
            Some(resolution) => {
                let resized = resize::resize_image(image, resolution)?;
                self.operation.run(&resized, networks)?
            }
            None => self.operation.run(image, networks)?,
        };
        Ok(match self.output_size {
            Some((w, h)) => resize::resize(&detected, w, h, resize::Interpolation::Linear),
            None => detected,
        })
    }

    /// A canonical text of everything that decides the result, for cache keys. Bump
    /// [`ALGORITHM_VERSION`] when an operation's output changes.
    pub fn describe(&self) -> String {
        let op = match &self.operation {
            Operation::Canny { low, high } => format!("canny low={low:?} high={high:?}"),
            Operation::Invert => "invert".to_string(),
            Operation::Threshold { level } => format!("threshold level={level}"),
            Operation::Blur { factor } => format!("blur factor={factor:?}"),
            Operation::Shuffle { seed } => format!("shuffle seed={seed}"),
            Operation::Depth { model, input_size } => format!(
                "depth model={} ({}) input_size={input_size}",
                model.display(),
                file_stamp(model)
            ),
            Operation::Pose { model } => {
                format!("pose model={} ({})", model.display(), file_stamp(model))
            }
            // The file's content is part of the node's cache key as its input.
            Operation::PoseKeypoints { size, .. } => format!("pose keypoints size={size:?}"),
        };
        format!(
            "ipcompose-preprocess/{ALGORITHM_VERSION} {op} detect={:?} output={:?}",
            self.detect_resolution, self.output_size
        )
    }
}

/// Size and modification time of a model file, or of every file in a model folder: a cheap
/// stand-in for hashing gigabytes, so a replaced checkpoint invalidates cached maps.
fn file_stamp(path: &Path) -> String {
    let stamp = |p: &Path| match std::fs::metadata(p) {
        Ok(m) => {
            let modified = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            format!("{}:{modified}", m.len())
        }
        Err(_) => "missing".to_string(),
    };
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        entries.sort();
        entries
            .iter()
            .filter(|p| p.is_file())
            .map(|p| {
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                format!("{name}={}", stamp(p))
            })
            .collect::<Vec<_>>()
            .join(",")
    } else {
        stamp(path)
    }
}

/// Changes whenever any operation would produce different pixels for the same settings.
pub const ALGORITHM_VERSION: u32 = 1;

/// Reads an image as the annotators' `HWC3` sees it: gray is repeated into three channels,
/// and transparent pixels are blended onto white in float32 and truncated, as
/// `(color * alpha + 255 * (1 - alpha)).clip(0, 255).astype(uint8)`.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let image = image::open(path).map_err(|e| PreprocessError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(hwc3(image))
}

pub fn hwc3(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.to_rgb8();
    }
    let rgba = image.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y).0;
        let alpha = p[3] as f32 / 255.0;
        let blend = |c: u8| (c as f32 * alpha + 255.0 * (1.0 - alpha)).clamp(0.0, 255.0) as u8;
        image::Rgb([blend(p[0]), blend(p[1]), blend(p[2])])
    })
}

/// Writes a PNG (callers that need atomic replacement write to a temporary name first).
pub fn save_png(image: &RgbImage, path: &Path) -> Result<()> {
    image
        .save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| PreprocessError::Write {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_describe_every_parameter() {
        let a = Settings::new(Operation::Canny {
            low: 100.0,
            high: 200.0,
        });
        let mut b = a.clone();
        b.detect_resolution = Some(768);
        let mut c = a.clone();
        c.operation = Operation::Canny {
            low: 100.0,
            high: 201.0,
        };
        assert_ne!(a.describe(), b.describe());
        assert_ne!(a.describe(), c.describe());
        assert_eq!(a.detect_resolution, Some(512));
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert!(Operation::Blur { factor: 0.5 }.validate().is_err());
        assert!(Operation::Canny {
            low: f64::NAN,
            high: 1.0
        }
        .validate()
        .is_err());
        let mut s = Settings::new(Operation::Invert);
        s.output_size = Some((0, 4));
        assert!(s.apply(&RgbImage::new(4, 4)).is_err());
    }

    #[test]
    fn transparent_pixels_blend_onto_white_and_truncate() {
        let mut rgba = image::RgbaImage::new(1, 1);
        rgba.put_pixel(0, 0, image::Rgba([0, 100, 255, 128]));
        let rgb = hwc3(DynamicImage::ImageRgba8(rgba));
        // numpy gives 126.99999, 177.19608, 255.0 → [126, 177, 255].
        assert_eq!(rgb.get_pixel(0, 0).0, [126, 177, 255]);
    }
}
