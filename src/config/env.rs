//! The environment: the `ACUTOKEN__SECTION__KEY` overlay (DESIGN §5) and
//! the systemd directory variables the default paths come from.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

use super::error::ConfigError;
use super::load::CONFIG_ENV;

/// How a variable is read: the process environment, or a stand-in in tests.
pub(super) type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<OsString>;

/// systemd passes several directories colon-separated; the first is ours.
pub(super) fn first_dir(value: Option<OsString>) -> Option<PathBuf> {
    let value = value?;
    std::env::split_paths(&value).find(|p| !p.as_os_str().is_empty())
}

/// Keys that take a list; in the environment their items are comma-separated.
pub(super) const LIST_KEYS: [&str; 3] = [
    "acumatica.scopes",
    "renewal.warn_before",
    "store.previous_key_files",
];

const ENV_PREFIX: &str = "acutoken__";

/// The `ACUTOKEN__*` variables, keyed by the variable name, plus what locating
/// the file needs.
pub(super) struct EnvSnapshot {
    acutoken: BTreeMap<String, String>,
    others: BTreeMap<String, OsString>,
}

impl EnvSnapshot {
    /// No variables at all: a config from TOML text alone.
    pub(super) fn empty() -> Self {
        EnvSnapshot {
            acutoken: BTreeMap::new(),
            others: BTreeMap::new(),
        }
    }

    pub(super) fn collect<I, K, V>(vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: Into<OsString>,
    {
        let mut acutoken = BTreeMap::new();
        let mut others = BTreeMap::new();
        for (name, value) in vars {
            let Ok(name) = name.into().into_string() else {
                continue;
            };
            let value = value.into();
            if name.to_ascii_lowercase().starts_with(ENV_PREFIX) {
                if Self::key_of(&name).is_empty() {
                    return Err(ConfigError::Malformed(format!(
                        "environment variable {name} names no config key"
                    )));
                }
                let value = value
                    .into_string()
                    .map_err(|_| ConfigError::Environment { name: name.clone() })?;
                acutoken.insert(name, value);
            } else if name == CONFIG_ENV || name == "CONFIGURATION_DIRECTORY" {
                others.insert(name, value);
            }
        }
        Ok(EnvSnapshot { acutoken, others })
    }

    pub(super) fn get(&self, name: &str) -> Option<OsString> {
        self.others.get(name).cloned()
    }

    /// The config key each variable sets, as the `config` crate maps it.
    fn key_of(name: &str) -> String {
        name.to_ascii_lowercase()[ENV_PREFIX.len()..].replace("__", ".")
    }

    /// The source map for `config::Environment`, with list items trimmed.
    pub(super) fn source_map(&self) -> config::Map<String, String> {
        self.acutoken
            .iter()
            .map(|(name, value)| {
                let value = if LIST_KEYS.contains(&Self::key_of(name).as_str()) {
                    value
                        .split(',')
                        .map(str::trim)
                        .collect::<Vec<_>>()
                        .join(",")
                } else {
                    value.clone()
                };
                (name.clone(), value)
            })
            .collect()
    }

    /// The variable that set `key` or a key under it, to name in an error.
    pub(super) fn variable_for(&self, key: &str) -> Option<&str> {
        self.acutoken.keys().map(String::as_str).find(|name| {
            let k = Self::key_of(name);
            k == key || k.starts_with(&format!("{key}."))
        })
    }
}

/// An environment of exactly `pairs`, for tests.
#[cfg(test)]
pub(super) fn fake_env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + use<> {
    let pairs: Vec<(String, OsString)> = pairs
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect();
    move |name| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
}
