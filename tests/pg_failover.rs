//! The store's PostgreSQL server going away under the daemon while refreshes
//! are in flight (issue 14, DESIGN §10 and §3 invariant 2): a restart after
//! a 20 s outage, and a failover to a promoted synchronous standby found
//! through a multi-host URL. Each test runs the real binary against the
//! simulator, on private clusters of its own (`support_pg::Cluster`), never
//! on the shared server of `.ci/pg`, which other tests use.
//!
//! The refreshes are caught in flight by the simulator: a latency paces
//! them so that some are saved before the server goes, then every request
//! that arrives is held until the server is gone; released, their rotated
//! tokens come back to a daemon that cannot save them.
//!
//! Plain `#[test]`s driving a runtime of their own: the clusters' admin
//! client is the blocking `postgres` one, and they are dropped after the
//! runtime is gone.

mod support_daemon;
mod support_pg;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use acutoken::model::State;
use acutoken::store::connections::SecretColumn;
use nix::sys::signal::Signal;
use support_daemon::{Daemon, Opts, PgStore, Rig, SECRET, SITE, WAIT, api, spill_files};
use support_pg::Cluster;

/// Connections due at once when the daemon starts.
const CONNECTIONS: usize = 24;
/// `renewal.per_instance_concurrent` for these tests: this many refreshes
/// are in flight together at the simulator's one site.
const IN_FLIGHT: usize = 8;
/// The outage the issue asks for.
const OUTAGE: Duration = Duration::from_secs(20);
/// A bound on what takes a few of the daemon's periods (the store health
/// check every 5 s, the held tokens' retry every 3 s) after the server is
/// back, plus the refreshes still due.
const RECOVERY: Duration = Duration::from_secs(90);

/// Runs `f` on a runtime of its own, as `#[tokio::test]` would.
fn run<F: Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// One connection made for a test: its name, its client at the simulator,
/// and the refresh token it was imported with.
struct Made {
    name: String,
    client: String,
    first: String,
}

/// A rig on `url` (the password from `password_file`), logging JSON so the
/// daemon's "refresh attempt" lines can be read field by field, with
/// [`CONNECTIONS`] due connections imported, each with a client of its own.
async fn rig_with_due(url: String, password_file: PathBuf) -> (Rig, Vec<Made>) {
    let rig = Rig::on_postgres(PgStore { url, password_file }).await;
    rig.write_config(&Opts {
        log_extra: "format = \"json\"\n".into(),
        ..Opts::default()
    });
    let mut made = Vec::new();
    let mut records = Vec::new();
    for i in 0..CONNECTIONS {
        let name = format!("c{i:03}");
        let client = format!("client-{i:03}@T");
        rig.sim.add_client(SITE, &client, SECRET, None);
        let first = rig
            .sim
            .issue_grant(SITE, &client, chrono::Utc::now())
            .unwrap();
        // No grant time: the deadline is assumed and each is due at once.
        records.push(serde_json::json!({
            "name": name,
            "instance": rig.sim.base_url(SITE),
            "client_id": client,
            "client_secret": SECRET,
            "refresh_token": first,
        }));
        made.push(Made {
            name,
            client,
            first,
        });
    }
    let file = rig.path("import.json");
    std::fs::write(&file, serde_json::Value::Array(records).to_string()).unwrap();
    rig.cli(&["connection", "import", file.to_str().unwrap()], None)
        .await
        .ok();
    (rig, made)
}

/// `serve` with [`IN_FLIGHT`] refreshes allowed at once on the one site.
fn serve(rig: &Rig) -> Daemon {
    let limit = IN_FLIGHT.to_string();
    rig.serve_with_env(
        None,
        &[("ACUTOKEN__RENEWAL__PER_INSTANCE_CONCURRENT", &limit)],
    )
}

/// The connections the daemon logged a successful refresh of: it logs
/// "refresh attempt" with outcome `refreshed` only once the rotated token
/// is saved (committed). A token saved later from memory is logged as
/// "the held refresh token is saved" instead.
fn logged_saved(logs: &str) -> BTreeSet<String> {
    logs.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "refresh attempt" && v["outcome"] == "refreshed")
        .filter_map(|v| v["connection"].as_str().map(str::to_string))
        .collect()
}

/// Waits until `cond` holds, at most `bound`; panics naming `what` and
/// showing the daemon's output otherwise.
async fn within(bound: Duration, what: &str, d: &Daemon, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out ({bound:?}) waiting for {what}; the daemon's output:\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many connections still hold their first token at the simulator:
/// never refreshed, or refreshed by a request that is not answered yet.
fn not_rotated(rig: &Rig, made: &[Made]) -> usize {
    made.iter()
        .filter(|m| rig.sim.current_refresh_token(SITE, &m.client).as_deref() == Some(&m.first))
        .count()
}

/// Lets the paced refreshes run until `saved_first` are saved, then holds
/// every request that arrives from then on, and waits until every slot the
/// daemon has is taken by a held request (so nothing more is answered or
/// sent until the release). Returns how many are held.
async fn hold_a_batch_in_flight(rig: &Rig, made: &[Made], d: &Daemon, saved_first: usize) -> u64 {
    within(WAIT, "the first refreshes saved", d, || {
        logged_saved(&d.logs()).len() >= saved_first
    })
    .await;
    rig.sim.hold_token_requests();
    within(WAIT, "every free slot taken by a held request", d, || {
        let flying = rig.sim.in_flight(SITE);
        // A request answered but not yet followed by the next one leaves
        // a slot free for a moment: only a full set of slots is steady.
        flying >= 1 && flying as usize == IN_FLIGHT.min(not_rotated(rig, made))
    })
    .await;
    rig.sim.in_flight(SITE)
}

/// Waits, once the server is gone and the held requests are released,
/// until every one of the `sent` refreshes came to one of its two ends: saved
/// (logged before the server went), or held and spilled, since the server
/// took no write any more. The `held` requests, answered after the server
/// went, are among the spilled. Returns how many were spilled.
///
/// The count of spills alone is no condition: a refresh answered just before
/// the hold may still be on its way to the store when the server goes.
async fn settled(rig: &Rig, d: &Daemon, sent: u64, held: u64) -> usize {
    within(
        WAIT,
        "every answered refresh saved, or held and spilled",
        d,
        || {
            let spilled = spill_files(&rig.path("pending")).len();
            (spilled + logged_saved(&d.logs()).len()) as u64 == sent
        },
    )
    .await;
    let spilled = spill_files(&rig.path("pending")).len();
    assert!(
        spilled as u64 >= held,
        "the {held} tokens answered after the server went were spilled: {spilled}"
    );
    spilled
}

/// Waits for `/readyz` on the API socket to answer `status` with a body
/// containing `needle`; returns the body.
async fn readyz_says(rig: &Rig, d: &Daemon, bound: Duration, status: u16, needle: &str) -> String {
    let deadline = Instant::now() + bound;
    loop {
        let a = api(&rig.socket(), "GET", "/readyz").await;
        let body = String::from_utf8_lossy(&a.body).into_owned();
        if a.status == status && body.contains(needle) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never answered {status} with `{needle}` within {bound:?}; last: {} {body}; \
             the daemon's output:\n{}",
            a.status,
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every connection active, refreshed, unclaimed, holding the token the
/// simulator holds as live (only the store is asked: call with the
/// database up).
fn all_saved_live(rig: &Rig, made: &[Made]) -> bool {
    let store = rig.open_store();
    let stored = |id| {
        store
            .secret(id, SecretColumn::RefreshToken)
            .unwrap()
            .map(|s| s.expose().to_string())
    };
    let rows = store.list().unwrap();
    rows.len() == made.len()
        && made.iter().all(|m| {
            let Some(row) = rows.iter().find(|r| r.conn.name == m.name) else {
                return false;
            };
            let live = rig.sim.current_refresh_token(SITE, &m.client);
            row.conn.state == State::Active
                && row.claim.is_none()
                && row.conn.last_refresh_at.is_some()
                && live.is_some()
                && live.as_deref() != Some(&m.first)
                && stored(row.conn.id) == live
        })
}

/// The end state both tests require: every connection active with the live
/// token, each refreshed exactly once (a saved token that was lost would be
/// refreshed again, with a used token), no replay, no spill left, ready.
async fn assert_all_recovered(rig: &Rig, made: &[Made], d: &mut Daemon) {
    within(
        RECOVERY,
        "every connection saved with its live token",
        d,
        || all_saved_live(rig, made),
    )
    .await;
    within(RECOVERY, "the spill directory emptied", d, || {
        spill_files(&rig.path("pending")).is_empty()
    })
    .await;
    readyz_says(rig, d, RECOVERY, 200, "ready").await;
    assert_eq!(rig.sim.total_replays(), 0, "the simulator saw no replay");
    for m in made {
        let sent = rig
            .sim
            .requests(SITE)
            .iter()
            .filter(|r| r.client_id.as_deref() == Some(&m.client))
            .count();
        assert_eq!(sent, 1, "{} was refreshed exactly once", m.name);
    }
    assert_eq!(
        rig.sim.token_requests(SITE),
        made.len() as u64,
        "one token request per connection"
    );
    let logs = d.logs();
    for m in made {
        assert!(!logs.contains(&m.first), "a refresh token was logged");
    }
    d.signal(Signal::SIGTERM);
    assert_eq!(d.exit().await.code(), Some(0), "{}", d.logs());
}

#[test]
fn postgres_stopped_for_20_s_during_refreshes_then_started() {
    let cluster = Cluster::start();
    run(async {
        let (rig, made) = rig_with_due(cluster.url(), cluster.password_file.clone()).await;
        rig.sim.set_latency(SITE, Duration::from_millis(300));
        let mut d = serve(&rig);
        d.ready().await;
        let held = hold_a_batch_in_flight(&rig, &made, &d, 1).await;

        // The server dies with the claims of the held requests committed;
        // only then do their rotated tokens come back.
        tokio::task::block_in_place(|| cluster.stop_immediate());
        let stopped = Instant::now();
        let sent = rig.sim.token_requests(SITE);
        rig.sim.release_token_requests();
        let spilled = settled(&rig, &d, sent, held).await;
        assert_eq!(
            not_rotated(&rig, &made),
            made.len() - sent as usize,
            "the held requests were answered, and nothing more was sent"
        );
        let body = readyz_says(&rig, &d, WAIT, 503, "cannot be reached").await;
        assert!(body.starts_with("the store cannot be reached"), "{body}");

        // The rest of the outage: nothing is claimed or sent meanwhile.
        let left = OUTAGE.saturating_sub(stopped.elapsed());
        tokio::time::sleep(left).await;
        assert!(
            !d.has_exited(),
            "the daemon exited during the outage: {}",
            d.logs()
        );
        assert_eq!(
            rig.sim.token_requests(SITE),
            sent,
            "no refresh was sent while the database was down"
        );
        assert_eq!(
            spill_files(&rig.path("pending")).len(),
            spilled,
            "the spilled tokens are still there"
        );
        readyz_says(&rig, &d, WAIT, 503, "cannot be reached").await;

        tokio::task::block_in_place(|| cluster.start_again());
        d.log_line("the held refresh token is saved").await;
        assert_all_recovered(&rig, &made, &mut d).await;
    });
}

#[test]
fn a_promoted_standby_is_followed_through_the_multi_host_url() {
    let primary = Cluster::start();
    let standby = Cluster::standby_of(&primary);
    let url = format!(
        "postgres://acutoken@{},{}/acutoken?target_session_attrs=read-write",
        primary.host_port(),
        standby.host_port()
    );
    run(async {
        let (rig, made) = rig_with_due(url, primary.password_file.clone()).await;
        rig.sim.set_latency(SITE, Duration::from_millis(300));
        let mut d = serve(&rig);
        d.ready().await;
        let held = hold_a_batch_in_flight(&rig, &made, &d, 1).await;
        // Read before the kill: each of these was committed, so on the
        // synchronous standby, before the primary died.
        let acknowledged = logged_saved(&d.logs());
        assert!(!acknowledged.is_empty());

        tokio::task::block_in_place(|| primary.stop_immediate());
        let sent = rig.sim.token_requests(SITE);
        assert!(
            (sent as usize) < made.len(),
            "refreshes are left for the promoted standby: {sent} sent"
        );
        rig.sim.release_token_requests();
        settled(&rig, &d, sent, held).await;
        // No read-write host now: the standby is still in recovery.
        readyz_says(&rig, &d, WAIT, 503, "cannot be reached").await;

        tokio::task::block_in_place(|| standby.promote());
        // Every save acknowledged before the kill is on the promoted
        // standby. The daemon may write to it meanwhile, but only to other
        // connections: each connection is due once.
        for name in &acknowledged {
            let m = made.iter().find(|m| &m.name == name).unwrap();
            let live = rig.sim.current_refresh_token(SITE, &m.client);
            assert!(live.is_some() && live.as_deref() != Some(&m.first));
            assert_eq!(
                rig.stored_refresh_token(name),
                live,
                "{name}'s acknowledged save is on the promoted standby"
            );
        }

        d.log_line("the held refresh token is saved").await;
        // Includes the connections never sent before the kill: refreshed
        // by the daemon on the promoted standby.
        assert_all_recovered(&rig, &made, &mut d).await;
    });
    drop(standby);
    drop(primary);
}
