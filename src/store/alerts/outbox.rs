//! Writing the outbox as conditions change: a connection's alerts brought
//! in line with its desired set, global and `connection_faulty` alerts
//! raised and resolved, and a removed connection's alerts closed. Each runs
//! in the caller's transaction, so an alert is written with the change that
//! caused it.

use rusqlite::params;

use crate::store::sql::Transaction;
use uuid::Uuid;

use super::{facts_json, key_of, parse_facts, parse_severity, rank};
use crate::model::{
    AlertFacts, AlertKind, ConnectionRow, NO_CONNECTION, Severity, State, Status, Timestamp,
};
use crate::store::{StoreError, events, to_ms};

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
        let rows = stmt.query_map((), |r| r.get(0))?;
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
