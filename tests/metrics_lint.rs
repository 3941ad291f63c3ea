//! Issue 15 item 5: `/metrics` of a running daemon passes Prometheus's own
//! linter, `promtool check metrics`, with connections in every state, refresh
//! outcomes recorded and a listener that refused connections over its cap,
//! so that every series the daemon can emit is on the page.
//!
//! promtool is found as `$PROMTOOL` or on `PATH` (`.ci/run` installs it).
//! Without it the test skips with a note, except under CI (`$CI` set),
//! where a missing linter is a failure: a check that silently never runs
//! proves nothing.

mod support_daemon;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use acutoken::sim::Fault;
use support_daemon::*;

/// The states the page must show before it is linted.
const STATES: [&str; 6] = [
    "active",
    "pending_authorization",
    "retrying",
    "needs_secret",
    "needs_reauthorization",
    "disabled",
];

fn promtool() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PROMTOOL") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    })
}

/// `promtool check metrics` on `page`: its exit status and what it said.
fn lint(promtool: &PathBuf, page: &str) -> (bool, String) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", promtool.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_with_connections_in_every_state() {
    let Some(promtool) = promtool() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool not found (set PROMTOOL or put it on PATH): CI must run this check"
        );
        eprintln!("skipped: promtool not found (set PROMTOOL or put it on PATH)");
        return;
    };

    let rig = Rig::new().await;
    let metrics_port = free_port();
    rig.write_config(&Opts {
        metrics_port: Some(metrics_port),
        ..Opts::default()
    });
    // One site per fault, so each connection lands in its own state.
    for site in ["Retry", "Secret", "Reauth"] {
        rig.sim.add_client(site, CLIENT, SECRET, None);
    }
    rig.add("fine", SITE, false).await;
    rig.add_pending("waiting", SITE).await;
    rig.add("flaky", "Retry", false).await;
    rig.sim.inject("Retry", Fault::Html503, None);
    rig.add("rotated", "Secret", false).await;
    rig.sim
        .replace_secret("Secret", CLIENT, "another-secret", None)
        .unwrap();
    rig.add("revoked", "Reauth", false).await;
    rig.sim.revoke("Reauth", CLIENT).unwrap();
    rig.add("off", SITE, true).await;
    rig.cli(&["connection", "disable", "off"], None).await.ok();

    let mut d = rig.serve(None);
    d.ready().await;

    // Over the metrics listener's cap: the refused-connections counter moves.
    let addr = format!("127.0.0.1:{metrics_port}");
    let held: Vec<std::net::TcpStream> = (0..acutoken::daemon::listen::MAX_CONNECTIONS + 8)
        .filter_map(|_| std::net::TcpStream::connect(&addr).ok())
        .collect();
    assert!(!held.is_empty(), "no connection to {addr}");
    // Held until the daemon has accepted past its cap (the kernel's backlog
    // accepts them all first), then let go so /metrics can be fetched.
    eventually(
        "the metrics listener to refuse a connection over its cap",
        || d.logs().contains("too many open connections"),
    )
    .await;
    drop(held);

    // The store-derived gauges are recomputed every 15 s: wait for a page
    // with every state, both refresh outcomes and the refused counter.
    let url = format!("http://{addr}/metrics");
    let deadline = Instant::now() + WAIT + Duration::from_secs(30);
    let page = loop {
        let page = match http().get(&url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let missing: Vec<&str> = STATES
            .iter()
            .copied()
            .filter(|s| !page.contains(&format!("acutoken_connections{{state=\"{s}\"}} 1")))
            .chain(
                [
                    "acutoken_refreshes_total{",
                    "acutoken_refresh_duration_seconds_bucket{",
                    "acutoken_time_to_deadline_seconds{",
                    "acutoken_http_connections_refused_total{",
                    "acutoken_refreshes_in_flight ",
                    "acutoken_refreshes_ready ",
                    "acutoken_nearest_deadline_seconds ",
                ]
                .into_iter()
                .filter(|m| !page.contains(m)),
            )
            .collect();
        if missing.is_empty() {
            break page;
        }
        assert!(
            Instant::now() < deadline,
            "the page never showed {missing:?}:\n{page}\n--- daemon log:\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    let (ok, said) = lint(&promtool, &page);
    assert!(
        ok && said.trim().is_empty(),
        "promtool check metrics objects:\n{said}\n--- the page:\n{page}"
    );
    // No series but a histogram's may carry `le`.
    for line in page.lines().filter(|l| l.contains("le=\"")) {
        assert!(
            line.starts_with("acutoken_refresh_duration_seconds_bucket{"),
            "an `le` label outside a histogram: {line}"
        );
    }

    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(d.exit().await.code(), Some(0));
}
