//! libFuzzer entry for `keygate::fuzzing::route_matching` (its invariants are documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keygate::fuzzing::route_matching(data));
