//! Alerts: the model, one renderer per channel kind, delivery, the digest.
//!
//! How an alert travels (DESIGN §8):
//!
//! 1. [`evaluate::desired`] says, as a pure function of a connection and `now`,
//!    which connection-bound conditions hold. [`evaluate::next_change`] says
//!    when that answer could change by time passing alone.
//! 2. The renewal engine hands that set to
//!    [`store::alerts::sync_connection`](crate::store::alerts::sync_connection)
//!    in the same transaction as the state change that caused it. The store
//!    keeps one row per (connection, kind) condition; a new condition, an
//!    escalation or a clearing bumps the row's revision. That row is the
//!    outbox: nothing else needs to be queued.
//! 3. The [`worker`] compares each row's revision with what every channel has
//!    accepted, groups what is due per channel and kind, renders it with the
//!    channel's [`render`]er and posts it. A condition that cleared before
//!    its firing went out is simply never sent.
//!
//! No alert, outbox row or log line carries a secret, a token or a webhook
//! URL. The one link an alert may carry, the authorization link of an alert
//! that needs the customer, is read from the store (or opened there, when
//! none is open) at delivery time and exists only in the outgoing body.

pub mod digest;
pub mod evaluate;
pub mod http;
pub mod render;
mod text;
pub mod worker;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::model::{Severity, State, Timestamp};

pub use digest::run_digest;
pub use evaluate::{desired, next_change};
pub use http::{ChannelResult, send_direct, send_test};
pub(crate) use text::clip;
pub use worker::{ChannelHealth, channel_health, reconcile, run};

/// What an alert is about; DESIGN §8. Receivers must accept kinds they do not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// The connection is `needs_secret`: an operator enters a new client secret.
    NeedsSecret,
    /// The connection is `needs_reauthorization`: the customer re-authorizes.
    NeedsReauthorization,
    /// A `warn_before` point before the refresh token's deadline has passed.
    ExpiryApproaching,
    /// The client secret's Expires On is within `secret_warn_before`.
    SecretExpiring,
    /// Transient refresh failures have persisted for an hour.
    RefreshFailed,
    /// A SIGHUP configuration was refused; the old one keeps running.
    ConfigReloadFailed,
    /// A rotated refresh token could not be saved (sent directly, not stored).
    StoreWriteFailed,
    /// `acutoken alert test`.
    Test,
    /// A connection is set aside: its row does not read, a sealed value
    /// does not open, or its refresh failed inside acutoken. Every other
    /// connection is served; this one waits for a person.
    ConnectionFaulty,
}

impl AlertKind {
    /// Every kind, in a stable order.
    pub const ALL: [AlertKind; 9] = [
        AlertKind::NeedsSecret,
        AlertKind::NeedsReauthorization,
        AlertKind::ExpiryApproaching,
        AlertKind::SecretExpiring,
        AlertKind::RefreshFailed,
        AlertKind::ConfigReloadFailed,
        AlertKind::StoreWriteFailed,
        AlertKind::Test,
        AlertKind::ConnectionFaulty,
    ];

    /// The snake_case name used in messages, the store and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::NeedsSecret => "needs_secret",
            AlertKind::NeedsReauthorization => "needs_reauthorization",
            AlertKind::ExpiryApproaching => "expiry_approaching",
            AlertKind::SecretExpiring => "secret_expiring",
            AlertKind::RefreshFailed => "refresh_failed",
            AlertKind::ConfigReloadFailed => "config_reload_failed",
            AlertKind::StoreWriteFailed => "store_write_failed",
            AlertKind::Test => "test",
            AlertKind::ConnectionFaulty => "connection_faulty",
        }
    }

    /// A short human title, e.g. for a chat message heading.
    pub fn title(self) -> &'static str {
        match self {
            AlertKind::NeedsSecret => "New client secret needed",
            AlertKind::NeedsReauthorization => "Customer must re-authorize",
            AlertKind::ExpiryApproaching => "Refresh token expiring",
            AlertKind::SecretExpiring => "Client secret expiring",
            AlertKind::RefreshFailed => "Refreshes failing",
            AlertKind::ConfigReloadFailed => "Configuration reload refused",
            AlertKind::StoreWriteFailed => "Store cannot be written",
            AlertKind::Test => "Test alert",
            AlertKind::ConnectionFaulty => "Connection set aside",
        }
    }

    /// True when the next step may be the customer re-authorizing, so the
    /// message carries the open authorization link, read at delivery time
    /// (and opened then for `needs_reauthorization`, and for
    /// `expiry_approaching` in absolute mode: see
    /// [`link_for_alert`](crate::renewal::authorize::link_for_alert)).
    pub fn carries_link(self) -> bool {
        matches!(
            self,
            AlertKind::NeedsReauthorization | AlertKind::ExpiryApproaching
        )
    }
}

impl fmt::Display for AlertKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AlertKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AlertKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown alert kind `{s}`"))
    }
}

/// Whether a condition holds or has cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The condition holds.
    Firing,
    /// The condition cleared; the alert keeps the severity it fired with.
    Resolved,
}

impl Status {
    /// `firing` or `resolved`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Firing => "firing",
            Status::Resolved => "resolved",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "firing" => Ok(Status::Firing),
            "resolved" => Ok(Status::Resolved),
            other => Err(format!("unknown alert status `{other}`")),
        }
    }
}

/// The connection name alerts not tied to a connection carry.
pub const NO_CONNECTION: &str = "-";

/// Everything an alert says, without its status. Stored (as JSON) in the
/// outbox, so it must never hold a secret, a token, a webhook URL or an
/// authorization link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertFacts {
    /// What the alert is about.
    pub kind: AlertKind,
    /// How urgent it is.
    pub severity: Severity,
    /// The connection's name, or [`NO_CONNECTION`].
    pub connection: String,
    /// The connection's id, when the alert is tied to one.
    pub connection_id: Option<Uuid>,
    /// The connection's labels (customer name, contact, ...).
    pub labels: BTreeMap<String, String>,
    /// The connection's instance (`host[:port][/virtual-dir]`).
    pub instance: Option<String>,
    /// The connection's state when the alert was raised.
    pub state: Option<State>,
    /// What happened, in one or two sentences.
    pub summary: String,
    /// The exact next step: which screen, which command, by when.
    pub action: String,
    /// By when it matters (the refresh token's deadline, the secret's Expires On).
    pub deadline: Option<Timestamp>,
}

impl AlertFacts {
    /// An alert not tied to a connection (`config_reload_failed`, `store_write_failed`, `test`).
    pub fn global(
        kind: AlertKind,
        severity: Severity,
        summary: impl Into<String>,
        action: impl Into<String>,
    ) -> AlertFacts {
        AlertFacts {
            kind,
            severity,
            connection: NO_CONNECTION.to_string(),
            connection_id: None,
            labels: BTreeMap::new(),
            instance: None,
            state: None,
            summary: summary.into(),
            action: action.into(),
            deadline: None,
        }
    }

    /// `config_reload_failed`: the reason is the config error (it names keys, never secrets).
    pub fn config_reload_failed(reason: &str) -> AlertFacts {
        AlertFacts::global(
            AlertKind::ConfigReloadFailed,
            Severity::Critical,
            format!(
                "a reloaded configuration was refused and the previous one keeps running: {}",
                text::clip(reason, text::ERROR_TEXT_MAX)
            ),
            "fix the configuration (`acutoken config check` names the key), then reload with `systemctl reload acutoken`",
        )
    }

    /// `store_write_failed`: a rotated token is held in memory and spilled; the
    /// reason is the store error (it carries no secret).
    pub fn store_write_failed(connection: Option<(&str, Uuid)>, reason: &str) -> AlertFacts {
        let mut facts = AlertFacts::global(
            AlertKind::StoreWriteFailed,
            Severity::Critical,
            format!(
                "a rotated refresh token could not be saved to the store and is held in memory (and spilled to the runtime directory); no other refresh starts until it is saved: {}",
                text::clip(reason, text::ERROR_TEXT_MAX)
            ),
            "free disk space or make the store writable now; do not stop acutoken until this resolves, or the token is lost and the customer must re-authorize",
        );
        if let Some((name, id)) = connection {
            facts.connection = name.to_string();
            facts.connection_id = Some(id);
        }
        facts
    }

    /// `connection_faulty` for a row that does not read: state unknown (the
    /// store's words are all there is), so the start-up pass knows to resolve
    /// it once the row reads again.
    pub fn row_unreadable(fault: &crate::store::connections::Fault) -> AlertFacts {
        let name = fault.label();
        let mut facts = AlertFacts::global(
            AlertKind::ConnectionFaulty,
            Severity::Critical,
            format!(
                "connection {name} is set aside: its row in the store cannot be read ({}); it is not refreshed and its tokens are not served, every other connection is",
                text::clip(&fault.describe(), text::ERROR_TEXT_MAX)
            ),
            "correct the column with sqlite3 (or restore the row from a backup, or remove the row); acutoken reads it again with backoff (at most hourly) and resumes it as soon as it reads",
        );
        facts.connection = fault.name.clone().unwrap_or(name);
        facts.connection_id = fault.id;
        facts
    }

    /// `connection_faulty` for a connection whose refresh cannot run
    /// (`reason`: a sealed value that does not open, an internal error).
    pub fn refresh_set_aside(
        row: &crate::store::ConnectionRow,
        reason: &str,
        action: &str,
    ) -> AlertFacts {
        let c = &row.conn;
        AlertFacts {
            kind: AlertKind::ConnectionFaulty,
            severity: Severity::Critical,
            connection: c.name.clone(),
            connection_id: Some(c.id),
            labels: c.labels.clone(),
            instance: Some(c.instance.clone()),
            state: Some(c.state),
            summary: format!(
                "connection {} is set aside: {}; it is not refreshed until this is fixed (tried again with backoff, at most hourly), every other connection is",
                c.name,
                text::clip(reason, text::ERROR_TEXT_MAX)
            ),
            action: action.to_string(),
            deadline: c.deadline,
        }
    }

    /// The `test` alert of `acutoken alert test`.
    pub fn test() -> AlertFacts {
        AlertFacts::global(
            AlertKind::Test,
            Severity::Info,
            "this is a test alert from acutoken: the channel works",
            "nothing to do",
        )
    }
}

/// The handle the renewal engine pokes after it commits alert changes, so
/// the delivery worker looks at the outbox at once instead of at its next wake.
#[derive(Debug, Clone, Default)]
pub struct Wake(Arc<Notify>);

impl Wake {
    /// A new handle; clone it for every writer.
    pub fn new() -> Wake {
        Wake::default()
    }

    /// Asks the worker to look at the outbox now (cheap; coalesces).
    pub fn poke(&self) {
        self.0.notify_one();
    }

    pub(crate) async fn wait(&self) {
        self.0.notified().await;
    }
}
