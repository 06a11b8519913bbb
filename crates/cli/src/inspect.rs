//! `ipcompose inspect`: what a checkpoint file or folder is, read from headers and configs
//! only (kind, variant, base, dtype, parameter count).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use ipcompose::models::weights::{find_component_weights, WeightStore};

/// Parameter count and dtypes of every tensor in `store`.
fn summary(store: &WeightStore) -> (usize, String) {
    let mut params = 0usize;
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    for name in store.tensor_names() {
        let count: usize = store.shape(&name).map(|s| s.iter().product()).unwrap_or(0);
        params += count;
        if let Some(dtype) = store.dtype(&name) {
            *dtypes.entry(format!("{dtype:?}")).or_default() += count;
        }
    }
    let dtypes = dtypes
        .iter()
        .map(|(d, n)| format!("{d} ({:.0}%)", 100.0 * *n as f64 / params.max(1) as f64))
        .collect::<Vec<_>>()
        .join(", ");
    (params, dtypes)
}

fn millions(n: usize) -> String {
    format!("{:.1} M parameters", n as f64 / 1e6)
}

fn base_of_context(width: usize) -> &'static str {
    match width {
        768 => "SD 1.x",
        1024 => "SD 2.x",
        2048 => "SDXL",
        _ => "unknown base",
    }
}

/// Depth Anything V2 (transformers folder or original file) and the OpenPose body model:
/// `Some(description)` when `path` is one of them.
fn preprocessor_model(path: &Path) -> Option<String> {
    use ipcompose::models::depth_anything::resolve_depth_anything;
    if let Ok((store, files)) = resolve_depth_anything(path) {
        let (params, dtypes) = summary(&store);
        let c = &files.config;
        return Some(format!(
            "Depth Anything V2 ({:?} layout), DINOv2 {} wide, {} layers, {} heads, {:?} depth; {}, {dtypes}",
            files.format,
            c.hidden_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.depth_estimation_type,
            millions(params)
        ));
    }
    if path.is_file() {
        if let Ok(config) = ipcompose::models::openpose::BodyPoseModel::inspect(path) {
            let params = WeightStore::open(&[path.to_path_buf()])
                .map(|s| summary(&s))
                .map(|(p, d)| format!("{}, {d}", millions(p)))
                .unwrap_or_default();
            return Some(format!(
                "OpenPose body model (VGG widths {:?}); {params}",
                config.vgg_channels
            ));
        }
    }
    None
}

fn inspect_folder(path: &Path) -> anyhow::Result<()> {
    use ipcompose::models::folder::DiffusersFolder;
    if let Some(description) = preprocessor_model(path) {
        println!("{}: {description}", path.display());
        return Ok(());
    }
    if let Ok(folder) = DiffusersFolder::open(path) {
        let unet = folder.unet_config()?;
        let files =
            find_component_weights(&folder.component("unet"), "diffusion_pytorch_model", None)?;
        let (params, dtypes) = summary(&WeightStore::open(&files)?);
        println!(
            "{}: diffusers Stable Diffusion folder, {} (context {}, {} cross-attention layers); UNet {}, {dtypes}",
            path.display(),
            // The added text/time embedding says SDXL whatever the widths (tiny test models).
            if unet.addition.is_some() {
                "SDXL"
            } else {
                base_of_context(unet.cross_attention_dim)
            },
            unet.cross_attention_dim,
            unet.cross_attention_layers(),
            millions(params)
        );
        return Ok(());
    }
    let config_path = path.join("config.json");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path)
            .with_context(|| format!("{}: not a model folder", path.display()))?,
    )
    .with_context(|| format!("{}: not valid JSON", config_path.display()))?;
    let class = config
        .get("_class_name")
        .and_then(|c| c.as_str())
        .unwrap_or("");
    let architectures = config
        .get("architectures")
        .map(|a| a.to_string())
        .unwrap_or_default();
    let controlnet_classes = [
        "ControlNetModel",
        "ControlNetUnionModel",
        "ControlNetModel_Union",
    ];
    let (kind, stem) = if controlnet_classes.contains(&class) {
        ("ControlNet", "diffusion_pytorch_model")
    } else if class == "T2IAdapter" {
        ("T2I-Adapter", "diffusion_pytorch_model")
    } else if class == "AutoencoderKL" {
        ("VAE (AutoencoderKL)", "diffusion_pytorch_model")
    } else if architectures.contains("CLIPVisionModel") {
        ("CLIP image encoder", "model")
    } else {
        anyhow::bail!(
            "{}: unknown model folder (class `{class}`, architectures {architectures})",
            path.display()
        );
    };
    let files = find_component_weights(path, stem, None)
        .or_else(|_| find_component_weights(path, "pytorch_model", None))?;
    let (params, dtypes) = summary(&WeightStore::open(&files)?);
    let detail = match kind {
        "ControlNet" => {
            let c = ipcompose::models::controlnet::ControlNetConfig::from_folder(path)?;
            format!(
                ", {} (context {}), {} conditioning channels{}{}",
                base_of_context(c.encoder.cross_attention_dim),
                c.encoder.cross_attention_dim,
                c.conditioning_channels,
                if c.global_pool_conditions {
                    ", pooled (shuffle)"
                } else {
                    ""
                },
                match c.union {
                    Some(u) => format!(
                        ", union of {} condition types ({})",
                        u.num_control_type,
                        ipcompose::models::controlnet::union_type_names(u.num_control_type)
                    ),
                    None => String::new(),
                }
            )
        }
        "VAE (AutoencoderKL)" => {
            let c = ipcompose::models::vae::VaeConfig::from_file(&config_path)?;
            format!(
                ", {} latent channels, scaling factor {}",
                c.latent_channels, c.scaling_factor
            )
        }
        "T2I-Adapter" => {
            let c = ipcompose::models::t2i_adapter::T2IAdapterConfig::from_folder(path)?;
            format!(", {:?} adapter, channels {:?}", c.adapter_type, c.channels)
        }
        _ => String::new(),
    };
    println!(
        "{}: {kind}{detail}; {}, {dtypes}",
        path.display(),
        millions(params)
    );
    Ok(())
}

fn inspect_file(path: &Path) -> anyhow::Result<()> {
    use ipcompose::models::ip_adapter;
    use ipcompose::models::single_file_base::{detect_kind, open_checkpoint, CheckpointKind};
    if let Ok(info) = ip_adapter::inspect(path) {
        let store = open_checkpoint(path).or_else(|_| WeightStore::open(&[path.to_path_buf()]));
        let params = store.map(|s| summary(&s).0).unwrap_or(0);
        println!(
            "{}: IP-Adapter, {} projection, {} (context {}, {} layers), image features {} wide; {}, {:?}",
            path.display(),
            info.projection.name(),
            base_of_context(info.cross_attention_dim),
            info.cross_attention_dim,
            info.layer_channels.len(),
            info.image_feature_width,
            millions(params),
            info.dtype
        );
        return Ok(());
    }
    if let Err(e) = ip_adapter::inspect(path) {
        if e.to_string().contains("FaceID") {
            anyhow::bail!(e);
        }
    }
    if let Some(description) = preprocessor_model(path) {
        println!("{}: {description}", path.display());
        return Ok(());
    }
    let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
    if is_safetensors {
        if let Ok(lora) = ipcompose::models::lora::LoraFile::open(path) {
            let s = lora.summary();
            let parts: Vec<&str> = s.components.iter().map(|c| c.name()).collect();
            let ranks: Vec<String> = s.ranks.iter().map(|r| r.to_string()).collect();
            println!(
                "{}: {} for {}, touches the {}; rank {}; {} tensors",
                path.display(),
                s.format.describe(),
                s.base(),
                parts.join(" and "),
                if ranks.is_empty() {
                    "n/a".to_string()
                } else {
                    ranks.join("/")
                },
                s.tensors
            );
            return Ok(());
        }
    }
    let store = open_checkpoint(path)?;
    let (params, dtypes) = summary(&store);
    let names = store.tensor_names();
    let kind = if names
        .iter()
        .any(|n| n.starts_with("control_model.") || n.starts_with("input_hint_block."))
    {
        "ControlNet (original single file)".to_string()
    } else {
        match detect_kind(&store) {
            CheckpointKind::Sd15 => "Stable Diffusion 1.x single-file checkpoint".to_string(),
            CheckpointKind::Sd2 => {
                "Stable Diffusion 2.x single-file checkpoint (not supported yet)".to_string()
            }
            CheckpointKind::Sdxl => {
                "SDXL single-file checkpoint (SGM layout: CLIP-L + OpenCLIP bigG)".to_string()
            }
            CheckpointKind::Unsupported(family) => {
                format!("{family} single-file checkpoint (not supported)")
            }
            CheckpointKind::Unknown(why) => {
                match ipcompose::models::single_file_base::vae_file_latent_channels(path) {
                    Ok(latent) => format!("VAE single file ({latent} latent channels)"),
                    Err(_) => format!("unrecognised checkpoint: {why}"),
                }
            }
        }
    };
    println!("{}: {kind}; {}, {dtypes}", path.display(), millions(params));
    Ok(())
}

pub fn inspect(path: &Path) -> anyhow::Result<()> {
    if path.is_dir() {
        inspect_folder(path)
    } else if path.is_file() {
        inspect_file(path)
    } else {
        anyhow::bail!("{}: no such file or folder", path.display())
    }
}
