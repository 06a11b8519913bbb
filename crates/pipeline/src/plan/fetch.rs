//! The stage between reading a recipe and planning it: every model `source` (and IP-Adapter
//! `image_encoder`, single-file `config`) that is a hub id is checked against the hub cache,
//! and what the cache lacks is handed to a [`ModelFetcher`].
//!
//! The planner itself never touches the network: it resolves hub ids in the cache
//! ([`crate::plan::source`]). Whether anything is downloaded is the fetcher's choice; the library's
//! default, [`CacheOnly`], downloads nothing and names the missing files. The `ipcompose`
//! command line passes one that downloads (`run`, `pull`) or reports sizes (`validate`).

use std::collections::BTreeMap;
use std::path::Path;

pub use ipcompose_hub::{CacheCheck, HubError, Item, RepoRequest, Shape};

use crate::error::{PipelineError, Result};
use crate::plan::family::{BaseKind, TextEncoding};
use crate::plan::source::{hub_cache_dir, hub_reference};
use crate::recipe::locate::line_of;
use crate::recipe::Recipe;

/// Brings what a recipe needs from one hub repository into the cache, or says why not.
pub trait ModelFetcher {
    /// `request`: what the recipe needs from one repository at one revision; `cached`: what
    /// the cache holds of it (complete, or the files missing). Called for every hub
    /// repository a recipe names, whether the cache is complete or not.
    fn fetch(
        &mut self,
        request: &RepoRequest,
        cached: &CacheCheck,
    ) -> std::result::Result<(), HubError>;
}

/// Downloads nothing: a repository the cache does not fully hold is an error naming the
/// files missing.
pub struct CacheOnly {
    /// Word the message as offline mode's (`--offline`, `HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

impl ModelFetcher for CacheOnly {
    fn fetch(
        &mut self,
        request: &RepoRequest,
        cached: &CacheCheck,
    ) -> std::result::Result<(), HubError> {
        if cached.is_complete() {
            Ok(())
        } else {
            Err(cached.not_cached(request, self.offline))
        }
    }
}

/// Model kinds other than bases whose `source` is a file or a model folder.
fn is_model_kind(kind: &str) -> bool {
    matches!(
        kind.to_ascii_lowercase().as_str(),
        "ip-adapter"
            | "ip_adapter"
            | "ipadapter"
            | "controlnet"
            | "control-net"
            | "control_net"
            | "t2i-adapter"
            | "t2i_adapter"
            | "t2iadapter"
            | "t2i"
            | "lora"
            | "embedding"
            | "depth-anything"
            | "depth_anything"
            | "depth-anything-v2"
            | "openpose"
            | "open-pose"
            | "openpose-body"
    )
}

/// What `recipes` need from the hub, one request per repository and revision (sources that
/// are local paths need nothing).
pub fn requests(recipes: &[&Recipe], base_dir: &Path) -> Vec<RepoRequest> {
    let mut grouped: BTreeMap<(String, String), Vec<Item>> = BTreeMap::new();
    let mut add = |source: &str,
                   revision: Option<&str>,
                   shape: Shape,
                   variant: &Option<String>,
                   keys: [&str; 3]| {
        if let Some((repo, path)) = hub_reference(source, base_dir) {
            let items = grouped
                .entry((repo, revision.unwrap_or("main").to_string()))
                .or_default();
            let item = Item {
                path,
                shape,
                variant: variant.clone(),
                origin: keys.iter().map(|k| k.to_string()).collect(),
            };
            if !items
                .iter()
                .any(|i| i.path == item.path && i.shape == item.shape && i.variant == item.variant)
            {
                items.push(item);
            }
        }
    };
    for recipe in recipes {
        for (name, spec) in &recipe.models {
            if let Some(kind) = BaseKind::parse(&spec.kind) {
                let family = kind.family();
                let second_encoder = family.text == TextEncoding::Dual;
                let shape = |weights| Shape::Pipeline {
                    second_encoder,
                    weights,
                };
                add(
                    &spec.source,
                    spec.revision.as_deref(),
                    shape(true),
                    &spec.variant,
                    ["models", name, "source"],
                );
                // A single-file checkpoint takes configs and tokenizers from a folder of its
                // base (`config:`, else the reference repository), as the planner does.
                let single_file = match hub_reference(&spec.source, base_dir) {
                    Some((_, Some(path))) => ipcompose_hub::request::is_weight_file(&path),
                    Some((_, None)) => false,
                    None => base_dir.join(&spec.source).is_file(),
                };
                if let (true, Some(default_config)) = (single_file, family.single_file) {
                    match &spec.config {
                        Some(config) => add(
                            config,
                            None,
                            shape(false),
                            &None,
                            ["models", name, "config"],
                        ),
                        None => add(
                            default_config,
                            None,
                            shape(false),
                            &None,
                            ["models", name, "source"],
                        ),
                    }
                }
                // A replacement VAE: an `AutoencoderKL` folder (or one file) like any model.
                if let Some(vae) = &spec.vae {
                    add(vae, None, Shape::Model, &None, ["models", name, "vae"]);
                }
            } else if is_model_kind(&spec.kind) {
                add(
                    &spec.source,
                    spec.revision.as_deref(),
                    Shape::Model,
                    &spec.variant,
                    ["models", name, "source"],
                );
                if let Some(encoder) = &spec.image_encoder {
                    add(
                        encoder,
                        spec.revision.as_deref(),
                        Shape::Model,
                        &None,
                        ["models", name, "image_encoder"],
                    );
                }
            }
        }
    }
    grouped
        .into_iter()
        .map(|((repo, revision), items)| RepoRequest {
            repo,
            revision,
            items,
        })
        .collect()
}

/// Checks every hub repository `recipes` need against the cache and lets `fetcher` bring in
/// (or report) what is missing. Errors point at the recipe line that asked for the model
/// (`text`, read from `origin`); all repositories are tried before the errors are returned.
pub fn ensure_models(
    recipes: &[&Recipe],
    text: &str,
    origin: &Path,
    base_dir: &Path,
    fetcher: &mut dyn ModelFetcher,
) -> Result<()> {
    let requests = requests(recipes, base_dir);
    if requests.is_empty() {
        return Ok(());
    }
    // Without a cache folder the planner says where it looked.
    let Some(cache) = hub_cache_dir() else {
        return Ok(());
    };
    let mut errors = Vec::new();
    for request in &requests {
        let place = |message: String| {
            let keys: Vec<&str> = request.items[0].origin.iter().map(String::as_str).collect();
            let at = match line_of(text, &keys) {
                Some(line) => format!("{}:{line}", origin.display()),
                None => origin.display().to_string(),
            };
            format!("{at}: `{}`: {message}", keys.join("."))
        };
        if let Some(bad) = request.items.iter().find_map(|item| {
            item.path.as_deref().and_then(|p| {
                ipcompose_hub::listing::check_name(&request.repo, p)
                    .err()
                    .map(|e| e.to_string())
            })
        }) {
            errors.push(place(bad));
            continue;
        }
        let cached = ipcompose_hub::check(&cache, request);
        if let Err(e) = fetcher.fetch(request, &cached) {
            let mut message = e.to_string();
            if matches!(
                e,
                HubError::RepoNotFound { .. } | HubError::Unauthorized { gated: false, .. }
            ) {
                // Perhaps a local path with a typo: say where it was looked for too.
                let source = match &request.items[0].path {
                    Some(path) => format!("{}/{path}", request.repo),
                    None => request.repo.clone(),
                };
                message = format!(
                    "{} does not exist, and {message}",
                    base_dir.join(source).display()
                );
            }
            if request
                .items
                .iter()
                .any(|i| matches!(i.shape, Shape::Pipeline { weights: false, .. }))
            {
                message = format!("a single-file checkpoint needs the configs and tokenizer of its base (`config: FOLDER`, or {} from the hub): {message}", request.repo);
            }
            errors.push(place(message));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(PipelineError::Plan(errors.join("\n")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(models: &str) -> Recipe {
        let text = format!("version: 1\nmodels:\n{models}\nnodes: {{}}\noutputs: []\n");
        Recipe::parse(&text, Path::new("r.yaml")).unwrap()
    }

    #[test]
    fn hub_sources_become_one_request_per_repository() {
        let r = recipe(
            "  base: {kind: sd15, source: o/sd, variant: fp16}\n  \
             ip: {kind: ip-adapter, source: h/ip/models/a.safetensors, image_encoder: h/ip/models/image_encoder}\n  \
             xl: {kind: sdxl, source: o/xl, revision: v2}\n  \
             one: {kind: sd15, source: o/single/model.safetensors}\n  \
             typo: {kind: controlnett, source: o/cn}\n  \
             local: {kind: controlnet, source: ./here}",
        );
        let requests = requests(&[&r], Path::new("/nonexistent"));
        let names: Vec<(&str, &str, usize)> = requests
            .iter()
            .map(|r| (r.repo.as_str(), r.revision.as_str(), r.items.len()))
            .collect();
        assert_eq!(
            names,
            [
                ("h/ip", "main", 2),
                ("o/sd", "main", 1),
                ("o/single", "main", 1),
                ("o/xl", "v2", 1),
                ("stable-diffusion-v1-5/stable-diffusion-v1-5", "main", 1),
            ]
        );
        assert_eq!(requests[1].items[0].variant.as_deref(), Some("fp16"));
        assert_eq!(
            requests[3].items[0].shape,
            Shape::Pipeline {
                second_encoder: true,
                weights: true
            }
        );
        assert_eq!(
            requests[4].items[0].shape,
            Shape::Pipeline {
                second_encoder: false,
                weights: false
            }
        );
        assert_eq!(
            requests[0].items[1].origin,
            ["models", "ip", "image_encoder"]
        );
    }
}
