//! The words of connection-bound alerts: what happened and the exact next step.

use std::time::Duration;

use crate::model::{Mode, Severity, State, Timestamp, fmt_time};
use crate::store::ConnectionRow;

use super::{AlertFacts, AlertKind};

/// Error texts quoted in an alert are cut to this many characters: a 10 KB
/// HTML error page says nothing more useful than its first lines.
pub(crate) const ERROR_TEXT_MAX: usize = 500;

/// `s` cut to at most `max` characters, with an ellipsis when cut.
pub(crate) fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

fn human(d: Duration) -> String {
    crate::model::fmt_duration(Duration::from_secs(d.as_secs()))
}

fn base(row: &ConnectionRow, kind: AlertKind, severity: Severity) -> AlertFacts {
    let c = &row.conn;
    AlertFacts {
        kind,
        severity,
        connection: c.name.clone(),
        connection_id: Some(c.id),
        labels: c.labels.clone(),
        instance: Some(c.instance.clone()),
        state: Some(c.state),
        summary: String::new(),
        action: String::new(),
        deadline: None,
    }
}

fn last_error(row: &ConnectionRow) -> String {
    match &row.conn.last_error {
        Some(e) if !e.trim().is_empty() => format!(": {}", clip(e.trim(), ERROR_TEXT_MAX)),
        _ => String::new(),
    }
}

/// `needs_secret`.
pub(crate) fn needs_secret(row: &ConnectionRow, deadline: Option<Timestamp>) -> AlertFacts {
    let c = &row.conn;
    let mut f = base(row, AlertKind::NeedsSecret, Severity::Critical);
    f.deadline = deadline;
    f.summary = format!(
        "{} on {} cannot refresh: its client secret was refused or has expired{}",
        c.name,
        c.instance,
        last_error(row)
    );
    let by = deadline.map_or_else(
        || "as soon as possible".to_string(),
        |d| format!("before {}", fmt_time(d)),
    );
    f.action = format!(
        "add a new shared secret on the instance's Connected Applications screen (SM303010) and run `acutoken connection set-secret {}` {by}, or the customer must re-authorize",
        c.name
    );
    f
}

/// The re-authorization step without a link; messages swap in the open
/// link at delivery time (see [`with_link`] and [`without_redirect_uri`]).
pub(crate) fn authorize_step(name: &str) -> String {
    format!("run `acutoken connection authorize {name}` and send the customer the link it prints")
}

/// `needs_reauthorization`.
pub(crate) fn needs_reauthorization(row: &ConnectionRow) -> AlertFacts {
    let c = &row.conn;
    let mut f = base(row, AlertKind::NeedsReauthorization, Severity::Critical);
    f.summary = format!(
        "the refresh token of {} on {} is no longer accepted{}",
        c.name,
        c.instance,
        last_error(row)
    );
    f.action = format!(
        "the customer must re-authorize: {}",
        authorize_step(&c.name)
    );
    f
}

/// `expiry_approaching` at the `before` point.
pub(crate) fn expiry_approaching(
    row: &ConnectionRow,
    deadline: Timestamp,
    before: Duration,
    severity: Severity,
) -> AlertFacts {
    let c = &row.conn;
    let mut f = base(row, AlertKind::ExpiryApproaching, severity);
    f.deadline = Some(deadline);
    f.summary = format!(
        "the refresh token of {} on {} expires at {} (less than {} left{})",
        c.name,
        c.instance,
        fmt_time(deadline),
        human(before),
        match c.deadline_source {
            Some(crate::model::DeadlineSource::Assumed) => "; the deadline is an estimate",
            _ => "",
        }
    );
    let why = match c.mode {
        Mode::Absolute => "the deadline is absolute: refreshing does not move it",
        Mode::Sliding => {
            "refreshes are not sliding the deadline any further (absolute cap reached, or see `acutoken connection history`)"
        }
    };
    f.action = format!(
        "the customer must re-authorize before {} ({why}): {}",
        fmt_time(deadline),
        authorize_step(&c.name)
    );
    f
}

/// `secret_expiring`.
pub(crate) fn secret_expiring(row: &ConnectionRow, expires: Timestamp) -> AlertFacts {
    let c = &row.conn;
    let mut f = base(row, AlertKind::SecretExpiring, Severity::Warning);
    f.deadline = Some(expires);
    f.summary = format!(
        "the client secret of {} on {} expires at {} (its Expires On date)",
        c.name,
        c.instance,
        fmt_time(expires)
    );
    f.action = format!(
        "add a new shared secret on the instance's Connected Applications screen (SM303010) and run `acutoken connection set-secret {} --secret-expires DATE` before {}",
        c.name,
        fmt_time(expires)
    );
    f
}

/// `refresh_failed`.
pub(crate) fn refresh_failed(
    row: &ConnectionRow,
    deadline: Option<Timestamp>,
    since: Timestamp,
    severity: Severity,
) -> AlertFacts {
    let c = &row.conn;
    let mut f = base(row, AlertKind::RefreshFailed, severity);
    f.deadline = deadline;
    f.summary = format!(
        "refreshing {} on {} has failed since {} ({} attempts in a row){}",
        c.name,
        c.instance,
        fmt_time(since),
        row.failures,
        last_error(row)
    );
    let until = deadline.map_or_else(String::new, |d| {
        format!(
            "; it keeps retrying, but if the token is not refreshed by {} the customer must re-authorize",
            fmt_time(d)
        )
    });
    f.action = format!(
        "check that {} is up and reachable from this host (`acutoken connection history {}` shows each failure){until}",
        c.instance, c.name
    );
    f
}

/// What a resolved alert adds to its summary.
pub(crate) fn resolved_note(state: Option<State>) -> String {
    match state {
        Some(s) => format!("resolved: the condition cleared (the connection is now {s})"),
        None => "resolved: the condition cleared".to_string(),
    }
}

/// The action with the open authorization link in place of the command,
/// when one is open.
pub(crate) fn with_link(facts: &AlertFacts, link: &str, expires: Timestamp) -> String {
    let step = authorize_step(&facts.connection);
    let linked = format!(
        "send the customer this authorization link (valid until {}): {link}",
        fmt_time(expires)
    );
    if facts.action.contains(&step) {
        facts.action.replace(&step, &linked)
    } else {
        format!("{} ({linked})", facts.action)
    }
}

/// The action when the customer must act but no link could be opened
/// because no redirect URI is configured: what to set, then what to run.
pub(crate) fn without_redirect_uri(facts: &AlertFacts) -> String {
    let step = authorize_step(&facts.connection);
    let instead = format!(
        "no redirect URI is configured (acumatica.redirect_uri), so no authorization link could be opened: set it, then {step}"
    );
    if facts.action.contains(&step) {
        facts.action.replace(&step, &instead)
    } else {
        format!("{} ({instead})", facts.action)
    }
}
