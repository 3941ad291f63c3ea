//! Microsoft Teams Workflows webhook: a message with one Adaptive Card (1.4).

use serde_json::{Value, json};

use super::{BUTTON_TEXT, Message, action, button_link, facts_list, notice_headline, summary};
use crate::alerts::Status;
use crate::alerts::text::clip;
use crate::model::Severity;

/// Teams refuses messages over about 28 KB; the card's text stays well below.
const CARD_TEXT_MAX: usize = 20_000;

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

/// The Teams body: `{"type": "message", "attachments": [Adaptive Card]}`.
pub fn teams(msg: &Message) -> Value {
    // The buttons' links come out of the same budget.
    let links: usize = msg
        .notices
        .iter()
        .filter_map(button_link)
        .map(|u| u.len() + 100)
        .sum();
    let per = CARD_TEXT_MAX.saturating_sub(links) / msg.notices.len().max(1);
    let field = (per / 6).clamp(40, 1000);
    let mut body = vec![json!({
        "type": "TextBlock",
        "size": "Large",
        "weight": "Bolder",
        "wrap": true,
        "color": color(msg),
        "text": clip(&msg.headline(), 300),
    })];
    for notice in &msg.notices {
        let facts: Vec<Value> = facts_list(notice)
            .into_iter()
            .map(|(t, v)| json!({ "title": t, "value": clip(&v, field) }))
            .collect();
        let mut items = vec![
            json!({ "type": "TextBlock", "weight": "Bolder", "wrap": true,
                    "text": clip(&notice_headline(notice), field) }),
            json!({ "type": "FactSet", "facts": facts }),
            json!({ "type": "TextBlock", "wrap": true, "text": clip(&summary(notice), field * 2) }),
            json!({ "type": "TextBlock", "wrap": true,
                    "text": clip(&format!("**Next step:** {}", action(notice)), field * 2) }),
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
