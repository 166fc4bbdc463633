//! A function: a name, a handler, its baked-in `sluice.toml`, and how it finds idempotency
//! keys and accepted schema versions. `main` is three lines over this builder.

use std::{any::Any, future::Future, marker::PhantomData, pin::Pin, process::ExitCode, sync::Arc};

use serde::de::DeserializeOwned;

use crate::{
    breaker::CircuitBreaker,
    config::Settings,
    error::{Error, Result},
    handler::Handler,
    ratelimit::RateLimiter,
    retry::RetryPolicy,
    store::{front::StoreFront, AnyStore},
    telemetry::Metrics,
    transport::AnyTransport,
    worker::{KeyFn, Runtime},
};

type StateInit<S> =
    Box<dyn FnOnce(Settings) -> Pin<Box<dyn Future<Output = anyhow::Result<S>> + Send>> + Send>;

/// A function definition.
pub struct Function<T, S, H> {
    pub(crate) name: String,
    pub(crate) handler: H,
    pub(crate) config_toml: Option<&'static str>,
    pub(crate) key_fn: Option<KeyFn<T>>,
    pub(crate) schema_versions: Vec<String>,
    pub(crate) init: Option<StateInit<S>>,
    /// Probe state, shared by the runtime and the `telemetry.listen` server (serve.rs).
    pub(crate) health: Arc<crate::serve::Health>,
    _t: PhantomData<fn() -> T>,
}

impl<T, S, H> Function<T, S, H>
where
    T: DeserializeOwned + Send + 'static,
    S: Send + Sync + 'static,
    H: for<'a> Handler<'a, T, S>,
{
    /// A function named `name` (also the default queue name) running `handler`.
    pub fn new(name: &str, handler: H) -> Self {
        Self {
            name: name.to_owned(),
            handler,
            config_toml: None,
            key_fn: None,
            schema_versions: Vec::new(),
            init: None,
            health: Arc::default(),
            _t: PhantomData,
        }
    }

    /// The function's `sluice.toml`, usually `include_str!("../sluice.toml")` so the binary
    /// carries it (Lambda has no files beside the binary). `--config FILE` replaces it.
    pub fn config(mut self, toml: &'static str) -> Self {
        self.config_toml = Some(toml);
        self
    }

    /// Derives the idempotency key from the input (used when no `idempotency-key` header).
    pub fn idempotency_key(mut self, f: impl Fn(&T) -> String + Send + Sync + 'static) -> Self {
        self.key_fn = Some(Arc::new(f));
        self
    }

    /// The `schema-version` header values this handler accepts; others are dead-lettered as
    /// permanent with a reason naming the version. A message without the header is taken as
    /// the first version listed.
    pub fn schema_versions(mut self, versions: &[&str]) -> Self {
        self.schema_versions = versions.iter().map(|v| v.to_string()).collect();
        self
    }

    /// Builds the shared state (clients, pools) once at start-up from the settings.
    pub fn state<F, Fut>(mut self, init: F) -> Self
    where
        F: FnOnce(Settings) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<S>> + Send + 'static,
    {
        self.init = Some(Box::new(move |s| Box::pin(init(s))));
        self
    }

    /// The function's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Parses the command line and runs the chosen command; returns the process exit code.
    /// Under a Lambda runtime (`AWS_LAMBDA_RUNTIME_API` set, feature `lambda`) it serves SQS
    /// events instead.
    pub fn main(self) -> ExitCode {
        #[cfg(feature = "lambda")]
        if crate::lambda::in_lambda() {
            return crate::lambda::main(self);
        }
        crate::cli::main(self)
    }

    /// Loads settings with the given layers.
    pub fn load_settings(
        &self,
        config_file: Option<&str>,
        overrides: &[String],
    ) -> Result<Settings> {
        Settings::load(
            &self.name,
            config_file.or(self.config_toml),
            std::env::vars(),
            overrides,
        )
    }

    /// Builds the runtime: opens the transport and the store, builds the state.
    pub async fn build(self, settings: Settings) -> Result<Runtime<T, S, H>> {
        let state = match self.init {
            Some(init) => init(settings.clone()).await.map_err(|e| {
                // A settings error from `Settings::app` already names its key.
                match e.downcast::<Error>() {
                    Ok(Error::Config(msg)) => Error::Config(msg),
                    Ok(other) => Error::Config(format!("{} start-up: {other}", self.name)),
                    Err(e) => Error::Config(format!("{} start-up: {e:#}", self.name)),
                }
            })?,
            None => *(Box::new(()) as Box<dyn Any>)
                .downcast::<S>()
                .map_err(|_| {
                    Error::Config(format!(
                        "function {} has a state type but no .state(...) initializer",
                        self.name
                    ))
                })?,
        };
        let transport = AnyTransport::open(&self.name, &settings).await?;
        let store = AnyStore::open(&settings).await?.map(|s| {
            StoreFront::new(
                s,
                settings.store.cache_entries,
                settings.store.ttl,
                settings.store.timeout,
            )
        });
        Ok(Runtime {
            function: self.name,
            policy: RetryPolicy::new(settings.retry.clone()),
            breaker: CircuitBreaker::new(settings.breaker.clone()),
            limiter: RateLimiter::new(&settings.rate_limit),
            settings,
            transport,
            store,
            handler: self.handler,
            state: Arc::new(state),
            key_fn: self.key_fn,
            schema_versions: self.schema_versions,
            metrics: Metrics::default(),
            health: self.health,
            _input: PhantomData,
        })
    }
}
