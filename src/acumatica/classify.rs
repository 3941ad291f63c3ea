//! Turning what came back from a token endpoint into a [`TokenError`] class.
//!
//! Everything here is plain functions over a status, headers and at most a
//! bounded body, so each Acumatica behaviour has a unit test. A response body is
//! read to classify it and then forgotten: reasons carry the status, content type,
//! length and the OAuth `error` code, never the body, because bodies can echo
//! submitted form fields (the client secret, the refresh token).

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, DATE, HeaderMap, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE};
use serde::Deserialize;
use url::Url;

use crate::model::FailureKind;

/// A failed token request, classified.
///
/// `reason` is safe to log and to store as `last_error`: it never holds a response
/// body or a secret. `sent` says whether the request may have reached the server:
/// when it is `false` the refresh token was certainly not consumed and may be sent
/// again; when `true` it may have been (DESIGN §3, invariant 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct TokenError {
    /// What the engine does next: retry later, ask for a new secret, or ask the
    /// customer to re-authorize.
    pub kind: FailureKind,
    /// The server's Retry-After, when it gave one: retry no earlier than this.
    pub retry_after: Option<Duration>,
    /// One line for logs, alerts and `last_error`.
    pub reason: String,
    /// False when refused before any byte left (address policy, bad URL, no
    /// connection): the refresh token was not consumed.
    pub sent: bool,
}

impl TokenError {
    /// A transient failure: try again later.
    pub fn transient(reason: impl Into<String>, sent: bool) -> Self {
        TokenError {
            kind: FailureKind::Transient,
            retry_after: None,
            reason: reason.into(),
            sent,
        }
    }

    /// True when retrying later may succeed without a human.
    pub fn is_transient(&self) -> bool {
        self.kind == FailureKind::Transient
    }
}

/// The largest answer read from a token endpoint. A token answer is a few KiB;
/// anything larger is not one and is not read further.
pub const MAX_BODY: usize = 64 * 1024;

/// How much of a body was read.
#[derive(Debug)]
pub enum Body {
    /// The whole body, at most [`MAX_BODY`] bytes.
    Complete(Vec<u8>),
    /// More than [`MAX_BODY`] bytes, by Content-Length or by reading: not read further.
    TooLarge,
    /// The connection broke or timed out while the body was read.
    Unreadable,
}

/// Describes a response for a reason: `(text/html, 1532 bytes)`.
pub fn describe(headers: &HeaderMap, body: &Body) -> String {
    let ct = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or("").trim())
        .filter(|s| !s.is_empty() && s.len() <= 100 && s.chars().all(|c| c.is_ascii_graphic()))
        .unwrap_or("no content type");
    match body {
        Body::Complete(b) if b.is_empty() => format!("{ct}, empty body"),
        Body::Complete(b) => format!("{ct}, {} bytes", b.len()),
        Body::TooLarge => format!("{ct}, more than {MAX_BODY} bytes, not read further"),
        Body::Unreadable => format!("{ct}, body cut off"),
    }
}

fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(r) => format!("{} {r}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// Classifies a response. `None` means "a 200 with a complete, non-empty JSON body:
/// let the OAuth parser decide whether it is a token".
pub fn classify_response(
    status: StatusCode,
    headers: &HeaderMap,
    body: &Body,
    request_url: &Url,
) -> Option<TokenError> {
    let what = describe(headers, body);
    let retry_after = retry_after(headers);
    let text = match body {
        Body::Complete(b) => Some(b.as_slice()),
        _ => None,
    };
    let err = |kind: FailureKind, reason: String| {
        Some(TokenError {
            kind,
            retry_after,
            reason,
            sent: true,
        })
    };

    if text.is_some_and(mentions_login_limit) {
        return err(
            FailureKind::Transient,
            format!(
                "the instance's API login limit was reached (token endpoint answered {}, {what}); Acumatica frees a login when a session ends",
                status_text(status)
            ),
        );
    }

    if status == StatusCode::OK {
        return match body {
            Body::Complete(b) if b.is_empty() => err(
                FailureKind::Transient,
                "token endpoint answered 200 OK with an empty body, not a token".into(),
            ),
            Body::Complete(_) if !is_json(headers) => err(
                FailureKind::Transient,
                format!("token endpoint answered 200 OK ({what}), not a token"),
            ),
            Body::Complete(_) => None,
            _ => err(
                FailureKind::Transient,
                format!("token endpoint answered 200 OK ({what}), not a token"),
            ),
        };
    }

    if status.is_redirection() {
        return err(
            FailureKind::Transient,
            redirect_reason(status, headers, request_url),
        );
    }

    if status == StatusCode::TOO_MANY_REQUESTS {
        return err(
            FailureKind::Transient,
            format!(
                "token endpoint is rate limiting: answered {} ({what})",
                status_text(status)
            ),
        );
    }

    if status.is_server_error() {
        return err(
            FailureKind::Transient,
            format!("token endpoint answered {} ({what})", status_text(status)),
        );
    }

    if status.is_client_error() {
        let code = text
            .and_then(oauth_error_code)
            .or_else(|| www_authenticate_error(headers));
        return match code {
            Some(code) => {
                let (kind, meaning) = classify_oauth_error(&code);
                err(
                    kind,
                    format!(
                        "token endpoint answered {} with `{code}`: {meaning}",
                        status_text(status)
                    ),
                )
            }
            None => err(
                FailureKind::Transient,
                format!(
                    "token endpoint answered {} ({what}){}",
                    status_text(status),
                    if status == StatusCode::NOT_FOUND {
                        ": check the instance URL and its virtual directory"
                    } else {
                        ""
                    }
                ),
            ),
        };
    }

    err(
        FailureKind::Transient,
        format!(
            "token endpoint answered {} ({what}), not a token",
            status_text(status)
        ),
    )
}

/// Maps an OAuth `error` code to a class and what it means for the operator.
///
/// - `invalid_client`: the secret is wrong or expired, or the application is
///   inactive: a new secret.
/// - `unauthorized_client`, `unsupported_grant_type`, `invalid_scope`: the Connected
///   Application is configured so that this client may not do this (wrong flow, scope
///   not allowed). Retrying cannot help and the operator, who owns the application,
///   must act, so they count as `invalid_client`.
/// - `invalid_grant`: the refresh token or code is expired, revoked or used: the
///   customer re-authorizes.
/// - `invalid_request` and anything unknown (`server_error`,
///   `temporarily_unavailable`, vendor codes): transient. acutoken always sends the
///   same well-formed request, so a server calling it malformed is treated as the
///   server's passing trouble; the server refused it before judging the grant, and
///   after an hour of it the `refresh_failed` alert brings a human anyway.
pub fn classify_oauth_error(code: &str) -> (FailureKind, &'static str) {
    match code {
        "invalid_client" => (
            FailureKind::InvalidClient,
            "the client secret is wrong or expired, or the Connected Application is inactive",
        ),
        "unauthorized_client" => (
            FailureKind::InvalidClient,
            "the Connected Application may not use this flow: check its OAuth flow on SM303010",
        ),
        "unsupported_grant_type" => (
            FailureKind::InvalidClient,
            "the Connected Application does not accept this grant type: check its OAuth flow on SM303010",
        ),
        "invalid_scope" => (
            FailureKind::InvalidClient,
            "the Connected Application does not allow the requested scopes",
        ),
        "invalid_grant" => (
            FailureKind::InvalidGrant,
            "the refresh token or code is expired, revoked or already used",
        ),
        "invalid_request" => (
            FailureKind::Transient,
            "the server called the request malformed; retrying",
        ),
        _ => (
            FailureKind::Transient,
            "an error code acutoken does not know; retrying",
        ),
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|ct| {
            let ct = ct.to_ascii_lowercase();
            ct.starts_with("application/json") || ct.contains("+json")
        })
}

fn mentions_login_limit(body: &[u8]) -> bool {
    const NEEDLE: &[u8] = b"api login limit";
    body.windows(NEEDLE.len())
        .any(|w| w.eq_ignore_ascii_case(NEEDLE))
}

/// The OAuth `error` code of an error body, only when it looks like a code: it is
/// echoed into reasons, so free text from the body must not pass.
fn oauth_error_code(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct OAuthError {
        error: String,
    }
    let parsed: OAuthError = serde_json::from_slice(body).ok()?;
    safe_code(&parsed.error)
}

fn safe_code(code: &str) -> Option<String> {
    let ok = !code.is_empty()
        && code.len() <= 64
        && code
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    ok.then(|| code.to_string())
}

/// `WWW-Authenticate: Bearer error="invalid_client"` on a 401 with no JSON body.
fn www_authenticate_error(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(WWW_AUTHENTICATE)?.to_str().ok()?;
    let start = v.find("error=\"")? + "error=\"".len();
    let end = v[start..].find('"')? + start;
    safe_code(&v[start..end])
}

fn redirect_reason(status: StatusCode, headers: &HeaderMap, request_url: &Url) -> String {
    let target = headers
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|loc| request_url.join(loc).ok());
    let Some(target) = target else {
        return format!(
            "token endpoint answered {} without a usable Location; redirects are never followed",
            status_text(status)
        );
    };
    let to_error_page = target
        .path_segments()
        .and_then(|mut s| s.next_back())
        .is_some_and(|last| last.eq_ignore_ascii_case("Error.aspx"));
    if to_error_page {
        return format!(
            "token endpoint answered {} to Acumatica's error page (Error.aspx): the instance is failing or restarting",
            status_text(status)
        );
    }
    let host = target.host_str().unwrap_or("an unknown host");
    let port = target.port().map(|p| format!(":{p}")).unwrap_or_default();
    format!(
        "token endpoint answered {} redirecting to {host}{port}; redirects are never followed: check the instance URL",
        status_text(status)
    )
}

/// The longest Retry-After believed: a day. Retry-After may push a retry past
/// `renewal.retry_max` (the server knows its own limits), but a server asking
/// for years (`Retry-After: 99999999999`, or a date centuries ahead) would
/// silently park the connection until its deadline rule cuts in, and with no
/// deadline known, for ever. A day is longer than any real login-limit or
/// maintenance window, and the next try after it asks the server again.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Retry-After as seconds, or as an HTTP date measured against the response's own
/// `Date` (the server's clock, so local clock skew does not distort it). A date
/// without a `Date` header is ignored and the engine's backoff applies. Either
/// form is bounded by [`MAX_RETRY_AFTER`]; seconds too large for a `u64` count
/// as that bound too, and a date before `Date` as zero.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        let secs = v.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let now = headers.get(DATE)?.to_str().ok()?;
    let now = chrono::DateTime::parse_from_rfc2822(now.trim()).ok()?;
    let asked = at
        .signed_duration_since(now)
        .to_std()
        .unwrap_or(Duration::ZERO);
    Some(asked.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn url() -> Url {
        Url::parse("https://erp.example.com/AcumaticaERP/identity/connect/token").unwrap()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn classify(status: u16, pairs: &[(&'static str, &str)], body: &str) -> Option<TokenError> {
        classify_response(
            StatusCode::from_u16(status).unwrap(),
            &headers(pairs),
            &Body::Complete(body.as_bytes().to_vec()),
            &url(),
        )
    }

    const JSON: (&str, &str) = ("content-type", "application/json; charset=utf-8");

    #[test]
    fn oauth_codes_map_to_kinds() {
        let cases = [
            (400, "invalid_client", FailureKind::InvalidClient),
            (401, "invalid_client", FailureKind::InvalidClient),
            (400, "unauthorized_client", FailureKind::InvalidClient),
            (400, "unsupported_grant_type", FailureKind::InvalidClient),
            (400, "invalid_scope", FailureKind::InvalidClient),
            (400, "invalid_grant", FailureKind::InvalidGrant),
            (400, "invalid_request", FailureKind::Transient),
            (400, "temporarily_unavailable", FailureKind::Transient),
        ];
        for (status, code, kind) in cases {
            let body = format!(r#"{{"error":"{code}","error_description":"SECRET-DESC"}}"#);
            let e = classify(status, &[JSON], &body).unwrap();
            assert_eq!(e.kind, kind, "{code}");
            assert!(e.reason.contains(code));
            assert!(!e.reason.contains("SECRET-DESC"));
            assert!(e.sent);
        }
    }

    #[test]
    fn error_codes_are_not_echoed_unless_they_look_like_codes() {
        let e = classify(400, &[JSON], r#"{"error":"rt=SECRET value"}"#).unwrap();
        assert_eq!(e.kind, FailureKind::Transient);
        assert!(!e.reason.contains("SECRET"));
    }

    #[test]
    fn www_authenticate_code_counts_when_the_body_is_empty() {
        let e = classify(
            401,
            &[("www-authenticate", r#"Bearer error="invalid_client""#)],
            "",
        )
        .unwrap();
        assert_eq!(e.kind, FailureKind::InvalidClient);
    }

    #[test]
    fn transient_classes() {
        let html = ("content-type", "text/html");
        for (status, pairs, body) in [
            (503, vec![html], "<html>Service Unavailable</html>"),
            (502, vec![], ""),
            (500, vec![JSON], r#"{"error":"invalid_grant"}"#),
            (429, vec![("retry-after", "30")], ""),
            (400, vec![html], "<html>bad</html>"),
            (404, vec![html], "<html>nope</html>"),
            (403, vec![], ""),
            (204, vec![], ""),
            (200, vec![html], "<html>login</html>"),
            (200, vec![JSON], ""),
        ] {
            let e = classify(status, &pairs, body).unwrap_or_else(|| panic!("{status} passed"));
            assert_eq!(e.kind, FailureKind::Transient, "{status} {body}");
            assert!(e.sent);
            assert!(!e.reason.contains("<html>"));
        }
        assert!(classify(200, &[JSON], r#"{"access_token":"x"}"#).is_none());
        assert!(classify(200, &[], r#"{"access_token":"x"}"#).is_none());
    }

    #[test]
    fn api_login_limit_is_transient_whatever_the_status() {
        for status in [429, 400, 500, 200] {
            let e = classify(
                status,
                &[("content-type", "text/plain"), ("retry-after", "5")],
                "API Login Limit reached for user admin",
            )
            .unwrap();
            assert_eq!(e.kind, FailureKind::Transient);
            assert!(e.reason.contains("login limit"), "{}", e.reason);
            assert!(!e.reason.contains("admin"));
            assert_eq!(e.retry_after, Some(Duration::from_secs(5)));
        }
    }

    #[test]
    fn redirects_name_the_error_page_or_the_host() {
        let e = classify(
            302,
            &[("location", "/AcumaticaERP/Frames/Error.aspx?x=1")],
            "",
        )
        .unwrap();
        assert!(e.reason.contains("Error.aspx"), "{}", e.reason);
        let e = classify(
            301,
            &[("location", "https://login.evil.example:8443/steal?rt=1")],
            "",
        )
        .unwrap();
        assert!(e.reason.contains("login.evil.example:8443"), "{}", e.reason);
        assert!(!e.reason.contains("rt=1"));
        let e = classify(307, &[], "").unwrap();
        assert!(e.reason.contains("without a usable Location"));
        assert_eq!(e.kind, FailureKind::Transient);
    }

    #[test]
    fn retry_after_seconds_or_date() {
        assert_eq!(
            retry_after(&headers(&[("retry-after", "120")])),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            retry_after(&headers(&[
                ("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT"),
                ("date", "Wed, 21 Oct 2015 07:26:30 GMT"),
            ])),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            retry_after(&headers(&[
                ("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT"),
                ("date", "Wed, 21 Oct 2015 08:00:00 GMT"),
            ])),
            Some(Duration::ZERO)
        );
        assert_eq!(
            retry_after(&headers(&[(
                "retry-after",
                "Wed, 21 Oct 2015 07:28:00 GMT"
            )])),
            None
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
    }

    #[test]
    fn retry_after_is_bounded() {
        for v in [
            "86401",
            "10000000000000",
            "18446744073709551615",
            "99999999999999999999999999999999",
        ] {
            assert_eq!(
                retry_after(&headers(&[("retry-after", v)])),
                Some(MAX_RETRY_AFTER),
                "{v}"
            );
        }
        assert_eq!(
            retry_after(&headers(&[
                ("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT"),
                ("date", "Thu, 01 Jan 1970 00:00:00 GMT"),
            ])),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "-5")])), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "1.5")])), None);
    }

    #[test]
    fn large_and_cut_bodies_are_described_not_read() {
        let h = headers(&[("content-type", "application/json")]);
        let e = classify_response(StatusCode::OK, &h, &Body::TooLarge, &url()).unwrap();
        assert!(e.reason.contains("not read further"), "{}", e.reason);
        let e = classify_response(StatusCode::BAD_GATEWAY, &h, &Body::Unreadable, &url()).unwrap();
        assert!(e.reason.contains("502"));
    }
}
