//! Races between a refresh in flight and everything else that may change its
//! connection meanwhile (issue 12, items 2, 3 and 7): the real daemon against
//! the simulator, which holds refresh requests until the test lets them go,
//! so each race is made on purpose, never by timing.

mod support_daemon;

use std::sync::Arc;

use acutoken::model::{Mode, State};
use nix::sys::signal::Signal;
use support_daemon::{Output, Rig, SITE, WAIT, api, authorize, eventually, http, json};
use tokio::io::{AsyncBufReadExt, BufReader};

/// `connection refresh NAME` through the daemon, left running.
fn refresh_in_background(rig: &Arc<Rig>, name: &str) -> tokio::task::JoinHandle<Output> {
    let rig = rig.clone();
    let name = name.to_string();
    tokio::spawn(async move { rig.cli(&["connection", "refresh", &name], None).await })
}

/// Holds refresh requests, starts a refresh of `name` and waits until its
/// request reached the simulator.
async fn refresh_in_flight(rig: &Arc<Rig>, name: &str) -> tokio::task::JoinHandle<Output> {
    rig.sim.hold_token_requests();
    let before = rig.sim.in_flight(SITE);
    let task = refresh_in_background(rig, name);
    eventually("the refresh request in flight", || {
        rig.sim.in_flight(SITE) > before
    })
    .await;
    task
}

fn history(rig: &Rig, name: &str) -> Vec<(String, String)> {
    let st = rig.open_store();
    let id = st.get(name).unwrap().conn.id;
    st.history(id)
        .unwrap()
        .into_iter()
        .map(|e| (e.event, e.detail))
        .collect()
}

async fn started(rig: &Arc<Rig>, names: &[&str]) -> support_daemon::Daemon {
    for n in names {
        rig.add(n, SITE, true).await;
    }
    let mut d = rig.serve(None);
    d.ready().await;
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_waits_for_the_refresh_in_flight_then_removes() {
    let rig = Arc::new(Rig::new().await);
    let _d = started(&rig, &["acme", "beta"]).await;
    let refresh = refresh_in_flight(&rig, "acme").await;

    let mut remove = rig.spawn_cli(&["connection", "remove", "acme", "--yes"]);
    let mut err = BufReader::new(remove.stderr.take().unwrap()).lines();
    let said = tokio::time::timeout(WAIT, err.next_line())
        .await
        .expect("remove says it waits")
        .unwrap()
        .unwrap_or_default();
    assert!(
        said.contains("waiting for the refresh of `acme` in flight"),
        "{said}"
    );
    assert!(
        rig.open_store().get("acme").is_ok(),
        "nothing is removed while the request is in flight"
    );

    rig.sim.release_token_requests();
    let out = refresh.await.unwrap();
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("refreshed"), "{out:?}");
    let status = tokio::time::timeout(WAIT, remove.wait())
        .await
        .expect("remove finishes once the refresh is saved")
        .unwrap();
    assert!(status.success());
    assert!(rig.open_store().get("acme").is_err(), "removed");

    // Nothing is blocked: the other connection refreshes at once.
    let out = rig.cli(&["connection", "refresh", "beta"], None).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("refreshed"), "{out:?}");
    assert_eq!(rig.sim.total_replays(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_refuses_while_a_live_claim_stays_and_changes_nothing() {
    let rig = Arc::new(Rig::new().await);
    let d = started(&rig, &["acme"]).await;
    let refresh = refresh_in_flight(&rig, "acme").await;
    // A daemon stalled mid-request (stopped, swapped out): its claim stays
    // live past the request timeout. `remove` waits that long (10 s in the
    // test config, plus 5 s), then refuses.
    d.signal(Signal::SIGSTOP);
    let out = rig
        .cli(&["connection", "remove", "acme", "--yes"], None)
        .await;
    d.signal(Signal::SIGCONT);
    assert_eq!(out.code, Some(2), "{out:?}");
    let last = out.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: `acme` is being refreshed by acutoken serve")
            && last.contains("nothing was removed"),
        "{out:?}"
    );
    assert!(rig.open_store().get("acme").is_ok());
    rig.sim.release_token_requests();
    refresh.await.unwrap();
    assert_eq!(rig.sim.total_replays(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_deleted_under_a_refresh_discards_its_token_and_blocks_nothing() {
    // What an older CLI, a script or `sqlite3` can still do: delete the row
    // while the daemon's request is in flight.
    let rig = Arc::new(Rig::new().await);
    let mut d = started(&rig, &["acme", "beta"]).await;
    let refresh = refresh_in_flight(&rig, "acme").await;
    let mut st = rig.open_store();
    let id = st.get("acme").unwrap().conn.id;
    st.write(|tx, _| acutoken::store::connections::remove(tx, id))
        .unwrap();
    rig.sim.release_token_requests();
    let out = refresh.await.unwrap();
    assert!(out.stdout.contains("discarded"), "{out:?}");
    d.log_line("removed while its refresh was in flight").await;

    let out = rig.cli(&["connection", "refresh", "beta"], None).await;
    assert_eq!(out.code, Some(0), "nothing is blocked: {out:?}");
    assert!(out.stdout.contains("refreshed"), "{out:?}");
    let logs = d.logs();
    assert!(
        !logs.contains("store_write_failed") && !logs.contains("cannot save a rotated"),
        "no unsaved token, no alert: {logs}"
    );
    let status = api(&rig.socket(), "GET", "/v1/status").await;
    assert_eq!(
        json(&status)["daemon"]["unsaved_tokens"],
        0,
        "{:?}",
        json(&status)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_during_a_refresh_stays_disabled_keeps_the_token_and_serves_none() {
    let rig = Arc::new(Rig::new().await);
    let _d = started(&rig, &["acme"]).await;
    let refresh = refresh_in_flight(&rig, "acme").await;
    rig.cli(&["connection", "disable", "acme"], None).await.ok();
    rig.sim.release_token_requests();
    refresh.await.unwrap();

    let row = rig.row("acme");
    assert_eq!(
        row.conn.state,
        State::Disabled,
        "the operator's word stands"
    );
    assert_eq!(row.conn.next_refresh_at, None);
    // The rotated token is the live one, and it is the one stored.
    let stored = rig.stored_refresh_token("acme").unwrap();
    assert!(rig.sim.refresh_token_alive(SITE, &stored));
    let a = api(&rig.socket(), "GET", "/v1/connections/acme/token").await;
    assert_eq!(a.status, 409, "no token for a disabled connection");
    assert!(!String::from_utf8_lossy(&a.body).contains("access_token"));

    // Enabled again, it serves the token that refresh obtained.
    rig.cli(&["connection", "enable", "acme"], None).await.ok();
    let a = api(&rig.socket(), "GET", "/v1/connections/acme/token").await;
    assert_eq!(a.status, 200);
    let token = json(&a)["access_token"].as_str().unwrap().to_string();
    assert!(rig.sim.access_token_valid(SITE, &token));
    assert_eq!(rig.sim.total_replays(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_made_during_a_refresh_are_kept() {
    let rig = Arc::new(Rig::new().await);
    let _d = started(&rig, &["acme"]).await;
    let refresh = refresh_in_flight(&rig, "acme").await;
    rig.cli(
        &[
            "connection",
            "set",
            "acme",
            "--label",
            "tier=gold",
            "--mode",
            "sliding",
            "--lifetime",
            "10d",
        ],
        None,
    )
    .await
    .ok();
    rig.sim.release_token_requests();
    let out = refresh.await.unwrap();
    assert!(out.stdout.contains("refreshed"), "{out:?}");

    let row = rig.row("acme");
    assert_eq!(
        row.conn.labels.get("tier").map(String::as_str),
        Some("gold")
    );
    assert_eq!(row.conn.mode, Mode::Sliding);
    assert_eq!(
        row.conn.lifetime,
        std::time::Duration::from_secs(10 * 86_400)
    );
    // The refresh's plan follows the new settings: a sliding deadline counted
    // from the rotation just saved.
    let issued = row.conn.refresh_token_issued_at.unwrap();
    let deadline = row.conn.deadline.unwrap();
    assert!(deadline <= issued + chrono::Duration::days(10), "{row:?}");
    assert!(history(&rig, "acme").iter().any(|(e, _)| e == "refreshed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_during_a_refresh_discards_the_token_and_says_so() {
    let rig = Arc::new(Rig::new().await);
    let _d = started(&rig, &["acme"]).await;
    let refresh = refresh_in_flight(&rig, "acme").await;
    let other = format!("http://{}", rig.sim.instance("OtherSite"));
    rig.cli(&["connection", "set", "acme", "--instance", &other], None)
        .await
        .ok();
    rig.sim.release_token_requests();
    let out = refresh.await.unwrap();
    assert!(out.stdout.contains("discarded"), "{out:?}");

    let row = rig.row("acme");
    assert_eq!(row.conn.state, State::PendingAuthorization);
    assert!(row.conn.instance.ends_with("/OtherSite"), "{row:?}");
    assert!(
        !row.has_refresh_token,
        "the old grant's token is not stored"
    );
    let h = history(&rig, "acme");
    assert!(
        h.iter()
            .any(|(e, d)| e == "refresh_discarded" && d.contains("instance")),
        "{h:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reauthorization_during_a_refresh_keeps_the_new_grant() {
    let rig = Arc::new(Rig::new().await);
    let _d = started(&rig, &["acme"]).await;
    let before = rig.row("acme").conn.grant_issued_at.unwrap();
    let refresh = refresh_in_flight(&rig, "acme").await;
    // The customer authorizes again; the code exchange is not held.
    let landed = authorize(&rig, "acme").await;
    let r = http().get(&landed).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let new_grant = rig.stored_refresh_token("acme").unwrap();

    rig.sim.release_token_requests();
    let out = refresh.await.unwrap();
    assert!(out.stdout.contains("discarded"), "{out:?}");

    let row = rig.row("acme");
    assert_eq!(row.conn.state, State::Active);
    assert!(row.conn.grant_issued_at.unwrap() > before);
    assert_eq!(
        rig.stored_refresh_token("acme").unwrap(),
        new_grant,
        "the new grant's token stays"
    );
    assert!(rig.sim.refresh_token_alive(SITE, &new_grant));
    let h = history(&rig, "acme");
    assert!(
        h.iter()
            .any(|(e, d)| e == "refresh_discarded" && d.contains("newer grant")),
        "{h:?}"
    );
    assert_eq!(rig.sim.total_replays(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_refresh_is_limited_to_one_a_minute_per_connection() {
    let rig = Arc::new(Rig::new().await);
    let _d = started(&rig, &["acme", "beta"]).await;
    let a = api(&rig.socket(), "POST", "/v1/connections/acme/refresh").await;
    assert_eq!(a.status, 200);
    let sent = rig.sim.token_requests(SITE);

    let again = api(&rig.socket(), "POST", "/v1/connections/acme/refresh").await;
    assert_eq!(again.status, 429);
    let wait = again.retry_after.expect("Retry-After");
    assert!((1..=60).contains(&wait), "{wait}");
    assert_eq!(rig.sim.token_requests(SITE), sent, "nothing sent");
    // The CLI through the daemon says so in one line.
    let out = rig.cli(&["connection", "refresh", "acme"], None).await;
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr.trim().starts_with("error:") && out.stderr.contains("try again in"),
        "{out:?}"
    );
    // Another connection is not affected.
    let b = api(&rig.socket(), "POST", "/v1/connections/beta/refresh").await;
    assert_eq!(b.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_requests_hold_the_per_instance_limit() {
    let rig = Arc::new(Rig::new().await);
    // Refresh tokens without access tokens: every `token` call must refresh.
    for n in ["a1", "a2", "a3"] {
        rig.add(n, SITE, true).await;
    }
    let mut d = rig.serve_with_env(None, &[("ACUTOKEN__RENEWAL__PER_INSTANCE_CONCURRENT", "1")]);
    d.ready().await;
    rig.sim.hold_token_requests();
    let calls: Vec<_> = ["a1", "a2", "a3"]
        .into_iter()
        .map(|n| {
            let socket = rig.socket();
            tokio::spawn(
                async move { api(&socket, "GET", &format!("/v1/connections/{n}/token")).await },
            )
        })
        .collect();
    eventually("a token-driven refresh in flight", || {
        rig.sim.in_flight(SITE) >= 1
    })
    .await;
    rig.sim.release_token_requests();
    for c in calls {
        assert_eq!(c.await.unwrap().status, 200);
    }
    assert_eq!(rig.sim.token_requests(SITE), 3);
    assert_eq!(
        rig.sim.max_concurrency(SITE),
        1,
        "token requests hold per_instance_concurrent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_secret_proves_the_new_secret_at_once() {
    let rig = Arc::new(Rig::new().await);
    let _d = started(&rig, &["acme"]).await;
    // The operator made a new secret on the instance; the old one is gone.
    rig.sim
        .replace_secret(SITE, support_daemon::CLIENT, "the-new-one", None)
        .unwrap();
    let sent = rig.sim.token_requests(SITE);

    let out = rig
        .cli(&["connection", "set-secret", "acme"], Some("mistyped\n"))
        .await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr
            .trim()
            .starts_with("error: the instance refused the new client secret too"),
        "{out:?}"
    );
    assert_eq!(
        rig.sim.token_requests(SITE),
        sent + 1,
        "one refresh at once"
    );
    assert_eq!(rig.row("acme").conn.state, State::NeedsSecret);

    let out = rig
        .cli(&["connection", "set-secret", "acme"], Some("the-new-one\n"))
        .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("the new secret works"), "{out:?}");
    assert_eq!(rig.row("acme").conn.state, State::Active);
    assert_eq!(rig.sim.total_replays(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_of_the_old_secret_is_not_applied_to_a_new_one_entered_meanwhile() {
    let rig = Arc::new(Rig::new().await);
    let _d = started(&rig, &["acme"]).await;
    let refresh = refresh_in_flight(&rig, "acme").await;
    // The operator rotates the secret on the instance and in acutoken while
    // the request made with the old one is in flight.
    rig.sim
        .replace_secret(SITE, support_daemon::CLIENT, "the-new-one", None)
        .unwrap();
    let r = rig.clone();
    let set = tokio::spawn(async move {
        r.cli(&["connection", "set-secret", "acme"], Some("the-new-one\n"))
            .await
    });
    eventually("the new secret stored", || {
        history(&rig, "acme").iter().any(|(e, _)| e == "secret_set")
    })
    .await;
    rig.sim.release_token_requests();
    let out = refresh.await.unwrap();
    assert!(out.stdout.contains("discarded"), "{out:?}");
    assert!(
        out.stdout.contains("a new secret was entered meanwhile"),
        "{out:?}"
    );
    let out = set.await.unwrap();
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("the new secret works"), "{out:?}");
    let row = rig.row("acme");
    assert_eq!(row.conn.state, State::Active, "never needs_secret: {row:?}");
    assert_eq!(rig.sim.total_replays(), 0);
}
