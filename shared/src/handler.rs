//! What a function author writes against: a plain `async fn(input, &Context) -> Result<O, HandlerError>`.

use std::{
    fmt,
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{message::Headers, workflow::Workflow};

/// How the runtime should treat a failure. The retry path reads this, never the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Worth retrying with backoff (timeouts, 5xx, connection resets).
    Transient,
    /// Retrying cannot help (validation, business rejection): dead-letter at once.
    Permanent,
    /// The handler knows when to come back (a 429 with `Retry-After`).
    RetryAfter(Duration),
}

/// A handler failure with its class: the class decides what the runtime does (retry with
/// backoff, dead-letter at once, or come back after a given time); the text goes to the logs
/// and the dead-letter history.
///
/// ```
/// use std::time::Duration;
/// use sluice::{ErrorKind, HandlerError};
///
/// /// What a downstream's HTTP status means for the message.
/// fn classify(status: u16, retry_after: Option<Duration>) -> Result<(), HandlerError> {
///     match status {
///         200..=299 => Ok(()),
///         // The downstream paces us: come back exactly then (no backoff, breaker untouched).
///         429 => Err(HandlerError::retry_after(
///             retry_after.unwrap_or(Duration::from_secs(30)),
///             "rate limited",
///         )),
///         // Retrying the same input cannot help: dead-lettered at once.
///         400..=499 => Err(HandlerError::permanent(format!("rejected with {status}"))),
///         // Worth retrying with backoff; dead-lettered once retry.max_deliveries are used.
///         _ => Err(HandlerError::transient(format!("downstream answered {status}"))),
///     }
/// }
///
/// assert_eq!(classify(503, None).unwrap_err().kind, ErrorKind::Transient);
/// assert_eq!(classify(404, None).unwrap_err().kind, ErrorKind::Permanent);
/// assert_eq!(
///     classify(429, Some(Duration::from_secs(5))).unwrap_err().kind,
///     ErrorKind::RetryAfter(Duration::from_secs(5))
/// );
/// ```
#[derive(Debug, Clone)]
pub struct HandlerError {
    /// The class.
    pub kind: ErrorKind,
    /// What went wrong, for logs and the dead-letter history.
    pub message: String,
}

impl HandlerError {
    /// A failure worth retrying.
    pub fn transient(message: impl fmt::Display) -> Self {
        Self {
            kind: ErrorKind::Transient,
            message: message.to_string(),
        }
    }

    /// A failure that retrying cannot fix.
    pub fn permanent(message: impl fmt::Display) -> Self {
        Self {
            kind: ErrorKind::Permanent,
            message: message.to_string(),
        }
    }

    /// Come back after `delay`.
    pub fn retry_after(delay: Duration, message: impl fmt::Display) -> Self {
        Self {
            kind: ErrorKind::RetryAfter(delay),
            message: message.to_string(),
        }
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ErrorKind::Transient => write!(f, "transient: {}", self.message),
            ErrorKind::Permanent => write!(f, "permanent: {}", self.message),
            ErrorKind::RetryAfter(d) => write!(f, "retry after {d:?}: {}", self.message),
        }
    }
}

impl std::error::Error for HandlerError {}

/// What a handler knows about the message it is working on, and the function's shared state
/// (clients built once at start-up, borrowed by every call).
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use sluice::{Context, HandlerError};
///
/// /// Built once by `Function::state`, shared by every call.
/// struct Mailer {
///     sent: std::sync::Mutex<Vec<String>>,
/// }
///
/// #[derive(Deserialize)]
/// struct Welcome { user: String }
///
/// #[derive(Serialize)]
/// struct Sent { key: String }
///
/// async fn welcome(input: Welcome, ctx: &Context<Mailer>) -> Result<Sent, HandlerError> {
///     if ctx.is_cancelled() {
///         // The lease was lost or shutdown ran out of grace: stop, the message comes back.
///         return Err(HandlerError::transient("cancelled"));
///     }
///     // The idempotency key is the downstream's too: a redelivery cannot send twice there.
///     let key = ctx.idempotency_key().to_owned();
///     ctx.state().sent.lock().unwrap().push(format!("{key}: welcome {}", input.user));
///     Ok(Sent { key })
/// }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let mailer = std::sync::Arc::new(Mailer { sent: Default::default() });
/// let ctx = Context::detached("m-1", mailer.clone()).with_idempotency_key("welcome:ada");
/// let sent = welcome(Welcome { user: "ada".into() }, &ctx).await.unwrap();
/// assert_eq!(sent.key, "welcome:ada");
/// assert_eq!(mailer.sent.lock().unwrap().len(), 1);
/// # });
/// ```
pub struct Context<S = ()> {
    pub(crate) message_id: String,
    pub(crate) attempt: u32,
    pub(crate) headers: Headers,
    pub(crate) deadline: Instant,
    pub(crate) idempotency_key: String,
    pub(crate) cancel: CancellationToken,
    pub(crate) state: Arc<S>,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) effects: Effects,
    pub(crate) workflow: Option<Arc<Workflow>>,
}

/// The message's effects transaction on the idempotency store's database: opened by the
/// handler on first use (`Context::postgres`), committed by the runtime together with the
/// record's completion, rolled back on any failure. Empty unless `store.kind = "postgres"`.
#[derive(Clone, Default)]
pub(crate) struct Effects {
    #[cfg(feature = "postgres")]
    pub(crate) pg: Option<PgEffectsCell>,
}

/// The store to begin on, and the transaction once begun.
#[cfg(feature = "postgres")]
pub(crate) type PgEffectsCell = (
    crate::store::postgres::PostgresStore,
    Arc<tokio::sync::Mutex<Option<crate::store::postgres::PgEffects>>>,
);

impl Effects {
    /// Takes the open transaction, if the handler began one.
    #[cfg(feature = "postgres")]
    pub(crate) async fn take(&self) -> Option<crate::store::postgres::PgEffects> {
        match &self.pg {
            Some((_, slot)) => slot.lock().await.take(),
            None => None,
        }
    }

    /// Rolls back what a failed try did, so the next try (or delivery) starts clean.
    pub(crate) async fn rollback(&self) {
        #[cfg(feature = "postgres")]
        if let Some(tx) = self.take().await {
            if let Err(e) = tx.rollback().await {
                // The connection is discarded instead; the server aborts the transaction.
                tracing::warn!(error = %e, "rolling back the effects transaction failed");
            }
        }
    }
}

impl<S> Context<S> {
    /// Transport id of the message.
    pub fn message_id(&self) -> &str {
        &self.message_id
    }

    /// Delivery number, 1 on the first delivery.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Producer headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// One header by (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// When the handler timeout fires.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Time left before the deadline.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// The W3C trace context of this delivery's `process` span, while spans are exported
    /// (feature `otlp`; else `None`): pass it to downstreams as `traceparent` and
    /// `tracestate`. A message the handler publishes through an
    /// [`AnyTransport`](crate::transport::AnyTransport) gets it as its creation context by
    /// itself.
    pub fn trace_context(&self) -> Option<crate::envelope::TraceContext> {
        crate::telemetry::trace::context_of(&tracing::Span::current())
    }

    /// The idempotency key of this message; pass it to downstreams that accept one.
    pub fn idempotency_key(&self) -> &str {
        &self.idempotency_key
    }

    /// Fires when the lease is lost or shutdown is past its grace period: stop and return.
    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    /// Whether [`Context::cancelled`] has fired.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// The function's shared state.
    pub fn state(&self) -> &S {
        &self.state
    }

    /// The workflow this message is a step (or a compensation) of, when it carries a routing
    /// slip: its tracking id, this step's arguments, the variables, and in a compensation the
    /// data the step logged (`crate::workflow` has an example).
    pub fn workflow(&self) -> Option<&Workflow> {
        self.workflow.as_deref()
    }

    /// A transaction on the PostgreSQL idempotency store's database for this message's
    /// effects: run your statements on `ctx.postgres().await?.client()`. The runtime commits
    /// them in the same transaction that completes the idempotency record, or rolls them back
    /// if the handler fails or another worker has taken the record over: the effects happen
    /// exactly once. Needs `store.kind = "postgres"` (a permanent error otherwise). Never run
    /// `BEGIN`, `COMMIT` or `ROLLBACK` yourself.
    #[cfg(feature = "postgres")]
    pub async fn postgres(
        &self,
    ) -> Result<tokio::sync::MappedMutexGuard<'_, crate::store::postgres::PgEffects>, HandlerError>
    {
        let Some((store, slot)) = &self.effects.pg else {
            return Err(HandlerError::permanent(
                "ctx.postgres() needs the PostgreSQL idempotency store (store.kind = \"postgres\")",
            ));
        };
        let mut open = slot.lock().await;
        if open.is_none() {
            let tx = store.begin_effects().await.map_err(|e| {
                HandlerError::transient(format!("cannot begin the effects transaction: {e}"))
            })?;
            *open = Some(tx);
        }
        Ok(tokio::sync::MutexGuard::map(open, |tx| {
            tx.as_mut().expect("begun above")
        }))
    }
}

impl Context<()> {
    /// A context for calling a handler directly (unit tests of a function, `invoke`).
    pub fn for_test(message_id: &str) -> Self {
        Self::detached(message_id, Arc::new(()))
    }
}

impl<S> Context<S> {
    /// A context outside any queue, with the given state.
    pub fn detached(message_id: &str, state: Arc<S>) -> Self {
        Context {
            message_id: message_id.to_owned(),
            attempt: 1,
            headers: Headers::new(),
            deadline: Instant::now() + Duration::from_secs(60),
            idempotency_key: message_id.to_owned(),
            cancel: CancellationToken::new(),
            state,
            effects: Effects::default(),
            workflow: None,
        }
    }
}

impl<S> Context<S> {
    /// Sets the idempotency key (tests, `invoke`).
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = key.into();
        self
    }

    /// Makes the call a step of the workflow on `slip` (tests of a step's handler).
    pub fn with_slip(mut self, slip: crate::workflow::Slip) -> Self {
        self.workflow = Some(Arc::new(Workflow::new(slip)));
        self
    }

    /// Sets the delivery number (tests).
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }

    /// Adds a header (tests).
    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.insert(name.to_ascii_lowercase(), value.into());
        self
    }
}

/// A handler: implemented for every `async fn(T, &Context<S>) -> Result<O, HandlerError>`.
///
/// The lifetime parameter lets the returned future borrow the context, so handlers are
/// plain `async fn`s; the `Send` bound lets the runtime run messages on all cores.
pub trait Handler<'a, T, S>: Send + Sync + 'static {
    /// The output, stored by the idempotency record and replayed for duplicates.
    type Output: Serialize + Send + 'static;
    /// The future the call returns.
    type Future: Future<Output = Result<Self::Output, HandlerError>> + Send + 'a;
    /// Calls the handler.
    fn call(&self, input: T, ctx: &'a Context<S>) -> Self::Future;
}

impl<'a, T, S, O, F, Fut> Handler<'a, T, S> for F
where
    F: Fn(T, &'a Context<S>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, HandlerError>> + Send + 'a,
    O: Serialize + Send + 'static,
    S: 'a,
{
    type Output = O;
    type Future = Fut;

    fn call(&self, input: T, ctx: &'a Context<S>) -> Fut {
        self(input, ctx)
    }
}
