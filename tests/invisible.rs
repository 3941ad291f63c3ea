//! Issue 12, item 11: a claim held by a process the daemon cannot see is not
//! a dead claim. Under systemd the daemon runs as `acutoken` with
//! `ProtectProc=invisible`, so a `connection refresh` an operator runs as
//! root is hidden from it. Taking that claim for orphaned would send the
//! same refresh token a second time. Here the daemon runs as `nobody` on a
//! `/proc` mounted `hidepid=invisible` (what `ProtectProc=invisible` does),
//! in a mount namespace of its own; the CLI runs as root.

mod support_daemon;

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use acutoken::daemon::client::call;
use support_daemon::{Rig, SITE, WAIT, eventually};

fn chown_all(dir: &std::path::Path, uid: u32) {
    nix::unistd::chown(dir, Some(uid.into()), Some(uid.into())).unwrap();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        nix::unistd::chown(&e.path(), Some(uid.into()), Some(uid.into())).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_by_a_process_the_daemon_cannot_see_is_waited_out() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test mounts a private /proc and runs the daemon as nobody: run it as root (CI does)"
    );
    let rig = Arc::new(Rig::new().await);
    rig.add("acme", SITE, false).await;
    chown_all(rig.dir.path(), 65534);

    // Root's CLI refresh, held in flight: its claim is live.
    rig.sim.hold_token_requests();
    let r = rig.clone();
    let cli = tokio::spawn(async move { r.cli(&["connection", "refresh", "acme"], None).await });
    eventually("the CLI's request in flight", || {
        rig.sim.in_flight(SITE) == 1
    })
    .await;

    let log = rig.path("serve-invisible.log");
    let out = std::fs::File::create(&log).unwrap();
    let script = format!(
        "mount -t proc -o hidepid=invisible proc /proc && exec setpriv --reuid=65534 --regid=65534 --clear-groups {} -c {} serve",
        env!("CARGO_BIN_EXE_acutoken"),
        rig.config_path().display()
    );
    let mut daemon = tokio::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .current_dir(rig.dir.path())
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Ok(Some(s)) = daemon.try_wait() {
            panic!("the daemon exited ({s}): {}", logs());
        }
        if let Ok(a) = call(&rig.socket(), "GET", "/readyz", Duration::from_secs(2)).await
            && a.status == 200
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not ready: {}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The daemon is asked to refresh it: the claim's owner exists but cannot
    // be seen, so the answer is "busy" and nothing is sent.
    let a = call(
        &rig.socket(),
        "POST",
        "/v1/connections/acme/refresh",
        Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "the refresh through the daemon did not answer ({e}): {}",
            logs()
        )
    });
    let body = String::from_utf8_lossy(&a.body).into_owned();
    assert_eq!(a.status, 409, "{body}");
    assert!(
        body.contains("\"busy\"") && body.contains("acutoken cli"),
        "{body}"
    );
    assert_eq!(rig.sim.in_flight(SITE), 1, "no second request");

    rig.sim.release_token_requests();
    let out = cli.await.unwrap();
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(rig.sim.token_requests(SITE), 1);
    assert_eq!(rig.sim.total_replays(), 0, "the token was never sent twice");
    let _ = daemon.start_kill();
}
