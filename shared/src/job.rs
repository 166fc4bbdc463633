//! The handler with its types erased, once, where the function is built: the worker, the CLI
//! and Lambda mode call a [`Job`] and never carry the handler's type parameters.
//!
//! Each delivery costs two boxes here (the decoded input, the call's future): tens of
//! nanoseconds against a pipeline of microseconds, for one non-generic runtime.

use std::{any::Any, future::Future, pin::Pin, sync::Arc, time::Instant};

use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::{
    handler::{Context, Effects, Handler, HandlerError},
    message::{Headers, Rejection},
};

/// A decoded input, of the handler's own type.
pub(crate) type Input = Box<dyn Any + Send>;

/// The future of one handler call: the serialized output, or the handler's error.
pub(crate) type Call<'a> = Pin<Box<dyn Future<Output = Result<Vec<u8>, HandlerError>> + Send + 'a>>;

/// Derives the idempotency key from a decoded input.
pub(crate) type KeyFn<T> = Arc<dyn Fn(&T) -> String + Send + Sync>;

/// What one call knows about its message.
pub(crate) struct CallInfo {
    pub(crate) message_id: String,
    pub(crate) attempt: u32,
    pub(crate) headers: Headers,
    pub(crate) deadline: Instant,
    pub(crate) idempotency_key: String,
    pub(crate) cancel: CancellationToken,
    pub(crate) effects: Effects,
    pub(crate) workflow: Option<Arc<crate::workflow::Workflow>>,
}

/// A handler bound to its state.
pub(crate) trait Job: Send + Sync + 'static {
    /// The body as the handler's input (UTF-8 JSON of its type).
    fn decode(&self, body: &[u8]) -> Result<Input, Rejection>;
    /// The key derived from the input, if the function derives one.
    fn key(&self, input: &Input) -> Option<String>;
    /// Calls the handler; the output is serialized.
    fn call(&self, input: Input, info: CallInfo) -> Call<'_>;
}

/// The handler, its state and its key derivation.
pub(crate) struct Bound<T, S, H> {
    pub(crate) handler: H,
    pub(crate) state: Arc<S>,
    pub(crate) key_fn: Option<KeyFn<T>>,
}

/// A body as JSON of type `T`; on failure the label (for metrics) and the reason.
pub(crate) fn decode_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, Rejection> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ("invalid UTF-8", format!("body is not UTF-8: {e}")))?;
    serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            (
                "invalid input",
                format!("body does not match the input schema: {e}"),
            )
        } else {
            ("malformed JSON", format!("body is not JSON: {e}"))
        }
    })
}

impl<T, S, H> Job for Bound<T, S, H>
where
    T: DeserializeOwned + Send + 'static,
    S: Send + Sync + 'static,
    H: for<'a> Handler<'a, T, S>,
{
    fn decode(&self, body: &[u8]) -> Result<Input, Rejection> {
        decode_json::<T>(body).map(|t| Box::new(t) as Input)
    }

    fn key(&self, input: &Input) -> Option<String> {
        let f = self.key_fn.as_ref()?;
        input.downcast_ref::<T>().map(|t| f(t))
    }

    fn call(&self, input: Input, info: CallInfo) -> Call<'_> {
        Box::pin(async move {
            let input = *input
                .downcast::<T>()
                .map_err(|_| HandlerError::permanent("input decoded for another handler"))?;
            let ctx = Context {
                message_id: info.message_id,
                attempt: info.attempt,
                headers: info.headers,
                deadline: info.deadline,
                idempotency_key: info.idempotency_key,
                cancel: info.cancel,
                state: self.state.clone(),
                effects: info.effects,
                workflow: info.workflow,
            };
            let out = self.handler.call(input, &ctx).await?;
            serde_json::to_vec(&out).map_err(|e| {
                HandlerError::permanent(format!("handler output does not serialize: {e}"))
            })
        })
    }
}
