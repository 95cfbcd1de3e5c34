//! A GGUF file (a model from anywhere): the reader, then the model config
//! and the tokenizer read from its metadata.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llmos_meta::gguf::GgufFile;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = GgufFile::from_bytes("<fuzz>", data) {
        let _ = llmos_meta::ModelConfig::from_gguf(&g);
        if let Ok(t) = llmos_meta::Tokenizer::from_gguf(&g) {
            if let Ok(ids) = t.encode("Hello, world", true) {
                let _ = t.decode(&ids, false);
            }
        }
    }
});
