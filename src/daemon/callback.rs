//! The authorization callback listener (DESIGN §7): takes the connection from
//! the state alone, exchanges the code, stores the grant, answers a small page.

use std::sync::Arc;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;

use super::pages::page;
use crate::renewal::authorize::{self, Completion};
use crate::renewal::engine::Engine;

#[derive(Clone)]
struct Cb {
    engine: Arc<Engine>,
    wake: crate::store::alerts::Wake,
}

/// The callback route at `path`.
pub fn router(engine: Arc<Engine>, wake: crate::store::alerts::Wake, path: &str) -> Router {
    Router::new()
        .route(path, get(callback))
        .with_state(Cb { engine, wake })
}

/// The longest `state` accepted: ours are 43 characters; anything far longer
/// was not issued here.
pub const MAX_STATE: usize = 256;
/// The longest `code` accepted: Acumatica's are well under this.
pub const MAX_CODE: usize = 4096;

/// What a callback request asks for, read from its query string alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallbackQuery {
    /// `error=...`: the customer or Acumatica refused. `code` keeps only
    /// `[A-Za-z0-9_]`, at most 64 characters, so it is safe to show.
    Denied {
        /// The OAuth error code, filtered.
        code: String,
    },
    /// `code` or `state` is missing or empty: the page asks to open the link again.
    Incomplete,
    /// `code` or `state` is given twice, or longer than any issued: not a
    /// link this service made; nothing is looked up.
    Invalid,
    /// Exchange `code` for the connection `state` names.
    Complete {
        /// The state, as decoded.
        state: String,
        /// The authorization code, as decoded.
        code: String,
    },
}

/// Reads a callback's raw query string (without the `?`). Percent-decoding
/// replaces bytes that are not UTF-8, so no query is ever refused by the
/// extractor with a page that lacks the security headers.
pub fn parse_query(query: Option<&str>) -> CallbackQuery {
    let mut state: Vec<String> = Vec::new();
    let mut code: Vec<String> = Vec::new();
    let mut error: Option<String> = None;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "state" => state.push(v.into_owned()),
            "code" => code.push(v.into_owned()),
            "error" if error.is_none() => {
                error = Some(
                    v.chars()
                        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .take(64)
                        .collect(),
                )
            }
            _ => {}
        }
    }
    if let Some(code) = error {
        return CallbackQuery::Denied { code };
    }
    if state.len() > 1 || code.len() > 1 {
        return CallbackQuery::Invalid;
    }
    match (state.pop(), code.pop()) {
        (Some(s), Some(c)) if !s.is_empty() && !c.is_empty() => {
            if s.len() > MAX_STATE || c.len() > MAX_CODE {
                CallbackQuery::Invalid
            } else {
                CallbackQuery::Complete { state: s, code: c }
            }
        }
        _ => CallbackQuery::Incomplete,
    }
}

async fn callback(State(cb): State<Cb>, RawQuery(query): RawQuery) -> Response {
    let (state, code) = match parse_query(query.as_deref()) {
        CallbackQuery::Denied { code } => {
            return page(
                StatusCode::BAD_REQUEST,
                "Not connected",
                &format!(
                    "The authorization was not granted ({code}). Ask your integration partner for a new link."
                ),
            );
        }
        CallbackQuery::Incomplete => {
            return page(
                StatusCode::BAD_REQUEST,
                "Not connected",
                "This address is missing its code or state. Open the link you were sent again.",
            );
        }
        CallbackQuery::Invalid => {
            return page(
                StatusCode::BAD_REQUEST,
                "Not connected",
                "This link is not valid.",
            );
        }
        CallbackQuery::Complete { state, code } => (state, code),
    };
    let (state, code) = (&state, &code);
    let now = cb.engine.clock().now();
    let policy = cb.engine.policy();
    let client = cb.engine.client().clone();
    match authorize::complete(cb.engine.store(), &client, &policy, state, code, None, now).await {
        Ok(Completion::Connected { name }) => {
            cb.wake.poke();
            tracing::info!(connection = %name, "authorization completed through the callback");
            page(
                StatusCode::OK,
                "Connected",
                &format!("The connection {name} is authorized. You can close this page."),
            )
        }
        Ok(Completion::AlreadyConnected { name }) => page(
            StatusCode::OK,
            "Already connected",
            &format!("This link was already used to connect {name}. Nothing else is needed."),
        ),
        Ok(Completion::UnknownState) => page(
            StatusCode::BAD_REQUEST,
            "Not connected",
            "This link is not valid. Ask your integration partner for a new one.",
        ),
        Ok(Completion::Expired) => page(
            StatusCode::GONE,
            "Link expired",
            "This link has expired or was replaced by a newer one. Ask your integration partner for a new one.",
        ),
        Ok(Completion::Denied { .. }) => page(
            StatusCode::BAD_REQUEST,
            "Not connected",
            "The authorization was not granted.",
        ),
        Ok(Completion::ExchangeFailed { name, reason }) => {
            tracing::warn!(connection = %name, reason = %reason, "authorization code exchange failed");
            page(
                StatusCode::BAD_GATEWAY,
                "Not connected",
                "Acumatica did not accept the authorization. Your integration partner has been told; please try the link again later.",
            )
        }
        Ok(Completion::Disabled { name }) => {
            tracing::warn!(connection = %name, "an authorization link of a disabled connection was used: refused, nothing stored");
            super::pages::disabled(&name)
        }
        Err(e) => {
            tracing::error!(error = %e, "callback could not read the store");
            page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Try again",
                "The service is busy. Please open the link again in a minute.",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_complete_query_is_decoded() {
        assert_eq!(
            parse_query(Some("code=a%2Fb+c&state=S1&session_state=x")),
            CallbackQuery::Complete {
                state: "S1".into(),
                code: "a/b c".into()
            }
        );
    }

    #[test]
    fn error_wins_and_is_filtered() {
        assert_eq!(
            parse_query(Some("state=S&code=C&error=access_denied%3Cscript%3E")),
            CallbackQuery::Denied {
                code: "access_deniedscript".into()
            }
        );
    }

    #[test]
    fn missing_empty_repeated_or_oversized_parts_are_refused() {
        for q in [
            None,
            Some(""),
            Some("state=S"),
            Some("code=C"),
            Some("state=&code=C"),
        ] {
            assert_eq!(parse_query(q), CallbackQuery::Incomplete, "{q:?}");
        }
        let long_state = format!("state={}&code=C", "s".repeat(MAX_STATE + 1));
        let long_code = format!("state=S&code={}", "c".repeat(MAX_CODE + 1));
        for q in [
            "state=A&state=B&code=C",
            "state=A&code=B&code=C",
            &long_state,
            &long_code,
        ] {
            assert_eq!(parse_query(Some(q)), CallbackQuery::Invalid, "{q}");
        }
    }

    #[test]
    fn bytes_that_are_not_utf8_do_not_refuse_the_request() {
        assert!(matches!(
            parse_query(Some("state=%FF%FE&code=%C3")),
            CallbackQuery::Complete { .. }
        ));
    }
}
