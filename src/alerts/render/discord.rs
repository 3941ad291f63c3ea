//! Discord webhook: embeds, cut to Discord's limits instead of being refused.

use serde_json::{Value, json};

use super::{Message, action, button_link, facts_list, notice_headline, summary};
use crate::model::Status;
use crate::model::clip;
use crate::model::{Severity, fmt_time};

/// Discord's limits (characters): per message 10 embeds and 6,000 characters
/// across all embeds; per embed a 256-character title, a 4,096-character
/// description and 25 fields of 256 (name) and 1,024 (value); content 2,000.
pub const MAX_EMBEDS: usize = 10;
/// Characters across all embeds of a message.
pub const MAX_TOTAL: usize = 6000;
const MAX_TITLE: usize = 256;
const MAX_DESCRIPTION: usize = 4096;
const MAX_FIELDS: usize = 25;
const MAX_FIELD_VALUE: usize = 1024;
const MAX_CONTENT: usize = 2000;

fn color(n: &super::Notice) -> u32 {
    match (n.status, n.facts.severity) {
        (Status::Resolved, _) => 0x2EB67D,
        (_, Severity::Critical) => 0xE01E5A,
        (_, Severity::Warning) => 0xECB22E,
        (_, Severity::Info) => 0x36C5F0,
    }
}

/// The Discord body: `content` (a one-line preview) and one embed per listed
/// alert (at most 10), everything cut so the message stays within limits.
/// Mentions are disabled: labels must not ping anyone.
pub fn discord(msg: &Message) -> Value {
    let listed: Vec<_> = msg.notices.iter().take(MAX_EMBEDS).collect();
    // Leave a margin under the total for the footers' fixed text.
    let budget = (MAX_TOTAL - 100) / listed.len().max(1);
    let mut embeds = Vec::new();
    for notice in listed.iter() {
        let title = clip(&notice_headline(notice), MAX_TITLE.min(budget / 5));
        let mut used = title.chars().count();
        let value_max = MAX_FIELD_VALUE.min(budget / 10).max(8);
        let mut fields = Vec::new();
        for (name, value) in facts_list(notice).into_iter().take(MAX_FIELDS) {
            let value = clip(&value, value_max);
            used += name.len() + value.chars().count();
            fields.push(json!({ "name": name, "value": value, "inline": name != "Labels" }));
        }
        let room = budget.saturating_sub(used).clamp(16, MAX_DESCRIPTION);
        let description = clip(
            &format!("{}\n\n**Next step:** {}", summary(notice), action(notice)),
            room,
        );
        let mut embed = json!({
            "title": title,
            "description": description,
            "color": color(notice),
            "fields": fields,
            "timestamp": fmt_time(msg.sent_at),
        });
        // The title links to it: the cut description may not hold the whole
        // link, and an embed's URL does not count toward the limits.
        if let Some(url) = button_link(notice) {
            embed["url"] = json!(url);
        }
        embeds.push(embed);
    }
    let unlisted = msg.total.saturating_sub(listed.len());
    let mut content = clip(&msg.headline(), 1000);
    if unlisted > 0 {
        content.push_str(&format!(" (…and {unlisted} more: see `acutoken status`)"));
    }
    json!({
        "content": clip(&content, MAX_CONTENT),
        "embeds": embeds,
        "allowed_mentions": { "parse": [] },
    })
}

/// Characters Discord counts toward [`MAX_TOTAL`] in a body made by [`discord`].
pub fn embed_chars(body: &Value) -> usize {
    let count = |v: &Value| v.as_str().map_or(0, |s| s.chars().count());
    body["embeds"].as_array().map_or(0, |embeds| {
        embeds
            .iter()
            .map(|e| {
                count(&e["title"])
                    + count(&e["description"])
                    + count(&e["footer"]["text"])
                    + count(&e["author"]["name"])
                    + e["fields"].as_array().map_or(0, |fs| {
                        fs.iter()
                            .map(|f| count(&f["name"]) + count(&f["value"]))
                            .sum()
                    })
            })
            .sum()
    })
}
