//! Prometheus metrics on `metrics.listen` (with `/healthz` and `/readyz`).
//!
//! No series per connection: counts per state, the nearest deadline, and a
//! histogram of time-to-deadline describe a million connections in a few lines.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::model::{State, Timestamp};
use crate::renewal::scheduler::Snapshot;
use crate::store::Store;

/// How often the store-derived gauges are recomputed.
const UPDATE_EVERY: Duration = Duration::from_secs(15);

/// Buckets of the time-to-deadline histogram, in seconds (1 h .. 60 d).
const DEADLINE_BUCKETS: [f64; 9] = [
    3600.0, 21600.0, 86400.0, 259200.0, 604800.0, 1209600.0, 1814400.0, 2592000.0, 5184000.0,
];

/// The metrics recorder and its renderer.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
}

impl Metrics {
    /// Installs the process-wide recorder (once; later calls reuse it).
    pub fn install() -> anyhow::Result<Metrics> {
        static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
        if let Some(h) = HANDLE.get() {
            return Ok(Metrics { handle: h.clone() });
        }
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(
                    "acutoken_refresh_duration_seconds".into(),
                ),
                &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0],
            )?
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            anyhow::bail!("a metrics recorder is already installed");
        }
        let h = HANDLE.get_or_init(|| handle);
        metrics::describe_counter!("acutoken_refreshes_total", "Refresh attempts by outcome");
        metrics::describe_histogram!("acutoken_refresh_duration_seconds", "Token request latency");
        metrics::describe_counter!(
            "acutoken_token_requests_total",
            "Access-token requests received"
        );
        metrics::describe_counter!(
            "acutoken_token_requests_served_total",
            "Access-token requests answered with a token"
        );
        metrics::describe_gauge!("acutoken_connections", "Connections per state");
        metrics::describe_gauge!(
            "acutoken_nearest_deadline_seconds",
            "Seconds to the nearest deadline of a scheduled connection"
        );
        metrics::describe_gauge!(
            "acutoken_time_to_deadline_seconds",
            "Scheduled connections whose deadline is within le seconds"
        );
        metrics::describe_gauge!(
            "acutoken_alerts_undelivered",
            "Alerts waiting for delivery per channel"
        );
        metrics::describe_gauge!(
            "acutoken_last_reload_timestamp_seconds",
            "When the configuration was last loaded"
        );
        metrics::describe_gauge!(
            "acutoken_alerts_delivered",
            "Messages each channel accepted (repeats included)"
        );
        metrics::describe_gauge!(
            "acutoken_alert_channel_failures",
            "Failed deliveries in a row per channel"
        );
        metrics::describe_gauge!("acutoken_build_info", "Version of the running binary");
        metrics::gauge!("acutoken_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        Ok(Metrics { handle: h.clone() })
    }

    pub fn refreshed(&self, outcome: &'static str, seconds: f64) {
        metrics::counter!("acutoken_refreshes_total", "outcome" => outcome).increment(1);
        metrics::histogram!("acutoken_refresh_duration_seconds").record(seconds);
    }

    pub fn reloaded(&self, at: Timestamp) {
        metrics::gauge!("acutoken_last_reload_timestamp_seconds").set(at.timestamp() as f64);
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// `/metrics`, `/healthz`, `/readyz`.
    pub fn router(&self, ready: Arc<AtomicBool>) -> Router {
        let me = self.clone();
        Router::new()
            .route(
                "/metrics",
                get(move || {
                    let me = me.clone();
                    async move {
                        let mut r = me.render().into_response();
                        r.headers_mut().insert(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("text/plain; version=0.0.4"),
                        );
                        r
                    }
                }),
            )
            .merge(super::api::health_routes(ready))
    }

    /// Recomputes the store-derived gauges now and every [`UPDATE_EVERY`].
    pub async fn update_loop(
        self,
        mut st: Store,
        config: tokio::sync::watch::Receiver<std::sync::Arc<crate::config::Config>>,
        clock: SharedClock,
        snapshot: tokio::sync::watch::Receiver<Snapshot>,
        shutdown: CancellationToken,
    ) {
        loop {
            let now = clock.now();
            let cfg = config.borrow().clone();
            let (res, back) = tokio::task::spawn_blocking(move || (gauges(&st, &cfg, now), st))
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            st = back;
            if let Err(e) = res {
                tracing::warn!(error = %e, "cannot compute metrics from the store");
            }
            let snap = snapshot.borrow().clone();
            metrics::gauge!("acutoken_refreshes_in_flight").set(snap.running as f64);
            metrics::gauge!("acutoken_refreshes_ready").set(snap.ready as f64);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(UPDATE_EVERY) => {}
            }
        }
    }
}

fn gauges(
    st: &Store,
    config: &crate::config::Config,
    now: Timestamp,
) -> Result<(), crate::store::StoreError> {
    for c in crate::alerts::channel_health(st, config)? {
        metrics::gauge!("acutoken_alerts_undelivered", "channel" => c.name.clone())
            .set(c.undelivered as f64);
        metrics::gauge!("acutoken_alert_channel_failures", "channel" => c.name.clone())
            .set(c.failures as f64);
    }
    for (channel, n) in crate::store::alerts::delivered_counts(st.db())? {
        metrics::gauge!("acutoken_alerts_delivered", "channel" => channel).set(n as f64);
    }
    let counts = st.state_counts()?;
    for s in State::ALL {
        metrics::gauge!("acutoken_connections", "state" => s.as_str())
            .set(counts.get(&s).copied().unwrap_or(0) as f64);
    }
    let spread = st.deadline_spread(now)?;
    let nearest = spread.iter().copied().fold(f64::INFINITY, f64::min);
    if nearest.is_finite() {
        metrics::gauge!("acutoken_nearest_deadline_seconds").set(nearest);
    }
    for le in DEADLINE_BUCKETS {
        let n = spread.iter().filter(|d| **d <= le).count();
        metrics::gauge!("acutoken_time_to_deadline_seconds", "le" => format!("{le}")).set(n as f64);
    }
    metrics::gauge!("acutoken_time_to_deadline_seconds", "le" => "+Inf").set(spread.len() as f64);
    Ok(())
}
