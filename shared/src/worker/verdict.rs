//! What the pipeline decides for one delivery: exactly one broker call follows.

use std::time::Duration;

use crate::envelope::{Failure, FailureClass};

/// What the pipeline decided for one delivery.
#[derive(Debug)]
pub(super) enum Verdict {
    /// Done (or a duplicate of something done): remove it.
    Ack { duplicate: bool },
    /// Deliver again later; `paced`: because the handler asked for this delay (`RetryAfter`),
    /// not because something failed (the `error_class` of the metrics).
    Retry {
        delay: Duration,
        failure: Failure,
        paced: bool,
    },
    /// Give up on it, with the reason; `label` groups reasons in metrics.
    DeadLetter {
        failure: Failure,
        label: &'static str,
    },
    /// Shutdown past grace: put it back now.
    Release,
    /// Our lease is gone; the message belongs to another consumer now.
    Abandon,
}

/// A dead-letter verdict: the failure now, with its class, metrics label and reason.
pub(super) fn dead_letter(
    class: FailureClass,
    label: &'static str,
    reason: impl Into<String>,
) -> Verdict {
    Verdict::DeadLetter {
        failure: Failure::now(class, reason),
        label,
    }
}

impl Verdict {
    /// A retry the handler asked for (`RetryAfter`); anything else unchanged.
    pub(super) fn paced(self) -> Self {
        match self {
            Verdict::Retry { delay, failure, .. } => Verdict::Retry {
                delay,
                failure,
                paced: true,
            },
            other => other,
        }
    }
}
