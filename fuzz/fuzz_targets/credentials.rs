//! libFuzzer entry for `keygate::fuzzing::credentials` (its invariants are documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keygate::fuzzing::credentials(data));
