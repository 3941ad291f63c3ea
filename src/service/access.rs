//! The use cases that reach Acumatica: authorize (a link for the customer),
//! complete (the code exchange from a pasted redirect), refresh, token.

use std::time::Duration;

use url::Url;

use super::{Connections, EngineSetupError};
use crate::acumatica::ClientBuildError;
use crate::model::Timestamp;
use crate::renewal::authorize::{self, Completion, Link, LinkError};
use crate::renewal::engine::{EngineError, IssuedToken, RefreshReport, TokenAnswer, Trigger};
use crate::store::StoreError;

/// Why no authorization link was made.
#[derive(Debug, thiserror::Error)]
pub enum AuthorizeError {
    #[error(transparent)]
    Client(#[from] ClientBuildError),
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// How `complete` stored a grant.
pub enum Completed {
    /// The grant is stored: the connection is active.
    Connected { name: String },
    /// This link was used before: nothing changed.
    AlreadyConnected { name: String },
}

/// Why `complete` stored nothing.
#[derive(Debug, thiserror::Error)]
pub enum CompleteError {
    #[error("--redirect-url is not a URL: paste the whole address the browser landed on")]
    NotUrl,
    /// The redirect carries an error instead of a code (only `[A-Za-z0-9_]` kept).
    #[error("the authorization was not granted ({0}): send the customer a new link")]
    NotGranted(String),
    #[error(
        "--redirect-url has no code and state: paste the address the browser landed on after the customer approved"
    )]
    NoCode,
    #[error("that URL's state does not belong to an open authorization of `{0}`: nothing stored")]
    UnknownState(String),
    #[error(
        "that authorization link expired or was replaced: run `acutoken connection authorize {0}` and send the new link"
    )]
    Expired(String),
    /// Acumatica reported an error on the exchange's redirect.
    #[error("the authorization was not granted ({0})")]
    Denied(String),
    #[error("exchanging the code for {name} failed: {reason}")]
    ExchangeFailed { name: String, reason: String },
    #[error(
        "`{0}` is disabled, so this authorization was refused and nothing changed: run `acutoken connection enable {0}`, then `acutoken connection authorize {0}` and send the new link"
    )]
    Disabled(String),
    #[error(transparent)]
    Client(#[from] ClientBuildError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a refresh gave no report.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Setup(#[from] EngineSetupError),
    /// Another process held the claim for as long as this waited.
    #[error("{name}: {detail}; try again shortly")]
    Busy { name: String, detail: String },
}

impl From<StoreError> for RefreshError {
    fn from(e: StoreError) -> Self {
        RefreshError::Engine(EngineError::Store(e))
    }
}

/// Why no access token was handed out.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// A human must act, or the connection is disabled (API: 409).
    #[error("{name} is {state}: {action}")]
    NeedsHuman {
        name: String,
        state: String,
        action: String,
    },
    /// Refreshing is failing transiently (API: 503 with Retry-After).
    #[error("no valid access token for {name} right now: {reason}; retry in {retry_after} s")]
    Unavailable {
        name: String,
        reason: String,
        /// Seconds, at least 1.
        retry_after: u64,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Setup(#[from] EngineSetupError),
}

/// A rotated refresh token this process could not save.
#[derive(Debug, thiserror::Error)]
#[error(
    "a rotated refresh token could not be saved to the store; it is spilled (sealed) for the daemon to import at its next start: fix the store (disk space, permissions) and start the daemon"
)]
pub struct UnsavedError;

/// The code and state of the redirect the customer's browser landed on.
pub struct Redirect {
    code: String,
    state: String,
}

impl Redirect {
    /// Reads the address pasted whole (`connection complete --redirect-url`).
    pub fn parse(redirect_url: &str) -> Result<Redirect, CompleteError> {
        let url = Url::parse(redirect_url).map_err(|_| CompleteError::NotUrl)?;
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
            return Err(CompleteError::NotGranted(
                e.chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect(),
            ));
        }
        let (Some(code), Some(state)) = (code, state) else {
            return Err(CompleteError::NoCode);
        };
        Ok(Redirect { code, state })
    }
}

impl Connections {
    /// `authorize`: opens (or replaces) the connection's authorization link.
    pub async fn authorize(&self, name: &str, now: Timestamp) -> Result<Link, AuthorizeError> {
        let store = self.handle().map_err(LinkError::from)?;
        let client = self.client()?;
        Ok(authorize::create_link(
            &store,
            &client,
            self.config.acumatica.redirect_uri.as_deref(),
            self.config.callback.state_ttl,
            name,
            now,
        )
        .await?)
    }

    /// `complete`: exchanges the code of `redirect` for `name`'s grant.
    pub async fn complete(
        &self,
        name: &str,
        redirect: Redirect,
        now: Timestamp,
    ) -> Result<Completed, CompleteError> {
        let Redirect { code, state } = redirect;
        let store = self.handle()?;
        let client = self.client()?;
        let policy = self.config.renewal.policy();
        let n = name.to_string();
        match authorize::complete(&store, &client, &policy, &state, &code, Some(name), now).await? {
            Completion::Connected { name } => Ok(Completed::Connected { name }),
            Completion::AlreadyConnected { name } => Ok(Completed::AlreadyConnected { name }),
            Completion::UnknownState => Err(CompleteError::UnknownState(n)),
            Completion::Expired => Err(CompleteError::Expired(n)),
            Completion::Denied { error } => Err(CompleteError::Denied(error)),
            Completion::ExchangeFailed { name, reason } => {
                Err(CompleteError::ExchangeFailed { name, reason })
            }
            Completion::Disabled { name } => Err(CompleteError::Disabled(name)),
        }
    }

    /// An operator's refresh, once: at most one a minute per connection
    /// ([`crate::renewal::engine::MANUAL_REFRESH_EVERY`]); a claim held
    /// elsewhere is reported as the outcome `busy`.
    pub async fn refresh_now(&self, name: &str) -> Result<RefreshReport, RefreshError> {
        let row = self.get(name).await?;
        let mut rep = self.engine()?.refresh_manual(row.conn.id).await?;
        if rep.connection.is_empty() {
            rep.connection = name.to_string();
        }
        Ok(rep)
    }

    /// An operator's refresh that waits up to `patience` for a claim held
    /// by another process, for its outcome rather than sending twice.
    pub async fn refresh_waiting(
        &self,
        name: &str,
        patience: Duration,
    ) -> Result<RefreshReport, RefreshError> {
        let engine = self.engine()?;
        let row = self.get(name).await?;
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let mut r = engine.refresh(row.conn.id, Trigger::OnDemand).await?;
            if r.outcome != "busy" {
                r.connection = row.conn.name.clone();
                return Ok(r);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RefreshError::Busy {
                    name: name.to_string(),
                    detail: r.detail,
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `token`: a valid access token for `name`, refreshing first when the
    /// one held is close to expiry.
    pub async fn token(&self, name: &str) -> Result<Box<IssuedToken>, TokenError> {
        match self.engine()?.token(name).await? {
            TokenAnswer::Token(t) => Ok(t),
            TokenAnswer::NeedsHuman(row) => Err(TokenError::NeedsHuman {
                name: name.to_string(),
                state: row.conn.state.to_string(),
                action: row
                    .conn
                    .state
                    .action()
                    .unwrap_or("")
                    .replace("NAME", &row.conn.name),
            }),
            TokenAnswer::Unavailable {
                retry_after,
                reason,
            } => Err(TokenError::Unavailable {
                name: name.to_string(),
                reason,
                retry_after: retry_after.as_secs().max(1),
            }),
        }
    }

    /// Before a one-shot process ends: a rotated token it could not save is
    /// retried for a while; it never ends successfully with one unsaved.
    pub async fn settle(&self) -> Result<(), UnsavedError> {
        let Some(engine) = self.engine.get() else {
            return Ok(());
        };
        for _ in 0..10 {
            if engine.retry_unsaved().await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        Err(UnsavedError)
    }
}
