//! Issue 12 item 10: `connection disable` closes the connection's open
//! authorization links, and a link of a disabled connection never turns it
//! back on (callback and `connection complete`), with a clear page and a
//! clear error; nothing is exchanged or stored.

mod support_daemon;

use acutoken::model::State;
use support_daemon::{Rig, SITE, authorize, http, query};

/// Disabling closes the link: the customer's later visit connects nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_closes_open_links() {
    let rig = Rig::new().await;
    rig.add_pending("acme", SITE).await;
    let mut d = rig.serve(None);
    d.ready().await;
    let landed = authorize(&rig, "acme").await;
    let shown = rig.cli(&["connection", "show", "acme"], None).await.ok();
    assert!(shown.stdout.contains("a link is open"), "{shown:#?}");

    let out = rig.cli(&["connection", "disable", "acme"], None).await.ok();
    assert!(
        out.stdout
            .contains("open authorization link no longer works"),
        "{out:#?}"
    );
    let shown = rig.cli(&["connection", "show", "acme"], None).await.ok();
    assert!(!shown.stdout.contains("a link is open"), "{shown:#?}");

    let r = http().get(&landed).send().await.unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
    let page = r.text().await.unwrap();
    assert!(page.contains("<title>Not connected</title>"), "{page}");
    let out = rig
        .cli(
            &["connection", "complete", "acme", "--redirect-url", &landed],
            None,
        )
        .await;
    assert_ne!(out.code, Some(0), "{out:#?}");
    let row = rig.row("acme");
    assert_eq!(row.conn.state, State::Disabled);
    assert!(!row.has_refresh_token);
    assert_eq!(rig.sim.token_requests(SITE), 0, "no code was exchanged");
}

/// A link that is still open on a disabled connection (made before this
/// rule, or by a path that does not close it) is refused with a page that
/// says so, and by `connection complete` with an error that says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_connection_refuses_completion() {
    let rig = Rig::new().await;
    rig.add_pending("acme", SITE).await;
    let mut d = rig.serve(None);
    d.ready().await;
    let landed = authorize(&rig, "acme").await;
    // Disabled without closing its links, as an older acutoken did.
    {
        let mut st = rig.open_store();
        let name = "acme";
        st.write(|tx, _| {
            let mut row = acutoken::store::connections::get_tx(tx, name)?;
            row.conn.state = State::Disabled;
            acutoken::store::connections::put(tx, &row)
        })
        .unwrap();
    }

    let out = rig
        .cli(
            &["connection", "complete", "acme", "--redirect-url", &landed],
            None,
        )
        .await;
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert!(
        out.stderr.starts_with("error: `acme` is disabled")
            && out.stderr.contains("acutoken connection enable acme"),
        "{out:#?}"
    );

    let r = http().get(&landed).send().await.unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert_eq!(r.headers()["content-security-policy"], "default-src 'none'");
    let page = r.text().await.unwrap();
    assert!(page.contains("<title>Not connected</title>"), "{page}");
    assert!(page.contains("turned off"), "{page}");
    assert!(
        !page.contains(&query(&landed)["code"]),
        "no echo of the code"
    );

    let row = rig.row("acme");
    assert_eq!(row.conn.state, State::Disabled);
    assert!(!row.has_refresh_token);
    assert_eq!(rig.sim.token_requests(SITE), 0, "no code was exchanged");
}
