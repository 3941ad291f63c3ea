//! Authorization links (DESIGN §7): one open per connection, state stored hashed.

use rusqlite::params;

use crate::store::sql::{OptionalExtension, Transaction};
use uuid::Uuid;

use super::connections::{self, SecretColumn};
use super::refresh::DesiredAlerts;
use super::{Store, StoreError, StoreHandle, claims, events, from_ms, to_ms};
use crate::crypto::Keyring;
use crate::model::{ConnectionRow, State, Timestamp, fmt_time};
use crate::secret::Secret;

const VERIFIER: &str = "pkce_verifier";
const URL: &str = "authorize_url";

/// An open authorization link.
#[derive(Debug, Clone, PartialEq)]
pub struct Authorization {
    pub url: Secret,
    pub expires_at: Timestamp,
}

/// What a callback's state refers to.
#[derive(Debug)]
pub enum CallbackLookup {
    /// No such state: unknown or tampered.
    Unknown,
    /// The link was replaced or timed out.
    Expired,
    /// Already used to connect.
    Used { connection: Uuid },
    /// Open: exchange the code with this verifier.
    Open {
        connection: Uuid,
        verifier: Secret,
        redirect_uri: String,
    },
}

/// Creates the connection's open authorization, replacing (invalidating) any other.
/// Returns how many older open links stopped working.
#[allow(clippy::too_many_arguments)]
pub fn create(
    tx: &Transaction<'_>,
    keyring: &Keyring,
    connection: Uuid,
    state_hash: &str,
    verifier: &Secret,
    redirect_uri: &str,
    url: &Secret,
    now: Timestamp,
    expires_at: Timestamp,
) -> Result<usize, StoreError> {
    let replaced = tx.execute(
        "DELETE FROM authorizations WHERE connection_id = ?1 AND used_at IS NULL AND expires_at > ?2",
        params![connection.to_string(), to_ms(now)],
    )?;
    tx.execute(
        "DELETE FROM authorizations WHERE connection_id = ?1 AND used_at IS NULL",
        [connection.to_string()],
    )?;
    tx.execute(
        "INSERT INTO authorizations (state_hash, connection_id, pkce_verifier, redirect_uri, url, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            state_hash,
            connection.to_string(),
            keyring.seal_secret(connection, VERIFIER, verifier),
            redirect_uri,
            keyring.seal_secret(connection, URL, url),
            to_ms(now),
            to_ms(expires_at),
        ],
    )?;
    Ok(replaced)
}

/// Marks a state used; false when it was not open (raced with another visit).
pub fn mark_used(
    tx: &Transaction<'_>,
    state_hash: &str,
    now: Timestamp,
) -> Result<bool, StoreError> {
    Ok(tx.execute(
        "UPDATE authorizations SET used_at = ?2 WHERE state_hash = ?1 AND used_at IS NULL",
        params![state_hash, to_ms(now)],
    )? == 1)
}

/// Drops every open link of a connection (its instance or client changed,
/// it was disabled or removed); returns how many were open.
pub fn close_all(tx: &Transaction<'_>, connection: Uuid) -> Result<usize, StoreError> {
    Ok(tx.execute(
        "DELETE FROM authorizations WHERE connection_id = ?1 AND used_at IS NULL",
        [connection.to_string()],
    )?)
}

/// The connection's open authorization link, if any (the newest), read
/// with `db`: the store's connection or the caller's transaction, so a
/// caller can look and open one in the same transaction.
pub fn open(
    db: &crate::store::sql::Db,
    keyring: &Keyring,
    connection: Uuid,
    now: Timestamp,
) -> Result<Option<Authorization>, StoreError> {
    let row: Option<(Vec<u8>, i64)> = db
        .query_row(
            "SELECT url, expires_at FROM authorizations
             WHERE connection_id = ?1 AND used_at IS NULL AND expires_at > ?2
             ORDER BY created_at DESC LIMIT 1",
            params![connection.to_string(), to_ms(now)],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    row.map(|(u, e)| {
        Ok(Authorization {
            url: keyring.open_secret(connection, URL, &u)?,
            expires_at: from_ms(e),
        })
    })
    .transpose()
}

pub(super) fn reseal(
    tx: &Transaction<'_>,
    keyring: &Keyring,
    primary: &str,
    batch: usize,
) -> Result<usize, StoreError> {
    let mut todo = Vec::new();
    {
        let mut stmt =
            tx.prepare("SELECT state_hash, connection_id, pkce_verifier, url FROM authorizations")?;
        let mut rows = stmt.query(())?;
        while let Some(r) = rows.next()? {
            if todo.len() >= batch {
                break;
            }
            let v: Vec<u8> = r.get(2)?;
            let u: Vec<u8> = r.get(3)?;
            if crate::crypto::sealed_key_id(&v) != Some(primary)
                || crate::crypto::sealed_key_id(&u) != Some(primary)
            {
                todo.push((r.get::<_, String>(0)?, r.get::<_, String>(1)?, v, u));
            }
        }
    }
    let n = todo.len();
    for (hash, conn, v, u) in todo {
        let id = Uuid::parse_str(&conn)
            .map_err(|_| StoreError::Corrupt(format!("connection id {conn}")))?;
        let v2 = keyring.seal(id, VERIFIER, &keyring.open(id, VERIFIER, &v)?);
        let u2 = keyring.seal(id, URL, &keyring.open(id, URL, &u)?);
        tx.execute(
            "UPDATE authorizations SET pkce_verifier = ?2, url = ?3 WHERE state_hash = ?1",
            params![hash, v2, u2],
        )?;
    }
    Ok(n)
}

impl Store {
    /// The connection's open authorization link, if any.
    pub fn open_authorization(
        &self,
        connection: Uuid,
        now: Timestamp,
    ) -> Result<Option<Authorization>, StoreError> {
        open(&self.db, &self.keyring(), connection, now)
    }

    /// Looks up a callback's hashed state.
    pub fn lookup_state(
        &self,
        state_hash: &str,
        now: Timestamp,
    ) -> Result<CallbackLookup, StoreError> {
        type StateRow = (String, Vec<u8>, String, i64, Option<i64>);
        let row: Option<StateRow> = self
            .db
            .query_row(
                "SELECT connection_id, pkce_verifier, redirect_uri, expires_at, used_at
                 FROM authorizations WHERE state_hash = ?1",
                [state_hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()?;
        let Some((conn, verifier, redirect_uri, expires, used)) = row else {
            return Ok(CallbackLookup::Unknown);
        };
        let connection = Uuid::parse_str(&conn)
            .map_err(|_| StoreError::Corrupt(format!("connection id {conn}")))?;
        if used.is_some() {
            return Ok(CallbackLookup::Used { connection });
        }
        if from_ms(expires) <= now {
            return Ok(CallbackLookup::Expired);
        }
        Ok(CallbackLookup::Open {
            connection,
            verifier: self.keyring.open_secret(connection, VERIFIER, &verifier)?,
            redirect_uri,
        })
    }
}

/// What storing a customer's grant came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantStored {
    /// Stored: the connection holds the new grant.
    Granted,
    /// The link was used already, or the connection is gone: nothing changed.
    AlreadyUsed,
    /// Disabled while the code was exchanged: the grant is dropped.
    Disabled,
}

/// A link to open: everything but the connection and the times is the caller's.
#[derive(Debug)]
pub struct NewAuthorization {
    pub connection: Uuid,
    pub state_hash: String,
    pub verifier: Secret,
    pub redirect_uri: String,
    pub url: Secret,
}

impl StoreHandle {
    /// Opens an authorization link for a connection (replacing an open one),
    /// with its history line; returns how many open links it replaced.
    pub async fn open_link(
        &self,
        link: NewAuthorization,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<usize, StoreError> {
        self.write(move |tx, kr| {
            let l = &link;
            let n = create(
                tx,
                kr,
                l.connection,
                &l.state_hash,
                &l.verifier,
                &l.redirect_uri,
                &l.url,
                now,
                expires_at,
            )?;
            events::record(
                tx,
                l.connection,
                now,
                "authorize",
                &format!(
                    "authorization link created, valid until {}",
                    fmt_time(expires_at)
                ),
            )?;
            Ok(n)
        })
        .await
    }

    /// Stores the grant a customer's authorization gave, once per link:
    /// `grant` plans the row from it; any stale claim goes (nothing was sent
    /// with the new token).
    #[allow(clippy::too_many_arguments)]
    pub async fn store_grant(
        &self,
        id: Uuid,
        state_hash: String,
        refresh_token: Secret,
        access_token: Secret,
        grant: impl FnOnce(&mut ConnectionRow) + Send + 'static,
        now: Timestamp,
        desired: DesiredAlerts,
    ) -> Result<GrantStored, StoreError> {
        self.write(move |tx, kr| {
            let Some(mut row) = connections::get_by_id_tx(tx, id)? else {
                return Ok(GrantStored::AlreadyUsed);
            };
            // Disabled while the code was being exchanged (which also closed
            // the link): the grant is dropped and the connection stays off.
            if row.conn.state == State::Disabled {
                return Ok(GrantStored::Disabled);
            }
            if !mark_used(tx, &state_hash, now)? {
                return Ok(GrantStored::AlreadyUsed);
            }
            grant(&mut row);
            connections::put(tx, &row)?;
            connections::set_secret(tx, kr, id, SecretColumn::RefreshToken, Some(&refresh_token))?;
            connections::set_secret(tx, kr, id, SecretColumn::AccessToken, Some(&access_token))?;
            claims::clear(tx, id, true)?;
            events::record(
                tx,
                id,
                now,
                "authorized",
                "the customer authorized; grant stored",
            )?;
            super::alerts::sync_connection(tx, &row, &desired(&row), now)?;
            Ok(GrantStored::Granted)
        })
        .await
    }
}
