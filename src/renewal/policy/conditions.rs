//! When an access token may be handed out, and when the alert conditions of
//! DESIGN §8 hold. Pure like the rest of the policy.

use std::time::Duration;

use super::{add, span, sub};
use crate::model::{Severity, Timestamp};

/// How long transient failures must persist before `refresh_failed` fires.
pub const REFRESH_FAILED_AFTER: Duration = Duration::from_secs(3600);

/// `refresh_failed` is critical when the deadline is closer than this.
pub const REFRESH_FAILED_CRITICAL_WITHIN: Duration = Duration::from_secs(24 * 3600);

/// True when the access token can be handed out: more than the margin is left.
///
/// The margin is capped at half the token's lifetime (when known, e.g.
/// `access_expires_at - last_refresh_at`), so a short-lived token is still
/// usable for half its life. No expiry known means not usable.
pub fn access_token_usable(
    access_expires_at: Option<Timestamp>,
    issued_lifetime: Option<Duration>,
    margin: Duration,
    now: Timestamp,
) -> bool {
    let Some(expires) = access_expires_at else {
        return false;
    };
    let margin = issued_lifetime.map_or(margin, |l| margin.min(l / 2));
    add(now, margin) < expires
}

/// The `warn_before` point an `expiry_approaching` alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarnPoint {
    /// How long before the deadline this point lies.
    pub before: Duration,
    /// This is the last (smallest) point: the alert is critical.
    pub last: bool,
}

impl WarnPoint {
    /// Warning, or critical at the last point.
    pub fn severity(self) -> Severity {
        if self.last {
            Severity::Critical
        } else {
            Severity::Warning
        }
    }
}

/// The latest `warn_before` point passed for this deadline, if any.
///
/// Only the latest point fires: a connection first seen 2 days before its
/// deadline gets the 3-day point, not the 7-day one as well. The engine asks
/// only for `active` and `retrying` connections; after the deadline the last
/// point stays until the final attempt changes the state.
pub fn expiry_warning(
    deadline: Timestamp,
    warn_before: &[Duration],
    now: Timestamp,
) -> Option<WarnPoint> {
    let last = warn_before.iter().min()?;
    let passed = warn_before
        .iter()
        .filter(|b| sub(deadline, **b) <= now)
        .min()?;
    Some(WarnPoint {
        before: *passed,
        last: passed == last,
    })
}

/// True from `secret_warn_before` ahead of Expires On until it passes (after
/// that the connection is `needs_secret`, which has its own alert).
pub fn secret_warning(
    secret_expires_at: Option<Timestamp>,
    secret_warn_before: Duration,
    now: Timestamp,
) -> bool {
    secret_expires_at.is_some_and(|e| sub(e, secret_warn_before) <= now && now < e)
}

/// The `refresh_failed` condition: transient failures since `failing_since`
/// have lasted [`REFRESH_FAILED_AFTER`]; critical when the deadline is less than
/// [`REFRESH_FAILED_CRITICAL_WITHIN`] away (or passed).
pub fn refresh_failed_alert(
    failing_since: Option<Timestamp>,
    deadline: Option<Timestamp>,
    now: Timestamp,
) -> Option<Severity> {
    let since = failing_since?;
    if span(since, now) < REFRESH_FAILED_AFTER {
        return None;
    }
    match deadline {
        Some(d) if span(now, d) < REFRESH_FAILED_CRITICAL_WITHIN => Some(Severity::Critical),
        _ => Some(Severity::Warning),
    }
}
