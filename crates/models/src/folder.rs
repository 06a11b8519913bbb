//! A diffusers pipeline folder on disk (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
//! `tokenizer/`, `scheduler/`, and for SDXL `text_encoder_2/`, `tokenizer_2/`), as users have it
//! after downloading e.g. stable-diffusion-v1-5/stable-diffusion-v1-5 or
//! stabilityai/stable-diffusion-xl-base-1.0.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use serde::Deserialize;

use crate::clip_text::{ClipTextConfig, ClipTextModel, ClipTextModelWithProjection};
use crate::error::{read_json, ModelError, Result};
use crate::tokenizer::ClipTokenizer;
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{Vae, VaeConfig};
use crate::weights::{find_component_weights, WeightStore};

#[derive(Debug, Clone)]
pub struct DiffusersFolder {
    root: PathBuf,
    /// Weight file variant to prefer, e.g. `fp16` for `*.fp16.safetensors`.
    pub variant: Option<String>,
    /// LoRA updates per component (`unet`, `text_encoder`), added to the weights as they load.
    patches: std::collections::BTreeMap<String, std::sync::Arc<crate::lora::WeightPatches>>,
}

const COMPONENTS: [&str; 5] = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"];

/// The fields of `model_index.json` the pipelines read.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelIndex {
    /// e.g. `StableDiffusionPipeline`, `StableDiffusionXLPipeline`.
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// SDXL: an absent negative prompt gives zero embeddings instead of the encoding of "".
    /// diffusers' `StableDiffusionXLPipeline` defaults it to true.
    #[serde(default)]
    pub force_zeros_for_empty_prompt: Option<bool>,
}

impl DiffusersFolder {
    /// Checks that `root` looks like a diffusers Stable Diffusion folder; names what is missing.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(ModelError::Io {
                path: root.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "model folder not found (expected a diffusers folder with model_index.json)",
                ),
            });
        }
        let missing: Vec<&str> = COMPONENTS
            .iter()
            .copied()
            .filter(|c| !root.join(c).is_dir())
            .collect();
        if !missing.is_empty() {
            return Err(ModelError::Config {
                path: root.to_path_buf(),
                message: format!(
                    "not a diffusers Stable Diffusion folder: missing sub-folder(s) {}",
                    missing.join(", ")
                ),
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
            variant: None,
            patches: Default::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn component(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn unet_config(&self) -> Result<UNetConfig> {
        UNetConfig::from_file(&self.component("unet").join("config.json"))
    }

    pub fn vae_config(&self) -> Result<VaeConfig> {
        VaeConfig::from_file(&self.component("vae").join("config.json"))
    }

    pub fn text_encoder_config(&self) -> Result<ClipTextConfig> {
        ClipTextConfig::from_file(&self.component("text_encoder").join("config.json"))
    }

    /// Whether the folder has a sub-folder `name` (e.g. SDXL's `text_encoder_2`).
    pub fn has_component(&self, name: &str) -> bool {
        self.component(name).is_dir()
    }

    /// `model_index.json`; a folder without one reads as an empty index.
    pub fn model_index(&self) -> Result<ModelIndex> {
        let path = self.root.join("model_index.json");
        if !path.is_file() {
            return Ok(ModelIndex {
                class_name: None,
                force_zeros_for_empty_prompt: None,
            });
        }
        read_json(&path, "a diffusers model_index.json")
    }

    /// SDXL's second text encoder config (`text_encoder_2/config.json`), which must name its
    /// `projection_dim`.
    pub fn text_encoder_2_config(&self) -> Result<ClipTextConfig> {
        let path = self.component("text_encoder_2").join("config.json");
        let config = ClipTextConfig::from_file(&path)?;
        if config.projection_dim.is_none() {
            return Err(ModelError::Config {
                path,
                message:
                    "the second text encoder (CLIPTextModelWithProjection) needs `projection_dim`"
                        .to_string(),
            });
        }
        Ok(config)
    }

    pub fn scheduler_config_path(&self) -> PathBuf {
        self.component("scheduler").join("scheduler_config.json")
    }

    pub fn tokenizer(&self) -> Result<ClipTokenizer> {
        self.tokenizer_in("tokenizer")
    }

    /// SDXL's second tokenizer (`tokenizer_2/`, padding with `!`).
    pub fn tokenizer_2(&self) -> Result<ClipTokenizer> {
        self.tokenizer_in("tokenizer_2")
    }

    fn tokenizer_in(&self, component: &str) -> Result<ClipTokenizer> {
        ClipTokenizer::from_folder(&self.component(component))
            .map_err(|e| ModelError::Weights(e.to_string()))
    }

    fn weights(&self, component: &str, stem: &str) -> Result<WeightStore> {
        let files =
            find_component_weights(&self.component(component), stem, self.variant.as_deref())?;
        Ok(WeightStore::open(&files)?.with_patches(self.patches.get(component).cloned()))
    }

    /// This folder with LoRA `patches` added to `component`'s weights (`unet`,
    /// `text_encoder`) as they load.
    pub fn with_patches(
        &self,
        component: &str,
        patches: std::sync::Arc<crate::lora::WeightPatches>,
    ) -> Self {
        let mut folder = self.clone();
        folder.patches.insert(component.to_string(), patches);
        folder
    }

    /// The weight files of `unet`, `text_encoder` or `text_encoder_2`, unpatched (their names and shapes).
    pub fn component_weights(&self, component: &str) -> Result<WeightStore> {
        match component {
            "text_encoder" | "text_encoder_2" => self.text_encoder_weights(component),
            other => {
                let files = find_component_weights(
                    &self.component(other),
                    "diffusion_pytorch_model",
                    self.variant.as_deref(),
                )?;
                WeightStore::open(&files)
            }
        }
    }

    pub fn load_unet(
        &self,
        config: &UNetConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<UNet2DConditionModel> {
        let vb = self
            .weights("unet", "diffusion_pytorch_model")?
            .var_builder(dtype, device);
        Ok(UNet2DConditionModel::new(vb, config)?)
    }

    pub fn load_vae(&self, config: &VaeConfig, dtype: DType, device: &Device) -> Result<Vae> {
        let vb = self
            .weights("vae", "diffusion_pytorch_model")?
            .var_builder(dtype, device);
        Ok(Vae::new(vb, config)?)
    }

    pub fn load_text_encoder(
        &self,
        config: &ClipTextConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<ClipTextModel> {
        let store = self
            .text_encoder_weights("text_encoder")?
            .with_patches(self.patches.get("text_encoder").cloned());
        Ok(ClipTextModel::new(
            store.var_builder(dtype, device),
            config,
        )?)
    }

    /// SDXL's `text_encoder_2` (`CLIPTextModelWithProjection`).
    pub fn load_text_encoder_2(
        &self,
        config: &ClipTextConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<ClipTextModelWithProjection> {
        let store = self
            .text_encoder_weights("text_encoder_2")?
            .with_patches(self.patches.get("text_encoder_2").cloned());
        Ok(ClipTextModelWithProjection::new(
            store.var_builder(dtype, device),
            config,
        )?)
    }

    /// transformers' `model*.safetensors`, else `pytorch_model*.bin`.
    fn text_encoder_weights(&self, component: &str) -> Result<WeightStore> {
        let dir = self.component(component);
        match find_component_weights(&dir, "model", self.variant.as_deref()) {
            Ok(files) => WeightStore::open(&files),
            Err(_) => WeightStore::open(&find_component_weights(
                &dir,
                "pytorch_model",
                self.variant.as_deref(),
            )?),
        }
    }
}
