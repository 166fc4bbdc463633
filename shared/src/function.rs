//! A function: a name, a handler, its baked-in `sluice.toml`, and how it finds idempotency
//! keys and accepted schema versions. `main` (in `app.rs`) is three lines over this builder.
//!
//! The builder is generic over the handler; `Function::into_definition` erases it once
//! (`job.rs`), so everything after it (CLI, Lambda mode, worker, probes) is plain code.

use std::{any::Any, future::Future, marker::PhantomData, pin::Pin, sync::Arc};

use serde::de::DeserializeOwned;

use crate::{
    config::Settings,
    error::{Error, Result},
    handler::Handler,
    job::{Bound, Job, KeyFn},
    store::front::StoreFront,
    telemetry::health::Health,
    transport::{AnyTransport, Purpose},
    worker::{self, Runtime},
};

type StateInit<S> =
    Box<dyn FnOnce(Settings) -> Pin<Box<dyn Future<Output = anyhow::Result<S>> + Send>> + Send>;

/// Builds the job from the settings: runs the function's state initializer.
type Binder =
    Box<dyn FnOnce(Settings) -> Pin<Box<dyn Future<Output = Result<Arc<dyn Job>>> + Send>> + Send>;

/// A function definition.
///
/// ```no_run
/// use serde::{Deserialize, Serialize};
/// use sluice::{Context, Function, HandlerError};
///
/// #[derive(Deserialize)]
/// struct Order { id: String, total_cents: u64 }
///
/// #[derive(Serialize)]
/// struct Accepted { id: String }
///
/// async fn accept(order: Order, _ctx: &Context) -> Result<Accepted, HandlerError> {
///     if order.total_cents == 0 {
///         return Err(HandlerError::permanent("an order of nothing"));
///     }
///     Ok(Accepted { id: order.id })
/// }
///
/// fn main() -> std::process::ExitCode {
///     Function::new("accept-order", accept)
///         .idempotency_key(|o: &Order| o.id.clone())
///         .schema_versions(&["1"])
///         .main()
/// }
/// ```
pub struct Function<T, S, H> {
    name: String,
    handler: H,
    config_toml: Option<&'static str>,
    key_fn: Option<KeyFn<T>>,
    schema_versions: Vec<String>,
    version: &'static str,
    init: Option<StateInit<S>>,
    _t: PhantomData<fn() -> T>,
}

/// A function with its handler erased: what the CLI and Lambda mode run.
pub(crate) struct Definition {
    pub(crate) name: String,
    pub(crate) config_toml: Option<&'static str>,
    pub(crate) schema_versions: Vec<String>,
    /// The function's version: the default of `telemetry.version`.
    pub(crate) version: &'static str,
    /// Probe state, shared by the worker and the `telemetry.listen` server.
    pub(crate) health: Arc<Health>,
    bind: Binder,
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
            version: env!("CARGO_PKG_VERSION"),
            init: None,
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

    /// The function's version, usually `env!("CARGO_PKG_VERSION")` of its own crate: the
    /// `version` label of its metrics unless `telemetry.version` says otherwise. Without it,
    /// Sluice's own version is used.
    pub fn version(mut self, version: &'static str) -> Self {
        self.version = version;
        self
    }

    /// Builds the shared state (clients, pools) from the settings, once, before the first
    /// message (`run`, `invoke` and Lambda mode only: the other commands do not run it).
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

    /// Builds the worker in this process: runs the state initializer, opens the transport
    /// (creating missing queues when `transport.declare` is on) and the idempotency store.
    /// What `run` does before its intake loop; for tests and benchmarks.
    pub async fn build(self, settings: Settings) -> Result<Runtime> {
        self.into_definition().open(settings).await
    }

    /// Erases the handler's types: what the CLI and Lambda mode run.
    pub(crate) fn into_definition(self) -> Definition {
        let name = self.name.clone();
        let (handler, key_fn, init) = (self.handler, self.key_fn, self.init);
        let bind: Binder = Box::new(move |settings| {
            Box::pin(async move {
                let state = match init {
                    Some(init) => init(settings).await.map_err(|e| {
                        // A settings error from `Settings::app` already names its key.
                        match e.downcast::<Error>() {
                            Ok(Error::Config(msg)) => Error::Config(msg),
                            Ok(other) => {
                                Error::Config(format!("{name} start-up: {}", other.report()))
                            }
                            Err(e) => Error::Config(format!("{name} start-up: {e:#}")),
                        }
                    })?,
                    None => *(Box::new(()) as Box<dyn Any>)
                        .downcast::<S>()
                        .map_err(|_| {
                            Error::Config(format!(
                                "function {name} has a state type but no .state(...) initializer"
                            ))
                        })?,
                };
                let job: Arc<dyn Job> = Arc::new(Bound {
                    handler,
                    state: Arc::new(state),
                    key_fn,
                });
                Ok(job)
            })
        });
        Definition {
            name: self.name,
            config_toml: self.config_toml,
            schema_versions: self.schema_versions,
            version: self.version,
            health: Arc::default(),
            bind,
        }
    }
}

impl Definition {
    /// Loads settings with the given layers: the baked-in (or `--config`) file, the
    /// environment, then `--set` overrides.
    pub(crate) fn load_settings(
        &self,
        config_file: Option<&str>,
        overrides: &[String],
    ) -> Result<Settings> {
        let mut settings = Settings::load(
            &self.name,
            config_file.or(self.config_toml),
            std::env::vars(),
            overrides,
        )?;
        self.resolve_version(&mut settings);
        Ok(settings)
    }

    /// An empty `telemetry.version` becomes the version this process runs: Lambda's own
    /// version number in Lambda mode (what the alias and CodeDeploy shift between), else the
    /// function's.
    fn resolve_version(&self, settings: &mut Settings) {
        if !settings.telemetry.version.is_empty() {
            return;
        }
        // Lambda sets this variable in every execution environment, and nothing else does.
        #[cfg(feature = "lambda")]
        if let Some(v) = std::env::var("AWS_LAMBDA_FUNCTION_VERSION")
            .ok()
            .filter(|v| !v.is_empty())
        {
            settings.telemetry.version = v;
            return;
        }
        settings.telemetry.version = self.version.to_owned();
    }

    /// Runs the state initializer and binds the handler to its state.
    pub(crate) async fn bind(self, settings: Settings) -> Result<(DefinitionParts, Arc<dyn Job>)> {
        let job = (self.bind)(settings).await?;
        Ok((
            DefinitionParts {
                name: self.name,
                schema_versions: self.schema_versions,
                health: self.health,
            },
            job,
        ))
    }
}

impl Definition {
    /// What `run` opens: the state initializer, the transport for work, the store.
    pub(crate) async fn open(self, settings: Settings) -> Result<Runtime> {
        self.open_as(settings, Purpose::Work).await
    }

    /// What Lambda mode opens: the same, but the trigger's queue is never created (the
    /// deployment made it) nor looked up before it is needed (docs/lambda.md, cold start).
    #[cfg(feature = "lambda")]
    pub(crate) async fn open_for_lambda(self, settings: Settings) -> Result<Runtime> {
        self.open_as(settings, Purpose::Lambda).await
    }

    async fn open_as(self, mut settings: Settings, purpose: Purpose) -> Result<Runtime> {
        // Settings made by hand (`Function::build` in tests and benchmarks) come here without
        // `load_settings`.
        self.resolve_version(&mut settings);
        let (parts, job) = self.bind(settings.clone()).await?;
        let transport = AnyTransport::open(&parts.name, &settings, purpose).await?;
        let store = StoreFront::open(&settings).await?;
        Ok(Runtime::new(worker::Parts {
            function: parts.name,
            schema_versions: parts.schema_versions,
            health: parts.health,
            settings,
            transport,
            store,
            job,
        }))
    }
}

/// What is left of a definition once its job is bound.
pub(crate) struct DefinitionParts {
    pub(crate) name: String,
    pub(crate) schema_versions: Vec<String>,
    pub(crate) health: Arc<Health>,
}
