//! `connection authorize` and `connection complete` without the daemon: the
//! renewal library opens the link and stores the grant; this prints.

use url::Url;

use super::Ctx;
use crate::acumatica::TokenClient;
use crate::model::{Timestamp, fmt_time};
use crate::renewal::{self, authorize};
use crate::store::Create;
use crate::store::StoreHandle;

/// Opens the store and a token client for a CLI command that works without the daemon.
pub(super) fn store_and_client(ctx: &Ctx) -> anyhow::Result<(StoreHandle, TokenClient)> {
    let st = ctx.open_store(Create::No)?;
    let client = TokenClient::new(renewal::client_settings(&ctx.config))?;
    Ok((StoreHandle::from_store(st)?, client))
}

/// `connection authorize NAME`.
pub(super) async fn authorize(ctx: &Ctx, name: &str, now: Timestamp) -> anyhow::Result<i32> {
    let (store, client) = store_and_client(ctx)?;
    let link = authorize::create_link(
        &store,
        &client,
        ctx.config.acumatica.redirect_uri.as_deref(),
        ctx.config.callback.state_ttl,
        name,
        now,
    )
    .await?;
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
    let url = Url::parse(redirect_url).map_err(|_| {
        anyhow::anyhow!(
            "--redirect-url is not a URL: paste the whole address the browser landed on"
        )
    })?;
    let mut code = None;
    let mut state = None;
    let mut error = None;
    for (k, v) in url.query_pairs() {
        match k.as_ref() {
            "code" => code = Some(v.into_owned()),
            "state" => state = Some(v.into_owned()),
            "error" => error = Some(v.into_owned()),
            _ => {}
        }
    }
    if let Some(e) = error {
        anyhow::bail!(
            "the authorization was not granted ({}): send the customer a new link",
            e.chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        );
    }
    let (Some(code), Some(state)) = (code, state) else {
        anyhow::bail!(
            "--redirect-url has no code and state: paste the address the browser landed on after the customer approved"
        );
    };
    let (store, client) = store_and_client(ctx)?;
    let policy = ctx.config.renewal.policy();
    let now = crate::clock::Clock::now(&crate::clock::SystemClock);
    match authorize::complete(&store, &client, &policy, &state, &code, Some(name), now).await? {
        authorize::Completion::Connected { name } => {
            println!("{name} is connected: grant stored, state active");
            Ok(0)
        }
        authorize::Completion::AlreadyConnected { name } => {
            println!("{name}: this link was already used; nothing changed");
            Ok(0)
        }
        authorize::Completion::UnknownState => anyhow::bail!(
            "that URL's state does not belong to an open authorization of `{name}`: nothing stored"
        ),
        authorize::Completion::Expired => anyhow::bail!(
            "that authorization link expired or was replaced: run `acutoken connection authorize {name}` and send the new link"
        ),
        authorize::Completion::Denied { error } => {
            anyhow::bail!("the authorization was not granted ({error})")
        }
        authorize::Completion::ExchangeFailed { name, reason } => {
            anyhow::bail!("exchanging the code for {name} failed: {reason}")
        }
        authorize::Completion::Disabled { name } => anyhow::bail!(
            "`{name}` is disabled, so this authorization was refused and nothing changed: run `acutoken connection enable {name}`, then `acutoken connection authorize {name}` and send the new link"
        ),
    }
}
