//! Lambda mode: when `AWS_LAMBDA_RUNTIME_API` is set, the function binary serves SQS events
//! under `lambda_runtime` instead of running its CLI. Each record goes through the same
//! pipeline as in a container; the response lists only the records to retry
//! (`ReportBatchItemFailures` must be on in the event source mapping).
//!
//! - **Deadline.** The handler and the idempotency claim get the invocation's remaining time
//!   minus [`SAFETY_MARGIN`] (and never more than `worker.handler_timeout`), so a timed-out
//!   invocation never leaves a record claimed longer than it could have run.
//! - **Retries.** A transient failure is settled before the response: on a standard queue a
//!   delayed copy with the failure history replaces the record (reported as done); on a FIFO
//!   queue the record's visibility is set to the delay with its receipt handle (reported as
//!   failed, so it holds back its group). Permanent failures go to the DLQ with their history
//!   and are reported as done.
//! - **FIFO.** Records of one message group are handled in order; after a failure the rest of
//!   that group in the batch is reported failed without being run, while other groups go on.
//! - **Panics** are caught per record: one record fails, never the whole batch.
//! - **Malformed events** (not an SQS event) fail the invocation with a clear error: Lambda
//!   keeps the messages and delivers them again, nothing is lost.
//! - **Metrics**: one CloudWatch EMF document per invocation on stdout (see docs/lambda.md).

use std::{
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

mod emf;
mod record;
#[cfg(feature = "fuzzing")]
pub(crate) use record::to_message;

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use lambda_runtime::{service_fn, LambdaEvent};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::{
    config::TransportKind,
    error::Error,
    function::Definition,
    telemetry::init_logging,
    transport::AnyTransport,
    worker::{Budget, RecordOutcome, Runtime},
};

/// Kept from the invocation's remaining time for settling records and sending the response.
pub const SAFETY_MARGIN: Duration = Duration::from_millis(1500);

/// The environment variable that selects Lambda mode.
pub const RUNTIME_API_ENV: &str = "AWS_LAMBDA_RUNTIME_API";

/// Whether this process was started by a Lambda runtime.
pub fn in_lambda() -> bool {
    std::env::var_os(RUNTIME_API_ENV).is_some()
}

/// Serves Lambda invocations until the runtime stops the process.
pub(crate) async fn serve(def: Definition) -> Result<(), Error> {
    let settings = def.load_settings(None, &[])?;
    init_logging(&settings.telemetry, &def.name);
    if settings.transport.kind != TransportKind::Sqs {
        return Err(Error::Config(
            "key `transport.kind`: Lambda mode needs \"sqs\" (the trigger's queue; its DLQ receives the dead letters)"
                .into(),
        ));
    }
    let rt = Arc::new(def.open_for_lambda(settings).await?);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<serde_json::Value>| {
        let rt = rt.clone();
        async move { handle_event(&rt, event).await }
    }))
    .await
    .map_err(|e| Error::transport("lambda runtime", e))
}

/// Why an invocation failed as a whole, as Lambda reports it: `errorType` names the problem
/// (CloudWatch, the `/error` call), `errorMessage` says it in words.
#[derive(Debug)]
pub(crate) enum InvocationError {
    /// The payload is JSON but not an SQS event (the function is triggered by a queue).
    NotAnSqsEvent(String),
}

impl From<InvocationError> for lambda_runtime::Diagnostic {
    fn from(e: InvocationError) -> Self {
        match e {
            InvocationError::NotAnSqsEvent(why) => lambda_runtime::Diagnostic {
                error_type: "NotAnSqsEvent".into(),
                error_message: format!(
                    "not an SQS event (this function is triggered by an SQS queue): {why}"
                ),
            },
        }
    }
}

/// Set by the first invocation of the process (`faas.coldstart` of the invocation span).
static INVOKED: AtomicBool = AtomicBool::new(false);

/// One invocation: an SQS event in, the records to retry out, inside the invocation span;
/// its spans are exported before the response goes (Lambda may freeze the process then).
pub(crate) async fn handle_event(
    rt: &Arc<Runtime>,
    event: LambdaEvent<serde_json::Value>,
) -> Result<SqsBatchResponse, InvocationError> {
    let span = invocation_span(rt, &event.context);
    let result = handle_records(rt, event).instrument(span).await;
    crate::telemetry::trace::flush().await;
    result
}

/// The span of one invocation, with the FaaS conventions' attributes (a queue trigger is
/// `pubsub`, its span of kind CONSUMER). The records' process spans are its children.
fn invocation_span(rt: &Runtime, cx: &lambda_runtime::Context) -> tracing::Span {
    let env = |k: &str| std::env::var(k).ok();
    let name =
        env("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|| rt.metrics.labels().function.clone());
    // A root: lambda_runtime's own span around the handler is not its parent.
    tracing::info_span!(
        parent: None,
        "invocation",
        otel.name = %name,
        otel.kind = "consumer",
        faas.trigger = "pubsub",
        faas.invocation_id = %cx.request_id,
        faas.coldstart = !INVOKED.swap(true, Relaxed),
        faas.name = %name,
        faas.version = env("AWS_LAMBDA_FUNCTION_VERSION"),
        cloud.provider = "aws",
        cloud.platform = "aws_lambda",
        cloud.region = env("AWS_REGION"),
        cloud.resource_id = %cx.invoked_function_arn,
        messaging.system = "aws_sqs",
        messaging.destination.name = %rt.settings().queue,
    )
}

async fn handle_records(
    rt: &Arc<Runtime>,
    event: LambdaEvent<serde_json::Value>,
) -> Result<SqsBatchResponse, InvocationError> {
    let deadline_ms = absolute_deadline_ms(event.context.deadline, now_ms());
    let sqs: SqsEvent = serde_json::from_value(event.payload)
        .map_err(|e| InvocationError::NotAnSqsEvent(e.to_string()))?;
    let remaining =
        Duration::from_millis(deadline_ms.saturating_sub(now_ms())).saturating_sub(SAFETY_MARGIN);
    let budget = Budget {
        claim_lease: remaining.max(Duration::from_secs(1)),
        handler_timeout: rt.settings().worker.handler_timeout.min(remaining),
    };
    let AnyTransport::Sqs(queue) = rt.transport() else {
        unreachable!("serve() checked transport.kind");
    };
    let keeps_original = queue.config().fifo;
    let records = sqs.records.len() as u64;
    // `lambda_runtime::run` serves one invocation at a time, so what the process counter
    // gains meanwhile is this invocation's.
    let panics_before = rt.metrics.panics.load(Relaxed);

    // Records grouped by message group (FIFO); on a standard queue every record is its own.
    let mut groups: Vec<(String, Vec<SqsMessage>)> = Vec::new();
    for (i, record) in sqs.records.into_iter().enumerate() {
        let group = record
            .attributes
            .get("MessageGroupId")
            .cloned()
            .unwrap_or_else(|| format!("record-{i}"));
        match groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, records)) => records.push(record),
            None => groups.push((group, vec![record])),
        }
    }

    let slots = Arc::new(Semaphore::new(rt.settings().worker.concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    let mut ids_of = std::collections::HashMap::new();
    for (_, records) in groups {
        let ids: Vec<String> = records
            .iter()
            .map(|r| r.message_id.clone().unwrap_or_default())
            .collect();
        let (rt, slots) = (rt.clone(), slots.clone());
        let task = tasks.spawn(
            async move {
            let _slot = slots.acquire_owned().await.expect("semaphore never closed");
            let mut ended: Vec<(String, RecordEnd)> = Vec::new();
            for record in records {
                let id = record.message_id.clone().unwrap_or_default();
                if ended.iter().any(|(_, end)| end.reported()) {
                    // FIFO: a failure holds back the rest of its group.
                    ended.push((id, RecordEnd::NotRun));
                    continue;
                }
                let AnyTransport::Sqs(queue) = rt.transport() else { unreachable!() };
                let delivery = match record::delivery(queue, &record, deadline_ms) {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::error!(message_id = %id, error = %e.report(), "record cannot be read; reported as failed");
                        ended.push((id, RecordEnd::NotRun));
                        continue;
                    }
                };
                // Its own task, so a panic anywhere in the pipeline fails this record only.
                let rt2 = rt.clone();
                let started = Instant::now();
                let run = tokio::spawn(
                    async move { rt2.process_record(delivery, budget, keeps_original).await }
                        .instrument(tracing::Span::current()),
                );
                let end = match run.await {
                    Ok(outcome) => RecordEnd::Ran(outcome, started.elapsed()),
                    Err(e) => {
                        tracing::error!(message_id = %id, error = %e, "record processing panicked; reported as failed");
                        RecordEnd::Failed(started.elapsed())
                    }
                };
                ended.push((id, end));
            }
            ended
        }
            .instrument(tracing::Span::current()),
        );
        ids_of.insert(task.id(), ids);
    }
    let mut response = SqsBatchResponse::default();
    let mut inv = emf::Invocation {
        records,
        ..emf::Invocation::default()
    };
    while let Some(done) = tasks.join_next_with_id().await {
        let ended = match done {
            Ok((_, ended)) => ended,
            // Should the group's own task die, every record of the group comes back.
            Err(e) => ids_of
                .remove(&e.id())
                .unwrap_or_default()
                .into_iter()
                .map(|id| (id, RecordEnd::NotRun))
                .collect(),
        };
        for (id, end) in ended {
            end.count(&mut inv);
            if end.reported() {
                response.add_failure(id);
            }
        }
    }
    inv.panics = rt
        .metrics
        .panics
        .load(Relaxed)
        .saturating_sub(panics_before);
    let labels = rt.metrics.labels();
    let who = emf::Identity {
        namespace: &rt.settings().telemetry.emf_namespace,
        function: &labels.function,
        queue: &labels.queue,
        version: &labels.version,
        request_id: &event.context.request_id,
    };
    emf::emit(&who, &inv, now_ms());
    Ok(response)
}

/// How one record of the batch ended.
enum RecordEnd {
    /// Through the pipeline, in this time.
    Ran(RecordOutcome, Duration),
    /// The pipeline panicked after this time: reported.
    Failed(Duration),
    /// Not run (held back behind a failure of its FIFO group, or unreadable): reported.
    NotRun,
}

impl RecordEnd {
    fn reported(&self) -> bool {
        match self {
            RecordEnd::Ran(outcome, _) => outcome.reported(),
            RecordEnd::Failed(_) | RecordEnd::NotRun => true,
        }
    }

    /// Its part of the EMF document: every record that comes back counts as retried.
    fn count(&self, inv: &mut emf::Invocation) {
        let counter = match self {
            RecordEnd::Ran(RecordOutcome::Succeeded, _) => &mut inv.succeeded,
            RecordEnd::Ran(RecordOutcome::Duplicate, _) => &mut inv.duplicates,
            RecordEnd::Ran(RecordOutcome::DeadLettered, _) => &mut inv.dead_lettered,
            RecordEnd::Ran(RecordOutcome::Retried { .. } | RecordOutcome::Returned, _)
            | RecordEnd::Failed(_)
            | RecordEnd::NotRun => &mut inv.retried,
        };
        *counter += 1;
        if let RecordEnd::Ran(_, took) | RecordEnd::Failed(took) = self {
            inv.durations.push(*took);
        }
    }
}

/// Lambda sends the deadline as Unix epoch milliseconds; `cargo lambda watch` sends the time
/// left instead (`600000`). A value before 2001-09-09 (10^12 ms) is taken as the time left, so
/// the emulator does not leave every record with no time and a lease already expired.
fn absolute_deadline_ms(deadline: u64, now_ms: u64) -> u64 {
    if deadline < 1_000_000_000_000 {
        now_ms.saturating_add(deadline)
    } else {
        deadline
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_relative_deadline_is_made_absolute() {
        let now = 1_795_706_375_003;
        assert_eq!(super::absolute_deadline_ms(600_000, now), now + 600_000);
        assert_eq!(super::absolute_deadline_ms(now + 5_000, now), now + 5_000);
    }
}
