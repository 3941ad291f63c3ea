//! What happened to each connection: refreshes, failures, state changes, alerts.

use rusqlite::params;

use crate::store::sql::Transaction;
use serde::Serialize;
use uuid::Uuid;

use super::{Store, StoreError, from_ms, to_ms};
use crate::model::Timestamp;

/// How long history is kept.
pub const RETENTION: chrono::Duration = chrono::Duration::days(90);

/// One history entry, as `connection history --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    #[serde(serialize_with = "ser_time")]
    pub at: Timestamp,
    pub event: String,
    pub detail: String,
}

fn ser_time<S: serde::Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::model::fmt_time(*t))
}

/// Records an event (never pass a secret in `detail`).
pub fn record(
    tx: &Transaction<'_>,
    connection: Uuid,
    at: Timestamp,
    event: &str,
    detail: &str,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO events (connection_id, at, event, detail) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![connection.to_string(), to_ms(at), event, detail])?;
    Ok(())
}

/// Records `event` for every connection written under change sequence `seq`
/// (one bulk insert), with `detail_prefix` followed by its state.
pub fn record_for_change(
    tx: &Transaction<'_>,
    seq: i64,
    at: Timestamp,
    event: &str,
    detail_prefix: &str,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO events (connection_id, at, event, detail)
         SELECT id, ?1, ?2, ?3 || state FROM connections WHERE change_seq = ?4 ORDER BY id",
    )?
    .execute(params![to_ms(at), event, detail_prefix, seq])?;
    Ok(())
}

impl Store {
    /// A connection's history, oldest first.
    pub fn history(&self, connection: Uuid) -> Result<Vec<Event>, StoreError> {
        let mut stmt = self.db.prepare(
            "SELECT at, event, detail FROM events WHERE connection_id = ?1 ORDER BY at, id",
        )?;
        let rows = stmt.query_map([connection.to_string()], |r| {
            Ok(Event {
                at: from_ms(r.get(0)?),
                event: r.get(1)?,
                detail: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Deletes history older than [`RETENTION`]; returns how many rows went.
    pub fn prune_events(&mut self, now: Timestamp) -> Result<usize, StoreError> {
        let cutoff = to_ms(now - RETENTION);
        self.write(|tx, _| Ok(tx.execute("DELETE FROM events WHERE at < ?1", [cutoff])?))
    }
}
