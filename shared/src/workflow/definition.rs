//! A workflow defined once, as data: `workflows/<name>.toml`, turned into the first message
//! by `send --workflow NAME` (or [`Definition::start`] in a Rust producer).
//!
//! ```toml
//! name = "order"
//! deadline = "5m"          # the whole workflow; past it, it compensates
//!
//! [[steps]]
//! name = "reserve"
//! queue = "reserve-stock"  # the queue of the function that runs the step
//! function = "shop"        # optional: the function, when the queue is not its own
//! compensate = true        # the function declares a compensation (Function::compensate)
//! timeout = "1m"           # from the moment the step is forwarded
//! args = { warehouse = "main" }
//! ```

use std::{path::Path, time::Duration, time::SystemTime};

use serde::Deserialize;
use serde_json::{Map, Value};

use super::slip::{Slip, Step, MAX_NAME, MAX_STEPS};
use crate::{
    envelope::Envelope,
    error::{Error, Result},
    message::OutgoingMessage,
};

/// One step of a definition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepDef {
    /// The step's name.
    pub name: String,
    /// The queue of the function that runs it.
    pub queue: String,
    /// The function (its folder under `functions/`) that runs it, for `sluice-infra`, when
    /// its queue is not the function's own (one binary serving several steps).
    #[serde(default)]
    pub function: Option<String>,
    /// Whether the function declares a compensation for it.
    #[serde(default)]
    pub compensate: bool,
    /// How long the step may take once forwarded.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Arguments the step reads with `Workflow::args`.
    #[serde(default)]
    pub args: Option<Value>,
}

/// A workflow definition (see the module doc).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    /// The workflow's name.
    pub name: String,
    /// The whole workflow's deadline, from its start.
    #[serde(default, with = "humantime_serde")]
    pub deadline: Option<Duration>,
    /// The steps, in order.
    pub steps: Vec<StepDef>,
}

impl Definition {
    /// Parses and checks a definition; errors name the file's problem.
    pub fn parse(toml: &str) -> Result<Self> {
        let def: Definition = config::Config::builder()
            .add_source(config::File::from_str(toml, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| Error::Config(format!("workflow definition: {e}")))?;
        def.check()?;
        Ok(def)
    }

    /// Every definition in `dir` (`*.toml`), by name; none when `dir` does not exist.
    pub fn load_all(dir: &Path) -> Result<Vec<Self>> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Ok(Vec::new());
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".toml").map(str::to_owned)
            })
            .collect();
        names.sort();
        names.iter().map(|n| Self::load(dir, n)).collect()
    }

    /// Reads `dir/<name>.toml` (a name is letters, digits, `-` and `_`).
    pub fn load(dir: &Path, name: &str) -> Result<Self> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Error::Config(format!(
                "workflow name {name:?}: letters, digits, - and _ only"
            )));
        }
        let path = dir.join(format!("{name}.toml"));
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::Config(format!(
                "workflow {name}: cannot read {}: {e}",
                path.display()
            ))
        })?;
        let def = Self::parse(&text)?;
        if def.name != name {
            return Err(Error::Config(format!(
                "workflow {name}: {} names itself {:?}",
                path.display(),
                def.name
            )));
        }
        Ok(def)
    }

    fn check(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Config(format!("workflow {:?}: {what}", self.name)));
        if self.name.is_empty() || self.name.len() > MAX_NAME {
            return bad(format!("key `name`: 1 to {MAX_NAME} bytes"));
        }
        if self.steps.is_empty() || self.steps.len() > MAX_STEPS {
            return bad(format!("key `steps`: 1 to {MAX_STEPS} steps"));
        }
        for (i, s) in self.steps.iter().enumerate() {
            if s.name.is_empty() || s.name.len() > MAX_NAME {
                return bad(format!("key `steps[{i}].name`: 1 to {MAX_NAME} bytes"));
            }
            if s.queue.is_empty() || s.queue.len() > MAX_NAME {
                return bad(format!("key `steps[{i}].queue`: 1 to {MAX_NAME} bytes"));
            }
            if self.steps[..i].iter().any(|o| o.name == s.name) {
                return bad(format!("key `steps[{i}].name`: {:?} twice", s.name));
            }
        }
        Ok(())
    }

    /// The queues of its steps, in order, each once (what `sluice-infra` deploys).
    pub fn queues(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in &self.steps {
            if !out.contains(&s.queue) {
                out.push(s.queue.clone());
            }
        }
        out
    }

    /// The slip of a new run with tracking id `id`.
    pub fn slip(&self, id: &str, variables: Map<String, Value>, now: SystemTime) -> Slip {
        let itinerary = self
            .steps
            .iter()
            .map(|s| Step {
                name: s.name.clone(),
                queue: s.queue.clone(),
                args: s.args.clone().unwrap_or(Value::Null),
                compensate: s.compensate,
                timeout_ms: s
                    .timeout
                    .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            })
            .collect();
        Slip::start(id, &self.name, itinerary, variables, self.deadline, now)
    }

    /// The first message of a new run: `body` (the workflow's input, the same for every
    /// step), with the slip; to be published to the first step's queue (the slip's
    /// `current_queue`). Refused when the slip would not fit.
    pub fn start(
        &self,
        id: &str,
        body: Vec<u8>,
        variables: Map<String, Value>,
    ) -> Result<(Slip, OutgoingMessage)> {
        let slip = self.slip(id, variables, SystemTime::now());
        let text = slip.encode().map_err(|e| Error::Limit(e.to_string()))?;
        let msg = OutgoingMessage {
            body,
            envelope: Envelope {
                slip: Some(text),
                ..Envelope::default()
            },
            ..OutgoingMessage::default()
        };
        Ok((slip, msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDER: &str = r#"
name = "order"
deadline = "5m"

[[steps]]
name = "reserve"
queue = "reserve-stock"
compensate = true
timeout = "30s"

[[steps]]
name = "charge"
queue = "charge-payment"
compensate = true
args = { currency = "EUR" }
"#;

    #[test]
    fn a_definition_becomes_a_slip_at_its_first_step() {
        let def = Definition::parse(ORDER).unwrap();
        assert_eq!(def.queues(), ["reserve-stock", "charge-payment"]);
        let (slip, msg) = def.start("o-1", b"{}".to_vec(), Map::new()).unwrap();
        assert_eq!(slip.current_queue(), Some("reserve-stock"));
        assert_eq!(slip.itinerary[1].args["currency"], "EUR");
        assert!(slip.deadline_ms.is_some() && slip.step_deadline_ms.is_some());
        assert_eq!(
            Slip::decode(msg.envelope.slip.as_deref().unwrap()).unwrap(),
            slip
        );
    }

    #[test]
    fn a_bad_definition_names_its_key() {
        let e = Definition::parse("name = \"x\"\nsteps = []").unwrap_err();
        assert!(e.to_string().contains("`steps`"), "{e}");
        let e = Definition::parse("name = \"x\"\nbogus = 1\nsteps = []").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }
}
