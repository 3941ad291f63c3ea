//! Slack incoming webhook: `text` (the notification fallback) plus Block Kit `blocks`.

use serde_json::{Value, json};

use super::{BUTTON_TEXT, Message, action, button_link, facts_list, notice_headline, summary};
use crate::model::clip;

/// Slack's limits: header text 150 characters, section text 3,000, 50 blocks.
const HEADER_MAX: usize = 150;
const SECTION_MAX: usize = 3000;

/// Escapes the three characters Slack's mrkdwn treats as control characters.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The Slack body. `text` is what notifications show; `blocks` hold a header,
/// one section per listed alert and, for a big group, how many were left out.
pub fn slack(msg: &Message) -> Value {
    let headline = msg.headline();
    let mut blocks = vec![json!({
        "type": "header",
        "text": { "type": "plain_text", "text": clip(&headline, HEADER_MAX), "emoji": true }
    })];
    // Two blocks per alert plus the header and a trailer stay within Slack's 50.
    for notice in msg.notices.iter().take(24) {
        let mut body = format!("*{}*", esc(&notice_headline(notice)));
        for (name, value) in facts_list(notice) {
            body.push_str(&format!("\n*{name}:* {}", esc(&value)));
        }
        body.push_str(&format!(
            "\n{}\n*Next step:* {}",
            esc(&summary(notice)),
            esc(&action(notice))
        ));
        let mut section = json!({
            "type": "section",
            "text": { "type": "mrkdwn", "text": clip(&body, SECTION_MAX) }
        });
        // A button beside the text, not a block of its own: the block count
        // stays within Slack's 50, and a cut text never cuts the link.
        if let Some(url) = button_link(notice) {
            section["accessory"] = json!({
                "type": "button",
                "text": { "type": "plain_text", "text": BUTTON_TEXT },
                "url": url,
                "style": "primary",
            });
        }
        blocks.push(section);
        blocks.push(json!({ "type": "divider" }));
    }
    let unlisted = msg.total.saturating_sub(msg.notices.len().min(24));
    if unlisted > 0 {
        blocks.push(json!({
            "type": "context",
            "elements": [{ "type": "mrkdwn", "text": format!("…and {unlisted} more (see `acutoken status`)") }]
        }));
    }
    json!({
        "text": clip(&format!("acutoken: {headline}"), SECTION_MAX),
        "blocks": blocks,
    })
}
