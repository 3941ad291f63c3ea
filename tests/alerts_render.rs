//! Each channel's payload shape and limits, from the pure renderers.

use std::collections::BTreeMap;

use acutoken::alerts::render::{self, Message, Notice, embed_chars};
use acutoken::alerts::{AlertFacts, AlertKind, Status};
use acutoken::config::ChannelKind;
use acutoken::model::{Severity, State};
use acutoken::secret::Secret;
use acutoken::store::authorizations::Authorization;
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
        link: None,
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
fn teams_counts_bytes_and_lists_fewer_alerts_when_forty_links_do_not_fit() {
    // Forty alerts with an open link each, every text in three-byte
    // characters or six-byte escapes: counted in characters this was 40,751
    // characters and well over Teams' 28 KB (found by the fuzzer).
    let notices: Vec<Notice> = (0..40)
        .map(|i| {
            let name = format!("{i:02}-{}", "接続\u{1}".repeat(200));
            let mut n = linked(&name, 0, Status::Firing);
            n.facts.summary = "失効".repeat(3000);
            n.link = Some(Authorization {
                url: Secret::new(format!("https://x.example/{}", "q".repeat(560))),
                expires_at: now(),
            });
            n
        })
        .collect();
    let msg = Message::new(notices, 40, now());
    let body = render::teams(&msg);
    let text = body.to_string();
    assert!(
        text.len() <= render::TEAMS_BODY_MAX,
        "{} bytes over Teams' limit",
        text.len()
    );
    let items = body["attachments"][0]["content"]["body"]
        .as_array()
        .unwrap();
    let listed = items.iter().filter(|i| i["type"] == "Container").count();
    assert!(
        (1..40).contains(&listed),
        "fewer alerts listed, at least one: {listed}"
    );
    let more = items.last().unwrap()["text"].as_str().unwrap();
    assert!(
        more.contains(&format!("{} more", 40 - listed)),
        "the rest are counted: {more}"
    );
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
                    link: None,
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
            link: None,
        }],
        10,
        now(),
    );
    let g = render::generic(&test);
    assert_eq!(g["connection"], "-");
    assert_eq!(g["severity"], "info");
}

/// An authorization link as the simulator's would look: long, with `&`s.
fn link_url(name: &str) -> String {
    format!(
        "https://{name}.acumatica.com/ERP/identity/connect/authorize?response_type=code&client_id=88358B02-A48D-A50E-F710-39C1636C30F6%40My+Company&redirect_uri=https%3A%2F%2Fconnect.example.com%2Fcb&scope=api+offline_access&state=STATE-{name}-0123456789abcdefghijklmnopqrstuvwxyzABC&code_challenge=CHALLENGE0123456789abcdefghijklmnopqrstuvwxyzAB&code_challenge_method=S256"
    )
}

/// A `needs_reauthorization` alert about `name`, with its open link.
fn linked(name: &str, error_len: usize, status: Status) -> Notice {
    let mut f = facts(name, error_len);
    f.kind = AlertKind::NeedsReauthorization;
    f.state = Some(State::NeedsReauthorization);
    f.action = format!(
        "the customer must re-authorize: run `acutoken connection authorize {name}` and send the customer the link it prints"
    );
    Notice {
        id: render::notice_id(name, 1, status, 0),
        status,
        facts: f,
        link: Some(Authorization {
            url: Secret::new(link_url(name)),
            expires_at: chrono::Utc.with_ymd_and_hms(2026, 3, 15, 8, 0, 0).unwrap(),
        }),
    }
}

fn linked_group(n: usize, max: usize) -> Message {
    let notices = (0..n)
        .map(|i| {
            linked(
                &format!("conn-{i:04}-{}", "n".repeat(100)),
                10_000,
                Status::Firing,
            )
        })
        .collect();
    Message::new(notices, max, now())
}

#[test]
fn generic_carries_authorization_url_only_while_the_customer_must_act() {
    let one = render::generic(&Message::new(
        vec![linked("acme", 10, Status::Firing)],
        10,
        now(),
    ));
    assert_eq!(one["authorization_url"], link_url("acme"));
    let action = one["action"].as_str().unwrap();
    assert!(action.contains(&link_url("acme")), "{action}");
    assert!(action.contains("2026-03-15T08:00:00Z"), "says until when");
    assert!(
        !action.contains("acutoken connection authorize"),
        "the link replaces the command: {action}"
    );

    let resolved = render::generic(&Message::new(
        vec![linked("acme", 10, Status::Resolved)],
        10,
        now(),
    ));
    assert!(resolved.get("authorization_url").is_none(), "{resolved}");
    assert!(!resolved.to_string().contains("STATE-acme"));

    let none = render::generic(&single("acme", 10));
    assert!(none.get("authorization_url").is_none(), "absent, not null");

    let g = render::generic(&linked_group(12, 10));
    for a in g["alerts"].as_array().unwrap() {
        let name = a["connection"].as_str().unwrap();
        assert_eq!(a["authorization_url"], link_url(name));
    }
}

#[test]
fn every_chat_channel_carries_the_whole_link() {
    for msg in [
        Message::new(vec![linked("acme", 10, Status::Firing)], 10, now()),
        linked_group(30, 10),
    ] {
        let names: Vec<String> = msg
            .notices
            .iter()
            .map(|n| n.facts.connection.clone())
            .collect();

        // Slack: a button beside each alert's text, and the link in the text.
        let slack = render::slack(&msg);
        let buttons: Vec<&serde_json::Value> = slack["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|b| b.get("accessory"))
            .collect();
        assert_eq!(buttons.len(), names.len());
        for (b, name) in buttons.iter().zip(&names) {
            assert_eq!(b["type"], "button");
            assert_eq!(b["url"], link_url(name));
            assert!(chars(&b["text"]["text"]) > 0);
        }
        assert!(slack["blocks"].as_array().unwrap().len() <= 50);

        // Teams: an Action.OpenUrl under each alert.
        let teams = render::teams(&msg);
        let opens: Vec<serde_json::Value> = teams["attachments"][0]["content"]["body"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c["items"].as_array().cloned().unwrap_or_default())
            .filter(|i| i["type"] == "ActionSet")
            .map(|i| i["actions"][0].clone())
            .collect();
        assert_eq!(opens.len(), names.len());
        for (o, name) in opens.iter().zip(&names) {
            assert_eq!(o["type"], "Action.OpenUrl");
            assert_eq!(o["url"], link_url(name));
        }
        let text = teams.to_string();
        assert!(text.len() < 28_000);

        // Discord: each embed's title links to it, within every limit.
        let discord = render::discord(&msg);
        for (e, name) in discord["embeds"].as_array().unwrap().iter().zip(&names) {
            assert_eq!(e["url"], link_url(name));
        }
        assert!(embed_chars(&discord) <= render::MAX_TOTAL);

        // Google Chat: a button per link on a card; the text holds each
        // link whole or points at its button, never a cut link.
        let chat = render::google_chat(&msg);
        let text = chat["text"].as_str().unwrap();
        assert!(text.chars().count() <= 4096);
        let buttons =
            chat["cardsV2"][0]["card"]["sections"][0]["widgets"][0]["buttonList"]["buttons"]
                .as_array()
                .unwrap();
        assert_eq!(buttons.len(), names.len());
        for (b, name) in buttons.iter().zip(&names) {
            assert_eq!(b["onClick"]["openLink"]["url"], link_url(name));
        }
        for line in text.lines().filter(|l| l.contains("identity/connect")) {
            assert!(
                names.iter().any(|n| line.contains(&link_url(n))),
                "a cut link: {line}"
            );
        }
        if names.len() == 1 {
            assert!(text.contains(&link_url("acme")), "{text}");
        }
    }
}
