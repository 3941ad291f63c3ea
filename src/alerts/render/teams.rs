//! Microsoft Teams Workflows webhook: a message with one Adaptive Card (1.4).
//!
//! Teams refuses a message over about 28 KB, counted in bytes of the JSON
//! body. Every budget here is therefore in bytes as serialized (a CJK
//! character is 3, a control character escaped as `\u0001` is 6), and the
//! card lists fewer alerts (the rest counted as "more") when the listed
//! ones still do not fit.

use serde_json::{Value, json};

use super::{BUTTON_TEXT, Message, action, button_link, facts_list, notice_headline, summary};
use crate::model::Severity;
use crate::model::Status;

/// The budget for the card's text: below the limit, leaving room for the
/// card's own structure.
const CARD_TEXT_MAX: usize = 20_000;

/// The largest body sent; Teams refuses about 28 KB.
pub const BODY_MAX: usize = 27_000;

/// The bytes `c` takes inside a JSON string.
fn json_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// `s` cut so it takes at most `max` bytes inside a JSON string, with an
/// ellipsis when cut.
fn clip_bytes(s: &str, max: usize) -> String {
    if s.chars().map(json_len).sum::<usize>() <= max {
        return s.to_string();
    }
    let room = max.saturating_sub('…'.len_utf8());
    let mut used = 0;
    let mut out: String = s
        .chars()
        .take_while(|&c| {
            used += json_len(c);
            used <= room
        })
        .collect();
    out.push('…');
    out
}

fn color(msg: &Message) -> &'static str {
    if msg.notices.iter().all(|n| n.status == Status::Resolved) {
        return "Good";
    }
    match msg.notices.iter().map(|n| n.facts.severity).max() {
        Some(Severity::Critical) => "Attention",
        Some(Severity::Warning) => "Warning",
        _ => "Default",
    }
}

/// The Teams body: `{"type": "message", "attachments": [Adaptive Card]}`,
/// at most [`BODY_MAX`] bytes.
pub fn teams(msg: &Message) -> Value {
    let mut shown = msg.notices.len();
    loop {
        let listed = Message {
            notices: msg.notices[..shown].to_vec(),
            ..msg.clone()
        };
        let body = card(&listed);
        if shown <= 1 || body.to_string().len() <= BODY_MAX {
            return body;
        }
        shown -= shown.div_ceil(4);
    }
}

/// The card listing every notice of `msg`, each cut to its share of the budget.
fn card(msg: &Message) -> Value {
    // The buttons' links come out of the same budget.
    let links: usize = msg
        .notices
        .iter()
        .filter_map(button_link)
        .map(|u| u.chars().map(json_len).sum::<usize>() + 100)
        .sum();
    let per = CARD_TEXT_MAX.saturating_sub(links) / msg.notices.len().max(1);
    let field = (per / 6).clamp(40, 1000);
    let mut body = vec![json!({
        "type": "TextBlock",
        "size": "Large",
        "weight": "Bolder",
        "wrap": true,
        "color": color(msg),
        "text": clip_bytes(&msg.headline(), 300),
    })];
    for notice in &msg.notices {
        let facts: Vec<Value> = facts_list(notice)
            .into_iter()
            .map(|(t, v)| json!({ "title": t, "value": clip_bytes(&v, field) }))
            .collect();
        let mut items = vec![
            json!({ "type": "TextBlock", "weight": "Bolder", "wrap": true,
                    "text": clip_bytes(&notice_headline(notice), field) }),
            json!({ "type": "FactSet", "facts": facts }),
            json!({ "type": "TextBlock", "wrap": true, "text": clip_bytes(&summary(notice), field * 2) }),
            json!({ "type": "TextBlock", "wrap": true,
                    "text": clip_bytes(&format!("**Next step:** {}", action(notice)), field * 2) }),
        ];
        // A button under this alert: the cut text above may not hold the whole link.
        if let Some(url) = button_link(notice) {
            items.push(json!({
                "type": "ActionSet",
                "actions": [{ "type": "Action.OpenUrl", "title": BUTTON_TEXT, "url": url }],
            }));
        }
        body.push(json!({
            "type": "Container",
            "separator": true,
            "items": items,
        }));
    }
    if msg.omitted() > 0 {
        body.push(json!({
            "type": "TextBlock", "wrap": true, "isSubtle": true,
            "text": format!("…and {} more (see `acutoken status`)", msg.omitted()),
        }));
    }
    json!({
        "type": "message",
        "attachments": [{
            "contentType": "application/vnd.microsoft.card.adaptive",
            "contentUrl": null,
            "content": {
                "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                "type": "AdaptiveCard",
                "version": "1.4",
                "msteams": { "width": "Full" },
                "body": body,
            }
        }]
    })
}
