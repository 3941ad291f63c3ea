//! Connection rows: insert, read, update, remove, and their sealed secrets.

use std::collections::BTreeMap;
use std::time::Duration;

use rusqlite::{OptionalExtension, Row, Transaction, params};
use uuid::Uuid;

use super::{Store, StoreError, from_ms, next_seq, to_ms};
use crate::crypto::Keyring;
use crate::model::{Connection, DeadlineSource, Mode, State, Timestamp};
use crate::secret::Secret;

/// A sealed column. The column name is part of every seal's associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretColumn {
    ClientSecret,
    RefreshToken,
    AccessToken,
}

impl SecretColumn {
    pub fn as_str(self) -> &'static str {
        match self {
            SecretColumn::ClientSecret => "client_secret",
            SecretColumn::RefreshToken => "refresh_token",
            SecretColumn::AccessToken => "access_token",
        }
    }
}

/// A new connection as the CLI builds it (plan fields computed by the caller).
#[derive(Debug, Clone)]
pub struct NewConnection {
    pub conn: Connection,
    pub client_secret: Option<Secret>,
    pub refresh_token: Option<Secret>,
}

/// A connection with the bookkeeping the renewal engine keeps beside it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionRow {
    pub conn: Connection,
    /// Consecutive transient failures since the last success.
    pub failures: u32,
    /// When the current run of failures began.
    pub failing_since: Option<Timestamp>,
    /// A previous claim was orphaned: the token may have been consumed already.
    pub outcome_unknown: bool,
    pub has_client_secret: bool,
    pub has_refresh_token: bool,
    pub has_access_token: bool,
    pub token_type: Option<String>,
    /// The lifetime the current access token was issued with.
    pub access_lifetime: Option<Duration>,
    /// The live or stale claim on this connection: (owner, expires).
    pub claim: Option<(String, Timestamp)>,
    pub version: i64,
    pub change_seq: i64,
}

/// Edits `connection set` can make; `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct ConnectionPatch {
    pub labels: Option<BTreeMap<String, String>>,
    pub mode: Option<Mode>,
    pub lifetime: Option<Duration>,
    pub absolute_lifetime: Option<Option<Duration>>,
    pub secret_expires_at: Option<Option<Timestamp>>,
    pub instance: Option<String>,
    pub client_id: Option<String>,
}

pub(super) const COLUMNS: &str = "id, name, instance, client_id, labels, mode, lifetime_s,
    absolute_lifetime_s, secret_expires_at, grant_issued_at, refresh_token_issued_at,
    access_expires_at, deadline, deadline_source, next_refresh_at, last_refresh_at, last_error,
    state, failures, failing_since, outcome_unknown, client_secret IS NOT NULL,
    refresh_token IS NOT NULL, access_token IS NOT NULL, token_type, access_lifetime_s,
    claim_owner, claim_expires_at, version, change_seq";

fn opt_ms(v: Option<i64>) -> Option<Timestamp> {
    v.map(from_ms)
}

fn bad(what: &str, v: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        0,
        rusqlite::types::Type::Text,
        format!("{what}: {v}").into(),
    )
}

pub(super) fn from_row(r: &Row<'_>) -> rusqlite::Result<ConnectionRow> {
    let id: String = r.get(0)?;
    let labels: String = r.get(4)?;
    let mode: String = r.get(5)?;
    let source: Option<String> = r.get(13)?;
    let state: String = r.get(17)?;
    let claim_owner: Option<String> = r.get(26)?;
    let claim_expires: Option<i64> = r.get(27)?;
    Ok(ConnectionRow {
        conn: Connection {
            id: Uuid::parse_str(&id).map_err(|_| bad("connection id", &id))?,
            name: r.get(1)?,
            instance: r.get(2)?,
            client_id: r.get(3)?,
            labels: serde_json::from_str(&labels).map_err(|_| bad("labels", &labels))?,
            mode: mode.parse().map_err(|_| bad("mode", &mode))?,
            lifetime: Duration::from_secs(r.get::<_, i64>(6)?.max(0) as u64),
            absolute_lifetime: r
                .get::<_, Option<i64>>(7)?
                .map(|s| Duration::from_secs(s.max(0) as u64)),
            secret_expires_at: opt_ms(r.get(8)?),
            grant_issued_at: opt_ms(r.get(9)?),
            refresh_token_issued_at: opt_ms(r.get(10)?),
            access_expires_at: opt_ms(r.get(11)?),
            deadline: opt_ms(r.get(12)?),
            deadline_source: source
                .map(|s| {
                    s.parse::<DeadlineSource>()
                        .map_err(|_| bad("deadline_source", &s))
                })
                .transpose()?,
            next_refresh_at: opt_ms(r.get(14)?),
            last_refresh_at: opt_ms(r.get(15)?),
            last_error: r.get(16)?,
            state: state.parse::<State>().map_err(|_| bad("state", &state))?,
        },
        failures: r.get::<_, i64>(18)?.clamp(0, u32::MAX as i64) as u32,
        failing_since: opt_ms(r.get(19)?),
        outcome_unknown: r.get::<_, i64>(20)? != 0,
        has_client_secret: r.get(21)?,
        has_refresh_token: r.get(22)?,
        has_access_token: r.get(23)?,
        token_type: r.get(24)?,
        access_lifetime: r
            .get::<_, Option<i64>>(25)?
            .map(|s| Duration::from_secs(s.max(0) as u64)),
        claim: match (claim_owner, claim_expires) {
            (Some(o), Some(e)) => Some((o, from_ms(e))),
            _ => None,
        },
        version: r.get(28)?,
        change_seq: r.get(29)?,
    })
}

/// A text column borrowed from the row (no allocation per row).
fn text<'a>(r: &'a Row<'_>, i: usize) -> rusqlite::Result<&'a str> {
    r.get_ref(i)?.as_str().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// See [`Store::each_for_planning`].
fn planning_row(r: &Row<'_>) -> rusqlite::Result<ConnectionRow> {
    let id = text(r, 0)?;
    let mode = text(r, 2)?;
    let source = match r.get_ref(10)? {
        rusqlite::types::ValueRef::Null => None,
        _ => Some(text(r, 10)?),
    };
    let state = text(r, 13)?;
    let claim_owner: Option<String> = r.get(17)?;
    let claim_expires: Option<i64> = r.get(18)?;
    Ok(ConnectionRow {
        conn: Connection {
            id: Uuid::parse_str(id).map_err(|_| bad("connection id", id))?,
            name: String::new(),
            instance: r.get(1)?,
            client_id: String::new(),
            labels: BTreeMap::new(),
            mode: mode.parse().map_err(|_| bad("mode", mode))?,
            lifetime: Duration::from_secs(r.get::<_, i64>(3)?.max(0) as u64),
            absolute_lifetime: r
                .get::<_, Option<i64>>(4)?
                .map(|s| Duration::from_secs(s.max(0) as u64)),
            secret_expires_at: opt_ms(r.get(5)?),
            grant_issued_at: opt_ms(r.get(6)?),
            refresh_token_issued_at: opt_ms(r.get(7)?),
            access_expires_at: opt_ms(r.get(8)?),
            deadline: opt_ms(r.get(9)?),
            deadline_source: source
                .map(|s| {
                    s.parse::<DeadlineSource>()
                        .map_err(|_| bad("deadline_source", s))
                })
                .transpose()?,
            next_refresh_at: opt_ms(r.get(11)?),
            last_refresh_at: opt_ms(r.get(12)?),
            last_error: None,
            state: state.parse::<State>().map_err(|_| bad("state", state))?,
        },
        failures: r.get::<_, i64>(14)?.clamp(0, u32::MAX as i64) as u32,
        failing_since: opt_ms(r.get(15)?),
        outcome_unknown: r.get::<_, i64>(16)? != 0,
        has_client_secret: false,
        has_refresh_token: false,
        has_access_token: false,
        token_type: None,
        access_lifetime: None,
        claim: match (claim_owner, claim_expires) {
            (Some(o), Some(e)) => Some((o, from_ms(e))),
            _ => None,
        },
        version: r.get(19)?,
        change_seq: r.get(20)?,
    })
}

/// Seconds for an INTEGER column; a duration past `i64::MAX` seconds is
/// stored as that (a cast would wrap it negative and read back as 0).
fn secs_i64(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn labels_json(labels: &BTreeMap<String, String>) -> String {
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".into())
}

/// Inserts a new connection; a taken name is [`StoreError::DuplicateName`].
pub fn insert(
    tx: &Transaction<'_>,
    keyring: &Keyring,
    new: &NewConnection,
    now: Timestamp,
) -> Result<(), StoreError> {
    let seq = next_seq(tx)?;
    insert_at(tx, new, &Sealed::new(keyring, new), now, seq)
}

/// Inserts many new connections under one change sequence (`connection
/// import`): the daemon picks them all up in one look. A taken name is
/// [`StoreError::DuplicateName`] and the caller's transaction rolls back.
pub fn insert_many(
    tx: &Transaction<'_>,
    keyring: &Keyring,
    news: &[NewConnection],
    now: Timestamp,
) -> Result<(), StoreError> {
    let sealed: Vec<Sealed> = news.iter().map(|n| Sealed::new(keyring, n)).collect();
    insert_sealed(tx, news, &sealed, now).map(|_| ())
}

/// What a [`NewConnection`]'s row needs beyond its fields: the secrets
/// sealed for its id, and the id and labels as text. This is the CPU-bound
/// half of an insert, which a bulk import does on another thread.
pub struct Sealed {
    id: String,
    labels: String,
    client_secret: Option<Vec<u8>>,
    refresh_token: Option<Vec<u8>>,
}

impl Sealed {
    pub fn new(keyring: &Keyring, new: &NewConnection) -> Sealed {
        let id = new.conn.id;
        let sealer = keyring.sealer(id);
        let seal = |col: SecretColumn, s: &Option<Secret>| {
            s.as_ref().map(|s| sealer.seal_secret(col.as_str(), s))
        };
        Sealed {
            id: id.to_string(),
            labels: labels_json(&new.conn.labels),
            client_secret: seal(SecretColumn::ClientSecret, &new.client_secret),
            refresh_token: seal(SecretColumn::RefreshToken, &new.refresh_token),
        }
    }
}

/// The columns a new connection sets, in the order [`bind_new`] binds them.
const INSERT_COLUMNS: &str = "INTO connections (id, name, instance, client_id, labels,
    mode, lifetime_s, absolute_lifetime_s, secret_expires_at, grant_issued_at,
    refresh_token_issued_at, deadline, deadline_source, next_refresh_at, state, client_secret,
    refresh_token, change_seq, created_at) VALUES ";
const INSERT_PARAMS: usize = 19;
/// Rows per multi-row INSERT in a bulk insert: one statement per row costs
/// as much again as the B-tree work. 50 × 19 parameters is far below
/// SQLite's limit of 32,766.
const BULK_ROWS: usize = 50;

/// `OR ROLLBACK` spares SQLite a statement journal (a copy of every page
/// the statement touches, kept in case a later row of it fails): a
/// conflict ends the whole transaction instead, as the import wants anyway.
fn insert_sql(rows: usize, conflict: &str) -> String {
    let one = format!("({})", vec!["?"; INSERT_PARAMS].join(", "));
    format!(
        "INSERT OR {conflict} {INSERT_COLUMNS}{}",
        vec![one; rows].join(", ")
    )
}

/// [`insert_many`] with the secrets sealed beforehand; `sealed[i]` belongs
/// to `news[i]`. Returns the change sequence the rows were written under.
pub fn insert_sealed(
    tx: &Transaction<'_>,
    news: &[NewConnection],
    sealed: &[Sealed],
    now: Timestamp,
) -> Result<i64, StoreError> {
    assert_eq!(news.len(), sealed.len(), "one Sealed per new connection");
    let seq = next_seq(tx)?;
    let bulk = news.len() - news.len() % BULK_ROWS;
    if bulk > 0 {
        let mut stmt = tx.prepare_cached(&insert_sql(BULK_ROWS, "ROLLBACK"))?;
        for (rows, seals) in news[..bulk]
            .chunks(BULK_ROWS)
            .zip(sealed[..bulk].chunks(BULK_ROWS))
        {
            for (k, (new, sealed)) in rows.iter().zip(seals).enumerate() {
                bind_new(&mut stmt, k * INSERT_PARAMS, new, sealed, now, seq)?;
            }
            match stmt.raw_execute() {
                Ok(_) => {}
                // The transaction is gone; outside it, the store shows
                // which name another writer took meanwhile.
                Err(
                    e @ rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error {
                            code: rusqlite::ErrorCode::ConstraintViolation,
                            ..
                        },
                        _,
                    ),
                ) => {
                    let mut exists = tx.prepare("SELECT 1 FROM connections WHERE name = ?1")?;
                    for new in rows {
                        if exists.exists([&new.conn.name])? {
                            return Err(StoreError::DuplicateName(new.conn.name.clone()));
                        }
                    }
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    for (new, sealed) in news[bulk..].iter().zip(&sealed[bulk..]) {
        insert_at(tx, new, sealed, now, seq)?;
    }
    Ok(seq)
}

fn insert_at(
    tx: &Transaction<'_>,
    new: &NewConnection,
    sealed: &Sealed,
    now: Timestamp,
    seq: i64,
) -> Result<(), StoreError> {
    let mut stmt = tx.prepare_cached(&insert_sql(1, "ABORT"))?;
    bind_new(&mut stmt, 0, new, sealed, now, seq)?;
    match stmt.raw_execute() {
        Ok(_) => Ok(()),
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            Err(StoreError::DuplicateName(new.conn.name.clone()))
        }
        Err(e) => Err(e.into()),
    }
}

/// Binds one new row's values to parameters `base + 1 ..= base + 19`.
fn bind_new(
    stmt: &mut rusqlite::CachedStatement<'_>,
    base: usize,
    new: &NewConnection,
    sealed: &Sealed,
    now: Timestamp,
    seq: i64,
) -> rusqlite::Result<()> {
    let c = &new.conn;
    let values: [&dyn rusqlite::ToSql; INSERT_PARAMS] = [
        &sealed.id,
        &c.name,
        &c.instance,
        &c.client_id,
        &sealed.labels,
        &c.mode.as_str(),
        &(secs_i64(c.lifetime)),
        &c.absolute_lifetime.map(secs_i64),
        &c.secret_expires_at.map(to_ms),
        &c.grant_issued_at.map(to_ms),
        &c.refresh_token_issued_at.map(to_ms),
        &c.deadline.map(to_ms),
        &c.deadline_source.map(|s| s.as_str()),
        &c.next_refresh_at.map(to_ms),
        &c.state.as_str(),
        &sealed.client_secret,
        &sealed.refresh_token,
        &seq,
        &to_ms(now),
    ];
    for (i, v) in values.into_iter().enumerate() {
        stmt.raw_bind_parameter(base + i + 1, v)?;
    }
    Ok(())
}

/// Writes every non-secret field of `row` back, bumping version and change sequence.
pub fn put(tx: &Transaction<'_>, row: &ConnectionRow) -> Result<(), StoreError> {
    let c = &row.conn;
    let seq = next_seq(tx)?;
    let n = tx
        .prepare_cached(
            "UPDATE connections SET instance = ?2, client_id = ?3, labels = ?4, mode = ?5,
            lifetime_s = ?6, absolute_lifetime_s = ?7, secret_expires_at = ?8,
            grant_issued_at = ?9, refresh_token_issued_at = ?10, access_expires_at = ?11,
            deadline = ?12, deadline_source = ?13, next_refresh_at = ?14, last_refresh_at = ?15,
            last_error = ?16, state = ?17, failures = ?18, failing_since = ?19,
            outcome_unknown = ?20, token_type = ?21, access_lifetime_s = ?22,
            version = version + 1, change_seq = ?23
         WHERE id = ?1",
        )?
        .execute(params![
            c.id.to_string(),
            c.instance,
            c.client_id,
            labels_json(&c.labels),
            c.mode.as_str(),
            secs_i64(c.lifetime),
            c.absolute_lifetime.map(secs_i64),
            c.secret_expires_at.map(to_ms),
            c.grant_issued_at.map(to_ms),
            c.refresh_token_issued_at.map(to_ms),
            c.access_expires_at.map(to_ms),
            c.deadline.map(to_ms),
            c.deadline_source.map(|s| s.as_str()),
            c.next_refresh_at.map(to_ms),
            c.last_refresh_at.map(to_ms),
            c.last_error,
            c.state.as_str(),
            row.failures as i64,
            row.failing_since.map(to_ms),
            row.outcome_unknown as i64,
            row.token_type,
            row.access_lifetime.map(secs_i64),
            seq,
        ])?;
    if n == 0 {
        return Err(StoreError::UnknownConnection(c.name.clone()));
    }
    Ok(())
}

/// Writes back only the columns a refresh owns (times, plan, state, failure
/// bookkeeping, token type), bumping version and change sequence. What an
/// operator or the customer sets is never written from a refresh: a save
/// cannot undo an edit that landed while its request was in flight.
pub fn put_refresh(tx: &Transaction<'_>, row: &ConnectionRow) -> Result<(), StoreError> {
    let c = &row.conn;
    let seq = next_seq(tx)?;
    let n = tx
        .prepare_cached(
            "UPDATE connections SET refresh_token_issued_at = ?2, access_expires_at = ?3,
            deadline = ?4, deadline_source = ?5, next_refresh_at = ?6, last_refresh_at = ?7,
            last_error = ?8, state = ?9, failures = ?10, failing_since = ?11,
            outcome_unknown = ?12, token_type = ?13, access_lifetime_s = ?14,
            version = version + 1, change_seq = ?15
         WHERE id = ?1",
        )?
        .execute(params![
            c.id.to_string(),
            c.refresh_token_issued_at.map(to_ms),
            c.access_expires_at.map(to_ms),
            c.deadline.map(to_ms),
            c.deadline_source.map(|s| s.as_str()),
            c.next_refresh_at.map(to_ms),
            c.last_refresh_at.map(to_ms),
            c.last_error,
            c.state.as_str(),
            row.failures as i64,
            row.failing_since.map(to_ms),
            row.outcome_unknown as i64,
            row.token_type,
            row.access_lifetime.map(secs_i64),
            seq,
        ])?;
    if n == 0 {
        return Err(StoreError::UnknownConnection(c.name.clone()));
    }
    Ok(())
}

/// Seals `value` into `column` (or clears it with `None`).
pub fn set_secret(
    tx: &Transaction<'_>,
    keyring: &Keyring,
    id: Uuid,
    column: SecretColumn,
    value: Option<&Secret>,
) -> Result<(), StoreError> {
    let sealed = value.map(|v| keyring.seal_secret(id, column.as_str(), v));
    // The column name comes from a closed enum, never from input.
    let sql = format!(
        "UPDATE connections SET {} = ?2 WHERE id = ?1",
        column.as_str()
    );
    tx.prepare_cached(&sql)?
        .execute(params![id.to_string(), sealed])?;
    Ok(())
}

/// Reads one connection by name inside a transaction.
pub fn get_tx(tx: &Transaction<'_>, name: &str) -> Result<ConnectionRow, StoreError> {
    tx.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM connections WHERE name = ?1"
    ))?
    .query_row([name], from_row)
    .optional()?
    .ok_or_else(|| StoreError::UnknownConnection(name.to_string()))
}

/// Reads one connection by id inside a transaction.
pub fn get_by_id_tx(tx: &Transaction<'_>, id: Uuid) -> Result<Option<ConnectionRow>, StoreError> {
    Ok(tx
        .prepare_cached(&format!("SELECT {COLUMNS} FROM connections WHERE id = ?1"))?
        .query_row([id.to_string()], from_row)
        .optional()?)
}

/// Removes a connection, its history and its authorizations.
pub fn remove(tx: &Transaction<'_>, id: Uuid) -> Result<(), StoreError> {
    let id_s = id.to_string();
    let seq = next_seq(tx)?;
    tx.execute("DELETE FROM connections WHERE id = ?1", [&id_s])?;
    tx.execute("DELETE FROM events WHERE connection_id = ?1", [&id_s])?;
    tx.execute(
        "DELETE FROM authorizations WHERE connection_id = ?1",
        [&id_s],
    )?;
    tx.execute(
        "INSERT OR REPLACE INTO tombstones (id, change_seq) VALUES (?1, ?2)",
        params![id_s, seq],
    )?;
    Ok(())
}

impl Store {
    /// One connection by name.
    pub fn get(&self, name: &str) -> Result<ConnectionRow, StoreError> {
        self.db
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM connections WHERE name = ?1"
            ))?
            .query_row([name], from_row)
            .optional()?
            .ok_or_else(|| StoreError::UnknownConnection(name.to_string()))
    }

    /// One connection by id.
    pub fn get_by_id(&self, id: Uuid) -> Result<Option<ConnectionRow>, StoreError> {
        Ok(self
            .db
            .prepare_cached(&format!("SELECT {COLUMNS} FROM connections WHERE id = ?1"))?
            .query_row([id.to_string()], from_row)
            .optional()?)
    }

    /// Every connection, by name.
    pub fn list(&self) -> Result<Vec<ConnectionRow>, StoreError> {
        let mut stmt = self
            .db
            .prepare(&format!("SELECT {COLUMNS} FROM connections ORDER BY name"))?;
        let rows = stmt.query_map([], from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every connection's name (what `import` checks new names against).
    pub fn names(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.db.prepare("SELECT name FROM connections")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// How many connections the store holds.
    pub fn count(&self) -> Result<usize, StoreError> {
        let n: i64 = self
            .db
            .query_row("SELECT COUNT(*) FROM connections", [], |r| r.get(0))?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// Calls `f` with every connection as a *planning row*: only what
    /// deciding when it next needs attention and whether an alert condition
    /// holds reads (id, instance, mode, lifetimes, times, state, failures,
    /// claim). Its name, client ID, labels, last error and token type are
    /// empty, and its `has_*` flags false: never save, show or act on one.
    ///
    /// Rows are streamed, so start-up with a million connections holds one
    /// row at a time, and nothing secret is read.
    pub fn each_for_planning(&self, mut f: impl FnMut(&ConnectionRow)) -> Result<(), StoreError> {
        let mut stmt = self.db.prepare(
            "SELECT id, instance, mode, lifetime_s, absolute_lifetime_s, secret_expires_at,
                grant_issued_at, refresh_token_issued_at, access_expires_at, deadline,
                deadline_source, next_refresh_at, last_refresh_at, state, failures,
                failing_since, outcome_unknown, claim_owner, claim_expires_at, version,
                change_seq
             FROM connections",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            f(&planning_row(r)?);
        }
        Ok(())
    }

    /// Connections changed and ids removed after change sequence `seq`, and the newest sequence.
    pub fn changed_since(
        &self,
        seq: i64,
    ) -> Result<(Vec<ConnectionRow>, Vec<Uuid>, i64), StoreError> {
        // One read transaction: the rows, the removals and the newest
        // sequence come from the same snapshot. Read one statement at a
        // time, a change committed between the rows and the sequence would
        // be skipped by the next call and never seen.
        let snapshot = self.db.unchecked_transaction()?;
        let rows = self
            .db
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM connections WHERE change_seq > ?1"
            ))?
            .query_map([seq], from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        let removed = self
            .db
            .prepare_cached("SELECT id FROM tombstones WHERE change_seq > ?1")?
            .query_map([seq], |r| r.get::<_, String>(0))?
            .filter_map(|r| r.ok().and_then(|s| Uuid::parse_str(&s).ok()))
            .collect();
        let newest = self.change_seq()?;
        snapshot.commit()?;
        Ok((rows, removed, newest))
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
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let id: String = r.get(0)?;
            let state: String = r.get(1)?;
            let id = Uuid::parse_str(&id)
                .map_err(|_| StoreError::Corrupt(format!("connection id {id}")))?;
            let state = state
                .parse::<State>()
                .map_err(|_| StoreError::Corrupt(format!("state {state}")))?;
            f(id, state, r.get::<_, Option<i64>>(2)?.map(from_ms));
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
            .query_row("SELECT value FROM meta WHERE key = 'change_seq'", [], |r| {
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
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let s: String = r.get(0)?;
            let n: i64 = r.get(1)?;
            if let Ok(st) = s.parse::<State>() {
                out.insert(st, n as u64);
            }
        }
        Ok(out)
    }

    /// Re-seals up to `batch` values sealed under keys other than the primary;
    /// returns how many were re-sealed (0 = none left).
    pub fn reseal_batch(&mut self, batch: usize) -> Result<usize, StoreError> {
        let primary = self.keyring.primary().id().to_string();
        self.write(|tx, kr| {
            let mut done = 0;
            let mut stmt = tx.prepare(
                "SELECT id, client_secret, refresh_token, access_token FROM connections",
            )?;
            let mut todo = Vec::new();
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                if todo.len() >= batch {
                    break;
                }
                let id: String = r.get(0)?;
                for (i, col) in [
                    SecretColumn::ClientSecret,
                    SecretColumn::RefreshToken,
                    SecretColumn::AccessToken,
                ]
                .into_iter()
                .enumerate()
                {
                    let v: Option<Vec<u8>> = r.get(i + 1)?;
                    if let Some(v) = v
                        && crate::crypto::sealed_key_id(&v) != Some(primary.as_str())
                    {
                        todo.push((id.clone(), col, v));
                    }
                }
            }
            drop(rows);
            drop(stmt);
            for (id_s, col, sealed) in todo {
                let id = Uuid::parse_str(&id_s)
                    .map_err(|_| StoreError::Corrupt(format!("connection id {id_s}")))?;
                let plain = kr.open(id, col.as_str(), &sealed)?;
                let resealed = kr.seal(id, col.as_str(), &plain);
                let sql = format!("UPDATE connections SET {} = ?2 WHERE id = ?1", col.as_str());
                tx.execute(&sql, params![id_s, resealed])?;
                done += 1;
            }
            done += super::authorizations::reseal(tx, kr, &primary, batch.saturating_sub(done))?;
            Ok(done)
        })
    }
}

impl Store {
    /// Connections a human must act on, most urgent deadline first, and how many there are.
    pub fn needing_action(&self, limit: usize) -> Result<(Vec<ConnectionRow>, u64), StoreError> {
        let filter = "state IN ('pending_authorization', 'needs_secret', 'needs_reauthorization')";
        let total: i64 = self.db.query_row(
            &format!("SELECT COUNT(*) FROM connections WHERE {filter}"),
            [],
            |r| r.get(0),
        )?;
        let mut stmt = self.db.prepare(&format!(
            "SELECT {COLUMNS} FROM connections WHERE {filter}
             ORDER BY deadline IS NULL, deadline, name LIMIT ?1"
        ))?;
        let rows = stmt
            .query_map([limit as i64], from_row)?
            .collect::<Result<_, _>>()?;
        Ok((rows, total as u64))
    }

    /// The nearest deadlines of connections that are refreshed automatically.
    pub fn nearest_deadlines(&self, limit: usize) -> Result<Vec<ConnectionRow>, StoreError> {
        let mut stmt = self.db.prepare(&format!(
            "SELECT {COLUMNS} FROM connections WHERE state IN ('active', 'retrying')
             AND deadline IS NOT NULL ORDER BY deadline LIMIT ?1"
        ))?;
        let rows = stmt
            .query_map([limit as i64], from_row)?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Key;
    use crate::store::Create;

    fn new_connection(i: usize) -> NewConnection {
        NewConnection {
            conn: Connection {
                id: Uuid::new_v4(),
                name: format!("c{i:04}"),
                instance: "https://erp.example.com".into(),
                client_id: format!("{i:08X}-A48D-A50E-F710-39C1636C30F6@T"),
                labels: BTreeMap::from([("customer".into(), format!("Customer {i}"))]),
                mode: Mode::Sliding,
                lifetime: Duration::from_secs(30 * 86400),
                absolute_lifetime: None,
                secret_expires_at: None,
                grant_issued_at: None,
                refresh_token_issued_at: None,
                access_expires_at: None,
                deadline: None,
                deadline_source: None,
                next_refresh_at: None,
                last_refresh_at: None,
                last_error: None,
                state: State::PendingAuthorization,
            },
            client_secret: Some(Secret::new(format!("secret-{i}"))),
            refresh_token: i
                .is_multiple_of(2)
                .then(|| Secret::new(format!("token-{i}"))),
        }
    }

    fn store(dir: &tempfile::TempDir) -> Store {
        let keyring = Keyring::new(Key::generate(), vec![]);
        Store::open(&dir.path().join("acutoken.db"), keyring, Create::Yes).unwrap()
    }

    /// 2 multi-row statements and 23 single rows: every row and secret lands.
    #[test]
    fn a_bulk_insert_writes_every_row_with_its_own_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = store(&dir);
        let news: Vec<NewConnection> = (0..2 * BULK_ROWS + 23).map(new_connection).collect();
        let now = chrono::Utc::now();
        st.write(|tx, kr| insert_many(tx, kr, &news, now)).unwrap();
        assert_eq!(st.count().unwrap(), news.len());
        for new in &news {
            let row = st.get(&new.conn.name).unwrap();
            assert_eq!(row.conn.id, new.conn.id);
            assert_eq!(row.conn.labels, new.conn.labels);
            assert_eq!(row.conn.client_id, new.conn.client_id);
            for (col, want) in [
                (SecretColumn::ClientSecret, &new.client_secret),
                (SecretColumn::RefreshToken, &new.refresh_token),
            ] {
                let got = st.secret(new.conn.id, col).unwrap();
                assert_eq!(
                    got.as_ref().map(|s| s.expose().to_string()),
                    want.as_ref().map(|s| s.expose().to_string())
                );
            }
        }
    }

    /// A name another writer took between the import's check and its write
    /// is named, inside a multi-row statement as in the single rows, and
    /// nothing of the batch is written.
    #[test]
    fn a_name_taken_meanwhile_is_named_and_nothing_is_written() {
        for taken in [7, 2 * BULK_ROWS + 3] {
            let dir = tempfile::tempdir().unwrap();
            let mut st = store(&dir);
            let now = chrono::Utc::now();
            let mut first = new_connection(taken);
            first.conn.id = Uuid::new_v4();
            st.write(|tx, kr| insert(tx, kr, &first, now)).unwrap();
            let news: Vec<NewConnection> = (0..2 * BULK_ROWS + 5).map(new_connection).collect();
            let err = st
                .write(|tx, kr| insert_many(tx, kr, &news, now))
                .unwrap_err();
            assert!(
                matches!(&err, StoreError::DuplicateName(n) if *n == format!("c{taken:04}")),
                "{err}"
            );
            assert_eq!(st.count().unwrap(), 1);
            // The store is still writable: the failed transaction is gone.
            st.write(|tx, kr| insert(tx, kr, &new_connection(9999), now))
                .unwrap();
            assert_eq!(st.count().unwrap(), 2);
        }
    }
}
