//! Commands that act through the daemon when it runs, and on the store directly
//! (under the same claim rules) when it does not: `token`, `connection refresh`,
//! `status`, `alert test`; and `serve`.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use super::Ctx;
use crate::clock::{self, Clock};
use crate::daemon::client::{Answer, ClientError, call};
use crate::daemon::{self, serve};
use crate::model::fmt_time;
use crate::renewal::engine::RefreshReport;
use crate::service::{RefreshError, TokenError};
use crate::status::{self, DaemonInfo};
use crate::store::{Create, StoreError};

/// How long the CLI waits for the daemon; a token request may refresh first.
fn api_timeout(ctx: &Ctx) -> Duration {
    ctx.config.renewal.http_timeout * 3 + Duration::from_secs(10)
}

/// Asks the running daemon. While it starts (lock held, socket not bound yet)
/// the connection is refused: nothing was sent, so waiting and asking again is safe.
async fn ask(ctx: &Ctx, method: &str, path: &str, timeout: Duration) -> anyhow::Result<Answer> {
    let socket = ctx.config.socket_path();
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match call(&socket, method, path, timeout).await {
            Err(ClientError::Connect { .. })
                if daemon::running(&ctx.config) && tokio::time::Instant::now() < give_up =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return Ok(other?),
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(a: &Answer) -> anyhow::Result<T> {
    serde_json::from_slice(&a.body)
        .context("the daemon's answer is not the JSON this version expects")
}

fn api_error(a: &Answer) -> String {
    serde_json::from_slice::<serde_json::Value>(&a.body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| format!("the daemon answered HTTP {}", a.status))
}

fn print_report(r: &RefreshReport) -> i32 {
    println!("{}: {} (state {})", r.connection, r.outcome, r.state);
    if !r.detail.is_empty() {
        println!("  {}", r.detail);
    }
    if let Some(t) = r.next_refresh_at {
        println!("  next refresh {}", fmt_time(t));
    }
    if let Some(d) = r.deadline {
        println!("  deadline {}", fmt_time(d));
    }
    if r.outcome == "refreshed" { 0 } else { 1 }
}

/// `connection refresh NAME`.
pub async fn refresh(ctx: &Ctx, name: &str) -> anyhow::Result<i32> {
    if daemon::running(&ctx.config) {
        let a = ask(
            ctx,
            "POST",
            &format!("/v1/connections/{name}/refresh"),
            api_timeout(ctx),
        )
        .await?;
        if a.status == 404 || a.status == 429 || a.status >= 500 {
            anyhow::bail!("{}", api_error(&a));
        }
        let r: RefreshReport = parse(&a)?;
        return Ok(print_report(&r));
    }
    // No daemon: this process refreshes under the same claim rules, and
    // waits out a claim another process holds rather than send.
    let svc = ctx.connections(Create::No)?;
    let report = svc.refresh_waiting(name, api_timeout(ctx)).await;
    if !matches!(report, Err(RefreshError::Busy { .. })) {
        svc.settle().await?;
    }
    Ok(print_report(&report?))
}

/// After `set-secret` with the daemon running: its scheduler refreshes the
/// connection at once (the secret's save made it due), and this waits for
/// the outcome in the store. A secret the instance refuses again is reported
/// now, with a non-zero exit, not later through the chat. Without a daemon
/// the command stays offline, like `connection add`: the next start proves it.
pub async fn prove_secret(
    ctx: &Ctx,
    row: &crate::model::ConnectionRow,
    stored_at: crate::model::Timestamp,
) -> anyhow::Result<i32> {
    let name = row.conn.name.clone();
    if !daemon::running(&ctx.config) {
        if let Some(t) = row.conn.next_refresh_at {
            println!("next refresh {}", fmt_time(t));
        }
        return Ok(0);
    }
    let st = ctx.open_store(crate::store::Create::No)?;
    let give_up = tokio::time::Instant::now() + api_timeout(ctx);
    let report = loop {
        let now = st.get(&name)?;
        // `row` is as read before the secret's save (+1); a claim (+1)
        // and its outcome (+1) follow.
        let tried = now.version >= row.version + 3
            || now.conn.last_refresh_at.is_some_and(|t| t >= stored_at);
        if tried && now.claim.is_none() {
            break Some(now);
        }
        if tokio::time::Instant::now() >= give_up {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let Some(now) = report else {
        println!(
            "the daemon has not tried the new secret yet; see `acutoken connection history {name}`"
        );
        return Ok(0);
    };
    match now.conn.state {
        crate::model::State::NeedsSecret => anyhow::bail!(
            "the instance refused the new client secret too ({}): check it on the Connected Applications screen (SM303010) and run set-secret again",
            now.conn.last_error.as_deref().unwrap_or("invalid_client")
        ),
        crate::model::State::Active => {
            println!("the new secret works: refreshed (state active)");
            Ok(0)
        }
        crate::model::State::Retrying => {
            // Not a verdict on the secret: the instance did not answer.
            println!(
                "the new secret could not be proven yet ({}); it is tried again",
                now.conn.last_error.as_deref().unwrap_or("")
            );
            Ok(0)
        }
        s => {
            println!(
                "the refresh with the new secret did not succeed (state {s}): {}",
                now.conn.last_error.as_deref().unwrap_or("")
            );
            Ok(1)
        }
    }
}

/// `token NAME`.
pub async fn token(ctx: &Ctx, name: &str, json: bool) -> anyhow::Result<i32> {
    if daemon::running(&ctx.config) {
        let a = ask(
            ctx,
            "GET",
            &format!("/v1/connections/{name}/token"),
            api_timeout(ctx),
        )
        .await?;
        return match a.status {
            200 => {
                let v: serde_json::Value = parse(&a)?;
                if json {
                    println!("{v}");
                } else {
                    println!(
                        "{}",
                        v.get("access_token")
                            .and_then(|t| t.as_str())
                            .unwrap_or_default()
                    );
                }
                Ok(0)
            }
            409 => {
                let v: serde_json::Value = parse(&a)?;
                let field =
                    |k: &str, or: &str| v.get(k).and_then(|s| s.as_str()).unwrap_or(or).to_string();
                Err(TokenError::NeedsHuman {
                    name: name.to_string(),
                    state: field("state", "?"),
                    action: field("action", ""),
                }
                .into())
            }
            503 => Err(TokenError::Unavailable {
                name: name.to_string(),
                reason: api_error(&a),
                retry_after: a.retry_after.unwrap_or(60),
            }
            .into()),
            _ => anyhow::bail!("{}", api_error(&a)),
        };
    }
    let svc = ctx.connections(Create::No)?;
    let answer = svc.token(name).await;
    svc.settle().await?;
    let t = answer?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "access_token": t.access_token.expose(),
                "token_type": t.token_type,
                "expires_at": fmt_time(t.expires_at),
                "instance": t.instance,
                "base_url": t.base_url,
            })
        );
    } else {
        println!("{}", t.access_token.expose());
    }
    Ok(0)
}

/// `status [--json]`.
pub async fn status(ctx: &Ctx, json: bool) -> anyhow::Result<i32> {
    let st = if daemon::running(&ctx.config) {
        let a = ask(ctx, "GET", "/v1/status", Duration::from_secs(30)).await?;
        if a.status != 200 {
            anyhow::bail!("{}", api_error(&a));
        }
        parse::<status::Status>(&a)?
    } else {
        let store = match ctx.open_store(Create::No) {
            Ok(s) => s,
            Err(e) => {
                if matches!(
                    e.downcast_ref::<StoreError>(),
                    Some(StoreError::Missing { .. })
                ) {
                    eprintln!("error: {e:#}");
                    return Ok(3);
                }
                return Err(e);
            }
        };
        let info = DaemonInfo {
            running: false,
            pid: None,
            ready: false,
            unsaved_tokens: 0,
            scheduled: 0,
            refreshing: 0,
            replica: None,
        };
        status::gather(&store, &ctx.config, info, clock::SystemClock.now())?
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        super::status_text::print_human(&st);
    }
    Ok(st.exit_code())
}

/// `alert test`.
pub async fn alert_test(ctx: &Ctx) -> anyhow::Result<i32> {
    let results: Vec<serde_json::Value> = if daemon::running(&ctx.config) {
        let a = ask(ctx, "POST", "/v1/alerts/test", Duration::from_secs(120)).await?;
        if a.status != 200 {
            anyhow::bail!("{}", api_error(&a));
        }
        parse(&a)?
    } else {
        crate::alerts::send_test(&ctx.config)
            .await
            .into_iter()
            .map(|r| serde_json::json!({ "channel": r.channel, "host": r.host, "status": r.status, "error": r.error }))
            .collect()
    };
    if results.is_empty() {
        anyhow::bail!("no alert channels are configured (alerts.webhooks)");
    }
    let mut failed = 0;
    for r in &results {
        let channel = r.get("channel").and_then(|v| v.as_str()).unwrap_or("?");
        let host = r.get("host").and_then(|v| v.as_str()).unwrap_or("?");
        let status = r.get("status").and_then(|v| v.as_u64());
        match r.get("error").and_then(|v| v.as_str()) {
            None => println!("ok    {channel} ({host}): HTTP {}", status.unwrap_or(0)),
            Some(e) => {
                failed += 1;
                println!("FAIL  {channel} ({host}): {e}");
            }
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

/// `serve`.
pub async fn serve(explicit: Option<&Path>) -> anyhow::Result<i32> {
    let ctx = Ctx::load(explicit)?;
    // Before logging starts: the journal keeps stderr too.
    if let Some(w) = &ctx.exposure {
        eprintln!(
            "{}warning: {w}",
            crate::logging::stderr_prefix(tracing::Level::WARN)
        );
    }
    let code = serve::run(
        serve::ServeOptions {
            config: ctx.config,
            explicit_config: explicit.map(Path::to_path_buf),
            clock: clock::system(),
            logging_installed: false,
        },
        CancellationToken::new(),
    )
    .await?;
    Ok(code)
}
