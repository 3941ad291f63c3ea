//! `Config::from_toml_str` on any text: never panics; neither its error nor
//! the masked output shows a webhook URL or signing secret given in the text.
#![no_main]

use acutoken::config::Config;
use libfuzzer_sys::fuzz_target;

/// Every string under a key whose value is a secret, anywhere in the document.
fn secrets(v: &toml::Value, key: Option<&str>, out: &mut Vec<String>) {
    match v {
        toml::Value::String(s) => {
            if matches!(key, Some("url" | "secret")) && s.len() >= 12 {
                out.push(s.clone());
            }
        }
        toml::Value::Array(a) => a.iter().for_each(|x| secrets(x, key, out)),
        toml::Value::Table(t) => t.iter().for_each(|(k, x)| secrets(x, Some(k), out)),
        _ => {}
    }
}

fuzz_target!(|text: &str| {
    let mut hidden = Vec::new();
    if let Ok(t) = toml::from_str::<toml::Table>(text) {
        secrets(&toml::Value::Table(t), None, &mut hidden);
    }
    let shown = match Config::from_toml_str(text) {
        Ok(c) => {
            let _ = c.digest_schedule();
            c.masked_toml()
        }
        Err(e) => e.to_string(),
    };
    for s in &hidden {
        // Skip values that also appear in the text outside their secret (e.g. as a key).
        if text.matches(s.as_str()).count() == 1 {
            assert!(!shown.contains(s.as_str()), "secret shown: {shown}");
        }
    }
});
