//! Reading the outbox for others: the digest's numbers, metrics' counts,
//! the connections set aside (status, `connection list`), and which
//! connections have firing alerts (start-up).

use std::collections::BTreeMap;

use crate::store::sql::Db;

use super::parse_facts;
use crate::model::{AlertFacts, AlertKind, State, Timestamp};
use crate::store::Store;
use crate::store::{StoreError, from_ms};

/// True when a `connection_faulty` alert fires under `key` (one indexed read).
pub fn faulty_fires(st: &Store, key: &str) -> Result<bool, StoreError> {
    let db = st.db();
    Ok(db
        .prepare_cached(
            "SELECT 1 FROM alerts WHERE key = ?1 AND kind = 'connection_faulty' AND status = 'firing'",
        )?
        .exists([key])?)
}

/// One connection set aside, as its firing `connection_faulty` alert says.
#[derive(Debug, Clone, PartialEq)]
pub struct SetAside {
    /// The key it is filed under (its id as stored).
    pub key: String,
    /// What the alert says (its summary names the reason).
    pub facts: AlertFacts,
    /// Since when.
    pub since: Timestamp,
}

/// Every connection set aside (firing `connection_faulty`), by name.
pub fn set_aside(st: &Store) -> Result<Vec<SetAside>, StoreError> {
    let db = st.db();
    let mut stmt = db.prepare_cached(
        "SELECT key, facts, started_at FROM alerts
         WHERE kind = 'connection_faulty' AND status = 'firing'",
    )?;
    let rows = stmt
        .query_map((), |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = rows
        .into_iter()
        .map(|(key, facts, since)| {
            Ok(SetAside {
                key,
                facts: parse_facts(&facts)?,
                since: from_ms(since),
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    out.sort_by(|a, b| a.facts.connection.cmp(&b.facts.connection));
    Ok(out)
}

/// Connection ids that have a firing alert (for re-evaluation at start).
pub fn firing_connection_ids(st: &Store) -> Result<Vec<String>, StoreError> {
    let db = st.db();
    let mut stmt = db.prepare(
        "SELECT DISTINCT key FROM alerts WHERE status = 'firing' AND key <> '-' ORDER BY key",
    )?;
    let rows = stmt.query_map((), |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Firing alerts per kind.
pub fn firing_counts(st: &Store) -> Result<BTreeMap<AlertKind, u64>, StoreError> {
    let db = st.db();
    let mut stmt =
        db.prepare("SELECT kind, COUNT(*) FROM alerts WHERE status = 'firing' GROUP BY kind")?;
    let mut out = BTreeMap::new();
    let mut rows = stmt.query(())?;
    while let Some(r) = rows.next()? {
        let kind: String = r.get(0)?;
        if let Ok(k) = kind.parse::<AlertKind>() {
            out.insert(k, r.get::<_, i64>(1)?.max(0) as u64);
        }
    }
    Ok(out)
}

/// One connection as the digest lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct DigestEntry {
    /// Its name.
    pub name: String,
    /// Its instance.
    pub instance: String,
    /// Its state.
    pub state: State,
    /// Its refresh token's deadline.
    pub deadline: Option<Timestamp>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

/// What the digest summarises.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DigestData {
    /// Connections per state.
    pub counts: BTreeMap<State, u64>,
    /// Connections waiting for a person, nearest deadline first (at most the limit).
    pub must_act: Vec<DigestEntry>,
    /// How many connections wait for a person in all.
    pub must_act_total: u64,
    /// Active or retrying connections with the nearest deadlines.
    pub nearest: Vec<DigestEntry>,
    /// Firing alerts per kind.
    pub firing: BTreeMap<AlertKind, u64>,
}

fn digest_entries(db: &Db, sql: &str, limit: usize) -> Result<Vec<DigestEntry>, StoreError> {
    let mut stmt = db.prepare(sql)?;
    let mut rows = stmt.query([limit as i64])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        // A row that does not read is left out: it has its own alert.
        let entry = || -> Option<DigestEntry> {
            Some(DigestEntry {
                name: r.get(0).ok()?,
                instance: r.get(1).ok()?,
                state: r.get::<_, String>(2).ok()?.parse().ok()?,
                deadline: r.get::<_, Option<i64>>(3).ok()?.map(from_ms),
                labels: serde_json::from_str(&r.get::<_, String>(4).ok()?).ok()?,
            })
        };
        if let Some(e) = entry() {
            out.push(e);
        }
    }
    Ok(out)
}

/// The digest's numbers, with at most `limit` connections per list.
pub fn digest_data(st: &Store, limit: usize) -> Result<DigestData, StoreError> {
    let db = st.db();
    let mut counts = BTreeMap::new();
    {
        let mut stmt = db.prepare("SELECT state, COUNT(*) FROM connections GROUP BY state")?;
        let mut rows = stmt.query(())?;
        while let Some(r) = rows.next()? {
            let s: String = r.get(0)?;
            if let Ok(st) = s.parse::<State>() {
                counts.insert(st, r.get::<_, i64>(1)?.max(0) as u64);
            }
        }
    }
    const HUMAN: &str = "('needs_secret', 'needs_reauthorization', 'pending_authorization')";
    let must_act = digest_entries(
        db,
        &format!(
            "SELECT name, instance, state, deadline, labels FROM connections
             WHERE state IN {HUMAN} ORDER BY deadline IS NULL, deadline, name LIMIT ?1"
        ),
        limit,
    )?;
    let must_act_total: i64 = db.query_row(
        &format!("SELECT COUNT(*) FROM connections WHERE state IN {HUMAN}"),
        (),
        |r| r.get(0),
    )?;
    let nearest = digest_entries(
        db,
        "SELECT name, instance, state, deadline, labels FROM connections
         WHERE state IN ('active', 'retrying') AND deadline IS NOT NULL
         ORDER BY deadline, name LIMIT ?1",
        limit,
    )?;
    Ok(DigestData {
        counts,
        must_act,
        must_act_total: must_act_total.max(0) as u64,
        nearest,
        firing: firing_counts(st)?,
    })
}

/// Messages each channel has accepted, counting repeats (metrics).
pub fn delivered_counts(st: &Store) -> Result<BTreeMap<String, u64>, StoreError> {
    let db = st.db();
    let mut stmt = db.prepare(
        "SELECT channel, CAST(SUM(sends) AS BIGINT) FROM alert_deliveries GROUP BY channel",
    )?;
    let rows = stmt.query_map((), |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    let mut out = BTreeMap::new();
    for r in rows {
        let (c, n) = r?;
        out.insert(c, n.max(0) as u64);
    }
    Ok(out)
}
