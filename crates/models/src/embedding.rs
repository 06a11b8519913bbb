//! Textual-inversion embeddings: new words for a CLIP text encoder, one or more vectors each,
//! from the files people download: A1111 / original `.pt` (`string_to_param: {'*': [n, d]}`),
//! A1111 `.safetensors` (`emb_params`), diffusers `learned_embeds.safetensors` / `.bin`
//! (`{"<token>": [d]}`), and SDXL files (`clip_l` / `clip_g`: vectors for each text encoder).
//!
//! As diffusers' `load_textual_inversion`: a token `<t>` with n vectors becomes the tokenizer
//! tokens `<t>`, `<t>_1` … `<t>_{n-1}` (the prompt's `<t>` is expanded to all of them) with new
//! ids after the vocabulary, and the text encoder's token embedding gains those rows.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// The vectors of one embedding file, `[n, width]` in f32.
#[derive(Debug, Clone)]
pub struct TextualInversion {
    pub path: PathBuf,
    /// The vectors for the (first) text encoder; an SDXL file's `clip_l`.
    pub vectors: Tensor,
    /// An SDXL file's `clip_g`: the vectors for the second text encoder (OpenCLIP bigG).
    pub vectors_2: Option<Tensor>,
    /// The token a diffusers file stores its vectors under (`<cat-toy>`), which diffusers uses
    /// when no token is given.
    pub stored_token: Option<String>,
}

impl TextualInversion {
    pub fn open(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            ["learned_embeds.safetensors", "learned_embeds.bin"]
                .iter()
                .map(|f| path.join(f))
                .find(|f| f.is_file())
                .ok_or_else(|| ModelError::MissingWeights {
                    path: path.to_path_buf(),
                    looked_for: "learned_embeds.safetensors, learned_embeds.bin".into(),
                })?
        } else {
            path.to_path_buf()
        };
        let bad = |message: String| ModelError::Weights(format!("{}: {message}", file.display()));
        let is_safetensors = file.extension().is_some_and(|e| e == "safetensors");
        let tensors: Vec<(String, Tensor)> = if is_safetensors {
            let mut t: Vec<_> = candle_core::safetensors::load(&file, &Device::Cpu)
                .map_err(|e| bad(format!("not a readable safetensors file: {e}")))?
                .into_iter()
                .collect();
            t.sort_by(|a, b| a.0.cmp(&b.0));
            t
        } else {
            // A1111 / original: the vectors sit under `string_to_param`; diffusers `.bin`: at
            // the top level.
            let read = |key: Option<&str>| -> Option<Vec<(String, Tensor)>> {
                let pth = candle_core::pickle::PthTensors::new(&file, key).ok()?;
                let mut names: Vec<String> = pth.tensor_infos().keys().cloned().collect();
                names.sort();
                names
                    .into_iter()
                    .map(|n| Some((n.clone(), pth.get(&n).ok()??)))
                    .collect()
            };
            read(Some("string_to_param"))
                .filter(|t| !t.is_empty())
                .or_else(|| read(None))
                .ok_or_else(|| bad("not a readable PyTorch embedding file".into()))?
        };
        let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
        if names.contains(&"clip_l") || names.contains(&"clip_g") {
            // SDXL (A1111 / civitai): one tensor per text encoder, used as diffusers'
            // `load_textual_inversion(clip_l, text_encoder, tokenizer)` and
            // `load_textual_inversion(clip_g, text_encoder_2, tokenizer_2)`.
            let get = |name: &str| -> Result<Tensor> {
                let t = tensors
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, t)| t.clone())
                    .ok_or_else(|| {
                        bad(format!(
                            "an SDXL embedding needs both `clip_l` and `clip_g`; found {}",
                            names.join(", ")
                        ))
                    })?;
                let t = match t.rank() {
                    1 => t.unsqueeze(0)?,
                    2 => t,
                    r => {
                        return Err(bad(format!(
                            "`{name}` has rank {r}; expected [vectors, width]"
                        )))
                    }
                };
                Ok(t.to_dtype(DType::F32)?)
            };
            let (clip_l, clip_g) = (get("clip_l")?, get("clip_g")?);
            if clip_l.dims()[0] != clip_g.dims()[0] {
                return Err(bad(format!(
                    "`clip_l` has {} vectors and `clip_g` {}: an SDXL embedding needs the same count for both",
                    clip_l.dims()[0],
                    clip_g.dims()[0]
                )));
            }
            return Ok(Self {
                path: file,
                vectors: clip_l,
                vectors_2: Some(clip_g),
                stored_token: None,
            });
        }
        let stored_token = match tensors.as_slice() {
            [(name, _)] if name != "emb_params" && name != "*" => Some(name.clone()),
            _ => None,
        };
        let vectors = match tensors.as_slice() {
            [(_, t)] => t.clone(),
            _ => match tensors.iter().find(|(n, _)| n == "emb_params" || n == "*") {
                Some((_, t)) => t.clone(),
                None => {
                    return Err(bad(format!(
                        "not a textual-inversion file: expected one tensor, `emb_params` or \
                         `string_to_param`, found {}",
                        names.join(", ")
                    )))
                }
            },
        };
        let vectors = match vectors.rank() {
            1 => vectors.unsqueeze(0)?,
            2 => vectors,
            r => {
                return Err(bad(format!(
                    "embedding of rank {r}; expected [vectors, width]"
                )))
            }
        };
        Ok(Self {
            path: file,
            vectors: vectors.to_dtype(DType::F32)?,
            vectors_2: None,
            stored_token,
        })
    }

    /// How many vectors the word expands to.
    pub fn len(&self) -> usize {
        self.vectors.dims()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The text encoder width the vectors are for (an SDXL file: the first encoder's).
    pub fn width(&self) -> usize {
        self.vectors.dims()[1]
    }

    /// An SDXL file's second width (`clip_g`).
    pub fn width_2(&self) -> Option<usize> {
        self.vectors_2.as_ref().map(|v| v.dims()[1])
    }

    /// The widths as a reader would say them: `768`, or `clip_l 768 + clip_g 1280`.
    pub fn describe_widths(&self) -> String {
        match self.width_2() {
            Some(g) => format!("clip_l {} + clip_g {g}", self.width()),
            None => self.width().to_string(),
        }
    }

    /// The tokenizer tokens of `token`: `token`, `token_1`, … (diffusers' naming).
    pub fn tokens(&self, token: &str) -> Vec<String> {
        (0..self.len())
            .map(|i| {
                if i == 0 {
                    token.to_string()
                } else {
                    format!("{token}_{i}")
                }
            })
            .collect()
    }
}
