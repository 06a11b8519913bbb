//! The command line's model fetcher: `run` and `pull` download what the cache lacks (a
//! progress bar per file and a total), `validate` lists it with its sizes, `--offline` or
//! `HF_HUB_OFFLINE=1` only reads the cache.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use ipcompose::hub::download::Client;
use ipcompose::hub::{human_size, CacheCheck, HubEnv, HubError, Progress, RepoRequest};
use ipcompose::pipeline::plan::fetch::ModelFetcher;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Download what is missing (`run`, `pull`).
    Download,
    /// Say what is missing and how big it is, without downloading (`validate`).
    Report,
    /// The cache only (`--offline`, `HF_HUB_OFFLINE=1`).
    Offline,
}

/// One repository as the fetcher left it.
pub struct Summary {
    pub repo: String,
    pub revision: String,
    /// (file, size, downloaded now)
    pub files: Vec<(String, u64, bool)>,
}

pub struct HubFetcher {
    mode: Mode,
    quiet: bool,
    env: HubEnv,
    client: Option<Client>,
    pub summaries: Vec<Summary>,
}

impl HubFetcher {
    /// `offline`: the `--offline` flag (`HF_HUB_OFFLINE` is read too).
    pub fn new(mode: Mode, offline: bool, quiet: bool) -> Self {
        let env = HubEnv::from_env();
        let mode = if offline || env.offline {
            Mode::Offline
        } else {
            mode
        };
        Self {
            mode,
            quiet,
            env,
            client: None,
            summaries: Vec::new(),
        }
    }

    fn client(&mut self) -> &Client {
        let env = self.env.clone();
        self.client.get_or_insert_with(|| Client::new(env))
    }
}

impl ModelFetcher for HubFetcher {
    fn fetch(&mut self, request: &RepoRequest, cached: &CacheCheck) -> Result<(), HubError> {
        if cached.is_complete() {
            self.summaries.push(Summary {
                repo: request.repo.clone(),
                revision: request.revision.clone(),
                files: cached
                    .present
                    .iter()
                    .map(|(f, s)| (f.clone(), *s, false))
                    .collect(),
            });
            return Ok(());
        }
        match self.mode {
            Mode::Offline => Err(cached.not_cached(request, true)),
            Mode::Report => {
                let files = self.client().missing(request)?;
                if files.is_empty() {
                    // The revision moved on the hub to a commit the cache holds whole.
                    return Err(cached.not_cached(request, false));
                }
                Err(HubError::Missing {
                    repo: request.repo.clone(),
                    revision: request.revision.clone(),
                    files,
                })
            }
            Mode::Download => {
                let quiet = self.quiet;
                let mut bars = Bars::new(quiet);
                let report = self.client().fetch(request, &mut bars);
                bars.finish();
                let report = report?;
                self.summaries.push(Summary {
                    repo: report.repo,
                    revision: report.revision,
                    files: report
                        .files
                        .into_iter()
                        .map(|f| (f.name, f.size, f.downloaded))
                        .collect(),
                });
                Ok(())
            }
        }
    }
}

/// A bar per file under the list of files and sizes, and a total; plain lines when stderr is
/// not a terminal, nothing with `--quiet`.
struct Bars {
    multi: MultiProgress,
    quiet: bool,
    total: Option<ProgressBar>,
    file: Option<ProgressBar>,
    /// The longest file name of the list, to line the bars up.
    width: usize,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

impl Bars {
    fn new(quiet: bool) -> Self {
        let multi = if quiet {
            MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
        } else {
            MultiProgress::with_draw_target(ProgressDrawTarget::stderr())
        };
        Self {
            multi,
            quiet,
            total: None,
            file: None,
            width: 0,
        }
    }

    fn say(&self, line: &str) {
        if self.quiet {
            return;
        }
        if self.multi.is_hidden() {
            eprintln!("{line}");
        } else {
            let _ = self.multi.println(line);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.file.take() {
            bar.abandon();
        }
        if let Some(total) = self.total.take() {
            total.finish();
        }
    }
}

impl Progress for Bars {
    fn begin(&mut self, repo: &str, commit: &str, files: &[(String, u64)]) {
        let total: u64 = files.iter().map(|(_, s)| s).sum();
        let short = &commit[..commit.len().min(10)];
        self.say(&format!(
            "fetching {} file{} of {repo} (commit {short}), {} in all, into the hub cache:",
            files.len(),
            if files.len() == 1 { "" } else { "s" },
            human_size(total)
        ));
        let width = files.iter().map(|(f, _)| f.len()).max().unwrap_or(0);
        for (name, size) in files {
            self.say(&format!("  {name:<width$}  {:>9}", human_size(*size)));
        }
        if let Some(done) = self.total.take() {
            done.finish();
        }
        let bar = self.multi.add(ProgressBar::new(total));
        bar.set_style(style(
            "{msg} [{wide_bar}] {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec} ETA {eta}",
        ));
        bar.set_message(format!("{:<width$}", "total"));
        self.width = width;
        self.total = Some(bar);
    }

    fn file_start(&mut self, name: &str, size: u64, done: u64) {
        if let Some(bar) = self.file.take() {
            bar.finish();
        }
        let bar = ProgressBar::new(size);
        let bar = match &self.total {
            Some(total) => self.multi.insert_before(total, bar),
            None => self.multi.add(bar),
        };
        bar.set_style(style(
            "{msg} [{bar:30}] {decimal_bytes}/{decimal_total_bytes} {decimal_bytes_per_sec} ETA {eta}",
        ));
        bar.set_message(format!("{name:<width$}", width = self.width));
        bar.set_position(done);
        if let Some(total) = &self.total {
            total.inc(done);
        }
        if done > 0 {
            self.say(&format!(
                "{name}: resuming at {} of {}",
                human_size(done),
                human_size(size)
            ));
        }
        self.file = Some(bar);
    }

    fn advance(&mut self, bytes: u64) {
        if let Some(bar) = &self.file {
            bar.inc(bytes);
        }
        if let Some(total) = &self.total {
            total.inc(bytes);
        }
    }

    fn rewind(&mut self, bytes: u64) {
        for bar in [&self.file, &self.total].into_iter().flatten() {
            bar.set_position(bar.position().saturating_sub(bytes));
        }
    }

    fn file_done(&mut self, _name: &str) {
        if let Some(bar) = self.file.take() {
            bar.finish();
        }
    }

    fn note(&mut self, message: &str) {
        self.say(message);
    }
}

/// `pull`'s account: each repository with its files, sizes and whether they were fetched now.
pub fn print_summaries(summaries: &[Summary]) {
    if summaries.is_empty() {
        println!("nothing to fetch: every model of the recipe is a local path");
        return;
    }
    let mut fetched = (0usize, 0u64);
    let mut all = (0usize, 0u64);
    for summary in summaries {
        let size: u64 = summary.files.iter().map(|(_, s, _)| s).sum();
        let new: Vec<&(String, u64, bool)> = summary.files.iter().filter(|f| f.2).collect();
        let new_size: u64 = new.iter().map(|(_, s, _)| s).sum();
        println!(
            "{} (revision {}): {} file{}, {}{}",
            summary.repo,
            summary.revision,
            summary.files.len(),
            if summary.files.len() == 1 { "" } else { "s" },
            human_size(size),
            if new.is_empty() {
                ", all in the cache already".to_string()
            } else {
                format!(", fetched {} ({})", new.len(), human_size(new_size))
            }
        );
        let width = summary.files.iter().map(|f| f.0.len()).max().unwrap_or(0);
        for (name, size, downloaded) in &summary.files {
            println!(
                "  {name:<width$}  {:>9}{}",
                human_size(*size),
                if *downloaded { "  fetched" } else { "" }
            );
        }
        fetched.0 += new.len();
        fetched.1 += new_size;
        all.0 += summary.files.len();
        all.1 += size;
    }
    println!(
        "in all: {} files, {}; fetched now: {} files, {}",
        all.0,
        human_size(all.1),
        fetched.0,
        human_size(fetched.1)
    );
}
