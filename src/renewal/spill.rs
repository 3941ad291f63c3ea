//! Spilled tokens: a rotated refresh token the store would not take, sealed into
//! `$RUNTIME_DIRECTORY/pending/` (a tmpfs) so the next start can import it.
//!
//! The values are sealed exactly as the store seals its columns (same key, same
//! connection id and column in the associated data), so importing is a copy.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::crypto::Keyring;
use crate::model::Connection;
use crate::model::ConnectionRow;
use crate::secret::Secret;
use crate::store::connections::SecretColumn;
use crate::store::refresh::SpilledToken;

/// One spilled outcome.
#[derive(Debug, Serialize, Deserialize)]
pub struct Spilled {
    attempt: Uuid,
    conn: Connection,
    token_type: Option<String>,
    access_lifetime_s: Option<u64>,
    refresh_token: Option<String>,
    access_token: String,
}

impl Spilled {
    /// The connection the spilled token belongs to.
    pub fn connection(&self) -> Uuid {
        self.conn.id
    }

    /// Opens the spilled access and refresh tokens; the reason when they do
    /// not open (another store's key, a retired key, a damaged file).
    pub fn open(&self, keyring: &Keyring) -> Result<(Secret, Option<Secret>), String> {
        let id = self.conn.id;
        let open = |col: SecretColumn, b64: &str| -> Result<Secret, String> {
            let sealed = B64
                .decode(b64)
                .map_err(|_| format!("its {} is not base64", col.as_str()))?;
            keyring
                .open_secret(id, col.as_str(), &sealed)
                .map_err(|e| format!("its {} does not open: {e}", col.as_str()))
        };
        let access = open(SecretColumn::AccessToken, &self.access_token)?;
        let refresh = self
            .refresh_token
            .as_deref()
            .map(|t| open(SecretColumn::RefreshToken, t))
            .transpose()?;
        Ok((access, refresh))
    }

    /// Seals the spilled tokens again under `to`'s primary key (`key rotate`).
    pub fn reseal(&mut self, from: &Keyring, to: &Keyring) -> Result<(), String> {
        let (access, refresh) = self.open(from)?;
        let id = self.conn.id;
        self.access_token =
            B64.encode(to.seal_secret(id, SecretColumn::AccessToken.as_str(), &access));
        self.refresh_token = refresh
            .map(|t| B64.encode(to.seal_secret(id, SecretColumn::RefreshToken.as_str(), &t)));
        Ok(())
    }

    pub fn new(
        keyring: &Keyring,
        attempt: Uuid,
        row: &ConnectionRow,
        refresh_token: Option<&Secret>,
        access_token: &Secret,
    ) -> Spilled {
        let id = row.conn.id;
        Spilled {
            attempt,
            conn: row.conn.clone(),
            token_type: row.token_type.clone(),
            access_lifetime_s: row.access_lifetime.map(|d| d.as_secs()),
            refresh_token: refresh_token.map(|t| {
                B64.encode(keyring.seal_secret(id, SecretColumn::RefreshToken.as_str(), t))
            }),
            access_token: B64.encode(keyring.seal_secret(
                id,
                SecretColumn::AccessToken.as_str(),
                access_token,
            )),
        }
    }

    /// The spilled outcome, opened, as the store lands it; the reason when
    /// its values do not open.
    pub fn landing(&self, keyring: &Keyring) -> Result<SpilledToken, String> {
        let (access_token, refresh_token) = self.open(keyring)?;
        Ok(SpilledToken {
            attempt: self.attempt,
            conn: self.conn.clone(),
            token_type: self.token_type.clone(),
            access_lifetime: self.access_lifetime_s.map(std::time::Duration::from_secs),
            refresh_token,
            access_token,
        })
    }
}

fn file_for(dir: &Path, id: Uuid) -> PathBuf {
    dir.join(format!("{id}.json"))
}

/// Writes (replaces) the spill file of one connection, mode 0600, synced.
pub fn write(dir: &Path, s: &Spilled) -> std::io::Result<PathBuf> {
    make_dir(dir)?;
    let path = file_for(dir, s.conn.id);
    rewrite(&path, s)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(path)
}

/// Creates `dir` and any missing parent, each 0700. Root (the CLI run by an
/// operator) gives each directory it creates to the owner of the nearest one
/// that existed: a `pending/` that root made for the daemon's
/// `/run/acutoken` must stay the daemon's, or the daemon could neither
/// import what root spilled there nor spill there itself.
fn make_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let mut missing = Vec::new();
    let mut existing = dir;
    while !existing.exists() {
        missing.push(existing);
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p,
            _ => {
                existing = Path::new(".");
                break;
            }
        }
    }
    let owner = if nix::unistd::geteuid().is_root() {
        std::fs::metadata(existing).ok()
    } else {
        None
    };
    for d in missing.into_iter().rev() {
        match std::fs::DirBuilder::new().mode(0o700).create(d) {
            Ok(()) => {
                if let Some(m) = &owner {
                    std::os::unix::fs::chown(d, Some(m.uid()), Some(m.gid()))?;
                }
            }
            // Made meanwhile by another process: theirs is as good.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Deletes a connection's spill file once its token is saved.
pub fn remove(dir: &Path, id: Uuid) {
    let _ = std::fs::remove_file(file_for(dir, id));
}

/// Every spill file in `dir`, read, or the reason it could not be.
pub fn read_all(dir: &Path) -> Vec<(PathBuf, Result<Spilled, String>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        if p.is_file() && p.extension().is_some_and(|x| x == "json") {
            let read = std::fs::read(&p)
                .map_err(|e| format!("cannot be read: {e}"))
                .and_then(|b| {
                    serde_json::from_slice::<Spilled>(&b)
                        .map_err(|e| format!("is not a spilled token: {e}"))
                });
            out.push((p, read));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Moves a spill file that cannot be imported into `rejected/` beside it,
/// so it stops every start from tripping over it, yet is kept for a human
/// (it may hold the only live refresh token of its connection). Returns
/// where it went.
pub fn set_aside(path: &Path) -> std::io::Result<PathBuf> {
    let dir = path.parent().unwrap_or(Path::new(".")).join("rejected");
    make_dir(&dir)?;
    let name = path.file_name().unwrap_or_default();
    let to = dir.join(name);
    std::fs::rename(path, &to)?;
    Ok(to)
}

/// Replaces a spill file with `s` (same name), written like [`write`].
pub fn rewrite(path: &Path, s: &Spilled) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp", s.conn.id));
    let body = serde_json::to_vec(s).map_err(std::io::Error::other)?;
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // Root running the CLI spills into the daemon's directory: the file
        // goes to the directory's owner, or the daemon could not import it.
        if nix::unistd::geteuid().is_root()
            && let Ok(meta) = std::fs::metadata(dir)
        {
            use std::os::unix::fs::MetadataExt as _;
            std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid()))?;
        }
        f.write_all(&body)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    use super::*;

    #[test]
    fn directories_root_makes_belong_to_the_owner_of_the_one_above() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test checks what root's CLI creates: run it as root (CI does)"
        );
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::os::unix::fs::chown(&run, Some(65534), Some(65534)).unwrap();
        let pending = run.join("acutoken").join("pending");
        make_dir(&pending).unwrap();
        for d in [run.join("acutoken"), pending.clone()] {
            let m = std::fs::metadata(&d).unwrap();
            assert_eq!((m.uid(), m.gid()), (65534, 65534), "{}", d.display());
            assert_eq!(m.permissions().mode() & 0o777, 0o700, "{}", d.display());
        }
        // An existing directory is left as it is.
        std::os::unix::fs::chown(&pending, Some(0), Some(0)).unwrap();
        make_dir(&pending).unwrap();
        assert_eq!(std::fs::metadata(&pending).unwrap().uid(), 0);
    }
}
