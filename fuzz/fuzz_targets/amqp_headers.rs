//! Fuzz target `amqp_headers`: see `sluice::fuzzing::amqp_headers`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::amqp_headers(data));
