//! The scheduler's tokio driver: the I/O the [`Machine`] asks for.
//!
//! One loop turn: pet the watchdog, note the clock, start what the machine
//! says may start, write the alerts it owes, publish its counters, then wait
//! for the first of: shutdown, a refresh task ending, an input, something
//! falling due, or the machine's next wake (never longer than `max_sleep`).
//! Everything decided is decided by the machine; this file only reads and
//! writes the store, spawns refresh tasks and catches their panics.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::aside::{AlertOp, AsideKey};
use super::machine::{Look, Machine, Wake};
use super::{Done, Input, Snapshot, is_row_fault};
use crate::model::{ConnectionRow, Fault, Timestamp};
use crate::renewal::engine::{Engine, Trigger};
use crate::renewal::{alert_conditions, policy};
use crate::store::StoreError;
use crate::store::refresh::DesiredAlerts;
use crate::store::upkeep::{ByTime, FaultyAlert};

/// How a refresh is run, as its own task (a seam for tests of panics).
type RefreshFn =
    Arc<dyn Fn(Arc<Engine>, Uuid) -> Pin<Box<dyn Future<Output = Done> + Send>> + Send + Sync>;

/// The text of a panic payload, cut short (it names no secret: secrets
/// print as `***`).
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    let s = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    crate::model::clip(s.lines().next().unwrap_or(""), 200)
}

/// The scheduler; run with [`Scheduler::run`].
pub struct Scheduler {
    engine: Arc<Engine>,
    machine: Machine,
    snapshot: tokio::sync::watch::Sender<Snapshot>,
    /// Which connection each refresh task refreshes (a panicked task
    /// returns nothing else).
    spawned: std::collections::HashMap<tokio::task::Id, Uuid>,
    wake: Option<crate::store::alerts::Wake>,
    /// The monotonic time of the last clock check.
    mono: tokio::time::Instant,
    refresh: RefreshFn,
}

impl Scheduler {
    pub fn new(
        engine: Arc<Engine>,
        global_limit: usize,
        instance_limit: usize,
        max_sleep: Duration,
    ) -> (Scheduler, tokio::sync::watch::Receiver<Snapshot>) {
        let (tx, rx) = tokio::sync::watch::channel(Snapshot::default());
        let mut machine = Machine::new(global_limit, instance_limit, max_sleep);
        machine.observe_clock(engine.clock().now(), Duration::ZERO);
        (
            Scheduler {
                engine,
                machine,
                snapshot: tx,
                spawned: std::collections::HashMap::new(),
                wake: None,
                mono: tokio::time::Instant::now(),
                refresh: Arc::new(|engine, id| Box::pin(refresh_task(engine, id))),
            },
            rx,
        )
    }

    /// Room for `n` connections, so a start-up load grows nothing twice.
    pub fn reserve(&mut self, n: usize) {
        self.machine.reserve(n);
    }

    /// Adds or re-plans one connection.
    pub fn upsert(&mut self, row: &ConnectionRow, now: Timestamp) {
        self.machine.upsert(row, &self.engine.policy(), now);
    }

    /// Plans a connection read at start-up; its timer joins the others at
    /// [`Scheduler::finish_load`] (one sorted build instead of 1M inserts).
    pub fn load(&mut self, row: &ConnectionRow, now: Timestamp) {
        self.machine.load(row, &self.engine.policy(), now);
    }

    /// Moves the timers of [`Scheduler::load`] into the timer set. Call it
    /// before the scheduler runs.
    pub fn finish_load(&mut self) {
        self.machine.finish_load();
    }

    /// Sets a connection aside at start-up, before the scheduler runs (its
    /// alert is raised by the caller, in the start-up pass).
    pub fn load_fault(&mut self, fault: &Fault, now: Timestamp) {
        self.machine.load_fault(fault, now);
    }

    /// How many connections are set aside.
    pub fn set_aside_count(&self) -> usize {
        self.machine.set_aside_count()
    }

    /// Forgets a connection (the engine's state of it goes at the next
    /// loop turn).
    pub fn remove(&mut self, id: Uuid) {
        self.machine.remove(id);
    }

    /// The handle that wakes the alert worker after the scheduler raises or
    /// resolves an alert.
    pub fn set_wake(&mut self, wake: crate::store::alerts::Wake) {
        self.wake = Some(wake);
    }

    /// Tells the alert worker to look at the outbox now.
    fn poke(&self) {
        if let Some(w) = &self.wake {
            w.poke();
        }
    }

    fn publish(&self) {
        self.snapshot.send_replace(self.machine.snapshot());
    }

    /// Runs until `shutdown`; then stops claiming and waits for refreshes in
    /// flight, at most `drain` long. `watchdog` is called on every loop turn.
    pub async fn run(
        mut self,
        mut input: mpsc::Receiver<Input>,
        shutdown: CancellationToken,
        drain: Duration,
        watchdog: impl Fn() + Send,
    ) {
        self.machine.finish_load();
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            watchdog();
            self.check_clock();
            self.dispatch(&mut tasks);
            self.flush_alerts().await;
            self.publish();
            let now = self.engine.clock().now();
            let wake = self.machine.next_wake(now);
            let sleep = self.machine.sleep_for(now);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => self.joined(joined).await,
                Some(msg) = input.recv() => self.handle(msg),
                _ = std::future::ready(()), if wake.is_some() => {
                    if let Some(wake) = wake {
                        self.fire(wake).await;
                    }
                }
                _ = tokio::time::sleep(sleep) => {}
            }
        }
        // Shutdown: no new claims; let refreshes in flight save their outcome.
        let waited =
            tokio::time::timeout(drain, async { while tasks.join_next().await.is_some() {} }).await;
        if waited.is_err() {
            tracing::warn!(
                left = tasks.len(),
                "shutdown timeout: abandoning refreshes still in flight (their claims expire and are recovered at the next start)"
            );
            tasks.abort_all();
        }
    }

    /// Starts what the machine says may start, unless the engine is blocked
    /// (unsaved tokens): then nothing new is claimed.
    fn dispatch(&mut self, tasks: &mut tokio::task::JoinSet<Done>) {
        if self.engine.is_blocked() {
            return;
        }
        for id in self.machine.start() {
            let handle = tasks.spawn((self.refresh)(self.engine.clone(), id));
            self.spawned.insert(handle.id(), id);
        }
    }

    fn check_clock(&mut self) {
        let now = self.engine.clock().now();
        let elapsed = self.mono.elapsed();
        self.mono = tokio::time::Instant::now();
        if let Some(drift) = self.machine.observe_clock(now, elapsed) {
            tracing::warn!(
                jump_seconds = drift.num_seconds(),
                scheduled = self.machine.snapshot().scheduled,
                "the wall clock jumped; every wake-up follows the new time"
            );
        }
    }

    fn handle(&mut self, msg: Input) {
        let now = self.engine.clock().now();
        match msg {
            Input::Upsert(row) => self.machine.upsert(&row, &self.engine.policy(), now),
            Input::Remove(id) => self.machine.remove(id),
            Input::Limits {
                global,
                per_instance,
            } => self.machine.set_limits(global, per_instance),
            Input::Faulty(fault) => self.machine.faulty(&fault, now),
            Input::Share(share) => self.machine.set_share(share),
        }
    }

    /// A refresh task ended: normally with its [`Done`]; if it panicked,
    /// the connection is set aside with the panic's message, and either
    /// way its slot is freed so the others go on.
    async fn joined(&mut self, joined: Result<(tokio::task::Id, Done), tokio::task::JoinError>) {
        let done = match joined {
            Ok((task, done)) => {
                self.spawned.remove(&task);
                done
            }
            Err(e) => {
                let Some(id) = self.spawned.remove(&e.id()) else {
                    return;
                };
                let reason = if e.is_panic() {
                    format!(
                        "internal error while refreshing: {}",
                        panic_text(e.into_panic().as_ref())
                    )
                } else {
                    "internal error while refreshing: the refresh was cancelled".to_string()
                };
                // The row as it stands: the claim the task may have taken is
                // left to expire (its outcome then counts as unknown).
                let row = self
                    .engine
                    .store()
                    .read_row(move |st| st.read_by_id(id))
                    .await;
                Done {
                    id,
                    fault: Some(reason),
                    error: None,
                    sent: false,
                    row,
                }
            }
        };
        let now = self.engine.clock().now();
        self.machine.finished(done, &self.engine.policy(), now);
    }

    /// Something fell due: does the read the machine asks for and hands it
    /// the answer.
    async fn fire(&mut self, wake: Wake) {
        match self.machine.fire(wake) {
            Some(Look::Due(id)) => self.due(id).await,
            Some(Look::Aside(key)) => {
                let now = self.engine.clock().now();
                let read = self
                    .engine
                    .store()
                    .read(move |st| match key {
                        AsideKey::Id(id) => st.read_by_id(id),
                        AsideKey::Row(rowid) => st.row_at(rowid),
                    })
                    .await;
                self.machine
                    .aside_read(key, read, &self.engine.policy(), now);
            }
            None => {}
        }
    }

    /// Writes the alerts the machine owes, in one transaction, and does its
    /// other owed effects. A failed write is logged; the next look at the
    /// connection raises it again.
    async fn flush_alerts(&mut self) {
        let out = self.machine.take_outbox();
        for id in out.forget {
            self.engine.forget(id);
        }
        if out.poke {
            self.poke();
        }
        if out.alerts.is_empty() {
            return;
        }
        let ops = out
            .alerts
            .into_iter()
            .map(|op| match op {
                AlertOp::Raise { key, facts } => FaultyAlert::Raise { key, facts },
                AlertOp::Resolve { key } => FaultyAlert::Resolve { key },
            })
            .collect();
        let now = self.engine.clock().now();
        let res = self.engine.store().write_faulty_alerts(ops, now).await;
        match res {
            Ok(()) => self.poke(),
            Err(e) => {
                tracing::error!(error = %e, "cannot write the alert of a connection set aside")
            }
        }
    }

    /// A wake-up: the row as time alone leaves it (an expired client
    /// secret, alert conditions), handed to the machine, which makes it
    /// ready if a refresh is due and plans it again otherwise.
    async fn due(&mut self, id: Uuid) {
        let engine = self.engine.clone();
        let now = engine.clock().now();
        let policy = engine.policy();
        let read = engine.store().read_row(move |st| st.read_by_id(id)).await;
        let row = match read {
            Ok(Some(Ok(row))) if !quiet(&row, now) => {
                // Time alone changed something (state or alert conditions):
                // decided again on the row as it is in the write, never
                // written back from the read above.
                let policy = policy.clone();
                let desired: DesiredAlerts =
                    Box::new(move |row| alert_conditions::desired(row, &policy, now));
                engine
                    .store()
                    .apply_time(id, now, move |row| settle_by_time(row, now), desired)
                    .await
            }
            other => other,
        };
        self.machine.due_read(id, row, &policy, now);
    }
}

/// True when a wake-up needs no write: a refresh is simply due and time
/// alone changed nothing.
fn quiet(row: &ConnectionRow, now: Timestamp) -> bool {
    let expired = row.conn.state.is_scheduled()
        && row.claim.is_none()
        && policy::expired_secret_decision(&row.conn, now).is_some();
    !expired && row.conn.state.is_scheduled() && row.conn.next_refresh_at.is_none_or(|t| t <= now)
}

/// Applies what time alone decides to `row` (an expired client secret), and
/// says whether the store must hear of it (the state, or the alert
/// conditions of a connection that is not simply due for a refresh).
fn settle_by_time(row: &mut ConnectionRow, now: Timestamp) -> ByTime {
    let mut changed = false;
    if row.conn.state.is_scheduled()
        && row.claim.is_none()
        && let Some(d) = policy::expired_secret_decision(&row.conn, now)
    {
        d.apply(&mut row.conn);
        changed = true;
    }
    let refresh_due =
        row.conn.state.is_scheduled() && row.conn.next_refresh_at.is_none_or(|t| t <= now);
    ByTime {
        changed,
        quiet: refresh_due && !changed,
    }
}

/// One refresh, run as its own task: what it came to, and the row after it.
async fn refresh_task(engine: Arc<Engine>, id: Uuid) -> Done {
    let (mut fault, mut error, mut sent) = (None, None, false);
    match engine.refresh(id, Trigger::Scheduled).await {
        Ok(r) => sent = matches!(r.outcome.as_str(), "refreshed" | "failed" | "discarded"),
        Err(crate::renewal::engine::EngineError::Store(e)) if is_row_fault(&e) => {
            fault = Some(e.to_string());
            error = Some(e);
        }
        Err(e) => tracing::error!(error = %e, "refresh could not run"),
    }
    let now = engine.clock().now();
    let read = engine
        .store()
        .read_row(move |st| -> Result<_, StoreError> {
            // A connection set aside in an earlier run whose refresh now gets
            // through: its alert resolves (one indexed read otherwise).
            let fires = sent && crate::store::alerts::faulty_fires(st, &id.to_string())?;
            Ok((st.read_by_id(id)?, fires))
        })
        .await;
    let row = match read {
        Ok((row, true)) => engine
            .store()
            .resolve_faulty_alert(id, now)
            .await
            .map(|()| row),
        Ok((row, false)) => Ok(row),
        Err(e) => Err(e),
    };
    Done {
        id,
        fault,
        error,
        sent,
        row,
    }
}

#[cfg(test)]
mod tests;
