//! `connection authorize` and `connection complete` without the daemon: the
//! connections service opens the link and stores the grant; this prints.

use super::Ctx;
use crate::model::{Timestamp, fmt_time};
use crate::service::{Completed, Redirect};
use crate::store::Create;

/// `connection authorize NAME`.
pub(super) async fn authorize(ctx: &Ctx, name: &str, now: Timestamp) -> anyhow::Result<i32> {
    let svc = ctx.connections(Create::No)?;
    let link = svc.authorize(name, now).await?;
    println!("{}", link.url.expose());
    eprintln!(
        "send this link to the customer; it stays valid until {}{}",
        fmt_time(link.expires_at),
        if link.replaced > 0 {
            " (the previous link no longer works)"
        } else {
            ""
        }
    );
    Ok(0)
}

/// `connection complete NAME --redirect-url URL`.
pub(super) async fn complete(ctx: &Ctx, name: &str, redirect_url: &str) -> anyhow::Result<i32> {
    // The URL is read before the store is opened: a mistyped paste is
    // named without touching anything.
    let redirect = Redirect::parse(redirect_url)?;
    let svc = ctx.connections(Create::No)?;
    let now = crate::clock::Clock::now(&crate::clock::SystemClock);
    match svc.complete(name, redirect, now).await? {
        Completed::Connected { name } => {
            println!("{name} is connected: grant stored, state active");
        }
        Completed::AlreadyConnected { name } => {
            println!("{name}: this link was already used; nothing changed");
        }
    }
    Ok(0)
}
