//! What a recipe needs from one repository, and which of the repository's files that is.
//!
//! A request names paths inside a repository and what they are (a diffusers pipeline folder,
//! one model folder, or a single file). [`Item::wants`] turns that into files: the configs
//! and the weights the loaders read, chosen by the loaders' own rule (`variant` first, then
//! plain; safetensors before `.bin`; a sharded index and its shards). The same wants are
//! checked against a cached snapshot ([`crate::cache::check`]) and matched against the hub's
//! listing ([`select`]), so what is downloaded is what the loaders open.

use std::collections::BTreeSet;

use crate::error::{HubError, Result};
use crate::listing::Listing;

/// What a folder in a repository is.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Shape {
    /// A diffusers pipeline folder: `model_index.json`, `scheduler/`, `tokenizer/`,
    /// `text_encoder/`, `unet/`, `vae/` (and `tokenizer_2/`, `text_encoder_2/` with a second
    /// encoder). `weights: false` takes the configs and tokenizers only (the base folder of a
    /// single-file checkpoint).
    Pipeline { second_encoder: bool, weights: bool },
    /// One model folder: its config files and its weights (ControlNet, T2I-Adapter, CLIP
    /// image encoder, Depth Anything, a diffusers embedding folder).
    Model,
}

/// One path a recipe asks for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Item {
    /// Inside the repository; `None` for its root. A file is taken as it is; a folder by its
    /// `shape`.
    pub path: Option<String>,
    pub shape: Shape,
    /// Prefer weight files of this variant (`fp16` for `*.fp16.safetensors`).
    pub variant: Option<String>,
    /// Where it was asked for (e.g. the recipe keys `models.base.source`), for messages.
    pub origin: Vec<String>,
}

/// Everything asked of one repository at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRequest {
    /// `owner/name`.
    pub repo: String,
    /// A branch, tag or commit.
    pub revision: String,
    pub items: Vec<Item>,
}

/// One file, or a choice of files, that an item needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// A file that must be there.
    File(String),
    /// A file taken when the repository has it.
    Optional(String),
    /// Every `.json` / `.txt` file directly in a folder (configs, tokenizer files).
    Configs(String),
    /// The weights of a component folder: the first of `stems` that has files, each tried as
    /// the loaders do (`{stem}.{variant}.safetensors`, `.bin`, then without the variant;
    /// without a variant the plain files, then `fp16`; a file or its `.index.json`).
    Weights {
        dir: String,
        stems: Vec<&'static str>,
        variant: Option<String>,
    },
}

/// The weight stems a model folder may use, in the loaders' order: diffusers models,
/// transformers models (safetensors, then PyTorch), diffusers textual-inversion folders.
pub const MODEL_STEMS: [&str; 4] = [
    "diffusion_pytorch_model",
    "model",
    "pytorch_model",
    "learned_embeds",
];

/// `dir/name`, or `name` at the root.
pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// Whether a path names a file by its extension (used only when neither the cache nor the
/// hub's listing can say).
pub fn looks_like_file(path: &str) -> bool {
    let last = path.rsplit('/').next().unwrap_or(path);
    matches!(
        last.rsplit_once('.').map(|(stem, ext)| (stem.is_empty(), ext)),
        Some((false, ext)) if ext.chars().all(|c| c.is_ascii_alphanumeric()) && !ext.is_empty()
    )
}

/// Weight and checkpoint extensions: such a `source` is a single-file checkpoint.
pub fn is_weight_file(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    [".safetensors", ".sft", ".ckpt", ".bin", ".pt", ".pth"]
        .iter()
        .any(|ext| lower.ends_with(ext))
}

impl Want {
    /// The candidate weight file names of a `Weights` want, in the loaders' order, each
    /// with whether it is a shard index.
    pub fn weight_candidates(stem: &str, variant: Option<&str>) -> Vec<String> {
        let variants: Vec<Option<&str>> = match variant {
            Some(v) => vec![Some(v), None],
            None => vec![None, Some("fp16")],
        };
        let mut names = Vec::new();
        for v in variants {
            for ext in ["safetensors", "bin"] {
                let name = match v {
                    Some(v) => format!("{stem}.{v}.{ext}"),
                    None => format!("{stem}.{ext}"),
                };
                names.push(name.clone());
                names.push(format!("{name}.index.json"));
            }
        }
        names
    }

    /// How a missing want is named in messages.
    pub fn describe(&self) -> Option<String> {
        match self {
            Want::File(path) => Some(path.clone()),
            Want::Optional(_) | Want::Configs(_) => None,
            Want::Weights {
                dir,
                stems,
                variant,
            } => {
                let first = Self::weight_candidates(stems[0], variant.as_deref())
                    .into_iter()
                    .next()
                    .unwrap_or_default();
                Some(format!(
                    "{} (or another weight file of {})",
                    join(dir, &first),
                    if dir.is_empty() { "the folder" } else { dir }
                ))
            }
        }
    }
}

impl Item {
    /// What this item needs when its path is a file (`is_file`) or a folder.
    pub fn wants(&self, is_file: bool) -> Vec<Want> {
        let root = self.path.clone().unwrap_or_default();
        if is_file {
            return vec![Want::File(root)];
        }
        let variant = self.variant.clone();
        match &self.shape {
            Shape::Pipeline {
                second_encoder,
                weights,
            } => {
                let mut wants = vec![
                    Want::Optional(join(&root, "model_index.json")),
                    Want::File(join(&root, "scheduler/scheduler_config.json")),
                ];
                let pairs: &[(&str, &str)] = if *second_encoder {
                    &[
                        ("text_encoder", "tokenizer"),
                        ("text_encoder_2", "tokenizer_2"),
                    ]
                } else {
                    &[("text_encoder", "tokenizer")]
                };
                for (encoder, tokenizer) in pairs {
                    let tokenizer = join(&root, tokenizer);
                    wants.push(Want::File(join(&tokenizer, "vocab.json")));
                    wants.push(Want::File(join(&tokenizer, "merges.txt")));
                    wants.push(Want::Configs(tokenizer));
                    let encoder = join(&root, encoder);
                    wants.push(Want::File(join(&encoder, "config.json")));
                    if *weights {
                        wants.push(Want::Weights {
                            dir: encoder,
                            stems: vec!["model", "pytorch_model"],
                            variant: variant.clone(),
                        });
                    }
                }
                for component in ["unet", "vae"] {
                    let dir = join(&root, component);
                    wants.push(Want::File(join(&dir, "config.json")));
                    if *weights {
                        wants.push(Want::Weights {
                            dir,
                            stems: vec!["diffusion_pytorch_model"],
                            variant: variant.clone(),
                        });
                    }
                }
                wants
            }
            Shape::Model => vec![
                Want::Configs(root.clone()),
                Want::Weights {
                    dir: root,
                    stems: MODEL_STEMS.to_vec(),
                    variant,
                },
            ],
        }
    }
}

/// The files of `request` in the hub's `listing`: every item's wants resolved, shard indexes
/// included (their shards are known once the index is read: [`shards`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Repository paths, sorted, without repeats.
    pub files: BTreeSet<String>,
    /// The `*.index.json` files among them.
    pub indexes: BTreeSet<String>,
}

/// Matches `request` against `listing`.
pub fn select(request: &RepoRequest, listing: &Listing) -> Result<Selection> {
    let mut selection = Selection::default();
    for item in &request.items {
        let is_file = match &item.path {
            None => false,
            Some(path) => {
                if listing.files.contains_key(path) {
                    true
                } else if listing.has_folder(path) {
                    false
                } else {
                    return Err(HubError::NotInRepo {
                        repo: request.repo.clone(),
                        commit: listing.commit.clone(),
                        path: path.clone(),
                        near: listing.near(path),
                    });
                }
            }
        };
        for want in item.wants(is_file) {
            match want {
                Want::File(path) => {
                    if !listing.files.contains_key(&path) {
                        return Err(HubError::NotInRepo {
                            repo: request.repo.clone(),
                            commit: listing.commit.clone(),
                            near: listing.near(&path),
                            path,
                        });
                    }
                    selection.files.insert(path);
                }
                Want::Optional(path) => {
                    if listing.files.contains_key(&path) {
                        selection.files.insert(path);
                    }
                }
                Want::Configs(dir) => {
                    for name in listing.files.keys() {
                        let (parent, file) = name.rsplit_once('/').unwrap_or(("", name));
                        if parent == dir && (file.ends_with(".json") || file.ends_with(".txt")) {
                            selection.files.insert(name.clone());
                        }
                    }
                }
                Want::Weights {
                    dir,
                    stems,
                    variant,
                } => {
                    let found = stems.iter().find_map(|stem| {
                        Want::weight_candidates(stem, variant.as_deref())
                            .into_iter()
                            .map(|name| join(&dir, &name))
                            .find(|path| listing.files.contains_key(path))
                    });
                    match found {
                        Some(path) => {
                            if path.ends_with(".index.json") {
                                selection.indexes.insert(path.clone());
                            }
                            selection.files.insert(path);
                        }
                        None => {
                            return Err(HubError::NoWeights {
                                repo: request.repo.clone(),
                                dir: if dir.is_empty() { "/".to_string() } else { dir },
                                looked_for: stems
                                    .iter()
                                    .map(|s| format!("{s}.safetensors"))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                                    + " and their variants, .bin files and sharded indexes",
                            })
                        }
                    }
                }
            }
        }
    }
    Ok(selection)
}

/// The shard files a sharded-weights index (`index_text`, at repository path `index`) names,
/// as repository paths. Names that leave the index's folder are refused.
pub fn shards(repo: &str, index: &str, index_text: &str) -> Result<Vec<String>> {
    let bad = |message: String| HubError::BadResponse {
        url: format!("{repo}/{index}"),
        message,
    };
    let json: serde_json::Value =
        serde_json::from_str(index_text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map`".to_string()))?;
    let dir = index.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
    let mut names = BTreeSet::new();
    for value in map.values() {
        let name = value
            .as_str()
            .ok_or_else(|| bad("a `weight_map` value is not a file name".to_string()))?;
        let path = join(dir, name);
        crate::listing::check_name(repo, &path)?;
        names.insert(path);
    }
    Ok(names.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(names: &[&str]) -> Listing {
        let siblings: Vec<serde_json::Value> = names
            .iter()
            .map(|n| serde_json::json!({"rfilename": n, "size": 10, "blobId": "ab12"}))
            .collect();
        Listing::parse(
            "o/n",
            &serde_json::json!({"sha": "0123456789abcdef0123456789abcdef01234567", "siblings": siblings})
                .to_string(),
        )
        .unwrap()
    }

    fn pipeline(variant: Option<&str>) -> RepoRequest {
        RepoRequest {
            repo: "o/n".into(),
            revision: "main".into(),
            items: vec![Item {
                path: None,
                shape: Shape::Pipeline {
                    second_encoder: false,
                    weights: true,
                },
                variant: variant.map(str::to_string),
                origin: vec![],
            }],
        }
    }

    const SD_REPO: &[&str] = &[
        "model_index.json",
        "README.md",
        "v1-5-pruned.safetensors",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder/model.fp16.safetensors",
        "text_encoder/pytorch_model.bin",
        "unet/config.json",
        "unet/diffusion_pytorch_model.bin",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "safety_checker/model.safetensors",
        "feature_extractor/preprocessor_config.json",
    ];

    #[test]
    fn a_pipeline_takes_its_components_and_one_weight_file_each() {
        let chosen = select(&pipeline(None), &listing(SD_REPO)).unwrap();
        let files: Vec<&str> = chosen.files.iter().map(String::as_str).collect();
        assert_eq!(
            files,
            [
                "model_index.json",
                "scheduler/scheduler_config.json",
                "text_encoder/config.json",
                "text_encoder/model.safetensors",
                "tokenizer/merges.txt",
                "tokenizer/special_tokens_map.json",
                "tokenizer/tokenizer_config.json",
                "tokenizer/vocab.json",
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors",
                "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors",
            ]
        );
        let fp16 = select(&pipeline(Some("fp16")), &listing(SD_REPO)).unwrap();
        assert!(fp16
            .files
            .contains("unet/diffusion_pytorch_model.fp16.safetensors"));
        assert!(fp16.files.contains("text_encoder/model.fp16.safetensors"));
        assert!(!fp16
            .files
            .contains("unet/diffusion_pytorch_model.safetensors"));
    }

    #[test]
    fn safetensors_before_pickles_and_sharded_indexes() {
        let repo = listing(&[
            "m/config.json",
            "m/diffusion_pytorch_model.bin",
            "m/diffusion_pytorch_model.safetensors.index.json",
            "m/diffusion_pytorch_model-00001-of-00002.safetensors",
        ]);
        let request = RepoRequest {
            repo: "o/n".into(),
            revision: "main".into(),
            items: vec![Item {
                path: Some("m".into()),
                shape: Shape::Model,
                variant: None,
                origin: vec![],
            }],
        };
        let chosen = select(&request, &repo).unwrap();
        assert_eq!(
            chosen.indexes.iter().collect::<Vec<_>>(),
            ["m/diffusion_pytorch_model.safetensors.index.json"]
        );
        assert!(!chosen.files.contains("m/diffusion_pytorch_model.bin"));
        let index = r#"{"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors", "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}"#;
        assert_eq!(
            shards("o/n", "m/x.index.json", index).unwrap(),
            [
                "m/diffusion_pytorch_model-00001-of-00002.safetensors",
                "m/diffusion_pytorch_model-00002-of-00002.safetensors"
            ]
        );
        let evil = r#"{"weight_map": {"a": "../../../etc/x.safetensors"}}"#;
        assert!(matches!(
            shards("o/n", "m/x.index.json", evil),
            Err(HubError::UnsafeName { .. })
        ));
    }

    #[test]
    fn single_files_and_missing_paths() {
        let repo = listing(&["models/a.safetensors", "models/image_encoder/config.json"]);
        let mut request = pipeline(None);
        request.items = vec![Item {
            path: Some("models/a.safetensors".into()),
            shape: Shape::Model,
            variant: None,
            origin: vec![],
        }];
        let chosen = select(&request, &repo).unwrap();
        assert_eq!(
            chosen.files.into_iter().collect::<Vec<_>>(),
            ["models/a.safetensors"]
        );
        request.items[0].path = Some("models/b.safetensors".into());
        let err = select(&request, &repo).unwrap_err().to_string();
        assert!(
            err.contains("models/b.safetensors") && err.contains("models/a.safetensors"),
            "{err}"
        );
        request.items[0].path = Some("models/image_encoder".into());
        let err = select(&request, &repo).unwrap_err().to_string();
        assert!(
            err.contains("no weights in `models/image_encoder`"),
            "{err}"
        );
        assert!(looks_like_file("models/a.safetensors"));
        assert!(!looks_like_file("models/image_encoder"));
        assert!(is_weight_file("x/control_v11p_sd15_canny.pth"));
    }
}
