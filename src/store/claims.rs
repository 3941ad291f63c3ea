//! Claims: DESIGN §3 invariant 1, at most one token request per refresh-token value.
//!
//! Before a token request, a process records a claim (attempt id, owner,
//! expiry longer than the request timeout) with a compare-and-swap inside an
//! immediate transaction. Nobody sends while a live claim exists. A claim
//! whose owner died is orphaned: the request may or may not have reached the
//! identity server, so the outcome is `unknown` and the token may be sent at
//! most once more. A second orphan on the same token means it may already have
//! been used twice, and only the customer can mend that.

use std::time::Duration;

use rusqlite::{OptionalExtension, Transaction, params};
use uuid::Uuid;

use super::connections::{self, COLUMNS, ConnectionRow, SecretColumn};
use super::{Store, StoreError, events, to_ms};
use crate::crypto::Keyring;
use crate::model::{State, Timestamp};
use crate::secret::Secret;

/// The reason recorded when a rotated token was lost to a crash.
pub const LOST_TOKEN: &str = "a rotated token was lost while the process stopped";

/// Who holds a claim: host, pid and the process start time, so a claim left by
/// a dead process on this host is recognised at once rather than at expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner(String);

impl Owner {
    /// This process.
    pub fn current(role: &str) -> Owner {
        let pid = std::process::id();
        Owner(format!(
            "{}/{}/{}/{}",
            hostname(),
            pid,
            start_ticks(pid).unwrap_or(0),
            role
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `owner` names a process on this host that no longer runs.
    pub fn is_dead(owner: &str) -> bool {
        let mut parts = owner.split('/');
        let (Some(host), Some(pid), Some(ticks)) = (parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        if host != hostname() {
            return false;
        }
        let (Ok(pid), Ok(ticks)) = (pid.parse::<u32>(), ticks.parse::<u64>()) else {
            return false;
        };
        match start_ticks(pid) {
            None => true,
            Some(t) => t != ticks,
        }
    }

    /// A human description for messages: "acutoken serve (pid 123)".
    pub fn describe(owner: &str) -> String {
        let parts: Vec<&str> = owner.split('/').collect();
        match parts.as_slice() {
            [host, pid, _, role] => format!("acutoken {role} (pid {pid} on {host})"),
            _ => owner.to_string(),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Field 22 of /proc/PID/stat: the process start time in clock ticks since boot.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip past the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// A live claim: the right to send this refresh token once.
#[derive(Debug)]
pub struct Claim {
    pub attempt: Uuid,
    pub row: ConnectionRow,
    pub client_secret: Secret,
    pub refresh_token: Secret,
    /// This send follows an orphaned claim: `invalid_grant` now means the token was lost.
    pub after_unknown: bool,
}

/// What trying to claim gave.
#[derive(Debug)]
pub enum ClaimOutcome {
    /// Go ahead: send exactly one token request, then finish or release the claim.
    Claimed(Box<Claim>),
    /// Someone else is sending now; wait for their outcome.
    Busy { owner: String, until: Timestamp },
    /// The state does not allow a refresh (a human must act, or disabled); nothing sent.
    NotRefreshable(ConnectionRow),
    /// A second orphan: the token may have been used twice; marked needs_reauthorization.
    Lost(ConnectionRow),
}

/// The outcome to save when the request finished.
#[derive(Debug)]
pub struct RefreshSave<'a> {
    /// The row with every planned field updated by the policy.
    pub row: &'a ConnectionRow,
    /// The new refresh token, when the server rotated it.
    pub refresh_token: Option<&'a Secret>,
    /// The new access token.
    pub access_token: Option<&'a Secret>,
    pub event: &'a str,
    pub detail: &'a str,
}

/// Claims connection `id` for one token request (inside a write transaction).
pub fn claim(
    tx: &Transaction<'_>,
    keyring: &Keyring,
    id: Uuid,
    owner: &Owner,
    ttl: Duration,
    now: Timestamp,
) -> Result<ClaimOutcome, StoreError> {
    let Some(mut row) = connections::get_by_id_tx(tx, id)? else {
        return Err(StoreError::UnknownConnection(id.to_string()));
    };
    if !matches!(row.conn.state, State::Active | State::Retrying) {
        return Ok(ClaimOutcome::NotRefreshable(row));
    }
    let mut after_unknown = row.outcome_unknown;
    if let Some((holder, until)) = row.claim.clone() {
        let orphaned = until <= now || Owner::is_dead(&holder);
        if !orphaned {
            return Ok(ClaimOutcome::Busy {
                owner: holder,
                until,
            });
        }
        if row.outcome_unknown {
            // The token went out under two claims whose outcomes are both lost.
            row.conn.state = State::NeedsReauthorization;
            row.conn.last_error = Some(LOST_TOKEN.into());
            row.conn.next_refresh_at = None;
            row.outcome_unknown = false;
            connections::put(tx, &row)?;
            clear_claim(tx, id)?;
            events::record(
                tx,
                id,
                now,
                "outcome_unknown",
                &format!(
                    "{LOST_TOKEN}; claim of {} orphaned twice",
                    Owner::describe(&holder)
                ),
            )?;
            events::record(tx, id, now, "state", "needs_reauthorization")?;
            return Ok(ClaimOutcome::Lost(row));
        }
        after_unknown = true;
        tx.execute(
            "UPDATE connections SET outcome_unknown = 1 WHERE id = ?1",
            [id.to_string()],
        )?;
        row.outcome_unknown = true;
        events::record(
            tx,
            id,
            now,
            "outcome_unknown",
            &format!(
                "the refresh claimed by {} never finished; the token is sent at most once more",
                Owner::describe(&holder)
            ),
        )?;
    }
    let sealed: (Option<Vec<u8>>, Option<Vec<u8>>) = tx.query_row(
        "SELECT client_secret, refresh_token FROM connections WHERE id = ?1",
        [id.to_string()],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let (Some(cs), Some(rt)) = sealed else {
        return Ok(ClaimOutcome::NotRefreshable(row));
    };
    let client_secret = keyring.open_secret(id, SecretColumn::ClientSecret.as_str(), &cs)?;
    let refresh_token = keyring.open_secret(id, SecretColumn::RefreshToken.as_str(), &rt)?;
    let attempt = Uuid::new_v4();
    let expires = now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::hours(1));
    tx.execute(
        "UPDATE connections SET claim_id = ?2, claim_owner = ?3, claim_expires_at = ?4,
            version = version + 1 WHERE id = ?1",
        params![
            id.to_string(),
            attempt.to_string(),
            owner.as_str(),
            to_ms(expires)
        ],
    )?;
    row.claim = Some((owner.as_str().to_string(), expires));
    Ok(ClaimOutcome::Claimed(Box::new(Claim {
        attempt,
        row,
        client_secret,
        refresh_token,
        after_unknown,
    })))
}

fn clear_claim(tx: &Transaction<'_>, id: Uuid) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE connections SET claim_id = NULL, claim_owner = NULL, claim_expires_at = NULL
         WHERE id = ?1",
        [id.to_string()],
    )?;
    Ok(())
}

/// Saves the outcome of a claimed request and releases the claim, but only if
/// the claim is still ours (compare-and-swap on the attempt id).
pub fn finish(
    tx: &Transaction<'_>,
    keyring: &Keyring,
    attempt: Uuid,
    save: &RefreshSave<'_>,
    now: Timestamp,
) -> Result<bool, StoreError> {
    let id = save.row.conn.id;
    let ours: Option<String> = tx
        .query_row(
            "SELECT claim_id FROM connections WHERE id = ?1",
            [id.to_string()],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    if ours.as_deref() != Some(attempt.to_string().as_str()) {
        return Ok(false);
    }
    connections::put(tx, save.row)?;
    if let Some(rt) = save.refresh_token {
        connections::set_secret(tx, keyring, id, SecretColumn::RefreshToken, Some(rt))?;
    }
    if let Some(at) = save.access_token {
        connections::set_secret(tx, keyring, id, SecretColumn::AccessToken, Some(at))?;
    }
    clear_claim(tx, id)?;
    events::record(tx, id, now, save.event, save.detail)?;
    Ok(true)
}

/// Gives a claim back without sending anything (the request never left).
pub fn release(tx: &Transaction<'_>, id: Uuid, attempt: Uuid) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE connections SET claim_id = NULL, claim_owner = NULL, claim_expires_at = NULL
         WHERE id = ?1 AND claim_id = ?2",
        params![id.to_string(), attempt.to_string()],
    )?;
    Ok(())
}

impl Store {
    /// Connections with a claim (live or stale), for start-up recovery.
    pub fn claimed(&self) -> Result<Vec<ConnectionRow>, StoreError> {
        let mut stmt = self.db.prepare(&format!(
            "SELECT {COLUMNS} FROM connections WHERE claim_id IS NOT NULL"
        ))?;
        let rows = stmt.query_map([], connections::from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
