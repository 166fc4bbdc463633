//! Sending and receiving: batched sends, long polls filled out with short ones, copies not
//! yet due sent on with the time left, and each received message turned into a delivery.

use std::time::{Duration, Instant, SystemTime};

use aws_sdk_sqs::types::MessageSystemAttributeName;

use super::{
    codec::{batch_entry, batches, decode_message, encode_entry, Entry, Received, Sender},
    config::{
        BATCH_ROUNDS, MAX_BATCH_BYTES, MAX_BATCH_ENTRIES, MAX_DELAY, MAX_RECEIVE, MAX_WAIT,
        MIN_SHORT_POLL_INTERVAL,
    },
    error::sdk_err,
    Shared,
};
use crate::{
    envelope::Envelope,
    error::{Error, Result},
    lease::Span,
    message::{Delivery, OutgoingMessage, Receipt, ReceiptKind, SqsReceipt},
    time::{checked_from_unix_ms, unix_ms},
};

/// The system attributes every receive asks for.
pub(super) fn system_attributes() -> Vec<MessageSystemAttributeName> {
    vec![
        MessageSystemAttributeName::ApproximateReceiveCount,
        MessageSystemAttributeName::ApproximateFirstReceiveTimestamp,
        MessageSystemAttributeName::SentTimestamp,
        MessageSystemAttributeName::AwsTraceHeader,
        MessageSystemAttributeName::MessageGroupId,
    ]
}

impl Shared {
    pub(super) async fn publish_messages(&self, msgs: Vec<OutgoingMessage>) -> Result<Vec<String>> {
        let entries = msgs
            .iter()
            .map(|m| {
                encode_entry(
                    &m.body,
                    &m.headers,
                    m.envelope.clone(),
                    m.delay,
                    self.config.fifo,
                    Sender::Producer,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let url = self.urls().await?.queue.clone();
        self.send_entries(&url, entries).await
    }

    /// Sends entries in batches; returns their SQS message ids in order. An entry refused by
    /// SQS as the sender's fault fails the call at once (what SQS took stays sent: a caller that
    /// publishes again duplicates it); entries that failed on the server side are sent again,
    /// up to [`BATCH_ROUNDS`] rounds.
    pub(super) async fn send_entries(&self, url: &str, entries: Vec<Entry>) -> Result<Vec<String>> {
        let sizes: Vec<usize> = entries.iter().map(|e| e.size).collect();
        let mut ids = vec![String::new(); entries.len()];
        for range in batches(&sizes, MAX_BATCH_ENTRIES, MAX_BATCH_BYTES) {
            let mut pending: Vec<usize> = range.collect();
            for round in 1..=BATCH_ROUNDS {
                let request = pending
                    .iter()
                    .map(|&i| batch_entry(i, &entries[i]))
                    .collect::<Result<Vec<_>>>()?;
                let out = self
                    .client
                    .send_message_batch()
                    .queue_url(url)
                    .set_entries(Some(request))
                    .send()
                    .await
                    .map_err(|e| sdk_err("SendMessageBatch", url, e))?;
                for ok in out.successful() {
                    if let Ok(i) = ok.id().parse::<usize>() {
                        if let Some(slot) = ids.get_mut(i) {
                            *slot = ok.message_id().to_owned();
                        }
                    }
                }
                if let Some(f) = out.failed().iter().find(|f| f.sender_fault()) {
                    return Err(Error::Invalid(format!(
                        "SQS refused a message: {} {}",
                        f.code(),
                        f.message().unwrap_or_default()
                    )));
                }
                pending.retain(|&i| ids[i].is_empty());
                if pending.is_empty() {
                    break;
                }
                if round == BATCH_ROUNDS {
                    return Err(Error::transport_msg(format!(
                        "sqs: SendMessageBatch {url}: {} messages still failing after {BATCH_ROUNDS} rounds",
                        pending.len()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100 << round)).await;
            }
        }
        Ok(ids)
    }

    pub(super) async fn receive_messages(
        &self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let deadline = Instant::now() + wait;
        let pause = self.opts.poll_interval.max(MIN_SHORT_POLL_INTERVAL);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let wait_seconds = remaining.as_secs().min(MAX_WAIT.as_secs());
            let got = self
                .receive_once(max.min(MAX_RECEIVE), wait_seconds)
                .await?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            if !got.is_empty() || remaining.is_zero() {
                return Ok(got);
            }
            if wait_seconds == 0 {
                tokio::time::sleep(pause.min(remaining)).await;
            }
        }
    }

    async fn receive_once(&self, max: usize, wait_seconds: u64) -> Result<Vec<Delivery>> {
        let url = self.urls().await?.queue.clone();
        let visibility = self.config.visibility;
        let (started, started_ms) = (Instant::now(), unix_ms(SystemTime::now()));
        let out = self
            .client
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(max as i32)
            .wait_time_seconds(wait_seconds as i32)
            .visibility_timeout(visibility.as_secs() as i32)
            .set_message_system_attribute_names(Some(system_attributes()))
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| sdk_err("ReceiveMessage", &self.config.queue_name, e))?;
        self.leases.prune(Instant::now());
        let now = SystemTime::now();
        let mut deliveries = Vec::new();
        for m in out.messages() {
            let r = decode_message(m, now);
            if let Some(left) = self.due_later(&r, now) {
                self.hop(&url, r, left).await;
                continue;
            }
            self.leases.hold(
                r.handle.clone(),
                Span::new(started, visibility, started + super::MAX_VISIBILITY),
                (),
            );
            let until_ms = started_ms.saturating_add(visibility.as_millis() as i64);
            deliveries.push(self.delivery(r, started_ms, until_ms));
        }
        Ok(deliveries)
    }

    /// A long-delay copy received at least a second before its due time: how long is left.
    fn due_later(&self, r: &Received, now: SystemTime) -> Option<Duration> {
        if self.config.fifo {
            return None;
        }
        match &r.envelope {
            Some(Ok(e)) => e.due_in(now, Duration::from_secs(1)),
            _ => None,
        }
    }

    /// Re-sends a long-delay copy with the time left (at most 15 min), then deletes it.
    async fn hop(&self, url: &str, r: Received, left: Duration) {
        let envelope = match &r.envelope {
            Some(Ok(e)) => e.for_hop(),
            _ => return,
        };
        let copy = encode_entry(
            &r.body,
            &r.headers,
            envelope,
            left.min(MAX_DELAY),
            false,
            Sender::Copy {
                trace: r.trace.as_deref(),
                group: None,
                dedup: String::new(),
            },
        );
        let result = match copy {
            Ok(entry) => self.send_entries(url, vec![entry]).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(_) => {
                if let Err(e) = self.delete(url, &r.handle).await {
                    tracing::warn!(error = %e, "a long-delay copy was re-sent but not deleted: it will be delivered twice");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e.report(), "could not re-send a long-delay copy; it returns when its visibility ends")
            }
        }
    }

    /// A received message as a delivery whose lease ends at `lease_until_ms` (wall clock).
    pub(super) fn delivery(&self, r: Received, received_ms: i64, lease_until_ms: i64) -> Delivery {
        let id = r.id();
        let (mut envelope, mut defect) = match r.envelope {
            None => (Envelope::default(), None),
            Some(Ok(e)) => (e, None),
            Some(Err(d)) => (
                Envelope::default(),
                Some(("malformed envelope", d.to_string())),
            ),
        };
        if let Some(bad) = r.bad_header {
            defect.get_or_insert(bad);
        }
        if envelope.failure.is_none() && self.config.fifo {
            // FIFO retries keep the message in place: its first failure is remembered here.
            if let Some(at) = self
                .fifo_memo
                .lock()
                .first_failure
                .get(&r.message_id)
                .copied()
            {
                envelope.record_failure(&crate::envelope::Failure {
                    class: crate::envelope::FailureClass::Transient,
                    reason: String::new(),
                    at,
                });
            }
        }
        if envelope.enqueued_at.is_none() {
            envelope.enqueued_at = checked_from_unix_ms(r.sent_ms);
        }
        envelope.id = Some(id.clone());
        Delivery {
            id,
            attempt: envelope.attempt(r.receive_count),
            body: r.body,
            headers: r.headers,
            envelope,
            defect,
            receipt: Receipt(ReceiptKind::Sqs(Box::new(SqsReceipt {
                handle: r.handle,
                message_id: r.message_id,
                lease_until_ms,
                received_ms,
                group: r.group,
                trace: r.trace,
            }))),
            routing_key: None,
        }
    }
}
