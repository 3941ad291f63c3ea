//! DESIGN §3 invariant 3: one daemon per store, by an exclusive lock beside
//! the SQLite file, or by the store's serve lock on PostgreSQL.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::config::StoreTarget;
use crate::store::postgres::{Hold, ServeLock};

/// The lock file beside a store: `acutoken.db` -> `acutoken.db.lock`.
pub fn lock_path(store: &Path) -> PathBuf {
    let mut name = store.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    store.with_file_name(name)
}

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another daemon serves this store: stop it first, or point this one elsewhere.
    #[error(
        "another acutoken daemon holds the store lock {path} ({holder}): stop it first, or use another store.path"
    )]
    Held { path: PathBuf, holder: String },
    /// The lock file could not be created or opened.
    #[error("cannot open the lock file {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// The held lock; released when dropped (and by the kernel, or the
/// database server, if the process dies).
#[derive(Debug)]
pub struct StoreLock {
    _held: Held,
    path: PathBuf,
}

#[derive(Debug)]
enum Held {
    File(#[allow(dead_code)] File),
    Postgres(Box<PgHeld>),
}

/// The PostgreSQL serve lock, and what it takes to take it again.
#[derive(Debug)]
struct PgHeld {
    lock: std::sync::Mutex<ServeLock>,
    target: crate::config::PgTarget,
    holder: String,
}

/// What [`StoreLock::check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockHealth {
    /// Held, by this process.
    Held,
    /// Its session had ended (a database restart or failover); taken again.
    Renewed,
    /// The database cannot be reached: the lock cannot be known.
    Unreachable(String),
    /// Another daemon took the store while this one was cut off.
    TakenBy(String),
}

impl StoreLock {
    /// Takes the lock of the store `target` names, to have it alone: a
    /// SQLite file's lock, or PostgreSQL's serve lock held exclusively (no
    /// replica serves meanwhile).
    pub fn acquire_target(target: &StoreTarget) -> anyhow::Result<StoreLock> {
        Self::take(target, Hold::Alone)
    }

    /// Takes the lock a daemon serves the store under: a SQLite file's
    /// lock, or on PostgreSQL the name lock of replica `name`, beside any
    /// other replicas (DESIGN §10).
    pub fn serve(target: &StoreTarget, name: &str) -> anyhow::Result<StoreLock> {
        Self::take(target, Hold::Replica(name.to_string()))
    }

    fn take(target: &StoreTarget, hold: Hold) -> anyhow::Result<StoreLock> {
        match target {
            StoreTarget::File(path) => Ok(StoreLock::acquire(path)?),
            StoreTarget::Postgres(pg) => {
                let holder = crate::store::Owner::current("serve").as_str().to_string();
                let path = match &hold {
                    Hold::Alone => format!("the serve lock of {}", pg.display),
                    Hold::Replica(name) => format!("replica `{name}` of {}", pg.display),
                };
                let lock = ServeLock::acquire(pg, &holder, hold)?;
                Ok(StoreLock {
                    _held: Held::Postgres(Box::new(PgHeld {
                        lock: std::sync::Mutex::new(lock),
                        target: pg.clone(),
                        holder,
                    })),
                    path: PathBuf::from(path),
                })
            }
        }
    }

    /// Whether the lock is still held, taking it again when its session
    /// ended and nobody else took it meanwhile. Blocks (asks the database).
    pub fn check(&self) -> LockHealth {
        let Held::Postgres(held) = &self._held else {
            return LockHealth::Held;
        };
        let PgHeld {
            lock,
            target,
            holder,
        } = held.as_ref();
        let mut lock = lock.lock().unwrap_or_else(|e| e.into_inner());
        if lock.is_held() {
            return LockHealth::Held;
        }
        match ServeLock::acquire(target, holder, lock.hold().clone()) {
            Ok(again) => {
                *lock = again;
                LockHealth::Renewed
            }
            Err(
                crate::store::StoreError::Served { holder, .. }
                | crate::store::StoreError::ReplicaNameTaken { holder, .. },
            ) => LockHealth::TakenBy(holder),
            Err(e) => LockHealth::Unreachable(e.to_string()),
        }
    }

    /// Takes the exclusive lock, writing who holds it into the file.
    pub fn acquire(store: &Path) -> Result<StoreLock, LockError> {
        let path = lock_path(store);
        let io = |error| LockError::Io {
            path: path.clone(),
            error,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        // A CLI probing with a shared lock holds it for microseconds: retry briefly.
        let mut tries = 0;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) if tries < 20 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(TryLockError::WouldBlock) => {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    let holder = holder.trim();
                    return Err(LockError::Held {
                        path,
                        holder: if holder.is_empty() {
                            "a process that did not say who it is".into()
                        } else {
                            holder.to_string()
                        },
                    });
                }
                Err(TryLockError::Error(e)) => return Err(io(e)),
            }
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(
            file,
            "pid {} started {}",
            std::process::id(),
            crate::model::fmt_time(chrono::Utc::now())
        )
        .map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(StoreLock {
            _held: Held::File(file),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// True when a daemon on this machine serves the store `target` names: on
/// PostgreSQL, one holds the serve lock and this machine has its socket.
pub fn held_target(target: &StoreTarget, socket: &Path) -> bool {
    match target {
        StoreTarget::File(path) => held(path),
        StoreTarget::Postgres(pg) => {
            socket.exists() && crate::store::postgres::served(pg).unwrap_or(false)
        }
    }
}

/// True when a daemon holds the lock of the store at `store`.
pub fn held(store: &Path) -> bool {
    let path = lock_path(store);
    let Ok(file) = File::open(&path) else {
        return false;
    };
    match file.try_lock_shared() {
        Ok(()) => false,
        Err(TryLockError::WouldBlock) => true,
        Err(TryLockError::Error(_)) => false,
    }
}
