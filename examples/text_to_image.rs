//! Load a base model once and run several generations from code, without a recipe.
//!
//! cargo run --release --example text_to_image -- /path/to/stable-diffusion-v1-5 out/

use std::path::PathBuf;

use anyhow::Context;
use candle_core::{DType, Device};
use ipcompose::pipeline::io::output::save_png;
use ipcompose::pipeline::plan::{GenerationPlan, InitialNoise};
use ipcompose::pipeline::BaseModel;
use ipcompose::schedulers::{SchedulerConfig, SchedulerKind};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let folder = PathBuf::from(
        args.next()
            .context("usage: text_to_image MODEL_FOLDER OUT_DIR")?,
    );
    let out_dir = PathBuf::from(args.next().unwrap_or_else(|| "out".to_string()));
    let model = BaseModel::from_folder(&folder, &Device::Cpu, DType::F32)?;
    let scheduler_config =
        SchedulerConfig::from_file(&folder.join("scheduler/scheduler_config.json"))?;
    let side =
        model.unet.config().sample_size.unwrap_or(64) * model.vae.config().downscale_factor();
    for (i, prompt) in ["a cozy house at dusk", "a lighthouse in a storm"]
        .iter()
        .enumerate()
    {
        let request = GenerationPlan {
            node: format!("gen{i}"),
            base: "base".to_string(),
            prompt: prompt.to_string(),
            negative_prompt: Some("lowres, blurry".to_string()),
            prompt_2: None,
            negative_prompt_2: None,
            prompt_syntax: Default::default(),
            micro_conditioning: None,
            width: side,
            height: side,
            steps: 20,
            scheduler_kind: SchedulerKind::DpmPp2m,
            scheduler_config: scheduler_config
                .clone()
                .with_override("use_karras_sigmas", true.into())?,
            guidance: 7.5,
            guidance_rescale: 0.0,
            init: InitialNoise::Seed(i as u64),
            clip_skip: 0,
            ip_adapters: Vec::new(),
            controls: Vec::new(),
            loras: Vec::new(),
        };
        let generated = model.generate(&request, Default::default(), &mut |p| {
            eprint!("\r{prompt}: {}/{}", p.step, p.total)
        })?;
        eprintln!();
        let path = out_dir.join(format!("image-{i}.png"));
        save_png(&generated.image, &path, None)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
