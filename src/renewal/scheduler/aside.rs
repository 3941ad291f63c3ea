//! Connections set aside: which, why, and when each is looked at again.
//!
//! Kept apart from the timers of ordinary work because its rules are its
//! own: a set-aside connection has no ordinary timer, its look-again wait
//! starts at a minute and doubles to an hour, and its state is reported
//! through a `connection_faulty` alert rather than the connection's row
//! (which may not even read).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use uuid::Uuid;

use crate::model::{AlertFacts, Fault};
use crate::store::StoreError;

/// The first look again at a connection set aside...
pub const ASIDE_FIRST: Duration = Duration::from_secs(60);
/// ...doubling up to this.
pub const ASIDE_MAX: Duration = Duration::from_secs(3600);

/// How a connection set aside is known: by id, or by SQLite rowid when its
/// id column does not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AsideKey {
    Id(Uuid),
    Row(i64),
}

impl AsideKey {
    pub(super) fn of(fault: &Fault) -> AsideKey {
        fault.id.map_or(AsideKey::Row(fault.rowid), AsideKey::Id)
    }
}

/// A connection set aside.
#[derive(Debug, Clone)]
pub(super) struct Aside {
    /// Its row does not read (looked at again by reading it); otherwise its
    /// refresh cannot run (tried again by refreshing it).
    pub(super) unreadable: bool,
    /// The alert key (the id as stored).
    pub(super) key: String,
    pub(super) backoff: Duration,
    /// When it is looked at again, in Unix milliseconds (`i64::MAX` while
    /// its retry is in the ordinary path).
    pub(super) due: i64,
}

/// A store write the scheduler owes: alerts about connections set aside.
#[derive(Debug, Clone, PartialEq)]
pub enum AlertOp {
    Raise { key: String, facts: AlertFacts },
    Resolve { key: String },
}

/// The connections set aside, and their look-again timers.
#[derive(Debug, Default)]
pub(super) struct SetAside {
    map: HashMap<AsideKey, Aside>,
    timers: BTreeSet<(i64, AsideKey)>,
}

impl SetAside {
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    pub(super) fn get(&self, key: &AsideKey) -> Option<&Aside> {
        self.map.get(key)
    }

    /// Arms the look-again timer of `key`: a minute the first time, then
    /// twice the last wait, up to an hour. Returns true when it was not set
    /// aside before.
    pub(super) fn park(
        &mut self,
        key: AsideKey,
        alert_key: &str,
        unreadable: bool,
        now: i64,
    ) -> bool {
        let (backoff, new) = match self.map.remove(&key) {
            Some(old) => {
                self.timers.remove(&(old.due, key));
                ((old.backoff * 2).min(ASIDE_MAX), false)
            }
            None => (ASIDE_FIRST, true),
        };
        let due = now.saturating_add(backoff.as_millis() as i64);
        self.map.insert(
            key,
            Aside {
                unreadable,
                key: alert_key.to_string(),
                backoff,
                due,
            },
        );
        self.timers.insert((due, key));
        new
    }

    /// Forgets that `key` was set aside.
    pub(super) fn unpark(&mut self, key: AsideKey) -> Option<Aside> {
        let a = self.map.remove(&key)?;
        self.timers.remove(&(a.due, key));
        Some(a)
    }

    /// Stops the look-again timer of `key` while its retry runs the
    /// ordinary path; the entry stays, so another failure doubles its wait.
    pub(super) fn hold(&mut self, key: AsideKey) {
        if let Some(a) = self.map.get_mut(&key) {
            self.timers.remove(&(a.due, key));
            a.due = i64::MAX;
        }
    }

    /// The earliest look-again time, if any.
    pub(super) fn first(&self) -> Option<i64> {
        self.timers.first().map(|t| t.0)
    }

    /// The earliest connection due another look at `now` (Unix ms).
    pub(super) fn first_due(&self, now: i64) -> Option<AsideKey> {
        self.timers
            .first()
            .filter(|(d, _)| *d <= now)
            .map(|(_, k)| *k)
    }
}

/// What a person does about a refresh that cannot run for `reason`.
pub(super) fn action_for(name: &str, e: Option<&StoreError>) -> String {
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

/// The alert of a row that does not read.
pub(super) fn unreadable_alert(fault: &Fault) -> AlertOp {
    AlertOp::Raise {
        key: fault.key.clone(),
        facts: AlertFacts::row_unreadable(fault),
    }
}
