//! The alert outbox: one row per (connection, kind) condition, what each
//! channel has accepted, channel health, grouping times, and the digest's queries.
//!
//! An alert row's `revision` goes up whenever something must be said about it:
//! it fired, it escalated, it resolved. A channel is due a message for an
//! alert when the revision it last accepted is older (or, while firing, when
//! `repeat_interval` has passed since it last accepted one). This makes the
//! rows themselves the outbox, written in the caller's transaction, and makes
//! superseding free: a condition that cleared before its firing was delivered
//! is never sent at all.
//!
//! [`outbox`] writes the rows as conditions change (raise, sync, resolve),
//! [`delivery`] keeps what each channel accepted and its health, [`reads`]
//! answers the digest, metrics and status, and [`Wake`] tells the delivery
//! worker to look.

mod delivery;
mod outbox;
mod reads;
#[cfg(test)]
mod tests;
mod wake;
pub mod worker_ops;

use crate::model::{AlertFacts, NO_CONNECTION, Severity};
use crate::store::StoreError;

pub use delivery::{
    Accepted, ChannelRow, Dropped, Due, channel, due, group_times, oldest_send, prune,
    record_error, record_failure, record_success, sync_channels, undelivered,
};
pub use outbox::{
    raise, raise_faulty, remove_connection, resolve_faulty, resolve_global,
    resolve_unreadable_except, sync_connection,
};
pub use reads::{
    DigestData, DigestEntry, SetAside, delivered_counts, digest_data, faulty_fires,
    firing_connection_ids, firing_counts, set_aside,
};
pub use wake::Wake;

/// Schema version 2: the alert outbox.
pub(crate) const SCHEMA: &str = r#"
CREATE TABLE alerts (
    id         TEXT PRIMARY KEY,
    -- The connection id, or '-' for alerts not tied to a connection.
    key        TEXT NOT NULL,
    kind       TEXT NOT NULL,
    severity   TEXT NOT NULL,
    rank       INTEGER NOT NULL,
    status     TEXT NOT NULL,
    revision   INTEGER NOT NULL,
    -- AlertFacts as JSON: never a secret, a token, a URL or a link.
    facts      TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    changed_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX alerts_firing ON alerts (key, kind) WHERE status = 'firing';
CREATE INDEX alerts_key ON alerts (key);

-- What each channel accepted last, per alert: a 2xx answer.
CREATE TABLE alert_deliveries (
    alert_id TEXT NOT NULL REFERENCES alerts (id) ON DELETE CASCADE,
    channel  TEXT NOT NULL,
    revision INTEGER NOT NULL,
    status   TEXT NOT NULL,
    sent_at  INTEGER NOT NULL,
    sends    INTEGER NOT NULL,
    PRIMARY KEY (alert_id, channel)
);
CREATE INDEX alert_deliveries_channel ON alert_deliveries (channel);

-- The configured channels and their health; backoff survives restarts.
CREATE TABLE alert_channels (
    name            TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,
    failures        INTEGER NOT NULL DEFAULT 0,
    retry_at        INTEGER,
    last_error      TEXT,
    last_error_at   INTEGER,
    last_success_at INTEGER
);

-- When a channel last got a message about a kind (group_interval).
CREATE TABLE alert_groups (
    channel      TEXT NOT NULL,
    kind         TEXT NOT NULL,
    last_sent_at INTEGER NOT NULL,
    PRIMARY KEY (channel, kind)
);
"#;

fn rank(s: Severity) -> i64 {
    match s {
        Severity::Info => 0,
        Severity::Warning => 1,
        Severity::Critical => 2,
    }
}

fn parse_severity(s: &str) -> Result<Severity, StoreError> {
    match s {
        "info" => Ok(Severity::Info),
        "warning" => Ok(Severity::Warning),
        "critical" => Ok(Severity::Critical),
        other => Err(StoreError::Corrupt(format!("alert severity `{other}`"))),
    }
}

fn parse_facts(json: &str) -> Result<AlertFacts, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("alert facts: {e}")))
}

fn facts_json(f: &AlertFacts) -> Result<String, StoreError> {
    serde_json::to_string(f).map_err(|e| StoreError::Corrupt(format!("alert facts: {e}")))
}

fn key_of(f: &AlertFacts) -> String {
    f.connection_id
        .map_or_else(|| NO_CONNECTION.to_string(), |id| id.to_string())
}
