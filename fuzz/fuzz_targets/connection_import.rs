//! `connection import` records: any JSON (or not) through `parse_import` never
//! panics; every problem names its record on one line without control
//! characters; and no message depends on what a secret field holds, checked by
//! parsing again with every secret replaced and comparing the messages.
#![no_main]

use acutoken::cli::import::parse_import;
use acutoken::config::Config;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// The same document with every secret value replaced by one of the same
/// JSON type and validity, so only its content differs.
fn replace_secrets(v: &mut Value) {
    if let Value::Array(records) = v {
        for r in records {
            if let Value::Object(fields) = r {
                for key in ["client_secret", "refresh_token"] {
                    if let Some(s) = fields.get_mut(key) {
                        *s = match &*s {
                            Value::String(t) if t.trim().is_empty() => Value::String(t.clone()),
                            Value::String(t) => Value::String("Q".repeat(t.chars().count())),
                            Value::Number(_) => Value::from(7),
                            Value::Bool(b) => Value::Bool(!b),
                            Value::Array(_) => Value::Array(vec![]),
                            Value::Object(_) => Value::Object(Default::default()),
                            Value::Null => Value::Null,
                        };
                    }
                }
            }
        }
    }
}

fuzz_target!(|text: &str| {
    let config = Config::default();
    let now = chrono::DateTime::from_timestamp(1_780_000_000, 0).unwrap();
    let Ok(parsed) = parse_import(text, &config, now) else {
        return;
    };
    for (pos, msg) in &parsed.problems {
        assert!(msg.starts_with(&format!("record {pos}")), "{msg:?}");
        assert!(!msg.chars().any(char::is_control), "{msg:?}");
    }
    for (_, rec) in &parsed.records {
        assert!(
            rec.client_secret
                .as_ref()
                .is_some_and(|s| !s.expose().trim().is_empty())
        );
        assert!(acutoken::model::validate_name(&rec.conn.name).is_ok());
    }
    let Ok(doc) = serde_json::from_str::<Value>(text) else {
        return;
    };
    // Both sides go through the same re-serialization (which may shorten
    // numbers), so only the secrets differ.
    let before = parse_import(&doc.to_string(), &config, now).expect("still an array");
    let mut replaced = doc;
    replace_secrets(&mut replaced);
    let again = parse_import(&replaced.to_string(), &config, now).expect("still an array");
    assert_eq!(
        before.problems, again.problems,
        "a message depends on a secret's value"
    );
    assert_eq!(before.records.len(), again.records.len());
});
