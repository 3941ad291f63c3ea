//! The delivery worker: reads the outbox, groups per channel and kind, posts,
//! and records what each channel accepted.
//!
//! Every channel has its own backoff (kept in the store, so it survives a
//! restart) and at most one post in flight; posts run as their own tasks, so a
//! dead or hanging channel (bounded by [`WEBHOOK_TIMEOUT`](super::http::WEBHOOK_TIMEOUT))
//! never delays another. The store is only touched on blocking threads and
//! never held across a network await.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::TimeDelta;
use rand::Rng;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::http::{self, ClientError, Outcome};
use super::render::{Message, Notice, notice_id, render};
use super::text;
use crate::clock::SharedClock;
use crate::config::{AlertsConfig, ChannelKind, Config, WebhookConfig};
use crate::model::{AlertKind, Status, Timestamp};
use crate::renewal::authorize::{AlertLink, AlertLinks, link_for_alert};
use crate::store::alerts::{self as outbox, Accepted, Due, Wake};
use crate::store::authorizations::Authorization;
use crate::store::{Store, StoreError};

/// The longest the worker sleeps without looking at the clock and the outbox.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// Pruning the outbox is a write transaction; the worker is woken after every
/// refresh that raised or resolved anything, so under a backlog it prunes at
/// most this often (and wakes for a prune it put off).
const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// How long a stopping worker waits for posts in flight to be answered and
/// recorded; what is cut off is sent again after the restart.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Retry-After beyond this is treated as this: a misbehaving endpoint must
/// not silence a channel for days.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(6 * 3600);

/// Why the worker could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// No HTTP client: alerts cannot be delivered; the daemon reports it and
    /// keeps running (alerts stay in the outbox).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A blocking store task panicked: a bug; the daemon reports it.
    #[error("the alert worker's store task failed: {0}")]
    Task(String),
}

/// A channel's delivery health, for `status` (serialises with these field
/// names, times as RFC 3339).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ChannelHealth {
    /// The channel's name.
    pub name: String,
    /// Its kind.
    pub kind: ChannelKind,
    /// Its webhook's host (never the URL).
    pub host: String,
    /// Alerts it is due and has not accepted yet (repeats not counted).
    pub undelivered: u64,
    /// Failed attempts in a row.
    pub failures: u32,
    /// The next attempt is not before this (backoff, Retry-After).
    pub retry_at: Option<Timestamp>,
    /// The last failure.
    pub last_error: Option<String>,
    /// When it happened.
    pub last_error_at: Option<Timestamp>,
    /// When a message was last accepted.
    pub last_success: Option<Timestamp>,
}

/// The health of every configured channel.
pub fn channel_health(store: &Store, config: &Config) -> Result<Vec<ChannelHealth>, StoreError> {
    let a = &config.alerts;
    a.webhooks
        .iter()
        .map(|w| {
            let row = outbox::channel(store, &w.name)?;
            Ok(ChannelHealth {
                name: w.name.clone(),
                kind: w.kind,
                host: http::host_of(w.url.as_ref()),
                undelivered: outbox::undelivered(store, &w.name, w.min_severity, a.send_resolved)?,
                failures: row.failures,
                retry_at: row.retry_at,
                last_error: row.last_error,
                last_error_at: row.last_error_at,
                last_success: row.last_success_at,
            })
        })
        .collect()
}

/// What [`reconcile`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Connections with firing alerts whose conditions were evaluated again.
    pub reevaluated: usize,
    /// Alerts dropped because they cleared before any channel got them.
    pub dropped: usize,
}

/// Brings the outbox up to date before anything is delivered (the worker
/// runs it when it starts).
///
/// Every connection with a firing alert is evaluated again (a removed one
/// resolves its alerts), a `config_reload_failed` from an earlier run is
/// resolved (this config loaded), the channel table follows the config, and
/// resolved alerts no channel still needs to hear about are dropped, with a
/// log line for each that no channel ever got. A stale undelivered firing
/// whose condition cleared is thereby never sent; one that moved on is sent
/// as it stands now.
pub fn reconcile(
    store: &mut Store,
    config: &Config,
    now: Timestamp,
) -> Result<Reconciled, StoreError> {
    let policy = config.renewal.policy();
    let ids = outbox::firing_connection_ids(store)?;
    // Short transactions: the engine and the CLI write too.
    for chunk in ids.chunks(500) {
        store.reevaluate_alerts(chunk, now, |row| {
            crate::renewal::alert_conditions::desired(row, &policy, now)
        })?;
    }
    let dropped = store.reconcile_outbox(
        &channel_list(&config.alerts),
        config.alerts.send_resolved,
        now,
    )?;
    log_dropped(&dropped);
    Ok(Reconciled {
        reevaluated: ids.len(),
        dropped: dropped.len(),
    })
}

fn log_dropped(dropped: &[outbox::Dropped]) {
    for d in dropped.iter().take(100) {
        tracing::info!(
            alert.kind = d.kind.as_str(),
            connection = d.connection.as_str(),
            "alert {} for {} cleared before it was delivered: dropped",
            d.kind,
            d.connection
        );
    }
    if dropped.len() > 100 {
        tracing::info!(
            "{} more alerts cleared before they were delivered: dropped",
            dropped.len() - 100
        );
    }
}

fn channel_list(a: &AlertsConfig) -> Vec<(String, String)> {
    a.webhooks
        .iter()
        .map(|w| (w.name.clone(), w.kind.as_str().to_string()))
        .collect()
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add_signed(TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC)
}

fn sub(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_sub_signed(TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC)
}

/// One message ready to go to one channel.
struct Batch {
    channel: WebhookConfig,
    kind: AlertKind,
    accepted: Vec<Accepted>,
    body: Value,
    sent_at: Timestamp,
}

/// What a channel should do now.
enum Plan {
    /// Post this.
    Send(Batch),
    /// Nothing is ready; look again at this time (if any).
    Wait(Option<Timestamp>),
}

/// Picks the group that is ready for `w` at `now`, if any.
fn plan(
    store: &mut Store,
    w: &WebhookConfig,
    a: &AlertsConfig,
    links: Option<&AlertLinks>,
    now: Timestamp,
) -> Result<Plan, StoreError> {
    let db: &Store = store;
    let health = outbox::channel(db, &w.name)?;
    if let Some(retry) = health.retry_at.filter(|r| *r > now) {
        return Ok(Plan::Wait(Some(retry)));
    }
    let due = outbox::due(
        db,
        &w.name,
        w.min_severity,
        a.send_resolved,
        sub(now, a.repeat_interval),
    )?;
    let last_group = outbox::group_times(db, &w.name)?;
    let mut by_kind: BTreeMap<AlertKind, Vec<Due>> = BTreeMap::new();
    for d in due {
        by_kind.entry(d.facts.kind).or_default().push(d);
    }
    let mut next: Option<Timestamp> = outbox::oldest_send(db, &w.name)?
        .map(|t| add(t, a.repeat_interval))
        .filter(|t| *t > now);
    let mut ready: Option<(Timestamp, AlertKind)> = None;
    for (kind, items) in &by_kind {
        let first = items
            .iter()
            .map(|d| {
                if d.repeat {
                    now
                } else {
                    add(d.changed_at, a.group_wait)
                }
            })
            .min()
            .unwrap_or(now);
        let gate = last_group.get(kind).map(|t| add(*t, a.group_interval));
        let at = gate.map_or(first, |g| g.max(first));
        if at <= now {
            if ready.is_none_or(|(t, _)| at < t) {
                ready = Some((at, *kind));
            }
        } else {
            next = Some(next.map_or(at, |n| n.min(at)));
        }
    }
    let Some((_, kind)) = ready else {
        return Ok(Plan::Wait(next));
    };
    let items = by_kind.remove(&kind).unwrap_or_default();
    let listed = a.group_max.max(1);
    let mut notices = Vec::with_capacity(items.len());
    let mut accepted = Vec::with_capacity(items.len());
    for (i, d) in items.into_iter().enumerate() {
        let mut facts = d.facts;
        let mut link = None;
        if i < listed && d.status == Status::Firing && facts.kind.carries_link() {
            link = add_link(store, links, &mut facts, now);
        }
        notices.push(Notice {
            id: notice_id(&d.alert_id, d.revision, d.status, d.sends),
            status: d.status,
            facts,
            link,
        });
        accepted.push(Accepted {
            alert_id: d.alert_id,
            revision: d.revision,
            status: d.status,
        });
    }
    let msg = Message::new(notices, listed, now);
    Ok(Plan::Send(Batch {
        channel: w.clone(),
        kind,
        accepted,
        body: render(w.kind, &msg),
        sent_at: now,
    }))
}

/// The authorization link an alert that needs the customer carries: the
/// open one, else one opened now (DESIGN §8). Read or opened at delivery
/// time, so the outbox never holds it, a repeat after a link timed out
/// carries a working one, and no link is opened that nobody is sent.
/// Without a redirect URI the action says why there is no link instead.
fn add_link(
    store: &mut Store,
    links: Option<&AlertLinks>,
    facts: &mut super::AlertFacts,
    now: Timestamp,
) -> Option<Authorization> {
    let id = facts.connection_id?;
    let kind = facts.kind;
    match link_for_alert(store, links, kind, id, now) {
        Ok(AlertLink::Open(auth)) => Some(auth),
        Ok(AlertLink::NoRedirectUri) => {
            facts.action = text::without_redirect_uri(facts);
            None
        }
        Ok(AlertLink::None) => None,
        Err(e) => {
            tracing::warn!(
                connection = facts.connection.as_str(),
                "cannot read or open the authorization link for the alert (the command is sent instead): {e}"
            );
            None
        }
    }
}

/// The delay before the next attempt after `failures` failures in a row.
fn backoff(a: &AlertsConfig, failures: u32, retry_after: Option<Duration>) -> Duration {
    let min = a.retry_min.max(Duration::from_millis(1));
    let max = a.retry_max.max(min);
    let step = min
        .checked_mul(1u32 << failures.saturating_sub(1).min(20))
        .unwrap_or(max)
        .min(max);
    // Jitter in the upper half of the step, never below retry_min.
    let jittered = step
        .mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
        .max(min);
    match retry_after {
        Some(ra) => jittered.max(ra.min(MAX_RETRY_AFTER)),
        None => jittered,
    }
}

/// What opening links for alerts needs from `cfg`; `None` (logged) when
/// its token client cannot be built, and then open links are still sent.
fn alert_links(cfg: &Config) -> Option<AlertLinks> {
    AlertLinks::from_config(cfg)
        .inspect_err(|e| {
            tracing::error!(
                "alerts cannot open authorization links (open ones are still sent): {e}"
            )
        })
        .ok()
}

type Shared = Arc<Mutex<Store>>;

/// Runs `f` on a blocking thread with the store.
async fn with_store<T: Send + 'static>(
    store: &Shared,
    f: impl FnOnce(&mut Store) -> T + Send + 'static,
) -> Result<T, WorkerError> {
    crate::store::blocking::with_shared(store, f)
        .await
        .map_err(|e| WorkerError::Task(e.to_string()))
}

/// Records a post's outcome; returns nothing the loop needs.
fn record(store: &mut Store, a: &AlertsConfig, batch: &Batch, outcome: &Outcome, now: Timestamp) {
    let name = batch.channel.name.as_str();
    let host = http::host_of(batch.channel.url.as_ref());
    let result = match outcome {
        Outcome::Accepted { status } => {
            tracing::debug!(
                channel = name,
                host = host.as_str(),
                alert.kind = batch.kind.as_str(),
                "delivered {} alert(s), HTTP {status}",
                batch.accepted.len()
            );
            store.record_delivery(name, batch.kind, &batch.accepted, batch.sent_at)
        }
        Outcome::Failed {
            error, retry_after, ..
        } => {
            let failures = outbox::channel(store, name).map_or(0, |c| c.failures) + 1;
            let delay = backoff(a, failures, *retry_after);
            tracing::warn!(
                channel = name,
                host = host.as_str(),
                alert.kind = batch.kind.as_str(),
                failures,
                "alert delivery failed ({error}); next attempt in {}",
                crate::model::fmt_duration(Duration::from_secs(delay.as_secs().max(1)))
            );
            store.record_delivery_failure(name, error, add(now, delay), now)
        }
    };
    if let Err(e) = result {
        // The message was sent (or not) all the same; it stays due and goes again.
        tracing::error!(channel = name, "cannot record an alert delivery: {e}");
    }
}

/// Delivers the outbox until `shutdown`: reconciles once, then sleeps until
/// something is due, `wake` is poked, the config changes, or at most a minute.
///
/// `store` is the worker's own connection (opened by the daemon). Undelivered
/// alerts stay in the outbox when it stops; posts in flight get
/// [`SHUTDOWN_GRACE`] to be answered and recorded.
///
/// Only while `duty` is held: of several replicas on one PostgreSQL store,
/// one delivers at a time, so each alert goes out once per channel.
pub async fn run(
    store: Store,
    mut config: watch::Receiver<Arc<Config>>,
    clock: SharedClock,
    shutdown: CancellationToken,
    wake: Wake,
    duty: Arc<crate::store::replicas::Duty>,
) -> Result<(), WorkerError> {
    let http_client = http::client()?;
    let store: Shared = Arc::new(Mutex::new(store));
    let mut cfg = config.borrow_and_update().clone();
    let mut links = alert_links(&cfg);
    // Reconciled by the replica that delivers, when it starts delivering.
    let mut reconciled = false;
    // Which channel each post task serves, so a task that panics frees its channel.
    let mut in_flight: HashMap<tokio::task::Id, String> = HashMap::new();
    let mut tasks: JoinSet<(Batch, Outcome)> = JoinSet::new();
    let mut config_open = true;
    let mut channels_synced = true;
    let mut last_prune: Option<std::time::Instant> = None;
    loop {
        let now = clock.now();
        let on_duty = duty.held();
        // Each time this replica takes the delivery over.
        reconciled &= on_duty;
        if on_duty && !reconciled {
            reconciled = true;
            let c = cfg.clone();
            match with_store(&store, move |s| reconcile(s, &c, now)).await? {
                Ok(r) => tracing::info!(
                    reevaluated = r.reevaluated,
                    dropped = r.dropped,
                    "alert outbox reconciled"
                ),
                Err(e) => tracing::error!("cannot reconcile the alert outbox: {e}"),
            }
        }
        let prune_due = last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY);
        let plans = if !on_duty {
            // Another replica delivers; this one looks again when it wins
            // the duty (or in a minute at the latest).
            Ok(Vec::new())
        } else {
            let c = cfg.clone();
            let l = links.clone();
            let busy: HashSet<String> = in_flight.values().cloned().collect();
            let sync = !channels_synced;
            let prune = busy.is_empty() && prune_due;
            if prune {
                last_prune = Some(std::time::Instant::now());
            }
            with_store(&store, move |s| -> Result<Vec<Plan>, StoreError> {
                let a = &c.alerts;
                if sync {
                    s.sync_alert_channels(&channel_list(a))?;
                }
                if prune {
                    let dropped = s.prune_alerts(a.send_resolved)?;
                    log_dropped(&dropped);
                }
                a.webhooks
                    .iter()
                    .filter(|w| !busy.contains(&w.name))
                    .map(|w| plan(s, w, a, l.as_ref(), now))
                    .collect()
            })
            .await?
        };
        // A prune put off comes back when it is due.
        let mut next: Option<Timestamp> = (on_duty && !prune_due).then(|| add(now, PRUNE_EVERY));
        match plans {
            Ok(plans) => {
                channels_synced = true;
                for p in plans {
                    match p {
                        Plan::Send(batch) => {
                            let name = batch.channel.name.clone();
                            let http_client = http_client.clone();
                            let handle = tasks.spawn(async move {
                                let outcome = http::post(
                                    &http_client,
                                    &batch.channel,
                                    &batch.body,
                                    batch.sent_at,
                                )
                                .await;
                                (batch, outcome)
                            });
                            in_flight.insert(handle.id(), name);
                        }
                        Plan::Wait(Some(t)) => next = Some(next.map_or(t, |n| n.min(t))),
                        Plan::Wait(None) => {}
                    }
                }
            }
            Err(e) => {
                tracing::error!("cannot read the alert outbox: {e}");
                next = Some(add(now, Duration::from_secs(5)));
            }
        }
        let sleep = next.map_or(MAX_SLEEP, |t| {
            (t - clock.now())
                .to_std()
                .unwrap_or(Duration::ZERO)
                .min(MAX_SLEEP)
        });
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                match done {
                    Ok((id, (batch, outcome))) => {
                        in_flight.remove(&id);
                        let (c, now) = (cfg.clone(), clock.now());
                        with_store(&store, move |s| record(s, &c.alerts, &batch, &outcome, now))
                            .await?;
                    }
                    Err(e) => {
                        // Nothing was recorded: the message stays due for its channel.
                        tracing::error!("an alert post task failed: {e}");
                        in_flight.remove(&e.id());
                    }
                }
            }
            changed = config.changed(), if config_open => {
                if changed.is_ok() {
                    cfg = config.borrow_and_update().clone();
                    links = alert_links(&cfg);
                    channels_synced = false;
                } else {
                    config_open = false;
                }
            }
            _ = wake.wait() => {}
            _ = duty.taken(), if !on_duty => {}
            _ = tokio::time::sleep(sleep) => {}
        }
    }
    let drain = async {
        while let Some(done) = tasks.join_next().await {
            if let Ok((batch, outcome)) = done {
                let (c, now) = (cfg.clone(), clock.now());
                with_store(&store, move |s| record(s, &c.alerts, &batch, &outcome, now)).await?;
            }
        }
        Ok::<(), WorkerError>(())
    };
    match tokio::time::timeout(SHUTDOWN_GRACE, drain).await {
        Ok(r) => r?,
        Err(_) => tracing::info!(
            "alert posts still in flight at shutdown are sent again after the restart"
        ),
    }
    tasks.abort_all();
    Ok(())
}
