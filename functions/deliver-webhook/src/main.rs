//! Delivers webhooks: POSTs a signed JSON event to a subscriber's URL, and lets the Sluice
//! runtime retry, back off and dead-letter according to how the subscriber answered.
//!
//! Run with
//!
//! ```text
//! cargo run -p deliver-webhook -- send '{"url": "https://httpbin.org/post", "event": "order.paid", "payload": {"order": 42}}'
//! cargo run -p deliver-webhook -- run --drain
//! cargo run -p deliver-webhook -- dlq list    # what could not be delivered, and why
//! # One call, no queue: prints the output, or the classified error (here: nothing listens,
//! # so a transient connection error).
//! cargo run -p deliver-webhook -- invoke '{"url": "http://127.0.0.1:9/", "event": "ping", "payload": null}'
//! ```
//!
//! The subscriber receives `{"id", "event", "payload"}` with the headers `x-sluice-event`,
//! `x-sluice-delivery` (the idempotency key: the same on every retry, so it can drop
//! duplicates) and `x-sluice-signature: sha256=<hex HMAC of the body>` keyed with `[app] secret`.

use std::time::Duration;

use hmac::{Hmac, Mac};
use reqwest::{header::HeaderMap, redirect, StatusCode, Url};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sluice::{Context, HandlerError, Settings};

fn main() -> std::process::ExitCode {
    sluice::Function::new("deliver-webhook", deliver)
        .config(include_str!("../sluice.toml"))
        .version(env!("CARGO_PKG_VERSION"))
        .idempotency_key(delivery_key)
        .state(init)
        .main()
}

/// One webhook to deliver, as producers enqueue it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Webhook {
    url: String,
    event: String,
    payload: serde_json::Value,
    /// The producer's delivery id, if it has one; otherwise one is derived from the content.
    id: Option<String>,
}

/// What a successful delivery records (and replays to duplicates).
#[derive(Debug, Serialize)]
struct Delivered {
    status: u16,
    attempt: u32,
}

/// The body the subscriber receives; its exact bytes are what gets signed.
#[derive(Serialize)]
struct Envelope<'a> {
    id: &'a str,
    event: &'a str,
    payload: &'a serde_json::Value,
}

/// The `[app]` section of the settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppConfig {
    /// The signing secret. Production sets it with `SLUICE__APP__SECRET`.
    secret: String,
    /// Timeout of one HTTP request, connect to last byte.
    #[serde(with = "humantime_serde", default = "default_timeout")]
    timeout: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

type HmacSha256 = Hmac<Sha256>;

/// Built once at start-up and borrowed by every call, so connections are pooled and the
/// secret is keyed once.
struct State {
    client: reqwest::Client,
    mac: HmacSha256,
}

async fn init(settings: Settings) -> anyhow::Result<State> {
    let app: AppConfig = settings.app()?;
    anyhow::ensure!(
        !app.secret.is_empty(),
        "key `app.secret`: must not be empty (set SLUICE__APP__SECRET)"
    );
    let client = reqwest::Client::builder()
        .timeout(app.timeout)
        // A 301/302 would turn our POST into a bodiless GET; a subscriber that moved must
        // update its URL, so a redirect is reported (as permanent) rather than followed.
        .redirect(redirect::Policy::none())
        .build()?;
    let mac = HmacSha256::new_from_slice(app.secret.as_bytes())?;
    Ok(State { client, mac })
}

/// The producer's `id`, else a hash of the content: enqueueing the same event twice then
/// delivers it once (the runtime's idempotency record skips the duplicate).
fn delivery_key(w: &Webhook) -> String {
    w.id.clone().unwrap_or_else(|| {
        // A JSON array keeps the fields apart ("ab"+"c" and "a"+"bc" differ); serde_json
        // sorts object keys, so the same payload hashes the same whatever its key order.
        let content = serde_json::to_vec(&(&w.url, &w.event, &w.payload)).expect("JSON values");
        hex::encode(Sha256::digest(content))
    })
}

async fn deliver(input: Webhook, ctx: &Context<State>) -> Result<Delivered, HandlerError> {
    let url = Url::parse(&input.url)
        .map_err(|e| HandlerError::permanent(format!("url is not a valid URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(HandlerError::permanent(format!(
            "url scheme {:?} is not http or https",
            url.scheme()
        )));
    }

    let body = serde_json::to_vec(&Envelope {
        id: ctx.idempotency_key(),
        event: &input.event,
        payload: &input.payload,
    })
    .map_err(|e| HandlerError::permanent(format!("payload does not serialize: {e}")))?;
    let mut mac = ctx.state().mac.clone();
    mac.update(&body);
    let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));

    let response = ctx
        .state()
        .client
        .post(url)
        .header("content-type", "application/json")
        .header("x-sluice-event", &input.event)
        .header("x-sluice-delivery", ctx.idempotency_key())
        .header("x-sluice-signature", signature)
        .body(body)
        .send()
        .await
        // Connection refused, reset, DNS, timeout: the subscriber may be back soon. These
        // also count towards the circuit breaker, which wraps this whole function (see
        // `[breaker]` in sluice.toml). `without_url`: webhook URLs often carry tokens.
        .map_err(|e| {
            HandlerError::transient(format!("{:#}", anyhow::Error::from(e.without_url())))
        })?;

    let status = response.status();
    if status.is_success() {
        return Ok(Delivered {
            status: status.as_u16(),
            attempt: ctx.attempt(),
        });
    }
    Err(classify(status, response.headers()))
}

/// How a non-2xx answer is retried. The runtime reads the class, never the text.
fn classify(status: StatusCode, headers: &HeaderMap) -> HandlerError {
    let reason = format!("subscriber answered {status}");
    if status == StatusCode::TOO_MANY_REQUESTS {
        // Come back when the subscriber asked; a long wait goes back to the broker instead of
        // holding a worker slot. Without a (seconds) Retry-After, ordinary backoff applies.
        return match retry_after_secs(headers) {
            Some(delay) => HandlerError::retry_after(delay, reason),
            None => HandlerError::transient(reason),
        };
    }
    if status.is_server_error() {
        return HandlerError::transient(reason);
    }
    // Other 4xx (and 3xx): the subscriber rejected this request as it is; sending it again
    // cannot help. It is dead-lettered and can be redriven once the subscriber is fixed.
    HandlerError::permanent(reason)
}

/// `Retry-After: <seconds>`. The HTTP-date form is rare for webhooks and falls back to backoff.
fn retry_after_secs(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::Arc, time::Instant};

    use sluice::ErrorKind;
    use tokio::{
        io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
        net::TcpListener,
        sync::mpsc,
    };

    use super::*;

    const SECRET: &str = "test-secret";

    /// One request as the test server received it.
    struct Received {
        request_line: String,
        headers: HashMap<String, String>,
        body: Vec<u8>,
    }

    /// A local HTTP/1.1 server: answers every request with `reply` (a status line and
    /// headers, e.g. "429 Too Many Requests\r\nretry-after: 7"), or never answers when
    /// `reply` is None. Returns its URL and the requests it received, in order.
    async fn serve(reply: Option<&'static str>) -> (String, mpsc::UnboundedReceiver<Received>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut stream = BufReader::new(stream);
                    let mut request_line = String::new();
                    stream.read_line(&mut request_line).await.unwrap();
                    let mut headers = HashMap::new();
                    loop {
                        let mut line = String::new();
                        stream.read_line(&mut line).await.unwrap();
                        let Some((name, value)) = line.trim_end().split_once(':') else {
                            break; // the blank line that ends the headers
                        };
                        headers.insert(name.to_ascii_lowercase(), value.trim().to_owned());
                    }
                    let length = headers
                        .get("content-length")
                        .map_or(0, |l| l.parse().unwrap());
                    let mut body = vec![0; length];
                    stream.read_exact(&mut body).await.unwrap();
                    let request_line = request_line.trim_end().to_owned();
                    tx.send(Received {
                        request_line,
                        headers,
                        body,
                    })
                    .unwrap();
                    match reply {
                        Some(reply) => {
                            let response = format!(
                                "HTTP/1.1 {reply}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                            );
                            stream.write_all(response.as_bytes()).await.unwrap();
                        }
                        // Hold the connection open, silent, until the test ends.
                        None => std::future::pending().await,
                    }
                });
            }
        });
        (url, rx)
    }

    /// The state the real initializer builds from an `[app]` section.
    async fn state(app: &str) -> State {
        let toml = format!("[app]\nsecret = \"{SECRET}\"\n{app}");
        let settings =
            Settings::load("deliver-webhook", Some(&toml), std::iter::empty(), &[]).unwrap();
        init(settings).await.unwrap()
    }

    fn webhook(url: &str) -> Webhook {
        Webhook {
            url: url.to_owned(),
            event: "order.paid".into(),
            payload: serde_json::json!({"order": 42, "amount": "9.90"}),
            id: None,
        }
    }

    /// Calls the real handler the way the runtime does, with the key main() derives.
    async fn call(input: Webhook, state: State) -> Result<Delivered, HandlerError> {
        let ctx = Context::detached(&delivery_key(&input), Arc::new(state));
        deliver(input, &ctx).await
    }

    async fn answered(reply: &'static str) -> HandlerError {
        let (url, _received) = serve(Some(reply)).await;
        call(webhook(&url), state("").await).await.unwrap_err()
    }

    #[tokio::test]
    async fn success_delivers_the_exact_body_signed_with_the_secret_and_keyed_by_idempotency_key() {
        let (url, mut received) = serve(Some("204 No Content")).await;
        let input = webhook(&url);
        let key = delivery_key(&input);
        let out = call(input, state("").await).await.unwrap();
        assert_eq!((out.status, out.attempt), (204, 1));

        let r = received.recv().await.unwrap();
        assert_eq!(r.request_line, "POST /hook HTTP/1.1");
        let expected = format!(
            r#"{{"id":"{key}","event":"order.paid","payload":{{"amount":"9.90","order":42}}}}"#
        );
        assert_eq!(String::from_utf8(r.body.clone()).unwrap(), expected);
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["x-sluice-event"], "order.paid");
        assert_eq!(r.headers["x-sluice-delivery"], key);
        // Verify as a subscriber would: HMAC over the received bytes, constant-time compare.
        let hex_sig = r.headers["x-sluice-signature"]
            .strip_prefix("sha256=")
            .unwrap();
        let mut mac = HmacSha256::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(&r.body);
        mac.verify_slice(&hex::decode(hex_sig).unwrap())
            .expect("valid signature");
    }

    #[tokio::test]
    async fn server_errors_are_transient() {
        for reply in ["500 Internal Server Error", "503 Service Unavailable"] {
            let err = answered(reply).await;
            assert_eq!(err.kind, ErrorKind::Transient, "{reply}: {err}");
        }
    }

    #[tokio::test]
    async fn connection_refused_is_transient() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        drop(listener); // nothing listens on that port any more
        let err = call(webhook(&url), state("").await).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Transient, "{err}");
    }

    #[tokio::test]
    async fn a_server_that_never_answers_is_transient_after_the_client_timeout() {
        let (url, _received) = serve(None).await;
        let started = Instant::now();
        let err = call(webhook(&url), state("timeout = \"300ms\"").await)
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Transient, "{err}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300),
            "gave up early: {took:?}"
        );
        assert!(
            took < Duration::from_secs(5),
            "timeout not applied: {took:?}"
        );
    }

    #[tokio::test]
    async fn too_many_requests_with_retry_after_comes_back_after_that_many_seconds() {
        let err = answered("429 Too Many Requests\r\nretry-after: 7").await;
        assert_eq!(
            err.kind,
            ErrorKind::RetryAfter(Duration::from_secs(7)),
            "{err}"
        );
    }

    #[tokio::test]
    async fn too_many_requests_without_retry_after_is_transient() {
        let err = answered("429 Too Many Requests").await;
        assert_eq!(err.kind, ErrorKind::Transient, "{err}");
    }

    #[tokio::test]
    async fn other_client_errors_are_permanent_and_name_the_status() {
        for (reply, code) in [("404 Not Found", "404"), ("400 Bad Request", "400")] {
            let err = answered(reply).await;
            assert_eq!(err.kind, ErrorKind::Permanent, "{reply}: {err}");
            assert!(err.message.contains(code), "{err}");
        }
    }

    #[tokio::test]
    async fn a_non_http_url_is_permanent() {
        let err = call(webhook("ftp://x/hook"), state("").await)
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Permanent, "{err}");
        assert!(err.message.contains("ftp"), "{err}");
    }

    #[tokio::test]
    async fn an_unknown_app_key_fails_start_up_naming_the_key() {
        let toml = "[app]\nsecret = \"s\"\ntimout = \"5s\"\n";
        let settings =
            Settings::load("deliver-webhook", Some(toml), std::iter::empty(), &[]).unwrap();
        let err = init(settings)
            .await
            .err()
            .expect("init must fail")
            .to_string();
        assert!(err.contains("app.timout"), "{err}");
    }

    #[tokio::test]
    async fn the_shipped_sluice_toml_loads_and_the_env_secret_wins_over_it() {
        let toml = include_str!("../sluice.toml");
        let env = [("SLUICE__APP__SECRET".to_owned(), "from-env".to_owned())];
        let settings = Settings::load("deliver-webhook", Some(toml), env, &[]).unwrap();
        assert!(settings.worker.handler_timeout > settings.app::<AppConfig>().unwrap().timeout);
        assert_eq!(settings.app::<AppConfig>().unwrap().secret, "from-env");
        init(settings).await.unwrap();
    }

    #[test]
    fn the_delivery_key_is_the_producer_id_or_a_stable_hash_of_the_content() {
        let mut w = webhook("http://example.test/hook");
        let hashed = delivery_key(&w);
        assert_eq!(hashed.len(), 64);
        w.payload = serde_json::json!({"amount": "9.90", "order": 42}); // same, keys reordered
        assert_eq!(delivery_key(&w), hashed);
        w.event = "order.refunded".into();
        assert_ne!(delivery_key(&w), hashed);
        w.id = Some("evt_123".into());
        assert_eq!(delivery_key(&w), "evt_123");
    }
}
