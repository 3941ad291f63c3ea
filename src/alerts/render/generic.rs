//! acutoken's own JSON: one object per alert, or `{"alerts": [...], "count": N}`.

use serde_json::{Value, json};

use super::{Message, Notice, action, link};
use crate::model::fmt_time;

/// One alert's object; `authorization_url` only when the customer must act
/// and a link is open (DESIGN §8).
fn object(n: &Notice, sent_at: &str) -> Value {
    let f = &n.facts;
    let mut v = json!({
        "id": n.id,
        "sent_at": sent_at,
        "kind": f.kind,
        "severity": f.severity,
        "status": n.status,
        "connection": f.connection,
        "labels": f.labels,
        "instance": f.instance,
        "state": f.state,
        "summary": f.summary,
        "action": match n.status {
            // Resolved keeps the action it fired with, as before.
            crate::model::Status::Firing => action(n),
            crate::model::Status::Resolved => f.action.clone(),
        },
        "deadline": f.deadline.map(fmt_time),
    });
    if let (Some(url), Some(obj)) = (link(n), v.as_object_mut()) {
        obj.insert("authorization_url".into(), Value::String(url.to_string()));
    }
    v
}

/// The generic body: the alert's object, or for a group
/// `{"id", "sent_at", "kind", "count", "omitted", "alerts": [...]}` where
/// `count` is every alert the message stands for and `alerts` lists the first
/// `group_max`.
pub fn generic(msg: &Message) -> Value {
    let sent_at = fmt_time(msg.sent_at);
    if msg.is_single() {
        return object(&msg.notices[0], &sent_at);
    }
    json!({
        "id": msg.id,
        "sent_at": sent_at,
        "kind": msg.kind,
        "count": msg.total,
        "omitted": msg.omitted(),
        "alerts": msg.notices.iter().map(|n| object(n, &sent_at)).collect::<Vec<_>>(),
    })
}
