//! Configuration: the types of DESIGN §6.
//!
//! Every key of DESIGN §6 is a field here, with the same name. Durations are
//! humantime strings in TOML and in the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{Mode, Severity};
use crate::secret::Secret;

/// The whole configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub store: StoreConfig,
    pub acumatica: AcumaticaConfig,
    pub renewal: RenewalConfig,
    pub alerts: AlertsConfig,
    pub api: ApiConfig,
    pub callback: CallbackConfig,
    pub metrics: MetricsConfig,
    pub serve: ServeConfig,
    pub log: LogConfig,
}

/// `[store]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `None` = `$STATE_DIRECTORY/acutoken.db`, else `./acutoken.db` (see `Config::store_path`).
    pub path: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub previous_key_files: Vec<PathBuf>,
}

/// `[acumatica]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcumaticaConfig {
    pub scopes: Vec<String>,
    pub redirect_uri: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub allow_insecure_loopback: bool,
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
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RenewalConfig {
    pub mode: Mode,
    #[serde(with = "humantime_serde")]
    pub lifetime: Duration,
    /// `"none"` = no cap.
    #[serde(with = "optional_duration")]
    pub absolute_lifetime: Option<Duration>,
    pub renew_at: f64,
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub jitter: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    pub max_concurrent: usize,
    pub per_instance_concurrent: usize,
    #[serde(with = "humantime_serde")]
    pub http_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub access_token_margin: Duration,
    #[serde(with = "duration_list")]
    pub warn_before: Vec<Duration>,
    #[serde(with = "humantime_serde")]
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
    Slack,
    Teams,
    Discord,
    GoogleChat,
    Generic,
}

impl ChannelKind {
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
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub name: String,
    pub kind: ChannelKind,
    /// The URL is a secret: it is never logged; channels are named by `name` and host.
    #[serde(default)]
    pub url: Option<Secret>,
    #[serde(default)]
    pub url_file: Option<PathBuf>,
    #[serde(default = "default_min_severity")]
    pub min_severity: Severity,
    /// `generic` only: HMAC-SHA256 signing secret.
    #[serde(default)]
    pub secret: Option<Secret>,
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
}

fn default_min_severity() -> Severity {
    Severity::Warning
}

/// `[alerts]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    #[serde(with = "humantime_serde")]
    pub repeat_interval: Duration,
    pub send_resolved: bool,
    #[serde(with = "humantime_serde")]
    pub group_wait: Duration,
    #[serde(with = "humantime_serde")]
    pub group_interval: Duration,
    pub group_max: usize,
    #[serde(with = "humantime_serde")]
    pub retry_min: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    pub digest: Option<String>,
    pub digest_timezone: String,
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
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// `None` = `$RUNTIME_DIRECTORY/acutoken.sock`, else beside the store (see `Config::socket_path`).
    pub socket: Option<PathBuf>,
    pub socket_group: Option<String>,
    pub listen: Option<SocketAddr>,
    pub token_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

/// `[callback]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallbackConfig {
    pub listen: Option<SocketAddr>,
    /// `None` = the path of `acumatica.redirect_uri`, else `/settings/acumaticacallback`.
    pub path: Option<String>,
    #[serde(with = "humantime_serde")]
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
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    pub listen: Option<SocketAddr>,
}

/// `[serve]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    #[serde(with = "humantime_serde")]
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
    #[default]
    Text,
    Json,
    Journald,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub level: String,
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
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_str("none"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim().eq_ignore_ascii_case("none") {
            return Ok(None);
        }
        humantime::parse_duration(s.trim())
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("`{s}` is not a duration or `none`: {e}")))
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
            seq.serialize_element(&humantime::format_duration(*d).to_string())?;
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
