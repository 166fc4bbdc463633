//! `sluice-infra`: the deployment files of every function under `functions/`, generated from
//! the one source of truth, the function's own `sluice.toml` (the same file baked into its
//! binary), so that a queue's `maxReceiveCount`, a visibility timeout or a shutdown grace can't
//! say one thing in the template and another in the worker.
//!
//! `sluice-infra generate` (re)writes the files; `sluice-infra check` regenerates them in
//! memory and fails, naming each file, when a committed one differs (the drift test and
//! `just infra-check` run it).

mod aws;
mod grafana;
mod k8s;
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
}

/// One function: its name (the folder under `functions/`) and its baked settings.
pub struct Function {
    /// The folder name, also the binary's and the default queue's name.
    pub name: String,
    /// Its `sluice.toml` loaded with no environment or overrides. Deployment-only values are
    /// read with `settings.deploy::<T>("lambda")` etc. (`[deploy.<section>]`).
    pub settings: Settings,
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
    let functions = load_functions(&cli.root)?;
    let mut outputs = aws::render(&functions)?;
    outputs.extend(k8s::render(&functions)?);
    outputs.extend(rabbitmq::render(&functions)?);
    outputs.extend(prometheus::render(&functions)?);
    outputs.extend(grafana::render(&functions)?);
    match cli.command {
        Command::Generate => {
            for out in &outputs {
                let path = cli.root.join(&out.path);
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                }
                std::fs::write(&path, &out.contents)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("wrote {}", out.path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check => {
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
    }
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
            let settings = Settings::load(&name, Some(&text), std::iter::empty(), &[])
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
            Ok(Function { name, settings })
        })
        .collect()
}
