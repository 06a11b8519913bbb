//! Depth Anything V2 (relative or metric depth from one image): a DINOv2 backbone, the DPT-style
//! neck (reassemble + fusion) and the depth head, as transformers 5.24's
//! `DepthAnythingForDepthEstimation` computes them.
//!
//! Written here rather than reusing candle-transformers 0.11's `depth_anything_v2` + `dinov2`
//! because that DINOv2 hard-codes LayerNorm eps 1e-5 (the checkpoints use 1e-6), image size 518,
//! the tanh GELU approximation (DINOv2 uses exact erf GELU), and requires the 1000-class `head`
//! tensors that the depth checkpoints do not contain.
//!
//! Two weight layouts load (see [`load_depth_anything`]):
//!
//! - transformers: a folder with `config.json` + `model.safetensors` (e.g.
//!   `depth-anything/Depth-Anything-V2-Small-hf`), keys `backbone.*`, `neck.*`, `head.*`, with
//!   the hub's `attention.attention.query` names or transformers 5's `attention.q_proj` names;
//! - the original release files `depth_anything_v2_vits.pth` / `vitb` / `vitl` (keys
//!   `pretrained.*`, `depth_head.*`, fused `attn.qkv`), renamed by transformers'
//!   `convert_depth_anything_to_hf.py` table. The size is read from `pretrained.cls_token`.
//!
//! Position embeddings: the two implementations interpolate DINOv2's position-embedding grid
//! differently when the input is not square (bicubic, A = -0.75, no antialias, both).
//! transformers samples with `size=(h, w)`, i.e. scale `M / h`; the original repository passes
//! `scale_factor=((h + 0.1) / M, (w + 0.1) / M)`, i.e. scale `M / (h + 0.1)`. On the fixture the
//! outputs differ by 4% of their range, so [`PosEmbedInterpolation`] follows the file:
//! transformers folders interpolate as transformers, original `.pth` files as the original
//! (which is what the ControlNet annotators run).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{
    conv2d, conv2d_no_bias, conv_transpose2d, layer_norm, linear, linear_no_bias, Conv2d,
    Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig, LayerNorm, Linear, VarBuilder,
};
use serde::Deserialize;

use crate::error::{read_json, ModelError};
use crate::unet::winograd::Conv3x3;
use crate::weights::WeightStore;

/// `relative` ends the head with a ReLU (inverse relative depth: near = large); `metric` with a
/// sigmoid times `max_depth` (metres: near = small).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DepthEstimationType {
    Relative,
    Metric,
}

/// How the position embeddings are resampled to the input's patch grid (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PosEmbedInterpolation {
    /// transformers' `Dinov2Embeddings.interpolate_pos_encoding`: `size=(h, w)`.
    Transformers,
    /// The original DINOv2 / Depth-Anything-V2 code: `scale_factor=((h + 0.1) / M, (w + 0.1) / M)`.
    Original,
}

/// The public Depth Anything V2 sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DepthAnythingVariant {
    /// `vits`, `depth-anything/Depth-Anything-V2-Small-hf`.
    Small,
    /// `vitb`, `depth-anything/Depth-Anything-V2-Base-hf`.
    Base,
    /// `vitl`, `depth-anything/Depth-Anything-V2-Large-hf`.
    Large,
}

impl DepthAnythingVariant {
    /// The variant whose DINOv2 width is `hidden_size` (384, 768, 1024).
    pub fn from_hidden_size(hidden_size: usize) -> Option<Self> {
        match hidden_size {
            384 => Some(Self::Small),
            768 => Some(Self::Base),
            1024 => Some(Self::Large),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Small => "vits",
            Self::Base => "vitb",
            Self::Large => "vitl",
        }
    }

    /// The hub config of the `-hf` checkpoint. The original repository's intermediate layers
    /// (`vits`/`vitb` `[2, 5, 8, 11]`, `vitl` `[4, 11, 17, 23]`, 0-based blocks) are these
    /// `out_indices` minus one (transformers counts the embeddings as hidden state 0).
    pub fn config(self) -> DepthAnythingConfig {
        let (hidden, layers, heads, out_indices, neck, fusion) = match self {
            Self::Small => (384, 12, 6, [3, 6, 9, 12], [48, 96, 192, 384], 64),
            Self::Base => (768, 12, 12, [3, 6, 9, 12], [96, 192, 384, 768], 128),
            Self::Large => (1024, 24, 16, [5, 12, 18, 24], [256, 512, 1024, 1024], 256),
        };
        DepthAnythingConfig {
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            mlp_ratio: 4.0,
            patch_size: 14,
            image_size: 518,
            layer_norm_eps: 1e-6,
            qkv_bias: true,
            apply_layernorm: true,
            out_indices: out_indices.to_vec(),
            reassemble_hidden_size: hidden,
            reassemble_factors: vec![4.0, 2.0, 1.0, 0.5],
            neck_hidden_sizes: neck.to_vec(),
            fusion_hidden_size: fusion,
            head_in_index: -1,
            head_hidden_size: 32,
            depth_estimation_type: DepthEstimationType::Relative,
            max_depth: 1.0,
            pos_embed_interpolation: PosEmbedInterpolation::Transformers,
        }
    }
}

/// Everything that shapes the network: transformers' `DepthAnythingConfig` with its nested
/// `Dinov2Config` flattened in.
#[derive(Debug, Clone, PartialEq)]
pub struct DepthAnythingConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// MLP width = `int(hidden_size * mlp_ratio)`.
    pub mlp_ratio: f64,
    pub patch_size: usize,
    /// The position-embedding grid is `image_size / patch_size` on a side (37 for 518).
    pub image_size: usize,
    pub layer_norm_eps: f64,
    pub qkv_bias: bool,
    /// The backbone's final LayerNorm on every output stage.
    pub apply_layernorm: bool,
    /// Hidden states handed to the neck; 0 is the embeddings, `i` is layer `i`'s output.
    pub out_indices: Vec<usize>,
    pub reassemble_hidden_size: usize,
    pub reassemble_factors: Vec<f64>,
    pub neck_hidden_sizes: Vec<usize>,
    pub fusion_hidden_size: usize,
    pub head_in_index: i64,
    pub head_hidden_size: usize,
    pub depth_estimation_type: DepthEstimationType,
    pub max_depth: f64,
    pub pos_embed_interpolation: PosEmbedInterpolation,
}

#[derive(Deserialize)]
struct RawBackbone {
    #[serde(default)]
    model_type: Option<String>,
    // transformers writes nested configs as a diff against `Dinov2Config()`'s defaults (the
    // ViT-B/14 sizes), so the hub's Base config may omit all three.
    #[serde(default = "default_hidden")]
    hidden_size: usize,
    #[serde(default = "default_layers_heads")]
    num_hidden_layers: usize,
    #[serde(default = "default_layers_heads")]
    num_attention_heads: usize,
    #[serde(default = "default_mlp_ratio")]
    mlp_ratio: f64,
    #[serde(default = "default_patch")]
    patch_size: usize,
    #[serde(default = "default_image_size")]
    image_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default = "default_true")]
    qkv_bias: bool,
    #[serde(default = "default_true")]
    apply_layernorm: bool,
    #[serde(default)]
    use_swiglu_ffn: bool,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default)]
    out_indices: Option<Vec<usize>>,
    #[serde(default)]
    out_features: Option<Vec<String>>,
    #[serde(default = "default_channels")]
    num_channels: usize,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    model_type: Option<String>,
    backbone_config: Option<RawBackbone>,
    #[serde(default = "default_patch")]
    patch_size: usize,
    reassemble_hidden_size: Option<usize>,
    #[serde(default = "default_factors")]
    reassemble_factors: Vec<f64>,
    #[serde(default = "default_neck")]
    neck_hidden_sizes: Vec<usize>,
    #[serde(default = "default_fusion")]
    fusion_hidden_size: usize,
    #[serde(default = "default_head_in")]
    head_in_index: i64,
    #[serde(default = "default_head_hidden")]
    head_hidden_size: usize,
    #[serde(default = "default_type")]
    depth_estimation_type: DepthEstimationType,
    #[serde(default)]
    max_depth: Option<f64>,
}

fn default_hidden() -> usize {
    768
}
fn default_layers_heads() -> usize {
    12
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_patch() -> usize {
    14
}
fn default_image_size() -> usize {
    518
}
fn default_eps() -> f64 {
    1e-6
}
fn default_true() -> bool {
    true
}
fn default_act() -> String {
    "gelu".to_string()
}
fn default_channels() -> usize {
    3
}
fn default_factors() -> Vec<f64> {
    vec![4.0, 2.0, 1.0, 0.5]
}
fn default_neck() -> Vec<usize> {
    vec![48, 96, 192, 384]
}
fn default_fusion() -> usize {
    64
}
fn default_head_in() -> i64 {
    -1
}
fn default_head_hidden() -> usize {
    32
}
fn default_type() -> DepthEstimationType {
    DepthEstimationType::Relative
}

impl DepthAnythingConfig {
    /// Reads a transformers `DepthAnythingConfig` `config.json`.
    pub fn from_file(path: &Path) -> crate::error::Result<Self> {
        let json: serde_json::Value = read_json(path, "a Depth Anything config")?;
        let bad = |message: String| ModelError::Config {
            path: path.to_path_buf(),
            message,
        };
        let raw: RawConfig = serde_json::from_value(json).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            what: "a Depth Anything config",
            source,
        })?;
        if let Some(kind) = raw.model_type.as_deref() {
            if kind != "depth_anything" {
                return Err(bad(format!(
                    "`model_type` is \"{kind}\", expected \"depth_anything\" (a transformers DepthAnythingForDepthEstimation config)"
                )));
            }
        }
        let bb = raw.backbone_config.ok_or_else(|| {
            bad("no `backbone_config` (expected a DINOv2 backbone config)".to_string())
        })?;
        if let Some(kind) = bb.model_type.as_deref() {
            if kind != "dinov2" {
                return Err(bad(format!(
                    "backbone `model_type` is \"{kind}\", only \"dinov2\" is supported"
                )));
            }
        }
        if bb.use_swiglu_ffn {
            return Err(bad(
                "`use_swiglu_ffn` backbones (ViT-g) are not supported".to_string()
            ));
        }
        if bb.hidden_act != "gelu" {
            return Err(bad(format!(
                "backbone `hidden_act` \"{}\" is not supported (expected \"gelu\")",
                bb.hidden_act
            )));
        }
        if bb.num_channels != 3 {
            return Err(bad(format!(
                "backbone `num_channels` {} is not supported (expected 3)",
                bb.num_channels
            )));
        }
        let out_indices = match (bb.out_indices, bb.out_features) {
            (Some(indices), _) => indices,
            (None, Some(features)) => features
                .iter()
                .map(|f| {
                    f.strip_prefix("stage")
                        .and_then(|n| n.parse::<usize>().ok())
                        .ok_or_else(|| bad(format!("backbone out feature \"{f}\" is not `stageN`")))
                })
                .collect::<crate::error::Result<Vec<_>>>()?,
            (None, None) => vec![bb.num_hidden_layers],
        };
        let config = Self {
            hidden_size: bb.hidden_size,
            num_hidden_layers: bb.num_hidden_layers,
            num_attention_heads: bb.num_attention_heads,
            mlp_ratio: bb.mlp_ratio,
            patch_size: bb.patch_size,
            image_size: bb.image_size,
            layer_norm_eps: bb.layer_norm_eps,
            qkv_bias: bb.qkv_bias,
            apply_layernorm: bb.apply_layernorm,
            out_indices,
            reassemble_hidden_size: raw.reassemble_hidden_size.unwrap_or(bb.hidden_size),
            reassemble_factors: raw.reassemble_factors,
            neck_hidden_sizes: raw.neck_hidden_sizes,
            fusion_hidden_size: raw.fusion_hidden_size,
            head_in_index: raw.head_in_index,
            head_hidden_size: raw.head_hidden_size,
            depth_estimation_type: raw.depth_estimation_type,
            // transformers multiplies by `max_depth` in both modes; hub configs of relative
            // models carry `null`, which transformers' default (1) replaces.
            max_depth: raw.max_depth.unwrap_or(1.0),
            pos_embed_interpolation: PosEmbedInterpolation::Transformers,
        };
        if raw.patch_size != config.patch_size {
            return Err(bad(format!(
                "`patch_size` {} differs from the backbone's {}",
                raw.patch_size, config.patch_size
            )));
        }
        config.validate().map_err(bad)?;
        Ok(config)
    }

    /// Checks the relations between the fields that the network relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "`hidden_size` {} is not a multiple of `num_attention_heads` {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.patch_size == 0 || self.image_size < self.patch_size {
            return Err(format!(
                "`image_size` {} must be at least `patch_size` {} (> 0)",
                self.image_size, self.patch_size
            ));
        }
        let n = self.out_indices.len();
        if n == 0 || self.reassemble_factors.len() != n || self.neck_hidden_sizes.len() != n {
            return Err(format!(
                "{} out_indices, {} reassemble_factors and {} neck_hidden_sizes must be equal in number and non-zero",
                n,
                self.reassemble_factors.len(),
                self.neck_hidden_sizes.len()
            ));
        }
        if let Some(&i) = self
            .out_indices
            .iter()
            .find(|&&i| i > self.num_hidden_layers)
        {
            return Err(format!(
                "out index {i} is past the {} layers",
                self.num_hidden_layers
            ));
        }
        for &f in &self.reassemble_factors {
            let ok = if f > 1.0 {
                f.fract() == 0.0
            } else if f < 1.0 {
                f > 0.0 && (1.0 / f).fract() == 0.0
            } else {
                true
            };
            if !ok {
                return Err(format!(
                    "reassemble factor {f} is neither an integer, 1, nor 1/integer"
                ));
            }
        }
        if self.head_index().is_none() {
            return Err(format!(
                "`head_in_index` {} is outside the {n} fusion outputs",
                self.head_in_index
            ));
        }
        if self.fusion_hidden_size < 2 {
            return Err("`fusion_hidden_size` must be at least 2".to_string());
        }
        Ok(())
    }

    fn head_index(&self) -> Option<usize> {
        let n = self.neck_hidden_sizes.len() as i64;
        let i = if self.head_in_index < 0 {
            n + self.head_in_index
        } else {
            self.head_in_index
        };
        (0..n).contains(&i).then_some(i as usize)
    }

    fn intermediate_size(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }

    fn grid_side(&self) -> usize {
        self.image_size / self.patch_size
    }
}

struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
}

impl Attention {
    /// `vb` at the layer. Accepts the hub names (`attention.attention.query`,
    /// `attention.output.dense`), transformers 5's (`attention.q_proj`, `attention.o_proj`) and
    /// the original fused `attention.qkv` (reached through the original-layout renamer).
    fn new(vb: VarBuilder, cfg: &DepthAnythingConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let lin = |vb: VarBuilder, i: usize, o: usize, bias: bool| {
            if bias {
                linear(i, o, vb)
            } else {
                linear_no_bias(i, o, vb)
            }
        };
        let a = vb.pp("attention");
        let (qkv, proj) = if a.contains_tensor("qkv.weight") {
            (
                lin(a.pp("qkv"), h, 3 * h, cfg.qkv_bias)?,
                linear(h, h, a.pp("output.dense"))?,
            )
        } else {
            let (q, k, v, o) = if a.contains_tensor("q_proj.weight") {
                (
                    a.pp("q_proj"),
                    a.pp("k_proj"),
                    a.pp("v_proj"),
                    a.pp("o_proj"),
                )
            } else {
                let s = a.pp("attention");
                (
                    s.pp("query"),
                    s.pp("key"),
                    s.pp("value"),
                    a.pp("output.dense"),
                )
            };
            let parts = [q, k, v]
                .into_iter()
                .map(|vb| lin(vb, h, h, cfg.qkv_bias))
                .collect::<Result<Vec<_>>>()?;
            let weight = Tensor::cat(&parts.iter().map(|l| l.weight()).collect::<Vec<_>>(), 0)?;
            let bias = if cfg.qkv_bias {
                let biases = parts
                    .iter()
                    .filter_map(|l| l.bias())
                    .cloned()
                    .collect::<Vec<_>>();
                Some(Tensor::cat(&biases, 0)?)
            } else {
                None
            };
            (Linear::new(weight, bias), linear(h, h, o)?)
        };
        Ok(Self {
            qkv,
            proj,
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let c = xs.dim(D::Minus1)?;
        let qkv = self.qkv.forward(xs)?;
        // [B, N, heads·d] each, as the UNet's attention takes them (fused on the CPU).
        let part = |i: usize| qkv.narrow(D::Minus1, i * c, c)?.contiguous();
        let out = crate::unet::multi_head_attention(&part(0)?, &part(1)?, &part(2)?, self.heads)?;
        self.proj.forward(&out)
    }
}

struct Layer {
    norm1: LayerNorm,
    attention: Attention,
    layer_scale1: Tensor,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_scale2: Tensor,
}

impl Layer {
    fn new(vb: VarBuilder, cfg: &DepthAnythingConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        Ok(Self {
            norm1: layer_norm(h, eps, vb.pp("norm1"))?,
            attention: Attention::new(vb.clone(), cfg)?,
            layer_scale1: vb.get(h, "layer_scale1.lambda1")?,
            norm2: layer_norm(h, eps, vb.pp("norm2"))?,
            fc1: linear(h, cfg.intermediate_size(), vb.pp("mlp.fc1"))?,
            fc2: linear(cfg.intermediate_size(), h, vb.pp("mlp.fc2"))?,
            layer_scale2: vb.get(h, "layer_scale2.lambda1")?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let a = self.attention.forward(&self.norm1.forward(xs)?)?;
        let xs = (a.broadcast_mul(&self.layer_scale1)? + xs)?;
        let m = self.fc1.forward(&self.norm2.forward(&xs)?)?.gelu_erf()?;
        let m = self.fc2.forward(&m)?;
        m.broadcast_mul(&self.layer_scale2)? + xs
    }
}

/// transformers' `Dinov2Backbone` with `reshape_hidden_states = false`.
struct Backbone {
    patch_embeddings: Conv2d,
    cls_token: Tensor,
    /// `[1 + M·M, hidden]`, kept on the host in f32 for the interpolation.
    position_embeddings: Vec<f32>,
    layers: Vec<Layer>,
    layernorm: Option<LayerNorm>,
    cfg: DepthAnythingConfig,
}

impl Backbone {
    fn new(vb: VarBuilder, cfg: &DepthAnythingConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let patch_cfg = Conv2dConfig {
            stride: cfg.patch_size,
            ..Default::default()
        };
        let side = cfg.grid_side();
        let positions = emb
            .get((1, side * side + 1, h), "position_embeddings")?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(vb.pp("encoder.layer").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let layernorm = if cfg.apply_layernorm {
            Some(layer_norm(h, cfg.layer_norm_eps, vb.pp("layernorm"))?)
        } else {
            None
        };
        Ok(Self {
            patch_embeddings: conv2d(
                3,
                h,
                cfg.patch_size,
                patch_cfg,
                emb.pp("patch_embeddings.projection"),
            )?,
            cls_token: emb.get((1, 1, h), "cls_token")?,
            position_embeddings: positions,
            layers,
            layernorm,
            cfg: cfg.clone(),
        })
    }

    /// Position embeddings for an `height × width` pixel input, `[1, 1 + ph·pw, hidden]`.
    fn position_embeddings(
        &self,
        height: usize,
        width: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let h = self.cfg.hidden_size;
        let m = self.cfg.grid_side();
        let (ph, pw) = (height / self.cfg.patch_size, width / self.cfg.patch_size);
        let data = if ph * pw == m * m && height == width {
            self.position_embeddings.clone()
        } else {
            let (sy, sx) = match self.cfg.pos_embed_interpolation {
                PosEmbedInterpolation::Transformers => (m as f64 / ph as f64, m as f64 / pw as f64),
                PosEmbedInterpolation::Original => (
                    1.0 / ((ph as f64 + 0.1) / m as f64),
                    1.0 / ((pw as f64 + 0.1) / m as f64),
                ),
            };
            let grid = &self.position_embeddings[h..];
            let mut out = self.position_embeddings[..h].to_vec();
            out.extend(bicubic_tokens(grid, m, m, h, ph, pw, sy, sx));
            out
        };
        Tensor::from_vec(data, (1, 1 + ph * pw, h), device)?.to_dtype(dtype)
    }

    /// The selected hidden states, `[B, 1 + ph·pw, hidden]` each (class token first).
    fn forward(&self, pixel_values: &Tensor) -> Result<Vec<Tensor>> {
        let (b, _, height, width) = pixel_values.dims4()?;
        let patches = self
            .patch_embeddings
            .forward(pixel_values)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let cls = self
            .cls_token
            .broadcast_as((b, 1, self.cfg.hidden_size))?
            .to_dtype(patches.dtype())?;
        let tokens = Tensor::cat(&[&cls, &patches], 1)?;
        let pos = self.position_embeddings(height, width, tokens.dtype(), tokens.device())?;
        let mut xs = tokens.broadcast_add(&pos)?;
        let mut states = vec![xs.clone()];
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
            states.push(xs.clone());
        }
        self.cfg
            .out_indices
            .iter()
            .map(|&i| match &self.layernorm {
                Some(norm) => norm.forward(&states[i]),
                None => Ok(states[i].clone()),
            })
            .collect()
    }
}

/// torch's `interpolate(mode="bicubic", align_corners=False, antialias=False)` of a channels-last
/// `[in_h, in_w, c]` grid to `[out_h, out_w, c]`, with source scales `scale_y`/`scale_x`
/// (`src = scale · (dst + 0.5) - 0.5`, taps `floor(src) - 1 ..= floor(src) + 2` clamped to the
/// edges, Keys' cubic with A = -0.75). Computed in f64.
#[allow(clippy::too_many_arguments)]
fn bicubic_tokens(
    grid: &[f32],
    in_h: usize,
    in_w: usize,
    c: usize,
    out_h: usize,
    out_w: usize,
    scale_y: f64,
    scale_x: f64,
) -> Vec<f32> {
    let taps = |in_size: usize, out_size: usize, scale: f64| -> Vec<([usize; 4], [f64; 4])> {
        (0..out_size)
            .map(|o| {
                let real = scale * (o as f64 + 0.5) - 0.5;
                let floor = real.floor();
                let t = real - floor;
                let idx = |j: i64| (floor as i64 - 1 + j).clamp(0, in_size as i64 - 1) as usize;
                ([idx(0), idx(1), idx(2), idx(3)], cubic_coefficients(t))
            })
            .collect()
    };
    let ys = taps(in_h, out_h, scale_y);
    let xs = taps(in_w, out_w, scale_x);
    // Horizontal pass: [in_h, out_w, c].
    let mut horizontal = vec![0f64; in_h * out_w * c];
    for y in 0..in_h {
        for (ox, (ix, wx)) in xs.iter().enumerate() {
            let dst = &mut horizontal[(y * out_w + ox) * c..(y * out_w + ox + 1) * c];
            for (&i, &w) in ix.iter().zip(wx) {
                let src = &grid[(y * in_w + i) * c..(y * in_w + i + 1) * c];
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d += w * s as f64;
                }
            }
        }
    }
    let mut out = vec![0f32; out_h * out_w * c];
    let mut acc = vec![0f64; c];
    for (oy, (iy, wy)) in ys.iter().enumerate() {
        for ox in 0..out_w {
            acc.iter_mut().for_each(|a| *a = 0.0);
            for (&i, &w) in iy.iter().zip(wy) {
                let src = &horizontal[(i * out_w + ox) * c..(i * out_w + ox + 1) * c];
                for (a, &s) in acc.iter_mut().zip(src) {
                    *a += w * s;
                }
            }
            let dst = &mut out[(oy * out_w + ox) * c..(oy * out_w + ox + 1) * c];
            for (d, &a) in dst.iter_mut().zip(&acc) {
                *d = a as f32;
            }
        }
    }
    out
}

/// Keys' cubic convolution weights for taps at offsets -1, 0, 1, 2 from `floor`, A = -0.75.
fn cubic_coefficients(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

enum Resize {
    Up(ConvTranspose2d),
    Identity,
    Down(Conv2d),
}

struct ReassembleLayer {
    projection: Conv2d,
    resize: Resize,
}

impl ReassembleLayer {
    fn new(
        vb: VarBuilder,
        cfg: &DepthAnythingConfig,
        channels: usize,
        factor: f64,
    ) -> Result<Self> {
        let projection = conv2d(
            cfg.reassemble_hidden_size,
            channels,
            1,
            Default::default(),
            vb.pp("projection"),
        )?;
        let resize = if factor > 1.0 {
            let k = factor as usize;
            let c = ConvTranspose2dConfig {
                stride: k,
                ..Default::default()
            };
            Resize::Up(conv_transpose2d(channels, channels, k, c, vb.pp("resize"))?)
        } else if factor == 1.0 {
            Resize::Identity
        } else {
            let c = Conv2dConfig {
                stride: (1.0 / factor) as usize,
                padding: 1,
                ..Default::default()
            };
            Resize::Down(conv2d(channels, channels, 3, c, vb.pp("resize"))?)
        };
        Ok(Self { projection, resize })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.projection.forward(xs)?;
        match &self.resize {
            Resize::Up(conv) => conv.forward(&xs),
            Resize::Identity => Ok(xs),
            Resize::Down(conv) => conv.forward(&xs),
        }
    }
}

/// A 3×3, padding-1 convolution: Winograd on the CPU in f32 (the DPT head's convolutions at
/// up to 518×518 were most of the map's time through candle's conv2d), candle's otherwise.
fn conv3x3(in_c: usize, out_c: usize, vb: VarBuilder) -> Result<Conv3x3> {
    Conv3x3::new(in_c, out_c, 1, vb)
}

/// `DepthAnythingPreActResidualLayer`: `x + conv2(relu(conv1(relu(x))))`.
struct ResidualUnit {
    convolution1: Conv3x3,
    convolution2: Conv3x3,
}

impl ResidualUnit {
    fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        Ok(Self {
            convolution1: conv3x3(c, c, vb.pp("convolution1"))?,
            convolution2: conv3x3(c, c, vb.pp("convolution2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.convolution1.forward(&xs.relu()?)?;
        let h = self.convolution2.forward(&h.relu()?)?;
        h + xs
    }
}

struct FusionLayer {
    projection: Conv2d,
    residual_layer1: ResidualUnit,
    residual_layer2: ResidualUnit,
}

impl FusionLayer {
    fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        Ok(Self {
            projection: conv2d(c, c, 1, Default::default(), vb.pp("projection"))?,
            residual_layer1: ResidualUnit::new(vb.pp("residual_layer1"), c)?,
            residual_layer2: ResidualUnit::new(vb.pp("residual_layer2"), c)?,
        })
    }

    /// `size`: the next (larger) feature map's `(h, w)`; `None` doubles.
    fn forward(
        &self,
        xs: &Tensor,
        residual: Option<&Tensor>,
        size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        if let Some(residual) = residual {
            let (_, _, h, w) = xs.dims4()?;
            let residual = if residual.dims() != xs.dims() {
                residual.upsample_bilinear2d(h, w, false)?
            } else {
                residual.clone()
            };
            xs = (xs + self.residual_layer1.forward(&residual)?)?;
        }
        let xs = self.residual_layer2.forward(&xs)?;
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let xs = xs.upsample_bilinear2d(th, tw, true)?;
        self.projection.forward(&xs)
    }
}

struct Neck {
    reassemble: Vec<ReassembleLayer>,
    convs: Vec<Conv2d>,
    fusion: Vec<FusionLayer>,
}

impl Neck {
    fn new(vb: VarBuilder, cfg: &DepthAnythingConfig) -> Result<Self> {
        let reassemble = cfg
            .neck_hidden_sizes
            .iter()
            .zip(&cfg.reassemble_factors)
            .enumerate()
            .map(|(i, (&c, &f))| {
                ReassembleLayer::new(vb.pp("reassemble_stage.layers").pp(i), cfg, c, f)
            })
            .collect::<Result<Vec<_>>>()?;
        let conv_cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let convs = cfg
            .neck_hidden_sizes
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                conv2d_no_bias(c, cfg.fusion_hidden_size, 3, conv_cfg, vb.pp("convs").pp(i))
            })
            .collect::<Result<Vec<_>>>()?;
        let fusion = (0..cfg.neck_hidden_sizes.len())
            .map(|i| FusionLayer::new(vb.pp("fusion_stage.layers").pp(i), cfg.fusion_hidden_size))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            reassemble,
            convs,
            fusion,
        })
    }

    fn forward(&self, hidden: &[Tensor], ph: usize, pw: usize) -> Result<Vec<Tensor>> {
        let mut features = Vec::with_capacity(hidden.len());
        for ((state, layer), conv) in hidden.iter().zip(&self.reassemble).zip(&self.convs) {
            let (b, _, c) = state.dims3()?;
            let grid = state
                .narrow(1, 1, ph * pw)?
                .reshape((b, ph, pw, c))?
                .permute((0, 3, 1, 2))?
                .contiguous()?;
            features.push(conv.forward(&layer.forward(&grid)?)?);
        }
        features.reverse();
        let mut fused: Vec<Tensor> = Vec::with_capacity(features.len());
        for (i, (feature, layer)) in features.iter().zip(&self.fusion).enumerate() {
            let size = match features.get(i + 1) {
                Some(next) => {
                    let (_, _, h, w) = next.dims4()?;
                    Some((h, w))
                }
                None => None,
            };
            let out = match fused.last() {
                None => layer.forward(feature, None, size)?,
                Some(previous) => layer.forward(previous, Some(feature), size)?,
            };
            fused.push(out);
        }
        Ok(fused)
    }
}

struct Head {
    conv1: Conv3x3,
    conv2: Conv3x3,
    conv3: Conv2d,
    kind: DepthEstimationType,
    max_depth: f64,
    patch_size: usize,
}

impl Head {
    fn new(vb: VarBuilder, cfg: &DepthAnythingConfig) -> Result<Self> {
        let f = cfg.fusion_hidden_size;
        Ok(Self {
            conv1: conv3x3(f, f / 2, vb.pp("conv1"))?,
            conv2: conv3x3(f / 2, cfg.head_hidden_size, vb.pp("conv2"))?,
            conv3: conv2d(
                cfg.head_hidden_size,
                1,
                1,
                Default::default(),
                vb.pp("conv3"),
            )?,
            kind: cfg.depth_estimation_type,
            max_depth: cfg.max_depth,
            patch_size: cfg.patch_size,
        })
    }

    fn forward(&self, xs: &Tensor, ph: usize, pw: usize) -> Result<Tensor> {
        let xs = self.conv1.forward(xs)?;
        let xs = xs.upsample_bilinear2d(ph * self.patch_size, pw * self.patch_size, true)?;
        let xs = self.conv2.forward(&xs)?.relu()?;
        let xs = self.conv3.forward(&xs)?;
        let xs = match self.kind {
            DepthEstimationType::Relative => xs.relu()?,
            DepthEstimationType::Metric => candle_nn::ops::sigmoid(&xs)?,
        };
        (xs * self.max_depth)?.squeeze(1)
    }
}

/// transformers' `DepthAnythingForDepthEstimation`.
pub struct DepthAnything {
    backbone: Backbone,
    neck: Neck,
    head: Head,
    config: DepthAnythingConfig,
    head_index: usize,
    device: Device,
    dtype: DType,
}

impl DepthAnything {
    /// `vb` at the model root, with transformers' names (`backbone.*`, `neck.*`, `head.*`).
    pub fn new(vb: VarBuilder, cfg: &DepthAnythingConfig) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        let head_index = cfg
            .head_index()
            .ok_or_else(|| candle_core::Error::Msg("bad head_in_index".to_string()))?;
        Ok(Self {
            backbone: Backbone::new(vb.pp("backbone"), cfg)?,
            neck: Neck::new(vb.pp("neck"), cfg)?,
            head: Head::new(vb.pp("head"), cfg)?,
            config: cfg.clone(),
            head_index,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

    pub fn config(&self) -> &DepthAnythingConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `pixel_values` `[B, 3, H, W]`, ImageNet-normalised, `H` and `W` multiples of the patch
    /// size; returns `predicted_depth` `[B, H, W]`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = pixel_values.dims4()?;
        let p = self.config.patch_size;
        if c != 3 || !h.is_multiple_of(p) || !w.is_multiple_of(p) || h == 0 || w == 0 {
            return Err(candle_core::Error::Msg(format!(
                "Depth Anything input must be [B, 3, H, W] with H and W positive multiples of {p}, got {:?}",
                pixel_values.dims()
            )));
        }
        let pixel_values = pixel_values.to_dtype(self.dtype)?;
        let hidden = self.backbone.forward(&pixel_values)?;
        let (ph, pw) = (h / p, w / p);
        let fused = self.neck.forward(&hidden, ph, pw)?;
        self.head.forward(&fused[self.head_index], ph, pw)
    }
}

/// Which layout a Depth Anything weight file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DepthAnythingFormat {
    /// transformers `DepthAnythingForDepthEstimation` names.
    Transformers,
    /// The original Depth-Anything-V2 release (`pretrained.*`, `depth_head.*`).
    Original,
}

/// Detects the layout of `store`'s tensors, or says what was expected.
fn detect_format(store: &WeightStore, path: &Path) -> crate::error::Result<DepthAnythingFormat> {
    if store.shape("pretrained.cls_token").is_some() {
        Ok(DepthAnythingFormat::Original)
    } else if store.shape("backbone.embeddings.cls_token").is_some() {
        Ok(DepthAnythingFormat::Transformers)
    } else {
        let names = store.tensor_names();
        let mut sample: Vec<&String> = names.iter().take(3).collect();
        sample.sort();
        Err(ModelError::Config {
            path: path.to_path_buf(),
            message: format!(
                "not a Depth Anything V2 checkpoint: expected the original release's `pretrained.cls_token` (depth_anything_v2_vit*.pth) or a transformers DepthAnythingForDepthEstimation's `backbone.embeddings.cls_token`; found {} tensors such as {:?}",
                names.len(),
                sample
            ),
        })
    }
}

/// The transformers name (hub layout) → the original release's name, after transformers'
/// `convert_depth_anything_to_hf.py` table; the fused `attention.qkv` maps to `attn.qkv`.
pub fn original_name(name: &str) -> String {
    let map_layer = |rest: &str| -> String {
        let table = [
            ("layer_scale1.lambda1", "ls1.gamma"),
            ("layer_scale2.lambda1", "ls2.gamma"),
            ("attention.qkv.", "attn.qkv."),
            ("attention.output.dense.", "attn.proj."),
        ];
        for (from, to) in table {
            if let Some(tail) = rest.strip_prefix(from) {
                return format!("{to}{tail}");
            }
        }
        rest.to_string()
    };
    let split_index = |rest: &str| -> Option<(usize, String)> {
        let (i, tail) = rest.split_once('.')?;
        Some((i.parse().ok()?, tail.to_string()))
    };
    if let Some(rest) = name.strip_prefix("backbone.embeddings.") {
        return match rest {
            "cls_token" => "pretrained.cls_token".to_string(),
            "mask_token" => "pretrained.mask_token".to_string(),
            "position_embeddings" => "pretrained.pos_embed".to_string(),
            _ => match rest.strip_prefix("patch_embeddings.projection.") {
                Some(tail) => format!("pretrained.patch_embed.proj.{tail}"),
                None => name.to_string(),
            },
        };
    }
    if let Some((i, tail)) = name
        .strip_prefix("backbone.encoder.layer.")
        .and_then(split_index)
    {
        return format!("pretrained.blocks.{i}.{}", map_layer(&tail));
    }
    if let Some(tail) = name.strip_prefix("backbone.layernorm.") {
        return format!("pretrained.norm.{tail}");
    }
    if let Some((i, tail)) = name
        .strip_prefix("neck.reassemble_stage.layers.")
        .and_then(split_index)
    {
        if let Some(t) = tail.strip_prefix("projection.") {
            return format!("depth_head.projects.{i}.{t}");
        }
        if let Some(t) = tail.strip_prefix("resize.") {
            return format!("depth_head.resize_layers.{i}.{t}");
        }
    }
    if let Some((i, tail)) = name.strip_prefix("neck.convs.").and_then(split_index) {
        return format!("depth_head.scratch.layer{}_rn.{tail}", i + 1);
    }
    if let Some((j, tail)) = name
        .strip_prefix("neck.fusion_stage.layers.")
        .and_then(split_index)
    {
        let refinenet = 4usize.saturating_sub(j);
        let tail = if let Some(t) = tail.strip_prefix("projection.") {
            format!("out_conv.{t}")
        } else if let Some(t) = tail.strip_prefix("residual_layer") {
            // `1.convolution2.weight` → `resConfUnit1.conv2.weight`
            format!("resConfUnit{}", t.replace(".convolution", ".conv"))
        } else {
            tail
        };
        return format!("depth_head.scratch.refinenet{refinenet}.{tail}");
    }
    for (from, to) in [
        ("head.conv1.", "depth_head.scratch.output_conv1."),
        ("head.conv2.", "depth_head.scratch.output_conv2.0."),
        ("head.conv3.", "depth_head.scratch.output_conv2.2."),
    ] {
        if let Some(tail) = name.strip_prefix(from) {
            return format!("{to}{tail}");
        }
    }
    name.to_string()
}

/// The config of an original-layout file, from its tensor shapes: the width
/// (`pretrained.cls_token`) picks the variant; the grid, block count and neck widths are
/// checked against it.
fn original_config(store: &WeightStore, path: &Path) -> crate::error::Result<DepthAnythingConfig> {
    let bad = |message: String| ModelError::Config {
        path: path.to_path_buf(),
        message,
    };
    let width = store
        .shape("pretrained.cls_token")
        .and_then(|s| s.last().copied())
        .unwrap_or(0);
    let variant = DepthAnythingVariant::from_hidden_size(width).ok_or_else(|| {
        bad(format!(
            "Depth Anything V2 original checkpoint with width {width} (`pretrained.cls_token`); expected 384 (vits), 768 (vitb) or 1024 (vitl); ViT-g is not supported. Pass a config for other sizes"
        ))
    })?;
    let mut config = variant.config();
    config.pos_embed_interpolation = PosEmbedInterpolation::Original;
    // The metric releases (`depth_anything_v2_metric_{hypersim,vkitti}_vitl.pth`) have the same
    // tensors; only the name tells them apart, as in the annotators. Their head ends in a
    // sigmoid times `max_depth` (20 m indoor / hypersim, 80 m outdoor / vkitti).
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if file_name.contains("metric") {
        config.depth_estimation_type = DepthEstimationType::Metric;
        config.max_depth = if file_name.contains("vkitti") {
            80.0
        } else {
            20.0
        };
    }
    let blocks = (0..)
        .take_while(|i| {
            store
                .shape(&format!("pretrained.blocks.{i}.norm1.weight"))
                .is_some()
        })
        .count();
    if blocks != config.num_hidden_layers {
        return Err(bad(format!(
            "{} checkpoint has {blocks} blocks, expected {}",
            variant.name(),
            config.num_hidden_layers
        )));
    }
    for (i, &expected) in config.neck_hidden_sizes.iter().enumerate() {
        let found = store
            .shape(&format!("depth_head.projects.{i}.weight"))
            .and_then(|s| s.first().copied());
        if found != Some(expected) {
            return Err(bad(format!(
                "{} checkpoint: `depth_head.projects.{i}.weight` has {found:?} outputs, expected {expected} (a metric or fine-tuned variant with other widths needs a config)",
                variant.name()
            )));
        }
    }
    if let Some(positions) = store
        .shape("pretrained.pos_embed")
        .and_then(|s| s.get(1).copied())
    {
        let side = ((positions.saturating_sub(1)) as f64).sqrt().round() as usize;
        if side * side + 1 == positions {
            config.image_size = side * config.patch_size;
        }
    }
    Ok(config)
}

/// A loaded checkpoint's parts, before the network is built.
pub struct DepthAnythingFiles {
    pub weights: PathBuf,
    pub format: DepthAnythingFormat,
    pub config: DepthAnythingConfig,
}

/// Finds the weights and config of a Depth Anything V2 checkpoint:
///
/// - a folder with `config.json` and `model.safetensors` (or `pytorch_model.bin`), or either of
///   those files (the config is read from beside it);
/// - an original `depth_anything_v2_vit{s,b,l}.pth` (the size comes from the tensor shapes; a
///   file name containing `metric` selects the metric head, `vkitti` its 80 m range).
pub fn resolve_depth_anything(
    path: &Path,
) -> crate::error::Result<(WeightStore, DepthAnythingFiles)> {
    let folder_weights = |dir: &Path| -> crate::error::Result<PathBuf> {
        let files = crate::weights::find_component_weights(dir, "model", None)
            .or_else(|_| crate::weights::find_component_weights(dir, "pytorch_model", None))?;
        match files.as_slice() {
            [one] => Ok(one.clone()),
            _ => Err(ModelError::Weights(format!(
                "{}: sharded Depth Anything weights are not supported",
                dir.display()
            ))),
        }
    };
    let (weights, config_path) = if path.is_dir() {
        (folder_weights(path)?, Some(path.join("config.json")))
    } else if path.file_name().and_then(|n| n.to_str()) == Some("config.json") {
        let dir = path.parent().unwrap_or(Path::new("."));
        (folder_weights(dir)?, Some(path.to_path_buf()))
    } else {
        let beside = path.parent().map(|d| d.join("config.json"));
        (path.to_path_buf(), beside.filter(|c| c.is_file()))
    };
    let store = WeightStore::open(std::slice::from_ref(&weights))?;
    let format = detect_format(&store, &weights)?;
    let config = match format {
        DepthAnythingFormat::Original => original_config(&store, &weights)?,
        DepthAnythingFormat::Transformers => {
            let config_path = config_path.filter(|c| c.is_file()).ok_or_else(|| {
                ModelError::Config {
                    path: weights.clone(),
                    message: "transformers-layout Depth Anything weights need their config.json beside them".to_string(),
                }
            })?;
            DepthAnythingConfig::from_file(&config_path)?
        }
    };
    Ok((
        store,
        DepthAnythingFiles {
            weights,
            format,
            config,
        },
    ))
}

/// Builds the network over a weight store in either layout.
pub fn build_depth_anything(
    store: WeightStore,
    format: DepthAnythingFormat,
    config: &DepthAnythingConfig,
    dtype: DType,
    device: &Device,
) -> crate::error::Result<DepthAnything> {
    let vb = store.var_builder(dtype, device);
    let vb = match format {
        DepthAnythingFormat::Transformers => vb,
        DepthAnythingFormat::Original => vb.rename_f(original_name),
    };
    Ok(DepthAnything::new(vb, config)?)
}

/// Loads a Depth Anything V2 checkpoint (see [`resolve_depth_anything`] for what `path` may be).
/// transformers folders use transformers' position-embedding interpolation, original `.pth`
/// files the original's.
pub fn load_depth_anything(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> crate::error::Result<DepthAnything> {
    let (store, files) = resolve_depth_anything(path)?;
    build_depth_anything(store, files.format, &files.config, dtype, device)
}

/// Loads an original-layout `.pth` (or any layout) with an explicit config, for sizes the shape
/// detection does not know. The config is used as given, `pos_embed_interpolation` included
/// (set it to [`PosEmbedInterpolation::Original`] to reproduce the original code).
pub fn load_depth_anything_with_config(
    path: &Path,
    config: &DepthAnythingConfig,
    dtype: DType,
    device: &Device,
) -> crate::error::Result<DepthAnything> {
    let store = WeightStore::open(&[path.to_path_buf()])?;
    let format = detect_format(&store, path)?;
    build_depth_anything(store, format, config, dtype, device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config in the shape of the hub's `Depth-Anything-V2-Small-hf/config.json` (transformers
    /// 4.x era: `out_features` and `out_indices`, `max_depth` null, extra keys).
    const HUB_SMALL: &str = r#"{
      "architectures": ["DepthAnythingForDepthEstimation"],
      "backbone": null,
      "backbone_config": {
        "architectures": ["Dinov2Model"], "hidden_size": 384, "image_size": 518,
        "model_type": "dinov2", "num_attention_heads": 6,
        "out_features": ["stage3", "stage6", "stage9", "stage12"],
        "reshape_hidden_states": false, "torch_dtype": "float32"
      },
      "depth_estimation_type": "relative", "fusion_hidden_size": 64, "head_hidden_size": 32,
      "head_in_index": -1, "max_depth": null, "model_type": "depth_anything",
      "neck_hidden_sizes": [48, 96, 192, 384], "patch_size": 14,
      "reassemble_factors": [4, 2, 1, 0.5], "reassemble_hidden_size": 384,
      "torch_dtype": "float32", "transformers_version": "4.42.0.dev0", "use_pretrained_backbone": false
    }"#;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ipcompose-depth-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn hub_config_reads_as_the_small_preset() {
        let path = write("hub", HUB_SMALL);
        let config = DepthAnythingConfig::from_file(&path).unwrap();
        assert_eq!(config, DepthAnythingVariant::Small.config());
        // Base: every backbone size is Dinov2Config's default and may be left out.
        let base = HUB_SMALL
            .replace("\"hidden_size\": 384, ", "")
            .replace("\"num_attention_heads\": 6,", "")
            .replace("[48, 96, 192, 384]", "[96, 192, 384, 768]")
            .replace("\"fusion_hidden_size\": 64", "\"fusion_hidden_size\": 128")
            .replace(
                "\"reassemble_hidden_size\": 384",
                "\"reassemble_hidden_size\": 768",
            );
        let config = DepthAnythingConfig::from_file(&write("hub-base", &base)).unwrap();
        assert_eq!(config, DepthAnythingVariant::Base.config());
    }

    #[test]
    fn config_errors_name_the_file() {
        let path = write(
            "swiglu",
            &HUB_SMALL.replace(
                "\"hidden_size\": 384,",
                "\"hidden_size\": 384, \"use_swiglu_ffn\": true,",
            ),
        );
        let message = DepthAnythingConfig::from_file(&path)
            .unwrap_err()
            .to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("use_swiglu_ffn"), "{message}");
    }

    #[test]
    fn cubic_weights_sum_to_one_and_interpolate() {
        for t in [0.0, 0.25, 0.5, 0.9] {
            let w = cubic_coefficients(t);
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
        assert_eq!(cubic_coefficients(0.0), [0.0, 1.0, 0.0, 0.0]);
        // Same size with scale 1 is the identity.
        let grid: Vec<f32> = (0..12).map(|v| v as f32).collect();
        assert_eq!(bicubic_tokens(&grid, 2, 3, 2, 2, 3, 1.0, 1.0), grid);
    }
}
