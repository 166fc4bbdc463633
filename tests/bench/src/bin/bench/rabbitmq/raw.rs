//! The raw lapin side of `bench rabbitmq`: the publisher every run fills the queue with, and the
//! baseline consumer, the fastest consume+ack loop lapin allows.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::{FutureExt, StreamExt};
use sluice::{
    transport::rabbitmq::lapin::{
        options::{
            BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
            ConfirmSelectOptions,
        },
        types::FieldTable,
        BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
    },
    CancellationToken,
};

use super::{
    now_us,
    procfs::{peak_rss_mb, reset_peak_rss},
    BODY_BYTES, CONFIRM_WINDOW,
};

/// A JSON body of exactly [`BODY_BYTES`] carrying the publish time.
fn body(t: u64) -> Vec<u8> {
    let bare = format!(r#"{{"t":{t},"pad":""}}"#);
    let pad = "x".repeat(BODY_BYTES.saturating_sub(bare.len()));
    format!(r#"{{"t":{t},"pad":"{pad}"}}"#).into_bytes()
}

/// Publishes to the work queue's exchange as a producer would: persistent, with a message
/// id and publisher confirms.
pub(super) struct Publisher {
    _connection: Connection,
    channel: Channel,
    queue: String,
}

impl Publisher {
    pub(super) async fn connect(url: &str, queue: &str) -> anyhow::Result<Self> {
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self {
            _connection: connection,
            channel,
            queue: queue.into(),
        })
    }

    fn properties() -> BasicProperties {
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(uuid::Uuid::new_v4().simple().to_string().into())
            .with_timestamp(now_us() / 1_000_000)
    }

    /// Publishes `n` messages, [`CONFIRM_WINDOW`] at a time, each window confirmed.
    pub(super) async fn publish_backlog(&self, n: u64) -> anyhow::Result<()> {
        let mut left = n as usize;
        while left > 0 {
            let mut confirms = Vec::with_capacity(CONFIRM_WINDOW);
            for _ in 0..left.min(CONFIRM_WINDOW) {
                confirms.push(self.publish_one().await?);
            }
            left -= confirms.len();
            for c in confirms {
                check(c.await?)?;
            }
        }
        Ok(())
    }

    async fn publish_one(
        &self,
    ) -> anyhow::Result<sluice::transport::rabbitmq::lapin::PublisherConfirm> {
        Ok(self
            .channel
            .basic_publish(
                self.queue.as_str().into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                &body(now_us()),
                Self::properties(),
            )
            .await?)
    }

    /// Publishes `rate` messages a second for `secs` seconds (confirms awaited behind).
    pub(super) async fn publish_paced(&self, rate: u64, secs: u64) -> anyhow::Result<u64> {
        let total = rate * secs;
        let started = Instant::now();
        let mut sent = 0u64;
        let mut confirms = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        while sent < total {
            tick.tick().await;
            let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
            while sent < due.min(total) {
                confirms.push(self.publish_one().await?);
                sent += 1;
            }
        }
        for c in confirms {
            check(c.await?)?;
        }
        Ok(total)
    }
}

fn check(c: Confirmation) -> anyhow::Result<()> {
    match c {
        Confirmation::Ack(None) => Ok(()),
        other => bail!("publish not confirmed: {other:?}"),
    }
}

/// The raw loop: drains `n` messages (or runs until `stop`), acking with `multiple` after
/// at most `ack_batch` deliveries or when no further delivery is waiting. Returns the time
/// from starting the consumer to the last ack and the peak RSS.
pub(super) async fn raw_consume(
    url: &str,
    queue: &str,
    prefetch: u16,
    ack_batch: u64,
    n: Option<u64>,
    stop: CancellationToken,
) -> anyhow::Result<(Duration, f64)> {
    reset_peak_rss();
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let started = Instant::now();
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "bench-raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut done = 0u64;
    while n.is_none_or(|n| done < n) {
        let first = tokio::select! {
            d = consumer.next() => d.context("the consumer ended")??,
            _ = stop.cancelled() => break,
        };
        let mut last = first.delivery_tag;
        let mut batch = 1;
        while batch < ack_batch {
            match consumer.next().now_or_never() {
                Some(Some(Ok(d))) => {
                    last = d.delivery_tag;
                    batch += 1;
                }
                _ => break,
            }
        }
        channel
            .basic_ack(last, BasicAckOptions { multiple: true })
            .await?;
        done += batch;
    }
    let elapsed = started.elapsed();
    let rss = peak_rss_mb();
    let _ = connection.close(200, "bench done".into()).await;
    Ok((elapsed, rss))
}
