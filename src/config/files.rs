//! The files a config names that hold secrets: each must be private, and
//! the webhook ones are read into the config.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::Config;
use super::error::ConfigError;
use super::validate::check_webhook_url;
use crate::secret::Secret;

impl Config {
    /// Checks that the key and API files are private (see
    /// [`check_private_file`]); webhook files are checked as they are read.
    pub(super) fn check_files(&self) -> Result<(), ConfigError> {
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

fn read_secret_file(path: &Path, key: &str) -> Result<Secret, ConfigError> {
    check_private_file(path, key)?;
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
