//! libFuzzer entry for `keygate::fuzzing::config` (its invariants are documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keygate::fuzzing::config(data));
