//! Reading and checking the records of an import file: on every core, in
//! file order, naming every bad record without quoting a secret.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use serde::Deserialize;

use crate::cli::connection::Spec;
use crate::config::Config;
use crate::model::NewConnection;
use crate::model::Timestamp;
use crate::secret::Secret;

/// Records per chunk: the unit of checking, sealing and writing.
const CHUNK: usize = 1000;

/// One record of `connection import`. The secrets are read as any JSON value
/// so that a mistyped one (a number, an object) is refused without serde
/// quoting it in the error.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    name: String,
    instance: String,
    client_id: String,
    client_secret: Option<serde_json::Value>,
    refresh_token: Option<serde_json::Value>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    secret_expires_at: Option<String>,
    grant_issued_at: Option<String>,
    refresh_token_issued_at: Option<String>,
    mode: Option<String>,
    lifetime: Option<String>,
    absolute_lifetime: Option<String>,
}

/// The records of an import file that passed every check, and what is wrong
/// with the others.
pub struct ParsedImport {
    /// Valid records with their 1-based position in the file, in file order.
    pub records: Vec<(usize, NewConnection)>,
    /// `(position, message)` for each invalid record; messages are one line,
    /// free of control characters, and never quote a secret.
    pub problems: Vec<(usize, String)>,
}

/// The file is not a JSON array of objects at all: nothing can be imported.
/// The caller shows the position and asks for a fixed file.
#[derive(Debug, thiserror::Error)]
#[error("not a JSON array of connection objects (line {line}, column {column})")]
pub struct ImportSyntax {
    /// 1-based line of the first syntax error.
    pub line: usize,
    /// 1-based column of the first syntax error.
    pub column: usize,
}

/// Parses and checks the text of a `connection import` file against `config`'s
/// defaults at `now`, without touching a store. Duplicate names within the file
/// are problems; names already in a store are the caller's to check.
pub fn parse_import(
    text: &str,
    config: &Config,
    now: Timestamp,
) -> Result<ParsedImport, ImportSyntax> {
    let mut records = Vec::new();
    let problems = check_records(text, config, now, &HashSet::new(), |good, _| {
        records.extend(good);
        true
    })?;
    Ok(ParsedImport { records, problems })
}

/// Checks every record of `text` on every core and hands the good ones to
/// `sink` in file order, a chunk at a time, each with a fresh id; returns
/// the problems, in file order. `sink` also learns how many problems were
/// found so far, and returns `false` to stop the checking early.
///
/// Records keep their place even when others are bad; names in `existing`
/// or seen earlier in the file are problems. The ids are random (version
/// 4) and ascend in file order, so rows written in file order append to
/// the indexes keyed by id instead of touching a random page of each.
pub(super) fn check_records(
    text: &str,
    config: &Config,
    now: Timestamp,
    existing: &HashSet<String>,
    mut sink: impl FnMut(Vec<(usize, NewConnection)>, usize) -> bool,
) -> Result<Vec<(usize, String)>, ImportSyntax> {
    // Each record stays a slice of `text` until it is checked, so a large
    // file is never held as a tree of JSON values: 1M records is a 360 MB
    // file.
    let raws: Vec<&serde_json::value::RawValue> =
        serde_json::from_str(text).map_err(|e| ImportSyntax {
            line: e.line(),
            column: e.column(),
        })?;
    let mut ids: Vec<uuid::Uuid> = {
        let mut rng = rand::thread_rng();
        (0..raws.len())
            .map(|_| uuid::Builder::from_random_bytes(rand::Rng::r#gen(&mut rng)).into_uuid())
            .collect()
    };
    ids.sort_unstable();
    let mut ids = ids.into_iter();
    let chunks = raws.len().div_ceil(CHUNK);
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8)
        .min(chunks.max(1));
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    type Checked = Vec<(usize, Result<NewConnection, String>)>;
    Ok(std::thread::scope(|s| {
        let (checked_tx, checked_rx) = mpsc::sync_channel::<(usize, Checked)>(2 * workers);
        for _ in 0..workers {
            let (checked_tx, raws, next, stop) = (checked_tx.clone(), &raws, &next, &stop);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= chunks {
                        break;
                    }
                    let part = &raws[k * CHUNK..raws.len().min((k + 1) * CHUNK)];
                    let checked = part
                        .iter()
                        .enumerate()
                        .map(|(i, raw)| {
                            let pos = k * CHUNK + i + 1;
                            (pos, check_record(raw.get(), pos, config, now))
                        })
                        .collect();
                    if checked_tx.send((k, checked)).is_err() {
                        break; // the sink stopped
                    }
                }
            });
        }
        drop(checked_tx);
        // Chunks arrive in any order; at most a few wait for an earlier one,
        // since every thread takes the next chunk in file order.
        let mut early = BTreeMap::new();
        let mut expect = 0;
        let mut problems = Vec::new();
        let mut seen = HashSet::with_capacity(raws.len());
        for (k, checked) in checked_rx {
            early.insert(k, checked);
            while let Some(checked) = early.remove(&expect) {
                expect += 1;
                let mut good = Vec::with_capacity(checked.len());
                for (pos, checked) in checked {
                    let mut new = match checked {
                        Ok(new) => new,
                        Err(p) => {
                            problems.push((pos, p));
                            continue;
                        }
                    };
                    let name = &new.conn.name;
                    let why = if existing.contains(name) {
                        "a connection by that name already exists"
                    } else if !seen.insert(name.clone()) {
                        "the name appears twice in the file"
                    } else {
                        new.conn.id = ids.next().expect("one id per record");
                        good.push((pos, new));
                        continue;
                    };
                    problems.push((pos, format!("record {pos} (`{name}`): {why}")));
                }
                if !sink(good, problems.len()) {
                    stop.store(true, Ordering::Relaxed);
                    return problems;
                }
            }
        }
        problems
    }))
}

/// Checks one record, given as its JSON text; the error is the problem line.
fn check_record(
    raw: &str,
    pos: usize,
    config: &Config,
    now: Timestamp,
) -> Result<NewConnection, String> {
    let label = || {
        serde_json::from_str::<serde_json::Value>(raw)
            .ok()
            .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(str::to_owned))
            .map(|n| format!("record {pos} (`{}`)", printable(&n)))
            .unwrap_or_else(|| format!("record {pos}"))
    };
    let rec: Record = match serde_json::from_str(raw) {
        Ok(r) => r,
        // The message comes from the parsed value, so it carries no position
        // inside the record (which would move with a secret's length), and
        // a repeated key counts as its last value, as it always has.
        Err(_) => {
            let v: serde_json::Value =
                serde_json::from_str(raw).map_err(|e| format!("{}: {e}", label()))?;
            serde_json::from_value(v)
                .map_err(|e| format!("{}: {}", label(), printable(&scrub(&e.to_string()))))?
        }
    };
    let spec = Spec {
        name: rec.name,
        instance: rec.instance,
        client_id: rec.client_id,
        labels: rec.labels,
        mode: rec.mode,
        lifetime: rec.lifetime,
        absolute_lifetime: rec.absolute_lifetime,
        secret_expires_at: rec.secret_expires_at,
        grant_issued_at: rec.grant_issued_at,
        refresh_token_issued_at: rec.refresh_token_issued_at,
    };
    let secret = secret_field(rec.client_secret, "client_secret")
        .map_err(|e| format!("{}: {e}", label()))?
        .ok_or_else(|| format!("{}: client_secret is missing", label()))?;
    let rt = secret_field(rec.refresh_token, "refresh_token")
        .map_err(|e| format!("{}: {e}", label()))?;
    let conn = spec
        .build(uuid::Uuid::nil(), config, now, rt.is_some())
        .map_err(|e| format!("{}: {}", label(), printable(&format!("{e:#}"))))?;
    Ok(NewConnection {
        conn,
        client_secret: Some(secret),
        refresh_token: rt,
    })
}

/// A secret field: a non-blank string, or absent (`null` and blank count as
/// absent). Any other JSON type is refused without showing the value.
fn secret_field(v: Option<serde_json::Value>, field: &str) -> Result<Option<Secret>, String> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(Secret::new(s))),
        Some(_) => Err(format!("{field} must be a string")),
    }
}

/// Escapes control characters so one record's text cannot break the listing
/// into lines or send escape sequences to the terminal.
fn printable(s: &str) -> String {
    if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect()
    } else {
        s.to_string()
    }
}

/// Removes quoted values from serde messages so a mistyped secret is never echoed.
fn scrub(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut quoted = false;
    for ch in msg.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                if quoted {
                    out.push_str("\"…\"");
                }
            }
            _ if quoted => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        chrono::DateTime::from_timestamp(1_780_000_000, 0).unwrap()
    }

    #[test]
    fn a_secret_of_the_wrong_type_is_refused_without_being_shown() {
        let text = r#"[{"name":"a","instance":"a.com","client_id":"X@T","client_secret":987654321},
                       {"name":"b","instance":"b.com","client_id":"X@T","client_secret":"s","refresh_token":[4242424242]}]"#;
        let p = parse_import(text, &Config::default(), now()).unwrap();
        assert!(p.records.is_empty());
        assert_eq!(
            p.problems,
            vec![
                (
                    1,
                    "record 1 (`a`): client_secret must be a string".to_string()
                ),
                (
                    2,
                    "record 2 (`b`): refresh_token must be a string".to_string()
                ),
            ]
        );
    }

    #[test]
    fn problems_are_one_line_without_control_characters() {
        let text = r#"[{"name":"x\u001b[2J\ny","instance":"a\tb.com","client_id":"X@T","client_secret":"s"},
                       {"name":"ok","instance":"c\u0007.com","client_id":"X@T","client_secret":"s"}]"#;
        let p = parse_import(text, &Config::default(), now()).unwrap();
        assert_eq!(p.problems.len(), 2);
        for (_, m) in &p.problems {
            assert!(!m.chars().any(char::is_control), "{m:?}");
        }
        assert!(
            p.problems[0].1.starts_with("record 1 (`x\\u{1b}[2J\\ny`)"),
            "{:?}",
            p.problems[0].1
        );
    }

    #[test]
    fn good_records_keep_their_positions_and_blank_tokens_count_as_absent() {
        let text = r#"[{"name":"a","instance":"https://a.com/Main","client_id":"X@T","client_secret":"s","refresh_token":"  "},
                       {"name":"a","instance":"b.com","client_id":"X@T","client_secret":"s"},
                       {"name":"c","instance":"c.com","client_id":"X@T","client_secret":"s","refresh_token":"rt"}]"#;
        let p = parse_import(text, &Config::default(), now()).unwrap();
        let pos: Vec<usize> = p.records.iter().map(|(i, _)| *i).collect();
        assert_eq!(pos, [1, 3]);
        assert!(p.records[0].1.refresh_token.is_none());
        assert_eq!(p.records[0].1.conn.instance, "a.com");
        assert_eq!(
            p.problems,
            vec![(
                2,
                "record 2 (`a`): the name appears twice in the file".to_string()
            )]
        );
        assert!(parse_import("{}", &Config::default(), now()).is_err());
    }

    /// More records than one checking thread takes, some invalid: positions
    /// and problems stay in file order, and the fresh ids are distinct, random
    /// (version 4) and ascend in file order.
    #[test]
    fn records_checked_in_parallel_keep_file_order_and_get_ascending_ids() {
        let n = 5000;
        let records: Vec<String> = (0..n)
            .map(|i| {
                let instance = if i % 997 == 0 { "ftp://x" } else { "erp.example.com" };
                format!(
                    r#"{{"name":"c{i}","instance":"{instance}","client_id":"X@T","client_secret":"s{i}"}}"#
                )
            })
            .collect();
        let text = format!("[{}]", records.join(",\n"));
        let p = parse_import(&text, &Config::default(), now()).unwrap();
        let bad: Vec<usize> = p.problems.iter().map(|(pos, _)| *pos).collect();
        let want_bad: Vec<usize> = (0..n).filter(|i| i % 997 == 0).map(|i| i + 1).collect();
        assert_eq!(bad, want_bad);
        let pos: Vec<usize> = p.records.iter().map(|(pos, _)| *pos).collect();
        let want: Vec<usize> = (0..n).filter(|i| i % 997 != 0).map(|i| i + 1).collect();
        assert_eq!(pos, want);
        for (pos, rec) in &p.records {
            assert_eq!(rec.conn.name, format!("c{}", pos - 1));
            assert_eq!(rec.conn.id.get_version_num(), 4);
        }
        assert!(
            p.records
                .windows(2)
                .all(|w| w[0].1.conn.id < w[1].1.conn.id)
        );
    }
}
