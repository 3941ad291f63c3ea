//! The scheduler: one task owning the wake times of every connection.
//!
//! Each scheduled connection has one timer, keyed by when it next needs
//! attention: its planned refresh, or the next time its alert conditions can
//! change by time alone (a warn point, a secret's Expires On). Timers hold
//! wall-clock times, so a jump of the clock either way moves every one of them
//! with it. Due refreshes go to a ready set ordered by deadline, so after
//! downtime the most urgent run first, and are started within the global and
//! per-instance concurrency limits. The loop never sleeps more than
//! `max_sleep` without re-reading the wall clock.
//!
//! A million connections must fit on a small machine: each one costs a
//! 40-byte [`Entry`] in a slab, an index slot and a timer key, and nothing
//! else; instances are interned once.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::engine::{Engine, Trigger, with_store};
use super::policy;
use crate::model::{State, Timestamp};
use crate::store::connections::ConnectionRow;

/// A clock jump larger than this is logged (timers are wall-clock times already).
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

/// Where an entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing planned (a human must act, or disabled).
    Idle,
    /// Waiting for its timer.
    Timed,
    /// Due: waiting for a free slot under the limits.
    Ready,
    /// A refresh is in flight.
    Running,
}

/// One connection, as small as the scheduler can keep it.
struct Entry {
    id: Uuid,
    /// The timer, in Unix milliseconds (meaningful while `Timed`).
    due: i64,
    /// The refresh deadline in Unix milliseconds (`i64::MAX` when unknown).
    deadline: i64,
    /// Index into the interned instances.
    instance: u32,
    phase: Phase,
    /// Removed while its refresh ran: freed when the refresh finishes.
    removed: bool,
}

fn ms(t: Timestamp) -> i64 {
    t.timestamp_millis()
}

/// The scheduler's state; run with [`Scheduler::run`].
pub struct Scheduler {
    engine: Arc<Engine>,
    entries: Vec<Entry>,
    free: Vec<u32>,
    index: HashMap<Uuid, u32>,
    timers: BTreeSet<(i64, u32)>,
    /// Timers of connections read at start-up ([`Scheduler::load`]), built
    /// into `timers` in one go by [`Scheduler::finish_load`].
    loaded: Vec<(i64, u32)>,
    ready: BTreeSet<(i64, u32)>,
    running: usize,
    instances: Vec<Arc<str>>,
    instance_ids: HashMap<Arc<str>, u32>,
    /// Refreshes in flight per interned instance.
    busy: Vec<usize>,
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
                entries: Vec::new(),
                free: Vec::new(),
                index: HashMap::new(),
                timers: BTreeSet::new(),
                loaded: Vec::new(),
                ready: BTreeSet::new(),
                running: 0,
                instances: Vec::new(),
                instance_ids: HashMap::new(),
                busy: Vec::new(),
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

    /// Room for `n` connections, so a start-up load grows nothing twice.
    pub fn reserve(&mut self, n: usize) {
        self.entries.reserve(n);
        self.index.reserve(n);
    }

    fn intern(&mut self, instance: &str) -> u32 {
        if let Some(i) = self.instance_ids.get(instance) {
            return *i;
        }
        let i = self.instances.len() as u32;
        let name: Arc<str> = Arc::from(instance);
        self.instances.push(name.clone());
        self.instance_ids.insert(name, i);
        self.busy.push(0);
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

    /// The slot of `id`, made when new.
    fn slot(&mut self, id: Uuid) -> u32 {
        if let Some(s) = self.index.get(&id) {
            return *s;
        }
        let e = Entry {
            id,
            due: i64::MAX,
            deadline: i64::MAX,
            instance: 0,
            phase: Phase::Idle,
            removed: false,
        };
        let s = match self.free.pop() {
            Some(s) => {
                self.entries[s as usize] = e;
                s
            }
            None => {
                self.entries.push(e);
                (self.entries.len() - 1) as u32
            }
        };
        self.index.insert(id, s);
        s
    }

    /// Takes an entry out of the timers or the ready set.
    fn unqueue(&mut self, s: u32) {
        let e = &mut self.entries[s as usize];
        match e.phase {
            Phase::Timed => {
                self.timers.remove(&(e.due, s));
            }
            Phase::Ready => {
                self.ready.remove(&(e.deadline, s));
            }
            Phase::Idle | Phase::Running => return,
        }
        e.phase = Phase::Idle;
    }

    /// Adds or re-plans one connection.
    pub fn upsert(&mut self, row: &ConnectionRow, now: Timestamp) {
        let s = self.slot(row.conn.id);
        if self.entries[s as usize].phase == Phase::Running {
            // Re-planned from the saved row when the refresh finishes.
            return;
        }
        let instance = self.intern(&row.conn.instance);
        let wake = self.wake_at(row, now);
        self.unqueue(s);
        let e = &mut self.entries[s as usize];
        e.instance = instance;
        e.deadline = row.conn.deadline.map_or(i64::MAX, ms);
        self.place(s, wake);
    }

    /// Plans a connection read at start-up, as [`Scheduler::upsert`] does,
    /// but keeps its timer aside until [`Scheduler::finish_load`]: inserting
    /// 1M timers one at a time into the B-tree was half of READY at 1M, and
    /// building it from the sorted list is a fraction of that.
    pub fn load(&mut self, row: &ConnectionRow, now: Timestamp) {
        let s = self.slot(row.conn.id);
        if self.entries[s as usize].phase != Phase::Idle {
            // Seen before (never from one pass over the table): the ordinary path.
            self.finish_load();
            self.upsert(row, now);
            return;
        }
        let instance = self.intern(&row.conn.instance);
        let wake = self.wake_at(row, now);
        let e = &mut self.entries[s as usize];
        e.instance = instance;
        e.deadline = row.conn.deadline.map_or(i64::MAX, ms);
        if let Some(due) = wake {
            e.due = ms(due);
            e.phase = Phase::Timed;
            self.loaded.push((e.due, s));
        }
    }

    /// Moves the timers of [`Scheduler::load`] into the timer set. Call it
    /// before the scheduler runs.
    pub fn finish_load(&mut self) {
        if self.loaded.is_empty() {
            return;
        }
        let mut all = std::mem::take(&mut self.loaded);
        all.extend(std::mem::take(&mut self.timers));
        all.sort_unstable();
        // From a sorted list the B-tree is built in one pass.
        self.timers = all.into_iter().collect();
    }

    /// Sets the timer of an entry that is neither ready nor running.
    fn place(&mut self, s: u32, wake: Option<Timestamp>) {
        self.unqueue(s);
        if let Some(due) = wake {
            let e = &mut self.entries[s as usize];
            e.due = ms(due);
            e.phase = Phase::Timed;
            self.timers.insert((e.due, s));
        }
    }

    fn free_slot(&mut self, s: u32) {
        let e = &mut self.entries[s as usize];
        self.index.remove(&e.id);
        e.id = Uuid::nil();
        e.phase = Phase::Idle;
        e.removed = false;
        self.free.push(s);
    }

    pub fn remove(&mut self, id: Uuid) {
        if let Some(&s) = self.index.get(&id) {
            self.unqueue(s);
            if self.entries[s as usize].phase == Phase::Running {
                self.entries[s as usize].removed = true;
            } else {
                self.free_slot(s);
            }
        }
        self.engine.forget(id);
    }

    fn publish(&self) {
        self.snapshot.send_replace(Snapshot {
            scheduled: self.timers.len(),
            ready: self.ready.len(),
            running: self.running,
        });
    }

    /// The earliest timer that is due at `now`.
    fn first_due(&self, now: Timestamp) -> Option<(i64, u32)> {
        self.timers.first().copied().filter(|(d, _)| *d <= ms(now))
    }

    /// How long to sleep before the next timer (at most `max_sleep`).
    fn sleep_for(&self, now: Timestamp) -> Duration {
        match self.timers.first() {
            None => self.max_sleep,
            Some((d, _)) => {
                let left = u64::try_from(d.saturating_sub(ms(now))).unwrap_or(0);
                Duration::from_millis(left.max(1)).min(self.max_sleep)
            }
        }
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
        self.finish_load();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Uuid, Option<ConnectionRow>)>();
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            watchdog();
            self.check_clock();
            self.dispatch(&done_tx, &mut tasks);
            self.publish();
            let now = self.engine.clock().now();
            let due = self.first_due(now);
            let sleep = self.sleep_for(now);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some((id, row)) = done_rx.recv() => self.finished(id, row),
                Some(msg) = input.recv() => self.handle(msg),
                _ = std::future::ready(()), if due.is_some() => {
                    if let Some((d, s)) = due {
                        self.timers.remove(&(d, s));
                        self.entries[s as usize].phase = Phase::Idle;
                        let id = self.entries[s as usize].id;
                        self.due(id).await;
                    }
                }
                _ = tokio::time::sleep(sleep) => {}
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
                scheduled = self.timers.len(),
                "the wall clock jumped; every wake-up follows the new time"
            );
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
                let Some(&s) = self.index.get(&id) else {
                    // Removed while it was read.
                    return;
                };
                if refresh_due && self.entries[s as usize].phase == Phase::Idle {
                    let instance = self.intern(&row.conn.instance);
                    let e = &mut self.entries[s as usize];
                    e.instance = instance;
                    e.deadline = row.conn.deadline.map_or(i64::MAX, ms);
                    e.phase = Phase::Ready;
                    self.ready.insert((e.deadline, s));
                } else if !refresh_due {
                    self.upsert(&row, now);
                }
            }
            Ok(None) => self.remove(id),
            Err(e) => {
                tracing::error!(error = %e, "cannot read a due connection; trying again in a minute");
                if let Some(&s) = self.index.get(&id)
                    && self.entries[s as usize].phase == Phase::Idle
                {
                    self.place(s, Some(now + chrono::Duration::minutes(1)));
                }
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
        for &(deadline, s) in self.ready.iter() {
            if self.running + start.len() >= self.global_limit {
                break;
            }
            let inst = self.entries[s as usize].instance as usize;
            if self.busy[inst] >= self.instance_limit {
                continue;
            }
            self.busy[inst] += 1;
            start.push((deadline, s));
        }
        for key in start {
            self.ready.remove(&key);
            self.running += 1;
            let e = &mut self.entries[key.1 as usize];
            e.phase = Phase::Running;
            let id = e.id;
            let engine = self.engine.clone();
            let done = done.clone();
            tasks.spawn(async move {
                if let Err(e) = engine.refresh(id, Trigger::Scheduled).await {
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
        let Some(&s) = self.index.get(&id) else {
            return;
        };
        let e = &mut self.entries[s as usize];
        if e.phase != Phase::Running {
            return;
        }
        e.phase = Phase::Idle;
        let (inst, removed) = (e.instance as usize, e.removed);
        self.running = self.running.saturating_sub(1);
        self.busy[inst] = self.busy[inst].saturating_sub(1);
        if removed {
            self.free_slot(s);
            return;
        }
        let now = self.engine.clock().now();
        match row {
            Some(row)
                if row.conn.state == State::Active
                    && row.conn.next_refresh_at.is_some_and(|t| t <= now)
                    && row.claim.is_none() =>
            {
                // Nothing moved the plan (e.g. the engine is blocked): look again shortly.
                self.place(s, Some(now + chrono::Duration::seconds(5)));
            }
            Some(row) => self.upsert(&row, now),
            None => self.remove(id),
        }
    }
}
