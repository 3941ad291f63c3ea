//! The edits an operator makes to a connection's record (add, set,
//! set-secret, enable, disable, remove) and the bulk insert of `import`, as
//! store operations: each is one write transaction with its history event,
//! and the SQL stays here.
//!
//! An edit is made by a function of this module ([`add`], [`change`], …)
//! and run by whichever store the caller holds: [`StoreHandle::edit`] in the
//! daemon's next batch, [`Store::edit`] on a one-shot command's own
//! connection. What an edit does to the row's plan is the renewal policy's
//! decision, so it comes in as a function over the row, run inside the write
//! on the row as it is then.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use crate::store::sql::Transaction;

use super::connections::{self, Sealed, SecretColumn};
use super::{Store, StoreError, StoreHandle, authorizations, claims, events};
use crate::crypto::Keyring;
use crate::model::{Connection, ConnectionRow, NewConnection, State, Timestamp};
use crate::secret::Secret;

type Run<T> = Box<dyn FnOnce(&Transaction<'_>, &Keyring) -> Result<T, StoreError> + Send>;

/// One edit of a connection, not yet written: run it with
/// [`StoreHandle::edit`] or [`Store::edit`].
pub struct Edit<T>(Run<T>);

impl<T> Edit<T> {
    fn new(
        f: impl FnOnce(&Transaction<'_>, &Keyring) -> Result<T, StoreError> + Send + 'static,
    ) -> Edit<T> {
        Edit(Box::new(f))
    }
}

impl StoreHandle {
    /// Writes `edit` in the next batch; returns once it is durable (or with
    /// its own error, nothing of it written).
    pub async fn edit<T: Send + 'static>(&self, edit: Edit<T>) -> Result<T, StoreError> {
        self.write(edit.0).await
    }
}

impl Store {
    /// Writes `edit` in a transaction of its own.
    pub fn edit<T>(&mut self, edit: Edit<T>) -> Result<T, StoreError> {
        self.write(edit.0)
    }
}

/// What [`change`]'s decision did to the row.
#[derive(Debug)]
pub struct Change {
    /// The fields that changed, named in the history line; none: nothing is written.
    pub fields: Vec<&'static str>,
    /// The grant was cleared (the instance or client ID changed, and the
    /// grant belongs to the old one): its tokens and open links go too.
    pub drop_grant: bool,
}

/// Stores a new connection with its secrets and its `added` history event
/// (`add`, `demo`); returns the connection.
pub fn add(new: NewConnection, now: Timestamp) -> Edit<Connection> {
    Edit::new(move |tx, kr| {
        connections::insert(tx, kr, &new, now)?;
        events::record(
            tx,
            new.conn.id,
            now,
            "added",
            &format!("state {}", new.conn.state),
        )?;
        Ok(new.conn)
    })
}

/// `set`: `decide` applies the operator's changes to the row named `name`
/// (and re-plans it); what changed is written with a `changed` history
/// event. Returns the row and the changed fields.
pub fn change(
    name: String,
    decide: impl FnOnce(&mut ConnectionRow) -> Change + Send + 'static,
    now: Timestamp,
) -> Edit<(ConnectionRow, Vec<&'static str>)> {
    Edit::new(move |tx, kr| {
        let mut row = connections::get_tx(tx, &name)?;
        let Change { fields, drop_grant } = decide(&mut row);
        if drop_grant {
            // The grant belongs to the old instance/application: it cannot be used here.
            connections::set_secret(tx, kr, row.conn.id, SecretColumn::RefreshToken, None)?;
            connections::set_secret(tx, kr, row.conn.id, SecretColumn::AccessToken, None)?;
            authorizations::close_all(tx, row.conn.id)?;
        }
        if !fields.is_empty() {
            connections::put(tx, &row)?;
            events::record(tx, row.conn.id, now, "changed", &fields.join(", "))?;
        }
        Ok((row, fields))
    })
}

/// `set-secret`: stores a new client secret for `name`; `plan` updates the
/// row for it (its Expires On, a new plan), written with a `secret_set`
/// history event. Returns the row.
pub fn set_client_secret(
    name: String,
    secret: Secret,
    plan: impl FnOnce(&mut ConnectionRow) + Send + 'static,
    now: Timestamp,
) -> Edit<ConnectionRow> {
    Edit::new(move |tx, kr| {
        let mut row = connections::get_tx(tx, &name)?;
        connections::set_secret(
            tx,
            kr,
            row.conn.id,
            SecretColumn::ClientSecret,
            Some(&secret),
        )?;
        plan(&mut row);
        connections::put(tx, &row)?;
        events::record(
            tx,
            row.conn.id,
            now,
            "secret_set",
            &format!("new client secret entered; state {}", row.conn.state),
        )?;
        Ok(row)
    })
}

/// `disable`: no refreshes, tokens or alerts for `name`; its open
/// authorization links are closed so a link sent earlier cannot bring it
/// back. Returns the row and how many links were closed.
pub fn disable(name: String, now: Timestamp) -> Edit<(ConnectionRow, usize)> {
    Edit::new(move |tx, _| {
        let mut row = connections::get_tx(tx, &name)?;
        if row.conn.state != State::Disabled {
            row.conn.state = State::Disabled;
            row.conn.next_refresh_at = None;
            connections::put(tx, &row)?;
            events::record(
                tx,
                row.conn.id,
                now,
                "disabled",
                "turned off by an operator",
            )?;
        }
        let closed = authorizations::close_all(tx, row.conn.id)?;
        if closed > 0 {
            events::record(
                tx,
                row.conn.id,
                now,
                "authorize",
                "open authorization links closed: the connection was disabled",
            )?;
        }
        Ok((row, closed))
    })
}

/// `enable`: a disabled connection `name` is planned again by `resume`,
/// with an `enabled` history event; any other is left as it is. Returns the row.
pub fn enable(
    name: String,
    resume: impl FnOnce(&mut ConnectionRow) + Send + 'static,
    now: Timestamp,
) -> Edit<ConnectionRow> {
    Edit::new(move |tx, _| {
        let mut row = connections::get_tx(tx, &name)?;
        if row.conn.state == State::Disabled {
            resume(&mut row);
            connections::put(tx, &row)?;
            events::record(
                tx,
                row.conn.id,
                now,
                "enabled",
                &format!("turned on; state {}", row.conn.state),
            )?;
        }
        Ok(row)
    })
}

/// `remove`: the connection `name`, its secrets and its open alerts, unless
/// a live claim holds it (a refresh in flight): then nothing is removed and
/// the claim's holder and end are returned.
pub fn remove(name: String, now: Timestamp) -> Edit<Option<(String, Timestamp)>> {
    Edit::new(move |tx, _| {
        let row = connections::get_tx(tx, &name)?;
        if let Some(claim) = claims::live_claim(&row, now) {
            return Ok(Some(claim));
        }
        super::alerts::remove_connection(tx, row.conn.id, now)?;
        connections::remove(tx, row.conn.id)?;
        Ok(None)
    })
}

/// `remove` of a row that does not read (nothing can refresh it); false
/// when there is no row named `name`.
pub fn remove_unreadable(name: String, now: Timestamp) -> Edit<bool> {
    Edit::new(move |tx, _| connections::remove_unreadable(tx, &name, now))
}

impl Store {
    /// `import`'s bulk insert: every connection of `chunks`, with its `added`
    /// history event, in one transaction. Each chunk is sealed on another
    /// thread while the one before is written, and written records are freed
    /// on a third (freeing a million of them takes over a second). Rolls back
    /// with [`StoreError::Cancelled`] once `abandon` is set (a bad record was
    /// found); `written` is told each chunk's size. Returns how many
    /// connections it wrote, and how many of them wait for authorization.
    pub fn import(
        &mut self,
        chunks: impl Iterator<Item = Vec<NewConnection>> + Send,
        abandon: &AtomicBool,
        mut written: impl FnMut(usize),
        now: Timestamp,
    ) -> Result<(usize, usize), StoreError> {
        self.write(|tx, kr| {
            std::thread::scope(|s| {
                let (sealed_tx, sealed_rx) =
                    mpsc::sync_channel::<(Vec<NewConnection>, Vec<Sealed>)>(4);
                s.spawn(move || {
                    for chunk in chunks {
                        let sealed = chunk.iter().map(|n| Sealed::new(kr, n)).collect();
                        if sealed_tx.send((chunk, sealed)).is_err() {
                            break; // the writer failed and rolls back
                        }
                    }
                });
                let (done_tx, done_rx) = mpsc::channel::<(Vec<NewConnection>, Vec<Sealed>)>();
                s.spawn(move || done_rx.into_iter().for_each(drop));
                let (mut total, mut pending) = (0, 0);
                for (chunk, sealed) in sealed_rx {
                    if abandon.load(Ordering::SeqCst) {
                        break;
                    }
                    let seq = connections::insert_sealed(tx, &chunk, &sealed, now)?;
                    events::record_for_change(tx, seq, now, "added", "imported; state ")?;
                    total += chunk.len();
                    pending += chunk
                        .iter()
                        .filter(|n| n.conn.state == State::PendingAuthorization)
                        .count();
                    written(chunk.len());
                    let _ = done_tx.send((chunk, sealed));
                }
                if abandon.load(Ordering::SeqCst) {
                    return Err(StoreError::Cancelled);
                }
                Ok((total, pending))
            })
        })
    }
}
