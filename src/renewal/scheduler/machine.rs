//! The scheduler's state machine: timers, the ready set and the limits.
//!
//! Pure on purpose: it reads no clock, touches no store and spawns nothing.
//! The driver tells it the time and what happened (a row loaded, changed or
//! removed, a wake-up's read, a refresh finished, a fault) and asks it what
//! to do next ([`Machine::start`], [`Machine::next_wake`],
//! [`Machine::sleep_for`], [`Machine::take_outbox`]). So every decision
//! about order, limits, backoff and clock jumps can be tested by setting
//! the time by hand, without a runtime or a database.
//!
//! Each connection is a small [`Entry`] in a slab, indexed by id; a timer is
//! a `(due ms, slot)` key in a B-tree, the ready set a `(deadline ms, slot)`
//! key in another, so the earliest deadline is always first.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use super::aside::{self, AlertOp, AsideKey, SetAside};
use super::{Done, JUMP, Read, Snapshot};
use crate::model::{ConnectionRow, Fault, State, Timestamp};
use crate::renewal::policy::Policy;

/// Where an entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
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
pub(super) struct Entry {
    id: Uuid,
    /// The timer, in Unix milliseconds (meaningful while `Timed`).
    due: i64,
    /// The refresh deadline in Unix milliseconds (`i64::MAX` when unknown).
    deadline: i64,
    /// Index into the interned instances.
    instance: u32,
    pub(super) phase: Phase,
    /// Removed while its refresh ran: freed when the refresh finishes.
    removed: bool,
}

/// How much later a connection that falls to another replica ranks among
/// the ready ones ([`Machine::rank`]).
const OTHERS_LATER_MS: i64 = 3_600_000;

fn ms(t: Timestamp) -> i64 {
    t.timestamp_millis()
}

/// Something that fell due, as [`Machine::next_wake`] found it; hand it
/// back to [`Machine::fire`] to act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A connection's timer.
    Timer(i64, u32),
    /// A connection set aside is due another look.
    Aside(AsideKey),
}

/// What the driver reads from the store for a wake-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// The connection's row, settled by time (its state and alert
    /// conditions); the result goes to [`Machine::due_read`].
    Due(Uuid),
    /// A row set aside because it did not read, by id or rowid; the
    /// result goes to [`Machine::aside_read`].
    Aside(AsideKey),
}

/// Side effects owed, collected as the machine decides and drained by the
/// driver once per turn.
#[derive(Debug, Default, PartialEq)]
pub struct Outbox {
    /// Alerts of connections set aside, to write in one transaction.
    pub alerts: Vec<AlertOp>,
    /// Connections removed: the engine drops its per-connection state.
    pub forget: Vec<Uuid>,
    /// Tell the alert worker to look at the outbox now.
    pub poke: bool,
}

/// The scheduler's state.
pub struct Machine {
    pub(super) entries: Vec<Entry>,
    free: Vec<u32>,
    pub(super) index: HashMap<Uuid, u32>,
    pub(super) timers: BTreeSet<(i64, u32)>,
    /// Timers of connections read at start-up ([`Machine::load`]), built
    /// into `timers` in one go by [`Machine::finish_load`].
    loaded: Vec<(i64, u32)>,
    ready: BTreeSet<(i64, u32)>,
    running: usize,
    instances: Vec<Arc<str>>,
    instance_ids: HashMap<Arc<str>, u32>,
    /// Refreshes in flight per interned instance.
    pub(super) busy: Vec<usize>,
    global_limit: usize,
    instance_limit: usize,
    max_sleep: Duration,
    /// The wall clock at the last [`Machine::observe_clock`].
    wall: Option<Timestamp>,
    pub(super) aside: SetAside,
    outbox: Outbox,
    /// This replica's share of the work, when it is one of several.
    share: Option<super::Share>,
}

impl Machine {
    pub fn new(global_limit: usize, instance_limit: usize, max_sleep: Duration) -> Machine {
        Machine {
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
            wall: None,
            aside: SetAside::default(),
            outbox: Outbox::default(),
            share: None,
        }
    }

    /// The ready-set key of connection `id` with `deadline`: its deadline,
    /// an hour later when it falls to another replica. Ordering stays
    /// earliest deadline first at the grain of an hour.
    fn rank(&self, id: Uuid, deadline: i64) -> i64 {
        match self.share {
            Some(share) if deadline != i64::MAX && !share.owns(id) => {
                deadline.saturating_add(OTHERS_LATER_MS)
            }
            _ => deadline,
        }
    }

    /// A new share of the work (replicas came or went): what is ready is
    /// ordered by it at once.
    pub fn set_share(&mut self, share: super::Share) {
        let old = self.share.replace(share);
        if old == self.share {
            return;
        }
        let ready = std::mem::take(&mut self.ready);
        for (key, s) in ready {
            let id = self.entries[s as usize].id;
            let deadline = match old {
                Some(o) if key != i64::MAX && !o.owns(id) => key - OTHERS_LATER_MS,
                _ => key,
            };
            let key = self.rank(id, deadline);
            self.entries[s as usize].deadline = key;
            self.ready.insert((key, s));
        }
    }

    /// Room for `n` connections, so a start-up load grows nothing twice.
    pub fn reserve(&mut self, n: usize) {
        self.entries.reserve(n);
        self.index.reserve(n);
    }

    /// New concurrency limits (reload).
    pub fn set_limits(&mut self, global: usize, per_instance: usize) {
        self.global_limit = global.max(1);
        self.instance_limit = per_instance.max(1);
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
    pub fn upsert(&mut self, row: &ConnectionRow, policy: &Policy, now: Timestamp) {
        if let Some(a) = self.aside.unpark(AsideKey::Id(row.conn.id)) {
            // It reads (or someone changed it): back to ordinary work. An
            // unreadable row's alert resolves now; a refresh fault's once a
            // refresh gets through.
            if a.unreadable {
                tracing::info!(connection = %row.conn.name, "a connection set aside reads again: resumed");
                self.outbox.alerts.push(AlertOp::Resolve { key: a.key });
            }
        }
        let s = self.slot(row.conn.id);
        if self.entries[s as usize].phase == Phase::Running {
            // Re-planned from the saved row when the refresh finishes.
            return;
        }
        let instance = self.intern(&row.conn.instance);
        let wake = wake_at(row, policy, now);
        self.unqueue(s);
        let deadline = self.rank(row.conn.id, row.conn.deadline.map_or(i64::MAX, ms));
        let e = &mut self.entries[s as usize];
        e.instance = instance;
        e.deadline = deadline;
        self.place(s, wake);
    }

    /// Plans a connection read at start-up, as [`Machine::upsert`] does,
    /// but keeps its timer aside until [`Machine::finish_load`]: inserting
    /// 1M timers one at a time into the B-tree was half of READY at 1M, and
    /// building it from the sorted list is a fraction of that.
    pub fn load(&mut self, row: &ConnectionRow, policy: &Policy, now: Timestamp) {
        let s = self.slot(row.conn.id);
        if self.entries[s as usize].phase != Phase::Idle {
            // Seen before (never from one pass over the table): the ordinary path.
            self.finish_load();
            self.upsert(row, policy, now);
            return;
        }
        let instance = self.intern(&row.conn.instance);
        let wake = wake_at(row, policy, now);
        let e = &mut self.entries[s as usize];
        e.instance = instance;
        e.deadline = row.conn.deadline.map_or(i64::MAX, ms);
        if let Some(due) = wake {
            e.due = ms(due);
            e.phase = Phase::Timed;
            self.loaded.push((e.due, s));
        }
    }

    /// Moves the timers of [`Machine::load`] into the timer set.
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

    /// A connection was removed: it is never started again (one running is
    /// forgotten when its refresh ends).
    pub fn remove(&mut self, id: Uuid) {
        if let Some(&s) = self.index.get(&id) {
            self.unqueue(s);
            if self.entries[s as usize].phase == Phase::Running {
                self.entries[s as usize].removed = true;
            } else {
                self.free_slot(s);
            }
        }
        self.outbox.forget.push(id);
    }

    /// A changed row that does not read (from the store's change feed).
    pub fn faulty(&mut self, fault: &Fault, now: Timestamp) {
        if let Some(&s) = fault.id.and_then(|id| self.index.get(&id))
            && self.entries[s as usize].phase == Phase::Running
        {
            // Its refresh task reads the row when it ends and sets it aside then.
            return;
        }
        self.park_unreadable(fault, now);
    }

    /// The counters for status and metrics.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            scheduled: self.timers.len(),
            ready: self.ready.len(),
            running: self.running,
        }
    }

    /// How many connections are set aside.
    pub fn set_aside_count(&self) -> usize {
        self.aside.len()
    }

    /// The side effects owed since the last call.
    pub fn take_outbox(&mut self) -> Outbox {
        std::mem::take(&mut self.outbox)
    }

    /// Notes the wall clock `now`, `elapsed` (monotonic) after the last
    /// note, and returns how far the wall clock jumped when that is more
    /// than [`JUMP`] either way. Timers are wall-clock times, so nothing is
    /// moved: whatever the new time makes due fires at the next
    /// [`Machine::next_wake`], and nothing fires early after a jump back.
    pub fn observe_clock(&mut self, now: Timestamp, elapsed: Duration) -> Option<chrono::Duration> {
        let last = self.wall.replace(now)?;
        let expected =
            last + chrono::Duration::from_std(elapsed).unwrap_or(chrono::Duration::zero());
        let drift = now - expected;
        (drift > JUMP || drift < -JUMP).then_some(drift)
    }

    /// Marks what is ready as running, earliest deadline first, within the
    /// global and per-instance limits, and returns the ids to refresh now.
    /// An instance at its limit is skipped, not waited for.
    pub fn start(&mut self) -> Vec<Uuid> {
        if self.ready.is_empty() {
            return Vec::new();
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
        start
            .into_iter()
            .map(|key| {
                self.ready.remove(&key);
                self.running += 1;
                let e = &mut self.entries[key.1 as usize];
                e.phase = Phase::Running;
                e.id
            })
            .collect()
    }

    /// What fell due at `now`: a connection's timer first, then a
    /// connection set aside.
    pub fn next_wake(&self, now: Timestamp) -> Option<Wake> {
        if let Some(&(d, s)) = self.timers.first().filter(|(d, _)| *d <= ms(now)) {
            return Some(Wake::Timer(d, s));
        }
        self.aside.first_due(ms(now)).map(Wake::Aside)
    }

    /// How long to sleep before the next timer (at most `max_sleep`).
    pub fn sleep_for(&self, now: Timestamp) -> Duration {
        let first = match (self.timers.first().map(|t| t.0), self.aside.first()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match first {
            None => self.max_sleep,
            Some(d) => {
                let left = u64::try_from(d.saturating_sub(ms(now))).unwrap_or(0);
                Duration::from_millis(left.max(1)).min(self.max_sleep)
            }
        }
    }

    /// Takes `wake` off its timer and says what to read for it: a due
    /// connection's row, or a set-aside row that did not read. A refresh
    /// set aside is retried through the ordinary path (its backoff entry
    /// stays, so failing again doubles the wait).
    pub fn fire(&mut self, wake: Wake) -> Option<Look> {
        match wake {
            Wake::Timer(d, s) => {
                if !self.timers.remove(&(d, s)) {
                    return None;
                }
                let e = &mut self.entries[s as usize];
                e.phase = Phase::Idle;
                Some(Look::Due(e.id))
            }
            Wake::Aside(key) => {
                let a = self.aside.get(&key)?;
                if a.unreadable {
                    return Some(Look::Aside(key));
                }
                let AsideKey::Id(id) = key else {
                    return None;
                };
                self.aside.hold(key);
                Some(Look::Due(id))
            }
        }
    }

    /// The row of a wake-up ([`Look::Due`]), as settled by time: a refresh
    /// due goes to the ready set (with its deadline as read now), anything
    /// else is planned again.
    pub fn due_read(&mut self, id: Uuid, read: Read, policy: &Policy, now: Timestamp) {
        match read {
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
                    let deadline = self.rank(id, row.conn.deadline.map_or(i64::MAX, ms));
                    let e = &mut self.entries[s as usize];
                    e.instance = instance;
                    e.deadline = deadline;
                    e.phase = Phase::Ready;
                    self.ready.insert((e.deadline, s));
                } else if !refresh_due {
                    self.upsert(&row, policy, now);
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

    /// The row of a set-aside connection that did not read ([`Look::Aside`]).
    pub fn aside_read(&mut self, key: AsideKey, read: Read, policy: &Policy, now: Timestamp) {
        let Some(a) = self.aside.get(&key).cloned() else {
            return;
        };
        match read {
            Ok(Some(Ok(row))) => {
                self.aside.unpark(key);
                tracing::info!(connection = %row.conn.name, "a connection set aside reads again: resumed");
                self.outbox.alerts.push(AlertOp::Resolve { key: a.key });
                self.upsert(&row, policy, now);
            }
            Ok(Some(Err(fault))) => {
                if AsideKey::of(&fault) != key {
                    // A row whose id did not read now has one (or lost it).
                    self.aside.unpark(key);
                    self.outbox.alerts.push(AlertOp::Resolve { key: a.key });
                }
                self.park_unreadable(&fault, now);
            }
            Ok(None) => {
                self.aside.unpark(key);
                tracing::info!("a connection set aside was removed");
                self.outbox.alerts.push(AlertOp::Resolve { key: a.key });
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

    /// A refresh ended: its slot is freed (so the next can start) and the
    /// connection is planned again from the row it saved, or set aside.
    pub fn finished(&mut self, done: Done, policy: &Policy, now: Timestamp) {
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
            let action = aside::action_for(&row.conn.name, done.error.as_ref());
            return self.park_refresh(&row, reason, &action, now);
        }
        if done.sent
            && let Some(a) = self.aside.unpark(AsideKey::Id(id))
        {
            // A refresh got through: whatever set it aside is fixed.
            // Its alert was resolved by the refresh task.
            tracing::info!(connection = %row.conn.name, key = %a.key, "a connection set aside refreshes again: resumed");
            self.outbox.poke = true;
        }
        if row.conn.state == State::Active
            && row.conn.next_refresh_at.is_some_and(|t| t <= now)
            && row.claim.is_none()
        {
            // Nothing moved the plan (e.g. the engine is blocked): look again shortly.
            self.place(s, Some(now + chrono::Duration::seconds(5)));
        } else {
            self.upsert(&row, policy, now);
        }
    }

    /// Sets a connection aside at start-up (its alert is raised by the
    /// caller, in the start-up pass).
    pub fn load_fault(&mut self, fault: &Fault, now: Timestamp) {
        self.park(AsideKey::of(fault), &fault.key, true, now);
    }

    /// Takes `key` out of ordinary scheduling and arms its look-again timer.
    /// Returns true when it was not set aside before.
    fn park(&mut self, key: AsideKey, alert_key: &str, unreadable: bool, now: Timestamp) -> bool {
        if let AsideKey::Id(id) = key
            && let Some(&s) = self.index.get(&id)
        {
            self.unqueue(s);
        }
        self.aside.park(key, alert_key, unreadable, ms(now))
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
        self.outbox.alerts.push(aside::unreadable_alert(fault));
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
        self.outbox.alerts.push(AlertOp::Raise {
            key,
            facts: crate::model::AlertFacts::refresh_set_aside(row, reason, action),
        });
    }
}

/// When a connection next needs attention, if ever.
fn wake_at(row: &ConnectionRow, policy: &Policy, now: Timestamp) -> Option<Timestamp> {
    let c = &row.conn;
    let mut at = crate::renewal::alert_conditions::next_change(row, policy, now);
    if c.state.is_scheduled() {
        let mut take = |t: Option<Timestamp>| {
            if let Some(t) = t {
                at = Some(at.map_or(t, |a| a.min(t)));
            }
        };
        match &row.claim {
            // Another process (the CLI, another replica) is refreshing it:
            // its outcome arrives as a change of the row, which plans it
            // anew. Look again when the claim ends at the latest, and not
            // sooner than a second from now: a claim that cannot be taken
            // over yet is not asked for in a loop.
            Some((_, until)) => take(Some((*until).max(now + chrono::Duration::seconds(1)))),
            None => take(c.next_refresh_at.or(Some(now))),
        }
        take(c.secret_expires_at);
    }
    at
}

#[cfg(test)]
mod tests;
