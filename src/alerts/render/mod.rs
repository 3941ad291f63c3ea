//! One renderer per channel kind: pure functions from a message (one alert or
//! a group of one kind) to the JSON body the channel's webhook takes.
//!
//! Chat renderers cut what they show to their platform's limits (with an
//! ellipsis) instead of failing; the generic JSON is never cut, but error
//! texts inside facts were already cut when the facts were made.

mod discord;
mod generic;
mod google_chat;
mod slack;
mod teams;

use sha2::{Digest, Sha256};

use super::{AlertFacts, AlertKind, Status, text};
use crate::config::ChannelKind;
use crate::model::{Severity, Timestamp, fmt_time};
use crate::store::authorizations::Authorization;

pub use discord::{MAX_EMBEDS, MAX_TOTAL, discord, embed_chars};
pub use generic::generic;
pub use google_chat::google_chat;
pub use slack::slack;
pub use teams::{BODY_MAX as TEAMS_BODY_MAX, teams};

/// One alert in a message: its facts, its status, and an id that stays the
/// same across retries of the same message.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    /// Stable across retries; changes with each new revision or repeat.
    pub id: String,
    /// Firing or resolved.
    pub status: Status,
    /// What it says. Stored, so it never holds the link.
    pub facts: AlertFacts,
    /// The open authorization link, for an alert that needs the customer:
    /// read (or opened) at delivery time, shown only while firing.
    pub link: Option<Authorization>,
}

/// A message to one channel: one alert, or a group of one kind.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The single alert's id, or one derived from every member's id.
    pub id: String,
    /// When it is sent.
    pub sent_at: Timestamp,
    /// The kind every alert in it has.
    pub kind: AlertKind,
    /// The alerts listed (at most `group_max`).
    pub notices: Vec<Notice>,
    /// How many alerts the message stands for (listed or not).
    pub total: usize,
}

impl Message {
    /// A message about `notices` (all of one kind, at least one), listing the
    /// first `group_max` of them.
    pub fn new(mut notices: Vec<Notice>, group_max: usize, sent_at: Timestamp) -> Message {
        let total = notices.len();
        let id = match notices.as_slice() {
            [one] => one.id.clone(),
            many => {
                let mut h = Sha256::new();
                for n in many {
                    h.update(n.id.as_bytes());
                    h.update(b"\n");
                }
                uuid_from_hash(&h.finalize())
            }
        };
        let kind = notices.first().map_or(AlertKind::Test, |n| n.facts.kind);
        notices.truncate(group_max.max(1));
        Message {
            id,
            sent_at,
            kind,
            notices,
            total,
        }
    }

    /// How many alerts the message stands for but does not list.
    pub fn omitted(&self) -> usize {
        self.total.saturating_sub(self.notices.len())
    }

    /// True for a message about one alert.
    pub fn is_single(&self) -> bool {
        self.total == 1 && self.notices.len() == 1
    }

    /// The highest severity among the listed alerts.
    fn severity(&self) -> Severity {
        self.notices
            .iter()
            .map(|n| n.facts.severity)
            .max()
            .unwrap_or(Severity::Info)
    }

    /// True when every listed alert is resolved.
    fn all_resolved(&self) -> bool {
        self.notices.iter().all(|n| n.status == Status::Resolved)
    }

    /// One line for a heading or a notification preview.
    pub fn headline(&self) -> String {
        match self.notices.as_slice() {
            [one] if self.total == 1 => notice_headline(one),
            _ => {
                let firing = self
                    .notices
                    .iter()
                    .filter(|n| n.status == Status::Firing)
                    .count();
                let resolved = self.notices.len() - firing;
                let mut parts = Vec::new();
                if firing > 0 {
                    parts.push(format!("{firing} firing"));
                }
                if resolved > 0 {
                    parts.push(format!("{resolved} resolved"));
                }
                if self.omitted() > 0 {
                    parts.push(format!("{} more not listed", self.omitted()));
                }
                format!(
                    "[{}] {}: {} connections ({})",
                    if self.all_resolved() {
                        "resolved".to_string()
                    } else {
                        self.severity().to_string()
                    },
                    self.kind.title(),
                    self.total,
                    parts.join(", ")
                )
            }
        }
    }
}

/// A UUID-shaped id from a hash, so group ids look like single ones.
pub(crate) fn uuid_from_hash(h: &[u8]) -> String {
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    uuid::Builder::from_custom_bytes(b).into_uuid().to_string()
}

/// The id of the message about one alert revision: the same on every retry,
/// new for each revision, status and repeat.
pub fn notice_id(alert_id: &str, revision: i64, status: Status, sends: i64) -> String {
    let mut h = Sha256::new();
    h.update(format!("{alert_id}/{revision}/{status}/{sends}").as_bytes());
    uuid_from_hash(&h.finalize())
}

/// `[critical] New client secret needed: acme` / `[resolved] ...`.
pub(crate) fn notice_headline(n: &Notice) -> String {
    let tag = match n.status {
        Status::Firing => n.facts.severity.to_string(),
        Status::Resolved => "resolved".to_string(),
    };
    let who = if n.facts.connection == super::NO_CONNECTION {
        String::new()
    } else {
        format!(": {}", n.facts.connection)
    };
    format!("[{tag}] {}{who}", n.facts.kind.title())
}

/// The summary, with the resolution note for a resolved alert.
pub(crate) fn summary(n: &Notice) -> String {
    match n.status {
        Status::Firing => n.facts.summary.clone(),
        Status::Resolved => format!(
            "{} (was: {})",
            text::resolved_note(n.facts.state),
            n.facts.summary
        ),
    }
}

/// The next step, with the authorization link in place of the command
/// when one is open; nothing to do once resolved.
pub(crate) fn action(n: &Notice) -> String {
    match (n.status, &n.link) {
        (Status::Firing, Some(l)) => text::with_link(&n.facts, l.url.expose(), l.expires_at),
        (Status::Firing, None) => n.facts.action.clone(),
        (Status::Resolved, _) => "nothing to do".to_string(),
    }
}

/// The authorization link a firing alert carries.
pub(crate) fn link(n: &Notice) -> Option<&str> {
    match n.status {
        Status::Firing => n.link.as_ref().map(|l| l.url.expose()),
        Status::Resolved => None,
    }
}

/// Chat platforms refuse overlong button and embed URLs (Slack at 3,000
/// characters); a longer link is still in the action text.
const BUTTON_URL_MAX: usize = 2000;

/// The link as a button or title target, when the platform takes it.
pub(crate) fn button_link(n: &Notice) -> Option<&str> {
    link(n).filter(|u| u.chars().count() <= BUTTON_URL_MAX)
}

/// The label of the button that opens the link (the operator sends it to
/// the customer, who opens it).
pub(crate) const BUTTON_TEXT: &str = "Authorization link";

/// `key=value, key=value`, or `None` without labels.
pub(crate) fn labels(f: &AlertFacts) -> Option<String> {
    (!f.labels.is_empty()).then(|| {
        f.labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    })
}

/// The name/value pairs every chat renderer shows under a heading.
pub(crate) fn facts_list(n: &Notice) -> Vec<(&'static str, String)> {
    let f = &n.facts;
    let mut out = Vec::new();
    if f.connection != super::NO_CONNECTION {
        out.push(("Connection", f.connection.clone()));
    }
    if let Some(i) = &f.instance {
        out.push(("Instance", i.clone()));
    }
    if let Some(l) = labels(f) {
        out.push(("Labels", l));
    }
    if let Some(s) = f.state {
        out.push(("State", s.to_string()));
    }
    if let Some(d) = f.deadline {
        out.push(("Deadline", fmt_time(d)));
    }
    out
}

/// The body for `kind`.
pub fn render(kind: ChannelKind, msg: &Message) -> serde_json::Value {
    match kind {
        ChannelKind::Slack => slack(msg),
        ChannelKind::Teams => teams(msg),
        ChannelKind::Discord => discord(msg),
        ChannelKind::GoogleChat => google_chat(msg),
        ChannelKind::Generic => generic(msg),
    }
}
