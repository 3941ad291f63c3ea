//! `acutoken connection ...`: add, import, inspect and edit connections.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;

use super::Ctx;
use super::args::{ConnectionCommand, PlanArgs};
use super::io::{confirm, or_dash, print_table, read_secret};
use crate::clock::{Clock, SystemClock};
use crate::model::ConnectionRow;
use crate::model::{Connection, State, Timestamp, fmt_time};
/// `import` checks its records with the same rules as `add`.
pub(super) use crate::service::Spec;
use crate::service::{self, ChangeArgs, Removal};
use crate::store::{Create, Store};

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
                labels: service::parse_labels(&plan.labels)?,
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
            let svc = ctx.connections(Create::Yes)?;
            let c = svc.add(&spec, client_secret, refresh_token, now).await?;
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
        ConnectionCommand::List { json } => list(&ctx, json),
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
        } => set(&ctx, &name, plan, instance, client_id, now).await,
        ConnectionCommand::SetSecret {
            name,
            client_secret_file,
            secret_expires,
        } => {
            let expires = service::secret_expiry(secret_expires.as_deref(), now)?;
            let svc = ctx.connections(Create::No)?;
            // An unknown name is refused before the secret is asked for.
            svc.get(&name).await?;
            let secret = read_secret(
                client_secret_file.as_deref(),
                "client secret",
                "--client-secret-file",
            )?;
            let running = crate::daemon::running(&ctx.config);
            let row = svc.set_secret(&name, secret, expires, running, now).await?;
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
            let svc = ctx.connections(Create::No)?;
            let (row, closed) = svc.disable(&name, now).await?;
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
            let svc = ctx.connections(Create::No)?;
            let row = svc.enable(&name, now).await?;
            println!("{} is enabled (state {})", row.conn.name, row.conn.state);
            Ok(0)
        }
        ConnectionCommand::Remove { name, yes } => remove(&ctx, &name, yes, now).await,
        ConnectionCommand::Authorize { name } => {
            super::authorize::authorize(&ctx, &name, now).await
        }
        ConnectionCommand::Complete { name, redirect_url } => {
            super::authorize::complete(&ctx, &name, &redirect_url).await
        }
        ConnectionCommand::Refresh { name } => super::ops::refresh(&ctx, &name).await,
    }
}

/// `list [--json]`.
fn list(ctx: &Ctx, json: bool) -> anyhow::Result<i32> {
    let st = ctx.open_store(Create::No)?;
    let (rows, faults) = st.list_with_faults()?;
    // Connections the daemon set aside although their rows read
    // (a sealed value that does not open, an internal error).
    let aside: BTreeMap<String, String> = crate::store::alerts::set_aside(&st)?
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

/// `remove NAME [--yes]`: asks first on a terminal, refuses to guess without one.
async fn remove(ctx: &Ctx, name: &str, yes: bool, now: Timestamp) -> anyhow::Result<i32> {
    let svc = ctx.connections(Create::No)?;
    let question = match svc.find_for_removal(name).await? {
        Removal::Readable(row) => format!(
            "remove connection `{name}` ({}) and its refresh token? The customer will have to authorize again to add it back.",
            row.conn.instance
        ),
        Removal::Unreadable { why } => {
            // A damaged row can still be removed (nothing can refresh it).
            eprintln!("warning: the row of `{name}` does not read ({why})");
            if !confirmed(
                name,
                yes,
                &format!(
                    "remove connection `{name}` and whatever refresh token it holds? The customer will have to authorize again to add it back."
                ),
            )? {
                return Ok(1);
            }
            svc.remove_unreadable(name, now).await?;
            println!("removed connection {name}");
            return Ok(0);
        }
    };
    if !confirmed(name, yes, &question)? {
        return Ok(1);
    }
    svc.remove(name, |holder| {
        eprintln!("waiting for the refresh of `{name}` in flight ({holder}) to finish")
    })
    .await?;
    println!("removed connection {name}");
    Ok(0)
}

/// True when `remove` may go ahead: `--yes`, or a yes on the terminal.
fn confirmed(name: &str, yes: bool, question: &str) -> anyhow::Result<bool> {
    if yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("refusing to remove `{name}` without --yes when stdin is not a terminal");
    }
    if !confirm(question) {
        eprintln!("not removed");
        return Ok(false);
    }
    Ok(true)
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
    if let Some(a) = crate::store::alerts::set_aside(st)?
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

async fn set(
    ctx: &Ctx,
    name: &str,
    plan: PlanArgs,
    instance: Option<String>,
    client_id: Option<String>,
    now: Timestamp,
) -> anyhow::Result<i32> {
    let changes = ChangeArgs {
        labels: plan.labels,
        mode: plan.mode,
        lifetime: plan.lifetime,
        absolute_lifetime: plan.absolute_lifetime,
        secret_expires: plan.secret_expires,
        instance,
        client_id,
    }
    .check()?;
    let svc = ctx.connections(Create::No)?;
    let (row, changed) = svc.set(name, changes, now).await?;
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
