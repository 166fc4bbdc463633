//! Lambda mode's metrics: one CloudWatch embedded metric format (EMF) document per
//! invocation, written to stdout, where Lambda's log capture hands it to CloudWatch Logs,
//! which extracts the metrics (no API call, no client, nothing to wait for).
//!
//! The document follows the EMF specification: `_aws.Timestamp` (ms since the epoch) and
//! `_aws.CloudWatchMetrics`, one directive with the namespace `telemetry.emf_namespace`, the
//! one dimension set `[function, queue]` (what the generated alarms in infra/aws read) and a
//! definition per metric; each dimension and metric is a member of the root. `version` and
//! `requestId` ride along as plain members (searchable in Logs Insights, not dimensions:
//! each dimension value makes a metric of its own).
//!
//! | metric | unit | value |
//! |---|---|---|
//! | `Records` | Count | records in the event |
//! | `Succeeded`, `Duplicates`, `DeadLettered` | Count | records that ended so |
//! | `Retried` | Count | records to be tried again: a delayed copy or a visibility change, and every record reported in `batchItemFailures` |
//! | `Panics` | Count | handler panics caught |
//! | `HandlerDuration` | Milliseconds | one value per record that ran through the pipeline: its time from start to settle |
//! | `ColdStart` | Count | 1, in the first document of the process only |
//!
//! `Records = Succeeded + Duplicates + Retried + DeadLettered`. EMF allows at most 100
//! values in one metric's array: the first document carries the first 100 durations, and each
//! further 100 go in a document of their own holding `HandlerDuration` alone (a batch of more
//! than 100 records needs a batch window; the default batch is 10).

use std::{
    io::Write,
    sync::atomic::{AtomicBool, Ordering::Relaxed},
    time::Duration,
};

use serde_json::{json, Map, Value};

/// The most values of one metric in one document (the EMF specification).
const MAX_VALUES: usize = 100;

/// Whether this process has written its first document (with `ColdStart`).
static WARM: AtomicBool = AtomicBool::new(false);

/// What one invocation did, record by record.
#[derive(Debug, Default)]
pub(super) struct Invocation {
    pub(super) records: u64,
    pub(super) succeeded: u64,
    pub(super) duplicates: u64,
    pub(super) retried: u64,
    pub(super) dead_lettered: u64,
    pub(super) panics: u64,
    /// One per record that ran through the pipeline.
    pub(super) durations: Vec<Duration>,
}

/// Who the documents are about.
pub(super) struct Identity<'a> {
    pub(super) namespace: &'a str,
    pub(super) function: &'a str,
    pub(super) queue: &'a str,
    pub(super) version: &'a str,
    pub(super) request_id: &'a str,
}

/// Writes the invocation's documents to stdout, one JSON object a line; `ColdStart` in the
/// process's first.
pub(super) fn emit(who: &Identity<'_>, inv: &Invocation, timestamp_ms: u64) {
    let cold = !WARM.swap(true, Relaxed);
    let mut out = std::io::stdout().lock();
    for doc in documents(who, inv, timestamp_ms, cold) {
        // Nothing to do about a closed stdout but go on: the metrics are lost, not the work.
        let _ = writeln!(out, "{doc}");
    }
    let _ = out.flush();
}

/// The invocation's documents: the first with every count, then one per further
/// [`MAX_VALUES`] durations.
pub(super) fn documents(
    who: &Identity<'_>,
    inv: &Invocation,
    timestamp_ms: u64,
    cold_start: bool,
) -> Vec<Value> {
    let ms: Vec<f64> = inv
        .durations
        .iter()
        .map(|d| (d.as_secs_f64() * 1e6).round() / 1e3)
        .collect();
    let mut chunks = ms.chunks(MAX_VALUES);
    let mut counts = vec![
        ("Records", inv.records),
        ("Succeeded", inv.succeeded),
        ("Retried", inv.retried),
        ("DeadLettered", inv.dead_lettered),
        ("Duplicates", inv.duplicates),
        ("Panics", inv.panics),
    ];
    if cold_start {
        counts.push(("ColdStart", 1));
    }
    let mut docs = Vec::new();
    let mut first = Some(counts);
    loop {
        let durations = chunks.next();
        let counts = first.take();
        if durations.is_none() && counts.is_none() {
            break;
        }
        docs.push(document(
            who,
            counts.unwrap_or_default(),
            durations,
            timestamp_ms,
        ));
    }
    docs
}

fn document(
    who: &Identity<'_>,
    counts: Vec<(&str, u64)>,
    durations: Option<&[f64]>,
    timestamp_ms: u64,
) -> Value {
    let mut root = Map::new();
    let mut definitions = Vec::new();
    for (name, n) in counts {
        definitions.push(json!({ "Name": name, "Unit": "Count" }));
        root.insert(name.into(), json!(n));
    }
    if let Some(values) = durations {
        definitions.push(json!({ "Name": "HandlerDuration", "Unit": "Milliseconds" }));
        root.insert("HandlerDuration".into(), json!(values));
    }
    root.insert("function".into(), json!(who.function));
    root.insert("queue".into(), json!(who.queue));
    root.insert("version".into(), json!(who.version));
    root.insert("requestId".into(), json!(who.request_id));
    root.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": who.namespace,
                "Dimensions": [["function", "queue"]],
                "Metrics": definitions,
            }],
        }),
    );
    Value::Object(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who() -> Identity<'static> {
        Identity {
            namespace: "Sluice",
            function: "fn-a",
            queue: "q",
            version: "7",
            request_id: "r-1",
        }
    }

    /// Every definition has its member, every dimension is a string member.
    fn check(doc: &Value) {
        let directive = &doc["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Dimensions"], json!([["function", "queue"]]));
        for d in directive["Dimensions"][0].as_array().unwrap() {
            assert!(doc[d.as_str().unwrap()].is_string(), "{doc}");
        }
        for m in directive["Metrics"].as_array().unwrap() {
            let v = &doc[m["Name"].as_str().unwrap()];
            assert!(v.is_number() || v.is_array(), "{m} in {doc}");
        }
        assert!(doc["_aws"]["Timestamp"].is_u64());
    }

    #[test]
    fn one_document_with_every_count_and_a_duration_per_record() {
        let inv = Invocation {
            records: 3,
            succeeded: 2,
            retried: 1,
            durations: vec![Duration::from_micros(1500); 3],
            ..Invocation::default()
        };
        let docs = documents(&who(), &inv, 1_700_000_000_000, true);
        assert_eq!(docs.len(), 1);
        let d = &docs[0];
        check(d);
        assert_eq!(d["Records"], 3);
        assert_eq!(d["ColdStart"], 1);
        assert_eq!(d["HandlerDuration"], json!([1.5, 1.5, 1.5]));
        let warm = documents(&who(), &inv, 1, false);
        assert!(warm[0].get("ColdStart").is_none());
    }

    #[test]
    fn more_than_100_durations_go_on_in_documents_of_their_own() {
        let inv = Invocation {
            records: 250,
            succeeded: 250,
            durations: vec![Duration::from_millis(2); 250],
            ..Invocation::default()
        };
        let docs = documents(&who(), &inv, 1, false);
        assert_eq!(docs.len(), 3);
        docs.iter().for_each(check);
        let sizes: Vec<usize> = docs
            .iter()
            .map(|d| d["HandlerDuration"].as_array().unwrap().len())
            .collect();
        assert_eq!(sizes, [100, 100, 50]);
        assert_eq!(docs[0]["Records"], 250);
        assert!(docs[1].get("Records").is_none(), "counted once");
        let empty = Invocation::default();
        let docs = documents(&who(), &empty, 1, false);
        assert_eq!(docs.len(), 1);
        check(&docs[0]);
        assert!(docs[0].get("HandlerDuration").is_none());
    }
}
