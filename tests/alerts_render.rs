//! Each channel's payload shape and limits, from the pure renderers.

use std::collections::BTreeMap;

use acutoken::alerts::render::{self, Message, Notice, embed_chars};
use acutoken::alerts::{AlertFacts, AlertKind, Status};
use acutoken::config::ChannelKind;
use acutoken::model::{Severity, State};
use chrono::TimeZone;

fn now() -> acutoken::model::Timestamp {
    chrono::Utc.with_ymd_and_hms(2026, 3, 1, 8, 0, 0).unwrap()
}

fn facts(name: &str, error_len: usize) -> AlertFacts {
    AlertFacts {
        kind: AlertKind::NeedsSecret,
        severity: Severity::Critical,
        connection: name.to_string(),
        connection_id: Some(uuid::Uuid::new_v4()),
        labels: BTreeMap::from([
            ("customer".into(), "ACME <Corp> & Sons".into()),
            ("contact".into(), "@everyone jane@acme.example".into()),
        ]),
        instance: Some("acme.acumatica.com/ERP".into()),
        state: Some(State::NeedsSecret),
        summary: format!("secret refused: {}", "E".repeat(error_len)),
        action: format!(
            "add a new shared secret on the instance's Connected Applications screen (SM303010) and run `acutoken connection set-secret {name}` before 2026-03-10T00:00:00Z, or the customer must re-authorize"
        ),
        deadline: Some(chrono::Utc.with_ymd_and_hms(2026, 3, 10, 0, 0, 0).unwrap()),
    }
}

fn notice(name: &str, error_len: usize, status: Status) -> Notice {
    Notice {
        id: render::notice_id(name, 1, status, 0),
        status,
        facts: facts(name, error_len),
    }
}

fn single(name: &str, error_len: usize) -> Message {
    Message::new(vec![notice(name, error_len, Status::Firing)], 10, now())
}

fn group(n: usize, max: usize) -> Message {
    let notices = (0..n)
        .map(|i| {
            notice(
                &format!("conn-{i:04}-{}", "n".repeat(280)),
                10_000,
                Status::Firing,
            )
        })
        .collect();
    Message::new(notices, max, now())
}

fn chars(v: &serde_json::Value) -> usize {
    v.as_str().map_or(0, |s| s.chars().count())
}

#[test]
fn slack_has_text_and_blocks_within_limits() {
    let long = "a".repeat(300);
    for msg in [single("acme", 10), single(&long, 10_000), group(1000, 10)] {
        let body = render::slack(&msg);
        assert!(chars(&body["text"]) > 0 && chars(&body["text"]) <= 3000);
        let blocks = body["blocks"].as_array().unwrap();
        assert!(blocks.len() <= 50);
        assert_eq!(blocks[0]["type"], "header");
        assert!(chars(&blocks[0]["text"]["text"]) <= 150);
        for b in blocks.iter().filter(|b| b["type"] == "section") {
            assert_eq!(b["text"]["type"], "mrkdwn");
            assert!(chars(&b["text"]["text"]) <= 3000);
        }
    }
    let body = render::slack(&single("acme", 10));
    let text = body.to_string();
    assert!(text.contains("SM303010"));
    assert!(text.contains("acutoken connection set-secret acme"));
    assert!(text.contains("acme.acumatica.com/ERP"));
    assert!(
        text.contains("ACME &lt;Corp&gt; &amp; Sons"),
        "mrkdwn is escaped"
    );
    let big = render::slack(&group(1000, 10)).to_string();
    assert!(big.contains("1000"), "a big group says how many");
    assert!(big.contains("990 more"));
}

#[test]
fn teams_is_a_workflows_message_with_an_adaptive_card() {
    for msg in [single(&"b".repeat(300), 10_000), group(1000, 10)] {
        let body = render::teams(&msg);
        assert_eq!(body["type"], "message");
        let att = &body["attachments"][0];
        assert_eq!(
            att["contentType"],
            "application/vnd.microsoft.card.adaptive"
        );
        assert_eq!(att["content"]["type"], "AdaptiveCard");
        assert_eq!(att["content"]["version"], "1.4");
        assert!(!att["content"]["body"].as_array().unwrap().is_empty());
        assert!(body.to_string().len() < 28_000, "Teams' message size limit");
    }
}

#[test]
fn discord_stays_within_every_limit() {
    for msg in [
        single("acme", 10),
        single(&"c".repeat(300), 10_000),
        group(1000, 10),
        group(30, 30),
    ] {
        let body = render::discord(&msg);
        assert!(chars(&body["content"]) <= 2000);
        let embeds = body["embeds"].as_array().unwrap();
        assert!(!embeds.is_empty() && embeds.len() <= render::MAX_EMBEDS);
        for e in embeds {
            assert!(chars(&e["title"]) <= 256);
            assert!(chars(&e["description"]) <= 4096);
            let fields = e["fields"].as_array().unwrap();
            assert!(fields.len() <= 25);
            for f in fields {
                assert!(chars(&f["name"]) <= 256 && chars(&f["value"]) <= 1024);
                assert!(chars(&f["value"]) > 0, "Discord refuses empty field values");
            }
        }
        assert!(
            embed_chars(&body) <= render::MAX_TOTAL,
            "{}",
            embed_chars(&body)
        );
        assert_eq!(body["allowed_mentions"]["parse"], serde_json::json!([]));
    }
    let cut = render::discord(&single(&"c".repeat(300), 10_000));
    assert!(cut["embeds"][0]["title"].as_str().unwrap().ends_with('…'));
}

#[test]
fn google_chat_is_text_within_its_limit() {
    for msg in [single(&"d".repeat(300), 10_000), group(1000, 10)] {
        let body = render::google_chat(&msg);
        assert_eq!(body.as_object().unwrap().len(), 1);
        assert!(chars(&body["text"]) <= 4096);
    }
    assert!(
        render::google_chat(&single("acme", 10))["text"]
            .as_str()
            .unwrap()
            .contains("acutoken connection set-secret acme")
    );
}

#[test]
fn generic_has_every_field_and_groups_carry_a_count() {
    let msg = single("acme", 10);
    let body = render::generic(&msg);
    for field in [
        "id",
        "sent_at",
        "kind",
        "severity",
        "status",
        "connection",
        "labels",
        "instance",
        "state",
        "summary",
        "action",
        "deadline",
    ] {
        assert!(body.get(field).is_some(), "missing {field}");
    }
    assert_eq!(body["kind"], "needs_secret");
    assert_eq!(body["severity"], "critical");
    assert_eq!(body["status"], "firing");
    assert_eq!(body["state"], "needs_secret");
    assert_eq!(body["deadline"], "2026-03-10T00:00:00Z");
    assert_eq!(body["sent_at"], "2026-03-01T08:00:00Z");
    assert_eq!(body["labels"]["customer"], "ACME <Corp> & Sons");
    assert_eq!(body["id"], msg.notices[0].id);
    let again = Message::new(vec![notice("acme", 10, Status::Firing)], 10, now());
    assert_eq!(
        render::generic(&again)["id"],
        body["id"],
        "stable across retries"
    );
    let resolved = Message::new(vec![notice("acme", 10, Status::Resolved)], 10, now());
    assert_ne!(render::generic(&resolved)["id"], body["id"]);
    assert_eq!(render::generic(&resolved)["status"], "resolved");
    assert_eq!(
        render::generic(&resolved)["severity"],
        "critical",
        "resolved keeps its severity"
    );

    let g = render::generic(&group(1000, 10));
    assert_eq!(g["count"], 1000);
    assert_eq!(g["alerts"].as_array().unwrap().len(), 10);
    assert_eq!(g["omitted"], 990);
    assert_eq!(g["alerts"][0]["kind"], "needs_secret");
    assert_eq!(g["id"], render::generic(&group(1000, 10))["id"]);
}

#[test]
fn every_channel_renders_every_kind() {
    for kind in AlertKind::ALL {
        let mut f = facts("acme", 10);
        f.kind = kind;
        for status in [Status::Firing, Status::Resolved] {
            let msg = Message::new(
                vec![Notice {
                    id: "x".into(),
                    status,
                    facts: f.clone(),
                }],
                10,
                now(),
            );
            for ch in [
                ChannelKind::Slack,
                ChannelKind::Teams,
                ChannelKind::Discord,
                ChannelKind::GoogleChat,
                ChannelKind::Generic,
            ] {
                assert!(render::render(ch, &msg).is_object());
            }
        }
    }
    let test = Message::new(
        vec![Notice {
            id: "t".into(),
            status: Status::Firing,
            facts: AlertFacts::test(),
        }],
        10,
        now(),
    );
    let g = render::generic(&test);
    assert_eq!(g["connection"], "-");
    assert_eq!(g["severity"], "info");
}
