//! A model's chat template (Jinja, from its files), rendered.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llmos_meta::ChatMessage;

fuzz_target!(|data: &[u8]| {
    let Ok(template) = std::str::from_utf8(data) else {
        return;
    };
    let messages = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hi"),
        ChatMessage::new("assistant", "Hello."),
        ChatMessage::new("user", "Bye"),
    ];
    let _ = llmos_meta::render_chat(template, &messages, true, "<s>", "</s>");
});
