//! What an alert is and what it says: its kind, status and facts, and the
//! words of each condition (what happened and the exact next step). Which
//! conditions hold is decided in `renewal::conditions`; delivery is `alerts`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{ConnectionRow, DeadlineSource, Fault, Mode, Severity, State, Timestamp, fmt_time};

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
                super::clip(reason, ERROR_TEXT_MAX)
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
                super::clip(reason, ERROR_TEXT_MAX)
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
    pub fn row_unreadable(fault: &Fault) -> AlertFacts {
        let name = fault.label();
        let mut facts = AlertFacts::global(
            AlertKind::ConnectionFaulty,
            Severity::Critical,
            format!(
                "connection {name} is set aside: its row in the store cannot be read ({}); it is not refreshed and its tokens are not served, every other connection is",
                super::clip(&fault.describe(), ERROR_TEXT_MAX)
            ),
            "correct the column with sqlite3 (or restore the row from a backup, or remove the row); acutoken reads it again with backoff (at most hourly) and resumes it as soon as it reads",
        );
        facts.connection = fault.name.clone().unwrap_or(name);
        facts.connection_id = fault.id;
        facts
    }

    /// `connection_faulty` for a connection whose refresh cannot run
    /// (`reason`: a sealed value that does not open, an internal error).
    pub fn refresh_set_aside(row: &ConnectionRow, reason: &str, action: &str) -> AlertFacts {
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
                super::clip(reason, ERROR_TEXT_MAX)
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

/// Error texts quoted in an alert are cut to this many characters: a 10 KB
/// HTML error page says nothing more useful than its first lines.
pub const ERROR_TEXT_MAX: usize = 500;

fn human(d: Duration) -> String {
    super::fmt_duration(Duration::from_secs(d.as_secs()))
}

fn for_row(row: &ConnectionRow, kind: AlertKind, severity: Severity) -> AlertFacts {
    let c = &row.conn;
    AlertFacts {
        kind,
        severity,
        connection: c.name.clone(),
        connection_id: Some(c.id),
        labels: c.labels.clone(),
        instance: Some(c.instance.clone()),
        state: Some(c.state),
        summary: String::new(),
        action: String::new(),
        deadline: None,
    }
}

fn last_error(row: &ConnectionRow) -> String {
    match &row.conn.last_error {
        Some(e) if !e.trim().is_empty() => format!(": {}", super::clip(e.trim(), ERROR_TEXT_MAX)),
        _ => String::new(),
    }
}

/// The re-authorization step without a link; messages swap in the open
/// link at delivery time (the alerts module does, at delivery time).
pub fn authorize_step(name: &str) -> String {
    format!("run `acutoken connection authorize {name}` and send the customer the link it prints")
}

/// The connection-bound conditions of DESIGN §8, worded.
impl AlertFacts {
    /// `needs_secret`.
    pub fn needs_secret(row: &ConnectionRow, deadline: Option<Timestamp>) -> AlertFacts {
        let c = &row.conn;
        let mut f = for_row(row, AlertKind::NeedsSecret, Severity::Critical);
        f.deadline = deadline;
        f.summary = format!(
            "{} on {} cannot refresh: its client secret was refused or has expired{}",
            c.name,
            c.instance,
            last_error(row)
        );
        let by = deadline.map_or_else(
            || "as soon as possible".to_string(),
            |d| format!("before {}", fmt_time(d)),
        );
        f.action = format!(
            "add a new shared secret on the instance's Connected Applications screen (SM303010) and run `acutoken connection set-secret {}` {by}, or the customer must re-authorize",
            c.name
        );
        f
    }

    /// `needs_reauthorization`.
    pub fn needs_reauthorization(row: &ConnectionRow) -> AlertFacts {
        let c = &row.conn;
        let mut f = for_row(row, AlertKind::NeedsReauthorization, Severity::Critical);
        f.summary = format!(
            "the refresh token of {} on {} is no longer accepted{}",
            c.name,
            c.instance,
            last_error(row)
        );
        f.action = format!(
            "the customer must re-authorize: {}",
            authorize_step(&c.name)
        );
        f
    }

    /// `expiry_approaching` at the `before` point.
    pub fn expiry_approaching(
        row: &ConnectionRow,
        deadline: Timestamp,
        before: Duration,
        severity: Severity,
    ) -> AlertFacts {
        let c = &row.conn;
        let mut f = for_row(row, AlertKind::ExpiryApproaching, severity);
        f.deadline = Some(deadline);
        f.summary = format!(
            "the refresh token of {} on {} expires at {} (less than {} left{})",
            c.name,
            c.instance,
            fmt_time(deadline),
            human(before),
            match c.deadline_source {
                Some(DeadlineSource::Assumed) => "; the deadline is an estimate",
                _ => "",
            }
        );
        let why = match c.mode {
            Mode::Absolute => "the deadline is absolute: refreshing does not move it",
            Mode::Sliding => {
                "refreshes are not sliding the deadline any further (absolute cap reached, or see `acutoken connection history`)"
            }
        };
        f.action = format!(
            "the customer must re-authorize before {} ({why}): {}",
            fmt_time(deadline),
            authorize_step(&c.name)
        );
        f
    }

    /// `secret_expiring`.
    pub fn secret_expiring(row: &ConnectionRow, expires: Timestamp) -> AlertFacts {
        let c = &row.conn;
        let mut f = for_row(row, AlertKind::SecretExpiring, Severity::Warning);
        f.deadline = Some(expires);
        f.summary = format!(
            "the client secret of {} on {} expires at {} (its Expires On date)",
            c.name,
            c.instance,
            fmt_time(expires)
        );
        f.action = format!(
            "add a new shared secret on the instance's Connected Applications screen (SM303010) and run `acutoken connection set-secret {} --secret-expires DATE` before {}",
            c.name,
            fmt_time(expires)
        );
        f
    }

    /// `refresh_failed`.
    pub fn refresh_failed(
        row: &ConnectionRow,
        deadline: Option<Timestamp>,
        since: Timestamp,
        severity: Severity,
    ) -> AlertFacts {
        let c = &row.conn;
        let mut f = for_row(row, AlertKind::RefreshFailed, severity);
        f.deadline = deadline;
        f.summary = format!(
            "refreshing {} on {} has failed since {} ({} attempts in a row){}",
            c.name,
            c.instance,
            fmt_time(since),
            row.failures,
            last_error(row)
        );
        let until = deadline.map_or_else(String::new, |d| {
            format!(
                "; it keeps retrying, but if the token is not refreshed by {} the customer must re-authorize",
                fmt_time(d)
            )
        });
        f.action = format!(
            "check that {} is up and reachable from this host (`acutoken connection history {}` shows each failure){until}",
            c.instance, c.name
        );
        f
    }
}
