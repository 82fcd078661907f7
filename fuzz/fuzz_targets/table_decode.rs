#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis_table::fuzzing::table_decode(data));
