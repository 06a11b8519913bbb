//! Writing results: PNG images and safetensors latents, each to a temporary name first and
//! renamed into place, so a failed run never leaves a partial file.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use crate::error::{PipelineError, Result};

/// `[1, 3, H, W]` in [0, 1] to 8-bit RGB, rounding as diffusers' `numpy_to_pil` does.
pub fn to_rgb8(image: &Tensor) -> Result<image::RgbImage> {
    let (_, c, h, w) = image.dims4()?;
    if c != 3 {
        return Err(PipelineError::Plan(format!(
            "expected a 3-channel image, got {c} channels"
        )));
    }
    let pixels: Vec<u8> = (image.get(0)?.permute((1, 2, 0))?.to_dtype(DType::F32)? * 255.0)?
        .round()?
        .clamp(0.0, 255.0)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| v as u8)
        .collect();
    image::RgbImage::from_raw(w as u32, h as u32, pixels)
        .ok_or_else(|| PipelineError::Plan("image buffer size mismatch".to_string()))
}

fn temporary_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

fn io_error(path: &Path, source: impl std::fmt::Display) -> PipelineError {
    PipelineError::Output {
        path: path.to_path_buf(),
        message: source.to_string(),
    }
}

/// Runs `write` against a temporary file next to `path`, then renames it into place.
pub fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        }
    }
    let tmp = temporary_path(path);
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_error(path, e)
    })
}

/// Writes `image` as PNG; `metadata` (the resolved recipe) goes into an iTXt chunk.
pub fn save_png(image: &Tensor, path: &Path, metadata: Option<&str>) -> Result<()> {
    save_rgb_png(&to_rgb8(image)?, path, metadata)
}

/// Writes an 8-bit RGB image as PNG, with `metadata` as in [`save_png`].
pub fn save_rgb_png(rgb: &image::RgbImage, path: &Path, metadata: Option<&str>) -> Result<()> {
    write_atomically(path, |tmp| {
        let file = std::fs::File::create(tmp).map_err(|e| io_error(path, e))?;
        let mut encoder =
            png::Encoder::new(std::io::BufWriter::new(file), rgb.width(), rgb.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        if let Some(text) = metadata {
            encoder
                .add_itxt_chunk(
                    crate::io::provenance::PNG_KEYWORD.to_string(),
                    text.to_string(),
                )
                .map_err(|e| io_error(path, e))?;
        }
        let mut writer = encoder.write_header().map_err(|e| io_error(path, e))?;
        writer
            .write_image_data(rgb.as_raw())
            .map_err(|e| io_error(path, e))?;
        writer.finish().map_err(|e| io_error(path, e))
    })
}

pub fn save_latents(latents: &Tensor, path: &Path) -> Result<()> {
    let latents = latents.to_dtype(DType::F32)?;
    write_atomically(path, |tmp| {
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("latents", latents)]),
            tmp,
        )
        .map_err(|e| io_error(path, e))
    })
}
