//! Helpers for the process tests of `acutoken serve`: a temp dir with a config,
//! the simulator, the real binary as a child that is killed when its guard drops,
//! a test `NOTIFY_SOCKET`, and bounded waits.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use acutoken::crypto::{Key, KeySource, Keyring};
use acutoken::daemon::client::{Answer, call};
use acutoken::model::ConnectionRow;
use acutoken::sim::Simulator;
use acutoken::store::connections::SecretColumn;
use acutoken::store::{Create, Store};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

/// A client ID with a tenant part that holds a space, as real ones do.
pub const CLIENT: &str = "88358B02-A48D-A50E-F710-39C1636C30F6@My Company";
pub const SECRET: &str = "s3cret-value-7";
/// The simulator site (an IIS virtual directory) most tests use.
pub const SITE: &str = "AcumaticaERP";
/// The bound on every wait for a condition.
pub const WAIT: Duration = Duration::from_secs(20);
/// Environment that would point a child at another store, key or config.
const SCRUBBED: [&str; 10] = [
    "ACUTOKEN_KEY",
    "ACUTOKEN_CONFIG",
    "CREDENTIALS_DIRECTORY",
    "STATE_DIRECTORY",
    "RUNTIME_DIRECTORY",
    "CONFIGURATION_DIRECTORY",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "XDG_RUNTIME_DIR",
];

/// Waits until `cond` holds, at most [`WAIT`]; panics naming `what` otherwise.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A port that was free a moment ago (the callback listener needs a fixed one).
/// The sealed spill files waiting in `dir` (none when it does not exist).
pub fn spill_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default()
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// What a CLI run printed.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Panics with everything printed unless the command exited 0.
    pub fn ok(self) -> Output {
        assert_eq!(self.code, Some(0), "command failed: {self:#?}");
        self
    }
}

/// What the config file says beyond the fixed base.
#[derive(Debug, Clone, Default)]
pub struct Opts {
    /// `metrics.listen` on this port.
    pub metrics_port: Option<u16>,
    /// Lines appended inside `[log]`, the last plain table (e.g. an unknown key).
    pub log_extra: String,
    /// `[[alerts.webhooks]]` tables, appended at the end.
    pub webhooks: String,
}

/// A PostgreSQL database as a store (DESIGN §10): its URL (no password)
/// and the file holding role `acutoken`'s password.
#[derive(Debug, Clone)]
pub struct PgStore {
    pub url: String,
    pub password_file: PathBuf,
}

/// One test's world: temp dir, config file, simulator.
pub struct Rig {
    pub dir: TempDir,
    pub sim: Simulator,
    pub callback_port: u16,
    /// The store is this PostgreSQL database (its key in `acutoken.key`,
    /// named by `store.key_file`), not the SQLite file.
    pub pg: Option<PgStore>,
}

impl Rig {
    pub async fn new() -> Rig {
        let dir = tempfile::Builder::new().prefix("acud").tempdir().unwrap();
        let sim = Simulator::start(acutoken::clock::system()).await.unwrap();
        sim.add_client(SITE, CLIENT, SECRET, None);
        let rig = Rig {
            dir,
            sim,
            callback_port: free_port(),
            pg: None,
        };
        rig.write_config(&Opts::default());
        rig
    }

    /// A rig whose store is the PostgreSQL database `pg`. PostgreSQL gets no
    /// generated key, so one is written to `acutoken.key` and named.
    pub async fn on_postgres(pg: PgStore) -> Rig {
        let mut rig = Rig::new().await;
        acutoken::crypto::write_key_file(&rig.path("acutoken.key"), &Key::generate()).unwrap();
        rig.pg = Some(pg);
        rig.write_config(&Opts::default());
        rig
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("acutoken.toml")
    }

    pub fn store_path(&self) -> PathBuf {
        self.path("acutoken.db")
    }

    pub fn socket(&self) -> PathBuf {
        self.path("acutoken.sock")
    }

    pub fn redirect_uri(&self) -> String {
        format!("http://127.0.0.1:{}/cb", self.callback_port)
    }

    /// The config text for `opts`: short retries, a probe interval long enough
    /// that nothing refreshes unless a test makes it due.
    pub fn config_text(&self, opts: &Opts) -> String {
        let metrics = match opts.metrics_port {
            Some(p) => format!("[metrics]\nlisten = \"127.0.0.1:{p}\"\n"),
            None => String::new(),
        };
        let store = match &self.pg {
            None => format!("path = \"{}\"", self.store_path().display()),
            Some(pg) => format!(
                "url = \"{}\"\npassword_file = \"{}\"\nkey_file = \"{}\"\nspill_dir = \"{}\"",
                pg.url,
                pg.password_file.display(),
                self.path("acutoken.key").display(),
                self.path("pending").display()
            ),
        };
        format!(
            r#"[store]
{store}

[acumatica]
allow_insecure_loopback = true
redirect_uri = "{redirect}"

[renewal]
retry_min = "1s"
retry_max = "2s"
http_timeout = "10s"
probe_interval = "24h"

[alerts]
group_wait = "0s"
retry_min = "1s"
retry_max = "2s"

[api]
socket = "{socket}"

[callback]
listen = "127.0.0.1:{cb}"

{metrics}
[serve]
shutdown_timeout = "20s"

[log]
level = "info"
{log_extra}
{webhooks}
"#,
            redirect = self.redirect_uri(),
            socket = self.socket().display(),
            cb = self.callback_port,
            log_extra = opts.log_extra,
            webhooks = opts.webhooks,
        )
    }

    pub fn write_config(&self, opts: &Opts) {
        std::fs::write(self.config_path(), self.config_text(opts)).unwrap();
    }

    /// The binary with this rig's config, run in its directory, with every
    /// variable that could point it elsewhere removed; killed on drop.
    pub fn command(&self) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_acutoken"));
        for k in SCRUBBED {
            c.env_remove(k);
        }
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ACUTOKEN__") {
                c.env_remove(k);
            }
        }
        c.arg("-c").arg(self.config_path());
        c.current_dir(self.dir.path());
        c.kill_on_drop(true);
        c
    }

    /// Runs one CLI command to its end (bounded), `stdin` piped in.
    pub async fn cli(&self, args: &[&str], stdin: Option<&str>) -> Output {
        self.cli_in(args, &[], stdin).await
    }

    /// [`Rig::cli`] with extra environment.
    async fn cli_in(&self, args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Output {
        use tokio::io::AsyncWriteExt as _;
        let mut c = self.command();
        c.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).await.unwrap();
        }
        drop(input);
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("`acutoken {}` did not finish", args.join(" ")))
            .unwrap();
        Output {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `connection add NAME` on `site` with a fresh grant from the simulator.
    /// With `granted_now`, the grant time is given (nothing due for hours);
    /// without it the deadline is assumed and the connection is due at once.
    /// Returns the refresh token handed over.
    pub async fn add(&self, name: &str, site: &str, granted_now: bool) -> String {
        let now = chrono::Utc::now();
        let token = self.sim.issue_grant(site, CLIENT, now).unwrap();
        let file = self.path(&format!("{name}.rt"));
        std::fs::write(&file, format!("{token}\n")).unwrap();
        let instance = format!("http://{}/Main?ScreenId=00000000", self.sim.instance(site));
        let file_arg = file.display().to_string();
        let grant = acutoken::model::fmt_time(now);
        let mut args = vec![
            "connection",
            "add",
            name,
            "--instance",
            &instance,
            "--client-id",
            CLIENT,
            "--label",
            "customer=Acme",
            "--refresh-token-file",
            &file_arg,
        ];
        if granted_now {
            args.extend(["--grant-issued-at", &grant]);
        }
        self.cli(&args, Some(&format!("{SECRET}\n"))).await.ok();
        std::fs::remove_file(&file).unwrap();
        token
    }

    /// `connection add NAME` without a refresh token: pending authorization.
    pub async fn add_pending(&self, name: &str, site: &str) {
        let instance = self.sim.instance(site);
        self.cli(
            &[
                "connection",
                "add",
                name,
                "--instance",
                &instance,
                "--client-id",
                CLIENT,
            ],
            Some(&format!("{SECRET}\n")),
        )
        .await
        .ok();
    }

    /// Starts one CLI command with its output piped, to read while it runs.
    pub fn spawn_cli(&self, args: &[&str]) -> tokio::process::Child {
        let mut c = self.command();
        c.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c.spawn().unwrap()
    }

    /// Starts `serve`; with `notify`, `NOTIFY_SOCKET` points at it.
    pub fn serve(&self, notify: Option<&NotifySocket>) -> Daemon {
        self.serve_with_env(notify, &[])
    }

    /// [`Rig::serve`] with extra environment (e.g. `WATCHDOG_USEC`).
    pub fn serve_with_env(&self, notify: Option<&NotifySocket>, env: &[(&str, &str)]) -> Daemon {
        let stderr_path = self.path(&format!("serve-{}.log", rand_suffix()));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut c = self.command();
        c.arg("serve")
            .stdin(Stdio::null())
            .stdout(stderr.try_clone().unwrap())
            .stderr(stderr);
        if let Some(n) = notify {
            c.env("NOTIFY_SOCKET", &n.path);
        }
        c.envs(env.iter().copied());
        let child = c.spawn().unwrap();
        let pid = Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
        Daemon {
            child: Some(child),
            pid,
            log: stderr_path,
            socket: self.socket(),
        }
    }

    /// Starts `serve` as the replica `name` of a PostgreSQL store (DESIGN
    /// §10): its own name, API socket (a fresh path each start, so a second
    /// start under a live one's name is refused by the store, not by the
    /// socket), callback port and spill directory (kept per name, so a
    /// restarted replica finds what it spilled), then `env`. The returned
    /// daemon's socket is the replica's.
    pub fn serve_replica(&self, name: &str, env: &[(&str, &str)]) -> Daemon {
        let socket = self.path(&format!("{name}-{}.sock", rand_suffix()));
        let callback = format!("127.0.0.1:{}", free_port());
        let spill = self.path(&format!("pending-{name}"));
        let socket_text = socket.display().to_string();
        let spill_text = spill.display().to_string();
        let mut all = vec![
            ("ACUTOKEN__SERVE__REPLICA_NAME", name),
            ("ACUTOKEN__API__SOCKET", socket_text.as_str()),
            ("ACUTOKEN__CALLBACK__LISTEN", callback.as_str()),
            ("ACUTOKEN__STORE__SPILL_DIR", spill_text.as_str()),
        ];
        all.extend_from_slice(env);
        let mut d = self.serve_with_env(None, &all);
        d.socket = socket;
        d
    }

    /// [`Rig::cli`] with extra environment (e.g. `ACUTOKEN__API__SOCKET`
    /// naming one replica's socket).
    pub async fn cli_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        self.cli_in(args, env, None).await
    }

    /// The store as the daemon sees it, opened with the key beside it.
    pub fn open_store(&self) -> Store {
        let key_path = self.path("acutoken.key");
        let key = Key::from_file(&key_path, KeySource::BesideStore(key_path.clone())).unwrap();
        if self.pg.is_some() {
            let config = acutoken::config::Config::load(Some(&self.config_path()))
                .unwrap()
                .config;
            let keyring = acutoken::store::SharedKeyring::new(Keyring::new(key, Vec::new()));
            return Store::open_target(&config.store_target().unwrap(), &keyring, Create::No)
                .unwrap();
        }
        Store::open(
            &self.store_path(),
            Keyring::new(key, Vec::new()),
            Create::No,
        )
        .unwrap()
    }

    pub fn row(&self, name: &str) -> ConnectionRow {
        self.open_store().get(name).unwrap()
    }

    /// The refresh token the store holds for `name`.
    pub fn stored_refresh_token(&self, name: &str) -> Option<String> {
        let st = self.open_store();
        let id = st.get(name).unwrap().conn.id;
        st.secret(id, SecretColumn::RefreshToken)
            .unwrap()
            .map(|s| s.expose().to_string())
    }
}

fn rand_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// One request to the daemon's API socket (bounded).
pub async fn api(socket: &Path, method: &str, path: &str) -> Answer {
    call(socket, method, path, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// The body of an answer as JSON.
pub fn json(a: &Answer) -> serde_json::Value {
    serde_json::from_slice(&a.body)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&a.body)))
}

/// A running `acutoken serve`; killed (SIGKILL) when dropped unless it exited.
pub struct Daemon {
    child: Option<tokio::process::Child>,
    pub pid: Pid,
    log: PathBuf,
    socket: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
        }
    }
}

impl Daemon {
    /// What it wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The API socket it serves on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid, sig).unwrap();
    }

    /// Panics with the logs if it has exited.
    fn assert_alive(&mut self, what: &str) {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            panic!(
                "the daemon exited ({status}) while waiting for {what}; its output:\n{}",
                self.logs()
            );
        }
    }

    /// True once the process has exited (its status is kept for [`Daemon::exit`]).
    pub fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// Waits for `GET /readyz` to answer 200 on the socket.
    pub async fn ready(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            self.assert_alive("readiness");
            if let Ok(a) = call(&self.socket, "GET", "/readyz", Duration::from_secs(2)).await
                && a.status == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon was not ready in time; its output:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the process to exit (bounded) and returns its status.
    pub async fn exit(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("already waited");
        match tokio::time::timeout(Duration::from_secs(40), c.wait()).await {
            Ok(s) => s.unwrap(),
            Err(_) => {
                let _ = c.start_kill();
                panic!(
                    "the daemon did not exit in time; its output:\n{}",
                    self.logs()
                );
            }
        }
    }

    /// Waits until its logs contain `needle`.
    pub async fn log_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let logs = self.logs();
            if let Some(l) = logs.lines().find(|l| l.contains(needle)) {
                return l.to_string();
            }
            self.assert_alive(needle);
            assert!(
                Instant::now() < deadline,
                "no log line with `{needle}`; the output:\n{logs}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A test `NOTIFY_SOCKET`: a datagram socket bound in the temp dir.
pub struct NotifySocket {
    sock: Arc<UnixDatagram>,
    pub path: PathBuf,
}

impl NotifySocket {
    pub fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        NotifySocket {
            sock: Arc::new(sock),
            path,
        }
    }

    /// The next datagram, or `None` after `timeout`.
    pub async fn next(&self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.sock.clone();
            let got = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; 4096];
                s.recv(&mut buf).ok().map(|n| {
                    buf.truncate(n);
                    String::from_utf8_lossy(&buf).into_owned()
                })
            })
            .await
            .unwrap();
            if got.is_some() || Instant::now() >= deadline {
                return got;
            }
        }
    }

    /// Datagrams until one satisfies `pred` (bounded by [`WAIT`]); returns all
    /// received, the matching one last.
    pub async fn until(&self, what: &str, pred: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some(m) => {
                    let hit = pred(&m);
                    seen.push(m);
                    if hit {
                        return seen;
                    }
                }
                None => panic!("no `{what}` on NOTIFY_SOCKET; received {seen:?}"),
            }
        }
    }
}

/// Bodies a [`Sink`] received, with the hook name they came to.
type Received = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

/// A webhook receiver on 127.0.0.1: records every POST body per path.
#[derive(Clone)]
pub struct Sink {
    pub addr: std::net::SocketAddr,
    got: Received,
}

impl Sink {
    pub async fn start() -> Sink {
        use axum::extract::{Path as AxPath, State};
        let got: Received = Arc::default();
        let app = axum::Router::new()
            .route(
                "/hook/{name}",
                axum::routing::post(
                    |State(g): State<Received>,
                     AxPath(name): AxPath<String>,
                     body: axum::body::Bytes| async move {
                        let v = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                        g.lock().unwrap().push((name, v));
                        "ok"
                    },
                ),
            )
            .with_state(got.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        Sink { addr, got }
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://{}/hook/{name}", self.addr)
    }

    /// A generic `[[alerts.webhooks]]` table posting here.
    pub fn webhook_toml(&self, name: &str) -> String {
        format!(
            "[[alerts.webhooks]]\nname = \"{name}\"\nkind = \"generic\"\nurl = \"{}\"\nmin_severity = \"info\"\n",
            self.url(name)
        )
    }

    /// Bodies received on `/hook/{name}`.
    pub fn received(&self, name: &str) -> Vec<serde_json::Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// An API answer with its headers.
pub struct Full {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
}

impl Full {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// One GET on the API socket, keeping the headers (bounded).
pub async fn api_full(socket: &Path, path: &str) -> Full {
    use http_body_util::{BodyExt as _, Empty};
    use hyper::body::Bytes;
    use hyper_util::rt::TokioIo;
    let fut = async {
        let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = hyper::Request::builder()
            .method("GET")
            .uri(path)
            .header("host", "acutoken")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        Full {
            status,
            headers,
            body,
        }
    };
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .unwrap_or_else(|_| panic!("GET {path} did not answer in time"))
}

/// An HTTP client that shows redirects instead of following them.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Splits a URL's query into a map.
pub fn query(url: &str) -> BTreeMap<String, String> {
    url::Url::parse(url)
        .unwrap()
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// `connection authorize NAME`, then the customer approving at the simulator:
/// returns the URL the browser is redirected to.
pub async fn authorize(rig: &Rig, name: &str) -> String {
    authorize_at(rig, name, SITE).await
}

/// [`authorize`] for a connection on the simulator's `site`.
pub async fn authorize_at(rig: &Rig, name: &str, site: &str) -> String {
    let out = rig.cli(&["connection", "authorize", name], None).await.ok();
    let link = out.stdout.trim();
    assert!(
        link.starts_with(&rig.sim.authorize_url(site)),
        "the authorization URL: {link}"
    );
    let q = query(link);
    assert_eq!(q["redirect_uri"], rig.redirect_uri());
    assert_eq!(q["client_id"], CLIENT);
    assert_eq!(q["code_challenge_method"], "S256");
    let r = http().get(link).send().await.unwrap();
    assert_eq!(r.status(), 302);
    let to = r.headers()["location"].to_str().unwrap().to_string();
    assert!(to.starts_with(&rig.redirect_uri()), "{to}");
    let q = query(&to);
    assert!(q.contains_key("code") && q.contains_key("state"), "{to}");
    to
}
