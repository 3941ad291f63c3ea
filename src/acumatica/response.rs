//! The token response as Acumatica really sends it.
//!
//! Parsing is deliberately lenient about everything except the access token: a
//! refresh answer may carry a rotated refresh token that has already replaced the
//! old one on the server, and refusing the whole answer over an odd `expires_in`
//! (Acumatica sometimes sends `"3600"`) or a missing `token_type` would lose that
//! token and force the customer to re-authorize.

use std::time::Duration;

use oauth2::basic::BasicTokenType;
use oauth2::{AccessToken, RefreshToken, Scope, TokenResponse};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A token endpoint answer: `access_token` is required, everything else optional.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "RawTokenResponse")]
pub struct AcumaticaTokenResponse {
    access_token: AccessToken,
    #[serde(serialize_with = "serialize_token_type")]
    token_type: BasicTokenType,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_in: Option<u64>,
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

/// The wire shape, before leniency is applied.
#[derive(Deserialize)]
struct RawTokenResponse {
    access_token: Option<Value>,
    token_type: Option<Value>,
    expires_in: Option<Value>,
    refresh_token: Option<Value>,
    scope: Option<Value>,
}

/// Why an answer is not a token response. Carries no part of the answer.
#[derive(Debug, thiserror::Error)]
#[error("the answer has no access_token string")]
pub struct NotAToken;

impl TryFrom<RawTokenResponse> for AcumaticaTokenResponse {
    type Error = NotAToken;

    fn try_from(raw: RawTokenResponse) -> Result<Self, NotAToken> {
        let access_token = match raw.access_token {
            Some(Value::String(s)) if !s.is_empty() => AccessToken::new(s),
            _ => return Err(NotAToken),
        };
        let token_type = match raw.token_type {
            Some(Value::String(s)) if s.eq_ignore_ascii_case("bearer") => BasicTokenType::Bearer,
            Some(Value::String(s)) if s.eq_ignore_ascii_case("mac") => BasicTokenType::Mac,
            Some(Value::String(s)) if !s.is_empty() => BasicTokenType::Extension(s),
            _ => BasicTokenType::Bearer,
        };
        let refresh_token = match raw.refresh_token {
            Some(Value::String(s)) if !s.is_empty() => Some(RefreshToken::new(s)),
            _ => None,
        };
        let scopes = match raw.scope {
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
        Ok(AcumaticaTokenResponse {
            access_token,
            token_type,
            expires_in: raw.expires_in.as_ref().and_then(lenient_seconds),
            refresh_token,
            scopes,
        })
    }
}

/// `3600`, `3600.0` or `"3600"`; anything else (negative, garbage) counts as absent.
fn lenient_seconds(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0 && *f < 1e12)
                .map(|f| f.round() as u64)
        }),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
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
