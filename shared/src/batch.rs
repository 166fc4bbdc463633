//! Requests that wait together go out together: one task takes every request waiting at that
//! moment (up to a maximum) and answers each. Under load batches fill while the previous one
//! is in flight; an idle caller's request goes alone at once, so batching adds no latency.
//! Used for SQS acks (`DeleteMessageBatch`) and idempotency claims (`claim_many`).

use std::future::Future;

use tokio::sync::{mpsc, oneshot};

type Waiting<Req, Resp> = (Req, oneshot::Sender<Resp>);

/// The sending side of a batching task; cheap to share behind an `Arc`.
pub struct Batcher<Req, Resp> {
    tx: mpsc::UnboundedSender<Waiting<Req, Resp>>,
}

impl<Req: Send + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
    /// Starts the task (needs a tokio runtime). `send` gets the requests waiting, at most
    /// `max`, and returns one answer per request in the same order; a missing answer makes
    /// that caller's [`Batcher::call`] return `None`. The task ends when the batcher is dropped.
    pub fn spawn<F, Fut>(max: usize, mut send: F) -> Self
    where
        F: FnMut(Vec<Req>) -> Fut + Send + 'static,
        Fut: Future<Output = Vec<Resp>> + Send,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<Waiting<Req, Resp>>();
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < max.max(1) {
                    match rx.try_recv() {
                        Ok(w) => batch.push(w),
                        Err(_) => break,
                    }
                }
                let (reqs, replies): (Vec<Req>, Vec<oneshot::Sender<Resp>>) =
                    batch.into_iter().unzip();
                let answers = send(reqs).await;
                for (reply, answer) in replies.into_iter().zip(answers) {
                    let _ = reply.send(answer);
                }
            }
        });
        Self { tx }
    }

    /// Queues `req` and waits for its answer; `None` once the task has stopped or gave no
    /// answer for it.
    pub async fn call(&self, req: Req) -> Option<Resp> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((req, reply)).ok()?;
        answer.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::sync::Mutex;

    #[tokio::test]
    async fn waiting_requests_share_a_call_and_each_gets_its_own_answer() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = sizes.clone();
        let b = Arc::new(Batcher::spawn(3, move |reqs: Vec<u32>| {
            seen.lock().push(reqs.len());
            async move { reqs.into_iter().map(|r| r * 10).collect::<Vec<_>>() }
        }));
        // Five callers queue before the task runs (current-thread runtime): 3 + 2.
        let calls: Vec<_> = (1..=5)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { b.call(i).await })
            })
            .collect();
        let mut answers = Vec::new();
        for c in calls {
            answers.push(c.await.unwrap());
        }
        assert_eq!(
            answers,
            vec![Some(10), Some(20), Some(30), Some(40), Some(50)]
        );
        assert_eq!(*sizes.lock(), vec![3, 2]);
    }

    #[tokio::test]
    async fn a_missing_answer_is_none() {
        let b = Batcher::spawn(10, |_reqs: Vec<u32>| async { Vec::<u32>::new() });
        assert_eq!(b.call(1).await, None);
    }
}
