//! Token-endpoint answers: any status, headers, content type and body through
//! `classify_response`, the lenient token parser and `retry_after`. Never
//! panics; a reason is one line and never carries the body: a marker placed in
//! the body (shaped like a refresh token) must not come out in it.
#![no_main]

use acutoken::acumatica::classify::{Body, classify_response, describe, retry_after};
use acutoken::acumatica::response::AcumaticaTokenResponse;
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

#[derive(Arbitrary, Debug)]
enum BodyShape {
    Complete,
    TooLarge,
    Unreadable,
}

#[derive(Arbitrary, Debug)]
struct Input {
    status: u16,
    headers: Vec<(u8, Vec<u8>)>,
    shape: BodyShape,
    body: Vec<u8>,
    /// Where the marker goes into the body, if anywhere.
    marker_at: Option<u16>,
    marker: [u8; 16],
}

const NAMES: &[&str] = &[
    "content-type",
    "retry-after",
    "date",
    "location",
    "www-authenticate",
    "content-length",
    "x-other",
];

/// Base64url-like, with at least one character an OAuth error code cannot
/// have, so the one field echoed on purpose (a safe `error` code) cannot match.
fn marker(raw: &[u8; 16]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=";
    let mut s: String = raw
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect();
    if !s.contains(['+', '/', '=']) {
        s.replace_range(7..8, "/");
    }
    s
}

fuzz_target!(|input: Input| {
    let Ok(status) = StatusCode::from_u16(input.status) else {
        return;
    };
    let mut headers = HeaderMap::new();
    for (n, v) in &input.headers {
        let name = HeaderName::from_static(NAMES[*n as usize % NAMES.len()]);
        if let Ok(v) = HeaderValue::from_bytes(v) {
            headers.append(name, v);
        }
    }
    let mark = marker(&input.marker);
    let mut bytes = input.body.clone();
    if let Some(at) = input.marker_at {
        let at = at as usize % (bytes.len() + 1);
        bytes.splice(at..at, mark.bytes());
    }
    let marked = input.marker_at.is_some();
    // A header may carry the same bytes by chance; only the body is under test.
    let in_headers = headers.values().any(|v| {
        v.as_bytes()
            .windows(mark.len())
            .any(|w| w == mark.as_bytes())
    });
    let body = match input.shape {
        BodyShape::Complete => Body::Complete(bytes.clone()),
        BodyShape::TooLarge => Body::TooLarge,
        BodyShape::Unreadable => Body::Unreadable,
    };
    let url =
        url::Url::parse("https://erp.example.com/AcumaticaERP/identity/connect/token").unwrap();

    let what = describe(&headers, &body);
    assert!(!what.chars().any(char::is_control), "{what:?}");
    let _ = retry_after(&headers);

    match classify_response(status, &headers, &body, &url) {
        Some(err) => {
            assert!(!err.reason.is_empty());
            assert!(
                !err.reason.chars().any(char::is_control),
                "{:?}",
                err.reason
            );
            if marked && !in_headers {
                assert!(
                    !err.reason.contains(&mark),
                    "body bytes in the reason: {:?}",
                    err.reason
                );
            }
            assert!(err.sent, "a response arrived, so the request was sent");
        }
        None => {
            // Only a complete 200 goes on to the token parser.
            assert_eq!(status, StatusCode::OK);
            let Body::Complete(b) = &body else {
                panic!("classified as a token without a complete body");
            };
            match serde_json::from_slice::<AcumaticaTokenResponse>(b) {
                Ok(t) => {
                    use oauth2::TokenResponse as _;
                    assert!(!t.access_token().secret().is_empty());
                    assert!(!t.token_type_str().is_empty());
                    assert!(t.refresh_token().is_none_or(|r| !r.secret().is_empty()));
                }
                Err(e) => {
                    if marked {
                        assert!(
                            !e.to_string().contains(&mark),
                            "body bytes in a parse error"
                        );
                    }
                }
            }
        }
    }
});
