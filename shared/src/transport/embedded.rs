//! The embedded transport: a durable SQLite file (WAL) holding queues and dead letters.
//!
//! Several processes on one host may share the file: every state change is one short
//! `BEGIN IMMEDIATE` transaction, so SQLite's file lock serializes writers and a lease is a
//! row update guarded by a random lease token. `synchronous = NORMAL` in WAL mode survives a
//! killed process (the case the tests prove); a power cut may lose the last transactions.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use rusqlite::{params, Connection, OptionalExtension, Row};
use tokio::sync::Notify;

use super::{Transport, TransportOptions};
use crate::{
    error::{Error, Result},
    message::{
        from_unix_ms, rfc3339, unix_ms, DeadLetter, Delivery, Failure, FailureClass, Headers,
        OutgoingMessage, QueueStats, RedriveFilter,
    },
};

/// How long a writer waits for the file lock held by another connection or process.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS messages (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    queue            TEXT NOT NULL,
    body             BLOB NOT NULL,
    headers          TEXT NOT NULL,
    enqueued_at      INTEGER NOT NULL,
    visible_at       INTEGER NOT NULL,
    receive_count    INTEGER NOT NULL DEFAULT 0,
    lease_token      TEXT,
    first_failure_at INTEGER,
    last_failure_at  INTEGER,
    last_error       TEXT,
    last_error_class TEXT,
    redriven         INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_by_visibility ON messages (queue, visible_at, seq);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    queue            TEXT NOT NULL,
    function         TEXT NOT NULL,
    body             BLOB NOT NULL,
    headers          TEXT NOT NULL,
    enqueued_at      INTEGER NOT NULL,
    attempts         INTEGER NOT NULL,
    error_class      TEXT NOT NULL,
    last_error       TEXT NOT NULL,
    first_failure_at INTEGER NOT NULL,
    last_failure_at  INTEGER NOT NULL,
    dead_lettered_at INTEGER NOT NULL,
    redriven         INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS dead_letters_by_queue ON dead_letters (queue, seq);
";

/// Opens a SQLite file with the pragmas every embedded backend uses.
pub(crate) fn open_sqlite(path: &Path) -> Result<Connection> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

/// The embedded SQLite queue.
#[derive(Clone)]
pub struct EmbeddedTransport {
    opts: Arc<TransportOptions>,
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
    /// Wakes idle receivers in this process at once; other processes are seen by polling.
    published: Arc<Notify>,
}

impl EmbeddedTransport {
    /// Opens (and creates) the queue file named by `opts.url`.
    pub async fn open(opts: TransportOptions) -> Result<Self> {
        let path = PathBuf::from(&opts.url);
        let p = path.clone();
        let conn = tokio::task::spawn_blocking(move || -> Result<Connection> {
            let conn = open_sqlite(&p)?;
            conn.execute_batch(SCHEMA)?;
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

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction on the blocking pool.
    async fn tx<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction<'_>, &TransportOptions) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = self.conn.clone();
        let opts = self.opts.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().expect("sqlite connection lock");
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let out = f(&tx, &opts)?;
            tx.commit()?;
            Ok(out)
        })
        .await?
    }

    fn receive_now(
        tx: &rusqlite::Transaction<'_>,
        opts: &TransportOptions,
        max: usize,
    ) -> Result<Vec<Delivery>> {
        let now = unix_ms(SystemTime::now());
        // The oldest visible rows, by the (queue, visible_at, seq) index.
        let candidates: Vec<(i64, i64)> = tx
            .prepare_cached(
                "SELECT seq, receive_count FROM messages WHERE queue = ?1 AND visible_at <= ?2
                 ORDER BY visible_at, seq LIMIT ?3",
            )?
            .query_map(params![opts.queue, now, max as i64], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let lease_until = now + opts.lease.as_millis() as i64;
        let mut out = Vec::with_capacity(candidates.len());
        for (seq, receive_count) in candidates {
            if receive_count >= i64::from(opts.max_deliveries) {
                // Crash-loop guard: delivered max_deliveries times and never settled (its
                // worker kept dying): dead-letter it instead of delivering it again.
                let reason = format!(
                    "delivered {receive_count} times without being settled (the worker crashed or lost its lease each time)"
                );
                tx.prepare_cached(
                    "INSERT INTO dead_letters (id, queue, function, body, headers, enqueued_at, attempts,
                         error_class, last_error, first_failure_at, last_failure_at, dead_lettered_at, redriven)
                     SELECT id, queue, ?1, body, headers, enqueued_at, receive_count, 'crash_loop', ?2,
                         COALESCE(first_failure_at, ?3), ?3, ?3, redriven
                     FROM messages WHERE seq = ?4",
                )?
                .execute(params![opts.function, reason, now, seq])?;
                tx.prepare_cached("DELETE FROM messages WHERE seq = ?1")?
                    .execute(params![seq])?;
                tracing::warn!(
                    seq,
                    receive_count,
                    "crash-loop guard: dead-lettered a message that was never settled"
                );
                continue;
            }
            let d = tx
                .prepare_cached(
                    "UPDATE messages SET visible_at = ?1, receive_count = receive_count + 1,
                         lease_token = lower(hex(randomblob(16)))
                     WHERE seq = ?2
                     RETURNING id, body, headers, receive_count, enqueued_at, first_failure_at, lease_token",
                )?
                .query_row(params![lease_until, seq], delivery_from_row)?;
            out.push(d);
        }
        Ok(out)
    }
}

fn delivery_from_row(r: &Row<'_>) -> rusqlite::Result<Delivery> {
    let headers: String = r.get(2)?;
    Ok(Delivery {
        id: r.get(0)?,
        body: r.get(1)?,
        headers: serde_json::from_str(&headers).unwrap_or_default(),
        attempt: r.get::<_, i64>(3)? as u32,
        enqueued_at: from_unix_ms(r.get(4)?),
        first_failure_at: r.get::<_, Option<i64>>(5)?.map(from_unix_ms),
        receipt: r.get(6)?,
    })
}

fn dead_letter_from_row(r: &Row<'_>) -> rusqlite::Result<DeadLetter> {
    let headers: String = r.get(2)?;
    let class: String = r.get(4)?;
    let mut dl = DeadLetter {
        id: r.get(0)?,
        attempts: r.get::<_, i64>(3)? as u32,
        error_class: FailureClass::parse(&class).unwrap_or(FailureClass::Permanent),
        last_error: r.get(5)?,
        body: None,
        body_hex: None,
        headers: serde_json::from_str::<Headers>(&headers).unwrap_or_default(),
        function: r.get(6)?,
        original_queue: r.get(7)?,
        first_failure_at: rfc3339(from_unix_ms(r.get(8)?)),
        last_failure_at: rfc3339(from_unix_ms(r.get(9)?)),
        redriven: r.get::<_, i64>(10)? as u32,
        raw_body: Vec::new(),
    };
    dl.set_body(r.get(1)?);
    Ok(dl)
}

const DEAD_LETTER_COLUMNS: &str =
    "id, body, headers, attempts, error_class, last_error, function, queue,
     first_failure_at, last_failure_at, redriven";

fn lease_lost(id: &str) -> Error {
    Error::LeaseLost(id.to_owned())
}

impl Transport for EmbeddedTransport {
    async fn provision(&self) -> Result<()> {
        // The schema is created on open; nothing else to declare.
        Ok(())
    }

    async fn publish(&self, msgs: Vec<OutgoingMessage>) -> Result<Vec<String>> {
        let ids = self
            .tx(move |tx, opts| {
                let now = unix_ms(SystemTime::now());
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO messages (id, queue, body, headers, enqueued_at, visible_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?;
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
                        now,
                        now + m.delay.as_millis() as i64
                    ])?;
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
        let (id, token) = (d.id.clone(), d.receipt.clone());
        self.tx(move |tx, _| {
            let n = tx.execute(
                "DELETE FROM messages WHERE id = ?1 AND lease_token = ?2",
                params![id, token],
            )?;
            if n == 1 {
                Ok(())
            } else {
                Err(lease_lost(&id))
            }
        })
        .await
    }

    async fn retry_after(&self, d: &Delivery, delay: Duration, failure: &Failure) -> Result<()> {
        let (id, token) = (d.id.clone(), d.receipt.clone());
        let failure = failure.clone();
        self.tx(move |tx, _| {
            let at = unix_ms(failure.at);
            let n = tx.execute(
                "UPDATE messages SET visible_at = ?1, lease_token = NULL,
                     first_failure_at = COALESCE(first_failure_at, ?2), last_failure_at = ?2,
                     last_error = ?3, last_error_class = ?4
                 WHERE id = ?5 AND lease_token = ?6",
                params![
                    unix_ms(SystemTime::now()) + delay.as_millis() as i64,
                    at,
                    failure.reason,
                    failure.class.as_str(),
                    id,
                    token
                ],
            )?;
            if n == 1 {
                Ok(())
            } else {
                Err(lease_lost(&id))
            }
        })
        .await
    }

    async fn dead_letter(&self, d: &Delivery, failure: &Failure) -> Result<()> {
        let (id, token) = (d.id.clone(), d.receipt.clone());
        let failure = failure.clone();
        self.tx(move |tx, opts| {
            let at = unix_ms(failure.at);
            // Move and delete in one transaction: the copy exists before the original goes.
            let n = tx.execute(
                "INSERT INTO dead_letters (id, queue, function, body, headers, enqueued_at, attempts,
                     error_class, last_error, first_failure_at, last_failure_at, dead_lettered_at, redriven)
                 SELECT id, queue, ?1, body, headers, enqueued_at, receive_count, ?2, ?3,
                     COALESCE(first_failure_at, ?4), ?4, ?5, redriven
                 FROM messages WHERE id = ?6 AND lease_token = ?7",
                params![
                    opts.function,
                    failure.class.as_str(),
                    failure.reason,
                    at,
                    unix_ms(SystemTime::now()),
                    id,
                    token
                ],
            )?;
            if n != 1 {
                return Err(lease_lost(&id));
            }
            tx.execute("DELETE FROM messages WHERE id = ?1", params![id])?;
            Ok(())
        })
        .await
    }

    async fn extend(&self, d: &Delivery, lease: Duration) -> Result<()> {
        let (id, token) = (d.id.clone(), d.receipt.clone());
        self.tx(move |tx, _| {
            let n = tx.execute(
                "UPDATE messages SET visible_at = ?1 WHERE id = ?2 AND lease_token = ?3",
                params![
                    unix_ms(SystemTime::now()) + lease.as_millis() as i64,
                    id,
                    token
                ],
            )?;
            if n == 1 {
                Ok(())
            } else {
                Err(lease_lost(&id))
            }
        })
        .await
    }

    async fn release(&self, d: &Delivery) -> Result<()> {
        let (id, token) = (d.id.clone(), d.receipt.clone());
        self.tx(move |tx, _| {
            let n = tx.execute(
                "UPDATE messages SET visible_at = ?1, lease_token = NULL
                 WHERE id = ?2 AND lease_token = ?3",
                params![unix_ms(SystemTime::now()), id, token],
            )?;
            if n == 1 {
                Ok(())
            } else {
                Err(lease_lost(&id))
            }
        })
        .await?;
        self.published.notify_waiters();
        Ok(())
    }

    async fn stats(&self) -> Result<QueueStats> {
        self.tx(|tx, opts| {
            let now = unix_ms(SystemTime::now());
            let (ready, in_flight, delayed): (i64, i64, i64) = tx.query_row(
                "SELECT
                    COALESCE(SUM(visible_at <= ?2), 0),
                    COALESCE(SUM(visible_at > ?2 AND lease_token IS NOT NULL), 0),
                    COALESCE(SUM(visible_at > ?2 AND lease_token IS NULL), 0)
                 FROM messages WHERE queue = ?1",
                params![opts.queue, now],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            let dead: i64 = tx.query_row(
                "SELECT COUNT(*) FROM dead_letters WHERE queue = ?1",
                params![opts.queue],
                |r| r.get(0),
            )?;
            Ok(QueueStats {
                ready: ready as u64,
                in_flight: in_flight as u64,
                delayed: delayed as u64,
                dead_lettered: dead as u64,
            })
        })
        .await
    }

    async fn dlq_list(&self, limit: usize) -> Result<Vec<DeadLetter>> {
        self.tx(move |tx, opts| {
            let mut stmt = tx.prepare_cached(&format!(
                "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE queue = ?1 ORDER BY seq LIMIT ?2"
            ))?;
            let rows = stmt
                .query_map(params![opts.queue, limit as i64], dead_letter_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn dlq_get(&self, id: &str) -> Result<Option<DeadLetter>> {
        let id = id.to_owned();
        self.tx(move |tx, opts| {
            Ok(tx
                .query_row(
                    &format!(
                        "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE queue = ?1 AND id = ?2"
                    ),
                    params![opts.queue, id],
                    dead_letter_from_row,
                )
                .optional()?)
        })
        .await
    }

    async fn redrive(&self, filter: &RedriveFilter) -> Result<Vec<DeadLetter>> {
        let filter = filter.clone();
        let moved = self
            .tx(move |tx, opts| {
                let class = filter.error_class.map(FailureClass::as_str);
                let limit = filter.limit.map(|l| l as i64).unwrap_or(-1);
                let mut stmt = tx.prepare_cached(&format!(
                    "SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters
                     WHERE queue = ?1 AND (?2 IS NULL OR error_class = ?2)
                     ORDER BY seq LIMIT ?3"
                ))?;
                let picked = stmt
                    .query_map(params![opts.queue, class, limit], dead_letter_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                if filter.dry_run {
                    return Ok(picked);
                }
                let now = unix_ms(SystemTime::now());
                for dl in &picked {
                    // Attempts reset; the redrive count keeps the history visible.
                    tx.execute(
                        "INSERT INTO messages (id, queue, body, headers, enqueued_at, visible_at, redriven)
                         SELECT id, queue, body, headers, enqueued_at, ?1, redriven + 1
                         FROM dead_letters WHERE id = ?2",
                        params![now, dl.id],
                    )?;
                    tx.execute("DELETE FROM dead_letters WHERE id = ?1", params![dl.id])?;
                }
                Ok(picked)
            })
            .await?;
        self.published.notify_waiters();
        Ok(moved)
    }
}
