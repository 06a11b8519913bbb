//! Structural conditions: ControlNets (run every step inside their window, residuals summed
//! on the device) and T2I-Adapters (features computed once, added while active).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ipcompose_models::controlnet::{ControlCondition, ControlNetConfig, ControlNetModel};
use ipcompose_models::t2i_adapter::{T2IAdapter, T2IAdapterConfig};
use ipcompose_models::unet::{AddedConditioning, TextContext};

use crate::clip_image::load_rgb;
use crate::error::Result;
use crate::ip::active_at;
use crate::resample::{resize_rgb, Resampler};

/// How a hint image is brought to the output size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResizeMode {
    /// Stretch to the output size (diffusers' behaviour; Pillow Lanczos).
    #[default]
    Resize,
    /// Scale to cover the output, then centre-crop the overflow.
    Crop,
    /// Scale to fit inside the output, then pad with black (no condition) around it.
    Fill,
}

impl std::str::FromStr for ResizeMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "resize" | "stretch" => Ok(Self::Resize),
            "crop" => Ok(Self::Crop),
            "fill" | "pad" => Ok(Self::Fill),
            other => Err(format!(
                "unknown resize mode `{other}` (valid: resize, crop, fill)"
            )),
        }
    }
}

/// The hint as the pipelines prepare it: RGB, `width`×`height`, `[1, 3, H, W]` in [0, 1].
pub fn prepare_hint(
    path: &Path,
    width: usize,
    height: usize,
    mode: ResizeMode,
    device: &Device,
) -> Result<Tensor> {
    let image = load_rgb(path)?;
    let (w, h) = (image.width() as f64, image.height() as f64);
    let (tw, th) = (width as u32, height as u32);
    let fitted = match mode {
        ResizeMode::Resize => resize_rgb(&image, tw, th, Resampler::PilLanczos),
        ResizeMode::Crop | ResizeMode::Fill => {
            let scale = if mode == ResizeMode::Crop {
                (width as f64 / w).max(height as f64 / h)
            } else {
                (width as f64 / w).min(height as f64 / h)
            };
            let sw = ((w * scale).round() as u32).max(1);
            let sh = ((h * scale).round() as u32).max(1);
            let scaled = resize_rgb(&image, sw, sh, Resampler::PilLanczos);
            let mut canvas = image::RgbImage::new(tw, th);
            let dx = (tw as i64 - sw as i64) / 2;
            let dy = (th as i64 - sh as i64) / 2;
            image::imageops::overlay(&mut canvas, &scaled, dx, dy);
            canvas
        }
    };
    let (fw, fh) = (fitted.width() as usize, fitted.height() as usize);
    let mut data = vec![0f32; 3 * fw * fh];
    for (x, y, p) in fitted.enumerate_pixels() {
        for c in 0..3 {
            data[c * fw * fh + y as usize * fw + x as usize] = p.0[c] as f32 / 255.0;
        }
    }
    Ok(Tensor::from_vec(data, (1, 3, fh, fw), device)?)
}

/// A ControlNet model declared in a recipe, checked against its base at plan time.
#[derive(Debug, Clone)]
pub struct ControlNetPlan {
    pub source: PathBuf,
    pub single_file: bool,
    pub variant: Option<String>,
    pub config: ControlNetConfig,
}

#[derive(Debug, Clone)]
pub struct T2IAdapterPlan {
    pub source: PathBuf,
    pub variant: Option<String>,
    pub config: T2IAdapterConfig,
}

pub fn load_controlnet(
    plan: &ControlNetPlan,
    dtype: DType,
    device: &Device,
) -> Result<ControlNetModel> {
    Ok(if plan.single_file {
        ControlNetModel::load_single_file(&plan.source, &plan.config, dtype, device)?
    } else {
        ControlNetModel::load_folder(
            &plan.source,
            &plan.config,
            plan.variant.as_deref(),
            dtype,
            device,
        )?
    })
}

pub fn load_t2i_adapter(
    plan: &T2IAdapterPlan,
    dtype: DType,
    device: &Device,
) -> Result<T2IAdapter> {
    Ok(T2IAdapter::load_folder(
        &plan.source,
        &plan.config,
        plan.variant.as_deref(),
        dtype,
        device,
    )?)
}

/// A ControlNet or T2I-Adapter model declared in a recipe (`kind: controlnet | t2i-adapter`).
/// Its config is resolved against the base model that uses it.
#[derive(Debug, Clone)]
pub struct ControlModelSource {
    pub is_controlnet: bool,
    pub source: PathBuf,
    pub variant: Option<String>,
    /// Single-file ControlNets do not record it (true for shuffle models).
    pub global_pool: Option<bool>,
}

/// The kind-specific settings of one control in a generation.
#[derive(Debug, Clone)]
pub enum ControlKind {
    ControlNet {
        plan: Box<ControlNetPlan>,
        guess_mode: bool,
        /// Union models: the condition type index (`control_mode`).
        union_type: Option<usize>,
    },
    T2IAdapter {
        plan: T2IAdapterPlan,
        /// Fraction of the steps the features apply to (diffusers' `adapter_conditioning_factor`).
        factor: f64,
    },
}

/// One control as a generation uses it.
#[derive(Debug, Clone)]
pub struct ControlUse {
    pub model: String,
    pub image: PathBuf,
    /// Conditioning scale (ControlNet) or feature weight (T2I) per step; 0 where inactive
    /// (outside `start`..`end`, and for T2I-Adapters past `factor`).
    pub step_scales: Vec<f64>,
    pub start: f64,
    pub end: f64,
    pub resize: ResizeMode,
    pub kind: ControlKind,
}

/// One control image of a prepared ControlNet.
pub struct PreparedCondition {
    /// `[1, 3, H, W]`; broadcast over the batch.
    pub hint: Tensor,
    /// Union models: the condition type (`control_mode`).
    pub union_type: Option<usize>,
    /// Conditioning scale per step; 0 = inactive.
    pub step_scales: Vec<f64>,
}

/// A ControlNet ready for the loop: one condition, or for a union model every control of the
/// generation that names it (evaluated together, as diffusers' `control_mode` list).
pub struct PreparedControlNet {
    pub model: std::rc::Rc<ControlNetModel>,
    pub conditions: Vec<PreparedCondition>,
    /// Guess mode, forced for `global_pool_conditions` models as diffusers does.
    pub guess_mode: bool,
}

impl PreparedControlNet {
    /// A plain ControlNet with one hint.
    pub fn single(
        model: std::rc::Rc<ControlNetModel>,
        hint: Tensor,
        step_scales: Vec<f64>,
        guess_mode: bool,
    ) -> Self {
        Self {
            model,
            conditions: vec![PreparedCondition {
                hint,
                union_type: None,
                step_scales,
            }],
            guess_mode,
        }
    }
}

/// T2I features, computed once; each step uses them times that step's weight.
pub struct PreparedT2I {
    pub features: Vec<Tensor>,
    /// Feature weight per step; 0 = not applied.
    pub step_scales: Vec<f64>,
}

/// Whether a T2I-Adapter applies at `step`: inside its window and while
/// `step < ⌊steps · factor⌋` (the SDXL adapter pipeline's `adapter_conditioning_factor`).
pub fn t2i_active_at(step: usize, steps: usize, start: f64, end: f64, factor: f64) -> bool {
    active_at(step, steps, start, end) && step < (steps as f64 * factor).floor() as usize
}

/// Summed ControlNet residuals for one step: `(down, mid)`, or `None` when none is active.
/// Outside its window a ControlNet is not run at all. A union model with several conditions
/// runs while any of them is active, the inactive ones with scale 0 (as diffusers, which keeps
/// every condition in the call); `context` carries SDXL's added conditioning, narrowed with
/// the latents to the conditional half in guess mode.
pub fn controlnet_residuals(
    controlnets: &[PreparedControlNet],
    step: usize,
    model_input: &Tensor,
    timestep: f64,
    context: TextContext,
    guided: bool,
) -> Result<Option<(Vec<Tensor>, Tensor)>> {
    let mut sum: Option<(Vec<Tensor>, Tensor)> = None;
    for cn in controlnets {
        let scales: Vec<f64> = cn
            .conditions
            .iter()
            .map(|c| c.step_scales.get(step).copied().unwrap_or(0.0))
            .collect();
        if scales.iter().all(|&s| s == 0.0) {
            continue;
        }
        // Guess mode under guidance: only the conditional half, zeros for the other half.
        let cond_only = cn.guess_mode && guided;
        let narrowed_added;
        let (input, hidden, added) = if cond_only {
            narrowed_added = context
                .added
                .map(|a| -> Result<AddedConditioning> {
                    Ok(AddedConditioning {
                        text_embeds: a.text_embeds.narrow(0, 1, 1)?,
                        time_ids: a.time_ids.narrow(0, 1, 1)?,
                    })
                })
                .transpose()?;
            (
                model_input.narrow(0, 1, 1)?,
                context.hidden.narrow(0, 1, 1)?,
                narrowed_added.as_ref(),
            )
        } else {
            (model_input.clone(), context.hidden.clone(), context.added)
        };
        let conditions: Vec<ControlCondition> = cn
            .conditions
            .iter()
            .zip(&scales)
            .map(|(c, &scale)| ControlCondition {
                image: &c.hint,
                union_type: c.union_type,
                scale,
            })
            .collect();
        let out = cn.model.forward(
            &input,
            timestep,
            TextContext {
                hidden: &hidden,
                added,
            },
            &conditions,
            cn.guess_mode,
        )?;
        let pad = |t: Tensor| -> Result<Tensor> {
            if cond_only {
                Ok(Tensor::cat(&[&t.zeros_like()?, &t], 0)?)
            } else {
                Ok(t)
            }
        };
        let down = out.down.into_iter().map(pad).collect::<Result<Vec<_>>>()?;
        let mid = pad(out.mid)?;
        sum = Some(match sum {
            None => (down, mid),
            Some((acc_down, acc_mid)) => (
                acc_down
                    .iter()
                    .zip(&down)
                    .map(|(a, b)| Ok(a.broadcast_add(b)?))
                    .collect::<Result<Vec<_>>>()?,
                acc_mid.broadcast_add(&mid)?,
            ),
        });
    }
    Ok(sum)
}

/// Summed T2I features of the adapters active at this step.
pub fn t2i_features(adapters: &[PreparedT2I], step: usize) -> Result<Option<Vec<Tensor>>> {
    let mut sum: Option<Vec<Tensor>> = None;
    for adapter in adapters {
        let weight = adapter.step_scales.get(step).copied().unwrap_or(0.0);
        if weight == 0.0 {
            continue;
        }
        let weighted = adapter
            .features
            .iter()
            .map(|f| Ok((f * weight)?))
            .collect::<Result<Vec<_>>>()?;
        sum = Some(match sum {
            None => weighted,
            Some(acc) => acc
                .iter()
                .zip(&weighted)
                .map(|(a, b)| Ok((a + b)?))
                .collect::<Result<Vec<_>>>()?,
        });
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factor_limits_the_steps() {
        let active: Vec<bool> = (0..4)
            .map(|i| t2i_active_at(i, 4, 0.0, 1.0, 0.75))
            .collect();
        assert_eq!(active, [true, true, true, false]);
    }

    #[test]
    fn resize_modes_parse() {
        assert_eq!("crop".parse::<ResizeMode>().unwrap(), ResizeMode::Crop);
        assert!("zoom"
            .parse::<ResizeMode>()
            .unwrap_err()
            .contains("resize, crop, fill"));
    }
}
