//! Reading connection rows: one by name, id or rowid, listings, the
//! streamed planning pass, the change sequence and what changed since a
//! point in it, and opening a sealed secret.

use std::collections::BTreeMap;

use crate::store::sql::{OptionalExtension, Transaction};
use uuid::Uuid;

use super::decode::{PLANNING_COLUMNS, decode, planning_row};
use super::{COLUMNS, SecretColumn};
use crate::model::{ConnectionRow, Fault, State, Timestamp};
use crate::secret::Secret;
use crate::store::{Store, StoreError, from_ms};

/// One row by a `WHERE` clause on a single parameter: `Ok(None)` when no row
/// matches, [`StoreError::Corrupt`] naming the column when it does not decode.
fn one_row(
    db: &crate::store::sql::Db,
    filter: &str,
    param: &dyn rusqlite::ToSql,
) -> Result<Option<ConnectionRow>, StoreError> {
    let mut stmt =
        db.prepare_cached(&format!("SELECT {COLUMNS} FROM connections WHERE {filter}"))?;
    let mut rows = stmt.query([param])?;
    match rows.next()? {
        None => Ok(None),
        Some(r) => decode(&r)
            .map(Some)
            .map_err(|f| StoreError::Corrupt(f.to_string())),
    }
}

/// Reads one connection by name inside a transaction; a row that does not
/// decode is [`StoreError::Corrupt`] naming the column.
pub fn get_tx(tx: &Transaction<'_>, name: &str) -> Result<ConnectionRow, StoreError> {
    one_row(tx, "name = ?1", &name)?.ok_or_else(|| StoreError::UnknownConnection(name.to_string()))
}

/// Reads one connection by id inside a transaction; a row that does not
/// decode is [`StoreError::Corrupt`] naming the column.
pub fn get_by_id_tx(tx: &Transaction<'_>, id: Uuid) -> Result<Option<ConnectionRow>, StoreError> {
    one_row(tx, "id = ?1", &id.to_string())
}

/// One connection by id inside a transaction, or the fault that keeps it
/// from reading.
pub fn read_by_id_tx(
    tx: &Transaction<'_>,
    id: Uuid,
) -> Result<Option<Result<ConnectionRow, Fault>>, StoreError> {
    read_by_id_on(tx, id)
}

fn read_by_id_on(
    db: &crate::store::sql::Db,
    id: Uuid,
) -> Result<Option<Result<ConnectionRow, Fault>>, StoreError> {
    let mut stmt =
        db.prepare_cached(&format!("SELECT {COLUMNS} FROM connections WHERE id = ?1"))?;
    let mut rows = stmt.query([id.to_string()])?;
    Ok(rows.next()?.map(|r| decode(&r)))
}

impl Store {
    /// One connection by name; a row that does not decode is
    /// [`StoreError::Corrupt`] naming the column.
    pub fn get(&self, name: &str) -> Result<ConnectionRow, StoreError> {
        one_row(&self.db, "name = ?1", &name)?
            .ok_or_else(|| StoreError::UnknownConnection(name.to_string()))
    }

    /// One connection by id; a row that does not decode is
    /// [`StoreError::Corrupt`] naming the column.
    pub fn get_by_id(&self, id: Uuid) -> Result<Option<ConnectionRow>, StoreError> {
        one_row(&self.db, "id = ?1", &id.to_string())
    }

    /// One connection by id, or the fault that keeps it from reading.
    pub fn read_by_id(&self, id: Uuid) -> Result<Option<Result<ConnectionRow, Fault>>, StoreError> {
        read_by_id_on(&self.db, id)
    }

    /// The row at SQLite rowid `rowid` (how a row whose id does not read is
    /// looked at again): `None` when it is gone.
    pub fn row_at(&self, rowid: i64) -> Result<Option<Result<ConnectionRow, Fault>>, StoreError> {
        let mut stmt = self.db.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM connections WHERE rowid = ?1"
        ))?;
        let mut rows = stmt.query([rowid])?;
        Ok(rows.next()?.map(|r| decode(&r)))
    }

    /// Every connection that decodes, by name; rows that do not are left
    /// out (see [`Store::list_with_faults`]).
    pub fn list(&self) -> Result<Vec<ConnectionRow>, StoreError> {
        Ok(self.list_with_faults()?.0)
    }

    /// Every connection, by name, and the rows that do not decode.
    pub fn list_with_faults(&self) -> Result<(Vec<ConnectionRow>, Vec<Fault>), StoreError> {
        let mut stmt = self
            .db
            .prepare(&format!("SELECT {COLUMNS} FROM connections ORDER BY name"))?;
        let mut rows = stmt.query(())?;
        let (mut ok, mut faults) = (Vec::new(), Vec::new());
        while let Some(r) = rows.next()? {
            match decode(&r) {
                Ok(row) => ok.push(row),
                Err(f) => faults.push(f),
            }
        }
        Ok((ok, faults))
    }

    /// Every connection's name (what `import` checks new names against).
    pub fn names(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.db.prepare("SELECT name FROM connections")?;
        let rows = stmt.query_map((), |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// How many connections the store holds.
    pub fn count(&self) -> Result<usize, StoreError> {
        let n: i64 = self
            .db
            .query_row("SELECT COUNT(*) FROM connections", (), |r| r.get(0))?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// Calls `f` with every connection as a *planning row*: only what
    /// deciding when it next needs attention and whether an alert condition
    /// holds reads (id, instance, mode, lifetimes, times, state, failures,
    /// claim). Its name, client ID, labels, last error and token type are
    /// empty, and its `has_*` flags false: never save, show or act on one.
    ///
    /// Rows are streamed, so start-up with a million connections holds one
    /// row at a time, and nothing secret is read. A row that does not decode
    /// goes to `faulty` instead, and the pass goes on.
    pub fn each_for_planning(
        &self,
        mut f: impl FnMut(&ConnectionRow),
        mut faulty: impl FnMut(Fault),
    ) -> Result<(), StoreError> {
        let mut stmt = self
            .db
            .prepare(&format!("SELECT {PLANNING_COLUMNS} FROM connections"))?;
        let mut rows = stmt.query(())?;
        while let Some(r) = rows.next()? {
            match planning_row(&r) {
                Ok(row) => f(&row),
                Err(fault) => faulty(fault),
            }
        }
        Ok(())
    }

    /// Connections changed and ids removed after change sequence `seq`, and
    /// the newest sequence; changed rows that do not decode are left out
    /// (see [`Store::changes_since`]).
    pub fn changed_since(
        &self,
        seq: i64,
    ) -> Result<(Vec<ConnectionRow>, Vec<Uuid>, i64), StoreError> {
        let c = self.changes_since(seq)?;
        Ok((c.rows, c.removed, c.newest))
    }

    /// Everything that changed after change sequence `seq`.
    pub fn changes_since(&self, seq: i64) -> Result<Changes, StoreError> {
        // One read transaction: the rows, the removals and the newest
        // sequence come from the same snapshot. Read one statement at a
        // time, a change committed between the rows and the sequence would
        // be skipped by the next call and never seen.
        let snapshot = self.db.unchecked_transaction()?;
        let (mut rows, mut faults) = (Vec::new(), Vec::new());
        {
            let mut stmt = self.db.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM connections WHERE change_seq > ?1"
            ))?;
            let mut q = stmt.query([seq])?;
            while let Some(r) = q.next()? {
                match decode(&r) {
                    Ok(row) => rows.push(row),
                    Err(f) => faults.push(f),
                }
            }
        }
        let removed = self
            .db
            .prepare_cached("SELECT id FROM tombstones WHERE change_seq > ?1")?
            .query_map([seq], |r| r.get::<_, String>(0))?
            .filter_map(|r| r.ok().and_then(|s| Uuid::parse_str(&s).ok()))
            .collect();
        let newest = self.change_seq()?;
        snapshot.commit()?;
        Ok(Changes {
            rows,
            faults,
            removed,
            newest,
        })
    }

    /// Calls `f` with the id, state and deadline of every connection, streamed,
    /// and returns the change sequence they were read at (one snapshot).
    pub fn each_state_and_deadline(
        &self,
        mut f: impl FnMut(Uuid, State, Option<Timestamp>),
    ) -> Result<i64, StoreError> {
        let snapshot = self.db.unchecked_transaction()?;
        let seq = self.change_seq()?;
        let mut stmt = self
            .db
            .prepare("SELECT id, state, deadline FROM connections")?;
        let mut rows = stmt.query(())?;
        while let Some(r) = rows.next()? {
            // A row that does not read is set aside by the scheduler and
            // reported through its alert; the tally counts the others.
            let (Ok(id), Ok(state), Ok(deadline)) = (
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, Option<i64>>(2),
            ) else {
                continue;
            };
            let (Ok(id), Ok(state)) = (Uuid::parse_str(&id), state.parse::<State>()) else {
                continue;
            };
            f(id, state, deadline.map(from_ms));
        }
        drop(rows);
        drop(stmt);
        snapshot.commit()?;
        Ok(seq)
    }

    /// The store-wide change sequence now.
    pub fn change_seq(&self) -> Result<i64, StoreError> {
        Ok(self
            .db
            .query_row("SELECT value FROM meta WHERE key = 'change_seq'", (), |r| {
                r.get(0)
            })?)
    }

    /// Opens one sealed secret of a connection.
    pub fn secret(&self, id: Uuid, column: SecretColumn) -> Result<Option<Secret>, StoreError> {
        let sql = format!("SELECT {} FROM connections WHERE id = ?1", column.as_str());
        let sealed: Option<Vec<u8>> = self
            .db
            .prepare_cached(&sql)?
            .query_row([id.to_string()], |r| r.get(0))
            .optional()?
            .flatten();
        sealed
            .map(|s| self.keyring.open_secret(id, column.as_str(), &s))
            .transpose()
            .map_err(Into::into)
    }

    /// Counts per state, without loading rows.
    pub fn state_counts(&self) -> Result<BTreeMap<State, u64>, StoreError> {
        let mut stmt = self
            .db
            .prepare("SELECT state, COUNT(*) FROM connections GROUP BY state")?;
        let mut out = BTreeMap::new();
        let mut rows = stmt.query(())?;
        while let Some(r) = rows.next()? {
            let s: String = r.get(0)?;
            let n: i64 = r.get(1)?;
            if let Ok(st) = s.parse::<State>() {
                out.insert(st, n as u64);
            }
        }
        Ok(out)
    }
}

/// What [`Store::changes_since`] found.
#[derive(Debug, Default)]
pub struct Changes {
    /// Changed rows that decode.
    pub rows: Vec<ConnectionRow>,
    /// Changed rows that do not.
    pub faults: Vec<Fault>,
    /// Ids removed.
    pub removed: Vec<Uuid>,
    /// The change sequence this was read at.
    pub newest: i64,
}

/// The rows of a `SELECT {COLUMNS}` that decode (the status lists: a row
/// that does not is reported through its `connection_faulty` alert).
fn decoded(mut q: crate::store::sql::Rows<'_>) -> Result<Vec<ConnectionRow>, StoreError> {
    let mut out = Vec::new();
    while let Some(r) = q.next()? {
        if let Ok(row) = decode(&r) {
            out.push(row);
        }
    }
    Ok(out)
}

impl Store {
    /// Connections a human must act on, most urgent deadline first, and how many there are.
    pub fn needing_action(&self, limit: usize) -> Result<(Vec<ConnectionRow>, u64), StoreError> {
        let filter = "state IN ('pending_authorization', 'needs_secret', 'needs_reauthorization')";
        let total: i64 = self.db.query_row(
            &format!("SELECT COUNT(*) FROM connections WHERE {filter}"),
            (),
            |r| r.get(0),
        )?;
        let mut stmt = self.db.prepare(&format!(
            "SELECT {COLUMNS} FROM connections WHERE {filter}
             ORDER BY deadline IS NULL, deadline, name LIMIT ?1"
        ))?;
        Ok((decoded(stmt.query([limit as i64])?)?, total as u64))
    }

    /// The nearest deadlines of connections that are refreshed automatically.
    pub fn nearest_deadlines(&self, limit: usize) -> Result<Vec<ConnectionRow>, StoreError> {
        let mut stmt = self.db.prepare(&format!(
            "SELECT {COLUMNS} FROM connections WHERE state IN ('active', 'retrying')
             AND deadline IS NOT NULL ORDER BY deadline LIMIT ?1"
        ))?;
        decoded(stmt.query([limit as i64])?)
    }
}
