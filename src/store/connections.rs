//! Connection rows: insert, read, update, remove, and their sealed secrets.

use std::collections::BTreeMap;
use std::time::Duration;

use rusqlite::{OptionalExtension, Row, Transaction, params};
use uuid::Uuid;

use super::{Store, StoreError, from_ms, next_seq, to_ms};
use crate::crypto::Keyring;
use crate::model::{
    Connection, ConnectionRow, DeadlineSource, Fault, Mode, NewConnection, State, Timestamp,
};
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

pub(super) const COLUMNS: &str = "id, name, instance, client_id, labels, mode, lifetime_s,
    absolute_lifetime_s, secret_expires_at, grant_issued_at, refresh_token_issued_at,
    access_expires_at, deadline, deadline_source, next_refresh_at, last_refresh_at, last_error,
    state, failures, failing_since, outcome_unknown, client_secret IS NOT NULL,
    refresh_token IS NOT NULL, access_token IS NOT NULL, token_type, access_lifetime_s,
    claim_owner, claim_expires_at, version, change_seq, rowid";

fn opt_ms(v: Option<i64>) -> Option<Timestamp> {
    v.map(from_ms)
}

/// The column a select list names at index `i`: its first word
/// (`client_secret IS NOT NULL` names `client_secret`). Faults name their
/// column from the query itself, so the two cannot drift apart.
fn column_at(select: &'static str, i: usize) -> Option<&'static str> {
    select.split(',').nth(i)?.split_whitespace().next()
}

/// A plain value quoted in a fault: short, and printable.
fn quote(v: rusqlite::types::ValueRef<'_>) -> String {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => "NULL".into(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => f.to_string(),
        ValueRef::Text(t) => format!("{:?}", crate::model::clip(&String::from_utf8_lossy(t), 40)),
        ValueRef::Blob(b) => format!("a {}-byte blob", b.len()),
    }
}

/// Reads the columns of one row, turning any value that does not decode
/// into a [`Fault`] naming its column.
struct Decoder<'a, 'r> {
    r: &'a Row<'r>,
    /// Index of the rowid column in this query.
    rowid_at: usize,
    /// This query's select list.
    select: &'static str,
}

impl Decoder<'_, '_> {
    fn fault(&self, i: usize, reason: String) -> Fault {
        let id_text = match self.r.get_ref(0) {
            Ok(rusqlite::types::ValueRef::Text(t)) => String::from_utf8_lossy(t).into_owned(),
            Ok(v) => quote(v),
            Err(_) => String::new(),
        };
        Fault {
            rowid: self.r.get(self.rowid_at).unwrap_or(0),
            id: Uuid::parse_str(&id_text).ok(),
            key: id_text,
            name: (0..=self.rowid_at)
                .position(|k| column_at(self.select, k) == Some("name"))
                .and_then(|k| self.r.get::<_, String>(k).ok()),
            column: column_at(self.select, i).unwrap_or("?"),
            reason,
        }
    }

    fn get<T: rusqlite::types::FromSql>(&self, i: usize) -> Result<T, Fault> {
        self.r.get(i).map_err(|_| {
            let v = self.r.get_ref(i).map(quote).unwrap_or_default();
            self.fault(i, format!("holds {v}, which is not of its type"))
        })
    }

    fn text(&self, i: usize) -> Result<&str, Fault> {
        match self.r.get_ref(i) {
            Ok(v) => v
                .as_str()
                .map_err(|_| self.fault(i, format!("holds {}, which is not text", quote(v)))),
            Err(_) => Err(self.fault(i, "is missing".into())),
        }
    }

    fn parse<T: std::str::FromStr>(&self, i: usize) -> Result<T, Fault> {
        let s = self.text(i)?;
        s.parse().map_err(|_| {
            self.fault(
                i,
                format!(
                    "holds {}, which is not a known value",
                    quote(rusqlite::types::ValueRef::Text(s.as_bytes()))
                ),
            )
        })
    }

    fn opt_parse<T: std::str::FromStr>(&self, i: usize) -> Result<Option<T>, Fault> {
        match self.r.get_ref(i) {
            Ok(rusqlite::types::ValueRef::Null) => Ok(None),
            _ => self.parse(i).map(Some),
        }
    }

    fn id(&self) -> Result<Uuid, Fault> {
        self.parse(0)
    }

    fn seconds(&self, i: usize) -> Result<Duration, Fault> {
        let s: i64 = self.get(i)?;
        Ok(Duration::from_secs(s.max(0) as u64))
    }

    fn opt_seconds(&self, i: usize) -> Result<Option<Duration>, Fault> {
        let s: Option<i64> = self.get(i)?;
        Ok(s.map(|s| Duration::from_secs(s.max(0) as u64)))
    }

    fn time(&self, i: usize) -> Result<Option<Timestamp>, Fault> {
        Ok(opt_ms(self.get(i)?))
    }

    fn claim(&self, owner: usize) -> Result<Option<(String, Timestamp)>, Fault> {
        let o: Option<String> = self.get(owner)?;
        let e: Option<i64> = self.get(owner + 1)?;
        Ok(match (o, e) {
            (Some(o), Some(e)) => Some((o, from_ms(e))),
            _ => None,
        })
    }
}

/// Decodes a row of `SELECT {COLUMNS}`; a value that does not decode is a [`Fault`].
pub(super) fn decode(r: &Row<'_>) -> Result<ConnectionRow, Fault> {
    let d = Decoder {
        r,
        rowid_at: 30,
        select: COLUMNS,
    };
    let labels = d.text(4)?;
    Ok(ConnectionRow {
        conn: Connection {
            id: d.id()?,
            name: d.get(1)?,
            instance: d.get(2)?,
            client_id: d.get(3)?,
            labels: serde_json::from_str(labels)
                .map_err(|e| d.fault(4, format!("is not a JSON object of strings ({e})")))?,
            mode: d.parse::<Mode>(5)?,
            lifetime: d.seconds(6)?,
            absolute_lifetime: d.opt_seconds(7)?,
            secret_expires_at: d.time(8)?,
            grant_issued_at: d.time(9)?,
            refresh_token_issued_at: d.time(10)?,
            access_expires_at: d.time(11)?,
            deadline: d.time(12)?,
            deadline_source: d.opt_parse::<DeadlineSource>(13)?,
            next_refresh_at: d.time(14)?,
            last_refresh_at: d.time(15)?,
            last_error: d.get(16)?,
            state: d.parse::<State>(17)?,
        },
        failures: d.get::<i64>(18)?.clamp(0, u32::MAX as i64) as u32,
        failing_since: d.time(19)?,
        outcome_unknown: d.get::<i64>(20)? != 0,
        has_client_secret: d.get(21)?,
        has_refresh_token: d.get(22)?,
        has_access_token: d.get(23)?,
        token_type: d.get(24)?,
        access_lifetime: d.opt_seconds(25)?,
        claim: d.claim(26)?,
        version: d.get(28)?,
        change_seq: d.get(29)?,
    })
}

/// [`decode`] for rusqlite's row mappers: a fault becomes a conversion error
/// carrying its description. Reads that can set a row aside use [`decode`].
pub(super) fn from_row(r: &Row<'_>) -> rusqlite::Result<ConnectionRow> {
    decode(r).map_err(|f| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            f.to_string().into(),
        )
    })
}

/// One row by a `WHERE` clause on a single parameter: `Ok(None)` when no row
/// matches, [`StoreError::Corrupt`] naming the column when it does not decode.
fn one_row(
    db: &rusqlite::Connection,
    filter: &str,
    param: &dyn rusqlite::ToSql,
) -> Result<Option<ConnectionRow>, StoreError> {
    let mut stmt =
        db.prepare_cached(&format!("SELECT {COLUMNS} FROM connections WHERE {filter}"))?;
    let mut rows = stmt.query([param])?;
    match rows.next()? {
        None => Ok(None),
        Some(r) => decode(r)
            .map(Some)
            .map_err(|f| StoreError::Corrupt(f.to_string())),
    }
}

/// The select list of [`Store::each_for_planning`].
const PLANNING_COLUMNS: &str = "id, instance, mode, lifetime_s, absolute_lifetime_s,
    secret_expires_at, grant_issued_at, refresh_token_issued_at, access_expires_at, deadline,
    deadline_source, next_refresh_at, last_refresh_at, state, failures, failing_since,
    outcome_unknown, claim_owner, claim_expires_at, version, change_seq, name, client_id,
    labels, last_error, rowid";

/// See [`Store::each_for_planning`]. The checks are those of [`decode`]:
/// a row that plans also reads whole. Name, client ID, labels and last
/// error are checked but not kept (borrowed, so a million rows allocate
/// only their labels' small maps).
fn planning_row(r: &Row<'_>) -> Result<ConnectionRow, Fault> {
    let d = Decoder {
        r,
        rowid_at: 25,
        select: PLANNING_COLUMNS,
    };
    d.text(21)?;
    d.text(22)?;
    let labels = d.text(23)?;
    serde_json::from_str::<BTreeMap<std::borrow::Cow<'_, str>, std::borrow::Cow<'_, str>>>(labels)
        .map_err(|e| d.fault(23, format!("is not a JSON object of strings ({e})")))?;
    if !matches!(r.get_ref(24), Ok(rusqlite::types::ValueRef::Null)) {
        d.text(24)?;
    }
    Ok(ConnectionRow {
        conn: Connection {
            id: d.id()?,
            name: String::new(),
            instance: d.get(1)?,
            client_id: String::new(),
            labels: BTreeMap::new(),
            mode: d.parse::<Mode>(2)?,
            lifetime: d.seconds(3)?,
            absolute_lifetime: d.opt_seconds(4)?,
            secret_expires_at: d.time(5)?,
            grant_issued_at: d.time(6)?,
            refresh_token_issued_at: d.time(7)?,
            access_expires_at: d.time(8)?,
            deadline: d.time(9)?,
            deadline_source: d.opt_parse::<DeadlineSource>(10)?,
            next_refresh_at: d.time(11)?,
            last_refresh_at: d.time(12)?,
            last_error: None,
            state: d.parse::<State>(13)?,
        },
        failures: d.get::<i64>(14)?.clamp(0, u32::MAX as i64) as u32,
        failing_since: d.time(15)?,
        outcome_unknown: d.get::<i64>(16)? != 0,
        has_client_secret: false,
        has_refresh_token: false,
        has_access_token: false,
        token_type: None,
        access_lifetime: None,
        claim: d.claim(17)?,
        version: d.get(19)?,
        change_seq: d.get(20)?,
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
    update(tx, row, Fields::All)
}

/// Writes back only the columns a refresh owns (times, plan, state, failure
/// bookkeeping, token type), bumping version and change sequence. What an
/// operator or the customer sets is never written from a refresh: a save
/// cannot undo an edit that landed while its request was in flight.
pub fn put_refresh(tx: &Transaction<'_>, row: &ConnectionRow) -> Result<(), StoreError> {
    update(tx, row, Fields::RefreshOwned)
}

/// Which columns an [`update`] writes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fields {
    All,
    RefreshOwned,
}

fn update(tx: &Transaction<'_>, row: &ConnectionRow, fields: Fields) -> Result<(), StoreError> {
    // The refresh-owned columns are ?2..=?15; an operator's follow from ?16.
    const OWNED: &str = "refresh_token_issued_at = ?2, access_expires_at = ?3, deadline = ?4,
        deadline_source = ?5, next_refresh_at = ?6, last_refresh_at = ?7, last_error = ?8,
        state = ?9, failures = ?10, failing_since = ?11, outcome_unknown = ?12,
        token_type = ?13, access_lifetime_s = ?14, version = version + 1, change_seq = ?15";
    const OPERATOR: &str = ", instance = ?16, client_id = ?17, labels = ?18, mode = ?19,
        lifetime_s = ?20, absolute_lifetime_s = ?21, secret_expires_at = ?22,
        grant_issued_at = ?23";
    let c = &row.conn;
    let seq = next_seq(tx)?;
    let id = c.id.to_string();
    let (failures, unknown) = (row.failures as i64, row.outcome_unknown as i64);
    let mut values: Vec<Box<dyn rusqlite::ToSql + '_>> = vec![
        Box::new(id),
        Box::new(c.refresh_token_issued_at.map(to_ms)),
        Box::new(c.access_expires_at.map(to_ms)),
        Box::new(c.deadline.map(to_ms)),
        Box::new(c.deadline_source.map(|s| s.as_str())),
        Box::new(c.next_refresh_at.map(to_ms)),
        Box::new(c.last_refresh_at.map(to_ms)),
        Box::new(&c.last_error),
        Box::new(c.state.as_str()),
        Box::new(failures),
        Box::new(row.failing_since.map(to_ms)),
        Box::new(unknown),
        Box::new(&row.token_type),
        Box::new(row.access_lifetime.map(secs_i64)),
        Box::new(seq),
    ];
    let sql = if fields == Fields::All {
        values.extend([
            Box::new(&c.instance) as Box<dyn rusqlite::ToSql>,
            Box::new(&c.client_id),
            Box::new(labels_json(&c.labels)),
            Box::new(c.mode.as_str()),
            Box::new(secs_i64(c.lifetime)),
            Box::new(c.absolute_lifetime.map(secs_i64)),
            Box::new(c.secret_expires_at.map(to_ms)),
            Box::new(c.grant_issued_at.map(to_ms)),
        ]);
        format!("UPDATE connections SET {OWNED}{OPERATOR} WHERE id = ?1")
    } else {
        format!("UPDATE connections SET {OWNED} WHERE id = ?1")
    };
    let n = tx
        .prepare_cached(&sql)?
        .execute(rusqlite::params_from_iter(values.iter().map(|v| &**v)))?;
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
    db: &rusqlite::Connection,
    id: Uuid,
) -> Result<Option<Result<ConnectionRow, Fault>>, StoreError> {
    let mut stmt =
        db.prepare_cached(&format!("SELECT {COLUMNS} FROM connections WHERE id = ?1"))?;
    let mut rows = stmt.query([id.to_string()])?;
    Ok(rows.next()?.map(decode))
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

/// Removes the connection named `name` whose row does not read (hand-edited
/// or damaged), with its history and authorizations, and resolves the
/// `connection_faulty` alert filed under it. Returns whether a row went.
pub fn remove_unreadable(
    tx: &Transaction<'_>,
    name: &str,
    now: Timestamp,
) -> Result<bool, StoreError> {
    let key: Option<String> = tx
        .query_row(
            "SELECT CAST(id AS TEXT) FROM connections WHERE name = ?1",
            [name],
            |r| r.get(0),
        )
        .optional()?;
    let Some(key) = key else {
        return Ok(false);
    };
    let seq = next_seq(tx)?;
    tx.execute("DELETE FROM connections WHERE name = ?1", [name])?;
    tx.execute("DELETE FROM events WHERE connection_id = ?1", [&key])?;
    tx.execute(
        "DELETE FROM authorizations WHERE connection_id = ?1",
        [&key],
    )?;
    if let Ok(id) = Uuid::parse_str(&key) {
        super::alerts::remove_connection(tx, id, now)?;
        tx.execute(
            "INSERT OR REPLACE INTO tombstones (id, change_seq) VALUES (?1, ?2)",
            params![id.to_string(), seq],
        )?;
    }
    super::alerts::resolve_faulty(tx, &key, now)?;
    Ok(true)
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
        Ok(rows.next()?.map(decode))
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
        let mut rows = stmt.query([])?;
        let (mut ok, mut faults) = (Vec::new(), Vec::new());
        while let Some(r) = rows.next()? {
            match decode(r) {
                Ok(row) => ok.push(row),
                Err(f) => faults.push(f),
            }
        }
        Ok((ok, faults))
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
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            match planning_row(r) {
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
                match decode(r) {
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
        let mut rows = stmt.query([])?;
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

    /// One step of a re-sealing pass (key rotation): reads the next `rows`
    /// connections after `cursor` in storage order and re-seals, in one short
    /// write transaction, each of their values sealed under a key other than
    /// the primary. The cursor moves past them, so a pass over a million rows
    /// reads each row once and no step holds the write lock longer than its
    /// `rows` take; the step that ends the pass also re-seals the (few) open
    /// authorization links. Rows written behind the cursor meanwhile are
    /// sealed under the primary already, unless a process still holding an
    /// old keyring wrote them: the caller runs passes until one re-seals
    /// nothing.
    pub fn reseal_step(
        &mut self,
        cursor: &mut ResealCursor,
        rows: usize,
    ) -> Result<usize, StoreError> {
        let primary = self.keyring.current().primary().id().to_string();
        let after = cursor.after;
        let (done, last, seen) = self.write(|tx, kr| {
            let mut todo = Vec::new();
            let mut last = after;
            let mut seen = 0usize;
            {
                let mut stmt = tx.prepare_cached(
                    "SELECT rowid, id, client_secret, refresh_token, access_token
                     FROM connections WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
                )?;
                let mut q = stmt.query(params![after, rows as i64])?;
                while let Some(r) = q.next()? {
                    seen += 1;
                    last = r.get(0)?;
                    let id: String = r.get(1)?;
                    for (i, col) in [
                        SecretColumn::ClientSecret,
                        SecretColumn::RefreshToken,
                        SecretColumn::AccessToken,
                    ]
                    .into_iter()
                    .enumerate()
                    {
                        let v: Option<Vec<u8>> = r.get(i + 2)?;
                        if let Some(v) = v
                            && crate::crypto::sealed_key_id(&v) != Some(primary.as_str())
                        {
                            todo.push((id.clone(), col, v));
                        }
                    }
                }
            }
            let mut done = 0;
            for (id_s, col, sealed) in todo {
                let id = Uuid::parse_str(&id_s)
                    .map_err(|_| StoreError::Corrupt(format!("connection id {id_s}")))?;
                let plain = kr.open(id, col.as_str(), &sealed)?;
                let resealed = kr.seal(id, col.as_str(), &plain);
                let sql = format!("UPDATE connections SET {} = ?2 WHERE id = ?1", col.as_str());
                tx.prepare_cached(&sql)?.execute(params![id_s, resealed])?;
                done += 1;
            }
            if seen < rows {
                done += super::authorizations::reseal(tx, kr, &primary, usize::MAX)?;
            }
            Ok((done, last, seen))
        })?;
        cursor.after = last;
        cursor.resealed += done as u64;
        if seen < rows {
            cursor.finished = true;
        }
        Ok(done)
    }

    /// Runs re-sealing passes ([`Store::reseal_step`]) until one finds
    /// nothing left to re-seal; `progress` is told the running total after
    /// each step. Returns how many values were re-sealed.
    pub fn reseal_all(
        &mut self,
        rows: usize,
        mut progress: impl FnMut(u64),
    ) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let mut cursor = ResealCursor::default();
            while !cursor.finished {
                self.reseal_step(&mut cursor, rows)?;
                progress(total + cursor.resealed);
            }
            total += cursor.resealed;
            if cursor.resealed == 0 {
                return Ok(total);
            }
        }
    }
}

/// Where a re-sealing pass over the connections is ([`Store::reseal_step`]).
#[derive(Debug, Default, Clone)]
pub struct ResealCursor {
    /// The last rowid read.
    after: i64,
    /// Values re-sealed so far in this pass.
    pub resealed: u64,
    /// True once the pass has read the last row.
    pub finished: bool,
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
fn decoded(mut q: rusqlite::Rows<'_>) -> Result<Vec<ConnectionRow>, StoreError> {
    let mut out = Vec::new();
    while let Some(r) = q.next()? {
        if let Ok(row) = decode(r) {
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
            [],
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Key;
    use crate::store::Create;

    #[test]
    fn faults_name_columns_from_the_select_lists() {
        assert_eq!(column_at(COLUMNS, 0), Some("id"));
        assert_eq!(column_at(COLUMNS, 17), Some("state"));
        assert_eq!(column_at(COLUMNS, 21), Some("client_secret"));
        assert_eq!(column_at(COLUMNS, 30), Some("rowid"), "decode's rowid_at");
        assert_eq!(column_at(PLANNING_COLUMNS, 13), Some("state"));
        assert_eq!(column_at(PLANNING_COLUMNS, 23), Some("labels"));
        assert_eq!(
            column_at(PLANNING_COLUMNS, 25),
            Some("rowid"),
            "planning_row's rowid_at"
        );
        assert_eq!(column_at(COLUMNS, 31), None);
    }

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

    /// Two handles on one shared keyring: switching it through one switches
    /// the other at once; stepping passes re-seal every value, a step at a
    /// time; the new key alone then opens everything.
    #[test]
    fn a_shared_keyring_switches_every_handle_and_passes_reseal_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acutoken.db");
        let old = Key::generate();
        let shared = crate::store::SharedKeyring::new(Keyring::new(old.clone(), vec![]));
        let mut engine = Store::open_shared(&path, &shared, Create::Yes).unwrap();
        let reads = Store::open_shared(&path, &shared, Create::No).unwrap();
        let news: Vec<NewConnection> = (0..25).map(new_connection).collect();
        let now = chrono::Utc::now();
        engine
            .write(|tx, kr| insert_many(tx, kr, &news, now))
            .unwrap();

        let new = Key::generate();
        engine.register_key(&new).unwrap();
        engine.set_keyring(Keyring::new(new.clone(), vec![old.clone()]));
        assert_eq!(reads.keyring().primary().id(), new.id());
        // A value written through the other handle now seals under the new key.
        let id = news[0].conn.id;
        let mut writer = Store::open_shared(&path, reads.shared_keyring(), Create::No).unwrap();
        writer
            .write(|tx, kr| {
                set_secret(
                    tx,
                    kr,
                    id,
                    SecretColumn::RefreshToken,
                    Some(&Secret::new("fresh".to_string())),
                )
            })
            .unwrap();

        let mut cursor = ResealCursor::default();
        let mut steps = 0;
        while !cursor.finished {
            engine.reseal_step(&mut cursor, 10).unwrap();
            steps += 1;
        }
        assert_eq!(steps, 3, "25 rows, 10 a step");
        // 25 client secrets, 13 refresh tokens less the one already re-sealed.
        assert_eq!(cursor.resealed, 25 + 13 - 1);
        assert_eq!(engine.reseal_all(10, |_| {}).unwrap(), 0);
        engine.retire_keys_except(&new).unwrap();

        let alone = Store::open(&path, Keyring::new(new.clone(), vec![]), Create::No).unwrap();
        for n in &news {
            assert_eq!(
                alone
                    .secret(n.conn.id, SecretColumn::ClientSecret)
                    .unwrap()
                    .unwrap()
                    .expose(),
                n.client_secret.as_ref().unwrap().expose()
            );
        }
        assert_eq!(
            alone
                .secret(id, SecretColumn::RefreshToken)
                .unwrap()
                .unwrap()
                .expose(),
            "fresh"
        );
        let err = Store::open(&path, Keyring::new(old, vec![]), Create::No).unwrap_err();
        assert!(matches!(err, StoreError::RetiredKey { .. }), "{err}");
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
