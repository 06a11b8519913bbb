//! `ipcompose preprocess KIND IN OUT`: one hint image from the command line, made as the
//! ControlNet annotators make it (see the `ipcompose-preprocess` crate).

use std::path::PathBuf;

use anyhow::Context;
use ipcompose::pipeline::plan::Plan;
use ipcompose::preprocess::{Operation, Settings};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// OpenCV Canny on the RGB image (--low, --high).
    Canny,
    /// 255 minus every value.
    Invert,
    /// White where the gray value is above --level (scribble).
    Threshold,
    /// Down by --factor and back up (tile).
    Blur,
    /// Content shuffle (--seed).
    Shuffle,
    /// Depth Anything V2 depth map, near = bright (--model, --input-size).
    Depth,
    /// OpenPose body skeleton: detected by --model (body_pose_model.pth), or drawn from
    /// --keypoints (OpenPose JSON; IN is then ignored and may be `-`).
    Pose,
}

#[derive(Debug, clap::Args)]
pub struct PreprocessArgs {
    /// What to make.
    #[arg(value_enum)]
    pub kind: Kind,
    /// The input image.
    pub input: PathBuf,
    /// The output PNG.
    pub output: PathBuf,
    /// canny: lower hysteresis threshold [default: 100].
    #[arg(long)]
    pub low: Option<f64>,
    /// canny: upper hysteresis threshold [default: 200].
    #[arg(long)]
    pub high: Option<f64>,
    /// Short side before the operation, each side rounded to a multiple of 64 [default: 512
    /// for canny and shuffle, the input size for the others]; 0 keeps the input size.
    #[arg(long)]
    pub detect_resolution: Option<u32>,
    /// Resize the result to this width (with --height), as the annotators' last step.
    #[arg(long, requires = "height")]
    pub width: Option<u32>,
    /// Resize the result to this height (with --width).
    #[arg(long, requires = "width")]
    pub height: Option<u32>,
    /// threshold: gray level above which a pixel is white [default: 127].
    #[arg(long)]
    pub level: Option<u8>,
    /// blur: downsampling factor [default: 4].
    #[arg(long)]
    pub factor: Option<f64>,
    /// shuffle: seed of the random flow field [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// depth: the checkpoint (a transformers folder such as Depth-Anything-V2-Small-hf, or
    /// an original depth_anything_v2_vit*.pth).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// depth: the network's short side, a multiple of 14 [default: 518].
    #[arg(long)]
    pub input_size: Option<u32>,
    /// pose: draw these OpenPose JSON keypoints instead of detecting them.
    #[arg(long, conflicts_with = "model")]
    pub keypoints: Option<PathBuf>,
    /// pose: also write the detected keypoints as OpenPose JSON.
    #[arg(long)]
    pub keypoints_out: Option<PathBuf>,
    /// Replace the output file if it exists.
    #[arg(long)]
    pub overwrite: bool,
}

/// The operation the arguments ask for; options meant for another kind are refused rather
/// than silently ignored.
fn operation(args: &PreprocessArgs) -> anyhow::Result<Operation> {
    let given = [
        ("--low", args.low.is_some(), Kind::Canny),
        ("--high", args.high.is_some(), Kind::Canny),
        ("--level", args.level.is_some(), Kind::Threshold),
        ("--factor", args.factor.is_some(), Kind::Blur),
        ("--seed", args.seed.is_some(), Kind::Shuffle),
        ("--input-size", args.input_size.is_some(), Kind::Depth),
        ("--keypoints", args.keypoints.is_some(), Kind::Pose),
        ("--keypoints-out", args.keypoints_out.is_some(), Kind::Pose),
    ];
    if args.model.is_some() && !matches!(args.kind, Kind::Depth | Kind::Pose) {
        anyhow::bail!(
            "--model is an option of `depth` and `pose`, not of `{}`",
            kind_name(args.kind)
        );
    }
    for (flag, present, kind) in given {
        if present && kind != args.kind {
            anyhow::bail!(
                "{flag} is an option of `{}`, not of `{}`",
                kind_name(kind),
                kind_name(args.kind)
            );
        }
    }
    Ok(match args.kind {
        Kind::Canny => Operation::Canny {
            low: args.low.unwrap_or(100.0),
            high: args.high.unwrap_or(200.0),
        },
        Kind::Invert => Operation::Invert,
        Kind::Threshold => Operation::Threshold {
            level: args.level.unwrap_or(127),
        },
        Kind::Blur => Operation::Blur {
            factor: args.factor.unwrap_or(4.0),
        },
        Kind::Shuffle => Operation::Shuffle {
            seed: args.seed.unwrap_or(0),
        },
        Kind::Depth => {
            let model = args
                .model
                .clone()
                .context("depth needs --model (a Depth Anything V2 checkpoint)")?;
            ipcompose::models::depth_anything::resolve_depth_anything(&model)?;
            Operation::Depth {
                model,
                input_size: args
                    .input_size
                    .unwrap_or(ipcompose::preprocess::depth::INPUT_SIZE),
            }
        }
        Kind::Pose => match (&args.model, &args.keypoints) {
            (Some(model), None) => {
                ipcompose::models::openpose::BodyPoseModel::inspect(model)?;
                Operation::Pose {
                    model: model.clone(),
                }
            }
            (None, Some(file)) => {
                ipcompose::preprocess::pose::read_keypoints_json(file, None)?;
                Operation::PoseKeypoints {
                    file: file.clone(),
                    size: None,
                }
            }
            _ => anyhow::bail!(
                "pose needs --model (body_pose_model.pth) or --keypoints (OpenPose JSON)"
            ),
        },
    })
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Canny => "canny",
        Kind::Invert => "invert",
        Kind::Threshold => "threshold",
        Kind::Blur => "blur",
        Kind::Shuffle => "shuffle",
        Kind::Depth => "depth",
        Kind::Pose => "pose",
    }
}

pub fn run(args: PreprocessArgs) -> anyhow::Result<()> {
    let mut settings = Settings::new(operation(&args)?);
    match args.detect_resolution {
        Some(0) => settings.detect_resolution = None,
        Some(resolution) => settings.detect_resolution = Some(resolution),
        None => {}
    }
    settings.output_size = args.width.zip(args.height);
    settings.validate()?;
    let is_png = args
        .output
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !is_png {
        anyhow::bail!("{}: the output must be a .png file", args.output.display());
    }
    if args.output.exists() && !args.overwrite {
        anyhow::bail!(
            "{}: already exists (pass --overwrite to replace it)",
            args.output.display()
        );
    }
    let context = || format!("{} of {}", kind_name(args.kind), args.input.display());
    let mut networks = ipcompose::preprocess::Networks::default();
    let (result, keypoints) = match (&settings.operation, &args.keypoints_out) {
        (Operation::Pose { model }, Some(_)) => {
            let image = ipcompose::preprocess::load_image(&args.input)?;
            let model =
                ipcompose::models::openpose::BodyPoseModel::load(model, &candle_core::Device::Cpu)?;
            let detect = settings
                .detect_resolution
                .unwrap_or(image.width().min(image.height()));
            let (map, people) = ipcompose::preprocess::pose::pose_map(&model, &image, detect, None)
                .with_context(context)?;
            let json =
                ipcompose::preprocess::pose::keypoints_to_json(&people, map.width(), map.height());
            let map = match settings.output_size {
                Some((w, h)) => ipcompose::preprocess::resize::resize(
                    &map,
                    w,
                    h,
                    ipcompose::preprocess::resize::Interpolation::Linear,
                ),
                None => map,
            };
            (map, Some(json))
        }
        (operation, _) if !operation.reads_image() => {
            (settings.make(&mut networks).with_context(context)?, None)
        }
        _ => {
            let image = ipcompose::preprocess::load_image(&args.input)?;
            let map = settings
                .apply_with(&image, &mut networks)
                .with_context(context)?;
            (map, None)
        }
    };
    if let (Some(path), Some(json)) = (&args.keypoints_out, keypoints) {
        ipcompose::pipeline::io::output::write_atomically(path, |tmp| {
            std::fs::write(tmp, json).map_err(|e| ipcompose::pipeline::PipelineError::Output {
                path: path.clone(),
                message: e.to_string(),
            })
        })?;
    }
    ipcompose::pipeline::io::output::save_rgb_png(&result, &args.output, None)?;
    println!(
        "wrote {} ({}x{})",
        args.output.display(),
        result.width(),
        result.height()
    );
    Ok(())
}

/// The `validate` lines for a plan's preprocessor nodes.
pub fn print_preprocessors(plan: &Plan) {
    for p in &plan.preprocessors {
        let input = match &p.input {
            ipcompose::pipeline::plan::preprocess::PreprocessInput::File(path) => {
                path.display().to_string()
            }
            ipcompose::pipeline::plan::preprocess::PreprocessInput::Node(node) => {
                format!("node {node}")
            }
            ipcompose::pipeline::plan::preprocess::PreprocessInput::Generated { node, .. } => {
                format!("the image generate node {node} makes")
            }
        };
        let cached = if p.after_generation {
            "computed after that generation"
        } else if p.cache_path.is_file() {
            "cached"
        } else {
            "not cached yet"
        };
        println!(
            "preprocess {}: {} of {input} -> {} ({cached})",
            p.node,
            p.settings.describe(),
            p.cache_path.display()
        );
    }
}
