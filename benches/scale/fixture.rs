//! What every measurement stands on: a work directory with a config, a key
//! and a seeded store; the real `acutoken serve` as a child; its readiness
//! messages; and what /proc says about it.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use acutoken::config::Config;
use acutoken::crypto::{Key, KeySource, Keyring, write_key_file};
use acutoken::model::NewConnection;
use acutoken::model::{Connection, Mode, State, Timestamp};
use acutoken::renewal::planning;
use acutoken::secret::Secret;
use acutoken::store::connections;
use acutoken::store::{Create, Store};

/// Environment that would point a child at another store, key or config.
const SCRUBBED: [&str; 9] = [
    "ACUTOKEN_KEY",
    "ACUTOKEN_CONFIG",
    "CREDENTIALS_DIRECTORY",
    "STATE_DIRECTORY",
    "RUNTIME_DIRECTORY",
    "CONFIGURATION_DIRECTORY",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "XDG_RUNTIME_DIR",
];

/// Connections seeded per write transaction.
const SEED_BATCH: usize = 10_000;

/// The `acutoken` binary under test: `$ACUTOKEN_BIN`, else the release build.
pub fn binary() -> PathBuf {
    std::env::var_os("ACUTOKEN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/acutoken"))
}

/// Where benchmark stores live: `$BENCH_DIR`, else `target/bench`.
pub fn work_root() -> PathBuf {
    std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench"))
}

/// An `acutoken` command running `bin` (the binary under test, or a
/// baseline build) with the scrubbed environment and `-c config`.
pub fn command_of(bin: &Path, config: &Path) -> Command {
    let mut c = Command::new(bin);
    for k in SCRUBBED {
        c.env_remove(k);
    }
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ACUTOKEN__") {
            c.env_remove(k);
        }
    }
    c.arg("-c").arg(config);
    c
}

/// One benchmark directory: config, key, store, socket.
pub struct Dir {
    pub path: PathBuf,
}

impl Dir {
    /// A fresh, empty directory `name` under the work root.
    pub fn fresh(name: &str) -> anyhow::Result<Dir> {
        let path = work_root().join(name);
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("cannot clear {}", path.display()))?;
        }
        std::fs::create_dir_all(&path)?;
        Ok(Dir { path })
    }

    pub fn config(&self) -> PathBuf {
        self.path.join("acutoken.toml")
    }
    pub fn store(&self) -> PathBuf {
        self.path.join("acutoken.db")
    }
    pub fn key(&self) -> PathBuf {
        self.path.join("acutoken.key")
    }
    pub fn socket(&self) -> PathBuf {
        self.path.join("acutoken.sock")
    }

    /// Writes the benchmark config (`renewal_extra` is appended to
    /// `[renewal]`, `sections` to the end).
    pub fn write_config(&self, renewal_extra: &str, sections: &str) -> anyhow::Result<()> {
        let text = format!(
            r#"[store]
path = "{store}"

[acumatica]
allow_insecure_loopback = true

[renewal]
http_timeout = "10s"
{renewal_extra}

[api]
socket = "{socket}"

[log]
level = "info"
{sections}
"#,
            store = self.store().display(),
            socket = self.socket().display(),
        );
        std::fs::write(self.config(), text)?;
        Ok(())
    }

    /// The key, generated when missing (mode 0600, beside the store).
    pub fn keyring(&self) -> anyhow::Result<Keyring> {
        if !self.key().exists() {
            write_key_file(&self.key(), &Key::generate())?;
        }
        let key = Key::from_file(&self.key(), KeySource::BesideStore(self.key()))?;
        Ok(Keyring::new(key, Vec::new()))
    }

    pub fn open_store(&self) -> anyhow::Result<Store> {
        Ok(Store::open(&self.store(), self.keyring()?, Create::Yes)?)
    }

    /// Copies config-free contents (store and key) of `from` into this directory.
    pub fn copy_store_from(&self, from: &Dir) -> anyhow::Result<()> {
        std::fs::copy(from.store(), self.store())?;
        std::fs::copy(from.key(), self.key())?;
        Ok(())
    }
}

/// What one seeded connection looks like.
pub struct Spec {
    pub name: String,
    pub instance: String,
    pub client_id: String,
    pub client_secret: String,
    pub refresh_token: String,
    /// Overrides the planned refresh (due connections); `None` keeps the plan.
    pub next_refresh_at: Option<Timestamp>,
    pub grant_issued_at: Timestamp,
}

/// A connection as `connection import` would build it: a grant of known age,
/// so its deadline is known and nothing is due for at least an hour.
pub fn idle_spec(i: usize, n: usize, now: Timestamp) -> Spec {
    let tenants = (n / 10).max(1);
    let age_s = (i as i64 * 7919) % (17 * 3600);
    Spec {
        name: name(i),
        instance: format!("tenant{}.example.com/AcumaticaERP", i % tenants),
        client_id: format!(
            "{:08X}-A48D-A50E-F710-39C1636C30F6@Company {}",
            i,
            i % tenants
        ),
        client_secret: format!("client-secret-{i:08}-xxxxxxxxxxxx"),
        refresh_token: format!("{:064x}", (i as u128) * 0x9E37_79B9_7F4A_7C15),
        next_refresh_at: None,
        grant_issued_at: now - chrono::Duration::seconds(age_s),
    }
}

/// The connection name of record `i`.
pub fn name(i: usize) -> String {
    format!("c{i:07}")
}

/// Inserts connections `from..n` made by `spec` (sealing their secrets), in batches.
pub fn seed(
    store: &mut Store,
    from: usize,
    n: usize,
    now: Timestamp,
    spec: impl Fn(usize) -> Spec,
) -> anyhow::Result<()> {
    let policy = Config::default().renewal.policy();
    let mut i = from;
    while i < n {
        let end = (i + SEED_BATCH).min(n);
        let batch: Vec<NewConnection> = (i..end)
            .map(|j| {
                let s = spec(j);
                let mut conn = Connection {
                    id: uuid::Uuid::new_v4(),
                    name: s.name,
                    instance: s.instance,
                    client_id: s.client_id,
                    labels: [("customer".to_string(), format!("Customer {}", j / 3))]
                        .into_iter()
                        .collect(),
                    mode: Mode::Absolute,
                    lifetime: Duration::from_secs(30 * 86_400),
                    absolute_lifetime: None,
                    secret_expires_at: None,
                    grant_issued_at: Some(s.grant_issued_at),
                    refresh_token_issued_at: Some(s.grant_issued_at),
                    access_expires_at: None,
                    deadline: None,
                    deadline_source: None,
                    next_refresh_at: None,
                    last_refresh_at: None,
                    last_error: None,
                    state: State::PendingAuthorization,
                };
                planning::initial(&mut conn, true, &policy, now);
                if let Some(t) = s.next_refresh_at {
                    conn.next_refresh_at = Some(t);
                }
                NewConnection {
                    conn,
                    client_secret: Some(Secret::new(s.client_secret)),
                    refresh_token: Some(Secret::new(s.refresh_token)),
                }
            })
            .collect();
        store.write(|tx, kr| {
            for c in &batch {
                connections::insert(tx, kr, c, now)?;
            }
            Ok(())
        })?;
        i = end;
    }
    Ok(())
}

/// How long a seeded store stays idle enough to be copied: the earliest
/// planned refresh is an hour after seeding.
const SEED_FRESH_FOR: Duration = Duration::from_secs(30 * 60);

/// A seeded store of `n` idle connections, made at most [`SEED_FRESH_FOR`]
/// ago and copied per run.
pub fn idle_store(n: usize) -> anyhow::Result<Dir> {
    let path = work_root().join(format!("seed-{n}"));
    let dir = Dir { path: path.clone() };
    // The seeded plans start from the seeding time: hours later, part of the
    // store is due and the daemon is no longer idle (it tries, and fails, to
    // refresh against example.com). A seed is reused for 30 minutes only.
    let fresh = std::fs::metadata(path.join("complete"))
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < SEED_FRESH_FOR));
    if dir.store().exists() && fresh {
        return Ok(dir);
    }
    let dir = Dir::fresh(&format!("seed-{n}"))?;
    let started = Instant::now();
    let mut st = dir.open_store()?;
    let now = chrono::Utc::now();
    seed(&mut st, 0, n, now, |i| idle_spec(i, n, now))?;
    drop(st);
    std::fs::write(path.join("complete"), b"")?;
    eprintln!(
        "seeded {n} idle connections in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(dir)
}

/// A test `NOTIFY_SOCKET`: the messages `serve` sends.
pub struct Notify {
    pub path: PathBuf,
    sock: UnixDatagram,
}

impl Notify {
    pub fn bind(dir: &Dir) -> anyhow::Result<Notify> {
        Notify::bind_at(dir.path.join("notify.sock"))
    }

    /// A notify socket at `path` (one per replica when several run).
    pub fn bind_at(path: PathBuf) -> anyhow::Result<Notify> {
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path)?;
        Ok(Notify { path, sock })
    }

    /// Waits up to `within` for a message containing `what`; the time it came.
    pub fn wait_for(&self, what: &str, within: Duration) -> anyhow::Result<Instant> {
        let end = Instant::now() + within;
        let mut buf = [0u8; 4096];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no {what} from serve within {within:?}");
            }
            self.sock.set_read_timeout(Some(left))?;
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]);
                    if msg.lines().any(|l| l == what) {
                        return Ok(Instant::now());
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A running `acutoken serve`, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Daemon {
    child: Child,
    pub pid: Pid,
    pub started: Instant,
}

impl Daemon {
    /// Starts `serve` on `dir`, reporting to `notify`.
    pub fn start(dir: &Dir, notify: &Notify) -> anyhow::Result<Daemon> {
        // Its log stays beside the store for a look after a failed run.
        Daemon::start_with(
            &binary(),
            &dir.config(),
            notify,
            &[],
            &dir.path.join("serve.log"),
        )
    }

    /// Starts `bin serve -c config` with `env` added (a replica's name and
    /// socket), reporting to `notify`, its output into `log`.
    pub fn start_with(
        bin: &Path,
        config: &Path,
        notify: &Notify,
        env: &[(String, String)],
        log: &Path,
    ) -> anyhow::Result<Daemon> {
        let out = std::fs::File::create(log)?;
        let started = Instant::now();
        let child = command_of(bin, config)
            .arg("serve")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("NOTIFY_SOCKET", &notify.path)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let pid = Pid::from_raw(i32::try_from(child.id())?);
        Ok(Daemon {
            child,
            pid,
            started,
        })
    }

    pub fn signal(&self, s: Signal) -> anyhow::Result<()> {
        kill(self.pid, s)?;
        Ok(())
    }

    /// Resident memory now and at its peak, in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok((field("VmRSS:"), field("VmHWM:")))
    }

    /// CPU time used so far (user + system, all threads, dead ones included).
    pub fn cpu(&self) -> anyhow::Result<Duration> {
        cpu_of(self.pid)
    }

    /// Stops the daemon and waits for it.
    pub fn stop(mut self) -> anyhow::Result<()> {
        let _ = kill(self.pid, Signal::SIGTERM);
        let end = Instant::now() + Duration::from_secs(60);
        while Instant::now() < end {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        bail!("serve did not stop within 60 s of SIGTERM")
    }
}

/// CPU time process `pid` used so far: utime + stime of `/proc/PID/stat`
/// (all threads, dead ones included; still readable while it is a zombie).
pub fn cpu_of(pid: Pid) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces: fields count from the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unreadable /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // Fields 14 and 15 of stat(5) are 11 and 12 after the ')'.
    let total = ticks(11) + ticks(12);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Ok(Duration::from_nanos(total * 1_000_000_000 / hz))
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
