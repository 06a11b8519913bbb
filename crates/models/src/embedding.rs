//! Textual-inversion embeddings: new words for a CLIP text encoder, one or more vectors each,
//! from the files people download: A1111 / original `.pt` (`string_to_param: {'*': [n, d]}`),
//! A1111 `.safetensors` (`emb_params`), diffusers `learned_embeds.safetensors` / `.bin`
//! (`{"<token>": [d]}`). SDXL files (`clip_l` / `clip_g`) are recognised and refused for now.
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
    pub vectors: Tensor,
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
            return Err(bad(
                "an SDXL embedding (`clip_l` / `clip_g`); SDXL embeddings are not supported yet"
                    .into(),
            ));
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

    /// The text encoder width the vectors are for.
    pub fn width(&self) -> usize {
        self.vectors.dims()[1]
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
