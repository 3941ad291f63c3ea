//! Delivery bookkeeping: what each channel is due, what it accepted, its
//! health and backoff, grouping times, and pruning what nobody needs to
//! hear about any more.

use std::collections::BTreeMap;

use rusqlite::params;

use crate::store::sql::{OptionalExtension, Transaction};

use super::{parse_facts, rank};
use crate::model::{AlertFacts, AlertKind, Severity, Status, Timestamp};
use crate::store::Store;
use crate::store::{StoreError, from_ms, to_ms};

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
    st: &Store,
    channel: &str,
    min_severity: Severity,
    send_resolved: bool,
    repeat_before: Timestamp,
) -> Result<Vec<Due>, StoreError> {
    let db = st.db();
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
pub fn oldest_send(st: &Store, channel: &str) -> Result<Option<Timestamp>, StoreError> {
    let db = st.db();
    let ms: Option<i64> = db.query_row(
        "SELECT MIN(d.sent_at) FROM alert_deliveries d JOIN alerts a ON a.id = d.alert_id
         WHERE d.channel = ?1 AND a.status = 'firing' AND d.revision = a.revision",
        [channel],
        |r| r.get(0),
    )?;
    Ok(ms.map(from_ms))
}

/// When `channel` last got a message about each kind.
pub fn group_times(
    st: &Store,
    channel: &str,
) -> Result<BTreeMap<AlertKind, Timestamp>, StoreError> {
    let db = st.db();
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
pub fn channel(st: &Store, name: &str) -> Result<ChannelRow, StoreError> {
    let db = st.db();
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
        let rows = stmt.query_map((), |r| r.get(0))?;
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
            status = excluded.status, sent_at = excluded.sent_at, sends = alert_deliveries.sends + 1",
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
    st: &Store,
    channel: &str,
    min_severity: Severity,
    send_resolved: bool,
) -> Result<u64, StoreError> {
    let db = st.db();
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
