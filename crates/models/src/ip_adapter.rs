//! IP-Adapter checkpoints (h94/IP-Adapter and compatible): the image projection (plain,
//! resampler "plus", MLP "full-face") and the per-layer `to_k_ip` / `to_v_ip` weights.
//!
//! Files come as a PyTorch pickle `{"image_proj": {...}, "ip_adapter": {...}}`, as safetensors
//! with `image_proj.` / `ip_adapter.` prefixes, or straight from training with
//! `image_proj_model.` / `adapter_modules.` prefixes. The variant is read from tensor names
//! and shapes alone.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Result as CandleResult, Tensor};
use candle_nn::{layer_norm, linear, linear_no_bias, LayerNorm, Linear, VarBuilder};

use crate::error::{ModelError, Result};
use crate::unet::multi_head_attention;
use crate::weights::WeightStore;

/// Which image projection a file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProjectionKind {
    /// `ImageProjModel`: CLIP `image_embeds` → `tokens` tokens (ip-adapter_sd15, _light, _sdxl).
    Plain { tokens: usize },
    /// Perceiver resampler over the penultimate hidden states (ip-adapter-plus, plus-face).
    Resampler {
        tokens: usize,
        dim: usize,
        heads: usize,
        depth: usize,
    },
    /// `MLPProjModel` over every penultimate token (ip-adapter-full-face).
    FullFace,
}

impl ProjectionKind {
    pub fn name(&self) -> &'static str {
        match self {
            ProjectionKind::Plain { .. } => "plain",
            ProjectionKind::Resampler { .. } => "plus (resampler)",
            ProjectionKind::FullFace => "full-face (MLP)",
        }
    }

    /// Plain adapters read the projected `image_embeds`; the others the penultimate states.
    pub fn uses_penultimate(&self) -> bool {
        !matches!(self, ProjectionKind::Plain { .. })
    }
}

/// What a file is, read from its header without loading tensors.
#[derive(Debug, Clone)]
pub struct IpAdapterInfo {
    pub file: PathBuf,
    pub projection: ProjectionKind,
    /// Width of the image features the projection expects (CLIP projection or hidden size).
    pub image_feature_width: usize,
    /// The UNet's cross-attention width the adapter was made for (768 SD1.5, 2048 SDXL).
    pub cross_attention_dim: usize,
    /// Query width of each cross-attention layer, in diffusers' `attn_processors` order.
    pub layer_channels: Vec<usize>,
    pub dtype: DType,
}

/// How the file spells its two groups.
struct Layout {
    proj: &'static str,
    layers: &'static str,
}

const LAYOUTS: [Layout; 2] = [
    Layout {
        proj: "image_proj.",
        layers: "ip_adapter.",
    },
    Layout {
        proj: "image_proj_model.",
        layers: "adapter_modules.",
    },
];

fn open_store(path: &Path) -> Result<WeightStore> {
    let pickle = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("bin" | "pt" | "pth" | "ckpt")
    );
    if pickle {
        WeightStore::open_pickle_groups(path, &["image_proj", "ip_adapter"])
    } else {
        WeightStore::open(&[path.to_path_buf()])
    }
}

fn detect_layout(store: &WeightStore, path: &Path) -> Result<&'static Layout> {
    let names = store.tensor_names();
    LAYOUTS
        .iter()
        .find(|l| names.iter().any(|n| n.starts_with(l.layers)))
        .ok_or_else(|| {
            let sample: Vec<_> = names.iter().take(5).cloned().collect();
            ModelError::Weights(format!(
                "{}: not an IP-Adapter file: no `ip_adapter.*` (or `adapter_modules.*`) tensors (found e.g. {sample:?})",
                path.display()
            ))
        })
}

fn shape_of(store: &WeightStore, name: &str, path: &Path) -> Result<Vec<usize>> {
    store.shape(name).ok_or_else(|| {
        ModelError::Weights(format!("{}: tensor `{name}` is missing", path.display()))
    })
}

/// Reads an IP-Adapter file's header and says what it is; refuses kinds not supported.
pub fn inspect(path: &Path) -> Result<IpAdapterInfo> {
    let store = open_store(path)?;
    let layout = detect_layout(&store, path)?;
    inspect_store(&store, layout, path)
}

fn inspect_store(store: &WeightStore, layout: &Layout, path: &Path) -> Result<IpAdapterInfo> {
    let proj = |name: &str| format!("{}{name}", layout.proj);
    let has = |name: &str| store.shape(&proj(name)).is_some();
    let mut layer_keys: Vec<usize> = store
        .tensor_names()
        .iter()
        .filter_map(|n| {
            let rest = n.strip_prefix(layout.layers)?;
            let index = rest.strip_suffix(".to_k_ip.weight")?;
            index.parse().ok()
        })
        .collect();
    layer_keys.sort_unstable();
    let expected: Vec<usize> = (0..layer_keys.len()).map(|i| 2 * i + 1).collect();
    if layer_keys.is_empty() || layer_keys != expected {
        return Err(ModelError::Weights(format!(
            "{}: IP-Adapter layer keys should be 1, 3, 5, …; found {layer_keys:?}",
            path.display()
        )));
    }
    let mut layer_channels = Vec::with_capacity(layer_keys.len());
    let mut cross_attention_dim = 0;
    for key in &layer_keys {
        let k = shape_of(
            store,
            &format!("{}{key}.to_k_ip.weight", layout.layers),
            path,
        )?;
        let v = shape_of(
            store,
            &format!("{}{key}.to_v_ip.weight", layout.layers),
            path,
        )?;
        if k.len() != 2 || k != v {
            return Err(ModelError::Weights(format!(
                "{}: layer {key}: to_k_ip {k:?} and to_v_ip {v:?} should be equal 2-D shapes",
                path.display()
            )));
        }
        layer_channels.push(k[0]);
        cross_attention_dim = k[1];
    }
    let dtype = store
        .dtype(&format!("{}1.to_k_ip.weight", layout.layers))
        .unwrap_or(DType::F32);

    let (projection, image_feature_width) = if has("proj.weight") {
        let w = shape_of(store, &proj("proj.weight"), path)?;
        if w[0] % cross_attention_dim != 0 {
            return Err(ModelError::Weights(format!(
                "{}: `proj.weight` {w:?} is not a multiple of the cross-attention width {cross_attention_dim}",
                path.display()
            )));
        }
        (
            ProjectionKind::Plain {
                tokens: w[0] / cross_attention_dim,
            },
            w[1],
        )
    } else if has("proj.3.weight") {
        let w = shape_of(store, &proj("proj.0.weight"), path)?;
        (ProjectionKind::FullFace, w[1])
    } else if has("perceiver_resampler.proj_in.weight") {
        return Err(unsupported(
            path,
            "FaceID-Plus",
            "it needs an insightface face-recognition embedding in addition to the CLIP image",
        ));
    } else if has("norm.weight") {
        return Err(unsupported(
            path,
            "FaceID",
            "it takes an insightface face-recognition embedding, not a CLIP image",
        ));
    } else if has("latents") {
        let latents = shape_of(store, &proj("latents"), path)?;
        let proj_in = shape_of(store, &proj("proj_in.weight"), path)?;
        let to_q = shape_of(store, &proj("layers.0.0.to_q.weight"), path)?;
        let depth = (0..)
            .take_while(|l| has(&format!("layers.{l}.0.to_q.weight")))
            .count();
        (
            ProjectionKind::Resampler {
                tokens: latents[1],
                dim: latents[2],
                heads: (to_q[0] / RESAMPLER_HEAD_DIM).max(1),
                depth,
            },
            proj_in[1],
        )
    } else {
        return Err(ModelError::Weights(format!(
            "{}: unknown IP-Adapter image projection (no proj.weight, proj.3.weight or latents)",
            path.display()
        )));
    };
    Ok(IpAdapterInfo {
        file: path.to_path_buf(),
        projection,
        image_feature_width,
        cross_attention_dim,
        layer_channels,
        dtype,
    })
}

fn unsupported(path: &Path, kind: &str, why: &str) -> ModelError {
    ModelError::Weights(format!(
        "{}: this is an IP-Adapter {kind} file, which is not supported: {why}",
        path.display()
    ))
}

/// diffusers and the original code fix the resampler's head width at 64.
const RESAMPLER_HEAD_DIM: usize = 64;

struct ResamplerLayer {
    norm_features: LayerNorm,
    norm_latents: LayerNorm,
    to_q: Linear,
    to_kv: Linear,
    to_out: Linear,
    ff_norm: LayerNorm,
    ff_up: Linear,
    ff_down: Linear,
}

enum Projection {
    Plain {
        proj: Linear,
        norm: LayerNorm,
        tokens: usize,
    },
    Resampler {
        latents: Tensor,
        proj_in: Linear,
        layers: Vec<ResamplerLayer>,
        proj_out: Linear,
        norm_out: LayerNorm,
        heads: usize,
    },
    FullFace {
        up: Linear,
        down: Linear,
        norm: LayerNorm,
    },
}

impl Projection {
    fn new(vb: VarBuilder, kind: &ProjectionKind, e: usize, d: usize) -> CandleResult<Self> {
        Ok(match kind {
            ProjectionKind::Plain { tokens } => Projection::Plain {
                proj: linear(e, tokens * d, vb.pp("proj"))?,
                norm: layer_norm(d, 1e-5, vb.pp("norm"))?,
                tokens: *tokens,
            },
            ProjectionKind::FullFace => Projection::FullFace {
                up: linear(e, e, vb.pp("proj.0"))?,
                down: linear(e, d, vb.pp("proj.2"))?,
                norm: layer_norm(d, 1e-5, vb.pp("proj.3"))?,
            },
            ProjectionKind::Resampler {
                tokens,
                dim,
                heads,
                depth,
            } => {
                let inner = heads * RESAMPLER_HEAD_DIM;
                let layers = (0..*depth)
                    .map(|l| {
                        let vb = vb.pp("layers").pp(l);
                        Ok(ResamplerLayer {
                            norm_features: layer_norm(*dim, 1e-5, vb.pp("0.norm1"))?,
                            norm_latents: layer_norm(*dim, 1e-5, vb.pp("0.norm2"))?,
                            to_q: linear_no_bias(*dim, inner, vb.pp("0.to_q"))?,
                            to_kv: linear_no_bias(*dim, 2 * inner, vb.pp("0.to_kv"))?,
                            to_out: linear_no_bias(inner, *dim, vb.pp("0.to_out"))?,
                            ff_norm: layer_norm(*dim, 1e-5, vb.pp("1.0"))?,
                            ff_up: linear_no_bias(*dim, 4 * dim, vb.pp("1.1"))?,
                            ff_down: linear_no_bias(4 * dim, *dim, vb.pp("1.3"))?,
                        })
                    })
                    .collect::<CandleResult<Vec<_>>>()?;
                Projection::Resampler {
                    latents: vb.get((1, *tokens, *dim), "latents")?,
                    proj_in: linear(e, *dim, vb.pp("proj_in"))?,
                    layers,
                    proj_out: linear(*dim, d, vb.pp("proj_out"))?,
                    norm_out: layer_norm(d, 1e-5, vb.pp("norm_out"))?,
                    heads: *heads,
                }
            }
        })
    }

    fn forward(&self, features: &Tensor) -> CandleResult<Tensor> {
        match self {
            Projection::Plain { proj, norm, tokens } => {
                let b = features.dim(0)?;
                let y = proj.forward(features)?;
                let d = y.dim(1)? / tokens;
                norm.forward(&y.reshape((b, *tokens, d))?)
            }
            Projection::FullFace { up, down, norm } => {
                norm.forward(&down.forward(&up.forward(features)?.gelu_erf()?)?)
            }
            Projection::Resampler {
                latents,
                proj_in,
                layers,
                proj_out,
                norm_out,
                heads,
            } => {
                let b = features.dim(0)?;
                let x = proj_in.forward(features)?;
                let (_, t, dim) = latents.dims3()?;
                let mut lat = latents.broadcast_as((b, t, dim))?.contiguous()?;
                for layer in layers {
                    let xn = layer.norm_features.forward(&x)?;
                    let ln = layer.norm_latents.forward(&lat)?;
                    let q = layer.to_q.forward(&ln)?;
                    let kv = layer.to_kv.forward(&Tensor::cat(&[&xn, &ln], 1)?)?;
                    let inner = q.dim(2)?;
                    let k = kv.narrow(2, 0, inner)?.contiguous()?;
                    let v = kv.narrow(2, inner, inner)?.contiguous()?;
                    let attn = multi_head_attention(&q, &k, &v, *heads)?;
                    lat = (layer.to_out.forward(&attn)? + lat)?;
                    let ff = layer.ff_down.forward(
                        &layer
                            .ff_up
                            .forward(&layer.ff_norm.forward(&lat)?)?
                            .gelu_erf()?,
                    )?;
                    lat = (ff + lat)?;
                }
                norm_out.forward(&proj_out.forward(&lat)?)
            }
        }
    }
}

/// A loaded IP-Adapter: image projection plus one key/value projection pair per layer.
pub struct IpAdapter {
    projection: Projection,
    to_k_ip: Vec<Linear>,
    to_v_ip: Vec<Linear>,
    info: IpAdapterInfo,
}

impl IpAdapter {
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let store = open_store(path)?;
        let layout = detect_layout(&store, path)?;
        let info = inspect_store(&store, layout, path)?;
        let vb = store.var_builder(dtype, device);
        let d = info.cross_attention_dim;
        let projection = Projection::new(
            vb.pp(layout.proj.trim_end_matches('.')),
            &info.projection,
            info.image_feature_width,
            d,
        )?;
        let layers = vb.pp(layout.layers.trim_end_matches('.'));
        let mut to_k_ip = Vec::new();
        let mut to_v_ip = Vec::new();
        for (i, &c) in info.layer_channels.iter().enumerate() {
            let key = 2 * i + 1;
            to_k_ip.push(linear_no_bias(d, c, layers.pp(format!("{key}.to_k_ip")))?);
            to_v_ip.push(linear_no_bias(d, c, layers.pp(format!("{key}.to_v_ip")))?);
        }
        Ok(Self {
            projection,
            to_k_ip,
            to_v_ip,
            info,
        })
    }

    pub fn info(&self) -> &IpAdapterInfo {
        &self.info
    }

    /// Image tokens `[B, T, D]` from encoder features: `[B, E]` image embeddings for plain
    /// adapters, `[B, tokens, E]` penultimate hidden states otherwise.
    pub fn image_tokens(&self, features: &Tensor) -> Result<Tensor> {
        Ok(self.projection.forward(features)?)
    }

    /// Every layer's `(key, value)` for the given tokens `[B, N, D]`, in layer order.
    pub fn layer_key_values(&self, tokens: &Tensor) -> Result<Vec<(Tensor, Tensor)>> {
        self.to_k_ip
            .iter()
            .zip(&self.to_v_ip)
            .map(|(k, v)| Ok((k.forward(tokens)?, v.forward(tokens)?)))
            .collect()
    }
}
