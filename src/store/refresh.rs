//! The refresh path as the store offers it to the engine: claim a
//! connection for one token request, then settle the claim with what the
//! request came to. Each is one write of the group-commit writer, durable
//! when it returns, and the SQL stays here.
//!
//! The engine decides and the store records. What the outcome does to a row
//! is the engine's policy, so a settlement is decided by a function of the
//! row as it is at save time ([`Found`]). It runs inside the write, on domain
//! types only, and returns a [`Settlement`] that the store then writes. The
//! alerts a row calls for are decided the same way ([`DesiredAlerts`]),
//! because alert conditions sit above the store.

use std::time::Duration;

use crate::store::sql::{OptionalExtension, Transaction};
use uuid::Uuid;

use super::claims::{self, Basis, ClaimOutcome, Found, Owner, RefreshSave, Trigger};
use super::connections::SecretColumn;
use super::{Store, StoreError, StoreHandle, alerts, connections, events};
use crate::crypto::Keyring;
use crate::model::{AlertFacts, Connection, ConnectionRow, Timestamp};
use crate::secret::Secret;

/// The alerts that should fire for a row now (`renewal::alert_conditions::desired`
/// with the policy in force).
pub type DesiredAlerts = Box<dyn Fn(&ConnectionRow) -> Vec<AlertFacts> + Send>;

/// What a finished request does to its connection, decided from [`Found`].
#[derive(Debug)]
pub enum Settlement {
    /// The connection is gone: nothing to write.
    Removed,
    /// The outcome does not apply (overtaken by a newer grant, or a refusal
    /// of a secret replaced meanwhile): the claim is released, history says
    /// why. `replan`: the row's refresh plan is written first (only the
    /// columns a refresh owns).
    Discard {
        row: Box<ConnectionRow>,
        why: String,
        replan: bool,
    },
    /// The outcome applies: `row` is the row as found with it applied.
    Finish {
        row: Box<ConnectionRow>,
        /// The claim was still this attempt's.
        ours: bool,
        /// The new refresh token, when the server rotated it.
        refresh_token: Option<Secret>,
        /// The new access token, after a success.
        access_token: Option<Secret>,
        /// The history event (`refreshed`, `refresh_failed`, …) and its detail.
        event: &'static str,
        detail: String,
        /// A `state` history event to add (the state the outcome led to).
        state_event: Option<String>,
    },
}

/// What a settlement came to, for the engine's report.
#[derive(Debug)]
pub enum Settled {
    /// Written: the row as saved, and the detail.
    Applied(Box<ConnectionRow>, String),
    /// Released without applying: the row as it is, and why.
    Discarded(Box<ConnectionRow>, String),
    /// The connection was removed while the request was in flight.
    Removed,
}

impl StoreHandle {
    /// Claims connection `id` for one token request; durable before it
    /// returns, so the request may be sent (invariant 1). A claim that finds
    /// the token lost raises the alerts `desired` gives for the row.
    /// `replica`: see [`claims::claim_within`].
    #[allow(clippy::too_many_arguments)]
    pub async fn claim(
        &self,
        id: Uuid,
        owner: Owner,
        ttl: Duration,
        trigger: Trigger,
        replica: Option<claims::AsReplica>,
        now: Timestamp,
        desired: DesiredAlerts,
    ) -> Result<ClaimOutcome, StoreError> {
        self.write(move |tx, kr| {
            let out = claims::claim_within(tx, kr, id, &owner, ttl, trigger, replica, now)?;
            if let ClaimOutcome::Lost(row) = &out {
                alerts::sync_connection(tx, row, &desired(row), now)?;
            }
            Ok(out)
        })
        .await
    }

    /// Settles the claim `basis` names with what the request came to:
    /// `decide` sees the row as it is now and says what to write. Only the
    /// columns a refresh owns are written; a rotated token is durable before
    /// this returns (invariant 2).
    pub async fn settle<F>(
        &self,
        basis: Basis,
        now: Timestamp,
        decide: F,
        desired: DesiredAlerts,
    ) -> Result<Settled, StoreError>
    where
        F: FnOnce(Found) -> Settlement + Send + 'static,
    {
        self.write(
            move |tx, kr| match decide(claims::reread(tx, kr, &basis)?) {
                Settlement::Removed => Ok(Settled::Removed),
                Settlement::Discard { row, why, replan } => {
                    if replan {
                        connections::put_refresh(tx, &row)?;
                    }
                    claims::discard(tx, &basis, &why, now)?;
                    Ok(Settled::Discarded(row, why))
                }
                Settlement::Finish {
                    row,
                    ours,
                    refresh_token,
                    access_token,
                    event,
                    detail,
                    state_event,
                } => {
                    let save = RefreshSave {
                        row: &row,
                        refresh_token: refresh_token.as_ref(),
                        access_token: access_token.as_ref(),
                        event,
                        detail: &detail,
                    };
                    claims::finish(tx, kr, &basis, &save, ours, now)?;
                    alerts::sync_connection(tx, &row, &desired(&row), now)?;
                    if let Some(state) = state_event {
                        events::record(tx, row.conn.id, now, "state", &state)?;
                    }
                    Ok(Settled::Applied(row, detail))
                }
            },
        )
        .await
    }
}

/// A rotated token a process spilled because the store would not take it,
/// opened: what the next start lands (`renewal::spill`).
#[derive(Debug)]
pub struct SpilledToken {
    /// The claim it was obtained under.
    pub attempt: Uuid,
    /// The connection as the refresh left it.
    pub conn: Connection,
    pub token_type: Option<String>,
    pub access_lifetime: Option<Duration>,
    /// The new refresh token, when the server rotated it.
    pub refresh_token: Option<Secret>,
    pub access_token: Secret,
}

impl Store {
    /// Lands a spilled outcome if the connection still carries the claim it
    /// was made under (nothing newer was saved since); returns whether it did.
    pub fn land_spilled(&mut self, t: &SpilledToken, now: Timestamp) -> Result<bool, StoreError> {
        self.write(|tx, kr| land_spilled(tx, kr, t, now))
    }
}

fn land_spilled(
    tx: &Transaction<'_>,
    keyring: &Keyring,
    t: &SpilledToken,
    now: Timestamp,
) -> Result<bool, StoreError> {
    let id = t.conn.id;
    let claim: Option<Option<String>> = tx
        .query_row(
            "SELECT claim_id FROM connections WHERE id = ?1",
            [id.to_string()],
            |r| r.get(0),
        )
        .optional()?;
    if claim.flatten().as_deref() != Some(t.attempt.to_string().as_str()) {
        return Ok(false);
    }
    let Some(mut row) = connections::get_by_id_tx(tx, id)? else {
        return Ok(false);
    };
    if row.conn.instance != t.conn.instance || row.conn.client_id != t.conn.client_id {
        // Pointed at another instance or application since: the token belongs to a grant that is gone.
        return Ok(false);
    }
    // Only what a refresh owns: an operator's edits made while the daemon
    // was down stand, and a connection disabled meanwhile stays disabled
    // (keeping the token, so enabling it works).
    let s = &t.conn;
    let c = &mut row.conn;
    c.refresh_token_issued_at = s.refresh_token_issued_at;
    c.access_expires_at = s.access_expires_at;
    c.deadline = s.deadline;
    c.deadline_source = s.deadline_source;
    c.last_refresh_at = s.last_refresh_at;
    if c.state.is_scheduled() {
        c.state = s.state;
        c.next_refresh_at = s.next_refresh_at;
        c.last_error = s.last_error.clone();
    }
    row.failures = 0;
    row.failing_since = None;
    row.outcome_unknown = false;
    row.has_access_token = true;
    row.token_type = t.token_type.clone();
    row.access_lifetime = t.access_lifetime;
    connections::put_refresh(tx, &row)?;
    if let Some(rt) = &t.refresh_token {
        connections::set_secret(tx, keyring, id, SecretColumn::RefreshToken, Some(rt))?;
    }
    connections::set_secret(
        tx,
        keyring,
        id,
        SecretColumn::AccessToken,
        Some(&t.access_token),
    )?;
    claims::clear(tx, id, false)?;
    events::record(
        tx,
        id,
        now,
        "refreshed",
        "imported the rotated token spilled when the store could not be written",
    )?;
    Ok(true)
}
