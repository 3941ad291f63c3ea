//! acutoken's own JSON: one object per alert, or `{"alerts": [...], "count": N}`.

use serde_json::{Value, json};

use super::{Message, Notice};
use crate::model::fmt_time;

fn object(n: &Notice, sent_at: &str) -> Value {
    let f = &n.facts;
    json!({
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
        "action": f.action,
        "deadline": f.deadline.map(fmt_time),
    })
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
