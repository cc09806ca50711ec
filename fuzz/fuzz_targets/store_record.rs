//! libFuzzer entry for `keygate::fuzzing::store_record` (its invariants are documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keygate::fuzzing::store_record(data));
