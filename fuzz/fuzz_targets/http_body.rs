//! An OpenAI HTTP body (the first byte picks chat or completions).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((&pick, body)) = data.split_first() {
        let _ = llmos_coordinator::http::check_body(pick & 1 == 0, body);
    }
});
