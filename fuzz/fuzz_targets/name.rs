#![no_main]
//! Fuzz target: see `checks::name`.

#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::name(data));
