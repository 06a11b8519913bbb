//! Prompts → the UNet's text conditioning, as the base's [`TextEncoding`] says: one CLIP
//! encoder (SD1.x / SD2.x), or two with pooled embeddings and micro-conditioning (SDXL).

use candle_core::{Device, Tensor};
use ipcompose_models::clip_text::ClipTextModelWithProjection;
use ipcompose_models::tokenizer::ClipTokenizer;
use ipcompose_models::unet::AddedConditioning;

use crate::error::{PipelineError, Result};
use crate::family::{MicroConditioning, TextEncoding};
use crate::generate::{BaseModel, Guidance, TextConditioning};
use crate::plan::GenerationPlan;

/// SDXL's second text encoder with its tokenizer (which pads with `!`).
pub struct SecondTextEncoder {
    pub tokenizer: ClipTokenizer,
    pub encoder: ClipTextModelWithProjection,
}

/// Token ids `[1, 77]` of `prompt`.
fn tokenize(tokenizer: &ClipTokenizer, prompt: &str, device: &Device) -> Result<Tensor> {
    let ids = tokenizer
        .encode(prompt)
        .map_err(|e| PipelineError::Plan(format!("tokenizing {prompt:?}: {e}")))?;
    Ok(Tensor::new(ids, device)?.unsqueeze(0)?)
}

/// Python's `a or b` on an optional prompt, as diffusers picks `prompt_2` and
/// `negative_prompt_2`: an absent or empty text falls back.
fn or_else<'a>(text: Option<&'a str>, fallback: &'a str) -> &'a str {
    text.filter(|t| !t.is_empty()).unwrap_or(fallback)
}

impl BaseModel {
    /// Token ids `[1, 77]` of `prompt` for the (first) text encoder.
    pub fn tokenize(&self, prompt: &str) -> Result<Tensor> {
        tokenize(&self.tokenizer, prompt, &self.device)
    }

    /// The SD1.x / SD2.x text context `[1, 77, D]` as diffusers' `encode_prompt` makes it.
    pub fn encode_prompt(&self, prompt: &str, clip_skip: usize) -> Result<Tensor> {
        Ok(self
            .text_encoder
            .encode(&self.tokenize(prompt)?, clip_skip)?)
    }

    /// SDXL's context `[1, 77, D1 + D2]` and pooled `text_embeds` `[1, P]` for `prompt` (first
    /// encoder) and `prompt_2` (second encoder), as diffusers' `encode_prompt`.
    pub fn encode_prompt_pair(
        &self,
        prompt: &str,
        prompt_2: &str,
        clip_skip: usize,
    ) -> Result<(Tensor, Tensor)> {
        let second = self.text_encoder_2.as_ref().ok_or_else(|| {
            PipelineError::Plan(
                "this base has no second text encoder (`text_encoder_2`)".to_string(),
            )
        })?;
        let first = self
            .text_encoder
            .penultimate(&self.tokenize(prompt)?, clip_skip)?;
        let ids_2 = tokenize(&second.tokenizer, prompt_2, &self.device)?;
        let (hidden_2, pooled) = second.encoder.encode_with_pooled(&ids_2, clip_skip)?;
        Ok((Tensor::cat(&[first, hidden_2], 2)?, pooled))
    }

    /// The text conditioning of a generation as its family encodes it: the UNet context
    /// (`[uncond, cond]` under guidance, `[cond]` without) and, for SDXL, the added
    /// conditioning batched the same way.
    pub fn text_conditioning(
        &self,
        request: &GenerationPlan,
    ) -> Result<(TextConditioning, Option<AddedConditioning>)> {
        let guided = request.guidance > 1.0;
        let guidance = Guidance {
            scale: request.guidance,
            rescale: request.guidance_rescale,
        };
        let batch = |uncond: Tensor, cond: Tensor| -> Result<Tensor> {
            Ok(if guided {
                Tensor::cat(&[uncond, cond], 0)?
            } else {
                cond
            })
        };
        match self.kind.family().text {
            TextEncoding::Single => {
                let cond = self.encode_prompt(&request.prompt, request.clip_skip)?;
                let context = if guided {
                    let negative = request.negative_prompt.as_deref().unwrap_or("");
                    batch(self.encode_prompt(negative, request.clip_skip)?, cond)?
                } else {
                    cond
                };
                let text = TextConditioning {
                    context,
                    guided,
                    guidance,
                };
                Ok((text, None))
            }
            TextEncoding::Dual => {
                let prompt_2 = or_else(request.prompt_2.as_deref(), &request.prompt);
                let (cond, pooled) =
                    self.encode_prompt_pair(&request.prompt, prompt_2, request.clip_skip)?;
                let (uncond, uncond_pooled) = if !guided {
                    (cond.clone(), pooled.clone())
                } else if request.negative_prompt.is_none() && self.force_zeros_for_empty_prompt {
                    (cond.zeros_like()?, pooled.zeros_like()?)
                } else {
                    let negative = request.negative_prompt.as_deref().unwrap_or("");
                    let negative_2 = or_else(request.negative_prompt_2.as_deref(), negative);
                    // diffusers encodes the negative prompts without clip skip.
                    self.encode_prompt_pair(negative, negative_2, 0)?
                };
                let micro = request
                    .micro_conditioning
                    .unwrap_or_else(|| MicroConditioning::defaults(request.width, request.height));
                let ids = Tensor::new(&micro.time_ids(), &self.device)?.unsqueeze(0)?;
                let added = AddedConditioning {
                    text_embeds: batch(uncond_pooled, pooled)?,
                    time_ids: batch(ids.clone(), ids)?,
                };
                let text = TextConditioning {
                    context: batch(uncond, cond)?,
                    guided,
                    guidance,
                };
                Ok((text, Some(added)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::or_else;

    #[test]
    fn second_prompts_fall_back_like_python_or() {
        assert_eq!(or_else(None, "a"), "a");
        assert_eq!(or_else(Some(""), "a"), "a");
        assert_eq!(or_else(Some("b"), "a"), "b");
    }
}
