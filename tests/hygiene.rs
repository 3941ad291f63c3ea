//! Secret hygiene: a full scenario with the real binary at `log.level =
//! "debug"`, failures included, then every byte acutoken wrote or sent is
//! searched for every secret and token involved. Also: the daemon marks itself
//! non-dumpable, so no core dump or ptrace by its own user can read tokens.

mod alerts_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use acutoken::clock::{self, Clock};
use acutoken::crypto::{Key, KeySource, Keyring, write_key_file};
use acutoken::model::State;
use acutoken::sim::{Fault, Simulator};
use acutoken::store::connections::SecretColumn;
use acutoken::store::{Create, Store};
use alerts_support::{Reply, Sink};
use uuid::Uuid;

const SIGNING_SECRET: &str = "SIGNSECRET-5d1c8e0a7b";

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Rig {
    dir: tempfile::TempDir,
    keyring: Keyring,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("acutoken.key");
        write_key_file(&key_file, &Key::generate()).unwrap();
        let keyring = Keyring::new(Key::from_file(&key_file, KeySource::Env).unwrap(), vec![]);
        std::fs::create_dir(dir.path().join("run")).unwrap();
        Rig { dir, keyring }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_acutoken"));
        c.arg("-c")
            .arg(self.path("acutoken.toml"))
            .env_remove("ACUTOKEN_KEY")
            .env_remove("ACUTOKEN_CONFIG")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("STATE_DIRECTORY")
            .env_remove("NOTIFY_SOCKET")
            .env("RUNTIME_DIRECTORY", self.path("run"))
            .stdin(Stdio::null());
        c
    }

    fn cli(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    fn store(&self) -> Store {
        Store::open(&self.path("acutoken.db"), self.keyring.clone(), Create::No).unwrap()
    }

    fn row_state(&self, name: &str) -> Option<State> {
        self.store().get(name).ok().map(|r| r.conn.state)
    }

    fn secret(&self, name: &str, col: SecretColumn) -> Option<String> {
        let st = self.store();
        let id = st.get(name).ok()?.conn.id;
        st.secret(id, col).unwrap().map(|s| s.expose().to_string())
    }
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files(&p));
            } else if p.is_file() {
                out.push(p);
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_token_appears_in_any_output_file_or_webhook_body() {
    let rig = Rig::new();
    let sim = Simulator::start(clock::system()).await.unwrap();
    let sink = Sink::start().await;
    sink.set_default("broken", Reply::Status(500));
    let mut secrets: Vec<(String, String)> = Vec::new();

    // Four connections, each on its own site: one healthy, one whose secret is
    // refused, one whose grant is revoked, one whose instance fails with 500s
    // whose bodies echo the submitted secret and token.
    let mut records = Vec::new();
    let mut clients = Vec::new();
    for name in ["healthy", "badsecret", "revoked", "flaky"] {
        let client_id = format!(
            "{}@Tenant {name}",
            Uuid::new_v4().to_string().to_uppercase()
        );
        let secret = format!("CS-{name}-{}", Uuid::new_v4().simple());
        let server_secret = if name == "badsecret" {
            format!("CS-server-{}", Uuid::new_v4().simple())
        } else {
            secret.clone()
        };
        sim.add_client(name, &client_id, &server_secret, None);
        let rt = sim
            .issue_grant(
                name,
                &client_id,
                clock::SystemClock.now() - chrono::Duration::days(1),
            )
            .unwrap();
        secrets.push((format!("{name} client secret"), secret.clone()));
        secrets.push((format!("{name} server-side secret"), server_secret));
        secrets.push((format!("{name} first refresh token"), rt.clone()));
        records.push(serde_json::json!({
            "name": name,
            "instance": format!("http://{}", sim.instance(name)),
            "client_id": client_id,
            "client_secret": secret,
            "refresh_token": rt,
            "labels": {"customer": format!("Customer {name}")},
        }));
        clients.push((name, client_id, rt, secret));
    }
    let (_, revoked_client, _, _) = &clients[2];
    sim.revoke("revoked", revoked_client).unwrap();
    let (_, _, flaky_rt, flaky_cs) = &clients[3];
    sim.inject(
        "flaky",
        Fault::Status {
            code: 500,
            retry_after: None,
            body: format!(
                "{{\"error\":\"server_error\",\"error_description\":\"bad token {flaky_rt} for secret {flaky_cs}\"}}"
            ),
        },
        None,
    );

    let config = format!(
        "[store]\npath = \"{db}\"\nkey_file = \"{key}\"\n\
         [api]\nsocket = \"{sock}\"\n\
         [acumatica]\nallow_insecure_loopback = true\n\
         [renewal]\nhttp_timeout = \"5s\"\nretry_min = \"1s\"\nretry_max = \"2s\"\n\
         [alerts]\ngroup_wait = \"0s\"\ngroup_interval = \"0s\"\nretry_min = \"1s\"\nretry_max = \"2s\"\n\
         [[alerts.webhooks]]\nname = \"signed\"\nkind = \"generic\"\nurl = \"{signed}\"\nsecret = \"{SIGNING_SECRET}\"\n\
         [[alerts.webhooks]]\nname = \"chat\"\nkind = \"slack\"\nurl = \"{chat}\"\n\
         [[alerts.webhooks]]\nname = \"broken\"\nkind = \"discord\"\nurl = \"{broken}\"\n\
         [log]\nlevel = \"debug\"\n",
        db = rig.path("acutoken.db").display(),
        key = rig.path("acutoken.key").display(),
        sock = rig.path("acutoken.sock").display(),
        signed = sink.url("signed"),
        chat = sink.url("chat"),
        broken = sink.url("broken"),
    );
    std::fs::write(rig.path("acutoken.toml"), config).unwrap();
    for hook in ["signed", "chat", "broken"] {
        secrets.push((format!("webhook URL {hook}"), sink.url(hook)));
        secrets.push((
            format!("webhook URL token {hook}"),
            format!("URLSECRET-{hook}"),
        ));
        secrets.push((format!("webhook path {hook}"), format!("/hook/{hook}")));
    }
    secrets.push(("signing secret".into(), SIGNING_SECRET.into()));
    let import = rig.path("import.json");
    std::fs::write(&import, serde_json::to_vec(&records).unwrap()).unwrap();
    std::fs::set_permissions(&import, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    let mut outputs: Vec<(String, Vec<u8>)> = Vec::new();
    let mut run = |what: &str, args: &[&str]| {
        let out = rig.cli(args);
        outputs.push((format!("{what} stdout"), out.stdout.clone()));
        outputs.push((format!("{what} stderr"), out.stderr.clone()));
        out
    };
    let out = run(
        "import",
        &["connection", "import", import.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&import).unwrap();

    let log = rig.path("serve.log");
    let daemon = Daemon(
        rig.command()
            .arg("serve")
            .stdout(std::fs::File::create(rig.path("serve.out")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for("every connection to reach its state", 60, || {
        rig.row_state("healthy") == Some(State::Active)
            && rig
                .store()
                .get("healthy")
                .is_ok_and(|r| r.conn.last_refresh_at.is_some())
            && rig.row_state("badsecret") == Some(State::NeedsSecret)
            && rig.row_state("revoked") == Some(State::NeedsReauthorization)
            && rig.row_state("flaky") == Some(State::Retrying)
    })
    .await;
    sink.wait_for("signed", 2).await;
    sink.wait_for("broken", 2).await;
    let mid_rt = rig.secret("healthy", SecretColumn::RefreshToken).unwrap();
    let first_at = rig.secret("healthy", SecretColumn::AccessToken).unwrap();
    secrets.push(("healthy second refresh token".into(), mid_rt));
    secrets.push(("healthy first access token".into(), first_at));

    // The CLI, through the running daemon and on the store.
    for (what, args) in [
        ("refresh", vec!["connection", "refresh", "healthy"]),
        (
            "refresh refused",
            vec!["connection", "refresh", "badsecret"],
        ),
        ("refresh flaky", vec!["connection", "refresh", "flaky"]),
        ("list", vec!["connection", "list", "--json"]),
        ("show", vec!["connection", "show", "healthy"]),
        ("show json", vec!["connection", "show", "flaky", "--json"]),
        (
            "history",
            vec!["connection", "history", "healthy", "--json"],
        ),
        ("history flaky", vec!["connection", "history", "flaky"]),
        ("status", vec!["status", "--json"]),
        ("alert test", vec!["alert", "test"]),
        ("config check", vec!["config", "check"]),
    ] {
        run(what, &args);
    }
    let backup = rig.path("backup.db");
    let out = run("backup", &["backup", backup.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sink.wait_for("chat", 1).await;

    let (_, healthy_client, _, _) = &clients[0];
    let last_rt = sim
        .current_refresh_token("healthy", healthy_client)
        .unwrap();
    secrets.push(("healthy current refresh token".into(), last_rt.clone()));
    assert_eq!(
        rig.secret("healthy", SecretColumn::RefreshToken).as_deref(),
        Some(last_rt.as_str())
    );
    secrets.push((
        "healthy last access token".into(),
        rig.secret("healthy", SecretColumn::AccessToken).unwrap(),
    ));
    assert!(
        sim.requests("flaky").len() >= 2,
        "the flaky instance was tried and retried"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut daemon = daemon;
    let status = daemon.0.wait().unwrap();
    assert!(status.success(), "{status:?}");

    let log_text = std::fs::read(&log).unwrap();
    assert!(
        contains(&log_text, "DEBUG"),
        "the daemon logged at debug level"
    );
    assert!(
        contains(&log_text, "invalid_client") && contains(&log_text, "500"),
        "failures were logged"
    );
    outputs.push(("serve stderr".into(), log_text));
    outputs.push((
        "serve stdout".into(),
        std::fs::read(rig.path("serve.out")).unwrap(),
    ));
    for f in files(rig.dir.path()) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if name == "acutoken.toml" || name == "acutoken.key" {
            continue; // the operator's own files, holding what they configured
        }
        outputs.push((format!("file {name}"), std::fs::read(&f).unwrap()));
    }
    assert!(outputs.iter().any(|(w, _)| w == "file acutoken.db"));
    assert!(outputs.iter().any(|(w, _)| w == "file backup.db"));
    let bodies = sink.all();
    assert!(bodies.len() >= 5, "alerts went out: {}", bodies.len());
    for r in &bodies {
        outputs.push((format!("webhook body to {}", r.hook), r.body.clone()));
        for (k, v) in r.headers.iter() {
            outputs.push((
                format!("webhook header {k} to {}", r.hook),
                v.as_bytes().to_vec(),
            ));
        }
    }

    let mut leaks = Vec::new();
    for (what, bytes) in &outputs {
        for (name, secret) in &secrets {
            if contains(bytes, secret) {
                leaks.push(format!("{name} found in {what}"));
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    assert_eq!(sim.total_replays(), 0);
}

/// The owner of `/proc/<pid>/environ`: the kernel gives the entries of a
/// non-dumpable process (`environ`, `mem`, `status`, ...) to root, whatever
/// user it runs as, so that user can no longer read them or attach to it.
fn proc_owner(pid: u32) -> u32 {
    std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(format!("/proc/{pid}/environ")).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_marks_itself_non_dumpable() {
    let rig = Rig::new();
    std::fs::write(
        rig.path("acutoken.toml"),
        format!(
            "[store]\npath = \"{}\"\nkey_file = \"{}\"\n[api]\nsocket = \"{}\"\n",
            rig.path("acutoken.db").display(),
            rig.path("acutoken.key").display(),
            rig.path("acutoken.sock").display(),
        ),
    )
    .unwrap();
    // Root's processes are root's anyway: run the daemon as `nobody` so the
    // ownership change is visible.
    let me = nix::unistd::geteuid().as_raw();
    let runs_as = if me == 0 { 65534 } else { me };
    if me == 0 {
        for p in [
            rig.dir.path().to_path_buf(),
            rig.path("run"),
            rig.path("acutoken.key"),
            rig.path("acutoken.toml"),
        ] {
            nix::unistd::chown(&p, Some(runs_as.into()), Some(runs_as.into())).unwrap();
        }
    }
    let mut cmd = rig.command();
    cmd.arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if me == 0 {
        std::os::unix::process::CommandExt::uid(&mut cmd, runs_as);
        std::os::unix::process::CommandExt::gid(&mut cmd, runs_as);
    }
    let daemon = Daemon(cmd.spawn().unwrap());
    let pid = daemon.0.id();
    let sock = rig.path("acutoken.sock");
    wait_for("the daemon to serve", 30, || sock.exists()).await;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().nth(1) == Some(&runs_as.to_string()),
        "{uid_line}"
    );
    assert_eq!(
        proc_owner(pid),
        0,
        "/proc/{pid}/environ belongs to root: the process is not dumpable"
    );
    // A control: a dumpable process of the same user keeps its own /proc entry.
    if me != 0 || runs_as != 0 {
        let mut sleeper = Command::new("sleep");
        sleeper.arg("30");
        if me == 0 {
            std::os::unix::process::CommandExt::uid(&mut sleeper, runs_as);
        }
        let control = Daemon(sleeper.spawn().unwrap());
        assert_eq!(
            proc_owner(control.0.id()),
            runs_as,
            "a dumpable process of the same user"
        );
    }
}

/// The environment `pid` was started with (its `/proc` entry, which
/// `unsetenv` would not change), or `None` when this user may not read it.
fn environ(pid: u32) -> Option<Vec<u8>> {
    match std::fs::read(format!("/proc/{pid}/environ")) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => None,
        Err(e) => panic!("/proc/{pid}/environ: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_given_in_acutoken_key_leaves_the_environment_and_still_opens_the_store() {
    let rig = Rig::new();
    std::fs::write(
        rig.path("acutoken.toml"),
        format!(
            "[store]\npath = \"{}\"\n[api]\nsocket = \"{}\"\n",
            rig.path("acutoken.db").display(),
            rig.path("acutoken.sock").display(),
        ),
    )
    .unwrap();
    let key = std::fs::read_to_string(rig.path("acutoken.key")).unwrap();
    let key = key.trim().to_string();
    let mut cmd = rig.command();
    cmd.arg("serve")
        .env("ACUTOKEN_KEY", &key)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let daemon = Daemon(cmd.spawn().unwrap());
    let pid = daemon.0.id();
    let sock = rig.path("acutoken.sock");
    wait_for("the daemon to serve", 30, || sock.exists()).await;

    // The same process (the PID the test started), without the key in the
    // environment the kernel shows for it. Unreadable only for a user other
    // than root, and then because the daemon is non-dumpable.
    match environ(pid) {
        Some(env) => {
            assert!(
                !contains(&env, &key) && !contains(&env, "ACUTOKEN_KEY="),
                "the key is still in /proc/{pid}/environ"
            );
        }
        None => assert_eq!(proc_owner(pid), 0, "/proc/{pid}/environ is unreadable"),
    }
    // The key arrived whole: the store the daemon created opens with it.
    assert!(rig.path("acutoken.db").exists());
    rig.store();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_with_inline_secrets_readable_by_every_user_is_warned_about() {
    use std::os::unix::fs::PermissionsExt as _;
    let rig = Rig::new();
    let hook_secret = "T00000/B00000/XXXXinlinehook";
    let base = format!(
        "[store]\npath = \"{}\"\nkey_file = \"{}\"\n[api]\nsocket = \"{}\"\n",
        rig.path("acutoken.db").display(),
        rig.path("acutoken.key").display(),
        rig.path("acutoken.sock").display(),
    );
    let inline = format!(
        "{base}[[alerts.webhooks]]\nname = \"ops\"\nkind = \"slack\"\nurl = \"https://hooks.example.com/services/{hook_secret}\"\n"
    );
    std::fs::write(
        rig.path("hook.url"),
        format!("https://hooks.example.com/{hook_secret}\n"),
    )
    .unwrap();
    std::fs::set_permissions(rig.path("hook.url"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let from_file = format!(
        "{base}[[alerts.webhooks]]\nname = \"ops\"\nkind = \"slack\"\nurl_file = \"{}\"\n",
        rig.path("hook.url").display()
    );
    let config = rig.path("acutoken.toml");
    let check = |text: &str, mode: u32| {
        std::fs::write(&config, text).unwrap();
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = rig.cli(&["config", "check"]);
        assert!(out.status.success(), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !stderr.contains(hook_secret),
            "the warning leaks the URL: {stderr}"
        );
        stderr
    };

    let warned = check(&inline, 0o644);
    assert!(
        warned.contains("warning:") && warned.contains("every user can read it"),
        "no warning for an inline webhook URL in a 0644 config: {warned}"
    );
    for (text, mode, what) in [
        (&inline, 0o640, "an inline URL in a 0640 config"),
        (
            &from_file,
            0o644,
            "a 0644 config whose URL is in a url_file",
        ),
    ] {
        let quiet = check(text, mode);
        assert!(!quiet.contains("warning:"), "warned for {what}: {quiet}");
    }

    // `serve` warns at start too.
    std::fs::write(&config, &inline).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let log = rig.path("serve.log");
    let mut cmd = rig.command();
    cmd.arg("serve")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let _daemon = Daemon(cmd.spawn().unwrap());
    wait_for("the warning from serve", 30, || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("every user can read it"))
    })
    .await;
    assert!(!std::fs::read_to_string(&log).unwrap().contains(hook_secret));
}
