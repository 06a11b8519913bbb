//! Denoising progress: a bar per generation (step, it/s, ETA) on a terminal, one plain line
//! per step otherwise (logs, CI) or with `--verbose` (which adds the bytes copied between
//! host and GPU during the step), nothing with `--quiet`.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ipcompose::pipeline::Progress;

pub struct StepDisplay {
    quiet: bool,
    verbose: bool,
    terminal: bool,
    bar: Option<(String, ProgressBar)>,
    started: Instant,
    step_started: Instant,
    /// Host↔device byte totals at the end of the previous step.
    transfers: (u64, u64),
}

impl StepDisplay {
    pub fn new(quiet: bool, verbose: bool) -> Self {
        Self {
            quiet,
            verbose,
            terminal: std::io::stderr().is_terminal() && !verbose,
            bar: None,
            started: Instant::now(),
            step_started: Instant::now(),
            transfers: crate::transfer_count::totals(),
        }
    }

    /// Called after each step of the generation `node`.
    pub fn update(&mut self, node: &str, progress: Progress) {
        if self.quiet {
            return;
        }
        if self.terminal {
            self.update_bar(node, progress);
        } else {
            let now = Instant::now();
            let step_s = now.duration_since(self.step_started).as_secs_f64();
            self.step_started = now;
            let transfers = if self.verbose {
                let (to_device, to_host) = crate::transfer_count::totals();
                let line = if crate::transfer_count::COUNTING {
                    format!(
                        ", host->device {} B, device->host {} B",
                        to_device - self.transfers.0,
                        to_host - self.transfers.1
                    )
                } else {
                    String::new()
                };
                self.transfers = (to_device, to_host);
                line
            } else {
                String::new()
            };
            let _ = writeln!(
                std::io::stderr(),
                "{node}: step {}/{} ({step_s:.2} s/step, {:.1} s total{transfers})",
                progress.step,
                progress.total,
                now.duration_since(self.started).as_secs_f64()
            );
        }
    }

    fn update_bar(&mut self, node: &str, progress: Progress) {
        let same = matches!(&self.bar, Some((name, _)) if name == node);
        if !same {
            self.finish();
            let bar = ProgressBar::with_draw_target(
                Some(progress.total as u64),
                ProgressDrawTarget::stderr(),
            );
            let style = ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} steps  {per_sec}  ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(node.to_string());
            self.bar = Some((node.to_string(), bar));
        }
        if let Some((_, bar)) = &self.bar {
            bar.set_position(progress.step as u64);
        }
    }

    /// Leaves the last bar on screen, finished.
    pub fn finish(&mut self) {
        if let Some((_, bar)) = self.bar.take() {
            bar.finish();
        }
    }
}
