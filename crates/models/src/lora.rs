//! LoRA-family weight patches: kohya / A1111 LoRA and LoCon, diffusers / peft LoRA, LyCORIS LoHa
//! and LoKr. A file becomes one update per module of the base's UNet or text encoder(s); the
//! updates of every LoRA of a generation are summed into one `ΔW` per weight and added to this
//! run's copy of the weights as they load ([`WeightPatches`], used by
//! [`crate::weights::WeightStore`]). The files on disk are never modified, and nothing runs per
//! step.
//!
//! Formulas (`reference-addons.md` I.2–I.5): LoRA `ΔW = up·down · alpha/r` (alpha missing: 1);
//! peft `ΔW = B·A · lora_alpha/r` (from the file's `lora_adapter_metadata`, else scale 1); LoHa
//! `ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/r`; LoKr `ΔW = kron(W1, W2) · alpha/dim` (both factors full:
//! scale 1). Every key of a file must land on a layer of the base: the others are an error that
//! lists them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

/// The part of the base model a module belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    TextEncoder,
    TextEncoder2,
}

impl Component {
    pub fn name(self) -> &'static str {
        match self {
            Component::Unet => "UNet",
            Component::TextEncoder => "text encoder",
            Component::TextEncoder2 => "text encoder 2",
        }
    }
}

/// How a file names and stores its updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraFormat {
    /// kohya / A1111: `lora_unet_…` / `lora_te_…` stems, `lora_down` / `lora_up` / `alpha`
    /// (LoCon for convolutions).
    Kohya,
    /// diffusers / peft (`save_lora_weights`): `unet.<module>.lora_A.weight` / `lora_B`.
    Peft,
    /// LyCORIS LoHa (`hada_w1_a` …).
    LoHa,
    /// LyCORIS LoKr (`lokr_w1` …).
    LoKr,
}

impl LoraFormat {
    pub fn describe(self) -> &'static str {
        match self {
            LoraFormat::Kohya => "kohya/A1111 LoRA",
            LoraFormat::Peft => "diffusers/peft LoRA",
            LoraFormat::LoHa => "LyCORIS LoHa",
            LoraFormat::LoKr => "LyCORIS LoKr",
        }
    }
}

/// One module's stored update.
#[derive(Debug, Clone)]
#[allow(clippy::enum_variant_names)] // the formats' own names
enum Update {
    LoRa {
        down: Tensor,
        up: Tensor,
    },
    LoHa {
        w1a: Tensor,
        w1b: Tensor,
        w2a: Tensor,
        w2b: Tensor,
    },
    LoKr {
        w1: Factor,
        w2: Factor,
    },
}

/// A LoKr factor: a full matrix (or 4-D kernel) or a product `a·b`.
#[derive(Debug, Clone)]
enum Factor {
    Full(Tensor),
    Product(Tensor, Tensor),
}

impl Factor {
    fn matrix(&self) -> candle_core::Result<Tensor> {
        match self {
            Factor::Full(t) => Ok(t.clone()),
            Factor::Product(a, b) => a.matmul(b),
        }
    }

    /// The rank of a product (`None` for a full factor).
    fn rank(&self) -> Option<usize> {
        match self {
            Factor::Full(_) => None,
            Factor::Product(_, b) => b.dims().first().copied(),
        }
    }
}

/// One module of the base model and the update a file makes to its weight.
#[derive(Debug, Clone)]
pub struct ModuleUpdate {
    pub component: Component,
    /// The base's tensor name, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight`.
    pub weight: String,
    update: Update,
    /// `alpha / rank` (or 1 where the format says so).
    scale: f64,
    /// DoRA (peft's `lora_magnitude_vector`, kohya's `dora_scale`): the magnitude per output
    /// channel the updated weight is renormalised to.
    magnitude: Option<Tensor>,
}

impl ModuleUpdate {
    /// `ΔW · scale` as an f32 tensor of `shape` (the base weight's).
    pub fn delta(&self, shape: &[usize]) -> Result<Tensor> {
        let out = shape.first().copied().unwrap_or(0);
        let cols: usize = shape.iter().skip(1).product();
        let flat = |t: &Tensor, rows: usize| -> candle_core::Result<Tensor> {
            let count = t.elem_count();
            t.reshape((rows, count / rows.max(1)))
        };
        // `up`-like factors must have `out` rows and `rank` columns, `down`-like ones `rank`
        // rows and the weight's other dimensions as columns.
        let check = |up: &Tensor, down: &Tensor| -> Result<usize> {
            let rank = down.dims().first().copied().unwrap_or(0);
            let fits = up.dims().first() == Some(&out)
                && up.elem_count() == out * rank
                && down.elem_count() == rank * cols;
            if fits {
                Ok(rank)
            } else {
                Err(self.mismatch(shape, &format!("{:?} · {:?}", up.dims(), down.dims())))
            }
        };
        let delta = match &self.update {
            Update::LoRa { down, up } => {
                let rank = check(up, down)?;
                flat(up, out)?.matmul(&flat(down, rank)?)?
            }
            Update::LoHa { w1a, w1b, w2a, w2b } => {
                let rank = check(w1a, w1b)?;
                check(w2a, w2b)?;
                let w1 = flat(w1a, out)?.matmul(&flat(w1b, rank)?)?;
                let w2 = flat(w2a, out)?.matmul(&flat(w2b, rank)?)?;
                (w1 * w2)?
            }
            Update::LoKr { w1, w2 } => {
                // kron(W1 [a, c], W2 [b, d·kk]): ΔW[i·b + p, j·d + q, kh, kw] = W1[i, j]·W2[p, q, kh, kw].
                let w1 = w1.matrix()?;
                let w2 = w2.matrix()?;
                let (a, c) = (w1.dim(0)?, w1.elem_count() / w1.dim(0)?.max(1));
                let b = w2.dim(0)?;
                let inputs = shape.get(1).copied().unwrap_or(0);
                let kk = cols / inputs.max(1);
                let d = inputs / c.max(1);
                if a * b != out || c * d != inputs || b * d * kk != w2.elem_count() {
                    return Err(
                        self.mismatch(shape, &format!("kron of [{a}, {c}] and {:?}", w2.dims()))
                    );
                }
                let w1 = w1.reshape((a, 1, c, 1, 1))?;
                let w2 = w2.reshape((1, b, 1, d, kk))?;
                w1.broadcast_mul(&w2)?.reshape((out, cols))?
            }
        };
        if delta.elem_count() != out * cols {
            return Err(self.mismatch(shape, &format!("{:?}", delta.dims())));
        }
        Ok((delta.reshape(shape)? * self.scale)?)
    }

    fn mismatch(&self, shape: &[usize], found: &str) -> ModelError {
        ModelError::Weights(format!(
            "LoRA update for {} `{}` has the shape {found}, the base weight is {shape:?}",
            self.component.name(),
            self.weight
        ))
    }
}

/// A LoRA-family file, read whole (LoRA files are megabytes, not gigabytes).
#[derive(Debug)]
pub struct LoraFile {
    pub path: PathBuf,
    pub format: LoraFormat,
    tensors: HashMap<String, Tensor>,
    /// peft's `lora_adapter_metadata` (`unet.r`, `unet.lora_alpha`, …), if the file has one.
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// The base's weight names of one component, as the LoRA resolves against them.
pub struct ComponentWeights<'a> {
    pub component: Component,
    /// Every tensor name of the component's weights (`….weight`, `….bias`, …).
    pub names: &'a [String],
    /// UNet: layers per down level, to place kohya stems named in the original (SGM / LDM)
    /// layout, as kohya writes SDXL LoRAs (`lora_unet_input_blocks_4_1_…`). Empty otherwise.
    pub layers_per_block: &'a [usize],
}

const KOHYA_TENSORS: [&str; 3] = ["lora_down.weight", "lora_up.weight", "alpha"];
const LOHA_TENSORS: [&str; 5] = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"];
const LOKR_TENSORS: [&str; 6] = [
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
];
const PEFT_SUFFIXES: [&str; 2] = [".lora_A.weight", ".lora_B.weight"];

impl LoraFile {
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let not_safetensors = |e: String| {
            ModelError::Weights(format!(
                "{}: not a readable safetensors LoRA file: {e}",
                path.display()
            ))
        };
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| not_safetensors(e.to_string()))?;
        let metadata = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("lora_adapter_metadata"))
            .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
            .and_then(|v| v.as_object().cloned());
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| not_safetensors(e.to_string()))?;
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
            .collect::<candle_core::Result<HashMap<_, _>>>()?;
        let format = detect_format(path, tensors.keys())?;
        Ok(Self {
            path: path.to_path_buf(),
            format,
            tensors,
            metadata,
        })
    }

    /// Which parts of a base the file touches, and its rank(s), for `inspect` and errors.
    pub fn summary(&self) -> LoraSummary {
        let mut components = BTreeSet::new();
        let mut ranks = BTreeSet::new();
        let mut cross_attention_width = None;
        for (key, t) in &self.tensors {
            if let Some((component, _)) = split_component(key) {
                components.insert(component);
            }
            let rank_holder = [
                "lora_down.weight",
                ".lora_A.weight",
                "hada_w1_b",
                "lokr_w2_b",
            ];
            let rank = if rank_holder.iter().any(|s| key.ends_with(s)) {
                t.dims().first().copied()
            } else {
                None
            };
            ranks.extend(rank);
            // The input width of a cross-attention key projection is the base's text width.
            let is_attn2_key = key.contains("attn2_to_k") || key.contains("attn2.to_k");
            if is_attn2_key
                && (key.ends_with("lora_down.weight") || key.ends_with(".lora_A.weight"))
            {
                cross_attention_width = t.dims().get(1).copied();
            }
        }
        LoraSummary {
            format: self.format,
            components: components.into_iter().collect(),
            ranks: ranks.into_iter().collect(),
            tensors: self.tensors.len(),
            cross_attention_width,
        }
    }

    /// The file's updates, each resolved to a weight of `bases`. Keys that match no layer
    /// are an error listing them.
    pub fn resolve(&self, bases: &[ComponentWeights]) -> Result<Vec<ModuleUpdate>> {
        // Group keys by (component, stem) and tensor.
        let mut groups: BTreeMap<(Component, String), BTreeMap<String, Tensor>> = BTreeMap::new();
        let mut unknown = Vec::new();
        for (key, tensor) in &self.tensors {
            match split_key(key, self.format) {
                Some((component, stem, part)) => {
                    groups
                        .entry((component, stem))
                        .or_default()
                        .insert(part, tensor.clone());
                }
                None => unknown.push(key.clone()),
            }
        }
        let mut updates = Vec::new();
        let mut unmatched = Vec::new();
        for ((component, stem), parts) in groups {
            let Some(base) = bases.iter().find(|b| b.component == component) else {
                unmatched.push(format!("{stem} ({} not in this base)", component.name()));
                continue;
            };
            let kohya = !matches!(self.format, LoraFormat::Peft);
            let module = find_module(&stem, base.names, self.format).or_else(|| {
                let original = (kohya && component == Component::Unet)
                    .then(|| diffusers_stem_of_original(&stem, base.layers_per_block))??;
                find_module(&original, base.names, self.format)
            });
            let Some(module) = module else {
                unmatched.push(stem);
                continue;
            };
            let (update, scale, magnitude) = self.update(&stem, &parts, &module, component)?;
            updates.push(ModuleUpdate {
                component,
                weight: format!("{module}.weight"),
                update,
                scale,
                magnitude,
            });
        }
        unknown.sort();
        unmatched.extend(unknown);
        if !unmatched.is_empty() {
            let shown: Vec<&str> = unmatched.iter().take(12).map(String::as_str).collect();
            return Err(ModelError::Weights(format!(
                "{}: {} of the {} file's modules match no layer of the base model: {}{}",
                self.path.display(),
                unmatched.len(),
                self.format.describe(),
                shown.join(", "),
                if unmatched.len() > shown.len() {
                    ", …"
                } else {
                    ""
                }
            )));
        }
        Ok(updates)
    }

    /// The update of one module and its `alpha / rank` scale.
    fn update(
        &self,
        stem: &str,
        parts: &BTreeMap<String, Tensor>,
        module: &str,
        component: Component,
    ) -> Result<(Update, f64, Option<Tensor>)> {
        let get = |name: &str| -> Result<Tensor> {
            parts.get(name).cloned().ok_or_else(|| {
                ModelError::Weights(format!(
                    "{}: module `{stem}` has no `{name}` tensor (it has {})",
                    self.path.display(),
                    parts.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            })
        };
        let refuse = |what: &str| {
            ModelError::Weights(format!(
                "{}: module `{stem}` uses {what}, which ipcompose does not apply yet",
                self.path.display()
            ))
        };
        for part in parts.keys() {
            // DoRA is applied as peft stores it (`lora_magnitude_vector`); kohya / LyCORIS
            // `dora_scale` tensors (other shapes and conventions) are refused.
            if part.contains("dora_scale")
                || (part.contains("lora_magnitude_vector") && self.format != LoraFormat::Peft)
            {
                return Err(refuse("DoRA in a kohya / LyCORIS file (`dora_scale`)"));
            }
            if part.starts_with("lora_mid")
                || part.starts_with("hada_t")
                || part.starts_with("lokr_t")
            {
                return Err(refuse("a Tucker decomposition"));
            }
            if part.contains("lora_B.bias") {
                return Err(refuse("a LoRA bias"));
            }
        }
        let alpha = match parts.get("alpha") {
            Some(t) => Some(
                t.to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?
                    .first()
                    .copied()
                    .unwrap_or(0.0),
            ),
            None => None,
        };
        match self.format {
            LoraFormat::Kohya | LoraFormat::Peft => {
                let (down, up) = if self.format == LoraFormat::Kohya {
                    (get("lora_down.weight")?, get("lora_up.weight")?)
                } else {
                    (get("lora_A.weight")?, get("lora_B.weight")?)
                };
                let rank = down.dim(0)?;
                let scale = if self.format == LoraFormat::Peft && alpha.is_none() {
                    self.peft_scale(component, module, rank)
                } else {
                    alpha_scale(alpha, rank)
                };
                let magnitude = parts
                    .get("lora_magnitude_vector")
                    .map(|m| m.to_dtype(DType::F32)?.flatten_all())
                    .transpose()?;
                Ok((Update::LoRa { down, up }, scale, magnitude))
            }
            LoraFormat::LoHa => {
                let w1b = get("hada_w1_b")?;
                let rank = w1b.dim(0)?;
                Ok((
                    Update::LoHa {
                        w1a: get("hada_w1_a")?,
                        w1b,
                        w2a: get("hada_w2_a")?,
                        w2b: get("hada_w2_b")?,
                    },
                    alpha_scale(alpha, rank),
                    None,
                ))
            }
            LoraFormat::LoKr => {
                let factor = |n: &str| -> Result<Factor> {
                    match parts.get(&format!("lokr_{n}")) {
                        Some(t) => Ok(Factor::Full(t.clone())),
                        None => Ok(Factor::Product(
                            get(&format!("lokr_{n}_a"))?,
                            get(&format!("lokr_{n}_b"))?,
                        )),
                    }
                };
                let (w1, w2) = (factor("w1")?, factor("w2")?);
                // The rank the loaders read: w2's first, else w1's; both full: alpha ignored.
                let scale = match (w2.rank().or(w1.rank()), alpha) {
                    (Some(dim), Some(alpha)) if dim > 0 => alpha / dim as f64,
                    _ => 1.0,
                };
                Ok((Update::LoKr { w1, w2 }, scale, None))
            }
        }
    }

    /// peft's `lora_alpha / r` for a module, from the file's metadata (`rank_pattern` and
    /// `alpha_pattern` as peft matches them, `use_rslora`); no metadata: 1, as diffusers.
    fn peft_scale(&self, component: Component, module: &str, rank: usize) -> f64 {
        let Some(meta) = &self.metadata else {
            return 1.0;
        };
        let prefix = match component {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        };
        let field = |name: &str| meta.get(&format!("{prefix}.{name}"));
        let pattern = |name: &str| -> Option<f64> {
            let map = field(name)?.as_object()?;
            map.iter().find_map(|(p, v)| {
                let re = regex::Regex::new(&format!(r"^(.*\.)?({p})$")).ok()?;
                if re.is_match(module) {
                    v.as_f64()
                } else {
                    None
                }
            })
        };
        let r = pattern("rank_pattern")
            .or_else(|| field("r").and_then(|v| v.as_f64()))
            .unwrap_or(rank as f64);
        let alpha = pattern("alpha_pattern")
            .or_else(|| field("lora_alpha").and_then(|v| v.as_f64()))
            .unwrap_or(r);
        let rslora = field("use_rslora")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        if rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

/// What a LoRA file holds, as `inspect` reports it.
#[derive(Debug, Clone)]
pub struct LoraSummary {
    pub format: LoraFormat,
    pub components: Vec<Component>,
    pub ranks: Vec<usize>,
    pub tensors: usize,
    /// The text width the UNet's cross-attention keys take (768 SD1.x, 1024 SD2.x, 2048 SDXL).
    pub cross_attention_width: Option<usize>,
}

impl LoraSummary {
    /// The base family the file fits, from its parts and widths.
    pub fn base(&self) -> String {
        if self.components.contains(&Component::TextEncoder2) {
            return "SDXL".to_string();
        }
        match self.cross_attention_width {
            Some(768) => "SD1.x".to_string(),
            Some(1024) => "SD2.x".to_string(),
            Some(2048) => "SDXL".to_string(),
            Some(width) => format!("a base of cross-attention width {width}"),
            None => {
                "a base it does not name (no cross-attention key layer in the file)".to_string()
            }
        }
    }
}

fn alpha_scale(alpha: Option<f64>, rank: usize) -> f64 {
    match alpha {
        Some(alpha) if alpha > 0.0 && rank > 0 => alpha / rank as f64,
        _ => 1.0,
    }
}

fn detect_format<'a>(path: &Path, keys: impl Iterator<Item = &'a String>) -> Result<LoraFormat> {
    let mut found = BTreeSet::new();
    let mut examples = Vec::new();
    for key in keys {
        let format = if key.contains(".hada_") {
            Some(LoraFormat::LoHa)
        } else if key.contains(".lokr_") {
            Some(LoraFormat::LoKr)
        } else if PEFT_SUFFIXES.iter().any(|s| key.ends_with(s)) {
            Some(LoraFormat::Peft)
        } else if key.starts_with("lora_")
            && (key.contains(".lora_down") || key.contains(".lora_up"))
        {
            Some(LoraFormat::Kohya)
        } else {
            None
        };
        match format {
            Some(f) => {
                found.insert(f as u8);
            }
            None if key.ends_with(".alpha") || key.ends_with(".dora_scale") => {}
            None => examples.push(key.clone()),
        }
    }
    let format = match found.iter().copied().collect::<Vec<_>>().as_slice() {
        [f] => [
            LoraFormat::Kohya,
            LoraFormat::Peft,
            LoraFormat::LoHa,
            LoraFormat::LoKr,
        ][*f as usize],
        [] => {
            examples.sort();
            examples.truncate(6);
            return Err(ModelError::Weights(format!(
                "{}: not a LoRA file ipcompose knows (kohya `lora_down`/`lora_up`, peft \
                 `lora_A`/`lora_B`, LyCORIS `hada_*`/`lokr_*`); its keys include {}",
                path.display(),
                examples.join(", ")
            )));
        }
        _ => {
            return Err(ModelError::Weights(format!(
                "{}: mixes LoRA formats in one file",
                path.display()
            )))
        }
    };
    Ok(format)
}

/// The component a key addresses, and the rest of the key after the component's prefix.
fn split_component(key: &str) -> Option<(Component, &str)> {
    for (prefix, component) in [
        ("lora_unet_", Component::Unet),
        ("lora_te1_", Component::TextEncoder),
        ("lora_te2_", Component::TextEncoder2),
        ("lora_te_", Component::TextEncoder),
        ("unet.", Component::Unet),
        ("text_encoder_2.", Component::TextEncoder2),
        ("text_encoder.", Component::TextEncoder),
    ] {
        if let Some(rest) = key.strip_prefix(prefix) {
            return Some((component, rest));
        }
    }
    None
}

/// (component, module stem, tensor part) of a key.
fn split_key(key: &str, format: LoraFormat) -> Option<(Component, String, String)> {
    let (component, rest) = split_component(key)?;
    if format == LoraFormat::Peft {
        for suffix in PEFT_SUFFIXES {
            if let Some(module) = rest.strip_suffix(suffix) {
                return Some((component, module.to_string(), suffix[1..].to_string()));
            }
        }
        let (module, part) = rest.rsplit_once('.')?;
        return Some((component, module.to_string(), part.to_string()));
    }
    // kohya-named stems have no dots: the first dot starts the tensor's name.
    let (stem, part) = rest.split_once('.')?;
    let known = KOHYA_TENSORS.contains(&part)
        || LOHA_TENSORS.contains(&part)
        || LOKR_TENSORS.contains(&part)
        || part.starts_with("lora_mid")
        || part.starts_with("hada_t")
        || part.starts_with("lokr_t")
        || part == "dora_scale";
    known.then(|| (component, stem.to_string(), part.to_string()))
}

/// The base module (dotted path) a stem names, found among the component's weight names.
/// kohya stems are module paths with dots as underscores (ambiguous to split, so matched
/// against the base's own names, as A1111 does); peft stems are the paths themselves. Text
/// encoder paths may come with or without transformers' `text_model.` prefix.
fn find_module(stem: &str, names: &[String], format: LoraFormat) -> Option<String> {
    let modules = names.iter().filter_map(|n| n.strip_suffix(".weight"));
    let kohya = !matches!(format, LoraFormat::Peft);
    for module in modules {
        let candidates = [module, module.strip_prefix("text_model.").unwrap_or(module)];
        let hit = candidates.iter().any(|m| {
            if kohya {
                m.len() == stem.len() && m.replace('.', "_") == stem
            } else {
                *m == stem
            }
        });
        if hit {
            return Some(module.to_string());
        }
    }
    None
}

/// A kohya UNet stem in the original layout's names (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`,
/// `output_blocks_2_0_in_layers_2`, `middle_block_1_proj_in`, `label_emb_0_0`), as kohya
/// names SDXL LoRAs, turned into a kohya stem in diffusers' names
/// (`down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`), by the single-file
/// renaming (diffusers' `_maybe_map_sgm_blocks_to_diffusers` does the same).
fn diffusers_stem_of_original(stem: &str, layers_per_block: &[usize]) -> Option<String> {
    const TOP_LEVEL: [&str; 6] = [
        "time_embed.0",
        "time_embed.2",
        "label_emb.0.0",
        "label_emb.0.2",
        "out.0",
        "out.2",
    ];
    if let Some(module) = TOP_LEVEL.iter().find(|m| m.replace('.', "_") == stem) {
        let renamed = crate::single_file::unet_key_from_original(
            &format!("{module}.weight"),
            layers_per_block,
        )?;
        return Some(renamed.strip_suffix(".weight")?.replace('.', "_"));
    }
    // The block and its two indices (or the one of the middle block), then the module inside.
    let (head, rest) = if let Some(tail) = stem.strip_prefix("middle_block_") {
        let (j, rest) = tail.split_once('_')?;
        (format!("middle_block.{}", j.parse::<usize>().ok()?), rest)
    } else {
        let block = ["input_blocks", "output_blocks"]
            .into_iter()
            .find(|b| stem.starts_with(&format!("{b}_")))?;
        let tail = &stem[block.len() + 1..];
        let (i, tail) = tail.split_once('_')?;
        let (j, rest) = tail.split_once('_').unwrap_or((tail, ""));
        (
            format!(
                "{block}.{}.{}",
                i.parse::<usize>().ok()?,
                j.parse::<usize>().ok()?
            ),
            rest,
        )
    };
    // Inside a block, only resnet layers have dotted original names (`in_layers.2`); the
    // attention and sampler paths are kept as kohya wrote them and compared underscored.
    const DOTTED: [&str; 5] = [
        "in_layers.0",
        "in_layers.2",
        "emb_layers.1",
        "out_layers.0",
        "out_layers.3",
    ];
    let rest = DOTTED
        .iter()
        .find(|d| d.replace('.', "_") == rest)
        .map_or_else(|| rest.to_string(), |d| d.to_string());
    let key = if rest.is_empty() {
        format!("{head}.weight")
    } else {
        format!("{head}.{rest}.weight")
    };
    let renamed = crate::single_file::unet_key_from_original(&key, layers_per_block)?;
    Some(renamed.strip_suffix(".weight")?.replace('.', "_"))
}

/// The summed `ΔW` of every LoRA of a generation for one component, by weight name, added to
/// the weights as they load.
#[derive(Debug, Clone, Default)]
pub struct WeightPatches {
    /// Summed `scale · ΔW` of the plain updates, by weight name.
    deltas: HashMap<String, Tensor>,
    /// DoRA updates by weight name: (magnitude `[out]`, `scale · ΔW`), each renormalised against
    /// the base weight when it loads (the weight is needed, so this cannot be summed ahead).
    dora: HashMap<String, Vec<(Tensor, Tensor)>>,
}

impl WeightPatches {
    /// Sums `scale · ΔW` of every update; `shape_of` gives the base weight's shape.
    pub fn build(
        loras: &[(Vec<ModuleUpdate>, f64)],
        component: Component,
        shape_of: impl Fn(&str) -> Option<Vec<usize>>,
    ) -> Result<Self> {
        let mut deltas: HashMap<String, Tensor> = HashMap::new();
        let mut dora: HashMap<String, Vec<(Tensor, Tensor)>> = HashMap::new();
        for (updates, scale) in loras {
            for update in updates.iter().filter(|u| u.component == component) {
                let shape = shape_of(&update.weight).ok_or_else(|| {
                    ModelError::Weights(format!(
                        "LoRA update for {} `{}`: the base has no such weight",
                        component.name(),
                        update.weight
                    ))
                })?;
                let delta = (update.delta(&shape)? * *scale)?;
                if let Some(magnitude) = &update.magnitude {
                    let out = shape.first().copied().unwrap_or(0);
                    if magnitude.elem_count() != out {
                        return Err(update.mismatch(
                            &shape,
                            &format!("a DoRA magnitude of {:?}", magnitude.dims()),
                        ));
                    }
                    dora.entry(update.weight.clone())
                        .or_default()
                        .push((magnitude.clone(), delta));
                    continue;
                }
                let summed = match deltas.remove(&update.weight) {
                    Some(previous) => (previous + delta)?,
                    None => delta,
                };
                deltas.insert(update.weight.clone(), summed);
            }
        }
        Ok(Self { deltas, dora })
    }

    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty() && self.dora.is_empty()
    }

    /// The patched weight in f32 when the weight is patched (the caller converts to the
    /// model's dtype once), `weight` unchanged otherwise: `W + ΣΔW`, plus for each DoRA
    /// update, as peft computes it against the base weight `W`,
    /// `(m / ‖W + ΔW‖ − 1) · W + (m / ‖W + ΔW‖) · ΔW` (row norms over each output channel).
    pub fn apply(&self, name: &str, weight: Tensor) -> candle_core::Result<Tensor> {
        let delta = self.deltas.get(name);
        let dora = self.dora.get(name);
        if delta.is_none() && dora.is_none() {
            return Ok(weight);
        }
        let base = weight.to_dtype(DType::F32)?;
        let mut patched = match delta {
            Some(delta) => (&base + delta.to_device(base.device())?)?,
            None => base.clone(),
        };
        for (magnitude, delta) in dora.into_iter().flatten() {
            let dims = base.dims().to_vec();
            let out = dims.first().copied().unwrap_or(1);
            let delta = delta.to_device(base.device())?;
            let rows = (&base + &delta)?.reshape((out, ()))?;
            let norm = rows.sqr()?.sum_keepdim(1)?.sqrt()?;
            let factor = magnitude
                .to_device(base.device())?
                .reshape((out, 1))?
                .div(&norm)?;
            let mut shape = vec![out];
            shape.extend(std::iter::repeat_n(1, dims.len().saturating_sub(1)));
            let factor = factor.reshape(shape)?;
            let scaled_base = base.broadcast_mul(&(&factor - 1.0)?)?;
            let scaled_delta = delta.broadcast_mul(&factor)?;
            patched = ((patched + scaled_base)? + scaled_delta)?;
        }
        Ok(patched)
    }

    /// The same patches under other names (a single-file checkpoint's own names); weights
    /// `rename` has no name for are dropped.
    pub fn renamed(&self, rename: impl Fn(&str) -> Option<String>) -> Self {
        Self {
            deltas: self
                .deltas
                .iter()
                .filter_map(|(k, v)| Some((rename(k)?, v.clone())))
                .collect(),
            dora: self
                .dora
                .iter()
                .filter_map(|(k, v)| Some((rename(k)?, v.clone())))
                .collect(),
        }
    }

    /// How many weights are patched.
    pub fn len(&self) -> usize {
        self.deltas.len()
            + self
                .dora
                .keys()
                .filter(|k| !self.deltas.contains_key(*k))
                .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], values: Vec<f32>) -> Tensor {
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn kohya_stems_resolve_against_the_base_names() {
        let names = vec![
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight".to_string(),
            "down_blocks.0.attentions.0.proj_in.weight".to_string(),
        ];
        assert_eq!(
            find_module(
                "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                &names,
                LoraFormat::Kohya
            )
            .as_deref(),
            Some("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
        );
        let te = vec!["text_model.encoder.layers.0.mlp.fc1.weight".to_string()];
        for stem in [
            "text_model_encoder_layers_0_mlp_fc1",
            "encoder_layers_0_mlp_fc1",
        ] {
            assert!(
                find_module(stem, &te, LoraFormat::Kohya).is_some(),
                "{stem}"
            );
        }
        assert!(find_module("encoder.layers.0.mlp.fc1", &te, LoraFormat::Peft).is_some());
        assert!(find_module("down_blocks_9_x", &names, LoraFormat::Kohya).is_none());
    }

    #[test]
    fn kohya_sdxl_stems_in_the_original_layout_find_diffusers_modules() {
        // SDXL: three levels of two layers.
        let lpb = [2, 2, 2];
        let cases = [
            (
                "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
            ),
            (
                "input_blocks_1_0_in_layers_2",
                "down_blocks_0_resnets_0_conv1",
            ),
            ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
            ("middle_block_1_proj_in", "mid_block_attentions_0_proj_in"),
            (
                "middle_block_2_emb_layers_1",
                "mid_block_resnets_1_time_emb_proj",
            ),
            (
                "output_blocks_0_0_skip_connection",
                "up_blocks_0_resnets_0_conv_shortcut",
            ),
            ("output_blocks_2_2_conv", "up_blocks_0_upsamplers_0_conv"),
            ("label_emb_0_0", "add_embedding_linear_1"),
        ];
        for (stem, expected) in cases {
            assert_eq!(
                diffusers_stem_of_original(stem, &lpb).as_deref(),
                Some(expected),
                "{stem}"
            );
        }
        assert_eq!(
            diffusers_stem_of_original("down_blocks_0_resnets_0_conv1", &lpb),
            None
        );
    }

    #[test]
    fn dora_renormalises_each_output_row_to_its_magnitude() {
        // W = [[3, 0], [0, 1]], ΔW = [[1, 0], [0, 1]] (up [[1], [1]] · down [[1, 1]] would mix;
        // use rank 2 as identity), m = [2, 4]: rows of W + ΔW are [4, 0] and [0, 2] (norms 4, 2),
        // so the weight becomes [[2, 0], [0, 4]].
        let update = ModuleUpdate {
            component: Component::Unet,
            weight: "w.weight".into(),
            update: Update::LoRa {
                down: t(&[2, 2], vec![1.0, 0.0, 0.0, 1.0]),
                up: t(&[2, 2], vec![1.0, 0.0, 0.0, 1.0]),
            },
            scale: 1.0,
            magnitude: Some(t(&[2], vec![2.0, 4.0])),
        };
        let patches = WeightPatches::build(&[(vec![update], 1.0)], Component::Unet, |_| {
            Some(vec![2, 2])
        })
        .unwrap();
        let w = patches
            .apply("w.weight", t(&[2, 2], vec![3.0, 0.0, 0.0, 1.0]))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(w, vec![2.0, 0.0, 0.0, 4.0]);
        assert_eq!(patches.len(), 1);
    }

    #[test]
    fn lokr_delta_is_the_kronecker_product() {
        // W1 = [[1, 2]], W2 = [[1], [10]] -> kron = [[1, 2], [10, 20]] (out 2 = 1·2, in 2 = 2·1).
        let update = ModuleUpdate {
            component: Component::Unet,
            weight: "w".into(),
            update: Update::LoKr {
                w1: Factor::Full(t(&[1, 2], vec![1.0, 2.0])),
                w2: Factor::Full(t(&[2, 1], vec![1.0, 10.0])),
            },
            scale: 0.5,
            magnitude: None,
        };
        let d = update
            .delta(&[2, 2])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(d, vec![0.5, 1.0, 5.0, 10.0]);
    }

    #[test]
    fn lora_delta_of_a_conv_is_up_times_flattened_down() {
        // up [2, 1, 1, 1], down [1, 1, 2, 1]: ΔW[o, 0, kh, 0] = up[o] · down[kh].
        let update = ModuleUpdate {
            component: Component::Unet,
            weight: "w".into(),
            update: Update::LoRa {
                down: t(&[1, 1, 2, 1], vec![1.0, 2.0]),
                up: t(&[2, 1, 1, 1], vec![3.0, 4.0]),
            },
            scale: 1.0,
            magnitude: None,
        };
        let d = update
            .delta(&[2, 1, 2, 1])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(d, vec![3.0, 6.0, 4.0, 8.0]);
        assert!(update.delta(&[3, 1, 2, 1]).is_err());
    }
}
