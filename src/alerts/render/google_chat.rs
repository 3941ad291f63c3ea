//! Google Chat incoming webhook: a `text` message.

use serde_json::{Value, json};

use super::{Message, action, facts_list, notice_headline, summary};
use crate::alerts::text::clip;

/// Google Chat refuses texts over 4,096 characters; stay below with room.
const TEXT_MAX: usize = 4000;

/// The Google Chat body: `{"text": ...}`, every listed alert as a paragraph.
pub fn google_chat(msg: &Message) -> Value {
    let n = msg.notices.len().max(1);
    let per = (TEXT_MAX - 300) / n;
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
        part.push_str(&format!(
            "\n{}\nNext step: {}",
            summary(notice),
            action(notice)
        ));
        text.push_str(&clip(&part, per));
        text.push_str("\n\n");
    }
    let mut text = text.trim_end().to_string();
    if msg.omitted() > 0 {
        text.push_str(&format!("\n\n…and {} more", msg.omitted()));
    }
    json!({ "text": clip(&text, TEXT_MAX) })
}
