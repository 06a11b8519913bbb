//! Weight files (safetensors, memory-mapped; PyTorch pickles) behind one candle
//! `VarBuilder` backend whose errors name the file, the tensor and both shapes.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::error::{ModelError, Result};

enum Container {
    Safetensors(candle_core::safetensors::MmapedSafetensors),
    /// Sub-dictionaries of one pickle, each seen under a name prefix (`""` for a flat file).
    Pickle(Vec<(String, candle_core::pickle::PthTensors)>),
    /// A legacy (pre-1.6, non-zip) PyTorch file, read whole.
    Loaded(std::collections::HashMap<String, Tensor>),
}

/// A set of weight files read as one namespace of tensors, optionally with LoRA updates added
/// to the weights as they load (the files stay untouched).
pub struct WeightStore {
    container: Container,
    files: Vec<PathBuf>,
    patches: Option<std::sync::Arc<crate::lora::WeightPatches>>,
}

fn is_pickle(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("bin" | "pt" | "pth" | "ckpt")
    )
}

impl WeightStore {
    /// Opens one or more safetensors files, or a single PyTorch pickle.
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        let first = files
            .first()
            .ok_or_else(|| ModelError::Weights("no weight files given".to_string()))?;
        for file in files {
            if !file.is_file() {
                return Err(ModelError::Io {
                    path: file.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
                });
            }
        }
        let container = if is_pickle(first) {
            if files.len() > 1 {
                return Err(ModelError::Weights(format!(
                    "{}: sharded PyTorch pickles are not supported",
                    first.display()
                )));
            }
            if crate::legacy_pth::is_legacy(first) {
                let tensors = crate::legacy_pth::read(first).map_err(|e| {
                    ModelError::Weights(format!(
                        "{}: not a readable (legacy) PyTorch file: {e}",
                        first.display()
                    ))
                })?;
                Container::Loaded(tensors)
            } else {
                let pth = open_pickle(first, None)?;
                Container::Pickle(vec![(String::new(), pth)])
            }
        } else {
            // SAFETY: the files are opened read-only and not modified while mapped.
            let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }.map_err(
                |e| {
                    ModelError::Weights(format!(
                        "{}: not a readable safetensors file: {e}",
                        first.display()
                    ))
                },
            )?;
            Container::Safetensors(st)
        };
        Ok(Self {
            container,
            files: files.to_vec(),
            patches: None,
        })
    }

    /// The same files with `patches` added to the weights they name as they load.
    pub fn with_patches(
        mut self,
        patches: Option<std::sync::Arc<crate::lora::WeightPatches>>,
    ) -> Self {
        self.patches = patches.filter(|p| !p.is_empty());
        self
    }

    /// Opens a PyTorch pickle holding a dict of dicts (e.g. IP-Adapter's
    /// `{"image_proj": {...}, "ip_adapter": {...}}`): each named group is exposed as
    /// `group.tensor_name`; absent groups are skipped.
    pub fn open_pickle_groups(path: &Path, groups: &[&str]) -> Result<Self> {
        let mut parts = Vec::new();
        for group in groups {
            if let Ok(pth) = candle_core::pickle::PthTensors::new(path, Some(group)) {
                parts.push((format!("{group}."), pth));
            }
        }
        if parts.is_empty() {
            parts.push((String::new(), open_pickle(path, None)?));
        }
        Ok(Self {
            container: Container::Pickle(parts),
            files: vec![path.to_path_buf()],
            patches: None,
        })
    }

    /// Opens a PyTorch checkpoint whose tensors sit under `state_dict` (`.ckpt` files), or at
    /// the top level.
    pub fn open_pickle_state_dict(path: &Path) -> Result<Self> {
        let pth = match candle_core::pickle::PthTensors::new(path, Some("state_dict")) {
            Ok(p) if !p.tensor_infos().is_empty() => p,
            _ => open_pickle(path, None)?,
        };
        Ok(Self {
            container: Container::Pickle(vec![(String::new(), pth)]),
            files: vec![path.to_path_buf()],
            patches: None,
        })
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    fn describe_files(&self) -> String {
        self.files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Names of every tensor in the files.
    pub fn tensor_names(&self) -> Vec<String> {
        match &self.container {
            Container::Safetensors(st) => st.tensors().into_iter().map(|(n, _)| n).collect(),
            Container::Pickle(parts) => parts
                .iter()
                .flat_map(|(prefix, p)| {
                    p.tensor_infos().keys().map(move |k| format!("{prefix}{k}"))
                })
                .collect(),
            Container::Loaded(t) => t.keys().cloned().collect(),
        }
    }

    /// The shape of a tensor, read from the file's header (no data is loaded).
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match &self.container {
            Container::Safetensors(st) => st.get(name).ok().map(|v| v.shape().to_vec()),
            Container::Pickle(parts) => parts.iter().find_map(|(prefix, p)| {
                let inner = name.strip_prefix(prefix.as_str())?;
                p.tensor_infos()
                    .get(inner)
                    .map(|i| i.layout.shape().dims().to_vec())
            }),
            Container::Loaded(t) => t.get(name).map(|t| t.dims().to_vec()),
        }
    }

    /// The stored dtype of a tensor, from the header.
    pub fn dtype(&self, name: &str) -> Option<DType> {
        match &self.container {
            Container::Safetensors(st) => st
                .get(name)
                .ok()
                .and_then(|v| DType::try_from(v.dtype()).ok()),
            Container::Pickle(parts) => parts.iter().find_map(|(prefix, p)| {
                let inner = name.strip_prefix(prefix.as_str())?;
                p.tensor_infos().get(inner).map(|i| i.dtype)
            }),
            Container::Loaded(t) => t.get(name).map(|t| t.dtype()),
        }
    }

    fn load(&self, name: &str, device: &Device) -> candle_core::Result<Option<Tensor>> {
        match &self.container {
            Container::Safetensors(st) => {
                if st.get(name).is_err() {
                    return Ok(None);
                }
                st.load(name, device).map(Some)
            }
            Container::Pickle(parts) => {
                for (prefix, p) in parts {
                    if let Some(inner) = name.strip_prefix(prefix.as_str()) {
                        if let Some(t) = p.get(inner)? {
                            return t.to_device(device).map(Some);
                        }
                    }
                }
                Ok(None)
            }
            Container::Loaded(t) => t.get(name).map(|t| t.to_device(device)).transpose(),
        }
    }

    /// A `VarBuilder` over these files; tensors are converted to `dtype` on load.
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

impl SimpleBackend for WeightStore {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.shape() != &shape {
            return Err(candle_core::Error::Msg(format!(
                "{}: tensor `{name}` has shape {:?}, but the config expects {:?}",
                self.describe_files(),
                tensor.dims(),
                shape.dims()
            )));
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.load(name, dev)? {
            Some(t) => match &self.patches {
                Some(patches) => patches.apply(name, t)?.to_dtype(dtype),
                None => t.to_dtype(dtype),
            },
            None => Err(candle_core::Error::Msg(format!(
                "{}: tensor `{name}` is missing",
                self.describe_files()
            ))),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match &self.container {
            Container::Safetensors(st) => st.get(name).is_ok(),
            Container::Pickle(parts) => parts.iter().any(|(prefix, p)| {
                name.strip_prefix(prefix.as_str())
                    .is_some_and(|inner| p.tensor_infos().contains_key(inner))
            }),
            Container::Loaded(t) => t.contains_key(name),
        }
    }
}

fn open_pickle(path: &Path, key: Option<&str>) -> Result<candle_core::pickle::PthTensors> {
    candle_core::pickle::PthTensors::new(path, key).map_err(|e| {
        ModelError::Weights(format!(
            "{}: not a readable PyTorch file: {e}",
            path.display()
        ))
    })
}

/// Finds the weight file(s) of a diffusers component folder: safetensors first (optionally the
/// `variant` files such as `*.fp16.safetensors`, sharded with an index), then PyTorch `.bin`.
pub fn find_component_weights(
    dir: &Path,
    stem: &str,
    variant: Option<&str>,
) -> Result<Vec<PathBuf>> {
    let mut candidates: Vec<String> = Vec::new();
    let variants: Vec<Option<&str>> = match variant {
        Some(v) => vec![Some(v), None],
        None => vec![None, Some("fp16")],
    };
    for v in &variants {
        for ext in ["safetensors", "bin"] {
            let name = match v {
                Some(v) => format!("{stem}.{v}.{ext}"),
                None => format!("{stem}.{ext}"),
            };
            let path = dir.join(&name);
            if path.is_file() {
                return Ok(vec![path]);
            }
            let index = dir.join(format!("{name}.index.json"));
            if index.is_file() {
                return read_shard_index(&index, dir);
            }
            candidates.push(name);
        }
    }
    Err(ModelError::MissingWeights {
        path: dir.to_path_buf(),
        looked_for: candidates.join(", "),
    })
}

fn read_shard_index(index: &Path, dir: &Path) -> Result<Vec<PathBuf>> {
    let json: serde_json::Value = crate::error::read_json(index, "a sharded weight index")?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Config {
            path: index.to_path_buf(),
            message: "missing `weight_map`".to_string(),
        })?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}
