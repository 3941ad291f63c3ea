//! A token endpoint's answer carried on into planning: arbitrary bytes as the
//! body through the lenient token parser, then the grant through
//! `planning::granted` (the code exchange) and `policy::after_success` (a
//! refresh), on a connection whose stored times and lifetimes are arbitrary
//! too. Never panics (overflow included); an access token is never believed
//! to live past `now + MAX_ACCESS_LIFETIME`; a rotated refresh token in a body
//! that parses is always kept.
#![no_main]

use std::time::Duration;

use acutoken::acumatica::response::AcumaticaTokenResponse;
use acutoken::model::{Connection, MAX_ACCESS_LIFETIME, Mode, State, Timestamp, add_saturating};
use acutoken::renewal::planning;
use acutoken::renewal::policy::{self, Policy};
use acutoken::model::ConnectionRow;
use arbitrary::Arbitrary;
use chrono::{DateTime, TimeZone, Utc};
use libfuzzer_sys::fuzz_target;
use oauth2::TokenResponse as _;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Unix milliseconds, as the store keeps times; out of range counts as
    /// the start of time, as the store reads it.
    now_ms: i64,
    times: [Option<i64>; 5],
    sliding: bool,
    lifetime_s: u64,
    absolute_lifetime_s: Option<u64>,
    probe_s: u64,
    jitter_s: u64,
    renew_at: f64,
    rotated: bool,
    rand_unit: f64,
    /// Last, so it takes the rest of the input: a seed is a fixed-size
    /// prefix followed by a token response as the server sent it.
    body: Vec<u8>,
}

fn time(ms: i64) -> Timestamp {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

fuzz_target!(|input: Input| {
    let Ok(token) = serde_json::from_slice::<AcumaticaTokenResponse>(&input.body) else {
        return;
    };
    let lifetime = token.expires_in();
    assert!(lifetime.is_none_or(|l| l <= MAX_ACCESS_LIFETIME));
    assert!(token.refresh_token().is_none_or(|r| !r.secret().is_empty()));

    let now = time(input.now_ms);
    let [grant, issued, deadline, next, last] = input.times.map(|t| t.map(time));
    let conn = Connection {
        id: uuid::Uuid::nil(),
        name: "fuzz".into(),
        instance: "erp.example.com".into(),
        client_id: "88358B02-A48D-A50E-F710-39C1636C30F6@Fuzz".into(),
        labels: Default::default(),
        mode: if input.sliding {
            Mode::Sliding
        } else {
            Mode::Absolute
        },
        lifetime: Duration::from_secs(input.lifetime_s),
        absolute_lifetime: input.absolute_lifetime_s.map(Duration::from_secs),
        secret_expires_at: None,
        grant_issued_at: grant,
        refresh_token_issued_at: issued,
        access_expires_at: None,
        deadline,
        deadline_source: None,
        next_refresh_at: next,
        last_refresh_at: last,
        last_error: None,
        state: State::Active,
    };
    let policy = Policy {
        renew_at: input.renew_at,
        probe_interval: Duration::from_secs(input.probe_s),
        jitter: Duration::from_secs(input.jitter_s),
        ..Policy::default()
    };
    let bound = add_saturating(now, MAX_ACCESS_LIFETIME);

    let mut row = ConnectionRow {
        conn: conn.clone(),
        failures: 0,
        failing_since: None,
        outcome_unknown: false,
        has_client_secret: true,
        has_refresh_token: true,
        has_access_token: true,
        token_type: None,
        access_lifetime: None,
        claim: None,
        version: 1,
        change_seq: 1,
    };
    planning::granted(&mut row, lifetime, token.token_type_str(), &policy, now);
    assert_eq!(row.conn.state, State::Active);
    assert!(
        row.conn
            .access_expires_at
            .is_none_or(|a| a >= now && a <= bound)
    );

    let update = policy::after_success(
        &conn,
        token.refresh_token().is_some() || input.rotated,
        lifetime,
        now,
        &policy,
        input.rand_unit,
    );
    assert_eq!(update.state, State::Active);
    assert!(
        update
            .access_expires_at
            .is_none_or(|a| a >= now && a <= bound)
    );
});
