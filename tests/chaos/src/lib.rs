//! What the chaos harness (`just chaos`, src/main.rs), the soak (`just soak`,
//! src/bin/soak.rs) and the drills (`just drill`, src/bin/drill.rs) share: `mix` (the
//! messages), `target` (the servers behind the harness's TCP proxies, and the ledger),
//! `workers` (the worker processes).

pub mod mix;
pub mod target;
pub mod workers;
