//! `send --workflow NAME` (the first message of a workflow run, from `workflows/NAME.toml`),
//! `workflow status ID` and `workflow list --state S`: the status records in the idempotency
//! store (sqlite or postgres).

use std::{path::PathBuf, time::SystemTime};

use clap::Subcommand;
use serde_json::Map;

use super::{Outcome, SendArgs};
use crate::{
    config::Settings,
    error::{Error, Result},
    message::{check_input, Headers},
    store::AnyStore,
    transport::{AnyTransport, Purpose, Transport},
    workflow::{
        definition::Definition,
        status::{State, Status},
        EventKind,
    },
};

/// `workflow ...`.
#[derive(Subcommand, Debug)]
pub(crate) enum WorkflowCommand {
    /// Where one workflow run stands.
    Status {
        /// The tracking id.
        id: String,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Workflow runs in a state, by tracking id.
    List {
        /// Only runs in this state.
        #[arg(long, value_enum)]
        state: Option<State>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
}

/// `workflow status|list`.
pub(super) async fn workflow(settings: &Settings, command: WorkflowCommand) -> Result<Outcome> {
    let store = AnyStore::open(settings).await?.ok_or_else(|| {
        Error::Config(
            "key `store.kind`: workflow status records live in the idempotency store (sqlite or postgres), and it is none".into(),
        )
    })?;
    match command {
        WorkflowCommand::Status { id, json } => match store.get_status(&id).await? {
            None => {
                eprintln!("error: no workflow run with tracking id {id}");
                Ok(Outcome::NotFound)
            }
            Some(s) if json => {
                println!("{}", serde_json::to_string_pretty(&s).expect("serializes"));
                Ok(Outcome::Done)
            }
            Some(s) => {
                print_status(&s);
                Ok(Outcome::Done)
            }
        },
        WorkflowCommand::List { state, limit, json } => {
            let items = store.list_status(state, limit).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&items).expect("serializes")
                );
            } else {
                println!(
                    "{:<40} {:<16} {:<20} {:>5} {:>5}  step",
                    "tracking id", "workflow", "state", "done", "undone"
                );
                for s in &items {
                    println!(
                        "{:<40} {:<16} {:<20} {:>5} {:>5}  {}",
                        s.id,
                        s.workflow,
                        s.state.as_str(),
                        s.steps_done,
                        s.compensated,
                        s.step
                    );
                }
                println!("{} run(s)", items.len());
            }
            Ok(Outcome::Done)
        }
    }
}

fn print_status(s: &Status) {
    println!("tracking id   {}", s.id);
    println!("workflow      {}", s.workflow);
    println!("state         {}", s.state.as_str());
    println!("last event    {} (step {})", s.event.as_str(), s.step);
    println!("steps done    {}", s.steps_done);
    println!("compensated   {}", s.compensated);
    if let Some(r) = &s.reason {
        println!("reason        {r}");
    }
    println!("updated at    {}", s.updated_at);
}

/// `send --workflow NAME`: each copy starts a run (tracking id `--id`, with `{{seq}}`, or a
/// fresh UUID), published to the first step's queue; the `started` status record is written
/// when the settings name a store.
pub(super) async fn send(settings: &Settings, name: &str, args: SendArgs) -> Result<Outcome> {
    let dir = args
        .workflows
        .clone()
        .unwrap_or_else(|| PathBuf::from("workflows"));
    let def = Definition::load(&dir, name)?;
    let body = super::read_body(args.json, args.file)?;
    let mut headers = Headers::new();
    for h in &args.headers {
        let (n, v) = h
            .split_once('=')
            .ok_or_else(|| Error::Invalid(format!("--header {h:?}: expected NAME=VALUE")))?;
        headers.insert(n.trim().to_ascii_lowercase(), v.to_owned());
    }
    check_input(&body, &headers, &settings.limits).map_err(|(_, reason)| Error::Limit(reason))?;
    let first = &def.steps[0].queue;
    let t = AnyTransport::open(first, &settings.for_queue(first), Purpose::Admin).await?;
    let store = AnyStore::open(settings).await?;
    let text = String::from_utf8_lossy(&body).into_owned();
    let mut ids = Vec::new();
    let mut batch = Vec::new();
    for seq in 0..args.count {
        let b = text.replace("{{seq}}", &seq.to_string()).into_bytes();
        let id = match &args.id {
            Some(id) => id.replace("{{seq}}", &seq.to_string()),
            None => uuid::Uuid::new_v4().to_string(),
        };
        let (slip, mut msg) = def.start(&id, b, Map::new())?;
        msg.headers = headers.clone();
        msg.delay = args.delay.unwrap_or_default();
        batch.push(msg);
        if batch.len() == 100 || seq + 1 == args.count {
            t.publish(std::mem::take(&mut batch)).await?;
        }
        if let Some(store) = &store {
            let status = Status {
                id: slip.id.clone(),
                workflow: slip.workflow.clone(),
                state: State::Running,
                event: EventKind::Started,
                step: def.steps[0].name.clone(),
                steps_done: 0,
                compensated: 0,
                reason: None,
                updated_at: crate::time::rfc3339(SystemTime::now()),
            };
            if let Err(e) = store.put_status(&status).await {
                eprintln!(
                    "warning: could not write the started status of {id}: {}",
                    e.report()
                );
            }
        }
        ids.push(id);
    }
    if ids.len() == 1 {
        println!("{}", ids[0]);
    } else {
        println!("started {} run(s) of workflow {name} on {first}", ids.len());
    }
    Ok(Outcome::Done)
}
