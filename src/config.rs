//! Configuration: the keys of DESIGN §6, where they come from (§5), and the
//! rules they must satisfy.
//!
//! Every key of DESIGN §6 is a field here, with the same name. Durations are
//! humantime strings in TOML and in the environment. [`Config::load`] is the
//! one way the rest of the program gets a config: it finds the file, layers
//! the environment over it, rejects unknown keys, validates, checks the
//! permissions of every secret file and reads the webhook secrets, so callers
//! only ever see a config that is ready to use.

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{Mode, Severity};
use crate::secret::Secret;

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[store]`: where connections and their sealed secrets live.
    pub store: StoreConfig,
    /// `[acumatica]`: how instances are reached.
    pub acumatica: AcumaticaConfig,
    /// `[renewal]`: when and how refresh tokens are refreshed.
    pub renewal: RenewalConfig,
    /// `[alerts]`: grouping, repetition and the webhook channels.
    pub alerts: AlertsConfig,
    /// `[api]`: the local API socket and the optional TCP listener.
    pub api: ApiConfig,
    /// `[callback]`: the authorization-code callback listener.
    pub callback: CallbackConfig,
    /// `[metrics]`: the Prometheus listener.
    pub metrics: MetricsConfig,
    /// `[serve]`: daemon lifecycle.
    pub serve: ServeConfig,
    /// `[log]`: log level and format.
    pub log: LogConfig,
}

/// `[store]`
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `None` = `$STATE_DIRECTORY/acutoken.db`, else `./acutoken.db` (see `Config::store_path`).
    pub path: Option<PathBuf>,
    /// The primary key (base64 of 32 bytes on one line); must be private.
    pub key_file: Option<PathBuf>,
    /// Older keys that still open values sealed before a rotation; must be private.
    pub previous_key_files: Vec<PathBuf>,
    /// Where a rotated token the store would not take is spilled (sealed),
    /// for the daemon and the CLI alike. `None` = `$RUNTIME_DIRECTORY/pending`,
    /// else `pending/` beside the store (see `Config::spill_dir`).
    pub spill_dir: Option<PathBuf>,
}

/// `[acumatica]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcumaticaConfig {
    /// Scopes requested at authorization.
    pub scopes: Vec<String>,
    /// The redirect URI registered on the Connected Application.
    pub redirect_uri: Option<String>,
    /// An extra trusted root CA (PEM) for on-premises instances.
    pub ca_file: Option<PathBuf>,
    /// Plain http for 127.0.0.1/localhost instances only.
    pub allow_insecure_loopback: bool,
    /// Instances on private addresses; link-local and metadata addresses are always refused.
    pub allow_private_networks: bool,
}

impl Default for AcumaticaConfig {
    fn default() -> Self {
        AcumaticaConfig {
            scopes: vec!["api".into(), "offline_access".into()],
            redirect_uri: None,
            ca_file: None,
            allow_insecure_loopback: false,
            allow_private_networks: true,
        }
    }
}

/// `[renewal]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RenewalConfig {
    /// Default mode for new connections.
    pub mode: Mode,
    /// Default refresh-token lifetime for new connections.
    #[serde(with = "crate::model::dur")]
    pub lifetime: Duration,
    /// `"none"` = no cap.
    #[serde(with = "optional_duration")]
    pub absolute_lifetime: Option<Duration>,
    /// Sliding: refresh when this fraction of the lifetime has passed.
    pub renew_at: f64,
    /// Refresh at least this often; zero = off.
    #[serde(with = "crate::model::dur")]
    pub probe_interval: Duration,
    /// At most this much earlier, at random (capped at 10 % of the lifetime).
    #[serde(with = "crate::model::dur")]
    pub jitter: Duration,
    /// Smallest backoff after a transient failure.
    #[serde(with = "crate::model::dur")]
    pub retry_min: Duration,
    /// Largest backoff after a transient failure.
    #[serde(with = "crate::model::dur")]
    pub retry_max: Duration,
    /// Refreshes in flight at once, in total.
    pub max_concurrent: usize,
    /// Refreshes in flight at once against one instance.
    pub per_instance_concurrent: usize,
    /// Whole-request timeout of a token request.
    #[serde(with = "crate::model::dur")]
    pub http_timeout: Duration,
    /// `token` refreshes when less than this is left.
    #[serde(with = "crate::model::dur")]
    pub access_token_margin: Duration,
    /// `expiry_approaching` points before a deadline.
    #[serde(with = "duration_list")]
    pub warn_before: Vec<Duration>,
    /// `secret_expiring` point before a secret's Expires On.
    #[serde(with = "crate::model::dur")]
    pub secret_warn_before: Duration,
}

const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;

impl Default for RenewalConfig {
    fn default() -> Self {
        RenewalConfig {
            mode: Mode::Absolute,
            lifetime: Duration::from_secs(30 * DAY),
            absolute_lifetime: None,
            renew_at: 0.66,
            probe_interval: Duration::from_secs(DAY),
            jitter: Duration::from_secs(6 * HOUR),
            retry_min: Duration::from_secs(60),
            retry_max: Duration::from_secs(HOUR),
            max_concurrent: 16,
            per_instance_concurrent: 2,
            http_timeout: Duration::from_secs(30),
            access_token_margin: Duration::from_secs(5 * 60),
            warn_before: vec![
                Duration::from_secs(7 * DAY),
                Duration::from_secs(3 * DAY),
                Duration::from_secs(DAY),
            ],
            secret_warn_before: Duration::from_secs(14 * DAY),
        }
    }
}

/// The chat or webhook flavour of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChannelKind {
    /// Slack incoming webhook (text + Block Kit).
    Slack,
    /// Teams Workflows webhook (Adaptive Card).
    Teams,
    /// Discord webhook (embeds).
    Discord,
    /// Google Chat webhook.
    GoogleChat,
    /// acutoken's own JSON, optionally signed.
    Generic,
}

impl ChannelKind {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Slack => "slack",
            ChannelKind::Teams => "teams",
            ChannelKind::Discord => "discord",
            ChannelKind::GoogleChat => "google_chat",
            ChannelKind::Generic => "generic",
        }
    }
}

/// One `[[alerts.webhooks]]` table.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Unique channel name, used in logs instead of the URL.
    pub name: String,
    /// Message flavour.
    pub kind: ChannelKind,
    /// The URL is a secret: it is never logged; channels are named by `name` and host.
    #[serde(default)]
    pub url: Option<Secret>,
    /// A private file holding the URL; read into `url` by [`Config::resolve_secrets`].
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    /// Alerts below this severity are not sent to this channel.
    #[serde(default = "default_min_severity")]
    pub min_severity: Severity,
    /// `generic` only: HMAC-SHA256 signing secret.
    #[serde(default)]
    pub secret: Option<Secret>,
    /// A private file holding `secret`; read into it by [`Config::resolve_secrets`].
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
}

fn default_min_severity() -> Severity {
    Severity::Warning
}

/// `[alerts]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Re-send a still-firing alert this often.
    #[serde(with = "crate::model::dur")]
    pub repeat_interval: Duration,
    /// Send `resolved` when a condition clears.
    pub send_resolved: bool,
    /// Alerts raised within this window go out together.
    #[serde(with = "crate::model::dur")]
    pub group_wait: Duration,
    /// At most one message per channel and kind this often.
    #[serde(with = "crate::model::dur")]
    pub group_interval: Duration,
    /// A larger group lists this many and a count.
    pub group_max: usize,
    /// Smallest webhook delivery backoff.
    #[serde(with = "crate::model::dur")]
    pub retry_min: Duration,
    /// Largest webhook delivery backoff.
    #[serde(with = "crate::model::dur")]
    pub retry_max: Duration,
    /// Cron expression of the digest (5 fields, or 6 with leading seconds).
    pub digest: Option<String>,
    /// IANA time zone the digest schedule is read in.
    pub digest_timezone: String,
    /// The channels.
    pub webhooks: Vec<WebhookConfig>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig {
            repeat_interval: Duration::from_secs(DAY),
            send_resolved: true,
            group_wait: Duration::from_secs(30),
            group_interval: Duration::from_secs(5 * 60),
            group_max: 10,
            retry_min: Duration::from_secs(10),
            retry_max: Duration::from_secs(10 * 60),
            digest: None,
            digest_timezone: "UTC".into(),
            webhooks: Vec::new(),
        }
    }
}

/// `[api]`
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// `None` = `$RUNTIME_DIRECTORY/acutoken.sock`, else beside the store (see `Config::socket_path`).
    pub socket: Option<PathBuf>,
    /// Group given access to the socket (then 0660).
    pub socket_group: Option<String>,
    /// Optional TCP listener for the same API.
    pub listen: Option<SocketAddr>,
    /// Bearer tokens accepted on `listen`, one a line; must be private.
    pub token_file: Option<PathBuf>,
    /// TLS certificate chain (PEM) for a non-loopback `listen`.
    pub tls_cert_file: Option<PathBuf>,
    /// TLS private key (PEM) for a non-loopback `listen`; must be private.
    pub tls_key_file: Option<PathBuf>,
}

/// `[callback]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallbackConfig {
    /// Where the callback listener binds; `None` = off.
    pub listen: Option<SocketAddr>,
    /// `None` = the path of `acumatica.redirect_uri`, else `/settings/acumaticacallback`.
    pub path: Option<String>,
    /// How long an authorization link stays valid.
    #[serde(with = "crate::model::dur")]
    pub state_ttl: Duration,
}

impl Default for CallbackConfig {
    fn default() -> Self {
        CallbackConfig {
            listen: None,
            path: None,
            state_ttl: Duration::from_secs(14 * DAY),
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where Prometheus metrics are served; `None` = off.
    pub listen: Option<SocketAddr>,
}

/// `[serve]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// How long refreshes in flight may take to finish at shutdown.
    #[serde(with = "crate::model::dur")]
    pub shutdown_timeout: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            shutdown_timeout: Duration::from_secs(45),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
    /// Native journald fields.
    Journald,
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// One of `trace`, `debug`, `info`, `warn`, `error`.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

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

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

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

type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<OsString>;

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

/// systemd passes several directories colon-separated; the first is ours.
fn first_dir(value: Option<OsString>) -> Option<PathBuf> {
    let value = value?;
    std::env::split_paths(&value).find(|p| !p.as_os_str().is_empty())
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

/// Keys that take a list; in the environment their items are comma-separated.
const LIST_KEYS: [&str; 3] = [
    "acumatica.scopes",
    "renewal.warn_before",
    "store.previous_key_files",
];

const ENV_PREFIX: &str = "acutoken__";

/// The `ACUTOKEN__*` variables, keyed by the variable name, plus what locating
/// the file needs.
struct EnvSnapshot {
    acutoken: BTreeMap<String, String>,
    others: BTreeMap<String, OsString>,
}

impl EnvSnapshot {
    fn collect<I, K, V>(vars: I) -> Result<Self, ConfigError>
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

    fn get(&self, name: &str) -> Option<OsString> {
        self.others.get(name).cloned()
    }

    /// The config key each variable sets, as the `config` crate maps it.
    fn key_of(name: &str) -> String {
        name.to_ascii_lowercase()[ENV_PREFIX.len()..].replace("__", ".")
    }

    /// The source map for `config::Environment`, with list items trimmed.
    fn source_map(&self) -> config::Map<String, String> {
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
    fn variable_for(&self, key: &str) -> Option<&str> {
        self.acutoken.keys().map(String::as_str).find(|name| {
            let k = Self::key_of(name);
            k == key || k.starts_with(&format!("{key}."))
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
        let env = EnvSnapshot {
            acutoken: BTreeMap::new(),
            others: BTreeMap::new(),
        };
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

const LOG_LEVELS: [&str; 5] = ["trace", "debug", "info", "warn", "error"];

impl Config {
    /// Checks every rule of DESIGN §6 that a single value or a pair of values
    /// must satisfy; the first broken rule is returned, naming the key. Reads
    /// no files.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_renewal()?;
        self.validate_alerts()?;
        self.validate_listeners()?;
        if !LOG_LEVELS.contains(&self.log.level.as_str()) {
            return Err(invalid(
                "log.level",
                format!(
                    "must be one of trace, debug, info, warn, error (is `{}`)",
                    self.log.level
                ),
            ));
        }
        Ok(())
    }

    fn validate_renewal(&self) -> Result<(), ConfigError> {
        let r = &self.renewal;
        if !(r.renew_at > 0.0 && r.renew_at < 1.0) {
            return Err(invalid(
                "renewal.renew_at",
                format!("must be greater than 0 and less than 1 (is {})", r.renew_at),
            ));
        }
        if r.lifetime.is_zero() {
            return Err(invalid("renewal.lifetime", "must be greater than 0"));
        }
        if let Some(cap) = r.absolute_lifetime
            && cap < r.lifetime
        {
            return Err(invalid(
                "renewal.absolute_lifetime",
                format!(
                    "must be at least renewal.lifetime ({}), or \"none\" (is {})",
                    crate::model::fmt_duration(r.lifetime),
                    crate::model::fmt_duration(cap)
                ),
            ));
        }
        check_backoff("renewal", r.retry_min, r.retry_max)?;
        if r.max_concurrent < 1 {
            return Err(invalid("renewal.max_concurrent", "must be at least 1"));
        }
        if r.per_instance_concurrent < 1 {
            return Err(invalid(
                "renewal.per_instance_concurrent",
                "must be at least 1",
            ));
        }
        if r.http_timeout.is_zero() {
            return Err(invalid("renewal.http_timeout", "must be greater than 0"));
        }
        if self.serve.shutdown_timeout <= r.http_timeout {
            return Err(invalid(
                "serve.shutdown_timeout",
                format!(
                    "must exceed renewal.http_timeout ({}) so refreshes in flight can be saved (is {})",
                    crate::model::fmt_duration(r.http_timeout),
                    crate::model::fmt_duration(self.serve.shutdown_timeout)
                ),
            ));
        }
        if r.warn_before.is_empty() {
            return Err(invalid(
                "renewal.warn_before",
                "must list at least one duration",
            ));
        }
        if r.warn_before.iter().any(Duration::is_zero) {
            return Err(invalid(
                "renewal.warn_before",
                "entries must be greater than 0",
            ));
        }
        Ok(())
    }

    fn validate_alerts(&self) -> Result<(), ConfigError> {
        let a = &self.alerts;
        if a.repeat_interval.is_zero() {
            return Err(invalid("alerts.repeat_interval", "must be greater than 0"));
        }
        if a.group_max < 1 {
            return Err(invalid("alerts.group_max", "must be at least 1"));
        }
        check_backoff("alerts", a.retry_min, a.retry_max)?;
        if let Some(expr) = &a.digest {
            cron_six_fields(expr).map_err(|reason| invalid("alerts.digest", reason))?;
        }
        if a.digest_timezone.parse::<chrono_tz::Tz>().is_err() {
            return Err(invalid(
                "alerts.digest_timezone",
                format!(
                    "`{}` is not an IANA time zone name such as `Europe/Berlin`",
                    a.digest_timezone
                ),
            ));
        }
        let mut names = HashSet::new();
        for (i, w) in a.webhooks.iter().enumerate() {
            let key = |field: &str| format!("alerts.webhooks[{i}].{field}");
            if w.name.trim().is_empty() {
                return Err(invalid(key("name"), "must not be empty"));
            }
            if !names.insert(w.name.as_str()) {
                return Err(invalid(
                    key("name"),
                    format!("`{}` is already used by an earlier webhook", w.name),
                ));
            }
            match (&w.url, &w.url_file) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        key("url"),
                        "both `url` and `url_file` are set; set only one",
                    ));
                }
                (None, None) => {
                    return Err(invalid(
                        key("url"),
                        "one of `url` or `url_file` is required",
                    ));
                }
                (Some(url), None) => check_webhook_url(&key("url"), url.expose())?,
                (None, Some(_)) => {}
            }
            let has_secret = w.secret.is_some() || w.secret_file.is_some();
            if has_secret && w.kind != ChannelKind::Generic {
                return Err(invalid(
                    key("secret"),
                    format!(
                        "a signing secret is only for kind `generic`, not `{}`",
                        w.kind.as_str()
                    ),
                ));
            }
            if w.secret.is_some() && w.secret_file.is_some() {
                return Err(invalid(
                    key("secret"),
                    "both `secret` and `secret_file` are set; set only one",
                ));
            }
            if w.secret.as_ref().is_some_and(Secret::is_empty) {
                return Err(invalid(key("secret"), "must not be empty"));
            }
        }
        Ok(())
    }

    fn validate_listeners(&self) -> Result<(), ConfigError> {
        if let Some(uri) = &self.acumatica.redirect_uri {
            let url = url::Url::parse(uri).map_err(|e| {
                invalid(
                    "acumatica.redirect_uri",
                    format!("is not an absolute URL: {e}"),
                )
            })?;
            if !(url.scheme() == "https" || (url.scheme() == "http" && is_loopback(&url))) {
                return Err(invalid(
                    "acumatica.redirect_uri",
                    "must be an https URL (http only for localhost or a loopback address)",
                ));
            }
        }
        if let Some(path) = &self.callback.path
            && !path.starts_with('/')
        {
            return Err(invalid(
                "callback.path",
                format!("must start with `/` (is `{path}`)"),
            ));
        }
        if self.callback.state_ttl.is_zero() {
            return Err(invalid("callback.state_ttl", "must be greater than 0"));
        }
        let api = &self.api;
        match (&api.tls_cert_file, &api.tls_key_file) {
            (Some(_), None) => {
                return Err(invalid(
                    "api.tls_key_file",
                    "is required with `api.tls_cert_file`",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "api.tls_cert_file",
                    "is required with `api.tls_key_file`",
                ));
            }
            _ => {}
        }
        if let Some(listen) = api.listen {
            if api.token_file.is_none() {
                return Err(invalid(
                    "api.token_file",
                    "is required when `api.listen` is set: every request on it needs a bearer token",
                ));
            }
            if !listen.ip().is_loopback() && api.tls_cert_file.is_none() {
                return Err(invalid(
                    "api.tls_cert_file",
                    format!(
                        "and `api.tls_key_file` are required because `api.listen` ({listen}) is not a loopback address"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The digest schedule in the six-field form (seconds first) that
    /// tokio-cron-scheduler parses, or `None` when no digest is configured or
    /// the expression is invalid (which [`Config::validate`] refuses).
    pub fn digest_schedule(&self) -> Option<String> {
        self.alerts
            .digest
            .as_deref()
            .and_then(|e| cron_six_fields(e).ok())
    }

    /// Checks that the key and API files are private (see
    /// [`check_private_file`]); webhook files are checked as they are read.
    fn check_files(&self) -> Result<(), ConfigError> {
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

    /// `store.path`, else `$STATE_DIRECTORY/acutoken.db` (the first directory
    /// when several are listed), else `./acutoken.db`.
    pub fn store_path(&self) -> PathBuf {
        self.store_path_in(&|name| std::env::var_os(name))
    }

    fn store_path_in(&self, env: EnvLookup<'_>) -> PathBuf {
        if let Some(path) = &self.store.path {
            return path.clone();
        }
        match first_dir(env("STATE_DIRECTORY")) {
            Some(dir) => dir.join("acutoken.db"),
            None => PathBuf::from("./acutoken.db"),
        }
    }

    /// `store.spill_dir`, else `$RUNTIME_DIRECTORY/pending` (a tmpfs under
    /// systemd), else `pending` beside the store. The packaged config names
    /// it, so that a CLI run without `$RUNTIME_DIRECTORY` spills where the
    /// daemon looks.
    pub fn spill_dir(&self) -> PathBuf {
        if let Some(dir) = &self.store.spill_dir {
            return dir.clone();
        }
        if let Some(r) = self.runtime_dir() {
            return r.join("pending");
        }
        let store = self.store_path();
        store
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join("pending")
    }

    /// Every place a spilled token may wait, the configured one first: the
    /// daemon imports from all of them at start, so a token spilled by an
    /// older version, or by a CLI run with another environment, is not left
    /// behind.
    pub fn spill_dirs(&self) -> Vec<PathBuf> {
        let store = self.store_path();
        let beside = store
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join("pending");
        let mut dirs = vec![self.spill_dir()];
        dirs.extend(self.runtime_dir().map(|r| r.join("pending")));
        dirs.extend(
            first_dir(std::env::var_os("XDG_RUNTIME_DIR"))
                .map(|x| x.join("acutoken").join("pending")),
        );
        dirs.push(beside);
        let mut seen = Vec::new();
        dirs.retain(|d| {
            let new = !seen.contains(d);
            seen.push(d.clone());
            new
        });
        dirs
    }

    /// `api.socket`, else `$RUNTIME_DIRECTORY/acutoken.sock`, else
    /// `acutoken.sock` beside the store.
    pub fn socket_path(&self) -> PathBuf {
        self.socket_path_in(&|name| std::env::var_os(name))
    }

    fn socket_path_in(&self, env: EnvLookup<'_>) -> PathBuf {
        if let Some(path) = &self.api.socket {
            return path.clone();
        }
        match first_dir(env("RUNTIME_DIRECTORY")) {
            Some(dir) => dir.join("acutoken.sock"),
            None => self.store_path_in(env).with_file_name("acutoken.sock"),
        }
    }

    /// `$RUNTIME_DIRECTORY` (its first directory), where tokens that could not
    /// be saved are spilled; `None` outside systemd.
    pub fn runtime_dir(&self) -> Option<PathBuf> {
        first_dir(std::env::var_os("RUNTIME_DIRECTORY"))
    }

    /// `callback.path`, else the path of `acumatica.redirect_uri`, else
    /// `/settings/acumaticacallback`.
    pub fn callback_path(&self) -> String {
        if let Some(path) = &self.callback.path {
            return path.clone();
        }
        self.acumatica
            .redirect_uri
            .as_deref()
            .and_then(|u| url::Url::parse(u).ok())
            .map(|u| u.path().to_owned())
            .unwrap_or_else(|| "/settings/acumaticacallback".to_owned())
    }

    /// The effective configuration as TOML for `config check`: path defaults
    /// filled in (`store.path`, `api.socket`, `callback.path`), every webhook
    /// URL and signing secret shown as `***`.
    pub fn masked_toml(&self) -> String {
        let mut effective = self.clone();
        effective.store.path = Some(self.store_path());
        effective.api.socket = Some(self.socket_path());
        effective.callback.path = Some(self.callback_path());
        for w in &mut effective.alerts.webhooks {
            // Secret already serialises as `***`; replacing the value as well
            // keeps that true whatever serializer is used.
            w.url = w.url.as_ref().map(|_| Secret::new("***"));
            w.secret = w.secret.as_ref().map(|_| Secret::new("***"));
        }
        match toml::to_string(&effective) {
            Ok(text) => text,
            // Every field is a plain value, a table or an array of tables,
            // which TOML can always express; say so rather than panic.
            Err(e) => format!("# the configuration could not be shown as TOML: {e}\n"),
        }
    }
}

fn check_backoff(section: &str, min: Duration, max: Duration) -> Result<(), ConfigError> {
    if min.is_zero() {
        return Err(invalid(
            format!("{section}.retry_min"),
            "must be greater than 0",
        ));
    }
    if max < min {
        return Err(invalid(
            format!("{section}.retry_max"),
            format!(
                "must be at least {section}.retry_min ({}) (is {})",
                crate::model::fmt_duration(min),
                crate::model::fmt_duration(max)
            ),
        ));
    }
    Ok(())
}

fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// A webhook URL is a secret: the reasons given never include any of it.
fn check_webhook_url(key: &str, raw: &str) -> Result<(), ConfigError> {
    let url = url::Url::parse(raw.trim()).map_err(|_| invalid(key, "is not an absolute URL"))?;
    // A metadata or link-local address (an IP literal no resolver would see):
    // refused here, so the mistake shows at `config check` and at start.
    crate::acumatica::address::check_webhook_destination(&url)
        .map_err(|e| invalid(key, format!("must not go to {e}")))?;
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback(&url) => Ok(()),
        "http" => Err(invalid(
            key,
            "must use https (plain http only for localhost or a loopback address)",
        )),
        _ => Err(invalid(key, "must be an https URL")),
    }
}

/// Returns the six-field form (seconds first) of a 5- or 6-field cron
/// expression, checked by tokio-cron-scheduler itself.
fn cron_six_fields(expr: &str) -> Result<String, String> {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    let six = match fields.len() {
        5 => format!("0 {}", fields.join(" ")),
        6 => fields.join(" "),
        n => {
            return Err(format!(
                "`{expr}` has {n} fields; expected 5 (minute hour day-of-month month day-of-week), \
                 optionally preceded by seconds"
            ));
        }
    };
    // The same constructor (and so the same parser settings) the digest
    // schedules with; building a job needs no runtime.
    tokio_cron_scheduler::Job::new_tz(six.as_str(), chrono_tz::UTC, |_, _| {})
        .map_err(|_| format!("`{expr}` is not a valid cron expression"))?;
    Ok(six)
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

/// `Option<Duration>` written as a humantime string or `"none"`.
mod optional_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&crate::model::fmt_duration(*d)),
            None => s.serialize_str("none"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim().eq_ignore_ascii_case("none") {
            return Ok(None);
        }
        humantime::parse_duration(s.trim()).map(Some).map_err(|e| {
            serde::de::Error::custom(format!("`{s}` is not a duration or `none`: {e}"))
        })
    }
}

/// A list of humantime durations.
mod duration_list {
    use std::time::Duration;

    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for d in v {
            seq.serialize_element(&crate::model::fmt_duration(*d))?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.iter()
            .map(|s| {
                humantime::parse_duration(s.trim())
                    .map_err(|e| serde::de::Error::custom(format!("`{s}` is not a duration: {e}")))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + use<> {
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
    fn path_defaults_follow_systemd_directories() {
        let c = Config::default();
        let none = fake_env(&[]);
        assert_eq!(c.store_path_in(&none), PathBuf::from("./acutoken.db"));
        assert_eq!(c.socket_path_in(&none), PathBuf::from("./acutoken.sock"));

        let env = fake_env(&[
            ("STATE_DIRECTORY", "/var/lib/acutoken:/var/lib/other"),
            ("RUNTIME_DIRECTORY", "/run/acutoken"),
        ]);
        assert_eq!(
            c.store_path_in(&env),
            PathBuf::from("/var/lib/acutoken/acutoken.db")
        );
        assert_eq!(
            c.socket_path_in(&env),
            PathBuf::from("/run/acutoken/acutoken.sock")
        );

        let env = fake_env(&[("STATE_DIRECTORY", "/var/lib/acutoken")]);
        assert_eq!(
            c.socket_path_in(&env),
            PathBuf::from("/var/lib/acutoken/acutoken.sock")
        );

        let mut c = Config::default();
        c.store.path = Some("/srv/db/store.db".into());
        assert_eq!(
            c.socket_path_in(&none),
            PathBuf::from("/srv/db/acutoken.sock")
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

    #[test]
    fn cron_takes_five_or_six_fields() {
        assert_eq!(cron_six_fields("*/15 * * * *").unwrap(), "0 */15 * * * *");
        assert_eq!(cron_six_fields(" 5  0 8 * * * ").unwrap(), "5 0 8 * * *");
        assert!(cron_six_fields("0 8 * * * * *").is_err());
        assert!(cron_six_fields("0 8 32 * *").is_err());
        assert!(cron_six_fields("x 8 * * *").is_err());
    }
}
