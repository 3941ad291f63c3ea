//! `acumatica::instance::normalize` on any text: never panics; what it accepts
//! is a fixed point with no scheme, query, fragment or trailing slash; what it
//! refuses is explained in one line without control characters.
#![no_main]

use acutoken::acumatica::instance::normalize;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &str| {
    match normalize(input) {
        Ok(out) => {
            assert!(!out.is_empty());
            assert!(!out.contains("://"), "scheme kept: {out:?}");
            assert!(!out.contains(['?', '#']), "query or fragment kept: {out:?}");
            assert!(!out.ends_with('/'), "trailing slash: {out:?}");
            assert!(!out.contains("//"), "empty segment: {out:?}");
            assert!(
                !out.chars().any(|c| c.is_whitespace() || c.is_control()),
                "{out:?}"
            );
            assert_eq!(
                normalize(&out).as_deref(),
                Ok(out.as_str()),
                "not idempotent: {input:?}"
            );
            // What is stored must also be what the token client builds a URL from.
            assert!(
                url::Url::parse(&format!("https://{out}/identity/connect/token")).is_ok(),
                "{out:?}"
            );
        }
        Err(e) => {
            let shown = e.to_string();
            assert!(!shown.chars().any(char::is_control), "{shown:?}");
        }
    }
});
