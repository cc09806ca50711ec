//! libFuzzer entry for `keygate::fuzzing::body_nonce` (its invariants are documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keygate::fuzzing::body_nonce(data));
