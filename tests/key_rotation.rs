//! Key rotation while the daemon runs (issue 12, item 6): `key rotate` goes
//! through the daemon, which re-seals in short steps while refreshes and
//! token requests go on, and nothing is lost.

mod support_daemon;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use acutoken::crypto::{Key, KeySource, Keyring};
use acutoken::daemon::client::call;
use acutoken::store::connections::SecretColumn;
use acutoken::store::{Create, Store};
use nix::sys::signal::Signal;
use support_daemon::{CLIENT, Rig, SECRET, eventually, free_port};

const CONNECTIONS: usize = 30;

fn site(i: usize) -> String {
    format!("Site{i}")
}

fn name(i: usize) -> String {
    format!("c{i}")
}

/// The store opened with `key` alone: only what is sealed under it opens.
fn open_with(rig: &Rig, key: &Key) -> Store {
    Store::open(
        &rig.store_path(),
        Keyring::new(key.clone(), Vec::new()),
        Create::No,
    )
    .unwrap()
}

async fn new_key(rig: &Rig) -> (std::path::PathBuf, Key) {
    let path = rig.path("new.key");
    rig.cli(&["key", "generate", "--out", path.to_str().unwrap()], None)
        .await
        .ok();
    let key = Key::from_file(&path, KeySource::File(path.clone())).unwrap();
    (path, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotate_through_a_running_daemon_under_load_loses_nothing() {
    let rig = Arc::new(Rig::new().await);
    for i in 0..CONNECTIONS {
        // One site per connection: the simulator's current token of each
        // site is that connection's, unambiguously.
        rig.sim.add_client(&site(i), CLIENT, SECRET, None);
        // Slow answers keep refreshes in flight while the rotation runs.
        rig.sim.set_latency(&site(i), Duration::from_millis(300));
        // Due at once: the daemon refreshes all of them as it starts.
        rig.add(&name(i), &site(i), false).await;
    }
    let old_key_path = rig.path("acutoken.key");
    let old_key = Key::from_file(&old_key_path, KeySource::File(old_key_path.clone())).unwrap();
    let (new_path, new) = new_key(&rig).await;

    let mut d = rig.serve(None);
    d.ready().await;
    // Token requests through the API, all the while.
    let socket = rig.socket();
    let requests = tokio::spawn(async move {
        let mut answers = Vec::new();
        for round in 0..8 {
            for i in (0..CONNECTIONS).rev() {
                let path = format!("/v1/connections/{}/token", name((i + round) % CONNECTIONS));
                let a = call(&socket, "GET", &path, Duration::from_secs(60))
                    .await
                    .unwrap_or_else(|e| panic!("GET {path}: {e}"));
                answers.push((
                    path,
                    a.status,
                    a.retry_after,
                    String::from_utf8_lossy(&a.body).into_owned(),
                ));
            }
        }
        answers
    });
    eventually("refreshes in flight", || {
        (0..CONNECTIONS).any(|i| rig.sim.in_flight(&site(i)) > 0)
    })
    .await;

    let out = rig
        .cli(
            &[
                "key",
                "rotate",
                "--new-key-file",
                new_path.to_str().unwrap(),
            ],
            None,
        )
        .await;
    assert_eq!(out.code, Some(0), "{out:?}\nlogs:\n{}", d.logs());
    assert!(
        out.stdout
            .contains("nothing sealed under an old key remains"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("next: make") && out.stdout.contains("new.key"),
        "{out:?}"
    );

    // Every token request was answered, none with a failure of ours.
    for (path, status, retry_after, body) in requests.await.unwrap() {
        assert!(
            status == 200 || (status == 503 && retry_after.is_some()),
            "{path}: {status} {body}"
        );
    }
    // Each connection's stored refresh token opens under the new key alone
    // and is the one its site holds as current: nothing was lost or undone.
    eventually("every connection stored its current token", || {
        let st = open_with(&rig, &new);
        (0..CONNECTIONS).all(|i| {
            let id = st.get(&name(i)).unwrap().conn.id;
            let stored = st
                .secret(id, SecretColumn::RefreshToken)
                .unwrap_or_else(|e| panic!("{}: {e}", name(i)))
                .map(|s| s.expose().to_string());
            stored.is_some() && stored == rig.sim.current_refresh_token(&site(i), CLIENT)
        })
    })
    .await;
    {
        let st = open_with(&rig, &new);
        let usage = st.sealed_key_usage().unwrap();
        assert!(
            usage.iter().all(|(id, _)| id == new.id()),
            "values sealed under another key remain: {usage:?}"
        );
        assert_eq!(st.registered_key_ids().unwrap(), vec![new.id().to_string()]);
        for i in 0..CONNECTIONS {
            let id = st.get(&name(i)).unwrap().conn.id;
            st.secret(id, SecretColumn::ClientSecret).unwrap();
            st.secret(id, SecretColumn::AccessToken).unwrap();
        }
    }
    assert_eq!(rig.sim.total_replays(), 0);

    // The daemon goes on serving on the new key.
    let out = rig.cli(&["connection", "refresh", &name(0)], None).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let out = rig.cli(&["token", &name(1)], None).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    d.signal(Signal::SIGTERM);
    assert_eq!(d.exit().await.code(), Some(0), "{}", d.logs());

    // Started again with the old key, it refuses, saying why.
    let mut d = rig.serve(None);
    let code = d.exit().await.code();
    assert_ne!(code, Some(0));
    assert!(
        d.logs().contains("was retired from the store") && d.logs().contains("acutoken key rotate"),
        "{}",
        d.logs()
    );
    assert!(open_with_old_refused(&rig, &old_key));

    // With the new key where it is looked for, it starts and serves.
    std::fs::copy(&new_path, &old_key_path).unwrap();
    std::fs::set_permissions(&old_key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut d = rig.serve(None);
    d.ready().await;
    let out = rig.cli(&["connection", "refresh", &name(2)], None).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(rig.sim.total_replays(), 0);
}

fn open_with_old_refused(rig: &Rig, old: &Key) -> bool {
    Store::open(
        &rig.store_path(),
        Keyring::new(old.clone(), Vec::new()),
        Create::No,
    )
    .is_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_is_refused_on_the_tcp_api_and_by_a_key_already_in_force() {
    let rig = Arc::new(Rig::new().await);
    rig.add("acme", support_daemon::SITE, true).await;
    let port = free_port();
    let token_file = rig.path("api.tokens");
    std::fs::write(&token_file, "t0ken-for-tests\n").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = rig.config_text(&support_daemon::Opts::default()).replace(
        "[api]\n",
        &format!(
            "[api]\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"{}\"\n",
            token_file.display()
        ),
    );
    std::fs::write(rig.config_path(), text).unwrap();
    let mut d = rig.serve(None);
    d.ready().await;

    // The key never travels over TCP, even with a valid bearer token.
    let (_, new) = new_key(&rig).await;
    let resp = support_daemon::http()
        .post(format!("http://127.0.0.1:{port}/v1/keys/rotate"))
        .bearer_auth("t0ken-for-tests")
        .json(&serde_json::json!({ "key": new.to_base64().expose(), "source": "x" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);

    // On the socket, only someone holding the store's key may replace it.
    let stranger = Key::generate();
    let body = serde_json::json!({
        "key": new.to_base64().expose(),
        "source": "x",
        "current": stranger.to_base64().expose(),
    })
    .to_string();
    let a = acutoken::daemon::client::call_with_body(
        &rig.socket(),
        "POST",
        "/v1/keys/rotate",
        Some(body.as_bytes()),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 403, "{}", String::from_utf8_lossy(&a.body));
    let registered = {
        let key_path = rig.path("acutoken.key");
        let key = Key::from_file(&key_path, KeySource::File(key_path.clone())).unwrap();
        open_with(&rig, &key).registered_key_ids().unwrap()
    };
    assert!(
        !registered.contains(&new.id().to_string()),
        "{registered:?}"
    );

    // The key in force already, with no old key left: nothing to do.
    let current = rig.path("acutoken.key");
    let out = rig
        .cli(
            &["key", "rotate", "--new-key-file", current.to_str().unwrap()],
            None,
        )
        .await;
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(out.stderr.contains("nothing to rotate"), "{out:?}");
    d.signal(Signal::SIGTERM);
    assert_eq!(d.exit().await.code(), Some(0), "{}", d.logs());
}
