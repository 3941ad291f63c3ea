//! Finding the store key (DESIGN §4 order) and checking it against the store.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rusqlite::params;

use super::{Store, StoreError, to_ms};
use crate::config::Config;
use crate::crypto::{self, Key, KeySource, Keyring};

/// The keyring found for a store, and the key file created for it, if any.
#[derive(Debug)]
pub struct KeyResolution {
    pub keyring: Keyring,
    /// Set when a first `add`/`import` generated `acutoken.key` beside a new store.
    pub created: Option<PathBuf>,
    /// True when the primary key came from a source the operator named
    /// (credential, `store.key_file`, `ACUTOKEN_KEY`), not from beside the store.
    pub explicit: bool,
}

/// The key file that sits beside a store.
pub fn beside(store_path: &Path) -> PathBuf {
    store_path.with_file_name("acutoken.key")
}

/// Finds the primary key, first found wins: `$CREDENTIALS_DIRECTORY/acutoken.key`,
/// `store.key_file`, `ACUTOKEN_KEY`, then `acutoken.key` beside the store. With
/// `may_create` and no key anywhere and no store yet, generates `acutoken.key`
/// beside the new store (0600).
pub fn resolve_keyring(
    config: &Config,
    store_path: &Path,
    may_create: bool,
) -> Result<KeyResolution, StoreError> {
    let (found, pending) = resolve(config, store_path, may_create)?;
    if let Some(res) = found {
        return Ok(res);
    }
    let pending = pending.expect("a new key when none was found");
    let path = pending.write()?;
    let key = Key::from_file(&path, KeySource::BesideStore(path.clone()))?;
    Ok(KeyResolution {
        keyring: Keyring::new(key, pending.previous),
        created: Some(path),
        explicit: false,
    })
}

/// [`resolve_keyring`] for the store `target` names. A PostgreSQL store has
/// no "beside": its key comes from the credential, `store.key_file` or
/// `ACUTOKEN_KEY`, and none is ever generated for it (a key that only one
/// machine holds would strand the replicated database).
pub fn resolve_keyring_for(
    config: &Config,
    target: &crate::config::StoreTarget,
    may_create: bool,
) -> Result<KeyResolution, StoreError> {
    let pg = match target {
        crate::config::StoreTarget::File(path) => return resolve_keyring(config, path, may_create),
        crate::config::StoreTarget::Postgres(pg) => pg,
    };
    let previous = previous_keys(config)?;
    match explicit_primary(config)? {
        Some(key) => Ok(KeyResolution {
            keyring: Keyring::new(key, previous),
            created: None,
            explicit: true,
        }),
        None => Err(StoreError::NoPostgresKey {
            store: pg.display.clone(),
        }),
    }
}

/// A key made for a store that is built apart ([`Store::build`]); its file
/// beside the store is written by [`PendingKey::write`] when the store is
/// published, so a build that fails leaves no key behind either.
pub struct PendingKey {
    path: PathBuf,
    key: Key,
    previous: Vec<Key>,
}

impl PendingKey {
    /// Where its file goes: `acutoken.key` beside the store.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The keyring that seals the new store's secrets.
    pub fn keyring(&self) -> Keyring {
        Keyring::new(self.key.clone(), self.previous.clone())
    }

    /// Writes the key file (0600, fsynced) and returns its path. Refuses
    /// when a key file appeared there meanwhile (another process made a
    /// store): the new store would not open with it.
    pub fn write(&self) -> Result<PathBuf, StoreError> {
        if let Some(dir) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|error| StoreError::Io {
                    what: "cannot create the directory",
                    path: dir.to_path_buf(),
                    error,
                })?;
        }
        crypto::write_key_file(&self.path, &self.key).map_err(|error| StoreError::Io {
            what: if error.kind() == std::io::ErrorKind::AlreadyExists {
                "another acutoken process created a store key meanwhile at"
            } else {
                "cannot write the new key file"
            },
            path: self.path.clone(),
            error,
        })?;
        Ok(self.path.clone())
    }
}

/// [`resolve_keyring`] for a store about to be built apart: when no key is
/// found and no store exists, the new key is returned unwritten.
pub fn resolve_keyring_deferred(
    config: &Config,
    store_path: &Path,
) -> Result<(Option<KeyResolution>, Option<PendingKey>), StoreError> {
    resolve(config, store_path, true)
}

/// The key found for `store_path`, or (with `may_create`, no key anywhere
/// and no store yet) a new one whose file is still to be written.
fn resolve(
    config: &Config,
    store_path: &Path,
    may_create: bool,
) -> Result<(Option<KeyResolution>, Option<PendingKey>), StoreError> {
    let previous = previous_keys(config)?;
    let found = find_primary(config, store_path)?;
    if let Some((key, explicit)) = found {
        let res = KeyResolution {
            keyring: Keyring::new(key, previous),
            created: None,
            explicit,
        };
        return Ok((Some(res), None));
    }
    let path = beside(store_path);
    if store_path.exists() || !may_create {
        return Err(StoreError::NoKey {
            path: store_path.to_path_buf(),
            beside: path,
        });
    }
    let key = Key::generate().with_source(KeySource::BesideStore(path.clone()));
    Ok((
        None,
        Some(PendingKey {
            path,
            key,
            previous,
        }),
    ))
}

fn previous_keys(config: &Config) -> Result<Vec<Key>, StoreError> {
    Ok(config
        .store
        .previous_key_files
        .iter()
        .map(|p| Key::from_file(p, KeySource::ConfigFile(p.clone())))
        .collect::<Result<Vec<_>, _>>()?)
}

fn find_primary(config: &Config, store_path: &Path) -> Result<Option<(Key, bool)>, StoreError> {
    if let Some(key) = explicit_primary(config)? {
        return Ok(Some((key, true)));
    }
    let p = beside(store_path);
    if p.exists() {
        return Ok(Some((
            Key::from_file(&p, KeySource::BesideStore(p.clone()))?,
            false,
        )));
    }
    Ok(None)
}

/// The key from a source the operator named: the systemd credential,
/// `store.key_file`, then `ACUTOKEN_KEY`.
fn explicit_primary(config: &Config) -> Result<Option<Key>, StoreError> {
    if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
        let p = Path::new(&dir).join("acutoken.key");
        if p.exists() {
            // systemd makes credentials readable by the service user only, but
            // may give them mode 0400 or 0440 with a private group; trust it.
            let text = crypto::read_key_text(&p, KeySource::Credential(p.clone()))?;
            return Ok(Some(Key::from_base64(&text, KeySource::Credential(p))?));
        }
    }
    if let Some(p) = &config.store.key_file {
        return Ok(Some(Key::from_file(p, KeySource::ConfigFile(p.clone()))?));
    }
    if let Some(text) = crypto::key_from_env() {
        return Ok(Some(Key::from_base64(&text, KeySource::Env)?));
    }
    Ok(None)
}

/// A keyring shared by the store handles of one process. A key rotation in
/// the daemon replaces it once and every handle (the engine's, the API's, the
/// token cache's, the watcher's, the alert workers') seals under the new key
/// from its next use; nothing keeps a copy of the old keyring beyond one
/// write transaction.
#[derive(Debug, Clone)]
pub struct SharedKeyring(Arc<RwLock<Arc<Keyring>>>);

impl SharedKeyring {
    pub fn new(keyring: Keyring) -> SharedKeyring {
        SharedKeyring(Arc::new(RwLock::new(Arc::new(keyring))))
    }

    /// The keyring in force now.
    pub fn current(&self) -> Arc<Keyring> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `keyring` in force for every handle sharing this one.
    pub fn replace(&self, keyring: Keyring) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keyring);
    }

    /// Opens a secret with the keyring in force (see [`Keyring::open_secret`]).
    pub fn open_secret(
        &self,
        connection: uuid::Uuid,
        column: &str,
        sealed: &[u8],
    ) -> Result<crate::secret::Secret, crypto::CryptoError> {
        self.current().open_secret(connection, column, sealed)
    }
}

impl From<Keyring> for SharedKeyring {
    fn from(keyring: Keyring) -> SharedKeyring {
        SharedKeyring::new(keyring)
    }
}

/// Refuses a primary key whose check value is not in the store.
pub(super) fn verify(store: &Store) -> Result<(), StoreError> {
    let keyring = store.keyring.current();
    let primary = keyring.primary();
    let check: Option<Vec<u8>> = store
        .db
        .query_row(
            "SELECT check_value FROM keys WHERE key_id = ?1",
            [primary.id()],
            |r| r.get(0),
        )
        .map(Some)
        .or_else(|e| if e.is_no_rows() { Ok(None) } else { Err(e) })?;
    let retired = match check {
        Some(_) => None,
        None => retired_at(store, primary.id())?,
    };
    match (check, retired) {
        (Some(c), _) if crypto::verify_check(primary, &c) => Ok(()),
        (_, Some(at)) => Err(StoreError::RetiredKey {
            origin: primary.source().to_string(),
            path: store.path.clone(),
            at: crate::model::fmt_time(super::from_ms(at)),
        }),
        _ => Err(StoreError::WrongKey {
            origin: primary.source().to_string(),
            path: store.path.clone(),
        }),
    }
}

/// When `key_id` was retired by a key rotation, if it was.
fn retired_at(store: &Store, key_id: &str) -> Result<Option<i64>, StoreError> {
    Ok(store
        .db
        .query_row(
            "SELECT value FROM meta WHERE key = ?1",
            [format!("retired_key:{key_id}")],
            |r| r.get(0),
        )
        .map(Some)
        .or_else(|e| if e.is_no_rows() { Ok(None) } else { Err(e) })?)
}

/// Records the primary key's check value (new stores).
pub(super) fn register_primary(store: &Store) -> Result<(), StoreError> {
    add_key(store, store.keyring.current().primary())
}

fn add_key(store: &Store, key: &Key) -> Result<(), StoreError> {
    store.db.execute(
        "INSERT INTO keys (key_id, check_value, added_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (key_id) DO NOTHING",
        params![
            key.id(),
            crypto::check_value(key),
            to_ms(chrono::Utc::now())
        ],
    )?;
    Ok(())
}

impl Store {
    /// Registers `key` as a key of this store (key rotation); it then opens the store.
    pub fn register_key(&self, key: &Key) -> Result<(), StoreError> {
        add_key(self, key)
    }

    /// Forgets every key but `keep`: after a rotation left nothing sealed under
    /// them, an old key must no longer open (and so seal into) this store.
    /// Each retired key id is remembered, so that a process started with one
    /// is told its key was rotated away rather than that it is foreign.
    pub fn retire_keys_except(&mut self, keep: &Key) -> Result<usize, StoreError> {
        let now = to_ms(chrono::Utc::now());
        self.write(|tx, _| {
            tx.execute(
                "INSERT INTO meta (key, value)
                 SELECT 'retired_key:' || key_id, ?2 FROM keys WHERE key_id <> ?1
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![keep.id(), now],
            )?;
            Ok(tx.execute("DELETE FROM keys WHERE key_id <> ?1", [keep.id()])?)
        })
    }

    /// The ids of the keys that open this store.
    pub fn registered_key_ids(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.db.prepare("SELECT key_id FROM keys ORDER BY key_id")?;
        let ids = stmt.query_map((), |r| r.get(0))?;
        Ok(ids.collect::<Result<_, _>>()?)
    }

    /// Replaces the keyring, for this handle and every handle sharing it
    /// (key rotation: the new key seals, the old ones still open).
    pub fn set_keyring(&mut self, keyring: Keyring) {
        self.keyring.replace(keyring);
    }

    /// Ids of keys that still seal some value, with how many values each seals.
    pub fn sealed_key_usage(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut counts = std::collections::BTreeMap::<String, u64>::new();
        let mut stmt = self.db.prepare(
            "SELECT client_secret, refresh_token, access_token FROM connections
             UNION ALL SELECT pkce_verifier, url, NULL FROM authorizations",
        )?;
        let mut rows = stmt.query(())?;
        while let Some(r) = rows.next()? {
            for i in 0..3 {
                let v: Option<Vec<u8>> = r.get(i)?;
                if let Some(id) = v.as_deref().and_then(crypto::sealed_key_id) {
                    *counts.entry(id.to_string()).or_default() += 1;
                }
            }
        }
        Ok(counts.into_iter().collect())
    }
}
