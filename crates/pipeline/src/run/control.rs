//! Structural conditions: ControlNets (run every step inside their window, residuals summed
//! on the device) and T2I-Adapters (features computed once, added while active).

use crate::plan::control::{ControlNetPlan, ResizeMode, T2IAdapterPlan};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ipcompose_models::controlnet::{ControlCondition, ControlNetModel};
use ipcompose_models::t2i_adapter::T2IAdapter;
use ipcompose_models::unet::{AddedConditioning, TextContext};

use crate::error::Result;
use crate::run::clip_image::load_rgb;
use crate::run::resample::{resize_rgb, Resampler};

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
