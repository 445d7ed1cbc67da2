//! See fuzz/README.md for what this target hunts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| servicegroup_fuzz::check::differential(data));
