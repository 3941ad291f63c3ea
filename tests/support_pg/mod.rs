//! A fresh database per test on the PostgreSQL server that `.ci/pg start` runs.
//!
//! The server is named by the environment (`. /tmp/acutoken-pg/env`):
//! `ACUTOKEN_TEST_PG` (role `acutoken`, no password in the URL),
//! `ACUTOKEN_TEST_PG_PASSWORD_FILE` (its password, as the product reads it) and
//! `ACUTOKEN_TEST_PG_ADMIN` (the superuser, trusted on loopback). Without them a
//! test that needs the server panics with what to do: a PostgreSQL test never
//! skips, so a missing server cannot pass for a green run.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use postgres::{Client, Config, NoTls};

/// What a test is told when the server's environment is missing.
pub const MISSING: &str = "PostgreSQL tests need a server: run `.ci/pg start` and source \
     /tmp/acutoken-pg/env (see README, Testing)";

const URL_VAR: &str = "ACUTOKEN_TEST_PG";
const PASSWORD_FILE_VAR: &str = "ACUTOKEN_TEST_PG_PASSWORD_FILE";
const ADMIN_VAR: &str = "ACUTOKEN_TEST_PG_ADMIN";

/// PostgreSQL truncates longer identifiers, which would let two names collide.
const MAX_NAME: usize = 63;

/// A bound on connecting, so a server that went away fails a test instead of
/// hanging it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the server is, as the environment names it.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `postgres://acutoken@HOST:PORT/postgres`
    pub url: String,
    pub password_file: PathBuf,
    /// `postgres://postgres@HOST:PORT/postgres`
    pub admin_url: String,
}

impl Settings {
    /// Reads the settings through `var`; panics with [`MISSING`] when any is
    /// absent or empty.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Settings {
        let get = |name: &str| match var(name) {
            Some(value) if !value.is_empty() => value,
            _ => panic!("{MISSING} ({name} is not set)"),
        };
        Settings {
            url: get(URL_VAR),
            password_file: PathBuf::from(get(PASSWORD_FILE_VAR)),
            admin_url: get(ADMIN_VAR),
        }
    }

    /// The settings of this process's environment.
    pub fn from_env() -> Settings {
        Settings::from_lookup(|name| std::env::var(name).ok())
    }
}

/// The password of role `acutoken`, read from `ACUTOKEN_TEST_PG_PASSWORD_FILE`
/// without its line end.
pub fn password() -> String {
    read_password(&Settings::from_env().password_file)
}

fn read_password(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => text.trim_end_matches(['\n', '\r']).to_owned(),
        Err(e) => panic!(
            "cannot read the PostgreSQL test password file {}: {e}; run `.ci/pg start` again \
             and source /tmp/acutoken-pg/env",
            path.display()
        ),
    }
}

/// An error with its cause: `postgres::Error`'s Display alone is only "db
/// error" or "invalid configuration", without what the server or client said.
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({}: {})", e, db.code().code(), db.message()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// A connection as the superuser, to inspect or change the server itself.
pub fn admin() -> Client {
    let settings = Settings::from_env();
    connect_admin(&settings.admin_url).unwrap_or_else(|e| {
        panic!(
            "cannot connect to the PostgreSQL test server as {}: {}; is it running? \
             (`.ci/pg start`, then source /tmp/acutoken-pg/env)",
            settings.admin_url,
            describe(&e)
        )
    })
}

fn connect_admin(url: &str) -> Result<Client, postgres::Error> {
    let mut config: Config = url.parse()?;
    config.connect_timeout(CONNECT_TIMEOUT);
    config.connect(NoTls)
}

/// One database of its own, owned by role `acutoken`, dropped with the value.
#[derive(Debug)]
pub struct PgDb {
    /// The database's name (unquoted; only `[a-z0-9_]`).
    pub name: String,
    /// `postgres://acutoken@HOST:PORT/<name>`: no password in it, as in a
    /// product config.
    pub url: String,
    /// The file holding role `acutoken`'s password.
    pub password_file: PathBuf,
    admin_url: String,
}

impl PgDb {
    /// The connection settings of [`PgDb::url`] with the password from
    /// [`PgDb::password_file`].
    pub fn config(&self) -> Config {
        let mut config: Config = self
            .url
            .parse()
            .unwrap_or_else(|e| panic!("the test database URL {} does not parse: {e}", self.url));
        config.password(read_password(&self.password_file));
        config.connect_timeout(CONNECT_TIMEOUT);
        config
    }

    /// A connection to this database as role `acutoken`.
    pub fn connect(&self) -> Client {
        self.config().connect(NoTls).unwrap_or_else(|e| {
            panic!(
                "cannot connect to the test database {} as acutoken: {}",
                self.url,
                describe(&e)
            )
        })
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        // Errors are ignored: a test that stopped the server, or one already
        // panicking, must not turn into an abort here. FORCE ends sessions a
        // test left open (a pool, a killed daemon's connections).
        if let Ok(mut admin) = connect_admin(&self.admin_url) {
            let _ = admin.batch_execute(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ));
        }
    }
}

/// Creates a new, empty database owned by `acutoken`; `name_hint` (any text)
/// shows which test made it.
pub fn fresh(name_hint: &str) -> PgDb {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let settings = Settings::from_env();
    let name = database_name(
        name_hint,
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
    );
    let mut admin = admin();
    // A database of the same name can only be left over from an earlier test
    // process that had this pid and died before its Drop ran.
    // Two statements, not one batch: a batch is one implicit transaction,
    // and neither may run inside one.
    for statement in [
        format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
        format!("CREATE DATABASE \"{name}\" OWNER acutoken"),
    ] {
        admin
            .batch_execute(&statement)
            .unwrap_or_else(|e| panic!("cannot create the test database {name}: {}", describe(&e)));
    }
    PgDb {
        url: database_url(&settings.url, &name),
        name,
        password_file: settings.password_file,
        admin_url: settings.admin_url,
    }
}

/// `acutoken_t_<hint>_<pid>_<counter>`: lowercase `[a-z0-9_]`, the hint cut so
/// the whole fits PostgreSQL's 63 bytes and the unique tail is never cut.
pub fn database_name(hint: &str, pid: u32, counter: u32) -> String {
    let tail = format!("_{pid}_{counter}");
    let room = MAX_NAME - "acutoken_t_".len() - tail.len();
    let hint: String = hint
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(room)
        .collect();
    format!("acutoken_t_{hint}{tail}")
}

/// `url` with its database replaced by `name`, keeping any `?query`.
pub fn database_url(url: &str, name: &str) -> String {
    let authority_start = url.find("://").map_or(0, |i| i + 3);
    let (head, query) = match url.find('?') {
        Some(i) => url.split_at(i),
        None => (url, ""),
    };
    let base = match head[authority_start..].find('/') {
        Some(i) => &head[..authority_start + i],
        None => head,
    };
    format!("{base}/{name}{query}")
}

/// Where PostgreSQL 15's server binaries are (the Debian package's path).
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A bound on a private cluster's start, stop and promotion.
const CLUSTER_WAIT: Duration = Duration::from_secs(60);

/// A private PostgreSQL 15 cluster that one test starts, stops, kills and
/// promotes as it likes, unlike the shared server of `.ci/pg`, which other
/// tests use and which must never be stopped. Its own temp directory (data,
/// socket, log), a free loopback port, role `acutoken` (password from
/// [`Cluster::password_file`], scram) owning database `acutoken`; the
/// superuser `postgres` is trusted on loopback, for replication too.
/// Stopped (immediate) and removed on drop.
pub struct Cluster {
    /// Root-owned; holds the password file and the server's directory.
    dir: tempfile::TempDir,
    /// Owned by the server's user: the data directory, the socket, the log.
    server_dir: PathBuf,
    data: PathBuf,
    log: PathBuf,
    pub port: u16,
    /// Role `acutoken`'s password (0600), as the product reads it.
    pub password_file: PathBuf,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("data", &self.data)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// A new primary: initdb, started on a free loopback port, with role
    /// and database `acutoken`. Panics saying what failed (the server's log
    /// included) when it cannot be made.
    pub fn start() -> Cluster {
        let mut cluster = Cluster::empty();
        let initdb_log = cluster.server_dir.join("initdb.log");
        let mut cmd = cluster.as_server(Path::new(PG_BIN).join("initdb"));
        cmd.args([
            "-D".as_ref(),
            cluster.data.as_os_str(),
            "-U".as_ref(),
            "postgres".as_ref(),
            "-A".as_ref(),
            "trust".as_ref(),
            "-E".as_ref(),
            "UTF8".as_ref(),
            "--locale=C.UTF-8".as_ref(),
        ]);
        cluster.run_ok(&mut cmd, "initdb", Some(&initdb_log));
        // First matching line wins: the superuser is trusted (and may
        // replicate, for `standby_of`), every other role sends its password.
        std::fs::write(
            cluster.data.join("pg_hba.conf"),
            "local all         postgres              trust\n\
             host  all         postgres 127.0.0.1/32 trust\n\
             local replication postgres              trust\n\
             host  replication postgres 127.0.0.1/32 trust\n\
             local all         all                   scram-sha-256\n\
             host  all         all      127.0.0.1/32 scram-sha-256\n",
        )
        .unwrap();
        cluster.chown_to_server(&cluster.data.join("pg_hba.conf"));
        cluster.append_conf(
            "password_encryption = 'scram-sha-256'\n\
             wal_level = replica\n\
             max_wal_senders = 5\n\
             hot_standby = on\n\
             max_connections = 100\n",
        );
        cluster.start_on_a_free_port();

        let password = format!("{:032x}", rand::random::<u128>());
        write_private(&cluster.password_file, &format!("{password}\n"));
        cluster
            .admin("postgres", |c| {
                // The password is sent as a literal (no parameters in utility
                // statements); it is hex, so needs no quoting beyond the quotes.
                c.batch_execute(&format!("CREATE ROLE acutoken LOGIN PASSWORD '{password}'"))?;
                c.batch_execute("CREATE DATABASE acutoken OWNER acutoken")
            })
            .unwrap_or_else(|e| {
                panic!("cannot create role and database acutoken: {}", describe(&e))
            });
        cluster
    }

    /// A streaming standby of `primary` (`pg_basebackup -R`), started, and
    /// the primary made to wait for it on every commit
    /// (`synchronous_standby_names = '*'`, `synchronous_commit = on`): a
    /// commit the primary acknowledged is on the standby. Returns once the
    /// standby streams as the synchronous one.
    pub fn standby_of(primary: &Cluster) -> Cluster {
        let mut standby = Cluster::empty();
        let mut cmd = standby.as_server(Path::new(PG_BIN).join("pg_basebackup"));
        cmd.arg("-D")
            .arg(&standby.data)
            .args(["-h", "127.0.0.1", "-U", "postgres", "-R", "-X", "stream"])
            .args(["-c", "fast", "-p"])
            .arg(primary.port.to_string());
        standby.run_ok(&mut cmd, "pg_basebackup", None);
        std::fs::copy(&primary.password_file, &standby.password_file).unwrap();
        // The copy's configuration names the primary's port and socket
        // directory; the last line of postgresql.conf wins.
        standby.start_on_a_free_port();

        // Set on the primary only, after the copy: a promoted standby that
        // inherited it would wait forever for a standby of its own.
        primary
            .admin("postgres", |c| {
                // One statement each: a batch is one transaction, and
                // ALTER SYSTEM may not run inside one.
                c.batch_execute("ALTER SYSTEM SET synchronous_standby_names = '*'")?;
                c.batch_execute("ALTER SYSTEM SET synchronous_commit = 'on'")?;
                c.query_one("SELECT pg_reload_conf()", &[]).map(drop)
            })
            .unwrap_or_else(|e| panic!("cannot make the standby synchronous: {}", describe(&e)));
        let deadline = std::time::Instant::now() + CLUSTER_WAIT;
        loop {
            let sync: i64 = primary
                .admin("postgres", |c| {
                    c.query_one(
                        "SELECT count(*) FROM pg_stat_replication
                         WHERE state = 'streaming' AND sync_state = 'sync'",
                        &[],
                    )
                    .map(|r| r.get(0))
                })
                .unwrap_or_else(|e| panic!("pg_stat_replication: {}", describe(&e)));
            if sync == 1 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the standby on port {} never became the primary's synchronous standby; \
                 its log:\n{}",
                standby.port,
                standby.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        standby
    }

    /// `127.0.0.1:PORT`, for a multi-host URL.
    pub fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `postgres://acutoken@127.0.0.1:PORT/acutoken`: no password in it.
    pub fn url(&self) -> String {
        format!("postgres://acutoken@{}/acutoken", self.host_port())
    }

    /// Kills the server as a crash or a power cut would (`pg_ctl -m
    /// immediate`): no checkpoint, sessions cut.
    pub fn stop_immediate(&self) {
        self.run_ok(
            self.pg_ctl().args(["-m", "immediate", "stop"]),
            "pg_ctl stop -m immediate",
            Some(&self.log),
        );
    }

    /// Starts it again on the same port, after [`Cluster::stop_immediate`]
    /// (crash recovery runs first).
    pub fn start_again(&self) {
        self.run_ok(
            self.pg_ctl().arg("-l").arg(&self.log).arg("start"),
            "pg_ctl start",
            Some(&self.log),
        );
    }

    /// Promotes a standby to a primary; returns once it accepts writes.
    pub fn promote(&self) {
        self.run_ok(
            self.pg_ctl().arg("promote"),
            "pg_ctl promote",
            Some(&self.log),
        );
        let read_only: bool = self
            .admin("postgres", |c| {
                c.query_one("SELECT pg_is_in_recovery()", &[])
                    .map(|r| r.get(0))
            })
            .unwrap_or_else(|e| panic!("after promotion: {}", describe(&e)));
        assert!(!read_only, "the promoted server is still in recovery");
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `f` with a superuser session in database `db`, on a thread of
    /// its own: the blocking client may not run on a runtime's thread.
    pub fn admin<T: Send>(
        &self,
        db: &str,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error> + Send,
    ) -> Result<T, postgres::Error> {
        let mut config = Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .dbname(db)
            .connect_timeout(CONNECT_TIMEOUT);
        std::thread::scope(|s| {
            s.spawn(move || f(&mut config.connect(NoTls)?))
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// The directories, not yet a cluster; panics when PostgreSQL 15 is not
    /// installed.
    fn empty() -> Cluster {
        for tool in ["initdb", "pg_ctl", "pg_basebackup", "postgres"] {
            let path = Path::new(PG_BIN).join(tool);
            assert!(
                path.exists(),
                "{} is missing: the failover tests need PostgreSQL 15's server \
                 (apt-get install postgresql-15)",
                path.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("acutoken-pgc")
            .tempdir()
            .unwrap();
        // The server's user must pass through the root-owned directory.
        set_mode(dir.path(), 0o755);
        let server_dir = dir.path().join("server");
        std::fs::create_dir(&server_dir).unwrap();
        set_mode(&server_dir, 0o700);
        let cluster = Cluster {
            data: server_dir.join("data"),
            log: server_dir.join("log"),
            password_file: dir.path().join("password"),
            server_dir,
            dir,
            port: 0,
        };
        cluster.chown_to_server(&cluster.server_dir);
        cluster
    }

    /// Picks a free port and starts the server on it, again on another if
    /// one was taken between the choice and the bind.
    fn start_on_a_free_port(&mut self) {
        for attempt in 1..=5 {
            self.port = free_loopback_port();
            self.append_conf(&format!(
                "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n",
                self.port,
                self.server_dir.display()
            ));
            let out = self
                .pg_ctl()
                .arg("-l")
                .arg(&self.log)
                .arg("start")
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            let log = self.log_text();
            if attempt < 5 && log.contains("could not bind") {
                continue;
            }
            panic!(
                "pg_ctl start failed ({}): {}{}\nthe server's log:\n{log}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Appends lines to postgresql.conf (the last setting of a name wins).
    fn append_conf(&self, lines: &str) {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))
            .unwrap();
        f.write_all(lines.as_bytes()).unwrap();
    }

    /// `pg_ctl -D DATA -w -t 60`, as the server's user.
    fn pg_ctl(&self) -> std::process::Command {
        let mut cmd = self.as_server(Path::new(PG_BIN).join("pg_ctl"));
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", &CLUSTER_WAIT.as_secs().to_string()]);
        cmd
    }

    /// `program` as the server's user: PostgreSQL refuses to run as root,
    /// so as root (CI) it runs through `runuser -u postgres`. Its working
    /// directory is the server's own, which that user can read.
    fn as_server(&self, program: PathBuf) -> std::process::Command {
        let mut cmd = if nix::unistd::geteuid().is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            std::process::Command::new(program)
        };
        cmd.current_dir(&self.server_dir)
            .stdin(std::process::Stdio::null());
        cmd
    }

    /// Runs `cmd` to its end; panics with its output (and `log`) unless it
    /// succeeded.
    fn run_ok(&self, cmd: &mut std::process::Command, what: &str, log: Option<&Path>) {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
        if !out.status.success() {
            let log = log
                .and_then(|l| std::fs::read_to_string(l).ok())
                .unwrap_or_default();
            panic!(
                "{what} failed ({}) for the cluster in {}: {}{}\nlog:\n{log}",
                out.status,
                self.data.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Hands `path` to the server's user when running as root.
    fn chown_to_server(&self, path: &Path) {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let user = nix::unistd::User::from_name("postgres")
            .ok()
            .flatten()
            .expect("running as root, the failover tests need the `postgres` user");
        std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Errors are ignored: the server may be stopped already, and a test
        // that is panicking must not abort here. The directory goes with
        // `dir` afterwards.
        if self.data.join("postmaster.pid").exists() {
            let _ = self
                .pg_ctl()
                .args(["-m", "immediate", "stop"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// A loopback port free a moment ago.
fn free_loopback_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Writes `text` to a new file only its owner may read (0600).
fn write_private(path: &Path, text: &str) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}
