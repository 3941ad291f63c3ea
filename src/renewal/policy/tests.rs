use std::time::Duration;

use proptest::prelude::*;
use uuid::Uuid;

use super::*;
use crate::model::{Severity, parse_time};

const MIN: u64 = 60;

fn t(s: &str) -> Timestamp {
    parse_time(s).unwrap()
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn days(n: u64) -> Duration {
    secs(n * DAY)
}

fn conn(mode: Mode) -> Connection {
    Connection {
        id: Uuid::nil(),
        name: "acme".into(),
        instance: "acme.acumatica.com".into(),
        client_id: "88358B02-A48D-A50E-F710-39C1636C30F6@Acme".into(),
        labels: Default::default(),
        mode,
        lifetime: days(30),
        absolute_lifetime: None,
        secret_expires_at: None,
        grant_issued_at: Some(t("2026-01-01T00:00:00Z")),
        refresh_token_issued_at: Some(t("2026-01-01T00:00:00Z")),
        access_expires_at: None,
        deadline: None,
        deadline_source: None,
        next_refresh_at: None,
        last_refresh_at: Some(t("2026-01-01T00:00:00Z")),
        last_error: None,
        state: State::Active,
    }
}

fn no_probe() -> Policy {
    Policy {
        probe_interval: Duration::ZERO,
        ..Policy::default()
    }
}

fn plan(c: &Connection, p: &Policy, now: &str, r: f64) -> Plan {
    plan_refresh(c, p, t(now), r).unwrap()
}

// ---- deadlines ----

#[test]
fn absolute_deadline_counts_from_the_grant() {
    let mut c = conn(Mode::Absolute);
    c.refresh_token_issued_at = Some(t("2026-01-20T00:00:00Z"));
    assert_eq!(
        deadline(&c),
        Some((t("2026-01-31T00:00:00Z"), DeadlineSource::Observed))
    );
}

#[test]
fn absolute_deadline_without_grant_is_assumed_and_then_kept() {
    let mut c = conn(Mode::Absolute);
    c.grant_issued_at = None;
    c.refresh_token_issued_at = Some(t("2026-01-05T00:00:00Z"));
    assert_eq!(
        deadline(&c),
        Some((t("2026-02-04T00:00:00Z"), DeadlineSource::Assumed))
    );
    c.deadline = Some(t("2026-02-04T00:00:00Z"));
    c.deadline_source = Some(DeadlineSource::Assumed);
    c.refresh_token_issued_at = Some(t("2026-01-20T00:00:00Z"));
    assert_eq!(
        deadline(&c),
        Some((t("2026-02-04T00:00:00Z"), DeadlineSource::Assumed))
    );
}

#[test]
fn sliding_deadline_is_capped_by_the_absolute_lifetime() {
    let mut c = conn(Mode::Sliding);
    c.refresh_token_issued_at = Some(t("2026-01-20T00:00:00Z"));
    assert_eq!(deadline(&c).unwrap().0, t("2026-02-19T00:00:00Z"));
    c.absolute_lifetime = Some(days(40));
    assert_eq!(
        deadline(&c),
        Some((t("2026-02-10T00:00:00Z"), DeadlineSource::Observed))
    );
}

#[test]
fn sliding_deadline_without_grant_is_assumed_from_the_token() {
    let mut c = conn(Mode::Sliding);
    c.grant_issued_at = None;
    c.absolute_lifetime = Some(days(40));
    c.refresh_token_issued_at = Some(t("2026-01-20T00:00:00Z"));
    assert_eq!(
        deadline(&c),
        Some((t("2026-02-19T00:00:00Z"), DeadlineSource::Assumed))
    );
}

#[test]
fn no_token_times_means_no_deadline() {
    let mut c = conn(Mode::Sliding);
    c.grant_issued_at = None;
    c.refresh_token_issued_at = None;
    assert_eq!(deadline(&c), None);
    c.grant_issued_at = Some(t("2026-01-01T00:00:00Z"));
    assert_eq!(deadline(&c).unwrap().0, t("2026-01-31T00:00:00Z"));
}

#[test]
fn an_observed_correction_is_kept() {
    let mut c = conn(Mode::Absolute);
    c.deadline = Some(t("2026-03-01T00:00:00Z"));
    c.deadline_source = Some(DeadlineSource::Observed);
    assert_eq!(
        deadline(&c),
        Some((t("2026-03-01T00:00:00Z"), DeadlineSource::Observed))
    );

    let mut s = conn(Mode::Sliding);
    s.absolute_lifetime = Some(days(40));
    s.deadline = Some(t("2026-03-01T00:00:00Z"));
    s.deadline_source = Some(DeadlineSource::Observed);
    s.refresh_token_issued_at = Some(t("2026-03-05T00:00:00Z"));
    // The cap (Feb 10) was disproved; the deadline slides on from the token.
    assert_eq!(deadline(&s).unwrap().0, t("2026-04-04T00:00:00Z"));
}

#[test]
fn a_later_stored_assumed_deadline_does_not_override_a_known_grant() {
    let mut c = conn(Mode::Absolute);
    c.deadline = Some(t("2026-03-01T00:00:00Z"));
    c.deadline_source = Some(DeadlineSource::Assumed);
    assert_eq!(deadline(&c).unwrap().0, t("2026-01-31T00:00:00Z"));
}

// ---- when to refresh ----

#[test]
fn sliding_renews_at_the_fraction_minus_jitter() {
    // 0.66 × 30 d = 19 d 19 h 12 m; jitter cap min(6 h, 3 d) = 6 h.
    let c = conn(Mode::Sliding);
    let p = plan(&c, &no_probe(), "2026-01-01T00:00:00Z", 0.0);
    assert_eq!(p.at, t("2026-01-20T19:12:00Z"));
    assert_eq!(p.reason, PlanReason::Renew);
    let p = plan(&c, &no_probe(), "2026-01-01T00:00:00Z", 0.5);
    assert_eq!(p.at, t("2026-01-20T16:12:00Z"));
}

#[test]
fn the_probe_wins_when_earlier_in_both_modes() {
    for mode in [Mode::Sliding, Mode::Absolute] {
        let mut c = conn(mode);
        c.last_refresh_at = Some(t("2026-01-10T00:00:00Z"));
        let p = plan(&c, &Policy::default(), "2026-01-10T00:00:00Z", 0.5);
        assert_eq!(p.at, t("2026-01-10T21:00:00Z"), "{mode}");
        assert_eq!(p.reason, PlanReason::Probe);
    }
}

#[test]
fn the_probe_counts_from_the_later_of_refresh_and_issue() {
    let mut c = conn(Mode::Absolute);
    c.last_refresh_at = Some(t("2026-01-02T00:00:00Z"));
    c.refresh_token_issued_at = Some(t("2026-01-05T00:00:00Z"));
    let p = plan(&c, &Policy::default(), "2026-01-05T00:00:00Z", 0.0);
    assert_eq!(p.at, t("2026-01-06T00:00:00Z"));
}

#[test]
fn probe_jitter_is_at_most_half_the_interval() {
    let mut c = conn(Mode::Absolute);
    c.last_refresh_at = Some(t("2026-01-10T00:00:00Z"));
    let policy = Policy {
        probe_interval: secs(2 * HOUR),
        ..Policy::default()
    };
    let p = plan(&c, &policy, "2026-01-10T00:00:00Z", 0.999_999);
    assert!(p.at >= t("2026-01-10T00:59:59Z") && p.at <= t("2026-01-10T02:00:00Z"));
}

#[test]
fn absolute_without_probe_refreshes_a_margin_before_the_deadline() {
    // margin min(4 × 1 h, 3 d) = 4 h, then jitter 0.5 × 6 h.
    let mut c = conn(Mode::Absolute);
    c.last_refresh_at = Some(t("2026-01-10T00:00:00Z"));
    let p = plan(&c, &no_probe(), "2026-01-10T00:00:00Z", 0.5);
    assert_eq!(p.at, t("2026-01-30T17:00:00Z"));
    assert_eq!(p.reason, PlanReason::BeforeDeadline);
}

#[test]
fn a_probe_past_the_deadline_is_pulled_before_it() {
    let mut c = conn(Mode::Absolute);
    c.last_refresh_at = Some(t("2026-01-30T10:00:00Z"));
    let p = plan(&c, &Policy::default(), "2026-01-30T10:00:00Z", 0.0);
    assert_eq!(p.at, t("2026-01-30T20:00:00Z"));
    assert_eq!(p.reason, PlanReason::BeforeDeadline);
}

#[test]
fn once_the_margin_refresh_is_done_the_final_attempt_waits_for_the_deadline() {
    // Satisfied by any refresh after Jan 30 14:00 (deadline − 4 h − 6 h).
    let mut c = conn(Mode::Absolute);
    c.last_refresh_at = Some(t("2026-01-30T15:00:00Z"));
    let p = plan(&c, &Policy::default(), "2026-01-30T15:00:00Z", 0.3);
    assert_eq!(p.at, t("2026-01-31T00:00:00Z"));
    assert_eq!(p.reason, PlanReason::AtDeadline);
    let p = plan(&c, &no_probe(), "2026-01-30T15:00:00Z", 0.3);
    assert_eq!(p.reason, PlanReason::AtDeadline);
}

#[test]
fn a_passed_deadline_makes_the_final_attempt_due_now() {
    for mode in [Mode::Sliding, Mode::Absolute] {
        let c = conn(mode);
        let p = plan(&c, &Policy::default(), "2026-02-02T00:00:00Z", 0.7);
        assert_eq!(p.at, t("2026-02-02T00:00:00Z"));
        assert_eq!(p.reason, PlanReason::FinalAttempt);
    }
}

#[test]
fn an_unproven_assumed_deadline_is_due_at_once() {
    let mut c = conn(Mode::Absolute);
    c.grant_issued_at = None;
    c.last_refresh_at = None;
    let p = plan(&c, &Policy::default(), "2026-01-02T00:00:00Z", 0.7);
    assert_eq!(
        (p.at, p.reason),
        (t("2026-01-02T00:00:00Z"), PlanReason::ProveAssumed)
    );
    c.last_refresh_at = Some(t("2026-01-02T00:00:00Z"));
    let p = plan(&c, &Policy::default(), "2026-01-02T00:00:00Z", 0.0);
    assert_eq!(p.reason, PlanReason::Probe);
}

#[test]
fn only_scheduled_states_are_planned() {
    for state in State::ALL {
        let mut c = conn(Mode::Sliding);
        c.state = state;
        let planned = next_refresh(&c, &Policy::default(), t("2026-01-02T00:00:00Z"), 0.0);
        assert_eq!(planned.is_some(), state.is_scheduled(), "{state}");
    }
}

#[test]
fn a_refresh_that_did_not_rotate_satisfies_the_renew_point() {
    // Earliest renew point: Jan 20 19:12 − 6 h = 13:12; the refresh at 20:00 covers it.
    let mut c = conn(Mode::Sliding);
    c.last_refresh_at = Some(t("2026-01-20T20:00:00Z"));
    let p = plan(&c, &Policy::default(), "2026-01-20T20:00:00Z", 0.0);
    assert_eq!(
        (p.at, p.reason),
        (t("2026-01-21T20:00:00Z"), PlanReason::Probe)
    );
    let p = plan(&c, &no_probe(), "2026-01-20T20:00:00Z", 0.0);
    assert_eq!(
        (p.at, p.reason),
        (t("2026-01-30T20:00:00Z"), PlanReason::BeforeDeadline)
    );
}

#[test]
fn sliding_near_its_cap_refreshes_before_the_cap() {
    let mut c = conn(Mode::Sliding);
    c.absolute_lifetime = Some(days(40));
    c.refresh_token_issued_at = Some(t("2026-02-01T00:00:00Z"));
    c.last_refresh_at = Some(t("2026-02-01T00:00:00Z"));
    let p = plan(&c, &no_probe(), "2026-02-01T00:00:00Z", 0.0);
    assert_eq!(
        (p.at, p.reason),
        (t("2026-02-09T20:00:00Z"), PlanReason::BeforeDeadline)
    );
}

// ---- backoff ----

fn backoff_secs(failures: u32, r: f64) -> i64 {
    let now = t("2026-01-01T00:00:00Z");
    (backoff(failures, now, None, None, &Policy::default(), r) - now).num_seconds()
}

#[test]
fn backoff_doubles_from_retry_min_to_retry_max() {
    assert_eq!(backoff_secs(0, 0.5), 60);
    assert_eq!(backoff_secs(1, 0.0), 60);
    assert_eq!(backoff_secs(1, 0.99), 60);
    assert_eq!(backoff_secs(2, 0.5), 90);
    assert_eq!(backoff_secs(3, 0.5), 180);
    assert_eq!(backoff_secs(10, 0.5), 45 * 60);
    assert_eq!(backoff_secs(10, 1.0), 60 * 60);
    assert_eq!(backoff_secs(u32::MAX, 0.5), 45 * 60);
}

#[test]
fn retry_after_is_honoured_even_beyond_retry_max() {
    let now = t("2026-01-01T00:00:00Z");
    let next = backoff(1, now, None, Some(secs(2 * HOUR)), &Policy::default(), 0.0);
    assert_eq!(next, t("2026-01-01T02:00:00Z"));
}

#[test]
fn the_deadline_bounds_backoff_and_beats_retry_after() {
    let now = t("2026-01-01T00:00:00Z");
    let p = Policy::default();
    let dl = |s| Some(t(s));
    assert_eq!(
        backoff(10, now, dl("2026-01-01T01:00:00Z"), None, &p, 0.5),
        t("2026-01-01T00:15:00Z")
    );
    assert_eq!(
        backoff(
            1,
            now,
            dl("2026-01-01T04:00:00Z"),
            Some(secs(2 * HOUR)),
            &p,
            0.0
        ),
        t("2026-01-01T01:00:00Z")
    );
    assert_eq!(
        backoff(3, now, dl("2026-01-01T00:00:10Z"), None, &p, 0.5),
        t("2026-01-01T00:00:05Z")
    );
    // Less than the floor left: the next try is the final attempt, after the deadline.
    assert_eq!(
        backoff(3, now, dl("2026-01-01T00:00:03Z"), None, &p, 0.5),
        t("2026-01-01T00:00:05Z")
    );
}

// ---- state transitions ----

fn failure(kind: FailureKind, failures: u32) -> Failure {
    Failure {
        kind,
        failures,
        retry_after: None,
        unknown_outcome: false,
    }
}

#[test]
fn invalid_client_needs_a_secret_and_is_not_retried() {
    let c = conn(Mode::Absolute);
    let d = after_failure(
        &c,
        &failure(FailureKind::InvalidClient, 1),
        t("2026-01-05T00:00:00Z"),
        &Policy::default(),
        0.0,
    );
    assert_eq!(d.state, State::NeedsSecret);
    assert_eq!(d.next_refresh_at, None);
    assert!(d.last_error.contains("invalid_client"));
}

#[test]
fn invalid_grant_needs_reauthorization() {
    let c = conn(Mode::Sliding);
    let now = t("2026-01-05T00:00:00Z");
    let d = after_failure(
        &c,
        &failure(FailureKind::InvalidGrant, 1),
        now,
        &Policy::default(),
        0.0,
    );
    assert_eq!(
        (d.state, d.next_refresh_at),
        (State::NeedsReauthorization, None)
    );
    assert!(d.last_error.contains("invalid_grant"));

    let lost = Failure {
        unknown_outcome: true,
        ..failure(FailureKind::InvalidGrant, 1)
    };
    let d = after_failure(&c, &lost, now, &Policy::default(), 0.0);
    assert_eq!(d.state, State::NeedsReauthorization);
    assert_eq!(d.last_error, LOST_ROTATED_TOKEN);

    let late = after_failure(
        &c,
        &failure(FailureKind::InvalidGrant, 1),
        t("2026-01-31T00:00:00Z"),
        &Policy::default(),
        0.0,
    );
    assert!(
        late.last_error.contains("2026-01-31T00:00:00Z"),
        "{}",
        late.last_error
    );
}

#[test]
fn transient_failures_retry_with_backoff_before_the_deadline() {
    let c = conn(Mode::Absolute);
    let failed = Failure {
        retry_after: Some(secs(10 * MIN)),
        ..failure(FailureKind::Transient, 3)
    };
    let d = after_failure(
        &c,
        &failed,
        t("2026-01-05T00:00:00Z"),
        &Policy::default(),
        0.5,
    );
    assert_eq!(d.state, State::Retrying);
    assert_eq!(d.next_refresh_at, Some(t("2026-01-05T00:10:00Z")));
}

#[test]
fn transient_failures_after_the_deadline_get_a_bounded_grace() {
    let c = conn(Mode::Absolute);
    let p = Policy::default();
    // Five failures: step 16 m, jittered to 12 m, but the grace ends at 01:00.
    let d = after_failure(
        &c,
        &failure(FailureKind::Transient, 5),
        t("2026-01-31T00:50:00Z"),
        &p,
        0.5,
    );
    assert_eq!(d.state, State::Retrying);
    assert_eq!(d.next_refresh_at, Some(t("2026-01-31T01:00:00Z")));
    let d = after_failure(
        &c,
        &failure(FailureKind::Transient, 6),
        t("2026-01-31T01:00:00Z"),
        &p,
        0.5,
    );
    assert_eq!(
        (d.state, d.next_refresh_at),
        (State::NeedsReauthorization, None)
    );
    assert!(d.last_error.contains("presumed expired"));
}

#[test]
fn success_in_sliding_mode_moves_the_deadline_and_plans_the_next_refresh() {
    let c = conn(Mode::Sliding);
    let now = t("2026-01-20T12:00:00Z");
    let u = after_success(&c, true, Some(secs(3600)), now, &no_probe(), 0.0);
    assert_eq!(u.refresh_token_issued_at, Some(now));
    assert_eq!(u.last_refresh_at, now);
    assert_eq!(u.access_expires_at, Some(t("2026-01-20T13:00:00Z")));
    assert_eq!(u.deadline, Some(t("2026-02-19T12:00:00Z")));
    assert_eq!(u.deadline_source, Some(DeadlineSource::Observed));
    assert_eq!(u.next_refresh_at, Some(t("2026-02-09T07:12:00Z")));
    assert_eq!((u.state, u.outlived_deadline), (State::Active, None));
}

#[test]
fn success_without_rotation_keeps_the_token_time() {
    let c = conn(Mode::Sliding);
    let u = after_success(
        &c,
        false,
        None,
        t("2026-01-05T00:00:00Z"),
        &Policy::default(),
        0.0,
    );
    assert_eq!(u.refresh_token_issued_at, Some(t("2026-01-01T00:00:00Z")));
    assert_eq!(u.deadline, Some(t("2026-01-31T00:00:00Z")));
    assert_eq!(u.access_expires_at, None);
}

#[test]
fn success_keeps_an_assumed_absolute_deadline_in_place() {
    let mut c = conn(Mode::Absolute);
    c.grant_issued_at = None;
    c.last_refresh_at = None;
    let u = after_success(
        &c,
        true,
        Some(secs(3600)),
        t("2026-01-10T00:00:00Z"),
        &Policy::default(),
        0.0,
    );
    assert_eq!(u.deadline, Some(t("2026-01-31T00:00:00Z")));
    assert_eq!(u.deadline_source, Some(DeadlineSource::Assumed));
    assert_eq!(u.next_refresh_at, Some(t("2026-01-11T00:00:00Z")));
}

#[test]
fn success_after_the_deadline_marks_it_observed_and_stays_active() {
    let mut c = conn(Mode::Absolute);
    c.state = State::Retrying;
    c.last_error = Some("x".into());
    let now = t("2026-01-31T00:00:00Z");
    let u = after_success(&c, true, Some(secs(3600)), now, &Policy::default(), 0.0);
    assert_eq!(u.outlived_deadline, Some(now));
    assert_eq!(u.deadline, Some(t("2026-03-02T00:00:00Z")));
    assert_eq!(u.deadline_source, Some(DeadlineSource::Observed));
    u.apply(&mut c);
    assert_eq!((c.state, c.last_error.clone()), (State::Active, None));
    assert_eq!(
        deadline(&c),
        Some((t("2026-03-02T00:00:00Z"), DeadlineSource::Observed))
    );
    assert_eq!(c.next_refresh_at, Some(t("2026-02-01T00:00:00Z")));
    // A later success does not move the corrected absolute deadline again.
    let again = after_success(
        &c,
        true,
        None,
        t("2026-02-01T00:00:00Z"),
        &Policy::default(),
        0.0,
    );
    assert_eq!(
        (again.deadline, again.outlived_deadline),
        (Some(t("2026-03-02T00:00:00Z")), None)
    );
}

#[test]
fn an_expired_secret_means_needs_secret() {
    let mut c = conn(Mode::Absolute);
    assert!(!secret_expired(&c, t("2026-01-05T00:00:00Z")));
    c.secret_expires_at = Some(t("2026-01-05T00:00:00Z"));
    assert!(!secret_expired(&c, t("2026-01-04T23:59:59Z")));
    assert!(secret_expired(&c, t("2026-01-05T00:00:00Z")));
    let d = expired_secret_decision(&c, t("2026-01-05T00:00:00Z")).unwrap();
    assert_eq!((d.state, d.next_refresh_at), (State::NeedsSecret, None));
    assert!(expired_secret_decision(&c, t("2026-01-04T00:00:00Z")).is_none());
}

// ---- access tokens and alerts ----

#[test]
fn access_token_margin_is_capped_at_half_its_lifetime() {
    let now = t("2026-01-01T00:00:00Z");
    let m = secs(5 * MIN);
    let at = |s: &str| Some(t(s));
    assert!(access_token_usable(
        at("2026-01-01T00:10:00Z"),
        None,
        m,
        now
    ));
    assert!(!access_token_usable(
        at("2026-01-01T00:04:00Z"),
        None,
        m,
        now
    ));
    assert!(!access_token_usable(
        at("2026-01-01T00:05:00Z"),
        None,
        m,
        now
    ));
    assert!(access_token_usable(
        at("2026-01-01T00:04:00Z"),
        Some(secs(6 * MIN)),
        m,
        now
    ));
    assert!(!access_token_usable(
        at("2026-01-01T00:02:00Z"),
        Some(secs(6 * MIN)),
        m,
        now
    ));
    assert!(!access_token_usable(None, Some(secs(3600)), m, now));
}

#[test]
fn expiry_warning_fires_the_latest_point_passed() {
    let d = t("2026-01-31T00:00:00Z");
    let wb = Policy::default().warn_before;
    assert_eq!(expiry_warning(d, &wb, t("2026-01-23T23:59:59Z")), None);
    let w = expiry_warning(d, &wb, t("2026-01-24T00:00:00Z")).unwrap();
    assert_eq!((w.before, w.severity()), (days(7), Severity::Warning));
    let w = expiry_warning(d, &wb, t("2026-01-29T12:00:00Z")).unwrap();
    assert_eq!((w.before, w.last), (days(3), false));
    let w = expiry_warning(d, &[days(1), days(7), days(3)], t("2026-01-30T00:00:00Z")).unwrap();
    assert_eq!((w.before, w.severity()), (days(1), Severity::Critical));
    assert_eq!(expiry_warning(d, &[], t("2026-01-30T00:00:00Z")), None);
}

#[test]
fn secret_warning_holds_until_the_secret_expires() {
    let e = Some(t("2026-02-01T00:00:00Z"));
    assert!(!secret_warning(e, days(14), t("2026-01-17T23:59:59Z")));
    assert!(secret_warning(e, days(14), t("2026-01-18T00:00:00Z")));
    assert!(!secret_warning(e, days(14), t("2026-02-01T00:00:00Z")));
    assert!(!secret_warning(None, days(14), t("2026-01-20T00:00:00Z")));
}

#[test]
fn refresh_failed_fires_after_an_hour_and_is_critical_near_the_deadline() {
    let since = Some(t("2026-01-01T00:00:00Z"));
    let dl = |s| Some(t(s));
    assert_eq!(
        refresh_failed_alert(None, None, t("2026-01-02T00:00:00Z")),
        None
    );
    assert_eq!(
        refresh_failed_alert(since, None, t("2026-01-01T00:59:59Z")),
        None
    );
    assert_eq!(
        refresh_failed_alert(since, None, t("2026-01-01T01:00:00Z")),
        Some(Severity::Warning)
    );
    assert_eq!(
        refresh_failed_alert(since, dl("2026-01-03T01:00:00Z"), t("2026-01-01T01:00:00Z")),
        Some(Severity::Warning)
    );
    assert_eq!(
        refresh_failed_alert(since, dl("2026-01-02T00:59:59Z"), t("2026-01-01T01:00:00Z")),
        Some(Severity::Critical)
    );
    assert_eq!(
        refresh_failed_alert(since, dl("2026-01-01T00:30:00Z"), t("2026-01-01T01:00:00Z")),
        Some(Severity::Critical)
    );
}

#[test]
fn extreme_inputs_do_not_panic() {
    let mut c = conn(Mode::Sliding);
    c.lifetime = Duration::MAX;
    c.absolute_lifetime = Some(Duration::MAX);
    let p = Policy {
        renew_at: 1.0,
        jitter: Duration::MAX,
        retry_max: Duration::MAX,
        probe_interval: Duration::MAX,
        ..Policy::default()
    };
    assert_eq!(jitter(Duration::MAX, 1.0), Duration::MAX);
    assert!(plan_refresh(&c, &p, t("2026-01-02T00:00:00Z"), 0.999).is_some());
    let now = t("2026-01-02T00:00:00Z");
    assert!(backoff(u32::MAX, now, None, Some(Duration::MAX), &p, 1.0) > now);
    let u = after_success(&c, true, Some(Duration::MAX), now, &p, 1.0);
    assert_eq!(u.state, State::Active);
}

#[test]
fn policy_defaults_match_the_design_and_validate() {
    let p = Policy::default();
    assert_eq!(p.renew_at, 0.66);
    assert_eq!((p.probe_interval, p.jitter), (days(1), secs(6 * HOUR)));
    assert_eq!((p.retry_min, p.retry_max), (secs(60), secs(HOUR)));
    assert_eq!(p.access_token_margin, secs(5 * MIN));
    assert_eq!(p.secret_warn_before, days(14));
    assert_eq!(p.validate(), Ok(()));
    for bad in [0.0, 1.0, f64::NAN, -0.5] {
        let p = Policy {
            renew_at: bad,
            ..Policy::default()
        };
        assert!(matches!(p.validate(), Err(PolicyError::RenewAt(_))));
    }
    let p = Policy {
        retry_min: Duration::ZERO,
        ..Policy::default()
    };
    assert_eq!(p.validate(), Err(PolicyError::ZeroRetryMin));
    let p = Policy {
        retry_min: secs(2 * HOUR),
        ..Policy::default()
    };
    assert!(matches!(p.validate(), Err(PolicyError::RetryBounds { .. })));
}

// ---- properties ----

fn base() -> Timestamp {
    t("2026-01-01T00:00:00Z")
}

fn at(offset: u64) -> Timestamp {
    add(base(), secs(offset))
}

prop_compose! {
    fn any_policy()(
        renew_at in 0.05f64..0.95,
        probe in prop_oneof![Just(0u64), MIN..3 * DAY],
        jitter in 0u64..DAY,
        retry_min in 1u64..10 * MIN,
        extra in 0u64..4 * HOUR,
    ) -> Policy {
        Policy {
            renew_at,
            probe_interval: secs(probe),
            jitter: secs(jitter),
            retry_min: secs(retry_min),
            retry_max: secs(retry_min + extra),
            ..Policy::default()
        }
    }
}

prop_compose! {
    fn any_conn()(
        sliding in any::<bool>(),
        lifetime in HOUR..60 * DAY,
        cap_extra in prop::option::of(0u64..60 * DAY),
        grant_known in any::<bool>(),
        token_after_grant in 0u64..60 * DAY,
        last in prop::option::of(0u64..60 * DAY),
        retrying in any::<bool>(),
    ) -> Connection {
        let mut c = conn(if sliding { Mode::Sliding } else { Mode::Absolute });
        c.lifetime = secs(lifetime);
        c.absolute_lifetime = cap_extra.map(|e| secs(lifetime + e));
        c.grant_issued_at = grant_known.then(base);
        c.refresh_token_issued_at = Some(at(token_after_grant));
        c.last_refresh_at = last.map(at);
        if retrying {
            c.state = State::Retrying;
        }
        c
    }
}

proptest! {
    #[test]
    fn the_plan_is_before_the_deadline_while_time_remains(
        c in any_conn(),
        p in any_policy(),
        now_offset in 0u64..120 * DAY,
        r in 0.0f64..1.0,
    ) {
        let now = at(now_offset);
        let (dl, _) = deadline(&c).unwrap();
        let plan = plan_refresh(&c, &p, now, r).unwrap();
        if now < dl {
            prop_assert!(plan.at <= dl);
            if plan.at == dl {
                // Only the final attempt waits for the deadline, once the margin refresh is done.
                prop_assert_eq!(plan.reason, PlanReason::AtDeadline);
                let earliest = sub(sub(dl, p.deadline_margin(c.lifetime)), p.jitter_cap(c.lifetime));
                prop_assert!(c.last_refresh_at.is_some_and(|l| l >= earliest));
            } else {
                prop_assert!(plan.at < dl);
            }
        } else {
            prop_assert_eq!(plan, Plan { at: now, reason: PlanReason::FinalAttempt });
        }
    }

    #[test]
    fn planned_jitter_stays_within_its_range(
        c in any_conn(),
        p in any_policy(),
        r in -1.0f64..2.0,
    ) {
        let cap = p.jitter_cap(c.lifetime);
        prop_assert!(jitter(cap, r) <= cap);
        prop_assert!(jitter(cap, f64::NAN) == Duration::ZERO);
        let now = at(0);
        let plan = plan_refresh(&c, &p, now, r).unwrap();
        let token = c.refresh_token_issued_at.unwrap();
        match plan.reason {
            PlanReason::Renew => {
                let point = add(token, c.lifetime.mul_f64(p.renew_at));
                prop_assert!(plan.at <= point && plan.at >= sub(point, cap));
            }
            PlanReason::Probe => {
                let from = c.last_refresh_at.map_or(token, |l| l.max(token));
                let point = add(from, p.probe_interval);
                prop_assert!(plan.at <= point);
                prop_assert!(plan.at >= sub(point, cap.min(p.probe_interval / 2)));
                prop_assert!(plan.at > from);
            }
            _ => {}
        }
    }

    #[test]
    fn backoff_stays_within_its_bounds_and_leaves_a_try(
        failures in 0u32..80,
        p in any_policy(),
        left in prop::option::of(0u64..30 * DAY),
        retry_after in prop::option::of(0u64..2 * DAY),
        r in 0.0f64..1.0,
    ) {
        let now = at(0);
        let dl = left.map(at);
        let next = backoff(failures, now, dl, retry_after.map(secs), &p, r);
        let delay = span(now, next);
        prop_assert!(next > now);
        prop_assert!(delay <= p.retry_max.max(secs(retry_after.unwrap_or(0))));
        if let Some(left) = left {
            let floor = BACKOFF_FLOOR.min(p.retry_min);
            if secs(left) > floor {
                prop_assert!(next < at(left));
                prop_assert!(delay <= (secs(left) / 4).max(floor));
            }
        } else if retry_after.is_none() {
            prop_assert!(delay >= p.retry_min);
        }
    }

    #[test]
    fn a_terminal_error_never_leads_back_to_automatic_retries(
        c in any_conn(),
        p in any_policy(),
        kind in prop_oneof![Just(FailureKind::Transient), Just(FailureKind::InvalidClient), Just(FailureKind::InvalidGrant)],
        failures in 1u32..30,
        unknown in any::<bool>(),
        now_offset in 0u64..120 * DAY,
        r in 0.0f64..1.0,
    ) {
        let now = at(now_offset);
        let f = Failure { kind, failures, retry_after: None, unknown_outcome: unknown };
        let d = after_failure(&c, &f, now, &p, r);
        if kind != FailureKind::Transient {
            prop_assert!(d.state.needs_human());
        }
        let mut after = c.clone();
        d.apply(&mut after);
        if d.state.needs_human() {
            prop_assert_eq!(d.next_refresh_at, None);
            prop_assert_eq!(plan_refresh(&after, &p, now, r), None);
            // Nor does time passing bring it back.
            prop_assert_eq!(plan_refresh(&after, &p, add(now, days(365)), r), None);
        } else {
            prop_assert_eq!(d.state, State::Retrying);
            prop_assert!(d.next_refresh_at.is_some_and(|n| n > now));
        }
    }

    #[test]
    fn absolute_mode_never_moves_a_deadline(
        mut c in any_conn(),
        p in any_policy(),
        steps in prop::collection::vec((0.0f64..0.2, any::<bool>(), 0.0f64..1.0), 1..12),
    ) {
        c.mode = Mode::Absolute;
        let (first, _) = deadline(&c).unwrap();
        let mut now = c.refresh_token_issued_at.unwrap();
        for (fraction, rotated, r) in steps {
            now = add(now, c.lifetime.mul_f64(fraction));
            if now >= first {
                break;
            }
            after_success(&c, rotated, Some(secs(3600)), now, &p, r).apply(&mut c);
            prop_assert_eq!(deadline(&c).unwrap().0, first);
            prop_assert_eq!(c.deadline, Some(first));
        }
    }

    #[test]
    fn sliding_never_moves_a_deadline_past_the_cap_or_backwards(
        mut c in any_conn(),
        p in any_policy(),
        cap in HOUR..90 * DAY,
        steps in prop::collection::vec((0.0f64..0.3, any::<bool>(), 0.0f64..1.0), 1..12),
    ) {
        c.mode = Mode::Sliding;
        c.grant_issued_at = Some(base());
        c.absolute_lifetime = Some(secs(cap));
        let limit = at(cap);
        let (mut current, _) = deadline(&c).unwrap();
        prop_assert!(current <= limit);
        let mut now = c.refresh_token_issued_at.unwrap();
        for (fraction, rotated, r) in steps {
            now = add(now, c.lifetime.mul_f64(fraction));
            if now >= current {
                break;
            }
            let u = after_success(&c, rotated, None, now, &p, r);
            prop_assert_eq!(u.outlived_deadline, None);
            u.apply(&mut c);
            let (next, _) = deadline(&c).unwrap();
            prop_assert!(next <= limit);
            prop_assert!(next >= current);
            current = next;
        }
    }
}
