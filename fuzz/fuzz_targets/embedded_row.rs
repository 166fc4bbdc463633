//! Fuzz target `embedded_row`: see `sluice::fuzzing::embedded_row`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::embedded_row(data));
