//! The authorization callback listener (DESIGN §7): takes the connection from
//! the state alone, exchanges the code, stores the grant, answers a small page.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;

use super::pages::page;
use crate::renewal::authorize::{self, Completion};
use crate::renewal::engine::Engine;

#[derive(Clone)]
struct Cb {
    engine: Arc<Engine>,
    wake: crate::alerts::Wake,
}

/// The callback route at `path`.
pub fn router(engine: Arc<Engine>, wake: crate::alerts::Wake, path: &str) -> Router {
    Router::new()
        .route(path, get(callback))
        .with_state(Cb { engine, wake })
}

async fn callback(State(cb): State<Cb>, Query(q): Query<HashMap<String, String>>) -> Response {
    if let Some(err) = q.get("error") {
        let code: String = err
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(64)
            .collect();
        return page(
            StatusCode::BAD_REQUEST,
            "Not connected",
            &format!(
                "The authorization was not granted ({code}). Ask your integration partner for a new link."
            ),
        );
    }
    let (Some(state), Some(code)) = (q.get("state"), q.get("code")) else {
        return page(
            StatusCode::BAD_REQUEST,
            "Not connected",
            "This address is missing its code or state. Open the link you were sent again.",
        );
    };
    if state.len() > 256 || code.len() > 4096 {
        return page(
            StatusCode::BAD_REQUEST,
            "Not connected",
            "This link is not valid.",
        );
    }
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
