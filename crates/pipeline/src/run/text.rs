//! Prompts → the UNet's text conditioning, as the base's [`TextEncoding`] says: one CLIP
//! encoder (SD1.x / SD2.x), or two with pooled embeddings and micro-conditioning (SDXL).

use candle_core::{DType, Device, Tensor};
use ipcompose_models::clip_text::{ClipTextModel, ClipTextModelWithProjection};
use ipcompose_models::tokenizer::ClipTokenizer;
use ipcompose_models::unet::AddedConditioning;

use crate::error::{PipelineError, Result};
use crate::plan::family::{MicroConditioning, TextEncoding};
use crate::plan::{BaseModelPlan, GenerationPlan, Plan};
use crate::recipe::prompt_syntax::{
    empty_chunk, tokenize_prompt, PromptSyntax, TokenChunk, TokenizedPrompt,
};
use crate::run::base_model::BaseModel;
use crate::run::denoise::{Guidance, TextConditioning};

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

/// Which reading of a CLIP encoder a family takes.
#[derive(Clone, Copy)]
enum Reading<'a> {
    /// SD1.x / SD2.x: the final-layer-normed `hidden_states[-(clip_skip + 1)]`.
    Final(&'a ClipTextModel),
    /// SDXL's first encoder: `hidden_states[-(clip_skip + 2)]`, no final layer norm.
    Penultimate(&'a ClipTextModel),
    /// SDXL's second encoder: as the first, and the pooled, projected `text_embeds`.
    Pooled(&'a ClipTextModelWithProjection),
}

impl Reading<'_> {
    /// Hidden states `[B, 77, D]` of ids `[B, 77]`, and the pooled `[B, P]` of a pooled reading.
    fn run(&self, ids: &Tensor, clip_skip: usize) -> Result<(Tensor, Option<Tensor>)> {
        Ok(match self {
            Self::Final(model) => (model.encode(ids, clip_skip)?, None),
            Self::Penultimate(model) => (model.penultimate(ids, clip_skip)?, None),
            Self::Pooled(model) => {
                let (hidden, pooled) = model.encode_with_pooled(ids, clip_skip)?;
                (hidden, Some(pooled))
            }
        })
    }

    /// The encoding `[1, 77, D]` of the empty prompt's chunk `[BOS, EOS, pad, …]`.
    fn empty(
        &self,
        tokenizer: &ClipTokenizer,
        clip_skip: usize,
        device: &Device,
    ) -> Result<Tensor> {
        let chunk = empty_chunk(tokenizer);
        let ids = Tensor::from_vec(chunk.ids, (1, tokenizer.max_len()), device)?;
        Ok(self.run(&ids, clip_skip)?.0)
    }
}

/// One prompt through one encoder: the context `[1, 77·chunks, D]` and, for a pooled
/// reading, the first chunk's pooled output `[1, P]` (A1111's `zs[0].pooled`, ComfyUI's
/// `first_pooled`).
struct Encoded {
    context: Tensor,
    pooled: Option<Tensor>,
}

/// Encodes `prompt` read in `syntax`: every chunk through the encoder (one batch), then
/// weighted as the syntax says, then the chunks concatenated along the tokens. A prompt of
/// one chunk without weights is exactly diffusers' encoding.
fn encode_text(
    reading: Reading,
    tokenizer: &ClipTokenizer,
    prompt: &str,
    syntax: PromptSyntax,
    clip_skip: usize,
    device: &Device,
) -> Result<Encoded> {
    let tokenized = tokenize_prompt(tokenizer, prompt, syntax)
        .map_err(|e| PipelineError::Plan(format!("prompt {prompt:?}: {e}")))?;
    let chunks = &tokenized.chunks;
    let length = tokenizer.max_len();
    let ids: Vec<u32> = chunks.iter().flat_map(|c| c.ids.iter().copied()).collect();
    let ids = Tensor::from_vec(ids, (chunks.len(), length), device)?;
    let (hidden, pooled) = reading.run(&ids, clip_skip)?;
    let pooled = pooled.map(|p| p.narrow(0, 0, 1)).transpose()?;
    let hidden = if chunks.iter().all(TokenChunk::unweighted) {
        hidden
    } else {
        match syntax {
            PromptSyntax::A1111 => a1111_emphasis(&hidden, chunks)?,
            PromptSyntax::Comfy => comfy_weights(
                &hidden,
                chunks,
                &reading.empty(tokenizer, clip_skip, device)?,
            )?,
            PromptSyntax::Plain => hidden,
        }
    };
    let (count, tokens, width) = hidden.dims3()?;
    Ok(Encoded {
        context: hidden.reshape((1, count * tokens, width))?,
        pooled,
    })
}

/// Per-token weights `[1, 77, 1]` in f32 (A1111's `torch.asarray(multipliers)`).
fn weight_column(chunk: &TokenChunk, device: &Device) -> Result<Tensor> {
    let weights: Vec<f32> = chunk.weights.iter().map(|&w| w as f32).collect();
    let n = weights.len();
    Ok(Tensor::from_vec(weights, (1, n, 1), device)?)
}

/// The mean of all elements of an f32 tensor, summed in f64: the means of a context are small
/// (|mean| ~ 0.005 against elements ~ 1), so a plain f32 running sum would put errors of 1e-5
/// into their ratio; torch's pairwise summation does not.
fn mean(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F64)?.mean_all()?.to_dtype(DType::F32)?)
}

/// A1111's "Original" emphasis (`sd_emphasis.EmphasisOriginal`), chunk by chunk of
/// `hidden` `[chunks, 77, D]`: `z · w`, then rescaled so that the mean over the whole chunk
/// is what it was.
fn a1111_emphasis(hidden: &Tensor, chunks: &[TokenChunk]) -> Result<Tensor> {
    let dtype = hidden.dtype();
    let mut out = Vec::with_capacity(chunks.len());
    for (i, chunk) in chunks.iter().enumerate() {
        let z = hidden.narrow(0, i, 1)?;
        if chunk.unweighted() {
            out.push(z);
            continue;
        }
        let z = z.to_dtype(DType::F32)?;
        let original_mean = mean(&z)?;
        let weighted = z.broadcast_mul(&weight_column(chunk, hidden.device())?)?;
        let new_mean = mean(&weighted)?;
        let restored = weighted.broadcast_mul(&(original_mean / new_mean)?)?;
        out.push(restored.to_dtype(dtype)?);
    }
    Ok(Tensor::cat(&out, 0)?)
}

/// ComfyUI's `encode_token_weights`: every token of weight `w ≠ 1` becomes
/// `(z − z_empty) · w + z_empty`, with `z_empty` `[1, 77, D]` the empty prompt's encoding at
/// the same position; the others are kept as they are. No mean restoration.
fn comfy_weights(hidden: &Tensor, chunks: &[TokenChunk], empty: &Tensor) -> Result<Tensor> {
    let dtype = hidden.dtype();
    let empty = empty.to_dtype(DType::F32)?;
    let mut out = Vec::with_capacity(chunks.len());
    for (i, chunk) in chunks.iter().enumerate() {
        let z = hidden.narrow(0, i, 1)?;
        if chunk.unweighted() {
            out.push(z);
            continue;
        }
        let z = z.to_dtype(DType::F32)?;
        let w = weight_column(chunk, hidden.device())?;
        let moved = (z.broadcast_sub(&empty)?.broadcast_mul(&w)? + &empty)?;
        let changed: Vec<u8> = chunk.weights.iter().map(|&w| u8::from(w != 1.0)).collect();
        let n = changed.len();
        let changed =
            Tensor::from_vec(changed, (1, n, 1), hidden.device())?.broadcast_as(z.shape())?;
        out.push(changed.where_cond(&moved, &z)?.to_dtype(dtype)?);
    }
    Ok(Tensor::cat(&out, 0)?)
}

/// `context` `[1, T, D]` followed by copies of `filler` `[1, F, D]` up to `tokens` tokens
/// (A1111's `pad_cond_uncond`: `(tokens − T) div F` copies).
fn pad_with(context: Tensor, tokens: usize, filler: &Tensor) -> Result<Tensor> {
    let have = context.dim(1)?;
    let copies = tokens.saturating_sub(have) / filler.dim(1)?.max(1);
    if copies == 0 {
        return Ok(context);
    }
    let mut parts = vec![context];
    parts.extend(std::iter::repeat_n(
        filler.to_dtype(parts[0].dtype())?,
        copies,
    ));
    Ok(Tensor::cat(&parts, 1)?)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// `context` `[1, T, D]` repeated along the tokens to `tokens` (a multiple of T), as
/// ComfyUI's `CONDCrossAttn.concat` ("padding with repeat doesn't change result": attention
/// over repeated keys and values is the same attention).
fn repeat_to(context: Tensor, tokens: usize) -> Result<Tensor> {
    let have = context.dim(1)?.max(1);
    if tokens <= have {
        return Ok(context);
    }
    Ok(context.repeat((1, tokens / have, 1))?)
}

/// Brings the negative and positive contexts to the same token count: A1111 appends the
/// empty prompt's conditioning (`empty(for_positive)`) to the shorter one; ComfyUI repeats
/// each to the least common multiple.
fn equalize(
    uncond: Tensor,
    cond: Tensor,
    syntax: PromptSyntax,
    empty: impl Fn(bool) -> Result<Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (negative, positive) = (uncond.dim(1)?, cond.dim(1)?);
    if negative == positive {
        return Ok((uncond, cond));
    }
    if syntax == PromptSyntax::Comfy {
        let lcm = negative / gcd(negative, positive) * positive;
        return Ok((repeat_to(uncond, lcm)?, repeat_to(cond, lcm)?));
    }
    if negative < positive {
        Ok((pad_with(uncond, positive, &empty(false)?)?, cond))
    } else {
        Ok((uncond, pad_with(cond, negative, &empty(true)?)?))
    }
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

    /// The SD1.x / SD2.x text context `[1, 77·chunks, D]` of `prompt` read in `syntax`
    /// (`prompt_syntax.rs`): chunks of 75 tokens, weights applied as A1111 or ComfyUI do.
    pub fn encode_prompt_with(
        &self,
        prompt: &str,
        syntax: PromptSyntax,
        clip_skip: usize,
    ) -> Result<Tensor> {
        Ok(encode_text(
            Reading::Final(&self.text_encoder),
            &self.tokenizer,
            prompt,
            syntax,
            clip_skip,
            &self.device,
        )?
        .context)
    }

    /// SDXL's context `[1, 77, D1 + D2]` and pooled `text_embeds` `[1, P]` for `prompt` (first
    /// encoder) and `prompt_2` (second encoder), as diffusers' `encode_prompt`.
    pub fn encode_prompt_pair(
        &self,
        prompt: &str,
        prompt_2: &str,
        clip_skip: usize,
    ) -> Result<(Tensor, Tensor)> {
        self.encode_prompt_pair_with(prompt, prompt_2, PromptSyntax::Plain, clip_skip)
    }

    fn second_encoder(&self) -> Result<&SecondTextEncoder> {
        self.text_encoder_2.as_ref().ok_or_else(|| {
            PipelineError::Plan(
                "this base has no second text encoder (`text_encoder_2`)".to_string(),
            )
        })
    }

    /// SDXL's context `[1, 77·chunks, D1 + D2]` and pooled `text_embeds` `[1, P]` (of the
    /// second encoder's first chunk) for `prompt` and `prompt_2` read in `syntax`; each
    /// encoder is weighted on its own. When the two prompts make different numbers of chunks,
    /// the shorter encoder's context continues with its encoding of the empty prompt (as
    /// ComfyUI's `CLIPTextEncodeSDXL` pads the shorter token list).
    pub fn encode_prompt_pair_with(
        &self,
        prompt: &str,
        prompt_2: &str,
        syntax: PromptSyntax,
        clip_skip: usize,
    ) -> Result<(Tensor, Tensor)> {
        let second = self.second_encoder()?;
        let first_reading = Reading::Penultimate(&self.text_encoder);
        let second_reading = Reading::Pooled(&second.encoder);
        let first = encode_text(
            first_reading,
            &self.tokenizer,
            prompt,
            syntax,
            clip_skip,
            &self.device,
        )?;
        let other = encode_text(
            second_reading,
            &second.tokenizer,
            prompt_2,
            syntax,
            clip_skip,
            &self.device,
        )?;
        let pooled = other.pooled.ok_or_else(|| {
            PipelineError::Plan("the second text encoder gave no pooled output".to_string())
        })?;
        let tokens = first.context.dim(1)?.max(other.context.dim(1)?);
        let first_context = if first.context.dim(1)? < tokens {
            let empty = first_reading.empty(&self.tokenizer, clip_skip, &self.device)?;
            pad_with(first.context, tokens, &empty)?
        } else {
            first.context
        };
        let second_context = if other.context.dim(1)? < tokens {
            let empty = second_reading.empty(&second.tokenizer, clip_skip, &self.device)?;
            pad_with(other.context, tokens, &empty)?
        } else {
            other.context
        };
        Ok((Tensor::cat(&[first_context, second_context], 2)?, pooled))
    }

    /// The text conditioning of a generation as its family encodes it: the UNet context
    /// (`[uncond, cond]` under guidance, `[cond]` without) and, for SDXL, the added
    /// conditioning batched the same way. Prompts are read in the generation's
    /// `prompt_syntax`; a negative context shorter or longer than the positive one is brought
    /// to the same length as that syntax does ([`equalize`]).
    pub fn text_conditioning(
        &self,
        request: &GenerationPlan,
    ) -> Result<(TextConditioning, Option<AddedConditioning>)> {
        let guided = request.guidance > 1.0;
        let syntax = request.prompt_syntax;
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
                let clip_skip = request.clip_skip;
                let cond = self.encode_prompt_with(&request.prompt, syntax, clip_skip)?;
                let context = if guided {
                    let negative = request.negative_prompt.as_deref().unwrap_or("");
                    let uncond = self.encode_prompt_with(negative, syntax, clip_skip)?;
                    let (uncond, cond) = equalize(uncond, cond, syntax, |_| {
                        self.encode_prompt_with("", syntax, clip_skip)
                    })?;
                    batch(uncond, cond)?
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
                let (cond, pooled) = self.encode_prompt_pair_with(
                    &request.prompt,
                    prompt_2,
                    syntax,
                    request.clip_skip,
                )?;
                let (uncond, uncond_pooled) = if !guided {
                    (cond.clone(), pooled.clone())
                } else if request.negative_prompt.is_none() && self.force_zeros_for_empty_prompt {
                    (cond.zeros_like()?, pooled.zeros_like()?)
                } else {
                    let negative = request.negative_prompt.as_deref().unwrap_or("");
                    let negative_2 = or_else(request.negative_prompt_2.as_deref(), negative);
                    // diffusers encodes the negative prompts without clip skip.
                    self.encode_prompt_pair_with(negative, negative_2, syntax, 0)?
                };
                let (uncond, cond) = if guided {
                    equalize(uncond, cond, syntax, |positive| {
                        let clip_skip = if positive { request.clip_skip } else { 0 };
                        Ok(self.encode_prompt_pair_with("", "", syntax, clip_skip)?.0)
                    })?
                } else {
                    (uncond, cond)
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

/// The tokenizers a plan's base encodes prompts with, the plan's embeddings added as the run
/// adds them ([`BaseModel::add_embeddings`]): the first and, for two-encoder families, the
/// second.
fn plan_tokenizers(
    plan: &Plan,
    base: &BaseModelPlan,
) -> Result<(ClipTokenizer, Option<ClipTokenizer>)> {
    let mut first = base.folder.tokenizer()?;
    if base.kind.family().embeddings {
        for embedding in plan.embeddings.values() {
            if embedding.embedding.width() == base.text_encoder.hidden_size {
                first
                    .add_word(&embedding.embedding.tokens(&embedding.token))
                    .map_err(|e| {
                        PipelineError::Plan(format!("{}: {e}", embedding.file.display()))
                    })?;
            }
        }
    }
    let second = match base.text_encoder_2 {
        Some(_) => Some(base.folder.tokenizer_2()?),
        None => None,
    };
    Ok((first, second))
}

/// A weight as people write it: at most four decimals, no trailing zeros.
fn weight_text(weight: f64) -> String {
    let text = format!("{weight:.4}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    text.to_string()
}

/// One line on a prompt as read: its chunks and their token counts, the weighted spans.
fn describe_prompt(field: &str, tokenized: &TokenizedPrompt) -> String {
    let counts: Vec<String> = tokenized
        .chunks
        .iter()
        .map(|c| c.tokens.to_string())
        .collect();
    let chunks = tokenized.chunks.len();
    let mut line = format!(
        "{field} ({}): {chunks} chunk{} of {} token{}",
        tokenized.syntax.name(),
        if chunks == 1 { "" } else { "s" },
        counts.join(" + "),
        if counts.len() == 1 && counts[0] == "1" {
            ""
        } else {
            "s"
        }
    );
    let kept: usize = tokenized.chunks.iter().map(|c| c.tokens).sum();
    if tokenized.total_tokens > kept {
        line += &format!(
            " (of {}: the rest is cut, as diffusers does)",
            tokenized.total_tokens
        );
    }
    let mut spans = Vec::new();
    for piece in &tokenized.pieces {
        if piece.is_break() {
            spans.push("BREAK".to_string());
        } else if piece.weight != 1.0 && !piece.text.trim().is_empty() {
            let text = piece.text.trim();
            let shown: String = if text.chars().count() > 32 {
                text.chars().take(31).chain(['…']).collect()
            } else {
                text.to_string()
            };
            spans.push(format!("{shown:?} ×{}", weight_text(piece.weight)));
        }
    }
    if !spans.is_empty() {
        line += &format!("; {}", spans.join(", "));
    }
    line
}

/// What `validate` shows of a generation's prompts: per prompt, the syntax, the chunks with
/// their token counts, the weighted spans and `BREAK`s, and how a negative prompt of another
/// length is brought to the prompt's.
pub fn describe_prompts(plan: &Plan, generation: &GenerationPlan) -> Result<Vec<String>> {
    let base = plan.models.get(&generation.base).ok_or_else(|| {
        PipelineError::Plan(format!("no base model `{}` in the plan", generation.base))
    })?;
    let (first, second) = plan_tokenizers(plan, base)?;
    let syntax = generation.prompt_syntax;
    let read = |tokenizer: &ClipTokenizer, text: &str| {
        tokenize_prompt(tokenizer, text, syntax)
            .map_err(|e| PipelineError::Plan(format!("prompt {text:?}: {e}")))
    };
    let mut lines = Vec::new();
    let positive = read(&first, &generation.prompt)?;
    lines.push(describe_prompt("prompt", &positive));
    let mut positive_chunks = positive.chunks.len();
    if let (Some(second), Some(prompt_2)) = (&second, &generation.prompt_2) {
        let tokenized = read(second, or_else(Some(prompt_2), &generation.prompt))?;
        positive_chunks = positive_chunks.max(tokenized.chunks.len());
        lines.push(describe_prompt("prompt_2", &tokenized));
    }
    if generation.guidance <= 1.0 {
        return Ok(lines);
    }
    if second.is_some() && generation.negative_prompt.is_none() && base.force_zeros_for_empty_prompt
    {
        lines.push("negative_prompt: none (zero embeddings, as long as the prompt's)".to_string());
        return Ok(lines);
    }
    let negative_text = generation.negative_prompt.as_deref().unwrap_or("");
    let negative = read(&first, negative_text)?;
    lines.push(describe_prompt("negative_prompt", &negative));
    let mut negative_chunks = negative.chunks.len();
    if let (Some(second), Some(negative_2)) = (&second, &generation.negative_prompt_2) {
        let tokenized = read(second, or_else(Some(negative_2), negative_text))?;
        negative_chunks = negative_chunks.max(tokenized.chunks.len());
        lines.push(describe_prompt("negative_prompt_2", &tokenized));
    }
    if negative_chunks != positive_chunks {
        let (short, long, shorter) = if negative_chunks < positive_chunks {
            (negative_chunks, positive_chunks, "the negative prompt")
        } else {
            (positive_chunks, negative_chunks, "the prompt")
        };
        lines.push(match syntax {
            PromptSyntax::Comfy => {
                let lcm = short / gcd(short, long) * long;
                format!("both repeated to {lcm} chunks (ComfyUI: same attention)")
            }
            _ => format!(
                "{shorter} continues with {} chunk{} of the empty prompt's encoding, to {long}",
                long - short,
                if long - short == 1 { "" } else { "s" }
            ),
        });
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::{or_else, weight_text};

    #[test]
    fn weights_print_as_written() {
        assert_eq!(weight_text(1.5730000000000004), "1.573");
        assert_eq!(weight_text(1.0 / 1.1), "0.9091");
        assert_eq!(weight_text(1.2), "1.2");
        assert_eq!(weight_text(2.0), "2");
        assert_eq!(weight_text(-1.1), "-1.1");
    }

    #[test]
    fn second_prompts_fall_back_like_python_or() {
        assert_eq!(or_else(None, "a"), "a");
        assert_eq!(or_else(Some(""), "a"), "a");
        assert_eq!(or_else(Some("b"), "a"), "b");
    }
}
