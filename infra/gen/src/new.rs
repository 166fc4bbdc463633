//! `sluice-infra new NAME`: a new function under `functions/NAME/` (Cargo.toml with the
//! example functions' feature layout, a commented `sluice.toml`, and a `src/main.rs` with a
//! typed input, an output, the three error classes, an idempotency key and unit tests), then
//! the deploy files of every function, as `generate` writes them, so the new one is in them.
//!
//! The name becomes a crate, a binary, queues on every transport, a CloudFormation stack's
//! default `Name` and Kubernetes object names; it is refused, with every reason, unless it is
//! valid for all of them.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use sluice::topology::{DELAY_LADDER_MS, MAX_NAME_BYTES};

use crate::{load_function, load_functions, render_all, write_outputs};

const CARGO_TOML: &str = include_str!("../templates/Cargo.toml.tmpl");
const SLUICE_TOML: &str = include_str!("../templates/sluice.toml.tmpl");
const MAIN_RS: &str = include_str!("../templates/main.rs.tmpl");

/// SQS queue names are at most 80 characters, and the DLQ is `<queue>-dlq`.
const SQS_MAX_QUEUE_NAME: usize = 80;
const SQS_DLQ_SUFFIX: &str = "-dlq";
/// The `Name` parameter of `infra/aws/<fn>.json` allows 60 characters (aws.rs), which leaves
/// room for the suffixes of the names derived from it.
const CFN_MAX_NAME: usize = crate::aws::MAX_NAME;
/// Kubernetes labels and container names (the generated Deployment uses the function name for
/// both) are RFC 1123 labels: at most 63 characters.
const K8S_MAX_LABEL: usize = 63;

/// Rust keywords (`cargo new` refuses them as package names).
const KEYWORDS: [&str; 51] = [
    "abstract", "as", "async", "await", "become", "box", "break", "const", "continue", "crate",
    "do", "dyn", "else", "enum", "extern", "false", "final", "fn", "for", "gen", "if", "impl",
    "in", "let", "loop", "macro", "match", "mod", "move", "mut", "override", "priv", "pub", "ref",
    "return", "self", "static", "struct", "super", "trait", "true", "try", "type", "typeof",
    "union", "unsafe", "unsized", "use", "virtual", "where", "while",
];
/// Names of Rust's own crates (`cargo new` refuses them) and of the directories cargo keeps
/// beside the binaries in `target/debug/` (a binary of that name would collide with one).
const RESERVED: [&str; 9] = [
    "alloc",
    "core",
    "proc-macro",
    "std",
    "test",
    "build",
    "deps",
    "examples",
    "incremental",
];
/// Device names Windows reserves whatever the extension; cargo warns about them.
const WINDOWS_RESERVED: [&str; 22] = [
    "con", "prn", "aux", "nul", "com1", "com2", "com3", "com4", "com5", "com6", "com7", "com8",
    "com9", "lpt1", "lpt2", "lpt3", "lpt4", "lpt5", "lpt6", "lpt7", "lpt8", "lpt9",
];

/// `sluice-infra new` arguments.
#[derive(Args, Debug)]
pub struct NewArgs {
    /// The function's name: its folder, crate, binary and queue (lower-case letters, digits
    /// and `-`, starting with a letter).
    pub name: String,
    /// The transport its `sluice.toml` chooses (every build carries all three; the deploy
    /// files choose their own).
    #[arg(long, value_enum, default_value_t = TransportChoice::Embedded)]
    pub transport: TransportChoice,
    /// The idempotency store its `sluice.toml` chooses (`postgres`, `redis` and `s3` add the
    /// store's cargo feature of sluice to its Cargo.toml).
    #[arg(long, value_enum, default_value_t = StoreChoice::Sqlite)]
    pub store: StoreChoice,
}

/// `--transport`: the values of `transport.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportChoice {
    Embedded,
    Rabbitmq,
    Sqs,
}

/// `--store`: the values of `store.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreChoice {
    Sqlite,
    Postgres,
    Redis,
    S3,
    None,
}

/// The three files of a new function.
pub struct Scaffold {
    pub cargo_toml: String,
    pub sluice_toml: String,
    pub main_rs: String,
}

/// Creates the function and regenerates the deploy files; prints what it wrote and what to
/// run next.
pub fn run(root: &Path, args: &NewArgs) -> Result<ExitCode> {
    let name = args.name.as_str();
    let mut problems = name_problems(name);
    problems.extend(workspace_problems(root, name)?);
    if !problems.is_empty() {
        bail!(
            "cannot create function {name:?}:\n{}",
            problems
                .iter()
                .map(|p| format!("  - {p}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let files = scaffold(name, args.transport, args.store);

    // Everything is rendered before anything is written: a new function that the generator
    // rejects leaves no half-made folder behind.
    let dir = root.join("functions").join(name);
    let mut functions = load_functions(root)?;
    functions.push(load_function(
        name,
        &files.sluice_toml,
        &dir.join("sluice.toml"),
    )?);
    functions.sort_by(|a, b| a.name.cmp(&b.name));
    let outputs = render_all(root, &functions)?;

    // `create_dir` (not `_all`): a folder made since the check above is refused, not merged.
    // Everything is written before anything is printed, so a closed stdout cannot cut it short.
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::create_dir(dir.join("src"))?;
    let mut report = String::new();
    for (file, contents) in [
        ("Cargo.toml", &files.cargo_toml),
        ("sluice.toml", &files.sluice_toml),
        ("src/main.rs", &files.main_rs),
    ] {
        let path = dir.join(file);
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        report.push_str(&format!("created functions/{name}/{file}\n"));
    }
    let written = write_outputs(root, &outputs)?;
    for path in &written {
        report.push_str(&format!("wrote {}\n", path.display()));
    }
    report.push_str(&format!(
        "sluice-infra: {} deploy files written or updated, {} already up to date\n",
        written.len(),
        outputs.len() - written.len()
    ));
    report.push_str(&next_steps(name, args.transport));
    print!("{report}");
    Ok(ExitCode::SUCCESS)
}

/// Why `name` cannot be a function name, one reason per rule it breaks (empty: it can).
pub fn name_problems(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    if name.is_empty() {
        out.push("the name is empty".to_owned());
        return out;
    }
    let bad: BTreeSet<char> = name
        .chars()
        .filter(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        .collect();
    if !bad.is_empty() {
        let list: Vec<String> = bad.iter().map(|c| format!("{c:?}")).collect();
        out.push(format!(
            "it contains {}: only lower-case letters a-z, digits and '-' are valid in every name \
             it becomes (crates and SQS queues also allow '_' and capitals, but Kubernetes object \
             names, RFC 1123, do not)",
            list.join(", ")
        ));
    }
    // Capitals are reported above; these two are about digits and '-' (or other characters).
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        out.push(
            "it must start with a letter (a crate name cannot start with a digit or '-')"
                .to_owned(),
        );
    }
    if !name.ends_with(|c: char| c.is_ascii_alphanumeric()) {
        out.push("it must end with a letter or a digit (a Kubernetes name)".to_owned());
    }
    let len = name.len();
    if len > CFN_MAX_NAME {
        out.push(format!(
            "it is {len} characters: the CloudFormation template's Name parameter allows {CFN_MAX_NAME}"
        ));
    }
    if len > K8S_MAX_LABEL {
        out.push(format!(
            "it is {len} characters: Kubernetes labels and container names allow {K8S_MAX_LABEL}"
        ));
    }
    let dlq = len + SQS_DLQ_SUFFIX.len();
    if dlq > SQS_MAX_QUEUE_NAME {
        out.push(format!(
            "it is {len} characters: its SQS dead-letter queue `{name}{SQS_DLQ_SUFFIX}` would be \
             {dlq}, and SQS allows {SQS_MAX_QUEUE_NAME}"
        ));
    }
    let longest = format!(
        "{name}.delay.{}",
        DELAY_LADDER_MS[DELAY_LADDER_MS.len() - 1]
    );
    if longest.len() > MAX_NAME_BYTES {
        out.push(format!(
            "it is {len} bytes: its longest RabbitMQ queue `<name>{}` would be {} bytes, and \
             AMQP allows {MAX_NAME_BYTES}",
            &longest[name.len()..],
            longest.len()
        ));
    }
    let lower = name.to_ascii_lowercase();
    if KEYWORDS.contains(&lower.as_str()) {
        out.push(format!(
            "{name:?} is a Rust keyword (cargo refuses it as a package name)"
        ));
    }
    if RESERVED.contains(&lower.as_str()) {
        out.push(format!(
            "{name:?} is reserved by Rust or cargo (a standard crate, or a directory in target/)"
        ));
    }
    if WINDOWS_RESERVED.contains(&lower.as_str()) {
        out.push(format!(
            "{name:?} is a device name on Windows (no file or folder can have it)"
        ));
    }
    out
}

/// Why `name` clashes with the workspace at `root`: an existing folder, a package of the same
/// name, a function that already uses the queue.
fn workspace_problems(root: &Path, name: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let manifest = root.join("Cargo.toml");
    let members = workspace_members(&manifest)?;
    if !members.iter().any(|m| m == "functions/*") {
        out.push(format!(
            "{} does not list \"functions/*\" among the workspace members, so a new folder there \
             would not be built",
            manifest.display()
        ));
    }
    let dir = root.join("functions").join(name);
    if dir.exists() {
        out.push(format!("functions/{name} already exists"));
        return Ok(out);
    }
    for (package, path) in workspace_packages(root, &members)? {
        if package == name {
            out.push(format!(
                "the workspace already has a package named {name:?} ({})",
                path.display()
            ));
        }
    }
    // Only the functions whose settings load; a broken one fails `load_functions` later with
    // its own error.
    for f in load_functions(root).unwrap_or_default() {
        if f.settings.queue == name {
            out.push(format!(
                "functions/{} already uses the queue {name:?} (`queue` in its sluice.toml)",
                f.name
            ));
        }
    }
    Ok(out)
}

fn read_toml(path: &Path) -> Result<config::Config> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Toml))
        .build()
        .with_context(|| format!("{} is not valid TOML", path.display()))
}

/// `[workspace] members` of the root manifest.
fn workspace_members(manifest: &Path) -> Result<Vec<String>> {
    read_toml(manifest)?
        .get::<Vec<String>>("workspace.members")
        .with_context(|| format!("{}: key `workspace.members`", manifest.display()))
}

/// (package name, manifest) of every workspace member; `dir/*` globs are expanded one level.
fn workspace_packages(root: &Path, members: &[String]) -> Result<Vec<(String, PathBuf)>> {
    let mut dirs = Vec::new();
    for m in members {
        match m.strip_suffix("/*") {
            Some(parent) => {
                if let Ok(entries) = std::fs::read_dir(root.join(parent)) {
                    dirs.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
                }
            }
            None => dirs.push(root.join(m)),
        }
    }
    let mut out = Vec::new();
    for dir in dirs {
        let manifest = dir.join("Cargo.toml");
        if !manifest.is_file() {
            continue;
        }
        if let Ok(package) = read_toml(&manifest)?.get_string("package.name") {
            out.push((package, manifest));
        }
    }
    Ok(out)
}

/// Whether the workspace's `sluice` crate (`shared/Cargo.toml`) has this cargo feature.
/// The three files, from the templates under `infra/gen/templates/`.
pub fn scaffold(name: &str, transport: TransportChoice, store: StoreChoice) -> Scaffold {
    let faults_block =
        "# Fault injection for drills and tests (the `[fault]` settings, docs/operations.md): not a\n\
         # default feature, so production builds (the Lambda zip, the container image) leave it out.\n\
         faults = [\"sluice/faults\"]";
    let (features, sluice_comment) = match store {
        StoreChoice::Sqlite | StoreChoice::None => (
            "\"embedded\"",
            "# The embedded queue and the SQLite idempotency store, in every build: `send`, `run`,\n\
             # `invoke` and the tests need no server.",
        ),
        StoreChoice::Postgres => (
            "\"embedded\", \"postgres\"",
            "# The embedded queue and the SQLite store, in every build (`send`, `run`, `invoke` and\n\
             # the tests need no server), and the PostgreSQL store that sluice.toml chooses.",
        ),
        StoreChoice::Redis => (
            "\"embedded\", \"redis\"",
            "# The embedded queue and the SQLite store, in every build (`send`, `run`, `invoke` and\n\
             # the tests need no server), and the Redis store that sluice.toml chooses.",
        ),
        StoreChoice::S3 => (
            "\"embedded\", \"s3\"",
            "# The embedded queue and the SQLite store, in every build (`send`, `run`, `invoke` and\n\
             # the tests need no server), and the S3 store that sluice.toml chooses (also in the\n\
             # `sqs` and `lambda` features, but a `--no-default-features` build needs it too).",
        ),
    };
    Scaffold {
        cargo_toml: fill(
            CARGO_TOML,
            &[
                ("name", name),
                ("faults", faults_block),
                ("sluice_features", features),
                ("sluice_comment", sluice_comment),
            ],
        ),
        sluice_toml: fill(
            SLUICE_TOML,
            &[
                ("transport", &transport_block(name, transport)),
                ("store", &store_block(name, store)),
                ("k8s_store", k8s_store_block(store)),
                ("name", name),
            ],
        ),
        main_rs: fill(MAIN_RS, &[("name", name)]),
    }
}

fn transport_block(name: &str, transport: TransportChoice) -> String {
    let kind = "# Which broker: `embedded` (a SQLite file: no server, several processes on one host),\n\
                # `rabbitmq` or `sqs`. The default build carries all three, a `--no-default-features`\n\
                # build only `embedded`, the Lambda build `embedded` and `sqs` (Cargo.toml).\n";
    let rest = match transport {
        TransportChoice::Embedded => "kind = \"embedded\"\n\
             # The queue file, relative to the working directory (its folder is created).\n\
             url = \".sluice/queue.db\""
            .to_owned(),
        TransportChoice::Rabbitmq => "kind = \"rabbitmq\"\n\
             # The broker: amqp://user:password@host:5672/vhost (amqps:// for TLS; the vhost\n\
             # URL-encoded, %2f for /). This is the local broker scripts/services.sh starts, for\n\
             # development; elsewhere set SLUICE__TRANSPORT__URL (the password is never logged).\n\
             url = \"amqp://guest:guest@127.0.0.1:5672/%2f\""
            .to_owned(),
        TransportChoice::Sqs => format!(
            "kind = \"sqs\"\n\
             # The queue: a name, in the account and region of the standard AWS variables\n\
             # (AWS_ENDPOINT_URL points them at moto locally), or a queue URL. `provision` creates\n\
             # it and its DLQ.\n\
             url = \"{name}\""
        ),
    };
    format!("{kind}{rest}")
}

fn store_block(name: &str, store: StoreChoice) -> String {
    let kind = "# The idempotency store: a message whose key completed already is acked without running\n\
                # the handler. `sqlite`, `postgres`, `redis`, `s3` (each needs its cargo feature of\n\
                # sluice, Cargo.toml) or `none` (at-least-once only). docs/idempotency.md compares them.\n";
    let ttl =
        "# How long a completed record is kept: a duplicate within it gets the stored output.\n\
               ttl = \"24h\"";
    let rest = match store {
        StoreChoice::Sqlite => format!(
            "kind = \"sqlite\"\n\
             # The SQLite file, relative to the working directory (its folder is created).\n\
             url = \".sluice/idempotency.db\"\n{ttl}"
        ),
        StoreChoice::Postgres => format!(
            "kind = \"postgres\"\n\
             # postgres://user[:password]@host:5432/db. This is the local server scripts/services.sh\n\
             # starts, for development; elsewhere set SLUICE__STORE__URL.\n\
             url = \"postgres://root@127.0.0.1:5432/test\"\n{ttl}"
        ),
        StoreChoice::Redis => format!(
            "kind = \"redis\"\n\
             # redis://[user:password@]host[:port][/db]. This is the local server scripts/services.sh\n\
             # starts, for development; elsewhere set SLUICE__STORE__URL.\n\
             url = \"redis://127.0.0.1:6379/0\"\n{ttl}"
        ),
        StoreChoice::S3 => format!(
            "kind = \"s3\"\n\
             # s3://bucket/prefix, with region, credentials and endpoint from the standard AWS\n\
             # variables; `provision` creates a missing bucket. Expire the records with a lifecycle\n\
             # rule of at least `ttl` (infra/aws/idempotency-bucket.yaml).\n\
             url = \"s3://sluice-idempotency/{name}\"\n{ttl}"
        ),
        StoreChoice::None => "kind = \"none\"".to_owned(),
    };
    format!("{kind}{rest}")
}

fn k8s_store_block(store: StoreChoice) -> &'static str {
    match store {
        StoreChoice::Sqlite | StoreChoice::None => {
            "# `store.kind` in the cluster, its URL from the function's Secret (`store-url`). Unset,\n\
             # each pod keeps [store] above (SQLite in the pod's scratch volume deduplicates per pod\n\
             # only), so several replicas want a shared store, e.g.:\n\
             # store = \"postgres\""
        }
        StoreChoice::Postgres => {
            "# `store.kind` in the cluster; its URL comes from the function's Secret (`store-url`).\n\
             store = \"postgres\""
        }
        StoreChoice::Redis => {
            "# `store.kind` in the cluster; its URL comes from the function's Secret (`store-url`).\n\
             store = \"redis\""
        }
        StoreChoice::S3 => {
            "# `store.kind` in the cluster; its URL comes from the function's Secret (`store-url`).\n\
             store = \"s3\""
        }
    }
}

/// Replaces each `{{key}}` of `template`; panics on one left over (a template bug, caught by
/// the unit tests).
fn fill(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = template.to_owned();
    for (key, value) in vars {
        out = out.replace(&format!("{{{{{key}}}}}"), value);
    }
    assert!(
        !out.contains("{{"),
        "a template placeholder was not filled: {out}"
    );
    out
}

/// What to run next, printed after the files are written.
fn next_steps(name: &str, transport: TransportChoice) -> String {
    let embedded_env = if transport == TransportChoice::Embedded {
        String::new()
    } else {
        "  export SLUICE__TRANSPORT__KIND=embedded SLUICE__TRANSPORT__URL=.sluice/queue.db\n"
            .to_owned()
    };
    format!(
        r#"
Next (README.md "Writing a function" walks through each step):
  # build it (cargo adds it to Cargo.lock) and run its unit tests
  cargo build -p {name}
  cargo test -p {name}
  # on the embedded queue, no server needed
{embedded_env}  cargo run -p {name} -- send '{{"id":"job-1","item":"hello"}}'
  cargo run -p {name} -- send '{{"id":"job-2","item":"rejected"}}'
  cargo run -p {name} -- run --drain
  cargo run -p {name} -- dlq list
  cargo run -p {name} -- invoke '{{"id":"job-3","item":"hello"}}'
  # on RabbitMQ (scripts/services.sh rabbitmq starts a local broker)
  export SLUICE__TRANSPORT__KIND=rabbitmq SLUICE__TRANSPORT__URL='amqp://guest:guest@127.0.0.1:5672/%2f'
  cargo run -p {name} -- provision
  cargo run -p {name} -- send '{{"id":"job-4","item":"hello"}}'
  cargo run -p {name} -- run --drain
  # on SQS, emulated by moto
  eval "$(scripts/moto.sh start)"
  export SLUICE__TRANSPORT__KIND=sqs SLUICE__TRANSPORT__URL={name}
  cargo run -p {name} -- provision
  cargo run -p {name} -- send '{{"id":"job-5","item":"hello"}}'
  # ... and in Lambda mode, fed from that queue by a local event source mapping
  just local-lambda {name} --drain
  # the function and its deploy files belong together in one commit
  git add functions/{name} infra Cargo.lock
"#
    )
}

#[cfg(test)]
mod tests {
    use sluice::config::{Settings, StoreKind, TransportKind};

    use super::*;

    fn problems(name: &str) -> String {
        name_problems(name).join("\n")
    }

    #[test]
    fn good_names_pass() {
        for name in [
            "thumbnail",
            "resize-image",
            "a",
            "v2-export",
            &"a".repeat(60),
        ] {
            assert_eq!(name_problems(name), Vec::<String>::new(), "{name}");
        }
    }

    #[test]
    fn each_rule_a_name_breaks_is_named() {
        assert!(problems("").contains("empty"));
        let p = problems("Resize_Image");
        assert!(
            p.contains("'R'") && p.contains("'_'") && p.contains("Kubernetes"),
            "{p}"
        );
        assert!(problems("2fast").contains("start with a letter"));
        assert!(!problems("Thumbnail").contains("start with a letter"));
        assert!(problems("-x").contains("start with a letter"));
        assert!(problems("thumb-").contains("end with a letter or a digit"));
        assert!(problems("a.b").contains("'.'"));
        assert!(problems("fn").contains("Rust keyword"));
        assert!(problems("test").contains("reserved"));
        assert!(problems("build").contains("reserved"));
        assert!(problems("nul").contains("Windows"));
    }

    #[test]
    fn length_limits_name_the_system_that_sets_them() {
        let p = problems(&"a".repeat(61));
        assert!(
            p.contains("61 characters") && p.contains("CloudFormation"),
            "{p}"
        );
        assert!(!p.contains("Kubernetes"), "{p}");
        let p = problems(&"a".repeat(77));
        assert!(p.contains("Kubernetes labels"), "{p}");
        assert!(p.contains("-dlq` would be 81, and SQS allows 80"), "{p}");
        let p = problems(&"a".repeat(243));
        assert!(p.contains(".delay.512000` would be 256 bytes"), "{p}");
    }

    /// Every combination renders every placeholder, and its sluice.toml loads with the chosen
    /// kinds (the comments' "built-in defaults" are checked against the real ones too).
    #[test]
    fn every_combination_loads_with_the_chosen_kinds_and_the_defaults() {
        let defaults = Settings::load("thumbnail", None, std::iter::empty(), &[]).unwrap();
        for transport in TransportChoice::value_variants() {
            for store in StoreChoice::value_variants() {
                {
                    let s = scaffold("thumbnail", *transport, *store);
                    let settings =
                        Settings::load("thumbnail", Some(&s.sluice_toml), std::iter::empty(), &[])
                            .unwrap_or_else(|e| panic!("{transport:?} {store:?}: {e}"));
                    let want_transport = match transport {
                        TransportChoice::Embedded => TransportKind::Embedded,
                        TransportChoice::Rabbitmq => TransportKind::Rabbitmq,
                        TransportChoice::Sqs => TransportKind::Sqs,
                    };
                    let want_store = match store {
                        StoreChoice::Sqlite => StoreKind::Sqlite,
                        StoreChoice::Postgres => StoreKind::Postgres,
                        StoreChoice::Redis => StoreKind::Redis,
                        StoreChoice::S3 => StoreKind::S3,
                        StoreChoice::None => StoreKind::None,
                    };
                    assert_eq!(settings.transport.kind, want_transport);
                    assert_eq!(settings.store.kind, want_store);
                    assert_eq!(settings.queue, "thumbnail");
                    assert_eq!(settings.transport.lease, defaults.transport.lease);
                    assert_eq!(settings.store.ttl, defaults.store.ttl);
                    assert_eq!(
                        format!("{:?}", settings.worker),
                        format!("{:?}", defaults.worker)
                    );
                    assert_eq!(
                        format!("{:?}", settings.retry),
                        format!("{:?}", defaults.retry)
                    );
                    let feature = match store {
                        StoreChoice::Postgres => Some("\"postgres\""),
                        StoreChoice::Redis => Some("\"redis\""),
                        StoreChoice::S3 => Some("\"embedded\", \"s3\""),
                        _ => None,
                    };
                    if let Some(f) = feature {
                        assert!(s.cargo_toml.contains(f), "{}", s.cargo_toml);
                    }
                    assert!(
                        s.cargo_toml.contains("\nfaults = [\"sluice/faults\"]"),
                        "{}",
                        s.cargo_toml
                    );
                    assert!(s.main_rs.contains("const NAME: &str = \"thumbnail\";"));
                }
            }
        }
    }

    /// The README shows the generated main.rs without its doc comments; it must be the file
    /// `new` writes.
    #[test]
    fn the_readme_shows_the_main_rs_that_new_writes() {
        let main_rs = scaffold("thumbnail", TransportChoice::Embedded, StoreChoice::Sqlite).main_rs;
        let mut shown = String::new();
        for line in main_rs.lines() {
            let code = line.trim_start();
            if code.starts_with("//!") || code.starts_with("///") {
                continue;
            }
            if line.is_empty() && (shown.is_empty() || shown.ends_with("\n\n")) {
                continue;
            }
            shown.push_str(line);
            shown.push('\n');
        }
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
                .unwrap();
        assert!(
            readme.contains(&format!("```rust\n{shown}```")),
            "README.md \"Writing a function\" must show this main.rs:\n{shown}"
        );
    }

    #[test]
    fn the_deploy_files_of_a_new_function_render() {
        let s = scaffold("thumbnail", TransportChoice::Embedded, StoreChoice::Sqlite);
        let f = load_function("thumbnail", &s.sluice_toml, Path::new("sluice.toml")).unwrap();
        let outputs = render_all(Path::new("/nonexistent"), std::slice::from_ref(&f)).unwrap();
        let paths: Vec<String> = outputs
            .iter()
            .map(|o| o.path.display().to_string())
            .collect();
        assert!(
            paths.contains(&"infra/aws/thumbnail.json".to_owned()),
            "{paths:?}"
        );
        assert!(
            paths.contains(&"infra/k8s/thumbnail/rabbitmq/deployment.yaml".to_owned()),
            "{paths:?}"
        );
        assert!(paths.contains(&"infra/rabbitmq/definitions.json".to_owned()));
    }
}
