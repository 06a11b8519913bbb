//! Reproducible outputs: every PNG carries the fully resolved recipe (absolute paths, input
//! hashes, the ipcompose version) in an iTXt chunk, and `ipcompose run --from image.png`
//! runs it again.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{PipelineError, Result};
use crate::recipe::{Provenance, Recipe};

/// The PNG text keyword holding the recipe.
pub const PNG_KEYWORD: &str = "ipcompose-recipe";

fn io_error(path: &Path, e: impl std::fmt::Display) -> PipelineError {
    PipelineError::Output {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| io_error(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(|e| io_error(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// `value` made absolute against `base` when it names something on disk.
fn absolute(base: &Path, value: &str) -> String {
    let joined = base.join(value);
    if joined.exists() {
        std::fs::canonicalize(&joined)
            .unwrap_or(joined)
            .display()
            .to_string()
    } else {
        value.to_string()
    }
}

/// The recipe as it ran: every local path absolute, every input file hashed.
pub fn resolved_recipe(recipe: &Recipe, base_dir: &Path) -> Result<Recipe> {
    let mut r = recipe.clone();
    let mut inputs = std::collections::BTreeMap::new();
    let mut hash = |path: &str| -> Result<()> {
        let p = Path::new(path);
        if p.is_file() {
            inputs.insert(path.to_string(), sha256_file(p)?);
        }
        Ok(())
    };
    for model in r.models.values_mut() {
        model.source = absolute(base_dir, &model.source);
        for path in [&mut model.image_encoder, &mut model.config, &mut model.vae]
            .into_iter()
            .flatten()
        {
            *path = absolute(base_dir, path);
        }
    }
    for image in r.images.values_mut() {
        *image = absolute(base_dir, image);
        hash(image)?;
    }
    for node in r.nodes.values_mut() {
        if let Some(generate) = &mut node.generate {
            if let Some(latents) = &mut generate.latents {
                *latents = absolute(base_dir, latents);
                hash(latents)?;
            }
            for ip in &mut generate.ip_adapters {
                if let Some(embeds) = &mut ip.embeds {
                    *embeds = absolute(base_dir, embeds);
                    hash(embeds)?;
                }
            }
        }
    }
    for output in &mut r.outputs {
        let joined = base_dir.join(&output.path);
        // Outputs may not exist yet: make them absolute without touching the disk.
        output.path = std::path::absolute(&joined)
            .unwrap_or(joined)
            .display()
            .to_string();
    }
    r.provenance = Some(Provenance {
        ipcompose_version: env!("CARGO_PKG_VERSION").to_string(),
        inputs,
    });
    Ok(r)
}

/// YAML text of the resolved recipe, for embedding.
pub fn embedded_text(recipe: &Recipe, base_dir: &Path) -> Result<String> {
    let resolved = resolved_recipe(recipe, base_dir)?;
    serde_yaml::to_string(&resolved)
        .map_err(|e| PipelineError::Plan(format!("serialising the recipe: {e}")))
}

/// Reads the recipe embedded in a PNG written by ipcompose.
pub fn read_embedded(png_path: &Path) -> Result<String> {
    let file = std::fs::File::open(png_path).map_err(|e| io_error(png_path, e))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder
        .read_info()
        .map_err(|e| io_error(png_path, format!("not a readable PNG: {e}")))?;
    let info = reader.info();
    for chunk in &info.utf8_text {
        if chunk.keyword == PNG_KEYWORD {
            return chunk
                .get_text()
                .map_err(|e| io_error(png_path, format!("damaged recipe chunk: {e}")));
        }
    }
    Err(io_error(
        png_path,
        format!("no `{PNG_KEYWORD}` text chunk: this PNG was not written by ipcompose"),
    ))
}

/// Warns about inputs whose content changed since the PNG was made.
pub fn changed_inputs(recipe: &Recipe) -> Vec<String> {
    let Some(provenance) = &recipe.provenance else {
        return Vec::new();
    };
    provenance
        .inputs
        .iter()
        .filter(|(path, hash)| sha256_file(Path::new(path)).ok().as_ref() != Some(*hash))
        .map(|(path, _)| path.clone())
        .collect()
}
