//! `acutoken store copy`: a whole store into an empty one, on either
//! engine, in one transaction. Every table is copied row by row as stored:
//! sealed values stay sealed (their associated data is the connection id
//! and column, which the copy keeps), so the key that opens the source
//! opens the copy, and nothing is ever decrypted on the way.

use super::sql::{Transaction, Value};
use super::{Store, StoreError, migrations};

/// Rows per bulk write ([`super::sql::Db::copy_in`]): a COPY of this many on
/// PostgreSQL, INSERTs of 100 rows each on SQLite.
const ROWS_PER_INSERT: usize = 5000;

/// One table as the copy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub name: String,
    pub columns: Vec<String>,
}

/// Every table of the schema, in the order the migrations create them (a
/// table is created after the tables it refers to), with the columns they
/// declare. SQLite's integer key of `events` is left out: the copy's own
/// numbering keeps the order.
pub fn tables() -> Vec<Table> {
    let mut out = Vec::new();
    for sql in migrations::MIGRATIONS {
        let mut rest = *sql;
        while let Some(at) = rest.find("CREATE TABLE ") {
            rest = &rest[at + "CREATE TABLE ".len()..];
            let Some(open) = rest.find('(') else { break };
            let name = rest[..open].trim().to_string();
            let Some(close) = rest.find("\n);") else {
                break;
            };
            let columns = rest[open + 1..close]
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("--"))
                .filter_map(|l| l.split_whitespace().next())
                .filter(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
                .filter(|w| !(name == "events" && *w == "id"))
                .map(str::to_string)
                .collect();
            out.push(Table { name, columns });
            rest = &rest[close..];
        }
    }
    out
}

/// Rows of the tables a copy carries, for its progress bar.
pub fn rows(st: &Store) -> Result<u64, StoreError> {
    let mut n = 0;
    for t in tables() {
        let c: i64 = st
            .db
            .query_row(&format!("SELECT COUNT(*) FROM {}", t.name), (), |r| {
                r.get(0)
            })?;
        n += u64::try_from(c).unwrap_or(0);
    }
    Ok(n)
}

/// True when `st` holds nothing a copy would overwrite: no connection, no
/// history, no alert, and no key but its own.
pub fn is_empty(st: &Store) -> Result<bool, StoreError> {
    for t in tables() {
        let skip = ["meta", "keys"];
        if skip.contains(&t.name.as_str()) {
            continue;
        }
        let any: i64 = st.db.query_row(
            &format!(
                "SELECT COUNT(*) FROM (SELECT 1 FROM {} LIMIT 1) AS t",
                t.name
            ),
            (),
            |r| r.get(0),
        )?;
        if any > 0 {
            return Ok(false);
        }
    }
    let keys: i64 = st.db.query_row(
        "SELECT COUNT(*) FROM keys WHERE key_id <> ?1",
        [st.keyring().primary().id()],
        |r| r.get(0),
    )?;
    Ok(keys == 0)
}

impl Store {
    /// Copies every row of `from` into this store, whose tables must be
    /// empty ([`is_empty`]), in one transaction; `done` hears how many rows
    /// went so far. Returns how many went in all.
    pub fn copy_from(&mut self, from: &Store, done: impl FnMut(u64)) -> Result<u64, StoreError> {
        self.write(|tx, _| copy_into(from, tx, done))
    }
}

/// Copies every row of `from` into `to` (whose tables must be empty) in
/// the transaction `tx` of `to`; `done` hears how many rows went so far.
/// `from` is read in one snapshot.
pub fn copy_into(
    from: &Store,
    tx: &Transaction<'_>,
    mut done: impl FnMut(u64),
) -> Result<u64, StoreError> {
    let snapshot = from.db.unchecked_transaction()?;
    let mut copied = 0u64;
    // The destination's own first rows give way to the source's.
    tx.execute("DELETE FROM keys", ())?;
    tx.execute("DELETE FROM meta WHERE key <> 'data_version'", ())?;
    for t in tables() {
        let cols = t.columns.join(", ");
        let columns: Vec<&str> = t.columns.iter().map(String::as_str).collect();
        let filter = if t.name == "meta" {
            " WHERE key <> 'data_version'"
        } else {
            ""
        };
        let order = if t.name == "events" {
            " ORDER BY id"
        } else {
            ""
        };
        let mut stmt =
            snapshot.prepare(&format!("SELECT {cols} FROM {}{filter}{order}", t.name))?;
        let mut rows = stmt.query(())?;
        let mut batch: Vec<Value> = Vec::with_capacity(ROWS_PER_INSERT * t.columns.len());
        let mut pending = 0usize;
        while let Some(r) = rows.next()? {
            for i in 0..t.columns.len() {
                batch.push(r.get_ref(i)?.into());
            }
            pending += 1;
            if pending == ROWS_PER_INSERT {
                tx.copy_in(&t.name, &columns, &batch)?;
                copied += pending as u64;
                done(copied);
                batch.clear();
                pending = 0;
            }
        }
        if pending > 0 {
            tx.copy_in(&t.name, &columns, &batch)?;
            copied += pending as u64;
            done(copied);
        }
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_and_column_of_the_schema_is_copied() {
        let t = tables();
        let names: Vec<&str> = t.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "meta",
                "keys",
                "connections",
                "tombstones",
                "events",
                "authorizations",
                "alerts",
                "alert_deliveries",
                "alert_channels",
                "alert_groups"
            ]
        );
        let conn = &t[2];
        assert_eq!(conn.columns.len(), 32, "{:?}", conn.columns);
        assert_eq!(conn.columns.first().map(String::as_str), Some("id"));
        assert_eq!(conn.columns.last().map(String::as_str), Some("created_at"));
        assert_eq!(t[4].columns, ["connection_id", "at", "event", "detail"]);
        let deliveries = &t[7];
        assert!(
            !deliveries.columns.iter().any(|c| c == "primary"),
            "{deliveries:?}"
        );
        assert_eq!(deliveries.columns.len(), 6);
    }

    fn filled(target: &crate::config::StoreTarget, key: &crate::crypto::Key) -> Store {
        use crate::model::{AlertFacts, AlertKind, Severity};
        let mut st = crate::store::testing::open(
            target,
            crate::crypto::Keyring::new(key.clone(), vec![]),
            crate::store::Create::Yes,
        )
        .unwrap();
        let news: Vec<_> = (0..230)
            .map(crate::store::connections::tests::new_connection)
            .collect();
        let now = chrono::Utc::now();
        st.write(|tx, kr| {
            crate::store::connections::insert_many(tx, kr, &news, now)?;
            for n in news.iter().take(3) {
                crate::store::events::record(tx, n.conn.id, now, "refreshed", "by the test")?;
            }
            crate::store::alerts::raise(
                tx,
                &AlertFacts::global(AlertKind::Test, Severity::Critical, "copied", "look"),
                now,
            )
        })
        .unwrap();
        st
    }

    /// Every table's rows as text, in a fixed order, for comparing stores.
    fn dump(st: &Store) -> Vec<(String, Vec<String>)> {
        tables()
            .into_iter()
            .map(|t| {
                let cols = t.columns.join(", ");
                let filter = if t.name == "meta" {
                    " WHERE key <> 'data_version'"
                } else {
                    ""
                };
                let mut stmt = st
                    .db
                    .prepare(&format!("SELECT {cols} FROM {}{filter}", t.name))
                    .unwrap();
                let mut rows = stmt.query(()).unwrap();
                let mut out = Vec::new();
                while let Some(r) = rows.next().unwrap() {
                    let vals: Vec<String> = (0..t.columns.len())
                        .map(|i| format!("{:?}", Value::from(r.get_ref(i).unwrap())))
                        .collect();
                    out.push(vals.join("|"));
                }
                out.sort();
                (t.name, out)
            })
            .collect()
    }

    /// SQLite to PostgreSQL and back: every row of every table arrives as
    /// it was (sealed values byte for byte), the copy opens with the same
    /// key, and a second copy into the now full database is refused.
    #[test]
    fn a_store_goes_to_postgres_and_back_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::crypto::Key::generate();
        let a = filled(
            &crate::config::StoreTarget::File(dir.path().join("a.db")),
            &key,
        );
        let shared = a.shared_keyring().clone();
        let pg = crate::store::testing::postgres_target();
        let mut b = Store::open_target(&pg, &shared, crate::store::Create::Yes).unwrap();
        assert!(is_empty(&b).unwrap());
        let n = b.write(|tx, _| copy_into(&a, tx, |_| {})).unwrap();
        assert_eq!(n, rows(&a).unwrap());
        assert!(n > 230, "{n}");
        let c_path = crate::config::StoreTarget::File(dir.path().join("c.db"));
        let mut c = Store::open_target(&c_path, &shared, crate::store::Create::Yes).unwrap();
        c.write(|tx, _| copy_into(&b, tx, |_| {})).unwrap();
        let (da, db, dc) = (dump(&a), dump(&b), dump(&c));
        assert_eq!(da, db, "SQLite to PostgreSQL");
        assert_eq!(da, dc, "and back");
        assert!(!is_empty(&b).unwrap(), "a full store is not a destination");
        // A new key sees nothing; the copy's own key opens every secret.
        let names = c.names().unwrap();
        assert_eq!(names.len(), 230);
        let row = c.get("c0002").unwrap();
        assert_eq!(
            c.secret(row.conn.id, crate::store::SecretColumn::ClientSecret)
                .unwrap()
                .unwrap()
                .expose(),
            "secret-2"
        );
    }

    /// The tables as SQLite has them: every column the copy names exists,
    /// and none is left behind (rowid aside, which every SQLite table has).
    #[test]
    fn the_parsed_columns_are_the_tables_columns() {
        let dir = tempfile::tempdir().unwrap();
        let st = crate::store::testing::open(
            &crate::config::StoreTarget::File(dir.path().join("a.db")),
            crate::crypto::Keyring::new(crate::crypto::Key::generate(), vec![]),
            crate::store::Create::Yes,
        )
        .unwrap();
        let db = st.db.as_sqlite().unwrap();
        for t in tables() {
            let declared: Vec<String> = db
                .prepare(&format!("SELECT * FROM {}", t.name))
                .unwrap()
                .column_names()
                .into_iter()
                .map(str::to_string)
                .filter(|c| !(t.name == "events" && c == "id"))
                .collect();
            assert_eq!(declared, t.columns, "{}", t.name);
        }
    }
}
