//! The black-box tests of Sluice and its functions, as one test binary with a module per
//! subject: a test is named `<module>::<test>` (`cargo nextest run -p sluice-tests -E
//! 'test(/^sqs_e2e::/)'` runs one module). One binary rather than one per file, because each
//! binary links the AWS SDK, lapin and the rest again.
//!
//! A module that needs a backend is built only with the cargo feature of sluice-tests named
//! after it (`rabbitmq`, `sqs`, `lambda`, `postgres`, `redis`, `s3`; all on by default); the
//! embedded queue, the SQLite store and the function binaries' CLI are always tested.

// With every backend built each helper is used (an unused one is flagged); with fewer, the
// helpers only the left-out backends' modules use are not.
#[cfg_attr(
    not(all(
        feature = "rabbitmq",
        feature = "sqs",
        feature = "lambda",
        feature = "postgres",
        feature = "redis",
        feature = "s3"
    )),
    allow(dead_code)
)]
mod support;

mod bad_input;
mod cli;
mod e2e_charge_payment;
mod embedded_transport;
mod fuzz_seeds;
mod health;
mod new_function;
mod pipeline;
mod prometheus_scrape;
mod sqlite_store;
mod tls;
mod traces;
mod workflows;

#[cfg(feature = "lambda")]
mod cargo_lambda;
#[cfg(all(feature = "lambda", feature = "s3"))]
mod infra_aws;
#[cfg(feature = "lambda")]
mod lambda_mode;
#[cfg(feature = "lambda")]
mod local_esm;

// The harness binary is built with every transport; the short runs need PostgreSQL.
#[cfg(feature = "postgres")]
mod chaos;
#[cfg(all(feature = "postgres", feature = "rabbitmq"))]
mod drills;
#[cfg(feature = "postgres")]
mod e2e_exactly_once;
#[cfg(feature = "postgres")]
mod postgres_store;

#[cfg(feature = "rabbitmq")]
mod rabbitmq_acks;
#[cfg(feature = "rabbitmq")]
mod rabbitmq_e2e;
#[cfg(feature = "rabbitmq")]
mod rabbitmq_topology;
#[cfg(feature = "rabbitmq")]
mod rabbitmq_transport;

#[cfg(feature = "redis")]
mod redis_store;
#[cfg(feature = "redis")]
mod store_outage;

#[cfg(feature = "s3")]
mod s3_store;

#[cfg(all(feature = "rabbitmq", feature = "postgres", feature = "redis"))]
mod secrets;

#[cfg(feature = "sqs")]
mod sqs_e2e;
#[cfg(feature = "sqs")]
mod sqs_transport;
