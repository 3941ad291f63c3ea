//! The token response as Acumatica really sends it.
//!
//! Parsing is deliberately lenient about everything except the access token: a
//! refresh answer may carry a rotated refresh token that has already replaced the
//! old one on the server, and refusing the whole answer over an odd `expires_in`
//! (Acumatica sometimes sends `"3600"`) or a missing `token_type` would lose that
//! token and force the customer to re-authorize.
//!
//! The same goes for a hostile or broken `expires_in`: whatever it says (see
//! [`ExpiresIn`]), the answer is taken, and the lifetime acutoken believes is
//! at most [`MAX_ACCESS_LIFETIME`], so no later time arithmetic can overflow.
//! The known fields are read as raw JSON first, so even a number no `f64` can
//! hold (`1e400`, which serde_json refuses outright) does not cost the answer.

use std::borrow::Cow;
use std::time::Duration;

use oauth2::basic::BasicTokenType;
use oauth2::{AccessToken, RefreshToken, Scope, TokenResponse};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

pub use crate::model::MAX_ACCESS_LIFETIME;

/// What an answer's `expires_in` said, after leniency. Whatever it is, the
/// answer itself is accepted: it may carry a rotated refresh token that already
/// replaced the old one at the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpiresIn {
    /// Missing or `null`: the access token's expiry is unknown, so it is not
    /// handed out (a token request refreshes instead).
    #[default]
    Absent,
    /// Whole seconds, at most [`MAX_ACCESS_LIFETIME`]. `3600`, `"3600"`,
    /// `3600.0` and `" 60 "` are all accepted; a fraction is rounded to the
    /// nearest second. `0` means what it says: the access token is already
    /// expired and is never handed out, while the grant is kept as usual.
    Seconds(u64),
    /// Longer than [`MAX_ACCESS_LIFETIME`] (`10000000000000`, 2^63,
    /// `u64::MAX`, `1e400`, `"1e13"`): taken as that bound, and logged.
    Clamped,
    /// Present but not a non-negative number of seconds: negative, `"soon"`,
    /// `"NaN"`, `"inf"`, `true`, an object. Treated as [`ExpiresIn::Absent`], and logged.
    Unreadable,
}

impl ExpiresIn {
    /// The lifetime acutoken believes, at most [`MAX_ACCESS_LIFETIME`].
    pub fn lifetime(self) -> Option<Duration> {
        match self {
            ExpiresIn::Seconds(s) => Some(Duration::from_secs(s)),
            ExpiresIn::Clamped => Some(MAX_ACCESS_LIFETIME),
            ExpiresIn::Absent | ExpiresIn::Unreadable => None,
        }
    }
}

/// A token endpoint answer: `access_token` is required, everything else optional.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "RawTokenResponse")]
pub struct AcumaticaTokenResponse {
    access_token: AccessToken,
    #[serde(serialize_with = "serialize_token_type")]
    token_type: BasicTokenType,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_in: Option<u64>,
    /// How `expires_in` was read, for the warning the client logs.
    #[serde(skip)]
    expires_in_seen: ExpiresIn,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<RefreshToken>,
    #[serde(rename = "scope", serialize_with = "serialize_scopes")]
    scopes: Option<Vec<Scope>>,
}

impl AcumaticaTokenResponse {
    /// `token_type` as sent (`Bearer` when absent).
    pub fn token_type_str(&self) -> &str {
        match &self.token_type {
            BasicTokenType::Bearer => "Bearer",
            BasicTokenType::Mac => "mac",
            BasicTokenType::Extension(s) => s,
        }
    }

    /// How the answer's `expires_in` was read (see [`ExpiresIn`]).
    pub fn expires_in_seen(&self) -> ExpiresIn {
        self.expires_in_seen
    }

    /// `scope` as one space-separated string.
    pub fn scope_str(&self) -> Option<String> {
        self.scopes
            .as_ref()
            .map(|v| v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" "))
    }
}

impl TokenResponse for AcumaticaTokenResponse {
    type TokenType = BasicTokenType;

    fn access_token(&self) -> &AccessToken {
        &self.access_token
    }
    fn token_type(&self) -> &BasicTokenType {
        &self.token_type
    }
    fn expires_in(&self) -> Option<Duration> {
        self.expires_in.map(Duration::from_secs)
    }
    fn refresh_token(&self) -> Option<&RefreshToken> {
        self.refresh_token.as_ref()
    }
    fn scopes(&self) -> Option<&Vec<Scope>> {
        self.scopes.as_ref()
    }
}

/// The wire shape, before leniency is applied. Every known field is kept as
/// raw JSON: decoding it into a `Value` here would let one out-of-range number
/// (`1e400`) fail the whole answer.
#[derive(Deserialize)]
struct RawTokenResponse {
    access_token: Option<Box<RawValue>>,
    token_type: Option<Box<RawValue>>,
    expires_in: Option<Box<RawValue>>,
    refresh_token: Option<Box<RawValue>>,
    scope: Option<Box<RawValue>>,
}

/// A raw field as a string, when it is one.
fn string(raw: &Option<Box<RawValue>>) -> Option<String> {
    raw.as_ref()
        .and_then(|r| serde_json::from_str::<String>(r.get()).ok())
}

/// Why an answer is not a token response. Carries no part of the answer.
#[derive(Debug, thiserror::Error)]
#[error("the answer has no access_token string")]
pub struct NotAToken;

impl TryFrom<RawTokenResponse> for AcumaticaTokenResponse {
    type Error = NotAToken;

    fn try_from(raw: RawTokenResponse) -> Result<Self, NotAToken> {
        let access_token = match string(&raw.access_token) {
            Some(s) if !s.is_empty() => AccessToken::new(s),
            _ => return Err(NotAToken),
        };
        let token_type = match string(&raw.token_type) {
            Some(s) if s.eq_ignore_ascii_case("bearer") => BasicTokenType::Bearer,
            Some(s) if s.eq_ignore_ascii_case("mac") => BasicTokenType::Mac,
            Some(s) if !s.is_empty() => BasicTokenType::Extension(s),
            _ => BasicTokenType::Bearer,
        };
        let refresh_token = match string(&raw.refresh_token) {
            Some(s) if !s.is_empty() => Some(RefreshToken::new(s)),
            _ => None,
        };
        let scope = raw
            .scope
            .as_ref()
            .and_then(|r| serde_json::from_str::<Value>(r.get()).ok());
        let scopes = match scope {
            Some(Value::String(s)) => {
                Some(s.split_whitespace().map(|x| Scope::new(x.into())).collect())
            }
            Some(Value::Array(items)) => Some(
                items
                    .into_iter()
                    .filter_map(|v| match v {
                        Value::String(s) => Some(Scope::new(s)),
                        _ => None,
                    })
                    .collect(),
            ),
            _ => None,
        };
        let expires_in_seen = raw
            .expires_in
            .as_deref()
            .map_or(ExpiresIn::Absent, lenient_seconds);
        Ok(AcumaticaTokenResponse {
            access_token,
            token_type,
            expires_in: expires_in_seen.lifetime().map(|d| d.as_secs()),
            expires_in_seen,
            refresh_token,
            scopes,
        })
    }
}

/// Reads `expires_in` as [`ExpiresIn`] describes: a JSON number or a string
/// holding one, never failing and never panicking.
pub fn lenient_seconds(raw: &RawValue) -> ExpiresIn {
    let text = raw.get().trim();
    let number: Cow<'_, str> = if text.starts_with('"') {
        match serde_json::from_str::<String>(text) {
            Ok(s) => Cow::Owned(s),
            Err(_) => return ExpiresIn::Unreadable,
        }
    } else if text == "null" {
        return ExpiresIn::Absent;
    } else {
        Cow::Borrowed(text)
    };
    seconds(number.trim())
}

/// Seconds from number text. Only number syntax is considered, so Rust's
/// `f64` parser never sees `inf` or `NaN`; a number too large for `u64` or
/// even for `f64` (`1e400` parses as infinity) is simply above the bound.
fn seconds(text: &str) -> ExpiresIn {
    let numeric = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'));
    if !numeric {
        return ExpiresIn::Unreadable;
    }
    let bound = MAX_ACCESS_LIFETIME.as_secs();
    let whole = match text.parse::<u64>() {
        Ok(n) => n,
        Err(_) => match text.parse::<f64>() {
            // `-0.4` rounds to zero and is harmless; a real negative is not a lifetime.
            Ok(f) if f.is_nan() || f <= -0.5 => return ExpiresIn::Unreadable,
            Ok(f) if f > bound as f64 => return ExpiresIn::Clamped,
            // In [-0.5, bound]: the cast cannot saturate or wrap.
            Ok(f) => f.round().max(0.0) as u64,
            Err(_) => return ExpiresIn::Unreadable,
        },
    };
    if whole > bound {
        ExpiresIn::Clamped
    } else {
        ExpiresIn::Seconds(whole)
    }
}

fn serialize_token_type<S: serde::Serializer>(t: &BasicTokenType, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(t.as_ref())
}

fn serialize_scopes<S: serde::Serializer>(v: &Option<Vec<Scope>>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_str(&v.iter().map(|x| x.as_str()).collect::<Vec<_>>().join(" ")),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<AcumaticaTokenResponse, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn expires_in_as_number_or_string() {
        for (json, want) in [
            (r#"{"access_token":"a","expires_in":3600}"#, Some(3600)),
            (r#"{"access_token":"a","expires_in":"3600"}"#, Some(3600)),
            (r#"{"access_token":"a","expires_in":3600.0}"#, Some(3600)),
            (r#"{"access_token":"a","expires_in":" 60 "}"#, Some(60)),
            (r#"{"access_token":"a","expires_in":-5}"#, None),
            (r#"{"access_token":"a","expires_in":"soon"}"#, None),
            (r#"{"access_token":"a","expires_in":null}"#, None),
            (r#"{"access_token":"a"}"#, None),
        ] {
            let r = parse(json).unwrap();
            assert_eq!(r.expires_in(), want.map(Duration::from_secs), "{json}");
        }
    }

    #[test]
    fn hostile_expires_in_is_bounded_and_never_costs_the_answer() {
        let day = MAX_ACCESS_LIFETIME.as_secs();
        for (value, want) in [
            ("0", ExpiresIn::Seconds(0)),
            ("1", ExpiresIn::Seconds(1)),
            ("0.4", ExpiresIn::Seconds(0)),
            ("-0.4", ExpiresIn::Seconds(0)),
            ("1.5", ExpiresIn::Seconds(2)),
            ("\"3600.0\"", ExpiresIn::Seconds(3600)),
            ("86400", ExpiresIn::Seconds(day)),
            ("86401", ExpiresIn::Clamped),
            ("2147483648", ExpiresIn::Clamped),
            ("10000000000000", ExpiresIn::Clamped),
            ("9223372036854775807", ExpiresIn::Clamped),
            ("9223372036854775808", ExpiresIn::Clamped),
            ("18446744073709551615", ExpiresIn::Clamped),
            ("18446744073709551616", ExpiresIn::Clamped),
            ("1e13", ExpiresIn::Clamped),
            ("1e400", ExpiresIn::Clamped),
            ("\"1e400\"", ExpiresIn::Clamped),
            ("\"10000000000000\"", ExpiresIn::Clamped),
            ("-1", ExpiresIn::Unreadable),
            ("-9223372036854775808", ExpiresIn::Unreadable),
            ("-1e400", ExpiresIn::Unreadable),
            ("\"NaN\"", ExpiresIn::Unreadable),
            ("\"inf\"", ExpiresIn::Unreadable),
            ("\"Infinity\"", ExpiresIn::Unreadable),
            ("\"\"", ExpiresIn::Unreadable),
            ("\"1-2\"", ExpiresIn::Unreadable),
            ("true", ExpiresIn::Unreadable),
            ("[3600]", ExpiresIn::Unreadable),
            ("{\"s\":1}", ExpiresIn::Unreadable),
            ("null", ExpiresIn::Absent),
        ] {
            let json =
                format!(r#"{{"access_token":"AT","refresh_token":"RT2","expires_in":{value}}}"#);
            let r = parse(&json).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(r.expires_in_seen(), want, "{json}");
            assert_eq!(r.expires_in(), want.lifetime(), "{json}");
            assert!(r.expires_in().is_none_or(|d| d <= MAX_ACCESS_LIFETIME));
            assert_eq!(r.refresh_token().unwrap().secret(), "RT2", "{json}");
        }
    }

    #[test]
    fn out_of_range_numbers_elsewhere_do_not_cost_the_answer() {
        let r = parse(
            r#"{"access_token":"AT","refresh_token":"RT2","scope":1e400,"token_type":-1e999,"other":1e400}"#,
        )
        .unwrap();
        assert_eq!(r.refresh_token().unwrap().secret(), "RT2");
        assert!(r.scope_str().is_none());
        assert_eq!(r.token_type_str(), "Bearer");
    }

    #[test]
    fn rotation_fields_are_read() {
        let r = parse(
            r#"{"access_token":"AT","token_type":"Bearer","expires_in":3600,
                "refresh_token":"RT2","scope":"api offline_access","id_token":"x.y.z"}"#,
        )
        .unwrap();
        assert_eq!(r.access_token().secret(), "AT");
        assert_eq!(r.refresh_token().unwrap().secret(), "RT2");
        assert_eq!(r.token_type_str(), "Bearer");
        assert_eq!(r.scope_str().as_deref(), Some("api offline_access"));
    }

    #[test]
    fn lenient_about_everything_but_the_access_token() {
        let r = parse(r#"{"access_token":"AT","refresh_token":"","token_type":7}"#).unwrap();
        assert!(r.refresh_token().is_none());
        assert_eq!(r.token_type_str(), "Bearer");
        assert!(parse(r#"{"access_token":""}"#).is_err());
        assert!(parse(r#"{"error":"invalid_grant"}"#).is_err());
        assert!(parse(r#"{"access_token":5}"#).is_err());
        assert!(parse("[]").is_err());
    }

    #[test]
    fn parse_errors_do_not_echo_the_answer() {
        let e = parse(r#"{"access_token":"","refresh_token":"SECRET-RT"}"#).unwrap_err();
        assert!(!e.to_string().contains("SECRET-RT"));
    }
}
