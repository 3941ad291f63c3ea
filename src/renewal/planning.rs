//! Applying the pure policy to stored connections: first plans, resumes after
//! a human acted, re-plans after edits.

use crate::model::ConnectionRow;
use crate::model::{Connection, MAX_ACCESS_LIFETIME, State, Timestamp, add_saturating};

use super::policy::{self, Policy};

fn rand_unit() -> f64 {
    rand::random::<f64>()
}

/// The first plan of a new connection. Without a refresh token it waits for
/// authorization. A token of unknown age gets `refresh_token_issued_at` = now
/// (the earliest it can be known to exist) and an assumed deadline, and is
/// refreshed at once to learn whether it is alive.
pub fn initial(conn: &mut Connection, has_refresh_token: bool, policy: &Policy, now: Timestamp) {
    if !has_refresh_token {
        conn.state = State::PendingAuthorization;
        conn.deadline = None;
        conn.deadline_source = None;
        conn.next_refresh_at = None;
        return;
    }
    if conn.refresh_token_issued_at.is_none() {
        conn.refresh_token_issued_at = Some(conn.grant_issued_at.unwrap_or(now));
    }
    conn.state = State::Active;
    set_deadline(conn);
    conn.next_refresh_at = policy::next_refresh(conn, policy, now, rand_unit());
    if let Some(d) = policy::expired_secret_decision(conn, now) {
        d.apply(conn);
    }
}

fn set_deadline(conn: &mut Connection) {
    let d = policy::deadline(conn);
    conn.deadline = d.map(|(t, _)| t);
    conn.deadline_source = d.map(|(_, s)| s);
}

/// After a human acted (new secret, enabled): back to scheduled work, with a
/// refresh soon to prove the fix, or back to waiting for authorization.
pub fn resume(row: &mut ConnectionRow, policy: &Policy, now: Timestamp) {
    let c = &mut row.conn;
    if !row.has_refresh_token {
        c.state = State::PendingAuthorization;
        c.next_refresh_at = None;
        return;
    }
    c.state = State::Active;
    c.last_error = None;
    row.failures = 0;
    row.failing_since = None;
    set_deadline(c);
    // Refresh soon: the fix is proven only by a token request that works.
    c.next_refresh_at = Some(now);
    let _ = policy;
}

/// After mode or lifetimes changed: recompute the deadline and the next refresh.
pub fn replan(row: &mut ConnectionRow, policy: &Policy, now: Timestamp) {
    let c = &mut row.conn;
    c.deadline = None;
    c.deadline_source = None;
    if c.refresh_token_issued_at.is_none() && c.grant_issued_at.is_none() {
        return;
    }
    set_deadline(c);
    if c.state == State::Active {
        c.next_refresh_at = policy::next_refresh(c, policy, now, rand_unit());
    }
}

/// The grant no longer applies (new instance or client ID): wait for authorization.
pub fn clear_grant(row: &mut ConnectionRow) {
    let c = &mut row.conn;
    c.state = State::PendingAuthorization;
    c.grant_issued_at = None;
    c.refresh_token_issued_at = None;
    c.access_expires_at = None;
    c.deadline = None;
    c.deadline_source = None;
    c.next_refresh_at = None;
    c.last_refresh_at = None;
    c.last_error = None;
    row.failures = 0;
    row.failing_since = None;
    row.outcome_unknown = false;
    row.has_refresh_token = false;
    row.has_access_token = false;
    row.access_lifetime = None;
    row.token_type = None;
}

/// A fresh grant from the authorization code flow: issued now, deadline known.
pub fn granted(
    row: &mut ConnectionRow,
    access_lifetime: Option<std::time::Duration>,
    token_type: &str,
    policy: &Policy,
    now: Timestamp,
) {
    clear_grant(row);
    let c = &mut row.conn;
    c.grant_issued_at = Some(now);
    c.refresh_token_issued_at = Some(now);
    c.last_refresh_at = Some(now);
    // The parser already bounds `expires_in`; bounding again here keeps a
    // lifetime from any other source (a spill file, a caller) from planning past it.
    let access_lifetime = access_lifetime.map(|d| d.min(MAX_ACCESS_LIFETIME));
    c.access_expires_at = access_lifetime.map(|d| add_saturating(now, d));
    c.state = State::Active;
    set_deadline(c);
    c.next_refresh_at = policy::next_refresh(c, policy, now, rand_unit());
    row.has_refresh_token = true;
    row.has_access_token = true;
    row.access_lifetime = access_lifetime;
    row.token_type = Some(token_type.to_string());
}
