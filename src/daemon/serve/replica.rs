//! A replica's heartbeat on a PostgreSQL store (DESIGN §10): every third of
//! `store.lease` it records itself, extends the lease of the claims it
//! holds, and wins or keeps the alert delivery duty. It beats until the
//! engine has finished (refreshes still in flight at shutdown keep their
//! claims), then leaves: its duty is free for another replica at once.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::SharedClock;
use crate::renewal::scheduler::{Input, Share};
use crate::store::replicas::{Contact, Duty, Me};
use crate::store::{StoreError, StoreHandle};

/// How soon a heartbeat that failed is tried again.
const RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// The running heartbeat.
pub(super) struct Heartbeat {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Heartbeat {
    /// Beats once, so the replica is listed (and may hold the alert duty)
    /// before it is ready, then every third of the lease until stopped.
    pub(super) async fn start(
        store: StoreHandle,
        me: Me,
        duty: Arc<Duty>,
        contact: Arc<Contact>,
        clock: SharedClock,
        sched: mpsc::Sender<Input>,
    ) -> Result<Heartbeat, StoreError> {
        let started = Instant::now();
        let now = clock.now();
        let beat = store.heartbeat(me.clone(), now, true).await?;
        duty.record(beat.alerts, started, me.lease);
        contact.record(true, started);
        let share = Share::among(&me.name, &beat.live);
        if let Some(share) = share {
            let _ = sched.send(Input::Share(share)).await;
        }
        tracing::info!(
            replica = %me.name,
            alerts = beat.alerts,
            lease = %crate::model::fmt_duration(me.lease),
            "replica registered"
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            store,
            me,
            (duty, contact),
            clock,
            (stop.clone(), sched),
            (beat.alerts, share),
        ));
        Ok(Heartbeat { stop, task })
    }

    /// Stops beating and leaves (after the engine finished: claims in flight
    /// were kept alive until then).
    pub(super) async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn run(
    store: StoreHandle,
    me: Me,
    (duty, contact): (Arc<Duty>, Arc<Contact>),
    clock: SharedClock,
    (stop, sched): (CancellationToken, mpsc::Sender<Input>),
    (mut alerts, mut share): (bool, Option<Share>),
) {
    let every = me.lease / 3;
    let mut failing = false;
    loop {
        // Every second while beats fail: once the database is back, this
        // replica's claims are extended at once, before the others (whose
        // refreshes failed on the same outage, and retry later) could find
        // them lapsed.
        let wait = if failing { RETRY } else { every };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
        let started = Instant::now();
        let now = clock.now();
        match store.heartbeat(me.clone(), now, false).await {
            Ok(beat) => {
                contact.record(true, started);
                let now_share = Share::among(&me.name, &beat.live);
                if now_share != share {
                    share = now_share;
                    if let Some(s) = share {
                        tracing::info!(replica = %me.name, live = s.of, "the live replicas changed: this one takes its share first");
                        let _ = sched.send(Input::Share(s)).await;
                    }
                }
                if failing {
                    failing = false;
                    tracing::warn!(replica = %me.name, "heartbeats are recorded again");
                }
                duty.record(beat.alerts, started, me.lease);
                if beat.alerts != alerts {
                    alerts = beat.alerts;
                    if alerts {
                        tracing::info!(replica = %me.name, "this replica delivers the alerts now");
                    } else {
                        tracing::warn!(replica = %me.name, "another replica took over the alert delivery (this one missed its heartbeats)");
                    }
                }
            }
            Err(e) => {
                contact.record(false, started);
                if !failing {
                    failing = true;
                    tracing::error!(replica = %me.name, error = %e, "cannot record the heartbeat: past {} without one, this replica's claims and duties pass to the others", crate::model::fmt_duration(me.lease));
                }
            }
        }
    }
    duty.release();
    match store.leave_replicas(me.name.clone()).await {
        Ok(()) => tracing::info!(replica = %me.name, "replica left"),
        Err(e) => {
            tracing::warn!(replica = %me.name, error = %e, "cannot record that this replica left; its duties pass on when its lease runs out")
        }
    }
}
