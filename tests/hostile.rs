//! A hostile or broken token endpoint against the real daemon (issue 12,
//! item 1). A customer controls their instance, so its token endpoint can
//! answer anything; `"expires_in": 10000000000000` once overflowed chrono in
//! the code exchange and took the daemon down (with `panic = "abort"`) along
//! with every other customer's refresh in flight. Now the lifetime is bounded
//! at parse (24 hours), the answer and its rotated refresh token are kept, and
//! the other connections go on.

mod support_daemon;

use std::time::Duration;

use acutoken::model::{MAX_ACCESS_LIFETIME, State, Timestamp, parse_time};
use nix::sys::signal::Signal;
use support_daemon::{
    CLIENT, Rig, SECRET, SITE, api, api_full, authorize_at, eventually, http, json,
};

/// What the hostile instance answers as `expires_in`: about 317 000 years.
const HUGE: u64 = 10_000_000_000_000;
/// A second customer's instance, well behaved.
const OTHER: &str = "Other";

fn bound() -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(MAX_ACCESS_LIFETIME).unwrap()
}

/// The access token's expiry lies at the bound from when it was issued
/// (between `before` and now), not centuries ahead and not unknown.
fn assert_bounded(what: &str, expires: Option<Timestamp>, before: Timestamp) {
    let expires = expires.unwrap_or_else(|| panic!("{what}: no access_expires_at"));
    let after = chrono::Utc::now();
    assert!(
        expires >= before + bound() - chrono::TimeDelta::seconds(1) && expires <= after + bound(),
        "{what}: access_expires_at {expires} is not {} after the grant (between {before} and {after})",
        acutoken::model::fmt_duration(MAX_ACCESS_LIFETIME)
    );
}

/// A manual refresh through the daemon succeeds, and the store holds the
/// token the simulator now knows.
async fn refreshes_through_the_daemon(rig: &Rig, name: &str, site: &str) {
    let before = rig.row(name).conn.last_refresh_at;
    let a = api(
        &rig.socket(),
        "POST",
        &format!("/v1/connections/{name}/refresh"),
    )
    .await;
    let body = String::from_utf8_lossy(&a.body).into_owned();
    assert_eq!(a.status, 200, "{name}: {body}");
    assert_eq!(json(&a)["outcome"], "refreshed", "{name}: {body}");
    let row = rig.row(name);
    assert_eq!(row.conn.state, State::Active, "{name}");
    assert!(row.conn.last_refresh_at > before, "{name}: refreshed again");
    assert_eq!(
        rig.stored_refresh_token(name),
        rig.sim.current_refresh_token(site, CLIENT),
        "{name}: the stored token is the live one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_expires_in_at_the_code_exchange_is_bounded_and_the_daemon_stays_up() {
    let rig = Rig::new().await;
    rig.sim.add_client(OTHER, CLIENT, SECRET, None);
    rig.sim.set_expires_in(SITE, HUGE);
    rig.add_pending("acme", SITE).await;
    rig.add("other", OTHER, true).await;
    let mut d = rig.serve(None);
    d.ready().await;

    // The customer completes the authorization; the exchange answers the huge lifetime.
    let landed = authorize_at(&rig, "acme", SITE).await;
    let before = chrono::Utc::now();
    let answer = http().get(&landed).send().await;
    let page = match answer {
        Ok(r) => {
            assert_eq!(r.status(), 200);
            r.text().await.unwrap()
        }
        Err(e) => panic!(
            "the callback did not answer ({e}); the daemon's output:\n{}",
            d.logs()
        ),
    };
    assert!(page.contains("<title>Connected</title>"), "{page}");
    d.ready().await;

    let row = rig.row("acme");
    assert_eq!(row.conn.state, State::Active);
    assert!(row.has_refresh_token && row.has_access_token);
    assert_bounded("acme", row.conn.access_expires_at, before);
    assert_eq!(row.access_lifetime, Some(MAX_ACCESS_LIFETIME));
    assert!(
        row.conn.next_refresh_at.is_some_and(|n| n >= before),
        "a plan, not an overdue one: {:?}",
        row.conn.next_refresh_at
    );
    assert_eq!(
        rig.stored_refresh_token("acme"),
        rig.sim.current_refresh_token(SITE, CLIENT),
        "the grant is kept"
    );
    let line = d.log_line("expires_in beyond the bound").await;
    assert!(line.contains("WARN") || line.contains("warn"), "{line}");

    // The token is handed out with the bounded expiry.
    let t = api_full(&rig.socket(), "/v1/connections/acme/token").await;
    assert_eq!(t.status, 200, "{}", String::from_utf8_lossy(&t.body));
    let expires = parse_time(t.json()["expires_at"].as_str().unwrap()).unwrap();
    assert_bounded("the handed-out token", Some(expires), before);

    // Every other customer goes on, and so does this one.
    refreshes_through_the_daemon(&rig, "other", OTHER).await;
    let before = chrono::Utc::now();
    refreshes_through_the_daemon(&rig, "acme", SITE).await;
    assert_bounded(
        "acme after a refresh",
        rig.row("acme").conn.access_expires_at,
        before,
    );

    let logs = d.logs();
    let secret = rig.stored_refresh_token("acme").unwrap();
    assert!(!logs.contains(&secret), "no token in the logs");
    d.signal(Signal::SIGTERM);
    assert_eq!(d.exit().await.code(), Some(0), "{}", d.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_expires_in_at_a_scheduled_refresh_is_bounded_and_the_others_go_on() {
    let rig = Rig::new().await;
    rig.sim.add_client(OTHER, CLIENT, SECRET, None);
    rig.sim.set_expires_in(SITE, HUGE);
    // Both of unknown age, so both are refreshed as soon as the daemon starts.
    let first = rig.add("acme", SITE, false).await;
    rig.add("other", OTHER, false).await;
    let before = chrono::Utc::now();
    let mut d = rig.serve(None);
    d.ready().await;

    eventually("both scheduled refreshes to be saved", || {
        rig.row("acme").conn.last_refresh_at.is_some()
            && rig.row("other").conn.last_refresh_at.is_some()
    })
    .await;
    d.ready().await;

    let row = rig.row("acme");
    assert_eq!(row.conn.state, State::Active, "{:?}", row.conn.last_error);
    assert_bounded("acme", row.conn.access_expires_at, before);
    assert_eq!(row.access_lifetime, Some(MAX_ACCESS_LIFETIME));
    let current = rig.sim.current_refresh_token(SITE, CLIENT).unwrap();
    assert_ne!(current, first, "the token rotated");
    assert_eq!(rig.stored_refresh_token("acme").as_deref(), Some(&*current));
    assert!(
        row.conn.next_refresh_at.is_some_and(|n| n > before),
        "{:?}",
        row.conn.next_refresh_at
    );
    d.log_line("expires_in beyond the bound").await;

    let other = rig.row("other");
    assert_eq!(other.conn.state, State::Active);
    assert_eq!(other.access_lifetime, Some(Duration::from_secs(3600)));

    // The daemon keeps refreshing both.
    refreshes_through_the_daemon(&rig, "other", OTHER).await;
    let before = chrono::Utc::now();
    refreshes_through_the_daemon(&rig, "acme", SITE).await;
    assert_bounded(
        "acme after a refresh",
        rig.row("acme").conn.access_expires_at,
        before,
    );
    assert_eq!(rig.sim.total_replays(), 0, "no token was sent twice");

    d.signal(Signal::SIGTERM);
    assert_eq!(d.exit().await.code(), Some(0), "{}", d.logs());
}
