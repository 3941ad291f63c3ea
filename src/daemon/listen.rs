//! One way to serve every HTTP listener (the API socket, `api.listen`,
//! `callback.listen`, `metrics.listen`) with bounds, so that no client can
//! hold the daemon's listeners hostage. The callback faces the internet
//! through the proxy: a client that opens connections and sends nothing, or
//! sends a request line a byte at a time, must cost a bounded amount and
//! never keep the others from being answered.
//!
//! - The request head must arrive within [`HEADER_READ_TIMEOUT`] of the
//!   connection being ready for it (first request and every keep-alive
//!   request after it), or the connection is closed. This also bounds how
//!   long an idle keep-alive connection is held.
//! - A connection is asked to close (after its current answer) once it is
//!   [`MAX_CONNECTION_AGE`] old, so no client keeps one open forever by
//!   sending requests back to back.
//! - Each request gets [`Limits::request`] to be answered; past it the client
//!   gets `503` with `Retry-After` and the connection closes. The handler runs
//!   as its own task and is never cancelled midway, neither by this bound nor
//!   by a client that goes away: a refresh or a code exchange it started
//!   finishes and saves its rotated token (its own HTTP timeout bounds it).
//! - At most [`MAX_CONNECTIONS`] connections are open per listener. One over
//!   the cap is closed at once (not queued): a flood costs the flooder, and
//!   the service is back as soon as the flood's connections go.
//! - A listener that speaks TLS ([`crate::daemon::tls`]) does its handshake
//!   inside the connection's slot and within [`Limits::header_read`]: a
//!   client that connects and sends no TLS bytes is one of the counted
//!   connections and is closed like a slow header.
//!
//! On shutdown the listener stops accepting, open connections finish the
//! request in hand and close, and [`serve`] returns once every connection and
//! every handler it started has finished (the caller bounds that wait).

use std::convert::Infallible;
use std::io;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a client has to send a request's head (request line and
/// headers), counted from when the connection is ready to read it. Real
/// clients (browsers through the proxy, applications on the socket, the
/// Prometheus scraper) send the head in one write; 10 s is generous for them
/// and short for a slow-header attack.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How many connections one listener keeps open at once. Far above what the
/// applications, the scraper or customers completing links need at once,
/// far below the daemon's file descriptor limit (the packaged unit's default
/// is 524288; each connection is one descriptor).
pub const MAX_CONNECTIONS: usize = 512;

/// After this long a connection is asked to close once its current request
/// is answered; the client reconnects.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);

/// The request bound of the metrics listener: a scrape reads memory and
/// gauges gathered in the background.
pub const METRICS_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The least request bound of the API and callback listeners.
const MIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The request bound of the API and the callback listener. A token request
/// can wait for a refresh, a manual refresh is one, and the callback waits for
/// the code exchange: each is one request to Acumatica bounded by
/// `renewal.http_timeout`, possibly after a wait for a slot among the
/// concurrent refreshes. Twice that plus 30 s (at least 60 s) leaves the
/// handler time to answer with what happened rather than being cut short.
/// Fixed at start: a reload does not change a running listener.
pub fn request_timeout(http_timeout: Duration) -> Duration {
    http_timeout
        .saturating_mul(2)
        .saturating_add(Duration::from_secs(30))
        .max(MIN_REQUEST_TIMEOUT)
}

/// The bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// See [`HEADER_READ_TIMEOUT`].
    pub header_read: Duration,
    /// How long a request may take to be answered.
    pub request: Duration,
    /// See [`MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// See [`MAX_CONNECTION_AGE`].
    pub max_age: Duration,
}

impl Limits {
    /// The standard bounds with `request` as the request bound.
    pub fn with_request_timeout(request: Duration) -> Limits {
        Limits {
            header_read: HEADER_READ_TIMEOUT,
            request,
            max_connections: MAX_CONNECTIONS,
            max_age: MAX_CONNECTION_AGE,
        }
    }
}

/// What a listener does with an accepted connection before HTTP is spoken
/// on it: nothing ([`Plain`]) or a TLS handshake.
pub trait Handshake<I>: Clone + Send + Sync + 'static {
    /// The stream HTTP is served on.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Turns the accepted stream into the one HTTP is served on; an error
    /// closes the connection. [`serve`] bounds how long this may take.
    fn handshake(&self, io: I) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

/// Plain HTTP: the accepted stream as it is.
#[derive(Debug, Clone, Copy)]
pub struct Plain;

impl<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> Handshake<I> for Plain {
    type Io = I;
    async fn handshake(&self, io: I) -> io::Result<I> {
        Ok(io)
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown`, each
/// connection first through `handshake`; `name` is the config key of the
/// listener, for the logs and the `acutoken_http_connections_refused_total`
/// counter.
pub async fn serve<L: Listener, H: Handshake<L::Io>>(
    name: &'static str,
    mut listener: L,
    handshake: H,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let open = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let tasks = TaskTracker::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .keep_alive(true);
    let last_warned: Mutex<Option<Instant>> = Mutex::new(None);
    loop {
        let (io, _addr) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            c = listener.accept() => c,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            // Closed at once: a client over the cap gets nothing to wait on.
            drop(io);
            refused(name, limits.max_connections, &last_warned);
            continue;
        };
        let service = Bounded {
            inner: TowerToHyperService::new(router.clone()),
            request: limits.request,
            tasks: tasks.clone(),
        };
        let (http, handshake) = (http.clone(), handshake.clone());
        let (shutdown, max_age) = (shutdown.clone(), limits.max_age);
        let born = tokio::time::Instant::now();
        tasks.spawn(async move {
            // The slot is held from here, through the handshake.
            let _permit = permit;
            // The handshake is bounded like a request head: a client that
            // connects and sends nothing is closed, not waited on forever.
            let io = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(limits.header_read, handshake.handshake(io)) => match r {
                    Ok(Ok(io)) => io,
                    Ok(Err(e)) => {
                        // Scanners and plain HTTP to a TLS port land here: not worth a warning.
                        tracing::debug!(listener = name, error = %e, "handshake failed; connection closed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(listener = name, "no handshake in time; connection closed");
                        return;
                    }
                },
            };
            let conn = http.serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            tokio::select! {
                // Closed by the client, by a bound, or after an error: done.
                _ = conn.as_mut() => return,
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep_until(born + max_age) => {}
            }
            // Finish the request in hand (bounded by the request timeout), then close.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
    drop(listener);
    tasks.close();
    tasks.wait().await;
}

/// Counts a connection refused over the cap; warns at most once a minute.
fn refused(name: &'static str, cap: usize, last: &Mutex<Option<Instant>>) {
    metrics::counter!("acutoken_http_connections_refused_total", "listener" => name).increment(1);
    let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
    if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
        *last = Some(Instant::now());
        tracing::warn!(
            listener = name,
            cap,
            "too many open connections: new ones are closed at once until some go away"
        );
    }
}

/// The router behind the request bound; each request's handler is its own task.
#[derive(Clone)]
struct Bounded {
    inner: TowerToHyperService<Router>,
    request: Duration,
    tasks: TaskTracker,
}

impl hyper::service::Service<Request<Incoming>> for Bounded {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send + 'static>,
    >;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        // Spawned, so neither the bound below nor a client that hangs up
        // cancels a handler halfway through a refresh or a code exchange.
        let handler = self
            .tasks
            .spawn(hyper::service::Service::call(&self.inner, req));
        let bound = self.request;
        Box::pin(async move {
            match tokio::time::timeout(bound, handler).await {
                Ok(Ok(Ok(r))) => Ok(r),
                Ok(Ok(Err(never))) => match never {},
                Ok(Err(_)) => Ok(unavailable(
                    "the request could not be answered; try again",
                    "5",
                )),
                Err(_) => Ok(unavailable(
                    "the request took too long to answer; try again in a minute",
                    "60",
                )),
            }
        })
    }
}

/// A plain `503` that also closes the connection.
fn unavailable(msg: &'static str, retry_after: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::from(format!("{msg}\n")));
    *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let h = r.headers_mut();
    h.insert(header::RETRY_AFTER, HeaderValue::from_static(retry_after));
    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_bound_covers_a_refresh_and_never_overflows() {
        assert_eq!(
            request_timeout(Duration::from_secs(30)),
            Duration::from_secs(90)
        );
        assert_eq!(request_timeout(Duration::from_secs(1)), MIN_REQUEST_TIMEOUT);
        assert_eq!(request_timeout(Duration::MAX), Duration::MAX);
    }
}
