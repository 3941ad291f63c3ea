//! Starting `serve`: the store opened and locked, rotated tokens spilled by a
//! previous run imported, every connection planned, and alert conditions
//! brought in line with the store before anything is delivered.

use std::collections::HashSet;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use anyhow::Context as _;

use crate::alerts::{AlertFacts, AlertKind};
use crate::config::{Config, StoreTarget};
use crate::daemon::lock::StoreLock;
use crate::model::{Fault, Timestamp};
use crate::renewal::engine::import_spilled;
use crate::renewal::scheduler::Scheduler;
use crate::store::refresh::DesiredAlerts;
use crate::store::{self, Create, SharedKeyring, Store, StoreHandle};

/// The store as `serve` holds it: its path, its lock, and its keyring.
pub(super) struct Opened {
    /// The SQLite file, or the PostgreSQL database as messages name it.
    pub(super) path: PathBuf,
    target: StoreTarget,
    /// Held until the daemon has stopped: one daemon per store.
    pub(super) lock: std::sync::Arc<StoreLock>,
    /// One keyring for every handle: a key rotation switches them all at once.
    keyring: SharedKeyring,
}

/// The handles opened at start.
pub(super) struct Handles {
    /// The handle the engine writes through (becomes the [`StoreHandle`]).
    pub(super) engine: Store,
    /// The store watcher's read handle.
    pub(super) watcher: Store,
    /// The alert delivery worker's handle.
    pub(super) alerts: Store,
}

impl Opened {
    pub(super) fn is_postgres(&self) -> bool {
        matches!(self.target, StoreTarget::Postgres(_))
    }

    /// Another handle on the same file and keyring.
    pub(super) fn open(&self, create: Create) -> Result<Store, store::StoreError> {
        Store::open_target(&self.target, &self.keyring, create)
    }
}

/// Finds the key, refuses to start on a missing store unless the key was
/// given explicitly (an empty daemon is then intended), creates the
/// store's directory, takes the store lock, and opens the handles. The lock
/// comes before the first handle so that two daemons never share a store.
pub(super) fn open_store(config: &Config) -> anyhow::Result<(Opened, Handles)> {
    let target = config.store_target()?;
    let (path, lock, keys) = match &target {
        StoreTarget::File(path) => {
            let (lock, keys) = lock_file_store(config, path)?;
            (path.clone(), lock, keys)
        }
        StoreTarget::Postgres(pg) => {
            // The key first: without it nothing is opened, and a wrong one
            // is refused by the first handle before anything is written.
            let keys = store::resolve_keyring_for(config, &target, false)?;
            let lock = StoreLock::serve(&target, &config.replica_name())?;
            (PathBuf::from(&pg.display), lock, keys)
        }
    };
    // One keyring for every handle: a key rotation switches them all at once.
    let keyring = store::SharedKeyring::new(keys.keyring.clone());
    let open = |create| Store::open_target(&target, &keyring, create);
    let engine_store = open(Create::Yes)?;
    if engine_store.registered_key_ids()?.len() > 1 {
        // Only a rotation that stopped midway leaves two keys registered.
        tracing::warn!(
            "a key rotation did not finish (the store has more than one key): run `acutoken key rotate --new-key-file FILE` again with the same new key; until then a value it re-sealed opens only if that key is in store.previous_key_files"
        );
    }
    let watcher_store = open(Create::No)?;
    let alerts_store = open(Create::No)?;
    Ok((
        Opened {
            path,
            target: target.clone(),
            lock: std::sync::Arc::new(lock),
            keyring,
        },
        Handles {
            engine: engine_store,
            watcher: watcher_store,
            alerts: alerts_store,
        },
    ))
}

/// The SQLite store's key and lock: a missing store is refused unless the
/// key was given explicitly (an empty daemon is then intended); its
/// directory is made; the lock is taken before the first handle opens.
fn lock_file_store(
    config: &Config,
    path: &std::path::Path,
) -> anyhow::Result<(StoreLock, store::KeyResolution)> {
    let keys = store::resolve_keyring(config, path, false);
    if !path.exists() {
        match &keys {
            Ok(k) if k.explicit => {}
            _ => anyhow::bail!(
                "no store at {}: add connections first (`acutoken connection add` or `import`), or give serve an explicit key (systemd credential, store.key_file or ACUTOKEN_KEY) to start empty",
                path.display()
            ),
        }
    }
    let keys = keys?;
    if let Some(dir) = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty() && !p.exists())
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    Ok((StoreLock::acquire(path)?, keys))
}

/// Imports the rotated tokens a previous run could not save and spilled
/// (invariant 2: they are the only copies), and keeps `store_write_failed`
/// firing while spills that could not be imported wait for a human.
pub(super) fn import_spills(
    engine_store: &mut Store,
    config: &Config,
    now: Timestamp,
) -> anyhow::Result<()> {
    let spilled = import_spilled(engine_store, &config.spill_dirs(), now)?;
    if spilled.imported > 0 {
        tracing::warn!(
            imported = spilled.imported,
            "imported rotated tokens spilled by a previous run"
        );
    }
    alert_rejected_spills(engine_store, config, &spilled.rejected, now)?;
    Ok(())
}

/// What the planning pass found.
pub(super) struct Planned {
    /// The scheduler, loaded with every connection that reads.
    pub(super) scheduler: Scheduler,
    /// Connections whose alert conditions hold or whose alerts fire.
    pub(super) to_sync: Vec<uuid::Uuid>,
    /// How many connections were planned.
    pub(super) scheduled: usize,
    /// Rows that do not read.
    pub(super) faults: Vec<Fault>,
}

/// One streamed pass plans every connection and finds those whose alert
/// conditions hold or whose alerts fire; only these are re-evaluated in the
/// store, before anything is delivered. Nothing secret is read, and a
/// million connections never sit in memory as full rows. A row that does
/// not read is set aside (logged, alerted by [`sync_alerts`]) and the pass
/// goes on.
pub(super) async fn plan(
    engine_store: &StoreHandle,
    scheduler: Scheduler,
    config: &Config,
    now: Timestamp,
) -> anyhow::Result<Planned> {
    let (scheduler, to_sync, scheduled, faults) = {
        let st = engine_store.clone();
        let policy = config.renewal.policy();
        st.read(move |st| -> Result<_, store::StoreError> {
            let mut scheduler = scheduler;
            let firing: HashSet<uuid::Uuid> = store::alerts::firing_connection_ids(st)?
                .iter()
                .filter_map(|k| uuid::Uuid::parse_str(k).ok())
                .collect();
            scheduler.reserve(st.count()?);
            let mut to_sync = Vec::new();
            let mut faults = Vec::new();
            let mut n = 0usize;
            st.each_for_planning(
                |row| {
                    n += 1;
                    if firing.contains(&row.conn.id)
                        || !crate::renewal::alert_conditions::desired(row, &policy, now).is_empty()
                    {
                        to_sync.push(row.conn.id);
                    }
                    scheduler.load(row, now);
                },
                |fault| faults.push(fault),
            )?;
            for fault in &faults {
                tracing::error!(
                    connection = %fault.label(),
                    column = fault.column,
                    "{fault}: the connection is set aside; every other connection goes on"
                );
                scheduler.load_fault(fault, now);
            }
            scheduler.finish_load();
            Ok((scheduler, to_sync, n, faults))
        })
        .await?
    };
    Ok(Planned {
        scheduler,
        to_sync,
        scheduled,
        faults,
    })
}

/// Brings the alerts of the connections [`plan`] picked in line with their
/// conditions, in chunks so no write holds the lock long; then raises one
/// `connection_faulty` alert per row that does not read (kept, not
/// repeated, while it fires) and resolves those fixed or removed while no
/// daemon ran.
pub(super) async fn sync_alerts(
    engine_store: &StoreHandle,
    to_sync: Vec<uuid::Uuid>,
    faults: Vec<Fault>,
    config: &Config,
    now: Timestamp,
) -> anyhow::Result<()> {
    let policy = config.renewal.policy();
    for chunk in to_sync.chunks(500) {
        let policy = policy.clone();
        let desired: DesiredAlerts =
            Box::new(move |row| crate::renewal::alert_conditions::desired(row, &policy, now));
        engine_store
            .sync_connection_alerts(chunk.to_vec(), now, desired)
            .await?;
    }
    // Rows that do not read: one alert each (kept, not repeated, while
    // it fires), and those fixed or removed while no daemon ran resolve.
    engine_store.set_unreadable_alerts(faults, now).await?;
    Ok(())
}

/// Keeps `store_write_failed` firing while spilled tokens that could not be
/// imported wait in a `rejected/` directory for a human; resolves it once
/// they are dealt with (looked at each start).
fn alert_rejected_spills(
    store: &mut Store,
    config: &Config,
    now_rejected: &[(PathBuf, String)],
    now: crate::model::Timestamp,
) -> Result<(), store::StoreError> {
    let mut waiting: Vec<PathBuf> = Vec::new();
    for dir in config.spill_dirs() {
        if let Ok(entries) = std::fs::read_dir(dir.join("rejected")) {
            waiting.extend(entries.flatten().map(|e| e.path()));
        }
    }
    if waiting.is_empty() {
        return store.resolve_global_alert(AlertKind::StoreWriteFailed, now);
    }
    let why = now_rejected
        .first()
        .map(|(_, why)| format!(" ({why})"))
        .unwrap_or_default();
    let facts = AlertFacts::global(
        AlertKind::StoreWriteFailed,
        crate::model::Severity::Critical,
        format!(
            "{} spilled refresh token(s) could not be imported into the store{why}; kept in {}",
            waiting.len(),
            waiting
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        "if they were sealed with a key retired since, add that key to store.previous_key_files, move the files back into the spill directory and restart acutoken; otherwise check the connections named in the files with `acutoken connection show` (they may need re-authorization), then delete the files",
    );
    store.raise_alert(&facts, now)
}
