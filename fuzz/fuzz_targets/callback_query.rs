//! The callback's query string: `parse_query` on any bytes never panics, only
//! a single well-sized `state` and `code` reach the store, the denial code is
//! filtered, and the page it leads to escapes everything it echoes.
#![no_main]

use acutoken::daemon::callback::{CallbackQuery, MAX_CODE, MAX_STATE, parse_query};
use acutoken::daemon::pages::escape;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: (&str, &str)| {
    let (query, echoed) = data;
    match parse_query(Some(query)) {
        CallbackQuery::Complete { state, code } => {
            assert!(!state.is_empty() && state.len() <= MAX_STATE);
            assert!(!code.is_empty() && code.len() <= MAX_CODE);
            let pairs: Vec<_> = url::form_urlencoded::parse(query.as_bytes()).collect();
            assert_eq!(pairs.iter().filter(|(k, _)| k == "state").count(), 1);
            assert_eq!(pairs.iter().filter(|(k, _)| k == "code").count(), 1);
            assert!(!pairs.iter().any(|(k, _)| k == "error"));
        }
        CallbackQuery::Denied { code } => {
            assert!(code.len() <= 64);
            assert!(code.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
        }
        CallbackQuery::Incomplete | CallbackQuery::Invalid => {}
    }
    assert_eq!(parse_query(Some(query)), parse_query(Some(query)));
    let escaped = escape(echoed);
    assert!(!escaped.contains(['<', '>', '"', '\'']), "{escaped:?}");
});
