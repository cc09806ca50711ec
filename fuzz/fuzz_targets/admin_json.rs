//! libFuzzer entry for `keygate::fuzzing::admin_json` (its invariants are documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keygate::fuzzing::admin_json(data));
