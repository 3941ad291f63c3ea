//! What delivery adds to an alert's words: the resolved note, and the open
//! authorization link in place of the step that asks for one. The words of
//! each condition are the model's ([`AlertFacts`]).

use crate::model::{AlertFacts, State, Timestamp, authorize_step, fmt_time};

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
