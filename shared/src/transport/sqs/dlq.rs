//! The DLQ as a [`crate::dlq::Cursor`]. SQS has no peek: dead letters are received with a
//! short visibility ([`PEEK_LEASE`]) and put back (`ChangeMessageVisibilityBatch` to 0) when
//! the pass ends; a long (paced) redrive keeps them hidden by extending that visibility. While
//! one process peeks, those messages are invisible to others; a crash leaves them hidden for
//! the peek lease. Each peek raises their receive count (the DLQ has no redrive policy).
//! On a FIFO DLQ, SQS hands out nothing behind a message of the same group that a peek holds,
//! so a listing can miss messages of a group.

use std::time::{Instant, SystemTime};

use aws_sdk_sqs::{
    error::DisplayErrorContext,
    types::{
        ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
        QueueAttributeName,
    },
};

use super::{
    codec::{decode_message, encode_entry, fifo_dedup, Received, Sender},
    config::{MAX_BATCH_ENTRIES, MAX_RECEIVE, PEEK_LEASE},
    error::sdk_err,
    receive::system_attributes,
    Shared,
};
use crate::{
    dead_letter::{Arrival, DeadLetter, Origin},
    dlq::Cursor,
    envelope::Envelope,
    error::Result,
    time::{checked_from_unix_ms, from_unix_ms},
};

/// One DLQ message taken by the pass.
struct Held {
    r: Received,
    dl: DeadLetter,
    peeked: Instant,
    moved: bool,
}

/// A pass over the DLQ.
pub(super) struct SqsDlq<'s> {
    shared: &'s Shared,
    queue_url: String,
    dlq_url: String,
    /// DLQ messages visible when the pass started (a hint for long polling).
    visible: usize,
    taken: Vec<Held>,
}

impl<'s> SqsDlq<'s> {
    pub(super) async fn start(shared: &'s Shared) -> Result<Self> {
        let urls = shared.urls().await?;
        let visible = shared
            .counts(
                &urls.dlq,
                &[QueueAttributeName::ApproximateNumberOfMessages],
            )
            .await?[0] as usize;
        Ok(Self {
            shared,
            queue_url: urls.queue.clone(),
            dlq_url: urls.dlq.clone(),
            visible,
            taken: Vec::new(),
        })
    }

    /// The dead letter a DLQ message stands for: one we sent carries its mark; one the
    /// `RedrivePolicy` moved has none and is a crash loop.
    fn read(&self, r: &Received) -> DeadLetter {
        let shared = self.shared;
        let max = shared
            .urls
            .get()
            .map_or(shared.config.max_receive_count, |u| u.max_receive_count);
        let mut envelope = match &r.envelope {
            Some(Ok(e)) => e.clone(),
            _ => Envelope::default(),
        };
        if envelope.enqueued_at.is_none() {
            envelope.enqueued_at = checked_from_unix_ms(r.sent_ms);
        }
        let arrival = if envelope.dead_letter.is_some() {
            Arrival::Sluice
        } else {
            // SQS does not say when the policy moved it: its first receive is the best guess.
            Arrival::CrashLoop {
                deliveries: max,
                guard: "the queue's RedrivePolicy",
                at: from_unix_ms(r.first_receive_ms.unwrap_or(r.sent_ms)),
            }
        };
        DeadLetter::new(
            r.id(),
            r.body.clone(),
            r.headers.clone(),
            envelope,
            arrival,
            Origin {
                function: &shared.opts.function,
                queue: &shared.opts.queue,
            },
        )
    }

    /// Makes DLQ messages visible again, or hidden for another peek lease, 10 per call.
    async fn set_visibility<'a>(&self, handles: impl IntoIterator<Item = &'a str>, seconds: i32) {
        let handles: Vec<&str> = handles.into_iter().collect();
        for chunk in handles.chunks(MAX_BATCH_ENTRIES) {
            let entries = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, handle)| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(*handle)
                        .visibility_timeout(seconds)
                        .build()
                        .ok()
                })
                .collect();
            let out = self
                .shared
                .client
                .change_message_visibility_batch()
                .queue_url(&self.dlq_url)
                .set_entries(Some(entries))
                .send()
                .await;
            match out {
                Ok(out) if out.failed().is_empty() => {}
                Ok(out) => tracing::warn!(
                    failed = out.failed().len(),
                    "some peeked dead letters stay hidden until the peek lease ends"
                ),
                Err(e) => tracing::warn!(
                    error = %DisplayErrorContext(&e),
                    "peeked dead letters stay hidden until the peek lease ends"
                ),
            }
        }
    }
}

impl Cursor for SqsDlq<'_> {
    async fn take(&mut self, max: usize) -> Result<Vec<DeadLetter>> {
        let mut got: Vec<Held> = Vec::new();
        while got.len() < max {
            let want = MAX_RECEIVE.min(max - got.len());
            // Long-poll while the count says more are there; otherwise one short look, in
            // case the count lags.
            let wait = if self.taken.len() + got.len() < self.visible {
                1
            } else {
                0
            };
            let out = self
                .shared
                .client
                .receive_message()
                .queue_url(&self.dlq_url)
                .max_number_of_messages(want as i32)
                .wait_time_seconds(wait)
                .visibility_timeout(PEEK_LEASE.as_secs() as i32)
                .set_message_system_attribute_names(Some(system_attributes()))
                .message_attribute_names("All")
                .send()
                .await;
            let out = match out {
                Ok(out) => out,
                Err(e) => {
                    // What this call took so far goes back with the rest at finish.
                    self.taken.extend(got);
                    return Err(sdk_err("ReceiveMessage", &self.shared.config.dlq_name, e));
                }
            };
            let n = out.messages().len();
            let now = SystemTime::now();
            for m in out.messages() {
                let r = decode_message(m, now);
                let dl = self.read(&r);
                got.push(Held {
                    r,
                    dl,
                    peeked: Instant::now(),
                    moved: false,
                });
            }
            let more = n == want || self.taken.len() + got.len() < self.visible;
            if n == 0 || !more {
                break;
            }
        }
        // SQS hands them out in no order: oldest first by when they were sent.
        got.sort_by(|a, b| (a.r.sent_ms, &a.r.message_id).cmp(&(b.r.sent_ms, &b.r.message_id)));
        let out = got.iter().map(|h| h.dl.clone()).collect();
        self.taken.extend(got);
        Ok(out)
    }

    async fn move_back(&mut self, positions: &[usize]) -> Result<()> {
        let now = SystemTime::now();
        let from = self.shared.config.dlq_name.clone();
        let chosen: Vec<usize> = positions
            .iter()
            .copied()
            .filter(|&p| self.taken.get(p).is_some_and(|h| !h.moved))
            .collect();
        for chunk in chosen.chunks(MAX_BATCH_ENTRIES) {
            let copies = chunk
                .iter()
                .map(|&p| {
                    let h = &self.taken[p];
                    let mut envelope = h.dl.envelope.for_redrive(&from, now);
                    envelope.id = Some(h.dl.id.clone());
                    let dedup = fifo_dedup("redrive", &h.dl.id, envelope.redriven());
                    encode_entry(
                        &h.r.body,
                        &h.r.headers,
                        envelope,
                        std::time::Duration::ZERO,
                        self.shared.config.fifo,
                        Sender::Copy {
                            trace: h.r.trace.as_deref(),
                            group: h.r.group.as_deref(),
                            dedup,
                        },
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            self.shared.send_entries(&self.queue_url, copies).await?;
            for &p in chunk {
                self.taken[p].moved = true;
            }
            self.delete(chunk).await;
        }
        Ok(())
    }

    async fn keep_alive(&mut self) -> Result<()> {
        let stale: Vec<&str> = self
            .taken
            .iter()
            .filter(|h| !h.moved && h.peeked.elapsed() >= PEEK_LEASE / 2)
            .map(|h| h.r.handle.as_str())
            .collect();
        if !stale.is_empty() {
            self.set_visibility(stale, PEEK_LEASE.as_secs() as i32)
                .await;
            let now = Instant::now();
            for h in self.taken.iter_mut().filter(|h| !h.moved) {
                if h.peeked.elapsed() >= PEEK_LEASE / 2 {
                    h.peeked = now;
                }
            }
        }
        Ok(())
    }

    async fn finish(self) -> Result<()> {
        let back: Vec<&str> = self
            .taken
            .iter()
            .filter(|h| !h.moved)
            .map(|h| h.r.handle.as_str())
            .collect();
        self.set_visibility(back, 0).await;
        Ok(())
    }
}

impl SqsDlq<'_> {
    /// Deletes redriven DLQ copies, 10 per call. A copy that is not deleted stays on the DLQ
    /// beside its redriven twin (a duplicate, never a loss).
    async fn delete(&self, positions: &[usize]) {
        let entries = positions
            .iter()
            .enumerate()
            .filter_map(|(i, &p)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(&self.taken[p].r.handle)
                    .build()
                    .ok()
            })
            .collect();
        let out = self
            .shared
            .client
            .delete_message_batch()
            .queue_url(&self.dlq_url)
            .set_entries(Some(entries))
            .send()
            .await;
        match out {
            Ok(out) if out.failed().is_empty() => {}
            Ok(out) => {
                for f in out.failed() {
                    tracing::warn!(code = f.code(), "a redriven dead letter was not deleted from the DLQ: it is now on both queues");
                }
            }
            Err(e) => {
                tracing::warn!(error = %DisplayErrorContext(&e), "redriven dead letters were not deleted from the DLQ: they are now on both queues")
            }
        }
    }
}
