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
//! A connection whose row does not read, whose sealed values do not open,
//! or whose refresh task panicked is *set aside*: taken out of the timers,
//! logged once, reported through a `connection_faulty` alert (which is what
//! `status`, `connection show` and `list` read back), and looked at again
//! with backoff (one minute, doubling to an hour). Nothing about it ever
//! holds up another connection.
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

use super::engine::{Engine, Trigger};
use super::policy;
use crate::model::AlertFacts;
use crate::model::{ConnectionRow, Fault};
use crate::model::{State, Timestamp};
use crate::store::StoreError;

/// The first look again at a connection set aside...
pub const ASIDE_FIRST: Duration = Duration::from_secs(60);
/// ...doubling up to this.
pub const ASIDE_MAX: Duration = Duration::from_secs(3600);

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
    /// A changed row that does not read: set it aside.
    Faulty(Box<Fault>),
}

/// How a connection set aside is known: by id, or by SQLite rowid when its
/// id column does not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AsideKey {
    Id(Uuid),
    Row(i64),
}

impl AsideKey {
    fn of(fault: &Fault) -> AsideKey {
        fault.id.map_or(AsideKey::Row(fault.rowid), AsideKey::Id)
    }
}

/// A connection set aside.
#[derive(Debug, Clone)]
struct Aside {
    /// Its row does not read (looked at again by reading it); otherwise its
    /// refresh cannot run (tried again by refreshing it).
    unreadable: bool,
    /// The alert key (the id as stored).
    key: String,
    backoff: Duration,
    /// When it is looked at again, in Unix milliseconds.
    due: i64,
}

/// A store write the scheduler owes: alerts about connections set aside.
#[derive(Debug)]
enum AlertOp {
    Raise { key: String, facts: AlertFacts },
    Resolve { key: String },
}

/// What a refresh task comes back with.
#[derive(Debug)]
pub struct Done {
    id: Uuid,
    /// The refresh could not run because of the connection's own data (a
    /// value that does not read or open): the reason, to set it aside.
    fault: Option<String>,
    /// The store error behind `fault`.
    error: Option<StoreError>,
    /// The refresh reached the token endpoint (so its secrets opened).
    sent: bool,
    /// The row after the refresh.
    row: Result<Option<Result<ConnectionRow, Fault>>, StoreError>,
}

/// A store error that is about this connection's stored values rather than
/// the store: a column that does not decode or a sealed value that does
/// not open. Retrying soon cannot help; a person must fix the row.
pub fn is_row_fault(e: &StoreError) -> bool {
    use rusqlite::Error as E;
    matches!(
        e,
        StoreError::Corrupt(_)
            | StoreError::Crypto(crate::crypto::CryptoError::Open { .. })
            | StoreError::Sql(
                E::InvalidColumnType(..)
                    | E::FromSqlConversionFailure(..)
                    | E::IntegralValueOutOfRange(..)
                    | E::Utf8Error(..),
            )
    )
}

/// What a person does about a refresh that cannot run for `reason`.
fn action_for(name: &str, e: Option<&StoreError>) -> String {
    match e {
        Some(StoreError::Crypto(crate::crypto::CryptoError::Open { column, .. }))
            if column == "client_secret" =>
        {
            format!(
                "enter the client secret again with `acutoken connection set-secret {name}`, or add the key it was sealed with to store.previous_key_files"
            )
        }
        Some(StoreError::Crypto(crate::crypto::CryptoError::Open { .. })) => format!(
            "add the key it was sealed with to store.previous_key_files, or have the customer re-authorize (`acutoken connection authorize {name}`)"
        ),
        Some(_) => "correct the column with sqlite3 or restore the row from a backup; acutoken tries again with backoff (at most hourly)".to_string(),
        None => format!(
            "report this as a bug with the log lines around it; acutoken tries again with backoff (at most hourly), and `acutoken connection refresh {name}` tries at once"
        ),
    }
}

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
    /// Connections set aside, and when each is looked at again.
    aside: HashMap<AsideKey, Aside>,
    aside_timers: BTreeSet<(i64, AsideKey)>,
    /// Alert writes owed, done once per loop turn.
    alert_ops: Vec<AlertOp>,
    /// Which connection each refresh task refreshes (a panicked task
    /// returns nothing else).
    spawned: HashMap<tokio::task::Id, Uuid>,
    wake: Option<crate::store::alerts::Wake>,
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
                aside: HashMap::new(),
                aside_timers: BTreeSet::new(),
                alert_ops: Vec::new(),
                spawned: HashMap::new(),
                wake: None,
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
        let mut at = crate::renewal::alert_conditions::next_change(row, &policy, now);
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
        if let Some(a) = self.unpark(AsideKey::Id(row.conn.id)) {
            // It reads (or someone changed it): back to ordinary work. An
            // unreadable row's alert resolves now; a refresh fault's once a
            // refresh gets through.
            if a.unreadable {
                tracing::info!(connection = %row.conn.name, "a connection set aside reads again: resumed");
                self.alert_ops.push(AlertOp::Resolve { key: a.key });
            }
        }
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
        let first = match (self.timers.first(), self.aside_timers.first()) {
            (Some((a, _)), Some((b, _))) => Some(*a.min(b)),
            (a, b) => a.map(|t| t.0).or(b.map(|t| t.0)),
        };
        match first {
            None => self.max_sleep,
            Some(d) => {
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
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            watchdog();
            self.check_clock();
            self.dispatch(&mut tasks);
            self.flush_alerts().await;
            self.publish();
            let now = self.engine.clock().now();
            let due = self.first_due(now);
            let aside_due = self
                .aside_timers
                .first()
                .copied()
                .filter(|(d, _)| *d <= ms(now));
            let sleep = self.sleep_for(now);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(joined) = tasks.join_next_with_id(), if !tasks.is_empty() => self.joined(joined).await,
                Some(msg) = input.recv() => self.handle(msg),
                _ = std::future::ready(()), if due.is_some() => {
                    if let Some((d, s)) = due {
                        self.timers.remove(&(d, s));
                        self.entries[s as usize].phase = Phase::Idle;
                        let id = self.entries[s as usize].id;
                        self.due(id).await;
                    }
                }
                _ = std::future::ready(()), if aside_due.is_some() => {
                    if let Some((_, key)) = aside_due {
                        self.look_again(key).await;
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

    /// Sets a connection aside at start-up, before the scheduler runs (its
    /// alert is raised by the caller, in the start-up pass).
    pub fn load_fault(&mut self, fault: &Fault, now: Timestamp) {
        self.park(AsideKey::of(fault), &fault.key, true, now);
    }

    /// How many connections are set aside.
    pub fn set_aside_count(&self) -> usize {
        self.aside.len()
    }

    /// Takes `key` out of ordinary scheduling and arms its look-again timer:
    /// a minute the first time, then twice the last wait, up to an hour.
    /// Returns true when it was not set aside before.
    fn park(&mut self, key: AsideKey, alert_key: &str, unreadable: bool, now: Timestamp) -> bool {
        if let AsideKey::Id(id) = key
            && let Some(&s) = self.index.get(&id)
        {
            self.unqueue(s);
        }
        let (backoff, new) = match self.aside.remove(&key) {
            Some(old) => {
                self.aside_timers.remove(&(old.due, key));
                ((old.backoff * 2).min(ASIDE_MAX), false)
            }
            None => (ASIDE_FIRST, true),
        };
        let due = ms(now).saturating_add(backoff.as_millis() as i64);
        self.aside.insert(
            key,
            Aside {
                unreadable,
                key: alert_key.to_string(),
                backoff,
                due,
            },
        );
        self.aside_timers.insert((due, key));
        new
    }

    /// Tells the alert worker to look at the outbox now.
    fn poke(&self) {
        if let Some(w) = &self.wake {
            w.poke();
        }
    }

    /// The handle that wakes the alert worker after the scheduler raises or
    /// resolves an alert.
    pub fn set_wake(&mut self, wake: crate::store::alerts::Wake) {
        self.wake = Some(wake);
    }

    /// Forgets that `key` was set aside.
    fn unpark(&mut self, key: AsideKey) -> Option<Aside> {
        let a = self.aside.remove(&key)?;
        self.aside_timers.remove(&(a.due, key));
        Some(a)
    }

    /// Sets aside a row that does not read: logged and alerted the first time.
    fn park_unreadable(&mut self, fault: &Fault, now: Timestamp) {
        let key = AsideKey::of(fault);
        if self.park(key, &fault.key, true, now) {
            tracing::error!(
                connection = %fault.label(),
                column = fault.column,
                "{fault}: the connection is set aside; every other connection goes on"
            );
        } else {
            tracing::debug!(connection = %fault.label(), "still unreadable: {fault}");
        }
        self.alert_ops.push(AlertOp::Raise {
            key: fault.key.clone(),
            facts: AlertFacts::row_unreadable(fault),
        });
    }

    /// Sets aside a connection whose refresh cannot run for `reason`.
    fn park_refresh(&mut self, row: &ConnectionRow, reason: &str, action: &str, now: Timestamp) {
        let id = row.conn.id;
        let key = id.to_string();
        if self.park(AsideKey::Id(id), &key, false, now) {
            tracing::error!(
                connection = %row.conn.name,
                reason,
                "a refresh cannot run: the connection is set aside; every other connection goes on"
            );
        } else {
            tracing::debug!(connection = %row.conn.name, reason, "still set aside");
        }
        self.alert_ops.push(AlertOp::Raise {
            key,
            facts: AlertFacts::refresh_set_aside(row, reason, action),
        });
    }

    /// Writes the alerts owed, in one transaction. A failed write is logged;
    /// the next look at the connection raises it again.
    async fn flush_alerts(&mut self) {
        if self.alert_ops.is_empty() {
            return;
        }
        let ops = std::mem::take(&mut self.alert_ops);
        let now = self.engine.clock().now();
        let res = self
            .engine
            .store()
            .write(move |tx, _| {
                for op in &ops {
                    match op {
                        AlertOp::Raise { key, facts } => {
                            crate::store::alerts::raise_faulty(tx, key, facts, now)?;
                        }
                        AlertOp::Resolve { key } => {
                            crate::store::alerts::resolve_faulty(tx, key, now)?
                        }
                    }
                }
                Ok(())
            })
            .await;
        match res {
            Ok(()) => self.poke(),
            Err(e) => {
                tracing::error!(error = %e, "cannot write the alert of a connection set aside")
            }
        }
    }

    /// A connection set aside is due another look: an unreadable row is
    /// read again; a refresh that could not run is tried again.
    async fn look_again(&mut self, key: AsideKey) {
        let Some(a) = self.aside.get(&key).cloned() else {
            return;
        };
        let now = self.engine.clock().now();
        if !a.unreadable {
            if let AsideKey::Id(id) = key {
                // Keep the entry (its backoff doubles if the refresh fails
                // again) but let the ordinary path refresh it.
                self.aside_timers.remove(&(a.due, key));
                if let Some(e) = self.aside.get_mut(&key) {
                    e.due = i64::MAX;
                }
                self.due(id).await;
            }
            return;
        }
        let read = self
            .engine
            .store()
            .read(move |st| match key {
                AsideKey::Id(id) => st.read_by_id(id),
                AsideKey::Row(rowid) => st.row_at(rowid),
            })
            .await;
        match read {
            Ok(Some(Ok(row))) => {
                self.unpark(key);
                tracing::info!(connection = %row.conn.name, "a connection set aside reads again: resumed");
                self.alert_ops.push(AlertOp::Resolve { key: a.key });
                self.upsert(&row, now);
            }
            Ok(Some(Err(fault))) => {
                if AsideKey::of(&fault) != key {
                    // A row whose id did not read now has one (or lost it).
                    self.unpark(key);
                    self.alert_ops.push(AlertOp::Resolve { key: a.key });
                }
                self.park_unreadable(&fault, now);
            }
            Ok(None) => {
                self.unpark(key);
                tracing::info!("a connection set aside was removed");
                self.alert_ops.push(AlertOp::Resolve { key: a.key });
                if let AsideKey::Id(id) = key {
                    self.remove(id);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a connection set aside; trying again later");
                self.park(key, &a.key, true, now);
            }
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
            Input::Faulty(fault) => {
                if let Some(&s) = fault.id.and_then(|id| self.index.get(&id))
                    && self.entries[s as usize].phase == Phase::Running
                {
                    // Its refresh task reads the row when it ends and sets it aside then.
                    return;
                }
                self.park_unreadable(&fault, now);
            }
        }
    }

    /// A wake-up: refresh if due, else re-evaluate state and alerts by time.
    async fn due(&mut self, id: Uuid) {
        let engine = self.engine.clone();
        let now = engine.clock().now();
        let policy = engine.policy();
        let read = engine.store().read(move |st| st.read_by_id(id)).await;
        let row = match read {
            Ok(Some(Ok(row))) if !quiet(&row, now) => {
                // Time alone changed something (state or alert conditions):
                // decided again on the row as it is in the write, never
                // written back from the read above.
                engine
                    .store()
                    .write(move |tx, _| {
                        let mut row = match crate::store::connections::read_by_id_tx(tx, id)? {
                            Some(Ok(row)) => row,
                            other => return Ok(other),
                        };
                        let settled = settle_by_time(&mut row, now);
                        if settled.changed {
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
                        if !settled.quiet {
                            let desired =
                                crate::renewal::alert_conditions::desired(&row, &policy, now);
                            crate::store::alerts::sync_connection(tx, &row, &desired, now)?;
                        }
                        Ok(Some(Ok(row)))
                    })
                    .await
            }
            other => other,
        };
        match row {
            Ok(Some(Err(fault))) => self.park_unreadable(&fault, now),
            Ok(Some(Ok(row))) => {
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

    fn dispatch(&mut self, tasks: &mut tokio::task::JoinSet<Done>) {
        self.start_ready(tasks, refresh_task);
    }

    /// Starts what is ready within the limits, each as `task(engine, id)`.
    fn start_ready<F>(
        &mut self,
        tasks: &mut tokio::task::JoinSet<Done>,
        task: impl Fn(Arc<Engine>, Uuid) -> F,
    ) where
        F: std::future::Future<Output = Done> + Send + 'static,
    {
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
            let handle = tasks.spawn(task(engine, id));
            self.spawned.insert(handle.id(), id);
        }
    }

    /// A refresh task ended: normally with its [`Done`]; if it panicked,
    /// the connection is set aside with the panic's message, and either
    /// way its slot is freed so the others go on.
    async fn joined(&mut self, joined: Result<(tokio::task::Id, Done), tokio::task::JoinError>) {
        match joined {
            Ok((task, done)) => {
                self.spawned.remove(&task);
                self.finished(done);
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
                let row = self.engine.store().read(move |st| st.read_by_id(id)).await;
                self.finished(Done {
                    id,
                    fault: Some(reason),
                    error: None,
                    sent: false,
                    row,
                });
            }
        }
    }

    fn finished(&mut self, done: Done) {
        let id = done.id;
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
        let row = match done.row {
            Ok(Some(Ok(row))) => row,
            Ok(Some(Err(fault))) => return self.park_unreadable(&fault, now),
            Ok(None) => return self.remove(id),
            Err(e) => {
                tracing::error!(error = %e, "cannot read a connection after its refresh; looking again in a minute");
                return self.place(s, Some(now + chrono::Duration::minutes(1)));
            }
        };
        if let Some(reason) = &done.fault {
            let action = action_for(&row.conn.name, done.error.as_ref());
            return self.park_refresh(&row, reason, &action, now);
        }
        if done.sent
            && let Some(a) = self.unpark(AsideKey::Id(id))
        {
            // A refresh got through: whatever set it aside is fixed.
            // Its alert was resolved by the task (`refresh_task`).
            tracing::info!(connection = %row.conn.name, key = %a.key, "a connection set aside refreshes again: resumed");
            self.poke();
        }
        if row.conn.state == State::Active
            && row.conn.next_refresh_at.is_some_and(|t| t <= now)
            && row.claim.is_none()
        {
            // Nothing moved the plan (e.g. the engine is blocked): look again shortly.
            self.place(s, Some(now + chrono::Duration::seconds(5)));
        } else {
            self.upsert(&row, now);
        }
    }
}

/// What time alone did to a connection at a wake-up.
struct Settled {
    /// Its state changed (the client secret expired).
    changed: bool,
    /// Nothing to write: a refresh is simply due.
    quiet: bool,
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
fn settle_by_time(row: &mut ConnectionRow, now: Timestamp) -> Settled {
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
    Settled {
        changed,
        quiet: refresh_due && !changed,
    }
}

/// One refresh, run as its own task: what it came to, and the row after it.
async fn refresh_task(engine: Arc<Engine>, id: Uuid) -> Done {
    let (mut fault, mut error, mut sent) = (None, None, false);
    match engine.refresh(id, Trigger::Scheduled).await {
        Ok(r) => sent = matches!(r.outcome.as_str(), "refreshed" | "failed" | "discarded"),
        Err(super::engine::EngineError::Store(e)) if is_row_fault(&e) => {
            fault = Some(e.to_string());
            error = Some(e);
        }
        Err(e) => tracing::error!(error = %e, "refresh could not run"),
    }
    let now = engine.clock().now();
    let read = engine
        .store()
        .read(move |st| -> Result<_, StoreError> {
            // A connection set aside in an earlier run whose refresh now gets
            // through: its alert resolves (one indexed read otherwise).
            let fires = sent && crate::store::alerts::faulty_fires(st.db(), &id.to_string())?;
            Ok((st.read_by_id(id)?, fires))
        })
        .await;
    let row = match read {
        Ok((row, true)) => engine
            .store()
            .write(move |tx, _| crate::store::alerts::resolve_faulty(tx, &id.to_string(), now))
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
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::acumatica::TokenClient;
    use crate::config::Config;
    use crate::crypto::{Key, Keyring};
    use crate::model::NewConnection;
    use crate::model::{Connection, Mode};
    use crate::renewal::engine::{EngineParts, NoHooks};
    use crate::secret::Secret;
    use crate::store::claims::Owner;
    use crate::store::connections;
    use crate::store::{Create, Store};

    fn add(st: &mut Store, name: &str, now: Timestamp) -> Uuid {
        let id = Uuid::new_v4();
        let conn = Connection {
            id,
            name: name.into(),
            instance: "erp.example.com".into(),
            client_id: "X@T".into(),
            labels: BTreeMap::new(),
            mode: Mode::Absolute,
            lifetime: Duration::from_secs(30 * 86_400),
            absolute_lifetime: None,
            secret_expires_at: None,
            grant_issued_at: Some(now),
            refresh_token_issued_at: Some(now),
            access_expires_at: None,
            deadline: Some(now + chrono::Duration::days(30)),
            deadline_source: None,
            next_refresh_at: Some(now - chrono::Duration::seconds(1)),
            last_refresh_at: None,
            last_error: None,
            state: State::Active,
        };
        let new = NewConnection {
            conn,
            client_secret: Some(Secret::new("s")),
            refresh_token: Some(Secret::new("t")),
        };
        st.write(|tx, kr| connections::insert(tx, kr, &new, now))
            .unwrap();
        id
    }

    /// Takes `id` off its timer and makes it ready, as the run loop does.
    async fn make_ready(sched: &mut Scheduler, id: Uuid) {
        let s = sched.index[&id];
        sched.unqueue(s);
        sched.due(id).await;
        assert_eq!(sched.entries[s as usize].phase, Phase::Ready);
    }

    /// Issue 12 item 1: a panic in one connection's refresh task is caught
    /// by the scheduler: the connection is set aside with the panic's
    /// message and a `connection_faulty` alert, its slot is freed, and the
    /// next connection on the same instance (limit 1) starts.
    #[tokio::test]
    async fn a_refresh_task_that_panics_sets_its_connection_aside_and_frees_its_slot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acutoken.db");
        let keyring = Keyring::new(Key::generate(), vec![]);
        let mut st = Store::open(&path, keyring, Create::Yes).unwrap();
        let clock = crate::clock::system();
        let now = clock.now();
        let acme = add(&mut st, "acme", now);
        let beta = add(&mut st, "beta", now);
        let config = Config::default();
        let engine = Arc::new(Engine::new(EngineParts {
            store: crate::store::StoreHandle::from_store(st).unwrap(),
            client: TokenClient::new(crate::renewal::client_settings(&config)).unwrap(),
            policy: config.renewal.policy(),
            clock,
            owner: Owner::current("test"),
            http_timeout: Duration::from_secs(5),
            spill_dir: None,
            limits: crate::renewal::limits::Limits::new(1, 1),
            hooks: Arc::new(NoHooks),
        }));
        let (mut sched, _snapshot) = Scheduler::new(engine.clone(), 1, 1, Duration::from_secs(60));
        for id in [acme, beta] {
            let row = engine
                .store()
                .read(move |st| st.get_by_id(id))
                .await
                .unwrap()
                .unwrap();
            sched.upsert(&row, now);
        }
        make_ready(&mut sched, acme).await;
        make_ready(&mut sched, beta).await;

        let mut tasks = tokio::task::JoinSet::new();
        // Both are on one instance with a limit of one: the first starts alone.
        sched.start_ready(&mut tasks, |_, id| async move {
            panic!("attempt to add with overflow (connection {id})");
        });
        assert_eq!((sched.running, tasks.len()), (1, 1));
        let started = *sched.spawned.values().next().unwrap();
        let other = if started == acme { beta } else { acme };

        let joined = tasks.join_next_with_id().await.unwrap();
        assert!(joined.as_ref().is_err_and(|e| e.is_panic()));
        sched.joined(joined).await;
        assert_eq!(sched.running, 0);
        assert!(sched.busy.iter().all(|b| *b == 0), "the slot is freed");
        assert!(sched.spawned.is_empty());
        let s = sched.index[&started];
        assert_eq!(sched.entries[s as usize].phase, Phase::Idle);
        assert!(!sched.timers.iter().any(|(_, t)| *t == s), "not scheduled");
        let aside = &sched.aside[&AsideKey::Id(started)];
        assert!(!aside.unreadable);
        assert_eq!(aside.backoff, ASIDE_FIRST);

        sched.flush_alerts().await;
        let set_aside = engine
            .store()
            .read(|st| crate::store::alerts::set_aside(st.db()))
            .await
            .unwrap();
        assert_eq!(set_aside.len(), 1);
        assert_eq!(set_aside[0].key, started.to_string());
        let summary = &set_aside[0].facts.summary;
        assert!(
            summary.contains("internal error while refreshing: attempt to add with overflow"),
            "{summary}"
        );

        // The other one goes on.
        sched.start_ready(&mut tasks, |_, id| async move {
            Done {
                id,
                fault: None,
                error: None,
                sent: true,
                row: Ok(None),
            }
        });
        assert_eq!(sched.spawned.values().copied().collect::<Vec<_>>(), [other]);
        let joined = tasks.join_next_with_id().await.unwrap();
        sched.joined(joined).await;
        assert_eq!(sched.running, 0);

        // Looked at again after the backoff: it is refreshed again and, if
        // it panics again, waits twice as long, without a second log line.
        let key = AsideKey::Id(started);
        sched.look_again(key).await;
        assert_eq!(sched.ready.len(), 1);
        sched.start_ready(&mut tasks, |_, _| async move { panic!("again") });
        let joined = tasks.join_next_with_id().await.unwrap();
        sched.joined(joined).await;
        assert_eq!(sched.aside[&key].backoff, ASIDE_FIRST * 2);
        assert_eq!(sched.running, 0);
    }
}
