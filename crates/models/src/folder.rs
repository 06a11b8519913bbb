//! A diffusers pipeline folder on disk (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
//! `tokenizer/`, `scheduler/`), as users have it after downloading e.g.
//! stable-diffusion-v1-5/stable-diffusion-v1-5.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::clip_text::{ClipTextConfig, ClipTextModel};
use crate::error::{ModelError, Result};
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

    pub fn scheduler_config_path(&self) -> PathBuf {
        self.component("scheduler").join("scheduler_config.json")
    }

    pub fn tokenizer(&self) -> Result<ClipTokenizer> {
        ClipTokenizer::from_folder(&self.component("tokenizer"))
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

    /// The weight files of `unet` or `text_encoder`, unpatched (their names and shapes).
    pub fn component_weights(&self, component: &str) -> Result<WeightStore> {
        match component {
            "text_encoder" => self.text_encoder_store(),
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

    fn text_encoder_store(&self) -> Result<WeightStore> {
        let dir = self.component("text_encoder");
        match find_component_weights(&dir, "model", self.variant.as_deref()) {
            Ok(files) => WeightStore::open(&files),
            Err(_) => WeightStore::open(&find_component_weights(
                &dir,
                "pytorch_model",
                self.variant.as_deref(),
            )?),
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
            .text_encoder_store()?
            .with_patches(self.patches.get("text_encoder").cloned());
        Ok(ClipTextModel::new(
            store.var_builder(dtype, device),
            config,
        )?)
    }
}
