//! Decoding connection rows: each column checked, and a value that does not
//! decode turned into a [`Fault`] naming its column.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::store::sql::Row;
use uuid::Uuid;

use super::COLUMNS;
use crate::model::{Connection, ConnectionRow, DeadlineSource, Fault, Mode, State, Timestamp};
use crate::store::from_ms;

fn opt_ms(v: Option<i64>) -> Option<Timestamp> {
    v.map(from_ms)
}

/// The column a select list names at index `i`: its first word
/// (`client_secret IS NOT NULL` names `client_secret`). Faults name their
/// column from the query itself, so the two cannot drift apart.
fn column_at(select: &'static str, i: usize) -> Option<&'static str> {
    select.split(',').nth(i)?.split_whitespace().next()
}

/// A plain value quoted in a fault: short, and printable.
fn quote(v: rusqlite::types::ValueRef<'_>) -> String {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Null => "NULL".into(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => f.to_string(),
        ValueRef::Text(t) => format!("{:?}", crate::model::clip(&String::from_utf8_lossy(t), 40)),
        ValueRef::Blob(b) => format!("a {}-byte blob", b.len()),
    }
}

/// Reads the columns of one row, turning any value that does not decode
/// into a [`Fault`] naming its column.
struct Decoder<'a, 'r> {
    r: &'a Row<'r>,
    /// Index of the rowid column in this query.
    rowid_at: usize,
    /// This query's select list.
    select: &'static str,
}

impl Decoder<'_, '_> {
    fn fault(&self, i: usize, reason: String) -> Fault {
        let id_text = match self.r.get_ref(0) {
            Ok(rusqlite::types::ValueRef::Text(t)) => String::from_utf8_lossy(t).into_owned(),
            Ok(v) => quote(v),
            Err(_) => String::new(),
        };
        Fault {
            rowid: self.r.get(self.rowid_at).unwrap_or(0),
            id: Uuid::parse_str(&id_text).ok(),
            key: id_text,
            name: (0..=self.rowid_at)
                .position(|k| column_at(self.select, k) == Some("name"))
                .and_then(|k| self.r.get::<_, String>(k).ok()),
            column: column_at(self.select, i).unwrap_or("?"),
            reason,
        }
    }

    fn get<T: rusqlite::types::FromSql>(&self, i: usize) -> Result<T, Fault> {
        self.r.get(i).map_err(|_| {
            let v = self.r.get_ref(i).map(quote).unwrap_or_default();
            self.fault(i, format!("holds {v}, which is not of its type"))
        })
    }

    fn text(&self, i: usize) -> Result<&str, Fault> {
        match self.r.get_ref(i) {
            Ok(v) => v
                .as_str()
                .map_err(|_| self.fault(i, format!("holds {}, which is not text", quote(v)))),
            Err(_) => Err(self.fault(i, "is missing".into())),
        }
    }

    fn parse<T: std::str::FromStr>(&self, i: usize) -> Result<T, Fault> {
        let s = self.text(i)?;
        s.parse().map_err(|_| {
            self.fault(
                i,
                format!(
                    "holds {}, which is not a known value",
                    quote(rusqlite::types::ValueRef::Text(s.as_bytes()))
                ),
            )
        })
    }

    fn opt_parse<T: std::str::FromStr>(&self, i: usize) -> Result<Option<T>, Fault> {
        match self.r.get_ref(i) {
            Ok(rusqlite::types::ValueRef::Null) => Ok(None),
            _ => self.parse(i).map(Some),
        }
    }

    fn id(&self) -> Result<Uuid, Fault> {
        self.parse(0)
    }

    fn seconds(&self, i: usize) -> Result<Duration, Fault> {
        let s: i64 = self.get(i)?;
        Ok(Duration::from_secs(s.max(0) as u64))
    }

    fn opt_seconds(&self, i: usize) -> Result<Option<Duration>, Fault> {
        let s: Option<i64> = self.get(i)?;
        Ok(s.map(|s| Duration::from_secs(s.max(0) as u64)))
    }

    fn time(&self, i: usize) -> Result<Option<Timestamp>, Fault> {
        Ok(opt_ms(self.get(i)?))
    }

    fn claim(&self, owner: usize) -> Result<Option<(String, Timestamp)>, Fault> {
        let o: Option<String> = self.get(owner)?;
        let e: Option<i64> = self.get(owner + 1)?;
        Ok(match (o, e) {
            (Some(o), Some(e)) => Some((o, from_ms(e))),
            _ => None,
        })
    }
}

/// Decodes a row of `SELECT {COLUMNS}`; a value that does not decode is a [`Fault`].
pub(crate) fn decode(r: &Row<'_>) -> Result<ConnectionRow, Fault> {
    let d = Decoder {
        r,
        rowid_at: 30,
        select: COLUMNS,
    };
    let labels = d.text(4)?;
    Ok(ConnectionRow {
        conn: Connection {
            id: d.id()?,
            name: d.get(1)?,
            instance: d.get(2)?,
            client_id: d.get(3)?,
            labels: serde_json::from_str(labels)
                .map_err(|e| d.fault(4, format!("is not a JSON object of strings ({e})")))?,
            mode: d.parse::<Mode>(5)?,
            lifetime: d.seconds(6)?,
            absolute_lifetime: d.opt_seconds(7)?,
            secret_expires_at: d.time(8)?,
            grant_issued_at: d.time(9)?,
            refresh_token_issued_at: d.time(10)?,
            access_expires_at: d.time(11)?,
            deadline: d.time(12)?,
            deadline_source: d.opt_parse::<DeadlineSource>(13)?,
            next_refresh_at: d.time(14)?,
            last_refresh_at: d.time(15)?,
            last_error: d.get(16)?,
            state: d.parse::<State>(17)?,
        },
        failures: d.get::<i64>(18)?.clamp(0, u32::MAX as i64) as u32,
        failing_since: d.time(19)?,
        outcome_unknown: d.get::<i64>(20)? != 0,
        has_client_secret: d.get(21)?,
        has_refresh_token: d.get(22)?,
        has_access_token: d.get(23)?,
        token_type: d.get(24)?,
        access_lifetime: d.opt_seconds(25)?,
        claim: d.claim(26)?,
        version: d.get(28)?,
        change_seq: d.get(29)?,
    })
}

/// [`decode`] for rusqlite's row mappers: a fault becomes a conversion error
/// carrying its description. Reads that can set a row aside use [`decode`].
pub(crate) fn from_row(r: &Row<'_>) -> rusqlite::Result<ConnectionRow> {
    decode(r).map_err(|f| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            f.to_string().into(),
        )
    })
}

/// The select list of [`Store::each_for_planning`].
pub(super) const PLANNING_COLUMNS: &str = "id, instance, mode, lifetime_s, absolute_lifetime_s,
    secret_expires_at, grant_issued_at, refresh_token_issued_at, access_expires_at, deadline,
    deadline_source, next_refresh_at, last_refresh_at, state, failures, failing_since,
    outcome_unknown, claim_owner, claim_expires_at, version, change_seq, name, client_id,
    labels, last_error, rowid";

/// See [`Store::each_for_planning`]. The checks are those of [`decode`]:
/// a row that plans also reads whole. Name, client ID, labels and last
/// error are checked but not kept (borrowed, so a million rows allocate
/// only their labels' small maps).
pub(super) fn planning_row(r: &Row<'_>) -> Result<ConnectionRow, Fault> {
    let d = Decoder {
        r,
        rowid_at: 25,
        select: PLANNING_COLUMNS,
    };
    d.text(21)?;
    d.text(22)?;
    let labels = d.text(23)?;
    serde_json::from_str::<BTreeMap<std::borrow::Cow<'_, str>, std::borrow::Cow<'_, str>>>(labels)
        .map_err(|e| d.fault(23, format!("is not a JSON object of strings ({e})")))?;
    if !matches!(r.get_ref(24), Ok(rusqlite::types::ValueRef::Null)) {
        d.text(24)?;
    }
    Ok(ConnectionRow {
        conn: Connection {
            id: d.id()?,
            name: String::new(),
            instance: d.get(1)?,
            client_id: String::new(),
            labels: BTreeMap::new(),
            mode: d.parse::<Mode>(2)?,
            lifetime: d.seconds(3)?,
            absolute_lifetime: d.opt_seconds(4)?,
            secret_expires_at: d.time(5)?,
            grant_issued_at: d.time(6)?,
            refresh_token_issued_at: d.time(7)?,
            access_expires_at: d.time(8)?,
            deadline: d.time(9)?,
            deadline_source: d.opt_parse::<DeadlineSource>(10)?,
            next_refresh_at: d.time(11)?,
            last_refresh_at: d.time(12)?,
            last_error: None,
            state: d.parse::<State>(13)?,
        },
        failures: d.get::<i64>(14)?.clamp(0, u32::MAX as i64) as u32,
        failing_since: d.time(15)?,
        outcome_unknown: d.get::<i64>(16)? != 0,
        has_client_secret: false,
        has_refresh_token: false,
        has_access_token: false,
        token_type: None,
        access_lifetime: None,
        claim: d.claim(17)?,
        version: d.get(19)?,
        change_seq: d.get(20)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_name_columns_from_the_select_lists() {
        assert_eq!(column_at(COLUMNS, 0), Some("id"));
        assert_eq!(column_at(COLUMNS, 17), Some("state"));
        assert_eq!(column_at(COLUMNS, 21), Some("client_secret"));
        assert_eq!(column_at(COLUMNS, 30), Some("rowid"), "decode's rowid_at");
        assert_eq!(column_at(PLANNING_COLUMNS, 13), Some("state"));
        assert_eq!(column_at(PLANNING_COLUMNS, 23), Some("labels"));
        assert_eq!(
            column_at(PLANNING_COLUMNS, 25),
            Some("rowid"),
            "planning_row's rowid_at"
        );
        assert_eq!(column_at(COLUMNS, 31), None);
    }
}
