//! Fuzz target `envelope`: see `sluice::fuzzing::envelope`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::envelope(data));
