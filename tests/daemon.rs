//! Process tests of `acutoken serve`: the real binary as a child process against
//! the in-repo Acumatica simulator, with real signals and a test `NOTIFY_SOCKET`.

mod support_daemon;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use acutoken::alerts::AlertKind;
use acutoken::model::State;
use acutoken::sim::Fault;
use nix::sys::signal::Signal;
use support_daemon::{
    CLIENT, NotifySocket, Opts, Rig, SECRET, SITE, Sink, WAIT, api, api_full, authorize,
    eventually, free_port, http, json, query,
};

fn is_line(m: &str, line: &str) -> bool {
    m.lines().any(|l| l == line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_then_stopping_on_sigterm_and_exit_0() {
    let rig = Rig::new().await;
    rig.add("acme", SITE, true).await;
    let notify = NotifySocket::bind(rig.dir.path());
    let mut d = rig.serve(Some(&notify));

    notify.until("READY=1", |m| is_line(m, "READY=1")).await;
    // READY=1 comes after loading and scheduling: the API already answers.
    assert_eq!(api(&rig.socket(), "GET", "/readyz").await.status, 200);
    assert_eq!(api(&rig.socket(), "GET", "/healthz").await.status, 200);

    d.signal(Signal::SIGTERM);
    let seen = notify
        .until("STOPPING=1", |m| is_line(m, "STOPPING=1"))
        .await;
    assert!(
        !seen.iter().any(|m| is_line(m, "READY=1")),
        "no READY=1 between SIGTERM and STOPPING=1: {seen:?}"
    );
    let status = d.exit().await;
    assert_eq!(status.code(), Some(0), "output:\n{}", d.logs());
    assert!(!rig.socket().exists(), "the API socket is removed at exit");
    // Nothing was due, so nothing was sent.
    assert_eq!(rig.sim.total_token_requests(), 0);
}

/// `WATCHDOG=1` comes from the scheduler loop while it runs; SIGINT stops like SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_pings_while_serving_and_sigint_stops_cleanly() {
    let rig = Rig::new().await;
    rig.add("acme", SITE, true).await;
    let notify = NotifySocket::bind(rig.dir.path());
    // 2 s: the loop must wake at least every second to keep it fed.
    let mut d = rig.serve_with_env(Some(&notify), &[("WATCHDOG_USEC", "2000000")]);
    notify.until("READY=1", |m| is_line(m, "READY=1")).await;
    for _ in 0..3 {
        notify
            .until("WATCHDOG=1", |m| is_line(m, "WATCHDOG=1"))
            .await;
    }

    d.signal(Signal::SIGINT);
    notify
        .until("STOPPING=1", |m| is_line(m, "STOPPING=1"))
        .await;
    assert_eq!(d.exit().await.code(), Some(0), "output:\n{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_serve_on_the_same_store_is_refused_naming_the_holder() {
    let rig = Rig::new().await;
    rig.add("acme", SITE, true).await;
    let mut first = rig.serve(None);
    first.ready().await;

    let out = rig.cli(&["serve"], None).await;
    assert!(
        out.code.is_some_and(|c| c != 0),
        "the second serve must fail: {out:#?}"
    );
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "exactly one error line: {}", out.stderr);
    let line = errors[0];
    assert!(line.contains("acutoken.db.lock"), "names the lock: {line}");
    assert!(
        line.contains(&format!("pid {}", first.pid)),
        "names the holder: {line}"
    );

    // The first daemon is unharmed.
    assert_eq!(api(&rig.socket(), "GET", "/readyz").await.status, 200);
    first.signal(Signal::SIGTERM);
    assert_eq!(first.exit().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_scheduled_refresh_in_flight_saves_the_rotated_token() {
    let rig = Rig::new().await;
    rig.sim
        .inject(SITE, Fault::Delay(Duration::from_secs(2)), Some(1));
    // Added without a grant time: due at once.
    let first = rig.add("acme", SITE, false).await;
    let mut d = rig.serve(None);
    eventually("the refresh to reach the simulator", || {
        rig.sim.in_flight(SITE) == 1
    })
    .await;

    d.signal(Signal::SIGTERM);
    let status = d.exit().await;
    assert_eq!(status.code(), Some(0), "output:\n{}", d.logs());

    assert_eq!(rig.sim.token_requests(SITE), 1);
    assert_eq!(rig.sim.total_replays(), 0);
    let current = rig.sim.current_refresh_token(SITE, CLIENT).unwrap();
    assert_ne!(current, first, "the token rotated");
    assert_eq!(rig.stored_refresh_token("acme").as_deref(), Some(&*current));
    let row = rig.row("acme");
    assert_eq!(row.conn.state, State::Active);
    assert!(row.claim.is_none(), "the claim was released");
    assert!(row.conn.last_refresh_at.is_some());
}

/// A refresh asked for through the API (here by `connection refresh`) is saved
/// too, even when it takes longer than the daemon's other tasks get to stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_an_api_refresh_in_flight_saves_the_rotated_token() {
    let rig = Rig::new().await;
    let first = rig.add("acme", SITE, true).await;
    let mut d = rig.serve(None);
    d.ready().await;
    rig.sim
        .inject(SITE, Fault::Delay(Duration::from_secs(7)), Some(1));

    let refresh = rig.cli(&["connection", "refresh", "acme"], None);
    let signal = async {
        eventually("the refresh to reach the simulator", || {
            rig.sim.in_flight(SITE) == 1
        })
        .await;
        d.signal(Signal::SIGTERM);
    };
    let (out, ()) = tokio::join!(refresh, signal);
    let status = d.exit().await;
    assert_eq!(status.code(), Some(0), "output:\n{}", d.logs());
    assert_eq!(out.code, Some(0), "the CLI got its answer: {out:#?}");
    assert!(out.stdout.contains("acme: refreshed"), "{}", out.stdout);

    assert_eq!(rig.sim.token_requests(SITE), 1);
    assert_eq!(rig.sim.total_replays(), 0);
    let current = rig.sim.current_refresh_token(SITE, CLIENT).unwrap();
    assert_ne!(current, first);
    assert_eq!(rig.stored_refresh_token("acme").as_deref(), Some(&*current));
    let row = rig.row("acme");
    assert_eq!(row.conn.state, State::Active);
    assert!(row.claim.is_none(), "the claim was released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_refreshes_a_due_connection_once_at_the_right_site() {
    let rig = Rig::new().await;
    rig.sim.add_client("Other", CLIENT, SECRET, None);
    let first = rig.add("acme", SITE, false).await;
    rig.add("other", "Other", true).await;
    let mut d = rig.serve(None);
    d.ready().await;

    eventually("the refresh to be saved", || {
        rig.row("acme").conn.last_refresh_at.is_some()
    })
    .await;
    let reqs = rig.sim.requests(SITE);
    assert_eq!(reqs.len(), 1, "{reqs:#?}");
    let r = &reqs[0];
    assert_eq!(r.grant_type.as_deref(), Some("refresh_token"));
    assert_eq!(r.client_id.as_deref(), Some(CLIENT));
    assert!(!r.basic_auth);
    assert!(
        r.form_keys.iter().any(|k| k == "client_secret"),
        "client_secret_post: {:?}",
        r.form_keys
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        rig.sim.token_requests("Other"),
        0,
        "the other site is not due"
    );

    let row = rig.row("acme");
    assert_eq!(row.conn.state, State::Active);
    assert!(
        row.conn
            .next_refresh_at
            .is_some_and(|t| t > chrono::Utc::now())
    );
    let current = rig.sim.current_refresh_token(SITE, CLIENT).unwrap();
    assert_ne!(current, first);
    assert!(!rig.sim.refresh_token_alive(SITE, &first));
    assert_eq!(rig.stored_refresh_token("acme").as_deref(), Some(&*current));

    d.signal(Signal::SIGTERM);
    assert_eq!(d.exit().await.code(), Some(0));
    assert_eq!(rig.sim.token_requests(SITE), 1, "no second refresh");
    assert_eq!(rig.sim.total_replays(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_with_and_without_the_daemon() {
    let rig = Rig::new().await;
    rig.add("acme", SITE, true).await;
    rig.add("beta", SITE, true).await;

    // Without the daemon: the CLI refreshes on the store directly, once.
    let out = rig.cli(&["token", "acme"], None).await.ok();
    let t1 = out.stdout.trim().to_string();
    assert!(rig.sim.access_token_valid(SITE, &t1), "{out:#?}");
    assert_eq!(rig.sim.token_requests(SITE), 1);
    let out = rig.cli(&["token", "acme"], None).await.ok();
    assert_eq!(out.stdout.trim(), t1, "the fresh token is handed out again");
    assert_eq!(
        rig.sim.token_requests(SITE),
        1,
        "no second token request while the access token is fresh"
    );
    let acme_rt = rig.stored_refresh_token("acme").unwrap();
    assert!(rig.sim.refresh_token_alive(SITE, &acme_rt));

    // With the daemon: through the socket.
    let mut d = rig.serve(None);
    d.ready().await;
    let out = rig.cli(&["token", "beta", "--json"], None).await.ok();
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    let t2 = v["access_token"].as_str().unwrap();
    assert!(rig.sim.access_token_valid(SITE, t2));
    assert_eq!(v["instance"], rig.sim.instance(SITE));
    assert_eq!(rig.sim.token_requests(SITE), 2);
    let beta_rt = rig.stored_refresh_token("beta").unwrap();
    assert!(rig.sim.refresh_token_alive(SITE, &beta_rt));

    let out = rig.cli(&["token", "acme"], None).await.ok();
    assert_eq!(out.stdout.trim(), t1);
    assert_eq!(rig.sim.token_requests(SITE), 2);
    assert!(
        d.logs().contains("refresh attempt"),
        "the daemon did beta's refresh"
    );

    d.signal(Signal::SIGTERM);
    assert_eq!(d.exit().await.code(), Some(0));
    assert_eq!(rig.sim.total_replays(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_lists_shows_hands_out_tokens_and_says_why_not() {
    let rig = Rig::new().await;
    rig.sim.add_client("Secret", CLIENT, SECRET, None);
    rig.sim.add_client("Down", CLIENT, SECRET, None);
    let acme_rt = rig.add("acme", SITE, true).await;
    rig.add("beta", "Secret", true).await;
    rig.add("gamma", "Down", true).await;
    let mut d = rig.serve(None);
    d.ready().await;
    let sock = rig.socket();

    let a = api(&sock, "GET", "/v1/connections").await;
    assert_eq!(a.status, 200);
    let list = json(&a);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 3);
    for n in ["acme", "beta", "gamma"] {
        assert!(names.contains(&n), "{names:?}");
    }
    let body = String::from_utf8_lossy(&a.body);
    assert!(!body.contains(&acme_rt), "no refresh token in the list");
    assert!(!body.contains(SECRET), "no client secret in the list");

    let a = api(&sock, "GET", "/v1/connections/acme").await;
    assert_eq!(a.status, 200);
    let c = json(&a);
    assert_eq!(c["name"], "acme");
    assert_eq!(c["state"], "active");
    assert_eq!(c["instance"], rig.sim.instance(SITE));
    assert_eq!(c["client_id"], CLIENT);
    assert_eq!(c["labels"]["customer"], "Acme");
    for field in [
        "id",
        "mode",
        "lifetime",
        "deadline",
        "deadline_source",
        "next_refresh_at",
        "last_error",
        "grant_issued_at",
        "access_expires_at",
    ] {
        assert!(c.get(field).is_some(), "field {field} in {c}");
    }

    let a = api(&sock, "GET", "/v1/connections/nope").await;
    assert_eq!(a.status, 404);
    assert!(
        json(&a)["error"]
            .as_str()
            .is_some_and(|e| e.contains("nope"))
    );

    // A token: refreshed first (none is stored yet), not to be cached.
    let f = api_full(&sock, "/v1/connections/acme/token").await;
    assert_eq!(f.status, 200);
    assert_eq!(f.header("cache-control").as_deref(), Some("no-store"));
    let t = f.json();
    let obj = t.as_object().unwrap();
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "access_token",
            "base_url",
            "expires_at",
            "instance",
            "token_type"
        ]
    );
    assert!(
        rig.sim
            .access_token_valid(SITE, t["access_token"].as_str().unwrap())
    );
    assert_eq!(t["base_url"], rig.sim.base_url(SITE));
    assert_eq!(t["instance"], rig.sim.instance(SITE));
    assert!(acutoken::model::parse_time(t["expires_at"].as_str().unwrap()).is_ok());

    // needs_secret: the instance's secret changed, a refresh learns it.
    rig.sim
        .replace_secret("Secret", CLIENT, "a-newer-secret", None)
        .unwrap();
    let a = api(&sock, "POST", "/v1/connections/beta/refresh").await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let r = json(&a);
    assert_eq!(r["outcome"], "failed");
    assert_eq!(r["state"], "needs_secret");
    let f = api_full(&sock, "/v1/connections/beta/token").await;
    assert_eq!(f.status, 409);
    let v = f.json();
    assert_eq!(v["state"], "needs_secret");
    let action = v["action"].as_str().unwrap();
    assert!(action.contains("set-secret"), "{action}");
    assert!(action.contains("beta"), "{action}");
    assert_eq!(rig.sim.token_requests("Secret"), 1, "409 sends nothing");

    // 503 with Retry-After while the site answers 500s.
    rig.sim.inject(
        "Down",
        Fault::Status {
            code: 500,
            retry_after: None,
            body: "{\"error\":\"server_error\"}".into(),
        },
        None,
    );
    let f = api_full(&sock, "/v1/connections/gamma/token").await;
    assert_eq!(f.status, 503, "{}", String::from_utf8_lossy(&f.body));
    let ra: u64 = f.header("retry-after").unwrap().parse().unwrap();
    assert!(ra >= 1);
    assert!(f.json()["error"].is_string());
    assert!(rig.sim.token_requests("Down") >= 1);
    assert_eq!(rig.row("gamma").conn.state, State::Retrying);

    // Disabled by the CLI while the daemon runs: no token, even a fresh one.
    rig.cli(&["connection", "disable", "acme"], None).await.ok();
    let f = api_full(&sock, "/v1/connections/acme/token").await;
    assert_eq!(f.status, 409);
    let v = f.json();
    assert_eq!(v["state"], "disabled");
    assert!(v["action"].as_str().unwrap().contains("enable acme"), "{v}");
    assert!(!String::from_utf8_lossy(&f.body).contains("access_token"));

    d.signal(Signal::SIGTERM);
    assert_eq!(d.exit().await.code(), Some(0));
    assert_eq!(rig.sim.total_replays(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callback_flow_end_to_end() {
    let rig = Rig::new().await;
    rig.add_pending("acme", SITE).await;
    rig.add_pending("beta", SITE).await;
    let mut d = rig.serve(None);
    d.ready().await;
    assert_eq!(rig.row("acme").conn.state, State::PendingAuthorization);

    let landed = authorize(&rig, "acme").await;
    let q = query(&landed);
    let r = http().get(&landed).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let h = r.headers().clone();
    assert_eq!(h["content-security-policy"], "default-src 'none'");
    assert_eq!(h["referrer-policy"], "no-referrer");
    assert_eq!(h["cache-control"], "no-store");
    let page = r.text().await.unwrap();
    assert!(page.contains("<title>Connected</title>"), "{page}");
    assert!(!page.contains(&q["code"]), "the page never echoes the code");
    assert!(
        !page.contains(&q["state"]),
        "the page never echoes the state"
    );

    let row = rig.row("acme");
    assert_eq!(row.conn.state, State::Active);
    let granted = row.conn.grant_issued_at.expect("grant_issued_at");
    assert!(chrono::Utc::now() - granted < chrono::Duration::minutes(1));
    assert!(row.has_refresh_token && row.has_access_token);
    let stored = rig.stored_refresh_token("acme").unwrap();
    assert_eq!(
        rig.sim.current_refresh_token(SITE, CLIENT).as_deref(),
        Some(&*stored)
    );
    let requests = rig.sim.token_requests(SITE);
    assert_eq!(requests, 1, "one code exchange");

    // The same URL again: already connected, nothing changes.
    let r = http().get(&landed).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("<title>Already connected</title>")
    );
    let again = rig.row("acme");
    assert_eq!(again.version, row.version);
    assert_eq!(rig.stored_refresh_token("acme").unwrap(), stored);
    assert_eq!(rig.sim.token_requests(SITE), requests);

    // A tampered state: 4xx, nothing stored, nothing sent.
    let landed = authorize(&rig, "beta").await;
    let q = query(&landed);
    let mut state = q["state"].clone();
    let last = state.pop().unwrap();
    state.push(if last == 'A' { 'B' } else { 'A' });
    let mut tampered = url::Url::parse(&landed).unwrap();
    tampered
        .query_pairs_mut()
        .clear()
        .append_pair("code", &q["code"])
        .append_pair("state", &state);
    let r = http().get(tampered.as_str()).send().await.unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
    assert_eq!(r.headers()["cache-control"], "no-store");
    let beta = rig.row("beta");
    assert_eq!(beta.conn.state, State::PendingAuthorization);
    assert!(!beta.has_refresh_token);
    assert_eq!(rig.sim.token_requests(SITE), requests);

    // The untampered link still works.
    let r = http().get(&landed).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(rig.row("beta").conn.state, State::Active);

    d.signal(Signal::SIGTERM);
    assert_eq!(d.exit().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_complete_without_the_daemon_stores_the_grant() {
    let rig = Rig::new().await;
    rig.add_pending("acme", SITE).await;
    let landed = authorize(&rig, "acme").await;

    let out = rig
        .cli(
            &["connection", "complete", "acme", "--redirect-url", &landed],
            None,
        )
        .await
        .ok();
    assert!(out.stdout.contains("acme is connected"), "{out:#?}");
    let row = rig.row("acme");
    assert_eq!(row.conn.state, State::Active);
    assert!(row.conn.grant_issued_at.is_some());
    assert!(row.conn.deadline.is_some());
    let stored = rig.stored_refresh_token("acme").unwrap();
    assert_eq!(
        rig.sim.current_refresh_token(SITE, CLIENT).as_deref(),
        Some(&*stored)
    );

    // Again: nothing changes.
    let out = rig
        .cli(
            &["connection", "complete", "acme", "--redirect-url", &landed],
            None,
        )
        .await
        .ok();
    assert!(out.stdout.contains("already used"), "{out:#?}");
    assert_eq!(rig.row("acme").version, row.version);
    assert_eq!(rig.sim.token_requests(SITE), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_webhooks() {
    let rig = Rig::new().await;
    let sink = Sink::start().await;
    rig.add("acme", SITE, true).await;
    let notify = NotifySocket::bind(rig.dir.path());
    let mut d = rig.serve(Some(&notify));
    notify.until("READY=1", |m| is_line(m, "READY=1")).await;

    let out = rig.cli(&["alert", "test"], None).await;
    assert_ne!(out.code, Some(0), "no channel yet: {out:#?}");

    rig.write_config(&Opts {
        webhooks: sink.webhook_toml("fresh"),
        ..Opts::default()
    });
    d.signal(Signal::SIGHUP);
    let seen = notify
        .until("RELOADING=1", |m| is_line(m, "RELOADING=1"))
        .await;
    let reloading = seen.last().unwrap();
    let usec = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("MONOTONIC_USEC beside RELOADING=1: {reloading:?}"));
    assert!(usec.parse::<u64>().is_ok_and(|u| u > 0), "{usec}");
    notify.until("READY=1", |m| is_line(m, "READY=1")).await;
    d.log_line("configuration reloaded").await;

    let out = rig.cli(&["alert", "test"], None).await.ok();
    assert!(out.stdout.contains("ok    fresh"), "{out:#?}");
    let got = sink.received("fresh");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["kind"], "test");
    // The daemon sent it: the CLI asked through the socket.
    assert!(d.logs().contains("configuration reloaded"));

    d.signal(Signal::SIGTERM);
    assert_eq!(d.exit().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_on_sighup_keeps_the_old_one_and_raises_an_alert() {
    let rig = Rig::new().await;
    let sink = Sink::start().await;
    let good = Opts {
        webhooks: sink.webhook_toml("ops"),
        ..Opts::default()
    };
    rig.write_config(&good);
    rig.add("acme", SITE, true).await;
    let notify = NotifySocket::bind(rig.dir.path());
    let mut d = rig.serve(Some(&notify));
    notify.until("READY=1", |m| is_line(m, "READY=1")).await;

    rig.write_config(&Opts {
        log_extra: "colour = \"always\"\n".into(),
        ..good.clone()
    });
    d.signal(Signal::SIGHUP);
    notify
        .until("RELOADING=1", |m| is_line(m, "RELOADING=1"))
        .await;
    notify.until("READY=1", |m| is_line(m, "READY=1")).await;
    let line = d.log_line("error: reload refused").await;
    assert!(line.contains("colour"), "names the unknown key: {line}");

    // Still running, on the old config (its webhook).
    assert_eq!(api(&rig.socket(), "GET", "/readyz").await.status, 200);
    let a = api(&rig.socket(), "POST", "/v1/alerts/test").await;
    assert_eq!(a.status, 200);
    let results = json(&a);
    assert_eq!(results[0]["channel"], "ops", "{results}");
    assert!(results[0]["error"].is_null(), "{results}");

    let firing = acutoken::store::alerts::firing_counts(&rig.open_store()).unwrap();
    assert_eq!(
        firing.get(&AlertKind::ConfigReloadFailed),
        Some(&1),
        "{firing:?}"
    );
    eventually("config_reload_failed at the webhook", || {
        sink.received("ops")
            .iter()
            .any(|v| v["kind"] == "config_reload_failed")
    })
    .await;

    // A good config again resolves it.
    rig.write_config(&good);
    d.signal(Signal::SIGHUP);
    d.log_line("configuration reloaded").await;
    eventually("config_reload_failed to resolve", || {
        !acutoken::store::alerts::firing_counts(&rig.open_store())
            .unwrap()
            .contains_key(&AlertKind::ConfigReloadFailed)
    })
    .await;

    d.signal(Signal::SIGTERM);
    assert_eq!(d.exit().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_added_while_the_daemon_runs_is_refreshed_without_a_reload() {
    let rig = Rig::new().await;
    rig.sim.add_client("Second", CLIENT, SECRET, None);
    rig.add("acme", SITE, true).await;
    let mut d = rig.serve(None);
    d.ready().await;

    let first = rig.add("beta", "Second", false).await;
    eventually("the daemon to refresh the new connection", || {
        rig.sim.token_requests("Second") >= 1
    })
    .await;
    eventually("the rotated token to be saved", || {
        rig.row("beta").conn.last_refresh_at.is_some()
    })
    .await;
    assert_eq!(rig.sim.token_requests("Second"), 1);
    let current = rig.sim.current_refresh_token("Second", CLIENT).unwrap();
    assert_ne!(current, first);
    assert_eq!(rig.stored_refresh_token("beta").as_deref(), Some(&*current));
    assert_eq!(rig.sim.token_requests(SITE), 0);

    d.signal(Signal::SIGTERM);
    assert_eq!(d.exit().await.code(), Some(0));
    assert_eq!(rig.sim.total_replays(), 0);
}

/// `acutoken_connections{state="..."}` lines of a Prometheus text page.
fn state_gauges(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("acutoken_connections{state=\""))
        .filter_map(|rest| {
            let (state, value) = rest.split_once("\"} ")?;
            Some((state.to_string(), value.trim().parse::<f64>().ok()? as u64))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_exit_codes_and_counts_agree_with_metrics() {
    let rig = Rig::new().await;
    let metrics_port = free_port();
    rig.write_config(&Opts {
        metrics_port: Some(metrics_port),
        ..Opts::default()
    });
    rig.add("acme", SITE, true).await;

    let out = rig.cli(&["status"], None).await;
    assert_eq!(out.code, Some(3), "no daemon: {out:#?}");

    let mut d = rig.serve(None);
    d.ready().await;
    let out = rig.cli(&["status"], None).await;
    assert_eq!(out.code, Some(0), "all active: {out:#?}");

    rig.add_pending("beta", SITE).await;
    let out = rig.cli(&["status"], None).await;
    assert_eq!(out.code, Some(1), "beta waits for authorization: {out:#?}");

    let out = rig.cli(&["status", "--json"], None).await;
    assert_eq!(out.code, Some(1));
    let s: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(s["daemon"]["running"], true);
    assert_eq!(s["total"], 2);
    assert_eq!(s["counts"]["active"], 1);
    assert_eq!(s["counts"]["pending_authorization"], 1);
    assert_eq!(s["needs_action_total"], 1);
    assert_eq!(s["needs_action"][0]["name"], "beta");
    let counts: BTreeMap<String, u64> = s["counts"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap()))
        .collect();

    // The gauges are recomputed every 15 s: wait for them to catch up.
    let url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let deadline = Instant::now() + WAIT + Duration::from_secs(15);
    loop {
        let text = http().get(&url).send().await.unwrap().text().await.unwrap();
        let gauges = state_gauges(&text);
        if gauges == counts {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "metrics {gauges:?} never agreed with status {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = http()
        .get(format!("http://127.0.0.1:{metrics_port}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    d.signal(Signal::SIGTERM);
    assert_eq!(d.exit().await.code(), Some(0));
    let out = rig.cli(&["status"], None).await;
    assert_eq!(out.code, Some(3), "daemon stopped: {out:#?}");
}
