//! The OpenPose body network (`ipcompose_models::openpose`) joined with the post-processing
//! and drawing of this module: the whole annotator.

use candle_core::{DType, Tensor};
use image::RgbImage;
use ipcompose_models::openpose::BodyPoseModel;
use ipcompose_models::ModelError;

use super::{draw_poses, estimate, people, prepare_input, NetInput, NetOutput, Person};
use crate::{resize, PreprocessError, Result};

/// Runs the network on a prepared input and returns its outputs as plain arrays.
pub fn run_network(model: &BodyPoseModel, input: &NetInput) -> Result<NetOutput> {
    let run = || -> std::result::Result<NetOutput, ModelError> {
        let x = Tensor::from_slice(
            &input.data,
            (1, 3, input.height, input.width),
            model.device(),
        )?
        .to_dtype(DType::F32)?;
        let (paf, heat) = model.forward(&x)?;
        let (_, _, h, w) = paf.dims4()?;
        Ok(NetOutput {
            paf: paf.flatten_all()?.to_vec1::<f32>()?,
            heatmap: heat.flatten_all()?.to_vec1::<f32>()?,
            width: w,
            height: h,
        })
    };
    run().map_err(PreprocessError::Model)
}

/// The people controlnet_aux's `OpenposeDetector.detect_poses` finds in an image (keypoints
/// normalised by its size), without resizing it first.
pub fn detect_people(model: &BodyPoseModel, image: &RgbImage) -> Result<Vec<Person>> {
    let input = prepare_input(image)?;
    let output = run_network(model, &input)?;
    let estimate = estimate(&input, &output)?;
    Ok(people(
        &estimate,
        image.width() as usize,
        image.height() as usize,
    ))
}

/// controlnet_aux 0.0.10's `OpenposeDetector(image, detect_resolution, image_resolution)` with
/// the body only: the image to `detect_resolution` (`resize_image`), detection, the skeleton
/// drawn at that size, then the map resized (`INTER_LINEAR`) to the size `resize_image` gives
/// for `image_resolution` (`None` keeps the detect size). Returns the map and the people.
pub fn pose_map(
    model: &BodyPoseModel,
    image: &RgbImage,
    detect_resolution: u32,
    image_resolution: Option<u32>,
) -> Result<(RgbImage, Vec<Person>)> {
    let detect = resize::resize_image(image, detect_resolution)?;
    let people = detect_people(model, &detect)?;
    let canvas = draw_poses(&people, detect.width(), detect.height());
    let map = match image_resolution {
        Some(r) => {
            let (w, h, _) = resize::detect_size(detect.width(), detect.height(), r);
            if w == 0 || h == 0 {
                return Err(PreprocessError::Invalid(format!(
                    "image resolution {r} rounds a {}x{} map to {w}x{h}",
                    detect.width(),
                    detect.height()
                )));
            }
            resize::resize(&canvas, w, h, resize::Interpolation::Linear)
        }
        None => canvas,
    };
    Ok((map, people))
}
