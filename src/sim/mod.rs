//! The Acumatica simulator: a real identity server for tests, benchmarks and `acutoken demo`.
//!
//! It speaks plain HTTP on a random 127.0.0.1 port and behaves as DESIGN §1 says an
//! Acumatica instance does: client_secret_post authentication, refresh tokens that
//! always rotate, replay of a used token revoking the whole grant, absolute or
//! sliding lifetimes, expiring and replaceable secrets, "Revoke Access", and the
//! authorization code flow with PKCE where the simulated customer approves at once.
//!
//! A *site* is an IIS virtual directory (`127.0.0.1:PORT/AcumaticaERP`; `""` is the
//! root): each has its own clients, grants, settings, faults and statistics. Sites
//! spring into being when a test first configures them; an unconfigured virtual
//! directory answers 404 like IIS. Time comes from the injected clock, so a
//! [`ManualClock`](crate::clock::ManualClock) expires tokens instantly; latency,
//! delays and dripping use tokio's timer.

mod server;
mod state;

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::clock::SharedClock;
use crate::model::Timestamp;
use server::Shared;
use state::SiteState;

pub use server::HUGE_LEN;
pub use state::RECORDED_REQUESTS_KEPT;

/// The scope a grant made by [`Simulator::issue_grant`] carries.
pub const DEFAULT_GRANT_SCOPE: &str = "api offline_access";

/// How a site expires refresh tokens (DESIGN §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Every token of a grant dies at the grant's `issued_at` + this (Acumatica's default, 30 days).
    Absolute(Duration),
    /// Each token dies at its own issue time + `lifetime`, never after the
    /// grant's `issued_at` + `cap` (no cap when `None`).
    Sliding {
        lifetime: Duration,
        cap: Option<Duration>,
    },
}

/// A misbehaviour the token endpoint serves instead of its real answer.
///
/// Faults are taken in the order injected, one per token request, before the
/// request is looked at, so a faulted request never consumes a refresh token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Any status with an optional `Retry-After: <seconds>` and a body
    /// (served as JSON when it starts with `{`, else as text).
    Status {
        code: u16,
        retry_after: Option<u64>,
        body: String,
    },
    /// 503 with an IIS-style HTML page.
    Html503,
    /// 502 with an empty body.
    Empty502,
    /// 429 with Acumatica's "API Login Limit" JSON body.
    ApiLoginLimit,
    /// 302 to `/Frames/Error.aspx` (under the site's virtual directory).
    RedirectToErrorAspx,
    /// 200 with an HTML login page: not a token.
    Garbage200,
    /// Wait this long, then answer normally (the request is handled after the wait).
    Delay(Duration),
    /// Accept the request and never answer (until the simulator stops).
    Hang,
    /// 200 at once, then the body one byte per second.
    Drip,
    /// 200 streaming [`HUGE_LEN`] bytes without a Content-Length.
    Huge,
}

impl Fault {
    /// The short name recorded in [`RecordedRequest::fault`].
    pub fn name(&self) -> &'static str {
        match self {
            Fault::Status { .. } => "status",
            Fault::Html503 => "html503",
            Fault::Empty502 => "empty502",
            Fault::ApiLoginLimit => "api_login_limit",
            Fault::RedirectToErrorAspx => "redirect_to_error_aspx",
            Fault::Garbage200 => "garbage200",
            Fault::Delay(_) => "delay",
            Fault::Hang => "hang",
            Fault::Drip => "drip",
            Fault::Huge => "huge",
        }
    }
}

/// One token request as the simulator saw it. Holds no secret values: only
/// which form keys were present, never what they carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// Clock time when it was answered (arrival time for faulted requests).
    pub at: Timestamp,
    pub grant_type: Option<String>,
    pub client_id: Option<String>,
    /// Form keys in the order sent, e.g. `["grant_type", "client_id", "client_secret", "refresh_token"]`.
    pub form_keys: Vec<String>,
    /// An `Authorization: Basic` header was sent (always answered `invalid_client`).
    pub basic_auth: bool,
    /// The refresh token had already been used: the grant was revoked.
    pub replay: bool,
    /// The fault served instead of (or, for a delay, before) the real answer.
    pub fault: Option<&'static str>,
    /// HTTP status answered; 0 for `Hang`, recorded on arrival because no answer comes.
    pub status: u16,
    /// The OAuth `error` code answered, if any.
    pub error: Option<String>,
}

/// Mistakes in a test's use of the control API.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The client was never added to that site: call [`Simulator::add_client`] first.
    #[error("the simulator has no client `{client_id}` on site `{site}`")]
    UnknownClient { site: String, client_id: String },
    /// A redirect URI must be an absolute http(s) URL: fix the test's URI.
    #[error("`{0}` is not an absolute http(s) URL")]
    InvalidRedirectUri(String),
}

/// A running simulated Acumatica identity server. Dropping it stops the server.
pub struct Simulator {
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulator")
            .field("addr", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

impl Simulator {
    /// Binds 127.0.0.1 on a random port and serves in a spawned task.
    pub async fn start(clock: SharedClock) -> std::io::Result<Simulator> {
        use axum::serve::ListenerExt as _;

        let listener = tokio::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(clock, addr));
        // Without NODELAY a keep-alive client can stall on Nagle plus delayed ACK.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let app = server::router(shared.clone());
        let stop = shared.shutdown.clone();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled_owned().await });
            if let Err(e) = serve.await {
                tracing::warn!(error = %e, "simulator stopped serving");
            }
        });
        Ok(Simulator {
            shared,
            task: Some(task),
        })
    }

    /// Stops accepting, ends hanging and streaming answers, and waits for the server task.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// The instance string acutoken stores: `127.0.0.1:PORT` or `127.0.0.1:PORT/{site}`.
    pub fn instance(&self, site: &str) -> String {
        match site.trim_matches('/') {
            "" => self.shared.addr.to_string(),
            s => format!("{}/{s}", self.shared.addr),
        }
    }

    /// `http://{instance}`.
    pub fn base_url(&self, site: &str) -> String {
        format!("http://{}", self.instance(site))
    }

    /// The token endpoint of `site`.
    pub fn token_url(&self, site: &str) -> String {
        format!("{}/identity/connect/token", self.base_url(site))
    }

    /// The authorization endpoint of `site`.
    pub fn authorize_url(&self, site: &str) -> String {
        format!("{}/identity/connect/authorize", self.base_url(site))
    }

    fn with_site<R>(&self, site: &str, f: impl FnOnce(&mut SiteState) -> R) -> R {
        f(&mut self.shared.site_or_create(site).lock())
    }

    fn read_site<R>(&self, site: &str, default: R, f: impl FnOnce(&SiteState) -> R) -> R {
        match self.shared.site(site) {
            Some(s) => f(&s.lock()),
            None => default,
        }
    }

    fn known<T>(&self, site: &str, client_id: &str, found: Option<T>) -> Result<T, SimError> {
        found.ok_or_else(|| SimError::UnknownClient {
            site: site.to_string(),
            client_id: client_id.to_string(),
        })
    }

    /// Adds an active client with one secret (an `Expires On` when `expires_at` is set).
    /// Adding an existing client redefines its secret and activates it, keeping its grants.
    pub fn add_client(
        &self,
        site: &str,
        client_id: &str,
        secret: &str,
        expires_at: Option<Timestamp>,
    ) {
        self.with_site(site, |s| s.add_client(client_id, secret, expires_at));
    }

    /// Replaces the client's secret: the old one stops working at once.
    pub fn replace_secret(
        &self,
        site: &str,
        client_id: &str,
        new_secret: &str,
        expires_at: Option<Timestamp>,
    ) -> Result<(), SimError> {
        let found = self.with_site(site, |s| {
            s.replace_secret(client_id, new_secret, expires_at)
        });
        self.known(site, client_id, found.then_some(()))
    }

    /// The Active checkbox of the Connected Application; inactive clients get `invalid_client`.
    pub fn set_client_active(
        &self,
        site: &str,
        client_id: &str,
        active: bool,
    ) -> Result<(), SimError> {
        let found = self.with_site(site, |s| s.set_active(client_id, active));
        self.known(site, client_id, found.then_some(()))
    }

    /// Registers a redirect URI. A client with none accepts any http(s) URI;
    /// once one is registered, authorize accepts only exact matches.
    pub fn add_redirect_uri(&self, site: &str, client_id: &str, uri: &str) -> Result<(), SimError> {
        if !url::Url::parse(uri).is_ok_and(|u| matches!(u.scheme(), "http" | "https")) {
            return Err(SimError::InvalidRedirectUri(uri.to_string()));
        }
        let found = self.with_site(site, |s| s.add_redirect_uri(client_id, uri));
        self.known(site, client_id, found.then_some(()))
    }

    /// A grant as if the customer authorized at `issued_at` with [`DEFAULT_GRANT_SCOPE`];
    /// returns its first refresh token.
    pub fn issue_grant(
        &self,
        site: &str,
        client_id: &str,
        issued_at: Timestamp,
    ) -> Result<String, SimError> {
        let token = self.with_site(site, |s| {
            s.issue_grant(client_id, issued_at, DEFAULT_GRANT_SCOPE)
        });
        self.known(site, client_id, token)
    }

    /// "Revoke Access" on SM303010: every grant of the client dies. Returns how many were alive.
    pub fn revoke(&self, site: &str, client_id: &str) -> Result<usize, SimError> {
        let n = self.with_site(site, |s| s.revoke(client_id));
        self.known(site, client_id, n)
    }

    /// Refresh-token lifetime of the site, applied to existing grants too (default absolute 30 days).
    pub fn set_lifetime(&self, site: &str, lifetime: Lifetime) {
        self.with_site(site, |s| s.settings.lifetime = lifetime);
    }

    /// Access-token lifetime in seconds answered as `expires_in` (default 3600).
    pub fn set_expires_in(&self, site: &str, seconds: u64) {
        self.with_site(site, |s| s.settings.expires_in = seconds);
    }

    /// Send `expires_in` as a JSON string (`"3600"`), as some instances do.
    pub fn set_expires_in_as_string(&self, site: &str, as_string: bool) {
        self.with_site(site, |s| s.settings.expires_in_as_string = as_string);
    }

    /// With `false`, a refresh answers without `refresh_token` and the presented
    /// token stays valid (IdentityServer's reuse mode; sliding lifetimes restart).
    pub fn set_rotate(&self, site: &str, rotate: bool) {
        self.with_site(site, |s| s.settings.rotate = rotate);
    }

    /// A wait before every token request of the site is handled.
    pub fn set_latency(&self, site: &str, latency: Duration) {
        self.with_site(site, |s| s.settings.latency = latency);
    }

    /// Holds every refresh request (`grant_type=refresh_token`) that arrives
    /// from now on, after counting it in flight, until
    /// [`Self::release_token_requests`]. Code exchanges go through.
    pub fn hold_token_requests(&self) {
        self.shared.held.send_replace(true);
    }

    /// Lets held token requests (and later ones) be answered.
    pub fn release_token_requests(&self) {
        self.shared.held.send_replace(false);
    }

    /// Queues a fault for the next `times` token requests (`None`: until [`Self::clear_faults`]).
    pub fn inject(&self, site: &str, fault: Fault, times: Option<u32>) {
        self.with_site(site, |s| s.inject(fault, times));
    }

    pub fn clear_faults(&self, site: &str) {
        self.with_site(site, SiteState::clear_faults);
    }

    /// Token requests the site received, faulted ones included.
    pub fn token_requests(&self, site: &str) -> u64 {
        self.read_site(site, 0, |s| s.token_requests)
    }

    /// Token requests received by all sites together.
    pub fn total_token_requests(&self) -> u64 {
        self.shared.token_requests.load(Ordering::SeqCst)
    }

    /// Authorization requests the site received.
    pub fn authorize_requests(&self, site: &str) -> u64 {
        self.read_site(site, 0, |s| s.authorize_requests)
    }

    /// The site's recorded token requests, oldest first (the last [`RECORDED_REQUESTS_KEPT`]).
    pub fn requests(&self, site: &str) -> Vec<RecordedRequest> {
        self.read_site(site, Vec::new(), |s| s.requests.iter().cloned().collect())
    }

    /// Used refresh tokens presented again at this site.
    pub fn replays(&self, site: &str) -> u64 {
        self.read_site(site, 0, |s| s.replays)
    }

    /// Replays over all sites: zero proves no refresh token was ever sent twice.
    pub fn total_replays(&self) -> u64 {
        self.shared
            .all_sites()
            .iter()
            .map(|s| s.lock().replays)
            .sum()
    }

    /// Token requests of the site in flight right now.
    pub fn in_flight(&self, site: &str) -> u64 {
        self.shared
            .site(site)
            .map_or(0, |s| s.in_flight.load(Ordering::SeqCst))
    }

    /// The most token requests of the site ever in flight at once.
    pub fn max_concurrency(&self, site: &str) -> u64 {
        self.shared
            .site(site)
            .map_or(0, |s| s.max_in_flight.load(Ordering::SeqCst))
    }

    /// The most token requests ever in flight at once over all sites.
    pub fn max_concurrency_all(&self) -> u64 {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// Clears the site's counters and recorded requests (clients, grants and faults stay).
    pub fn reset_statistics(&self, site: &str) {
        if let Some(s) = self.shared.site(site) {
            let mut st = s.lock();
            st.requests.clear();
            st.token_requests = 0;
            st.authorize_requests = 0;
            st.replays = 0;
            s.max_in_flight
                .store(s.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
        }
    }

    /// Whether this exact refresh token would be accepted now.
    pub fn refresh_token_alive(&self, site: &str, refresh_token: &str) -> bool {
        let now = self.shared.clock.now();
        self.read_site(site, false, |s| s.token_alive(refresh_token, now))
    }

    /// Whether the grant that `refresh_token` (any generation of it) belongs to
    /// is still usable: not revoked and its newest token not expired or used.
    pub fn grant_alive(&self, site: &str, refresh_token: &str) -> bool {
        let now = self.shared.clock.now();
        self.read_site(site, false, |s| s.grant_alive(refresh_token, now))
    }

    /// The live refresh token of the client's newest grant, if that grant works.
    pub fn current_refresh_token(&self, site: &str, client_id: &str) -> Option<String> {
        let now = self.shared.clock.now();
        self.read_site(site, None, |s| s.current_refresh_token(client_id, now))
    }

    /// How many of the client's grants still work.
    pub fn live_grants(&self, site: &str, client_id: &str) -> usize {
        let now = self.shared.clock.now();
        self.read_site(site, 0, |s| s.live_grants(client_id, now))
    }

    /// Whether `access_token` was issued by this site, has not expired and its grant still works.
    pub fn access_token_valid(&self, site: &str, access_token: &str) -> bool {
        let Some(claims) = self.shared.verify(access_token) else {
            return false;
        };
        let Some(s) = self.shared.site(site) else {
            return false;
        };
        let now = self.shared.clock.now();
        let same_site = claims["site"].as_str() == Some(s.name.as_str());
        let fresh = claims["exp"]
            .as_i64()
            .is_some_and(|exp| now.timestamp() < exp);
        let grant_ok = match claims["grant"].as_u64() {
            Some(g) => usize::try_from(g).is_ok_and(|g| s.lock().grant_index_alive(g, now)),
            None => true,
        };
        same_site && fresh && grant_ok
    }
}
