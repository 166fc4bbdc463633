//! The messages of a run: distinct payments, duplicates of them, and poison of every kind the
//! worker must dead-letter at once (each under the run's own payment-id prefix, so runs that
//! share the ledger table are counted apart).

use std::collections::BTreeMap;

use rand::{rngs::StdRng, Rng, SeedableRng};
use sluice::OutgoingMessage;

/// What the generator made.
pub struct Mix {
    /// In publishing order.
    pub messages: Vec<OutgoingMessage>,
    /// Distinct valid payments: each must be charged once.
    pub distinct_valid: u64,
    /// Their payment ids.
    pub valid_ids: Vec<String>,
    /// Extra copies of valid payments (same body, so the same idempotency key).
    pub duplicates: u64,
    /// Poison sent, by kind: each must be dead-lettered, none charged.
    pub poison: BTreeMap<&'static str, u64>,
}

impl Mix {
    /// Poison messages in all.
    pub fn poison_total(&self) -> u64 {
        self.poison.values().sum()
    }
}

fn body(id: &str, amount_cents: u64) -> String {
    format!(
        r#"{{"payment_id":"{id}","amount_cents":{amount_cents},"currency":"EUR","customer":"c-chaos"}}"#
    )
}

/// `n` messages: about 2% poison, 5% duplicates, the rest distinct payments `<prefix>pay-<i>`.
pub fn generate(n: usize, seed: u64, prefix: &str) -> Mix {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut mix = Mix {
        messages: Vec::with_capacity(n),
        distinct_valid: 0,
        valid_ids: Vec::new(),
        duplicates: 0,
        poison: BTreeMap::new(),
    };
    let mut valid: Vec<String> = Vec::new();
    for i in 0..n {
        let r: f64 = rng.gen();
        let mut poison = |kind: &'static str, msg: OutgoingMessage| {
            *mix.poison.entry(kind).or_default() += 1;
            msg
        };
        let msg = if r < 0.004 {
            poison(
                "not JSON",
                OutgoingMessage::new(format!("charge {i} please")),
            )
        } else if r < 0.008 {
            poison(
                "invalid UTF-8",
                OutgoingMessage::new(vec![0xff, 0xfe, b'{', 0x80]),
            )
        } else if r < 0.012 {
            poison(
                "missing field",
                OutgoingMessage::new(format!(r#"{{"payment_id":"{prefix}bad-{i}"}}"#)),
            )
        } else if r < 0.015 {
            poison(
                "zero amount",
                OutgoingMessage::new(body(&format!("{prefix}zero-{i}"), 0)),
            )
        } else if r < 0.018 {
            poison(
                "unsupported schema version",
                OutgoingMessage::new(body(&format!("{prefix}v2-{i}"), 100))
                    .header("schema-version", "2"),
            )
        } else if r < 0.020 {
            poison(
                "declined (over the limit)",
                OutgoingMessage::new(body(&format!("{prefix}big-{i}"), 90_000_000)),
            )
        } else if r < 0.070 && !valid.is_empty() {
            mix.duplicates += 1;
            OutgoingMessage::new(valid[rng.gen_range(0..valid.len())].clone())
        } else {
            mix.distinct_valid += 1;
            let id = format!("{prefix}pay-{i:06}");
            let b = body(&id, rng.gen_range(100..50_000));
            mix.valid_ids.push(id);
            valid.push(b.clone());
            OutgoingMessage::new(b)
        };
        mix.messages.push(msg);
    }
    mix
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_has_every_kind_and_adds_up() {
        let mix = generate(5_000, 7, "t-");
        assert_eq!(mix.poison.len(), 6, "{:?}", mix.poison);
        assert!(mix.duplicates > 100);
        assert_eq!(
            mix.distinct_valid + mix.duplicates + mix.poison_total(),
            5_000
        );
    }
}
