//! Single-file Stable Diffusion checkpoints as the community shares them (CompVis / A1111
//! layout for SD 1.x, Stability's SGM layout for SDXL; `.safetensors` or `.ckpt`): the UNet,
//! VAE and text encoder(s) of one file read under diffusers' names through rename tables, the
//! kind detected from the keys. Also community VAE files (`vae:` of a base model).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};
use crate::single_file::{unet_key_from_original, RenamedWeights, Transform, UNET_PREFIX};
use crate::weights::WeightStore;

pub const VAE_PREFIX: &str = "first_stage_model.";
/// SD 1.x's CLIP-L text encoder (transformers layout).
pub const TEXT_ENCODER_PREFIX: &str = "cond_stage_model.transformer.";
/// SDXL's first text encoder, CLIP-L in transformers layout.
pub const SDXL_TEXT_ENCODER_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// SDXL's second text encoder, OpenCLIP ViT-bigG in OpenCLIP's layout.
pub const SDXL_TEXT_ENCODER_2_PREFIX: &str = "conditioner.embedders.1.model.";

/// What a single-file checkpoint holds, judged from its tensor names and shapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointKind {
    /// SD 1.x: CLIP-L text encoder, 768-wide context.
    Sd15,
    Sd2,
    /// SDXL base: CLIP-L and OpenCLIP bigG text encoders (SGM layout).
    Sdxl,
    /// A model family this build does not run (SD3, Flux, the SDXL refiner), by name.
    Unsupported(&'static str),
    Unknown(String),
}

impl CheckpointKind {
    /// How the kind reads in messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Sd15 => "a Stable Diffusion 1.x single-file checkpoint".to_string(),
            Self::Sd2 => "a Stable Diffusion 2.x single-file checkpoint".to_string(),
            Self::Sdxl => "an SDXL single-file checkpoint".to_string(),
            Self::Unsupported(family) => format!("a {family} single-file checkpoint"),
            Self::Unknown(why) => format!("not a Stable Diffusion checkpoint: {why}"),
        }
    }

    /// The recipe `kind:` that runs it, for the kinds this build runs.
    pub fn recipe_kind(&self) -> Option<&'static str> {
        match self {
            Self::Sd15 => Some("sd15"),
            Self::Sdxl => Some("sdxl"),
            _ => None,
        }
    }
}

/// Opens a `.safetensors` file, or a `.ckpt` / `.pth` pickle with or without `state_dict`.
pub fn open_checkpoint(path: &Path) -> Result<WeightStore> {
    let pickle = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("ckpt" | "pt" | "pth" | "bin")
    );
    if pickle {
        WeightStore::open_pickle_state_dict(path)
    } else {
        WeightStore::open(&[path.to_path_buf()])
    }
}

pub fn detect_kind(store: &WeightStore) -> CheckpointKind {
    detect_kind_of(&store.tensor_names())
}

/// [`detect_kind`] on a file's tensor names (the rules diffusers' `infer_diffusers_model_type`
/// uses, by prefix rather than by one sentinel key, so pruned and tiny files are named too).
pub fn detect_kind_of(names: &[String]) -> CheckpointKind {
    let has_prefix = |p: &str| names.iter().any(|n| n.starts_with(p));
    // Transformer families first: their files may also carry CLIP text encoders.
    if has_prefix("model.diffusion_model.joint_blocks.") || has_prefix("joint_blocks.") {
        return CheckpointKind::Unsupported("Stable Diffusion 3 (MMDiT)");
    }
    if has_prefix("model.diffusion_model.double_blocks.") || has_prefix("double_blocks.") {
        return CheckpointKind::Unsupported("Flux");
    }
    if has_prefix(SDXL_TEXT_ENCODER_2_PREFIX) {
        return CheckpointKind::Sdxl;
    }
    if has_prefix("conditioner.embedders.0.model.") {
        return CheckpointKind::Unsupported("SDXL refiner");
    }
    if has_prefix("cond_stage_model.model.") {
        return CheckpointKind::Sd2;
    }
    // The CLIP-L layout (`cond_stage_model.transformer.`) marks SD 1.x; sizes come from the
    // configs paired with the file and are checked when the weights load.
    if has_prefix(TEXT_ENCODER_PREFIX) && has_prefix(UNET_PREFIX) {
        return CheckpointKind::Sd15;
    }
    let sample: Vec<_> = names.iter().take(3).cloned().collect();
    CheckpointKind::Unknown(format!(
        "no `{UNET_PREFIX}` / `{TEXT_ENCODER_PREFIX}` / `{SDXL_TEXT_ENCODER_PREFIX}` tensors (e.g. {sample:?})"
    ))
}

/// Original VAE name (prefix stripped) → diffusers name; `levels` = VAE block count.
pub fn vae_key_from_original(key: &str, levels: usize) -> Option<String> {
    let (part, rest) = key.split_once('.')?;
    match part {
        "quant_conv" | "post_quant_conv" => return Some(key.to_string()),
        "encoder" | "decoder" => {}
        _ => return None,
    }
    let resnet = |r: &str| r.replace("nin_shortcut", "conv_shortcut");
    let mapped = if let Some(r) = rest.strip_prefix("norm_out") {
        format!("conv_norm_out{r}")
    } else if rest.starts_with("conv_in") || rest.starts_with("conv_out") {
        rest.to_string()
    } else if let Some(r) = rest.strip_prefix("mid.block_1") {
        format!("mid_block.resnets.0{}", resnet(r))
    } else if let Some(r) = rest.strip_prefix("mid.block_2") {
        format!("mid_block.resnets.1{}", resnet(r))
    } else if let Some(r) = rest.strip_prefix("mid.attn_1.") {
        let (module, tail) = r.split_once('.')?;
        let module = match module {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        format!("mid_block.attentions.0.{module}.{tail}")
    } else {
        let (level_kind, tail) = if part == "encoder" {
            ("down", rest.strip_prefix("down.")?)
        } else {
            ("up", rest.strip_prefix("up.")?)
        };
        let (index, tail) = tail.split_once('.')?;
        let index: usize = index.parse().ok()?;
        // The decoder's `up.{k}` runs from the lowest resolution: diffusers reverses it.
        let block = if part == "decoder" {
            levels.checked_sub(1 + index)?
        } else {
            index
        };
        if let Some(t) = tail.strip_prefix("block.") {
            let (j, t) = t.split_once('.')?;
            format!("{level_kind}_blocks.{block}.resnets.{j}.{}", resnet(t))
        } else if let Some(t) = tail.strip_prefix("downsample.conv") {
            format!("down_blocks.{block}.downsamplers.0.conv{t}")
        } else if let Some(t) = tail.strip_prefix("upsample.conv") {
            format!("up_blocks.{block}.upsamplers.0.conv{t}")
        } else {
            return None;
        }
    };
    Some(format!("{part}.{mapped}"))
}

/// Every tensor under `prefix` whose stripped name `map` accepts, keyed by the new name.
fn renamed(
    store: &WeightStore,
    prefix: &str,
    map: impl Fn(&str) -> Option<String>,
) -> HashMap<String, String> {
    store
        .tensor_names()
        .into_iter()
        .filter_map(|original| {
            let stripped = original.strip_prefix(prefix)?;
            map(stripped).map(|new| (new, original.clone()))
        })
        .collect()
}

/// One component of a single-file checkpoint, served under diffusers' names.
pub fn unet_weights(path: &Path, layers_per_block: &[usize]) -> Result<RenamedWeights> {
    let store = open_checkpoint(path)?;
    let map = renamed(&store, UNET_PREFIX, |k| {
        unet_key_from_original(k, layers_per_block)
    });
    non_empty(path, "UNet", UNET_PREFIX, RenamedWeights::new(store, map))
}

pub fn vae_weights(path: &Path, levels: usize) -> Result<RenamedWeights> {
    let store = open_checkpoint(path)?;
    let map = renamed(&store, VAE_PREFIX, |k| vae_key_from_original(k, levels));
    non_empty(path, "VAE", VAE_PREFIX, RenamedWeights::new(store, map))
}

/// The (first) CLIP-L text encoder: SD 1.x's `cond_stage_model.transformer.*` or SDXL's
/// `conditioner.embedders.0.transformer.*`, both in transformers' layout.
pub fn text_encoder_weights(path: &Path) -> Result<RenamedWeights> {
    let store = open_checkpoint(path)?;
    let prefix = if store
        .tensor_names()
        .iter()
        .any(|n| n.starts_with(SDXL_TEXT_ENCODER_PREFIX))
    {
        SDXL_TEXT_ENCODER_PREFIX
    } else {
        TEXT_ENCODER_PREFIX
    };
    // `position_ids` is a buffer (sometimes stored as floats with wrong values): positions are
    // always 0..n.
    let map = renamed(&store, prefix, |k| {
        (!k.ends_with("position_ids")).then(|| k.to_string())
    });
    non_empty(
        path,
        "text encoder",
        prefix,
        RenamedWeights::new(store, map),
    )
}

/// OpenCLIP text-tower name (prefix stripped) → transformers `CLIPTextModelWithProjection`
/// name(s) with the transform each needs (diffusers' `convert_open_clip_checkpoint`): the fused
/// `in_proj` splits into q, k, v; `text_projection` is transposed.
pub fn open_clip_key(key: &str) -> Vec<(String, Transform)> {
    let fixed = match key {
        "token_embedding.weight" => Some("text_model.embeddings.token_embedding.weight"),
        "positional_embedding" => Some("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight" => Some("text_model.final_layer_norm.weight"),
        "ln_final.bias" => Some("text_model.final_layer_norm.bias"),
        "text_projection" => {
            return vec![("text_projection.weight".to_string(), Transform::Transpose)];
        }
        _ => None,
    };
    if let Some(name) = fixed {
        return vec![(name.to_string(), Transform::AsIs)];
    }
    let Some(tail) = key.strip_prefix("transformer.resblocks.") else {
        return Vec::new();
    };
    let Some((layer, rest)) = tail.split_once('.') else {
        return Vec::new();
    };
    if layer.parse::<usize>().is_err() {
        return Vec::new();
    }
    let prefix = format!("text_model.encoder.layers.{layer}");
    if let Some(leaf) = rest.strip_prefix("attn.in_proj_") {
        if leaf != "weight" && leaf != "bias" {
            return Vec::new();
        }
        return ["q", "k", "v"]
            .iter()
            .enumerate()
            .map(|(part, p)| {
                (
                    format!("{prefix}.self_attn.{p}_proj.{leaf}"),
                    Transform::Chunk { part, parts: 3 },
                )
            })
            .collect();
    }
    const MODULES: [(&str, &str); 5] = [
        ("ln_1", "layer_norm1"),
        ("ln_2", "layer_norm2"),
        ("attn.out_proj", "self_attn.out_proj"),
        ("mlp.c_fc", "mlp.fc1"),
        ("mlp.c_proj", "mlp.fc2"),
    ];
    MODULES
        .iter()
        .find_map(|(from, to)| {
            let leaf = rest.strip_prefix(from)?.strip_prefix('.')?;
            (leaf == "weight" || leaf == "bias")
                .then(|| vec![(format!("{prefix}.{to}.{leaf}"), Transform::AsIs)])
        })
        .unwrap_or_default()
}

/// SDXL's second text encoder (`conditioner.embedders.1.model.*`, OpenCLIP bigG) under
/// transformers' `CLIPTextModelWithProjection` names.
pub fn open_clip_text_encoder_weights(path: &Path) -> Result<RenamedWeights> {
    let store = open_checkpoint(path)?;
    let map: HashMap<String, (String, Transform)> = store
        .tensor_names()
        .into_iter()
        .flat_map(|original| {
            let mapped = original
                .strip_prefix(SDXL_TEXT_ENCODER_2_PREFIX)
                .map(open_clip_key)
                .unwrap_or_default();
            mapped
                .into_iter()
                .map(move |(name, transform)| (name, (original.clone(), transform)))
        })
        .collect();
    non_empty(
        path,
        "second text encoder",
        SDXL_TEXT_ENCODER_2_PREFIX,
        RenamedWeights::with_transforms(store, map),
    )
}

/// The layouts a VAE file comes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VaeLayout {
    /// Original (LDM) names under `prefix` (`""` for a bare VAE file such as `sdxl_vae.safetensors`).
    Original { prefix: &'static str },
    /// diffusers names (`encoder.down_blocks.*`), e.g. a copy of a folder's weight file.
    Diffusers,
}

fn vae_layout(names: &[String]) -> Option<VaeLayout> {
    for prefix in [VAE_PREFIX, "vae."] {
        if names.iter().any(|n| n.starts_with(prefix)) {
            return Some(VaeLayout::Original { prefix });
        }
    }
    if names
        .iter()
        .any(|n| n.starts_with("encoder.down.") || n.starts_with("decoder.up."))
    {
        return Some(VaeLayout::Original { prefix: "" });
    }
    if names
        .iter()
        .any(|n| n.starts_with("encoder.down_blocks.") || n.starts_with("decoder.up_blocks."))
    {
        return Some(VaeLayout::Diffusers);
    }
    None
}

/// diffusers' name for a tensor of a diffusers-layout VAE file: older files name the mid-block
/// attention `query/key/value/proj_attn`.
fn vae_key_from_diffusers(key: &str) -> String {
    const OLD: [(&str, &str); 4] = [
        (".query.", ".to_q."),
        (".key.", ".to_k."),
        (".value.", ".to_v."),
        (".proj_attn.", ".to_out.0."),
    ];
    OLD.iter()
        .find(|(old, _)| key.contains(".attentions.") && key.contains(old))
        .map(|(old, new)| key.replacen(old, new, 1))
        .unwrap_or_else(|| key.to_string())
}

/// A VAE file given as `vae:` of a base model: a community VAE (original names, with or without
/// `first_stage_model.`, as `AutoencoderKL.from_single_file` reads) or a diffusers-layout file.
/// `levels` = the VAE config's block count.
pub fn vae_file_weights(path: &Path, levels: usize) -> Result<RenamedWeights> {
    let store = open_checkpoint(path)?;
    let names = store.tensor_names();
    let map = match vae_layout(&names) {
        Some(VaeLayout::Original { prefix }) => {
            renamed(&store, prefix, |k| vae_key_from_original(k, levels))
        }
        Some(VaeLayout::Diffusers) => names
            .iter()
            .map(|n| (vae_key_from_diffusers(n), n.clone()))
            .collect(),
        None => HashMap::new(),
    };
    if map.is_empty() {
        let sample: Vec<_> = names.iter().take(3).cloned().collect();
        return Err(ModelError::Weights(format!(
            "{}: not a VAE file: no `encoder.` / `decoder.` tensors, with or without `{VAE_PREFIX}` (e.g. {sample:?})",
            path.display()
        )));
    }
    Ok(RenamedWeights::new(store, map))
}

/// The latent channels of a VAE file (`post_quant_conv` or the decoder's `conv_in`), read from
/// its header.
pub fn vae_file_latent_channels(path: &Path) -> Result<usize> {
    let weights = vae_file_weights(path, 1)?;
    ["post_quant_conv.weight", "decoder.conv_in.weight"]
        .iter()
        .find_map(|name| weights.shape(name)?.get(1).copied())
        .ok_or_else(|| {
            ModelError::Weights(format!(
                "{}: a VAE file without `post_quant_conv.weight` or `decoder.conv_in.weight`",
                path.display()
            ))
        })
}

fn non_empty(
    path: &Path,
    what: &str,
    prefix: &str,
    weights: RenamedWeights,
) -> Result<RenamedWeights> {
    if weights.names().next().is_none() {
        return Err(ModelError::Weights(format!(
            "{}: no {what} tensors (`{prefix}*`) in this checkpoint",
            path.display()
        )));
    }
    Ok(weights)
}

/// A checked single-file base checkpoint.
#[derive(Debug, Clone)]
pub struct SingleFileCheckpoint {
    pub file: PathBuf,
    pub kind: CheckpointKind,
}

impl SingleFileCheckpoint {
    /// Reads the header and refuses kinds this build cannot run, naming what the file is.
    pub fn open(path: &Path) -> Result<Self> {
        let store = open_checkpoint(path)?;
        let kind = detect_kind(&store);
        match &kind {
            CheckpointKind::Sd15 | CheckpointKind::Sdxl => Ok(Self {
                file: path.to_path_buf(),
                kind,
            }),
            CheckpointKind::Sd2 => Err(ModelError::Weights(format!(
                "{}: an SD 2.x single-file checkpoint (OpenCLIP text encoder); not supported yet: use its diffusers folder",
                path.display()
            ))),
            CheckpointKind::Unsupported(family) => Err(ModelError::Weights(format!(
                "{}: a {family} single-file checkpoint; ipcompose runs SD 1.x, SD 2.x (diffusers folders) and SDXL base models only",
                path.display()
            ))),
            CheckpointKind::Unknown(why) => Err(ModelError::Weights(format!(
                "{}: not a Stable Diffusion checkpoint: {why}",
                path.display()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vae_names() {
        let v = |k: &str| vae_key_from_original(k, 4);
        assert_eq!(
            v("decoder.up.0.block.1.conv1.weight").as_deref(),
            Some("decoder.up_blocks.3.resnets.1.conv1.weight")
        );
        assert_eq!(
            v("decoder.up.3.upsample.conv.bias").as_deref(),
            Some("decoder.up_blocks.0.upsamplers.0.conv.bias")
        );
        assert_eq!(
            v("encoder.down.1.block.0.nin_shortcut.weight").as_deref(),
            Some("encoder.down_blocks.1.resnets.0.conv_shortcut.weight")
        );
        assert_eq!(
            v("encoder.mid.attn_1.proj_out.weight").as_deref(),
            Some("encoder.mid_block.attentions.0.to_out.0.weight")
        );
        assert_eq!(
            v("decoder.norm_out.bias").as_deref(),
            Some("decoder.conv_norm_out.bias")
        );
        assert_eq!(
            v("post_quant_conv.weight").as_deref(),
            Some("post_quant_conv.weight")
        );
        assert_eq!(v("model_ema.decay"), None);
    }

    /// The SGM fixture (tests/fixtures/make_sdxl_single_file_fixtures.py) read under diffusers'
    /// names gives exactly the tiny-sdxl folder's tensors, name for name and bit for bit.
    #[test]
    fn the_sdxl_fixture_reads_as_its_folder() {
        use candle_core::{DType, Device};
        use candle_nn::var_builder::SimpleBackend;
        let fixtures =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        let file = fixtures.join("single-file/tiny-sdxl.safetensors");
        let folder = fixtures.join("tiny-sdxl");
        let components: [(&str, &str, RenamedWeights); 4] = [
            (
                "unet",
                "diffusion_pytorch_model",
                unet_weights(&file, &[2, 2, 2]).unwrap(),
            ),
            (
                "vae",
                "diffusion_pytorch_model",
                vae_weights(&file, 4).unwrap(),
            ),
            (
                "text_encoder",
                "model",
                text_encoder_weights(&file).unwrap(),
            ),
            (
                "text_encoder_2",
                "model",
                open_clip_text_encoder_weights(&file).unwrap(),
            ),
        ];
        for (component, stem, renamed) in components {
            let store =
                WeightStore::open(&[folder.join(component).join(format!("{stem}.safetensors"))])
                    .unwrap();
            let mut expected = store.tensor_names();
            let mut got: Vec<String> = renamed.names().map(str::to_string).collect();
            expected.sort();
            got.sort();
            assert_eq!(got, expected, "{component}");
            for name in &expected {
                let want = store.get_unchecked(name, DType::F32, &Device::Cpu).unwrap();
                // The shapes the models ask for (the VAE's attention projections are stored as
                // 1×1 convolutions and squeezed).
                let have = renamed
                    .get(
                        want.shape().clone(),
                        name,
                        candle_nn::Init::Const(0.0),
                        DType::F32,
                        &Device::Cpu,
                    )
                    .unwrap();
                let diff = (have - &want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert_eq!(diff, 0.0, "{component}: {name}");
            }
        }
        // The community VAE file: original names without a prefix.
        let vae =
            vae_file_weights(&fixtures.join("single-file/tiny-sdxl-vae.safetensors"), 4).unwrap();
        let store =
            WeightStore::open(&[folder.join("vae/diffusion_pytorch_model.safetensors")]).unwrap();
        let mut expected = store.tensor_names();
        let mut got: Vec<String> = vae.names().map(str::to_string).collect();
        expected.sort();
        got.sort();
        assert_eq!(got, expected);
        assert_eq!(
            vae_file_latent_channels(&fixtures.join("single-file/tiny-sdxl-vae.safetensors"))
                .unwrap(),
            4
        );
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn kinds_are_detected_from_the_prefixes() {
        let sdxl = names(&[
            "model.diffusion_model.label_emb.0.0.weight",
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
        ]);
        assert_eq!(detect_kind_of(&sdxl), CheckpointKind::Sdxl);
        let sd15 = names(&[
            "model.diffusion_model.out.2.weight",
            "cond_stage_model.transformer.text_model.final_layer_norm.weight",
        ]);
        assert_eq!(detect_kind_of(&sd15), CheckpointKind::Sd15);
        let sd2 = names(&[
            "model.diffusion_model.out.2.weight",
            "cond_stage_model.model.transformer.resblocks.0.ln_1.weight",
        ]);
        assert_eq!(detect_kind_of(&sd2), CheckpointKind::Sd2);
        // SD3 files also carry CLIP encoders; the MMDiT blocks decide.
        let sd3 = names(&[
            "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
            "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
        ]);
        assert_eq!(
            detect_kind_of(&sd3),
            CheckpointKind::Unsupported("Stable Diffusion 3 (MMDiT)")
        );
        for flux in [
            "double_blocks.0.img_attn.norm.key_norm.scale",
            "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
        ] {
            let kind = detect_kind_of(&names(&[flux]));
            assert_eq!(kind, CheckpointKind::Unsupported("Flux"), "{flux}");
            assert_eq!(kind.recipe_kind(), None);
            assert!(kind.describe().contains("Flux"));
        }
        let refiner = names(&["conditioner.embedders.0.model.text_projection"]);
        assert_eq!(
            detect_kind_of(&refiner),
            CheckpointKind::Unsupported("SDXL refiner")
        );
        assert!(matches!(
            detect_kind_of(&names(&["foo.weight"])),
            CheckpointKind::Unknown(_)
        ));
        assert_eq!(CheckpointKind::Sdxl.recipe_kind(), Some("sdxl"));
        assert_eq!(CheckpointKind::Sd15.recipe_kind(), Some("sd15"));
    }

    #[test]
    fn open_clip_names_follow_diffusers_converter() {
        let one = |k: &str| {
            let mut v = open_clip_key(k);
            assert_eq!(v.len(), 1, "{k}: {v:?}");
            v.remove(0)
        };
        assert_eq!(
            one("token_embedding.weight"),
            (
                "text_model.embeddings.token_embedding.weight".to_string(),
                Transform::AsIs
            )
        );
        assert_eq!(
            one("positional_embedding").0,
            "text_model.embeddings.position_embedding.weight"
        );
        assert_eq!(one("ln_final.bias").0, "text_model.final_layer_norm.bias");
        assert_eq!(
            one("text_projection"),
            ("text_projection.weight".to_string(), Transform::Transpose)
        );
        assert_eq!(
            one("transformer.resblocks.31.ln_1.weight").0,
            "text_model.encoder.layers.31.layer_norm1.weight"
        );
        assert_eq!(
            one("transformer.resblocks.0.ln_2.bias").0,
            "text_model.encoder.layers.0.layer_norm2.bias"
        );
        assert_eq!(
            one("transformer.resblocks.2.attn.out_proj.weight").0,
            "text_model.encoder.layers.2.self_attn.out_proj.weight"
        );
        assert_eq!(
            one("transformer.resblocks.2.mlp.c_fc.bias").0,
            "text_model.encoder.layers.2.mlp.fc1.bias"
        );
        assert_eq!(
            one("transformer.resblocks.2.mlp.c_proj.weight").0,
            "text_model.encoder.layers.2.mlp.fc2.weight"
        );
        let fused = open_clip_key("transformer.resblocks.7.attn.in_proj_weight");
        assert_eq!(
            fused,
            vec![
                (
                    "text_model.encoder.layers.7.self_attn.q_proj.weight".to_string(),
                    Transform::Chunk { part: 0, parts: 3 }
                ),
                (
                    "text_model.encoder.layers.7.self_attn.k_proj.weight".to_string(),
                    Transform::Chunk { part: 1, parts: 3 }
                ),
                (
                    "text_model.encoder.layers.7.self_attn.v_proj.weight".to_string(),
                    Transform::Chunk { part: 2, parts: 3 }
                ),
            ]
        );
        assert_eq!(
            open_clip_key("transformer.resblocks.7.attn.in_proj_bias")[2].0,
            "text_model.encoder.layers.7.self_attn.v_proj.bias"
        );
        // Buffers and CLIP's temperature are not part of the text model.
        for ignored in [
            "logit_scale",
            "attn_mask",
            "transformer.resblocks.x.ln_1.weight",
            "transformer.resblocks.1.ln_1x.weight",
        ] {
            assert!(open_clip_key(ignored).is_empty(), "{ignored}");
        }
    }

    #[test]
    fn vae_files_come_in_three_layouts() {
        assert_eq!(
            vae_layout(&names(&["first_stage_model.decoder.conv_in.weight"])),
            Some(VaeLayout::Original { prefix: VAE_PREFIX })
        );
        assert_eq!(
            vae_layout(&names(&[
                "encoder.down.0.block.0.norm1.weight",
                "post_quant_conv.weight"
            ])),
            Some(VaeLayout::Original { prefix: "" })
        );
        assert_eq!(
            vae_layout(&names(&["decoder.up_blocks.0.resnets.0.conv1.weight"])),
            Some(VaeLayout::Diffusers)
        );
        assert_eq!(vae_layout(&names(&["lora_unet_x.alpha"])), None);
        assert_eq!(
            vae_key_from_diffusers("encoder.mid_block.attentions.0.proj_attn.weight"),
            "encoder.mid_block.attentions.0.to_out.0.weight"
        );
        assert_eq!(
            vae_key_from_diffusers("decoder.mid_block.attentions.0.query.bias"),
            "decoder.mid_block.attentions.0.to_q.bias"
        );
        assert_eq!(
            vae_key_from_diffusers("decoder.up_blocks.1.resnets.0.conv1.weight"),
            "decoder.up_blocks.1.resnets.0.conv1.weight"
        );
    }
}
