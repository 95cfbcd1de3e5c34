//! A Hugging Face tokenizer: `tokenizer.json`, `tokenizer_config.json` and
//! `generation_config.json` (the input split at two 0xFF bytes), then a
//! round trip and the chat template it brings.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // libFuzzer's hook aborts at any panic, even one the loader catches
    // (it turns the tokenizers library's panics into errors): restore the
    // default hook; a panic that escapes still aborts, across the FFI edge.
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| drop(std::panic::take_hook()));
    let mut parts = data.splitn(3, |&b| b == 0xFF);
    let json = parts.next().unwrap_or_default();
    let config = parts.next();
    let generation = parts.next();
    let dir = std::path::Path::new("<fuzz>");
    let Ok(t) = llmos_meta::Tokenizer::from_hf_files(dir, json, config, generation, None) else {
        return;
    };
    if let Ok(ids) = t.encode("Hello, world! 123", true) {
        let _ = t.decode(&ids, true);
    }
    if let Some(template) = &t.chat_template {
        let messages = [llmos_meta::ChatMessage::new("user", "Hi")];
        let _ = llmos_meta::render_chat(template, &messages, true, &t.bos_token(), &t.eos_token());
    }
});
