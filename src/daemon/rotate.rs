//! Key rotation in a running daemon (DESIGN §4, §5): `key rotate` sends the
//! new key over the local socket, and the daemon switches every store handle
//! to it at once, re-seals in short steps while refreshes and token requests
//! go on, re-seals the spill files, and retires the old keys once nothing
//! sealed under them remains. The offline rotation (`cli::keys`) shares the
//! spill and claim helpers.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::crypto::{Key, Keyring};
use crate::store::StoreHandle;
use crate::store::connections::ResealCursor;
use crate::store::{Store, StoreError};

/// Connections read per re-sealing step: each step is one write
/// transaction, a few milliseconds for 500 rows, and a refresh waiting for
/// the engine's store waits at most one step.
const STEP_ROWS: usize = 500;

/// How a rotation stands, as `GET /v1/keys/rotate` answers it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    /// `running`, `done` or `failed`.
    pub state: String,
    /// The id of the new key.
    pub key_id: String,
    /// What the rotation is doing now.
    pub phase: String,
    /// Values sealed under an old key when re-sealing began.
    pub total: u64,
    /// Values re-sealed so far.
    pub resealed: u64,
    /// Spill files re-sealed.
    pub spills_resealed: usize,
    /// Spill files that could not be re-sealed, with why.
    pub spills_failed: Vec<(PathBuf, String)>,
    /// Why the rotation failed (`failed`).
    pub error: Option<String>,
}

impl Progress {
    pub fn running(&self) -> bool {
        self.state == "running"
    }
}

/// The body of `POST /v1/keys/rotate`.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct RotateRequest {
    /// The new key, base64 (as in a key file).
    pub key: String,
    /// Where the key came from, for the daemon's messages.
    pub source: String,
    /// The store key the caller found (base64): only someone who holds the
    /// key in force may replace it. Members of `api.socket_group` may read
    /// tokens, but must not be able to lock the operator out of the store
    /// with a key only they know.
    pub current: String,
}

impl Drop for RotateRequest {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.key);
        zeroize::Zeroize::zeroize(&mut self.current);
    }
}

/// Why a rotation was not started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Another rotation runs: answered 409.
    #[error("a key rotation is already running (to key {0}): wait for it to finish")]
    Running(String),
    /// The key is the primary already and no old key is left: answered 400.
    #[error("key {0} is already the store's primary key and no old key is left: nothing to rotate")]
    Nothing(String),
    /// The caller does not hold a key of the store: answered 403.
    #[error(
        "the current key sent is not a key of this store: run `acutoken key rotate` where it finds the store's key (store.key_file, the systemd credential, ACUTOKEN_KEY, or acutoken.key beside the store)"
    )]
    NotHolder,
    /// Other replicas serve the PostgreSQL store: answered 409.
    #[error(
        "other replicas serve this store ({0}): they would not open what the rotation re-seals under a key they do not have; stop every other replica, rotate, put the new key where each machine finds it, then start them again"
    )]
    OtherReplicas(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The daemon's one rotation slot.
#[derive(Debug, Default)]
pub struct Rotator {
    last: Mutex<Option<Progress>>,
}

/// What a rotation job works with.
pub struct Parts {
    /// The daemon's store: every re-sealing step runs on its writer between
    /// batches, so refreshes interleave with the steps; the long reads
    /// (counting, claims) go to its read connections.
    pub store: StoreHandle,
    pub config: Arc<Config>,
}

impl Rotator {
    /// The current or last rotation.
    pub fn progress(&self) -> Option<Progress> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        if let Some(p) = self.last.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            f(p)
        }
    }

    /// Switches every store handle of the daemon to `key` (the old keys stay
    /// in the keyring, open only) and starts re-sealing in the background.
    /// Run again with the same key after a failed rotation, it resumes.
    /// `current` must be a key of the daemon's keyring (see
    /// [`RotateRequest::current`]).
    pub async fn start(
        self: &Arc<Self>,
        key: Key,
        current: Key,
        parts: Parts,
    ) -> Result<Progress, StartError> {
        let id = key.id().to_string();
        if parts.config.store.url.is_some() {
            let me = parts.config.replica_name();
            let now = chrono::Utc::now();
            let others: Vec<String> = parts
                .store
                .read(move |st| st.replicas(now))
                .await?
                .into_iter()
                .filter(|r| r.live && r.name != me)
                .map(|r| r.name)
                .collect();
            if !others.is_empty() {
                return Err(StartError::OtherReplicas(others.join(", ")));
            }
        }
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(p) = last.as_ref().filter(|p| p.running()) {
                return Err(StartError::Running(p.key_id.clone()));
            }
            *last = Some(Progress {
                state: "running".into(),
                key_id: id.clone(),
                phase: "switching to the new key".into(),
                total: 0,
                resealed: 0,
                spills_resealed: 0,
                spills_failed: Vec::new(),
                error: None,
            });
        }
        let k = key.clone();
        let switched = parts
            .store
            .exclusive(move |st| switch(st, &k, &current))
            .await;
        if let Err(e) = switched {
            *self.last.lock().unwrap_or_else(|e| e.into_inner()) = None;
            return Err(e);
        }
        tracing::warn!(key_id = %id, "key rotation: the new key seals from now on; re-sealing what the old keys sealed");
        let me = self.clone();
        tokio::spawn(async move {
            let outcome = me.run(&key, &parts).await;
            me.update(|p| match outcome {
                Ok(()) => {
                    p.state = "done".into();
                    p.phase = "nothing sealed under an old key remains".into();
                }
                Err(e) => {
                    p.state = "failed".into();
                    p.error = Some(e);
                }
            });
            match me.progress() {
                Some(p) if p.error.is_none() => tracing::warn!(
                    key_id = %p.key_id,
                    resealed = p.resealed,
                    spills = p.spills_resealed,
                    "key rotation done: the old keys are retired; make the new key the one acutoken finds before the next start"
                ),
                Some(p) => tracing::error!(
                    key_id = %p.key_id,
                    error = p.error.as_deref().unwrap_or(""),
                    "key rotation stopped; the new key stays in force: run `acutoken key rotate` again with the same key file"
                ),
                None => {}
            }
        });
        Ok(self.progress().expect("set above"))
    }

    async fn run(&self, key: &Key, parts: &Parts) -> Result<(), String> {
        let new_id = key.id().to_string();
        let id = new_id.clone();
        let total = parts
            .store
            .read(move |st| old_values(st, &id))
            .await
            .map_err(|e| e.to_string())?;
        self.update(|p| {
            p.total = total;
            p.phase = "re-sealing".into();
        });
        self.pass(parts).await?;

        self.update(|p| p.phase = "re-sealing spill files".into());
        let config = parts.config.clone();
        let k = key.clone();
        let from = parts.store.exclusive(|st| st.keyring()).await;
        let spills = tokio::task::spawn_blocking(move || {
            reseal_spills(&config, &from, &Keyring::new(k, Vec::new()))
        })
        .await
        .map_err(|e| format!("re-sealing the spill files failed: {e}"))?;
        self.update(|p| {
            p.spills_resealed = spills.resealed;
            p.spills_failed = spills.failed;
        });

        // The daemon's own refreshes save under the keyring in force at
        // save time, the new one; a CLI that claimed a refresh with the old
        // key before the switch saves under it: wait for those.
        self.update(|p| p.phase = "waiting for refreshes in flight by other processes".into());
        let patience = parts.config.renewal.http_timeout + Duration::from_secs(5);
        let give_up = tokio::time::Instant::now() + patience;
        let me = crate::store::claims::Owner::current("serve");
        loop {
            let mine = me.as_str().to_string();
            let live = parts
                .store
                .read(move |st| foreign_claim(st, Some(&mine)))
                .await
                .map_err(|e| e.to_string())?;
            let Some((name, holder)) = live else { break };
            if tokio::time::Instant::now() >= give_up {
                return Err(format!(
                    "`{name}` is being refreshed by {}; the new key is in force but the old ones are not retired yet: run the command again in a minute",
                    crate::store::claims::Owner::describe(&holder)
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // What was written under an old keyring meanwhile is re-sealed by
        // further passes; the daemon's keyring keeps the old keys (open
        // only), so even a value that lands after the retirement still opens
        // here and is re-sealed by the next pass.
        for _ in 0..5 {
            self.update(|p| p.phase = "re-sealing what was written meanwhile".into());
            while self.pass(parts).await? > 0 {}
            let k = key.clone();
            parts
                .store
                .exclusive(move |st| st.retire_keys_except(&k))
                .await
                .map_err(|e| e.to_string())?;
            self.update(|p| p.phase = "counting".into());
            let id = new_id.clone();
            let left = parts
                .store
                .read(move |st| old_values(st, &id))
                .await
                .map_err(|e| e.to_string())?;
            if left == 0 {
                return Ok(());
            }
        }
        Err("values sealed under an old key keep appearing (a process with the old key is writing to the store): stop it, then run the command again".into())
    }

    /// One re-sealing pass over the store, a short step at a time; returns
    /// how many values it re-sealed.
    async fn pass(&self, parts: &Parts) -> Result<u64, String> {
        let mut cursor = ResealCursor::default();
        while !cursor.finished {
            let before = cursor.resealed;
            let c = cursor.clone();
            let (c, n) = parts
                .store
                .exclusive(move |st| {
                    let mut c = c;
                    st.reseal_step(&mut c, STEP_ROWS).map(|_| c)
                })
                .await
                .map(|c| {
                    let n = c.resealed - before;
                    (c, n)
                })
                .map_err(|e| e.to_string())?;
            cursor = c;
            self.update(|p| p.resealed += n);
        }
        Ok(cursor.resealed)
    }
}

/// Registers `key` and puts it in force for every handle sharing this
/// store's keyring, the current keys staying on as open-only keys.
fn switch(st: &mut Store, key: &Key, current: &Key) -> Result<(), StartError> {
    let old = st.keyring();
    let proof = crate::crypto::check_value(current);
    let holds = std::iter::once(old.primary())
        .chain(old.previous())
        .any(|k| crate::crypto::verify_check(k, &proof));
    if !holds {
        return Err(StartError::NotHolder);
    }
    if old.primary().id() == key.id() {
        // A rotation that stopped midway, run again: resume it.
        if st.registered_key_ids()?.iter().all(|k| k == key.id()) {
            return Err(StartError::Nothing(key.id().to_string()));
        }
        return Ok(());
    }
    st.register_key(key)?;
    let mut previous = vec![old.primary().clone()];
    previous.extend(
        old.previous()
            .iter()
            .filter(|k| k.id() != key.id())
            .cloned(),
    );
    st.set_keyring(Keyring::new(key.clone(), previous));
    Ok(())
}

/// How many values are sealed under a key other than `new_id`.
pub fn old_values(st: &Store, new_id: &str) -> Result<u64, StoreError> {
    Ok(st
        .sealed_key_usage()?
        .iter()
        .filter(|(id, _)| id != new_id)
        .map(|(_, n)| n)
        .sum())
}

/// A live claim held by a process other than `me` (any, when `None`):
/// the connection's name and the holder.
pub fn foreign_claim(st: &Store, me: Option<&str>) -> Result<Option<(String, String)>, StoreError> {
    let now = crate::clock::Clock::now(&crate::clock::SystemClock);
    Ok(st.claimed()?.into_iter().find_map(|r| {
        crate::store::claims::live_claim(&r, now)
            .filter(|(holder, _)| Some(holder.as_str()) != me)
            .map(|(holder, _)| (r.conn.name, holder))
    }))
}

/// What re-sealing the spill files came to.
#[derive(Debug, Default)]
pub struct SpillsResealed {
    pub resealed: usize,
    pub failed: Vec<(PathBuf, String)>,
}

/// Re-seals the tokens waiting in spill files (and in `rejected/`) from
/// `from` to `to`, so the next start can import them once the old key is
/// retired.
pub fn reseal_spills(config: &Config, from: &Keyring, to: &Keyring) -> SpillsResealed {
    use crate::renewal::spill;
    let mut out = SpillsResealed::default();
    for dir in config.spill_dirs() {
        for d in [dir.clone(), dir.join("rejected")] {
            for (path, read) in spill::read_all(&d) {
                let done = read.and_then(|mut s| {
                    s.reseal(from, to)?;
                    spill::rewrite(&path, &s).map_err(|e| format!("cannot be rewritten: {e}"))
                });
                match done {
                    Ok(()) => out.resealed += 1,
                    Err(why) => out.failed.push((path, why)),
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second rotation while one runs is refused before anything is
    /// touched (the stores are never reached).
    #[tokio::test]
    async fn a_second_rotation_while_one_runs_is_refused() {
        let r = Arc::new(Rotator::default());
        *r.last.lock().unwrap() = Some(Progress {
            state: "running".into(),
            key_id: "k1".into(),
            phase: "re-sealing".into(),
            total: 10,
            resealed: 3,
            spills_resealed: 0,
            spills_failed: Vec::new(),
            error: None,
        });
        let dir = tempfile::tempdir().unwrap();
        let st = Store::open(
            &dir.path().join("acutoken.db"),
            Keyring::new(Key::generate(), vec![]),
            crate::store::Create::Yes,
        )
        .unwrap();
        let parts = Parts {
            store: StoreHandle::from_store(st).unwrap(),
            config: Arc::new(Config::default()),
        };
        let err = r
            .start(Key::generate(), Key::generate(), parts)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StartError::Running(ref k) if k == "k1"),
            "{err}"
        );
        assert_eq!(r.progress().unwrap().resealed, 3);
    }
}
