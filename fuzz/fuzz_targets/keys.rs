//! Fuzz target: `tfa_rotator::fuzzing::keys` must neither panic nor hang on any input.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tfa_rotator::fuzzing::keys(data);
});
