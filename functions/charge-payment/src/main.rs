//! charge-payment: charges a payment through the gateway and must never charge twice for one
//! payment id, however often the message is delivered.
//!
//! Run with:
//!
//! ```text
//! cargo run -p charge-payment -- send '{"payment_id":"p-1","amount_cents":1250,"currency":"EUR","customer":"c-9"}'
//! cargo run -p charge-payment -- run --drain
//! cargo run -p charge-payment -- stats
//! ```
//!
//! Duplicates are absorbed twice over: the idempotency key is the payment id, so Sluice's
//! record replays the stored receipt without calling the gateway; and the key is passed on to
//! the gateway, which charges once per key even if a worker dies between the charge and the
//! record (see docs/idempotency.md).
//!
//! With `app.ledger = "postgres"` (and `store.kind = "postgres"`) the charge is a row written
//! through `ctx.postgres()`: it commits in the same transaction as the idempotency record, so
//! it happens exactly once with no help from the gateway.

mod gateway;

use serde::{Deserialize, Serialize};
use sluice::{Context, Function, HandlerError, Settings};

use crate::gateway::{GatewayConfig, GatewayError, LocalGateway};

/// Where charges are recorded.
enum Ledger {
    /// The local gateway's SQLite ledger (idempotency key honoured by the gateway).
    Gateway(LocalGateway),
    /// A table in the PostgreSQL idempotency store's database, written exactly once.
    #[cfg(feature = "postgres")]
    Postgres(GatewayConfig),
}

#[cfg(feature = "postgres")]
const PG_LEDGER: &str = "CREATE TABLE IF NOT EXISTS charge_ledger (
    charge_id    TEXT PRIMARY KEY,
    payment_id   TEXT NOT NULL,
    amount_cents BIGINT NOT NULL,
    currency     TEXT NOT NULL,
    customer     TEXT NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
)";

/// One charge to make.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChargeRequest {
    payment_id: String,
    amount_cents: u64,
    currency: String,
    customer: String,
}

/// What the function returns (stored, and replayed for duplicates).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct ChargeReceipt {
    charge_id: String,
    payment_id: String,
    amount_cents: u64,
    currency: String,
}

async fn charge(req: ChargeRequest, ctx: &Context<Ledger>) -> Result<ChargeReceipt, HandlerError> {
    validate(&req)?;
    let charge_id = match ctx.state() {
        Ledger::Gateway(gateway) => {
            gateway
                .charge(
                    &req.payment_id,
                    req.amount_cents,
                    &req.currency,
                    &req.customer,
                    ctx.idempotency_key(),
                )
                .await
                .map_err(gateway_error)?
                .charge_id
        }
        #[cfg(feature = "postgres")]
        Ledger::Postgres(cfg) => {
            gateway::precheck(cfg, req.amount_cents)
                .await
                .map_err(gateway_error)?;
            let charge_id = format!("ch_{}", uuid::Uuid::new_v4().simple());
            // No unique constraint on payment_id: a double charge would show in the table.
            ctx.postgres()
                .await?
                .client()
                .execute(
                    "INSERT INTO charge_ledger (charge_id, payment_id, amount_cents, currency, customer)
                     VALUES ($1, $2, $3, $4, $5)",
                    &[&charge_id, &req.payment_id, &(req.amount_cents as i64), &req.currency, &req.customer],
                )
                .await
                .map_err(|e| HandlerError::transient(format!("ledger insert: {e}")))?;
            charge_id
        }
    };
    Ok(ChargeReceipt {
        charge_id,
        payment_id: req.payment_id,
        amount_cents: req.amount_cents,
        currency: req.currency,
    })
}

fn gateway_error(e: GatewayError) -> HandlerError {
    match e {
        GatewayError::Unavailable(why) => HandlerError::transient(why),
        GatewayError::Declined(why) => HandlerError::permanent(format!("declined: {why}")),
    }
}

/// Business validation: a bad request is permanent, retrying cannot fix it.
fn validate(req: &ChargeRequest) -> Result<(), HandlerError> {
    if req.payment_id.is_empty() || req.payment_id.len() > 64 {
        return Err(HandlerError::permanent(
            "payment_id must be 1 to 64 characters",
        ));
    }
    if req.amount_cents == 0 {
        return Err(HandlerError::permanent("amount_cents must be positive"));
    }
    if req.currency.len() != 3 || !req.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(HandlerError::permanent(format!(
            "currency {:?} is not an ISO 4217 code",
            req.currency
        )));
    }
    Ok(())
}

async fn connect(settings: Settings) -> anyhow::Result<Ledger> {
    let cfg = settings.app::<GatewayConfig>()?;
    if cfg.ledger != "postgres" {
        return Ok(Ledger::Gateway(LocalGateway::open(cfg)?));
    }
    #[cfg(not(feature = "postgres"))]
    anyhow::bail!(sluice::Error::Config(
        "key `app.ledger`: \"postgres\" is not built into this binary (the cargo feature `postgres` of charge-payment; the Lambda build leaves it out)".into()
    ));
    #[cfg(feature = "postgres")]
    postgres_ledger(settings, cfg).await
}

#[cfg(feature = "postgres")]
async fn postgres_ledger(settings: Settings, cfg: GatewayConfig) -> anyhow::Result<Ledger> {
    if settings.store.kind != sluice::config::StoreKind::Postgres {
        anyhow::bail!(sluice::Error::Config(
            "key `app.ledger`: \"postgres\" needs store.kind = \"postgres\" (the ledger shares its transaction)".into()
        ));
    }
    // The store's own TLS settings (`store.tls_ca_file`, `sslmode=require`) apply here too.
    let client = sluice::store::postgres::connect(&settings.store).await?;
    // Workers starting together must not race on CREATE TABLE (it is not atomic in PostgreSQL).
    client
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(7243); {PG_LEDGER}; COMMIT"
        ))
        .await?;
    Ok(Ledger::Postgres(cfg))
}

fn main() -> std::process::ExitCode {
    Function::new("charge-payment", charge)
        .config(include_str!("../sluice.toml"))
        .version(env!("CARGO_PKG_VERSION"))
        .idempotency_key(|req: &ChargeRequest| req.payment_id.clone())
        .schema_versions(&["1"])
        .state(connect)
        .main()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn gateway(dir: &tempfile::TempDir, failure_rate: f64) -> LocalGateway {
        LocalGateway::open(GatewayConfig {
            ledger: dir.path().join("ledger.db").to_string_lossy().into_owned(),
            failure_rate,
            latency: std::time::Duration::ZERO,
            decline_over_cents: 10_000,
        })
        .unwrap()
    }

    fn request(payment_id: &str, amount_cents: u64) -> ChargeRequest {
        ChargeRequest {
            payment_id: payment_id.into(),
            amount_cents,
            currency: "EUR".into(),
            customer: "c-1".into(),
        }
    }

    fn ledger_rows(dir: &tempfile::TempDir) -> i64 {
        let conn = rusqlite::Connection::open(dir.path().join("ledger.db")).unwrap();
        conn.query_row("SELECT COUNT(*) FROM charges", [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test]
    async fn charges_once_and_returns_a_receipt() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = Context::detached("m-1", Arc::new(Ledger::Gateway(gateway(&dir, 0.0))));
        let receipt = charge(request("p-1", 500), &ctx).await.unwrap();
        assert_eq!(receipt.payment_id, "p-1");
        assert!(receipt.charge_id.starts_with("ch_"));
        assert_eq!(ledger_rows(&dir), 1);
    }

    #[tokio::test]
    async fn the_same_idempotency_key_never_charges_twice_at_the_gateway() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = Context::detached("m-1", Arc::new(Ledger::Gateway(gateway(&dir, 0.0))));
        let a = charge(request("p-1", 500), &ctx).await.unwrap();
        let b = charge(request("p-1", 500), &ctx).await.unwrap();
        assert_eq!(a, b, "the second call returns the first charge");
        assert_eq!(ledger_rows(&dir), 1);
        // The gateway absorbed a duplicate Sluice ran the handler for: `just demo` counts it.
        let counts = replays(&dir);
        assert_eq!(counts, 1, "the second call is recorded as a replay");
    }

    fn replays(dir: &tempfile::TempDir) -> i64 {
        let conn = rusqlite::Connection::open(dir.path().join("ledger.db")).unwrap();
        conn.query_row("SELECT COUNT(*) FROM replays", [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test]
    async fn gateway_outage_is_transient_and_charges_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = Context::detached("m-1", Arc::new(Ledger::Gateway(gateway(&dir, 1.0))));
        let err = charge(request("p-1", 500), &ctx).await.unwrap_err();
        assert_eq!(err.kind, sluice::ErrorKind::Transient);
        assert_eq!(ledger_rows(&dir), 0);
    }

    #[tokio::test]
    async fn declines_and_invalid_requests_are_permanent() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = Context::detached("m-1", Arc::new(Ledger::Gateway(gateway(&dir, 0.0))));
        let declined = charge(request("p-1", 20_000), &ctx).await.unwrap_err();
        assert_eq!(declined.kind, sluice::ErrorKind::Permanent);
        assert!(declined.message.contains("declined"), "{declined}");
        let zero = charge(request("p-2", 0), &ctx).await.unwrap_err();
        assert_eq!(zero.kind, sluice::ErrorKind::Permanent);
        let mut bad_currency = request("p-3", 100);
        bad_currency.currency = "euro".into();
        let err = charge(bad_currency, &ctx).await.unwrap_err();
        assert!(err.message.contains("ISO 4217"), "{err}");
        assert_eq!(ledger_rows(&dir), 0);
    }

    #[test]
    fn baked_config_is_valid_and_a_typo_in_app_names_the_key() {
        let s = Settings::load(
            "charge-payment",
            Some(include_str!("../sluice.toml")),
            std::iter::empty(),
            &[],
        )
        .unwrap();
        assert!(s.app::<GatewayConfig>().is_ok());
        let s = Settings::load(
            "charge-payment",
            Some(include_str!("../sluice.toml")),
            std::iter::empty(),
            &["app.ledgr=x.db".into()],
        )
        .unwrap();
        let err = s.app::<GatewayConfig>().unwrap_err().to_string();
        assert!(err.contains("app.ledgr"), "{err}");
    }
}
