//! `sluice-infra`: the deployment files of every function under `functions/`, generated from
//! the one source of truth, the function's own `sluice.toml` (the same file baked into its
//! binary), so that a queue's `maxReceiveCount`, a visibility timeout or a shutdown grace can't
//! say one thing in the template and another in the worker.
//!
//! `sluice-infra generate` (re)writes the files; `sluice-infra check` regenerates them in
//! memory and fails, naming each file, when a committed one differs (the drift test and
//! `just infra-check` run it). `sluice-infra new NAME` creates a function under `functions/`
//! and then writes the files as `generate` does (`just new-function`, new.rs).

mod aws;
mod grafana;
mod k8s;
mod new;
mod prometheus;
mod rabbitmq;
mod slo;
mod yaml;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use sluice::config::Settings;

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The repository root (holds `functions/` and `infra/`).
    #[arg(long, default_value = ".")]
    root: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write every generated file.
    Generate,
    /// Exit 1, listing the files, when a committed file differs from what would be generated.
    Check,
    /// Create `functions/NAME/` (Cargo.toml, sluice.toml, src/main.rs), then write every
    /// generated file as `generate` does.
    New(new::NewArgs),
}

/// One function: its name (the folder under `functions/`) and its baked settings.
pub struct Function {
    /// The folder name, also the binary's and the default queue's name.
    pub name: String,
    /// Its `sluice.toml` loaded with no environment or overrides. Deployment-only values are
    /// read with `settings.deploy::<T>("lambda")` etc. (`[deploy.<section>]`).
    pub settings: Settings,
}

/// A workflow step's queue served by a function that is not its own queue
/// (`workflows/<name>.toml`, a step with `function = ...`).
pub struct StepQueue {
    /// The queue.
    pub queue: String,
    /// The function serving it.
    pub function: String,
    /// Where it was defined, for errors.
    pub source: String,
}

/// The step queues of every `workflows/*.toml` (a step without `function` is served by the
/// function of that name).
fn load_steps(root: &Path) -> Result<Vec<StepQueue>> {
    let defs = sluice::workflow::definition::Definition::load_all(&root.join("workflows"))?;
    let mut out = Vec::new();
    for d in defs {
        for s in d.steps {
            out.push(StepQueue {
                function: s.function.unwrap_or_else(|| s.queue.clone()),
                queue: s.queue,
                source: format!("workflows/{}.toml", d.name),
            });
        }
    }
    Ok(out)
}

/// The `[deploy.<section>]` tables the generator knows; any other is a typo.
const DEPLOY_SECTIONS: [&str; 3] = ["lambda", "kubernetes", "slo"];

/// One generated file.
pub struct Output {
    /// Relative to the repository root.
    pub path: PathBuf,
    /// The whole contents.
    pub contents: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice-infra: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: &Cli) -> Result<ExitCode> {
    match &cli.command {
        Command::Generate => {
            let outputs = render_all(&cli.root, &load_functions(&cli.root)?)?;
            let written = write_outputs(&cli.root, &outputs)?;
            for path in &written {
                println!("wrote {}", path.display());
            }
            println!(
                "sluice-infra: {} files written, {} already up to date",
                written.len(),
                outputs.len() - written.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
            let outputs = render_all(&cli.root, &load_functions(&cli.root)?)?;
            let mut drifted = Vec::new();
            for out in &outputs {
                let committed = std::fs::read_to_string(cli.root.join(&out.path)).ok();
                if committed.as_deref() != Some(out.contents.as_str()) {
                    drifted.push(out.path.display().to_string());
                }
            }
            if drifted.is_empty() {
                println!(
                    "sluice-infra: {} generated files match the functions' sluice.toml",
                    outputs.len()
                );
                Ok(ExitCode::SUCCESS)
            } else {
                for path in &drifted {
                    eprintln!("drifted: {path}");
                }
                eprintln!(
                    "sluice-infra: {} of {} files differ from the functions' sluice.toml; \
                     run `just infra-generate` and commit the result",
                    drifted.len(),
                    outputs.len()
                );
                Ok(ExitCode::from(1))
            }
        }
        Command::New(args) => new::run(&cli.root, args),
    }
}

/// Every generated file of these functions.
fn render_all(root: &Path, functions: &[Function]) -> Result<Vec<Output>> {
    let mut outputs = aws::render(functions)?;
    outputs.extend(k8s::render(functions)?);
    outputs.extend(rabbitmq::render(functions, &load_steps(root)?)?);
    outputs.extend(prometheus::render(functions)?);
    outputs.extend(grafana::render(functions)?);
    Ok(outputs)
}

/// Writes the outputs under `root`; returns the paths whose contents changed (new files
/// included), in order.
fn write_outputs(root: &Path, outputs: &[Output]) -> Result<Vec<PathBuf>> {
    let mut changed = Vec::new();
    for out in outputs {
        let path = root.join(&out.path);
        if std::fs::read_to_string(&path).ok().as_deref() == Some(out.contents.as_str()) {
            continue;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&path, &out.contents)
            .with_context(|| format!("writing {}", path.display()))?;
        changed.push(out.path.clone());
    }
    Ok(changed)
}

/// Every `functions/<name>/sluice.toml`, sorted by name.
fn load_functions(root: &Path) -> Result<Vec<Function>> {
    let dir = root.join("functions");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("sluice.toml").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let path = dir.join(&name).join("sluice.toml");
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            load_function(&name, &text, &path)
        })
        .collect()
}

/// One function from the text of its `sluice.toml` (`path` names it in errors).
fn load_function(name: &str, text: &str, path: &Path) -> Result<Function> {
    let settings = Settings::load(name, Some(text), std::iter::empty(), &[])
        .with_context(|| format!("{}", path.display()))?;
    if let Some(unknown) = settings
        .deploy
        .keys()
        .find(|k| !DEPLOY_SECTIONS.contains(&k.as_str()))
    {
        anyhow::bail!(
            "{}: key `deploy.{unknown}`: unknown section, expected one of {DEPLOY_SECTIONS:?}",
            path.display()
        );
    }
    Ok(Function {
        name: name.to_owned(),
        settings,
    })
}
