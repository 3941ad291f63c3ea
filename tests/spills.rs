//! Spilled tokens (issue 12, items 4 and 5): a rotated token the store would
//! not take is spilled where the daemon looks, a spill file that cannot be
//! imported never stops `serve`, and `key rotate` re-seals what waits.

mod support_daemon;

use std::path::Path;
use std::sync::Arc;

use acutoken::model::State;
use support_daemon::{CLIENT, Opts, Rig, SITE, Sink, WAIT, eventually, spill_files};
use tokio::io::{AsyncBufReadExt, BufReader};

/// A `connection refresh` run by the CLI with no daemon, whose save the store
/// refuses (another process holds it locked), killed once it has spilled:
/// the rotated token then lives only in the spill file. Returns the token.
async fn cli_refresh_that_spills(rig: &Arc<Rig>, name: &str, spill_dir: &Path) -> String {
    rig.sim.hold_token_requests();
    let mut cli = rig.spawn_cli(&["connection", "refresh", name]);
    let deadline = std::time::Instant::now() + support_daemon::WAIT;
    while rig.sim.in_flight(SITE) != 1 {
        if std::time::Instant::now() > deadline || cli.try_wait().unwrap().is_some() {
            let out = cli.wait_with_output().await.unwrap();
            panic!(
                "the CLI's request never reached the server ({}, {} in flight): {}{}",
                out.status,
                rig.sim.in_flight(SITE),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let blocker = rusqlite::Connection::open(rig.store_path()).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    rig.sim.release_token_requests();
    // The save waits out the store's busy timeout (10 s), then spills.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    while spill_files(spill_dir).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no spill file appeared in {}",
            spill_dir.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    cli.kill().await.unwrap();
    blocker.execute_batch("ROLLBACK").unwrap();
    let rotated = rig.sim.current_refresh_token(SITE, CLIENT).unwrap();
    assert_ne!(
        rig.stored_refresh_token(name).as_deref(),
        Some(rotated.as_str()),
        "the store does not hold the rotated token yet"
    );
    rotated
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_the_cli_spilled_is_imported_by_a_daemon_with_a_runtime_directory() {
    let rig = Arc::new(Rig::new().await);
    rig.add("acme", SITE, true).await;
    // The CLI has no $RUNTIME_DIRECTORY: it spills into the configured
    // place, by default `pending/` beside the store.
    let rotated = cli_refresh_that_spills(&rig, "acme", &rig.path("pending")).await;

    // The daemon under systemd has one; it still finds the CLI's spill.
    let runtime = rig.path("run");
    std::fs::create_dir(&runtime).unwrap();
    let mut d = rig.serve_with_env(None, &[("RUNTIME_DIRECTORY", runtime.to_str().unwrap())]);
    d.ready().await;
    d.log_line("imported a spilled refresh token").await;
    assert_eq!(rig.stored_refresh_token("acme").unwrap(), rotated);
    assert!(spill_files(&rig.path("pending")).is_empty());
    assert_eq!(rig.row("acme").conn.state, State::Active);
    assert_eq!(rig.sim.total_replays(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spill_file_that_will_not_open_is_set_aside_and_alerted_and_serve_starts() {
    let rig = Arc::new(Rig::new().await);
    let sink = Sink::start().await;
    rig.write_config(&Opts {
        webhooks: sink.webhook_toml("ops"),
        ..Opts::default()
    });
    rig.add("acme", SITE, true).await;
    let pending = rig.path("pending");
    std::fs::create_dir(&pending).unwrap();
    std::fs::write(pending.join("broken.json"), "{\"attempt\": 12").unwrap();

    let mut d = rig.serve(None);
    d.ready().await;
    d.log_line("a spilled token cannot be imported; set aside")
        .await;
    assert!(pending.join("rejected").join("broken.json").exists());
    assert!(spill_files(&pending).is_empty());
    eventually("the store_write_failed alert", || {
        sink.received("ops").iter().any(|m| {
            m["kind"] == "store_write_failed"
                && m["status"] == "firing"
                && m["summary"].as_str().unwrap_or("").contains("rejected")
        })
    })
    .await;
    // The daemon serves: a refresh works.
    let out = rig.cli(&["connection", "refresh", "acme"], None).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(d.exit().await.code(), Some(0));

    // Dealt with, the alert resolves at the next start.
    std::fs::remove_file(pending.join("rejected").join("broken.json")).unwrap();
    // One message per kind and channel per group_interval: shorten it.
    let mut d = rig.serve_with_env(None, &[("ACUTOKEN__ALERTS__GROUP_INTERVAL", "1s")]);
    d.ready().await;
    let deadline = std::time::Instant::now() + support_daemon::WAIT;
    while !sink
        .received("ops")
        .iter()
        .any(|m| m["kind"] == "store_write_failed" && m["status"] == "resolved")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no resolved alert; got {:?}; logs:\n{}",
            sink.received("ops"),
            d.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotate_reseals_waiting_spills_with_the_daemon_running_and_stopped() {
    let rig = Arc::new(Rig::new().await);
    rig.add("acme", SITE, true).await;
    let pending = rig.path("pending");
    let rotated = cli_refresh_that_spills(&rig, "acme", &pending).await;
    // Set aside (as the daemon does with a spill it cannot import): it
    // waits there for the operator, and a rotation must re-seal it too.
    let spill = spill_files(&pending).pop().unwrap();
    let aside = pending.join("rejected").join(spill.file_name().unwrap());
    std::fs::create_dir_all(aside.parent().unwrap()).unwrap();
    std::fs::rename(&spill, &aside).unwrap();

    let key_file = |name: &str| {
        let p = rig.path(name);
        let r = rig.clone();
        async move {
            r.cli(&["key", "generate", "--out", p.to_str().unwrap()], None)
                .await
                .ok();
            p
        }
    };
    // A daemon running: the rotation goes through it.
    let new_key = key_file("new.key").await;
    {
        let mut d = rig.serve(None);
        d.ready().await;
        let out = rig
            .cli(
                &["key", "rotate", "--new-key-file", new_key.to_str().unwrap()],
                None,
            )
            .await
            .ok();
        assert!(out.stdout.contains("re-sealed 1 spilled token"), "{out:?}");
        d.signal(nix::sys::signal::Signal::SIGTERM);
        assert_eq!(d.exit().await.code(), Some(0));
    }
    // Only the new key opens the store now, and the spill too.
    std::fs::copy(&new_key, rig.path("acutoken.key")).unwrap();
    std::fs::rename(&aside, &spill).unwrap();
    {
        let mut d = rig.serve(None);
        d.ready().await;
        d.log_line("imported a spilled refresh token").await;
        d.signal(nix::sys::signal::Signal::SIGTERM);
        assert_eq!(d.exit().await.code(), Some(0));
    }
    assert_eq!(rig.stored_refresh_token("acme").unwrap(), rotated);

    // The daemon stopped: the CLI rotates on its own.
    let rotated = cli_refresh_that_spills(&rig, "acme", &pending).await;
    let newer_key = key_file("newer.key").await;
    let out = rig
        .cli(
            &[
                "key",
                "rotate",
                "--new-key-file",
                newer_key.to_str().unwrap(),
            ],
            None,
        )
        .await
        .ok();
    assert!(out.stdout.contains("re-sealed 1 spilled token"), "{out:?}");
    std::fs::copy(&newer_key, rig.path("acutoken.key")).unwrap();
    let mut d = rig.serve(None);
    d.ready().await;
    d.log_line("imported a spilled refresh token").await;
    assert_eq!(rig.stored_refresh_token("acme").unwrap(), rotated);
    assert_eq!(rig.sim.total_replays(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotate_waits_for_a_refresh_in_flight_and_loses_nothing() {
    let rig = Arc::new(Rig::new().await);
    rig.add("acme", SITE, true).await;
    let new_key = rig.path("new.key");
    rig.cli(
        &["key", "generate", "--out", new_key.to_str().unwrap()],
        None,
    )
    .await
    .ok();
    rig.sim.hold_token_requests();
    let r = rig.clone();
    let refresh =
        tokio::spawn(async move { r.cli(&["connection", "refresh", "acme"], None).await });
    eventually("the CLI's request in flight", || {
        rig.sim.in_flight(SITE) == 1
    })
    .await;
    let mut rotate = rig.spawn_cli(&["key", "rotate", "--new-key-file", new_key.to_str().unwrap()]);
    // The rotation must not run under the request: it says it waits (a
    // rotation that did not wait would have finished by now).
    let mut err = BufReader::new(rotate.stderr.take().unwrap()).lines();
    let said = tokio::time::timeout(WAIT, err.next_line())
        .await
        .expect("key rotate says it waits, or ends")
        .unwrap()
        .unwrap_or_default();
    assert!(
        said.contains("waiting for the refresh of `acme` in flight"),
        "{said}"
    );
    rig.sim.release_token_requests();
    let out = refresh.await.unwrap();
    assert_eq!(out.code, Some(0), "{out:?}");
    let status = tokio::time::timeout(WAIT, rotate.wait())
        .await
        .expect("key rotate ends once the refresh is saved")
        .unwrap();
    assert!(status.success());

    std::fs::copy(&new_key, rig.path("acutoken.key")).unwrap();
    let stored = rig.stored_refresh_token("acme").unwrap();
    assert_eq!(
        rig.sim.current_refresh_token(SITE, CLIENT).as_deref(),
        Some(stored.as_str()),
        "the rotated token is stored and opens under the new key"
    );
    let out = rig.cli(&["connection", "refresh", "acme"], None).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(rig.sim.total_replays(), 0);
}
