//! The delivery worker against a real webhook sink on 127.0.0.1 and a real store.

mod alerts_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use acutoken::alerts::{self, AlertFacts, AlertKind, Wake};
use acutoken::clock::{ManualClock, SharedClock, SystemClock};
use acutoken::config::{ChannelKind, Config};
use acutoken::crypto::Key;
use acutoken::model::{Severity, State, Timestamp};
use acutoken::secret::Secret;
use acutoken::store::{self, Store};
use alerts_support::*;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct Worker {
    handle: JoinHandle<Result<(), alerts::worker::WorkerError>>,
    shutdown: CancellationToken,
    wake: Wake,
}

fn start(path: &Path, key: &Key, cfg: &Config, clock: SharedClock) -> Worker {
    let store = open_store(path, key);
    let (_tx, rx) = watch::channel(Arc::new(cfg.clone()));
    let shutdown = CancellationToken::new();
    let wake = Wake::new();
    let handle = tokio::spawn(alerts::run(
        store,
        rx,
        clock,
        shutdown.clone(),
        wake.clone(),
        acutoken::store::replicas::Duty::always(),
    ));
    Worker {
        handle,
        shutdown,
        wake,
    }
}

impl Worker {
    async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

struct Env {
    _dir: tempfile::TempDir,
    path: PathBuf,
    key: Key,
    store: Store,
}

fn env() -> Env {
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("acutoken.db");
    let key = Key::generate();
    let store = open_store(&path, &key);
    Env {
        _dir: dir,
        path,
        key,
        store,
    }
}

/// Waits (bounded) until every channel has nothing undelivered.
async fn wait_delivered(store: &Store, cfg: &Config) {
    for _ in 0..400 {
        let h = alerts::channel_health(store, cfg).unwrap();
        if h.iter().all(|c| c.undelivered == 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "still undelivered: {:?}",
        alerts::channel_health(store, cfg).unwrap()
    );
}

fn kinds(got: &[Received]) -> Vec<String> {
    got.iter()
        .map(|r| r.json()["kind"].as_str().unwrap_or("?").to_string())
        .collect()
}

fn check_no_secrets(sink: &Sink, extra: &[&str]) {
    for r in sink.all() {
        assert_clean("a webhook body", &r.text(), extra);
    }
    assert_clean("the log", &logs(), extra);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn needs_secret_and_back_gives_one_firing_and_one_resolved_per_channel() {
    let mut e = env();
    let sink = Sink::start().await;
    let mut generic = webhook(&sink, "generic", ChannelKind::Generic, Severity::Warning);
    generic.secret = Some(Secret::new("SIGNSECRET-1"));
    let cfg = config(vec![
        webhook(&sink, "slack", ChannelKind::Slack, Severity::Warning),
        webhook(&sink, "teams", ChannelKind::Teams, Severity::Warning),
        webhook(&sink, "discord", ChannelKind::Discord, Severity::Warning),
        webhook(&sink, "chat", ChannelKind::GoogleChat, Severity::Warning),
        generic,
    ]);
    let now = chrono::Utc::now();
    let ids = insert(&mut e.store, vec![connection("acme", now)], now);
    let w = start(&e.path, &e.key, &cfg, Arc::new(SystemClock));

    set_state(
        &mut e.store,
        &ids,
        State::NeedsSecret,
        Some("invalid_client"),
        now,
    );
    w.wake.poke();
    for hook in ["slack", "teams", "discord", "chat", "generic"] {
        let got = sink.wait_for(hook, 1).await;
        assert!(
            got[0].text().contains("set-secret acme"),
            "{hook}: {}",
            got[0].text()
        );
        assert!(got[0].text().contains("SM303010"));
    }
    // Still in needs_secret: no new message.
    set_state(
        &mut e.store,
        &ids,
        State::NeedsSecret,
        Some("invalid_client"),
        now,
    );
    w.wake.poke();
    set_state(&mut e.store, &ids, State::Active, None, now);
    w.wake.poke();
    for hook in ["slack", "teams", "discord", "chat", "generic"] {
        sink.wait_for(hook, 2).await;
    }
    wait_delivered(&e.store, &cfg).await;
    w.wake.poke();
    wait_delivered(&e.store, &cfg).await;
    for hook in ["slack", "teams", "discord", "chat", "generic"] {
        assert_eq!(
            sink.received(hook).len(),
            2,
            "{hook}: exactly one firing and one resolved"
        );
    }
    let g = sink.received("generic");
    assert_eq!(g[0].json()["status"], "firing");
    assert_eq!(g[0].json()["labels"]["customer"], "Customer acme");
    assert_eq!(g[0].json()["instance"], "acme.acumatica.com");
    assert_eq!(g[1].json()["status"], "resolved");
    assert_eq!(g[1].json()["severity"], "critical");
    assert_ne!(g[0].json()["id"], g[1].json()["id"]);

    // The signature, checked here independently of the code under test.
    for r in &g {
        let ts = r.headers["x-acutoken-timestamp"].to_str().unwrap();
        let sig = r.headers["x-acutoken-signature"].to_str().unwrap();
        let mut mac = Hmac::<Sha256>::new_from_slice(b"SIGNSECRET-1").unwrap();
        mac.update(format!("{ts}.").as_bytes());
        mac.update(&r.body);
        let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(sig, want);
        assert!(ts.parse::<i64>().unwrap() > 1_700_000_000);
    }
    assert!(
        sink.received("slack")[0]
            .headers
            .get("x-acutoken-signature")
            .is_none()
    );

    let history = e.store.history(ids[0]).unwrap();
    let alerts: Vec<_> = history.iter().filter(|h| h.event == "alert").collect();
    assert_eq!(alerts.len(), 2, "{history:?}");
    assert!(alerts[0].detail.contains("needs_secret firing"));
    assert!(alerts[1].detail.contains("needs_secret resolved"));
    let health = alerts::channel_health(&e.store, &cfg).unwrap();
    assert!(
        health
            .iter()
            .all(|h| h.last_success.is_some() && h.failures == 0)
    );
    w.stop().await;
    check_no_secrets(&sink, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_while_firing_and_remembers_the_last_send_across_restarts() {
    let mut e = env();
    let sink = Sink::start().await;
    let mut cfg = config(vec![webhook(
        &sink,
        "g",
        ChannelKind::Generic,
        Severity::Warning,
    )]);
    cfg.alerts.repeat_interval = Duration::from_secs(3600);
    let t0 = ms_now();
    let clock = ManualClock::new(t0);
    let ids = insert(&mut e.store, vec![connection("rep", t0)], t0);
    let w = start(&e.path, &e.key, &cfg, Arc::new(clock.clone()));
    set_state(
        &mut e.store,
        &ids,
        State::NeedsReauthorization,
        Some("invalid_grant"),
        t0,
    );
    w.wake.poke();
    sink.wait_for("g", 1).await;
    clock.advance(chrono::Duration::minutes(61));
    w.wake.poke();
    let got = sink.wait_for("g", 2).await;
    assert_eq!(
        kinds(&got),
        ["needs_reauthorization", "needs_reauthorization"]
    );
    assert_ne!(
        got[0].json()["id"],
        got[1].json()["id"],
        "a repeat is a new message"
    );
    w.stop().await;

    let w = start(&e.path, &e.key, &cfg, Arc::new(clock.clone()));
    // A marker of another kind: once it is out, a forgotten repeat would have gone too.
    let now = clock.now_for_test();
    let marker = insert(&mut e.store, vec![connection("marker", now)], now);
    set_state(&mut e.store, &marker, State::NeedsSecret, None, now);
    w.wake.poke();
    sink.wait_for("g", 3).await;
    clock.advance(chrono::Duration::minutes(61));
    w.wake.poke();
    let got = sink.wait_for("g", 5).await;
    let mut later = kinds(&got)[3..].to_vec();
    later.sort();
    assert_eq!(
        later,
        ["needs_reauthorization", "needs_secret"],
        "both repeat after 1h"
    );
    assert_eq!(
        kinds(&got)[..3],
        [
            "needs_reauthorization",
            "needs_reauthorization",
            "needs_secret",
        ],
        "the restart did not forget when the repeat was last sent"
    );
    w.stop().await;
    check_no_secrets(&sink, &[]);
}

/// Now, at the store's millisecond precision.
fn ms_now() -> Timestamp {
    use chrono::TimeZone;
    chrono::Utc
        .timestamp_millis_opt(chrono::Utc::now().timestamp_millis())
        .unwrap()
}

trait NowForTest {
    fn now_for_test(&self) -> Timestamp;
}

impl NowForTest for ManualClock {
    fn now_for_test(&self) -> Timestamp {
        acutoken::clock::Clock::now(self)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_simultaneous_alerts_make_a_few_messages() {
    let mut e = env();
    let sink = Sink::start().await;
    let mut cfg = config(vec![
        webhook(&sink, "g", ChannelKind::Generic, Severity::Warning),
        webhook(&sink, "s", ChannelKind::Slack, Severity::Warning),
    ]);
    cfg.alerts.group_wait = Duration::from_secs(30);
    cfg.alerts.group_interval = Duration::from_secs(300);
    cfg.alerts.group_max = 10;
    let t0 = ms_now();
    let clock = ManualClock::new(t0);
    let conns = (0..1000)
        .map(|i| connection(&format!("c{i:04}"), t0))
        .collect();
    let ids = insert(&mut e.store, conns, t0);
    let w = start(&e.path, &e.key, &cfg, Arc::new(clock.clone()));
    set_state(&mut e.store, &ids[..500], State::NeedsSecret, None, t0);
    w.wake.poke();
    clock.advance(chrono::Duration::seconds(10));
    let t10 = clock.now_for_test();
    set_state(&mut e.store, &ids[500..], State::NeedsSecret, None, t10);
    clock.advance(chrono::Duration::seconds(20));
    w.wake.poke();
    let got = sink.wait_for("g", 1).await;
    sink.wait_for("s", 1).await;
    wait_delivered(&e.store, &cfg).await;
    assert_eq!(sink.received("g").len(), 1);
    assert_eq!(sink.received("s").len(), 1);
    let body = got[0].json();
    assert_eq!(body["count"], 1000);
    assert_eq!(body["alerts"].as_array().unwrap().len(), 10);

    // All clear 10 s later: resolved waits for group_interval, then one message.
    clock.advance(chrono::Duration::seconds(10));
    let t40 = clock.now_for_test();
    set_state(&mut e.store, &ids, State::Active, None, t40);
    clock.advance(chrono::Duration::minutes(6));
    w.wake.poke();
    let got = sink.wait_for("g", 2).await;
    sink.wait_for("s", 2).await;
    wait_delivered(&e.store, &cfg).await;
    assert_eq!(sink.received("g").len(), 2);
    assert_eq!(sink.received("s").len(), 2);
    let body = got[1].json();
    assert_eq!(body["count"], 1000);
    assert!(
        body["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["status"] == "resolved")
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_after_500s_with_the_same_id() {
    let mut e = env();
    let sink = Sink::start().await;
    sink.script("g", [Reply::Status(500), Reply::Status(503)]);
    let cfg = config(vec![webhook(
        &sink,
        "g",
        ChannelKind::Generic,
        Severity::Warning,
    )]);
    let now = chrono::Utc::now();
    let ids = insert(&mut e.store, vec![connection("flaky", now)], now);
    let w = start(&e.path, &e.key, &cfg, Arc::new(SystemClock));
    set_state(&mut e.store, &ids, State::NeedsSecret, None, now);
    w.wake.poke();
    let got = sink.wait_for("g", 3).await;
    wait_delivered(&e.store, &cfg).await;
    let id = got[0].json()["id"].clone();
    assert!(
        got.iter().all(|r| r.json()["id"] == id),
        "the id is stable across retries"
    );
    let h = &alerts::channel_health(&e.store, &cfg).unwrap()[0];
    assert_eq!(h.failures, 0);
    assert_eq!(h.last_error.as_deref(), Some("HTTP 503"));
    assert!(h.last_success.is_some());
    w.stop().await;
    assert!(logs().contains("alert delivery failed (HTTP 500)"));
    assert!(
        logs().contains(&format!("127.0.0.1:{}", sink.port)),
        "failures name the host"
    );
    check_no_secrets(&sink, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let mut e = env();
    let sink = Sink::start().await;
    sink.script("g", [Reply::RetryAfter(120)]);
    let cfg = config(vec![webhook(
        &sink,
        "g",
        ChannelKind::Generic,
        Severity::Warning,
    )]);
    let t0 = ms_now();
    let clock = ManualClock::new(t0);
    let ids = insert(&mut e.store, vec![connection("busy", t0)], t0);
    let w = start(&e.path, &e.key, &cfg, Arc::new(clock.clone()));
    set_state(&mut e.store, &ids, State::NeedsSecret, None, t0);
    w.wake.poke();
    sink.wait_for("g", 1).await;
    let mut retry_at = None;
    for _ in 0..400 {
        retry_at = alerts::channel_health(&e.store, &cfg).unwrap()[0].retry_at;
        if retry_at.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(retry_at, Some(t0 + chrono::Duration::seconds(120)));
    clock.advance(chrono::Duration::seconds(120));
    w.wake.poke();
    let got = sink.wait_for("g", 2).await;
    assert_eq!(got[0].json()["id"], got[1].json()["id"]);
    wait_delivered(&e.store, &cfg).await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_channel_does_not_block_another() {
    let mut e = env();
    let sink = Sink::start().await;
    sink.set_default("slow", Reply::Hang);
    let cfg = config(vec![
        webhook(&sink, "slow", ChannelKind::Generic, Severity::Warning),
        webhook(&sink, "fast", ChannelKind::Generic, Severity::Warning),
    ]);
    let now = chrono::Utc::now();
    let ids = insert(
        &mut e.store,
        vec![connection("one", now), connection("two", now)],
        now,
    );
    let w = start(&e.path, &e.key, &cfg, Arc::new(SystemClock));
    set_state(&mut e.store, &ids[..1], State::NeedsSecret, None, now);
    w.wake.poke();
    sink.wait_for("slow", 1).await;
    sink.wait_for("fast", 1).await;
    set_state(
        &mut e.store,
        &ids[1..],
        State::NeedsReauthorization,
        None,
        now,
    );
    w.wake.poke();
    let fast = sink.wait_for("fast", 2).await;
    assert_eq!(kinds(&fast), ["needs_secret", "needs_reauthorization"]);
    assert_eq!(
        sink.received("slow").len(),
        1,
        "slow still hangs on its first message"
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_survives_a_restart_without_sending_twice() {
    let mut e = env();
    let sink = Sink::start().await;
    sink.set_default("down", Reply::Hang);
    let cfg = config(vec![
        webhook(&sink, "down", ChannelKind::Generic, Severity::Warning),
        webhook(&sink, "up", ChannelKind::Generic, Severity::Warning),
    ]);
    let now = chrono::Utc::now();
    let conns = (0..3).map(|i| connection(&format!("r{i}"), now)).collect();
    let ids = insert(&mut e.store, conns, now);
    let w = start(&e.path, &e.key, &cfg, Arc::new(SystemClock));
    set_state(&mut e.store, &ids, State::NeedsSecret, None, now);
    w.wake.poke();
    sink.wait_for("up", 1).await;
    sink.wait_for("down", 1).await;
    // Stop while the post to `down` is in flight, then let `down` recover.
    w.stop().await;
    sink.set_default("down", Reply::Ok);
    let w = start(&e.path, &e.key, &cfg, Arc::new(SystemClock));
    w.wake.poke();
    let down = sink.wait_for("down", 2).await;
    wait_delivered(&e.store, &cfg).await;
    w.wake.poke();
    wait_delivered(&e.store, &cfg).await;
    w.stop().await;
    assert_eq!(down.len(), 2);
    assert_eq!(
        down[0].json()["id"],
        down[1].json()["id"],
        "the same message, again"
    );
    assert_eq!(down[1].json()["count"], 3);
    assert_eq!(
        sink.received("up").len(),
        1,
        "nothing sent twice once accepted"
    );
    assert_eq!(sink.received("down").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_condition_that_cleared_while_down_is_never_sent() {
    let mut e = env();
    let sink = Sink::start().await;
    sink.set_default("g", Reply::Status(500));
    let cfg = config(vec![webhook(
        &sink,
        "g",
        ChannelKind::Generic,
        Severity::Warning,
    )]);
    let now = chrono::Utc::now();
    let ids = insert(&mut e.store, vec![connection("gone", now)], now);
    let w = start(&e.path, &e.key, &cfg, Arc::new(SystemClock));
    set_state(&mut e.store, &ids, State::NeedsSecret, None, now);
    w.wake.poke();
    sink.wait_for("g", 1).await;
    w.stop().await;
    // The connection recovered while the daemon was down, written without
    // any alert sync (as a CLI write would be): the worker's start re-evaluates.
    e.store
        .write(|tx, _| {
            let mut row = store::connections::get_by_id_tx(tx, ids[0])?.unwrap();
            row.conn.state = State::Active;
            store::connections::put(tx, &row)
        })
        .unwrap();
    sink.set_default("g", Reply::Ok);
    let before = sink.received("g").len();
    let w = start(&e.path, &e.key, &cfg, Arc::new(SystemClock));
    let now = chrono::Utc::now();
    let marker = insert(&mut e.store, vec![connection("marker", now)], now);
    set_state(
        &mut e.store,
        &marker,
        State::NeedsReauthorization,
        None,
        now,
    );
    w.wake.poke();
    let got = sink.wait_for("g", before + 1).await;
    wait_delivered(&e.store, &cfg).await;
    w.stop().await;
    assert_eq!(kinds(&got[before..]), ["needs_reauthorization"]);
    assert!(logs().contains("cleared before it was delivered"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reauthorization_carries_the_open_link_which_is_never_stored_in_the_outbox() {
    let mut e = env();
    let sink = Sink::start().await;
    let cfg = config(vec![webhook(
        &sink,
        "g",
        ChannelKind::Generic,
        Severity::Warning,
    )]);
    let now = chrono::Utc::now();
    let ids = insert(
        &mut e.store,
        vec![connection("linked", now), connection("unlinked", now)],
        now,
    );
    let link = "https://linked.acumatica.com/identity/connect/authorize?state=LINKSTATE-93";
    e.store
        .write(|tx, kr| {
            store::authorizations::create(
                tx,
                kr,
                ids[0],
                "hash-1",
                &Secret::new("verifier"),
                "https://cb.example.com/cb",
                &Secret::new(link),
                now,
                now + chrono::Duration::days(14),
            )
            .map(drop)
        })
        .unwrap();
    let w = start(&e.path, &e.key, &cfg, Arc::new(SystemClock));
    set_state(
        &mut e.store,
        &ids,
        State::NeedsReauthorization,
        Some("invalid_grant"),
        now,
    );
    w.wake.poke();
    let got = sink.wait_for("g", 1).await;
    wait_delivered(&e.store, &cfg).await;
    w.stop().await;
    let body = got[0].json();
    let alerts = body["alerts"].as_array().unwrap();
    let by = |name: &str| {
        alerts
            .iter()
            .find(|a| a["connection"] == name)
            .unwrap()
            .clone()
    };
    assert!(by("linked")["action"].as_str().unwrap().contains(link));
    assert!(
        by("unlinked")["action"]
            .as_str()
            .unwrap()
            .contains("acutoken connection authorize unlinked")
    );
    drop(e.store);
    for file in ["acutoken.db", "acutoken.db-wal"] {
        let path = e.path.with_file_name(file);
        if let Ok(bytes) = std::fs::read(&path) {
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                !text.contains("LINKSTATE-93"),
                "{file} holds the link in clear"
            );
            assert!(!text.contains("URLSECRET"), "{file} holds a webhook URL");
        }
    }
    assert_clean("the log", &logs(), &["LINKSTATE-93"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_and_direct_sends_report_each_channel_by_name_and_host() {
    capture_logs();
    let sink = Sink::start().await;
    sink.set_default("broken", Reply::Status(500));
    let mut cfg = config(vec![
        webhook(&sink, "ok", ChannelKind::Slack, Severity::Critical),
        webhook(&sink, "broken", ChannelKind::Generic, Severity::Critical),
        webhook(&sink, "warn", ChannelKind::Discord, Severity::Warning),
    ]);
    cfg.alerts.webhooks[1].secret = Some(Secret::new("SIGNSECRET-2"));
    let results = alerts::send_test(&cfg).await;
    assert_eq!(results.len(), 3, "test ignores min_severity");
    assert!(results[0].ok() && results[2].ok());
    assert!(!results[1].ok());
    assert_eq!(results[1].status, Some(500));
    assert_eq!(results[1].host, format!("127.0.0.1:{}", sink.port));
    let shown = results
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(shown.contains("broken (127.0.0.1:") && shown.contains("HTTP 500"));
    assert_clean("results", &shown, &[]);
    assert!(
        sink.received("ok")[0].json()["text"]
            .as_str()
            .unwrap()
            .contains("Test alert")
    );

    let facts = AlertFacts::global(AlertKind::RefreshFailed, Severity::Warning, "w", "nothing");
    let direct = alerts::send_direct(&cfg, &facts).await;
    assert_eq!(direct.len(), 1, "only channels whose min_severity it meets");
    assert_eq!(direct[0].channel, "warn");
    let direct =
        alerts::send_direct(&cfg, &AlertFacts::store_write_failed(None, "disk full")).await;
    assert_eq!(direct.len(), 3);
    check_no_secrets(&sink, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_digest_goes_to_every_channel_on_its_schedule() {
    let mut e = env();
    let sink = Sink::start().await;
    let mut cfg = config(vec![
        webhook(&sink, "g", ChannelKind::Generic, Severity::Critical),
        webhook(&sink, "s", ChannelKind::Slack, Severity::Critical),
    ]);
    cfg.alerts.digest = Some("* * * * * *".into());
    let now = chrono::Utc::now();
    let ids = insert(
        &mut e.store,
        vec![connection("d1", now), connection("d2", now)],
        now,
    );
    set_state(&mut e.store, &ids[..1], State::NeedsSecret, None, now);
    let (_tx, rx) = watch::channel(Arc::new(cfg.clone()));
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(alerts::run_digest(
        open_store(&e.path, &e.key),
        rx,
        Arc::new(SystemClock),
        shutdown.clone(),
    ));
    let got = sink.wait_for("g", 1).await;
    sink.wait_for("s", 1).await;
    shutdown.cancel();
    task.await.unwrap().unwrap();
    let body = got[0].json();
    assert_eq!(body["kind"], "digest");
    assert_eq!(body["counts"]["active"], 1);
    assert_eq!(body["counts"]["needs_secret"], 1);
    assert_eq!(body["must_act"][0]["connection"], "d1");
    assert!(sink.received("s")[0].text().contains("Who must act"));
}
