//! Several `acutoken serve` replicas on one PostgreSQL store (issue 14 item
//! 3, DESIGN §10): names, sharing the due work with each refresh done once,
//! the per-instance limit across replicas, a replica killed or paused past
//! its lease, alerts once per channel, and the replicas in `status`.
//!
//! Each test makes its own database with `support_pg::fresh()` on the
//! server `.ci/pg start` runs (they fail, never skip, without it) and runs
//! the real binary against the simulator. The replicas share one config
//! file; each gets its name, socket, callback port and spill directory from
//! the environment ([`Rig::serve_replica`]), as on separate machines.
//!
//! The tests run one at a time ([`SERIAL`]): each starts up to three
//! replicas doing a catch-up, and the machine has two cores.

mod support_daemon;
mod support_pg;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use acutoken::daemon::client::call;
use acutoken::model::{ConnectionRow, State};
use acutoken::sim::Fault;
use acutoken::store::Store;
use acutoken::store::connections::SecretColumn;
use nix::sys::signal::Signal;
use support_daemon::{CLIENT, Daemon, Opts, PgStore, Rig, SECRET, Sink, WAIT, api, json};
use support_pg::PgDb;

/// `store.lease` in these tests: a replica that stops renewing loses its
/// claims and its name's liveness this long after its last heartbeat.
const LEASE: &str = "3s";
/// `renewal.per_instance_concurrent`: across all replicas together.
const PER_INSTANCE: u64 = 2;
/// `renewal.max_concurrent`: per replica.
const MAX_CONCURRENT: u64 = 4;
/// The replicas' names.
const NAMES: [&str; 3] = ["r1", "r2", "r3"];
/// Simulator sites (instances) of the catch-up tests, and connections per site.
const SITES: usize = 10;
const PER_SITE: usize = 200;
/// A bound on a catch-up of `SITES * PER_SITE` connections (ideally a few
/// seconds; debug build, two cores).
const CATCH_UP: Duration = Duration::from_secs(150);

/// One test at a time, whatever the harness's thread count.
static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `f` on a runtime of its own, as `#[tokio::test]` would, after the
/// tests before it: the database is dropped after the runtime is gone.
fn run<F: Future>(f: F) -> F::Output {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// One connection a test made: its name, its site and client at the
/// simulator, and the refresh token it was imported with.
#[derive(Debug, Clone)]
struct Made {
    name: String,
    site: String,
    client: String,
    first: String,
}

/// The shared setup: a rig on `db` logging JSON (so "refresh attempt"
/// lines read field by field), with `webhooks` as its channels, and `per_site`
/// connections on each of `sites` simulator sites (`site0`, `site1`, ...),
/// each with a client of its own and imported without a grant time, so every
/// one is due as soon as a replica starts. With `revoked`, each grant is
/// revoked at the simulator before the import: its first refresh is
/// answered `invalid_grant`.
async fn setup(
    db: &PgDb,
    sites: usize,
    per_site: usize,
    revoked: bool,
    webhooks: &str,
) -> (Rig, Vec<Made>) {
    let rig = Rig::on_postgres(PgStore {
        url: db.url.clone(),
        password_file: db.password_file.clone(),
    })
    .await;
    rig.write_config(&Opts {
        log_extra: "format = \"json\"\n".into(),
        webhooks: webhooks.into(),
        ..Opts::default()
    });
    let mut made = Vec::new();
    for s in 0..sites {
        for i in 0..per_site {
            made.push(make(
                &rig,
                &format!("site{s}"),
                &format!("s{s}c{i:03}"),
                revoked,
            ));
        }
    }
    if !made.is_empty() {
        import(&rig, &made, "import.json").await;
    }
    (rig, made)
}

/// A client of its own at the simulator's `site` with a grant made now.
fn make(rig: &Rig, site: &str, name: &str, revoked: bool) -> Made {
    let client = format!("{name}@T");
    rig.sim.add_client(site, &client, SECRET, None);
    let first = rig
        .sim
        .issue_grant(site, &client, chrono::Utc::now())
        .unwrap();
    if revoked {
        rig.sim.revoke(site, &client).unwrap();
    }
    Made {
        name: name.into(),
        site: site.into(),
        client,
        first,
    }
}

/// `connection import` of `made` (a private file: the import warns otherwise).
async fn import(rig: &Rig, made: &[Made], file: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    let records: Vec<serde_json::Value> = made
        .iter()
        .map(|m| {
            serde_json::json!({
                "name": m.name,
                "instance": rig.sim.base_url(&m.site),
                "client_id": m.client,
                "client_secret": SECRET,
                "refresh_token": m.first,
            })
        })
        .collect();
    let path = rig.path(file);
    std::fs::write(&path, serde_json::Value::Array(records).to_string()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = rig
        .cli(&["connection", "import", path.to_str().unwrap()], None)
        .await
        .ok();
    assert!(out.stdout.contains(&made.len().to_string()), "{out:#?}");
}

/// Starts replica `name` with the tests' lease and limits, then `extra`.
fn replica(rig: &Rig, name: &str, extra: &[(&str, &str)]) -> Daemon {
    let per_instance = PER_INSTANCE.to_string();
    let max_concurrent = MAX_CONCURRENT.to_string();
    let mut env = vec![
        ("ACUTOKEN__STORE__LEASE", LEASE),
        (
            "ACUTOKEN__RENEWAL__PER_INSTANCE_CONCURRENT",
            per_instance.as_str(),
        ),
        ("ACUTOKEN__RENEWAL__MAX_CONCURRENT", max_concurrent.as_str()),
    ];
    env.extend_from_slice(extra);
    rig.serve_replica(name, &env)
}

/// Starts every replica of `names` and waits until each is ready.
async fn replicas(rig: &Rig, names: &[&str], extra: &[(&str, &str)]) -> Vec<Daemon> {
    let mut ds: Vec<Daemon> = names.iter().map(|n| replica(rig, n, extra)).collect();
    for d in &mut ds {
        d.ready().await;
    }
    ds
}

/// The last lines of each daemon's output, for a failure message.
fn tails(daemons: &[&Daemon]) -> String {
    daemons
        .iter()
        .map(|d| {
            let logs = d.logs();
            let lines: Vec<&str> = logs.lines().collect();
            let from = lines.len().saturating_sub(30);
            format!(
                "--- pid {} (last {} lines):\n{}\n",
                d.pid,
                lines.len() - from,
                lines[from..].join("\n")
            )
        })
        .collect()
}

/// Waits until `cond` holds, at most `bound`; panics naming `what` with the
/// end of the daemons' output otherwise. Polls every 100 ms: the conditions
/// read the whole store.
async fn within(bound: Duration, what: &str, daemons: &[&Daemon], mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out ({bound:?}) waiting for {what}\n{}",
            tails(daemons)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// [`within`] for a condition that must ask something (an API socket).
async fn within_async<T, F, Fut>(bound: Duration, what: &str, daemons: &[&Daemon], mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + bound;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out ({bound:?}) waiting for {what}\n{}",
            tails(daemons)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET /v1/status` on `socket`, or `None` when it does not answer 200.
async fn status_at(socket: &Path) -> Option<serde_json::Value> {
    let a = call(socket, "GET", "/v1/status", Duration::from_secs(5))
        .await
        .ok()?;
    (a.status == 200).then(|| serde_json::from_slice(&a.body).ok())?
}

/// The entry of replica `name` in a status's `replicas`, if listed.
fn replica_entry<'a>(status: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    status["replicas"]
        .as_array()
        .unwrap_or_else(|| panic!("`replicas` is not an array: {status}"))
        .iter()
        .find(|r| r["name"] == name)
}

/// Waits until the replica answering on `socket` lists `name` as not live
/// (or no longer lists it): a killed replica is seen gone within its lease
/// and a few seconds, after which its name may be taken again.
async fn seen_gone(socket: &Path, name: &str, daemons: &[&Daemon]) {
    within_async(
        WAIT,
        &format!("replica {name} shown not live"),
        daemons,
        || async {
            let st = status_at(socket).await?;
            match replica_entry(&st, name) {
                Some(r) if r["live"] != false => None,
                _ => Some(()),
            }
        },
    )
    .await;
}

/// The connections each daemon logged a "refresh attempt" of (JSON logs).
fn attempted(logs: &str) -> Vec<String> {
    logs.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "refresh attempt")
        .filter_map(|v| v["connection"].as_str().map(str::to_string))
        .collect()
}

/// What the simulator saw per client: (token requests, replays).
fn seen_per_client(rig: &Rig, made: &[Made]) -> BTreeMap<String, (u64, u64)> {
    let sites: BTreeSet<&str> = made.iter().map(|m| m.site.as_str()).collect();
    let mut seen: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for site in sites {
        for r in rig.sim.requests(site) {
            let e = seen.entry(r.client_id.unwrap_or_default()).or_default();
            e.0 += 1;
            e.1 += u64::from(r.replay);
        }
    }
    seen
}

/// The store's rows by name.
fn rows(st: &Store) -> BTreeMap<String, ConnectionRow> {
    st.list()
        .unwrap()
        .into_iter()
        .map(|r| (r.conn.name.clone(), r))
        .collect()
}

fn stored_token(st: &Store, row: &ConnectionRow) -> Option<String> {
    st.secret(row.conn.id, SecretColumn::RefreshToken)
        .unwrap()
        .map(|s| s.expose().to_string())
}

/// True when the connection's history records an unknown outcome (a claim
/// taken over from a replica that stopped renewing it).
fn had_unknown_outcome(st: &Store, row: &ConnectionRow) -> bool {
    st.history(row.conn.id)
        .unwrap()
        .iter()
        .any(|e| e.event == "outcome_unknown")
}

/// No silent loss: every connection is active holding a token the simulator
/// would take, or flagged `needs_reauthorization` with the reason. Returns
/// the names of the flagged ones.
#[track_caller]
fn assert_nothing_silently_lost(rig: &Rig, st: &Store, made: &[Made]) -> BTreeSet<String> {
    let rows = rows(st);
    let mut flagged = BTreeSet::new();
    for m in made {
        let row = &rows[&m.name];
        assert!(row.claim.is_none(), "{} still claimed: {row:?}", m.name);
        match row.conn.state {
            State::Active => {
                let token = stored_token(st, row);
                assert!(
                    token
                        .as_deref()
                        .is_some_and(|t| rig.sim.refresh_token_alive(&m.site, t)),
                    "{} is active but its stored token is dead at the simulator",
                    m.name
                );
            }
            State::NeedsReauthorization => {
                let why = row.conn.last_error.clone().unwrap_or_default();
                assert!(!why.is_empty(), "{} flagged without a reason", m.name);
                flagged.insert(m.name.clone());
            }
            other => panic!("{} ended {other}: {row:?}", m.name),
        }
    }
    flagged
}

/// Stops each daemon with SIGTERM and expects a clean exit.
async fn stop_all(daemons: Vec<Daemon>) {
    for mut d in daemons {
        d.signal(Signal::SIGTERM);
        let code = d.exit().await.code();
        assert_eq!(code, Some(0), "a clean stop exits 0: {}", tails(&[&d]));
    }
}

#[test]
fn two_replicas_with_one_name_are_refused_and_two_names_share_the_store() {
    let db = support_pg::fresh("replica_names");
    run(async {
        let (rig, made) = setup(&db, 1, 2, false, "").await;
        let mut first = replica(&rig, "r1", &[]);
        first.ready().await;

        // A second live `serve` named r1: refused by the store, naming the
        // name; the first is unharmed.
        let mut same = replica(&rig, "r1", &[]);
        let code = same.exit().await.code();
        assert_ne!(code, Some(0), "{}", same.logs());
        let logs = same.logs();
        let errors: Vec<&str> = logs.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "one error line: {logs}");
        let line = errors[0];
        assert!(line.contains("r1"), "names the replica name: {line}");
        assert!(
            line.contains("replica")
                && ["another", "holds", "held", "in use", "already"]
                    .iter()
                    .any(|w| line.contains(w)),
            "says another replica holds the name: {line}"
        );
        assert!(!line.contains(&support_pg::password()), "{line}");
        assert_eq!(api(first.socket(), "GET", "/readyz").await.status, 200);

        // Another name runs beside it on the same store.
        let mut second = replica(&rig, "r2", &[]);
        second.ready().await;
        assert_eq!(api(first.socket(), "GET", "/readyz").await.status, 200);

        // The two connections were due at start: each refreshed once, by
        // one of the two.
        let st = rig.open_store();
        within(
            WAIT,
            "both due connections refreshed",
            &[&first, &second],
            || {
                rows(&st).values().all(|r| {
                    r.conn.state == State::Active
                        && r.conn.last_refresh_at.is_some()
                        && r.claim.is_none()
                })
            },
        )
        .await;
        assert_eq!(rig.sim.total_token_requests(), 2);

        // The token API on either replica answers for any connection, and
        // the token each saved is the one the other sends next.
        for (d, m) in [
            (&first, &made[0]),
            (&second, &made[0]),
            (&second, &made[1]),
            (&first, &made[1]),
        ] {
            let a = api(
                d.socket(),
                "POST",
                &format!("/v1/connections/{}/refresh", m.name),
            )
            .await;
            assert_eq!(
                a.status,
                200,
                "{}: {}",
                m.name,
                String::from_utf8_lossy(&a.body)
            );
        }
        assert_eq!(rig.sim.total_token_requests(), 6);
        assert_eq!(rig.sim.total_replays(), 0);
        assert_nothing_silently_lost(&rig, &st, &made);
        for d in [&first, &second] {
            let st = json(&api(d.socket(), "GET", "/v1/status").await);
            assert_eq!(st["daemon"]["running"], true, "{st}");
        }
        stop_all(vec![first, second]).await;
    });
}

/// On SQLite nothing changes: one `serve` per store whatever its replica
/// name, and `replicas` is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_one_serve_per_store_whatever_its_name_and_no_replicas_listed() {
    let rig = Rig::new().await;
    rig.add("acme", support_daemon::SITE, true).await;
    let mut first = rig.serve_replica("r1", &[]);
    first.ready().await;
    let mut second = rig.serve_replica("r2", &[]);
    let code = second.exit().await.code();
    assert_ne!(code, Some(0), "{}", second.logs());
    assert!(
        second.logs().contains("another acutoken daemon"),
        "refused by the store lock as today: {}",
        second.logs()
    );
    let st = json(&api(first.socket(), "GET", "/v1/status").await);
    assert_eq!(st["replicas"], serde_json::json!([]), "{st}");
    first.signal(Signal::SIGTERM);
    assert_eq!(first.exit().await.code(), Some(0), "{}", first.logs());
}

#[test]
fn three_replicas_refresh_2000_due_connections_each_once() {
    let db = support_pg::fresh("replicas_2000");
    run(async {
        let (rig, made) = setup(&db, SITES, PER_SITE, false, "").await;
        // A latency lets requests overlap, so the limits are tested.
        for s in 0..SITES {
            rig.sim
                .set_latency(&format!("site{s}"), Duration::from_millis(30));
        }
        let ds = replicas(&rig, &NAMES, &[]).await;
        let refs: Vec<&Daemon> = ds.iter().collect();

        let st = rig.open_store();
        within(
            CATCH_UP,
            "every connection refreshed and saved",
            &refs,
            || {
                rows(&st).values().all(|r| {
                    r.conn.state == State::Active
                        && r.conn.last_refresh_at.is_some()
                        && r.claim.is_none()
                })
            },
        )
        .await;

        let total = (SITES * PER_SITE) as u64;
        assert_eq!(rig.sim.total_token_requests(), total, "each refreshed once");
        assert_eq!(rig.sim.total_replays(), 0);
        let seen = seen_per_client(&rig, &made);
        for m in &made {
            assert_eq!(
                seen.get(&m.client),
                Some(&(1, 0)),
                "{}: one request, no replay",
                m.name
            );
        }
        for s in 0..SITES {
            let site = format!("site{s}");
            assert!(
                rig.sim.max_concurrency(&site) <= PER_INSTANCE,
                "{site}: per_instance_concurrent ({PER_INSTANCE}) held across the replicas: {}",
                rig.sim.max_concurrency(&site)
            );
        }
        assert!(
            rig.sim.max_concurrency_all() <= MAX_CONCURRENT * NAMES.len() as u64,
            "max_concurrent ({MAX_CONCURRENT}) per replica: {} in flight at once",
            rig.sim.max_concurrency_all()
        );

        // Every stored token is the live one at the simulator.
        let rows = rows(&st);
        for m in &made {
            let stored = stored_token(&st, &rows[&m.name]);
            let current = rig.sim.current_refresh_token(&m.site, &m.client);
            assert!(
                current.is_some() && current != Some(m.first.clone()),
                "{} rotated",
                m.name
            );
            assert_eq!(stored, current, "{} holds the live token", m.name);
        }

        // The work was shared: each connection attempted by exactly one
        // replica, and more than one replica did some.
        let mut by: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        let mut working = 0;
        for (name, d) in NAMES.iter().zip(&ds) {
            let done = attempted(&d.logs());
            working += usize::from(!done.is_empty());
            for c in done {
                by.entry(c).or_default().push(name);
            }
        }
        assert_eq!(
            by.len(),
            made.len(),
            "every connection attempted by a replica"
        );
        for (c, who) in &by {
            assert_eq!(who.len(), 1, "{c} attempted by {who:?}");
        }
        assert!(working > 1, "more than one replica refreshed: {working}");
        stop_all(ds).await;
        assert_eq!(
            rig.sim.total_token_requests(),
            total,
            "nothing after the catch-up"
        );
    });
}

#[test]
fn killing_a_replica_mid_catch_up_loses_nothing() {
    let db = support_pg::fresh("replicas_kill");
    run(async {
        let (rig, made) = setup(&db, SITES, PER_SITE, false, "").await;
        // Slower answers: the catch-up lasts through several kills, and
        // each kill finds requests in flight.
        for s in 0..SITES {
            rig.sim
                .set_latency(&format!("site{s}"), Duration::from_millis(150));
        }
        let total = made.len() as u64;
        let mut ds = replicas(&rig, &NAMES, &[]).await;

        let mut at_kill = Vec::new();
        for round in 0..3 {
            let victim = round % NAMES.len();
            let witness = (victim + 1) % NAMES.len();
            let before = rig.sim.total_token_requests();
            {
                // Ends too if the catch-up is over (every connection sent
                // at least once): a kill then is harmless, never a hang.
                let refs: Vec<&Daemon> = ds.iter().collect();
                within(
                    CATCH_UP,
                    &format!("round {round}'s refreshes under way"),
                    &refs,
                    || {
                        let sent = rig.sim.total_token_requests();
                        sent >= before + 100 || sent >= total
                    },
                )
                .await;
            }
            at_kill.push(rig.sim.total_token_requests());
            ds[victim].signal(Signal::SIGKILL);
            ds[victim].exit().await;
            // Restarted under the same name once the others see it gone.
            seen_gone(ds[witness].socket(), NAMES[victim], &[&ds[witness]]).await;
            ds[victim] = replica(&rig, NAMES[victim], &[]);
            ds[victim].ready().await;
        }
        assert!(
            at_kill[0] < total,
            "the first kill came during the catch-up: {at_kill:?} requests of {total}"
        );

        let st = rig.open_store();
        {
            let refs: Vec<&Daemon> = ds.iter().collect();
            within(CATCH_UP, "every connection settled", &refs, || {
                rows(&st).values().all(|r| {
                    r.claim.is_none()
                        && (r.conn.state == State::NeedsReauthorization
                            || (r.conn.state == State::Active && r.conn.last_refresh_at.is_some()))
                })
            })
            .await;
        }
        let flagged = assert_nothing_silently_lost(&rig, &st, &made);

        // A replay only where a claim was taken over (the one re-send the
        // orphan rule allows), never twice, and never more than one re-send.
        let seen = seen_per_client(&rig, &made);
        let rows = rows(&st);
        let mut replayed = 0;
        for m in &made {
            let (sent, replays) = seen.get(&m.client).copied().unwrap_or_default();
            let row = &rows[&m.name];
            assert!(sent >= 1, "{} never sent", m.name);
            assert!(
                sent <= 2,
                "{}: {sent} requests, at most one re-send",
                m.name
            );
            assert!(replays <= 1, "{}: {replays} replays", m.name);
            if replays > 0 || sent > 1 {
                assert!(
                    had_unknown_outcome(&st, row),
                    "{}: sent {sent} times ({replays} replays) without an outcome_unknown event",
                    m.name
                );
            }
            if replays > 0 {
                replayed += 1;
                assert!(
                    flagged.contains(&m.name),
                    "{}: replayed (its grant revoked) but not flagged",
                    m.name
                );
            }
        }
        assert_eq!(rig.sim.total_replays(), replayed);
        eprintln!(
            "kill -9 at {at_kill:?} requests: {} connections, {} flagged, {replayed} replayed, {} requests",
            made.len(),
            flagged.len(),
            rig.sim.total_token_requests()
        );
        stop_all(ds).await;
    });
}

/// r1 alone claims two connections and sends both requests: `acme`'s hangs
/// at the simulator unanswered (its token not consumed), `beta`'s is
/// answered while r1 is stopped (the rotated token waits in r1's socket).
/// r2, started meanwhile, takes both over once r1's lease runs out, under
/// the orphan rule: `acme` is sent once more and saved; `beta`'s re-send is
/// a replay, so `beta` is flagged with the reason. r1, continued, must not
/// write over either.
#[test]
fn a_replica_paused_past_its_lease_is_fenced() {
    let db = support_pg::fresh("replicas_pause");
    run(async {
        let (rig, _) = setup(&db, 0, 0, false, "").await;
        for site in ["hang", "held"] {
            rig.sim.add_client(site, CLIENT, SECRET, None);
        }
        let acme_first = rig.add("acme", "hang", false).await;
        let beta_first = rig.add("beta", "held", false).await;
        let made = [
            Made {
                name: "acme".into(),
                site: "hang".into(),
                client: CLIENT.into(),
                first: acme_first.clone(),
            },
            Made {
                name: "beta".into(),
                site: "held".into(),
                client: CLIENT.into(),
                first: beta_first.clone(),
            },
        ];
        rig.sim.inject("hang", Fault::Hang, Some(1));
        rig.sim.hold_token_requests();

        let mut r1 = replica(&rig, "r1", &[]);
        r1.ready().await;
        within(WAIT, "both requests in flight from r1", &[&r1], || {
            rig.sim.in_flight("hang") == 1 && rig.sim.in_flight("held") == 1
        })
        .await;
        r1.signal(Signal::SIGSTOP);
        rig.sim.release_token_requests();
        within(WAIT, "beta's token rotated by r1's request", &[&r1], || {
            rig.sim.current_refresh_token("held", CLIENT).as_deref() != Some(beta_first.as_str())
        })
        .await;

        let mut r2 = replica(&rig, "r2", &[]);
        r2.ready().await;
        let st = rig.open_store();
        within(
            WAIT,
            "r2 to take both claims over and finish them",
            &[&r2],
            || {
                let rows = rows(&st);
                let acme = &rows["acme"];
                let current = rig.sim.current_refresh_token("hang", CLIENT);
                acme.claim.is_none()
                    && acme.conn.state == State::Active
                    && current.as_deref() != Some(acme_first.as_str())
                    && stored_token(&st, acme) == current
                    && rows["beta"].conn.state == State::NeedsReauthorization
                    && rows["beta"].claim.is_none()
            },
        )
        .await;
        let rows_now = rows(&st);
        for name in ["acme", "beta"] {
            assert!(
                had_unknown_outcome(&st, &rows_now[name]),
                "{name}: the take-over is recorded as an unknown outcome"
            );
        }
        let beta_why = rows_now["beta"].conn.last_error.clone().unwrap_or_default();
        assert!(beta_why.contains("lost"), "beta says why: {beta_why}");
        // One re-send each: acme's saved, beta's a replay.
        assert_eq!(rig.sim.token_requests("hang"), 2);
        assert_eq!(rig.sim.replays("hang"), 0);
        assert_eq!(rig.sim.token_requests("held"), 2);
        assert_eq!(rig.sim.replays("held"), 1);

        // r1 continues: its two requests end (acme's by its timeout, beta's
        // with the rotated token it can no longer save over newer state).
        r1.signal(Signal::SIGCONT);
        let deadline = Instant::now() + WAIT;
        loop {
            // A replica may also stop on finding itself fenced; either way
            // its stale work is over.
            if r1.has_exited() {
                break;
            }
            if status_at(r1.socket())
                .await
                .is_some_and(|st| st["daemon"]["refreshing"] == 0)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "r1 did not finish its stale refreshes\n{}",
                tails(&[&r1, &r2])
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let flagged = assert_nothing_silently_lost(&rig, &st, &made);
        assert_eq!(flagged, BTreeSet::from(["beta".to_string()]));
        let acme = &rows(&st)["acme"];
        assert_eq!(
            stored_token(&st, acme),
            rig.sim.current_refresh_token("hang", CLIENT),
            "r1 did not write over acme's newer token"
        );
        assert_eq!(
            rig.sim.token_requests("hang"),
            2,
            "no send beyond the one re-send"
        );
        assert_eq!(
            rig.sim.token_requests("held"),
            2,
            "no send beyond the one re-send"
        );
        assert_eq!(rig.sim.total_replays(), 1);
        drop(r1);
        stop_all(vec![r2]).await;
    });
}

/// The alert objects a generic message stands for: the message itself, or
/// the listed members of a group.
fn listed(body: &serde_json::Value) -> Vec<&serde_json::Value> {
    match body["alerts"].as_array() {
        Some(list) => list.iter().collect(),
        None => vec![body],
    }
}

/// How many alerts a generic message stands for (a group's `count`).
fn stands_for(body: &serde_json::Value) -> u64 {
    body["count"].as_u64().unwrap_or(1)
}

#[test]
fn three_hundred_failing_connections_alert_once_per_channel() {
    let db = support_pg::fresh("replicas_alerts");
    run(async {
        let sink = Sink::start().await;
        let (rig, made) = setup(&db, 10, 30, true, &sink.webhook_toml("chat")).await;
        // Grouped: what fails within 2 s goes out together, then at most one
        // message per 2 s per kind. A digest every 4 s.
        let extra = [
            ("ACUTOKEN__ALERTS__GROUP_WAIT", "2s"),
            ("ACUTOKEN__ALERTS__GROUP_INTERVAL", "2s"),
            ("ACUTOKEN__ALERTS__DIGEST", "*/4 * * * * *"),
        ];
        let ds = replicas(&rig, &NAMES, &extra).await;
        let refs: Vec<&Daemon> = ds.iter().collect();
        let alerts = || -> Vec<serde_json::Value> {
            sink.received("chat")
                .into_iter()
                .filter(|b| b["kind"] != "digest")
                .collect()
        };
        let delivered =
            |alerts: &[serde_json::Value]| -> u64 { alerts.iter().map(stands_for).sum() };

        let st = rig.open_store();
        within(CATCH_UP, "all 300 flagged", &refs, || {
            rows(&st)
                .values()
                .all(|r| r.conn.state == State::NeedsReauthorization)
        })
        .await;
        within(WAIT, "300 alerts delivered", &refs, || {
            delivered(&alerts()) >= 300
        })
        .await;

        // One more, imported while the replicas run: once its alert is
        // delivered (a later group on the same channel), a duplicate of
        // the first group from another replica would have come too.
        let sentinel = make(&rig, "site0", "sentinel", true);
        import(&rig, std::slice::from_ref(&sentinel), "sentinel.json").await;
        within(WAIT, "the sentinel's alert delivered", &refs, || {
            alerts()
                .iter()
                .any(|b| listed(b).iter().any(|a| a["connection"] == "sentinel"))
        })
        .await;
        // Two digests, to compare their times.
        within(WAIT, "two digests", &refs, || {
            sink.received("chat")
                .iter()
                .filter(|b| b["kind"] == "digest")
                .count()
                >= 2
        })
        .await;

        let got = alerts();
        assert!(
            got.len() <= 10,
            "a handful of messages, not {}: {got:#?}",
            got.len()
        );
        assert_eq!(delivered(&got), 301, "each alert delivered once: {got:#?}");
        let mut ids = BTreeSet::new();
        let mut keys = BTreeSet::new();
        for body in &got {
            assert!(
                ids.insert(body["id"].to_string()),
                "message {} twice",
                body["id"]
            );
            for a in listed(body) {
                assert_eq!(a["kind"], "needs_reauthorization", "{a}");
                let key = (
                    a["connection"].to_string(),
                    a["kind"].to_string(),
                    a["status"].to_string(),
                );
                assert!(keys.insert(key.clone()), "alert {key:?} delivered twice");
            }
        }
        for m in &made {
            assert_eq!(
                rows(&st)[&m.name].conn.state,
                State::NeedsReauthorization,
                "{}",
                m.name
            );
        }

        // The digest goes out once per scheduled time (every 4 s): two
        // digests of one time would be seconds apart at most.
        let mut times: Vec<chrono::DateTime<chrono::Utc>> = sink
            .received("chat")
            .iter()
            .filter(|b| b["kind"] == "digest")
            .map(|b| {
                chrono::DateTime::parse_from_rfc3339(b["sent_at"].as_str().unwrap())
                    .unwrap()
                    .to_utc()
            })
            .collect();
        times.sort();
        for w in times.windows(2) {
            assert!(
                w[1] - w[0] >= chrono::Duration::seconds(2),
                "two digests for one scheduled time: {times:?}\n{}",
                refs.iter()
                    .flat_map(|d| d
                        .logs()
                        .lines()
                        .filter(|l| l.contains("digest"))
                        .map(str::to_string)
                        .collect::<Vec<_>>())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        assert_eq!(rig.sim.total_replays(), 0);
        stop_all(ds).await;
    });
}

#[test]
fn status_lists_every_replica() {
    let db = support_pg::fresh("replicas_status");
    run(async {
        let sink = Sink::start().await;
        let (rig, _) = setup(&db, 1, 1, false, &sink.webhook_toml("chat")).await;
        let port = support_daemon::free_port();
        let metrics = format!("127.0.0.1:{port}");
        let mut r1 = replica(&rig, "r1", &[("ACUTOKEN__METRICS__LISTEN", &metrics)]);
        r1.ready().await;
        let mut r2 = replica(&rig, "r2", &[]);
        r2.ready().await;

        let both_live = |st: &serde_json::Value| {
            ["r1", "r2"]
                .iter()
                .all(|n| replica_entry(st, n).is_some_and(|r| r["live"] == true))
        };
        let st = within_async(
            WAIT,
            "r1's status to list r1 and r2 live",
            &[&r1, &r2],
            || async { status_at(r1.socket()).await.filter(|st| both_live(st)) },
        )
        .await;
        assert_eq!(st["daemon"]["replica"], "r1", "{st}");
        assert_eq!(st["replicas"].as_array().unwrap().len(), 2, "{st}");
        let mut holders = 0;
        for (name, d) in [("r1", &r1), ("r2", &r2)] {
            let r = replica_entry(&st, name).unwrap();
            assert_eq!(r["pid"], d.pid.as_raw(), "{r}");
            assert!(r["host"].as_str().is_some_and(|h| !h.is_empty()), "{r}");
            assert_eq!(r["version"], env!("CARGO_PKG_VERSION"), "{r}");
            let started =
                chrono::DateTime::parse_from_rfc3339(r["started_at"].as_str().unwrap()).unwrap();
            let beat =
                chrono::DateTime::parse_from_rfc3339(r["heartbeat_at"].as_str().unwrap()).unwrap();
            assert!(started <= beat, "{r}");
            assert!(
                (chrono::Utc::now() - beat.to_utc()).abs() < chrono::Duration::seconds(30),
                "a recent heartbeat: {r}"
            );
            assert!(r["claims"].as_u64().is_some(), "{r}");
            assert!(r["alerts"].is_boolean(), "{r}");
            holders += usize::from(r["alerts"] == true);
        }
        assert!(holders <= 1, "one replica at a time delivers alerts: {st}");

        // r2's answer names itself; its heartbeat moves on (every lease/3).
        let st2 = json(&api(r2.socket(), "GET", "/v1/status").await);
        assert_eq!(st2["daemon"]["replica"], "r2", "{st2}");
        assert!(both_live(&st2), "{st2}");
        let beat = replica_entry(&st, "r2").unwrap()["heartbeat_at"].clone();
        let r1_socket = r1.socket().to_path_buf();
        within_async(WAIT, "r2's heartbeat to move on", &[&r1, &r2], || {
            let beat = beat.clone();
            let socket = r1_socket.clone();
            async move {
                let st = status_at(&socket).await?;
                (replica_entry(&st, "r2")?["heartbeat_at"] != beat).then_some(())
            }
        })
        .await;

        // `status --json` on r2's machine says the same.
        let r2_socket = r2.socket().display().to_string();
        let out = rig
            .cli_with_env(
                &["status", "--json"],
                &[("ACUTOKEN__API__SOCKET", &r2_socket)],
            )
            .await;
        let cli: serde_json::Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {out:#?}"));
        assert!(both_live(&cli), "{cli}");

        // The metrics count the live replicas.
        let url = format!("http://{metrics}/metrics");
        let live_gauge = |n: u32| {
            let url = url.clone();
            async move {
                let text = support_daemon::http()
                    .get(&url)
                    .send()
                    .await
                    .ok()?
                    .text()
                    .await
                    .ok()?;
                text.lines()
                    .any(|l| l.trim() == format!("acutoken_replicas{{state=\"live\"}} {n}"))
                    .then_some(())
            }
        };
        within_async(WAIT, "acutoken_replicas{state=\"live\"} 2", &[&r1], || {
            live_gauge(2)
        })
        .await;

        // r2 killed: shown not live within its lease and a few seconds.
        r2.signal(Signal::SIGKILL);
        r2.exit().await;
        seen_gone(r1.socket(), "r2", &[&r1]).await;
        let st = json(&api(r1.socket(), "GET", "/v1/status").await);
        assert!(
            replica_entry(&st, "r1").is_some_and(|r| r["live"] == true),
            "{st}"
        );
        within_async(WAIT, "acutoken_replicas{state=\"live\"} 1", &[&r1], || {
            live_gauge(1)
        })
        .await;
        stop_all(vec![r1]).await;
    });
}

/// A key rotation through one replica re-seals values every other replica
/// would then fail to open: refused while others serve, naming them; once
/// they stopped (and left), the same command goes through.
#[test]
fn a_key_rotation_waits_until_no_other_replica_serves() {
    let db = support_pg::fresh("replicas_rotate");
    run(async {
        let (rig, _) = setup(&db, 1, 2, false, "").await;
        let mut ds = replicas(&rig, &["r1", "r2"], &[]).await;
        let new_key = rig.path("new.key");
        let new_key_arg = new_key.to_str().unwrap();
        rig.cli(&["key", "generate", "--out", new_key_arg], None)
            .await
            .ok();
        let via_r1 = ds[0].socket().display().to_string();
        let env = [("ACUTOKEN__API__SOCKET", via_r1.as_str())];
        let args = ["key", "rotate", "--new-key-file", new_key_arg];

        let out = rig.cli_with_env(&args, &env).await;
        assert_ne!(out.code, Some(0), "{out:#?}");
        let errors: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| l.contains("error:"))
            .collect();
        assert_eq!(errors.len(), 1, "{out:#?}");
        assert!(
            errors[0].contains("other replicas serve this store (r2)"),
            "{}",
            errors[0]
        );

        let r2 = ds.pop().unwrap();
        stop_all(vec![r2]).await;
        let out = rig.cli_with_env(&args, &env).await;
        assert_eq!(out.code, Some(0), "{out:#?}");
        stop_all(ds).await;
    });
}

/// The token API of any replica answers for any connection, and a token
/// that must be refreshed is refreshed once across replicas: a replica that
/// finds another one refreshing it waits for that refresh and answers with
/// its token.
#[test]
fn any_replica_answers_a_token_request_with_one_refresh_between_them() {
    let db = support_pg::fresh("replicas_token");
    run(async {
        let (rig, made) = setup(&db, 1, 1, false, "").await;
        let name = made[0].name.clone();
        rig.sim.hold_token_requests();
        let ds = replicas(&rig, &["r1", "r2"], &[]).await;
        let refs: Vec<&Daemon> = ds.iter().collect();
        let path = format!("/v1/connections/{name}/token");
        let (s1, s2) = (ds[0].socket().to_path_buf(), ds[1].socket().to_path_buf());
        let first = tokio::spawn({
            let path = path.clone();
            async move { api(&s1, "GET", &path).await }
        });
        // r1's refresh (the catch-up at start, or this request) is at the
        // identity server, held there: r2 is asked meanwhile.
        within(WAIT, "a refresh held at the simulator", &refs, || {
            rig.sim.in_flight(&made[0].site) == 1
        })
        .await;
        let second = tokio::spawn({
            let path = path.clone();
            async move { api(&s2, "GET", &path).await }
        });
        rig.sim.release_token_requests();
        let (a, b) = (first.await.unwrap(), second.await.unwrap());
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        assert_eq!(b.status, 200, "{}", String::from_utf8_lossy(&b.body));
        assert_eq!(
            rig.sim.token_requests(&made[0].site),
            1,
            "one refresh\n{}",
            tails(&refs)
        );
        assert_eq!(
            json(&a)["access_token"],
            json(&b)["access_token"],
            "both replicas hand out the one token"
        );
        assert_eq!(rig.sim.total_replays(), 0);
        stop_all(ds).await;
    });
}
