//! Original (CompVis / LDM) single-file checkpoints read under diffusers' names.
//!
//! The renames are tables of module paths plus the index arithmetic that places each
//! `input_blocks.{i}` / `output_blocks.{i}` in diffusers' down and up blocks (reference doc,
//! sections C.4 and E.1). The tensors themselves are used as stored: for the UNet and ControlNet
//! no reshape is needed. [`RenamedWeights`] serves a file under the new names, so a model is
//! built with the same `new(vb, &cfg)` as from a diffusers folder.

use std::collections::HashMap;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::weights::WeightStore;

/// Prefix of the UNet's tensors in a full Stable Diffusion checkpoint.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// Prefix of a ControlNet's tensors in the original `control_*.pth` files.
pub const CONTROLNET_PREFIX: &str = "control_model.";

/// A rename table row: an original module path and its diffusers name. `{i}` stands for a
/// number carried over unchanged.
type Rename = (&'static str, &'static str);

/// Inside a resnet: LDM `ResBlock` → diffusers `ResnetBlock2D`.
const RESNET_RENAMES: &[Rename] = &[
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
];

/// UNet modules outside the numbered blocks.
const UNET_RENAMES: &[Rename] = &[
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("input_blocks.0.0", "conv_in"),
    ("out.0", "conv_norm_out"),
    ("out.2", "conv_out"),
    ("label_emb.0.0", "add_embedding.linear_1"),
    ("label_emb.0.2", "add_embedding.linear_2"),
];

/// The mid block: two resnets around one transformer.
const MIDDLE_BLOCK_RENAMES: &[Rename] = &[
    ("middle_block.0", "mid_block.resnets.0"),
    ("middle_block.1", "mid_block.attentions.0"),
    ("middle_block.2", "mid_block.resnets.1"),
];

/// ControlNet's own modules (the hint block is numbered by the file, see
/// [`controlnet_key_from_original`]).
const CONTROLNET_RENAMES: &[Rename] = &[
    ("zero_convs.{i}.0", "controlnet_down_blocks.{i}"),
    ("middle_block_out.0", "controlnet_mid_block"),
];

/// Matches the module path `pattern` at the start of `key`, on a `.` boundary. Returns the
/// number `{i}` stood for (if any) and the rest of the key, starting with its `.`.
fn match_module<'k>(key: &'k str, pattern: &str) -> Option<(Option<usize>, &'k str)> {
    let (index, rest) = match pattern.split_once("{i}") {
        None => (None, key.strip_prefix(pattern)?),
        Some((before, after)) => {
            let tail = key.strip_prefix(before)?;
            let digits = tail
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(tail.len());
            let index = tail[..digits].parse().ok()?;
            (Some(index), tail[digits..].strip_prefix(after)?)
        }
    };
    (rest.is_empty() || rest.starts_with('.')).then_some((index, rest))
}

/// Applies the first matching row of `table` to `key`.
fn rename_with(key: &str, table: &[Rename]) -> Option<String> {
    table.iter().find_map(|(from, to)| {
        let (index, rest) = match_module(key, from)?;
        let to = match index {
            Some(i) => to.replace("{i}", &i.to_string()),
            None => (*to).to_string(),
        };
        Some(format!("{to}{rest}"))
    })
}

/// `rest` of a resnet key (starting with `.`) in diffusers' names.
fn resnet_rest(rest: &str) -> Option<String> {
    rename_with(rest.strip_prefix('.')?, RESNET_RENAMES).map(|r| format!(".{r}"))
}

/// Splits `"{i}.{j}.rest"` into `(i, j, ".rest")`.
fn two_indices(key: &str) -> Option<(usize, usize, &str)> {
    let (i, tail) = key.split_once('.')?;
    let (j, rest) = tail.split_once('.')?;
    Some((i.parse().ok()?, j.parse().ok()?, rest))
}

/// Where one `input_blocks.{i}` of the original layout sits in diffusers' encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InputSlot {
    ConvIn,
    Layer { block: usize, layer: usize },
    Downsampler { block: usize },
}

/// Input blocks run `conv_in`, then per level its layers and (except the last level) its
/// downsampler.
fn input_slot(i: usize, layers_per_block: &[usize]) -> Option<InputSlot> {
    if i == 0 {
        return Some(InputSlot::ConvIn);
    }
    let mut next = 1;
    for (block, &layers) in layers_per_block.iter().enumerate() {
        if i < next + layers {
            return Some(InputSlot::Layer {
                block,
                layer: i - next,
            });
        }
        next += layers;
        if block + 1 < layers_per_block.len() {
            if i == next {
                return Some(InputSlot::Downsampler { block });
            }
            next += 1;
        }
    }
    None
}

/// Output blocks run per up level (the down levels reversed) one more layer than the
/// matching down level; the upsampler lives in the level's last output block.
fn output_slot(i: usize, layers_per_block: &[usize]) -> Option<(usize, usize)> {
    let mut next = 0;
    for (block, &layers) in layers_per_block.iter().rev().enumerate() {
        if i < next + layers + 1 {
            return Some((block, i - next));
        }
        next += layers + 1;
    }
    None
}

/// The diffusers name of a UNet tensor in the original layout (prefix already stripped), or
/// `None` for keys that are not part of the UNet. `layers_per_block` is per down level.
pub fn unet_key_from_original(key: &str, layers_per_block: &[usize]) -> Option<String> {
    if let Some(renamed) = rename_with(key, UNET_RENAMES) {
        return Some(renamed);
    }
    if let Some(tail) = key.strip_prefix("input_blocks.") {
        let (i, j, rest) = two_indices(tail)?;
        return match (input_slot(i, layers_per_block)?, j) {
            (InputSlot::Layer { block, layer }, 0) => Some(format!(
                "down_blocks.{block}.resnets.{layer}{}",
                resnet_rest(&format!(".{rest}"))?
            )),
            (InputSlot::Layer { block, layer }, 1) => {
                Some(format!("down_blocks.{block}.attentions.{layer}.{rest}"))
            }
            (InputSlot::Downsampler { block }, 0) => {
                let param = rest.strip_prefix("op.")?;
                Some(format!("down_blocks.{block}.downsamplers.0.conv.{param}"))
            }
            _ => None,
        };
    }
    if key.starts_with("middle_block.") {
        let renamed = rename_with(key, MIDDLE_BLOCK_RENAMES)?;
        // The two resnets also rename their inner modules.
        return match renamed.strip_prefix("mid_block.resnets.") {
            Some(tail) => {
                let (index, rest) = tail.split_once('.')?;
                Some(format!(
                    "mid_block.resnets.{index}{}",
                    resnet_rest(&format!(".{rest}"))?
                ))
            }
            None => Some(renamed),
        };
    }
    if let Some(tail) = key.strip_prefix("output_blocks.") {
        let (i, j, rest) = two_indices(tail)?;
        let (block, layer) = output_slot(i, layers_per_block)?;
        return match j {
            0 => Some(format!(
                "up_blocks.{block}.resnets.{layer}{}",
                resnet_rest(&format!(".{rest}"))?
            )),
            // A level without attention has its upsampler second, one with attention third.
            1 if rest.starts_with("conv.") => {
                Some(format!("up_blocks.{block}.upsamplers.0.{rest}"))
            }
            1 => Some(format!("up_blocks.{block}.attentions.{layer}.{rest}")),
            2 => Some(format!("up_blocks.{block}.upsamplers.0.{rest}")),
            _ => None,
        };
    }
    None
}

/// The diffusers name of a ControlNet tensor in the original layout (`control_model.`
/// stripped), or `None` for keys a ControlNet does not have.
///
/// `hint_convs` are the indices of the convolutions in the file's `input_hint_block`
/// (`0, 2, …, 14` in every released file: the odd entries are parameter-free SiLUs): the
/// first is `conv_in`, the last `conv_out`, those between are `blocks.{0..}` in order.
pub fn controlnet_key_from_original(
    key: &str,
    layers_per_block: &[usize],
    hint_convs: &[usize],
) -> Option<String> {
    if let Some(renamed) = rename_with(key, CONTROLNET_RENAMES) {
        return Some(renamed);
    }
    if let Some((Some(index), rest)) = match_module(key, "input_hint_block.{i}") {
        let position = hint_convs.iter().position(|&h| h == index)?;
        let module = if position == 0 {
            "conv_in".to_string()
        } else if position + 1 == hint_convs.len() {
            "conv_out".to_string()
        } else {
            format!("blocks.{}", position - 1)
        };
        return Some(format!("controlnet_cond_embedding.{module}{rest}"));
    }
    // A ControlNet is the encoder half only: no output blocks, no final norm/conv.
    if key.starts_with("output_blocks.") || key.starts_with("out.") {
        return None;
    }
    unet_key_from_original(key, layers_per_block)
}

/// Layers per down level of an original-layout encoder, from the number of `input_blocks` and
/// the indices of those that are downsamplers (`input_blocks.{i}.0.op`). `None` if they do
/// not describe levels of at least one layer each.
pub fn layers_per_block_from_input_blocks(
    input_blocks: usize,
    downsamplers: &[usize],
) -> Option<Vec<usize>> {
    let mut layers = Vec::with_capacity(downsamplers.len() + 1);
    let mut level_start = 1;
    for &d in downsamplers {
        if d <= level_start {
            return None;
        }
        layers.push(d - level_start);
        level_start = d + 1;
    }
    if input_blocks <= level_start {
        return None;
    }
    layers.push(input_blocks - level_start);
    Some(layers)
}

/// The distinct numbers `n` of keys starting with `prefix` followed by `n.`, sorted.
pub fn numbered_children<'a>(names: impl IntoIterator<Item = &'a str>, prefix: &str) -> Vec<usize> {
    let mut found: Vec<usize> = names
        .into_iter()
        .filter_map(|name| {
            let tail = name.strip_prefix(prefix)?;
            tail.split_once('.')?.0.parse().ok()
        })
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

/// How a tensor of the file becomes the tensor a model asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// As stored.
    AsIs,
    /// Part `part` of `parts` equal slices along the first axis: one of q, k, v of a fused
    /// projection (OpenCLIP's `in_proj_weight` / `in_proj_bias`).
    Chunk { part: usize, parts: usize },
    /// The transpose of a matrix (OpenCLIP's `text_projection`, used as `x @ P`, where
    /// transformers stores the `Linear` weight `Pᵀ`).
    Transpose,
}

impl Transform {
    /// The shape the transform gives a stored tensor of shape `dims`; `None` if it cannot apply.
    pub fn shape(self, dims: &[usize]) -> Option<Vec<usize>> {
        match self {
            Self::AsIs => Some(dims.to_vec()),
            Self::Chunk { parts, .. } => {
                let (&first, rest) = dims.split_first()?;
                (parts > 0 && first.is_multiple_of(parts)).then(|| {
                    let mut out = vec![first / parts];
                    out.extend_from_slice(rest);
                    out
                })
            }
            Self::Transpose => (dims.len() == 2).then(|| vec![dims[1], dims[0]]),
        }
    }

    fn apply(self, tensor: Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::AsIs => Ok(tensor),
            Self::Chunk { part, parts } => {
                let len = tensor.dim(0)? / parts;
                tensor.narrow(0, part * len, len)?.contiguous()
            }
            Self::Transpose => tensor.t()?.contiguous(),
        }
    }
}

/// A weight store read under other names: models ask for diffusers names and get the file's
/// tensors (sliced or transposed where the layouts differ). Errors name the file and both
/// names.
pub struct RenamedWeights {
    store: WeightStore,
    /// diffusers name → name in the file.
    to_original: HashMap<String, String>,
    /// diffusers name → how its file tensor is reshaped (absent: as stored).
    transforms: HashMap<String, Transform>,
    /// LoRA updates keyed by diffusers names, added after the transform.
    patches: Option<std::sync::Arc<crate::lora::WeightPatches>>,
}

impl RenamedWeights {
    /// `to_original` maps each diffusers name to the file's name for it.
    pub fn new(store: WeightStore, to_original: HashMap<String, String>) -> Self {
        Self {
            store,
            to_original,
            transforms: HashMap::new(),
            patches: None,
        }
    }

    /// Like [`RenamedWeights::new`], each diffusers name with its file name and transform.
    pub fn with_transforms(store: WeightStore, map: HashMap<String, (String, Transform)>) -> Self {
        let mut to_original = HashMap::with_capacity(map.len());
        let mut transforms = HashMap::new();
        for (name, (original, transform)) in map {
            if transform != Transform::AsIs {
                transforms.insert(name.clone(), transform);
            }
            to_original.insert(name, original);
        }
        Self {
            store,
            to_original,
            transforms,
            patches: None,
        }
    }

    /// The same tensors with LoRA `patches` (keyed by diffusers names) added as they load.
    pub fn with_patches(
        mut self,
        patches: Option<std::sync::Arc<crate::lora::WeightPatches>>,
    ) -> Self {
        self.patches = patches.filter(|p| !p.is_empty());
        self
    }

    /// The file's name for a diffusers name.
    pub fn original_name(&self, name: &str) -> Option<&str> {
        self.to_original.get(name).map(String::as_str)
    }

    fn transform(&self, name: &str) -> Transform {
        self.transforms
            .get(name)
            .copied()
            .unwrap_or(Transform::AsIs)
    }

    /// The shape of the tensor a diffusers name maps to (no data is loaded).
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.transform(name)
            .shape(&self.store.shape(self.original_name(name)?)?)
    }

    /// Every diffusers name the file provides.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.to_original.keys().map(String::as_str)
    }

    fn files(&self) -> String {
        self.store
            .files()
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A `VarBuilder` over the renamed tensors; they are converted to `dtype` on load.
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

impl SimpleBackend for RenamedWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut tensor = self.get_unchecked(name, dtype, dev)?;
        // Original VAE attention projections are 1×1 convolutions ([C, C, 1, 1]) where
        // diffusers has linear layers ([C, C]): the same numbers, one reshape.
        let squeezable = tensor.dims().len() > shape.dims().len()
            && tensor.dims()[shape.dims().len()..].iter().all(|&d| d == 1)
            && tensor.dims()[..shape.dims().len()] == *shape.dims();
        if squeezable {
            tensor = tensor.reshape(shape.clone())?;
        }
        if tensor.shape() != &shape {
            return Err(candle_core::Error::Msg(format!(
                "{}: tensor `{}` (read as `{name}`) has shape {:?}, but the config expects {:?}",
                self.files(),
                self.original_name(name).unwrap_or(name),
                tensor.dims(),
                shape.dims()
            )));
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.original_name(name) {
            Some(original) => {
                // Read as stored; the transform and any patch work on the file's values and the
                // result is converted once.
                let stored = self.store.dtype(original).unwrap_or(dtype);
                let tensor = self.store.get_unchecked(original, stored, dev)?;
                let tensor = self.transform(name).apply(tensor)?;
                match &self.patches {
                    Some(patches) => patches.apply(name, tensor)?.to_dtype(dtype),
                    None => tensor.to_dtype(dtype),
                }
            }
            None => Err(candle_core::Error::Msg(format!(
                "{}: no tensor in the file maps to `{name}`",
                self.files()
            ))),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.to_original.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD15: [usize; 4] = [2, 2, 2, 2];

    fn unet(key: &str) -> Option<String> {
        unet_key_from_original(key, &SD15)
    }

    #[test]
    fn sd15_unet_fixed_and_input_keys() {
        assert_eq!(
            unet("time_embed.2.weight").as_deref(),
            Some("time_embedding.linear_2.weight")
        );
        assert_eq!(
            unet("input_blocks.0.0.bias").as_deref(),
            Some("conv_in.bias")
        );
        assert_eq!(
            unet("out.0.weight").as_deref(),
            Some("conv_norm_out.weight")
        );
        assert_eq!(unet("out.2.bias").as_deref(), Some("conv_out.bias"));
        assert_eq!(
            unet("input_blocks.1.0.in_layers.0.weight").as_deref(),
            Some("down_blocks.0.resnets.0.norm1.weight")
        );
        assert_eq!(
            unet("input_blocks.4.0.skip_connection.weight").as_deref(),
            Some("down_blocks.1.resnets.0.conv_shortcut.weight")
        );
        assert_eq!(
            unet("input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight").as_deref(),
            Some("down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight")
        );
        assert_eq!(
            unet("input_blocks.9.0.op.weight").as_deref(),
            Some("down_blocks.2.downsamplers.0.conv.weight")
        );
        assert_eq!(
            unet("input_blocks.11.0.out_layers.3.bias").as_deref(),
            Some("down_blocks.3.resnets.1.conv2.bias")
        );
        assert_eq!(unet("input_blocks.12.0.in_layers.0.weight"), None);
    }

    #[test]
    fn sd15_unet_middle_and_output_keys() {
        assert_eq!(
            unet("middle_block.0.emb_layers.1.weight").as_deref(),
            Some("mid_block.resnets.0.time_emb_proj.weight")
        );
        assert_eq!(
            unet("middle_block.1.proj_in.weight").as_deref(),
            Some("mid_block.attentions.0.proj_in.weight")
        );
        assert_eq!(
            unet("middle_block.2.out_layers.0.bias").as_deref(),
            Some("mid_block.resnets.1.norm2.bias")
        );
        assert_eq!(
            unet("output_blocks.2.1.conv.weight").as_deref(),
            Some("up_blocks.0.upsamplers.0.conv.weight")
        );
        assert_eq!(
            unet("output_blocks.5.2.conv.bias").as_deref(),
            Some("up_blocks.1.upsamplers.0.conv.bias")
        );
        assert_eq!(
            unet("output_blocks.5.1.norm.weight").as_deref(),
            Some("up_blocks.1.attentions.2.norm.weight")
        );
        assert_eq!(
            unet("output_blocks.11.0.skip_connection.bias").as_deref(),
            Some("up_blocks.3.resnets.2.conv_shortcut.bias")
        );
    }

    /// SDXL base: three levels of two layers, no attention in the first down / last up level,
    /// transformer depth above 1, the added text/time embedding (`label_emb`).
    #[test]
    fn sdxl_unet_keys() {
        const SDXL: [usize; 3] = [2, 2, 2];
        let u = |k: &str| unet_key_from_original(k, &SDXL);
        assert_eq!(
            u("label_emb.0.0.weight").as_deref(),
            Some("add_embedding.linear_1.weight")
        );
        assert_eq!(
            u("label_emb.0.2.bias").as_deref(),
            Some("add_embedding.linear_2.bias")
        );
        assert_eq!(
            u("input_blocks.2.0.in_layers.2.weight").as_deref(),
            Some("down_blocks.0.resnets.1.conv1.weight")
        );
        assert_eq!(
            u("input_blocks.3.0.op.weight").as_deref(),
            Some("down_blocks.0.downsamplers.0.conv.weight")
        );
        assert_eq!(
            u("input_blocks.5.1.proj_in.weight").as_deref(),
            Some("down_blocks.1.attentions.1.proj_in.weight")
        );
        assert_eq!(
            u("input_blocks.8.1.transformer_blocks.9.ff.net.0.proj.weight").as_deref(),
            Some("down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj.weight")
        );
        assert_eq!(u("input_blocks.9.0.op.weight"), None);
        assert_eq!(
            u("middle_block.1.transformer_blocks.3.attn2.to_v.weight").as_deref(),
            Some("mid_block.attentions.0.transformer_blocks.3.attn2.to_v.weight")
        );
        // Up levels 0 and 1 have attention: their upsampler is the third module.
        assert_eq!(
            u("output_blocks.2.2.conv.weight").as_deref(),
            Some("up_blocks.0.upsamplers.0.conv.weight")
        );
        assert_eq!(
            u("output_blocks.2.1.proj_out.bias").as_deref(),
            Some("up_blocks.0.attentions.2.proj_out.bias")
        );
        assert_eq!(
            u("output_blocks.5.2.conv.bias").as_deref(),
            Some("up_blocks.1.upsamplers.0.conv.bias")
        );
        assert_eq!(
            u("output_blocks.8.0.skip_connection.weight").as_deref(),
            Some("up_blocks.2.resnets.2.conv_shortcut.weight")
        );
        assert_eq!(u("output_blocks.9.0.in_layers.0.weight"), None);
    }

    #[test]
    fn transforms_slice_and_transpose() {
        let chunk = Transform::Chunk { part: 1, parts: 3 };
        assert_eq!(chunk.shape(&[12, 4]), Some(vec![4, 4]));
        assert_eq!(chunk.shape(&[12]), Some(vec![4]));
        assert_eq!(chunk.shape(&[10, 4]), None);
        assert_eq!(Transform::Transpose.shape(&[6, 5]), Some(vec![5, 6]));
        assert_eq!(Transform::Transpose.shape(&[6]), None);
        let t = Tensor::arange(0f32, 6., &Device::Cpu)
            .unwrap()
            .reshape((3, 2))
            .unwrap();
        let middle = chunk.apply(t.clone()).unwrap();
        assert_eq!(middle.to_vec2::<f32>().unwrap(), vec![vec![2.0, 3.0]]);
        let transposed = Transform::Transpose.apply(t).unwrap();
        assert_eq!(
            transposed.to_vec2::<f32>().unwrap(),
            vec![vec![0.0, 2.0, 4.0], vec![1.0, 3.0, 5.0]]
        );
    }

    #[test]
    fn controlnet_keys() {
        let hint = [0, 2, 4, 6, 8, 10, 12, 14];
        let cn = |k: &str| controlnet_key_from_original(k, &SD15, &hint);
        assert_eq!(
            cn("input_hint_block.0.weight").as_deref(),
            Some("controlnet_cond_embedding.conv_in.weight")
        );
        assert_eq!(
            cn("input_hint_block.2.bias").as_deref(),
            Some("controlnet_cond_embedding.blocks.0.bias")
        );
        assert_eq!(
            cn("input_hint_block.12.weight").as_deref(),
            Some("controlnet_cond_embedding.blocks.5.weight")
        );
        assert_eq!(
            cn("input_hint_block.14.weight").as_deref(),
            Some("controlnet_cond_embedding.conv_out.weight")
        );
        assert_eq!(
            cn("zero_convs.11.0.weight").as_deref(),
            Some("controlnet_down_blocks.11.weight")
        );
        assert_eq!(
            cn("middle_block_out.0.bias").as_deref(),
            Some("controlnet_mid_block.bias")
        );
        assert_eq!(
            cn("input_blocks.3.0.op.bias").as_deref(),
            Some("down_blocks.0.downsamplers.0.conv.bias")
        );
        assert_eq!(cn("output_blocks.0.0.in_layers.0.weight"), None);
        // A differently sized hint block: the last conv is still conv_out.
        let short = [0, 2, 4, 6];
        assert_eq!(
            controlnet_key_from_original("input_hint_block.6.weight", &SD15, &short).as_deref(),
            Some("controlnet_cond_embedding.conv_out.weight")
        );
    }

    #[test]
    fn module_matching_respects_boundaries() {
        assert_eq!(
            rename_with("out.0.weight", UNET_RENAMES).as_deref(),
            Some("conv_norm_out.weight")
        );
        assert_eq!(rename_with("out.01.weight", UNET_RENAMES), None);
        assert_eq!(
            rename_with("zero_convs.1.01.weight", CONTROLNET_RENAMES),
            None
        );
        assert_eq!(
            rename_with("zero_convs.10.0.weight", CONTROLNET_RENAMES).as_deref(),
            Some("controlnet_down_blocks.10.weight")
        );
    }

    #[test]
    fn layers_from_input_blocks() {
        assert_eq!(
            layers_per_block_from_input_blocks(12, &[3, 6, 9]),
            Some(vec![2, 2, 2, 2])
        );
        assert_eq!(
            layers_per_block_from_input_blocks(9, &[3, 6]),
            Some(vec![2, 2, 2])
        );
        assert_eq!(layers_per_block_from_input_blocks(3, &[]), Some(vec![2]));
        assert_eq!(layers_per_block_from_input_blocks(10, &[3, 6, 9]), None);
    }

    #[test]
    fn every_sd15_input_block_has_one_slot() {
        let slots: Vec<_> = (0..12).map(|i| input_slot(i, &SD15)).collect();
        assert!(slots.iter().all(Option::is_some));
        assert_eq!(slots[3], Some(InputSlot::Downsampler { block: 0 }));
        assert_eq!(slots[10], Some(InputSlot::Layer { block: 3, layer: 0 }));
        assert_eq!(output_slot(11, &SD15), Some((3, 2)));
        assert_eq!(output_slot(12, &SD15), None);
    }
}
