//! `acutoken connection ...`: add, import, inspect and edit connections.

use std::collections::{BTreeMap, HashSet};
use std::io::IsTerminal;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use serde::Deserialize;

use super::Ctx;
use super::args::{ConnectionCommand, PlanArgs};
use super::io::{confirm, or_dash, print_table, read_secret};
use crate::acumatica::instance;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::model::{
    self, Connection, Mode, State, Timestamp, fmt_time, parse_date, parse_duration, parse_time,
};
use crate::renewal::{self, planning};
use crate::secret::Secret;
use crate::store::connections::{self, ConnectionRow, NewConnection, Sealed, SecretColumn};
use crate::store::{Create, Store, StoreError, authorizations, events};

pub async fn run(explicit: Option<&Path>, cmd: ConnectionCommand) -> anyhow::Result<i32> {
    let ctx = Ctx::load(explicit)?;
    let now = SystemClock.now();
    match cmd {
        ConnectionCommand::Add {
            name,
            instance,
            client_id,
            plan,
            client_secret_file,
            refresh_token_file,
            grant_issued_at,
            refresh_token_issued_at,
        } => {
            let spec = Spec {
                name,
                instance,
                client_id,
                labels: plan
                    .labels
                    .iter()
                    .map(|l| model::parse_label(l))
                    .collect::<Result<_, _>>()
                    .map_err(anyhow::Error::msg)?,
                mode: plan.mode,
                lifetime: plan.lifetime,
                absolute_lifetime: plan.absolute_lifetime,
                secret_expires_at: plan.secret_expires,
                grant_issued_at,
                refresh_token_issued_at,
            };
            // Check everything the arguments say before reading secrets or touching the store.
            spec.build(
                uuid::Uuid::nil(),
                &ctx.config,
                now,
                refresh_token_file.is_some(),
            )?;
            let client_secret = read_secret(
                client_secret_file.as_deref(),
                "client secret",
                "--client-secret-file",
            )?;
            let refresh_token = refresh_token_file
                .as_deref()
                .map(|f| read_secret(Some(f), "refresh token", "--refresh-token-file"))
                .transpose()?;
            let conn = spec.build(
                uuid::Uuid::new_v4(),
                &ctx.config,
                now,
                refresh_token.is_some(),
            )?;
            let mut st = ctx.open_store(Create::Yes)?;
            let new = NewConnection {
                conn,
                client_secret: Some(client_secret),
                refresh_token,
            };
            st.write(|tx, kr| {
                connections::insert(tx, kr, &new, now)?;
                events::record(
                    tx,
                    new.conn.id,
                    now,
                    "added",
                    &format!("state {}", new.conn.state),
                )
            })?;
            let c = &new.conn;
            println!(
                "added connection {} (instance {}, state {})",
                c.name, c.instance, c.state
            );
            match c.state {
                State::PendingAuthorization => println!(
                    "next: send the customer the link from `acutoken connection authorize {}`",
                    c.name
                ),
                State::Active => println!(
                    "next refresh {}; deadline {} ({})",
                    c.next_refresh_at.map(fmt_time).unwrap_or_default(),
                    c.deadline.map(fmt_time).unwrap_or_default(),
                    c.deadline_source.map(|s| s.as_str()).unwrap_or("unknown")
                ),
                _ => {}
            }
            Ok(0)
        }
        ConnectionCommand::Import { file } => import(&ctx, &file, now),
        ConnectionCommand::List { json } => {
            let st = ctx.open_store(Create::No)?;
            let rows = st.list()?;
            if json {
                let conns: Vec<&Connection> = rows.iter().map(|r| &r.conn).collect();
                println!("{}", serde_json::to_string_pretty(&conns)?);
            } else if rows.is_empty() {
                println!("no connections (add one with `acutoken connection add`)");
            } else {
                let mut table = vec![vec![
                    "NAME".into(),
                    "STATE".into(),
                    "INSTANCE".into(),
                    "DEADLINE".into(),
                    "NEXT REFRESH".into(),
                    "LAST ERROR".into(),
                ]];
                for r in &rows {
                    let c = &r.conn;
                    table.push(vec![
                        c.name.clone(),
                        c.state.to_string(),
                        c.instance.clone(),
                        or_dash(c.deadline.map(fmt_time)),
                        or_dash(c.next_refresh_at.map(fmt_time)),
                        or_dash(c.last_error.as_ref().map(|e| truncate(e, 60))),
                    ]);
                }
                print_table(&table);
            }
            Ok(0)
        }
        ConnectionCommand::Show { name, json } => {
            let st = ctx.open_store(Create::No)?;
            let row = st.get(&name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&row.conn)?);
            } else {
                show(&st, &row, now)?;
            }
            Ok(0)
        }
        ConnectionCommand::Set {
            name,
            plan,
            instance,
            client_id,
        } => set(&ctx, &name, plan, instance, client_id, now),
        ConnectionCommand::SetSecret {
            name,
            client_secret_file,
            secret_expires,
        } => {
            let expires = secret_expires
                .as_deref()
                .map(parse_date)
                .transpose()
                .map_err(anyhow::Error::msg)?;
            if let Some(e) = expires.filter(|e| *e <= now) {
                anyhow::bail!(
                    "--secret-expires {} has already passed: enter the Expires On date of the new secret",
                    fmt_time(e)
                );
            }
            let mut st = ctx.open_store(Create::No)?;
            st.get(&name)?;
            let secret = read_secret(
                client_secret_file.as_deref(),
                "client secret",
                "--client-secret-file",
            )?;
            let policy = renewal::policy_from(&ctx.config);
            let row = st.write(|tx, kr| {
                let mut row = connections::get_tx(tx, &name)?;
                connections::set_secret(
                    tx,
                    kr,
                    row.conn.id,
                    SecretColumn::ClientSecret,
                    Some(&secret),
                )?;
                if expires.is_some() {
                    row.conn.secret_expires_at = expires;
                } else if row.conn.secret_expires_at.is_some_and(|e| e <= now) {
                    // A passed Expires On belongs to the old secret (a new one with
                    // a passed date is refused above); kept, it would put the
                    // connection straight back into needs_secret.
                    row.conn.secret_expires_at = None;
                }
                if row.conn.state == State::NeedsSecret {
                    planning::resume(&mut row, &policy, now);
                }
                connections::put(tx, &row)?;
                events::record(
                    tx,
                    row.conn.id,
                    now,
                    "secret_set",
                    &format!("new client secret entered; state {}", row.conn.state),
                )?;
                Ok(row)
            })?;
            println!(
                "stored a new client secret for {} (state {})",
                row.conn.name, row.conn.state
            );
            if let Some(t) = row.conn.next_refresh_at {
                println!("next refresh {}", fmt_time(t));
            }
            Ok(0)
        }
        ConnectionCommand::History { name, json } => {
            let st = ctx.open_store(Create::No)?;
            let row = st.get(&name)?;
            let evs = st.history(row.conn.id)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&evs)?);
            } else {
                let mut table = vec![vec!["AT".into(), "EVENT".into(), "DETAIL".into()]];
                for e in evs {
                    table.push(vec![fmt_time(e.at), e.event, e.detail]);
                }
                print_table(&table);
            }
            Ok(0)
        }
        ConnectionCommand::Disable { name } => {
            let mut st = ctx.open_store(Create::No)?;
            let row = st.write(|tx, _| {
                let mut row = connections::get_tx(tx, &name)?;
                if row.conn.state != State::Disabled {
                    row.conn.state = State::Disabled;
                    row.conn.next_refresh_at = None;
                    connections::put(tx, &row)?;
                    events::record(
                        tx,
                        row.conn.id,
                        now,
                        "disabled",
                        "turned off by an operator",
                    )?;
                }
                Ok(row)
            })?;
            println!(
                "{} is disabled: no refreshes, no tokens, no alerts",
                row.conn.name
            );
            Ok(0)
        }
        ConnectionCommand::Enable { name } => {
            let mut st = ctx.open_store(Create::No)?;
            let policy = renewal::policy_from(&ctx.config);
            let row = st.write(|tx, _| {
                let mut row = connections::get_tx(tx, &name)?;
                if row.conn.state == State::Disabled {
                    planning::resume(&mut row, &policy, now);
                    connections::put(tx, &row)?;
                    events::record(
                        tx,
                        row.conn.id,
                        now,
                        "enabled",
                        &format!("turned on; state {}", row.conn.state),
                    )?;
                }
                Ok(row)
            })?;
            println!("{} is enabled (state {})", row.conn.name, row.conn.state);
            Ok(0)
        }
        ConnectionCommand::Remove { name, yes } => {
            let mut st = ctx.open_store(Create::No)?;
            let row = st.get(&name)?;
            if !yes {
                if !std::io::stdin().is_terminal() {
                    anyhow::bail!(
                        "refusing to remove `{name}` without --yes when stdin is not a terminal"
                    );
                }
                if !confirm(&format!(
                    "remove connection `{name}` ({}) and its refresh token? The customer will have to authorize again to add it back.",
                    row.conn.instance
                )) {
                    eprintln!("not removed");
                    return Ok(1);
                }
            }
            st.write(|tx, _| {
                crate::store::alerts::remove_connection(tx, row.conn.id, now)?;
                connections::remove(tx, row.conn.id)
            })?;
            println!("removed connection {name}");
            Ok(0)
        }
        ConnectionCommand::Authorize { name } => {
            renewal::authorize::cli_authorize(&ctx, &name, now).await
        }
        ConnectionCommand::Complete { name, redirect_url } => {
            renewal::authorize::cli_complete(&ctx, &name, &redirect_url).await
        }
        ConnectionCommand::Refresh { name } => super::ops::refresh(&ctx, &name).await,
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

fn show(st: &Store, row: &ConnectionRow, now: Timestamp) -> anyhow::Result<()> {
    let c = &row.conn;
    let t = |v: Option<Timestamp>| or_dash(v.map(fmt_time));
    let mut rows: Vec<Vec<String>> = vec![
        vec!["name".into(), c.name.clone()],
        vec!["id".into(), c.id.to_string()],
        vec!["state".into(), c.state.to_string()],
        vec!["instance".into(), c.instance.clone()],
        vec!["client_id".into(), c.client_id.clone()],
        vec![
            "labels".into(),
            if c.labels.is_empty() {
                "-".into()
            } else {
                c.labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ],
        vec!["mode".into(), c.mode.to_string()],
        vec!["lifetime".into(), crate::model::fmt_duration(c.lifetime)],
        vec![
            "absolute_lifetime".into(),
            c.absolute_lifetime
                .map(crate::model::fmt_duration)
                .unwrap_or_else(|| "none".into()),
        ],
        vec!["secret_expires_at".into(), t(c.secret_expires_at)],
        vec!["grant_issued_at".into(), t(c.grant_issued_at)],
        vec![
            "refresh_token_issued_at".into(),
            t(c.refresh_token_issued_at),
        ],
        vec!["access_expires_at".into(), t(c.access_expires_at)],
        vec![
            "deadline".into(),
            match (c.deadline, c.deadline_source) {
                (Some(d), Some(s)) => format!("{} ({})", fmt_time(d), s.as_str()),
                (d, _) => t(d),
            },
        ],
        vec!["next_refresh_at".into(), t(c.next_refresh_at)],
        vec!["last_refresh_at".into(), t(c.last_refresh_at)],
        vec!["last_error".into(), or_dash(c.last_error.clone())],
    ];
    if let Some(action) = c.state.action() {
        rows.push(vec!["action".into(), action.replace("NAME", &c.name)]);
    }
    if let Some(a) = st.open_authorization(c.id, now)? {
        rows.push(vec![
            "authorization".into(),
            format!("a link is open until {} (print it with `acutoken connection authorize`, which replaces it)", fmt_time(a.expires_at)),
        ]);
    }
    print_table(&rows);
    Ok(())
}

/// What `add` and `import` are told about one connection.
struct Spec {
    name: String,
    instance: String,
    client_id: String,
    labels: BTreeMap<String, String>,
    mode: Option<String>,
    lifetime: Option<String>,
    absolute_lifetime: Option<String>,
    secret_expires_at: Option<String>,
    grant_issued_at: Option<String>,
    refresh_token_issued_at: Option<String>,
}

fn parse_absolute(s: &str) -> Result<Option<Duration>, String> {
    if s.trim().eq_ignore_ascii_case("none") {
        Ok(None)
    } else {
        parse_duration(s).map(Some)
    }
}

impl Spec {
    /// Checks every field and builds the connection with its first plan.
    /// The connection this spec describes, with id `id`.
    fn build(
        &self,
        id: uuid::Uuid,
        config: &Config,
        now: Timestamp,
        has_refresh_token: bool,
    ) -> anyhow::Result<Connection> {
        model::validate_name(&self.name).map_err(anyhow::Error::msg)?;
        let instance = instance::normalize(&self.instance)?;
        model::validate_client_id(&self.client_id).map_err(anyhow::Error::msg)?;
        let mode = match &self.mode {
            Some(m) => m.parse::<Mode>().map_err(anyhow::Error::msg)?,
            None => config.renewal.mode,
        };
        let lifetime = match &self.lifetime {
            Some(l) => parse_duration(l).map_err(anyhow::Error::msg)?,
            None => config.renewal.lifetime,
        };
        if lifetime.is_zero() {
            anyhow::bail!("lifetime must be longer than zero");
        }
        let absolute_lifetime = match &self.absolute_lifetime {
            Some(a) => parse_absolute(a).map_err(anyhow::Error::msg)?,
            None => config.renewal.absolute_lifetime,
        };
        let opt = |v: &Option<String>, f: fn(&str) -> Result<Timestamp, String>| {
            v.as_deref().map(f).transpose().map_err(anyhow::Error::msg)
        };
        let secret_expires_at = opt(&self.secret_expires_at, parse_date)?;
        let grant_issued_at = opt(&self.grant_issued_at, parse_time)?;
        let refresh_token_issued_at = opt(&self.refresh_token_issued_at, parse_time)?;
        for (what, t) in [
            ("grant_issued_at", grant_issued_at),
            ("refresh_token_issued_at", refresh_token_issued_at),
        ] {
            if t.is_some_and(|t| t > now + chrono::Duration::minutes(5)) {
                anyhow::bail!("{what} lies in the future");
            }
        }
        if !has_refresh_token && (grant_issued_at.is_some() || refresh_token_issued_at.is_some()) {
            anyhow::bail!(
                "grant and refresh-token times need a refresh token (--refresh-token-file)"
            );
        }
        let mut conn = Connection {
            id,
            name: self.name.clone(),
            instance,
            client_id: self.client_id.clone(),
            labels: self.labels.clone(),
            mode,
            lifetime,
            absolute_lifetime,
            secret_expires_at,
            grant_issued_at,
            refresh_token_issued_at,
            access_expires_at: None,
            deadline: None,
            deadline_source: None,
            next_refresh_at: None,
            last_refresh_at: None,
            last_error: None,
            state: State::PendingAuthorization,
        };
        planning::initial(
            &mut conn,
            has_refresh_token,
            &renewal::policy_from(config),
            now,
        );
        Ok(conn)
    }
}

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
    // Each record stays a slice of `text` until it is checked, so a large file
    // is never held as a tree of JSON values, and the records are checked on
    // every core: 1M records is a 360 MB file.
    let raws: Vec<&serde_json::value::RawValue> =
        serde_json::from_str(text).map_err(|e| ImportSyntax {
            line: e.line(),
            column: e.column(),
        })?;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let per = raws.len().div_ceil(threads).max(1024);
    let checked: Vec<Vec<(usize, Result<NewConnection, String>)>> = std::thread::scope(|s| {
        let parts: Vec<_> = raws
            .chunks(per)
            .enumerate()
            .map(|(k, part)| {
                s.spawn(move || {
                    part.iter()
                        .enumerate()
                        .map(|(i, raw)| {
                            let pos = k * per + i + 1;
                            (pos, check_record(raw.get(), pos, config, now))
                        })
                        .collect()
                })
            })
            .collect();
        parts
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    // Fresh random ids, handed out in ascending order: a bulk insert in file
    // order then appends to the indexes keyed by id instead of touching a
    // random page of each for every record.
    let mut ids: Vec<uuid::Uuid> = {
        let mut rng = rand::thread_rng();
        (0..raws.len())
            .map(|_| uuid::Builder::from_random_bytes(rand::Rng::r#gen(&mut rng)).into_uuid())
            .collect()
    };
    ids.sort_unstable();
    let mut ids = ids.into_iter();
    let mut problems: Vec<(usize, String)> = Vec::new();
    let mut records = Vec::with_capacity(raws.len());
    let mut seen = HashSet::with_capacity(raws.len());
    for (pos, checked) in checked.into_iter().flatten() {
        match checked {
            Ok(mut new) => {
                if seen.insert(new.conn.name.clone()) {
                    new.conn.id = ids.next().expect("one id per record");
                    records.push((pos, new));
                } else {
                    let label = format!("record {pos} (`{}`)", new.conn.name);
                    problems.push((pos, format!("{label}: the name appears twice in the file")));
                }
            }
            Err(p) => problems.push((pos, p)),
        }
    }
    Ok(ParsedImport { records, problems })
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

fn import(ctx: &Ctx, file: &Path, now: Timestamp) -> anyhow::Result<i32> {
    let meta =
        std::fs::metadata(file).with_context(|| format!("cannot read {}", file.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        eprintln!(
            "warning: {} holds secrets and is readable by group or others: `chmod 600` it, or delete it after the import",
            file.display()
        );
    }
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let parsed = parse_import(&text, &ctx.config, now)
        .map_err(|e| anyhow::anyhow!("{} is {e}: nothing imported", file.display()))?;
    let mut problems = parsed.problems;
    let (positions, news): (Vec<usize>, Vec<NewConnection>) = parsed.records.into_iter().unzip();
    let path = ctx.config.store_path();
    if path.exists() {
        // Names already in the store are named with the other problems, before
        // anything is written, so one run lists every record to fix.
        let st = ctx.open_store(Create::No)?;
        let existing: HashSet<String> = st.names()?.into_iter().collect();
        for (pos, n) in positions.iter().zip(&news) {
            if existing.contains(&n.conn.name) {
                problems.push((
                    *pos,
                    format!(
                        "record {pos} (`{}`): a connection by that name already exists",
                        n.conn.name
                    ),
                ));
            }
        }
    }
    if !problems.is_empty() {
        problems.sort_by_key(|(pos, _)| *pos);
        for (_, p) in &problems {
            eprintln!("  {p}");
        }
        anyhow::bail!(
            "{} of the records in {} are invalid (listed above): nothing imported",
            problems.len(),
            file.display()
        );
    }
    drop(text);
    let total = news.len();
    let pending = news
        .iter()
        .filter(|n| n.conn.state == State::PendingAuthorization)
        .count();
    let mut st = ctx.open_store(Create::Yes)?;
    // The records' ids ascend in file order (see `parse_import`), so the rows
    // append to the id and event indexes; the cache holds the rest (about
    // 1 KiB per connection, at most 256 MiB) so nothing spills before the
    // commit.
    st.prepare_bulk_write((total * 1024).min(256 << 20))?;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(total as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    // One transaction: all or nothing, and one fsync for the whole file.
    // Another thread seals the secrets of the next chunks while this one
    // writes, so the two cores share the work; the records are freed on
    // another thread while SQLite commits (1M records take 1.6 s to free).
    const CHUNK: usize = 1000;
    let freeing = st.write(|tx, kr| {
        std::thread::scope(|s| {
            let (sealed_tx, sealed_rx) = std::sync::mpsc::sync_channel::<Vec<Sealed>>(4);
            let to_seal = &news;
            let sealer = s.spawn(move || {
                for chunk in to_seal.chunks(CHUNK) {
                    let sealed = chunk.iter().map(|n| Sealed::new(kr, n)).collect();
                    if sealed_tx.send(sealed).is_err() {
                        break; // the writer failed and rolls back
                    }
                }
            });
            let mut written = 0;
            for (chunk, sealed) in news.chunks(CHUNK).zip(sealed_rx.iter()) {
                let seq = connections::insert_sealed(tx, chunk, &sealed, now)?;
                events::record_for_change(tx, seq, now, "added", "imported; state ")?;
                written += chunk.len();
                bar.set_position(written as u64);
            }
            sealer
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            // Fewer rows than records only if the sealer stopped early.
            if written != total {
                return Err(StoreError::Unwritable(format!(
                    "only {written} of {total} records were sealed: nothing imported"
                )));
            }
            Ok(())
        })?;
        Ok(std::thread::spawn(move || drop(news)))
    })?;
    bar.finish_and_clear();
    println!(
        "imported {total} connections from {} ({pending} waiting for authorization)",
        file.display(),
    );
    drop(st);
    freeing
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    Ok(0)
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

fn set(
    ctx: &Ctx,
    name: &str,
    plan: PlanArgs,
    new_instance: Option<String>,
    new_client_id: Option<String>,
    now: Timestamp,
) -> anyhow::Result<i32> {
    let labels = plan
        .labels
        .iter()
        .map(|l| model::parse_label(l))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let mode = plan
        .mode
        .as_deref()
        .map(str::parse::<Mode>)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let lifetime = plan
        .lifetime
        .as_deref()
        .map(parse_duration)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    if lifetime.is_some_and(|l| l.is_zero()) {
        anyhow::bail!("lifetime must be longer than zero");
    }
    let absolute = plan
        .absolute_lifetime
        .as_deref()
        .map(parse_absolute)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let expires = plan
        .secret_expires
        .as_deref()
        .map(parse_date)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let instance = new_instance
        .as_deref()
        .map(instance::normalize)
        .transpose()?;
    if let Some(id) = &new_client_id {
        model::validate_client_id(id).map_err(anyhow::Error::msg)?;
    }
    let policy = renewal::policy_from(&ctx.config);
    let mut st = ctx.open_store(Create::No)?;
    let (row, changed) = st.write(|tx, kr| {
        let mut row = connections::get_tx(tx, name)?;
        let mut changed = Vec::new();
        for (k, v) in labels {
            if v.is_empty() {
                row.conn.labels.remove(&k);
            } else {
                row.conn.labels.insert(k, v);
            }
            changed.push("labels");
        }
        let mut replan = false;
        if let Some(m) = mode.filter(|m| *m != row.conn.mode) {
            row.conn.mode = m;
            changed.push("mode");
            replan = true;
        }
        if let Some(l) = lifetime.filter(|l| *l != row.conn.lifetime) {
            row.conn.lifetime = l;
            changed.push("lifetime");
            replan = true;
        }
        if let Some(a) = absolute.filter(|a| *a != row.conn.absolute_lifetime) {
            row.conn.absolute_lifetime = a;
            changed.push("absolute_lifetime");
            replan = true;
        }
        if let Some(e) = expires {
            row.conn.secret_expires_at = Some(e);
            changed.push("secret_expires_at");
        }
        let mut regrant = false;
        if let Some(i) = instance.clone().filter(|i| *i != row.conn.instance) {
            row.conn.instance = i;
            changed.push("instance");
            regrant = true;
        }
        if let Some(c) = new_client_id.clone().filter(|c| *c != row.conn.client_id) {
            row.conn.client_id = c;
            changed.push("client_id");
            regrant = true;
        }
        if regrant {
            // The grant belongs to the old instance/application: it cannot be used here.
            planning::clear_grant(&mut row);
            connections::set_secret(tx, kr, row.conn.id, SecretColumn::RefreshToken, None)?;
            connections::set_secret(tx, kr, row.conn.id, SecretColumn::AccessToken, None)?;
            authorizations::close_all(tx, row.conn.id)?;
        } else if replan {
            planning::replan(&mut row, &policy, now);
        }
        if !changed.is_empty() {
            connections::put(tx, &row)?;
            events::record(tx, row.conn.id, now, "changed", &changed.join(", "))?;
        }
        Ok((row, changed))
    })?;
    if changed.is_empty() {
        println!("{name}: nothing to change");
    } else {
        println!(
            "{name}: changed {} (instance {}, state {})",
            changed.join(", "),
            row.conn.instance,
            row.conn.state
        );
        if row.conn.state == State::PendingAuthorization {
            println!(
                "the grant was cleared: send the customer the link from `acutoken connection authorize {name}`"
            );
        }
    }
    Ok(0)
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
