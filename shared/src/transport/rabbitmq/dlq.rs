//! The dead-letter queue `<q>.dlq` as a [`crate::dlq::Cursor`]. AMQP has no peek: messages
//! are taken with `basic.get` (no auto-ack) on the admin channel and, at the end, every one
//! not moved is returned in place with one `basic.nack` (multiple, requeue). `basic.get`
//! rather than a consumer: it takes exactly as many as asked, and nothing is pushed that would
//! have to be returned. The DLQ is a classic queue, which applies a requeue before the next
//! command of the same channel, so the order is kept and counts right after see it.

use std::time::SystemTime;

use lapin::{
    options::{BasicAckOptions, BasicGetOptions, BasicNackOptions},
    types::FieldTable,
    Channel,
};

use super::{codec, error::broker, session::Session, Inner};
use crate::{
    dead_letter::{Arrival, DeadLetter, Origin},
    dlq::Cursor,
    envelope::Envelope,
    error::Result,
};

/// One message taken off the DLQ.
struct Held {
    raw: lapin::message::Delivery,
    producer: FieldTable,
    envelope: Envelope,
    moved: bool,
}

/// A pass over the DLQ, holding the admin channel.
pub(super) struct RabbitDlq<'s> {
    inner: &'s Inner,
    session: &'s Session,
    slot: tokio::sync::MutexGuard<'s, Option<Channel>>,
    channel: Channel,
    taken: Vec<Held>,
}

impl<'s> RabbitDlq<'s> {
    pub(super) async fn start(inner: &'s Inner, session: &'s Session) -> Result<Self> {
        let slot = session.admin().await?;
        let channel = slot.as_ref().expect("admin channel").clone();
        Ok(Self {
            inner,
            session,
            slot,
            channel,
            taken: Vec::new(),
        })
    }

    /// The dead letter a DLQ message stands for.
    fn read(&self, m: &lapin::message::Delivery) -> (FieldTable, DeadLetter) {
        let inner = self.inner;
        let top = m.properties.headers().clone().unwrap_or_default();
        let now = SystemTime::now();
        let death = codec::first_death(&top);
        // Our own dead letters never carry x-death (it is stripped from copies). A broker dead
        // letter is our copy only if it had come through the default exchange, like any copy.
        let trusted = match &death {
            None => true,
            Some((_, _, exchange, _)) => codec::is_our_copy(exchange, &top),
        };
        let (producer, envelope) = codec::split(&top, trusted, now);
        let mut envelope = envelope.unwrap_or_default();
        if envelope.enqueued_at.is_none() {
            envelope.enqueued_at = codec::published_at(&m.properties);
        }
        let arrival = match death {
            None => Arrival::Sluice,
            Some((reason, _, _, at)) if reason == "delivery_limit" => Arrival::CrashLoop {
                deliveries: inner.opts.max_deliveries.max(1),
                guard: "RabbitMQ's x-delivery-limit",
                at: at.unwrap_or(now),
            },
            Some((reason, queue, _, at)) => Arrival::Broker {
                reason,
                queue: if queue.is_empty() {
                    inner.names.work.clone()
                } else {
                    queue
                },
                at: at.unwrap_or(now),
            },
        };
        let headers = codec::producer_headers_lossy(&producer);
        let dl = DeadLetter::new(
            codec::message_id(&m.properties, &m.data),
            m.data.clone(),
            headers,
            envelope,
            arrival,
            Origin {
                function: &inner.opts.function,
                queue: &inner.names.work,
            },
        );
        (producer, dl)
    }
}

impl Cursor for RabbitDlq<'_> {
    async fn take(&mut self, max: usize) -> Result<Vec<DeadLetter>> {
        let mut out = Vec::new();
        while out.len() < max {
            let got = self
                .channel
                .basic_get(
                    self.inner.names.dlq.as_str().into(),
                    BasicGetOptions { no_ack: false },
                )
                .await
                .map_err(|e| broker("basic.get", e))?;
            let Some(m) = got.map(|m| m.delivery) else {
                break;
            };
            let (producer, dl) = self.read(&m);
            self.taken.push(Held {
                raw: m,
                producer,
                envelope: dl.envelope.clone(),
                moved: false,
            });
            out.push(dl);
        }
        Ok(out)
    }

    async fn move_back(&mut self, positions: &[usize]) -> Result<()> {
        let now = SystemTime::now();
        for &p in positions {
            let Some(held) = self.taken.get(p).filter(|h| !h.moved) else {
                continue;
            };
            let id = codec::message_id(&held.raw.properties, &held.raw.data);
            let envelope = held.envelope.for_redrive(&self.inner.names.dlq, now);
            let enqueued = envelope.enqueued_at.unwrap_or(now);
            let headers = codec::copy_headers(&held.producer, &envelope);
            let properties = codec::copy_properties(&held.raw.properties, &id, headers, enqueued);
            // Confirmed on the work queue before the DLQ copy goes.
            self.inner
                .publish_confirmed(
                    self.session,
                    "",
                    &self.inner.names.work,
                    &held.raw.data,
                    properties,
                )
                .await?;
            self.channel
                .basic_ack(held.raw.delivery_tag, BasicAckOptions::default())
                .await
                .map_err(|e| broker("basic.ack", e))?;
            self.taken[p].moved = true;
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<()> {
        let Some(last) = self
            .taken
            .iter()
            .filter(|h| !h.moved)
            .map(|h| h.raw.delivery_tag)
            .max()
        else {
            return Ok(());
        };
        let back = BasicNackOptions {
            multiple: true,
            requeue: true,
        };
        if let Err(e) = self.channel.basic_nack(last, back).await {
            // Closing the channel returns every unacked message all the same.
            *self.slot = None;
            return Err(broker("basic.nack", e));
        }
        Ok(())
    }
}
