//! The embedded transport: a durable SQLite file (WAL) holding queues and dead letters.
//!
//! Several processes on one host may share the file: every state change is one short
//! `BEGIN IMMEDIATE` transaction, so SQLite's file lock serializes writers and a lease is a
//! row update guarded by a random lease token. `synchronous = NORMAL` in WAL mode survives a
//! killed process (the case the tests prove); a power cut may lose the last transactions.
//!
//! A message is one row for its whole life: a retry moves its `visible_at` and records the
//! failure in its envelope, so the row's `receive_count` is the attempt number and the
//! crash-loop guard. There is nothing to declare per queue (a queue exists once a row names
//! it): the file and its schema (`schema.rs`) are created by whichever command opens it first.
//! The dead letters of queue `q` are shown as the queue `q.dlq` (redrive marks name it).
//! docs/architecture.md "Embedded" has the rest.

mod codec;
mod dead_letters;
mod schema;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use rusqlite::{params, Connection};
use tokio::sync::Notify;

#[cfg(feature = "fuzzing")]
pub(crate) use self::codec::fuzz_row;
pub(crate) use self::schema::open_sqlite;
use super::{Transport, TransportOptions};
use crate::{
    dead_letter::DeadLetter,
    dlq,
    envelope::Failure,
    error::{Error, Result},
    message::{Delivery, OldestAge, OutgoingMessage, QueueStats, ReceiptKind, RedriveFilter},
    sync::Mutex,
    time::unix_ms,
};

/// The embedded SQLite queue.
#[derive(Clone)]
pub struct EmbeddedTransport {
    opts: Arc<TransportOptions>,
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
    /// Wakes idle receivers in this process at once; other processes are seen by polling.
    published: Arc<Notify>,
}

/// A settle that found no row with our token: the lease is not ours any more.
fn lease_lost(d: &Delivery) -> Error {
    Error::LeaseLost(d.id.clone())
}

/// The row and token of a delivery of this transport.
fn lease_of(d: &Delivery) -> Result<(i64, i64)> {
    match d.receipt.0 {
        ReceiptKind::Embedded { seq, token } => Ok((seq, token)),
        _ => Err(Error::Invalid(format!(
            "message {}: the receipt is not one of the embedded queue's",
            d.id
        ))),
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl EmbeddedTransport {
    /// Opens (and creates) the queue file named by `opts.url`.
    pub async fn open(opts: TransportOptions) -> Result<Self> {
        let path = PathBuf::from(&opts.url);
        let p = path.clone();
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection> {
            let mut conn = open_sqlite(&p).map_err(|e| {
                Error::Config(format!(
                    "key `transport.url`: cannot open the queue file {}: {e}",
                    p.display()
                ))
            })?;
            schema::prepare(&mut conn)?;
            Ok(conn)
        })
        .await??;
        Ok(Self {
            opts: Arc::new(opts),
            conn: Arc::new(Mutex::new(conn)),
            path,
            published: Arc::new(Notify::new()),
        })
    }

    /// The SQLite file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How the dead letters of this queue are named (in redrive marks).
    fn dlq_name(&self) -> String {
        format!("{}.dlq", self.opts.queue)
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction on the blocking pool.
    pub(super) async fn tx<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>, &TransportOptions) -> rusqlite::Result<T>
            + Send
            + 'static,
    ) -> Result<T> {
        self.tx_result(move |tx, opts| f(tx, opts).map_err(schema::sqlite))
            .await
    }

    /// [`EmbeddedTransport::tx`] for bodies that fail with our own errors.
    async fn tx_result<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>, &TransportOptions) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = self.conn.clone();
        let opts = self.opts.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock();
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(schema::sqlite)?;
            let out = f(&tx, &opts)?;
            tx.commit().map_err(schema::sqlite)?;
            Ok(out)
        })
        .await?
    }

    fn receive_now(
        tx: &rusqlite::Transaction<'_>,
        opts: &TransportOptions,
        max: usize,
    ) -> rusqlite::Result<Vec<Delivery>> {
        let now = unix_ms(SystemTime::now());
        // The oldest visible rows, by the (queue, visible_at, seq) index.
        let candidates: Vec<(i64, i64)> = tx
            .prepare_cached(
                "SELECT seq, CAST(receive_count AS INTEGER) FROM messages WHERE queue = ?1 AND visible_at <= ?2
                 ORDER BY visible_at, seq LIMIT ?3",
            )?
            .query_map(
                params![opts.queue, now, i64::try_from(max).unwrap_or(i64::MAX)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?
            .collect::<rusqlite::Result<_>>()?;
        let lease_until = now.saturating_add(millis(opts.lease));
        let mut out = Vec::with_capacity(candidates.len());
        for (seq, receive_count) in candidates {
            if receive_count >= i64::from(opts.max_deliveries) {
                // Crash-loop guard: delivered max_deliveries times and never settled (its
                // worker kept dying): dead-letter it instead of delivering it again.
                tx.prepare_cached(
                    "INSERT INTO dead_letters (id, queue, body, headers, envelope, enqueued_at,
                         error_class, crash_deliveries, dead_lettered_at)
                     SELECT id, queue, body, headers, envelope, enqueued_at, 'crash_loop',
                         receive_count, ?1
                     FROM messages WHERE seq = ?2",
                )?
                .execute(params![now, seq])?;
                tx.prepare_cached("DELETE FROM messages WHERE seq = ?1")?
                    .execute(params![seq])?;
                tracing::warn!(
                    seq,
                    receive_count,
                    "crash-loop guard: dead-lettered a message that was never settled"
                );
                continue;
            }
            let token: i64 = rand::random();
            let d = tx
                .prepare_cached(&format!(
                    "UPDATE messages SET visible_at = ?1, receive_count = receive_count + 1,
                         lease_token = ?2
                     WHERE seq = ?3
                     RETURNING {}",
                    codec::DELIVERY_COLUMNS
                ))?
                .query_row(params![lease_until, token, seq], codec::delivery)?;
            out.push(d);
        }
        Ok(out)
    }

    /// One guarded row update (`?1` the value, `?2` the row, `?3` the token): `Ok` when the
    /// lease was ours.
    async fn settle(&self, d: &Delivery, sql: &'static str, value: i64) -> Result<()> {
        let (seq, token) = lease_of(d)?;
        let n = self
            .tx(move |tx, _| tx.prepare_cached(sql)?.execute(params![value, seq, token]))
            .await?;
        if n == 1 {
            Ok(())
        } else {
            Err(lease_lost(d))
        }
    }
}

impl Transport for EmbeddedTransport {
    async fn provision(&self) -> Result<()> {
        // The schema is created on open; a queue needs nothing declared.
        Ok(())
    }

    async fn publish(&self, msgs: Vec<OutgoingMessage>) -> Result<Vec<String>> {
        let ids = self
            .tx_result(move |tx, opts| {
                let now = unix_ms(SystemTime::now());
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT INTO messages (id, queue, body, headers, envelope, enqueued_at, visible_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    )
                    .map_err(schema::sqlite)?;
                let mut ids = Vec::with_capacity(msgs.len());
                for m in msgs {
                    let id = uuid::Uuid::new_v4().to_string();
                    let headers = serde_json::to_string(&m.headers)
                        .map_err(|e| Error::Invalid(format!("headers: {e}")))?;
                    stmt.execute(params![
                        id,
                        opts.queue,
                        m.body,
                        headers,
                        m.envelope.to_json(),
                        now,
                        now.saturating_add(millis(m.delay))
                    ])
                    .map_err(schema::sqlite)?;
                    ids.push(id);
                }
                Ok(ids)
            })
            .await?;
        self.published.notify_waiters();
        Ok(ids)
    }

    async fn receive(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let until = Instant::now() + wait;
        loop {
            // Register for in-process wake-ups before looking, so a publish in between is
            // not missed.
            let notified = self.published.notified();
            let got = self
                .tx(move |tx, opts| Self::receive_now(tx, opts, max))
                .await?;
            let now = Instant::now();
            if !got.is_empty() || now >= until {
                return Ok(got);
            }
            let nap = self.opts.poll_interval.min(until - now);
            let _ = tokio::time::timeout(nap, notified).await;
        }
    }

    async fn ack(&self, d: &Delivery) -> Result<()> {
        let (seq, token) = lease_of(d)?;
        let n = self
            .tx(move |tx, _| {
                tx.prepare_cached("DELETE FROM messages WHERE seq = ?1 AND lease_token = ?2")?
                    .execute(params![seq, token])
            })
            .await?;
        if n == 1 {
            Ok(())
        } else {
            Err(lease_lost(d))
        }
    }

    async fn retry_after(&self, d: &Delivery, delay: Duration, failure: &Failure) -> Result<()> {
        let (seq, token) = lease_of(d)?;
        let mut envelope = d.envelope.clone();
        envelope.record_failure(failure);
        envelope.enqueued_at = None;
        let envelope = envelope.to_json();
        let visible_at = unix_ms(SystemTime::now()).saturating_add(millis(delay));
        let n = self
            .tx(move |tx, _| {
                tx.prepare_cached(
                    "UPDATE messages SET visible_at = ?1, lease_token = NULL, envelope = ?2
                     WHERE seq = ?3 AND lease_token = ?4",
                )?
                .execute(params![visible_at, envelope, seq, token])
            })
            .await?;
        if n == 1 {
            Ok(())
        } else {
            Err(lease_lost(d))
        }
    }

    async fn dead_letter(&self, d: &Delivery, failure: &Failure) -> Result<()> {
        let (seq, token) = lease_of(d)?;
        let now = SystemTime::now();
        let mut envelope = d.envelope.for_dead_letter(
            d.attempt,
            failure,
            &self.opts.function,
            &self.opts.queue,
            now,
        );
        envelope.enqueued_at = None;
        let (envelope, class, now) = (envelope.to_json(), failure.class.as_str(), unix_ms(now));
        let n = self
            .tx(move |tx, _| {
                // Move and delete in one transaction: the copy exists before the original goes.
                let n = tx
                    .prepare_cached(
                        "INSERT INTO dead_letters (id, queue, body, headers, envelope, enqueued_at,
                             error_class, dead_lettered_at)
                         SELECT id, queue, body, headers, ?1, enqueued_at, ?2, ?3
                         FROM messages WHERE seq = ?4 AND lease_token = ?5",
                    )?
                    .execute(params![envelope, class, now, seq, token])?;
                if n == 1 {
                    tx.prepare_cached("DELETE FROM messages WHERE seq = ?1")?
                        .execute(params![seq])?;
                }
                Ok(n)
            })
            .await?;
        if n == 1 {
            Ok(())
        } else {
            Err(lease_lost(d))
        }
    }

    async fn extend(&self, d: &Delivery, lease: Duration) -> Result<()> {
        let until = unix_ms(SystemTime::now()).saturating_add(millis(lease));
        self.settle(
            d,
            "UPDATE messages SET visible_at = ?1 WHERE seq = ?2 AND lease_token = ?3",
            until,
        )
        .await
    }

    async fn release(&self, d: &Delivery) -> Result<()> {
        self.settle(
            d,
            "UPDATE messages SET visible_at = ?1, lease_token = NULL
             WHERE seq = ?2 AND lease_token = ?3",
            unix_ms(SystemTime::now()),
        )
        .await?;
        self.published.notify_waiters();
        Ok(())
    }

    async fn stats(&self) -> Result<QueueStats> {
        self.tx(|tx, opts| {
            let now = unix_ms(SystemTime::now());
            // A ready row's visible_at is when it became ready: published, due after its
            // delay, or back after its lease ran out. The oldest is the smallest, read in
            // the same pass over the queue's rows.
            let (ready, in_flight, delayed, oldest): (i64, i64, i64, Option<i64>) = tx.query_row(
                "SELECT
                    COALESCE(SUM(visible_at <= ?2), 0),
                    COALESCE(SUM(visible_at > ?2 AND lease_token IS NOT NULL), 0),
                    COALESCE(SUM(visible_at > ?2 AND lease_token IS NULL), 0),
                    MIN(CASE WHEN visible_at <= ?2 THEN visible_at END)
                 FROM messages WHERE queue = ?1",
                params![opts.queue, now],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )?;
            let dead: i64 = tx.query_row(
                "SELECT COUNT(*) FROM dead_letters WHERE queue = ?1",
                params![opts.queue],
                |r| r.get(0),
            )?;
            let n = |v: i64| u64::try_from(v).unwrap_or(0);
            Ok(QueueStats {
                ready: n(ready),
                in_flight: n(in_flight),
                delayed: n(delayed),
                dead_lettered: n(dead),
                oldest_ready: OldestAge::Known(Duration::from_millis(n(
                    oldest.map_or(0, |at| now.saturating_sub(at))
                ))),
            })
        })
        .await
    }

    async fn dlq_list(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        dlq::list(self.cursor(), limit).await
    }

    async fn dlq_get(&self, id: &str) -> Result<Option<DeadLetter>> {
        dlq::get(self.cursor(), id, usize::MAX).await
    }

    async fn redrive(&self, filter: &RedriveFilter) -> Result<Vec<DeadLetter>> {
        dlq::redrive(self.cursor(), filter, usize::MAX).await
    }
}

impl EmbeddedTransport {
    fn cursor(&self) -> dead_letters::EmbeddedDlq {
        dead_letters::EmbeddedDlq {
            queue: self.clone(),
            dlq_name: self.dlq_name(),
            after: 0,
            taken: Vec::new(),
        }
    }
}
