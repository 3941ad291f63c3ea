//! What `status` and `GET /v1/status` say: daemon, counts, who must act,
//! deadlines, alerts. Data only: the CLI prints it (`cli/status_text.rs`),
//! the API serialises it.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::model::ConnectionRow;
use crate::model::{State, Timestamp, fmt_time};
use crate::store::{Store, StoreError};

/// How many connections each list shows.
const LIST: usize = 20;

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Status {
    pub daemon: DaemonInfo,
    pub store: String,
    pub total: u64,
    pub counts: BTreeMap<String, u64>,
    pub needs_action_total: u64,
    pub needs_action: Vec<ActionItem>,
    pub nearest_deadlines: Vec<DeadlineItem>,
    /// Connections set aside (a row that does not read, a sealed value that
    /// does not open, an internal error while refreshing): not refreshed,
    /// every other connection is.
    #[serde(default)]
    pub set_aside: Vec<SetAsideItem>,
    pub alerts: AlertInfo,
    /// The replicas serving a PostgreSQL store (DESIGN §10); empty on SQLite.
    #[serde(default)]
    pub replicas: Vec<crate::store::replicas::Replica>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SetAsideItem {
    /// Its name, or how its row is known when the name does not read.
    pub name: String,
    /// Its id as stored.
    pub id: String,
    pub since: String,
    /// Why, in words (names the column; never a secret value).
    pub reason: String,
    pub action: String,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DaemonInfo {
    pub running: bool,
    pub pid: Option<u32>,
    pub ready: bool,
    /// Rotated refresh tokens held in memory because the store would not take them.
    pub unsaved_tokens: usize,
    pub scheduled: usize,
    pub refreshing: usize,
    /// The name of the replica answering, on a PostgreSQL store.
    #[serde(default)]
    pub replica: Option<String>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ActionItem {
    pub name: String,
    pub state: State,
    pub instance: String,
    pub deadline: Option<String>,
    pub action: String,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DeadlineItem {
    pub name: String,
    pub state: State,
    pub deadline: String,
    pub deadline_source: Option<String>,
    pub next_refresh_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, Default)]
pub struct AlertInfo {
    pub undelivered: u64,
    pub channels: Vec<serde_json::Value>,
}

impl Status {
    /// DESIGN §5's exit codes: 3 daemon down, else 1 when a human must act, else 0.
    pub fn exit_code(&self) -> i32 {
        if !self.daemon.running {
            3
        } else if self.needs_action_total > 0 || !self.set_aside.is_empty() {
            1
        } else {
            0
        }
    }
}

/// Reads everything `status` shows from the store.
pub fn gather(
    st: &Store,
    config: &crate::config::Config,
    daemon: DaemonInfo,
    now: Timestamp,
) -> Result<Status, StoreError> {
    let counts_by_state = st.state_counts()?;
    let mut counts = BTreeMap::new();
    for s in State::ALL {
        counts.insert(
            s.as_str().to_string(),
            counts_by_state.get(&s).copied().unwrap_or(0),
        );
    }
    let total = counts.values().sum();
    let (needing, needs_action_total) = st.needing_action(LIST)?;
    let needs_action = needing
        .iter()
        .map(|r| ActionItem {
            name: r.conn.name.clone(),
            state: r.conn.state,
            instance: r.conn.instance.clone(),
            deadline: r.conn.deadline.map(fmt_time),
            action: r
                .conn
                .state
                .action()
                .unwrap_or("")
                .replace("NAME", &r.conn.name),
            last_error: r.conn.last_error.clone(),
        })
        .collect();
    let nearest_deadlines = st
        .nearest_deadlines(LIST)?
        .iter()
        .filter_map(|r: &ConnectionRow| {
            Some(DeadlineItem {
                name: r.conn.name.clone(),
                state: r.conn.state,
                deadline: fmt_time(r.conn.deadline?),
                deadline_source: r.conn.deadline_source.map(|s| s.as_str().to_string()),
                next_refresh_at: r.conn.next_refresh_at.map(fmt_time),
            })
        })
        .collect();
    let set_aside = crate::store::alerts::set_aside(st)?
        .into_iter()
        .map(|a| SetAsideItem {
            name: a.facts.connection,
            id: a.key,
            since: fmt_time(a.since),
            reason: a.facts.summary,
            action: a.facts.action,
        })
        .collect();
    let channels = crate::alerts::channel_health(st, config).unwrap_or_default();
    let alerts = AlertInfo {
        undelivered: channels.iter().map(|c| c.undelivered).sum(),
        channels: channels
            .iter()
            .map(|c| {
                serde_json::json!({
                    "name": c.name,
                    "kind": c.kind.as_str(),
                    "host": c.host,
                    "undelivered": c.undelivered,
                    "failures": c.failures,
                    "retry_at": c.retry_at.map(fmt_time),
                    "last_error": c.last_error,
                    "last_error_at": c.last_error_at.map(fmt_time),
                })
            })
            .collect(),
    };
    Ok(Status {
        daemon,
        store: st.path().display().to_string(),
        total,
        counts,
        needs_action_total,
        needs_action,
        nearest_deadlines,
        set_aside,
        alerts,
        replicas: st.replicas(now)?,
    })
}

/// The JSON of `GET /v1/connections` and `connection list --json`: the
/// connection objects by name, and each row that does not read as
/// `{"id", "name", "fault": {"column", "reason"}}` (name `null` when it does
/// not read either) after them.
pub fn listing(rows: &[ConnectionRow], faults: &[crate::model::Fault]) -> Vec<serde_json::Value> {
    let mut out: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| serde_json::to_value(&r.conn).unwrap_or(serde_json::Value::Null))
        .collect();
    out.extend(faults.iter().map(|f| {
        serde_json::json!({
            "id": f.key,
            "name": f.name,
            "fault": {"column": f.column, "reason": f.describe()},
        })
    }));
    out
}
