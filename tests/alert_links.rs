//! Alerts that need the customer carry a ready authorization link (issue 12,
//! item 14): the real daemon, the simulator, and a webhook sink on loopback.

mod support_daemon;

use acutoken::model::State;
use nix::sys::signal::Signal;
use serde_json::Value;
use support_daemon::*;

/// The rig's config with a generic channel `ops`, and alerts that go out at
/// once and may follow each other within a second; without `redirect`, no
/// `acumatica.redirect_uri`.
fn configure(rig: &Rig, sink: &Sink, redirect: bool) {
    let mut text = rig.config_text(&Opts {
        webhooks: sink.webhook_toml("ops"),
        ..Opts::default()
    });
    text = text.replace(
        "group_wait = \"0s\"\n",
        "group_wait = \"0s\"\ngroup_interval = \"1s\"\n",
    );
    if !redirect {
        let line = format!("redirect_uri = \"{}\"\n", rig.redirect_uri());
        assert!(text.contains(&line));
        text = text.replace(&line, "");
    }
    std::fs::write(rig.config_path(), text).unwrap();
}

/// The firing messages of `kind` about `name` the sink got so far.
fn firing(sink: &Sink, kind: &str, name: &str) -> Vec<Value> {
    sink.received("ops")
        .into_iter()
        .filter(|v| v["kind"] == kind && v["status"] == "firing" && v["connection"] == name)
        .collect()
}

/// Waits (bounded) for the first firing message of `kind` about `name`.
async fn first_firing(sink: &Sink, kind: &str, name: &str) -> Value {
    eventually(&format!("{kind} about {name} at the webhook"), || {
        !firing(sink, kind, name).is_empty()
    })
    .await;
    firing(sink, kind, name).remove(0)
}

/// Makes the customer's grant unusable and has the daemon find out now.
async fn revoke_and_refresh(rig: &Rig, name: &str) {
    rig.sim.revoke(SITE, CLIENT).unwrap();
    api(
        &rig.socket(),
        "POST",
        &format!("/v1/connections/{name}/refresh"),
    )
    .await;
    eventually("needs_reauthorization", || {
        rig.row(name).conn.state == State::NeedsReauthorization
    })
    .await;
}

/// How many authorization links the store holds for anyone.
fn stored_links(rig: &Rig) -> i64 {
    rig.open_store()
        .db()
        .query_row("SELECT COUNT(*) FROM authorizations", (), |r| r.get(0))
        .unwrap()
}

/// The customer follows `link` at the simulator (approving), and the browser
/// lands on the daemon's callback: returns the page's title line.
async fn follow(rig: &Rig, link: &str) -> String {
    assert!(
        link.starts_with(&rig.sim.authorize_url(SITE)),
        "an authorization URL of the customer's instance: {link}"
    );
    let q = query(link);
    assert_eq!(q["redirect_uri"], rig.redirect_uri());
    assert_eq!(q["client_id"], CLIENT);
    assert_eq!(q["code_challenge_method"], "S256");
    let r = http().get(link).send().await.unwrap();
    assert_eq!(r.status(), 302, "the simulator approves");
    let to = r.headers()["location"].to_str().unwrap().to_string();
    assert!(to.starts_with(&rig.redirect_uri()), "{to}");
    let page = http().get(&to).send().await.unwrap().text().await.unwrap();
    page.lines()
        .find(|l| l.contains("<title>"))
        .unwrap_or(&page)
        .to_string()
}

/// No stored byte holds the link's state in clear: the outbox carries no link.
fn assert_link_not_in_clear(rig: &Rig, link: &str) {
    let state = query(link)["state"].clone();
    for file in ["acutoken.db", "acutoken.db-wal"] {
        if let Ok(bytes) = std::fs::read(rig.path(file)) {
            assert!(
                !String::from_utf8_lossy(&bytes).contains(&state),
                "{file} holds the link in clear"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn needs_reauthorization_opens_a_link_that_works() {
    let rig = Rig::new().await;
    let sink = Sink::start().await;
    configure(&rig, &sink, true);
    rig.add("acme", SITE, true).await;
    let mut d = rig.serve(None);
    d.ready().await;
    assert_eq!(stored_links(&rig), 0);

    revoke_and_refresh(&rig, "acme").await;
    let msg = first_firing(&sink, "needs_reauthorization", "acme").await;
    let link = msg["authorization_url"]
        .as_str()
        .unwrap_or_else(|| panic!("no authorization_url: {msg}"))
        .to_string();
    let action = msg["action"].as_str().unwrap();
    assert!(action.contains(&link), "the action carries it: {action}");
    assert_eq!(stored_links(&rig), 1, "one link opened");
    let history = rig
        .cli(&["connection", "history", "acme"], None)
        .await
        .ok()
        .stdout;
    assert!(
        history.contains("authorization link opened for the needs_reauthorization alert"),
        "{history}"
    );
    assert!(!history.contains(&query(&link)["state"]));
    assert_link_not_in_clear(&rig, &link);

    // The customer uses it: the connection is active again and the alert
    // resolves, with no link in the resolution.
    let title = follow(&rig, &link).await;
    assert!(title.contains("Connected"), "{title}");
    assert_eq!(rig.row("acme").conn.state, State::Active);
    eventually("needs_reauthorization resolved at the webhook", || {
        sink.received("ops")
            .iter()
            .any(|v| v["kind"] == "needs_reauthorization" && v["status"] == "resolved")
    })
    .await;
    for v in sink.received("ops") {
        if v["status"] == "resolved" {
            assert!(v.get("authorization_url").is_none(), "{v}");
        }
    }
    assert!(
        !d.logs().contains(&query(&link)["state"]),
        "the log holds the link"
    );

    d.signal(Signal::SIGTERM);
    assert_eq!(d.exit().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_link_is_reused_never_replaced() {
    let rig = Rig::new().await;
    let sink = Sink::start().await;
    configure(&rig, &sink, true);
    rig.add("acme", SITE, true).await;
    let mut d = rig.serve(None);
    d.ready().await;

    // The operator sent the customer a link already.
    let printed = rig
        .cli(&["connection", "authorize", "acme"], None)
        .await
        .ok()
        .stdout
        .trim()
        .to_string();
    revoke_and_refresh(&rig, "acme").await;
    let msg = first_firing(&sink, "needs_reauthorization", "acme").await;
    assert_eq!(
        msg["authorization_url"], printed,
        "the alert carries the link the customer may already have"
    );
    assert_eq!(stored_links(&rig), 1);
    // And that link still works.
    let title = follow(&rig, &printed).await;
    assert!(title.contains("Connected"), "{title}");
    assert_eq!(rig.row("acme").conn.state, State::Active);

    d.signal(Signal::SIGTERM);
    assert_eq!(d.exit().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_redirect_uri_the_alert_says_so_until_a_reload_sets_it() {
    let rig = Rig::new().await;
    let sink = Sink::start().await;
    configure(&rig, &sink, false);
    rig.add("acme", SITE, true).await;
    let mut d = rig.serve(None);
    d.ready().await;

    revoke_and_refresh(&rig, "acme").await;
    let msg = first_firing(&sink, "needs_reauthorization", "acme").await;
    assert!(msg.get("authorization_url").is_none(), "{msg}");
    let action = msg["action"].as_str().unwrap();
    assert!(
        action.contains("no redirect URI is configured (acumatica.redirect_uri)"),
        "{action}"
    );
    assert!(
        action.contains("acutoken connection authorize acme"),
        "{action}"
    );
    assert_eq!(stored_links(&rig), 0, "no link is stored");

    // The operator sets it and reloads: the next message (a repeat here)
    // carries a link.
    configure(&rig, &sink, true);
    let text = std::fs::read_to_string(rig.config_path()).unwrap().replace(
        "group_wait = \"0s\"\n",
        "group_wait = \"0s\"\nrepeat_interval = \"1s\"\n",
    );
    std::fs::write(rig.config_path(), text).unwrap();
    d.signal(Signal::SIGHUP);
    d.log_line("configuration reloaded").await;
    eventually("a message with a link after the reload", || {
        firing(&sink, "needs_reauthorization", "acme")
            .iter()
            .any(|v| v["authorization_url"].is_string())
    })
    .await;
    assert_eq!(stored_links(&rig), 1);

    d.signal(Signal::SIGTERM);
    assert_eq!(d.exit().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_absolute_expiry_reminder_carries_a_working_link() {
    let rig = Rig::new().await;
    let sink = Sink::start().await;
    configure(&rig, &sink, true);
    // Granted 29 days ago with the default 30-day absolute lifetime: one
    // day left, past every warn point.
    let now = chrono::Utc::now();
    let token = rig.sim.issue_grant(SITE, CLIENT, now).unwrap();
    let file = rig.path("acme.rt");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let instance = rig.sim.instance(SITE);
    let granted = acutoken::model::fmt_time(now - chrono::Duration::days(29));
    rig.cli(
        &[
            "connection",
            "add",
            "acme",
            "--instance",
            &instance,
            "--client-id",
            CLIENT,
            "--mode",
            "absolute",
            "--refresh-token-file",
            &file.display().to_string(),
            "--grant-issued-at",
            &granted,
        ],
        Some(&format!("{SECRET}\n")),
    )
    .await
    .ok();
    let mut d = rig.serve(None);
    d.ready().await;

    let msg = first_firing(&sink, "expiry_approaching", "acme").await;
    let link = msg["authorization_url"]
        .as_str()
        .unwrap_or_else(|| panic!("no authorization_url: {msg}"))
        .to_string();
    assert!(msg["action"].as_str().unwrap().contains(&link), "{msg}");
    assert_link_not_in_clear(&rig, &link);

    // Re-authorizing moves the absolute deadline: the reminder resolves.
    let before = rig.row("acme").conn.deadline.unwrap();
    let title = follow(&rig, &link).await;
    assert!(title.contains("Connected"), "{title}");
    let row = rig.row("acme");
    assert_eq!(row.conn.state, State::Active);
    assert!(row.conn.deadline.unwrap() > before + chrono::Duration::days(20));
    eventually("expiry_approaching resolved", || {
        sink.received("ops")
            .iter()
            .any(|v| v["kind"] == "expiry_approaching" && v["status"] == "resolved")
    })
    .await;

    d.signal(Signal::SIGTERM);
    assert_eq!(d.exit().await.code(), Some(0));
}
