//! Google Chat incoming webhook: a `text` message, plus a card with a
//! button per authorization link when alerts carry links.

use serde_json::{Value, json};

use super::{BUTTON_TEXT, Message, action, button_link, facts_list, notice_headline, summary};
use crate::model::clip;

/// Google Chat refuses texts over 4,096 characters; stay below with room.
const TEXT_MAX: usize = 4000;

/// The Google Chat body: `{"text": ...}`, every listed alert as a paragraph;
/// with authorization links, also `cardsV2`: one card with a button per link.
pub fn google_chat(msg: &Message) -> Value {
    let n = msg.notices.len().max(1);
    // Room for the heading (300 and its markup), the blank lines between
    // parts and the "…and N more" line, so the final cut never falls on a
    // part (and its link).
    let per = (TEXT_MAX - 340).saturating_sub(2 * n) / n;
    // A single alert's own heading is the message's heading.
    let mut text = if msg.is_single() {
        String::new()
    } else {
        format!("*{}*\n\n", clip(&msg.headline(), 300))
    };
    for notice in &msg.notices {
        let mut part = format!("*{}*", notice_headline(notice));
        for (name, value) in facts_list(notice) {
            part.push_str(&format!("\n{name}: {value}"));
        }
        part.push_str(&format!("\n{}", summary(notice)));
        let step = format!("\nNext step: {}", action(notice));
        // When the part must be cut, the rest gives way to the next step and
        // its link (a cut link is a broken one); when even that does not
        // fit, the text points at the link's button instead.
        let keep = step.chars().count();
        let button = button_link(notice).is_some();
        if button && keep + 40 <= per {
            text.push_str(&clip(&part, per - keep));
            text.push_str(&step);
        } else if button {
            part.push_str(&format!(
                "\nNext step: {} (the authorization link is on the button below)",
                notice.facts.action
            ));
            text.push_str(&clip(&part, per));
        } else {
            part.push_str(&step);
            text.push_str(&clip(&part, per));
        }
        text.push_str("\n\n");
    }
    let mut text = text.trim_end().to_string();
    if msg.omitted() > 0 {
        text.push_str(&format!("\n\n…and {} more", msg.omitted()));
    }
    let buttons: Vec<Value> = msg
        .notices
        .iter()
        .filter_map(|n| {
            button_link(n).map(|url| {
                json!({
                    "text": clip(&format!("{BUTTON_TEXT}: {}", n.facts.connection), 100),
                    "onClick": { "openLink": { "url": url } },
                })
            })
        })
        .collect();
    let mut body = json!({ "text": clip(&text, TEXT_MAX) });
    if !buttons.is_empty() {
        body["cardsV2"] = json!([{
            "cardId": "authorization-links",
            "card": { "sections": [{ "widgets": [{ "buttonList": { "buttons": buttons } }] }] },
        }]);
    }
    body
}
