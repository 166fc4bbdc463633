//! Multi-step workflows carried by the messages themselves: routing slips, no orchestrator
//! (the model of MassTransit's Courier: an itinerary, an activity log with compensation data,
//! variables, events). docs/workflows.md has the guarantees and a picture.
//!
//! - [`slip`]: the slip in the envelope's `sluice-slip` field, JSON, checked when read.
//! - [`flow`]: what comes after a step, a fault, a compensation; the record a step's claim is
//!   completed with (its hand-off, replayed by a redelivery).
//! - [`definition`]: a workflow defined as data (`workflows/<name>.toml`) and turned into the
//!   first message.
//! - [`status`]: where a workflow stands, as a record in the idempotency store.
//!
//! A step is an ordinary function. Its handler reads the workflow through
//! [`crate::Context::workflow`]; its output is logged as the data its compensation gets; it
//! may set variables for later steps. A compensation is a second handler of the same
//! function (`Function::compensate`), run on the same queue when a slip comes back
//! compensating:
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use sluice::{Context, HandlerError};
//!
//! #[derive(Deserialize)]
//! struct Order { order: String, cents: i64 }
//!
//! /// What the compensation needs: the step's output, logged on the slip.
//! #[derive(Serialize, Deserialize)]
//! struct Charged { charge_id: String, cents: i64 }
//!
//! async fn charge(order: Order, ctx: &Context) -> Result<Charged, HandlerError> {
//!     let charge_id = format!("ch-{}", ctx.idempotency_key());
//!     if let Some(wf) = ctx.workflow() {
//!         // Later steps read it with wf.variable::<String>("charge_id").
//!         wf.set_variable("charge_id", &charge_id);
//!     }
//!     Ok(Charged { charge_id, cents: order.cents })
//! }
//!
//! async fn refund(_order: Order, ctx: &Context) -> Result<(), HandlerError> {
//!     let wf = ctx.workflow().ok_or_else(|| HandlerError::permanent("not a workflow message"))?;
//!     let charged: Charged = wf.compensation_data().map_err(HandlerError::permanent)?;
//!     assert!(charged.cents >= 0); // refund charged.charge_id here
//!     Ok(())
//! }
//! # let _ = sluice::Function::new("charge", charge).compensate(refund);
//! ```

pub mod definition;
pub mod flow;
pub mod slip;
pub mod status;

use serde::{de::DeserializeOwned, Serialize};
use serde_json::{Map, Value};

pub use self::{
    flow::EventKind,
    slip::{Direction, Fault, Slip},
};
use crate::sync::Mutex;

/// What a step's handler (or its compensation) sees of the workflow it runs in:
/// [`crate::Context::workflow`].
#[derive(Debug)]
pub struct Workflow {
    slip: Slip,
    set: Mutex<Map<String, Value>>,
}

impl Workflow {
    pub(crate) fn new(slip: Slip) -> Self {
        Workflow {
            slip,
            set: Mutex::new(Map::new()),
        }
    }

    /// The tracking id: one workflow run.
    pub fn tracking_id(&self) -> &str {
        &self.slip.id
    }

    /// The workflow's name.
    pub fn name(&self) -> &str {
        &self.slip.workflow
    }

    /// The step being run (or compensated).
    pub fn step(&self) -> &str {
        self.slip.current_step().unwrap_or_default()
    }

    /// Forward or compensating.
    pub fn direction(&self) -> Direction {
        self.slip.direction()
    }

    /// While compensating: which step failed, and why.
    pub fn fault(&self) -> Option<&Fault> {
        self.slip.fault.as_ref()
    }

    /// This step's arguments from the definition (`args` of the step), as `T`.
    pub fn args<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        let args = match self.slip.direction() {
            Direction::Forward => self.slip.itinerary.first().map(|s| s.args.clone()),
            Direction::Compensate => None,
        };
        serde_json::from_value(args.unwrap_or(Value::Null))
    }

    /// A variable set by the producer or an earlier step (`None` if unset).
    pub fn variable<T: DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, serde_json::Error> {
        if let Some(v) = self.set.lock().get(name) {
            return serde_json::from_value(v.clone()).map(Some);
        }
        match self.slip.variables.get(name) {
            Some(v) => serde_json::from_value(v.clone()).map(Some),
            None => Ok(None),
        }
    }

    /// Sets a variable for the steps after this one. Kept only if this try succeeds.
    pub fn set_variable(&self, name: &str, value: impl Serialize) {
        let value = serde_json::to_value(value).unwrap_or(Value::Null);
        self.set.lock().insert(name.to_owned(), value);
    }

    /// In a compensation: the output the step logged when it ran, as `T`.
    pub fn compensation_data<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        let data = match self.slip.direction() {
            Direction::Compensate => self.slip.log.last().map(|s| s.data.clone()),
            Direction::Forward => None,
        };
        serde_json::from_value(data.unwrap_or(Value::Null))
    }

    /// The slip as it arrived.
    pub fn slip(&self) -> &Slip {
        &self.slip
    }

    /// Forgets what a failed try set.
    pub(crate) fn reset(&self) {
        self.set.lock().clear();
    }

    /// What the handler set.
    pub(crate) fn take_set(&self) -> Map<String, Value> {
        std::mem::take(&mut *self.set.lock())
    }
}
