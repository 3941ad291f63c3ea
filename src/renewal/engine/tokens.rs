//! Access tokens for applications: from memory while the store is
//! unchanged, else read and opened, refreshing first when too little is left.

use super::*;

/// How long a token request waits for another process's refresh of the
/// same connection (a replica's, on PostgreSQL) before it answers 503.
const BUSY_WAIT: Duration = Duration::from_secs(10);
/// How often it looks meanwhile.
const BUSY_LOOK_EVERY: Duration = Duration::from_millis(100);

/// The most access tokens kept opened in memory; past it the cache starts over.
const TOKEN_CACHE_MAX: usize = 100_000;

/// Access tokens already read and opened, served while the store is unchanged.
///
/// Each hit asks SQLite for `PRAGMA data_version` on the cache's own
/// connection, which changes whenever any other connection (the engine, the
/// CLI, another daemon task) commits. Any commit empties the cache, so an
/// entry can never outlive a disable, a removal, a new token or a cleared
/// grant; expiry is checked against the clock and the current margin on every
/// hit, as the uncached path does.
pub(super) struct TokenCache {
    inner: Arc<Mutex<CacheInner>>,
}

pub(super) struct CacheInner {
    store: Store,
    version: i64,
    entries: HashMap<String, CachedToken>,
}

pub(super) struct CachedToken {
    token: IssuedToken,
    lifetime: Option<Duration>,
}

impl CacheInner {
    /// Empties the cache when anything was committed since it was filled.
    pub(super) fn check(&mut self) -> Result<i64, StoreError> {
        let v = self.store.data_version()?;
        if v != self.version {
            self.entries.clear();
            self.version = v;
        }
        Ok(v)
    }
}

impl Engine {
    /// Serves access tokens from memory while the store is unchanged (the
    /// daemon's token path). `reads` is a connection of its own: the cache
    /// learns of every commit by another connection, the engine's included.
    pub fn cache_tokens(&self, reads: Store) {
        let _ = self.tokens.set(TokenCache {
            inner: Arc::new(Mutex::new(CacheInner {
                store: reads,
                version: i64::MIN,
                entries: HashMap::new(),
            })),
        });
    }

    pub(super) fn forget_cached_tokens(&self) {
        if let Some(c) = self.tokens.get() {
            c.inner
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entries
                .clear();
        }
    }

    /// A cached token for `name` that is still usable now.
    pub(super) fn cached_token(&self, name: &str) -> Result<Option<IssuedToken>, StoreError> {
        let Some(cache) = self.tokens.get() else {
            return Ok(None);
        };
        let now = self.clock.now();
        let margin = self.policy().access_token_margin;
        let mut inner = cache.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.check()?;
        let usable = match inner.entries.get(name) {
            None => return Ok(None),
            Some(c) => {
                policy::access_token_usable(Some(c.token.expires_at), c.lifetime, margin, now)
            }
        };
        if usable {
            Ok(inner.entries.get(name).map(|c| c.token.clone()))
        } else {
            inner.entries.remove(name);
            Ok(None)
        }
    }

    /// Reads and opens `name`'s token through the cache's connection and keeps
    /// it; `None` when there is no cache or no usable token (the full path decides).
    pub(super) async fn fill_token_cache(
        &self,
        name: &str,
    ) -> Result<Option<IssuedToken>, EngineError> {
        let Some(cache) = self.tokens.get() else {
            return Ok(None);
        };
        let handle = cache.inner.clone();
        let n = name.to_string();
        let now = self.clock.now();
        let margin = self.policy().access_token_margin;
        let read = crate::store::blocking::with_shared(&handle, move |inner| {
            let version = inner.check()?;
            let row = match inner.store.get(&n) {
                Ok(r) => r,
                Err(StoreError::UnknownConnection(_)) => return Ok(None),
                Err(e) => return Err(e),
            };
            // The same conditions as `usable_token`.
            if row.conn.state == State::Disabled
                || !row.has_access_token
                || !policy::access_token_usable(
                    row.conn.access_expires_at,
                    row.access_lifetime,
                    margin,
                    now,
                )
            {
                return Ok(None);
            }
            let token = inner.store.secret(row.conn.id, SecretColumn::AccessToken)?;
            Ok::<_, StoreError>(token.map(|t| (version, row, t)))
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
        let Some((version, row, token)) = read else {
            return Ok(None);
        };
        let issued = IssuedToken {
            access_token: token,
            token_type: row.token_type.clone().unwrap_or_else(|| "Bearer".into()),
            expires_at: row.conn.access_expires_at.unwrap_or(now),
            instance: row.conn.instance.clone(),
            base_url: self.client().base_url(&row.conn.instance),
        };
        let mut inner = cache.inner.lock().unwrap_or_else(|e| e.into_inner());
        // Kept only if nothing was committed since the row was read.
        if inner.check()? == version {
            if inner.entries.len() >= TOKEN_CACHE_MAX {
                inner.entries.clear();
            }
            inner.entries.insert(
                name.to_string(),
                CachedToken {
                    token: issued.clone(),
                    lifetime: row.access_lifetime,
                },
            );
        }
        Ok(Some(issued))
    }

    /// Hands out a valid access token, refreshing first when less than the margin
    /// is left (single-flight; at most one token-driven refresh per connection per minute).
    pub async fn token(&self, name: &str) -> Result<TokenAnswer, EngineError> {
        if let Some(t) = self.cached_token(name)? {
            return Ok(TokenAnswer::Token(Box::new(t)));
        }
        if let Some(t) = self.fill_token_cache(name).await? {
            return Ok(TokenAnswer::Token(Box::new(t)));
        }
        let n = name.to_string();
        let row = self.store.read_row(move |st| st.get(&n)).await?;
        let id = row.conn.id;
        if let Some(a) = self.usable_token(&row).await? {
            return Ok(a);
        }
        if row.conn.state.needs_human() || row.conn.state == State::Disabled {
            return Ok(TokenAnswer::NeedsHuman(Box::new(row)));
        }
        let lock = self.lock_for(id);
        let mut last = lock.lock().await;
        // Someone may have refreshed while we waited for the lock.
        let row = self.store.read_row(move |st| st.get_by_id(id)).await?;
        let Some(row) = row else {
            return Err(StoreError::UnknownConnection(name.to_string()).into());
        };
        if let Some(a) = self.usable_token(&row).await? {
            return Ok(a);
        }
        if !row.conn.state.is_scheduled() {
            return Ok(TokenAnswer::NeedsHuman(Box::new(row)));
        }
        let now = self.clock.now();
        if let Some(prev) = *last {
            let wait = prev + chrono::Duration::minutes(1) - now;
            if wait > chrono::Duration::zero() {
                return Ok(TokenAnswer::Unavailable {
                    retry_after: wait.to_std().unwrap_or(Duration::from_secs(60)),
                    reason: "a token-driven refresh ran less than a minute ago and failed".into(),
                });
            }
        }
        *last = Some(now);
        let trigger = Trigger::Token {
            version: row.version,
        };
        let rep = self.refresh_locked(id, trigger).await?;
        if rep.outcome == "busy" || rep.outcome == "skipped" {
            // Another process (another replica) is refreshing it, or has
            // since this request read the row: the token it saves answers
            // this request too. Nothing was sent from here, so the minute
            // between refreshes does not start.
            *last = None;
            let until = tokio::time::Instant::now() + BUSY_WAIT;
            while tokio::time::Instant::now() < until {
                tokio::time::sleep(BUSY_LOOK_EVERY).await;
                let row = self.store.read_row(move |st| st.get_by_id(id)).await?;
                let Some(row) = row else { break };
                if let Some(a) = self.usable_token(&row).await? {
                    return Ok(a);
                }
                if row.claim.is_none() {
                    break;
                }
            }
        }
        let row = self.store.read_row(move |st| st.get_by_id(id)).await?;
        let Some(row) = row else {
            return Err(StoreError::UnknownConnection(name.to_string()).into());
        };
        if let Some(a) = self.usable_token(&row).await? {
            *last = None;
            return Ok(a);
        }
        if row.conn.state.needs_human() || row.conn.state == State::Disabled {
            return Ok(TokenAnswer::NeedsHuman(Box::new(row)));
        }
        Ok(TokenAnswer::Unavailable {
            retry_after: rep
                .retry_after
                .or_else(|| {
                    row.conn
                        .next_refresh_at
                        .and_then(|t| (t - now).to_std().ok())
                })
                .unwrap_or(Duration::from_secs(60))
                .max(Duration::from_secs(1)),
            reason: rep.detail,
        })
    }

    pub(super) async fn usable_token(
        &self,
        row: &ConnectionRow,
    ) -> Result<Option<TokenAnswer>, EngineError> {
        let now = self.clock.now();
        let policy = self.policy();
        if row.conn.state == State::Disabled
            || !row.has_access_token
            || !policy::access_token_usable(
                row.conn.access_expires_at,
                row.access_lifetime,
                policy.access_token_margin,
                now,
            )
        {
            return Ok(None);
        }
        let id = row.conn.id;
        let token = self
            .store
            .read_row(move |st| st.secret(id, SecretColumn::AccessToken))
            .await?;
        Ok(token.map(|t| {
            TokenAnswer::Token(Box::new(IssuedToken {
                access_token: t,
                token_type: row.token_type.clone().unwrap_or_else(|| "Bearer".into()),
                expires_at: row.conn.access_expires_at.unwrap_or(now),
                instance: row.conn.instance.clone(),
                base_url: self.client().base_url(&row.conn.instance),
            }))
        }))
    }
}

/// A token ready for an application.
#[derive(Debug, Clone, Serialize)]
pub struct IssuedToken {
    pub access_token: Secret,
    pub token_type: String,
    #[serde(serialize_with = "ser_time")]
    pub expires_at: Timestamp,
    pub instance: String,
    pub base_url: String,
}

pub(super) fn ser_time<S: serde::Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&fmt_time(*t))
}

/// What `token` gives.
#[derive(Debug)]
pub enum TokenAnswer {
    Token(Box<IssuedToken>),
    /// A human must act, or the connection is disabled (API: 409).
    NeedsHuman(Box<ConnectionRow>),
    /// Refreshing is failing transiently (API: 503 with Retry-After).
    Unavailable {
        retry_after: Duration,
        reason: String,
    },
}
