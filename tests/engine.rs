//! The renewal engine against the Acumatica simulator: DESIGN §3's invariants,
//! error classes, backoff, deadlines, and concurrency limits.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use acutoken::acumatica::TokenClient;
use acutoken::clock::{self, SharedClock};
use acutoken::config::Config;
use acutoken::crypto::{Key, Keyring};
use acutoken::model::NewConnection;
use acutoken::model::{Connection, DeadlineSource, Mode, State, Timestamp};
use acutoken::renewal::engine::{Engine, EngineParts, NoHooks, TokenAnswer, Trigger};
use acutoken::renewal::{client_settings, planning};
use acutoken::secret::Secret;
use acutoken::sim::{Fault, Lifetime, Simulator};
use acutoken::store::StoreHandle;
use acutoken::store::claims::{self, Owner};
use acutoken::store::connections::{self, SecretColumn};
use acutoken::store::{Create, Store};
use uuid::Uuid;

struct World {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    keyring: Keyring,
    sim: Simulator,
    config: Config,
    clock: SharedClock,
}

fn config() -> Config {
    let mut c = Config::default();
    c.acumatica.allow_insecure_loopback = true;
    c.renewal.http_timeout = Duration::from_secs(10);
    c.renewal.retry_min = Duration::from_secs(60);
    c.renewal.retry_max = Duration::from_secs(3600);
    c
}

impl World {
    async fn new() -> World {
        Self::with_clock(clock::system()).await
    }

    async fn with_clock(clock: SharedClock) -> World {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acutoken.db");
        let keyring = Keyring::new(Key::generate(), vec![]);
        Store::open(&path, keyring.clone(), Create::Yes).unwrap();
        let sim = Simulator::start(clock.clone()).await.unwrap();
        World {
            _dir: dir,
            path,
            keyring,
            sim,
            config: config(),
            clock,
        }
    }

    fn store(&self) -> Store {
        Store::open(&self.path, self.keyring.clone(), Create::No).unwrap()
    }

    /// Adds a connection with a live grant issued `age` ago on `site`.
    fn add(&self, name: &str, site: &str, mode: Mode, age: chrono::Duration) -> Uuid {
        let now = self.clock.now();
        let client_id = format!(
            "{}@Tenant {name}",
            Uuid::new_v4().to_string().to_uppercase()
        );
        let secret = format!("secret-{name}");
        self.sim.add_client(site, &client_id, &secret, None);
        let rt = self.sim.issue_grant(site, &client_id, now - age).unwrap();
        let mut conn = Connection {
            id: Uuid::new_v4(),
            name: name.into(),
            instance: self.sim.instance(site),
            client_id,
            labels: BTreeMap::new(),
            mode,
            lifetime: Duration::from_secs(30 * 86400),
            absolute_lifetime: None,
            secret_expires_at: None,
            grant_issued_at: Some(now - age),
            refresh_token_issued_at: Some(now - age),
            access_expires_at: None,
            deadline: None,
            deadline_source: None,
            next_refresh_at: None,
            last_refresh_at: None,
            last_error: None,
            state: State::Active,
        };
        planning::initial(&mut conn, true, &self.config.renewal.policy(), now);
        let id = conn.id;
        let new = NewConnection {
            conn,
            client_secret: Some(Secret::new(secret)),
            refresh_token: Some(Secret::new(rt)),
        };
        self.store()
            .write(|tx, kr| connections::insert(tx, kr, &new, now))
            .unwrap();
        id
    }

    fn engine(&self, role: &str) -> Arc<Engine> {
        let store = StoreHandle::from_store(self.store()).unwrap();
        Arc::new(Engine::new(EngineParts {
            store,
            client: TokenClient::new(client_settings(&self.config)).unwrap(),
            policy: self.config.renewal.policy(),
            clock: self.clock.clone(),
            owner: Owner::current(role),
            http_timeout: self.config.renewal.http_timeout,
            spill_dir: Some(self._dir.path().join("pending")),
            limits: acutoken::renewal::limits::Limits::new(16, 2),
            hooks: Arc::new(NoHooks),
        }))
    }

    fn row(&self, id: Uuid) -> acutoken::model::ConnectionRow {
        self.store().get_by_id(id).unwrap().unwrap()
    }

    fn stored_refresh_token(&self, id: Uuid) -> String {
        self.store()
            .secret(id, SecretColumn::RefreshToken)
            .unwrap()
            .unwrap()
            .expose()
            .to_string()
    }
}

fn site_of(w: &World, id: Uuid) -> String {
    let inst = w.row(id).conn.instance;
    inst.split_once('/')
        .map(|(_, s)| s.to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_refresh_sends_one_client_secret_post_and_saves_the_rotated_token() {
    let w = World::new().await;
    let id = w.add(
        "acme",
        "AcumaticaERP",
        Mode::Absolute,
        chrono::Duration::days(1),
    );
    let before = w.stored_refresh_token(id);
    let engine = w.engine("test");
    let rep = engine.refresh(id, Trigger::OnDemand).await.unwrap();
    assert_eq!(rep.outcome, "refreshed", "{rep:?}");
    let reqs = w.sim.requests("AcumaticaERP");
    assert_eq!(reqs.len(), 1);
    let r = &reqs[0];
    assert_eq!(r.grant_type.as_deref(), Some("refresh_token"));
    assert!(!r.basic_auth, "client_secret_post, not HTTP Basic");
    for k in ["client_id", "client_secret", "refresh_token"] {
        assert!(
            r.form_keys.iter().any(|f| f == k),
            "form lacks {k}: {:?}",
            r.form_keys
        );
    }
    assert!(
        r.client_id.as_deref().unwrap().ends_with("@Tenant acme"),
        "tenant with a space kept whole"
    );
    let after = w.stored_refresh_token(id);
    assert_ne!(before, after, "the rotated token replaced the old one");
    let client = w.row(id).conn.client_id;
    assert_eq!(
        w.sim
            .current_refresh_token("AcumaticaERP", &client)
            .as_deref(),
        Some(after.as_str())
    );
    let row = w.row(id);
    assert_eq!(row.conn.state, State::Active);
    assert!(row.claim.is_none(), "the claim is released");
    assert!(row.conn.next_refresh_at.unwrap() > w.clock.now());
}

/// A refresh from elsewhere (the CLI, the API, another process) moves the
/// plan; the scheduler's wake-up that fell due before it must not send a
/// second login to the customer's instance (issue 12, item 17).
#[tokio::test]
async fn a_scheduled_refresh_whose_plan_moved_sends_nothing() {
    let manual = clock::ManualClock::new(chrono::Utc::now());
    let w = World::with_clock(Arc::new(manual.clone())).await;
    let id = w.add("acme", "s1", Mode::Absolute, chrono::Duration::days(1));
    let engine = w.engine("test");
    let rep = engine.refresh(id, Trigger::OnDemand).await.unwrap();
    assert_eq!(rep.outcome, "refreshed", "{rep:?}");
    let planned = w.row(id).conn.next_refresh_at.unwrap();
    assert!(planned > w.clock.now());

    let rep = engine.refresh(id, Trigger::Scheduled).await.unwrap();
    assert_eq!(rep.outcome, "skipped", "{rep:?}");
    assert_eq!(
        rep.next_refresh_at,
        Some(planned),
        "the report tells when it is due"
    );
    assert_eq!(w.sim.token_requests("s1"), 1, "nothing more was sent");
    // Due, it is refreshed as usual.
    manual.set(planned + chrono::Duration::seconds(1));
    let rep = engine.refresh(id, Trigger::Scheduled).await.unwrap();
    assert_eq!(rep.outcome, "refreshed", "{rep:?}");
    assert_eq!(w.sim.token_requests("s1"), 2);
}

#[tokio::test]
async fn the_rotated_token_is_the_one_sent_next() {
    let w = World::new().await;
    let id = w.add("acme", "s1", Mode::Absolute, chrono::Duration::days(1));
    let engine = w.engine("test");
    for _ in 0..5 {
        assert_eq!(
            engine.refresh(id, Trigger::OnDemand).await.unwrap().outcome,
            "refreshed"
        );
    }
    assert_eq!(w.sim.token_requests("s1"), 5);
    assert_eq!(
        w.sim.total_replays(),
        0,
        "no refresh token was ever sent twice"
    );
    assert!(w.sim.refresh_token_alive("s1", &w.stored_refresh_token(id)));
}

#[tokio::test]
async fn invalid_client_means_needs_secret_and_no_retry() {
    let w = World::new().await;
    let id = w.add("acme", "s1", Mode::Absolute, chrono::Duration::days(1));
    let client = w.row(id).conn.client_id;
    w.sim
        .replace_secret("s1", &client, "someone-else-s-secret", None)
        .unwrap();
    let engine = w.engine("test");
    let rep = engine.refresh(id, Trigger::OnDemand).await.unwrap();
    assert_eq!(rep.outcome, "failed");
    let row = w.row(id);
    assert_eq!(row.conn.state, State::NeedsSecret);
    assert_eq!(
        row.conn.next_refresh_at, None,
        "never retried automatically"
    );
    assert!(row.conn.last_error.unwrap().contains("invalid_client"));
    // Asking again sends nothing: a human must act.
    let rep = engine.refresh(id, Trigger::OnDemand).await.unwrap();
    assert_eq!(rep.outcome, "refused");
    assert_eq!(w.sim.token_requests("s1"), 1);
    // The refresh token was not consumed by the refused request.
    assert!(w.sim.refresh_token_alive("s1", &w.stored_refresh_token(id)));
}

#[tokio::test]
async fn invalid_grant_means_needs_reauthorization_and_no_retry() {
    let w = World::new().await;
    let id = w.add("acme", "s1", Mode::Absolute, chrono::Duration::days(1));
    let client = w.row(id).conn.client_id;
    assert_eq!(w.sim.revoke("s1", &client).unwrap(), 1);
    let engine = w.engine("test");
    engine.refresh(id, Trigger::OnDemand).await.unwrap();
    let row = w.row(id);
    assert_eq!(row.conn.state, State::NeedsReauthorization);
    assert_eq!(row.conn.next_refresh_at, None);
    assert_eq!(
        engine.refresh(id, Trigger::OnDemand).await.unwrap().outcome,
        "refused"
    );
    assert_eq!(w.sim.token_requests("s1"), 1);
    match engine.token("acme").await.unwrap() {
        TokenAnswer::NeedsHuman(r) => assert_eq!(r.conn.state, State::NeedsReauthorization),
        other => panic!("expected a human to be needed, got {other:?}"),
    }
}

#[tokio::test]
async fn transient_failures_back_off_and_recover() {
    let w = World::new().await;
    let id = w.add("acme", "s1", Mode::Absolute, chrono::Duration::days(1));
    let engine = w.engine("test");
    w.sim.inject("s1", Fault::Html503, Some(1));
    w.sim.inject(
        "s1",
        Fault::Status {
            code: 429,
            retry_after: Some(600),
            body: String::new(),
        },
        Some(1),
    );
    let t0 = w.clock.now();
    engine.refresh(id, Trigger::OnDemand).await.unwrap();
    let row = w.row(id);
    assert_eq!(row.conn.state, State::Retrying);
    assert_eq!(row.failures, 1);
    let first = row.conn.next_refresh_at.unwrap();
    assert!(
        first >= t0 + chrono::Duration::seconds(59),
        "at least retry_min: {first}"
    );
    assert!(
        first <= t0 + chrono::Duration::seconds(3601),
        "at most retry_max"
    );
    engine.refresh(id, Trigger::OnDemand).await.unwrap();
    let row = w.row(id);
    assert_eq!(row.failures, 2);
    assert!(
        row.conn.next_refresh_at.unwrap() >= t0 + chrono::Duration::seconds(599),
        "Retry-After honoured"
    );
    assert!(
        w.sim.refresh_token_alive("s1", &w.stored_refresh_token(id)),
        "faults never consume the token"
    );
    assert_eq!(
        engine.refresh(id, Trigger::OnDemand).await.unwrap().outcome,
        "refreshed"
    );
    let row = w.row(id);
    assert_eq!(row.conn.state, State::Active);
    assert_eq!(row.failures, 0);
    assert_eq!(row.failing_since, None);
    assert_eq!(w.sim.total_replays(), 0);
}

#[tokio::test]
async fn absolute_mode_keeps_its_deadline_and_sliding_mode_moves_it() {
    let w = World::new().await;
    w.sim.set_lifetime(
        "slide",
        Lifetime::Sliding {
            lifetime: Duration::from_secs(30 * 86400),
            cap: None,
        },
    );
    let abs = w.add("abs", "fixed", Mode::Absolute, chrono::Duration::days(10));
    let sli = w.add("sli", "slide", Mode::Sliding, chrono::Duration::days(10));
    let (a0, s0) = (
        w.row(abs).conn.deadline.unwrap(),
        w.row(sli).conn.deadline.unwrap(),
    );
    let engine = w.engine("test");
    engine.refresh(abs, Trigger::OnDemand).await.unwrap();
    engine.refresh(sli, Trigger::OnDemand).await.unwrap();
    let a = w.row(abs).conn;
    let s = w.row(sli).conn;
    assert_eq!(
        a.deadline.unwrap(),
        a0,
        "absolute: refreshing never moves the deadline"
    );
    assert_eq!(a.deadline_source, Some(DeadlineSource::Observed));
    assert!(
        s.deadline.unwrap() > s0 + chrono::Duration::days(9),
        "sliding: the deadline moved with the refresh"
    );
}

#[tokio::test]
async fn two_processes_refreshing_at_once_send_one_request() {
    let w = World::new().await;
    let id = w.add("acme", "s1", Mode::Absolute, chrono::Duration::days(1));
    w.sim
        .inject("s1", Fault::Delay(Duration::from_millis(600)), Some(1));
    // Two engines on two store connections with different owners: a daemon and a CLI.
    let daemon = w.engine("serve");
    let cli = w.engine("cli");
    let (a, b) = tokio::join!(
        daemon.refresh(id, Trigger::OnDemand),
        cli.refresh(id, Trigger::OnDemand)
    );
    let outcomes = [a.unwrap().outcome, b.unwrap().outcome];
    assert!(outcomes.contains(&"refreshed".to_string()), "{outcomes:?}");
    assert!(
        outcomes.contains(&"busy".to_string()),
        "the second one saw a live claim: {outcomes:?}"
    );
    assert_eq!(w.sim.token_requests("s1"), 1);
    assert_eq!(w.sim.total_replays(), 0);
}

/// Puts a claim on `id` as a process that died mid-request would leave it.
fn orphan_claim(w: &World, id: Uuid) {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    // A pid that cannot exist (beyond pid_max), on this host: its owner is dead.
    let dead = format!("{host}/4194999/1/serve");
    w.store()
        .write(|tx, _| {
            tx.execute(
                "UPDATE connections SET claim_id = ?2, claim_owner = ?3, claim_expires_at = ?4 WHERE id = ?1",
                rusqlite::params![id.to_string(), Uuid::new_v4().to_string(), dead, i64::MAX],
            )?;
            Ok(())
        })
        .unwrap();
}

#[tokio::test]
async fn an_orphaned_claim_whose_request_never_arrived_recovers() {
    let w = World::new().await;
    let id = w.add("acme", "s1", Mode::Absolute, chrono::Duration::days(1));
    orphan_claim(&w, id);
    let engine = w.engine("serve");
    assert_eq!(
        engine.refresh(id, Trigger::OnDemand).await.unwrap().outcome,
        "refreshed"
    );
    let row = w.row(id);
    assert_eq!(row.conn.state, State::Active);
    assert!(
        !row.outcome_unknown,
        "a definite outcome clears the unknown"
    );
    let history = w.store().history(id).unwrap();
    assert!(
        history.iter().any(|e| e.event == "outcome_unknown"),
        "{history:?}"
    );
}

#[tokio::test]
async fn an_orphaned_claim_whose_token_was_consumed_is_flagged_not_hidden() {
    let w = World::new().await;
    let id = w.add("acme", "s1", Mode::Absolute, chrono::Duration::days(1));
    // The dead process's request reached the server and rotated the token; its
    // answer was lost with the process.
    let client = w.row(id).conn.client_id;
    let old = w.stored_refresh_token(id);
    let http = reqwest::Client::new();
    let resp = http
        .post(w.sim.token_url("s1"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("client_id", client.as_str()),
            ("client_secret", "secret-acme"),
            ("refresh_token", old.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    orphan_claim(&w, id);
    let engine = w.engine("serve");
    engine.refresh(id, Trigger::OnDemand).await.unwrap();
    let row = w.row(id);
    assert_eq!(row.conn.state, State::NeedsReauthorization);
    assert!(
        row.conn
            .last_error
            .as_deref()
            .unwrap()
            .contains("a rotated token was lost while the process stopped"),
        "{:?}",
        row.conn.last_error
    );
    // The old token went out once more (the one allowed resend), never again.
    assert_eq!(
        engine.refresh(id, Trigger::OnDemand).await.unwrap().outcome,
        "refused"
    );
    assert_eq!(w.sim.total_replays(), 1);
}

#[tokio::test]
async fn a_second_orphan_on_the_same_token_stops_without_sending() {
    let w = World::new().await;
    let id = w.add("acme", "s1", Mode::Absolute, chrono::Duration::days(1));
    orphan_claim(&w, id);
    {
        let st = w.store();
        let mut st = st;
        st.write(|tx, kr| {
            // First recovery marks the outcome unknown, then its process dies too.
            let out = claims::claim(
                tx,
                kr,
                id,
                &Owner::current("serve"),
                Duration::from_secs(60),
                claims::Trigger::OnDemand,
                chrono::Utc::now(),
            )?;
            assert!(matches!(out, claims::ClaimOutcome::Claimed(_)));
            Ok(())
        })
        .unwrap();
    }
    orphan_claim(&w, id);
    let engine = w.engine("serve");
    engine.refresh(id, Trigger::OnDemand).await.unwrap();
    let row = w.row(id);
    assert_eq!(row.conn.state, State::NeedsReauthorization);
    assert_eq!(
        w.sim.token_requests("s1"),
        0,
        "a token that may have gone out twice is not sent a third time"
    );
}

#[tokio::test]
async fn tokens_are_served_from_cache_and_refreshed_when_short() {
    let w = World::new().await;
    let id = w.add("acme", "s1", Mode::Absolute, chrono::Duration::days(1));
    let engine = w.engine("serve");
    let t1 = match engine.token("acme").await.unwrap() {
        TokenAnswer::Token(t) => t,
        other => panic!("{other:?}"),
    };
    assert!(w.sim.access_token_valid("s1", t1.access_token.expose()));
    assert_eq!(w.sim.token_requests("s1"), 1);
    let t2 = match engine.token("acme").await.unwrap() {
        TokenAnswer::Token(t) => t,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        t1.access_token, t2.access_token,
        "a fresh token is served from the store"
    );
    assert_eq!(w.sim.token_requests("s1"), 1);
    assert_eq!(t2.base_url, format!("http://{}", w.row(id).conn.instance));
}

#[tokio::test]
async fn concurrent_token_requests_make_one_refresh() {
    let w = World::new().await;
    w.add("acme", "s1", Mode::Absolute, chrono::Duration::days(1));
    w.sim.set_latency("s1", Duration::from_millis(200));
    let engine = w.engine("serve");
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let e = engine.clone();
        set.spawn(async move { matches!(e.token("acme").await, Ok(TokenAnswer::Token(_))) });
    }
    let mut ok = 0;
    while let Some(r) = set.join_next().await {
        ok += r.unwrap() as usize;
    }
    assert_eq!(ok, 20);
    assert_eq!(w.sim.token_requests("s1"), 1, "single-flight");
}

#[tokio::test]
async fn the_scheduler_respects_global_and_per_instance_limits_and_runs_earliest_deadline_first() {
    use acutoken::renewal::scheduler::{Input, Scheduler};
    let mut w = World::new().await;
    w.config.renewal.max_concurrent = 6;
    w.config.renewal.per_instance_concurrent = 2;
    let mut ids = Vec::new();
    for i in 0..40 {
        // Older grants have nearer deadlines; all are due now (assumed deadlines are proven at once).
        let id = w.add(
            &format!("c{i}"),
            &format!("site{}", i % 4),
            Mode::Absolute,
            chrono::Duration::days(1 + (i as i64 % 20)),
        );
        w.store()
            .write(|tx, _| {
                tx.execute(
                    "UPDATE connections SET next_refresh_at = 0 WHERE id = ?1",
                    [id.to_string()],
                )?;
                Ok(())
            })
            .unwrap();
        ids.push(id);
    }
    for s in 0..4 {
        w.sim
            .set_latency(&format!("site{s}"), Duration::from_millis(80));
    }
    let engine = w.engine("serve");
    let (mut sched, snapshot) = Scheduler::new(engine.clone(), 6, 2, Duration::from_secs(60));
    let now = w.clock.now();
    for id in &ids {
        sched.upsert(&w.row(*id), now);
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Input>(16);
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(sched.run(rx, stop.clone(), Duration::from_secs(10), || {}));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while w.sim.total_token_requests() < 40 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of 40 refreshed",
            w.sim.total_token_requests()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Wait until every refresh is saved.
    while snapshot.borrow().running > 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    task.await.unwrap();
    drop(tx);
    for s in 0..4 {
        let m = w.sim.max_concurrency(&format!("site{s}"));
        assert!(m <= 2, "site{s} saw {m} requests at once");
    }
    assert!(
        w.sim.max_concurrency_all() <= 6,
        "{}",
        w.sim.max_concurrency_all()
    );
    assert!(w.sim.max_concurrency_all() >= 2, "work ran in parallel");
    assert_eq!(w.sim.total_token_requests(), 40, "each exactly once");
    assert_eq!(w.sim.total_replays(), 0);
    for id in ids {
        assert_eq!(w.row(id).conn.state, State::Active);
        let _ = site_of(&w, id);
    }
}

#[tokio::test]
async fn a_clock_jump_replans_without_a_storm() {
    use acutoken::renewal::scheduler::{Input, Scheduler};
    let manual = clock::ManualClock::new(chrono::Utc::now());
    let w = World::with_clock(Arc::new(manual.clone())).await;
    let mut ids = Vec::new();
    for i in 0..12 {
        // Authorized an hour ago: the first probe is most of a day away.
        ids.push(w.add(
            &format!("c{i}"),
            "s1",
            Mode::Absolute,
            chrono::Duration::hours(1),
        ));
    }
    let engine = w.engine("serve");
    let (mut sched, snapshot) = Scheduler::new(engine.clone(), 3, 2, Duration::from_millis(100));
    let now = w.clock.now();
    for id in &ids {
        sched.upsert(&w.row(*id), now);
    }
    let (_tx, rx) = tokio::sync::mpsc::channel::<Input>(16);
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(sched.run(rx, stop.clone(), Duration::from_secs(10), || {}));
    // Nothing is due for a day.
    let settle = tokio::time::Instant::now() + Duration::from_millis(400);
    while tokio::time::Instant::now() < settle {
        assert_eq!(
            w.sim.total_token_requests(),
            0,
            "nothing fires before its time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.sim.set_latency("s1", Duration::from_millis(50));
    manual.advance(chrono::Duration::days(2));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while w.sim.total_token_requests() < 12 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "after the jump only {} refreshed",
            w.sim.total_token_requests()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while snapshot.borrow().running > 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        w.sim.max_concurrency("s1") <= 2,
        "bounded by the per-instance limit, not a storm"
    );
    assert_eq!(
        w.sim.total_token_requests(),
        12,
        "each due connection refreshed once"
    );
    // A jump back by hours does not make anything fire early or twice.
    manual.advance(-chrono::Duration::hours(5));
    let settle = tokio::time::Instant::now() + Duration::from_millis(500);
    while tokio::time::Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(w.sim.total_token_requests(), 12);
    stop.cancel();
    task.await.unwrap();
    let _: Timestamp = w.clock.now();
}
