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
