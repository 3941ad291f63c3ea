//! `acutoken connection ...`: add, import, inspect and edit connections.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use super::Ctx;
use super::args::{ConnectionCommand, PlanArgs};
use super::io::{confirm, or_dash, print_table, read_secret};
use crate::acumatica::instance;
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::model::{
    self, Connection, Mode, State, Timestamp, fmt_time, parse_date, parse_duration, parse_time,
};
use crate::model::{ConnectionRow, NewConnection};
use crate::renewal::planning;
use crate::store::connections::{self, SecretColumn};
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
        ConnectionCommand::Import { file } => super::import::import(&ctx, &file, now),
        ConnectionCommand::List { json } => {
            let st = ctx.open_store(Create::No)?;
            let (rows, faults) = st.list_with_faults()?;
            // Connections the daemon set aside although their rows read
            // (a sealed value that does not open, an internal error).
            let aside: BTreeMap<String, String> = crate::store::alerts::set_aside(st.db())?
                .into_iter()
                .map(|a| (a.key, a.facts.summary))
                .collect();
            if json {
                if faults.is_empty() {
                    let conns: Vec<&Connection> = rows.iter().map(|r| &r.conn).collect();
                    println!("{}", serde_json::to_string_pretty(&conns)?);
                } else {
                    let all = crate::status::listing(&rows, &faults);
                    println!("{}", serde_json::to_string_pretty(&all)?);
                }
            } else if rows.is_empty() && faults.is_empty() {
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
                    let error = match aside.get(&c.id.to_string()) {
                        Some(why) => Some(format!("SET ASIDE: {}", truncate(why, 80))),
                        None => c.last_error.as_ref().map(|e| truncate(e, 60)),
                    };
                    table.push(vec![
                        c.name.clone(),
                        c.state.to_string(),
                        c.instance.clone(),
                        or_dash(c.deadline.map(fmt_time)),
                        or_dash(c.next_refresh_at.map(fmt_time)),
                        or_dash(error),
                    ]);
                }
                for f in &faults {
                    table.push(vec![
                        f.label(),
                        "(unreadable)".into(),
                        "-".into(),
                        "-".into(),
                        "-".into(),
                        format!("SET ASIDE: {}", f.describe()),
                    ]);
                }
                print_table(&table);
                if !faults.is_empty() {
                    eprintln!(
                        "{} connection row(s) cannot be read and are set aside: correct the column named with sqlite3, or restore the row from a backup",
                        faults.len()
                    );
                }
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
            let policy = ctx.config.renewal.policy();
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
                } else if row.conn.state.is_scheduled() && crate::daemon::running(&ctx.config) {
                    // Proven at once by the daemon, not at the next planned refresh.
                    row.conn.next_refresh_at = Some(now);
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
            if !row.conn.state.is_scheduled() {
                return Ok(0);
            }
            super::ops::prove_secret(&ctx, &row, now).await
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
            let (row, closed) = st.write(|tx, _| {
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
                // A link sent earlier must not bring it back.
                let closed = authorizations::close_all(tx, row.conn.id)?;
                if closed > 0 {
                    events::record(
                        tx,
                        row.conn.id,
                        now,
                        "authorize",
                        "open authorization links closed: the connection was disabled",
                    )?;
                }
                Ok((row, closed))
            })?;
            println!(
                "{} is disabled: no refreshes, no tokens, no alerts",
                row.conn.name
            );
            if closed > 0 {
                println!(
                    "its open authorization link no longer works (`acutoken connection authorize {}` makes a new one after `enable`)",
                    row.conn.name
                );
            }
            Ok(0)
        }
        ConnectionCommand::Enable { name } => {
            let mut st = ctx.open_store(Create::No)?;
            let policy = ctx.config.renewal.policy();
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
            let row = match st.get(&name) {
                Ok(row) => row,
                // A damaged row can still be removed (nothing can refresh it).
                Err(crate::store::StoreError::Corrupt(why)) => {
                    return remove_unreadable(&mut st, &name, yes, &why, now);
                }
                Err(e) => return Err(e.into()),
            };
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
            // A refresh in flight finishes within the request timeout: wait
            // that long for it rather than remove the row under it. (Were
            // it removed anyway, the token it obtains is simply discarded.)
            let patience = ctx.config.renewal.http_timeout + Duration::from_secs(5);
            let give_up = tokio::time::Instant::now() + patience;
            let mut told = false;
            loop {
                let now = SystemClock.now();
                let busy = st.write(|tx, _| {
                    let row = connections::get_tx(tx, &name)?;
                    if let Some(claim) = crate::store::claims::live_claim(&row, now) {
                        return Ok(Some(claim));
                    }
                    crate::store::alerts::remove_connection(tx, row.conn.id, now)?;
                    connections::remove(tx, row.conn.id)?;
                    Ok(None)
                })?;
                let Some((holder, until)) = busy else { break };
                if tokio::time::Instant::now() >= give_up {
                    anyhow::bail!(
                        "`{name}` is being refreshed by {} (claim until {}); nothing was removed: run the command again in a minute",
                        crate::store::claims::Owner::describe(&holder),
                        fmt_time(until)
                    );
                }
                if !told {
                    eprintln!(
                        "waiting for the refresh of `{name}` in flight ({}) to finish",
                        crate::store::claims::Owner::describe(&holder)
                    );
                    told = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            println!("removed connection {name}");
            Ok(0)
        }
        ConnectionCommand::Authorize { name } => {
            super::authorize::authorize(&ctx, &name, now).await
        }
        ConnectionCommand::Complete { name, redirect_url } => {
            super::authorize::complete(&ctx, &name, &redirect_url).await
        }
        ConnectionCommand::Refresh { name } => super::ops::refresh(&ctx, &name).await,
    }
}

/// `remove NAME` for a row that does not read.
fn remove_unreadable(
    st: &mut Store,
    name: &str,
    yes: bool,
    why: &str,
    now: crate::model::Timestamp,
) -> anyhow::Result<i32> {
    eprintln!("warning: the row of `{name}` does not read ({why})");
    if !yes {
        if !std::io::stdin().is_terminal() {
            anyhow::bail!("refusing to remove `{name}` without --yes when stdin is not a terminal");
        }
        if !confirm(&format!(
            "remove connection `{name}` and whatever refresh token it holds? The customer will have to authorize again to add it back."
        )) {
            eprintln!("not removed");
            return Ok(1);
        }
    }
    if !st.write(|tx, _| connections::remove_unreadable(tx, name, now))? {
        return Err(crate::store::StoreError::UnknownConnection(name.to_string()).into());
    }
    println!("removed connection {name}");
    Ok(0)
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
    if let Some(a) = crate::store::alerts::set_aside(st.db())?
        .into_iter()
        .find(|a| a.key == c.id.to_string())
    {
        rows.push(vec![
            "set aside".into(),
            format!("since {}: {}", fmt_time(a.since), a.facts.summary),
        ]);
        rows.push(vec!["to fix".into(), a.facts.action]);
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
pub(super) struct Spec {
    pub(super) name: String,
    pub(super) instance: String,
    pub(super) client_id: String,
    pub(super) labels: BTreeMap<String, String>,
    pub(super) mode: Option<String>,
    pub(super) lifetime: Option<String>,
    pub(super) absolute_lifetime: Option<String>,
    pub(super) secret_expires_at: Option<String>,
    pub(super) grant_issued_at: Option<String>,
    pub(super) refresh_token_issued_at: Option<String>,
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
    pub(super) fn build(
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
        planning::initial(&mut conn, has_refresh_token, &config.renewal.policy(), now);
        Ok(conn)
    }
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
    let policy = ctx.config.renewal.policy();
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
