//! Webhook rendering: any connection name, labels, instance and error text, in
//! single messages and groups, gives a JSON body within every channel's limits
//! (Slack, Teams, Discord, Google Chat) that survives a JSON round trip.
#![no_main]

use std::collections::BTreeMap;

use acutoken::alerts::render::{
    self, MAX_EMBEDS, MAX_TOTAL, Message, Notice, TEAMS_BODY_MAX, embed_chars,
};
use acutoken::alerts::{AlertFacts, AlertKind, Status};
use acutoken::config::ChannelKind;
use acutoken::model::{Severity, State};
use acutoken::secret::Secret;
use acutoken::store::authorizations::Authorization;
use arbitrary::Arbitrary;
use chrono::TimeZone;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// A string that can grow far past the fuzzer's input size.
#[derive(Arbitrary, Debug)]
struct Text {
    base: String,
    repeat: u16,
}

impl Text {
    /// Up to about 6,000 characters: past every single-field limit of every channel.
    fn get(&self) -> String {
        let most = 6_000 / self.base.len().max(1);
        self.base
            .repeat((self.repeat as usize % 3000).min(most) + 1)
    }
}

#[derive(Arbitrary, Debug)]
struct Fact {
    kind: u8,
    severity: u8,
    resolved: bool,
    connection: Text,
    labels: Vec<(Text, Text)>,
    label_copies: u8,
    instance: Option<Text>,
    state: Option<u8>,
    summary: Text,
    action: Text,
    deadline: Option<i32>,
    /// The authorization link an alert that needs the customer carries.
    link: Option<Text>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    facts: Vec<Fact>,
    copies: u16,
    group_max: u8,
    unlisted: u16,
}

const STATES: [State; 6] = [
    State::PendingAuthorization,
    State::Active,
    State::Retrying,
    State::NeedsSecret,
    State::NeedsReauthorization,
    State::Disabled,
];

fn facts(f: &Fact) -> AlertFacts {
    let mut labels = BTreeMap::new();
    for (i, (k, v)) in f.labels.iter().take(8).enumerate() {
        labels.insert(k.get(), v.get());
        // Many labels, as an import file may give.
        for c in 0..f.label_copies as usize % 64 {
            labels.insert(format!("{}{i}-{c}", k.base), v.base.clone());
        }
    }
    AlertFacts {
        kind: AlertKind::ALL[f.kind as usize % AlertKind::ALL.len()],
        severity: [Severity::Info, Severity::Warning, Severity::Critical][f.severity as usize % 3],
        // The store never holds an empty name or instance (both are validated),
        // and Discord refuses an empty field value: see the README, "Reliability".
        connection: non_empty(f.connection.get()),
        connection_id: None,
        labels,
        instance: f.instance.as_ref().map(|t| non_empty(t.get())),
        state: f.state.map(|s| STATES[s as usize % STATES.len()]),
        summary: f.summary.get(),
        action: f.action.get(),
        deadline: f.deadline.and_then(|d| {
            chrono::Utc
                .timestamp_opt(1_700_000_000 + i64::from(d) * 60, 0)
                .single()
        }),
    }
}

fn non_empty(s: String) -> String {
    if s.is_empty() { "x".into() } else { s }
}

fn chars(v: &Value) -> usize {
    v.as_str().map_or(0, |s| s.chars().count())
}

fn check(kind: ChannelKind, body: &Value) {
    let text = serde_json::to_string(body).unwrap();
    // The generic body is never cut (megabytes here): parsing it back would
    // spend the run in serde_json; its serialization above must succeed.
    if kind != ChannelKind::Generic {
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            &back, body,
            "{kind:?} body does not survive a JSON round trip"
        );
    }
    match kind {
        ChannelKind::Slack => {
            assert!(chars(&body["text"]) > 0 && chars(&body["text"]) <= 3000);
            let blocks = body["blocks"].as_array().unwrap();
            assert!(blocks.len() <= 50);
            for b in blocks {
                if b["type"] == "header" {
                    assert!(chars(&b["text"]["text"]) <= 150);
                    assert!(chars(&b["text"]["text"]) > 0);
                }
                if b["type"] == "section" {
                    assert!(chars(&b["text"]["text"]) <= 3000);
                    assert!(
                        chars(&b["text"]["text"]) > 0,
                        "Slack refuses empty sections"
                    );
                    if let Some(fields) = b["fields"].as_array() {
                        assert!(fields.len() <= 10);
                        for f in fields {
                            assert!(chars(&f["text"]) <= 2000);
                        }
                    }
                }
                if b["type"] == "context" {
                    let els = b["elements"].as_array().unwrap();
                    assert!(els.len() <= 10);
                    for e in els {
                        assert!(chars(&e["text"]) <= 3000);
                    }
                }
            }
        }
        ChannelKind::Teams => {
            // Teams refuses bodies over about 28 KB, counted in bytes: every
            // message, single or grouped, in any script, stays under it.
            assert!(
                text.len() <= TEAMS_BODY_MAX,
                "Teams message of {} bytes",
                text.len()
            );
        }
        ChannelKind::Discord => {
            assert!(chars(&body["content"]) <= 2000);
            let embeds = body["embeds"].as_array().unwrap();
            assert!(!embeds.is_empty() && embeds.len() <= MAX_EMBEDS);
            for e in embeds {
                assert!(chars(&e["title"]) <= 256);
                assert!(chars(&e["description"]) <= 4096);
                let fields = e["fields"].as_array().unwrap();
                assert!(fields.len() <= 25);
                for f in fields {
                    assert!(chars(&f["name"]) > 0 && chars(&f["name"]) <= 256);
                    assert!(chars(&f["value"]) > 0 && chars(&f["value"]) <= 1024, "{f}");
                }
            }
            assert!(
                embed_chars(body) <= MAX_TOTAL,
                "{} characters in embeds",
                embed_chars(body)
            );
            assert_eq!(body["allowed_mentions"]["parse"], serde_json::json!([]));
        }
        ChannelKind::GoogleChat => {
            assert!(chars(&body["text"]) > 0 && chars(&body["text"]) <= 4096);
        }
        ChannelKind::Generic => {
            assert!(body.get("id").is_some());
        }
    }
}

fuzz_target!(|input: Input| {
    if input.facts.is_empty() {
        return;
    }
    let sent_at = chrono::Utc.with_ymd_and_hms(2026, 3, 1, 8, 0, 0).unwrap();
    let kind = input.facts[0].kind;
    let mut notices = Vec::new();
    // A group is of one kind; up to 40 are listed, and `unlisted` stands for
    // the thousands more a mass failure brings (counted, not rendered).
    let made: Vec<(AlertFacts, bool, Option<String>)> = input
        .facts
        .iter()
        .take(40)
        .map(|f| {
            let mut facts = facts(f);
            facts.kind = AlertKind::ALL[kind as usize % AlertKind::ALL.len()];
            // A real link is a few hundred characters (instance, client ID,
            // redirect URI, state, PKCE challenge).
            let link = f.link.as_ref().map(|t| t.get().chars().take(600).collect());
            (facts, f.resolved, link)
        })
        .collect();
    let copies = (input.copies as usize % 40 + 1).max(made.len());
    for (i, (facts, resolved, link)) in made.iter().cycle().take(copies).enumerate() {
        notices.push(Notice {
            id: format!("n{i}"),
            status: if *resolved {
                Status::Resolved
            } else {
                Status::Firing
            },
            facts: facts.clone(),
            link: link.as_ref().map(|url| Authorization {
                url: Secret::new(url.clone()),
                expires_at: sent_at + chrono::Duration::days(14),
            }),
        });
    }
    let mut msg = Message::new(notices, input.group_max as usize % 40, sent_at);
    msg.total += input.unlisted as usize;
    for ch in [
        ChannelKind::Slack,
        ChannelKind::Teams,
        ChannelKind::Discord,
        ChannelKind::GoogleChat,
        ChannelKind::Generic,
    ] {
        check(ch, &render::render(ch, &msg));
    }
});
