//! Which connection-bound alert conditions hold now, and when that can change.
//!
//! Pure: a connection row, the renewal policy and `now` in, facts out. The
//! rules themselves (warn points, the secret warning, the refresh-failed
//! urgency) are the renewal policy's, the words are the model's
//! ([`AlertFacts`]); this module decides which apply. The engine and the
//! scheduler hand the answer to the store with the state change that caused
//! it; the alerts worker delivers what the store then holds.

use std::time::Duration;

use chrono::TimeDelta;

use super::policy::{self, Policy, REFRESH_FAILED_AFTER, REFRESH_FAILED_CRITICAL_WITHIN};
use crate::model::{AlertFacts, ConnectionRow, State, Timestamp};

fn sub(t: Timestamp, d: Duration) -> Option<Timestamp> {
    t.checked_sub_signed(TimeDelta::from_std(d).ok()?)
}

fn add(t: Timestamp, d: Duration) -> Option<Timestamp> {
    t.checked_add_signed(TimeDelta::from_std(d).ok()?)
}

/// The deadline alerts speak of: the stored one, else the policy's estimate.
fn deadline_of(row: &ConnectionRow) -> Option<Timestamp> {
    row.conn
        .deadline
        .or_else(|| policy::deadline(&row.conn).map(|(d, _)| d))
}

/// The connection-bound alerts whose condition holds at `now` (DESIGN §8).
///
/// - `needs_secret` / `needs_reauthorization` while in that state;
/// - `expiry_approaching` at the latest `warn_before` point passed, while
///   `active` or `retrying` (critical at the last point);
/// - `secret_expiring` from `secret_warn_before` ahead of Expires On until it
///   passes (not while `needs_secret`, which says more);
/// - `refresh_failed` once transient failures have lasted an hour, while
///   `active` or `retrying` (critical under 24 h to the deadline);
/// - nothing for a `disabled` connection.
pub fn desired(row: &ConnectionRow, policy: &Policy, now: Timestamp) -> Vec<AlertFacts> {
    let c = &row.conn;
    let deadline = deadline_of(row);
    let mut out = Vec::new();
    match c.state {
        State::Disabled => return out,
        State::NeedsSecret => out.push(AlertFacts::needs_secret(row, deadline)),
        State::NeedsReauthorization => out.push(AlertFacts::needs_reauthorization(row)),
        State::Active | State::Retrying => {
            if let Some(d) = deadline
                && let Some(point) = policy::expiry_warning(d, &policy.warn_before, now)
            {
                out.push(AlertFacts::expiry_approaching(
                    row,
                    d,
                    point.before,
                    point.severity(),
                ));
            }
            if let (Some(since), Some(severity)) = (
                row.failing_since,
                policy::refresh_failed_alert(row.failing_since, deadline, now),
            ) {
                out.push(AlertFacts::refresh_failed(row, deadline, since, severity));
            }
        }
        State::PendingAuthorization => {}
    }
    if c.state != State::NeedsSecret
        && policy::secret_warning(c.secret_expires_at, policy.secret_warn_before, now)
        && let Some(expires) = c.secret_expires_at
    {
        out.push(AlertFacts::secret_expiring(row, expires));
    }
    out
}

/// The next moment after `now` at which [`desired`] could answer differently
/// with nothing but time passing, so the scheduler can wake then; `None`
/// when only a change to the connection can change it.
pub fn next_change(row: &ConnectionRow, policy: &Policy, now: Timestamp) -> Option<Timestamp> {
    let c = &row.conn;
    if c.state == State::Disabled {
        return None;
    }
    let deadline = deadline_of(row);
    let mut points: Vec<Option<Timestamp>> = Vec::new();
    if c.state.is_scheduled() {
        if let Some(d) = deadline {
            points.extend(policy.warn_before.iter().map(|b| sub(d, *b)));
        }
        if let Some(since) = row.failing_since {
            points.push(add(since, REFRESH_FAILED_AFTER));
            if let Some(d) = deadline {
                points.push(sub(d, REFRESH_FAILED_CRITICAL_WITHIN));
            }
        }
    }
    if c.state != State::NeedsSecret
        && let Some(e) = c.secret_expires_at
    {
        points.push(sub(e, policy.secret_warn_before));
        points.push(Some(e));
    }
    points.into_iter().flatten().filter(|t| *t > now).min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AlertKind, Connection, Mode, Severity};
    use chrono::TimeZone;
    use std::collections::BTreeMap;
    use uuid::Uuid;

    const DAY: Duration = Duration::from_secs(86_400);

    fn t(day: u32, hour: u32) -> Timestamp {
        chrono::Utc
            .with_ymd_and_hms(2026, 3, day, hour, 0, 0)
            .single()
            .unwrap()
    }

    fn row(state: State) -> ConnectionRow {
        ConnectionRow {
            conn: Connection {
                id: Uuid::new_v4(),
                name: "acme".into(),
                instance: "acme.acumatica.com".into(),
                client_id: "X@T".into(),
                labels: BTreeMap::from([("customer".into(), "ACME Corp".into())]),
                mode: Mode::Absolute,
                lifetime: 30 * DAY,
                absolute_lifetime: None,
                secret_expires_at: None,
                grant_issued_at: Some(t(1, 0)),
                refresh_token_issued_at: Some(t(1, 0)),
                access_expires_at: None,
                deadline: Some(t(31, 0)),
                deadline_source: None,
                next_refresh_at: None,
                last_refresh_at: None,
                last_error: None,
                state,
            },
            failures: 0,
            failing_since: None,
            outcome_unknown: false,
            has_client_secret: true,
            has_refresh_token: true,
            has_access_token: false,
            token_type: None,
            access_lifetime: None,
            claim: None,
            version: 0,
            change_seq: 0,
        }
    }

    fn kinds(v: &[AlertFacts]) -> Vec<(AlertKind, Severity)> {
        v.iter().map(|f| (f.kind, f.severity)).collect()
    }

    #[test]
    fn states_that_need_a_human_alert_and_disabled_never_does() {
        let p = Policy::default();
        let ns = desired(&row(State::NeedsSecret), &p, t(10, 0));
        assert_eq!(kinds(&ns), [(AlertKind::NeedsSecret, Severity::Critical)]);
        assert!(ns[0].action.contains("SM303010"));
        assert!(ns[0].action.contains("acutoken connection set-secret acme"));
        assert!(ns[0].action.contains("2026-03-31T00:00:00Z"));
        let nr = desired(&row(State::NeedsReauthorization), &p, t(10, 0));
        assert_eq!(
            kinds(&nr),
            [(AlertKind::NeedsReauthorization, Severity::Critical)]
        );
        assert!(nr[0].action.contains("acutoken connection authorize acme"));
        let mut r = row(State::Disabled);
        r.conn.secret_expires_at = Some(t(12, 0));
        r.failing_since = Some(t(1, 0));
        assert!(desired(&r, &p, t(30, 0)).is_empty());
        assert_eq!(next_change(&r, &p, t(1, 0)), None);
    }

    #[test]
    fn expiry_fires_at_the_latest_point_and_is_critical_at_the_last() {
        let p = Policy::default();
        let r = row(State::Active);
        assert!(desired(&r, &p, t(23, 23)).is_empty());
        assert_eq!(next_change(&r, &p, t(23, 23)), Some(t(24, 0)));
        let w = desired(&r, &p, t(28, 1));
        assert_eq!(
            kinds(&w),
            [(AlertKind::ExpiryApproaching, Severity::Warning)]
        );
        assert!(w[0].summary.contains("3d"), "{}", w[0].summary);
        assert_eq!(next_change(&r, &p, t(28, 1)), Some(t(30, 0)));
        let c = desired(&r, &p, t(30, 1));
        assert_eq!(
            kinds(&c),
            [(AlertKind::ExpiryApproaching, Severity::Critical)]
        );
        let mut pending = row(State::PendingAuthorization);
        pending.conn.deadline = Some(t(31, 0));
        assert!(desired(&pending, &p, t(30, 1)).is_empty());
    }

    #[test]
    fn secret_warning_starts_ahead_of_expires_on() {
        let p = Policy::default();
        let mut r = row(State::Active);
        r.conn.deadline = None;
        r.conn.grant_issued_at = None;
        r.conn.refresh_token_issued_at = None;
        r.conn.secret_expires_at = Some(t(20, 0));
        assert!(desired(&r, &p, t(5, 23)).is_empty());
        assert_eq!(next_change(&r, &p, t(5, 23)), Some(t(6, 0)));
        assert_eq!(
            kinds(&desired(&r, &p, t(6, 0))),
            [(AlertKind::SecretExpiring, Severity::Warning)]
        );
        assert_eq!(next_change(&r, &p, t(6, 0)), Some(t(20, 0)));
        assert!(desired(&r, &p, t(20, 0)).is_empty());
    }

    #[test]
    fn refresh_failed_after_an_hour_and_critical_near_the_deadline() {
        let p = Policy::default();
        let mut r = row(State::Retrying);
        r.failing_since = Some(t(10, 0));
        r.failures = 4;
        r.conn.last_error = Some("x".repeat(10_000));
        assert!(desired(&r, &p, t(10, 0) + TimeDelta::minutes(59)).is_empty());
        assert_eq!(next_change(&r, &p, t(10, 0)), Some(t(10, 1)));
        let w = desired(&r, &p, t(10, 1));
        assert_eq!(kinds(&w), [(AlertKind::RefreshFailed, Severity::Warning)]);
        assert!(
            w[0].summary.chars().count() < 1000,
            "long error texts are cut"
        );
        r.failing_since = Some(t(29, 0));
        let c = desired(&r, &p, t(30, 1));
        assert!(kinds(&c).contains(&(AlertKind::RefreshFailed, Severity::Critical)));
    }
}
