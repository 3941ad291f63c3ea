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
use crate::store::connections::{self, ConnectionRow, NewConnection, SecretColumn};
use crate::store::{Create, Store, authorizations, events};

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
            spec.build(&ctx.config, now, refresh_token_file.is_some())?;
            let client_secret = read_secret(
                client_secret_file.as_deref(),
                "client secret",
                "--client-secret-file",
            )?;
            let refresh_token = refresh_token_file
                .as_deref()
                .map(|f| read_secret(Some(f), "refresh token", "--refresh-token-file"))
                .transpose()?;
            let conn = spec.build(&ctx.config, now, refresh_token.is_some())?;
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
    fn build(
        &self,
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
            id: uuid::Uuid::new_v4(),
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
    let values: Vec<serde_json::Value> = serde_json::from_str(text).map_err(|e| ImportSyntax {
        line: e.line(),
        column: e.column(),
    })?;
    let mut problems: Vec<(usize, String)> = Vec::new();
    let mut records = Vec::with_capacity(values.len());
    let mut seen = HashSet::new();
    for (i, v) in values.into_iter().enumerate() {
        let pos = i + 1;
        let label = v
            .get("name")
            .and_then(|n| n.as_str())
            .map(|n| format!("record {pos} (`{}`)", printable(n)))
            .unwrap_or_else(|| format!("record {pos}"));
        let rec: Record = match serde_json::from_value(v) {
            Ok(r) => r,
            Err(e) => {
                problems.push((
                    pos,
                    format!("{label}: {}", printable(&scrub(&e.to_string()))),
                ));
                continue;
            }
        };
        let spec = Spec {
            name: rec.name.clone(),
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
        let secret = match secret_field(rec.client_secret, "client_secret") {
            Ok(Some(s)) => s,
            Ok(None) => {
                problems.push((pos, format!("{label}: client_secret is missing")));
                continue;
            }
            Err(e) => {
                problems.push((pos, format!("{label}: {e}")));
                continue;
            }
        };
        let rt = match secret_field(rec.refresh_token, "refresh_token") {
            Ok(rt) => rt,
            Err(e) => {
                problems.push((pos, format!("{label}: {e}")));
                continue;
            }
        };
        match spec.build(config, now, rt.is_some()) {
            Ok(conn) => {
                if !seen.insert(conn.name.clone()) {
                    problems.push((pos, format!("{label}: the name appears twice in the file")));
                    continue;
                }
                records.push((
                    pos,
                    NewConnection {
                        conn,
                        client_secret: Some(secret),
                        refresh_token: rt,
                    },
                ));
            }
            Err(e) => problems.push((pos, format!("{label}: {}", printable(&format!("{e:#}"))))),
        }
    }
    Ok(ParsedImport { records, problems })
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
    let mut st = ctx.open_store(Create::Yes)?;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(news.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    // One transaction: all or nothing, and one fsync for the whole file.
    st.write(|tx, kr| {
        for (i, chunk) in news.chunks(1000).enumerate() {
            connections::insert_many(tx, kr, chunk, now)?;
            for n in chunk {
                events::record(
                    tx,
                    n.conn.id,
                    now,
                    "added",
                    &format!("imported; state {}", n.conn.state),
                )?;
            }
            bar.set_position((i * 1000 + chunk.len()) as u64);
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    let pending = news
        .iter()
        .filter(|n| n.conn.state == State::PendingAuthorization)
        .count();
    println!(
        "imported {} connections from {} ({} waiting for authorization)",
        news.len(),
        file.display(),
        pending
    );
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
}
