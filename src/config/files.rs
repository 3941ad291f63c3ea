//! The files a config names that hold secrets: each must be private, and
//! the webhook ones are read into the config.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::Config;
use super::error::{ConfigError, invalid};
use super::postgres::{PgTls, PgUrl, parse_store_url};
use super::validate::check_webhook_url;
use crate::secret::Secret;

impl Config {
    /// Checks that the key, API and password files are private (see
    /// [`check_private_file`]), that the password file holds something and
    /// that a `sslrootcert` in `store.url` can be read; webhook files are
    /// checked as they are read.
    pub(super) fn check_files(&self) -> Result<(), ConfigError> {
        if let Some(path) = &self.store.password_file {
            // Read to be refused now if empty; the store reads it again when
            // it connects ([`Config::store_target`]), so a changed password
            // needs no reload.
            read_secret_file(path, "store.password_file")?;
        }
        if let Some(url) = &self.store.url
            && let Ok(PgUrl {
                tls: PgTls::Verify {
                    root_cert: Some(path),
                },
                ..
            }) = parse_store_url(url)
        {
            check_readable_file(&path).map_err(|e| {
                invalid(
                    "store.url",
                    format!(
                        "sslrootcert {} cannot be read ({e}); name a readable PEM file of the CA that signed the server's certificate, or leave sslrootcert out to use the system roots",
                        path.display()
                    ),
                )
            })?;
        }
        if let Some(path) = &self.store.key_file {
            check_private_file(path, "store.key_file")?;
        }
        for (i, path) in self.store.previous_key_files.iter().enumerate() {
            check_private_file(path, &format!("store.previous_key_files[{i}]"))?;
        }
        if let Some(path) = &self.api.token_file {
            check_private_file(path, "api.token_file")?;
        }
        if let Some(path) = &self.api.tls_key_file {
            check_private_file(path, "api.tls_key_file")?;
        }
        Ok(())
    }

    /// Reads each webhook's `url_file` into `url` and `secret_file` into
    /// `secret` (a trailing newline trimmed), after checking the file is
    /// private, then clears the `*_file` field: afterwards the rest of the code
    /// reads only `url`/`secret`, and the config still passes
    /// [`Config::validate`]. A URL read from a file must satisfy the same rules
    /// as one written inline.
    pub fn resolve_secrets(&mut self) -> Result<(), ConfigError> {
        for (i, w) in self.alerts.webhooks.iter_mut().enumerate() {
            if let Some(path) = w.url_file.take() {
                let key = format!("alerts.webhooks[{i}].url_file");
                let url = read_secret_file(&path, &key)?;
                check_webhook_url(&key, url.expose())?;
                w.url = Some(url);
            }
            if let Some(path) = w.secret_file.take() {
                let key = format!("alerts.webhooks[{i}].secret_file");
                w.secret = Some(read_secret_file(&path, &key)?);
            }
        }
        Ok(())
    }
}

/// Refuses a file that group or others can access: it holds a key, a token
/// or a webhook secret. `key` is the config key that names it, for the message.
pub fn check_private_file(path: &Path, key: &str) -> Result<(), ConfigError> {
    let meta = fs::metadata(path).map_err(|source| ConfigError::File {
        key: key.to_owned(),
        path: path.to_path_buf(),
        source,
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(ConfigError::Permissions {
            key: key.to_owned(),
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// A regular file this process can open for reading.
fn check_readable_file(path: &Path) -> io::Result<()> {
    let file = fs::File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(())
}

/// Reads a private secret file named by `key`: refused when group or others
/// can access it, one trailing newline trimmed, empty refused.
pub(super) fn read_secret_file(path: &Path, key: &str) -> Result<Secret, ConfigError> {
    check_private_file(path, key)?;
    read_secret_text(path, key)
}

/// Reads a systemd credential: systemd makes it readable by the service only
/// but may give it mode 0440 with a private group, so its mode is trusted
/// (as for `acutoken.key`); otherwise as [`read_secret_file`]. `what` names
/// it in errors.
pub(super) fn read_credential_file(path: &Path, what: &str) -> Result<Secret, ConfigError> {
    read_secret_text(path, what)
}

fn read_secret_text(path: &Path, key: &str) -> Result<Secret, ConfigError> {
    let file_error = |source| ConfigError::File {
        key: key.to_owned(),
        path: path.to_path_buf(),
        source,
    };
    let mut text = fs::read_to_string(path).map_err(file_error)?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    let secret = Secret::new(text);
    if secret.is_empty() {
        return Err(file_error(io::Error::new(
            io::ErrorKind::InvalidData,
            "the file is empty",
        )));
    }
    Ok(secret)
}
