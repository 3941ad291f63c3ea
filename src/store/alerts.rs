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

use std::collections::BTreeMap;

use rusqlite::{Connection as Db, OptionalExtension, Transaction, params};
use uuid::Uuid;

use super::{StoreError, events, from_ms, to_ms};
use crate::model::{
    AlertFacts, AlertKind, ConnectionRow, NO_CONNECTION, Severity, State, Status, Timestamp,
};

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

/// A firing alert as stored.
struct Firing {
    id: String,
    revision: i64,
    severity: Severity,
    facts: AlertFacts,
}

fn firing_for(tx: &Transaction<'_>, key: &str) -> Result<Vec<Firing>, StoreError> {
    let mut stmt = tx.prepare_cached(
        "SELECT id, revision, severity, facts FROM alerts WHERE key = ?1 AND status = 'firing'",
    )?;
    let rows = stmt
        .query_map([key], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|(id, revision, severity, facts)| {
            Ok(Firing {
                id,
                revision,
                severity: parse_severity(&severity)?,
                facts: parse_facts(&facts)?,
            })
        })
        .collect()
}

/// Says it: a structured tracing event, and a history row for a connection.
fn announce(
    tx: &Transaction<'_>,
    facts: &AlertFacts,
    status: Status,
    now: Timestamp,
) -> Result<(), StoreError> {
    let instance = facts.instance.as_deref().unwrap_or("-");
    macro_rules! ev {
        ($level:ident) => {
            tracing::$level!(
                alert.kind = facts.kind.as_str(),
                alert.severity = facts.severity.as_str(),
                alert.status = status.as_str(),
                connection = facts.connection.as_str(),
                instance,
                "alert {} {}: {}",
                facts.kind,
                status,
                facts.summary
            )
        };
    }
    match (status, facts.severity) {
        (Status::Resolved, _) | (_, Severity::Info) => ev!(info),
        (Status::Firing, Severity::Warning) => ev!(warn),
        (Status::Firing, Severity::Critical) => ev!(error),
    }
    if let Some(id) = facts.connection_id {
        let detail = match status {
            Status::Firing => format!("{} firing ({})", facts.kind, facts.severity),
            Status::Resolved => format!("{} resolved", facts.kind),
        };
        events::record(tx, id, now, "alert", &detail)?;
    }
    Ok(())
}

fn insert_firing(
    tx: &Transaction<'_>,
    facts: &AlertFacts,
    now: Timestamp,
) -> Result<(), StoreError> {
    insert_firing_keyed(tx, &key_of(facts), facts, now)
}

fn insert_firing_keyed(
    tx: &Transaction<'_>,
    key: &str,
    facts: &AlertFacts,
    now: Timestamp,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO alerts (id, key, kind, severity, rank, status, revision, facts, started_at, changed_at)
         VALUES (?1, ?2, ?3, ?4, ?5, 'firing', 1, ?6, ?7, ?7)",
        params![
            Uuid::new_v4().to_string(),
            key,
            facts.kind.as_str(),
            facts.severity.as_str(),
            rank(facts.severity),
            facts_json(facts)?,
            to_ms(now),
        ],
    )?;
    announce(tx, facts, Status::Firing, now)
}

/// Rewrites a firing alert's facts; `refire` makes it due again everywhere.
fn update_firing(
    tx: &Transaction<'_>,
    old: &Firing,
    facts: &AlertFacts,
    refire: bool,
    now: Timestamp,
) -> Result<(), StoreError> {
    let (revision, changed) = if refire {
        (old.revision + 1, Some(to_ms(now)))
    } else {
        (old.revision, None)
    };
    tx.execute(
        "UPDATE alerts SET severity = ?2, rank = ?3, facts = ?4, revision = ?5,
            changed_at = COALESCE(?6, changed_at)
         WHERE id = ?1",
        params![
            old.id,
            facts.severity.as_str(),
            rank(facts.severity),
            facts_json(facts)?,
            revision,
            changed,
        ],
    )?;
    if refire {
        announce(tx, facts, Status::Firing, now)?;
    }
    Ok(())
}

fn resolve(
    tx: &Transaction<'_>,
    old: &Firing,
    state: Option<State>,
    now: Timestamp,
) -> Result<(), StoreError> {
    let mut facts = old.facts.clone();
    if state.is_some() {
        facts.state = state;
    }
    tx.execute(
        "UPDATE alerts SET status = 'resolved', revision = revision + 1, changed_at = ?2, facts = ?3
         WHERE id = ?1",
        params![old.id, to_ms(now), facts_json(&facts)?],
    )?;
    announce(tx, &facts, Status::Resolved, now)
}

/// Brings a connection's alerts in line with `desired` (from
/// [`crate::renewal::alert_conditions::desired`]), inside the caller's transaction.
///
/// De-duplicated per (connection, kind): a new condition fires; one still
/// firing at the same or a lower severity only has its text refreshed; an
/// escalation (or an `expiry_approaching` that moved to a later warn point)
/// fires again; a condition no longer desired resolves.
pub fn sync_connection(
    tx: &Transaction<'_>,
    row: &ConnectionRow,
    desired: &[AlertFacts],
    now: Timestamp,
) -> Result<(), StoreError> {
    let existing = firing_for(tx, &row.conn.id.to_string())?;
    for facts in desired {
        match existing.iter().find(|e| e.facts.kind == facts.kind) {
            None => insert_firing(tx, facts, now)?,
            Some(old) => {
                let escalated = facts.severity > old.severity;
                let moved = facts.kind == AlertKind::ExpiryApproaching
                    && facts.summary != old.facts.summary;
                if escalated || moved {
                    update_firing(tx, old, facts, true, now)?;
                } else if *facts != old.facts || facts.severity != old.severity {
                    update_firing(tx, old, facts, false, now)?;
                }
            }
        }
    }
    for old in &existing {
        // A set-aside connection's alert is not a condition of its row:
        // the scheduler raises and resolves it (`raise_faulty`).
        if old.facts.kind == AlertKind::ConnectionFaulty {
            continue;
        }
        if !desired.iter().any(|f| f.kind == old.facts.kind) {
            resolve(tx, old, Some(row.conn.state), now)?;
        }
    }
    Ok(())
}

/// Raises an alert not tied to a connection's conditions (e.g.
/// `config_reload_failed`). Raising it again while it fires says it again.
pub fn raise(tx: &Transaction<'_>, facts: &AlertFacts, now: Timestamp) -> Result<(), StoreError> {
    let existing = firing_for(tx, &key_of(facts))?;
    match existing.iter().find(|e| e.facts.kind == facts.kind) {
        Some(old) => update_firing(tx, old, facts, true, now),
        None => insert_firing(tx, facts, now),
    }
}

/// Raises `connection_faulty` for the row filed under `key` (its id as
/// stored). Raised again while it fires, only its text is brought up to
/// date: the repeat interval, not each look at the row, decides when it is
/// said again. Returns true when it was not firing yet.
pub fn raise_faulty(
    tx: &Transaction<'_>,
    key: &str,
    facts: &AlertFacts,
    now: Timestamp,
) -> Result<bool, StoreError> {
    let existing = firing_for(tx, key)?;
    match existing
        .iter()
        .find(|e| e.facts.kind == AlertKind::ConnectionFaulty)
    {
        Some(old) => {
            if old.facts != *facts {
                update_firing(tx, old, facts, false, now)?;
            }
            Ok(false)
        }
        None => {
            insert_firing_keyed(tx, key, facts, now)?;
            Ok(true)
        }
    }
}

/// Resolves the `connection_faulty` alert filed under `key`, if it fires.
pub fn resolve_faulty(tx: &Transaction<'_>, key: &str, now: Timestamp) -> Result<(), StoreError> {
    for old in firing_for(tx, key)? {
        if old.facts.kind == AlertKind::ConnectionFaulty {
            resolve(tx, &old, None, now)?;
        }
    }
    Ok(())
}

/// True when a `connection_faulty` alert fires under `key` (one indexed read).
pub fn faulty_fires(db: &Db, key: &str) -> Result<bool, StoreError> {
    Ok(db
        .prepare_cached(
            "SELECT 1 FROM alerts WHERE key = ?1 AND kind = 'connection_faulty' AND status = 'firing'",
        )?
        .exists([key])?)
}

/// One connection set aside, as its firing `connection_faulty` alert says.
#[derive(Debug, Clone, PartialEq)]
pub struct SetAside {
    /// The key it is filed under (its id as stored).
    pub key: String,
    /// What the alert says (its summary names the reason).
    pub facts: AlertFacts,
    /// Since when.
    pub since: Timestamp,
}

/// Every connection set aside (firing `connection_faulty`), by name.
pub fn set_aside(db: &Db) -> Result<Vec<SetAside>, StoreError> {
    let mut stmt = db.prepare_cached(
        "SELECT key, facts, started_at FROM alerts
         WHERE kind = 'connection_faulty' AND status = 'firing'",
    )?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = rows
        .into_iter()
        .map(|(key, facts, since)| {
            Ok(SetAside {
                key,
                facts: parse_facts(&facts)?,
                since: from_ms(since),
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    out.sort_by(|a, b| a.facts.connection.cmp(&b.facts.connection));
    Ok(out)
}

/// Resolves firing `connection_faulty` alerts about unreadable rows
/// (raised with no state) whose key is not in `still`: rows fixed or
/// removed while no daemon looked.
pub fn resolve_unreadable_except(
    tx: &Transaction<'_>,
    still: &std::collections::HashSet<String>,
    now: Timestamp,
) -> Result<(), StoreError> {
    let firing: Vec<String> = {
        let mut stmt = tx.prepare(
            "SELECT key FROM alerts WHERE kind = 'connection_faulty' AND status = 'firing'",
        )?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    for key in firing.into_iter().filter(|k| !still.contains(k)) {
        for old in firing_for(tx, &key)? {
            if old.facts.kind == AlertKind::ConnectionFaulty && old.facts.state.is_none() {
                resolve(tx, &old, None, now)?;
            }
        }
    }
    Ok(())
}

/// Resolves a firing alert raised with [`raise`] that is not tied to a connection.
pub fn resolve_global(
    tx: &Transaction<'_>,
    kind: AlertKind,
    now: Timestamp,
) -> Result<(), StoreError> {
    for old in firing_for(tx, NO_CONNECTION)? {
        if old.facts.kind == kind {
            resolve(tx, &old, None, now)?;
        }
    }
    Ok(())
}

/// A connection is being removed: its firing alerts resolve (so channels
/// that were told hear the end of it) and nothing new is raised for it.
pub fn remove_connection(
    tx: &Transaction<'_>,
    connection_id: Uuid,
    now: Timestamp,
) -> Result<(), StoreError> {
    for old in firing_for(tx, &connection_id.to_string())? {
        let mut facts = old.facts.clone();
        facts.summary = format!("{} (the connection was removed)", facts.summary);
        let old = Firing { facts, ..old };
        tx.execute(
            "UPDATE alerts SET facts = ?2 WHERE id = ?1",
            params![old.id, facts_json(&old.facts)?],
        )?;
        // No history row: the connection's history goes with it.
        tracing::info!(
            alert.kind = old.facts.kind.as_str(),
            alert.severity = old.facts.severity.as_str(),
            alert.status = "resolved",
            connection = old.facts.connection.as_str(),
            instance = old.facts.instance.as_deref().unwrap_or("-"),
            "alert {} resolved: the connection was removed",
            old.facts.kind
        );
        tx.execute(
            "UPDATE alerts SET status = 'resolved', revision = revision + 1, changed_at = ?2 WHERE id = ?1",
            params![old.id, to_ms(now)],
        )?;
    }
    Ok(())
}

/// Connection ids that have a firing alert (for re-evaluation at start).
pub fn firing_connection_ids(db: &Db) -> Result<Vec<String>, StoreError> {
    let mut stmt = db.prepare(
        "SELECT DISTINCT key FROM alerts WHERE status = 'firing' AND key <> '-' ORDER BY key",
    )?;
    let rows = stmt.query_map([], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Firing alerts per kind.
pub fn firing_counts(db: &Db) -> Result<BTreeMap<AlertKind, u64>, StoreError> {
    let mut stmt =
        db.prepare("SELECT kind, COUNT(*) FROM alerts WHERE status = 'firing' GROUP BY kind")?;
    let mut out = BTreeMap::new();
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let kind: String = r.get(0)?;
        if let Ok(k) = kind.parse::<AlertKind>() {
            out.insert(k, r.get::<_, i64>(1)?.max(0) as u64);
        }
    }
    Ok(out)
}

/// One alert a channel is due a message about.
#[derive(Debug, Clone)]
pub struct Due {
    /// The alert's id (an alert is one firing episode of a condition).
    pub alert_id: String,
    /// The revision this message speaks for.
    pub revision: i64,
    /// Firing or resolved.
    pub status: Status,
    /// What it says.
    pub facts: AlertFacts,
    /// When its revision began (grouping waits from here).
    pub changed_at: Timestamp,
    /// True when the channel already has this revision: a `repeat_interval` re-send.
    pub repeat: bool,
    /// How many times the channel has accepted this alert.
    pub sends: i64,
}

/// What `channel` is due, oldest change first: firing alerts at or above
/// `min_severity` whose revision it has not accepted, or accepted at or before
/// `repeat_before`; and, with `send_resolved`, resolved alerts whose firing it
/// accepted.
pub fn due(
    db: &Db,
    channel: &str,
    min_severity: Severity,
    send_resolved: bool,
    repeat_before: Timestamp,
) -> Result<Vec<Due>, StoreError> {
    let mut stmt = db.prepare_cached(
        "SELECT a.id, a.revision, a.status, a.facts, a.changed_at, d.revision, d.sends
         FROM alerts a LEFT JOIN alert_deliveries d ON d.alert_id = a.id AND d.channel = ?1
         WHERE (a.status = 'firing' AND a.rank >= ?2
                AND (d.alert_id IS NULL OR d.revision < a.revision OR d.sent_at <= ?3))
            OR (?4 AND a.status = 'resolved' AND d.status = 'firing')
         ORDER BY a.changed_at, a.id",
    )?;
    let rows = stmt
        .query_map(
            params![
                channel,
                rank(min_severity),
                to_ms(repeat_before),
                send_resolved
            ],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                    r.get::<_, Option<i64>>(6)?,
                ))
            },
        )?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(
            |(alert_id, revision, status, facts, changed, sent_rev, sends)| {
                Ok(Due {
                    alert_id,
                    revision,
                    status: status.parse().map_err(StoreError::Corrupt)?,
                    facts: parse_facts(&facts)?,
                    changed_at: from_ms(changed),
                    repeat: sent_rev == Some(revision),
                    sends: sends.unwrap_or(0),
                })
            },
        )
        .collect()
}

/// When the earliest firing alert `channel` has accepted was last sent there
/// (its repeat falls due `repeat_interval` later).
pub fn oldest_send(db: &Db, channel: &str) -> Result<Option<Timestamp>, StoreError> {
    let ms: Option<i64> = db.query_row(
        "SELECT MIN(d.sent_at) FROM alert_deliveries d JOIN alerts a ON a.id = d.alert_id
         WHERE d.channel = ?1 AND a.status = 'firing' AND d.revision = a.revision",
        [channel],
        |r| r.get(0),
    )?;
    Ok(ms.map(from_ms))
}

/// When `channel` last got a message about each kind.
pub fn group_times(db: &Db, channel: &str) -> Result<BTreeMap<AlertKind, Timestamp>, StoreError> {
    let mut stmt =
        db.prepare_cached("SELECT kind, last_sent_at FROM alert_groups WHERE channel = ?1")?;
    let mut out = BTreeMap::new();
    let mut rows = stmt.query([channel])?;
    while let Some(r) = rows.next()? {
        let kind: String = r.get(0)?;
        if let Ok(k) = kind.parse::<AlertKind>() {
            out.insert(k, from_ms(r.get(1)?));
        }
    }
    Ok(out)
}

/// A channel's delivery health and backoff, as stored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChannelRow {
    /// Failed attempts in a row.
    pub failures: u32,
    /// No attempt before this time (backoff, Retry-After).
    pub retry_at: Option<Timestamp>,
    /// The last failure, in words (channel name and host only, never the URL).
    pub last_error: Option<String>,
    /// When that failure happened.
    pub last_error_at: Option<Timestamp>,
    /// When a message was last accepted.
    pub last_success_at: Option<Timestamp>,
}

/// A channel's stored health; default when never seen.
pub fn channel(db: &Db, name: &str) -> Result<ChannelRow, StoreError> {
    Ok(db
        .query_row(
            "SELECT failures, retry_at, last_error, last_error_at, last_success_at
             FROM alert_channels WHERE name = ?1",
            [name],
            |r| {
                Ok(ChannelRow {
                    failures: r.get::<_, i64>(0)?.clamp(0, u32::MAX as i64) as u32,
                    retry_at: r.get::<_, Option<i64>>(1)?.map(from_ms),
                    last_error: r.get(2)?,
                    last_error_at: r.get::<_, Option<i64>>(3)?.map(from_ms),
                    last_success_at: r.get::<_, Option<i64>>(4)?.map(from_ms),
                })
            },
        )
        .optional()?
        .unwrap_or_default())
}

/// Makes the channel table match the configured channels `(name, kind)`;
/// what a removed channel had accepted is forgotten.
pub fn sync_channels(
    tx: &Transaction<'_>,
    channels: &[(String, String)],
) -> Result<(), StoreError> {
    for (name, kind) in channels {
        tx.execute(
            "INSERT INTO alert_channels (name, kind) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET kind = excluded.kind",
            params![name, kind],
        )?;
    }
    let names: Vec<String> = {
        let mut stmt = tx.prepare("SELECT name FROM alert_channels")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect::<Result<_, _>>()?
    };
    for gone in names
        .iter()
        .filter(|n| !channels.iter().any(|(c, _)| c == *n))
    {
        tx.execute("DELETE FROM alert_channels WHERE name = ?1", [gone])?;
        tx.execute("DELETE FROM alert_deliveries WHERE channel = ?1", [gone])?;
        tx.execute("DELETE FROM alert_groups WHERE channel = ?1", [gone])?;
    }
    Ok(())
}

/// One alert revision a channel accepted.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The alert.
    pub alert_id: String,
    /// The revision the message spoke for.
    pub revision: i64,
    /// The status the message spoke of.
    pub status: Status,
}

/// Records that `channel` accepted a message about `kind` covering `accepted`.
pub fn record_success(
    tx: &Transaction<'_>,
    channel: &str,
    kind: AlertKind,
    accepted: &[Accepted],
    now: Timestamp,
) -> Result<(), StoreError> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO alert_deliveries (alert_id, channel, revision, status, sent_at, sends)
         SELECT ?1, ?2, ?3, ?4, ?5, 1 WHERE EXISTS (SELECT 1 FROM alerts WHERE id = ?1)
         ON CONFLICT (alert_id, channel) DO UPDATE SET revision = excluded.revision,
            status = excluded.status, sent_at = excluded.sent_at, sends = sends + 1",
    )?;
    for a in accepted {
        stmt.execute(params![
            a.alert_id,
            channel,
            a.revision,
            a.status.as_str(),
            to_ms(now)
        ])?;
    }
    tx.execute(
        "INSERT INTO alert_groups (channel, kind, last_sent_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (channel, kind) DO UPDATE SET last_sent_at = excluded.last_sent_at",
        params![channel, kind.as_str(), to_ms(now)],
    )?;
    tx.execute(
        "UPDATE alert_channels SET failures = 0, retry_at = NULL, last_success_at = ?2 WHERE name = ?1",
        params![channel, to_ms(now)],
    )?;
    Ok(())
}

/// Records a failed attempt and when to try again.
pub fn record_failure(
    tx: &Transaction<'_>,
    channel: &str,
    error: &str,
    retry_at: Timestamp,
    now: Timestamp,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE alert_channels SET failures = failures + 1, retry_at = ?2, last_error = ?3,
            last_error_at = ?4 WHERE name = ?1",
        params![channel, to_ms(retry_at), error, to_ms(now)],
    )?;
    Ok(())
}

/// Records a failure without a retry (digests are not retried).
pub fn record_error(
    tx: &Transaction<'_>,
    channel: &str,
    error: &str,
    now: Timestamp,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE alert_channels SET last_error = ?2, last_error_at = ?3 WHERE name = ?1",
        params![channel, error, to_ms(now)],
    )?;
    Ok(())
}

/// An alert dropped by [`prune`] without any channel ever hearing of it.
#[derive(Debug, Clone)]
pub struct Dropped {
    /// What it was about.
    pub kind: AlertKind,
    /// The connection's name, or `-`.
    pub connection: String,
}

/// Deletes resolved alerts nobody still needs to hear about: no configured
/// channel accepted their firing without their resolution (every resolved
/// alert, when `send_resolved` is off). Returns those that no channel ever
/// accepted: they cleared before delivery.
pub fn prune(tx: &Transaction<'_>, send_resolved: bool) -> Result<Vec<Dropped>, StoreError> {
    let candidates: Vec<(String, String, bool)> = {
        let mut stmt = tx.prepare(
            "SELECT a.id, a.facts,
                    EXISTS (SELECT 1 FROM alert_deliveries d WHERE d.alert_id = a.id)
             FROM alerts a
             WHERE a.status = 'resolved' AND (NOT ?1 OR NOT EXISTS (
                SELECT 1 FROM alert_deliveries d JOIN alert_channels c ON c.name = d.channel
                WHERE d.alert_id = a.id AND d.status = 'firing'))",
        )?;
        let rows = stmt.query_map([send_resolved], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    let mut dropped = Vec::new();
    for (id, facts, delivered) in candidates {
        tx.execute("DELETE FROM alert_deliveries WHERE alert_id = ?1", [&id])?;
        tx.execute("DELETE FROM alerts WHERE id = ?1", [&id])?;
        if !delivered && let Ok(f) = parse_facts(&facts) {
            dropped.push(Dropped {
                kind: f.kind,
                connection: f.connection,
            });
        }
    }
    Ok(dropped)
}

/// How many messages-worth of alerts `channel` has not had accepted yet
/// (repeats not counted).
pub fn undelivered(
    db: &Db,
    channel: &str,
    min_severity: Severity,
    send_resolved: bool,
) -> Result<u64, StoreError> {
    let n: i64 = db.query_row(
        "SELECT COUNT(*) FROM alerts a
         LEFT JOIN alert_deliveries d ON d.alert_id = a.id AND d.channel = ?1
         WHERE (a.status = 'firing' AND a.rank >= ?2 AND (d.alert_id IS NULL OR d.revision < a.revision))
            OR (?3 AND a.status = 'resolved' AND d.status = 'firing')",
        params![channel, rank(min_severity), send_resolved],
        |r| r.get(0),
    )?;
    Ok(n.max(0) as u64)
}

/// One connection as the digest lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct DigestEntry {
    /// Its name.
    pub name: String,
    /// Its instance.
    pub instance: String,
    /// Its state.
    pub state: State,
    /// Its refresh token's deadline.
    pub deadline: Option<Timestamp>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

/// What the digest summarises.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DigestData {
    /// Connections per state.
    pub counts: BTreeMap<State, u64>,
    /// Connections waiting for a person, nearest deadline first (at most the limit).
    pub must_act: Vec<DigestEntry>,
    /// How many connections wait for a person in all.
    pub must_act_total: u64,
    /// Active or retrying connections with the nearest deadlines.
    pub nearest: Vec<DigestEntry>,
    /// Firing alerts per kind.
    pub firing: BTreeMap<AlertKind, u64>,
}

fn digest_entries(db: &Db, sql: &str, limit: usize) -> Result<Vec<DigestEntry>, StoreError> {
    let mut stmt = db.prepare(sql)?;
    let mut rows = stmt.query([limit as i64])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        // A row that does not read is left out: it has its own alert.
        let entry = || -> Option<DigestEntry> {
            Some(DigestEntry {
                name: r.get(0).ok()?,
                instance: r.get(1).ok()?,
                state: r.get::<_, String>(2).ok()?.parse().ok()?,
                deadline: r.get::<_, Option<i64>>(3).ok()?.map(from_ms),
                labels: serde_json::from_str(&r.get::<_, String>(4).ok()?).ok()?,
            })
        };
        if let Some(e) = entry() {
            out.push(e);
        }
    }
    Ok(out)
}

/// The digest's numbers, with at most `limit` connections per list.
pub fn digest_data(db: &Db, limit: usize) -> Result<DigestData, StoreError> {
    let mut counts = BTreeMap::new();
    {
        let mut stmt = db.prepare("SELECT state, COUNT(*) FROM connections GROUP BY state")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let s: String = r.get(0)?;
            if let Ok(st) = s.parse::<State>() {
                counts.insert(st, r.get::<_, i64>(1)?.max(0) as u64);
            }
        }
    }
    const HUMAN: &str = "('needs_secret', 'needs_reauthorization', 'pending_authorization')";
    let must_act = digest_entries(
        db,
        &format!(
            "SELECT name, instance, state, deadline, labels FROM connections
             WHERE state IN {HUMAN} ORDER BY deadline IS NULL, deadline, name LIMIT ?1"
        ),
        limit,
    )?;
    let must_act_total: i64 = db.query_row(
        &format!("SELECT COUNT(*) FROM connections WHERE state IN {HUMAN}"),
        [],
        |r| r.get(0),
    )?;
    let nearest = digest_entries(
        db,
        "SELECT name, instance, state, deadline, labels FROM connections
         WHERE state IN ('active', 'retrying') AND deadline IS NOT NULL
         ORDER BY deadline, name LIMIT ?1",
        limit,
    )?;
    Ok(DigestData {
        counts,
        must_act,
        must_act_total: must_act_total.max(0) as u64,
        nearest,
        firing: firing_counts(db)?,
    })
}

/// Messages each channel has accepted, counting repeats (metrics).
pub fn delivered_counts(db: &Db) -> Result<BTreeMap<String, u64>, StoreError> {
    let mut stmt =
        db.prepare("SELECT channel, SUM(sends) FROM alert_deliveries GROUP BY channel")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    let mut out = BTreeMap::new();
    for r in rows {
        let (c, n) = r?;
        out.insert(c, n.max(0) as u64);
    }
    Ok(out)
}

/// The outbox's doorbell: whoever commits alert changes (the renewal engine,
/// the scheduler, the callback) pokes it, so the delivery worker looks at the
/// outbox at once instead of at its next wake.
#[derive(Debug, Clone, Default)]
pub struct Wake(std::sync::Arc<tokio::sync::Notify>);

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
