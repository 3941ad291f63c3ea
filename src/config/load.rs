//! Finding the config file (DESIGN §5), reading it, layering the environment
//! over it, and turning the parser's complaints into messages naming the full
//! key and where it came from (never quoting a secret).

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::Config;
use super::env::{EnvLookup, EnvSnapshot, LIST_KEYS, first_dir};
use super::error::{ConfigError, invalid};

/// The system-wide config file, consulted when nothing more specific is set.
pub const SYSTEM_CONFIG: &str = "/etc/acutoken/acutoken.toml";

/// Environment variable naming the config file.
pub const CONFIG_ENV: &str = "ACUTOKEN_CONFIG";

/// Where the configuration comes from (DESIGN §5), as decided by [`locate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// A file the operator named; it must exist.
    Named {
        /// The file.
        path: PathBuf,
        /// `--config` or `ACUTOKEN_CONFIG`.
        by: &'static str,
    },
    /// A file found at an implicit place (`$CONFIGURATION_DIRECTORY`, `/etc/acutoken`).
    Found(PathBuf),
    /// No file: the built-in defaults (and the environment).
    Defaults,
}

impl ConfigSource {
    /// The file this source reads, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            ConfigSource::Named { path, .. } | ConfigSource::Found(path) => Some(path),
            ConfigSource::Defaults => None,
        }
    }
}

/// Picks the config file: `explicit` (`-c/--config`), else `ACUTOKEN_CONFIG`,
/// else `$CONFIGURATION_DIRECTORY/acutoken.toml`, else
/// `/etc/acutoken/acutoken.toml`, else defaults. Implicit places are skipped
/// when the file is absent; a named file is returned even when absent, so that
/// loading it fails instead of silently using defaults.
pub fn locate(explicit: Option<&Path>) -> ConfigSource {
    locate_in(
        explicit,
        &|name| std::env::var_os(name),
        Path::new(SYSTEM_CONFIG),
    )
}

fn locate_in(explicit: Option<&Path>, env: EnvLookup<'_>, system: &Path) -> ConfigSource {
    if let Some(path) = explicit {
        return ConfigSource::Named {
            path: path.to_path_buf(),
            by: "--config",
        };
    }
    if let Some(path) = env(CONFIG_ENV).filter(|v| !v.is_empty()) {
        return ConfigSource::Named {
            path: path.into(),
            by: CONFIG_ENV,
        };
    }
    if let Some(dir) = first_dir(env("CONFIGURATION_DIRECTORY")) {
        let path = dir.join("acutoken.toml");
        if present(&path) {
            return ConfigSource::Found(path);
        }
    }
    if present(system) {
        return ConfigSource::Found(system.to_path_buf());
    }
    ConfigSource::Defaults
}

/// A file we cannot even stat (an unreadable directory) counts as present, so
/// that reading it reports the permission problem instead of quietly running
/// on defaults with the wrong store.
fn present(path: &Path) -> bool {
    !matches!(path.try_exists(), Ok(false))
}

/// A loaded, validated configuration and the file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedConfig {
    /// Ready to use: validated, secret files checked and read.
    pub config: Config,
    /// The file read, or `None` when running on defaults and the environment.
    pub source: Option<PathBuf>,
    /// The file itself holds a secret: a webhook `url` or `secret` written
    /// inline rather than in a `url_file`/`secret_file`.
    pub inline_secrets: bool,
}

impl LoadedConfig {
    /// A warning when the file holds secrets inline and every user on the
    /// machine can read it; `None` otherwise (also when it cannot be looked at).
    pub fn exposure_warning(&self) -> Option<String> {
        if !self.inline_secrets {
            return None;
        }
        let path = self.source.as_ref()?;
        let mode = fs::metadata(path).ok()?.permissions().mode() & 0o7777;
        (mode & 0o004 != 0).then(|| {
            format!(
                "{} holds webhook URLs or secrets inline and every user can read it (mode {mode:04o}): `chmod o-rwx` it (the package installs it 0640 root:acutoken), or move them to url_file/secret_file",
                path.display()
            )
        })
    }
}
impl Config {
    /// Finds the config file ([`locate`]), then loads it as
    /// [`Config::load_with_env`] does with the process environment.
    pub fn load(explicit: Option<&Path>) -> Result<LoadedConfig, ConfigError> {
        Self::load_with_env(explicit, std::env::vars_os())
    }

    /// Loads with `vars` standing in for the process environment: defaults,
    /// then the file, then `ACUTOKEN__SECTION__KEY` variables (lists
    /// comma-separated; `alerts.webhooks` only from the file, being an array
    /// of tables). `ACUTOKEN_CONFIG` and `CONFIGURATION_DIRECTORY` are
    /// also taken from `vars`. The result is validated, every `*_file` is
    /// checked to be private, and webhook `url_file`/`secret_file` are read
    /// into `url`/`secret` ([`Config::resolve_secrets`]).
    pub fn load_with_env<I, K, V>(
        explicit: Option<&Path>,
        vars: I,
    ) -> Result<LoadedConfig, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: Into<OsString>,
    {
        let env = EnvSnapshot::collect(vars)?;
        let source = locate_in(explicit, &|name| env.get(name), Path::new(SYSTEM_CONFIG));
        Self::load_from(&source, &env)
    }

    fn load_from(source: &ConfigSource, env: &EnvSnapshot) -> Result<LoadedConfig, ConfigError> {
        let text = match source {
            ConfigSource::Named { path, by } if !present(path) => {
                return Err(ConfigError::Missing {
                    path: path.clone(),
                    by,
                });
            }
            ConfigSource::Named { path, .. } | ConfigSource::Found(path) => Some(
                fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?,
            ),
            ConfigSource::Defaults => None,
        };
        let origin = source.path().map_or_else(
            || "the built-in defaults".to_owned(),
            |p| p.display().to_string(),
        );
        let mut config = parse(text.as_deref(), &origin, env)?;
        config.validate()?;
        config.check_files()?;
        // Before the *_file values are read into the same fields.
        let inline_secrets = text.is_some()
            && config
                .alerts
                .webhooks
                .iter()
                .any(|w| w.url.is_some() || w.secret.is_some());
        config.resolve_secrets()?;
        Ok(LoadedConfig {
            config,
            source: source.path().map(Path::to_path_buf),
            inline_secrets,
        })
    }

    /// Parses TOML text alone (no environment, no files read) and validates
    /// it. For tests and for checking the shipped example.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let env = EnvSnapshot::empty();
        let config = parse(Some(text), "TOML", &env)?;
        config.validate()?;
        Ok(config)
    }
}

fn parse(text: Option<&str>, origin: &str, env: &EnvSnapshot) -> Result<Config, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(text) = text {
        // The TOML is parsed here first only for its error: the `config`
        // crate's message quotes the offending line, which may hold a secret.
        if let Err(e) = toml::from_str::<toml::Table>(text) {
            let (line, column) = e.span().map_or((1, 1), |s| line_column(text, s.start));
            return Err(ConfigError::Syntax {
                origin: origin.to_owned(),
                line,
                column,
                message: e.message().trim().to_owned(),
            });
        }
        builder = builder.add_source(config::File::from_str(text, config::FileFormat::Toml));
    }
    let mut environment = config::Environment::with_prefix("ACUTOKEN")
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
        .ignore_empty(true)
        .list_separator(",")
        .source(Some(env.source_map()));
    for key in LIST_KEYS {
        environment = environment.with_list_parse_key(key);
    }
    builder
        .add_source(environment)
        .build()
        .and_then(|c| c.try_deserialize::<Config>())
        .map_err(|e| translate(e, origin, env))
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The `config` crate writes an array element's field as `webhooks[0]url`;
/// the config file spells it `webhooks[0].url`.
fn dotted(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 2);
    let mut chars = key.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == ']' && chars.peek().is_some_and(|n| *n != '.' && *n != '[') {
            out.push('.');
        }
    }
    out
}

/// Keys whose values are secrets: errors about them never quote the value.
fn is_secret_key(key: &str) -> bool {
    key.starts_with("alerts.webhooks") && (key.ends_with(".url") || key.ends_with(".secret"))
}

/// Turns a `config` crate error into one naming the full key and its origin.
fn translate(error: config::ConfigError, origin: &str, env: &EnvSnapshot) -> ConfigError {
    let mut key = String::new();
    let mut error = error;
    // `At` wraps the inner error with the key path leading to it.
    while let config::ConfigError::At {
        error: inner,
        key: k,
        ..
    } = error
    {
        if key.is_empty() {
            key = k.unwrap_or_default();
        }
        error = *inner;
    }
    let key = dotted(&key);
    let named_origin = |key: &str| match env.variable_for(key) {
        Some(name) => format!("from environment variable {name}"),
        None => format!("in {origin}"),
    };
    let paren = |key: &str| format!("({})", named_origin(key));
    match error {
        config::ConfigError::Message(message) => {
            if let Some(field) = unknown_field(&message) {
                let full = if key.is_empty() {
                    field.to_owned()
                } else {
                    format!("{key}.{field}")
                };
                let origin = named_origin(&full);
                return ConfigError::UnknownKey { key: full, origin };
            }
            if key.is_empty() {
                return ConfigError::Malformed(message);
            }
            if let (Some(value), Some(allowed)) = (unknown_variant(&message), variants_of(&key)) {
                let reason = format!("`{value}` is not one of {allowed} {}", paren(&key));
                return invalid(key, reason);
            }
            let reason = if is_secret_key(&key) {
                format!("invalid value {}", paren(&key))
            } else {
                format!("{message} {}", paren(&key))
            };
            invalid(key, reason)
        }
        config::ConfigError::Type {
            unexpected,
            expected,
            key: k,
            ..
        } => {
            let key = k.map_or(key, |k| dotted(&k));
            let found = if is_secret_key(&key) {
                String::new()
            } else {
                format!(", found {unexpected}")
            };
            let reason = format!("must be {expected}{found} {}", paren(&key));
            invalid(key, reason)
        }
        config::ConfigError::NotFound(k) => {
            let k = dotted(&k);
            let reason = format!("is required {}", paren(&k));
            invalid(k, reason)
        }
        other => ConfigError::Malformed(other.to_string()),
    }
}

/// The value in the `config` crate's `enum X does not have variant constructor v`.
fn unknown_variant(message: &str) -> Option<&str> {
    message
        .split_once(" does not have variant constructor ")
        .map(|(_, value)| value)
}

/// The values an enum-typed key accepts, for a message better than serde's.
fn variants_of(key: &str) -> Option<&'static str> {
    let field = key.rsplit('.').next()?;
    match field {
        "mode" => Some("absolute, sliding"),
        "kind" => Some("slack, teams, discord, google_chat, generic"),
        "min_severity" => Some("info, warning, critical"),
        "format" => Some("text, json, journald"),
        _ => None,
    }
}

/// The field name in serde's `unknown field `x`, expected ...`.
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::env::fake_env;

    #[test]
    fn locate_falls_through_to_the_system_file_then_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let system = dir.path().join("system.toml");
        let confdir = dir.path().join("conf");
        fs::create_dir(&confdir).unwrap();
        let env = fake_env(&[("CONFIGURATION_DIRECTORY", confdir.to_str().unwrap())]);

        assert_eq!(locate_in(None, &env, &system), ConfigSource::Defaults);
        fs::write(&system, "").unwrap();
        assert_eq!(
            locate_in(None, &env, &system),
            ConfigSource::Found(system.clone())
        );
        fs::write(confdir.join("acutoken.toml"), "").unwrap();
        assert_eq!(
            locate_in(None, &env, &system),
            ConfigSource::Found(confdir.join("acutoken.toml"))
        );
        let env = fake_env(&[
            ("CONFIGURATION_DIRECTORY", confdir.to_str().unwrap()),
            ("ACUTOKEN_CONFIG", ""),
        ]);
        assert!(
            matches!(locate_in(None, &env, &system), ConfigSource::Found(_)),
            "empty = unset"
        );
    }

    #[test]
    fn array_element_keys_are_dotted() {
        assert_eq!(dotted("alerts.webhooks[0]url"), "alerts.webhooks[0].url");
        assert_eq!(dotted("a[1][2].b[3]"), "a[1][2].b[3]");
        assert_eq!(dotted("renewal.mode"), "renewal.mode");
    }

    #[test]
    fn syntax_positions_are_one_based() {
        assert_eq!(line_column("a = 1\nb = ", 10), (2, 5));
        assert_eq!(line_column("", 0), (1, 1));
    }
}
