//! Extreme values from servers, files and the store pushed through response
//! parsing and planning (issue 12, item 1). Whatever comes in, nothing panics
//! (debug builds check overflow too), and in the range real clocks live in
//! the plans stay sane: a fresh grant's access token lives at most
//! [`MAX_ACCESS_LIFETIME`], and after a grant or a success the next refresh is
//! never planned before now.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use oauth2::TokenResponse as _;
use proptest::prelude::*;
use uuid::Uuid;

use super::*;
use crate::acumatica::response::{AcumaticaTokenResponse, ExpiresIn};
use crate::model::ConnectionRow;
use crate::model::MAX_ACCESS_LIFETIME;
use crate::renewal::planning;
use crate::store::{from_ms, to_ms};

const YEAR: u64 = 365 * 24 * 3600;

/// Durations a config file, the store or a server could supply.
fn any_duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::from_secs(1)),
        Just(Duration::from_secs(1 << 31)),
        Just(Duration::from_secs(10_000_000_000_000)),
        Just(Duration::from_secs(i64::MAX as u64)),
        Just(Duration::from_secs(u64::MAX)),
        Just(Duration::MAX),
        any::<u64>().prop_map(Duration::from_secs),
        (0u64..100 * YEAR).prop_map(Duration::from_secs),
    ]
}

/// Durations as a sane config has them (up to a few thousand years), but
/// including zero and one second.
fn sane_duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        Just(Duration::ZERO),
        Just(Duration::from_secs(1)),
        (0u64..10 * YEAR).prop_map(Duration::from_secs),
        (0u64..5000 * YEAR).prop_map(Duration::from_secs),
    ]
}

/// Times as the store could hand them back, chrono's limits included.
fn any_time() -> impl Strategy<Value = Timestamp> {
    prop_oneof![
        Just(DateTime::<Utc>::MIN_UTC),
        Just(DateTime::<Utc>::MAX_UTC),
        Just(from_ms(i64::MAX)),
        Just(from_ms(i64::MIN)),
        Just(from_ms(0)),
        any::<i64>().prop_map(from_ms),
        sane_time(),
    ]
}

/// Times a real clock shows: 1970 to about 2300.
fn sane_time() -> impl Strategy<Value = Timestamp> {
    (0i64..330 * YEAR as i64 * 1000).prop_map(from_ms)
}

fn any_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(0.0),
        Just(1.0),
        Just(-1.0),
        Just(f64::MAX),
        any::<f64>(),
        0.0f64..1.0,
    ]
}

fn any_state() -> impl Strategy<Value = State> {
    prop::sample::select(State::ALL.to_vec())
}

prop_compose! {
    /// A policy as an unvalidated config could make it.
    fn wild_policy()(
        renew_at in any_f64(),
        probe_interval in any_duration(),
        jitter in any_duration(),
        retry_min in any_duration(),
        retry_max in any_duration(),
        access_token_margin in any_duration(),
        warn_before in prop::collection::vec(any_duration(), 0..4),
        secret_warn_before in any_duration(),
    ) -> Policy {
        Policy {
            renew_at, probe_interval, jitter, retry_min, retry_max,
            access_token_margin, warn_before, secret_warn_before,
        }
    }
}

prop_compose! {
    /// A policy that passes `Policy::validate`, with durations up to thousands of years.
    fn sane_policy()(
        renew_at in 0.01f64..0.99,
        probe_interval in sane_duration(),
        jitter in sane_duration(),
        retry_min in 1u64..10 * YEAR,
        extra in sane_duration(),
    ) -> Policy {
        let retry_min = Duration::from_secs(retry_min);
        Policy {
            renew_at,
            probe_interval,
            jitter,
            retry_min,
            retry_max: retry_min + extra,
            ..Policy::default()
        }
    }
}

fn connection(
    mode: Mode,
    lifetime: Duration,
    absolute_lifetime: Option<Duration>,
    times: [Option<Timestamp>; 7],
    deadline_source: Option<DeadlineSource>,
    state: State,
) -> Connection {
    let [
        secret_expires_at,
        grant_issued_at,
        refresh_token_issued_at,
        access_expires_at,
        deadline,
        next_refresh_at,
        last_refresh_at,
    ] = times;
    Connection {
        id: Uuid::nil(),
        name: "acme".into(),
        instance: "acme.acumatica.com".into(),
        client_id: "88358B02-A48D-A50E-F710-39C1636C30F6@Acme".into(),
        labels: BTreeMap::new(),
        mode,
        lifetime,
        absolute_lifetime,
        secret_expires_at,
        grant_issued_at,
        refresh_token_issued_at,
        access_expires_at,
        deadline,
        deadline_source,
        next_refresh_at,
        last_refresh_at,
        last_error: None,
        state,
    }
}

fn any_mode() -> impl Strategy<Value = Mode> {
    prop_oneof![Just(Mode::Absolute), Just(Mode::Sliding)]
}

fn any_source() -> impl Strategy<Value = Option<DeadlineSource>> {
    prop::option::of(prop_oneof![
        Just(DeadlineSource::Assumed),
        Just(DeadlineSource::Observed)
    ])
}

prop_compose! {
    /// A connection row as a corrupt or hand-edited store could hold it.
    fn wild_conn()(
        mode in any_mode(),
        lifetime in any_duration(),
        absolute_lifetime in prop::option::of(any_duration()),
        times in prop::array::uniform7(prop::option::of(any_time())),
        source in any_source(),
        state in any_state(),
    ) -> Connection {
        connection(mode, lifetime, absolute_lifetime, times, source, state)
    }
}

prop_compose! {
    /// A connection whose times a real clock wrote, with lifetimes up to
    /// thousands of years.
    fn sane_conn()(
        mode in any_mode(),
        lifetime in sane_duration(),
        absolute_lifetime in prop::option::of(sane_duration()),
        times in prop::array::uniform7(prop::option::of(sane_time())),
        source in any_source(),
        state in prop_oneof![Just(State::Active), Just(State::Retrying)],
    ) -> Connection {
        connection(mode, lifetime, absolute_lifetime, times, source, state)
    }
}

fn row(conn: Connection) -> ConnectionRow {
    ConnectionRow {
        conn,
        failures: 0,
        failing_since: None,
        outcome_unknown: false,
        has_client_secret: true,
        has_refresh_token: true,
        has_access_token: true,
        token_type: Some("Bearer".into()),
        access_lifetime: None,
        claim: None,
        version: 1,
        change_seq: 1,
    }
}

/// `expires_in` as a hostile token endpoint might write it (JSON text).
fn any_expires_in() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_string()),
        Just("1".to_string()),
        Just("2147483648".to_string()),
        Just("9223372036854775807".to_string()),
        Just("9223372036854775808".to_string()),
        Just("18446744073709551615".to_string()),
        Just("184467440737095516150000".to_string()),
        Just("1e400".to_string()),
        Just("-1e400".to_string()),
        Just("\"NaN\"".to_string()),
        Just("\"-inf\"".to_string()),
        Just("null".to_string()),
        Just("true".to_string()),
        Just("[1]".to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(|f| format!("{f:e}")),
        any::<u64>().prop_map(|n| format!("\"{n}\"")),
        any::<f64>().prop_map(|f| format!("\"{f}\"")),
        "[0-9eE.+-]{1,30}".prop_map(|s| format!("\"{s}\"")),
        "[0-9]{1,40}(\\.[0-9]{1,5})?([eE][+-]?[0-9]{1,4})?",
        "-[0-9]{1,40}(\\.[0-9]{1,5})?",
        any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
    ]
}

proptest! {
    #[test]
    fn no_expires_in_costs_the_answer_or_exceeds_the_bound(value in any_expires_in()) {
        let body = format!(r#"{{"access_token":"AT","refresh_token":"RT2","expires_in":{value}}}"#);
        if serde_json::from_str::<serde::de::IgnoredAny>(&body).is_err() {
            // Not JSON at all (a generated number that is no JSON number): not our case.
            return Ok(());
        }
        let r: AcumaticaTokenResponse = serde_json::from_str(&body)
            .map_err(|e| TestCaseError::fail(format!("{body}: {e}")))?;
        prop_assert_eq!(r.refresh_token().map(|t| t.secret().as_str()), Some("RT2"));
        prop_assert!(r.expires_in().is_none_or(|d| d <= MAX_ACCESS_LIFETIME));
        prop_assert_eq!(r.expires_in(), r.expires_in_seen().lifetime());
        if let Ok(n) = value.parse::<u64>() {
            let want = if n > MAX_ACCESS_LIFETIME.as_secs() {
                ExpiresIn::Clamped
            } else {
                ExpiresIn::Seconds(n)
            };
            prop_assert_eq!(r.expires_in_seen(), want);
        }
    }

    #[test]
    fn stored_times_read_back_without_panicking(ms in any::<i64>()) {
        let t = from_ms(ms);
        if t != DateTime::<Utc>::MIN_UTC {
            prop_assert_eq!(to_ms(t), ms);
        }
        let _ = crate::model::fmt_time(t);
    }

    #[test]
    fn nothing_from_the_store_or_a_config_makes_planning_panic(
        c in wild_conn(),
        p in wild_policy(),
        now in any_time(),
        lifetime in prop::option::of(any_duration()),
        retry_after in prop::option::of(any_duration()),
        kind in prop_oneof![Just(FailureKind::Transient), Just(FailureKind::InvalidClient), Just(FailureKind::InvalidGrant)],
        failures in any::<u32>(),
        rotated in any::<bool>(),
        r in any_f64(),
    ) {
        let _ = deadline(&c);
        let _ = plan_refresh(&c, &p, now, r);
        let _ = backoff(failures, now, c.deadline, retry_after, &p, r);
        let f = Failure { kind, failures, retry_after, unknown_outcome: rotated };
        let _ = after_failure(&c, &f, now, &p, r);
        let u = after_success(&c, rotated, lifetime, now, &p, r);
        prop_assert!(u.access_expires_at.is_none_or(|a| a <= add(now, MAX_ACCESS_LIFETIME)));
        let _ = access_token_usable(c.access_expires_at, lifetime, p.access_token_margin, now);
        let _ = expiry_warning(c.deadline.unwrap_or(now), &p.warn_before, now);
        let _ = secret_warning(c.secret_expires_at, p.secret_warn_before, now);
        let _ = refresh_failed_alert(c.last_refresh_at, c.deadline, now);
        let _ = expired_secret_decision(&c, now);

        let mut fresh = c.clone();
        planning::initial(&mut fresh, rotated, &p, now);
        let mut edited = row(c.clone());
        planning::replan(&mut edited, &p, now);
        let mut resumed = row(c.clone());
        planning::resume(&mut resumed, &p, now);
        let mut granted = row(c);
        planning::granted(&mut granted, lifetime, "Bearer", &p, now);
        prop_assert_eq!(granted.conn.state, State::Active);
        prop_assert!(granted.conn.access_expires_at.is_none_or(|a| a >= now && a <= add(now, MAX_ACCESS_LIFETIME)));
        prop_assert!(granted.access_lifetime.is_none_or(|l| l <= MAX_ACCESS_LIFETIME));
    }

    #[test]
    fn a_grant_or_a_success_plans_sanely_whatever_the_server_said(
        c in sane_conn(),
        p in sane_policy(),
        now in sane_time(),
        value in any_expires_in(),
        rotated in any::<bool>(),
        r in 0.0f64..1.0,
    ) {
        let body = format!(r#"{{"access_token":"AT","expires_in":{value}}}"#);
        let Ok(resp) = serde_json::from_str::<AcumaticaTokenResponse>(&body) else {
            return Ok(());
        };
        let lifetime = resp.expires_in();
        let bound = add(now, MAX_ACCESS_LIFETIME);

        let mut granted = row(c.clone());
        planning::granted(&mut granted, lifetime, "Bearer", &p, now);
        let g = &granted.conn;
        prop_assert_eq!(g.state, State::Active);
        prop_assert_eq!(g.access_expires_at, lifetime.map(|l| add(now, l)));
        prop_assert!(g.access_expires_at.is_none_or(|a| a <= bound));
        let next = g.next_refresh_at;
        prop_assert!(next.is_some_and(|n| n >= now), "{:?} before {}", next, now);

        let u = after_success(&c, rotated, lifetime, now, &p, r);
        prop_assert_eq!(u.state, State::Active);
        prop_assert!(u.access_expires_at.is_none_or(|a| a >= now && a <= bound));
        prop_assert!(u.next_refresh_at.is_some_and(|n| n >= now), "{:?} before {}", u.next_refresh_at, now);
    }

    #[test]
    fn a_transient_failure_retries_later_but_within_a_day_of_what_was_asked(
        c in sane_conn(),
        p in sane_policy(),
        now in sane_time(),
        failures in any::<u32>(),
        retry_after in prop::option::of(0u64..=crate::acumatica::classify::MAX_RETRY_AFTER.as_secs()),
        r in 0.0f64..1.0,
    ) {
        let f = Failure {
            kind: FailureKind::Transient,
            failures,
            retry_after: retry_after.map(Duration::from_secs),
            unknown_outcome: false,
        };
        let d = after_failure(&c, &f, now, &p, r);
        if d.state == State::Retrying {
            prop_assert!(d.next_refresh_at.is_some_and(|n| n > now));
        } else {
            prop_assert_eq!(d.state, State::NeedsReauthorization);
        }
    }
}
