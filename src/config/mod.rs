//! Configuration: the keys of DESIGN §6, where they come from (§5), and the
//! rules they must satisfy.
//!
//! Every key of DESIGN §6 is a field here, with the same name. Durations are
//! humantime strings in TOML and in the environment. [`Config::load`] is the
//! one way the rest of the program gets a config: it finds the file, layers
//! the environment over it, rejects unknown keys, validates, checks the
//! permissions of every secret file and reads the webhook secrets, so callers
//! only ever see a config that is ready to use.
//!
//! The parts: the types here (each section of the file, with its defaults),
//! `load` (finding and reading the file, TOML and unknown keys), `env` (the
//! `ACUTOKEN__*` overlay), `validate` (the rules of DESIGN §6), `files`
//! (private secret files), `paths` (where the store, spills and socket live),
//! `postgres` (`store.url` taken apart for the PostgreSQL store) and `mask`
//! (the effective config with secrets hidden).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::policy::Policy;
use crate::model::{Mode, Severity};
use crate::secret::Secret;

mod env;
mod error;
mod files;
mod load;
mod mask;
mod paths;
mod postgres;
mod validate;

pub use error::ConfigError;
pub use files::check_private_file;
pub use load::{CONFIG_ENV, ConfigSource, LoadedConfig, SYSTEM_CONFIG, locate};
pub use postgres::{PASSWORD_CREDENTIAL, PgTarget, PgTls, StoreTarget};

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
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
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
    /// A PostgreSQL store instead of the SQLite file (DESIGN §10), e.g.
    /// `postgres://acutoken@db.example.com/acutoken?sslmode=verify-full`;
    /// `store.path` must then be unset. Never holds a password (refused).
    /// See [`Config::store_target`].
    pub url: Option<String>,
    /// The PostgreSQL password, one line; must be private. `None` = the
    /// systemd credential `acutoken.pgpass` when present, else no password.
    pub password_file: Option<PathBuf>,
    /// On PostgreSQL, how long a replica's claims and duties outlive its
    /// last heartbeat (DESIGN §10): a replica that died, stalled or was
    /// cut off has its work taken over within this (plus a few seconds).
    #[serde(with = "crate::model::dur")]
    pub lease: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: None,
            key_file: None,
            previous_key_files: Vec::new(),
            spill_dir: None,
            url: None,
            password_file: None,
            lease: Duration::from_secs(30),
        }
    }
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
        // The keys the renewal policy reads take their defaults from the
        // policy itself, so each default is written once. The patterns name
        // every field: a field added to `Policy` fails to compile here until
        // the config carries it.
        let Policy {
            renew_at,
            probe_interval,
            jitter,
            retry_min,
            retry_max,
            access_token_margin,
            warn_before,
            secret_warn_before,
        } = Policy::default();
        RenewalConfig {
            mode: Mode::Absolute,
            lifetime: Duration::from_secs(30 * DAY),
            absolute_lifetime: None,
            renew_at,
            probe_interval,
            jitter,
            retry_min,
            retry_max,
            max_concurrent: 16,
            per_instance_concurrent: 2,
            http_timeout: Duration::from_secs(30),
            access_token_margin,
            warn_before,
            secret_warn_before,
        }
    }
}

impl RenewalConfig {
    /// The renewal policy this section sets: its tunables, as the pure
    /// decisions of `renewal::policy` take them.
    pub fn policy(&self) -> Policy {
        Policy {
            renew_at: self.renew_at,
            probe_interval: self.probe_interval,
            jitter: self.jitter,
            retry_min: self.retry_min,
            retry_max: self.retry_max,
            access_token_margin: self.access_token_margin,
            warn_before: self.warn_before.clone(),
            secret_warn_before: self.secret_warn_before,
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
    /// TLS certificate chain (PEM) for `listen`: required for a non-loopback
    /// address, used on loopback too when set. May be readable by others.
    pub tls_cert_file: Option<PathBuf>,
    /// TLS private key (PEM) for `listen`; must be private.
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
    /// This replica's name on a PostgreSQL store (DESIGN §10): unique among
    /// the live replicas. `None` = the host name (see `Config::replica_name`).
    pub replica_name: Option<String>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            shutdown_timeout: Duration::from_secs(45),
            replica_name: None,
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
