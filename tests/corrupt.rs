//! Issue 12 item 9: one corrupt row never hurts the others.
//!
//! Each test damages one column of one connection (`bad`, on its own
//! simulator site) with the `sqlite3` CLI, as a hand edit or a damaged file
//! would, and runs the real daemon: it starts, the other connections
//! refresh, `status`, `connection list`/`show` and the API name the bad one
//! with the column, a `connection_faulty` alert reaches the webhook, and
//! the bad one is set aside once: its site never gets a token request and
//! its set-aside is logged once while the others work.

mod support_daemon;

use std::process::Command;

use serde_json::Value;
use support_daemon::{CLIENT, Opts, Rig, SECRET, SITE, Sink, api, eventually, json};

/// The site of the damaged connection: its token requests are counted apart.
const BAD_SITE: &str = "Damaged";
/// Connections that keep working beside it.
const GOOD: [&str; 3] = ["good1", "good2", "good3"];

/// Runs one statement on the store with the `sqlite3` CLI.
fn sqlite(rig: &Rig, sql: &str) {
    // The daemon writes too: wait for its lock like any other writer.
    let out = Command::new("sqlite3")
        .args(["-cmd", ".timeout 10000"])
        .arg(rig.store_path())
        .arg(sql)
        .output()
        .expect("the sqlite3 CLI is installed (apt-get install sqlite3)");
    assert!(
        out.status.success(),
        "sqlite3 {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Three good connections and `bad`, all due at once (no grant time given).
async fn world() -> (Rig, Sink) {
    let rig = Rig::new().await;
    rig.sim.add_client(BAD_SITE, CLIENT, SECRET, None);
    let sink = Sink::start().await;
    rig.write_config(&Opts {
        webhooks: sink.webhook_toml("ops"),
        ..Opts::default()
    });
    for name in GOOD {
        rig.add(name, SITE, false).await;
    }
    rig.add("bad", BAD_SITE, false).await;
    (rig, sink)
}

/// Every alert body the sink got, flattened (a group holds an `alerts` array).
fn alerts(sink: &Sink) -> Vec<Value> {
    let mut out = Vec::new();
    for body in sink.received("ops") {
        match body.get("alerts").and_then(Value::as_array) {
            Some(a) => out.extend(a.iter().cloned()),
            None => out.push(body),
        }
    }
    out
}

/// Damages `bad` with `sql`, serves, and checks everything the issue asks
/// for. `column` is the column the reports must name.
async fn damaged(sql: &str, column: &str, unreadable: bool) {
    let (rig, sink) = world().await;
    sqlite(&rig, sql);
    let mut daemon = rig.serve(None);
    daemon.ready().await;

    // The others refresh.
    eventually("the good connections to refresh", || {
        rig.sim.token_requests(SITE) >= GOOD.len() as u64
    })
    .await;
    // An alert names it.
    eventually("a connection_faulty alert", || {
        alerts(&sink)
            .iter()
            .any(|a| a["kind"] == "connection_faulty" && a["connection"] == "bad")
    })
    .await;
    let alert = alerts(&sink)
        .into_iter()
        .find(|a| a["kind"] == "connection_faulty")
        .unwrap();
    assert_eq!(alert["severity"], "critical");
    assert_eq!(alert["status"], "firing");
    assert!(
        alert["summary"].as_str().unwrap().contains(column),
        "{alert}"
    );

    // One more refresh of a good one goes through the daemon after all that.
    rig.cli(&["connection", "refresh", "good1"], None)
        .await
        .ok();

    // status names it, with the column, and exits 1 (a person must act).
    let status = rig.cli(&["status", "--json"], None).await;
    assert_eq!(status.code, Some(1), "{status:#?}");
    let s: Value = serde_json::from_str(&status.stdout).unwrap();
    let aside = s["set_aside"].as_array().unwrap();
    assert_eq!(aside.len(), 1, "{s:#}");
    assert_eq!(aside[0]["name"], "bad");
    assert!(
        aside[0]["reason"].as_str().unwrap().contains(column),
        "{s:#}"
    );
    let human = rig.cli(&["status"], None).await;
    assert!(human.stdout.contains("set aside (1)"), "{human:#?}");

    // The API lists every connection, the bad one with its fault.
    let list = api(&rig.socket(), "GET", "/v1/connections").await;
    assert_eq!(list.status, 200, "{}", String::from_utf8_lossy(&list.body));
    let list = json(&list);
    assert_eq!(list.as_array().unwrap().len(), GOOD.len() + 1, "{list:#}");
    for name in GOOD {
        let good = rig.cli(&["connection", "show", name], None).await.ok();
        assert!(!good.stdout.contains("set aside"), "{good:#?}");
    }
    let listed = rig.cli(&["connection", "list"], None).await.ok();
    let line = listed
        .stdout
        .lines()
        .find(|l| l.starts_with("bad") || l.contains("bad"))
        .unwrap_or_else(|| panic!("{listed:#?}"));
    assert!(line.contains("SET ASIDE"), "{listed:#?}");
    let show = rig.cli(&["connection", "show", "bad"], None).await;
    let shown = format!("{}{}", show.stdout, show.stderr);
    assert!(shown.contains(column), "{show:#?}");
    if unreadable {
        let bad = list
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c.get("fault").is_some())
            .unwrap_or_else(|| panic!("{list:#}"));
        assert_eq!(bad["name"], "bad");
        assert_eq!(bad["fault"]["column"], column);
        assert_ne!(show.code, Some(0), "{show:#?}");
        assert!(show.stderr.starts_with("error: "), "{show:#?}");
        let listed = rig.cli(&["connection", "list", "--json"], None).await.ok();
        let listed: Value = serde_json::from_str(&listed.stdout).unwrap();
        assert_eq!(listed.as_array().unwrap().len(), GOOD.len() + 1);
    } else {
        assert!(show.stdout.contains("set aside"), "{show:#?}");
        // Set aside once: one history entry for its alert.
        let history = rig
            .cli(&["connection", "history", "bad", "--json"], None)
            .await
            .ok();
        let evs: Value = serde_json::from_str(&history.stdout).unwrap();
        let fired = evs
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["detail"] == "connection_faulty firing (critical)")
            .count();
        assert_eq!(fired, 1, "{evs:#}");
    }

    // No loop: the damaged connection never reached its site, and its
    // set-aside was logged once while the others refreshed.
    assert_eq!(rig.sim.token_requests(BAD_SITE), 0);
    let logs = daemon.logs();
    let set_aside = logs
        .lines()
        .filter(|l| l.contains("set aside; every other connection goes on") && l.contains("bad"))
        .count();
    assert_eq!(set_aside, 1, "{logs}");
    assert!(rig.sim.token_requests(SITE) > GOOD.len() as u64);
    assert!(!logs.contains(SECRET), "a secret leaked into the log");

    // Asked for by name, the API says what to do (409), not 500.
    let one = api(&rig.socket(), "GET", "/v1/connections/bad/token").await;
    if one.status != 200 {
        assert_eq!(one.status, 409, "{}", String::from_utf8_lossy(&one.body));
    }
    // An operator can remove it, damaged or not; it is then gone everywhere.
    rig.cli(&["connection", "remove", "bad", "--yes"], None)
        .await
        .ok();
    let status = rig.cli(&["status", "--json"], None).await;
    let s: Value = serde_json::from_str(&status.stdout).unwrap();
    assert!(s["set_aside"].as_array().unwrap().is_empty(), "{s:#}");
    let list = json(&api(&rig.socket(), "GET", "/v1/connections").await);
    assert_eq!(list.as_array().unwrap().len(), GOOD.len(), "{list:#}");
}

#[tokio::test]
async fn an_unknown_state_is_set_aside_and_serve_starts() {
    damaged(
        "UPDATE connections SET state = 'bogus-state' WHERE name = 'bad'",
        "state",
        true,
    )
    .await;
}

#[tokio::test]
async fn an_unknown_mode_is_set_aside() {
    damaged(
        "UPDATE connections SET mode = 'weekly' WHERE name = 'bad'",
        "mode",
        true,
    )
    .await;
}

#[tokio::test]
async fn an_unknown_deadline_source_is_set_aside() {
    damaged(
        "UPDATE connections SET deadline_source = 'guessed' WHERE name = 'bad'",
        "deadline_source",
        true,
    )
    .await;
}

#[tokio::test]
async fn labels_that_are_not_json_are_set_aside() {
    damaged(
        "UPDATE connections SET labels = '{not json' WHERE name = 'bad'",
        "labels",
        true,
    )
    .await;
}

#[tokio::test]
async fn an_id_that_is_not_a_uuid_is_set_aside() {
    damaged(
        "UPDATE connections SET id = 'not-a-uuid' WHERE name = 'bad'",
        "id",
        true,
    )
    .await;
}

#[tokio::test]
async fn a_timestamp_that_is_not_an_integer_is_set_aside() {
    damaged(
        "UPDATE connections SET deadline = 'soon' WHERE name = 'bad'",
        "deadline",
        true,
    )
    .await;
}

#[tokio::test]
async fn a_refresh_token_that_does_not_open_is_set_aside() {
    damaged(
        "UPDATE connections SET refresh_token = X'0001020304050607080910111213141516171819' WHERE name = 'bad'",
        "refresh_token",
        false,
    )
    .await;
}

#[tokio::test]
async fn a_client_secret_that_does_not_open_is_set_aside() {
    damaged(
        "UPDATE connections SET client_secret = X'0001020304050607080910111213141516171819' WHERE name = 'bad'",
        "client_secret",
        false,
    )
    .await;
}

/// The operator's fix is picked up: a row corrected while the daemon runs
/// resumes (here through a CLI write, which the daemon follows at once),
/// and its alert resolves.
#[tokio::test]
async fn a_fixed_row_resumes_and_its_alert_resolves() {
    let (rig, sink) = world().await;
    sqlite(
        &rig,
        "UPDATE connections SET state = 'bogus-state' WHERE name = 'bad'",
    );
    let mut daemon = rig.serve(None);
    daemon.ready().await;
    eventually("a connection_faulty alert", || {
        alerts(&sink)
            .iter()
            .any(|a| a["kind"] == "connection_faulty" && a["status"] == "firing")
    })
    .await;
    // The fix, and a change the daemon follows (the store's change sequence).
    sqlite(
        &rig,
        "UPDATE meta SET value = value + 1 WHERE key = 'change_seq';
         UPDATE connections SET state = 'active', next_refresh_at = 0,
            change_seq = (SELECT value FROM meta WHERE key = 'change_seq') WHERE name = 'bad'",
    );
    eventually("the fixed connection to refresh", || {
        rig.sim.token_requests(BAD_SITE) >= 1
    })
    .await;
    // Resolved in the outbox (the channel hears of it after group_interval).
    eventually("the alert to resolve", || {
        acutoken::store::alerts::set_aside(&rig.open_store())
            .unwrap()
            .is_empty()
    })
    .await;
    let status = rig.cli(&["status", "--json"], None).await;
    let s: Value = serde_json::from_str(&status.stdout).unwrap();
    assert!(s["set_aside"].as_array().unwrap().is_empty(), "{s:#}");
}
