//! A safetensors file's header (length, JSON, dtypes, shapes, offsets).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = llmos_meta::weights::check_safetensors_header(data);
});
