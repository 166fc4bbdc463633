//! The embedded dead-letter table as a [`crate::dlq::Cursor`]: rows in order of arrival; a
//! redrive inserts the message back and deletes its dead letter in one transaction.

use rusqlite::params;

use super::{codec, EmbeddedTransport};
use crate::{
    dead_letter::{DeadLetter, Origin},
    dlq::Cursor,
    error::Result,
    time::unix_ms,
};

/// A pass over the dead letters of one queue.
pub(super) struct EmbeddedDlq {
    pub(super) queue: EmbeddedTransport,
    /// How these dead letters are named in redrive marks.
    pub(super) dlq_name: String,
    /// The last row taken.
    pub(super) after: i64,
    /// Rows taken so far, by position.
    pub(super) taken: Vec<(i64, DeadLetter)>,
}

impl Cursor for EmbeddedDlq {
    async fn take(&mut self, max: usize) -> Result<Vec<DeadLetter>> {
        let after = self.after;
        let rows = self
            .queue
            .tx(move |tx, opts| {
                let origin = Origin {
                    function: &opts.function,
                    queue: &opts.queue,
                };
                let mut stmt = tx.prepare_cached(&format!(
                    "SELECT {} FROM dead_letters WHERE queue = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                    codec::DEAD_LETTER_COLUMNS
                ))?;
                let rows = stmt
                    .query_map(
                        params![opts.queue, after, i64::try_from(max).unwrap_or(i64::MAX)],
                        |r| codec::dead_letter(r, origin),
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(rows)
            })
            .await?;
        if let Some((seq, _)) = rows.last() {
            self.after = *seq;
        }
        let out = rows.iter().map(|(_, dl)| dl.clone()).collect();
        self.taken.extend(rows);
        Ok(out)
    }

    async fn move_back(&mut self, positions: &[usize]) -> Result<()> {
        let moves: Vec<(i64, String)> = positions
            .iter()
            .filter_map(|&p| self.taken.get(p))
            .map(|(seq, dl)| {
                let mut envelope = dl
                    .envelope
                    .for_redrive(&self.dlq_name, std::time::SystemTime::now());
                // The enqueue time lives in its own column.
                envelope.enqueued_at = None;
                (*seq, envelope.to_json())
            })
            .collect();
        self.queue
            .tx(move |tx, _| {
                let now = unix_ms(std::time::SystemTime::now());
                for (seq, envelope) in &moves {
                    // Attempts reset: a new row, receive count 0. A row another redrive took
                    // meanwhile is gone and moves nothing.
                    tx.prepare_cached(
                        "INSERT INTO messages (id, queue, body, headers, envelope, enqueued_at, visible_at)
                         SELECT id, queue, body, headers, ?1, enqueued_at, ?2
                         FROM dead_letters WHERE seq = ?3",
                    )?
                    .execute(params![envelope, now, seq])?;
                    tx.prepare_cached("DELETE FROM dead_letters WHERE seq = ?1")?
                        .execute(params![seq])?;
                }
                Ok(())
            })
            .await?;
        self.queue.published.notify_waiters();
        Ok(())
    }

    async fn finish(self) -> Result<()> {
        // Nothing was hidden: rows are read, not leased.
        Ok(())
    }
}
