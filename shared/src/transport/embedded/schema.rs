//! The embedded queue's file: its pragmas, its schema (version 2), and the move from version 1.
//!
//! Version 2 keeps the broker's own bookkeeping in columns (visibility, receive count, lease
//! token) and everything Sluice carries in one `envelope` column, the envelope's JSON
//! (`crate::envelope`). Version 1 (before the envelope) had the failure history in columns; a
//! version 1 file is moved to version 2 in one transaction when it is first opened, history
//! kept.

use std::{path::Path, time::Duration};

use rusqlite::{params, Connection, OptionalExtension};

use crate::{
    envelope::{DeadLetterMark, Envelope, FailureClass, FailureHistory, RedriveMarks},
    error::{Error, Result},
    time::from_unix_ms,
};

/// How long a writer waits for the file lock held by another connection or process.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// `PRAGMA user_version` of the current schema.
const VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS messages (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    queue            TEXT NOT NULL,
    body             BLOB NOT NULL,
    headers          TEXT NOT NULL,
    envelope         TEXT NOT NULL DEFAULT '{}',
    enqueued_at      INTEGER NOT NULL,
    visible_at       INTEGER NOT NULL,
    receive_count    INTEGER NOT NULL DEFAULT 0,
    lease_token      INTEGER
);
CREATE INDEX IF NOT EXISTS messages_by_visibility ON messages (queue, visible_at, seq);
CREATE TABLE IF NOT EXISTS dead_letters (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    queue            TEXT NOT NULL,
    body             BLOB NOT NULL,
    headers          TEXT NOT NULL,
    envelope         TEXT NOT NULL DEFAULT '{}',
    enqueued_at      INTEGER NOT NULL,
    error_class      TEXT NOT NULL,
    crash_deliveries INTEGER,
    dead_lettered_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_by_queue ON dead_letters (queue, seq);
";

/// Opens a SQLite file with the pragmas every embedded backend uses (the SQLite idempotency
/// store too).
pub(crate) fn open_sqlite(path: &Path) -> rusqlite::Result<Connection> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            // A directory that cannot be made shows as SQLite's "unable to open" below.
            let _ = std::fs::create_dir_all(dir);
        }
    }
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Switching a new file to WAL answers SQLITE_BUSY at once, without the busy handler, while
    // another process does the same (workers starting together on a file none has made yet).
    let started = std::time::Instant::now();
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && started.elapsed() < BUSY_TIMEOUT =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => break other?,
        }
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

/// Creates the schema, or moves a version 1 file to it.
pub(super) fn prepare(conn: &mut Connection) -> Result<()> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(sqlite)?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sqlite)?;
    if version == 0 && has_column(&tx, "messages", "last_error_class")? {
        migrate_v1(&tx)?;
    } else if version > VERSION {
        return Err(Error::Config(format!(
            "key `transport.url`: the queue file was written by a newer Sluice (schema version {version}, this one knows {VERSION})"
        )));
    }
    tx.execute_batch(SCHEMA).map_err(sqlite)?;
    tx.pragma_update(None, "user_version", VERSION)
        .map_err(sqlite)?;
    tx.commit().map_err(sqlite)
}

pub(super) fn sqlite(e: rusqlite::Error) -> Error {
    Error::transport("embedded queue (SQLite)", e)
}

fn has_column(tx: &rusqlite::Transaction<'_>, table: &str, column: &str) -> Result<bool> {
    let found: Option<String> = tx
        .query_row(
            "SELECT name FROM pragma_table_info(?1) WHERE name = ?2",
            params![table, column],
            |r| r.get(0),
        )
        .optional()
        .map_err(sqlite)?;
    Ok(found.is_some())
}

/// Version 1 to 2: the history columns become the envelope; lease tokens are dropped (a
/// message leased by an older worker is visible again at once, its delivery counted).
fn migrate_v1(tx: &rusqlite::Transaction<'_>) -> Result<()> {
    tx.execute_batch(
        "ALTER TABLE messages RENAME TO messages_v1;
         ALTER TABLE dead_letters RENAME TO dead_letters_v1;
         DROP INDEX IF EXISTS messages_by_visibility;
         DROP INDEX IF EXISTS dead_letters_by_queue;",
    )
    .map_err(sqlite)?;
    tx.execute_batch(SCHEMA).map_err(sqlite)?;
    let text = |v: Option<String>| v.unwrap_or_default();
    let mut read = tx
        .prepare(
            "SELECT seq, id, queue, body, headers, enqueued_at, visible_at, receive_count,
                    first_failure_at, last_failure_at, last_error, last_error_class, redriven
             FROM messages_v1 ORDER BY seq",
        )
        .map_err(sqlite)?;
    let mut rows = read.query([]).map_err(sqlite)?;
    while let Some(r) = rows.next().map_err(sqlite)? {
        let mut envelope = Envelope::default();
        if let (Some(first), Some(last), Some(class)) = (
            r.get::<_, Option<i64>>(8).map_err(sqlite)?,
            r.get::<_, Option<i64>>(9).map_err(sqlite)?,
            r.get::<_, Option<String>>(11).map_err(sqlite)?,
        ) {
            envelope.failure = Some(FailureHistory {
                first_at: from_unix_ms(first),
                last_at: from_unix_ms(last),
                last_error: text(r.get(10).map_err(sqlite)?),
                class: FailureClass::parse(&class).unwrap_or(FailureClass::Transient),
            });
        }
        envelope.redrive = redrive_marks(r.get(12).map_err(sqlite)?);
        tx.execute(
            "INSERT INTO messages (seq, id, queue, body, headers, envelope, enqueued_at, visible_at, receive_count)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                r.get::<_, i64>(0).map_err(sqlite)?,
                r.get::<_, String>(1).map_err(sqlite)?,
                r.get::<_, String>(2).map_err(sqlite)?,
                r.get::<_, Vec<u8>>(3).map_err(sqlite)?,
                r.get::<_, String>(4).map_err(sqlite)?,
                envelope.to_json(),
                r.get::<_, i64>(5).map_err(sqlite)?,
                r.get::<_, i64>(6).map_err(sqlite)?,
                r.get::<_, i64>(7).map_err(sqlite)?,
            ],
        )
        .map_err(sqlite)?;
    }
    drop(rows);
    drop(read);
    let mut read = tx
        .prepare(
            "SELECT seq, id, queue, function, body, headers, enqueued_at, attempts, error_class,
                    last_error, first_failure_at, last_failure_at, dead_lettered_at, redriven
             FROM dead_letters_v1 ORDER BY seq",
        )
        .map_err(sqlite)?;
    let mut rows = read.query([]).map_err(sqlite)?;
    while let Some(r) = rows.next().map_err(sqlite)? {
        let class: String = r.get(8).map_err(sqlite)?;
        let dead_at = from_unix_ms(r.get(12).map_err(sqlite)?);
        let envelope = Envelope {
            failure: Some(FailureHistory {
                first_at: from_unix_ms(r.get(10).map_err(sqlite)?),
                last_at: from_unix_ms(r.get(11).map_err(sqlite)?),
                last_error: r.get(9).map_err(sqlite)?,
                class: FailureClass::parse(&class).unwrap_or(FailureClass::Permanent),
            }),
            dead_letter: Some(DeadLetterMark {
                function: r.get(3).map_err(sqlite)?,
                attempts: u32::try_from(r.get::<_, i64>(7).map_err(sqlite)?).unwrap_or(0),
                original_queue: r.get(2).map_err(sqlite)?,
                at: dead_at,
            }),
            redrive: redrive_marks(r.get(13).map_err(sqlite)?),
            ..Envelope::default()
        };
        // Version 1 wrote crash-loop dead letters with their text; they keep it as history.
        tx.execute(
            "INSERT INTO dead_letters (seq, id, queue, body, headers, envelope, enqueued_at, error_class, dead_lettered_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                r.get::<_, i64>(0).map_err(sqlite)?,
                r.get::<_, String>(1).map_err(sqlite)?,
                r.get::<_, String>(2).map_err(sqlite)?,
                r.get::<_, Vec<u8>>(4).map_err(sqlite)?,
                r.get::<_, String>(5).map_err(sqlite)?,
                envelope.to_json(),
                r.get::<_, i64>(6).map_err(sqlite)?,
                class,
                crate::time::unix_ms(dead_at),
            ],
        )
        .map_err(sqlite)?;
    }
    drop(rows);
    drop(read);
    tx.execute_batch("DROP TABLE messages_v1; DROP TABLE dead_letters_v1;")
        .map_err(sqlite)?;
    tracing::info!("moved the embedded queue file to schema version 2 (the envelope column)");
    Ok(())
}

fn redrive_marks(count: i64) -> Option<RedriveMarks> {
    (count > 0).then(|| RedriveMarks {
        count: u32::try_from(count).unwrap_or(u32::MAX),
        last_at: std::time::UNIX_EPOCH,
        from: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The version 1 schema, as the embedded queue wrote it before the envelope.
    const V1: &str = "
    CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
        queue TEXT NOT NULL, body BLOB NOT NULL, headers TEXT NOT NULL, enqueued_at INTEGER NOT NULL,
        visible_at INTEGER NOT NULL, receive_count INTEGER NOT NULL DEFAULT 0, lease_token TEXT,
        first_failure_at INTEGER, last_failure_at INTEGER, last_error TEXT, last_error_class TEXT,
        redriven INTEGER NOT NULL DEFAULT 0);
    CREATE INDEX messages_by_visibility ON messages (queue, visible_at, seq);
    CREATE TABLE dead_letters (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
        queue TEXT NOT NULL, function TEXT NOT NULL, body BLOB NOT NULL, headers TEXT NOT NULL,
        enqueued_at INTEGER NOT NULL, attempts INTEGER NOT NULL, error_class TEXT NOT NULL,
        last_error TEXT NOT NULL, first_failure_at INTEGER NOT NULL, last_failure_at INTEGER NOT NULL,
        dead_lettered_at INTEGER NOT NULL, redriven INTEGER NOT NULL DEFAULT 0);
    CREATE INDEX dead_letters_by_queue ON dead_letters (queue, seq);
    INSERT INTO messages (id, queue, body, headers, enqueued_at, visible_at, receive_count,
        lease_token, first_failure_at, last_failure_at, last_error, last_error_class, redriven)
        VALUES ('m-1', 'q', x'7b7d', '{\"x-a\":\"1\"}', 1000, 2000, 2, 'abc', 1500, 1600, 'boom', 'transient', 1);
    INSERT INTO dead_letters (id, queue, function, body, headers, enqueued_at, attempts,
        error_class, last_error, first_failure_at, last_failure_at, dead_lettered_at, redriven)
        VALUES ('m-2', 'q', 'f', x'ff', '{}', 1000, 3, 'permanent', 'no', 1100, 1200, 1300, 0);
    ";

    #[test]
    fn a_version_1_file_keeps_its_messages_and_history() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.db");
        Connection::open(&path).unwrap().execute_batch(V1).unwrap();
        let mut conn = open_sqlite(&path).unwrap();
        prepare(&mut conn).unwrap();
        prepare(&mut conn).unwrap();
        let (envelope, count, token): (String, i64, Option<i64>) = conn
            .query_row(
                "SELECT envelope, receive_count, lease_token FROM messages WHERE id = 'm-1'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        let e = Envelope::from_json(&envelope, std::time::SystemTime::now()).unwrap();
        let f = e.failure.unwrap();
        assert_eq!(
            (f.last_error.as_str(), f.class),
            ("boom", FailureClass::Transient)
        );
        assert_eq!(f.first_at, from_unix_ms(1500));
        assert_eq!((count, token, e.redrive.unwrap().count), (2, None, 1));
        let (envelope, class): (String, String) = conn
            .query_row(
                "SELECT envelope, error_class FROM dead_letters WHERE id = 'm-2'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        let e = Envelope::from_json(&envelope, std::time::SystemTime::now()).unwrap();
        assert_eq!(class, "permanent");
        assert_eq!(e.dead_letter.unwrap().attempts, 3);
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, VERSION);
    }
}
