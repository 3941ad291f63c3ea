//! Faults from outside: an identity server that hangs, drips or floods; a store
//! whose filesystem fills up at the moment a rotated token arrives (in the
//! engine and in the real daemon across a restart); a store locked by another
//! process past the busy timeout; a webhook that resets connections. Also
//! replays the inputs that once crashed a fuzz target (`tests/regressions/`).
//!
//! Tests that mount a tmpfs need root (or CAP_SYS_ADMIN); without it they say
//! so on stderr and pass, and `.ci/run` runs as root.

mod alerts_support;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use acutoken::acumatica::TokenClient;
use acutoken::alerts::{self, AlertFacts, AlertKind};
use acutoken::clock::{self, Clock};
use acutoken::config::{ChannelKind, Config, WebhookConfig};
use acutoken::crypto::{Key, KeySource, Keyring, write_key_file};
use acutoken::model::NewConnection;
use acutoken::model::{Connection, Mode, Severity, State};
use acutoken::renewal::engine::{Engine, EngineParts, NoHooks, Trigger};
use acutoken::renewal::{client_settings, planning};
use acutoken::secret::Secret;
use acutoken::sim::{Fault, Simulator};
use acutoken::store::StoreHandle;
use acutoken::store::claims::Owner;
use acutoken::store::connections::{self, SecretColumn};
use acutoken::store::{Create, Store};
use alerts_support::{Reply, Sink};
use uuid::Uuid;

const SITE: &str = "AcumaticaERP";

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `"4m"`), or `None` when mounting is not permitted.
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "skipped: cannot mount a tmpfs here (needs root); this fault is not exercised"
            );
            return None;
        }
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a filler file until the filesystem is full.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.path().join("filler")).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        // Whatever half-page is left must not take a WAL frame either.
        let _ = f.flush();
    }

    fn free(&self) {
        std::fs::remove_file(self.path().join("filler")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

async fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A connection with a live grant at the simulator, due for a refresh now.
fn add_due(store: &mut Store, sim: &Simulator, name: &str) -> (Uuid, String, String) {
    let now = clock::SystemClock.now();
    let client_id = format!(
        "{}@Tenant {name}",
        Uuid::new_v4().to_string().to_uppercase()
    );
    let secret = format!("CS-{name}-{}", Uuid::new_v4());
    sim.add_client(SITE, &client_id, &secret, None);
    let issued = now - chrono::Duration::days(2);
    let rt = sim.issue_grant(SITE, &client_id, issued).unwrap();
    let mut conn = Connection {
        id: Uuid::new_v4(),
        name: name.into(),
        instance: sim.instance(SITE),
        client_id: client_id.clone(),
        labels: BTreeMap::new(),
        mode: Mode::Absolute,
        lifetime: Duration::from_secs(30 * 86400),
        absolute_lifetime: None,
        secret_expires_at: None,
        grant_issued_at: Some(issued),
        refresh_token_issued_at: Some(issued),
        access_expires_at: None,
        deadline: None,
        deadline_source: None,
        next_refresh_at: None,
        last_refresh_at: None,
        last_error: None,
        state: State::Active,
    };
    planning::initial(&mut conn, true, &Config::default().renewal.policy(), now);
    conn.next_refresh_at = Some(now - chrono::Duration::minutes(1));
    let id = conn.id;
    let new = NewConnection {
        conn,
        client_secret: Some(Secret::new(secret)),
        refresh_token: Some(Secret::new(rt.clone())),
    };
    store
        .write(|tx, kr| connections::insert(tx, kr, &new, now))
        .unwrap();
    (id, client_id, rt)
}

fn engine_config(http_timeout: Duration) -> Config {
    let mut c = Config::default();
    c.acumatica.allow_insecure_loopback = true;
    c.renewal.http_timeout = http_timeout;
    c
}

fn engine(path: &Path, keyring: &Keyring, config: &Config, spill: PathBuf) -> Arc<Engine> {
    let store =
        StoreHandle::from_store(Store::open(path, keyring.clone(), Create::No).unwrap()).unwrap();
    Arc::new(Engine::new(EngineParts {
        store,
        client: TokenClient::new(client_settings(config)).unwrap(),
        policy: config.renewal.policy(),
        clock: clock::system(),
        owner: Owner::current("serve"),
        http_timeout: config.renewal.http_timeout,
        spill_dir: Some(spill),
        limits: acutoken::renewal::limits::Limits::new(16, 2),
        hooks: Arc::new(NoHooks),
    }))
}

fn stored_refresh_token(path: &Path, keyring: &Keyring, id: Uuid) -> String {
    let st = Store::open(path, keyring.clone(), Create::No).unwrap();
    st.secret(id, SecretColumn::RefreshToken)
        .unwrap()
        .unwrap()
        .expose()
        .to_string()
}

/// The peak resident memory of this process, in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_hangs_drips_or_floods_fails_transiently_and_keeps_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("acutoken.db");
    let keyring = Keyring::new(Key::generate(), vec![]);
    let sim = Simulator::start(clock::system()).await.unwrap();
    let mut st = Store::open(&path, keyring.clone(), Create::Yes).unwrap();
    let config = engine_config(Duration::from_secs(2));
    let eng = engine(&path, &keyring, &config, dir.path().join("pending"));
    for fault in [Fault::Hang, Fault::Drip, Fault::Huge] {
        let name = fault.name();
        let (id, client_id, rt) = add_due(&mut st, &sim, name);
        sim.inject(SITE, fault.clone(), Some(1));
        let peak = peak_rss_kib();
        // The bound only ends the test if the request never ends; the client's own
        // timeout (2 s) is what must end it.
        let rep = tokio::time::timeout(Duration::from_secs(60), eng.refresh(id, Trigger::OnDemand))
            .await
            .unwrap_or_else(|_| panic!("{name}: the request outlived the http timeout"))
            .unwrap();
        assert_eq!(rep.outcome, "failed", "{name}: {rep:?}");
        assert_eq!(rep.state, State::Retrying, "{name}: a transient failure");
        let row = st.get_by_id(id).unwrap().unwrap();
        assert!(row.claim.is_none(), "{name}: the claim is released");
        assert!(
            row.conn
                .next_refresh_at
                .is_some_and(|t| t < row.conn.deadline.unwrap()),
            "{name}: retried before the deadline"
        );
        let why = row.conn.last_error.unwrap_or_default();
        assert!(
            !why.contains("drip-drip") && !why.contains('\n'),
            "{name}: {why}"
        );
        assert_eq!(
            stored_refresh_token(&path, &keyring, id),
            rt,
            "{name}: the token is kept"
        );
        assert!(
            sim.refresh_token_alive(SITE, &rt),
            "{name}: and still alive at the server"
        );
        if matches!(fault, Fault::Huge) {
            let grown = peak_rss_kib().saturating_sub(peak);
            assert!(
                grown < 48 * 1024,
                "a 100 MB answer raised peak memory by {grown} KiB"
            );
        }
        // The next try uses the same token, once, and succeeds.
        let rep = eng.refresh(id, Trigger::OnDemand).await.unwrap();
        assert_eq!(rep.outcome, "refreshed", "{name}: {rep:?}");
        let now_stored = stored_refresh_token(&path, &keyring, id);
        assert_eq!(
            sim.current_refresh_token(SITE, &client_id).as_deref(),
            Some(now_stored.as_str())
        );
    }
    assert_eq!(sim.total_replays(), 0, "no refresh token was sent twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_filesystem_when_a_rotated_token_arrives_holds_spills_and_saves_it_later() {
    let Some(fs) = Tmpfs::mount("2m") else { return };
    let run = tempfile::tempdir().unwrap();
    let spill = run.path().join("pending");
    let path = fs.path().join("acutoken.db");
    let keyring = Keyring::new(Key::generate(), vec![]);
    let sim = Simulator::start(clock::system()).await.unwrap();
    let mut st = Store::open(&path, keyring.clone(), Create::Yes).unwrap();
    let (id, client_id, old) = add_due(&mut st, &sim, "full");
    let (other, _, _) = add_due(&mut st, &sim, "other");
    drop(st);
    let eng = engine(
        &path,
        &keyring,
        &engine_config(Duration::from_secs(10)),
        spill.clone(),
    );

    sim.inject(SITE, Fault::Delay(Duration::from_millis(800)), Some(1));
    let e = eng.clone();
    let refresh = tokio::spawn(async move { e.refresh(id, Trigger::OnDemand).await });
    wait_for("the request to reach the server", 10, || {
        sim.in_flight(SITE) == 1
    })
    .await;
    let side = rusqlite::Connection::open(&path).unwrap();
    let _ = side.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    fs.fill();

    let err = refresh.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("could not be saved"), "{err}");
    let rotated = sim.current_refresh_token(SITE, &client_id).unwrap();
    assert_ne!(rotated, old);
    assert_eq!(eng.unsaved(), 1, "the rotated token is held in memory");
    assert!(eng.is_blocked());
    let spilled: Vec<_> = std::fs::read_dir(&spill).unwrap().flatten().collect();
    assert_eq!(spilled.len(), 1, "and spilled");
    let sealed = std::fs::read(spilled[0].path()).unwrap();
    assert!(
        !String::from_utf8_lossy(&sealed).contains(&rotated),
        "sealed, not clear text"
    );

    // No other refresh starts; the retry fails while the disk is full.
    let sent = sim.total_token_requests();
    assert!(eng.refresh(other, Trigger::OnDemand).await.is_err());
    assert!(!eng.retry_unsaved().await, "still full");
    assert_eq!(
        sim.total_token_requests(),
        sent,
        "nothing was sent while a token is unsaved"
    );

    fs.free();
    assert!(eng.retry_unsaved().await, "saved once there is room");
    assert!(!eng.is_blocked());
    assert_eq!(stored_refresh_token(&path, &keyring, id), rotated);
    assert!(
        std::fs::read_dir(&spill).unwrap().next().is_none(),
        "the spill is removed once saved"
    );
    let st = Store::open(&path, keyring.clone(), Create::No).unwrap();
    st.integrity_check().unwrap();
    assert_eq!(
        eng.refresh(other, Trigger::OnDemand).await.unwrap().outcome,
        "refreshed"
    );
    assert_eq!(
        eng.refresh(id, Trigger::OnDemand).await.unwrap().outcome,
        "refreshed",
        "the saved token works"
    );
    assert_eq!(sim.total_replays(), 0, "the old token was never resent");
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Daemon {
    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.0.id() as i32)
    }

    /// Waits (bounded) for the process to exit; returns its status and stderr.
    async fn exit(mut self, secs: u64) -> (std::process::ExitStatus, String) {
        let end = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = self.0.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return (status, err);
            }
            assert!(
                tokio::time::Instant::now() < end,
                "the daemon did not exit within {secs} s"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

fn acutoken(cfg: &Path, runtime: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_acutoken"));
    c.arg("-c")
        .arg(cfg)
        .env_remove("ACUTOKEN_KEY")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("STATE_DIRECTORY")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("ACUTOKEN_CONFIG")
        .env("RUNTIME_DIRECTORY", runtime)
        .stdin(Stdio::null());
    c
}

fn serve(cfg: &Path, runtime: &Path) -> Daemon {
    Daemon(
        acutoken(cfg, runtime)
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_keeps_a_token_it_cannot_save_across_a_restart_and_imports_it_once_writable() {
    let Some(fs) = Tmpfs::mount("2m") else { return };
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("run");
    std::fs::create_dir(&runtime).unwrap();
    let path = fs.path().join("acutoken.db");
    let key_file = dir.path().join("acutoken.key");
    write_key_file(&key_file, &Key::generate()).unwrap();
    let keyring = Keyring::new(Key::from_file(&key_file, KeySource::Env).unwrap(), vec![]);
    let sim = Simulator::start(clock::system()).await.unwrap();
    let sink = Sink::start().await;
    let mut st = Store::open(&path, keyring.clone(), Create::Yes).unwrap();
    let (id, client_id, old) = add_due(&mut st, &sim, "kept");
    drop(st);
    let cfg = dir.path().join("acutoken.toml");
    std::fs::write(
        &cfg,
        format!(
            "[store]\npath = \"{}\"\nkey_file = \"{}\"\n[api]\nsocket = \"{}\"\n[acumatica]\nallow_insecure_loopback = true\n\
             [renewal]\nhttp_timeout = \"5s\"\n[serve]\nshutdown_timeout = \"10s\"\n\
             [[alerts.webhooks]]\nname = \"ops\"\nkind = \"generic\"\nurl = \"{}\"\n",
            path.display(),
            key_file.display(),
            dir.path().join("acutoken.sock").display(),
            sink.url("ops"),
        ),
    )
    .unwrap();

    sim.inject(SITE, Fault::Delay(Duration::from_millis(1500)), Some(1));
    let daemon = serve(&cfg, &runtime);
    wait_for("the refresh to reach the server", 20, || {
        sim.in_flight(SITE) == 1
    })
    .await;
    let side = rusqlite::Connection::open(&path).unwrap();
    let _ = side.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
    drop(side);
    fs.fill();

    // The rotated token arrives and cannot be saved: spilled, and said so directly.
    let spill = runtime.join("pending");
    wait_for("the spill", 20, || {
        std::fs::read_dir(&spill).is_ok_and(|mut d| d.next().is_some())
    })
    .await;
    let alert = sink.wait_for("ops", 1).await;
    assert!(
        alert.iter().any(|r| r.json()["kind"] == "store_write_failed" && r.json()["severity"] == "critical"),
        "a critical store_write_failed went out directly: {:?}",
        alert.iter().map(|r| r.text()).collect::<Vec<_>>()
    );
    let rotated = sim.current_refresh_token(SITE, &client_id).unwrap();
    assert_ne!(rotated, old);

    // A stop while the token is unsaved never exits 0.
    nix::sys::signal::kill(daemon.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
    let (status, stderr) = daemon.exit(60).await;
    assert!(!status.success(), "exited 0 with an unsaved token");
    assert!(stderr.contains("could not be saved"), "{stderr}");
    assert!(
        std::fs::read_dir(&spill).unwrap().next().is_some(),
        "the spill outlives the process"
    );

    // A restart while the store is still full does not start refreshing and
    // does not lose the spilled token.
    let (status, stderr) = serve(&cfg, &runtime).exit(60).await;
    assert!(
        !status.success(),
        "started although the spilled token cannot be imported: {stderr}"
    );
    assert!(stderr.contains("full"), "the error says why: {stderr}");
    assert!(
        std::fs::read_dir(&spill).unwrap().next().is_some(),
        "the spill is kept"
    );
    assert_eq!(sim.token_requests(SITE), 1, "nothing else was sent");

    // Room again: the next start imports it, and it is the one used next.
    fs.free();
    let daemon = serve(&cfg, &runtime);
    wait_for("the import", 20, || {
        std::fs::read_dir(&spill).is_ok_and(|mut d| d.next().is_none())
    })
    .await;
    assert_eq!(
        stored_refresh_token(&path, &keyring, id),
        rotated,
        "the spilled token was imported"
    );
    let out = acutoken(&cfg, &runtime)
        .args(["connection", "refresh", "kept"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sim.token_requests(SITE), 2);
    assert_eq!(sim.total_replays(), 0, "the old token was never resent");
    assert!(sim.refresh_token_alive(SITE, &stored_refresh_token(&path, &keyring, id)));
    nix::sys::signal::kill(daemon.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
    let (status, stderr) = daemon.exit(60).await;
    assert!(status.success(), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_command_on_a_store_locked_past_the_busy_timeout_fails_clearly_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("acutoken.db");
    let key_file = dir.path().join("acutoken.key");
    write_key_file(&key_file, &Key::generate()).unwrap();
    let keyring = Keyring::new(Key::from_file(&key_file, KeySource::Env).unwrap(), vec![]);
    let sim = Simulator::start(clock::system()).await.unwrap();
    let mut st = Store::open(&path, keyring.clone(), Create::Yes).unwrap();
    let (id, _, rt) = add_due(&mut st, &sim, "locked");
    drop(st);
    let cfg = dir.path().join("acutoken.toml");
    std::fs::write(
        &cfg,
        format!(
            "[store]\npath = \"{}\"\nkey_file = \"{}\"\n[api]\nsocket = \"{}\"\n[acumatica]\nallow_insecure_loopback = true\n",
            path.display(),
            key_file.display(),
            dir.path().join("acutoken.sock").display(),
        ),
    )
    .unwrap();
    let runtime = dir.path().join("run");
    std::fs::create_dir(&runtime).unwrap();

    // Another process holds the write lock for longer than the busy timeout.
    let blocker = rusqlite::Connection::open(&path).unwrap();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let (cfg2, runtime2) = (cfg.clone(), runtime.clone());
    let cli = move |args: &[&str]| {
        let out = acutoken(&cfg2, &runtime2).args(args).output().unwrap();
        (
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ref_status, ref_err, set_status, set_err) = tokio::task::spawn_blocking(move || {
        let (a, b) = cli(&["connection", "refresh", "locked"]);
        let (c, d) = cli(&["connection", "set", "locked", "--label", "customer=ACME"]);
        (a, b, c, d)
    })
    .await
    .unwrap();
    for (what, status, err) in [
        ("refresh", ref_status, &ref_err),
        ("set", set_status, &set_err),
    ] {
        assert!(!status.success(), "{what} succeeded on a locked store");
        assert!(
            err.contains("busy") || err.contains("locked"),
            "{what}: the error says why: {err}"
        );
        assert!(!err.contains("panicked"), "{what}: {err}");
    }
    assert_eq!(
        sim.total_token_requests(),
        0,
        "nothing was sent without a claim"
    );
    blocker.execute_batch("ROLLBACK").unwrap();
    drop(blocker);

    let st = Store::open(&path, keyring.clone(), Create::No).unwrap();
    let row = st.get_by_id(id).unwrap().unwrap();
    assert!(row.claim.is_none());
    assert!(row.conn.labels.is_empty(), "nothing was changed");
    assert_eq!(
        st.secret(id, SecretColumn::RefreshToken)
            .unwrap()
            .unwrap()
            .expose(),
        rt
    );
    drop(st);
    let out = acutoken(&cfg, &runtime)
        .args(["connection", "refresh", "locked"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "works once the lock is gone: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sim.total_replays(), 0);
}

/// A webhook endpoint that accepts each connection and resets it at once.
async fn resetting_endpoint() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // Linger 0: close() sends RST instead of FIN, and never blocks
            // (the deprecation warns about a non-zero linger).
            #[allow(deprecated)]
            let _ = sock.set_linger(Some(Duration::ZERO));
            drop(sock);
        }
    });
    (
        format!("http://127.0.0.1:{port}/hook/reset?token=URLSECRET-reset"),
        accepted,
    )
}

fn channel(name: &str, url: String) -> WebhookConfig {
    WebhookConfig {
        name: name.into(),
        kind: ChannelKind::Generic,
        url: Some(Secret::new(url)),
        url_file: None,
        min_severity: Severity::Warning,
        secret: None,
        secret_file: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_that_resets_or_hangs_does_not_keep_alerts_from_other_channels() {
    let sink = Sink::start().await;
    sink.set_default("hang", Reply::Hang);
    let (reset_url, resets) = resetting_endpoint().await;
    let cfg = alerts_support::config(vec![
        channel("reset", reset_url),
        alerts_support::webhook(&sink, "hang", ChannelKind::Generic, Severity::Warning),
        alerts_support::webhook(&sink, "ok", ChannelKind::Generic, Severity::Warning),
    ]);
    // The direct path (store_write_failed): every channel is tried, the good one gets it.
    let facts =
        AlertFacts::store_write_failed(Some(("acme", Uuid::new_v4())), "database or disk is full");
    let results = tokio::time::timeout(Duration::from_secs(120), alerts::send_direct(&cfg, &facts))
        .await
        .expect("a hanging channel is bounded by the webhook timeout");
    let by_name: BTreeMap<_, _> = results
        .iter()
        .map(|r| (r.channel.clone(), r.error.clone()))
        .collect();
    assert_eq!(by_name.len(), 3, "{by_name:?}");
    assert!(by_name["ok"].is_none(), "{by_name:?}");
    let reset_err = by_name["reset"].clone().expect("a reset is an error");
    assert!(by_name["hang"].is_some());
    assert!(resets.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    for e in by_name.values().flatten() {
        assert!(!e.contains("URLSECRET"), "a webhook URL is a secret: {e}");
    }
    assert!(!reset_err.is_empty());
    assert!(
        results.iter().all(|r| r.host.starts_with("127.0.0.1")),
        "channels are named by host: {results:?}"
    );
    let got = sink.wait_for("ok", 1).await;
    assert_eq!(got[0].json()["kind"], AlertKind::StoreWriteFailed.as_str());

    // The delivery worker (through the outbox): the good channel gets each alert
    // while the resetting one keeps failing.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("acutoken.db");
    let key = Key::generate();
    let mut store = alerts_support::open_store(&path, &key);
    let now = chrono::Utc::now();
    let ids = alerts_support::insert(
        &mut store,
        vec![alerts_support::connection("one", now)],
        now,
    );
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(cfg.clone()));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let wake = alerts::Wake::new();
    let worker = tokio::spawn(alerts::run(
        alerts_support::open_store(&path, &key),
        rx,
        clock::system(),
        shutdown.clone(),
        wake.clone(),
        acutoken::store::replicas::Duty::always(),
    ));
    let before = resets.load(std::sync::atomic::Ordering::SeqCst);
    alerts_support::set_state(&mut store, &ids, State::NeedsSecret, None, now);
    wake.poke();
    let got = sink.wait_for("ok", 2).await;
    assert_eq!(got[1].json()["kind"], "needs_secret");
    wait_for("the resetting channel to be tried", 20, || {
        resets.load(std::sync::atomic::Ordering::SeqCst) > before
    })
    .await;
    let health = alerts::channel_health(&store, &cfg).unwrap();
    let reset = health.iter().find(|h| h.name == "reset").unwrap();
    assert!(reset.undelivered >= 1, "kept for a later try: {health:?}");
    shutdown.cancel();
    worker.await.unwrap().unwrap();
    alerts_support::assert_clean("the logs", &alerts_support::logs(), &[]);
}

/// Inputs that once made a fuzz target fail, kept so the bug stays fixed. The
/// byte-level targets are replayed here with the same properties; all of them
/// are also replayed by `.ci/fuzz`.
#[test]
fn fuzz_regressions_stay_fixed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/regressions");
    let inputs = |target: &str| -> Vec<(PathBuf, String)> {
        let Ok(dir) = std::fs::read_dir(root.join(target)) else {
            return Vec::new();
        };
        let mut v: Vec<_> = dir
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .map(|p| {
                (
                    p.clone(),
                    String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned(),
                )
            })
            .collect();
        v.sort();
        v
    };
    for (p, text) in inputs("instance_normalize") {
        match acutoken::acumatica::normalize(&text) {
            Ok(out) => {
                assert_eq!(
                    acutoken::acumatica::normalize(&out).as_deref(),
                    Ok(out.as_str()),
                    "{}",
                    p.display()
                );
                assert!(
                    url::Url::parse(&format!("https://{out}/identity/connect/token")).is_ok(),
                    "{}",
                    p.display()
                );
            }
            Err(e) => assert!(
                !e.to_string().chars().any(char::is_control),
                "{}",
                p.display()
            ),
        }
    }
    for (_, text) in inputs("config_toml") {
        let _ = Config::from_toml_str(&text).map(|c| c.masked_toml());
    }
    for (p, text) in inputs("callback_query") {
        let q = acutoken::daemon::callback::parse_query(Some(&text));
        assert_eq!(
            q,
            acutoken::daemon::callback::parse_query(Some(&text)),
            "{}",
            p.display()
        );
    }
}
