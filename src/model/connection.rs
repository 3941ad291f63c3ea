//! A connection as the store keeps it: the row with its bookkeeping, the
//! forms that create and edit one, and the fault of a row that does not read.

use std::collections::BTreeMap;
use std::time::Duration;

use uuid::Uuid;

use super::{Connection, Mode, Timestamp};
use crate::secret::Secret;

/// A new connection as the CLI builds it (plan fields computed by the caller).
#[derive(Debug, Clone)]
pub struct NewConnection {
    pub conn: Connection,
    pub client_secret: Option<Secret>,
    pub refresh_token: Option<Secret>,
}

/// A connection with the bookkeeping the renewal engine keeps beside it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionRow {
    pub conn: Connection,
    /// Consecutive transient failures since the last success.
    pub failures: u32,
    /// When the current run of failures began.
    pub failing_since: Option<Timestamp>,
    /// A previous claim was orphaned: the token may have been consumed already.
    pub outcome_unknown: bool,
    pub has_client_secret: bool,
    pub has_refresh_token: bool,
    pub has_access_token: bool,
    pub token_type: Option<String>,
    /// The lifetime the current access token was issued with.
    pub access_lifetime: Option<Duration>,
    /// The live or stale claim on this connection: (owner, expires).
    pub claim: Option<(String, Timestamp)>,
    pub version: i64,
    pub change_seq: i64,
}

/// Edits `connection set` can make; `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct ConnectionPatch {
    pub labels: Option<BTreeMap<String, String>>,
    pub mode: Option<Mode>,
    pub lifetime: Option<Duration>,
    pub absolute_lifetime: Option<Option<Duration>>,
    pub secret_expires_at: Option<Option<Timestamp>>,
    pub instance: Option<String>,
    pub client_id: Option<String>,
}

/// A connection row that does not decode: a hand-edited or damaged column.
///
/// It names the row and the column, never a sealed value: the one value it
/// quotes is the offending plain column's, cut short. Reads hand faults back
/// beside the rows that decode, so one bad row never fails a whole read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// SQLite's rowid: the handle for re-reading a row whose `id` is unreadable.
    pub rowid: i64,
    /// The connection's id, when that column reads.
    pub id: Option<Uuid>,
    /// The `id` column as stored (text), the key its alert is filed under.
    pub key: String,
    /// The connection's name, when that column reads.
    pub name: Option<String>,
    /// The column that does not decode.
    pub column: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl Fault {
    /// How the row is named to a person: its name, else its id as stored.
    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => format!("(row {}, id {:?})", self.rowid, super::clip(&self.key, 40)),
        }
    }

    /// One line: which column, and what is wrong with it.
    pub fn describe(&self) -> String {
        format!("column `{}` {}", self.column, self.reason)
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "connection {} cannot be read: {}; fix the column (sqlite3) or restore the row from a backup",
            self.label(),
            self.describe()
        )
    }
}
