//! Fuzz target `sqs_message`: see `sluice::fuzzing::sqs_message`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::sqs_message(data));
