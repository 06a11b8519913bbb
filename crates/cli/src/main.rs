//! The `ipcompose` command line.

mod bench;
mod fetch;
mod inspect;
mod preprocess_cmd;
mod progress;
mod transfer_count;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ipcompose::pipeline::plan::fetch::ModelFetcher;
use ipcompose::pipeline::run::batch::Batch;
use ipcompose::pipeline::{plan::Plan, RunOptions};

#[derive(Parser)]
#[command(
    name = "ipcompose",
    version,
    about = "Stable Diffusion with image prompts and structural controls, from YAML recipes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a recipe and write its outputs.
    Run {
        /// The recipe file (YAML).
        #[arg(required_unless_present = "from", conflicts_with = "from")]
        recipe: Option<PathBuf>,
        /// Re-run the recipe embedded in a PNG that ipcompose wrote.
        #[arg(long, value_name = "IMAGE.png")]
        from: Option<PathBuf>,
        /// Replace output files that already exist.
        #[arg(long)]
        overwrite: bool,
        /// No progress output.
        #[arg(long, short)]
        quiet: bool,
        /// One line per step with its time and the bytes copied between host and GPU
        /// during it (counted in `cuda` builds).
        #[arg(long, short, conflicts_with = "quiet")]
        verbose: bool,
        /// Override a recipe value, e.g. `--set nodes.gen.generate.seed=7` (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Where the models run: `cpu`, or `cuda` / `cuda:N` (a build with `--features cuda`).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Weights and activations of the base model and ControlNets: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Use the hub cache only, download nothing (as `HF_HUB_OFFLINE=1`).
        #[arg(long)]
        offline: bool,
    },
    /// Say what a checkpoint file or folder is (kind, variant, base, dtype, parameters),
    /// from headers and configs only.
    Inspect {
        /// A checkpoint file or model folder.
        path: PathBuf,
    },
    /// Check a recipe without loading weights and print the resolved plan; hub models not
    /// in the cache are listed with their sizes (nothing is downloaded).
    Validate {
        /// The recipe file (YAML).
        recipe: PathBuf,
        /// Override a recipe value (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Do not ask the hub for sizes: name the missing files only.
        #[arg(long)]
        offline: bool,
    },
    /// Download every hub model a recipe (and each of its sweep's runs) needs into the
    /// Hugging Face cache and say what and how much, without running it.
    Pull {
        /// The recipe file (YAML).
        recipe: PathBuf,
        /// Override a recipe value (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Check the cache only (as `HF_HUB_OFFLINE=1`): says what is missing.
        #[arg(long)]
        offline: bool,
        /// No progress bars.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Write an IP-Adapter's image tokens for reference images to a safetensors file
    /// (`tokens`, `negative_tokens`), usable as `embeds:` in a recipe.
    Embed {
        /// The IP-Adapter file (.safetensors or .bin).
        #[arg(long)]
        adapter: PathBuf,
        /// The CLIP image encoder folder.
        #[arg(long)]
        image_encoder: PathBuf,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
        /// crop (diffusers), pad (letterbox) or squash.
        #[arg(long, default_value = "crop")]
        fit: String,
        /// concat (one token set per image) or average (one set for all).
        #[arg(long, default_value = "concat")]
        combine: String,
        /// An image for the negative tokens instead of diffusers' default.
        #[arg(long)]
        negative_image: Option<PathBuf>,
        /// Also write the exact square images the encoder saw to this folder.
        #[arg(long)]
        debug_input: Option<PathBuf>,
        /// Reference images.
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Measure the UNet step, IP-Adapter, ControlNet, whole-run and load times with
    /// full-size SD1.5 models of random weights (or the tiny test models).
    Bench(bench::BenchArgs),
    /// Make a hint image as the ControlNet annotators do: canny, invert, threshold, blur,
    /// shuffle.
    Preprocess(preprocess_cmd::PreprocessArgs),
}

struct EmbedArgs {
    adapter: PathBuf,
    image_encoder: PathBuf,
    out: PathBuf,
    fit: String,
    combine: String,
    negative_image: Option<PathBuf>,
    debug_input: Option<PathBuf>,
    images: Vec<PathBuf>,
}

fn embed(args: EmbedArgs) -> anyhow::Result<()> {
    use ipcompose::models::clip_vision::load_image_encoder;
    use ipcompose::models::ip_adapter::IpAdapter;
    use ipcompose::pipeline::plan::ip::{Combine, Fit};
    use ipcompose::pipeline::run::ip::{encoder_inputs, image_tokens, write_embeddings};

    let fit: Fit = args.fit.parse().map_err(anyhow::Error::msg)?;
    let combine = match args.combine.as_str() {
        "concat" => Combine::Concat,
        "average" => Combine::Average,
        other => anyhow::bail!("unknown --combine `{other}` (valid: concat, average)"),
    };
    let device = candle_core::Device::Cpu;
    let adapter = IpAdapter::load(&args.adapter, candle_core::DType::F32, &device)?;
    let encoder = load_image_encoder(&args.image_encoder, candle_core::DType::F32, &device)?;
    let expected = if adapter.info().projection.uses_penultimate() {
        encoder.config().hidden_size
    } else {
        encoder.config().projection_dim
    };
    if expected != adapter.info().image_feature_width {
        anyhow::bail!(
            "{}: the {} adapter expects image features of width {}, but {} gives {expected}",
            args.adapter.display(),
            adapter.info().projection.name(),
            adapter.info().image_feature_width,
            args.image_encoder.display()
        );
    }
    if let Some(dir) = &args.debug_input {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let size = encoder.config().image_size as u32;
        for (path, image) in args
            .images
            .iter()
            .zip(encoder_inputs(&args.images, size, fit)?)
        {
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let target = dir.join(format!("{stem}.png"));
            image
                .save(&target)
                .with_context(|| format!("writing {}", target.display()))?;
        }
    }
    let tokens = image_tokens(
        &adapter,
        &encoder,
        &args.images,
        args.negative_image.as_deref(),
        combine,
        fit,
        &device,
    )?;
    write_embeddings(&args.out, &tokens)?;
    println!(
        "wrote {} ({} token set(s) of {:?})",
        args.out.display(),
        tokens.len(),
        tokens[0].0.dims()
    );
    Ok(())
}

/// Reads a recipe file (or the recipe embedded in a PNG), applies `--set` overrides, expands
/// sweeps, brings hub models into the cache through `fetcher` and plans every run.
fn load_batch(
    path: &Path,
    from_png: bool,
    sets: &[String],
    fetcher: &mut dyn ModelFetcher,
) -> anyhow::Result<Batch> {
    use ipcompose::pipeline::io::provenance::{changed_inputs, read_embedded};
    let text = if from_png {
        read_embedded(path)?
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("reading recipe {}", path.display()))?
    };
    let batch = Batch::plan_with(&text, path, sets, fetcher)?;
    if let Some(first) = batch.runs.first() {
        for input in changed_inputs(&first.recipe) {
            eprintln!("warning: {input} changed since {} was made", path.display());
        }
    }
    // Sweep runs repeat the same recipe lines: each warning once.
    let mut warned = std::collections::BTreeSet::new();
    for warning in batch.runs.iter().flat_map(|run| &run.plan.warnings) {
        if warned.insert(warning) {
            eprintln!("warning: {warning}");
        }
    }
    Ok(batch)
}

fn print_batch(batch: &Batch) -> anyhow::Result<()> {
    if let Some(sweep) = &batch.sweep {
        let axes: Vec<String> = sweep
            .axes
            .iter()
            .map(|a| format!("{} of `{}` ({} values)", a.label, a.node, a.values.len()))
            .collect();
        println!(
            "sweep: {} combinations over {}",
            batch.runs.len(),
            axes.join(" x ")
        );
        for grid in &sweep.grids {
            println!("grid -> {}", grid.path.display());
        }
    }
    for run in &batch.runs {
        if !run.label.is_empty() {
            println!("== {}", run.label);
        }
        print_plan(&run.plan)?;
    }
    Ok(())
}

fn print_plan(plan: &Plan) -> anyhow::Result<()> {
    for (name, model) in &plan.models {
        println!(
            "model {name}: {:?} from {} (UNet {:?}, context {}, {} cross-attention layers)",
            model.kind,
            model.folder.root().display(),
            model.unet.block_out_channels,
            model.unet.cross_attention_dim,
            model.unet.cross_attention_layers()
        );
    }
    for (name, ip) in &plan.ip_models {
        println!(
            "ip-adapter {name}: {} from {} ({} layers, context {}, image features {})",
            ip.info.projection.name(),
            ip.file.display(),
            ip.info.layer_channels.len(),
            ip.info.cross_attention_dim,
            ip.info.image_feature_width
        );
    }
    for g in &plan.generations {
        println!(
            "generate {}: {}x{}, {} steps of {}, guidance {}, {:?}",
            g.node, g.width, g.height, g.steps, g.scheduler_kind, g.guidance, g.init
        );
        let reads: Vec<&str> = plan
            .dependencies
            .get(&g.node)
            .into_iter()
            .flatten()
            .map(String::as_str)
            .collect();
        if !reads.is_empty() {
            println!("  reads nodes: {}", reads.join(", "));
        }
        if !plan.needed.contains(&g.node) {
            println!("  (no output needs it: not run)");
        }
        for line in ipcompose::pipeline::run::text::describe_prompts(plan, g)? {
            println!("  {line}");
        }
        for ip in &g.ip_adapters {
            let layers: Vec<String> = ip.layer_scales.iter().map(|s| format!("{s}")).collect();
            println!(
                "  ip-adapter {}: window {:.2}..{:.2}, per-layer factors [{}], {} mask(s)",
                ip.model,
                ip.start,
                ip.end,
                layers.join(", "),
                ip.masks.len()
            );
        }
        for control in &g.controls {
            println!(
                "  control {}: window {:.2}..{:.2}, hint {}",
                control.model,
                control.start,
                control.end,
                control.image.display()
            );
        }
        if let Some(table) = g.weight_table() {
            println!("  weight per step and condition (- = not applied):");
            for line in table.lines() {
                println!("    {line}");
            }
        }
    }
    preprocess_cmd::print_preprocessors(plan);
    for o in &plan.outputs {
        println!("output {:?} of {} -> {}", o.kind, o.node, o.path.display());
    }
    Ok(())
}

/// `--device` and `--dtype` as candle's types.
pub fn device_and_dtype(
    device: &str,
    dtype: &str,
) -> anyhow::Result<(candle_core::Device, candle_core::DType)> {
    use candle_core::{DType, Device};
    let device = match device {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)
            .context("--device cuda (this binary needs `cargo build --release --features cuda`)")?,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => Device::new_cuda(ordinal).with_context(|| {
                format!(
                    "--device {other} (this binary needs `cargo build --release --features cuda`)"
                )
            })?,
            _ => anyhow::bail!("--device {other}: expected cpu, cuda or cuda:N"),
        },
    };
    let dtype = match dtype {
        "f32" | "fp32" => DType::F32,
        "f16" | "fp16" => DType::F16,
        "bf16" => DType::BF16,
        other => anyhow::bail!("--dtype {other}: expected f32, f16 or bf16"),
    };
    Ok((device, dtype))
}

fn run(
    recipe: &Path,
    from_png: bool,
    sets: &[String],
    options: &RunOptions,
    quiet: bool,
    verbose: bool,
    offline: bool,
) -> anyhow::Result<()> {
    let mut fetcher = fetch::HubFetcher::new(fetch::Mode::Download, offline, quiet);
    let batch = load_batch(recipe, from_png, sets, &mut fetcher)?;
    let mut display = progress::StepDisplay::new(quiet, verbose);
    let written = batch.run(options, &mut |node, p| display.update(node, p));
    display.finish();
    let written = written?;
    if !quiet {
        for path in written {
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}

/// Keeps freed buffers in the process instead of returning them to the kernel. Each UNet
/// layer allocates and frees activation buffers of several MB; with glibc's defaults these are
/// fresh `mmap`s (or trimmed heap) every time, and the page faults that zero them again took
/// about 3% of a step. The process's peak memory is unchanged: it is the same buffers, reused.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only sets allocator parameters; called before any threads start.
    unsafe {
        // No mmap'd chunks (their threshold caps at 32 MB, and GEGLU's projections are 84 MB)
        // and no trimming of the heap's top.
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            recipe,
            from,
            overwrite,
            quiet,
            verbose,
            sets,
            device,
            dtype,
            offline,
        } => device_and_dtype(&device, &dtype).and_then(|(device, dtype)| {
            let options = RunOptions {
                overwrite,
                device,
                dtype,
                ..RunOptions::default()
            };
            match (recipe, from) {
                (Some(recipe), None) => {
                    run(&recipe, false, &sets, &options, quiet, verbose, offline)
                }
                (None, Some(png)) => run(&png, true, &sets, &options, quiet, verbose, offline),
                _ => Err(anyhow::anyhow!("give a recipe file or --from IMAGE.png")),
            }
        }),
        Command::Inspect { path } => inspect::inspect(&path),
        Command::Validate {
            recipe,
            sets,
            offline,
        } => {
            let mut fetcher = fetch::HubFetcher::new(fetch::Mode::Report, offline, false);
            load_batch(&recipe, false, &sets, &mut fetcher).and_then(|batch| print_batch(&batch))
        }
        Command::Pull {
            recipe,
            sets,
            offline,
            quiet,
        } => {
            let mut fetcher = fetch::HubFetcher::new(fetch::Mode::Download, offline, quiet);
            load_batch(&recipe, false, &sets, &mut fetcher)
                .map(|_| fetch::print_summaries(&fetcher.summaries))
        }
        Command::Embed {
            adapter,
            image_encoder,
            out,
            fit,
            combine,
            negative_image,
            debug_input,
            images,
        } => embed(EmbedArgs {
            adapter,
            image_encoder,
            out,
            fit,
            combine,
            negative_image,
            debug_input,
            images,
        }),
        Command::Bench(args) => bench::run(args),
        Command::Preprocess(args) => preprocess_cmd::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
