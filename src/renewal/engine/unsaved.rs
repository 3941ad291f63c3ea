//! Invariant 2 when the store will not take a rotated token: it is held in
//! memory and spilled sealed, no other refresh starts, the save is retried,
//! and the next start imports what was spilled.

use super::*;

impl Engine {
    pub(super) fn hold(&self, p: PendingSave, error: &str) {
        let name = p.row.conn.name.clone();
        tracing::error!(connection = %name, error, "cannot save a rotated refresh token: holding it in memory and retrying; no other refresh starts");
        self.blocked.store(true, Ordering::SeqCst);
        if let Some(dir) = &self.spill_dir {
            let keyring = self.store.keyring();
            let s = Spilled::new(
                &keyring,
                p.basis.attempt,
                &p.row,
                p.refresh_token.as_ref(),
                &p.access_token,
            );
            match spill::write(dir, &s) {
                Ok(path) => {
                    tracing::warn!(connection = %name, path = %path.display(), "spilled the unsaved token (sealed) for the next start")
                }
                Err(e) => {
                    tracing::error!(connection = %name, error = %e, "cannot spill the unsaved token either; it lives only in memory")
                }
            }
        }
        self.hooks.store_write_failed(&name, p.row.conn.id, error);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p.row.conn.id, p);
    }

    /// Tries to save every held token; true when none is left. Called every few seconds.
    pub async fn retry_unsaved(&self) -> bool {
        let held: Vec<PendingSave> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, p)| p)
            .collect();
        let policy = self.policy();
        for p in held {
            let id = p.row.conn.id;
            let name = p.row.conn.name.clone();
            // `save` re-holds it on failure; a removed or overtaken connection
            // needs it no more.
            if let Ok(r) = self.save(p, (*policy).clone()).await {
                if r.outcome == "refreshed" {
                    tracing::info!(connection = %name, "the held refresh token is saved");
                }
                if let Some(dir) = &self.spill_dir {
                    spill::remove(dir, id);
                }
            }
        }
        let empty = self.unsaved() == 0;
        if empty {
            self.blocked.store(false, Ordering::SeqCst);
        }
        empty
    }
}

/// What importing spilled tokens at start came to.
#[derive(Debug, Default)]
pub struct SpillImport {
    /// Tokens saved into the store.
    pub imported: usize,
    /// Files set aside in `rejected/`: (where they are now, why).
    pub rejected: Vec<(PathBuf, String)>,
}

/// Imports tokens spilled by a previous run that could not save them
/// (start-up), from every directory in `dirs`. A file that cannot be read or
/// opened is set aside in `rejected/` beside it and reported, never a reason
/// not to start; a store that cannot be written is (the file stays for the
/// next start).
pub fn import_spilled(
    store: &mut Store,
    dirs: &[PathBuf],
    now: Timestamp,
) -> Result<SpillImport, StoreError> {
    let mut out = SpillImport::default();
    for dir in dirs {
        for (path, read) in spill::read_all(dir) {
            let opened = read.and_then(|s| s.landing(&store.keyring()));
            let landing = match opened {
                Ok(t) => t,
                Err(why) => {
                    let why = format!("the spill file {why}");
                    match spill::set_aside(&path) {
                        Ok(to) => {
                            tracing::error!(path = %path.display(), kept = %to.display(), reason = %why, "a spilled token cannot be imported; set aside");
                            out.rejected.push((to, why));
                        }
                        Err(e) => {
                            tracing::error!(path = %path.display(), reason = %why, error = %e, "a spilled token cannot be imported, nor moved aside; left in place");
                            out.rejected.push((path, why));
                        }
                    }
                    continue;
                }
            };
            let applied = store.land_spilled(&landing, now)?;
            if applied {
                out.imported += 1;
                tracing::info!(path = %path.display(), "imported a spilled refresh token");
            } else {
                tracing::warn!(path = %path.display(), "a spilled token was already superseded; discarded");
            }
            let _ = std::fs::remove_file(&path);
        }
    }
    Ok(out)
}
