//! libFuzzer entry for `keygate::fuzzing::string_to_sign` (its invariants are documented there).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| keygate::fuzzing::string_to_sign(data));
