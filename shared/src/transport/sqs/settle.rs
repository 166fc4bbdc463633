//! Settling: acks batched into `DeleteMessageBatch`, retries as copies (standard) or in place
//! (FIFO), dead letters sent with their envelope before the original goes, and the lease clock
//! checked before every call.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant, SystemTime},
};

use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, QueueAttributeName};

use super::{
    codec::{encode_entry, fifo_dedup, Sender},
    config::{ceil_secs, FIFO_MEMO_CAPACITY, MAX_BATCH_ENTRIES, MAX_DELAY, MAX_VISIBILITY},
    error::{lost_or, sdk_err, SdkErr},
    Shared,
};
use crate::{
    batch::Batcher,
    envelope::{Envelope, Failure},
    error::{Error, Result},
    lease::{Span, Taken},
    message::{Delivery, OldestAge, QueueStats, ReceiptKind, SqsReceipt},
    time::{checked_add, unix_ms},
};

/// First-failure times of FIFO messages retried by this process, by SQS message id (FIFO
/// retries keep the message in place, and SQS keeps no history for it).
#[derive(Default)]
pub(super) struct FifoMemo {
    pub(super) first_failure: HashMap<String, SystemTime>,
    order: VecDeque<String>,
}

impl FifoMemo {
    fn record(&mut self, message_id: &str, at: SystemTime) {
        if self.first_failure.contains_key(message_id) {
            return;
        }
        self.first_failure.insert(message_id.to_owned(), at);
        self.order.push_back(message_id.to_owned());
        while self.order.len() > FIFO_MEMO_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.first_failure.remove(&old);
            }
        }
    }
}

fn receipt_of(d: &Delivery) -> Result<&SqsReceipt> {
    match &d.receipt.0 {
        ReceiptKind::Sqs(r) => Ok(r),
        _ => Err(Error::Invalid(format!(
            "message {}: the receipt is not one of the SQS transport's",
            d.id
        ))),
    }
}

/// Wall-clock milliseconds as a span of this process's monotonic clock, for a delivery the
/// clock did not receive itself.
fn span_from_receipt(r: &SqsReceipt) -> Span {
    let now_ms = unix_ms(SystemTime::now());
    let now = Instant::now();
    let ago = Duration::from_millis(u64::try_from(now_ms - r.received_ms).unwrap_or(0));
    let left = Duration::from_millis(u64::try_from(r.lease_until_ms - now_ms).unwrap_or(0));
    let received = now.checked_sub(ago).unwrap_or(now);
    Span {
        received,
        until: now + left,
        cap: received + MAX_VISIBILITY,
    }
}

impl Shared {
    /// The ack batcher of the work queue, started on first use.
    async fn acks(&self) -> Result<&Batcher<String, Result<(), SdkErr>>> {
        let url = self.urls().await?.queue.clone();
        let client = self.client.clone();
        Ok(self
            .acks
            .get_or_init(|| async move {
                Batcher::spawn(MAX_BATCH_ENTRIES, move |handles: Vec<String>| {
                    delete_batch(client.clone(), url.clone(), handles)
                })
            })
            .await)
    }

    /// `Ok` while this handle's lease on the delivery lasts (see the module doc "Leases").
    fn check_lease(&self, d: &Delivery, r: &SqsReceipt) -> Result<()> {
        let now = Instant::now();
        let live = if self.leases.knows(&r.handle) {
            self.leases.live(&r.handle, now).is_some()
        } else {
            unix_ms(SystemTime::now()) < r.lease_until_ms
        };
        if live {
            Ok(())
        } else {
            Err(Error::LeaseLost(d.id.clone()))
        }
    }

    /// Records that the delivery is settled: settling it again is `LeaseLost`.
    fn settled(&self, r: &SqsReceipt) {
        if let Taken::Unknown = self.leases.take(&r.handle, Instant::now()) {
            self.leases
                .tombstone(r.handle.clone(), span_from_receipt(r));
        }
    }

    fn forget_failure(&self, r: &SqsReceipt) {
        if self.config.fifo {
            self.fifo_memo.lock().first_failure.remove(&r.message_id);
        }
    }

    pub(super) async fn ack_delivery(&self, d: &Delivery) -> Result<()> {
        let r = receipt_of(d)?;
        self.check_lease(d, r)?;
        let answer = self
            .acks()
            .await?
            .call(r.handle.clone())
            .await
            .ok_or_else(|| Error::transport_msg("sqs: the ack batcher has stopped"))?;
        answer.map_err(|e| lost_or(e, d))?;
        self.settled(r);
        self.forget_failure(r);
        Ok(())
    }

    pub(super) async fn retry_delivery(
        &self,
        d: &Delivery,
        delay: Duration,
        failure: &Failure,
    ) -> Result<()> {
        let r = receipt_of(d)?;
        self.check_lease(d, r)?;
        if self.config.fifo {
            return self.retry_in_place(d, r, delay, failure).await;
        }
        let due = (delay > MAX_DELAY)
            .then(|| checked_add(SystemTime::now(), delay))
            .flatten();
        let mut envelope = d.envelope.for_retry(d.attempt, failure, due);
        envelope.id = Some(d.id.clone());
        let copy = encode_entry(
            &d.body,
            &d.headers,
            envelope,
            delay.min(MAX_DELAY),
            false,
            Sender::Copy {
                trace: r.trace.as_deref(),
                group: None,
                dedup: String::new(),
            },
        );
        let copy = match copy {
            Ok(c) => c,
            Err(Error::Limit(why)) => {
                // Even with its envelope trimmed it does not fit: keep the original.
                tracing::warn!(reason = %why, "retry copy does not fit; retrying in place without the failure history");
                return self.retry_in_place(d, r, delay, failure).await;
            }
            Err(e) => return Err(e),
        };
        let url = self.urls().await?.queue.clone();
        self.send_entries(&url, vec![copy]).await?;
        self.settled(r);
        if let Err(e) = self.delete(&url, &r.handle).await {
            tracing::warn!(error = %e, id = %d.id, "retry copy sent but the original was not deleted: it will be delivered again");
        }
        Ok(())
    }

    /// `ChangeMessageVisibility(delay)`: FIFO order is kept, the history is not.
    async fn retry_in_place(
        &self,
        d: &Delivery,
        r: &SqsReceipt,
        delay: Duration,
        failure: &Failure,
    ) -> Result<()> {
        let seconds = ceil_secs(delay);
        self.check_in_flight_cap(r, seconds)?;
        self.change_visibility(&r.handle, seconds)
            .await
            .map_err(|e| lost_or(e, d))?;
        self.settled(r);
        if self.config.fifo {
            self.fifo_memo
                .lock()
                .record(&r.message_id, d.first_failure_at().unwrap_or(failure.at));
        }
        Ok(())
    }

    pub(super) async fn dead_letter_delivery(&self, d: &Delivery, failure: &Failure) -> Result<()> {
        let r = receipt_of(d)?;
        self.check_lease(d, r)?;
        let mut envelope = d.envelope.for_dead_letter(
            d.attempt,
            failure,
            &self.opts.function,
            &self.opts.queue,
            SystemTime::now(),
        );
        envelope.id = Some(d.id.clone());
        let dedup = fifo_dedup("dead-letter", &d.id, envelope.redriven());
        let sender = || Sender::Copy {
            trace: r.trace.as_deref(),
            group: r.group.as_deref(),
            dedup: dedup.clone(),
        };
        let encode = |headers: &crate::message::Headers, envelope: Envelope| {
            encode_entry(
                &d.body,
                headers,
                envelope,
                Duration::ZERO,
                self.config.fifo,
                sender(),
            )
        };
        // A dead-letter copy must always be possible (the alternative is a lease at a time
        // until the RedrivePolicy moves it): when the body leaves no room for the trimmed
        // envelope and the headers, the copy keeps the dead-letter mark alone, then the body
        // alone. The body's bytes are never touched; the log keeps what was left off.
        let minimal = Envelope {
            id: envelope.id.clone(),
            dead_letter: envelope.dead_letter.clone(),
            ..Envelope::default()
        };
        let empty = crate::message::Headers::new();
        let copy = match encode(&d.headers, envelope) {
            Err(Error::Limit(why)) => {
                tracing::warn!(id = %d.id, reason = %why, error = %failure.reason, "the dead-letter copy does not fit with its history and headers; it keeps its body and as much of its mark as fits (the reason is this log line)");
                match encode(&empty, minimal) {
                    Err(Error::Limit(_)) => encode(&empty, Envelope::default()),
                    other => other,
                }
            }
            other => other,
        }
        .map_err(|e| match e {
            Error::Limit(why) => Error::Limit(format!(
                "{why}: the dead-letter copy does not fit even as its bare body; the queue's RedrivePolicy will move the message as a crash loop"
            )),
            e => e,
        })?;
        let urls = self.urls().await?;
        self.send_entries(&urls.dlq, vec![copy]).await?;
        self.settled(r);
        self.forget_failure(r);
        if let Err(e) = self.delete(&urls.queue, &r.handle).await {
            tracing::warn!(error = %e, id = %d.id, "dead-letter copy sent but the original was not deleted: it will be delivered again");
        }
        Ok(())
    }

    pub(super) async fn extend_delivery(&self, d: &Delivery, lease: Duration) -> Result<()> {
        let r = receipt_of(d)?;
        self.check_lease(d, r)?;
        let seconds = ceil_secs(lease).max(1);
        self.check_in_flight_cap(r, seconds)?;
        let started = Instant::now();
        self.change_visibility(&r.handle, seconds)
            .await
            .map_err(|e| lost_or(e, d))?;
        let until = started + Duration::from_secs(seconds);
        if self.leases.push(&r.handle, until, Instant::now()).is_none() {
            // Another handle's delivery: this clock keeps it from now on.
            let span = span_from_receipt(r);
            self.leases.hold(
                r.handle.clone(),
                Span {
                    until: until.min(span.cap),
                    ..span
                },
                (),
            );
        }
        Ok(())
    }

    pub(super) async fn release_delivery(&self, d: &Delivery) -> Result<()> {
        let r = receipt_of(d)?;
        self.check_lease(d, r)?;
        self.change_visibility(&r.handle, 0)
            .await
            .map_err(|e| lost_or(e, d))?;
        self.settled(r);
        Ok(())
    }

    /// SQS keeps a message in flight at most 12 h after its receive.
    fn check_in_flight_cap(&self, r: &SqsReceipt, seconds: u64) -> Result<()> {
        let received = self
            .leases
            .live(&r.handle, Instant::now())
            .map_or_else(|| span_from_receipt(r).received, |s| s.received);
        let held = received.elapsed();
        if held + Duration::from_secs(seconds) > MAX_VISIBILITY {
            return Err(Error::Limit(format!(
                "SQS keeps a message in flight at most {MAX_VISIBILITY:?} after its receive; it was received {held:?} ago and {seconds} s more were asked"
            )));
        }
        Ok(())
    }

    pub(super) async fn delete(&self, url: &str, handle: &str) -> Result<(), SdkErr> {
        self.client
            .delete_message()
            .queue_url(url)
            .receipt_handle(handle)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| SdkErr::new("DeleteMessage", url, e))
    }

    async fn change_visibility(&self, handle: &str, seconds: u64) -> Result<(), SdkErr> {
        let url = match self.urls().await {
            Ok(u) => u.queue.clone(),
            Err(e) => {
                return Err(SdkErr {
                    op: "ChangeMessageVisibility",
                    queue: self.config.queue_name.clone(),
                    code: None,
                    message: None,
                    text: e.report().to_string(),
                })
            }
        };
        self.client
            .change_message_visibility()
            .queue_url(&url)
            .receipt_handle(handle)
            .visibility_timeout(i32::try_from(seconds).unwrap_or(i32::MAX))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| SdkErr::new("ChangeMessageVisibility", &url, e))
    }

    pub(super) async fn queue_stats(&self) -> Result<QueueStats> {
        let names = [
            QueueAttributeName::ApproximateNumberOfMessages,
            QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
            QueueAttributeName::ApproximateNumberOfMessagesDelayed,
        ];
        let urls = self.urls().await?;
        let (work, dead) = tokio::try_join!(
            self.counts(&urls.queue, &names),
            self.counts(&urls.dlq, &names)
        )?;
        Ok(QueueStats {
            ready: work[0],
            in_flight: work[1],
            delayed: work[2],
            dead_lettered: dead.iter().sum(),
            // GetQueueAttributes has no age; receiving the message to look raises its
            // ApproximateReceiveCount, which the redrive policy counts.
            oldest_ready: OldestAge::Unknown(
                "SQS reports it only as the CloudWatch metric AWS/SQS \
                 ApproximateAgeOfOldestMessage, and receiving the message to look would count \
                 as a delivery",
            ),
        })
    }

    pub(super) async fn counts(&self, url: &str, names: &[QueueAttributeName]) -> Result<Vec<u64>> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(url)
            .set_attribute_names(Some(names.to_vec()))
            .send()
            .await
            .map_err(|e| sdk_err("GetQueueAttributes", url, e))?;
        let attrs = out.attributes();
        Ok(names
            .iter()
            .map(|n| {
                attrs
                    .and_then(|a| a.get(n))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            })
            .collect())
    }
}

/// One `DeleteMessageBatch` for the acks waiting together; each ack gets its own entry's
/// answer (a failed entry fails that ack only).
async fn delete_batch(
    client: aws_sdk_sqs::Client,
    url: String,
    handles: Vec<String>,
) -> Vec<Result<(), SdkErr>> {
    let entries = handles
        .iter()
        .enumerate()
        .filter_map(|(i, h)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(h)
                .build()
                .ok()
        })
        .collect();
    let out = client
        .delete_message_batch()
        .queue_url(&url)
        .set_entries(Some(entries))
        .send()
        .await;
    match out {
        Ok(out) => {
            let mut failed: HashMap<String, SdkErr> = out
                .failed()
                .iter()
                .map(|f| {
                    let err = SdkErr {
                        op: "DeleteMessageBatch",
                        queue: url.clone(),
                        code: Some(f.code().to_owned()),
                        message: f.message().map(str::to_owned),
                        text: format!("{}: {}", f.code(), f.message().unwrap_or_default()),
                    };
                    (f.id().to_owned(), err)
                })
                .collect();
            (0..handles.len())
                .map(|i| match failed.remove(&i.to_string()) {
                    Some(e) => Err(e),
                    None => Ok(()),
                })
                .collect()
        }
        Err(e) => {
            let e = SdkErr::new("DeleteMessageBatch", &url, e);
            handles
                .iter()
                .map(|_| {
                    Err(SdkErr {
                        op: e.op,
                        queue: e.queue.clone(),
                        code: e.code.clone(),
                        message: e.message.clone(),
                        text: e.text.clone(),
                    })
                })
                .collect()
        }
    }
}
