//! Fuzz target `lambda_event`: see `sluice::fuzzing::lambda_event`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::lambda_event(data));
