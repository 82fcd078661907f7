#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis_proxy::fuzzing::forwarded(data));
