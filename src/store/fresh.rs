//! A store built apart and moved into place whole (`connection import` into
//! a store that does not exist yet).
//!
//! The new store is written to a hidden file beside where it will live, with
//! an in-memory rollback journal and no fsync per page: nobody else can see
//! the file, so the WAL (which writes every page twice) and its durability
//! buy nothing. When every row is in, the file is switched to WAL mode,
//! fsynced once, and hard-linked to the store's name: the store appears
//! whole or not at all, and a store another process created meanwhile is
//! never replaced (the link fails). A build that fails, or is dropped,
//! leaves nothing behind: not the file, nor a directory it had to create.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::OpenFlags;

use super::sql::Db;

use super::{BUSY_TIMEOUT, Store, StoreError, create_file, keys};
use crate::crypto::Keyring;

/// A store being built; [`Fresh::publish`] moves it into place.
pub struct Fresh {
    store: Option<Store>,
    dest: PathBuf,
    leftovers: Leftovers,
}

/// The files and directory a build made, removed when it does not finish.
/// Shared with a signal handler: whichever of publishing and removing comes
/// first wins, so an interrupted import either removes everything or has
/// already put the whole store in place.
#[derive(Debug, Clone)]
pub struct Leftovers(Arc<Mutex<Option<Made>>>);

#[derive(Debug)]
struct Made {
    /// The hidden database file and its journal siblings.
    files: Vec<PathBuf>,
    /// The store's directory, when the build had to create it.
    dir: Option<PathBuf>,
}

impl Leftovers {
    fn lock(&self) -> MutexGuard<'_, Option<Made>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes what the build made, unless it was published; returns
    /// whether there was anything to remove. Safe to call more than once,
    /// and from another thread while the build is still writing.
    pub fn remove(&self) -> bool {
        let Some(made) = self.lock().take() else {
            return false;
        };
        for f in &made.files {
            let _ = fs::remove_file(f);
        }
        if let Some(d) = &made.dir {
            // Only when empty: anything else in it is not ours.
            let _ = fs::remove_dir(d);
        }
        true
    }
}

impl Store {
    /// Starts building a new store for `path`, which must not exist yet, in
    /// a hidden file beside it, with `keyring`'s primary key registered.
    pub fn build(path: &Path, keyring: Keyring) -> Result<Fresh, StoreError> {
        let exists = |p: &Path| StoreError::Io {
            what: "refusing to build over",
            path: p.to_path_buf(),
            error: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        };
        if path.exists() {
            return Err(exists(path));
        }
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let made_dir = (!dir.exists()).then(|| dir.to_path_buf());
        let file_name = path
            .file_name()
            .ok_or_else(|| StoreError::Io {
                what: "not a file name",
                path: path.to_path_buf(),
                error: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            })?
            .to_string_lossy()
            .into_owned();
        let prefix = format!(".{file_name}.import-");
        remove_stale(dir, &prefix);
        let tmp = dir.join(format!("{prefix}{}", std::process::id()));
        let leftovers = Leftovers(Arc::new(Mutex::new(Some(Made {
            files: ["", "-journal", "-wal", "-shm"]
                .iter()
                .map(|s| PathBuf::from(format!("{}{s}", tmp.display())))
                .collect(),
            dir: made_dir,
        }))));
        // From here on, a failure removes what was made.
        let mut fresh = Fresh {
            store: None,
            dest: path.to_path_buf(),
            leftovers,
        };
        create_file(&tmp)?;
        let db = rusqlite::Connection::open_with_flags(
            &tmp,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| StoreError::Io {
            what: "cannot open",
            path: tmp.clone(),
            error: std::io::Error::other(e.to_string()),
        })?;
        db.busy_timeout(BUSY_TIMEOUT)?;
        // New pages of a new file need no journal (SQLite journals only the
        // pages that existed when the transaction began), so the one in
        // memory stays small and still rolls a failed statement back.
        db.pragma_update(None, "journal_mode", "MEMORY")?;
        db.pragma_update(None, "synchronous", "OFF")?;
        db.pragma_update(None, "foreign_keys", "ON")?;
        let db = Db::sqlite(db);
        let mut store = Store {
            db,
            target: Box::new(crate::config::StoreTarget::File(tmp.clone())),
            path: tmp,
            keyring: keyring.into(),
        };
        store.migrate(0)?;
        keys::register_primary(&store)?;
        fresh.store = Some(store);
        Ok(fresh)
    }
}

impl Fresh {
    /// The store being built: write to it as to any other.
    pub fn store(&mut self) -> &mut Store {
        self.store.as_mut().expect("a store until published")
    }

    /// What to remove if the process is stopped before the build ends.
    pub fn leftovers(&self) -> Leftovers {
        self.leftovers.clone()
    }

    /// Makes the built store durable and gives it its name. `before` runs
    /// once the file is on disk and just before it appears (to write the key
    /// that opens it, for instance); if it fails, nothing appears. Fails,
    /// leaving nothing behind, when a store appeared at the name meanwhile.
    pub fn publish(
        mut self,
        before: impl FnOnce() -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let store = self.store.take().expect("published once");
        let tmp = store.path.clone();
        store.db.pragma_update("journal_mode", "WAL")?;
        store.db.close()?;
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |error| StoreError::Io { what, path, error }
        };
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io("cannot flush", &tmp))?;
        // Held until the store has its name, so a signal's handler either
        // removes everything first or finds nothing left to remove.
        let mut made = self.leftovers.lock();
        if made.is_none() {
            // Removed by a signal's handler, which ends the process.
            return Err(StoreError::Cancelled);
        }
        before()?;
        fs::hard_link(&tmp, &self.dest).map_err(|error| StoreError::Io {
            what: if error.kind() == std::io::ErrorKind::AlreadyExists {
                "another acutoken process created a store meanwhile at"
            } else {
                // A filesystem without hard links: nothing was created, and
                // an import into an existing store needs no link.
                "cannot link the new store into place (create the store first, with `connection add`, to import without a link)"
            },
            path: self.dest.clone(),
            error,
        })?;
        // The store has its name: nothing may remove the directory now, nor
        // report a failure (the store exists).
        *made = None;
        drop(made);
        let _ = fs::remove_file(&tmp);
        let dir = self
            .dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // Makes the new name durable. Failing here (an I/O error on the
        // directory) would at worst lose the name in a power cut, and the
        // import would be run again.
        let _ = fs::File::open(dir).and_then(|d| d.sync_all());
        Ok(())
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        // Closed first: SQLite would otherwise write to a file just removed.
        drop(self.store.take());
        let _ = self.leftovers.remove();
    }
}

/// Removes builds left by import processes that no longer run (killed
/// before they could clean up), so they do not pile up beside the store.
fn remove_stale(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Key;
    use crate::store::Create;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn a_published_build_opens_as_a_store_in_wal_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sub/acutoken.db");
        let key = Key::generate();
        let mut fresh = Store::build(&path, Keyring::new(key.clone(), vec![])).unwrap();
        fresh
            .store()
            .write(|tx, _| {
                tx.execute("UPDATE meta SET value = 41 WHERE key = 'change_seq'", ())?;
                Ok(())
            })
            .unwrap();
        assert!(!path.exists(), "nothing at the name before publishing");
        fresh.publish(|| Ok(())).unwrap();
        assert_eq!(names(&tmp.path().join("sub")), ["acutoken.db"]);
        let st = Store::open(&path, Keyring::new(key, vec![]), Create::No).unwrap();
        let mode: String = st
            .db()
            .query_row("PRAGMA journal_mode", (), |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let seq: i64 = st
            .db()
            .query_row("SELECT value FROM meta WHERE key = 'change_seq'", (), |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(seq, 41);
    }

    #[test]
    fn a_dropped_build_leaves_nothing_not_even_the_directory_it_made() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("sub/acutoken.db");
        let fresh = Store::build(&path, Keyring::new(Key::generate(), vec![])).unwrap();
        assert_eq!(names(&tmp.path().join("sub")).len(), 1, "the hidden build");
        drop(fresh);
        assert_eq!(names(tmp.path()), Vec::<String>::new());
    }

    #[test]
    fn a_store_made_meanwhile_is_kept_and_the_build_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("acutoken.db");
        let fresh = Store::build(&path, Keyring::new(Key::generate(), vec![])).unwrap();
        let theirs = Key::generate();
        drop(Store::open(&path, Keyring::new(theirs.clone(), vec![]), Create::Yes).unwrap());
        let err = fresh.publish(|| Ok(())).unwrap_err();
        assert!(err.to_string().contains("meanwhile"), "{err}");
        assert_eq!(names(tmp.path()), ["acutoken.db"]);
        Store::open(&path, Keyring::new(theirs, vec![]), Create::No).unwrap();
    }

    #[test]
    fn a_failing_last_step_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("acutoken.db");
        let fresh = Store::build(&path, Keyring::new(Key::generate(), vec![])).unwrap();
        let err = fresh
            .publish(|| Err(StoreError::Unwritable("no room for the key".into())))
            .unwrap_err();
        assert!(err.to_string().contains("no room"), "{err}");
        assert_eq!(names(tmp.path()), Vec::<String>::new());
    }

    #[test]
    fn builds_of_processes_that_are_gone_are_swept() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("acutoken.db");
        // No process has pid 4294967295; ours is alive and its build is kept.
        let dead = tmp.path().join(".acutoken.db.import-4294967295");
        let other = tmp.path().join(".acutoken.db.import-1-journal");
        fs::write(&dead, b"x").unwrap();
        fs::write(&other, b"x").unwrap();
        let _fresh = Store::build(&path, Keyring::new(Key::generate(), vec![])).unwrap();
        let left = names(tmp.path());
        assert!(
            !left.contains(&".acutoken.db.import-4294967295".into()),
            "{left:?}"
        );
        assert!(
            left.contains(&".acutoken.db.import-1-journal".into()),
            "pid 1 runs: {left:?}"
        );
        assert!(left.contains(&format!(".acutoken.db.import-{}", std::process::id())));
    }
}
