//! Writing connection rows: inserts (one, or many in multi-row statements),
//! updates (every field, or only those a refresh owns), sealed secrets, and
//! removal with the history, links and tombstone that go with it.

use std::collections::BTreeMap;
use std::time::Duration;

use rusqlite::params;

use crate::store::sql::{OptionalExtension, Transaction};
use uuid::Uuid;

use super::SecretColumn;
use crate::crypto::Keyring;
use crate::model::{ConnectionRow, NewConnection, Timestamp};
use crate::secret::Secret;
use crate::store::{StoreError, next_seq, to_ms};

/// Seconds for an INTEGER column; a duration past `i64::MAX` seconds is
/// stored as that (a cast would wrap it negative and read back as 0).
pub(super) fn secs_i64(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

pub(super) fn labels_json(labels: &BTreeMap<String, String>) -> String {
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
pub(super) const BULK_ROWS: usize = 50;

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
    if tx.engine() == crate::store::sql::Engine::Postgres {
        copy_sealed(tx, news, sealed, now, seq)?;
        return Ok(seq);
    }
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
                Err(e) if e.is_unique_violation() => {
                    // SQLite ended the transaction (`OR ROLLBACK`);
                    // PostgreSQL aborted it and answers nothing else until
                    // it is rolled back.
                    tx.roll_back_now();
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

/// [`insert_sealed`] on PostgreSQL: `COPY` in chunks, one round trip each.
fn copy_sealed(
    tx: &Transaction<'_>,
    news: &[NewConnection],
    sealed: &[Sealed],
    now: Timestamp,
    seq: i64,
) -> Result<(), StoreError> {
    const ROWS: usize = 5000;
    let list = INSERT_COLUMNS
        .split_once('(')
        .and_then(|(_, rest)| rest.split_once(')'))
        .map_or("", |(cols, _)| cols);
    let columns: Vec<&str> = list.split(',').map(str::trim).collect();
    debug_assert_eq!(columns.len(), INSERT_PARAMS);
    for (rows, seals) in news.chunks(ROWS).zip(sealed.chunks(ROWS)) {
        let mut values = Vec::with_capacity(rows.len() * INSERT_PARAMS);
        for (new, sealed) in rows.iter().zip(seals) {
            with_values(new, sealed, now, seq, |row| {
                for v in row {
                    values.push(crate::store::sql::owned(*v)?);
                }
                Ok::<_, StoreError>(())
            })?;
        }
        match tx.copy_in("connections", &columns, &values) {
            Ok(_) => {}
            Err(e) if e.is_unique_violation() => {
                // PostgreSQL aborted the transaction: outside it, the store
                // shows which name another writer took meanwhile.
                tx.roll_back_now();
                let mut exists = tx.prepare("SELECT 1 FROM connections WHERE name = ?1")?;
                for new in news {
                    if exists.exists([&new.conn.name])? {
                        return Err(StoreError::DuplicateName(new.conn.name.clone()));
                    }
                }
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
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
        Err(e) if e.is_unique_violation() => Err(StoreError::DuplicateName(new.conn.name.clone())),
        Err(e) => Err(e.into()),
    }
}

/// Binds one new row's values to parameters `base + 1 ..= base + 19`.
fn bind_new(
    stmt: &mut crate::store::sql::Statement<'_>,
    base: usize,
    new: &NewConnection,
    sealed: &Sealed,
    now: Timestamp,
    seq: i64,
) -> Result<(), StoreError> {
    with_values(new, sealed, now, seq, |values| {
        for (i, v) in values.iter().enumerate() {
            stmt.raw_bind_parameter(base + i + 1, *v)?;
        }
        Ok(())
    })
}

/// Calls `f` with one new row's values, in the order of [`INSERT_COLUMNS`]
/// (borrowed: the import binds them straight from the row).
fn with_values<T>(
    new: &NewConnection,
    sealed: &Sealed,
    now: Timestamp,
    seq: i64,
    f: impl FnOnce(&[&dyn rusqlite::ToSql; INSERT_PARAMS]) -> T,
) -> T {
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
    f(&values)
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
        .execute(values.iter().map(|v| &**v).collect::<Vec<_>>())?;
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
        "INSERT INTO tombstones (id, change_seq) VALUES (?1, ?2)
         ON CONFLICT (id) DO UPDATE SET change_seq = excluded.change_seq",
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
        crate::store::alerts::remove_connection(tx, id, now)?;
        tx.execute(
            "INSERT INTO tombstones (id, change_seq) VALUES (?1, ?2)
         ON CONFLICT (id) DO UPDATE SET change_seq = excluded.change_seq",
            params![id.to_string(), seq],
        )?;
    }
    crate::store::alerts::resolve_faulty(tx, &key, now)?;
    Ok(true)
}
