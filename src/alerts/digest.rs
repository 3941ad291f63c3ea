//! The digest: on the `alerts.digest` cron schedule, one summary per channel
//! of connections per state, who must act, and the nearest deadlines.
//!
//! The schedule runs in `alerts.digest_timezone`. Only future times fire: a
//! digest missed while the daemon was down, or while the previous digest was
//! still being sent, is not sent late. One task sleeps until the next time
//! (never a scheduler of jobs: there is only ever one).

use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::http::{self, Outcome};
use crate::clock::SharedClock;
use crate::config::{ChannelKind, Config};
use crate::model::clip;
use crate::model::{State, Timestamp, fmt_time};
use crate::store::Store;
use crate::store::alerts::{self as outbox, DigestData, DigestEntry};

/// How many connections each list of the digest names.
pub const DIGEST_LIST: usize = 10;

/// Why the digest could not be scheduled.
#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    /// The scheduler could not start or the schedule was refused: the daemon
    /// reports it; alerts are unaffected.
    #[error("cannot schedule the digest: {0}")]
    Schedule(String),
    /// No HTTP client: the daemon reports it.
    #[error(transparent)]
    Client(#[from] http::ClientError),
}

fn entry_line(e: &DigestEntry) -> String {
    let labels = if e.labels.is_empty() {
        String::new()
    } else {
        format!(
            " [{}]",
            e.labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let deadline = e
        .deadline
        .map_or_else(String::new, |d| format!(", deadline {}", fmt_time(d)));
    clip(
        &format!("{} ({}){labels}: {}{deadline}", e.name, e.instance, e.state),
        300,
    )
}

/// The digest as plain lines: a title, then sections.
pub fn digest_text(data: &DigestData, now: Timestamp) -> (String, Vec<(String, Vec<String>)>) {
    let total: u64 = data.counts.values().sum();
    let title = format!(
        "acutoken digest {}: {total} connections, {} waiting for a person",
        fmt_time(now),
        data.must_act_total
    );
    let counts = State::ALL
        .iter()
        .filter_map(|s| data.counts.get(s).map(|n| format!("{s}: {n}")))
        .collect::<Vec<_>>();
    let mut sections = vec![("Connections per state".to_string(), counts)];
    let mut act: Vec<String> = data
        .must_act
        .iter()
        .map(|e| {
            let who = e.state.action().unwrap_or("");
            format!("{} → {}", entry_line(e), who.replace("NAME", &e.name))
        })
        .collect();
    if data.must_act_total as usize > data.must_act.len() {
        act.push(format!(
            "…and {} more (see `acutoken status`)",
            data.must_act_total as usize - data.must_act.len()
        ));
    }
    if act.is_empty() {
        act.push("nobody: every connection is looking after itself".into());
    }
    sections.push(("Who must act".to_string(), act));
    let mut nearest: Vec<String> = data.nearest.iter().map(entry_line).collect();
    if nearest.is_empty() {
        nearest.push("none".into());
    }
    sections.push(("Nearest deadlines".to_string(), nearest));
    if !data.firing.is_empty() {
        sections.push((
            "Firing alerts".to_string(),
            data.firing
                .iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect(),
        ));
    }
    (title, sections)
}

/// The digest body for a channel kind.
pub fn render_digest(kind: ChannelKind, data: &DigestData, now: Timestamp) -> Value {
    let (title, sections) = digest_text(data, now);
    let plain = |bold: &str| {
        let mut s = format!("{bold}{title}{bold}");
        for (h, lines) in &sections {
            s.push_str(&format!("\n\n{bold}{h}{bold}"));
            for l in lines {
                s.push_str(&format!("\n• {l}"));
            }
        }
        s
    };
    match kind {
        ChannelKind::Slack => {
            let mut blocks = vec![
                json!({"type": "header", "text": {"type": "plain_text", "text": clip(&title, 150)}}),
            ];
            for (h, lines) in &sections {
                let body = format!(
                    "*{h}*\n{}",
                    lines
                        .iter()
                        .map(|l| format!("• {l}"))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
                blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": clip(&body, 3000)}}));
            }
            json!({"text": clip(&title, 3000), "blocks": blocks})
        }
        ChannelKind::Teams => {
            let mut body = vec![
                json!({"type": "TextBlock", "size": "Large", "weight": "Bolder", "wrap": true, "text": title}),
            ];
            for (h, lines) in &sections {
                body.push(json!({"type": "TextBlock", "weight": "Bolder", "wrap": true, "separator": true, "text": h}));
                body.push(json!({"type": "TextBlock", "wrap": true, "text": clip(&lines.iter().map(|l| format!("- {l}")).collect::<Vec<_>>().join("\n"), 4000)}));
            }
            json!({"type": "message", "attachments": [{
                "contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": null,
                "content": {"$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                    "type": "AdaptiveCard", "version": "1.4", "msteams": {"width": "Full"}, "body": body}}]})
        }
        ChannelKind::Discord => {
            let fields: Vec<Value> = sections
                .iter()
                .take(25)
                .map(|(h, lines)| json!({"name": clip(h, 256), "value": clip(&lines.join("\n"), 1000)}))
                .collect();
            json!({"content": clip(&title, 2000), "embeds": [{"title": clip(&title, 256), "fields": fields, "timestamp": fmt_time(now)}], "allowed_mentions": {"parse": []}})
        }
        ChannelKind::GoogleChat => json!({"text": clip(&plain("*"), 4000)}),
        ChannelKind::Generic => json!({
            "kind": "digest",
            "sent_at": fmt_time(now),
            "counts": data.counts.iter().map(|(s, n)| (s.as_str().to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "must_act_total": data.must_act_total,
            "must_act": data.must_act.iter().map(entry_json).collect::<Vec<_>>(),
            "nearest_deadlines": data.nearest.iter().map(entry_json).collect::<Vec<_>>(),
            "firing": data.firing.iter().map(|(k, n)| (k.as_str().to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
        }),
    }
}

fn entry_json(e: &DigestEntry) -> Value {
    json!({
        "connection": e.name,
        "instance": e.instance,
        "state": e.state,
        "deadline": e.deadline.map(fmt_time),
        "labels": e.labels,
        "action": e.state.action().map(|a| a.replace("NAME", &e.name)),
    })
}

/// Sends one digest to every channel now (whatever its `min_severity`).
pub async fn send_digest(
    store: &Arc<std::sync::Mutex<Store>>,
    config: &Config,
    clock: &SharedClock,
) -> Result<(), DigestError> {
    let now = clock.now();
    let data =
        crate::store::blocking::with_shared(store, |st| outbox::digest_data(st, DIGEST_LIST))
            .await
            .map_err(|e| DigestError::Schedule(e.to_string()))?;
    let data = match data {
        Ok(d) => d,
        Err(e) => {
            tracing::error!("cannot read the store for the digest: {e}");
            return Ok(());
        }
    };
    let client = http::client()?;
    for w in &config.alerts.webhooks {
        let body = render_digest(w.kind, &data, now);
        let host = http::host_of(w.url.as_ref());
        match http::post(&client, w, &body, now).await {
            Outcome::Accepted { .. } => tracing::info!(
                channel = w.name.as_str(),
                host = host.as_str(),
                "digest delivered"
            ),
            Outcome::Failed { error, .. } => {
                tracing::warn!(
                    channel = w.name.as_str(),
                    host = host.as_str(),
                    "digest not delivered (not retried): {error}"
                );
                let name = w.name.clone();
                let _ = crate::store::blocking::with_shared(store, move |st| {
                    st.record_channel_error(&name, &format!("digest: {error}"), now)
                })
                .await;
            }
        }
    }
    Ok(())
}

/// The longest single sleep towards the next digest. The wait is measured
/// on the monotonic clock while the schedule is in wall-clock time: waking at
/// least this often follows a wall clock that was set or a machine that slept.
const MAX_SLEEP: std::time::Duration = std::time::Duration::from_secs(30);

/// The configured digest schedule in its time zone.
struct Schedule {
    cron: croner::Cron,
    tz: chrono_tz::Tz,
}

impl Schedule {
    /// `None` when no digest is configured.
    fn from_config(config: &Config) -> Result<Option<Schedule>, DigestError> {
        let Some(cron) = config.digest_schedule() else {
            return Ok(None);
        };
        let tz: chrono_tz::Tz = config.alerts.digest_timezone.parse().map_err(|_| {
            DigestError::Schedule(format!(
                "unknown time zone `{}`",
                config.alerts.digest_timezone
            ))
        })?;
        Ok(Some(Schedule { cron, tz }))
    }

    /// The first time strictly after `now` the digest is due, or `None` when
    /// the expression never fires again (for example 30 February).
    fn next_after(&self, now: Timestamp) -> Option<Timestamp> {
        self.cron
            .find_next_occurrence(&now.with_timezone(&self.tz), false)
            .ok()
            .map(|t| t.with_timezone(&chrono::Utc))
    }
}

/// Sends the digest on the configured schedule until `shutdown`; follows
/// config reloads (a changed schedule, time zone or channel list).
/// `store` is the digest's own connection.
pub async fn run_digest(
    store: Store,
    mut config: watch::Receiver<Arc<Config>>,
    clock: SharedClock,
    shutdown: CancellationToken,
) -> Result<(), DigestError> {
    let store = Arc::new(std::sync::Mutex::new(store));
    let mut cfg = config.borrow_and_update().clone();
    let mut schedule = Schedule::from_config(&cfg)?;
    let mut next = schedule.as_ref().and_then(|s| s.next_after(clock.now()));
    let mut config_open = true;
    loop {
        let wait = next.map(|at| {
            (at - clock.now())
                .to_std()
                .unwrap_or_default()
                .min(MAX_SLEEP)
        });
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            changed = config.changed(), if config_open => {
                if changed.is_err() {
                    config_open = false;
                    continue;
                }
                let fresh = config.borrow_and_update().clone();
                if fresh.alerts.digest != cfg.alerts.digest
                    || fresh.alerts.digest_timezone != cfg.alerts.digest_timezone
                {
                    schedule = Schedule::from_config(&fresh)?;
                    next = schedule.as_ref().and_then(|s| s.next_after(clock.now()));
                }
                cfg = fresh;
            }
            () = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {
                let now = clock.now();
                if let Some(at) = next.filter(|at| now >= *at) {
                    // Of several replicas, the first to claim this time sends.
                    let claimed = crate::store::blocking::with_shared(&store, move |st| {
                        st.claim_digest(at)
                    })
                    .await
                    .map_err(|e| DigestError::Schedule(e.to_string()))?;
                    match claimed {
                        Ok(true) => {
                            if let Err(e) = send_digest(&store, &cfg, &clock).await {
                                tracing::error!("{e}");
                            }
                        }
                        Ok(false) => tracing::info!("the digest due at {} was sent by another replica", crate::model::fmt_time(at)),
                        Err(e) => tracing::error!("cannot record the digest due at {} (not sent; the next one is): {e}", crate::model::fmt_time(at)),
                    }
                    // From the time the digest went out, so the times that
                    // passed while sending it are skipped, not sent late.
                    next = schedule.as_ref().and_then(|s| s.next_after(clock.now()));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(expr: &str, tz: &str) -> Schedule {
        let mut config = Config::default();
        config.alerts.digest = Some(expr.into());
        config.alerts.digest_timezone = tz.into();
        Schedule::from_config(&config).unwrap().unwrap()
    }

    fn at(rfc3339: &str) -> Timestamp {
        chrono::DateTime::parse_from_rfc3339(rfc3339)
            .unwrap()
            .with_timezone(&chrono::Utc)
    }

    #[test]
    fn the_next_digest_is_in_the_configured_time_zone_and_strictly_later() {
        let s = schedule("0 8 * * 1-5", "Europe/Berlin");
        // Friday 07:00 UTC is 08:00 in Berlin (winter): due now, so the next
        // is Monday's.
        assert_eq!(
            s.next_after(at("2026-01-09T07:00:00Z")),
            Some(at("2026-01-12T07:00:00Z"))
        );
        assert_eq!(
            s.next_after(at("2026-01-09T06:59:59Z")),
            Some(at("2026-01-09T07:00:00Z"))
        );
        // Summer time: 08:00 in Berlin is 06:00 UTC.
        assert_eq!(
            s.next_after(at("2026-07-01T00:00:00Z")),
            Some(at("2026-07-01T06:00:00Z"))
        );
    }

    #[test]
    fn a_time_skipped_by_summer_time_is_not_a_reason_to_stop() {
        // 02:30 does not exist in Berlin on 29 March 2026; the schedule goes on.
        let s = schedule("30 2 * * *", "Europe/Berlin");
        let next = s.next_after(at("2026-03-28T02:00:00Z")).unwrap();
        assert!(next > at("2026-03-28T02:00:00Z"));
        let after = s.next_after(next).unwrap();
        assert!(after > next);
        assert_eq!(
            s.next_after(at("2026-03-30T00:00:00Z")),
            Some(at("2026-03-30T00:30:00Z"))
        );
    }

    #[test]
    fn no_digest_configured_is_no_schedule_and_a_bad_zone_is_an_error() {
        assert!(Schedule::from_config(&Config::default()).unwrap().is_none());
        let mut config = Config::default();
        config.alerts.digest = Some("0 8 * * *".into());
        config.alerts.digest_timezone = "Mars/Olympus".into();
        assert!(matches!(
            Schedule::from_config(&config),
            Err(DigestError::Schedule(_))
        ));
    }
}
