//! The shop's books in one SQLite file: stock per SKU, charges, shipments, receipts, and the
//! effects applied. Every effect is written in one transaction with its row in `effects`,
//! keyed by the step's idempotency key: a step run again after a crash (between its effect
//! and its record) finds its key and changes nothing. `calls` counts handler runs.

use std::{path::Path, sync::Mutex};

use rusqlite::{params, Connection, OptionalExtension};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS stock (sku TEXT PRIMARY KEY, qty INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS charges (order_id TEXT PRIMARY KEY, cents INTEGER NOT NULL, refunded INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS shipments (order_id TEXT PRIMARY KEY, sku TEXT NOT NULL, qty INTEGER NOT NULL, cancelled INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS receipts (order_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS effects (key TEXT PRIMARY KEY, order_id TEXT NOT NULL, step TEXT NOT NULL, direction TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS calls (order_id TEXT NOT NULL, step TEXT NOT NULL, direction TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (order_id, step, direction));
";

/// The shop's database.
pub struct Shop {
    conn: Mutex<Connection>,
    initial_stock: i64,
}

/// One effect on the books.
pub enum Effect<'a> {
    Reserve { sku: &'a str, qty: i64 },
    Release { sku: &'a str, qty: i64 },
    Charge { cents: i64 },
    Refund,
    Ship { sku: &'a str, qty: i64 },
    Cancel,
    Receipt,
}

impl Shop {
    pub fn open(path: &Path, initial_stock: i64) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        // Workers of every step open the file at once: switching it to WAL takes a lock the
        // busy timeout does not wait for, so the first opens try again for a few seconds.
        let mut tries = 0;
        loop {
            match conn
                .pragma_update(None, "journal_mode", "WAL")
                .and_then(|()| conn.execute_batch(SCHEMA))
            {
                Ok(()) => break,
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy && tries < 50 =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Shop {
            conn: Mutex::new(conn),
            initial_stock,
        })
    }

    /// Counts one handler run; returns the count so far (1 on the first).
    pub fn call(&self, order: &str, step: &str, direction: &str) -> rusqlite::Result<i64> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.query_row(
            "INSERT INTO calls (order_id, step, direction, n) VALUES (?1, ?2, ?3, 1)
             ON CONFLICT (order_id, step, direction) DO UPDATE SET n = n + 1 RETURNING n",
            params![order, step, direction],
            |r| r.get(0),
        )
    }

    /// Applies `effect` once per `key`; false when the key was applied before.
    pub fn apply(
        &self,
        key: &str,
        order: &str,
        step: &str,
        direction: &str,
        effect: Effect<'_>,
    ) -> rusqlite::Result<bool> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let fresh = tx.execute(
            "INSERT INTO effects (key, order_id, step, direction) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (key) DO NOTHING",
            params![key, order, step, direction],
        )? == 1;
        if fresh {
            match effect {
                Effect::Reserve { sku, qty } => {
                    tx.execute(
                        "INSERT INTO stock (sku, qty) VALUES (?1, ?2) ON CONFLICT (sku) DO NOTHING",
                        params![sku, self.initial_stock],
                    )?;
                    tx.execute(
                        "UPDATE stock SET qty = qty - ?2 WHERE sku = ?1",
                        params![sku, qty],
                    )?;
                }
                Effect::Release { sku, qty } => {
                    tx.execute(
                        "UPDATE stock SET qty = qty + ?2 WHERE sku = ?1",
                        params![sku, qty],
                    )?;
                }
                Effect::Charge { cents } => {
                    tx.execute(
                        "INSERT INTO charges (order_id, cents) VALUES (?1, ?2)",
                        params![order, cents],
                    )?;
                }
                Effect::Refund => {
                    tx.execute(
                        "UPDATE charges SET refunded = 1 WHERE order_id = ?1",
                        params![order],
                    )?;
                }
                Effect::Ship { sku, qty } => {
                    tx.execute(
                        "INSERT INTO shipments (order_id, sku, qty) VALUES (?1, ?2, ?3)",
                        params![order, sku, qty],
                    )?;
                }
                Effect::Cancel => {
                    tx.execute(
                        "UPDATE shipments SET cancelled = 1 WHERE order_id = ?1",
                        params![order],
                    )?;
                }
                Effect::Receipt => {
                    tx.execute(
                        "INSERT INTO receipts (order_id) VALUES (?1)",
                        params![order],
                    )?;
                }
            }
        }
        tx.commit()?;
        Ok(fresh)
    }

    /// Stock left of `sku` (the initial stock if never reserved).
    pub fn stock(&self, sku: &str) -> rusqlite::Result<i64> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let qty: Option<i64> = conn
            .query_row("SELECT qty FROM stock WHERE sku = ?1", params![sku], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(qty.unwrap_or(self.initial_stock))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_effect_is_applied_once_per_key_and_undone_by_its_compensation() {
        let dir = tempfile::tempdir().unwrap();
        let shop = Shop::open(&dir.path().join("shop.db"), 10).unwrap();
        let reserve = || Effect::Reserve { sku: "s", qty: 3 };
        assert!(shop
            .apply("wf:o:0:forward", "o", "reserve", "forward", reserve())
            .unwrap());
        assert!(!shop
            .apply("wf:o:0:forward", "o", "reserve", "forward", reserve())
            .unwrap());
        assert_eq!(shop.stock("s").unwrap(), 7, "reserved once");
        let release = Effect::Release { sku: "s", qty: 3 };
        assert!(shop
            .apply("wf:o:0:compensate", "o", "reserve", "compensate", release)
            .unwrap());
        assert_eq!(shop.stock("s").unwrap(), 10);
        assert_eq!(shop.call("o", "reserve", "forward").unwrap(), 1);
        assert_eq!(shop.call("o", "reserve", "forward").unwrap(), 2);
    }
}
