//! The daemon's upkeep writes as the store offers them: alerts raised and
//! resolved outside a refresh (connections set aside, rows that do not
//! read, a refused reload, spilled tokens waiting for a human), what time
//! alone does to a row at a wake-up, and the alert sync at start. Each is
//! one write, durable when it returns, and the SQL stays here.
//!
//! As in [`super::refresh`], what a row calls for is decided above the
//! store: by a function over the row ([`DesiredAlerts`], the `settle` of
//! [`StoreHandle::apply_time`]) that runs inside the write on domain types.

use std::collections::HashSet;

use uuid::Uuid;

use super::refresh::DesiredAlerts;
use super::{Store, StoreError, StoreHandle, alerts, connections, events};
use crate::model::{AlertFacts, AlertKind, ConnectionRow, Fault, Timestamp};

/// A `connection_faulty` alert of a connection set aside (its row does not
/// read), keyed by what names the row (its id, or its rowid when the id
/// itself does not read).
#[derive(Debug)]
pub enum FaultyAlert {
    /// Raise it (kept, not repeated, while it fires).
    Raise { key: String, facts: AlertFacts },
    /// Resolve it: the row reads again, or is gone.
    Resolve { key: String },
}

/// What time alone did to a row at a wake-up, as the scheduler decided it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByTime {
    /// Its state changed (the client secret expired): the row is written,
    /// with a `state` history line.
    pub changed: bool,
    /// Nothing to write: a refresh is simply due, so its alert conditions
    /// are left to the refresh that follows.
    pub quiet: bool,
}

impl StoreHandle {
    /// Raises and resolves the `connection_faulty` alerts the scheduler owes
    /// for the connections it set aside, in one transaction, in order.
    pub async fn write_faulty_alerts(
        &self,
        ops: Vec<FaultyAlert>,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.write(move |tx, _| {
            for op in &ops {
                match op {
                    FaultyAlert::Raise { key, facts } => {
                        alerts::raise_faulty(tx, key, facts, now)?;
                    }
                    FaultyAlert::Resolve { key } => alerts::resolve_faulty(tx, key, now)?,
                }
            }
            Ok(())
        })
        .await
    }

    /// At a wake-up, applies what time alone decides to connection `id`:
    /// `settle` sees the row as it is in the write (never a copy read
    /// before, which a refresh may have overtaken) and changes it; a changed
    /// state is written with its history line, and unless the row is simply
    /// due for a refresh its alerts are brought in line with `desired`.
    /// Returns the row as it now stands (or that it is gone or does not read).
    pub async fn apply_time<F>(
        &self,
        id: Uuid,
        now: Timestamp,
        settle: F,
        desired: DesiredAlerts,
    ) -> Result<Option<Result<ConnectionRow, Fault>>, StoreError>
    where
        F: FnOnce(&mut ConnectionRow) -> ByTime + Send + 'static,
    {
        self.write(move |tx, _| {
            let mut row = match connections::read_by_id_tx(tx, id)? {
                Some(Ok(row)) => row,
                other => return Ok(other),
            };
            let settled = settle(&mut row);
            if settled.changed {
                connections::put(tx, &row)?;
                events::record(
                    tx,
                    id,
                    now,
                    "state",
                    &format!(
                        "{}: {}",
                        row.conn.state,
                        row.conn.last_error.clone().unwrap_or_default()
                    ),
                )?;
            }
            if !settled.quiet {
                alerts::sync_connection(tx, &row, &desired(&row), now)?;
            }
            Ok(Some(Ok(row)))
        })
        .await
    }

    /// Resolves the `connection_faulty` alert of connection `id`: a refresh
    /// of a connection set aside in an earlier run got through, so its row
    /// reads again.
    pub async fn resolve_faulty_alert(&self, id: Uuid, now: Timestamp) -> Result<(), StoreError> {
        self.write(move |tx, _| alerts::resolve_faulty(tx, &id.to_string(), now))
            .await
    }

    /// Brings the alerts of connections `ids` in line with `desired`, in one
    /// transaction (the caller chunks, so no write holds the lock long). A
    /// connection removed meanwhile, or changed into a row that does not
    /// read, is skipped: the scheduler's next look sets it aside.
    pub async fn sync_connection_alerts(
        &self,
        ids: Vec<Uuid>,
        now: Timestamp,
        desired: DesiredAlerts,
    ) -> Result<(), StoreError> {
        self.write(move |tx, _| {
            for id in ids {
                match connections::get_by_id_tx(tx, id) {
                    Ok(Some(row)) => alerts::sync_connection(tx, &row, &desired(&row), now)?,
                    Ok(None) | Err(StoreError::Corrupt(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
        .await
    }

    /// Makes the `connection_faulty` alerts of unreadable rows match
    /// `faults`, the rows that do not read now: one alert each (kept, not
    /// repeated, while it fires), and those fixed or removed while no daemon
    /// ran resolve.
    pub async fn set_unreadable_alerts(
        &self,
        faults: Vec<Fault>,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.write(move |tx, _| {
            let keys: HashSet<String> = faults.iter().map(|f| f.key.clone()).collect();
            alerts::resolve_unreadable_except(tx, &keys, now)?;
            for fault in &faults {
                alerts::raise_faulty(tx, &fault.key, &AlertFacts::row_unreadable(fault), now)?;
            }
            Ok(())
        })
        .await
    }

    /// Raises the alert `facts` describes, or updates the one of its kind
    /// and key that fires (a refused reload, say).
    pub async fn raise_alert(&self, facts: AlertFacts, now: Timestamp) -> Result<(), StoreError> {
        self.write(move |tx, _| alerts::raise(tx, &facts, now))
            .await
    }

    /// Resolves the alert of `kind` that is about no connection, if one
    /// fires (the condition behind it is gone: a reload went through, say).
    pub async fn resolve_global_alert(
        &self,
        kind: AlertKind,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.write(move |tx, _| alerts::resolve_global(tx, kind, now))
            .await
    }
}

impl Store {
    /// [`StoreHandle::raise_alert`] for a caller that holds the store itself
    /// (the daemon's start, before the group-commit writer runs).
    pub fn raise_alert(&mut self, facts: &AlertFacts, now: Timestamp) -> Result<(), StoreError> {
        self.write(|tx, _| alerts::raise(tx, facts, now))
    }

    /// [`StoreHandle::resolve_global_alert`] for a caller that holds the
    /// store itself.
    pub fn resolve_global_alert(
        &mut self,
        kind: AlertKind,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.write(|tx, _| alerts::resolve_global(tx, kind, now))
    }
}
