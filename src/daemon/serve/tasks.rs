//! The daemon's background tasks: the store watcher that carries CLI writes
//! to the scheduler, the retry of unsaved tokens, alert delivery and the
//! digest, and the metrics gauges.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::start::Opened;
use crate::alerts::{self, Wake};
use crate::clock::SharedClock;
use crate::config::Config;
use crate::daemon::metrics::Metrics;
use crate::renewal::engine::Engine;
use crate::renewal::scheduler::{Input, Snapshot};
use crate::store::{self, Create, Store};

/// CLI writes are acted on within a second (DESIGN §5). The store watcher
/// looks at the store after every write to its WAL file (see `watch`), and
/// at least this often in case an event was missed...
const WATCH_FALLBACK: Duration = Duration::from_secs(5);
/// ...and at most once per this long, so a burst of commits costs one look.
const WATCH_GAP: Duration = Duration::from_millis(100);

/// The daemon's tasks, joined at shutdown.
pub(super) type Tasks = tokio::task::JoinSet<()>;

/// What the background tasks share.
pub(super) struct Common {
    /// The configuration in force (replaced on reload).
    pub(super) config_rx: watch::Receiver<Arc<Config>>,
    pub(super) clock: SharedClock,
    /// Cancelled when the daemon stops.
    pub(super) shutdown: CancellationToken,
    /// The outbox's doorbell.
    pub(super) wake: Wake,
}

/// CLI writes reach the scheduler through the store's change sequence: the
/// watcher reads what changed after each write to the store (or every
/// [`WATCH_FALLBACK`]) and hands it to the scheduler; it also prunes old
/// history every six hours.
pub(super) fn spawn_store_watcher(
    tasks: &mut Tasks,
    watcher_store: Store,
    sched_tx: &mpsc::Sender<Input>,
    common: &Common,
) -> anyhow::Result<()> {
    let Common {
        clock,
        shutdown,
        wake,
        ..
    } = common;
    let tx = sched_tx.clone();
    let shutdown = shutdown.clone();
    let wake = wake.clone();
    let mut st = watcher_store;
    let mut seq = st.change_seq()?;
    let mut version = st.data_version()?;
    let clock = clock.clone();
    let mut watch = if st.is_postgres() {
        crate::daemon::watch::StoreWatch::postgres(&st)
    } else {
        crate::daemon::watch::StoreWatch::new(st.path())
    };
    tasks.spawn(async move {
        let mut last_prune = clock.now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = watch.wait(WATCH_FALLBACK) => {}
            }
            let now = clock.now();
            let prune = now - last_prune > chrono::Duration::hours(6);
            let (back, (res, seen)) = store::blocking::with_owned(st, move |st| {
                // data_version moves only when another connection commits:
                // an idle store costs one in-memory pragma per turn.
                let seen = st.data_version().unwrap_or(version.wrapping_add(1));
                let r = if seen == version {
                    Ok(store::connections::Changes {
                        newest: seq,
                        ..Default::default()
                    })
                } else {
                    st.changes_since(seq)
                };
                if prune && let Err(e) = st.prune_events(now) {
                    tracing::warn!(error = %e, "cannot prune old history");
                }
                (r, seen)
            })
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            st = back;
            if prune {
                last_prune = now;
            }
            match res {
                Ok(store::connections::Changes {
                    rows,
                    faults,
                    removed,
                    newest,
                }) => {
                    if !rows.is_empty() || !removed.is_empty() {
                        wake.poke();
                    }
                    for row in rows {
                        let _ = tx.send(Input::Upsert(Box::new(row))).await;
                    }
                    for fault in faults {
                        let _ = tx.send(Input::Faulty(Box::new(fault))).await;
                    }
                    for id in removed {
                        let _ = tx.send(Input::Remove(id)).await;
                    }
                    seq = newest;
                    version = seen;
                }
                Err(e) => tracing::warn!(error = %e, "cannot read changes from the store"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(WATCH_GAP) => {}
            }
        }
    });
    Ok(())
}

/// Invariant 2: keeps retrying the save of rotated tokens the engine holds
/// because their save failed.
pub(super) fn spawn_unsaved_retry(
    tasks: &mut Tasks,
    engine: &Arc<Engine>,
    shutdown: &CancellationToken,
) {
    let engine = engine.clone();
    let shutdown = shutdown.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(3)) => {}
            }
            if engine.unsaved() > 0 {
                engine.retry_unsaved().await;
            }
        }
    });
}

/// The alert delivery worker, and the digest scheduler when a digest is
/// configured; each on its own store handle.
pub(super) fn spawn_alerts(
    tasks: &mut Tasks,
    alerts_store: Store,
    opened: &Opened,
    config: &Config,
    common: &Common,
    duty: &std::sync::Arc<store::replicas::Duty>,
) -> anyhow::Result<()> {
    let Common {
        config_rx,
        clock,
        shutdown,
        wake,
    } = common;
    {
        let (cfg, clock, shutdown, wake, duty) = (
            config_rx.clone(),
            clock.clone(),
            shutdown.clone(),
            wake.clone(),
            duty.clone(),
        );
        tasks.spawn(async move {
            if let Err(e) = alerts::run(alerts_store, cfg, clock, shutdown, wake, duty).await {
                tracing::error!(error = %e, "the alert delivery worker stopped");
            }
        });
    }
    if config.alerts.digest.is_some() {
        let st = opened.open(Create::No)?;
        let (cfg, shutdown, clock) = (config_rx.clone(), shutdown.clone(), clock.clone());
        tasks.spawn(async move {
            if let Err(e) = alerts::run_digest(st, cfg, clock, shutdown).await {
                tracing::error!(error = %e, "the digest scheduler stopped");
            }
        });
    }
    Ok(())
}

/// The store-derived gauges scan every connection: gathered only when
/// someone can read them (`metrics.listen` set).
pub(super) fn spawn_metrics(
    tasks: &mut Tasks,
    metrics: &Metrics,
    opened: &Opened,
    config: &Config,
    snapshot: &watch::Receiver<Snapshot>,
    common: &Common,
) -> anyhow::Result<()> {
    let Common {
        config_rx,
        clock,
        shutdown,
        ..
    } = common;
    if config.metrics.listen.is_some() {
        let m = metrics.clone();
        let st = opened.open(Create::No)?;
        let (clock, shutdown, snap) = (clock.clone(), shutdown.clone(), snapshot.clone());
        let cfg = config_rx.clone();
        tasks.spawn(async move { m.update_loop(st, cfg, clock, snap, shutdown).await });
    }
    Ok(())
}

/// How often a daemon on PostgreSQL makes sure it still holds its store;
/// every second while the store cannot be reached, so the lock is taken
/// again soon after the database is back (its writes resume at once).
const STORE_HEALTH_EVERY: std::time::Duration = std::time::Duration::from_secs(5);
const STORE_HEALTH_DOWN: std::time::Duration = std::time::Duration::from_secs(1);

/// On PostgreSQL: every few seconds, whether the serve lock is still held
/// (taken again after a restart or failover ended its session) and the
/// database can be reached, which `/readyz` and sd_notify STATUS say. A
/// daemon that finds another one took the store while it was cut off
/// stops: one daemon per SQLite store, one replica per name on PostgreSQL.
pub(super) fn spawn_store_health(
    tasks: &mut Tasks,
    opened: &Opened,
    ready: &std::sync::Arc<crate::daemon::api::Readiness>,
    common: &Common,
    stop: &tokio_util::sync::CancellationToken,
) {
    if !opened.is_postgres() {
        return;
    }
    let (lock, ready, shutdown) = (opened.lock.clone(), ready.clone(), common.shutdown.clone());
    let stop = stop.clone();
    tasks.spawn(async move {
        use crate::daemon::lock::LockHealth;
        let mut every = STORE_HEALTH_EVERY;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
            let Ok((_, health)) =
                store::blocking::with_owned(lock.clone(), |lock| lock.check()).await
            else {
                continue;
            };
            every = match health {
                LockHealth::Unreachable(_) => STORE_HEALTH_DOWN,
                _ => STORE_HEALTH_EVERY,
            };
            match health {
                LockHealth::Held => {
                    if ready.set_store_down(None) {
                        tracing::warn!("the store's database can be reached again");
                        crate::daemon::notify::notify("STATUS=ready");
                    }
                }
                LockHealth::Renewed => {
                    ready.set_store_down(None);
                    tracing::warn!("the store's database session had ended (a restart or failover); the daemon holds the store again");
                    crate::daemon::notify::notify("STATUS=ready");
                }
                LockHealth::Unreachable(why) => {
                    if ready.set_store_down(Some(why.clone())) {
                        tracing::error!(error = %why, "the store's database cannot be reached: no new refresh is claimed; rotated tokens that cannot be saved are held and spilled");
                        crate::daemon::notify::notify(&format!(
                            "STATUS=the store cannot be reached: {}",
                            why.replace('\n', " ")
                        ));
                    }
                }
                LockHealth::TakenBy(holder) => {
                    tracing::error!(holder = %holder, "another acutoken daemon took this replica's place (its name, or the store for itself) while this one was cut off from it: stopping");
                    stop.cancel();
                    break;
                }
            }
        }
    });
}
