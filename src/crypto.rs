//! Keys and sealing: AES-256-GCM under a per-connection subkey.
//!
//! Every secret column is sealed on its own: the subkey is HKDF-SHA256 of the
//! store key and the connection id, the nonce is 96 random bits, and the
//! associated data binds format version, key id, connection id and column, so a
//! value copied to another row or column fails to open. Per-connection subkeys
//! keep every key far from the random-nonce limit (2^32 seals) even at 1M
//! connections refreshed hourly.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{AeadCore, Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hkdf::Hkdf;
use sha2::{Digest, Sha256};
use uuid::Uuid;
use zeroize::{Zeroize, Zeroizing};

use crate::secret::Secret;

/// The environment variable a store key may be given in (base64).
pub const KEY_ENV: &str = "ACUTOKEN_KEY";
/// Internal: set only by [`take_key_from_env`] when it re-executes acutoken,
/// naming the inherited descriptor that holds [`KEY_ENV`]'s value.
const KEY_FD_ENV: &str = "ACUTOKEN_KEY_FD";
/// No key is this long (a key is 44 characters of base64); a longer value is
/// left where it is for the key parser to refuse, and is never written to
/// the handover pipe (whose buffer it could fill).
const MAX_ENV_KEY: usize = 4096;

/// [`KEY_ENV`]'s value after [`take_key_from_env`] moved it out of the environment.
static HANDED_OVER: std::sync::OnceLock<Zeroizing<String>> = std::sync::OnceLock::new();

/// Takes the key out of the process environment, so that neither
/// `/proc/PID/environ` nor a child process shows it. Call it first thing in
/// `main`, before any thread exists.
///
/// Removing a variable in place (`std::env::remove_var`) would need unsafe
/// code (the crate forbids it) and would not help anyway: the kernel shows
/// the environment block the process was started with, which `unsetenv`
/// does not change. So when [`KEY_ENV`] is set, acutoken executes itself
/// again (same PID, arguments, descriptors and environment) without it, and
/// hands the value over through a pipe whose read end the new image inherits
/// and [`key_from_env`] reads. If that fails (no `/proc`, say) a warning
/// says so and the key is read from the environment as before.
pub fn take_key_from_env() {
    if std::env::var_os(KEY_ENV).is_none() {
        if let Some(fd) = std::env::var_os(KEY_FD_ENV)
            && let Some(text) = read_handed_over(&fd)
        {
            let _ = HANDED_OVER.set(text);
        }
        return;
    }
    let Some(value) = std::env::var_os(KEY_ENV) else {
        return;
    };
    let value = Zeroizing::new(std::os::unix::ffi::OsStringExt::into_vec(value));
    // An empty or oversized value stays for the key parser to refuse with
    // its own message.
    if value.is_empty() || value.len() > MAX_ENV_KEY {
        return;
    }
    let error = reexec_without_key(&value);
    eprintln!(
        "warning: {KEY_ENV} stays in this process's environment (cannot execute acutoken again without it: {error}); prefer store.key_file or a systemd credential"
    );
}

/// Replaces the process image with a fresh one whose environment lacks
/// [`KEY_ENV`]; returns only on failure.
fn reexec_without_key(value: &[u8]) -> std::io::Error {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::process::CommandExt as _;
    let (reader, mut writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => return e,
    };
    // The value is far below the pipe's buffer, so this never blocks.
    if let Err(e) = writer.write_all(value) {
        return e;
    }
    drop(writer);
    // The read end must survive exec (std opens it close-on-exec).
    if let Err(e) = nix::fcntl::fcntl(
        &reader,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    ) {
        return e.into();
    }
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "acutoken".into());
    // /proc/self/exe is this very binary, even if the file was replaced since.
    std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .env_remove(KEY_ENV)
        .env(KEY_FD_ENV, reader.as_raw_fd().to_string())
        .exec()
}

/// Reads the value handed over on descriptor `fd` (a pipe at end of file
/// once read; it stays open, empty, as the crate has no safe way to close a
/// descriptor it did not open).
fn read_handed_over(fd: &std::ffi::OsStr) -> Option<Zeroizing<String>> {
    use std::io::Read as _;
    // 0-2 are stdio: reading one could wait on a terminal.
    let n: u32 = fd.to_str()?.parse().ok().filter(|n| *n > 2)?;
    let mut f = fs::File::open(format!("/proc/self/fd/{n}")).ok()?;
    let mut bytes = Zeroizing::new(Vec::with_capacity(64));
    std::io::Read::take(&mut f, MAX_ENV_KEY as u64)
        .read_to_end(&mut bytes)
        .ok()?;
    if bytes.is_empty() {
        return None;
    }
    let text = std::str::from_utf8(&bytes).ok()?;
    Some(Zeroizing::new(text.to_owned()))
}

/// The key given in [`KEY_ENV`]: the value [`take_key_from_env`] took out of
/// the environment, or the variable itself (library callers that never
/// called it, or when taking it out failed).
pub fn key_from_env() -> Option<Zeroizing<String>> {
    if let Some(v) = HANDED_OVER.get() {
        return Some(v.clone());
    }
    std::env::var_os(KEY_ENV).map(|v| Zeroizing::new(v.to_string_lossy().into_owned()))
}

/// Reads a key file's text into memory that is zeroed when dropped.
pub fn read_key_text(path: &Path, origin: KeySource) -> Result<Zeroizing<String>, CryptoError> {
    let mut f = fs::File::open(path).map_err(|error| CryptoError::Unreadable {
        origin: origin.clone(),
        error,
    })?;
    let mut text = Zeroizing::new(String::with_capacity(64));
    std::io::Read::read_to_string(&mut f, &mut text)
        .map_err(|error| CryptoError::Unreadable { origin, error })?;
    Ok(text)
}

/// Format version of a sealed value; part of the associated data.
const FORMAT: u8 = 1;
const NONCE_LEN: usize = 12;
const CHECK_PLAINTEXT: &[u8] = b"acutoken key check v1";

/// Where a key was found, for error messages that tell the operator which one is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `$CREDENTIALS_DIRECTORY/acutoken.key` (systemd `LoadCredential=`).
    Credential(PathBuf),
    /// `store.key_file` or `store.previous_key_files`.
    ConfigFile(PathBuf),
    /// The `ACUTOKEN_KEY` environment variable.
    Env,
    /// `acutoken.key` beside the store.
    BesideStore(PathBuf),
    /// A file named on the command line (`key rotate --new-key-file`).
    File(PathBuf),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Credential(p) => write!(f, "the systemd credential {}", p.display()),
            KeySource::ConfigFile(p) => write!(f, "the key file {} (store.key_file)", p.display()),
            KeySource::Env => f.write_str("the ACUTOKEN_KEY environment variable"),
            KeySource::BesideStore(p) => write!(f, "the key file {} beside the store", p.display()),
            KeySource::File(p) => write!(f, "the key file {}", p.display()),
        }
    }
}

/// What went wrong with a key or a sealed value.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The key material is not base64 of 32 bytes: the operator must fix the file.
    #[error(
        "{origin} does not hold a key (expected base64 of 32 bytes on one line; make one with `acutoken key generate`)"
    )]
    Malformed { origin: KeySource },
    /// The key file can be read by group or others: the operator must `chmod 600` it.
    #[error("{origin} is readable by group or others: run `chmod 600 {path}`")]
    TooOpen { origin: KeySource, path: String },
    /// The key file could not be read: the operator must fix the path or permissions.
    #[error("cannot read {origin}: {error}")]
    Unreadable {
        origin: KeySource,
        error: std::io::Error,
    },
    /// A sealed value did not open: wrong key, moved value or corruption. Nothing is trusted.
    #[error("a sealed {column} value of connection {connection} does not open: {why}")]
    Open {
        connection: Uuid,
        column: String,
        why: &'static str,
    },
}

/// Seals values of one connection; see [`Keyring::sealer`].
pub struct ConnectionSealer<'a> {
    key: &'a Key,
    connection: Uuid,
    cipher: Aes256Gcm,
}

impl ConnectionSealer<'_> {
    /// Seals a secret string for `column`, as [`Keyring::seal_secret`] would.
    pub fn seal_secret(&self, column: &str, secret: &Secret) -> Vec<u8> {
        self.key.seal_with(
            &self.cipher,
            self.connection,
            column,
            secret.expose().as_bytes(),
        )
    }
}

/// One 256-bit store key. Its bytes are zeroed on drop and never printed.
#[derive(Clone)]
pub struct Key {
    id: String,
    bytes: Zeroizing<[u8; 32]>,
    source: KeySource,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({} from {})", self.id, self.source)
    }
}

impl Key {
    /// Parses base64 of 32 bytes (surrounding whitespace allowed).
    pub fn from_base64(text: &str, source: KeySource) -> Result<Key, CryptoError> {
        let mut raw = B64
            .decode(text.trim())
            .map_err(|_| CryptoError::Malformed {
                origin: source.clone(),
            })?;
        if raw.len() != 32 {
            raw.zeroize();
            return Err(CryptoError::Malformed { origin: source });
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        bytes.copy_from_slice(&raw);
        raw.zeroize();
        let id = key_id(&bytes);
        Ok(Key { id, bytes, source })
    }

    /// Reads a key file, refusing one readable by group or others.
    pub fn from_file(path: &Path, source: KeySource) -> Result<Key, CryptoError> {
        let meta = fs::metadata(path).map_err(|error| CryptoError::Unreadable {
            origin: source.clone(),
            error,
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(CryptoError::TooOpen {
                origin: source,
                path: path.display().to_string(),
            });
        }
        let text = read_key_text(path, source.clone())?;
        Key::from_base64(&text, source)
    }

    /// The same key, said to come from `source` (in messages).
    pub fn with_source(mut self, source: KeySource) -> Key {
        self.source = source;
        self
    }

    /// A fresh random key.
    pub fn generate() -> Key {
        let raw = Aes256Gcm::generate_key(OsRng);
        let mut bytes = Zeroizing::new([0u8; 32]);
        bytes.copy_from_slice(&raw);
        let id = key_id(&bytes);
        Key {
            id,
            bytes,
            source: KeySource::Env,
        }
    }

    /// The key as one line of base64, for writing a key file.
    pub fn to_base64(&self) -> Secret {
        Secret::new(B64.encode(*self.bytes))
    }

    /// A short public fingerprint; stored beside every sealed value.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Where this key came from.
    pub fn source(&self) -> &KeySource {
        &self.source
    }

    fn cipher_for(&self, connection: Uuid) -> Aes256Gcm {
        let hk = Hkdf::<Sha256>::new(Some(b"acutoken connection subkey v1"), &*self.bytes);
        let mut sub = Zeroizing::new([0u8; 32]);
        // 32 bytes is far below HKDF-SHA256's 8160-byte output limit, so expand cannot fail.
        if hk.expand(connection.as_bytes(), &mut *sub).is_err() {
            unreachable!("HKDF output length is fixed and valid");
        }
        Aes256Gcm::new_from_slice(&*sub).unwrap_or_else(|_| unreachable!("subkey is 32 bytes"))
    }

    /// Seals `plaintext` for one connection's column.
    pub fn seal(&self, connection: Uuid, column: &str, plaintext: &[u8]) -> Vec<u8> {
        self.seal_with(&self.cipher_for(connection), connection, column, plaintext)
    }

    /// [`Key::seal`] with the connection's cipher already derived.
    fn seal_with(
        &self,
        cipher: &Aes256Gcm,
        connection: Uuid,
        column: &str,
        plaintext: &[u8],
    ) -> Vec<u8> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = associated_data(&self.id, connection, column);
        let ct = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .unwrap_or_else(|_| unreachable!("AES-GCM encryption of a short value cannot fail"));
        let mut out = Vec::with_capacity(2 + self.id.len() + NONCE_LEN + ct.len());
        out.push(FORMAT);
        out.push(self.id.len() as u8);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    fn open_parts(
        &self,
        connection: Uuid,
        column: &str,
        nonce: &[u8],
        ct: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let cipher = self.cipher_for(connection);
        let aad = associated_data(&self.id, connection, column);
        cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: &aad })
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Open {
                connection,
                column: column.to_string(),
                why: "authentication failed (wrong key, or the value was moved or altered)",
            })
    }
}

fn key_id(bytes: &[u8; 32]) -> String {
    let mut h = Sha256::new();
    h.update(b"acutoken key id v1");
    h.update(bytes);
    hex::encode(&h.finalize()[..8])
}

fn associated_data(key_id: &str, connection: Uuid, column: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(64);
    aad.push(FORMAT);
    aad.extend_from_slice(key_id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(connection.as_bytes());
    aad.extend_from_slice(column.as_bytes());
    aad
}

/// Splits a sealed value into (key id, nonce, ciphertext).
fn parse_sealed(sealed: &[u8]) -> Option<(&str, &[u8], &[u8])> {
    let (&format, rest) = sealed.split_first()?;
    if format != FORMAT {
        return None;
    }
    let (&len, rest) = rest.split_first()?;
    let len = len as usize;
    if rest.len() < len + NONCE_LEN + 16 {
        return None;
    }
    let id = std::str::from_utf8(&rest[..len]).ok()?;
    Some((id, &rest[len..len + NONCE_LEN], &rest[len + NONCE_LEN..]))
}

/// The id of the key that sealed a value, if the value is well-formed.
pub fn sealed_key_id(sealed: &[u8]) -> Option<&str> {
    parse_sealed(sealed).map(|(id, _, _)| id)
}

/// The primary key (seals and opens) and previous keys (open only).
#[derive(Debug, Clone)]
pub struct Keyring {
    primary: Key,
    previous: Vec<Key>,
}

impl Keyring {
    pub fn new(primary: Key, previous: Vec<Key>) -> Keyring {
        Keyring { primary, previous }
    }

    pub fn primary(&self) -> &Key {
        &self.primary
    }

    pub fn previous(&self) -> &[Key] {
        &self.previous
    }

    /// Seals under the primary key.
    pub fn seal(&self, connection: Uuid, column: &str, plaintext: &[u8]) -> Vec<u8> {
        self.primary.seal(connection, column, plaintext)
    }

    /// Seals a secret string.
    pub fn seal_secret(&self, connection: Uuid, column: &str, secret: &Secret) -> Vec<u8> {
        self.seal(connection, column, secret.expose().as_bytes())
    }

    /// Seals several values of one connection under the primary key,
    /// deriving the connection's subkey once instead of once per value
    /// (`connection import` seals two per connection).
    pub fn sealer(&self, connection: Uuid) -> ConnectionSealer<'_> {
        ConnectionSealer {
            key: &self.primary,
            connection,
            cipher: self.primary.cipher_for(connection),
        }
    }

    /// Opens with whichever key of the ring sealed the value.
    pub fn open(
        &self,
        connection: Uuid,
        column: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let (id, nonce, ct) = parse_sealed(sealed).ok_or_else(|| CryptoError::Open {
            connection,
            column: column.to_string(),
            why: "not a sealed value of a format this version knows",
        })?;
        let key = std::iter::once(&self.primary)
            .chain(self.previous.iter())
            .find(|k| k.id == id)
            .ok_or_else(|| CryptoError::Open {
                connection,
                column: column.to_string(),
                why: "sealed under a key that is neither the primary key nor in store.previous_key_files",
            })?;
        key.open_parts(connection, column, nonce, ct)
    }

    /// Opens a sealed UTF-8 secret.
    pub fn open_secret(
        &self,
        connection: Uuid,
        column: &str,
        sealed: &[u8],
    ) -> Result<Secret, CryptoError> {
        let bytes = self.open(connection, column, sealed)?;
        String::from_utf8(bytes.to_vec())
            .map(Secret::new)
            .map_err(|_| CryptoError::Open {
                connection,
                column: column.to_string(),
                why: "the opened value is not text",
            })
    }
}

/// The value the store keeps per key so a wrong key is refused before anything is read.
pub fn check_value(key: &Key) -> Vec<u8> {
    key.seal(Uuid::nil(), "key_check", CHECK_PLAINTEXT)
}

/// True when `check` was made by [`check_value`] with this key.
pub fn verify_check(key: &Key, check: &[u8]) -> bool {
    match parse_sealed(check) {
        Some((id, nonce, ct)) if id == key.id => key
            .open_parts(Uuid::nil(), "key_check", nonce, ct)
            .map(|p| p.as_slice() == CHECK_PLAINTEXT)
            .unwrap_or(false),
        _ => false,
    }
}

/// Writes a new key file with mode 0600, refusing to overwrite an existing file.
pub fn write_key_file(path: &Path, key: &Key) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    let text = key.to_base64();
    f.write_all(text.expose().as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One subkey for several columns: each value opens with the keyring
    /// as if sealed alone, and only for its own connection and column.
    #[test]
    fn a_connection_sealer_seals_what_the_keyring_opens() {
        let ring = Keyring::new(Key::generate(), vec![]);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let sealer = ring.sealer(a);
        let cs = sealer.seal_secret("client_secret", &Secret::new("cs-1"));
        let rt = sealer.seal_secret("refresh_token", &Secret::new("rt-1"));
        assert_eq!(
            ring.open(a, "client_secret", &cs).unwrap().as_slice(),
            b"cs-1"
        );
        assert_eq!(
            ring.open(a, "refresh_token", &rt).unwrap().as_slice(),
            b"rt-1"
        );
        assert!(ring.open(a, "refresh_token", &cs).is_err());
        assert!(ring.open(b, "client_secret", &cs).is_err());
        assert_ne!(
            cs,
            sealer.seal_secret("client_secret", &Secret::new("cs-1"))
        );
    }

    #[test]
    fn seal_open_round_trip_and_binding() {
        let ring = Keyring::new(Key::generate(), vec![]);
        let a = Uuid::new_v4();
        let b = Uuid::new_v4();
        let sealed = ring.seal(a, "refresh_token", b"rt-123");
        assert_eq!(
            ring.open(a, "refresh_token", &sealed).unwrap().as_slice(),
            b"rt-123"
        );
        // Moved to another row or column: must not open.
        assert!(ring.open(b, "refresh_token", &sealed).is_err());
        assert!(ring.open(a, "client_secret", &sealed).is_err());
        // Two seals of the same value differ (fresh nonce).
        assert_ne!(sealed, ring.seal(a, "refresh_token", b"rt-123"));
        // A flipped bit fails.
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(ring.open(a, "refresh_token", &bad).is_err());
    }

    #[test]
    fn previous_keys_open_old_values() {
        let old = Key::generate();
        let sealed = Keyring::new(old.clone(), vec![]).seal(Uuid::nil(), "c", b"x");
        let new = Key::generate();
        assert!(
            Keyring::new(new.clone(), vec![])
                .open(Uuid::nil(), "c", &sealed)
                .is_err()
        );
        let ring = Keyring::new(new, vec![old]);
        assert_eq!(
            ring.open(Uuid::nil(), "c", &sealed).unwrap().as_slice(),
            b"x"
        );
    }

    #[test]
    fn check_value_tells_keys_apart() {
        let k = Key::generate();
        let c = check_value(&k);
        assert!(verify_check(&k, &c));
        assert!(!verify_check(&Key::generate(), &c));
    }

    #[test]
    fn key_text_round_trips_and_bad_text_is_refused() {
        let k = Key::generate();
        let k2 = Key::from_base64(k.to_base64().expose(), KeySource::Env).unwrap();
        assert_eq!(k.id(), k2.id());
        assert!(Key::from_base64("c2hvcnQ=", KeySource::Env).is_err());
        assert!(Key::from_base64("not base64!", KeySource::Env).is_err());
        assert!(!format!("{k:?}").contains(k.to_base64().expose()));
    }
}
