//! The scheduler: one task owning a timer queue of per-connection wake times.
//!
//! Each scheduled connection has one entry in a `DelayQueue`, keyed by when it
//! next needs attention: its planned refresh, or the next time its alert
//! conditions can change by time alone (a warn point, a secret's Expires On).
//! Due refreshes go to a ready set ordered by deadline, so after downtime the
//! most urgent run first, and are started within the global and per-instance
//! concurrency limits. The loop never sleeps more than `max_sleep` without
//! re-reading the wall clock; a jump of more than a minute either way re-plans
//! every entry against the new time.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;
use tokio_util::time::delay_queue::Key;
use uuid::Uuid;

use super::engine::{Engine, with_store};
use super::policy;
use crate::model::{State, Timestamp};
use crate::store::connections::ConnectionRow;

/// A clock jump larger than this re-plans everything.
pub const JUMP: chrono::Duration = chrono::Duration::seconds(60);

/// Messages into the scheduler.
#[derive(Debug)]
pub enum Input {
    /// A connection was added or changed (CLI write, API, refresh outcome).
    Upsert(Box<ConnectionRow>),
    /// A connection was removed.
    Remove(Uuid),
    /// Concurrency limits changed (reload).
    Limits { global: usize, per_instance: usize },
}

/// Counters for status and metrics.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub scheduled: usize,
    pub ready: usize,
    pub running: usize,
}

struct Slot {
    key: Key,
    due: Timestamp,
}

/// The scheduler's state; run with [`Scheduler::run`].
pub struct Scheduler {
    engine: Arc<Engine>,
    queue: DelayQueue<Uuid>,
    slots: HashMap<Uuid, Slot>,
    /// Facts the dispatcher needs without a store read.
    meta: HashMap<Uuid, (Arc<str>, Timestamp)>,
    ready: BTreeSet<(Timestamp, Uuid)>,
    in_ready: HashSet<Uuid>,
    running: HashSet<Uuid>,
    per_instance: HashMap<Arc<str>, usize>,
    instances: HashSet<Arc<str>>,
    global_limit: usize,
    instance_limit: usize,
    max_sleep: Duration,
    wall: Timestamp,
    mono: tokio::time::Instant,
    snapshot: tokio::sync::watch::Sender<Snapshot>,
}

impl Scheduler {
    pub fn new(
        engine: Arc<Engine>,
        global_limit: usize,
        instance_limit: usize,
        max_sleep: Duration,
    ) -> (Scheduler, tokio::sync::watch::Receiver<Snapshot>) {
        let (tx, rx) = tokio::sync::watch::channel(Snapshot::default());
        let wall = engine.clock().now();
        (
            Scheduler {
                engine,
                queue: DelayQueue::new(),
                slots: HashMap::new(),
                meta: HashMap::new(),
                ready: BTreeSet::new(),
                in_ready: HashSet::new(),
                running: HashSet::new(),
                per_instance: HashMap::new(),
                instances: HashSet::new(),
                global_limit: global_limit.max(1),
                instance_limit: instance_limit.max(1),
                max_sleep,
                wall,
                mono: tokio::time::Instant::now(),
                snapshot: tx,
            },
            rx,
        )
    }

    fn intern(&mut self, instance: &str) -> Arc<str> {
        if let Some(i) = self.instances.get(instance) {
            return i.clone();
        }
        let i: Arc<str> = Arc::from(instance);
        self.instances.insert(i.clone());
        i
    }

    /// When a connection next needs attention, if ever.
    fn wake_at(&self, row: &ConnectionRow, now: Timestamp) -> Option<Timestamp> {
        let policy = self.engine.policy();
        let c = &row.conn;
        let mut at = crate::alerts::next_change(row, &policy, now);
        if c.state.is_scheduled() {
            let mut take = |t: Option<Timestamp>| {
                if let Some(t) = t {
                    at = Some(at.map_or(t, |a| a.min(t)));
                }
            };
            take(c.next_refresh_at.or(Some(now)));
            take(c.secret_expires_at);
            if let Some((_, until)) = &row.claim {
                take(Some(*until));
            }
        }
        at
    }

    /// Adds or re-plans one connection.
    pub fn upsert(&mut self, row: &ConnectionRow, now: Timestamp) {
        let id = row.conn.id;
        let deadline = row.conn.deadline.unwrap_or(Timestamp::MAX_UTC);
        let inst = self.intern(&row.conn.instance);
        self.meta.insert(id, (inst, deadline));
        if self.running.contains(&id) {
            // Re-planned when the refresh finishes.
            return;
        }
        if self.in_ready.remove(&id) {
            self.ready.retain(|(_, r)| *r != id);
        }
        let wake = self.wake_at(row, now);
        self.place(id, wake, now);
    }

    fn place(&mut self, id: Uuid, wake: Option<Timestamp>, now: Timestamp) {
        let old = self.slots.remove(&id);
        let Some(due) = wake else {
            if let Some(s) = old {
                self.queue.remove(&s.key);
            }
            return;
        };
        let delay = (due - now).to_std().unwrap_or(Duration::ZERO);
        let key = match old {
            Some(s) => {
                self.queue.reset(&s.key, delay);
                s.key
            }
            None => self.queue.insert(id, delay),
        };
        self.slots.insert(id, Slot { key, due });
    }

    pub fn remove(&mut self, id: Uuid) {
        if let Some(s) = self.slots.remove(&id) {
            self.queue.remove(&s.key);
        }
        if self.in_ready.remove(&id) {
            self.ready.retain(|(_, r)| *r != id);
        }
        self.meta.remove(&id);
        self.engine.forget(id);
    }

    /// Re-plans every entry against the wall clock (after a jump).
    fn replan_all(&mut self, now: Timestamp) {
        let entries: Vec<(Uuid, Timestamp)> =
            self.slots.iter().map(|(id, s)| (*id, s.due)).collect();
        for (id, due) in entries {
            self.place(id, Some(due), now);
        }
    }

    fn publish(&self) {
        self.snapshot.send_replace(Snapshot {
            scheduled: self.slots.len(),
            ready: self.ready.len(),
            running: self.running.len(),
        });
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
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Uuid, Option<ConnectionRow>)>();
        let mut tasks = tokio::task::JoinSet::new();
        let max_sleep = self.max_sleep;
        loop {
            watchdog();
            self.check_clock();
            self.dispatch(&done_tx, &mut tasks);
            self.publish();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some((id, row)) = done_rx.recv() => self.finished(id, row),
                Some(msg) = input.recv() => self.handle(msg),
                Some(expired) = std::future::poll_fn(|cx| self.queue.poll_expired(cx)), if !self.queue.is_empty() => {
                    let id = expired.into_inner();
                    self.slots.remove(&id);
                    self.due(id).await;
                }
                _ = tokio::time::sleep(max_sleep) => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
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

    fn check_clock(&mut self) {
        let now = self.engine.clock().now();
        let elapsed =
            chrono::Duration::from_std(self.mono.elapsed()).unwrap_or(chrono::Duration::zero());
        let expected = self.wall + elapsed;
        let drift = now - expected;
        self.wall = now;
        self.mono = tokio::time::Instant::now();
        if drift > JUMP || drift < -JUMP {
            tracing::warn!(
                jump_seconds = drift.num_seconds(),
                scheduled = self.slots.len(),
                "the wall clock jumped; re-planning every connection"
            );
            self.replan_all(now);
        }
    }

    fn handle(&mut self, msg: Input) {
        let now = self.engine.clock().now();
        match msg {
            Input::Upsert(row) => self.upsert(&row, now),
            Input::Remove(id) => self.remove(id),
            Input::Limits {
                global,
                per_instance,
            } => {
                self.global_limit = global.max(1);
                self.instance_limit = per_instance.max(1);
            }
        }
    }

    /// A wake-up: refresh if due, else re-evaluate state and alerts by time.
    async fn due(&mut self, id: Uuid) {
        let engine = self.engine.clone();
        let now = engine.clock().now();
        let policy = engine.policy();
        let row = with_store(
            engine.store(),
            move |st| -> Result<Option<ConnectionRow>, crate::store::StoreError> {
                let Some(mut row) = st.get_by_id(id)? else {
                    return Ok(None);
                };
                let mut changed = false;
                if row.conn.state.is_scheduled()
                    && row.claim.is_none()
                    && let Some(d) = policy::expired_secret_decision(&row.conn, now)
                {
                    d.apply(&mut row.conn);
                    changed = true;
                }
                if row.conn.state.is_scheduled()
                    && row.conn.next_refresh_at.is_none_or(|t| t <= now)
                    && !changed
                {
                    return Ok(Some(row));
                }
                // Time alone changed something: state (secret expired) or alert conditions.
                st.write(|tx, _| {
                    if changed {
                        crate::store::connections::put(tx, &row)?;
                        crate::store::events::record(
                            tx,
                            id,
                            now,
                            "state",
                            &format!(
                                "{}: {}",
                                row.conn.state,
                                row.conn.last_error.clone().unwrap_or_default()
                            ),
                        )?;
                    }
                    let desired = crate::alerts::desired(&row, &policy, now);
                    crate::store::alerts::sync_connection(tx, &row, &desired, now)
                })?;
                Ok(Some(row))
            },
        )
        .await;
        match row {
            Ok(Some(row)) => {
                let refresh_due = row.conn.state.is_scheduled()
                    && row.conn.next_refresh_at.is_none_or(|t| t <= now);
                if refresh_due {
                    let deadline = row.conn.deadline.unwrap_or(Timestamp::MAX_UTC);
                    let inst = self.intern(&row.conn.instance);
                    self.meta.insert(id, (inst, deadline));
                    if self.in_ready.insert(id) {
                        self.ready.insert((deadline, id));
                    }
                } else {
                    self.upsert(&row, now);
                }
            }
            Ok(None) => self.remove(id),
            Err(e) => {
                tracing::error!(error = %e, "cannot read a due connection; trying again in a minute");
                self.place(id, Some(now + chrono::Duration::minutes(1)), now);
            }
        }
    }

    fn dispatch(
        &mut self,
        done: &mpsc::UnboundedSender<(Uuid, Option<ConnectionRow>)>,
        tasks: &mut tokio::task::JoinSet<()>,
    ) {
        if self.engine.is_blocked() || self.ready.is_empty() {
            return;
        }
        let mut start = Vec::new();
        for &(deadline, id) in self.ready.iter() {
            if self.running.len() + start.len() >= self.global_limit {
                break;
            }
            let Some((inst, _)) = self.meta.get(&id) else {
                continue;
            };
            let busy = self.per_instance.get(inst).copied().unwrap_or(0);
            if busy >= self.instance_limit {
                continue;
            }
            *self.per_instance.entry(inst.clone()).or_default() += 1;
            start.push((deadline, id));
        }
        for (deadline, id) in start {
            self.ready.remove(&(deadline, id));
            self.in_ready.remove(&id);
            self.running.insert(id);
            let engine = self.engine.clone();
            let done = done.clone();
            tasks.spawn(async move {
                if let Err(e) = engine.refresh(id).await {
                    tracing::error!(error = %e, "refresh could not run");
                }
                let row = with_store(engine.store(), move |st| st.get_by_id(id))
                    .await
                    .ok()
                    .flatten();
                let _ = done.send((id, row));
            });
        }
    }

    fn finished(&mut self, id: Uuid, row: Option<ConnectionRow>) {
        self.running.remove(&id);
        if let Some((inst, _)) = self.meta.get(&id)
            && let Some(n) = self.per_instance.get_mut(inst)
        {
            *n = n.saturating_sub(1);
        }
        let now = self.engine.clock().now();
        match row {
            Some(row)
                if row.conn.state == State::Active
                    && row.conn.next_refresh_at.is_some_and(|t| t <= now)
                    && row.claim.is_none() =>
            {
                // Nothing moved the plan (e.g. the engine is blocked): look again shortly.
                self.place(id, Some(now + chrono::Duration::seconds(5)), now);
            }
            Some(row) => self.upsert(&row, now),
            None => self.remove(id),
        }
    }
}
