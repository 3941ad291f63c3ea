//! Posting to webhooks: one client that follows no redirects and refuses
//! metadata and link-local addresses, the generic signature, and the two
//! store-less sends (`alert test`, `store_write_failed`).
//!
//! A webhook URL is a secret: results, errors and logs name a channel by its
//! name and host only, and no response body is ever read.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use super::render::{Message, Notice, render};
use crate::acumatica::address::{GuardedResolver, WEBHOOK_POLICY, check_webhook_destination};
use crate::acumatica::classify::retry_after;
use crate::config::{Config, WebhookConfig};
use crate::model::Timestamp;
use crate::model::{AlertFacts, AlertKind, Status};
use crate::secret::Secret;

/// The whole-request bound of one webhook post: a hanging endpoint costs its
/// own channel this long, and no other channel anything.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// Header carrying the signing time (Unix seconds).
pub const TIMESTAMP_HEADER: &str = "X-Acutoken-Timestamp";
/// Header carrying `sha256=<hex HMAC-SHA256(secret, "<timestamp>.<raw body>")>`.
pub const SIGNATURE_HEADER: &str = "X-Acutoken-Signature";

/// Why the webhook client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TLS backend failed to initialise: fatal for alert delivery; report it.
    #[error("cannot build the webhook HTTP client: {0}")]
    Build(String),
}

/// The one HTTP client webhooks go through: no redirects, no proxy, a bounded
/// timeout, and a resolver that refuses metadata and link-local addresses
/// (webhooks are configured by the operator, so loopback and private
/// addresses are allowed).
pub fn client() -> Result<reqwest::Client, ClientError> {
    let policy = WEBHOOK_POLICY;
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(WEBHOOK_TIMEOUT)
        .connect_timeout(WEBHOOK_TIMEOUT / 2)
        .no_proxy()
        .user_agent(concat!("acutoken/", env!("CARGO_PKG_VERSION")))
        .dns_resolver(Arc::new(GuardedResolver { policy }))
        .build()
        .map_err(|e| ClientError::Build(e.without_url().to_string()))
}

/// The host (and port, when given) of a webhook URL: all that may be shown of it.
pub fn host_of(url: Option<&Secret>) -> String {
    url.and_then(|u| url::Url::parse(u.expose().trim()).ok())
        .and_then(|u| {
            u.host_str().map(|h| match u.port() {
                Some(p) => format!("{h}:{p}"),
                None => h.to_string(),
            })
        })
        .unwrap_or_else(|| "(invalid URL)".to_string())
}

/// `sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// What became of one post.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered 2xx: the message is delivered.
    Accepted {
        /// The HTTP status.
        status: u16,
    },
    /// Anything else: try again later.
    Failed {
        /// The HTTP status, when there was an answer.
        status: Option<u16>,
        /// What went wrong, without URL or body.
        error: String,
        /// The endpoint's Retry-After.
        retry_after: Option<Duration>,
    },
}

/// Describes a transport error from its source chain, never its URL.
fn describe(e: &reqwest::Error, url: &Secret) -> String {
    let mut out = if e.is_timeout() {
        format!("timed out after {}s", WEBHOOK_TIMEOUT.as_secs())
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    // Belt and braces: no layer below should echo the URL, but it is a secret.
    out.replace(url.expose(), "***")
}

/// Posts `body` to `channel`, signed when the channel has a secret.
pub async fn post(
    http: &reqwest::Client,
    channel: &WebhookConfig,
    body: &Value,
    now: Timestamp,
) -> Outcome {
    let Some(url) = channel.url.as_ref() else {
        return Outcome::Failed {
            status: None,
            error: "no URL configured".into(),
            retry_after: None,
        };
    };
    let raw = match serde_json::to_vec(body) {
        Ok(raw) => raw,
        Err(e) => {
            return Outcome::Failed {
                status: None,
                error: format!("cannot encode the message: {e}"),
                retry_after: None,
            };
        }
    };
    let target = match url::Url::parse(url.expose().trim()) {
        Ok(t) => t,
        Err(_) => {
            return Outcome::Failed {
                status: None,
                error: "the URL is not valid".into(),
                retry_after: None,
            };
        }
    };
    if let Err(why) = check_webhook_destination(&target) {
        return Outcome::Failed {
            status: None,
            error: format!("refused before sending: {why}"),
            retry_after: None,
        };
    }
    let mut req = http
        .post(target)
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    if let Some(secret) = &channel.secret {
        let ts = now.timestamp();
        req = req
            .header(TIMESTAMP_HEADER, ts.to_string())
            .header(SIGNATURE_HEADER, sign(secret.expose().as_bytes(), ts, &raw));
    }
    match req.body(raw).send().await {
        Ok(resp) => {
            let status = resp.status();
            if status.is_success() {
                Outcome::Accepted {
                    status: status.as_u16(),
                }
            } else {
                let error = if status.is_redirection() {
                    format!("HTTP {}: redirects are not followed", status.as_u16())
                } else {
                    format!("HTTP {}", status.as_u16())
                };
                Outcome::Failed {
                    status: Some(status.as_u16()),
                    error,
                    retry_after: retry_after(resp.headers()),
                }
            }
        }
        Err(e) => Outcome::Failed {
            status: None,
            error: describe(&e, url),
            retry_after: None,
        },
    }
}

/// The result of one store-less send, naming the channel by name and host only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelResult {
    /// The channel's name.
    pub channel: String,
    /// The webhook's host.
    pub host: String,
    /// The HTTP status, when there was an answer.
    pub status: Option<u16>,
    /// What went wrong, when it did.
    pub error: Option<String>,
}

impl ChannelResult {
    /// True when the channel accepted the message.
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

impl std::fmt::Display for ChannelResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.error, self.status) {
            (None, Some(s)) => write!(f, "{} ({}): delivered, HTTP {s}", self.channel, self.host),
            (None, None) => write!(f, "{} ({}): delivered", self.channel, self.host),
            (Some(e), _) => write!(f, "{} ({}): failed: {e}", self.channel, self.host),
        }
    }
}

async fn send_to_all(config: &Config, facts: &AlertFacts) -> Vec<ChannelResult> {
    let now = chrono::Utc::now();
    let notice = Notice {
        id: uuid::Uuid::new_v4().to_string(),
        status: Status::Firing,
        facts: facts.clone(),
        link: None,
    };
    let msg = Message::new(vec![notice], 1, now);
    let channels: Vec<WebhookConfig> = config
        .alerts
        .webhooks
        .iter()
        .filter(|w| facts.kind == AlertKind::Test || facts.severity >= w.min_severity)
        .cloned()
        .collect();
    let http = match client() {
        Ok(http) => http,
        Err(e) => {
            return channels
                .iter()
                .map(|w| ChannelResult {
                    channel: w.name.clone(),
                    host: host_of(w.url.as_ref()),
                    status: None,
                    error: Some(e.to_string()),
                })
                .collect();
        }
    };
    let kind = facts.kind.as_str();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, w) in channels.into_iter().enumerate() {
        let http = http.clone();
        let body = render(w.kind, &msg);
        tasks.spawn(async move {
            let outcome = post(&http, &w, &body, now).await;
            let host = host_of(w.url.as_ref());
            let result = match outcome {
                Outcome::Accepted { status } => ChannelResult {
                    channel: w.name.clone(),
                    host,
                    status: Some(status),
                    error: None,
                },
                Outcome::Failed { status, error, .. } => {
                    tracing::warn!(
                        channel = w.name.as_str(),
                        host = host.as_str(),
                        "{kind} alert not delivered: {error}"
                    );
                    ChannelResult {
                        channel: w.name.clone(),
                        host,
                        status,
                        error: Some(error),
                    }
                }
            };
            (i, result)
        });
    }
    let mut results = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        if let Ok(r) = joined {
            results.push(r);
        }
    }
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// Sends a `test` alert to every channel, whatever its `min_severity`, and
/// reports each result (`acutoken alert test`).
pub async fn send_test(config: &Config) -> Vec<ChannelResult> {
    send_to_all(config, &AlertFacts::test()).await
}

/// Sends `facts` straight to every channel whose `min_severity` it meets,
/// bypassing the store: for `store_write_failed`, when the store cannot be
/// written. Not retried and not repeated; the caller sends again if the
/// condition persists.
pub async fn send_direct(config: &Config, facts: &AlertFacts) -> Vec<ChannelResult> {
    send_to_all(config, facts).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel(url: &str) -> WebhookConfig {
        let mut w: WebhookConfig =
            toml::from_str("name = \"ops\"\nkind = \"generic\"").expect("a minimal channel");
        w.url = Some(Secret::new(url));
        w
    }

    /// The config refuses these URLs, but a send checks on its own: nothing
    /// is sent to a metadata or link-local literal, and the reason shows the
    /// address, never the path.
    #[tokio::test]
    async fn a_send_to_a_metadata_or_link_local_literal_is_refused_before_sending() {
        let http = client().expect("client");
        for url in [
            "http://169.254.169.254/latest/SECRETPATH",
            "https://[fd00:ec2::254]/SECRETPATH",
            "https://[fe80::1]/SECRETPATH",
            "https://169.254.1.1/SECRETPATH",
        ] {
            let out = post(
                &http,
                &channel(url),
                &serde_json::json!({}),
                chrono::Utc::now(),
            )
            .await;
            match out {
                Outcome::Failed {
                    status: None,
                    error,
                    ..
                } => {
                    assert!(
                        error.starts_with("refused before sending"),
                        "{url}: {error}"
                    );
                    assert!(!error.contains("SECRETPATH"), "{url}: {error}");
                }
                other => panic!("{url}: {other:?}"),
            }
        }
    }
}
