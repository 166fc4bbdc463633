//! The RabbitMQ topology of a work queue as plain data: what the RabbitMQ transport declares
//! and what `sluice-infra` writes to `infra/rabbitmq/definitions.json`, so the two cannot say
//! different things. No broker client here: the generator reads it without linking lapin.
//!
//! | name | kind | arguments | role |
//! |---|---|---|---|
//! | `<q>` | direct exchange | durable | producers publish here, routing key `<q>` |
//! | `<q>` | quorum queue, bound to the exchange with key `<q>` | `x-delivery-limit`, dead-letter to `<q>.dlq` (at-least-once) | the work |
//! | `<q>.dlq` | classic durable queue | | dead letters with their history |
//! | `<q>.delay.<ms>` | quorum queues, one per ladder step | `x-message-ttl = <ms>`, dead-letter to `<q>` (at-least-once) | delayed retries |
//!
//! docs/rabbitmq.md explains each choice.

use std::{collections::BTreeMap, time::Duration};

use crate::error::{Error, Result};

/// Queue, exchange and header names are AMQP short strings: at most 255 bytes
/// (<https://www.rabbitmq.com/amqp-0-9-1-reference#domain.shortstr>).
pub const MAX_NAME_BYTES: usize = 255;
/// The delay ladder: one TTL queue `<q>.delay.<ms>` per step (docs/rabbitmq.md "Delays").
pub const DELAY_LADDER_MS: [u64; 12] = [
    250, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000, 512_000,
];

/// The names of one work queue's topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The work queue (and its exchange).
    pub work: String,
    /// The dead-letter queue.
    pub dlq: String,
    /// (step, queue name), shortest first.
    pub delays: Vec<(Duration, String)>,
}

impl Names {
    /// The names for work queue `queue`, checked against AMQP's limits.
    pub fn new(queue: &str) -> Result<Self> {
        if queue.is_empty() {
            return Err(Error::Config("key `queue`: empty queue name".into()));
        }
        let longest = format!(
            "{queue}.delay.{}",
            DELAY_LADDER_MS[DELAY_LADDER_MS.len() - 1]
        );
        if longest.len() > MAX_NAME_BYTES {
            return Err(Error::Config(format!(
                "key `queue`: {queue:?} is too long for RabbitMQ: {longest:?} must fit in {MAX_NAME_BYTES} bytes"
            )));
        }
        Ok(Self {
            work: queue.to_owned(),
            dlq: format!("{queue}.dlq"),
            delays: DELAY_LADDER_MS
                .iter()
                .map(|ms| (Duration::from_millis(*ms), format!("{queue}.delay.{ms}")))
                .collect(),
        })
    }

    /// The shortest delay step.
    pub fn smallest_step(&self) -> Duration {
        self.delays[0].0
    }

    /// Where a copy due in `delay` goes: the largest step <= `delay`; the smallest step for a
    /// delay under it (so that a short backoff is not an immediate redelivery); the work queue
    /// for no delay.
    pub fn route(&self, delay: Duration) -> &str {
        if delay.is_zero() {
            return self.work.as_str();
        }
        self.delays
            .iter()
            .rev()
            .find(|(step, _)| *step <= delay)
            .unwrap_or(&self.delays[0])
            .1
            .as_str()
    }

    /// Every queue of the topology.
    pub fn all_queues(&self) -> impl Iterator<Item = &str> {
        [self.work.as_str(), self.dlq.as_str()]
            .into_iter()
            .chain(self.delays.iter().map(|(_, n)| n.as_str()))
    }
}

/// The broker objects of one work queue, as plain data: what the RabbitMQ transport (and a
/// connecting handle) declares, and what `sluice-infra` writes to
/// `infra/rabbitmq/definitions.json`, so that the two cannot say different things.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The direct, durable exchange producers publish to (named like the work queue).
    pub exchange: String,
    /// The work queue, the DLQ and the delay steps, in declaration order.
    pub queues: Vec<QueueSpec>,
    /// (exchange, queue, routing key).
    pub bindings: Vec<(String, String, String)>,
    /// Policies carrying the same dead-letter settings and delivery limit as the queue
    /// arguments (definitions files only: AMQP cannot declare a policy). See [`topology`].
    pub policies: Vec<PolicySpec>,
}

/// One durable queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    /// Its name.
    pub name: String,
    /// `quorum` or `classic` (also its `x-queue-type` argument).
    pub kind: &'static str,
    /// Its `x-*` arguments, sorted by name.
    pub arguments: BTreeMap<&'static str, ArgValue>,
}

/// One policy (`apply-to: queues`, priority 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySpec {
    /// Its name.
    pub name: String,
    /// The regular expression of the queue names it applies to.
    pub pattern: String,
    /// Its definition (keys without the `x-` of queue arguments), sorted by name.
    pub definition: BTreeMap<&'static str, ArgValue>,
}

/// A queue argument or policy value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgValue {
    /// A string.
    Text(String),
    /// A number.
    Int(i64),
}

/// The queue arguments the policies repeat (each is a policy key for quorum queues in RabbitMQ
/// 3.10, without the `x-`). `x-queue-type` cannot come from a policy, and `x-message-ttl`
/// differs from one delay step to the next, so those stay queue arguments only.
const POLICY_KEYS: [&str; 5] = [
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-dead-letter-strategy",
    "x-delivery-limit",
    "x-overflow",
];

/// The topology of the work queue `queue` whose messages are delivered at most
/// `max_deliveries` times per copy (see the module doc's table).
///
/// Two policies repeat the quorum queues' dead-letter settings and delivery limit: `<q>` for
/// the work queue and `<q>.delay` for the delay steps. For quorum queues RabbitMQ 3.10 takes
/// the queue argument over the policy for the dead-letter and overflow keys, and the smaller
/// of the two for `delivery-limit`; so on queues declared by Sluice the policies change
/// nothing, a queue created without arguments still gets them, and an operator can lower
/// the crash-loop limit of existing queues by editing the policy (raising it needs the
/// queues recreated, as their argument is the upper bound).
pub fn topology(queue: &str, max_deliveries: u32) -> Result<Topology> {
    let names = Names::new(queue)?;
    Ok(names.topology(max_deliveries))
}

impl Names {
    /// The topology of these queues whose messages are delivered at most `max_deliveries`
    /// times per copy.
    pub fn topology(&self, max_deliveries: u32) -> Topology {
        let text = |s: &str| ArgValue::Text(s.to_owned());
        let quorum = |dead_letter_to: &str| {
            BTreeMap::from([
                ("x-queue-type", text("quorum")),
                ("x-dead-letter-exchange", text("")),
                ("x-dead-letter-routing-key", text(dead_letter_to)),
                // Dead letters move with confirms: none is lost on the way. It requires
                // reject-publish.
                ("x-dead-letter-strategy", text("at-least-once")),
                ("x-overflow", text("reject-publish")),
            ])
        };
        let mut work = quorum(&self.dlq);
        work.insert(
            "x-delivery-limit",
            ArgValue::Int(i64::from(max_deliveries.max(1) - 1)),
        );
        let mut queues = vec![
            QueueSpec {
                name: self.work.clone(),
                kind: "quorum",
                arguments: work,
            },
            QueueSpec {
                name: self.dlq.clone(),
                kind: "classic",
                arguments: BTreeMap::from([("x-queue-type", text("classic"))]),
            },
        ];
        for (step, name) in &self.delays {
            let mut args = quorum(&self.work);
            args.insert("x-message-ttl", ArgValue::Int(step.as_millis() as i64));
            queues.push(QueueSpec {
                name: name.clone(),
                kind: "quorum",
                arguments: args,
            });
        }
        let policy_of = |q: &QueueSpec| -> BTreeMap<&'static str, ArgValue> {
            q.arguments
                .iter()
                .filter(|(k, _)| POLICY_KEYS.contains(k))
                .map(|(k, v)| (k.strip_prefix("x-").unwrap_or(k), v.clone()))
                .collect()
        };
        let escaped = regex_escape(&self.work);
        let policies = vec![
            PolicySpec {
                name: self.work.clone(),
                pattern: format!("^{escaped}$"),
                definition: policy_of(&queues[0]),
            },
            PolicySpec {
                name: format!("{}.delay", self.work),
                pattern: format!("^{escaped}\\.delay\\.[0-9]+$"),
                definition: policy_of(&queues[2]),
            },
        ];
        Topology {
            exchange: self.work.clone(),
            queues,
            bindings: vec![(self.work.clone(), self.work.clone(), self.work.clone())],
            policies,
        }
    }
}

/// `name` as a literal in a policy pattern (RabbitMQ uses Erlang's PCRE `re`).
fn regex_escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_topology_policies_repeat_the_quorum_arguments_and_match_only_their_queues() {
        let t = topology("pay.v2", 10).unwrap();
        assert_eq!(t.queues.len(), 14);
        assert_eq!(t.queues[0].arguments["x-delivery-limit"], ArgValue::Int(9));
        assert_eq!(t.policies[0].pattern, "^pay\\.v2$");
        assert_eq!(t.policies[1].pattern, "^pay\\.v2\\.delay\\.[0-9]+$");
        assert_eq!(
            t.policies[0].definition["dead-letter-routing-key"],
            ArgValue::Text("pay.v2.dlq".into())
        );
        assert_eq!(t.policies[0].definition["delivery-limit"], ArgValue::Int(9));
        assert!(!t.policies[1].definition.contains_key("delivery-limit"));
        assert!(!t.policies[1].definition.contains_key("message-ttl"));
        // Each policy's keys are exactly the queue arguments of the queues it names.
        for q in t.queues.iter().filter(|q| q.kind == "quorum") {
            let policy = if q.name == "pay.v2" {
                &t.policies[0]
            } else {
                &t.policies[1]
            };
            for (k, v) in &policy.definition {
                assert_eq!(
                    q.arguments.get(format!("x-{k}").as_str()),
                    Some(v),
                    "{}",
                    q.name
                );
            }
        }
        assert_eq!(regex_escape("a.b+c"), "a\\.b\\+c");
    }

    #[test]
    fn the_ladder_routes_to_the_largest_step_not_above_the_delay_and_rounds_short_ones_up() {
        let n = Names::new("q").unwrap();
        assert_eq!(n.route(Duration::ZERO), "q");
        assert_eq!(n.route(Duration::from_millis(100)), "q.delay.250");
        assert_eq!(n.route(Duration::from_millis(250)), "q.delay.250");
        assert_eq!(n.route(Duration::from_millis(1_999)), "q.delay.1000");
        assert_eq!(n.route(Duration::from_secs(3_600)), "q.delay.512000");
    }
}
