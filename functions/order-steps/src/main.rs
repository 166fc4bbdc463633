//! order-steps: the four steps of the order workflow (`workflows/order.toml`): reserve stock
//! -> charge payment -> create shipment -> send receipt, with release-stock, refund and
//! cancel-shipment as compensations (the receipt has none: it is the last step, nothing fails
//! after it). One binary; each step runs it on its own queue, and the routing slip says which
//! step a message is (docs/workflows.md).
//!
//! Run with:
//!
//! ```text
//! for q in order-reserve order-charge order-ship order-receipt; do
//!   cargo run -p order-steps -- --set queue=$q run &
//! done
//! cargo run -p order-steps -- send --workflow order '{"order":"o-1","sku":"sku-1","qty":2,"cents":1299}'
//! cargo run -p order-steps -- workflow status o-1 --id o-1   # or the id `send` printed
//! ```
//!
//! Every effect is applied once per step key (the shop's `effects` table), so a step run
//! again after a crash between its effect and its record changes nothing.

mod shop;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sluice::{Context, Function, HandlerError, Settings};

use crate::shop::{Effect, Shop};

/// The workflow's input: the same body reaches every step.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Order {
    order: String,
    sku: String,
    qty: i64,
    cents: i64,
    /// Fault injection (feature `faults`): the step that rejects the order.
    #[serde(default)]
    fail_at: Option<String>,
    /// Fault injection: the step that fails transiently on its first call.
    #[serde(default)]
    flaky_at: Option<String>,
    /// Fault injection: the compensation of this step fails transiently on its first calls
    /// (as many as `undo_fails`), so that it is dead-lettered and needs a redrive.
    #[serde(default)]
    undo_fails: Option<(String, i64)>,
}

/// What each step logs: what its compensation undoes.
#[derive(Debug, Serialize, Deserialize)]
struct Done {
    step: String,
    sku: String,
    qty: i64,
    cents: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppConfig {
    shop: PathBuf,
    initial_stock: i64,
}

fn db(e: rusqlite::Error) -> HandlerError {
    HandlerError::transient(format!("shop database: {e}"))
}

/// The faults an order asks for, before any effect.
fn faults(o: &Order, step: &str, calls: i64, undo: bool) -> Result<(), HandlerError> {
    let asked = o.fail_at.is_some() || o.flaky_at.is_some() || o.undo_fails.is_some();
    if !cfg!(feature = "faults") {
        return if asked {
            Err(HandlerError::permanent(
                "fail_at, flaky_at and undo_fails need a build with the faults feature",
            ))
        } else {
            Ok(())
        };
    }
    if undo {
        return match &o.undo_fails {
            Some((s, n)) if s == step && calls <= *n => Err(HandlerError::transient(format!(
                "injected: undoing {step} fails ({calls} of {n})"
            ))),
            _ => Ok(()),
        };
    }
    if o.fail_at.as_deref() == Some(step) {
        return Err(HandlerError::permanent(format!(
            "injected: {step} rejects {}",
            o.order
        )));
    }
    if o.flaky_at.as_deref() == Some(step) && calls == 1 {
        return Err(HandlerError::transient(format!("injected: {step} flaked")));
    }
    Ok(())
}

async fn step(o: Order, ctx: &Context<Shop>) -> Result<Done, HandlerError> {
    let wf = ctx.workflow().ok_or_else(|| {
        HandlerError::permanent("order-steps runs workflow steps only (send --workflow order)")
    })?;
    let name = wf.step().to_owned();
    let shop = ctx.state();
    let calls = shop.call(&o.order, &name, "forward").map_err(db)?;
    faults(&o, &name, calls, false)?;
    if o.qty <= 0 || o.cents <= 0 {
        return Err(HandlerError::permanent("qty and cents must be positive"));
    }
    let effect = match name.as_str() {
        "reserve" => {
            if shop.stock(&o.sku).map_err(db)? < o.qty {
                return Err(HandlerError::permanent(format!(
                    "{} is out of stock",
                    o.sku
                )));
            }
            Effect::Reserve {
                sku: &o.sku,
                qty: o.qty,
            }
        }
        "charge" => Effect::Charge { cents: o.cents },
        "ship" => Effect::Ship {
            sku: &o.sku,
            qty: o.qty,
        },
        "receipt" => Effect::Receipt,
        other => {
            return Err(HandlerError::permanent(format!(
                "order-steps has no step {other:?}"
            )))
        }
    };
    shop.apply(ctx.idempotency_key(), &o.order, &name, "forward", effect)
        .map_err(db)?;
    Ok(Done {
        step: name,
        sku: o.sku,
        qty: o.qty,
        cents: o.cents,
    })
}

async fn undo(o: Order, ctx: &Context<Shop>) -> Result<(), HandlerError> {
    let wf = ctx
        .workflow()
        .ok_or_else(|| HandlerError::permanent("not a workflow message"))?;
    let done: Done = wf
        .compensation_data()
        .map_err(|e| HandlerError::permanent(format!("the logged step data: {e}")))?;
    let shop = ctx.state();
    let calls = shop.call(&o.order, &done.step, "compensate").map_err(db)?;
    faults(&o, &done.step, calls, true)?;
    let effect = match done.step.as_str() {
        "reserve" => Effect::Release {
            sku: &done.sku,
            qty: done.qty,
        },
        "charge" => Effect::Refund,
        "ship" => Effect::Cancel,
        other => {
            return Err(HandlerError::permanent(format!(
                "no compensation for {other:?}"
            )))
        }
    };
    shop.apply(
        ctx.idempotency_key(),
        &o.order,
        &done.step,
        "compensate",
        effect,
    )
    .map_err(db)?;
    Ok(())
}

async fn open(settings: Settings) -> anyhow::Result<Shop> {
    let cfg = settings.app::<AppConfig>()?;
    Shop::open(&cfg.shop, cfg.initial_stock)
}

fn main() -> std::process::ExitCode {
    Function::new("order-steps", step)
        .compensate(undo)
        .config(include_str!("../sluice.toml"))
        .version(env!("CARGO_PKG_VERSION"))
        .state(open)
        .main()
}
