//! `ipcompose bench`: how long the parts of a generation take on this machine, in the manner
//! of llama-bench.
//!
//! The models are full-size SD1.5 ones (or, with `--tiny`, the test fixtures' tiny ones) built
//! from their real configs with random weights. The weights are written to safetensors files in
//! a temporary folder and loaded through the same loaders a recipe uses, so the models under
//! test are exactly the ones `ipcompose run` builds, and `load` is a real load time (from the
//! page cache: the files were just written). ipcompose copies every weight out of the mapped
//! file while loading; diffusers keeps safetensors weights memory-mapped and reads them on the
//! first forward, so its `load` figure (tools/bench_diffusers.py) measures less work.
//!
//! Every figure is `--warmup` untimed runs then `--repeats` timed ones. Its peak resident set
//! size is the process's high-water mark (`VmHWM`) over the figure, reset just before it where
//! Linux allows; it includes the models loaded at the time.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use ipcompose::models::controlnet::{ControlNetConfig, ControlNetModel};
use ipcompose::models::ip_adapter::IpAdapter;
use ipcompose::models::unet::{Injections, IpKeyValue, UNet2DConditionModel, UNetConfig};
use ipcompose::models::vae::{Vae, VaeConfig};
use ipcompose::models::weights::WeightStore;
use ipcompose::pipeline::recipe::schedule::window;
use ipcompose::pipeline::run::control::{controlnet_residuals, PreparedControlNet};
use ipcompose::pipeline::run::denoise::{denoise, Conditions, Guidance, TextConditioning};
use ipcompose::pipeline::run::noise::SeededNoise;
use ipcompose::schedulers::{build_scheduler, SchedulerConfig, SchedulerKind};

/// `stable-diffusion-v1-5/stable-diffusion-v1-5`, `unet/config.json`.
const SD15_UNET_CONFIG: &str = r#"{
  "_class_name": "UNet2DConditionModel",
  "_diffusers_version": "0.6.0",
  "act_fn": "silu",
  "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false,
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1,
  "flip_sin_to_cos": true,
  "freq_shift": 0,
  "in_channels": 4,
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-05,
  "norm_num_groups": 32,
  "out_channels": 4,
  "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;

/// `lllyasviel/control_v11p_sd15_canny`, `config.json`.
const SD15_CONTROLNET_CONFIG: &str = r#"{
  "_class_name": "ControlNetModel",
  "_diffusers_version": "0.16.0.dev0",
  "act_fn": "silu",
  "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280],
  "class_embed_type": null,
  "conditioning_embedding_out_channels": [16, 32, 96, 256],
  "controlnet_conditioning_channel_order": "rgb",
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1,
  "flip_sin_to_cos": true,
  "freq_shift": 0,
  "global_pool_conditions": false,
  "in_channels": 4,
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-05,
  "norm_num_groups": 32,
  "num_class_embeds": null,
  "only_cross_attention": false,
  "projection_class_embeddings_input_dim": null,
  "resnet_time_scale_shift": "default",
  "upcast_attention": false,
  "use_linear_projection": false
}"#;

/// `stable-diffusion-v1-5/stable-diffusion-v1-5`, `vae/config.json`.
const SD15_VAE_CONFIG: &str = r#"{
  "_class_name": "AutoencoderKL",
  "_diffusers_version": "0.6.0",
  "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "in_channels": 3,
  "latent_channels": 4,
  "layers_per_block": 2,
  "norm_num_groups": 32,
  "out_channels": 3,
  "sample_size": 512,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
}"#;

/// `stable-diffusion-v1-5/stable-diffusion-v1-5`, `scheduler/scheduler_config.json` (used as
/// DDIM, the recipes' default).
const SD15_SCHEDULER_CONFIG: &str = r#"{
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.6.0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "num_train_timesteps": 1000,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null,
  "clip_sample": false
}"#;

/// The tiny test models: the same block structure at a fraction of the width.
const TINY_UNET_CONFIG: &str = include_str!("../../../tests/fixtures/tiny-sd15/unet/config.json");
const TINY_CONTROLNET_CONFIG: &str =
    include_str!("../../../tests/fixtures/controlnet/tiny-canny/config.json");
const TINY_VAE_CONFIG: &str = include_str!("../../../tests/fixtures/tiny-sd15/vae/config.json");

/// Text tokens of the CLIP context, as every SD1.x prompt has after padding.
const TEXT_TOKENS: usize = 77;
/// Image tokens of a plain IP-Adapter (`ImageProjModel` of ip-adapter_sd15).
const IP_TOKENS: usize = 4;
/// A mid-schedule timestep; the cost of a step does not depend on it.
const TIMESTEP: f64 = 500.0;
const GUIDANCE_SCALE: f64 = 7.5;

struct ModelSizes {
    description: &'static str,
    unet: &'static str,
    controlnet: &'static str,
    vae: &'static str,
    /// Width of the CLIP image embedding a plain IP-Adapter projects (ViT-H/14: 1024).
    image_embedding_width: usize,
}

const FULL_SIZE: ModelSizes = ModelSizes {
    description: "SD1.5 full size (UNet 320/640/1280/1280, ControlNet canny v1.1, ip-adapter_sd15)",
    unet: SD15_UNET_CONFIG,
    controlnet: SD15_CONTROLNET_CONFIG,
    vae: SD15_VAE_CONFIG,
    image_embedding_width: 1024,
};

const TINY: ModelSizes = ModelSizes {
    description: "tiny test models (tests/fixtures)",
    unet: TINY_UNET_CONFIG,
    controlnet: TINY_CONTROLNET_CONFIG,
    vae: TINY_VAE_CONFIG,
    image_embedding_width: 32,
};

/// What can be measured. The declaration order is the order of measurement: `cn_skipped`
/// follows `unet_step_cn1` so that its saving can be stated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Figure {
    /// Loading the UNet from safetensors.
    #[value(name = "load")]
    Load,
    /// One UNet forward.
    #[value(name = "unet_step")]
    UnetStep,
    /// One UNet forward with one plain IP-Adapter (keys/values precomputed).
    #[value(name = "unet_step_ip")]
    UnetStepIp,
    /// One ControlNet forward plus the UNet forward with its residuals.
    #[value(name = "unet_step_cn1")]
    UnetStepCn1,
    /// A step whose ControlNet is outside its window (not run at all).
    #[value(name = "cn_skipped")]
    CnSkipped,
    /// Two ControlNet forwards, residuals summed, plus the UNet forward.
    #[value(name = "unet_step_cn2")]
    UnetStepCn2,
    /// A whole `--steps`-step run through the denoising loop plus the VAE decode.
    #[value(name = "run_20", alias = "run")]
    Run,
    /// Loading the UNet with a rank-16 kohya LoRA on every attention projection (the LoRA read,
    /// resolved, its updates computed and added as the weights load): compare with `load`.
    #[value(name = "load_lora")]
    LoadLora,
    /// Not a speed: one UNet forward in `--dtype` against the same weights and inputs in f32,
    /// as `max |half - f32| / max |f32|` and `‖half - f32‖ / ‖f32‖` (for f16/bf16).
    #[value(name = "precision")]
    Precision,
    /// Canny (low 100, high 200) at detect resolution 512, as controlnet_aux's `CannyDetector`.
    #[value(name = "preprocess_canny")]
    PreprocessCanny,
    /// Tile blur: `INTER_AREA` down by 4, `INTER_LANCZOS4` back up.
    #[value(name = "preprocess_blur")]
    PreprocessBlur,
    /// Content shuffle at detect resolution 512.
    #[value(name = "preprocess_shuffle")]
    PreprocessShuffle,
    /// The Depth Anything V2 Small depth map (input size 518), model loaded beforehand.
    #[value(name = "preprocess_depth")]
    PreprocessDepth,
    /// The OpenPose body network alone, on the input the annotator makes at detect
    /// resolution 512.
    #[value(name = "preprocess_pose_network")]
    PreprocessPoseNetwork,
    /// The whole OpenPose body annotator at detect resolution 512: resize, network,
    /// post-processing, drawing.
    #[value(name = "preprocess_pose")]
    PreprocessPose,
    /// Every `preprocess_*` figure.
    #[value(name = "preprocess")]
    Preprocess,
}

impl Figure {
    /// The figures the `preprocess` group stands for, in order of measurement.
    const PREPROCESSORS: [Figure; 6] = [
        Figure::PreprocessCanny,
        Figure::PreprocessBlur,
        Figure::PreprocessShuffle,
        Figure::PreprocessDepth,
        Figure::PreprocessPoseNetwork,
        Figure::PreprocessPose,
    ];

    fn is_preprocess(self) -> bool {
        self == Figure::Preprocess || Self::PREPROCESSORS.contains(&self)
    }
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Timed runs per figure.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    repeats: u32,
    /// Untimed runs before the timed ones, per figure.
    #[arg(long, default_value_t = 1)]
    warmup: u32,
    /// Figures to measure, comma separated. `run_20` (a whole run, `--steps` steps) is not in
    /// the default list: at full size on a CPU it takes many minutes per repeat. Neither are the
    /// preprocessors (`preprocess_canny`, `_blur`, `_shuffle`, `_depth`, `_pose_network`,
    /// `_pose`, on the photograph of `--image`); `preprocess` selects them all. Their networks
    /// (Depth Anything V2 Small, the OpenPose body model) are full size with random weights
    /// (the pose weights are a fixed pattern tools/bench_preprocess.py makes too).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "load,unet_step,unet_step_ip,unet_step_cn1,cn_skipped,unet_step_cn2"
    )]
    figures: Vec<Figure>,
    /// One JSON object per line (name, median_s, min_s, max_s, repeats, peak_rss_bytes, …)
    /// instead of a table.
    #[arg(long)]
    json: bool,
    /// Threads for candle's CPU kernels: sets RAYON_NUM_THREADS and CANDLE_NUM_THREADS before
    /// the first tensor operation starts the thread pool. Default: those variables, else all
    /// cores.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
    /// Image width in pixels (multiple of 8). Default: the UNet's sample size × 8 (512).
    #[arg(long)]
    width: Option<usize>,
    /// Image height in pixels (multiple of 8). Default: the UNet's sample size × 8 (512).
    #[arg(long)]
    height: Option<usize>,
    /// Denoising steps of `run_20`.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    steps: u32,
    /// Use the tiny test models instead of full-size SD1.5 (for smoke tests; seconds). The
    /// preprocessors then run on a 128×128 copy of the photograph, with narrow networks.
    #[arg(long)]
    tiny: bool,
    /// The photograph the preprocessor figures read. Default: tools/bench-inputs/photo512.png
    /// of this source tree (512×512, scikit-image's `astronaut`).
    #[arg(long)]
    image: Option<PathBuf>,
    /// Where the SD1.5 figures run: `cpu`, or `cuda` / `cuda:N` (a `--features cuda` build).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weights and activations of the SD1.5 figures: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

/// One measured figure.
struct Measurement {
    name: String,
    times: Vec<f64>,
    peak_rss_bytes: Option<u64>,
    /// `cn_skipped` only: how many times longer the same step takes with the ControlNet run.
    saving_ratio: Option<f64>,
    /// More fields for the JSON line (they replace the common ones of the same name).
    extra: serde_json::Map<String, serde_json::Value>,
}

impl Measurement {
    fn median(&self) -> f64 {
        let mut sorted = self.times.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        }
    }

    fn min(&self) -> f64 {
        self.times.iter().copied().fold(f64::INFINITY, f64::min)
    }

    fn max(&self) -> f64 {
        self.times.iter().copied().fold(f64::NEG_INFINITY, f64::max)
    }
}

/// Settings every figure line repeats, so one line stands on its own.
struct RunInfo {
    device: Device,
    dtype: DType,
    threads: usize,
    width: usize,
    height: usize,
    steps: usize,
    warmup: u32,
    tiny: bool,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(threads) = args.threads {
        // candle reads these when it starts its pool and sizes each parallel kernel by them;
        // nothing has touched a tensor yet, so both take effect.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    }
    let mut figures = args.figures.clone();
    if figures.contains(&Figure::Preprocess) {
        figures.retain(|f| *f != Figure::Preprocess);
        figures.extend(Figure::PREPROCESSORS);
    }
    figures.sort();
    figures.dedup();
    let (preprocess_figures, unet_figures): (Vec<Figure>, Vec<Figure>) =
        figures.iter().partition(|f| f.is_preprocess());

    let scratch = ScratchDir::create()?;
    let peak_resets = reset_peak_rss();
    if !args.json && !peak_resets {
        println!(
            "note: the peak RSS could not be reset per figure: each is the process's peak so far"
        );
    }
    let mut measurements = Vec::new();
    if !unet_figures.is_empty() {
        measurements.extend(run_unet_figures(&args, &unet_figures, scratch.path())?);
    }
    if !preprocess_figures.is_empty() {
        measurements.extend(preprocess::run(&args, &preprocess_figures, scratch.path())?);
    }
    if !args.json {
        print_table(&measurements);
    }
    Ok(())
}

/// The SD1.5 figures: the models written to `scratch`, then measured in figure order.
fn run_unet_figures(
    args: &BenchArgs,
    figures: &[Figure],
    scratch: &Path,
) -> anyhow::Result<Vec<Measurement>> {
    let sizes = if args.tiny { &TINY } else { &FULL_SIZE };
    let (device, dtype) = crate::device_and_dtype(&args.device, &args.dtype)?;
    let files = ModelFiles::write(scratch, sizes, figures)?;
    let vae_config = VaeConfig::from_file(&files.vae.join("config.json"))?;
    let latent_factor = vae_config.downscale_factor();
    let default_side = files.unet_config.sample_size.unwrap_or(64) * latent_factor;
    let width = args.width.unwrap_or(default_side);
    let height = args.height.unwrap_or(default_side);
    if width == 0
        || height == 0
        || !width.is_multiple_of(latent_factor)
        || !height.is_multiple_of(latent_factor)
    {
        anyhow::bail!("--width and --height must be positive multiples of {latent_factor}");
    }
    let info = RunInfo {
        device,
        dtype,
        threads: candle_core::utils::get_num_threads(),
        width,
        height,
        steps: args.steps as usize,
        warmup: args.warmup,
        tiny: args.tiny,
    };
    if !args.json {
        println!(
            "ipcompose bench: {}, {width}x{height} (latents {}x{}), CFG batch 2, {TEXT_TOKENS} \
             text tokens, {:?} on {:?}, {} thread(s), {} warm-up + {} timed run(s) per figure",
            sizes.description,
            width / latent_factor,
            height / latent_factor,
            info.dtype,
            info.device,
            info.threads,
            args.warmup,
            args.repeats
        );
    }

    let bench = Bench {
        files: &files,
        sizes,
        latent: (height / latent_factor, width / latent_factor),
        warmup: args.warmup,
        repeats: args.repeats,
        json: args.json,
        info: &info,
    };
    bench.measure_all(figures)
}

/// The inputs of one guided step, shared by the step figures.
struct StepInputs {
    /// `[2, C, h, w]`: the latents twice, as the loop feeds them under guidance.
    model_input: Tensor,
    /// `[2, 77, D]`: uncond and cond text.
    context: Tensor,
    /// `[1, 3, H, W]` in [0, 1].
    hint: Tensor,
}

struct Bench<'a> {
    files: &'a ModelFiles,
    sizes: &'a ModelSizes,
    /// `(h, w)` of the latents.
    latent: (usize, usize),
    warmup: u32,
    repeats: u32,
    json: bool,
    info: &'a RunInfo,
}

impl Bench<'_> {
    fn measure_all(&self, figures: &[Figure]) -> anyhow::Result<Vec<Measurement>> {
        let (device, dtype) = (self.info.device.clone(), self.info.dtype);
        let mut done = Vec::new();
        if figures.contains(&Figure::Load) {
            let m = self.measure("load", || {
                let unet = self.files.load_unet(dtype, &device)?;
                drop(unet);
                Ok(None)
            })?;
            self.report(m, &mut done);
        }
        if figures.contains(&Figure::LoadLora) {
            let lora = self.files.write_lora(16)?;
            let m = self.measure("load_lora", || {
                let unet = self.files.load_unet_with_lora(&lora, dtype, &device)?;
                drop(unet);
                Ok(None)
            })?;
            self.report(m, &mut done);
        }
        let step_figures = figures
            .iter()
            .any(|f| !matches!(f, Figure::Load | Figure::LoadLora));
        if !step_figures {
            return Ok(done);
        }
        let unet = self.files.load_unet(dtype, &device)?;
        let inputs = self.step_inputs(&unet, &device)?;
        let no_ip: Vec<Vec<IpKeyValue>> = Vec::new();

        if figures.contains(&Figure::UnetStep) {
            let m = self.measure("unet_step", || {
                let out = unet.forward(
                    &inputs.model_input,
                    TIMESTEP,
                    &inputs.context,
                    &Injections::default(),
                )?;
                Ok(Some(out))
            })?;
            self.report(m, &mut done);
        }

        if figures.contains(&Figure::UnetStepIp) {
            let ip_layers = self.ip_injections(&unet, &device)?;
            let m = self.measure("unet_step_ip", || {
                let injections = Injections {
                    ip_layers: &ip_layers,
                    ..Injections::default()
                };
                let out =
                    unet.forward(&inputs.model_input, TIMESTEP, &inputs.context, &injections)?;
                Ok(Some(out))
            })?;
            self.report(m, &mut done);
        }

        let controlnet_figures = [Figure::UnetStepCn1, Figure::CnSkipped, Figure::UnetStepCn2];
        if figures.iter().any(|f| controlnet_figures.contains(f)) {
            let first = Rc::new(self.files.load_controlnet(dtype, &device)?);
            let whole_run = self.prepared_controlnet(&first, &inputs, 1.0);
            let steps = self.info.steps;
            // A step is measured as the loop runs it: the ControlNets through the pipeline's
            // own `controlnet_residuals` (which skips those outside their window), then the UNet.
            let step = |controlnets: &[PreparedControlNet], step_index: usize| {
                let residuals = controlnet_residuals(
                    controlnets,
                    step_index,
                    &inputs.model_input,
                    TIMESTEP,
                    (&inputs.context).into(),
                    true,
                )?;
                let injections = Injections {
                    ip_layers: &no_ip,
                    down_residuals: residuals.as_ref().map(|(down, _)| down.as_slice()),
                    mid_residual: residuals.as_ref().map(|(_, mid)| mid),
                    down_block_features: None,
                };
                let out =
                    unet.forward(&inputs.model_input, TIMESTEP, &inputs.context, &injections)?;
                anyhow::Ok(Some(out))
            };
            let mut cn1_median = None;
            if figures.contains(&Figure::UnetStepCn1) {
                let controlnets = [whole_run];
                let m = self.measure("unet_step_cn1", || step(&controlnets, 0))?;
                cn1_median = Some(m.median());
                self.report(m, &mut done);
            }
            if figures.contains(&Figure::CnSkipped) {
                // Active for the first half only, measured at the last step.
                let first_half = self.prepared_controlnet(&first, &inputs, 0.5);
                let controlnets = [first_half];
                let mut m = self.measure("cn_skipped", || step(&controlnets, steps - 1))?;
                m.saving_ratio = cn1_median.map(|cn1| cn1 / m.median());
                self.report(m, &mut done);
            }
            if figures.contains(&Figure::UnetStepCn2) {
                // A second model with its own weights, as two different ControlNets would be.
                let second = Rc::new(self.files.load_controlnet(dtype, &device)?);
                let controlnets = [
                    self.prepared_controlnet(&first, &inputs, 1.0),
                    self.prepared_controlnet(&second, &inputs, 1.0),
                ];
                let m = self.measure("unet_step_cn2", || step(&controlnets, 0))?;
                self.report(m, &mut done);
            }
        }

        if figures.contains(&Figure::Precision) && dtype != DType::F32 {
            let started = Instant::now();
            let half = unet
                .forward(
                    &inputs.model_input,
                    TIMESTEP,
                    &inputs.context,
                    &Injections::default(),
                )?
                .to_dtype(DType::F32)?;
            let seconds = started.elapsed().as_secs_f64();
            let unet32 = self.files.load_unet(DType::F32, &device)?;
            let full = unet32.forward(
                &inputs.model_input.to_dtype(DType::F32)?,
                TIMESTEP,
                &inputs.context.to_dtype(DType::F32)?,
                &Injections::default(),
            )?;
            drop(unet32);
            let scalar = |t: Tensor| -> anyhow::Result<f64> {
                Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
            };
            let diff = (&half - &full)?;
            let relative_max = scalar(diff.abs()?.max_all()?)? / scalar(full.abs()?.max_all()?)?;
            let relative_l2 =
                (scalar(diff.sqr()?.sum_all()?)? / scalar(full.sqr()?.sum_all()?)?).sqrt();
            let mut m = Measurement {
                name: "precision".to_string(),
                times: vec![seconds],
                peak_rss_bytes: peak_rss_bytes(),
                saving_ratio: None,
                extra: serde_json::Map::new(),
            };
            m.extra
                .insert("relative_max_vs_f32".into(), relative_max.into());
            m.extra
                .insert("relative_l2_vs_f32".into(), relative_l2.into());
            if !self.json {
                eprintln!(
                    "precision: {} vs f32, max {relative_max:.2e} relative, L2 {relative_l2:.2e}",
                    dtype.as_str()
                );
            }
            self.report(m, &mut done);
        }

        if figures.contains(&Figure::Run) {
            let vae_dir = &self.files.vae;
            let vae_config = VaeConfig::from_file(&vae_dir.join("config.json"))?;
            let vb = WeightStore::open(&[vae_dir.join(WEIGHTS_FILE)])?.var_builder(dtype, &device);
            let vae = Vae::new(vb, &vae_config)?;
            let scheduler_config = SchedulerConfig::from_json_str(SD15_SCHEDULER_CONFIG)?;
            let (h, w) = self.latent;
            let in_channels = unet.config().in_channels;
            let init =
                Tensor::randn(0f32, 1f32, (1, in_channels, h, w), &device)?.to_dtype(dtype)?;
            let text = TextConditioning {
                context: inputs.context.clone(),
                guided: true,
                guidance: Guidance {
                    scale: GUIDANCE_SCALE,
                    rescale: 0.0,
                },
            };
            let name = format!("run_{}", self.info.steps);
            let m = self.measure(&name, || {
                let mut scheduler =
                    build_scheduler(SchedulerKind::Ddim, &scheduler_config, self.info.steps)?;
                let mut noise = SeededNoise::new(0);
                let latents = denoise(
                    &unet,
                    scheduler.as_mut(),
                    &init,
                    &text,
                    &Conditions::default(),
                    &mut noise,
                    &mut |_| {},
                )?;
                Ok(Some(vae.decode_to_unit(&latents)?))
            })?;
            self.report(m, &mut done);
        }
        Ok(done)
    }

    fn step_inputs(
        &self,
        unet: &UNet2DConditionModel,
        device: &Device,
    ) -> anyhow::Result<StepInputs> {
        let config = unet.config();
        let (h, w) = self.latent;
        let latents = Tensor::randn(0f32, 1f32, (1, config.in_channels, h, w), device)?;
        let model_input = Tensor::cat(&[&latents, &latents], 0)?;
        let context = Tensor::randn(
            0f32,
            1f32,
            (2, TEXT_TOKENS, config.cross_attention_dim),
            device,
        )?;
        let hint = Tensor::rand(
            0f32,
            1f32,
            (1, 3, self.info.height, self.info.width),
            device,
        )?;
        let dtype = self.info.dtype;
        Ok(StepInputs {
            model_input: model_input.to_dtype(dtype)?,
            context: context.to_dtype(dtype)?,
            hint: hint.to_dtype(dtype)?,
        })
    }

    /// Every layer's image keys/values for CFG batch 2, computed once as the pipeline does:
    /// the projection of a zero embedding (diffusers' negative) and of a random one.
    fn ip_injections(
        &self,
        unet: &UNet2DConditionModel,
        device: &Device,
    ) -> anyhow::Result<Vec<Vec<IpKeyValue>>> {
        let adapter = IpAdapter::load(&self.files.ip_adapter, self.info.dtype, device)?;
        if adapter.info().layer_channels.len() != unet.config().cross_attention_layers() {
            anyhow::bail!("the generated IP-Adapter does not fit the UNet");
        }
        let embedding = Tensor::randn(0f32, 1f32, (1, self.sizes.image_embedding_width), device)?
            .to_dtype(self.info.dtype)?;
        let positive = adapter.image_tokens(&embedding)?;
        let negative = adapter.image_tokens(&embedding.zeros_like()?)?;
        let tokens = Tensor::cat(&[&negative, &positive], 0)?;
        Ok(adapter
            .layer_key_values(&tokens)?
            .into_iter()
            .map(|(key, value)| {
                vec![IpKeyValue {
                    key,
                    value,
                    scale: 1.0,
                    mask: None,
                }]
            })
            .collect())
    }

    fn prepared_controlnet(
        &self,
        model: &Rc<ControlNetModel>,
        inputs: &StepInputs,
        end: f64,
    ) -> PreparedControlNet {
        PreparedControlNet::single(
            Rc::clone(model),
            inputs.hint.clone(),
            window(self.info.steps, 0.0, end)
                .into_iter()
                .map(|active| if active { 1.0 } else { 0.0 })
                .collect(),
            false,
        )
    }

    fn measure(
        &self,
        name: &str,
        once: impl FnMut() -> anyhow::Result<Option<Tensor>>,
    ) -> anyhow::Result<Measurement> {
        measure(name, self.warmup, self.repeats, self.json, once)
    }

    fn report(&self, measurement: Measurement, done: &mut Vec<Measurement>) {
        report(self.info, self.json, measurement, done)
    }
}

/// Runs `once` `warmup` times untimed, then `repeats` times timed.
fn measure(
    name: &str,
    warmup: u32,
    repeats: u32,
    json: bool,
    mut once: impl FnMut() -> anyhow::Result<Option<Tensor>>,
) -> anyhow::Result<Measurement> {
    if !json {
        eprintln!("measuring {name} ({warmup} warm-up + {repeats} timed)…");
    }
    reset_peak_rss();
    for _ in 0..warmup {
        once().with_context(|| format!("{name} (warm-up)"))?;
    }
    let mut times = Vec::with_capacity(repeats as usize);
    let mut last = None;
    let transfers_before = crate::transfer_count::totals();
    for _ in 0..repeats {
        let started = Instant::now();
        last = once().with_context(|| name.to_string())?;
        // GPU kernels run asynchronously: the time is the time until they are done.
        if let Some(out) = &last {
            out.device().synchronize()?;
        }
        times.push(started.elapsed().as_secs_f64());
    }
    let transfers_after = crate::transfer_count::totals();
    let mut extra = serde_json::Map::new();
    if crate::transfer_count::COUNTING && repeats > 0 {
        // Host↔device copies per timed call (0 when everything of a step stays on the GPU).
        let per_call = |after: u64, before: u64| (after - before) / u64::from(repeats);
        extra.insert(
            "host_to_device_bytes_per_call".into(),
            per_call(transfers_after.0, transfers_before.0).into(),
        );
        extra.insert(
            "device_to_host_bytes_per_call".into(),
            per_call(transfers_after.1, transfers_before.1).into(),
        );
    }
    let peak_rss_bytes = peak_rss_bytes();
    // Random weights can in principle overflow; say so rather than time NaN arithmetic
    // silently.
    if let Some(out) = last {
        let total: f32 = out.abs()?.sum_all()?.to_dtype(DType::F32)?.to_scalar()?;
        if !total.is_finite() {
            eprintln!("warning: {name}: the output is not finite (random weights)");
        }
    }
    Ok(Measurement {
        name: name.to_string(),
        times,
        peak_rss_bytes,
        saving_ratio: None,
        extra,
    })
}

/// Shows a finished figure at once (a JSON line, or progress on stderr), so a long
/// benchmark reports its figures as they come.
fn report(info: &RunInfo, json: bool, measurement: Measurement, done: &mut Vec<Measurement>) {
    if json {
        println!("{}", json_line(info, &measurement));
    } else {
        eprintln!("  median {:.3} s", measurement.median());
    }
    done.push(measurement);
}

fn json_line(info: &RunInfo, m: &Measurement) -> String {
    let mut line = serde_json::json!({
        "tool": "ipcompose",
        "name": m.name,
        "median_s": m.median(),
        "min_s": m.min(),
        "max_s": m.max(),
        "repeats": m.times.len(),
        "warmup": info.warmup,
        "peak_rss_bytes": m.peak_rss_bytes,
        "threads": info.threads,
        "device": format!("{:?}", info.device.location()),
        "dtype": info.dtype.as_str(),
        "width": info.width,
        "height": info.height,
        "tiny": info.tiny,
    });
    if m.name.starts_with("run_") {
        line["steps"] = info.steps.into();
    }
    if let Some(ratio) = m.saving_ratio {
        line["cn1_over_skipped"] = ratio.into();
    }
    for (key, value) in &m.extra {
        line[key] = value.clone();
    }
    line.to_string()
}

fn print_table(measurements: &[Measurement]) {
    println!();
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>8} {:>12}",
        "figure", "median s", "min s", "max s", "repeats", "peak RSS"
    );
    for m in measurements {
        let peak = m
            .peak_rss_bytes
            .map(|b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64))
            .unwrap_or_else(|| "n/a".to_string());
        println!(
            "{:<24} {:>10.3} {:>10.3} {:>10.3} {:>8} {:>12}",
            m.name,
            m.median(),
            m.min(),
            m.max(),
            m.times.len(),
            peak
        );
    }
    for m in measurements {
        if let Some(ratio) = m.saving_ratio {
            println!(
                "cn_skipped: outside its window the ControlNet is not run; the step costs {:.3} s \
                 instead of {:.3} s ({ratio:.2}x faster)",
                m.median(),
                m.median() * ratio
            );
        }
    }
}

/// Clears the kernel's peak-RSS record (Linux ≥ 4.0); false where that is not possible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// `VmHWM` of this process in bytes (Linux), the peak resident set size.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// A temporary folder for the generated weights, removed when the benchmark ends.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(format!("ipcompose-bench-{}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";

/// The generated model files, laid out as diffusers folders.
struct ModelFiles {
    unet: PathBuf,
    unet_config: UNetConfig,
    controlnet: PathBuf,
    vae: PathBuf,
    ip_adapter: PathBuf,
}

impl ModelFiles {
    /// Writes the configs, and random weights for the models `figures` need.
    fn write(root: &Path, sizes: &ModelSizes, figures: &[Figure]) -> anyhow::Result<Self> {
        let folder = |name: &str, config: &str| -> anyhow::Result<PathBuf> {
            let dir = root.join(name);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("config.json"), config)?;
            Ok(dir)
        };
        let unet = folder("unet", sizes.unet)?;
        let controlnet = folder("controlnet", sizes.controlnet)?;
        let vae = folder("vae", sizes.vae)?;
        let ip_adapter = root.join("ip-adapter.safetensors");
        let unet_config = UNetConfig::from_file(&unet.join("config.json"))?;

        // Every figure but `load` needs the UNet, and `load` needs it too.
        write_random_weights(&unet.join(WEIGHTS_FILE), |vb| {
            UNet2DConditionModel::new(vb, &unet_config).map(drop)
        })?;
        let needs_controlnet = figures.iter().any(|f| {
            matches!(
                f,
                Figure::UnetStepCn1 | Figure::CnSkipped | Figure::UnetStepCn2
            )
        });
        if needs_controlnet {
            let config = ControlNetConfig::from_folder(&controlnet)?;
            write_random_weights(&controlnet.join(WEIGHTS_FILE), |vb| {
                ControlNetModel::new(vb, &config).map(drop)
            })?;
        }
        if figures.contains(&Figure::Run) {
            let config = VaeConfig::from_file(&vae.join("config.json"))?;
            write_random_weights(&vae.join(WEIGHTS_FILE), |vb| {
                Vae::new(vb, &config).map(drop)
            })?;
        }
        if figures.contains(&Figure::UnetStepIp) {
            write_ip_adapter(&ip_adapter, &unet_config, sizes.image_embedding_width)?;
        }
        Ok(Self {
            unet,
            unet_config,
            controlnet,
            vae,
            ip_adapter,
        })
    }

    /// The UNet as `DiffusersFolder::load_unet` loads it: one memory-mapped safetensors file
    /// behind ipcompose's weight store, copied into the model's tensors.
    /// A kohya LoRA of `rank` on every attention projection of the UNet (random, small values).
    fn write_lora(&self, rank: usize) -> anyhow::Result<PathBuf> {
        let store = WeightStore::open(&[self.unet.join(WEIGHTS_FILE)])?;
        let mut tensors = std::collections::HashMap::new();
        for name in store.tensor_names() {
            let Some(module) = name.strip_suffix(".weight") else {
                continue;
            };
            let attention = ["to_q", "to_k", "to_v", "to_out.0"]
                .iter()
                .any(|s| module.ends_with(&format!(".{s}")));
            let Some(shape) = store.shape(&name).filter(|s| s.len() == 2 && attention) else {
                continue;
            };
            let stem = format!("lora_unet_{}", module.replace('.', "_"));
            let cpu = Device::Cpu;
            tensors.insert(
                format!("{stem}.lora_down.weight"),
                (Tensor::randn(0f32, 1f32, (rank, shape[1]), &cpu)? * 0.01)?,
            );
            tensors.insert(
                format!("{stem}.lora_up.weight"),
                (Tensor::randn(0f32, 1f32, (shape[0], rank), &cpu)? * 0.01)?,
            );
            tensors.insert(format!("{stem}.alpha"), Tensor::new(rank as f32, &cpu)?);
        }
        let path = self.unet.with_file_name("lora.safetensors");
        candle_core::safetensors::save(&tensors, &path)?;
        Ok(path)
    }

    /// The UNet with `lora` (scale 1) added as its weights load, as a recipe's `loras` does.
    fn load_unet_with_lora(
        &self,
        lora: &Path,
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<UNet2DConditionModel> {
        use ipcompose::models::lora::{Component, ComponentWeights, LoraFile, WeightPatches};
        let config = UNetConfig::from_file(&self.unet.join("config.json"))?;
        let files = [self.unet.join(WEIGHTS_FILE)];
        let base = WeightStore::open(&files)?;
        let names = base.tensor_names();
        let updates = LoraFile::open(lora)?.resolve(&[ComponentWeights {
            component: Component::Unet,
            names: &names,
            layers_per_block: &config.layers_per_block,
        }])?;
        let patches = WeightPatches::build(&[(updates, 1.0)], Component::Unet, |n| base.shape(n))?;
        let vb = WeightStore::open(&files)?
            .with_patches(Some(std::sync::Arc::new(patches)))
            .var_builder(dtype, device);
        Ok(UNet2DConditionModel::new(vb, &config)?)
    }

    fn load_unet(&self, dtype: DType, device: &Device) -> anyhow::Result<UNet2DConditionModel> {
        let config = UNetConfig::from_file(&self.unet.join("config.json"))?;
        let vb = WeightStore::open(&[self.unet.join(WEIGHTS_FILE)])?.var_builder(dtype, device);
        Ok(UNet2DConditionModel::new(vb, &config)?)
    }

    fn load_controlnet(&self, dtype: DType, device: &Device) -> anyhow::Result<ControlNetModel> {
        let config = ControlNetConfig::from_folder(&self.controlnet)?;
        Ok(ControlNetModel::load_folder(
            &self.controlnet,
            &config,
            None,
            dtype,
            device,
        )?)
    }
}

/// Tensor name → shape and the initialisation candle-nn would use.
type RecordedTensors = BTreeMap<String, (Vec<usize>, Init)>;

/// The tensors a model asks its `VarBuilder` for.
#[derive(Clone, Default)]
struct TensorRecorder(Arc<Mutex<RecordedTensors>>);

impl SimpleBackend for TensorRecorder {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("tensor recorder poisoned".to_string()))?
            .insert(name.to_string(), (shape.dims().to_vec(), init));
        // A broadcast scalar has the right shape without the memory: this model is built only
        // to learn its tensor names and shapes.
        Tensor::zeros((), dtype, device)?.broadcast_as(shape)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("the tensor recorder needs a shape for `{name}`")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        // As candle's `Zeros` backend: models that probe for alternative names take the
        // current diffusers ones.
        true
    }
}

/// A tensor whose random values are drawn only when the file writer asks for them, so a model
/// file of any size is written with one tensor in memory at a time.
struct RandomTensor {
    shape: Vec<usize>,
    fill: Fill,
}

/// How a [`RandomTensor`]'s values are made.
enum Fill {
    /// candle-nn's initialisation (random).
    Init(Init),
    /// [`pattern_value`]`(seed, i)` for the `i`-th value: the same numbers on every machine
    /// and in tools/bench_preprocess.py.
    Pattern { seed: u64, bound: f32, offset: f32 },
}

/// A uniform value in `[offset - bound, offset + bound)` from the index `i` of a value in
/// tensor number `seed`: splitmix64 of `seed · 2³² + i`, its top 53 bits as a double in
/// [0, 1), rounded to f32 at the end (numpy computes the same, bit for bit).
fn pattern_value(seed: u64, i: u64, bound: f32, offset: f32) -> f32 {
    let mut z = (seed << 32)
        .wrapping_add(i)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let unit = (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    ((2.0 * unit - 1.0) * bound as f64 + offset as f64) as f32
}

impl safetensors::View for RandomTensor {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let values = match self.fill {
            // `View::data` cannot fail; initialising a CPU tensor of a valid shape does not
            // either.
            Fill::Init(init) => init
                .var(self.shape.as_slice(), DType::F32, &Device::Cpu)
                .and_then(|v| v.as_tensor().flatten_all()?.to_vec1::<f32>())
                .expect("initialising a random CPU tensor"),
            Fill::Pattern {
                seed,
                bound,
                offset,
            } => (0..self.data_len() as u64 / 4)
                .map(|i| pattern_value(seed, i, bound, offset))
                .collect(),
        };
        Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * std::mem::size_of::<f32>()
    }
}

/// Builds a model against a recorder to learn its tensors, then writes them with random values.
fn write_random_weights(
    path: &Path,
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<()>,
) -> anyhow::Result<()> {
    let recorder = TensorRecorder::default();
    let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, Device::Cpu);
    build(vb).with_context(|| format!("building the model for {}", path.display()))?;
    let tensors = std::mem::take(
        &mut *recorder
            .0
            .lock()
            .map_err(|_| anyhow::anyhow!("tensor recorder poisoned"))?,
    );
    write_tensors(path, tensors)
}

/// Learns a model's tensors from a recorder as [`write_random_weights`] does, then writes the
/// `i`-th (in name order) with [`Fill::Pattern`] values of seed `i` and the bound and offset
/// `fill(name, shape)` gives.
fn write_pattern_weights(
    path: &Path,
    build: impl FnOnce(VarBuilder<'static>) -> anyhow::Result<()>,
    fill: impl Fn(&str, &[usize]) -> (f32, f32),
) -> anyhow::Result<()> {
    let recorder = TensorRecorder::default();
    let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, Device::Cpu);
    build(vb).with_context(|| format!("building the model for {}", path.display()))?;
    let tensors = std::mem::take(
        &mut *recorder
            .0
            .lock()
            .map_err(|_| anyhow::anyhow!("tensor recorder poisoned"))?,
    );
    let views = tensors
        .into_iter()
        .enumerate()
        .map(|(seed, (name, (shape, _)))| {
            let (bound, offset) = fill(&name, &shape);
            let fill = Fill::Pattern {
                seed: seed as u64,
                bound,
                offset,
            };
            (name, RandomTensor { shape, fill })
        });
    safetensors::serialize_to_file(views, None, path)
        .with_context(|| format!("writing {}", path.display()))
}

fn write_tensors(path: &Path, tensors: RecordedTensors) -> anyhow::Result<()> {
    let views = tensors.into_iter().map(|(name, (shape, init))| {
        let fill = Fill::Init(init);
        (name, RandomTensor { shape, fill })
    });
    safetensors::serialize_to_file(views, None, path)
        .with_context(|| format!("writing {}", path.display()))
}

/// An ip-adapter_sd15-shaped file: `ImageProjModel` (embedding → 4 tokens, layer norm) and a
/// `to_k_ip` / `to_v_ip` pair for every cross-attention layer, keys numbered 1, 3, 5, … as
/// diffusers' `attn_processors` order has them.
fn write_ip_adapter(
    path: &Path,
    unet: &UNetConfig,
    image_embedding_width: usize,
) -> anyhow::Result<()> {
    let width = unet.cross_attention_dim;
    let kaiming = candle_nn::init::DEFAULT_KAIMING_NORMAL;
    let mut tensors = RecordedTensors::new();
    tensors.insert(
        "image_proj.proj.weight".to_string(),
        (vec![IP_TOKENS * width, image_embedding_width], kaiming),
    );
    tensors.insert(
        "image_proj.proj.bias".to_string(),
        (vec![IP_TOKENS * width], Init::Const(0.0)),
    );
    tensors.insert(
        "image_proj.norm.weight".to_string(),
        (vec![width], Init::Const(1.0)),
    );
    tensors.insert(
        "image_proj.norm.bias".to_string(),
        (vec![width], Init::Const(0.0)),
    );
    for (i, layer) in unet.cross_attention_layout().iter().enumerate() {
        let key = 2 * i + 1;
        for projection in ["to_k_ip", "to_v_ip"] {
            tensors.insert(
                format!("ip_adapter.{key}.{projection}.weight"),
                (vec![layer.channels, width], kaiming),
            );
        }
    }
    write_tensors(path, tensors)
}

/// The preprocessor figures: each annotator on one photograph, as `ipcompose preprocess` and the
/// recipes run it, beside controlnet_aux / OpenCV / transformers in tools/bench_preprocess.py.
mod preprocess {
    use std::path::{Path, PathBuf};

    use anyhow::Context;
    use candle_core::{DType, Device};
    use ipcompose::models::depth_anything::{
        load_depth_anything_with_config, DepthAnything, DepthAnythingConfig, DepthAnythingVariant,
    };
    use ipcompose::models::openpose::{BodyPoseConfig, BodyPoseModel};
    use ipcompose::preprocess::{self as pre, Operation, Settings};
    use serde_json::json;

    use super::{
        measure, report, write_pattern_weights, write_random_weights, BenchArgs, Figure,
        Measurement, RunInfo,
    };

    /// The photograph both tools read (scikit-image's `astronaut`, 512×512).
    const DEFAULT_IMAGE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tools/bench-inputs/photo512.png"
    );
    /// Side of the photograph's copy in `--tiny` mode.
    const TINY_SIDE: u32 = 128;
    const CANNY_LOW: f64 = 100.0;
    const CANNY_HIGH: f64 = 200.0;
    const BLUR_FACTOR: f64 = 4.0;
    const SHUFFLE_SEED: u64 = 0;
    /// The pose weights' pattern: the last heatmap layer's bias is lowered by this much so that
    /// a few dozen peaks pass the detector's 0.1 threshold instead of over a thousand (a real
    /// model finds about 18 on a one-person photograph).
    pub const POSE_HEATMAP_BIAS_OFFSET: f32 = -1.0;
    /// Bound of the pose weights' biases (uniform in ±this, before the offset above).
    pub const POSE_BIAS_BOUND: f32 = 0.05;

    /// Sizes of one mode: full (the real networks at 512) or `--tiny`.
    struct Sizes {
        detect_resolution: u32,
        depth_input_size: u32,
        depth: DepthAnythingConfig,
        pose: BodyPoseConfig,
    }

    fn sizes(tiny: bool) -> Sizes {
        if !tiny {
            return Sizes {
                detect_resolution: 512,
                depth_input_size: pre::depth::INPUT_SIZE,
                depth: DepthAnythingVariant::Small.config(),
                pose: BodyPoseConfig::default(),
            };
        }
        // The depth fixture's narrow network (tests/fixtures/depth/tiny-hf).
        let depth = DepthAnythingConfig {
            hidden_size: 32,
            num_hidden_layers: 4,
            num_attention_heads: 2,
            out_indices: vec![1, 2, 3, 4],
            reassemble_hidden_size: 32,
            neck_hidden_sizes: vec![8, 16, 24, 32],
            fusion_hidden_size: 16,
            head_hidden_size: 8,
            ..DepthAnythingVariant::Small.config()
        };
        Sizes {
            detect_resolution: TINY_SIDE,
            depth_input_size: 8 * pre::depth::MULTIPLE,
            depth,
            pose: BodyPoseConfig::tiny(),
        }
    }

    pub fn run(
        args: &BenchArgs,
        figures: &[Figure],
        scratch: &Path,
    ) -> anyhow::Result<Vec<Measurement>> {
        let path = args
            .image
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_IMAGE));
        let mut image = pre::load_image(&path).with_context(|| {
            format!("the preprocessor figures read a photograph (--image; default {DEFAULT_IMAGE})")
        })?;
        if args.tiny {
            image = pre::resize::resize(
                &image,
                TINY_SIDE,
                TINY_SIDE,
                pre::resize::Interpolation::Area,
            );
        }
        let sizes = sizes(args.tiny);
        let info = RunInfo {
            device: Device::Cpu,
            dtype: DType::F32,
            threads: candle_core::utils::get_num_threads(),
            width: image.width() as usize,
            height: image.height() as usize,
            steps: 0,
            warmup: args.warmup,
            tiny: args.tiny,
        };
        let detect = sizes.detect_resolution;
        if !args.json {
            println!(
                "ipcompose bench: preprocessors on {} ({}x{}{}), detect resolution {detect}, \
                 fp32 networks on the CPU with random weights ({}), {} thread(s), {} warm-up + \
                 {} timed run(s) per figure",
                path.display(),
                info.width,
                info.height,
                if args.tiny { ", --tiny copy" } else { "" },
                if args.tiny {
                    "narrow test sizes"
                } else {
                    "Depth Anything V2 Small, OpenPose body"
                },
                info.threads,
                args.warmup,
                args.repeats
            );
        }
        let mut done = Vec::new();
        let time = |name: &str, once: &mut dyn FnMut() -> anyhow::Result<()>| {
            measure(name, args.warmup, args.repeats, args.json, || {
                once().map(|()| None)
            })
        };
        let annotator = |figure: Figure,
                         name: &str,
                         settings: Settings,
                         done: &mut Vec<Measurement>|
         -> anyhow::Result<()> {
            if !figures.contains(&figure) {
                return Ok(());
            }
            let mut m = time(name, &mut || {
                settings.apply(&image)?;
                Ok(())
            })?;
            m.extra.insert(
                "detect_resolution".into(),
                json!(settings.detect_resolution),
            );
            report(&info, args.json, m, done);
            Ok(())
        };
        // The annotators resize their map to `image_resolution` (here the detect resolution)
        // at the end; for a square photograph that is the detect size itself.
        let detect_size = pre::resize::detect_size(image.width(), image.height(), detect);
        let annotator_output = Some((detect_size.0, detect_size.1));
        annotator(
            Figure::PreprocessCanny,
            "preprocess_canny",
            Settings {
                operation: Operation::Canny {
                    low: CANNY_LOW,
                    high: CANNY_HIGH,
                },
                detect_resolution: Some(detect),
                output_size: annotator_output,
            },
            &mut done,
        )?;
        annotator(
            Figure::PreprocessBlur,
            "preprocess_blur",
            Settings::new(Operation::Blur {
                factor: BLUR_FACTOR,
            }),
            &mut done,
        )?;
        annotator(
            Figure::PreprocessShuffle,
            "preprocess_shuffle",
            Settings {
                operation: Operation::Shuffle { seed: SHUFFLE_SEED },
                detect_resolution: Some(detect),
                output_size: annotator_output,
            },
            &mut done,
        )?;

        if figures.contains(&Figure::PreprocessDepth) {
            let model = write_depth_model(scratch, &sizes.depth)?;
            let input_size = sizes.depth_input_size;
            let mut m = time("preprocess_depth", &mut || {
                pre::depth::depth_map(&model, &image, input_size)?;
                Ok(())
            })?;
            let (w, h) = pre::depth::network_size(image.width(), image.height(), input_size);
            m.extra.insert("input_size".into(), json!(input_size));
            m.extra.insert("network_input".into(), json!([w, h]));
            report(&info, args.json, m, &mut done);
        }

        let pose_figures = [Figure::PreprocessPoseNetwork, Figure::PreprocessPose];
        if figures.iter().any(|f| pose_figures.contains(f)) {
            let model = write_pose_model(scratch, &sizes.pose)?;
            let detect_image = pre::resize::resize_image(&image, detect)?;
            let input = pre::pose::prepare_input(&detect_image)?;
            // What the post-processing had to do: the same on both sides when the networks agree.
            let output = pre::pose::run_network(&model, &input)?;
            let estimate = pre::pose::estimate(&input, &output)?;
            let found = |m: &mut Measurement| {
                m.extra.insert("detect_resolution".into(), json!(detect));
                m.extra
                    .insert("network_input".into(), json!([input.width, input.height]));
                m.extra
                    .insert("candidates".into(), json!(estimate.candidate.len()));
                m.extra
                    .insert("people".into(), json!(estimate.subset.len()));
            };
            if figures.contains(&Figure::PreprocessPoseNetwork) {
                let mut m = time("preprocess_pose_network", &mut || {
                    pre::pose::run_network(&model, &input)?;
                    Ok(())
                })?;
                found(&mut m);
                report(&info, args.json, m, &mut done);
            }
            if figures.contains(&Figure::PreprocessPose) {
                let mut m = time("preprocess_pose", &mut || {
                    pre::pose::pose_map(&model, &image, detect, Some(detect))?;
                    Ok(())
                })?;
                found(&mut m);
                report(&info, args.json, m, &mut done);
            }
        }
        Ok(done)
    }

    /// A transformers-layout Depth Anything V2 checkpoint with random weights (candle-nn's
    /// initialisation), loaded back through the loader `preprocess depth --model` uses.
    fn write_depth_model(
        scratch: &Path,
        config: &DepthAnythingConfig,
    ) -> anyhow::Result<DepthAnything> {
        let dir = scratch.join("depth-anything");
        std::fs::create_dir_all(&dir)?;
        let weights = dir.join("model.safetensors");
        write_random_weights(&weights, |vb| DepthAnything::new(vb, config).map(drop))?;
        Ok(load_depth_anything_with_config(
            &weights,
            config,
            DType::F32,
            &Device::Cpu,
        )?)
    }

    /// An OpenPose body model (original `body_pose_model.pth` names) whose weights are the
    /// fixed pattern tools/bench_preprocess.py gives its `bodypose_model` too: tensors in name
    /// order, tensor `i` from seed `i`; weights uniform in ±√(6 / fan-in) (He), biases in
    /// ±[`POSE_BIAS_BOUND`], the final heatmaps' bias moved by [`POSE_HEATMAP_BIAS_OFFSET`].
    fn write_pose_model(scratch: &Path, config: &BodyPoseConfig) -> anyhow::Result<BodyPoseModel> {
        let path = scratch.join("body_pose_model.safetensors");
        write_pattern_weights(
            &path,
            |vb| Ok(BodyPoseModel::new(vb, config).map(drop)?),
            |name, shape| {
                if name.ends_with(".weight") {
                    let fan_in: usize = shape[1..].iter().product();
                    ((6.0 / fan_in as f64).sqrt() as f32, 0.0)
                } else if name == "Mconv7_stage6_L2.bias" {
                    (POSE_BIAS_BOUND, POSE_HEATMAP_BIAS_OFFSET)
                } else {
                    (POSE_BIAS_BOUND, 0.0)
                }
            },
        )?;
        Ok(BodyPoseModel::load(&path, &Device::Cpu)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn args(extra: &[&str]) -> BenchArgs {
        let mut argv = vec!["bench"];
        argv.extend_from_slice(extra);
        Cli::parse_from(argv).bench
    }

    /// The bits tools/bench_preprocess.py's `pattern` (numpy) gives for the same arguments.
    #[test]
    fn pattern_values_match_numpy() {
        let seed3: Vec<u32> = (0..4)
            .map(|i| pattern_value(3, i, 0.5, 0.1).to_bits())
            .collect();
        assert_eq!(seed3, [0xbdb5c6ef, 0x3dd50a2c, 0xbeb9990b, 0xbe7ee6c3]);
        let seed0: Vec<u32> = (0..2)
            .map(|i| pattern_value(0, i, 1.0, -1.0).to_bits())
            .collect();
        assert_eq!(seed0, [0xbe6efabe, 0xbf5deba4]);
    }

    #[test]
    fn preprocess_group_is_not_in_the_defaults() {
        let defaults = args(&[]).figures;
        assert!(defaults.iter().all(|f| !f.is_preprocess()), "{defaults:?}");
        assert_eq!(
            args(&["--figures", "preprocess,load"]).figures,
            [Figure::Preprocess, Figure::Load]
        );
    }

    /// Every preprocessor figure on the `--tiny` sizes (a 128×128 photograph, narrow networks).
    #[test]
    fn tiny_preprocessor_figures() {
        let args = args(&["--tiny", "--json", "--repeats", "1", "--warmup", "0"]);
        let scratch =
            std::env::temp_dir().join(format!("ipcompose-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).unwrap();
        let done = preprocess::run(&args, &Figure::PREPROCESSORS, &scratch);
        let _ = std::fs::remove_dir_all(&scratch);
        let done = done.unwrap();
        let names: Vec<&str> = done.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "preprocess_canny",
                "preprocess_blur",
                "preprocess_shuffle",
                "preprocess_depth",
                "preprocess_pose_network",
                "preprocess_pose"
            ]
        );
        let info = RunInfo {
            device: Device::Cpu,
            dtype: DType::F32,
            threads: 1,
            width: 128,
            height: 128,
            steps: 0,
            warmup: 0,
            tiny: true,
        };
        for m in &done {
            assert_eq!(m.times.len(), 1);
            let line: serde_json::Value = serde_json::from_str(&json_line(&info, m)).unwrap();
            assert_eq!(
                (line["width"].as_u64(), line["height"].as_u64()),
                (Some(128), Some(128))
            );
            if m.name.starts_with("preprocess_pose") {
                assert!(
                    line["candidates"].is_u64() && line["people"].is_u64(),
                    "{line}"
                );
            }
        }
        assert_eq!(
            done[3].extra["network_input"],
            serde_json::json!([112, 112])
        );
    }
}
