//! One connection and its channels: connecting with backoff, declaring or checking the
//! topology, publishing with confirms.

use std::{sync::atomic::Ordering, sync::Arc};

use lapin::{
    options::{
        BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
        QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable},
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};

use super::{
    codec::amqp_arg,
    config::{CONNECT_TIMEOUT, RECONNECT_BUDGET, RECONNECT_CAP, RECONNECT_FIRST},
    error::{broker, connect_error, declare_error, missing_queue},
    Inner,
};
use crate::{
    config::redact_url,
    error::{Error, Result},
    retry::ReconnectSchedule,
};

/// One connection and its channels.
pub(super) struct Session {
    pub(super) generation: u64,
    pub(super) connection: Connection,
    /// Publisher confirms on.
    publisher: tokio::sync::Mutex<Option<Channel>>,
    /// Queue counts and DLQ work; used by one operation at a time.
    admin: tokio::sync::Mutex<Option<Channel>>,
}

impl Inner {
    /// The live session, reconnecting (with backoff) if the connection was lost.
    pub(super) async fn session(&self) -> Result<Arc<Session>> {
        let mut slot = self.session.lock().await;
        if let Some(s) = slot.as_ref() {
            if s.connection.status().connected() {
                return Ok(s.clone());
            }
            tracing::warn!(
                url = %redact_url(&self.opts.url),
                "RabbitMQ connection lost; reconnecting (unsettled deliveries return to the queue)"
            );
        }
        *slot = None;
        let s = Arc::new(self.connect_with_backoff().await?);
        // Deliveries of older connections can no longer be settled: the broker redelivers them.
        self.leases.retain(|k| k.generation == s.generation);
        self.pending.lock().retain(|p| p.generation == s.generation);
        *slot = Some(s.clone());
        Ok(s)
    }

    async fn connect_with_backoff(&self) -> Result<Session> {
        let mut schedule = ReconnectSchedule::new(RECONNECT_FIRST, RECONNECT_CAP, RECONNECT_BUDGET);
        loop {
            let err = match self.connect_once().await {
                Ok(s) => return Ok(s),
                Err(e @ Error::Config(_)) => return Err(e),
                Err(e) => e,
            };
            let Some(wait) = schedule.next_wait() else {
                return Err(err);
            };
            // The error texts come from `connect_error` and `broker`: the URL in them is
            // redacted, and lapin's own texts carry no credentials.
            tracing::warn!(
                url = %redact_url(&self.opts.url),
                error = %err,
                attempt = schedule.attempts(),
                retry_in = ?wait,
                "could not connect to RabbitMQ; retrying"
            );
            tokio::time::sleep(wait).await;
        }
    }

    async fn connect_once(&self) -> Result<Session> {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let name = format!("sluice {} on {}", self.opts.function, self.names.work);
        let props = ConnectionProperties::default().with_connection_name(name.into());
        let connect = async {
            match &self.config.tls_ca_pem {
                Some(pem) => {
                    let tls = lapin::tcp::OwnedTLSConfig {
                        identity: None,
                        cert_chain: Some(pem.clone()),
                    };
                    let runtime = lapin::runtime::default_runtime()?;
                    Connection::connect_with_config(&self.opts.url, props, tls, runtime).await
                }
                None => Connection::connect(&self.opts.url, props).await,
            }
        };
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| Error::Timeout(CONNECT_TIMEOUT))?
            .map_err(|e| connect_error(&self.opts.url, e))?;
        let session = Session {
            generation,
            connection,
            publisher: tokio::sync::Mutex::new(None),
            admin: tokio::sync::Mutex::new(None),
        };
        if self.opts.declare {
            let admin = session.admin().await?;
            self.declare(admin.as_ref().expect("admin channel")).await?;
        } else if let Err(e) = self.check_topology(&session).await {
            // Not fatal: `provision` must still run, and a worker starts working once the
            // topology is imported (until then its receive fails with this same reason).
            tracing::warn!(error = %e, "RabbitMQ topology is incomplete");
        }
        Ok(session)
    }

    /// With declaring off: every queue of the topology should exist already.
    async fn check_topology(&self, session: &Session) -> Result<()> {
        for name in self.names.all_queues() {
            let mut admin = session.admin().await?;
            let ch = admin.as_ref().expect("admin channel");
            if let Err(e) = ch
                .queue_declare(
                    name.into(),
                    QueueDeclareOptions::default().passive(),
                    FieldTable::default(),
                )
                .await
            {
                // A failed passive declare closes the channel.
                *admin = None;
                return Err(missing_queue(name, e));
            }
        }
        Ok(())
    }

    /// Declares the topology (idempotent): [`topology`] on the broker, plus `x-expires` on
    /// every queue when [`RabbitConfig::queue_expires`] is set.
    pub(super) async fn declare(&self, ch: &Channel) -> Result<()> {
        let topology = self.names.topology(self.opts.max_deliveries);
        ch.exchange_declare(
            topology.exchange.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                auto_delete: self.config.queue_expires.is_some(),
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| declare_error(&topology.exchange, e))?;
        for q in &topology.queues {
            let mut args = FieldTable::default();
            for (name, value) in &q.arguments {
                args.insert((*name).into(), amqp_arg(value));
            }
            if let Some(expires) = self.config.queue_expires {
                args.insert(
                    "x-expires".into(),
                    AMQPValue::LongLongInt(i64::try_from(expires.as_millis()).unwrap_or(i64::MAX)),
                );
            }
            ch.queue_declare(q.name.as_str().into(), QueueDeclareOptions::durable(), args)
                .await
                .map_err(|e| declare_error(&q.name, e))?;
        }
        for (exchange, queue, key) in &topology.bindings {
            ch.queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| declare_error(queue, e))?;
        }
        Ok(())
    }

    pub(super) async fn delete_topology(&self) -> Result<()> {
        let session = self.session().await?;
        let admin = session.admin().await?;
        let ch = admin.as_ref().expect("admin channel");
        for q in self.names.all_queues() {
            ch.queue_delete(q.into(), QueueDeleteOptions::default())
                .await
                .map_err(|e| broker("queue.delete", e))?;
        }
        ch.exchange_delete(
            self.names.work.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .map_err(|e| broker("exchange.delete", e))?;
        Ok(())
    }

    /// Publishes (mandatory, confirmed) and waits for the broker to take the message.
    pub(super) async fn publish_confirmed(
        &self,
        session: &Session,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<()> {
        let ch = session.publisher().await?;
        let confirm = ch
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                mandatory(),
                body,
                properties,
            )
            .await
            .map_err(|e| broker("basic.publish", e))?;
        check_confirm(
            confirm.await.map_err(|e| broker("publisher confirm", e))?,
            routing_key,
        )
    }
}

impl Session {
    /// The publisher channel (confirms on), reopened if it was closed.
    pub(super) async fn publisher(&self) -> Result<Channel> {
        let mut slot = self.publisher.lock().await;
        if let Some(ch) = slot.as_ref() {
            if ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        let ch = self
            .connection
            .create_channel()
            .await
            .map_err(|e| broker("channel.open", e))?;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| broker("confirm.select", e))?;
        *slot = Some(ch.clone());
        Ok(ch)
    }

    /// The admin channel, reopened if it was closed (a failed passive declare closes it);
    /// held by one operation at a time.
    pub(super) async fn admin(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Channel>>> {
        let mut slot = self.admin.lock().await;
        if !slot.as_ref().is_some_and(|ch| ch.status().connected()) {
            let ch = self
                .connection
                .create_channel()
                .await
                .map_err(|e| broker("channel.open", e))?;
            *slot = Some(ch);
        }
        Ok(slot)
    }
}

pub(super) fn mandatory() -> BasicPublishOptions {
    BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    }
}

pub(super) fn check_confirm(c: Confirmation, routing_key: &str) -> Result<()> {
    match c {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) => Err(Error::transport_msg(format!(
            "rabbitmq: a message to {routing_key:?} was unroutable ({}): is the topology provisioned? (`provision`)",
            returned.reply_text
        ))),
        Confirmation::Nack(_) => Err(Error::transport_msg(format!(
            "rabbitmq: the broker refused a message to {routing_key:?} (nack)"
        ))),
        Confirmation::NotRequested => Err(Error::transport_msg(
            "rabbitmq: publisher confirms are off on the publishing channel",
        )),
    }
}

pub(super) async fn queue_depth(ch: &Channel, name: &str) -> Result<u64> {
    let q = ch
        .queue_declare(
            name.into(),
            QueueDeclareOptions::default().passive(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| missing_queue(name, e))?;
    Ok(u64::from(q.message_count()))
}
