//! Pure renewal decisions: deadlines, when to refresh, backoff, what state
//! follows an attempt, and when an alert condition holds (DESIGN §3, §8).
//!
//! Everything here is a plain function over plain data. The current time comes
//! in as `now`, randomness as `rand_unit` (a number in `[0, 1)`; anything else is
//! clamped into that range), so every decision can be replayed in a test. The
//! engine executes what these functions decide; nothing here does I/O.
//!
//! "Never more often than needed": a refresh is needed only
//! - in sliding mode, once per refresh token, at the renew point
//!   (`renew_at × lifetime` after it was issued, jittered earlier), so the
//!   deadline slides on;
//! - every `probe_interval` (jittered earlier by at most half of it), to prove
//!   the secret and the grant still work long before a deadline;
//! - once, at once, to prove a token whose deadline is only assumed;
//! - once shortly before a deadline (a margin of `min(4 × retry_max, lifetime / 10)`,
//!   jittered), so that retries still fit if it fails;
//! - once when the deadline passes: the final attempt that decides.
//!
//! A point is "satisfied" by any successful refresh at or after the earliest
//! moment it could have been planned, so a refresh that did not rotate the
//! token never makes the same point due again.
//!
//! Access-token usability and the alert conditions of DESIGN §8 live in
//! `conditions` and are re-exported here.

use std::time::Duration;

use crate::model::{
    Connection, DeadlineSource, FailureKind, MAX_ACCESS_LIFETIME, Mode, State, Timestamp,
};
// The saturating time arithmetic of `crate::model`: lifetimes, intervals and
// Retry-After come from config files, the store and servers, and must never
// make a plan panic.
use crate::model::{add_saturating as add, span, sub_saturating as sub};

mod conditions;
pub use conditions::{
    REFRESH_FAILED_AFTER, REFRESH_FAILED_CRITICAL_WITHIN, WarnPoint, access_token_usable,
    expiry_warning, refresh_failed_alert, secret_warning,
};

/// The reason stored when `invalid_grant` follows an attempt whose outcome was
/// unknown (DESIGN §3, invariant 1).
pub const LOST_ROTATED_TOKEN: &str = "a rotated token was lost while the process stopped";

/// The shortest backoff near a deadline; retries never come closer together than
/// this (or `retry_min`, when that is shorter), however little time is left.
pub const BACKOFF_FLOOR: Duration = Duration::from_secs(5);

#[cfg(test)]
use crate::model::policy::{DAY, HOUR};
pub use crate::model::policy::{Policy, PolicyError};

/// `rand_unit` forced into `[0, 1]`; NaN counts as 0.
fn unit(rand_unit: f64) -> f64 {
    if rand_unit.is_nan() {
        0.0
    } else {
        rand_unit.clamp(0.0, 1.0)
    }
}

/// `d × fraction` for a fraction in `[0, 1]`, never more than `d`. Unlike
/// `Duration::mul_f64` it cannot panic, even for a duration near the maximum.
fn scale(d: Duration, fraction: f64) -> Duration {
    Duration::try_from_secs_f64(d.as_secs_f64() * unit(fraction)).map_or(d, |s| s.min(d))
}

/// A random part of `cap`: `cap × rand_unit`, never more than `cap`.
pub fn jitter(cap: Duration, rand_unit: f64) -> Duration {
    scale(cap, rand_unit)
}

/// The connection's deadline and where it comes from, or `None` when neither
/// the grant time nor the refresh token's issue time is known.
///
/// Absolute: `grant_issued_at + lifetime`. Sliding:
/// `min(refresh_token_issued_at + lifetime, grant_issued_at + absolute_lifetime)`.
/// A known grant time makes the deadline [`DeadlineSource::Observed`].
///
/// Without `grant_issued_at` the grant is assumed to date from
/// `refresh_token_issued_at` and the deadline is [`DeadlineSource::Assumed`]. In
/// absolute mode that estimate is made once and then kept from the stored
/// `deadline`, because rotating the token does not move an absolute deadline.
/// In sliding mode the cap cannot be placed without the grant time, so it is
/// effectively not applied; give `--grant-issued-at` to have it.
///
/// A stored deadline marked `Observed` that lies beyond the formula is a
/// correction made by [`after_success`] (the token outlived the computed
/// deadline) and is kept; in sliding mode it slides on from there, uncapped.
/// Whoever edits `mode`, `lifetime`, `absolute_lifetime` or the grant must
/// clear `deadline` and `deadline_source` so the new values take effect.
pub fn deadline(conn: &Connection) -> Option<(Timestamp, DeadlineSource)> {
    let grant = conn.grant_issued_at;
    let token = conn.refresh_token_issued_at.or(grant)?;
    let grant_or_token = grant.unwrap_or(token);
    let sliding_end = add(token, conn.lifetime);
    let formula = match conn.mode {
        Mode::Absolute => add(grant_or_token, conn.lifetime),
        Mode::Sliding => match conn.absolute_lifetime {
            Some(cap) => sliding_end.min(add(grant_or_token, cap)),
            None => sliding_end,
        },
    };
    let source = if grant.is_some() {
        DeadlineSource::Observed
    } else {
        DeadlineSource::Assumed
    };
    let corrected = conn.deadline.filter(|stored| {
        conn.deadline_source == Some(DeadlineSource::Observed) && *stored > formula
    });
    match (conn.mode, corrected) {
        (Mode::Absolute, Some(stored)) => Some((stored, DeadlineSource::Observed)),
        (Mode::Sliding, Some(stored)) => Some((stored.max(sliding_end), DeadlineSource::Observed)),
        (Mode::Absolute, None) => match (grant, conn.deadline) {
            (None, Some(stored)) => Some((stored, conn.deadline_source.unwrap_or(source))),
            _ => Some((formula, source)),
        },
        (Mode::Sliding, None) => Some((formula, source)),
    }
}

/// Why a refresh is planned when it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanReason {
    /// The deadline has passed: the one final attempt decides.
    FinalAttempt,
    /// The deadline is only assumed and no refresh ever proved the token alive.
    ProveAssumed,
    /// Sliding mode's renew point.
    Renew,
    /// The periodic probe.
    Probe,
    /// The last ordinary refresh, a margin before a deadline no refresh can move.
    BeforeDeadline,
    /// Everything before the deadline is done; the final attempt comes when it passes.
    AtDeadline,
}

/// A planned refresh. `at` may lie before `now`: the refresh is overdue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// When the refresh is due.
    pub at: Timestamp,
    /// Why it is due then.
    pub reason: PlanReason,
}

/// The next regular refresh of an `active` or `retrying` connection, with its
/// reason; `None` for any other state or when no deadline can be computed.
///
/// The earliest of the points listed in the module documentation wins. While
/// time remains the plan is strictly before the deadline, except
/// [`PlanReason::AtDeadline`]: everything needed before the deadline has been
/// done, and the final attempt is due the moment the deadline passes.
///
/// While `retrying`, the backoff chosen by [`after_failure`] is the schedule;
/// this is the plan the connection returns to after a success.
pub fn plan_refresh(
    conn: &Connection,
    policy: &Policy,
    now: Timestamp,
    rand_unit: f64,
) -> Option<Plan> {
    if !conn.state.is_scheduled() {
        return None;
    }
    let (deadline, source) = deadline(conn)?;
    let plan = |at, reason| Some(Plan { at, reason });
    if deadline <= now {
        return plan(now, PlanReason::FinalAttempt);
    }
    let last = conn.last_refresh_at;
    if source == DeadlineSource::Assumed && last.is_none() {
        return plan(now, PlanReason::ProveAssumed);
    }
    let token = conn.refresh_token_issued_at.or(conn.grant_issued_at)?;
    let cap = policy.jitter_cap(conn.lifetime);
    let done_since = |earliest: Timestamp| last.is_some_and(|l| l >= earliest);

    let mut best: Option<Plan> = None;
    let mut offer = |at: Timestamp, reason| {
        if best.is_none_or(|b| at < b.at) {
            best = Some(Plan { at, reason });
        }
    };
    if conn.mode == Mode::Sliding {
        let point = add(token, scale(conn.lifetime, policy.renew_fraction()));
        if !done_since(sub(point, cap)) {
            offer(sub(point, jitter(cap, rand_unit)), PlanReason::Renew);
        }
    }
    if !policy.probe_interval.is_zero() {
        let from = last.map_or(token, |l| l.max(token));
        let probe_cap = cap.min(policy.probe_interval / 2);
        offer(
            sub(
                add(from, policy.probe_interval),
                jitter(probe_cap, rand_unit),
            ),
            PlanReason::Probe,
        );
    }
    let margin = policy.deadline_margin(conn.lifetime);
    let before = sub(deadline, margin);
    if !margin.is_zero() && !done_since(sub(before, cap)) {
        offer(
            sub(before, jitter(cap, rand_unit)),
            PlanReason::BeforeDeadline,
        );
    }
    match best {
        Some(p) if p.at < deadline => Some(p),
        _ => plan(deadline, PlanReason::AtDeadline),
    }
}

/// When the next regular refresh is due: [`plan_refresh`] without the reason.
pub fn next_refresh(
    conn: &Connection,
    policy: &Policy,
    now: Timestamp,
    rand_unit: f64,
) -> Option<Timestamp> {
    plan_refresh(conn, policy, now, rand_unit).map(|p| p.at)
}

/// When to try again after `failures` transient failures in a row (1 for the first).
///
/// The delay doubles from `retry_min` up to `retry_max`, jittered within the
/// upper half of each step (never below `retry_min`). Retry-After raises the
/// delay to what the server asked, even beyond `retry_max`.
///
/// While the deadline is ahead, the delay never exceeds a quarter of the time
/// left (but is at least [`BACKOFF_FLOOR`], or `retry_min` if shorter), so
/// several tries always fit before it. When Retry-After and the deadline
/// disagree, the deadline wins: a request sent earlier than the server asked
/// costs at most another 429, while a refresh token lost to its deadline costs a
/// customer re-authorizing by hand.
pub fn backoff(
    failures: u32,
    now: Timestamp,
    deadline: Option<Timestamp>,
    retry_after: Option<Duration>,
    policy: &Policy,
    rand_unit: f64,
) -> Timestamp {
    let (min, max) = policy.retry_bounds();
    let factor = 1u32
        .checked_shl(failures.saturating_sub(1))
        .unwrap_or(u32::MAX);
    let step = min.saturating_mul(factor).min(max);
    let low = (step / 2).max(min).min(step);
    let mut delay = low + jitter(step - low, rand_unit);
    if let Some(asked) = retry_after {
        delay = delay.max(asked);
    }
    if let Some(deadline) = deadline.filter(|d| *d > now) {
        let bound = (span(now, deadline) / 4).max(BACKOFF_FLOOR.min(min));
        delay = delay.min(bound);
    }
    add(now, delay)
}

/// What the engine records after a failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The connection's new state.
    pub state: State,
    /// When to try again; `None` when only a human can move it on.
    pub next_refresh_at: Option<Timestamp>,
    /// Why, in words for `last_error`, `status` and alerts.
    pub last_error: String,
}

impl Decision {
    /// Writes the decision into the connection.
    pub fn apply(&self, conn: &mut Connection) {
        conn.state = self.state;
        conn.next_refresh_at = self.next_refresh_at;
        conn.last_error = Some(self.last_error.clone());
    }
}

/// A failed token request, as the engine saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// How the Acumatica client classified it.
    pub kind: FailureKind,
    /// Failures in a row, this one included (1 for the first).
    pub failures: u32,
    /// The server's Retry-After, if it sent one.
    pub retry_after: Option<Duration>,
    /// The attempt before this one ended with an unknown outcome (an orphaned
    /// claim), so a rotated token may have been issued and lost.
    pub unknown_outcome: bool,
}

/// The state that follows a failed attempt.
///
/// `invalid_client` means `needs_secret` and `invalid_grant` means
/// `needs_reauthorization`; neither is ever retried automatically. Transient
/// failures back off (see [`backoff`]). Once the deadline has passed, transient
/// failures are retried for [`Policy::final_grace`] after it, the last try
/// exactly at its end; a failure after that confirms `needs_reauthorization`.
pub fn after_failure(
    conn: &Connection,
    failure: &Failure,
    now: Timestamp,
    policy: &Policy,
    rand_unit: f64,
) -> Decision {
    let deadline = deadline(conn).map(|(d, _)| d);
    let passed = deadline.filter(|d| *d <= now);
    let terminal = |state, last_error: String| Decision {
        state,
        next_refresh_at: None,
        last_error,
    };
    match failure.kind {
        FailureKind::InvalidClient => terminal(
            State::NeedsSecret,
            "the token endpoint answered invalid_client: the client secret is wrong or expired, or the application is inactive".into(),
        ),
        FailureKind::InvalidGrant if failure.unknown_outcome => {
            terminal(State::NeedsReauthorization, LOST_ROTATED_TOKEN.into())
        }
        FailureKind::InvalidGrant => terminal(
            State::NeedsReauthorization,
            match passed {
                Some(d) => format!(
                    "the refresh token expired: its deadline {} passed and the final attempt was refused (invalid_grant)",
                    crate::model::fmt_time(d)
                ),
                None => "the token endpoint answered invalid_grant: the refresh token expired, was revoked (Revoke Access on SM303010) or was already used".into(),
            },
        ),
        FailureKind::Transient => {
            let (next, give_up) = match passed {
                Some(d) => {
                    let give_up = add(d, policy.final_grace());
                    let next = backoff(failure.failures, now, None, failure.retry_after, policy, rand_unit);
                    (next.min(give_up), Some(give_up))
                }
                None => (
                    backoff(failure.failures, now, deadline, failure.retry_after, policy, rand_unit),
                    None,
                ),
            };
            match give_up {
                Some(end) if now >= end => terminal(
                    State::NeedsReauthorization,
                    format!(
                        "the deadline {} passed and refreshing kept failing transiently until {}: the refresh token is presumed expired",
                        deadline.map_or_else(String::new, crate::model::fmt_time),
                        crate::model::fmt_time(end)
                    ),
                ),
                _ => Decision {
                    state: State::Retrying,
                    next_refresh_at: Some(next),
                    last_error: format!(
                        "refresh failed transiently ({} in a row); next try at {}",
                        failure.failures,
                        crate::model::fmt_time(next)
                    ),
                },
            }
        }
    }
}

/// Everything a successful refresh changes on the connection.
#[derive(Debug, Clone, PartialEq)]
pub struct SuccessUpdate {
    /// `now` when the token rotated, else unchanged.
    pub refresh_token_issued_at: Option<Timestamp>,
    /// `now`.
    pub last_refresh_at: Timestamp,
    /// `now + expires_in` (at most [`MAX_ACCESS_LIFETIME`]), or `None` when
    /// the response did not say.
    pub access_expires_at: Option<Timestamp>,
    /// The deadline after this refresh.
    pub deadline: Option<Timestamp>,
    /// Where that deadline comes from.
    pub deadline_source: Option<DeadlineSource>,
    /// The next regular refresh.
    pub next_refresh_at: Option<Timestamp>,
    /// Always `active`.
    pub state: State,
    /// `Some(old deadline)` when the token outlived its computed deadline: the
    /// configured lifetime is wrong, and the engine warns about it.
    pub outlived_deadline: Option<Timestamp>,
}

impl SuccessUpdate {
    /// Writes the update into the connection, clearing `last_error`.
    pub fn apply(&self, conn: &mut Connection) {
        conn.refresh_token_issued_at = self.refresh_token_issued_at;
        conn.last_refresh_at = Some(self.last_refresh_at);
        conn.access_expires_at = self.access_expires_at;
        conn.deadline = self.deadline;
        conn.deadline_source = self.deadline_source;
        conn.next_refresh_at = self.next_refresh_at;
        conn.state = self.state;
        conn.last_error = None;
    }
}

/// What a successful refresh at `now` changes.
///
/// When the deadline had already passed, the token outlived it: the deadline
/// becomes `now + lifetime` (at least), marked `Observed`, and
/// `outlived_deadline` asks the engine to warn. Without that correction every
/// later plan would be another "final attempt" at once.
pub fn after_success(
    conn: &Connection,
    rotated: bool,
    access_expires_in: Option<Duration>,
    now: Timestamp,
    policy: &Policy,
    rand_unit: f64,
) -> SuccessUpdate {
    let before = deadline(conn);
    let mut next = conn.clone();
    if rotated || next.refresh_token_issued_at.is_none() {
        next.refresh_token_issued_at = Some(now);
    }
    next.last_refresh_at = Some(now);
    next.access_expires_at = access_expires_in.map(|d| add(now, d.min(MAX_ACCESS_LIFETIME)));
    next.state = State::Active;
    next.last_error = None;
    // Anchor on the deadline as it stood, so an absolute estimate is not moved by the rotation.
    next.deadline = before.map(|(d, _)| d);
    next.deadline_source = before.map(|(_, s)| s);
    let outlived_deadline = before.map(|(d, _)| d).filter(|d| *d <= now);
    let after = if outlived_deadline.is_some() {
        let computed = deadline(&next).map_or(now, |(d, _)| d);
        Some((
            computed.max(add(now, next.lifetime)),
            DeadlineSource::Observed,
        ))
    } else {
        deadline(&next)
    };
    next.deadline = after.map(|(d, _)| d);
    next.deadline_source = after.map(|(_, s)| s);
    SuccessUpdate {
        refresh_token_issued_at: next.refresh_token_issued_at,
        last_refresh_at: now,
        access_expires_at: next.access_expires_at,
        deadline: next.deadline,
        deadline_source: next.deadline_source,
        next_refresh_at: next_refresh(&next, policy, now, rand_unit),
        state: State::Active,
        outlived_deadline,
    }
}

/// True when the secret's Expires On has passed.
pub fn secret_expired(conn: &Connection, now: Timestamp) -> bool {
    conn.secret_expires_at.is_some_and(|e| e <= now)
}

/// The `needs_secret` decision for a connection whose secret's Expires On has
/// passed, to be taken instead of sending a request that cannot succeed.
pub fn expired_secret_decision(conn: &Connection, now: Timestamp) -> Option<Decision> {
    let expired = conn.secret_expires_at.filter(|e| *e <= now)?;
    Some(Decision {
        state: State::NeedsSecret,
        next_refresh_at: None,
        last_error: format!(
            "the client secret expired on {} (its Expires On date)",
            crate::model::fmt_time(expired)
        ),
    })
}

#[cfg(test)]
mod extremes;
#[cfg(test)]
mod tests;
