//! Receiving: one consumer per handle, a buffer of what it pushed, leases handed out, copies
//! not yet due sent on along the ladder, and the keeper that requeues what ran out.

use std::{
    sync::{Arc, Weak},
    time::{Duration, Instant, SystemTime},
};

use futures_util::{FutureExt, StreamExt};
use lapin::{
    options::{BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
    Channel, Consumer,
};

use super::{
    acks::AckWindow,
    codec,
    error::{broker, missing_queue},
    session::Session,
    settle::Lease,
    Inner,
};
use crate::{
    envelope::Envelope,
    error::Result,
    lease::Span,
    message::{Delivery, RabbitKey, Receipt, ReceiptKind},
};

/// The consumer of the work queue.
pub(super) struct Intake {
    generation: u64,
    channel: Channel,
    consumer: Consumer,
    window: Arc<AckWindow>,
}

/// A delivery taken off the consumer, not handed out yet.
pub(super) struct Pending {
    pub(super) generation: u64,
    window: Arc<AckWindow>,
    arrived: Instant,
    delivery: lapin::message::Delivery,
}

/// Nacks (with requeue) the deliveries whose lease ran out, and the prefetched ones that waited
/// in the buffer for `max_hold` (the broker's `consumer_timeout` counts them too), until the
/// handle is dropped.
pub(super) async fn keep_leases(inner: Weak<Inner>, tick: Duration) {
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(inner) = inner.upgrade() else { break };
        let now = Instant::now();
        let expired = inner.leases.take_expired(now);
        inner.leases.prune(now);
        let max_hold = inner.config.max_hold;
        // Deliveries still inside lapin's consumer count for the broker too: take them into
        // the buffer, so that their wait is measured from about now (within one tick). A
        // `receive` holding the intake does the same itself.
        if let Ok(mut intake) = inner.intake.try_lock() {
            if let Some(i) = intake.as_mut() {
                inner.drain_ready(i);
            }
        }
        let stale: Vec<Pending> = {
            let mut pending = inner.pending.lock();
            // Oldest first: the buffer is in arrival order.
            let n = pending
                .iter()
                .take_while(|p| now.duration_since(p.arrived) >= max_hold)
                .count();
            pending.drain(..n).collect()
        };
        drop(inner);
        for (_, span, lease) in expired {
            if span.until >= span.cap {
                tracing::warn!(
                    id = %lease.id,
                    held = ?max_hold,
                    "message held as long as RabbitMQ's consumer_timeout allows \
                     (transport.consumer_timeout): requeued before the broker closes the channel"
                );
            } else {
                tracing::debug!(id = %lease.id, "lease ran out unsettled: requeued");
            }
            lease.window.requeue(lease.tag).await;
        }
        if !stale.is_empty() {
            tracing::warn!(
                count = stale.len(),
                waited = ?max_hold,
                "prefetched messages waited as long as RabbitMQ's consumer_timeout allows \
                 (transport.consumer_timeout) without a free slot: requeued before the broker \
                 closes the channel"
            );
        }
        for p in stale {
            p.window.requeue(p.delivery.delivery_tag).await;
        }
    }
}

impl Inner {
    pub(super) async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let until = Instant::now() + wait;
        let mut intake = self.intake.lock().await;
        loop {
            let session = self.session().await?;
            self.ensure_intake(&session, &mut intake).await?;
            let current = intake.as_mut().expect("intake started");
            self.drain_ready(current);
            let mut out = Vec::new();
            while out.len() < max {
                let Some(p) = self.pending.lock().pop_front() else {
                    break;
                };
                if let Some(d) = self.admit(&session, p).await {
                    out.push(d);
                }
            }
            if !out.is_empty() {
                return Ok(out);
            }
            let now = Instant::now();
            if now >= until {
                return Ok(out);
            }
            match tokio::time::timeout(until - now, current.consumer.next()).await {
                Err(_) => return Ok(out),
                Ok(Some(Ok(d))) => self.take_in(current, d),
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "RabbitMQ consumer failed; starting a new one");
                    *intake = None;
                }
                Ok(None) => {
                    tracing::warn!("RabbitMQ consumer was cancelled; starting a new one");
                    *intake = None;
                }
            }
        }
    }

    /// Starts the consumer on the current connection if it is not running there.
    async fn ensure_intake(&self, session: &Session, intake: &mut Option<Intake>) -> Result<()> {
        if let Some(i) = intake.as_ref() {
            if i.generation == session.generation && i.channel.status().connected() {
                return Ok(());
            }
        }
        // The old channel (if any) is gone; the broker redelivers what it held.
        *intake = None;
        let channel = session
            .connection
            .create_channel()
            .await
            .map_err(|e| broker("channel.open", e))?;
        channel
            .basic_qos(self.config.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| broker("basic.qos", e))?;
        let consumer = channel
            .basic_consume(
                self.names.work.as_str().into(),
                format!("sluice-{:08x}-{}", self.handle, session.generation).into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| missing_queue(&self.names.work, e))?;
        *intake = Some(Intake {
            generation: session.generation,
            window: AckWindow::new(channel.clone()),
            channel,
            consumer,
        });
        Ok(())
    }

    /// Moves deliveries that already arrived into the pending buffer, without waiting.
    pub(super) fn drain_ready(&self, intake: &mut Intake) {
        while let Some(Some(Ok(d))) = intake.consumer.next().now_or_never() {
            self.take_in(intake, d);
        }
    }

    /// A delivery off the consumer: held in the channel's ack window, buffered until handed out.
    fn take_in(&self, intake: &Intake, d: lapin::message::Delivery) {
        intake.window.hold(d.delivery_tag);
        self.pending.lock().push_back(Pending {
            generation: intake.generation,
            window: intake.window.clone(),
            arrived: Instant::now(),
            delivery: d,
        });
    }

    /// Turns a raw delivery into a leased [`Delivery`], or forwards a copy that is not due yet
    /// to the next delay step (and returns `None`).
    async fn admit(&self, session: &Session, p: Pending) -> Option<Delivery> {
        let raw = p.delivery;
        if p.generation != session.generation || !p.window.usable() {
            // Its channel is gone; the broker redelivers it.
            return None;
        }
        // Borrowed, not cloned: this runs for every delivery.
        let no_headers = FieldTable::default();
        let top = raw.properties.headers().as_ref().unwrap_or(&no_headers);
        let now = SystemTime::now();
        let trusted = codec::is_our_copy(raw.exchange.as_str(), top);
        let (producer, read) = codec::split(top, trusted, now);
        let (mut envelope, mut defect) = match read {
            Ok(e) => (e, None),
            Err(d) => (
                Envelope::default(),
                Some(("malformed envelope", d.to_string())),
            ),
        };
        let id = codec::message_id(&raw.properties, &raw.data);
        if let Some(left) = envelope.due_in(now, self.names.smallest_step()) {
            self.forward(session, &p.window, &raw, &id, &producer, &envelope, left)
                .await;
            return None;
        }
        if envelope.enqueued_at.is_none() {
            envelope.enqueued_at = Some(codec::published_at(&raw.properties).unwrap_or(now));
        }
        let headers = match codec::producer_headers(&producer) {
            Ok(h) => h,
            Err(rejection) => {
                defect.get_or_insert(rejection);
                Default::default()
            }
        };
        let key = RabbitKey {
            handle: self.handle,
            generation: p.generation,
            channel: p.window.channel.id(),
            tag: raw.delivery_tag,
        };
        let arrived = Instant::now();
        let span = Span::new(arrived, self.opts.lease, p.arrived + self.config.max_hold);
        let attempt = envelope.attempt(codec::returns(top, raw.redelivered).saturating_add(1));
        let lease = Lease {
            id: id.clone(),
            window: p.window,
            tag: raw.delivery_tag,
            hold_until: span.cap,
            properties: raw.properties,
            producer,
        };
        self.leases.hold(key, span, lease);
        Some(Delivery {
            id,
            body: raw.data,
            headers,
            attempt,
            envelope,
            defect,
            receipt: Receipt(ReceiptKind::Rabbitmq(key)),
            routing_key: Some(raw.routing_key.to_string()),
        })
    }

    /// A delayed copy came back early (the ladder rounds down): on to the next step.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        session: &Session,
        window: &AckWindow,
        raw: &lapin::message::Delivery,
        id: &str,
        producer: &FieldTable,
        envelope: &Envelope,
        left: Duration,
    ) {
        let headers = codec::copy_headers(producer, &envelope.for_hop());
        let enqueued = envelope
            .enqueued_at
            .or_else(|| codec::published_at(&raw.properties))
            .unwrap_or_else(SystemTime::now);
        let properties = codec::copy_properties(&raw.properties, id, headers, enqueued);
        let step = self.names.route(left);
        match self
            .publish_confirmed(session, "", step, &raw.data, properties)
            .await
        {
            Ok(()) => {
                if !matches!(window.ack(raw.delivery_tag).await, Ok(true)) {
                    tracing::warn!(
                        id,
                        "forwarded a delayed copy but could not ack the old one: it is duplicated"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(id, error = %e.report(), "could not forward a delayed copy; it returns to the queue");
                window.requeue(raw.delivery_tag).await;
            }
        }
    }
}
