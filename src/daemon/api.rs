//! The local API (DESIGN §7): HTTP/1.1 + JSON on the Unix socket, and on
//! `api.listen` behind bearer tokens.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::config::Config;
use crate::renewal::engine::{Engine, EngineError};
use crate::secret::Secret;
use crate::service::{Connections, RefreshError, TokenError};
use crate::status::{self, DaemonInfo};
use crate::store::StoreError;
use crate::store::StoreHandle;

/// What every handler can reach.
#[derive(Clone)]
pub struct Api {
    pub engine: Arc<Engine>,
    /// A separate read connection, so listing never waits behind a refresh's write.
    pub store: StoreHandle,
    pub config: tokio::sync::watch::Receiver<Arc<Config>>,
    pub ready: Arc<Readiness>,
    pub scheduler: tokio::sync::watch::Receiver<crate::renewal::scheduler::Snapshot>,
    /// Bearer tokens for `api.listen` (re-read on SIGHUP).
    pub tokens: Arc<std::sync::RwLock<Vec<Secret>>>,
    /// The key rotation slot (`/v1/keys/rotate`, socket only).
    pub rotator: Arc<super::rotate::Rotator>,
}

impl Api {
    /// The connections service on the daemon's engine and current configuration.
    fn connections(&self) -> Connections {
        Connections::with_engine(self.engine.clone(), self.config.borrow().clone())
    }
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": msg.into() }))).into_response()
}

fn from_store(e: StoreError) -> Response {
    match e {
        StoreError::UnknownConnection(_) => error(StatusCode::NOT_FOUND, e.to_string()),
        StoreError::Busy => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        // A damaged row or a value that does not open: the connection is set
        // aside until a human repairs or removes it, not a server failure.
        StoreError::Corrupt(_) | StoreError::Crypto(_) => error(
            StatusCode::CONFLICT,
            format!(
                "{e}; the connection is set aside: repair it or remove it (acutoken connection remove NAME)"
            ),
        ),
        other => error(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    }
}

fn from_engine(e: EngineError) -> Response {
    match e {
        EngineError::Store(s) => from_store(s),
        EngineError::Unsaved(m) => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, m);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            r
        }
        EngineError::Stopping => {
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                EngineError::Stopping.to_string(),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("10"));
            r
        }
        EngineError::RateLimited(wait) => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                EngineError::RateLimited(wait).to_string(),
            );
            let secs = wait.as_secs().max(1).to_string();
            if let Ok(v) = HeaderValue::from_str(&secs) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            r
        }
    }
}

/// The routes of the Unix socket: the shared ones and key rotation, which
/// carries key material and so is never served on TCP.
pub fn router(api: Api) -> Router {
    routes(api.clone()).merge(
        Router::new()
            .route("/v1/keys/rotate", post(rotate_start).get(rotate_progress))
            .with_state(api),
    )
}

/// The API routes shared by the socket and the TCP listener.
fn routes(api: Api) -> Router {
    Router::new()
        .route("/v1/connections", get(list))
        .route("/v1/connections/{name}", get(show))
        .route("/v1/connections/{name}/token", get(token))
        .route("/v1/connections/{name}/refresh", post(refresh))
        .route("/v1/status", get(status_handler))
        .route("/v1/alerts/test", post(alert_test))
        .merge(health_routes(api.ready.clone()))
        .with_state(api)
}

/// What `/readyz` answers: ready once started, until stopping begins, and
/// while the store's database can be reached (PostgreSQL; a SQLite file is
/// always there).
#[derive(Debug, Default)]
pub struct Readiness {
    started: AtomicBool,
    /// Why the store cannot be reached now, if it cannot.
    store_down: Mutex<Option<String>>,
}

impl Readiness {
    pub fn set_started(&self, started: bool) {
        self.started.store(started, Ordering::SeqCst);
    }

    /// Records whether the store can be reached; true when that changed.
    pub fn set_store_down(&self, why: Option<String>) -> bool {
        let mut down = self.store_down.lock().unwrap_or_else(|e| e.into_inner());
        let changed = down.is_some() != why.is_some();
        *down = why;
        changed
    }

    pub fn is_ready(&self) -> bool {
        self.started.load(Ordering::SeqCst)
            && self
                .store_down
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_none()
    }

    fn answer(&self) -> (StatusCode, String) {
        if !self.started.load(Ordering::SeqCst) {
            return (StatusCode::SERVICE_UNAVAILABLE, "starting\n".into());
        }
        match &*self.store_down.lock().unwrap_or_else(|e| e.into_inner()) {
            None => (StatusCode::OK, "ready\n".into()),
            Some(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the store cannot be reached: {why}\n"),
            ),
        }
    }
}

/// `/healthz` and `/readyz` (also on the metrics listener).
pub fn health_routes<S: Clone + Send + Sync + 'static>(ready: Arc<Readiness>) -> Router<S> {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move { ready.answer() }
            }),
        )
}

/// Requires `Authorization: Bearer <token>` matching a line of `api.token_file`
/// (constant-time), except for `/healthz`.
pub async fn bearer(State(api): State<Api>, req: Request, next: Next) -> Response {
    if req.uri().path() == "/healthz" {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    let ok = {
        let tokens = api.tokens.read().unwrap_or_else(|e| e.into_inner());
        let mut any = subtle::Choice::from(0u8);
        for t in tokens.iter() {
            any |= subtle::ConstantTimeEq::ct_eq(t.expose().as_bytes(), given.as_bytes());
        }
        bool::from(any) && !given.is_empty()
    };
    if !ok {
        let mut r = error(StatusCode::UNAUTHORIZED, "a valid bearer token is required");
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    next.run(req).await
}

/// The TCP flavour: the shared routes behind [`bearer`]. Key rotation is
/// refused without reading the body: key material never travels over TCP.
pub fn tcp_router(api: Api) -> Router {
    let state = api.clone();
    routes(api)
        .route(
            "/v1/keys/rotate",
            axum::routing::any(|| async {
                error(
                    StatusCode::FORBIDDEN,
                    "key rotation is served on the local socket only: run `acutoken key rotate` on the daemon's host",
                )
            }),
        )
        .layer(middleware::from_fn_with_state(state, bearer))
}

/// `POST /v1/keys/rotate` with `{"key": "<base64>", "source": "<where from>"}`:
/// switches the daemon to the new key and re-seals in the background
/// (202 with the progress; 409 while another rotation runs; 400 for a key
/// that is malformed or the primary already with nothing left to do).
async fn rotate_start(State(api): State<Api>, body: axum::body::Bytes) -> Response {
    let body = zeroize::Zeroizing::new(body.to_vec());
    let req: super::rotate::RotateRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "expected {\"key\": \"<new key, base64>\", \"source\": \"<file>\", \"current\": \"<store key, base64>\"}",
            );
        }
    };
    let source = crate::crypto::KeySource::File(std::path::PathBuf::from(&req.source));
    let key = match crate::crypto::Key::from_base64(req.key.trim(), source) {
        Ok(k) => k,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let Ok(current) = crate::crypto::Key::from_base64(
        req.current.trim(),
        crate::crypto::KeySource::File("the caller's store key".into()),
    ) else {
        return error(
            StatusCode::FORBIDDEN,
            super::rotate::StartError::NotHolder.to_string(),
        );
    };
    drop(req);
    let parts = super::rotate::Parts {
        store: api.store.clone(),
        config: api.config.borrow().clone(),
    };
    match api.rotator.start(key, current, parts).await {
        Ok(p) => (StatusCode::ACCEPTED, axum::Json(p)).into_response(),
        Err(
            e @ (super::rotate::StartError::Running(_)
            | super::rotate::StartError::OtherReplicas(_)),
        ) => error(StatusCode::CONFLICT, e.to_string()),
        Err(e @ super::rotate::StartError::Nothing(_)) => {
            error(StatusCode::BAD_REQUEST, e.to_string())
        }
        Err(e @ super::rotate::StartError::NotHolder) => {
            error(StatusCode::FORBIDDEN, e.to_string())
        }
        Err(super::rotate::StartError::Store(e)) => from_store(e),
    }
}

/// `GET /v1/keys/rotate`: how the current or last rotation stands.
async fn rotate_progress(State(api): State<Api>) -> Response {
    match api.rotator.progress() {
        Some(p) => axum::Json(p).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "no key rotation has run since the daemon started",
        ),
    }
}

/// Every connection; a row that does not read is listed as `{"id", "name",
/// "fault": {"column", "reason"}}` in its place, so one bad row never
/// hides the others.
async fn list(State(api): State<Api>) -> Response {
    match api.store.read(|st| st.list_with_faults()).await {
        Ok((rows, faults)) if faults.is_empty() => {
            let conns: Vec<_> = rows.into_iter().map(|r| r.conn).collect();
            axum::Json(conns).into_response()
        }
        Ok((rows, faults)) => axum::Json(crate::status::listing(&rows, &faults)).into_response(),
        Err(e) => from_store(e),
    }
}

async fn show(State(api): State<Api>, Path(name): Path<String>) -> Response {
    match api.store.read(move |st| st.get(&name)).await {
        Ok(row) => axum::Json(row.conn).into_response(),
        Err(e) => from_store(e),
    }
}

/// The answer to a token request, serialised straight from the cached token
/// (no intermediate JSON value on the hot path).
#[derive(serde::Serialize)]
struct TokenBody<'a> {
    access_token: &'a str,
    base_url: &'a str,
    expires_at: String,
    instance: &'a str,
    token_type: &'a str,
}

async fn token(State(api): State<Api>, Path(name): Path<String>) -> Response {
    metrics::counter!("acutoken_token_requests_total").increment(1);
    let no_store = |mut r: Response| {
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    };
    match api.connections().token(&name).await {
        Ok(t) => {
            metrics::counter!("acutoken_token_requests_served_total").increment(1);
            let body = TokenBody {
                access_token: t.access_token.expose(),
                base_url: &t.base_url,
                expires_at: crate::model::fmt_time(t.expires_at),
                instance: &t.instance,
                token_type: &t.token_type,
            };
            no_store(axum::Json(body).into_response())
        }
        Err(TokenError::NeedsHuman { state, action, .. }) => no_store(
            (
                StatusCode::CONFLICT,
                axum::Json(json!({ "state": state, "action": action })),
            )
                .into_response(),
        ),
        Err(TokenError::Unavailable {
            reason,
            retry_after,
            ..
        }) => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, reason);
            if let Ok(v) = HeaderValue::from_str(&retry_after.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            no_store(r)
        }
        Err(TokenError::Engine(e)) => from_engine(e),
        // The daemon's engine has its client: not reached.
        Err(e @ TokenError::Setup(_)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn refresh(State(api): State<Api>, Path(name): Path<String>) -> Response {
    match api.connections().refresh_now(&name).await {
        Ok(rep) => {
            let status = match rep.outcome.as_str() {
                "refused" | "busy" => StatusCode::CONFLICT,
                _ => StatusCode::OK,
            };
            (status, axum::Json(rep)).into_response()
        }
        Err(RefreshError::Engine(e)) => from_engine(e),
        // `refresh_now` does not wait for a claim: a busy one is its outcome.
        Err(e @ RefreshError::Busy { .. }) => error(StatusCode::CONFLICT, e.to_string()),
        // The daemon's engine has its client: not reached.
        Err(e @ RefreshError::Setup(_)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Builds the status the daemon reports about itself.
pub async fn current_status(api: &Api) -> Result<status::Status, StoreError> {
    let snap = api.scheduler.borrow().clone();
    let info = DaemonInfo {
        running: true,
        pid: Some(std::process::id()),
        ready: api.ready.is_ready(),
        unsaved_tokens: api.engine.unsaved(),
        scheduled: snap.scheduled,
        refreshing: snap.running,
        replica: None,
    };
    let now = api.engine.clock().now();
    let config = api.config.borrow().clone();
    let info = DaemonInfo {
        replica: config.store.url.is_some().then(|| config.replica_name()),
        ..info
    };
    api.store
        .read(move |st| status::gather(st, &config, info, now))
        .await
}

async fn status_handler(State(api): State<Api>) -> Response {
    match current_status(&api).await {
        Ok(s) => axum::Json(s).into_response(),
        Err(e) => from_store(e),
    }
}

async fn alert_test(State(api): State<Api>, _headers: HeaderMap) -> Response {
    let config = api.config.borrow().clone();
    let results: Vec<_> = crate::alerts::send_test(&config)
        .await
        .into_iter()
        .map(|r| json!({ "channel": r.channel, "host": r.host, "status": r.status, "error": r.error }))
        .collect();
    axum::Json(results).into_response()
}
