//! Why a configuration was refused: the one-line messages of DESIGN §6.

use std::io;
use std::path::PathBuf;

/// Why a configuration was refused. Every variant is fatal where a config is
/// first needed (the command exits non-zero with the message after `error: `)
/// and, on a SIGHUP reload, leaves the old config running and raises
/// `config_reload_failed`. The messages are one line and never contain the
/// value of a secret key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file named by `-c/--config` or `ACUTOKEN_CONFIG` does not exist. The
    /// caller must not fall back to defaults: the operator meant that file.
    #[error("config file {} (named by {by}) does not exist", path.display())]
    Missing {
        /// The path as named.
        path: PathBuf,
        /// `--config` or `ACUTOKEN_CONFIG`.
        by: &'static str,
    },
    /// The config file exists but cannot be read; the operator fixes its
    /// permissions or the user the command runs as.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The file is not valid TOML; the operator fixes the line named.
    #[error("{origin}:{line}:{column}: {message}")]
    Syntax {
        /// The file (or `TOML` for a string).
        origin: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's complaint, without the source line (it may hold a secret).
        message: String,
    },
    /// A key acutoken does not know, in the file or the environment: usually a typo.
    #[error("unknown key `{key}` {origin}")]
    UnknownKey {
        /// Full dotted key, e.g. `renewal.foo`.
        key: String,
        /// `in FILE` or `from environment variable NAME`.
        origin: String,
    },
    /// A value of the wrong type or out of range, or a rule across keys broken;
    /// the operator changes the key named.
    #[error("`{key}`: {reason}")]
    Invalid {
        /// Full dotted key, e.g. `alerts.webhooks[0].url`.
        key: String,
        /// What is wrong, never echoing a secret value.
        reason: String,
    },
    /// The configuration could not be assembled at all (an environment variable
    /// name that is not a key path); the operator fixes the source named.
    #[error("{0}")]
    Malformed(String),
    /// A file named by a `*_file` key is readable or writable by group or
    /// others; the operator runs the `chmod` in the message.
    #[error("`{key}`: {} is accessible by group or others; run `chmod 600 {}`", path.display(), path.display())]
    Permissions {
        /// The key that names the file.
        key: String,
        /// The file.
        path: PathBuf,
    },
    /// A file named by a `*_file` key cannot be read, or holds nothing.
    #[error("`{key}`: cannot read {}: {source}", path.display())]
    File {
        /// The key that names the file.
        key: String,
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// An `ACUTOKEN_*` environment variable is not valid UTF-8.
    #[error("environment variable {name} is not valid UTF-8")]
    Environment {
        /// The variable's name (lossily converted).
        name: String,
    },
}

/// A value of the wrong type or out of range, or a rule across keys broken.
pub(super) fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}
