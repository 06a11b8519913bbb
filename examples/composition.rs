//! A composition built in code, without YAML: one base model, an IP-Adapter with a style
//! image and a ControlNet with a hint, all prepared once and handed to the one denoising loop.
//!
//! cargo run --release --example composition -- SD15_FOLDER IP_ADAPTER_FILE IMAGE_ENCODER_DIR \
//!     STYLE_IMAGE CONTROLNET_FOLDER HINT_IMAGE OUT.png

use std::path::PathBuf;
use std::rc::Rc;

use anyhow::Context;
use candle_core::{DType, Device};
use ipcompose::models::clip_vision::load_image_encoder;
use ipcompose::models::controlnet::{ControlNetConfig, ControlNetModel};
use ipcompose::models::ip_adapter::IpAdapter;
use ipcompose::pipeline::io::output::save_png;
use ipcompose::pipeline::plan::control::ResizeMode;
use ipcompose::pipeline::plan::ip::Fit;
use ipcompose::pipeline::plan::ip::{Combine, IpAdapterUse, IpSource};
use ipcompose::pipeline::plan::{GenerationPlan, InitialNoise};
use ipcompose::pipeline::recipe::schedule::{window, Curve, Strength};
use ipcompose::pipeline::run::control::{prepare_hint, PreparedControlNet};
use ipcompose::pipeline::run::denoise::Conditions;
use ipcompose::pipeline::run::ip::{image_tokens, prepare};
use ipcompose::pipeline::BaseModel;
use ipcompose::schedulers::{SchedulerConfig, SchedulerKind};

fn main() -> anyhow::Result<()> {
    let args: Vec<PathBuf> = std::env::args().skip(1).map(PathBuf::from).collect();
    let [base_dir, adapter_file, encoder_dir, style, controlnet_dir, hint, out] = args.as_slice()
    else {
        anyhow::bail!("usage: composition SD15_FOLDER IP_ADAPTER IMAGE_ENCODER STYLE_IMAGE CONTROLNET_FOLDER HINT OUT.png");
    };
    let (device, dtype) = (Device::Cpu, DType::F32);
    let model = BaseModel::from_folder(base_dir, &device, dtype)?;
    let (width, height) = (512, 512);
    let request = GenerationPlan {
        node: "gen".to_string(),
        base: "base".to_string(),
        prompt: "a cozy house at dusk".to_string(),
        negative_prompt: Some("lowres, blurry".to_string()),
        prompt_2: None,
        negative_prompt_2: None,
        prompt_syntax: Default::default(),
        micro_conditioning: None,
        width,
        height,
        steps: 25,
        scheduler_kind: SchedulerKind::Ddim,
        scheduler_config: SchedulerConfig::from_file(
            &base_dir.join("scheduler/scheduler_config.json"),
        )?,
        guidance: 7.5,
        guidance_rescale: 0.0,
        init: InitialNoise::Seed(1),
        clip_skip: 0,
        ip_adapters: Vec::new(),
        controls: Vec::new(),
        loras: Vec::new(),
    };

    // The image prompt: tokens and every layer's keys/values, computed once.
    let adapter = IpAdapter::load(adapter_file, dtype, &device)?;
    let encoder = load_image_encoder(encoder_dir, dtype, &device)?;
    let tokens = image_tokens(
        &adapter,
        &encoder,
        std::slice::from_ref(style),
        None,
        Combine::Concat,
        Fit::Crop,
        &device,
    )?;
    let layout = model.unet.config().cross_attention_layout();
    let ip_use = IpAdapterUse {
        model: "style".to_string(),
        source: IpSource::Images {
            images: vec![style.clone()],
            negative_image: None,
            combine: Combine::Concat,
            fit: Fit::Crop,
        },
        layer_scales: vec![1.0; layout.len()],
        step_scales: vec![0.6; request.steps],
        start: 0.0,
        end: 1.0,
        masks: Vec::new(),
    };
    let latent_size = model.latent_size(width, height);
    let ip = prepare(
        &adapter,
        tokens,
        &ip_use,
        &layout,
        latent_size,
        (width, height),
        true,
        dtype,
    )?;

    // The structural condition: a ControlNet whose scale ramps from 1.0 down to 0.5 over the
    // first 80% of the steps (the same schedule as `scale: {ramp: [1.0, 0.5]}, end: 0.8`).
    let cn_config = ControlNetConfig::from_folder(controlnet_dir)?;
    ipcompose::models::controlnet::check_compatible(&cn_config, model.unet.config())?;
    let controlnet =
        ControlNetModel::load_folder(controlnet_dir, &cn_config, None, dtype, &device)?;
    let controlnet = PreparedControlNet::single(
        Rc::new(controlnet),
        prepare_hint(hint, width, height, ResizeMode::Resize, &device)?,
        Strength::Curve(Curve { ramp: [1.0, 0.5] })
            .per_step(&window(request.steps, 0.0, 0.8))
            .map_err(anyhow::Error::msg)?,
        cn_config.global_pool_conditions,
    );

    let conditions = Conditions {
        ip_adapters: vec![ip],
        controlnets: vec![controlnet],
        t2i_adapters: Vec::new(),
        ..Default::default()
    };
    let generated = model.generate(&request, conditions, &mut |p| {
        eprint!("\rstep {}/{}", p.step, p.total)
    })?;
    eprintln!();
    save_png(&generated.image, out, None).with_context(|| format!("writing {}", out.display()))?;
    println!("wrote {}", out.display());
    Ok(())
}
