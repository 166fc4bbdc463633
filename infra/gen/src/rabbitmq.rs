//! `infra/rabbitmq/definitions.json`: every function's RabbitMQ topology (exchange, queues,
//! binding and policies) in RabbitMQ's definitions format, for `rabbitmqctl
//! import_definitions`. It is rendered from [`sluice::topology::topology`], the same
//! description `provision` declares, for each function's `queue` and `retry.max_deliveries`;
//! `tests/tests/it/rabbitmq_topology.rs` checks the result against a real broker.

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};
use sluice::topology::{topology, ArgValue};

use crate::{Function, Output, StepQueue};

/// The virtual host written into the file; import into another one by replacing it.
const VHOST: &str = "/";

/// The one definitions file for all functions.
pub fn render(functions: &[Function], steps: &[StepQueue]) -> Result<Vec<Output>> {
    let (mut exchanges, mut queues, mut bindings, mut policies) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // Each function's own queue, then the workflow steps' queues it also serves.
    let mut all: Vec<(String, u32, String)> = functions
        .iter()
        .map(|f| {
            (
                f.settings.queue.clone(),
                f.settings.retry.max_deliveries,
                format!("functions/{}/sluice.toml", f.name),
            )
        })
        .collect();
    for step in steps {
        if all.iter().any(|(q, _, _)| *q == step.queue) {
            continue;
        }
        let f = functions
            .iter()
            .find(|f| f.name == step.function)
            .with_context(|| {
                format!(
                    "{}: step queue {:?} names function {:?}, which is not under functions/",
                    step.source, step.queue, step.function
                )
            })?;
        all.push((
            step.queue.clone(),
            f.settings.retry.max_deliveries,
            step.source.clone(),
        ));
    }
    for (queue, max_deliveries, source) in &all {
        let t = topology(queue, *max_deliveries).with_context(|| source.clone())?;
        exchanges.push(json!({
            "arguments": {},
            "auto_delete": false,
            "durable": true,
            "name": t.exchange,
            "type": "direct",
            "vhost": VHOST,
        }));
        for q in &t.queues {
            queues.push(json!({
                "arguments": table(q.arguments.iter().map(|(k, v)| (*k, v))),
                "auto_delete": false,
                "durable": true,
                "name": q.name,
                "type": q.kind,
                "vhost": VHOST,
            }));
        }
        for (source, destination, routing_key) in &t.bindings {
            bindings.push(json!({
                "arguments": {},
                "destination": destination,
                "destination_type": "queue",
                "routing_key": routing_key,
                "source": source,
                "vhost": VHOST,
            }));
        }
        for p in &t.policies {
            policies.push(json!({
                "apply-to": "queues",
                "definition": table(p.definition.iter().map(|(k, v)| (*k, v))),
                "name": p.name,
                "pattern": p.pattern,
                "priority": 0,
                "vhost": VHOST,
            }));
        }
    }
    let doc = json!({
        "bindings": bindings,
        "exchanges": exchanges,
        "policies": policies,
        "queues": queues,
    });
    let mut contents = serde_json::to_string_pretty(&doc)?;
    contents.push('\n');
    Ok(vec![Output {
        path: "infra/rabbitmq/definitions.json".into(),
        contents,
    }])
}

fn table<'a>(entries: impl Iterator<Item = (&'a str, &'a ArgValue)>) -> Value {
    let map: Map<String, Value> = entries
        .map(|(k, v)| {
            let v = match v {
                ArgValue::Text(s) => Value::from(s.as_str()),
                ArgValue::Int(n) => Value::from(*n),
            };
            (k.to_owned(), v)
        })
        .collect();
    Value::Object(map)
}
