#![no_main]
//! Arbitrary bytes through parse → thread → policy → compose.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    escalator::fuzzing::parse_thread(data);
});
