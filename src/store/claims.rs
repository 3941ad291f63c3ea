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

use rusqlite::params;

use crate::store::sql::Transaction;
use uuid::Uuid;

use super::connections::{self, COLUMNS, SecretColumn};
use super::{Store, StoreError, events, to_ms};
use crate::crypto::Keyring;
use crate::model::ConnectionRow;
use crate::model::{State, Timestamp};
use crate::secret::Secret;

/// The reason recorded when a rotated token was lost to a crash.
pub const LOST_TOKEN: &str = "a rotated token was lost while the process stopped";

/// Who holds a claim: host, pid, the process start time, role, uid and boot
/// id, so a claim left by a dead process on this host is recognised at once
/// rather than at expiry.
///
/// A process this one cannot see (`ProtectProc=invisible` hides other
/// users' processes from the daemon, so a CLI run as root is invisible to
/// it) is never judged dead for being unseen: `kill(pid, 0)` still tells
/// whether the pid exists, and an owner that exists but cannot be looked at
/// is waited out until its claim expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner(String);

/// What probing a pid found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// Visible: its start time in clock ticks since boot.
    Seen(u64),
    /// It exists, but this process may not look at it.
    Hidden,
    /// No process has that pid.
    Gone,
}

impl Owner {
    /// This process.
    pub fn current(role: &str) -> Owner {
        let pid = std::process::id();
        Owner(format!(
            "{}/{}/{}/{}/{}/{}",
            hostname(),
            pid,
            start_ticks(pid).unwrap_or(0),
            role,
            nix::unistd::geteuid().as_raw(),
            boot_id()
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when `owner` names a process on this host that no longer runs.
    pub fn is_dead(owner: &str) -> bool {
        judge_dead(owner, &hostname(), &boot_id(), probe)
    }

    /// A human description for messages: "acutoken serve (pid 123 on host)".
    pub fn describe(owner: &str) -> String {
        let parts: Vec<&str> = owner.split('/').collect();
        match parts.as_slice() {
            [host, pid, _, role, ..] => format!("acutoken {role} (pid {pid} on {host})"),
            _ => owner.to_string(),
        }
    }
}

/// The judgement behind [`Owner::is_dead`], with the host, the boot and the
/// probe passed in. Owners written by older versions have no uid and boot id.
fn judge_dead(owner: &str, host: &str, boot: &str, probe: impl Fn(u32) -> Probe) -> bool {
    let parts: Vec<&str> = owner.split('/').collect();
    let (Some(&o_host), Some(pid), Some(ticks)) = (parts.first(), parts.get(1), parts.get(2))
    else {
        return false;
    };
    if o_host != host {
        return false;
    }
    if let Some(&o_boot) = parts.get(5)
        && !o_boot.is_empty()
        && !boot.is_empty()
        && o_boot != boot
    {
        // The host rebooted since: every process of that boot is gone.
        return true;
    }
    let (Ok(pid), Ok(ticks)) = (pid.parse::<u32>(), ticks.parse::<u64>()) else {
        return false;
    };
    match probe(pid) {
        Probe::Gone => true,
        Probe::Seen(t) => t != ticks,
        Probe::Hidden => false,
    }
}

fn probe(pid: u32) -> Probe {
    if let Some(t) = start_ticks(pid) {
        return Probe::Seen(t);
    }
    let Ok(raw) = i32::try_from(pid) else {
        return Probe::Gone;
    };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => Probe::Hidden,
        Err(_) => Probe::Gone,
    }
}

/// This machine's host name, as claims and replicas record it.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// This boot's id (empty when the kernel does not say).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().replace('/', ""))
        .unwrap_or_default()
}

/// Field 22 of /proc/PID/stat: the process start time in clock ticks since boot.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: skip past the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
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
    /// What the request is based on, for the save to compare with the row as it is then.
    pub basis: Basis,
}

/// What a token request was made with. While it is in flight an operator
/// may edit, disable or remove the connection, or the customer may
/// re-authorize it; the save compares this with the row as it stands then,
/// so an outcome is only ever applied to the grant it belongs to.
#[derive(Debug, Clone)]
pub struct Basis {
    pub id: Uuid,
    pub attempt: Uuid,
    instance: String,
    client_id: String,
    grant_issued_at: Option<Timestamp>,
    /// Digests of the values sent, not the sealed bytes: a key rotation
    /// re-seals every value without changing it, and must not make a refresh
    /// in flight look overtaken (its rotated token would be thrown away).
    refresh_token_digest: [u8; 32],
    client_secret_digest: [u8; 32],
}

/// Why a refresh is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The scheduler found it due: skipped when a refresh from elsewhere (the
    /// CLI, the API, another process) already moved the plan.
    Scheduled,
    /// An operator, an application's token request, or a proof of a new secret.
    OnDemand,
    /// An application's token request that found no usable access token in
    /// the row at `version`: skipped when the row moved since (another
    /// process, another replica, refreshed it meanwhile; its token answers).
    Token { version: i64 },
}

/// The row as a finished request finds it when it comes to save.
#[derive(Debug)]
pub enum Found {
    /// The outcome applies to this row. `ours`: the claim is still this
    /// attempt's (else it expired and was taken over). `secret_changed`: a new
    /// client secret was entered meanwhile, so a refusal of the old one says
    /// nothing about the new.
    Current {
        row: ConnectionRow,
        ours: bool,
        secret_changed: bool,
    },
    /// A newer grant, another instance or another client ID was stored while
    /// the request was in flight: the outcome belongs to a grant that is gone.
    Overtaken {
        row: ConnectionRow,
        ours: bool,
        reason: &'static str,
    },
    /// The connection was removed meanwhile.
    Removed,
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
    /// A scheduled refresh whose plan moved since it fell due (refreshed from
    /// elsewhere meanwhile): nothing sent, the row tells when it is due now.
    NotDue(ConnectionRow),
    /// The instance already has `running` requests in flight from all
    /// replicas together (`renewal.per_instance_concurrent`): nothing
    /// written, try again when one ends.
    InstanceFull { running: usize },
}

/// The outcome to save when the request finished.
#[derive(Debug)]
pub struct RefreshSave<'a> {
    /// The row as [`reread`] found it, with the outcome applied by the
    /// policy. Only the columns a refresh owns are written from it.
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
    trigger: Trigger,
    now: Timestamp,
) -> Result<ClaimOutcome, StoreError> {
    claim_within(tx, keyring, id, owner, ttl, trigger, None, now)
}

/// What a replica on PostgreSQL adds to a claim (DESIGN §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsReplica {
    /// `renewal.per_instance_concurrent`: claimed only while fewer live
    /// claims of any process are on the connection's instance.
    pub instance_limit: usize,
    /// Whether this replica may take over a claim whose lease ran out. Not
    /// until it has itself been in touch with the store for a whole lease:
    /// after an outage every claim looks lapsed, and their holders, cut off
    /// as this replica was, get the time to renew them first.
    pub take_over: bool,
}

/// [`claim`], under the rules of a replica when `replica` is given.
#[allow(clippy::too_many_arguments)]
pub fn claim_within(
    tx: &Transaction<'_>,
    keyring: &Keyring,
    id: Uuid,
    owner: &Owner,
    ttl: Duration,
    trigger: Trigger,
    replica: Option<AsReplica>,
    now: Timestamp,
) -> Result<ClaimOutcome, StoreError> {
    let Some(mut row) = connections::get_by_id_tx(tx, id)? else {
        return Err(StoreError::UnknownConnection(id.to_string()));
    };
    if !matches!(row.conn.state, State::Active | State::Retrying) {
        return Ok(ClaimOutcome::NotRefreshable(row));
    }
    if trigger == Trigger::Scheduled
        && row.claim.is_none()
        && row.conn.next_refresh_at.is_some_and(|t| t > now)
    {
        return Ok(ClaimOutcome::NotDue(row));
    }
    if let Trigger::Token { version } = trigger
        && row.claim.is_none()
        && row.version != version
    {
        return Ok(ClaimOutcome::NotDue(row));
    }
    if let Some((holder, until)) = row.claim.clone()
        && (until > now || replica.is_some_and(|r| !r.take_over))
        && !Owner::is_dead(&holder)
    {
        return Ok(ClaimOutcome::Busy {
            owner: holder,
            until,
        });
    }
    // Before anything is written: a claim refused for room changes nothing.
    if let Some(limit) = replica.map(|r| r.instance_limit) {
        let running =
            super::replicas::instance_claims(tx, &row.conn.instance, &id.to_string(), now)?;
        if running >= limit {
            return Ok(ClaimOutcome::InstanceFull { running });
        }
    }
    let mut after_unknown = row.outcome_unknown;
    if let Some((holder, _)) = row.claim.clone() {
        // Orphaned: past its lease, or its process is gone.
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
        super::exec(
            tx,
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
    let sealed: (Option<Vec<u8>>, Option<Vec<u8>>) = super::row(
        tx,
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
    let basis = Basis {
        id,
        attempt,
        instance: row.conn.instance.clone(),
        client_id: row.conn.client_id.clone(),
        grant_issued_at: row.conn.grant_issued_at,
        refresh_token_digest: digest(&refresh_token),
        client_secret_digest: digest(&client_secret),
    };
    let expires = crate::model::add_saturating(now, ttl);
    super::exec(
        tx,
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
        basis,
    })))
}

fn clear_claim(tx: &Transaction<'_>, id: Uuid) -> Result<(), StoreError> {
    super::exec(
        tx,
        "UPDATE connections SET claim_id = NULL, claim_owner = NULL, claim_expires_at = NULL
         WHERE id = ?1",
        [id.to_string()],
    )?;
    Ok(())
}

/// The live claim on `row`, if any: who holds it and until when. A claim
/// past its expiry or left by a dead process is not live.
pub fn live_claim(row: &ConnectionRow, now: Timestamp) -> Option<(String, Timestamp)> {
    row.claim
        .clone()
        .filter(|(holder, until)| *until > now && !Owner::is_dead(holder))
}

/// Reads the row a finished request is to be saved into, and judges whether
/// its outcome still applies (see [`Found`]).
pub fn reread(tx: &Transaction<'_>, keyring: &Keyring, basis: &Basis) -> Result<Found, StoreError> {
    let Some(row) = connections::get_by_id_tx(tx, basis.id)? else {
        return Ok(Found::Removed);
    };
    type Now = (Option<String>, Option<Vec<u8>>, Option<Vec<u8>>);
    let (claim_id, rt, cs): Now = super::row(
        tx,
        "SELECT claim_id, refresh_token, client_secret FROM connections WHERE id = ?1",
        [basis.id.to_string()],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let ours = claim_id.as_deref() == Some(basis.attempt.to_string().as_str());
    // A value that is gone differs; one that does not open cannot be told
    // apart, and saving the new token then loses less than discarding it.
    let differs = |col: SecretColumn, sealed: Option<Vec<u8>>, was: &[u8; 32]| match sealed {
        None => true,
        Some(b) => keyring
            .open_secret(basis.id, col.as_str(), &b)
            .is_ok_and(|v| digest(&v) != *was),
    };
    let reason = if row.conn.instance != basis.instance {
        Some("the instance was changed while the request was in flight")
    } else if row.conn.client_id != basis.client_id {
        Some("the client ID was changed while the request was in flight")
    } else if row.conn.grant_issued_at != basis.grant_issued_at
        || differs(SecretColumn::RefreshToken, rt, &basis.refresh_token_digest)
    {
        Some("a newer grant was stored while the request was in flight")
    } else {
        None
    };
    if let Some(reason) = reason {
        return Ok(Found::Overtaken { row, ours, reason });
    }
    let secret_changed = differs(SecretColumn::ClientSecret, cs, &basis.client_secret_digest);
    Ok(Found::Current {
        row,
        ours,
        secret_changed,
    })
}

fn digest(s: &Secret) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(s.expose().as_bytes()).into()
}

/// Saves the outcome of a request into the row [`reread`] found current: the
/// columns a refresh owns, the new tokens, one history event; and releases
/// the claim when it is still this attempt's (a claim taken over after ours
/// expired belongs to its new holder). Nothing an operator or the customer
/// sets (labels, instance, client ID, mode, lifetimes, the secret's Expires
/// On, the grant) is written.
pub fn finish(
    tx: &Transaction<'_>,
    keyring: &Keyring,
    basis: &Basis,
    save: &RefreshSave<'_>,
    ours: bool,
    now: Timestamp,
) -> Result<(), StoreError> {
    let id = basis.id;
    connections::put_refresh(tx, save.row)?;
    if let Some(rt) = save.refresh_token {
        connections::set_secret(tx, keyring, id, SecretColumn::RefreshToken, Some(rt))?;
    }
    if let Some(at) = save.access_token {
        connections::set_secret(tx, keyring, id, SecretColumn::AccessToken, Some(at))?;
    }
    if ours {
        clear_claim(tx, id)?;
    }
    events::record(tx, id, now, save.event, save.detail)?;
    Ok(())
}

/// Ends an attempt whose outcome is not applied: releases its claim if it is
/// still ours and says why in the history.
pub fn discard(
    tx: &Transaction<'_>,
    basis: &Basis,
    detail: &str,
    now: Timestamp,
) -> Result<(), StoreError> {
    release(tx, basis.id, basis.attempt)?;
    events::record(tx, basis.id, now, "refresh_discarded", detail)
}

/// Gives a claim back without sending anything (the request never left).
pub fn release(tx: &Transaction<'_>, id: Uuid, attempt: Uuid) -> Result<(), StoreError> {
    super::exec(
        tx,
        "UPDATE connections SET claim_id = NULL, claim_owner = NULL, claim_expires_at = NULL
         WHERE id = ?1 AND claim_id = ?2",
        params![id.to_string(), attempt.to_string()],
    )?;
    Ok(())
}

/// Clears whatever claim the connection carries: its outcome was landed by
/// other means (an imported spill), or a new grant makes it moot (nothing
/// was sent with the new token; `new_grant` also forgets an unknown outcome).
pub fn clear(tx: &Transaction<'_>, id: Uuid, new_grant: bool) -> Result<(), StoreError> {
    let sql = if new_grant {
        "UPDATE connections SET claim_id = NULL, claim_owner = NULL, claim_expires_at = NULL, outcome_unknown = 0 WHERE id = ?1"
    } else {
        "UPDATE connections SET claim_id = NULL, claim_owner = NULL, claim_expires_at = NULL WHERE id = ?1"
    };
    super::exec(tx, sql, params![id.to_string()])?;
    Ok(())
}

impl Store {
    /// Connections with a claim (live or stale), for start-up recovery.
    pub fn claimed(&self) -> Result<Vec<ConnectionRow>, StoreError> {
        let mut stmt = self.db.prepare(&format!(
            "SELECT {COLUMNS} FROM connections WHERE claim_id IS NOT NULL"
        ))?;
        let rows = stmt.query_map((), connections::from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "vm";
    const BOOT: &str = "4f1c0e2a-boot";

    fn owner(host: &str, pid: u32, ticks: u64, boot: Option<&str>) -> String {
        match boot {
            Some(b) => format!("{host}/{pid}/{ticks}/serve/0/{b}"),
            None => format!("{host}/{pid}/{ticks}/serve"),
        }
    }

    #[test]
    fn an_owner_that_cannot_be_seen_is_waited_out_not_judged_dead() {
        // ProtectProc=invisible: root's CLI is hidden from the daemon.
        let o = owner(ME, 4242, 99, Some(BOOT));
        assert!(!judge_dead(&o, ME, BOOT, |_| Probe::Hidden));
        // The same for an owner written by an older version.
        assert!(!judge_dead(&owner(ME, 4242, 99, None), ME, BOOT, |_| {
            Probe::Hidden
        }));
    }

    #[test]
    fn a_gone_or_reused_pid_or_a_reboot_means_dead() {
        let o = owner(ME, 4242, 99, Some(BOOT));
        assert!(judge_dead(&o, ME, BOOT, |_| Probe::Gone));
        assert!(judge_dead(&o, ME, BOOT, |_| Probe::Seen(100)), "pid reused");
        assert!(!judge_dead(&o, ME, BOOT, |_| Probe::Seen(99)), "alive");
        assert!(
            judge_dead(&o, ME, "another-boot", |_| Probe::Hidden),
            "after a reboot nothing of the old boot runs"
        );
    }

    #[test]
    fn an_owner_on_another_host_or_unreadable_is_never_judged_from_here() {
        assert!(!judge_dead(
            &owner("db2", 1, 1, Some(BOOT)),
            ME,
            BOOT,
            |_| Probe::Gone
        ));
        assert!(!judge_dead("garbage", ME, BOOT, |_| Probe::Gone));
        assert!(!judge_dead("vm/notapid/1", ME, BOOT, |_| Probe::Gone));
    }

    #[test]
    fn this_process_is_alive_and_described() {
        let me = Owner::current("cli");
        assert!(!Owner::is_dead(me.as_str()));
        assert!(Owner::describe(me.as_str()).starts_with("acutoken cli (pid "));
    }
}
