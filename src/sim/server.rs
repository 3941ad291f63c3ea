//! The HTTP face of the simulator: routes, faults, token responses.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use hyper::body::Frame;
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::state::{AuthorizeOutcome, Form, Issued, OAuthError, SiteState, new_handle};
use super::{Fault, RecordedRequest};
use crate::clock::SharedClock;
use crate::model::Timestamp;

/// Bytes the `Huge` fault streams.
pub const HUGE_LEN: u64 = 100 * 1024 * 1024;

/// What the `Drip` fault sends, one byte per second: the start of a token
/// response that never completes within any sane timeout.
const DRIP_BODY: &[u8] = b"{\"access_token\":\"drip-drip-drip-drip-drip-drip-drip-drip-drip-drip-drip-drip-drip-drip-drip-drip-drip-drip-drip-drip-drip-drip-drip-drip-drip-drip-drip-drip-drip-drip\",\"token_type\":\"Bearer\",\"expires_in\":3600}";

/// A site's state and its in-flight counters, kept outside the lock so a
/// request waiting on latency or a fault never holds it.
pub(crate) struct Site {
    pub(crate) name: String,
    state: Mutex<SiteState>,
    pub(crate) in_flight: AtomicU64,
    pub(crate) max_in_flight: AtomicU64,
}

impl Site {
    pub(crate) fn lock(&self) -> MutexGuard<'_, SiteState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Everything the handlers and the control API share.
pub(crate) struct Shared {
    pub(crate) clock: SharedClock,
    pub(crate) addr: SocketAddr,
    sites: RwLock<HashMap<String, Arc<Site>>>,
    pub(crate) in_flight: AtomicU64,
    pub(crate) max_in_flight: AtomicU64,
    pub(crate) token_requests: AtomicU64,
    pub(crate) shutdown: CancellationToken,
    /// While true, refresh requests are held after they arrive (counted in
    /// flight) until a test releases them: a race with a request in flight
    /// is then made on purpose, not by timing.
    pub(crate) held: tokio::sync::watch::Sender<bool>,
    /// Signs access and id tokens so they can be checked without storing them.
    signing_key: [u8; 32],
}

/// Sites are IIS virtual directories: one path segment, case-insensitive.
pub(crate) fn site_key(site: &str) -> String {
    site.trim_matches('/').to_ascii_lowercase()
}

impl Shared {
    pub(crate) fn new(clock: SharedClock, addr: SocketAddr) -> Shared {
        let mut signing_key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut signing_key);
        let shared = Shared {
            clock,
            addr,
            sites: RwLock::new(HashMap::new()),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            token_requests: AtomicU64::new(0),
            shutdown: CancellationToken::new(),
            held: tokio::sync::watch::Sender::new(false),
            signing_key,
        };
        // The root site always answers, as an instance installed at `/` does.
        shared.site_or_create("");
        shared
    }

    pub(crate) fn site(&self, site: &str) -> Option<Arc<Site>> {
        let sites = self.sites.read().unwrap_or_else(|e| e.into_inner());
        sites.get(&site_key(site)).cloned()
    }

    pub(crate) fn site_or_create(&self, site: &str) -> Arc<Site> {
        if let Some(s) = self.site(site) {
            return s;
        }
        let mut sites = self.sites.write().unwrap_or_else(|e| e.into_inner());
        sites
            .entry(site_key(site))
            .or_insert_with(|| {
                Arc::new(Site {
                    name: site.trim_matches('/').to_string(),
                    state: Mutex::new(SiteState::default()),
                    in_flight: AtomicU64::new(0),
                    max_in_flight: AtomicU64::new(0),
                })
            })
            .clone()
    }

    pub(crate) fn all_sites(&self) -> Vec<Arc<Site>> {
        let sites = self.sites.read().unwrap_or_else(|e| e.into_inner());
        sites.values().cloned().collect()
    }

    /// Sleeps unless the simulator stops first; `false` when it stopped.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    fn sign(&self, claims: &Value, typ: &str) -> String {
        let header = URL_SAFE_NO_PAD.encode(json!({"alg": "HS256", "typ": typ}).to_string());
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signed = format!("{header}.{payload}");
        let sig = self.mac(signed.as_bytes()).finalize().into_bytes();
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    fn mac(&self, data: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.signing_key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(data);
        mac
    }

    /// The claims of an access token this simulator signed, if the signature holds.
    pub(crate) fn verify(&self, token: &str) -> Option<Value> {
        let (signed, sig) = token.rsplit_once('.')?;
        let sig = URL_SAFE_NO_PAD.decode(sig).ok()?;
        self.mac(signed.as_bytes()).verify_slice(&sig).ok()?;
        let (_, payload) = signed.split_once('.')?;
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
    }

    fn issuer(&self, site: &Site) -> String {
        if site.name.is_empty() {
            format!("http://{}/identity", self.addr)
        } else {
            format!("http://{}/{}/identity", self.addr, site.name)
        }
    }
}

/// Counts a token request as in flight until dropped, even if the client goes away.
struct InFlight {
    shared: Arc<Shared>,
    site: Arc<Site>,
}

impl InFlight {
    fn enter(shared: &Arc<Shared>, site: &Arc<Site>) -> InFlight {
        let n = site.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        site.max_in_flight.fetch_max(n, Ordering::SeqCst);
        let n = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(n, Ordering::SeqCst);
        InFlight {
            shared: shared.clone(),
            site: site.clone(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.site.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.shared.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/identity/connect/token", post(token_root))
        .route("/{site}/identity/connect/token", post(token_site))
        .route("/identity/connect/authorize", get(authorize_root))
        .route("/{site}/identity/connect/authorize", get(authorize_site))
        .route(
            "/identity/.well-known/openid-configuration",
            get(discovery_root),
        )
        .route(
            "/{site}/identity/.well-known/openid-configuration",
            get(discovery_site),
        )
        .with_state(shared)
}

async fn token_root(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    token(s, "", headers, body).await
}

async fn token_site(
    State(s): State<Arc<Shared>>,
    Path(site): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    token(s, &site, headers, body).await
}

async fn authorize_root(State(s): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
    authorize(&s, "", q)
}

async fn authorize_site(
    State(s): State<Arc<Shared>>,
    Path(site): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    authorize(&s, &site, q)
}

async fn discovery_root(State(s): State<Arc<Shared>>) -> Response {
    discovery(&s, "")
}

async fn discovery_site(State(s): State<Arc<Shared>>, Path(site): Path<String>) -> Response {
    discovery(&s, &site)
}

fn not_found() -> Response {
    html(
        StatusCode::NOT_FOUND,
        "<h1>404 - File or directory not found.</h1>",
    )
}

fn html(status: StatusCode, body: &'static str) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

fn no_store(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-store, no-cache, max-age=0"),
    );
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    r
}

fn oauth_error(e: OAuthError) -> Response {
    no_store(
        (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": e.as_str()})),
        )
            .into_response(),
    )
}

async fn token(shared: Arc<Shared>, site_name: &str, headers: HeaderMap, body: Bytes) -> Response {
    let Some(site) = shared.site(site_name) else {
        return not_found();
    };
    let _in_flight = InFlight::enter(&shared, &site);
    shared.token_requests.fetch_add(1, Ordering::Relaxed);
    let (latency, fault) = {
        let mut st = site.lock();
        st.token_requests += 1;
        (st.settings.latency, st.take_fault())
    };
    if !latency.is_zero() && !shared.pause(latency).await {
        return html(StatusCode::SERVICE_UNAVAILABLE, "stopping");
    }
    let form = Form::parse(&body);
    if form.get("grant_type") == Some("refresh_token") {
        let mut held = shared.held.subscribe();
        tokio::select! {
            _ = shared.shutdown.cancelled() => return html(StatusCode::SERVICE_UNAVAILABLE, "stopping"),
            _ = held.wait_for(|h| !*h) => {}
        }
    }
    let basic_auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.get(..6).is_some_and(|p| p.eq_ignore_ascii_case("basic ")));
    let mut record = RecordedRequest {
        at: shared.clock.now(),
        grant_type: form.get("grant_type").map(str::to_string),
        client_id: form.get("client_id").map(str::to_string),
        form_keys: form.keys(),
        basic_auth,
        replay: false,
        fault: fault.as_ref().map(Fault::name),
        status: 0,
        error: None,
    };
    match fault {
        Some(Fault::Delay(d)) if !shared.pause(d).await => {
            return html(StatusCode::SERVICE_UNAVAILABLE, "stopping");
        }
        Some(Fault::Delay(_)) => {}
        Some(Fault::Hang) => {
            // Recorded on arrival: the answer may never come.
            site.lock().record(record);
            shared.shutdown.cancelled().await;
            return html(StatusCode::SERVICE_UNAVAILABLE, "stopping");
        }
        Some(fault) => {
            let response = fault_response(&shared, &site, fault);
            record.status = response.status().as_u16();
            site.lock().record(record);
            return response;
        }
        None => {}
    }

    let form_content = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';').next().is_some_and(|m| {
                m.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            })
        });
    let now = shared.clock.now();
    let (result, settings) = {
        let mut st = site.lock();
        let decision = if form_content {
            st.token(now, &form, basic_auth)
        } else {
            super::state::Decision {
                result: Err(OAuthError::InvalidRequest),
                replay: false,
            }
        };
        record.replay = decision.replay;
        record.status = if decision.result.is_ok() { 200 } else { 400 };
        record.error = decision
            .result
            .as_ref()
            .err()
            .map(|e| e.as_str().to_string());
        record.at = now;
        st.record(record);
        (decision.result, st.settings.clone())
    };
    match result {
        Ok(issued) => token_response(&shared, &site, now, &settings, issued),
        Err(e) => oauth_error(e),
    }
}

fn token_response(
    shared: &Shared,
    site: &Site,
    now: Timestamp,
    settings: &super::state::Settings,
    issued: Issued,
) -> Response {
    let exp = now.timestamp().saturating_add_unsigned(settings.expires_in);
    let access = shared.sign(
        &json!({
            "iss": shared.issuer(site),
            "site": site.name,
            "client_id": issued.client_id,
            "grant": issued.grant,
            "scope": issued.scope,
            "iat": now.timestamp(),
            "exp": exp,
            "jti": new_handle(),
        }),
        "at+jwt",
    );
    let mut body = json!({
        "access_token": access,
        "expires_in": if settings.expires_in_as_string {
            Value::String(settings.expires_in.to_string())
        } else {
            Value::from(settings.expires_in)
        },
        "token_type": "Bearer",
        "scope": issued.scope,
    });
    if let Some(r) = &issued.refresh_token {
        body["refresh_token"] = Value::String(r.clone());
    }
    if issued.scope.split(' ').any(|s| s == "openid") {
        body["id_token"] = Value::String(shared.sign(
            &json!({
                "iss": shared.issuer(site),
                "aud": issued.client_id,
                "sub": issued.client_id,
                "iat": now.timestamp(),
                "exp": exp,
            }),
            "JWT",
        ));
    }
    no_store((StatusCode::OK, axum::Json(body)).into_response())
}

fn fault_response(shared: &Shared, site: &Site, fault: Fault) -> Response {
    match fault {
        Fault::Status {
            code,
            retry_after,
            body,
        } => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let content_type = if body.trim_start().starts_with('{') {
                "application/json; charset=utf-8"
            } else {
                "text/plain; charset=utf-8"
            };
            let mut r = (status, body).into_response();
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            if let Some(secs) = retry_after {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            r
        }
        Fault::Html503 => html(
            StatusCode::SERVICE_UNAVAILABLE,
            "<!DOCTYPE html><html><head><title>Service Unavailable</title></head><body><h2>Service Unavailable</h2><hr><p>HTTP Error 503. The service is unavailable.</p></body></html>",
        ),
        Fault::Empty502 => StatusCode::BAD_GATEWAY.into_response(),
        Fault::ApiLoginLimit => {
            let mut r = (
                StatusCode::TOO_MANY_REQUESTS,
                r#"{"message":"API Login Limit","exceptionMessage":"The maximum number of API logins allowed by the license has been reached.","exceptionType":"PX.Data.PXException"}"#,
            )
                .into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json; charset=utf-8"),
            );
            r
        }
        Fault::RedirectToErrorAspx => {
            let location = if site.name.is_empty() {
                "/Frames/Error.aspx".to_string()
            } else {
                format!("/{}/Frames/Error.aspx", site.name)
            };
            let mut r = html(
                StatusCode::FOUND,
                "<html><head><title>Object moved</title></head><body><h2>Object moved to <a href=\"/Frames/Error.aspx\">here</a>.</h2></body></html>",
            );
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        Fault::Garbage200 => html(
            StatusCode::OK,
            "<!DOCTYPE html><html><head><title>Acumatica</title></head><body><form action=\"Login.aspx\"><input name=\"txtUser\"></form></body></html>",
        ),
        Fault::Drip => {
            let (tx, rx) = mpsc::channel(1);
            let stop = shared.shutdown.clone();
            tokio::spawn(async move {
                for (i, b) in DRIP_BODY.iter().enumerate() {
                    if i > 0 {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                    if tx.send(Bytes::copy_from_slice(&[*b])).await.is_err() {
                        return;
                    }
                }
            });
            streamed(Body::new(ChannelBody(rx)))
        }
        Fault::Huge => streamed(Body::new(HugeBody {
            left: HUGE_LEN,
            stop: shared.shutdown.clone(),
        })),
        // Handled before the fault is rendered: a delay answers normally, a hang never.
        Fault::Delay(_) | Fault::Hang => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn streamed(body: Body) -> Response {
    let mut r = Response::new(body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// Streams [`HUGE_LEN`] bytes of a JSON string that never closes, with no
/// Content-Length, so only a client that caps what it reads survives it.
struct HugeBody {
    left: u64,
    stop: CancellationToken,
}

/// One chunk of the hostile body, made once on first use (a 64 KiB array in
/// the binary would weigh on every install for the simulator's sake).
static HUGE_FILL: std::sync::LazyLock<Bytes> =
    std::sync::LazyLock::new(|| Bytes::from(vec![b'A'; 64 * 1024]));
const HUGE_PREFIX: &[u8] = b"{\"access_token\":\"";

impl hyper::body::Body for HugeBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 || self.stop.is_cancelled() {
            return Poll::Ready(None);
        }
        let chunk = if self.left == HUGE_LEN {
            Bytes::from_static(HUGE_PREFIX)
        } else {
            let n = usize::try_from(self.left).map_or(HUGE_FILL.len(), |l| l.min(HUGE_FILL.len()));
            HUGE_FILL.slice(..n)
        };
        self.left -= chunk.len() as u64;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }
}

fn authorize(shared: &Shared, site_name: &str, query: Option<String>) -> Response {
    let Some(site) = shared.site(site_name) else {
        return not_found();
    };
    let q = Form::parse(query.unwrap_or_default().as_bytes());
    let outcome = {
        let mut st = site.lock();
        st.authorize_requests += 1;
        st.authorize(shared.clock.now(), &q)
    };
    match outcome {
        AuthorizeOutcome::Redirect(to) => match HeaderValue::from_str(&to) {
            Ok(v) => no_store((StatusCode::FOUND, [(header::LOCATION, v)]).into_response()),
            Err(_) => html(
                StatusCode::BAD_REQUEST,
                "<h1>Error</h1><p>Invalid redirect_uri.</p>",
            ),
        },
        AuthorizeOutcome::Page(reason) => {
            // The reason is one of a few fixed sentences, never an echo of input.
            let mut r = (
                StatusCode::BAD_REQUEST,
                format!("<!DOCTYPE html><html><body><h1>Error</h1><p>{reason}</p></body></html>"),
            )
                .into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r
        }
    }
}

fn discovery(shared: &Shared, site_name: &str) -> Response {
    let Some(site) = shared.site(site_name) else {
        return not_found();
    };
    let issuer = shared.issuer(&site);
    axum::Json(json!({
        "issuer": issuer,
        "authorization_endpoint": format!("{issuer}/connect/authorize"),
        "token_endpoint": format!("{issuer}/connect/token"),
        "userinfo_endpoint": format!("{issuer}/connect/userinfo"),
        "end_session_endpoint": format!("{issuer}/connect/endsession"),
        "revocation_endpoint": format!("{issuer}/connect/revocation"),
        "jwks_uri": format!("{issuer}/.well-known/openid-configuration/jwks"),
        "scopes_supported": ["openid", "profile", "email", "api", "api:concurrent_access", "offline_access"],
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["client_secret_post"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["HS256"],
    }))
    .into_response()
}
