//! A local payment gateway for the demo and the tests: it records charges in a SQLite ledger
//! and can be told to fail. Like real gateways it honours an idempotency key per charge, which
//! closes the one window Sluice's record cannot: a worker killed after the charge and before
//! the record is completed. The ledger has no unique constraint on the payment id, so a double
//! charge would show up in it.
//!
//! Because the gateway absorbs a repeated key on its own, "one charge per payment" in the
//! ledger does not prove that Sluice ran the handler once. Every call the gateway answered from
//! an earlier charge is written to the `replays` table: outside a crash window (a worker killed
//! between the charge and the record) each one is a duplicate Sluice should have absorbed, and
//! `just demo` shows their count (0).

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rand::Rng;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Deserialize;

/// The `[app]` section of charge-payment's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// SQLite file of the ledger, or `postgres`: the ledger is a table in the idempotency
    /// store's PostgreSQL database, written in the same transaction as the record.
    pub ledger: String,
    /// Fraction of calls that fail with a 503 before charging.
    #[serde(default)]
    pub failure_rate: f64,
    /// Added latency per call.
    #[serde(default, with = "humantime_serde")]
    pub latency: Duration,
    /// Amounts above this are declined.
    pub decline_over_cents: u64,
}

/// Why a charge did not happen.
#[derive(Debug)]
pub enum GatewayError {
    /// The gateway is unavailable (try again later).
    Unavailable(String),
    /// The charge was declined (do not try again).
    Declined(String),
}

/// Outage, latency and decline, as configured.
pub async fn precheck(cfg: &GatewayConfig, amount_cents: u64) -> Result<(), GatewayError> {
    if !cfg.latency.is_zero() {
        tokio::time::sleep(cfg.latency).await;
    }
    if rand::thread_rng().gen::<f64>() < cfg.failure_rate {
        return Err(GatewayError::Unavailable(
            "503 service unavailable (injected)".into(),
        ));
    }
    if amount_cents > cfg.decline_over_cents {
        return Err(GatewayError::Declined(format!(
            "amount {amount_cents} is over the limit of {}",
            cfg.decline_over_cents
        )));
    }
    Ok(())
}

/// A recorded charge.
#[derive(Debug, Clone)]
pub struct Charge {
    /// Gateway id of the charge.
    pub charge_id: String,
}

/// The local gateway client.
#[derive(Clone)]
pub struct LocalGateway {
    conn: Arc<Mutex<Connection>>,
    cfg: GatewayConfig,
}

impl LocalGateway {
    /// Opens (and creates) the ledger.
    pub fn open(cfg: GatewayConfig) -> anyhow::Result<Self> {
        let path = Path::new(&cfg.ledger);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let conn = Connection::open(path)?;
        let timeout = Duration::from_secs(30);
        conn.busy_timeout(timeout)?;
        // Switching a new file to WAL answers SQLITE_BUSY at once, without the busy handler,
        // while another worker does the same (workers starting together on a new ledger).
        let started = std::time::Instant::now();
        loop {
            match conn.pragma_update(None, "journal_mode", "WAL") {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy
                        && started.elapsed() < timeout =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => break other?,
            }
        }
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS charges (
                 charge_id       TEXT PRIMARY KEY,
                 payment_id      TEXT NOT NULL,
                 amount_cents    INTEGER NOT NULL,
                 currency        TEXT NOT NULL,
                 customer        TEXT NOT NULL,
                 idempotency_key TEXT NOT NULL,
                 created_at_ms   INTEGER NOT NULL
             );
             CREATE INDEX IF NOT EXISTS charges_by_key ON charges (idempotency_key);
             CREATE TABLE IF NOT EXISTS replays (
                 idempotency_key TEXT NOT NULL,
                 charge_id       TEXT NOT NULL,
                 at_ms           INTEGER NOT NULL
             );",
        )?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            cfg,
        })
    }

    /// Charges once per idempotency key; a repeated key returns the first charge and is
    /// recorded in `replays`.
    pub async fn charge(
        &self,
        payment_id: &str,
        amount_cents: u64,
        currency: &str,
        customer: &str,
        idempotency_key: &str,
    ) -> Result<Charge, GatewayError> {
        precheck(&self.cfg, amount_cents).await?;
        let conn = self.conn.clone();
        let row = (
            payment_id.to_owned(),
            amount_cents as i64,
            currency.to_owned(),
            customer.to_owned(),
            idempotency_key.to_owned(),
        );
        tokio::task::spawn_blocking(move || -> rusqlite::Result<Charge> {
            let (payment_id, amount, currency, customer, key) = row;
            let mut conn = conn.lock().expect("ledger lock");
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let existing: Option<String> = tx
                .query_row(
                    "SELECT charge_id FROM charges WHERE idempotency_key = ?1",
                    params![key],
                    |r| r.get(0),
                )
                .optional()?;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            let charge_id = match existing {
                Some(id) => {
                    tx.execute(
                        "INSERT INTO replays VALUES (?1, ?2, ?3)",
                        params![key, id, now],
                    )?;
                    id
                }
                None => {
                    let id = format!("ch_{}", uuid::Uuid::new_v4().simple());
                    tx.execute(
                        "INSERT INTO charges VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                        params![id, payment_id, amount, currency, customer, key, now],
                    )?;
                    id
                }
            };
            tx.commit()?;
            Ok(Charge { charge_id })
        })
        .await
        .map_err(|e| GatewayError::Unavailable(format!("ledger task failed: {e}")))?
        .map_err(|e| GatewayError::Unavailable(format!("ledger: {e}")))
    }
}
