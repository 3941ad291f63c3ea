//! Prometheus metrics on `metrics.listen` (with `/healthz` and `/readyz`).
//!
//! No series per connection: counts per state, the nearest deadline, and
//! counts of deadlines within fixed horizons describe a million connections
//! in a few lines.
//!
//! Every series carries a description: `promtool check metrics` (Prometheus's
//! own linter, run by `tests/metrics_lint.rs`) refuses a page without one.

use std::collections::BTreeMap;
use std::sync::Arc;
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
use crate::store::{Store, StoreError};
use uuid::Uuid;

/// How often the store-derived gauges are recomputed.
const UPDATE_EVERY: Duration = Duration::from_secs(15);

/// The horizons of `acutoken_time_to_deadline_seconds`: the `within` label
/// and its bound in seconds (1 h .. 60 d). A gauge with a `within` label, not
/// an `le` one: `le` belongs to histograms only, and a histogram (with its
/// `_sum` and `_count` of observations) does not describe a snapshot.
const DEADLINE_BUCKETS: [(&str, i64); 9] = [
    ("1h", 3_600),
    ("6h", 21_600),
    ("1d", 86_400),
    ("3d", 259_200),
    ("7d", 604_800),
    ("14d", 1_209_600),
    ("21d", 1_814_400),
    ("30d", 2_592_000),
    ("60d", 5_184_000),
];
/// The `within` value of the series that counts every scheduled deadline.
const DEADLINE_ANY: &str = "any";

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
            "Scheduled connections whose deadline falls within the horizon named by `within` (any: all of them)"
        );
        metrics::describe_gauge!(
            "acutoken_refreshes_in_flight",
            "Refreshes running now (token requests sent and not yet saved)"
        );
        metrics::describe_gauge!(
            "acutoken_refreshes_ready",
            "Connections due for a refresh and waiting for a free slot"
        );
        metrics::describe_counter!(
            "acutoken_http_connections_refused_total",
            "TCP or socket connections closed at once because the listener's cap of open connections was reached"
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
        metrics::describe_gauge!(
            "acutoken_replicas",
            "Replicas serving the PostgreSQL store, by whether their heartbeat is within its lease (live) or not (lapsed)"
        );
        metrics::describe_gauge!(
            "acutoken_replica_heartbeat_age_seconds",
            "Seconds since each replica's last heartbeat"
        );
        metrics::describe_gauge!(
            "acutoken_replica_claims",
            "Refreshes in flight (claims) each replica holds"
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
    pub fn router(&self, ready: Arc<super::api::Readiness>) -> Router {
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
    /// The connections are read whole once, then only what changed: a
    /// million of them cost one scan at start, not one every turn.
    pub async fn update_loop(
        self,
        st: Store,
        config: tokio::sync::watch::Receiver<std::sync::Arc<crate::config::Config>>,
        clock: SharedClock,
        snapshot: tokio::sync::watch::Receiver<Snapshot>,
        shutdown: CancellationToken,
    ) {
        let mut state = Some((st, None::<Tally>));
        loop {
            let now = clock.now();
            let cfg = config.borrow().clone();
            let (st, tally) = state.take().expect("given back every turn");
            let ((st, tally), res) =
                crate::store::blocking::with_owned((st, tally), move |(st, tally)| {
                    store_gauges(st, tally, &cfg, now)
                })
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            if let Err(e) = res {
                tracing::warn!(error = %e, "cannot compute metrics from the store");
            }
            if let Some(t) = &tally {
                t.deadline_gauges(now);
            }
            state = Some((st, tally));
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

/// The state and deadline of every connection, as the gauges need them,
/// kept up to date from the store's change sequence.
///
/// 24 bytes per connection in one vector sorted by id (24 MB at 1M; a hash
/// map of the same took 90 MB), looked up by binary search.
#[derive(Debug, Default)]
struct Tally {
    /// The change sequence read up to.
    seq: i64,
    /// `PRAGMA data_version` when last read: unchanged means nobody wrote.
    version: i64,
    /// Sorted by id, no id twice.
    conns: Vec<Entry>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    id: [u8; 16],
    /// Unix seconds; 0 when there is none. The gauges need no finer grain.
    deadline_s: u32,
    state: State,
}

impl Entry {
    fn new(id: Uuid, state: State, deadline: Option<Timestamp>) -> Entry {
        Entry {
            id: id.into_bytes(),
            deadline_s: deadline.map_or(0, |d| d.timestamp().clamp(1, u32::MAX.into()) as u32),
            state,
        }
    }
}

impl Tally {
    /// Reads every connection once.
    fn load(st: &Store) -> Result<Tally, StoreError> {
        let version = st.data_version()?;
        let mut conns = Vec::new();
        let seq = st.each_state_and_deadline(|id, state, deadline| {
            conns.push(Entry::new(id, state, deadline));
        })?;
        conns.sort_unstable_by_key(|e| e.id);
        conns.shrink_to_fit();
        Ok(Tally {
            seq,
            version,
            conns,
        })
    }

    /// Applies what changed since the last read; returns whether anything
    /// was written to the store meanwhile (by anyone).
    fn catch_up(&mut self, st: &Store) -> Result<bool, StoreError> {
        let version = st.data_version()?;
        if version == self.version {
            return Ok(false);
        }
        let (rows, removed, newest) = st.changed_since(self.seq)?;
        let mut added = Vec::new();
        for row in rows {
            let c = row.conn;
            let e = Entry::new(c.id, c.state, c.deadline);
            match self.conns.binary_search_by_key(&e.id, |e| e.id) {
                Ok(i) => self.conns[i] = e,
                Err(_) => added.push(e),
            }
        }
        if !added.is_empty() {
            self.conns.reserve_exact(added.len());
            self.conns.extend(added);
            self.conns.sort_unstable_by_key(|e| e.id);
        }
        if !removed.is_empty() {
            let removed: std::collections::HashSet<[u8; 16]> =
                removed.into_iter().map(Uuid::into_bytes).collect();
            self.conns.retain(|e| !removed.contains(&e.id));
        }
        self.seq = newest;
        self.version = version;
        Ok(true)
    }

    fn state_counts(&self) -> BTreeMap<State, u64> {
        let mut counts = BTreeMap::new();
        for e in &self.conns {
            *counts.entry(e.state).or_default() += 1;
        }
        counts
    }

    /// The nearest deadline (seconds from `now`), how many deadlines fall
    /// within each of [`DEADLINE_BUCKETS`], and how many there are, among
    /// the connections refreshed automatically (active or retrying).
    fn deadline_summary(&self, now: Timestamp) -> (Option<f64>, [u64; 9], u64) {
        let now = now.timestamp();
        let mut nearest = None::<i64>;
        let mut buckets = [0u64; DEADLINE_BUCKETS.len()];
        let mut all = 0u64;
        for e in &self.conns {
            if e.deadline_s == 0 || !matches!(e.state, State::Active | State::Retrying) {
                continue;
            }
            let secs = i64::from(e.deadline_s) - now;
            all += 1;
            nearest = Some(nearest.map_or(secs, |n| n.min(secs)));
            for (n, (_, within)) in buckets.iter_mut().zip(DEADLINE_BUCKETS) {
                if secs <= within {
                    *n += 1;
                }
            }
        }
        (nearest.map(|s| s as f64), buckets, all)
    }

    /// Sets the gauges that move with the clock: the nearest deadline and
    /// the deadline counts per horizon.
    fn deadline_gauges(&self, now: Timestamp) {
        let (nearest, buckets, all) = self.deadline_summary(now);
        if let Some(nearest) = nearest {
            metrics::gauge!("acutoken_nearest_deadline_seconds").set(nearest);
        }
        for (n, (within, _)) in buckets.iter().zip(DEADLINE_BUCKETS) {
            metrics::gauge!("acutoken_time_to_deadline_seconds", "within" => within).set(*n as f64);
        }
        metrics::gauge!("acutoken_time_to_deadline_seconds", "within" => DEADLINE_ANY)
            .set(all as f64);
    }
}

/// Brings `tally` up to date (loading it the first time) and, when the
/// store changed, sets the gauges counted from it.
fn store_gauges(
    st: &Store,
    tally: &mut Option<Tally>,
    config: &crate::config::Config,
    now: Timestamp,
) -> Result<(), StoreError> {
    let changed = match tally {
        Some(t) => t.catch_up(st)?,
        None => {
            *tally = Some(Tally::load(st)?);
            true
        }
    };
    // Heartbeats move every few seconds whether or not anything changed.
    if st.is_postgres() {
        let replicas = st.replicas(now)?;
        let live = replicas.iter().filter(|r| r.live).count();
        metrics::gauge!("acutoken_replicas", "state" => "live").set(live as f64);
        metrics::gauge!("acutoken_replicas", "state" => "lapsed")
            .set((replicas.len() - live) as f64);
        for r in &replicas {
            let age = crate::model::parse_time(&r.heartbeat_at)
                .map(|t| (now - t).num_milliseconds() as f64 / 1000.0)
                .unwrap_or(0.0);
            metrics::gauge!("acutoken_replica_heartbeat_age_seconds", "replica" => r.name.clone())
                .set(age);
            metrics::gauge!("acutoken_replica_claims", "replica" => r.name.clone())
                .set(r.claims as f64);
        }
    }
    if !changed {
        return Ok(());
    }
    for c in crate::alerts::channel_health(st, config)? {
        metrics::gauge!("acutoken_alerts_undelivered", "channel" => c.name.clone())
            .set(c.undelivered as f64);
        metrics::gauge!("acutoken_alert_channel_failures", "channel" => c.name.clone())
            .set(c.failures as f64);
    }
    for (channel, n) in crate::store::alerts::delivered_counts(st)? {
        metrics::gauge!("acutoken_alerts_delivered", "channel" => channel).set(n as f64);
    }
    let counts = tally.as_ref().map(Tally::state_counts).unwrap_or_default();
    for s in State::ALL {
        metrics::gauge!("acutoken_connections", "state" => s.as_str())
            .set(counts.get(&s).copied().unwrap_or(0) as f64);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Key, Keyring};
    use crate::model::NewConnection;
    use crate::model::{Connection, Mode};
    use crate::store::connections;
    use crate::store::{Create, Store};

    fn new_connection(i: usize, now: Timestamp) -> NewConnection {
        let state = [State::Active, State::Retrying, State::NeedsSecret][i % 3];
        NewConnection {
            conn: Connection {
                id: Uuid::new_v4(),
                name: format!("c{i:03}"),
                instance: "erp.example.com".into(),
                client_id: format!("{i:08X}@T"),
                labels: BTreeMap::new(),
                mode: Mode::Sliding,
                lifetime: Duration::from_secs(30 * 86400),
                absolute_lifetime: None,
                secret_expires_at: None,
                grant_issued_at: None,
                refresh_token_issued_at: None,
                access_expires_at: None,
                // Spread over the buckets, one of them already past.
                deadline: (!i.is_multiple_of(7))
                    .then(|| now + chrono::Duration::hours(i as i64 * 13 - 20)),
                deadline_source: None,
                next_refresh_at: None,
                last_refresh_at: None,
                last_error: None,
                state,
            },
            client_secret: None,
            refresh_token: None,
        }
    }

    /// What a full scan of the store says the tally should say.
    fn assert_agrees(t: &Tally, st: &Store, now: Timestamp) {
        assert_eq!(t.state_counts(), st.state_counts().unwrap());
        // Seconds to each deadline of the connections refreshed automatically.
        let now_ms = now.timestamp_millis();
        let spread: Vec<f64> = st
            .db()
            .prepare(
                "SELECT deadline FROM connections
                 WHERE state IN ('active', 'retrying') AND deadline IS NOT NULL",
            )
            .unwrap()
            .query_map((), |r| r.get::<_, i64>(0))
            .unwrap()
            .map(|d| (d.unwrap() - now_ms) as f64 / 1000.0)
            .collect();
        let (nearest, buckets, all) = t.deadline_summary(now);
        assert_eq!(all, spread.len() as u64);
        assert_eq!(nearest, spread.iter().copied().reduce(f64::min));
        for (n, (within, secs)) in buckets.iter().zip(DEADLINE_BUCKETS) {
            assert_eq!(
                *n,
                spread.iter().filter(|d| **d <= secs as f64).count() as u64,
                "within {within}"
            );
        }
    }

    /// Loaded once, then caught up after another connection added, changed
    /// and removed rows, the tally agrees with a full scan; with nothing
    /// written it reads nothing.
    #[test]
    fn a_tally_caught_up_from_changes_agrees_with_a_full_scan() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acutoken.db");
        let key = Key::generate();
        let mut writer =
            Store::open(&path, Keyring::new(key.clone(), vec![]), Create::Yes).unwrap();
        let reader = Store::open(&path, Keyring::new(key, vec![]), Create::No).unwrap();
        // Whole seconds: the tally keeps deadlines to the second.
        let now = chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp(), 0).unwrap();
        let news: Vec<NewConnection> = (0..60).map(|i| new_connection(i, now)).collect();
        writer
            .write(|tx, kr| connections::insert_many(tx, kr, &news, now))
            .unwrap();
        let mut t = Tally::load(&reader).unwrap();
        assert_eq!(std::mem::size_of::<Entry>(), 24);
        assert_eq!(t.conns.len(), 60);
        assert_agrees(&t, &reader, now);
        assert!(!t.catch_up(&reader).unwrap(), "nothing was written");

        for i in [1, 4, 9] {
            let mut row = writer.get(&format!("c{i:03}")).unwrap();
            row.conn.state = State::NeedsReauthorization;
            writer.write(|tx, _| connections::put(tx, &row)).unwrap();
        }
        for i in [2, 5] {
            let mut row = writer.get(&format!("c{i:03}")).unwrap();
            row.conn.deadline = Some(now + chrono::Duration::days(40));
            writer.write(|tx, _| connections::put(tx, &row)).unwrap();
        }
        for i in [3, 10, 11] {
            let id = writer.get(&format!("c{i:03}")).unwrap().conn.id;
            writer.write(|tx, _| connections::remove(tx, id)).unwrap();
        }
        let more: Vec<NewConnection> = (60..70).map(|i| new_connection(i, now)).collect();
        writer
            .write(|tx, kr| connections::insert_many(tx, kr, &more, now))
            .unwrap();

        assert!(t.catch_up(&reader).unwrap());
        assert_eq!(t.conns.len(), 67);
        assert_agrees(&t, &reader, now);
        assert!(!t.catch_up(&reader).unwrap(), "nothing written since");
    }
}
