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
//! The work is split in three so each part can be read and tested alone:
//!
//! - [`machine`]: the timers, the ready set and the limits as a pure state
//!   machine. It is told the time and what happened (a row read or changed,
//!   a refresh finished, a fault) and answers what to do next (start these,
//!   read that, raise or resolve this alert, wake then). No tokio, no store,
//!   no clock: its tests move time by hand.
//! - [`aside`]: the bookkeeping of connections set aside (backoff, alerts).
//! - [`driver`]: the thin tokio loop that does the I/O the machine asks
//!   for: store reads and writes, refresh tasks, sleeping, the watchdog.
//!
//! A million connections must fit on a small machine: each one costs a
//! 40-byte entry in a slab, an index slot and a timer key, and nothing
//! else; instances are interned once.

mod aside;
mod driver;
mod machine;

use uuid::Uuid;

use crate::model::{ConnectionRow, Fault};
use crate::store::StoreError;

pub use aside::{ASIDE_FIRST, ASIDE_MAX, AsideKey};
pub use driver::Scheduler;

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
    /// The live replicas changed (PostgreSQL, DESIGN §10).
    Share(Share),
}

/// This replica's share of the work among the live replicas: the
/// connections whose id falls to `me` of `of` are started first, so
/// replicas catching up a backlog together do not all reach for the same
/// connection. The others' connections stay in the ready set behind them,
/// and are started when their replica does not (it died, it lags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub me: usize,
    pub of: usize,
}

impl Share {
    /// The share of replica `name` among `live` (sorted names), if listed.
    pub fn among(name: &str, live: &[String]) -> Option<Share> {
        live.iter()
            .position(|n| n == name)
            .map(|me| Share { me, of: live.len() })
    }

    /// True when connection `id` falls to this replica.
    pub fn owns(&self, id: Uuid) -> bool {
        self.of <= 1 || id.as_u128() % self.of as u128 == self.me as u128
    }
}

/// What a store read of one connection comes back with: the row, a row that
/// does not read, nothing (removed), or a store error.
pub type Read = Result<Option<Result<ConnectionRow, Fault>>, StoreError>;

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
    row: Read,
}

/// A store error that is about this connection's stored values rather than
/// the store: a column that does not decode or a sealed value that does
/// not open. Retrying soon cannot help; a person must fix the row.
pub fn is_row_fault(e: &StoreError) -> bool {
    e.is_row_fault()
}

/// Counters for status and metrics.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub scheduled: usize,
    pub ready: usize,
    pub running: usize,
}
