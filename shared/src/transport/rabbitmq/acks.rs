//! Coalesced acks: one `basic.ack` with `multiple = true` for the highest tag of a run of
//! finished deliveries that starts at the channel's oldest unsettled one.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Weak,
    },
    time::{Duration, Instant},
};

use lapin::{
    options::{BasicAckOptions, BasicNackOptions},
    Channel,
};

use crate::sync::Mutex;

/// The consumer channel's deliveries that no settle frame has been sent for, and the task
/// that acks finished ones with as few frames as it safely can.
///
/// `basic.ack(tag, multiple = true)` settles every unsettled delivery of the channel up to
/// `tag`, so it may only be sent for the highest tag of a run that starts at the channel's
/// oldest unsettled delivery and holds finished ones only. A delivery that is prefetched,
/// handed out, or waiting for its retry or dead-letter copy to be confirmed is not finished,
/// and a delivery being nacked (requeued) blocks the run until its nack frame is sent, so a
/// multiple ack never covers it. Finished deliveries behind an unfinished one (a slow
/// handler) are acked one by one after [`ACK_LINGER`], so they do not wait for it.
///
/// The caller of [`AckWindow::ack`] waits until the frame covering its delivery is sent: once
/// the worker has returned from its last ack, nothing is left to flush when the process exits.
pub(super) struct AckWindow {
    pub(super) channel: Channel,
    tags: Mutex<BTreeMap<u64, Tag>>,
    /// Wakes the flusher; shared with it so that it can outlive the window and stop.
    kick: Arc<tokio::sync::Notify>,
    closed: Arc<AtomicBool>,
}

/// Where one delivery of the window stands.
enum Tag {
    /// Prefetched or handed out.
    Held,
    /// Finished: waiting for the ack frame that covers it (the flag says whether it was sent).
    Done {
        since: Instant,
        sent: tokio::sync::oneshot::Sender<bool>,
    },
    /// A nack (requeue) of it alone is under way.
    Settling,
}

/// Finished deliveries taken for an ack frame: their tags, and who waits for the frame.
type Finished = Vec<(u64, tokio::sync::oneshot::Sender<bool>)>;

/// How long a finished delivery behind an unfinished one waits to be covered by a multiple
/// ack before it is acked alone. Short: the worker's slot is held meanwhile.
pub const ACK_LINGER: Duration = Duration::from_millis(1);

impl AckWindow {
    pub(super) fn new(channel: Channel) -> Arc<Self> {
        let window = Arc::new(Self {
            channel,
            tags: Mutex::new(BTreeMap::new()),
            kick: Arc::new(tokio::sync::Notify::new()),
            closed: Arc::default(),
        });
        tokio::spawn(flush_acks(
            Arc::downgrade(&window),
            window.kick.clone(),
            window.closed.clone(),
        ));
        window
    }

    /// A delivery arrived on the channel (tags arrive in increasing order).
    pub(super) fn hold(&self, tag: u64) {
        self.tags.lock().insert(tag, Tag::Held);
    }

    pub(super) fn usable(&self) -> bool {
        self.channel.status().connected()
    }

    /// Marks the delivery finished and waits until an ack covering it is sent. `Ok(false)`:
    /// it was settled already, or its channel closed first (the broker redelivers it).
    pub(super) async fn ack(&self, tag: u64) -> lapin::Result<bool> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut tags = self.tags.lock();
            match tags.get_mut(&tag) {
                Some(t @ Tag::Held) => {
                    *t = Tag::Done {
                        since: Instant::now(),
                        sent: tx,
                    }
                }
                _ => return Ok(false),
            }
        }
        self.kick.notify_one();
        Ok(rx.await.unwrap_or(false))
    }

    /// Nacks the delivery alone (requeue: it returns to the queue and counts as a delivery).
    pub(super) async fn nack(&self, tag: u64) -> lapin::Result<bool> {
        {
            let mut tags = self.tags.lock();
            match tags.get_mut(&tag) {
                Some(t @ Tag::Held) => *t = Tag::Settling,
                _ => return Ok(false),
            }
        }
        let requeue = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        let result = self.channel.basic_nack(tag, requeue).await;
        // Only now may a multiple ack pass over it: its nack frame went out first.
        self.tags.lock().remove(&tag);
        self.kick.notify_one();
        result.map(|()| true)
    }

    /// [`AckWindow::nack`] for paths that cannot report a failure: a dead channel returns the
    /// delivery by itself.
    pub(super) async fn requeue(&self, tag: u64) {
        if let Err(e) = self.nack(tag).await {
            tracing::debug!(error = %e, "requeue failed: the channel is gone and the broker redelivers");
        }
    }

    /// One flush: takes what can be acked now. Returns (the run to ack with one frame, the
    /// finished deliveries behind a gap that waited long enough, when to look again).
    fn take_flushable(&self, now: Instant) -> (Finished, Finished, Option<Instant>) {
        let mut tags = self.tags.lock();
        let mut run = Vec::new();
        while let Some(entry) = tags.first_entry() {
            if !matches!(entry.get(), Tag::Done { .. }) {
                break;
            }
            if let (tag, Tag::Done { sent, .. }) = entry.remove_entry() {
                run.push((tag, sent));
            }
        }
        let mut alone = Vec::new();
        let mut next: Option<Instant> = None;
        let overdue: Vec<u64> = tags
            .iter()
            .filter_map(|(tag, t)| match t {
                Tag::Done { since, .. } if now.duration_since(*since) >= ACK_LINGER => Some(*tag),
                Tag::Done { since, .. } => {
                    let due = *since + ACK_LINGER;
                    next = Some(next.map_or(due, |n| n.min(due)));
                    None
                }
                _ => None,
            })
            .collect();
        for tag in overdue {
            if let Some(Tag::Done { sent, .. }) = tags.remove(&tag) {
                alone.push((tag, sent));
            }
        }
        (run, alone, next)
    }
}

impl Drop for AckWindow {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Relaxed);
        self.kick.notify_one();
    }
}

/// The window's flusher: one ack frame per contiguous run of finished deliveries. It yields
/// once before looking, so that pipelines finishing at the same moment join the frame (about
/// 40 deliveries a frame at full speed in `just bench rabbitmq`, 15 without the yield); acks
/// that arrive while a frame is being sent go in the next one.
async fn flush_acks(
    window: Weak<AckWindow>,
    kick: Arc<tokio::sync::Notify>,
    closed: Arc<AtomicBool>,
) {
    let mut next: Option<Instant> = None;
    loop {
        match next {
            Some(at) => {
                let _ = tokio::time::timeout_at(at.into(), kick.notified()).await;
            }
            None => kick.notified().await,
        }
        if closed.load(Ordering::Relaxed) {
            break;
        }
        // Let the pipelines that are finishing right now (they run on this runtime) join
        // this frame: more deliveries per ack, fewer frames for the broker.
        tokio::task::yield_now().await;
        let Some(window) = window.upgrade() else {
            break;
        };
        let (run, alone, due) = window.take_flushable(Instant::now());
        next = due;
        if let Some((last, _)) = run.last() {
            let multiple = run.len() > 1;
            let ok = window
                .channel
                .basic_ack(*last, BasicAckOptions { multiple })
                .await
                .map_err(|e| tracing::debug!(error = %e, "ack failed: the channel is gone and the broker redelivers"))
                .is_ok();
            for (_, sent) in run {
                let _ = sent.send(ok);
            }
        }
        for (tag, sent) in alone {
            let ok = window
                .channel
                .basic_ack(tag, BasicAckOptions::default())
                .await
                .is_ok();
            let _ = sent.send(ok);
        }
    }
}
