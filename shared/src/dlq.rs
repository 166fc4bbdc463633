//! The dead-letter queue operations every transport shares: list, find one, redrive (scan,
//! class filter, limit, rate, dry run, publish confirmed, remove). A transport only provides a
//! [`Cursor`] over its dead-letter queue; what is listed, filtered and moved is decided here.
//!
//! A cursor hides what it has taken from other readers until [`Cursor::finish`] puts it back
//! (RabbitMQ: unacked `basic.get`s; SQS: received with a visibility timeout; SQLite: a read
//! of rows in order), so one pass never sees a message twice.

use std::{future::Future, time::Duration};

use crate::{
    dead_letter::DeadLetter,
    error::{Error, Result},
    message::RedriveFilter,
};

/// How many dead letters a redrive takes at a time.
const REDRIVE_BATCH: usize = 10;

/// A pass over one dead-letter queue.
pub trait Cursor: Send {
    /// Takes up to `max` more dead letters, oldest first where the broker keeps an order;
    /// empty once none are left. Each is known to the cursor by its position in the
    /// concatenation of everything taken so far.
    fn take(&mut self, max: usize) -> impl Future<Output = Result<Vec<DeadLetter>>> + Send;
    /// Sends the dead letters at these positions back to the work queue with attempts reset
    /// ([`crate::envelope::Envelope::for_redrive`]), waits until the broker has them, then
    /// removes them from the dead-letter queue. A failure leaves every one of them a dead
    /// letter (or, if only the removal failed, on both queues: a duplicate, never a loss).
    fn move_back(&mut self, positions: &[usize]) -> impl Future<Output = Result<()>> + Send;
    /// Keeps what was taken hidden a while longer (a paced redrive runs long).
    fn keep_alive(&mut self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }
    /// Puts back everything taken and not moved.
    fn finish(self) -> impl Future<Output = Result<()>> + Send;
}

/// The outcome of a pass once the cursor is finished: the pass's error first, then finish's.
fn after<T>(out: Result<T>, finished: Result<()>) -> Result<T> {
    let out = out?;
    finished?;
    Ok(out)
}

/// Up to `limit` dead letters, without consuming them.
pub async fn list<C: Cursor>(cursor: C, limit: usize) -> Result<Vec<DeadLetter>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let mut cursor = cursor;
    let out = cursor.take(limit).await;
    after(out, cursor.finish().await)
}

/// The dead letter with message id `id`, looking at no more than `scan_limit` of them.
pub async fn get<C: Cursor>(
    mut cursor: C,
    id: &str,
    scan_limit: usize,
) -> Result<Option<DeadLetter>> {
    let out = find(&mut cursor, id, scan_limit).await;
    after(out, cursor.finish().await)
}

async fn find<C: Cursor>(c: &mut C, id: &str, scan_limit: usize) -> Result<Option<DeadLetter>> {
    let mut seen = 0;
    while seen < scan_limit {
        let batch = c.take(REDRIVE_BATCH.min(scan_limit - seen)).await?;
        if batch.is_empty() {
            break;
        }
        seen += batch.len();
        if let Some(dl) = batch.into_iter().find(|dl| dl.id == id) {
            return Ok(Some(dl));
        }
    }
    Ok(None)
}

/// Moves dead letters back to the work queue as `filter` says, looking at no more than
/// `scan_limit`; returns what moved (or would move, on a dry run).
pub async fn redrive<C: Cursor>(
    mut cursor: C,
    filter: &RedriveFilter,
    scan_limit: usize,
) -> Result<Vec<DeadLetter>> {
    let every = match filter.rate {
        None => None,
        Some(rate) if rate > 0.0 && rate.is_finite() => Some(Duration::from_secs_f64(1.0 / rate)),
        Some(rate) => {
            return Err(Error::Invalid(format!(
                "--rate {rate}: must be a positive number of messages per second"
            )))
        }
    };
    let limit = filter.limit.unwrap_or(usize::MAX);
    if limit == 0 {
        return Ok(Vec::new());
    }
    let out = move_matching(&mut cursor, filter, limit, every, scan_limit).await;
    after(out, cursor.finish().await)
}

async fn move_matching<C: Cursor>(
    c: &mut C,
    filter: &RedriveFilter,
    limit: usize,
    every: Option<Duration>,
    scan_limit: usize,
) -> Result<Vec<DeadLetter>> {
    let mut moved = Vec::new();
    let mut seen = 0;
    let mut next = tokio::time::Instant::now();
    while seen < scan_limit && moved.len() < limit {
        let batch = c.take(REDRIVE_BATCH.min(scan_limit - seen)).await?;
        if batch.is_empty() {
            break;
        }
        let base = seen;
        seen += batch.len();
        let chosen: Vec<(usize, DeadLetter)> = batch
            .into_iter()
            .enumerate()
            .filter(|(_, dl)| {
                filter
                    .error_class
                    .is_none_or(|class| class == dl.error_class)
            })
            .map(|(i, dl)| (base + i, dl))
            .take(limit - moved.len())
            .collect();
        if filter.dry_run {
            moved.extend(chosen.into_iter().map(|(_, dl)| dl));
            continue;
        }
        match every {
            None => {
                let positions: Vec<usize> = chosen.iter().map(|(p, _)| *p).collect();
                if !positions.is_empty() {
                    c.move_back(&positions).await?;
                }
                moved.extend(chosen.into_iter().map(|(_, dl)| dl));
            }
            Some(every) => {
                for (position, dl) in chosen {
                    tokio::time::sleep_until(next).await;
                    c.keep_alive().await?;
                    c.move_back(&[position]).await?;
                    next = tokio::time::Instant::now() + every;
                    moved.push(dl);
                }
            }
        }
    }
    Ok(moved)
}
