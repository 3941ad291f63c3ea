//! The store: one SQLite file, every SQL statement of acutoken.
//!
//! WAL mode and a busy timeout let the CLI and a running daemon share the file.
//! Writes go through [`Store::write`], an immediate transaction that rolls back
//! when dropped without commit. Every write that touches a connection bumps a
//! store-wide change sequence, which a running daemon follows to pick up CLI
//! writes within a second without a reload.

pub mod alerts;
pub mod authorizations;
pub mod blocking;
pub mod claims;
pub mod connections;
pub mod copy;
pub mod edits;
pub mod events;
mod fresh;
mod handle;
pub mod keys;
mod migrations;
pub mod postgres;
pub mod refresh;
pub mod replicas;
pub mod sql;
#[cfg(test)]
pub(crate) mod testing;
pub mod upkeep;

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use rusqlite::OpenFlags;

use sql::{Db, Transaction, TransactionBehavior};

use crate::config::StoreTarget;
use crate::crypto::{CryptoError, Keyring};
use crate::model::Timestamp;

pub use authorizations::{Authorization, CallbackLookup};
pub use claims::{Claim, ClaimOutcome, Owner, RefreshSave};
pub use connections::SecretColumn;
pub use events::Event;
pub use fresh::{Fresh, Leftovers};
pub use handle::{BATCH_MAX, StoreHandle, WriterStats};
pub use keys::{
    KeyResolution, PendingKey, SharedKeyring, resolve_keyring, resolve_keyring_deferred,
    resolve_keyring_for,
};

/// How long a writer waits for another process's lock before giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the store can fail with; each variant says what the caller does.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No store file: the command names where it looked; only add/import/serve create one.
    #[error(
        "no store at {path}: add a connection first (`acutoken connection add`) or set store.path"
    )]
    Missing { path: PathBuf },
    /// The key does not belong to this store: refuse before reading or writing anything.
    #[error(
        "the key from {origin} does not open the store {path}: it was sealed with another key (check store.key_file, the systemd credential, ACUTOKEN_KEY, or acutoken.key beside the store)"
    )]
    WrongKey { origin: String, path: PathBuf },
    /// The key was retired by `key rotate`: the store is sealed under the
    /// newer key given to the rotation, which must now be the one found.
    #[error(
        "the key from {origin} was retired from the store {path} by `acutoken key rotate` at {at}: the store is now sealed under the key given to the rotation (--new-key-file); make that file the key acutoken finds (the systemd credential, store.key_file, ACUTOKEN_KEY, or acutoken.key beside the store) and start again"
    )]
    RetiredKey {
        origin: String,
        path: PathBuf,
        at: String,
    },
    /// A store exists but no key was found anywhere: the operator must supply it.
    #[error(
        "the store {path} exists but no key was found (looked in $CREDENTIALS_DIRECTORY/acutoken.key, store.key_file, ACUTOKEN_KEY and {beside}): supply the key it was created with"
    )]
    NoKey { path: PathBuf, beside: PathBuf },
    /// A PostgreSQL store takes its key only from a source the operator names.
    #[error(
        "no key for the store {store}: a store on PostgreSQL takes its key from the systemd credential acutoken.key, store.key_file or ACUTOKEN_KEY (the same key on every machine that serves it); make one with `acutoken key generate --out FILE`, or use the key of the SQLite store you copy from"
    )]
    NoPostgresKey { store: String },
    /// Another daemon serves this PostgreSQL store.
    #[error(
        "another acutoken process holds the store {store} ({holder}): this needs the store to itself, so stop every daemon that serves it, or wait for that command to finish"
    )]
    Served { store: String, holder: String },
    /// A live replica of this PostgreSQL store already has this name.
    #[error(
        "another acutoken replica named `{name}` serves the store {store} ({holder}): give this one another serve.replica_name, or stop that one first"
    )]
    ReplicaNameTaken {
        store: String,
        name: String,
        holder: String,
    },
    /// The file was made by a newer acutoken: upgrade the binary.
    #[error(
        "the store {path} has schema version {found}, newer than this acutoken knows ({known}): upgrade acutoken"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    /// A key problem (malformed, too open, unreadable, value that does not open).
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// No connection by that name: the caller names it back to the user.
    #[error("no connection named `{0}` (see `acutoken connection list`)")]
    UnknownConnection(String),
    /// The name is taken: pick another.
    #[error("a connection named `{0}` already exists")]
    DuplicateName(String),
    /// Another process held the database lock past the busy timeout: try again.
    #[error("the store is busy (another acutoken process holds its lock): try again")]
    Busy,
    /// The disk is full or the file is read-only: a rotated token may need to be kept elsewhere.
    #[error("the store cannot be written: {0}")]
    Unwritable(String),
    /// Creating or opening files failed.
    #[error("{what} {path}: {error}")]
    Io {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    /// The caller abandoned the write (it found its input bad): nothing was written.
    #[error("the write was abandoned: nothing was written")]
    Cancelled,
    /// Any other SQLite failure.
    #[error("store error: {0}")]
    Sql(rusqlite::Error),
    /// Any other PostgreSQL failure, in the server's words.
    #[error("store error: {0}")]
    Postgres(String),
    /// A row holds a value this version cannot read (hand-edited or corrupt).
    #[error("the store holds an unreadable value: {0}")]
    Corrupt(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode;
        match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Busy,
            Some(ErrorCode::DiskFull | ErrorCode::ReadOnly | ErrorCode::CannotOpen) => {
                StoreError::Unwritable(e.to_string())
            }
            Some(ErrorCode::SystemIoFailure) => StoreError::Unwritable(e.to_string()),
            _ => StoreError::Sql(e),
        }
    }
}

impl From<sql::Error> for StoreError {
    fn from(e: sql::Error) -> Self {
        match e {
            sql::Error::Sqlite(e) => e.into(),
            sql::Error::Pg(e) => from_postgres(&e),
            sql::Error::Aborted => StoreError::Postgres(sql::Error::Aborted.to_string()),
            sql::Error::Unreachable(why) => StoreError::Unwritable(why),
            sql::Error::Nested => StoreError::Postgres(sql::Error::Nested.to_string()),
        }
    }
}

/// What a PostgreSQL failure means to the caller. A server that cannot be
/// reached, is shutting down, is read-only (a standby) or is out of disk
/// cannot take a write now, exactly as a full or read-only SQLite file: a
/// rotated token is then held and spilled (DESIGN §3 invariant 2).
fn from_postgres(e: &tokio_postgres::Error) -> StoreError {
    use tokio_postgres::error::SqlState;
    let message = sql::pg_message(e);
    let Some(code) = e.code() else {
        // No SQLSTATE: the connection failed or closed, or a value could
        // not be sent or read (a bug, not an outage).
        return if e.is_closed()
            || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
        {
            StoreError::Unwritable(format!("the database cannot be reached: {message}"))
        } else {
            StoreError::Postgres(message)
        };
    };
    if [
        SqlState::LOCK_NOT_AVAILABLE,
        SqlState::T_R_SERIALIZATION_FAILURE,
        SqlState::T_R_DEADLOCK_DETECTED,
    ]
    .contains(code)
    {
        StoreError::Busy
    } else if [
        SqlState::ADMIN_SHUTDOWN,
        SqlState::CRASH_SHUTDOWN,
        SqlState::CANNOT_CONNECT_NOW,
        SqlState::READ_ONLY_SQL_TRANSACTION,
        SqlState::DISK_FULL,
        SqlState::INSUFFICIENT_RESOURCES,
        SqlState::OUT_OF_MEMORY,
        SqlState::TOO_MANY_CONNECTIONS,
        SqlState::CONNECTION_EXCEPTION,
        SqlState::CONNECTION_FAILURE,
        SqlState::CONNECTION_DOES_NOT_EXIST,
        SqlState::IDLE_SESSION_TIMEOUT,
    ]
    .contains(code)
    {
        StoreError::Unwritable(format!("the database cannot take writes now: {message}"))
    } else {
        StoreError::Postgres(message)
    }
}

impl StoreError {
    /// True when the failure is about being unable to write (disk full, read-only, I/O).
    pub fn is_unwritable(&self) -> bool {
        matches!(self, StoreError::Unwritable(_))
    }

    /// True when the failure is about one row as it stands in the store: a
    /// column that does not decode or a sealed value that does not open.
    /// Retrying soon cannot help; a person must fix the row.
    pub fn is_row_fault(&self) -> bool {
        use rusqlite::Error as E;
        matches!(
            self,
            StoreError::Corrupt(_)
                | StoreError::Crypto(CryptoError::Open { .. })
                | StoreError::Sql(
                    E::InvalidColumnType(..)
                        | E::FromSqlConversionFailure(..)
                        | E::IntegralValueOutOfRange(..)
                        | E::Utf8Error(..),
                )
        )
    }
}

/// An open, key-verified store.
pub struct Store {
    db: Db,
    /// The SQLite file, or what names the PostgreSQL database in messages
    /// (`user@host:port/db`).
    path: PathBuf,
    /// Where it lives, to open more connections to it.
    target: Box<StoreTarget>,
    /// Shared by every handle of a daemon ([`Store::open_shared`]), so a key
    /// rotation switches them all at once.
    keyring: SharedKeyring,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.path.display())
    }
}

/// Whether opening may create the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// The store must exist.
    No,
    /// Create it (with its parent directory, 0700, when missing).
    Yes,
}

impl Store {
    /// Opens (or creates) the store at `path`, verifying `keyring` before anything is written.
    pub fn open(path: &Path, keyring: Keyring, create: Create) -> Result<Store, StoreError> {
        Store::open_shared(path, &SharedKeyring::new(keyring), create)
    }

    /// [`Store::open`] with a keyring shared with other handles: replacing it
    /// ([`SharedKeyring::replace`], [`Store::set_keyring`]) switches every
    /// handle opened with it at once (the daemon's, during a key rotation).
    pub fn open_shared(
        path: &Path,
        keyring: &SharedKeyring,
        create: Create,
    ) -> Result<Store, StoreError> {
        let keyring = keyring.clone();
        let exists = path.exists();
        if !exists {
            if create == Create::No {
                return Err(StoreError::Missing {
                    path: path.to_path_buf(),
                });
            }
            create_file(path)?;
        }
        let db = rusqlite::Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError::Io {
            what: "cannot open the store",
            path: path.to_path_buf(),
            error: std::io::Error::other(e.to_string()),
        })?;
        db.busy_timeout(BUSY_TIMEOUT)?;
        let db = Db::sqlite(db);
        let mut store = Store {
            db,
            path: path.to_path_buf(),
            target: Box::new(StoreTarget::File(path.to_path_buf())),
            keyring,
        };
        let version: i64 = store
            .db
            .query_row("PRAGMA user_version", (), |r| r.get(0))?;
        too_new(&store.path, version)?;
        if version > 0 {
            // Verify before any write: a wrong key must leave the file untouched.
            keys::verify(&store)?;
        }
        store.db.pragma_update("journal_mode", "WAL")?;
        store.db.pragma_update("synchronous", "FULL")?;
        store.db.pragma_update("foreign_keys", "ON")?;
        store.migrate(version)?;
        if version == 0 {
            keys::register_primary(&store)?;
        }
        Ok(store)
    }

    /// Opens the store `target` names: the SQLite file ([`Store::open_shared`])
    /// or the PostgreSQL database. On PostgreSQL an empty database is a store
    /// not made yet: `create` decides whether this makes it.
    pub fn open_target(
        target: &StoreTarget,
        keyring: &SharedKeyring,
        create: Create,
    ) -> Result<Store, StoreError> {
        let pg = match target {
            StoreTarget::File(path) => return Store::open_shared(path, keyring, create),
            StoreTarget::Postgres(pg) => pg,
        };
        let db = postgres::connect(pg)?;
        let store = Store {
            db,
            path: PathBuf::from(&pg.display),
            target: Box::new(target.clone()),
            keyring: keyring.clone(),
        };
        let version = postgres::version(&store.db)?;
        too_new(&store.path, version)?;
        if version == 0 && create == Create::No {
            return Err(StoreError::Missing {
                path: store.path.clone(),
            });
        }
        if version > 0 {
            // Verify before any write: a wrong key must leave the database untouched.
            keys::verify(&store)?;
        }
        postgres::migrate(&store.db)?;
        // The first key is registered under the write lock, so two
        // processes making the store at once cannot both register theirs.
        let first = {
            let tx = store
                .db
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            let keys: i64 = tx.query_row("SELECT COUNT(*) FROM keys", (), |r| r.get(0))?;
            if keys == 0 {
                keys::register_primary(&store)?;
            }
            tx.commit()?;
            keys == 0
        };
        if !first {
            keys::verify(&store)?;
        }
        Ok(store)
    }

    /// Where this store lives.
    pub fn target(&self) -> &StoreTarget {
        &self.target
    }

    /// True when the store is a PostgreSQL database.
    pub fn is_postgres(&self) -> bool {
        matches!(*self.target, StoreTarget::Postgres(_))
    }

    fn migrate(&mut self, from: i64) -> Result<(), StoreError> {
        for (i, sql) in migrations::MIGRATIONS
            .iter()
            .enumerate()
            .skip(from as usize)
        {
            let tx = self
                .db
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute_batch(sql)?;
            tx.pragma_update("user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The keyring that seals and opens this store's secrets now.
    pub fn keyring(&self) -> Arc<Keyring> {
        self.keyring.current()
    }

    /// The shared cell behind [`Store::keyring`], to open more handles on it.
    pub fn shared_keyring(&self) -> &SharedKeyring {
        &self.keyring
    }

    /// Runs `f` in an immediate write transaction; commits when it returns `Ok`.
    pub fn write<T>(
        &mut self,
        f: impl FnOnce(&Transaction<'_>, &Keyring) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let tx = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        // One keyring for the whole transaction, even if it is replaced meanwhile.
        let keyring = self.keyring.current();
        let out = f(&tx, &keyring)?;
        tx.commit()?;
        Ok(out)
    }

    /// Prepares this connection for one large write transaction of about
    /// `bytes` of new pages (`connection import`). SQLite keeps up to that
    /// much in its page cache (the default is 2 MB), so nothing spills to the
    /// WAL and is read back before the commit, and keeps its statement
    /// journals in memory instead of a temporary file that every multi-row
    /// INSERT would write through.
    pub fn prepare_bulk_write(&self, bytes: usize) -> Result<(), StoreError> {
        let kib = (bytes / 1024).max(2048) as i64;
        self.db.pragma_update("cache_size", -kib)?;
        self.db.pragma_update("temp_store", "MEMORY")?;
        Ok(())
    }

    /// Read access for queries that need no transaction.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The connection itself, for the group-commit writer's transactions.
    fn db_mut(&mut self) -> &mut Db {
        &mut self.db
    }

    /// A number that changes when another connection commits: SQLite's
    /// `data_version`. PostgreSQL has no such counter; there it is a row
    /// every write transaction moves (this connection's own writes too,
    /// which only costs a reread).
    pub fn data_version(&self) -> Result<i64, StoreError> {
        if self.is_postgres() {
            return Ok(self
                .db
                .prepare_cached("SELECT value FROM meta WHERE key = 'data_version'")?
                .query_row((), |r| r.get(0))?);
        }
        // Asked on every token request: the prepared statement is kept.
        Ok(self
            .db
            .prepare_cached("PRAGMA data_version")?
            .query_row((), |r| r.get(0))?)
    }

    /// Writes a consistent online copy to `dest` (mode 0600), refusing to overwrite.
    pub fn backup(&self, dest: &Path) -> Result<(), StoreError> {
        if dest.exists() {
            return Err(StoreError::Io {
                what: "refusing to overwrite",
                path: dest.to_path_buf(),
                error: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            });
        }
        if self.is_postgres() {
            // PostgreSQL's own backups are the server's; this writes the
            // store as a SQLite file any acutoken opens with the same key.
            let copied = Store::open_shared(dest, &self.keyring, Create::Yes).and_then(|mut to| {
                to.write(|tx, _| copy::copy_into(self, tx, |_| {}))?;
                to.db.close()?;
                Ok(())
            });
            if copied.is_err() {
                let _ = fs::remove_file(dest);
            }
            return copied;
        }
        create_file(dest)?;
        let quoted = dest.to_string_lossy().replace('\'', "''");
        if let Err(e) = self.db.execute_batch(&format!("VACUUM INTO '{quoted}'")) {
            let _ = fs::remove_file(dest);
            return Err(e.into());
        }
        Ok(())
    }

    /// Runs `PRAGMA integrity_check`; `Ok(())` when the file is sound.
    pub fn integrity_check(&self) -> Result<(), StoreError> {
        let result: String = self
            .db
            .query_row("PRAGMA integrity_check", (), |r| r.get(0))?;
        if result == "ok" {
            Ok(())
        } else {
            Err(StoreError::Corrupt(result))
        }
    }
}

/// Refuses a store whose schema is newer than this binary's migrations.
fn too_new(path: &Path, found: i64) -> Result<(), StoreError> {
    let known = migrations::MIGRATIONS.len() as i64;
    if found > known {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found,
            known,
        });
    }
    Ok(())
}

/// Creates an empty file with mode 0600 (its parent 0700 when we create it).
fn create_file(path: &Path) -> Result<(), StoreError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.exists()
    {
        {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|error| StoreError::Io {
                    what: "cannot create the directory",
                    path: parent.to_path_buf(),
                    error,
                })?;
        }
    }
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(|error| StoreError::Io {
            what: "cannot create",
            path: path.to_path_buf(),
            error,
        })
}

/// Times are stored as Unix milliseconds. Every representable time fits an
/// `i64` of milliseconds (chrono's range is about ±262 000 years), so this
/// cannot overflow.
pub(crate) fn to_ms(t: Timestamp) -> i64 {
    t.timestamp_millis()
}

/// A stored time. A value beyond chrono's range (only a hand-edited or
/// corrupt row holds one, e.g. `i64::MAX`) reads as the start of representable
/// time rather than failing the read or panicking. "Long ago" is the loud,
/// self-healing reading: a refresh or deadline that long ago is due at once
/// and re-planned from a real time, a claim that old is recovered; "the end of
/// time" would silently mean "never", and a never-refreshed token dies.
pub(crate) fn from_ms(ms: i64) -> Timestamp {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// `execute` through the connection's statement cache: the refresh path runs
/// the same few statements thousands of times, and parsing them each time
/// cost more than running them.
pub(crate) fn exec<P: sql::Params>(db: &Db, sql: &str, params: P) -> sql::Result<usize> {
    db.prepare_cached(sql)?.execute(params)
}

/// `query_row` through the statement cache (see [`exec`]).
pub(crate) fn row<T, P, F>(db: &Db, sql: &str, params: P, f: F) -> sql::Result<T>
where
    P: sql::Params,
    F: FnOnce(&sql::Row<'_>) -> rusqlite::Result<T>,
{
    db.prepare_cached(sql)?.query_row(params, f)
}

/// Bumps and returns the store-wide change sequence (inside a write transaction).
pub(crate) fn next_seq(tx: &Transaction<'_>) -> Result<i64, StoreError> {
    let mut stmt = tx.prepare_cached(
        "UPDATE meta SET value = value + 1 WHERE key = 'change_seq' RETURNING value",
    )?;
    Ok(stmt.query_row((), |r| r.get(0))?)
}
