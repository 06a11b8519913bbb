//! The `ipcompose` command line.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ipcompose::pipeline::{plan::Plan, run_plan, Recipe, RunOptions};

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
        recipe: PathBuf,
        /// Replace output files that already exist.
        #[arg(long)]
        overwrite: bool,
        /// No progress output.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Check a recipe without loading weights and print the resolved plan.
    Validate {
        /// The recipe file (YAML).
        recipe: PathBuf,
    },
}

fn load_plan(path: &Path) -> anyhow::Result<Plan> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading recipe {}", path.display()))?;
    let recipe = Recipe::parse(&text, path)?;
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(Plan::build(&recipe, &text, path, &base_dir)?)
}

fn print_plan(plan: &Plan) {
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
    for g in &plan.generations {
        println!(
            "generate {}: {}x{}, {} steps of {:?}, guidance {}, {:?}",
            g.node, g.width, g.height, g.steps, g.scheduler_kind, g.guidance, g.init
        );
    }
    for o in &plan.outputs {
        println!("output {:?} of {} -> {}", o.kind, o.node, o.path.display());
    }
}

fn run(recipe: &Path, overwrite: bool, quiet: bool) -> anyhow::Result<()> {
    let plan = load_plan(recipe)?;
    let options = RunOptions {
        overwrite,
        ..RunOptions::default()
    };
    let terminal = std::io::stderr().is_terminal();
    let started = std::time::Instant::now();
    let written = run_plan(&plan, &options, &mut |node, p| {
        if quiet {
            return;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let line = format!("{node}: step {}/{} ({elapsed:.1} s)", p.step, p.total);
        let mut err = std::io::stderr();
        if terminal {
            let _ = write!(err, "\r{line}");
            if p.step == p.total {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(err, "{line}");
        }
    })?;
    if !quiet {
        for path in written {
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            recipe,
            overwrite,
            quiet,
        } => run(&recipe, overwrite, quiet),
        Command::Validate { recipe } => load_plan(&recipe).map(|plan| print_plan(&plan)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
