//! Publishing and settling: every retry or dead letter is a copy published with confirms,
//! then the original is acked; a failure at any step keeps the lease, so nothing is lost.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use lapin::{types::FieldTable, BasicProperties};

use super::{
    acks::AckWindow,
    codec,
    config::{check_outgoing, PERSISTENT},
    error::{broker, settled},
    session::{check_confirm, mandatory, queue_depth, Session},
    Inner,
};
use crate::{
    envelope::Failure,
    error::{Error, Result},
    lease::Taken,
    message::{Delivery, OldestAge, OutgoingMessage, QueueStats, RabbitKey, ReceiptKind},
    time::{checked_add, unix_secs},
};

/// What settling a handed-out delivery needs.
pub(super) struct Lease {
    pub(super) id: String,
    pub(super) window: Arc<AckWindow>,
    pub(super) tag: u64,
    /// The broker's `consumer_timeout` would close the channel after this.
    pub(super) hold_until: Instant,
    pub(super) properties: BasicProperties,
    /// The producer's headers as they came (AMQP types kept for copies).
    pub(super) producer: FieldTable,
}

impl Inner {
    /// The lease key of a delivery of this handle.
    fn key_of(&self, d: &Delivery) -> Result<RabbitKey> {
        match &d.receipt.0 {
            ReceiptKind::Rabbitmq(k) if k.handle == self.handle => Ok(*k),
            // Another handle's delivery: this one holds no lease on it.
            ReceiptKind::Rabbitmq(_) => Err(Error::LeaseLost(d.id.clone())),
            _ => Err(Error::Invalid(format!(
                "message {}: the receipt is not one of the RabbitMQ transport's",
                d.id
            ))),
        }
    }

    /// Takes the lease of `d` out of the clock: from here on this call settles it.
    async fn take_lease(&self, d: &Delivery) -> Result<(RabbitKey, Lease)> {
        let key = self.key_of(d)?;
        match self.leases.take(&key, Instant::now()) {
            Taken::Live(l) if l.id == d.id => Ok((key, l)),
            Taken::Live(l) => {
                self.leases.restore(&key, l);
                Err(Error::LeaseLost(d.id.clone()))
            }
            Taken::Expired(l) => {
                // Ran out before the keeper noticed: it goes back, and the holder lost it.
                l.window.requeue(l.tag).await;
                Err(Error::LeaseLost(d.id.clone()))
            }
            Taken::Settled | Taken::Unknown => Err(Error::LeaseLost(d.id.clone())),
        }
    }

    /// The session a copy of `lease` is published on: the lease's own connection. Once that is
    /// gone the broker redelivers the original, so a copy would only duplicate it.
    async fn session_of(
        &self,
        key: RabbitKey,
        lease: &Lease,
        d: &Delivery,
    ) -> Result<Arc<Session>> {
        let session = self.session().await?;
        if session.generation != key.generation || !lease.window.usable() {
            return Err(Error::LeaseLost(d.id.clone()));
        }
        Ok(session)
    }

    /// Publishes a copy of the leased delivery (same body and properties, `headers`) to
    /// `routing_key` on the lease's own connection, and acks the original only once the broker
    /// confirmed the copy; on failure the lease is put back, so nothing is lost.
    async fn replace_with_copy(
        &self,
        d: &Delivery,
        key: RabbitKey,
        lease: Lease,
        routing_key: &str,
        headers: FieldTable,
    ) -> Result<()> {
        let properties = codec::copy_properties(&lease.properties, &d.id, headers, d.enqueued_at());
        let result = match self.session_of(key, &lease, d).await {
            Ok(session) => {
                self.publish_confirmed(&session, "", routing_key, &d.body, properties)
                    .await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => settled(lease.window.ack(lease.tag).await, &d.id),
            Err(e) => {
                self.leases.restore(&key, lease);
                Err(e)
            }
        }
    }

    pub(super) async fn ack(&self, d: &Delivery) -> Result<()> {
        let (_, lease) = self.take_lease(d).await?;
        settled(lease.window.ack(lease.tag).await, &d.id)
    }

    pub(super) async fn release(&self, d: &Delivery) -> Result<()> {
        let (_, lease) = self.take_lease(d).await?;
        settled(lease.window.nack(lease.tag).await, &d.id)
    }

    pub(super) async fn extend(&self, d: &Delivery, lease: Duration) -> Result<()> {
        let key = self.key_of(d)?;
        let now = Instant::now();
        if self.leases.push(&key, now + lease, now).is_some() {
            return Ok(());
        }
        if let Taken::Live(l) | Taken::Expired(l) = self.leases.take(&key, now) {
            if l.hold_until <= now {
                tracing::warn!(
                    id = %l.id,
                    held = ?self.config.max_hold,
                    "message held as long as RabbitMQ's consumer_timeout allows \
                     (transport.consumer_timeout): requeued before the broker closes the channel"
                );
            }
            l.window.requeue(l.tag).await;
        }
        Err(Error::LeaseLost(d.id.clone()))
    }

    pub(super) async fn retry_after(
        &self,
        d: &Delivery,
        delay: Duration,
        failure: &Failure,
    ) -> Result<()> {
        let (key, lease) = self.take_lease(d).await?;
        let due = if delay.is_zero() {
            None
        } else {
            checked_add(SystemTime::now(), delay)
        };
        // The copy's own deliveries count on from this attempt.
        let envelope = d.envelope.for_retry(d.attempt, failure, due);
        let headers = codec::fitted_copy_headers(&lease.producer, &envelope);
        self.replace_with_copy(d, key, lease, self.names.route(delay), headers)
            .await
    }

    pub(super) async fn dead_letter(&self, d: &Delivery, failure: &Failure) -> Result<()> {
        let (key, lease) = self.take_lease(d).await?;
        let envelope = d.envelope.for_dead_letter(
            d.attempt,
            failure,
            &self.opts.function,
            &self.names.work,
            SystemTime::now(),
        );
        let headers = codec::fitted_copy_headers(&lease.producer, &envelope);
        self.replace_with_copy(d, key, lease, &self.names.dlq, headers)
            .await
    }

    pub(super) async fn publish(&self, msgs: Vec<OutgoingMessage>) -> Result<Vec<String>> {
        for m in &msgs {
            check_outgoing(m)?;
        }
        let session = self.session().await?;
        let ch = session.publisher().await?;
        let now = SystemTime::now();
        let mut sent = Vec::with_capacity(msgs.len());
        for m in msgs {
            let id = uuid::Uuid::new_v4().to_string();
            let producer = codec::field_table(&m.headers);
            let base = BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_timestamp(unix_secs(now))
                .with_delivery_mode(PERSISTENT);
            let (exchange, routing_key, properties) = if m.delay.is_zero() && m.envelope.is_empty()
            {
                (
                    self.names.work.as_str(),
                    self.names.work.as_str(),
                    base.with_headers(producer),
                )
            } else {
                // A delayed or enveloped first publish travels like a copy (default exchange,
                // `sluice-retries` set), with no history: only copies are read as ours.
                let mut envelope = m.envelope.clone();
                if !m.delay.is_zero() {
                    envelope.due_at = checked_add(now, m.delay);
                }
                let headers = codec::copy_headers(&producer, &envelope);
                ("", self.names.route(m.delay), base.with_headers(headers))
            };
            let confirm = ch
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    mandatory(),
                    &m.body,
                    properties,
                )
                .await
                .map_err(|e| broker("basic.publish", e))?;
            sent.push((id, routing_key.to_owned(), confirm));
        }
        // Confirms come back in order; wait for all of them before reporting the ids.
        let mut ids = Vec::with_capacity(sent.len());
        for (id, routing_key, confirm) in sent {
            check_confirm(
                confirm.await.map_err(|e| broker("publisher confirm", e))?,
                &routing_key,
            )?;
            ids.push(id);
        }
        Ok(ids)
    }

    pub(super) async fn stats(&self) -> Result<QueueStats> {
        let session = self.session().await?;
        let (ready, delayed, dead_lettered) = {
            let admin = session.admin().await?;
            let ch = admin.as_ref().expect("admin channel");
            let ready = queue_depth(ch, &self.names.work).await?;
            let mut delayed = 0;
            for (_, name) in &self.names.delays {
                delayed += queue_depth(ch, name).await?;
            }
            (ready, delayed, queue_depth(ch, &self.names.dlq).await?)
        };
        // Deliveries that reached this process but were not handed out are still ready work.
        if let Ok(mut intake) = self.intake.try_lock() {
            if let Some(i) = intake.as_mut() {
                self.drain_ready(i);
            }
        }
        let prefetched = self.pending.lock().len() as u64;
        let in_flight = self.leases.live_count() as u64;
        Ok(QueueStats {
            ready: ready + prefetched,
            in_flight,
            delayed,
            dead_lettered,
            // AMQP tells a queue's depth, not its head's age. The management plugin's
            // `head_message_timestamp` covers classic queues only (and needs the producer's
            // timestamp property), and a peek (get, then requeue) raises the quorum queue's
            // x-delivery-count, the crash-loop guard's count.
            oldest_ready: OldestAge::Unknown(
                "RabbitMQ reports no age for a quorum queue's oldest message, and looking at it \
                 (get and requeue) would count as a delivery",
            ),
        })
    }
}
