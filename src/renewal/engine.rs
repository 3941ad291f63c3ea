//! The engine: claim -> request -> save, for one connection at a time.
//!
//! DESIGN §3's invariants live here. A token request is sent only under a
//! durable claim (invariant 1). A rotated refresh token is saved in the same
//! transaction that releases the claim, before the new access token is handed
//! to anyone; when that save fails the token is held in memory, spilled sealed
//! to `$RUNTIME_DIRECTORY/pending/`, no other refresh starts, and the save is
//! retried until it succeeds (invariant 2).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use uuid::Uuid;

use super::limits::Limits;
use super::policy::{self, Failure, Policy};
use super::spill::{self, Spilled};
use crate::acumatica::{TokenClient, TokenError, TokenGrant};
use crate::clock::SharedClock;
use crate::model::ConnectionRow;
use crate::model::{FailureKind, State, Timestamp, fmt_time};
use crate::secret::Secret;
pub use crate::store::claims::Trigger;
use crate::store::claims::{self, ClaimOutcome, Found, Owner};
use crate::store::connections::SecretColumn;
use crate::store::refresh::{DesiredAlerts, Settled, Settlement};
use crate::store::{Store, StoreError, StoreHandle};

/// What a refresh attempt came to.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RefreshReport {
    pub connection: String,
    /// `refreshed`, `failed`, `busy` (another process is refreshing it) or
    /// `refused` (a human must act; nothing was sent).
    pub outcome: String,
    pub state: State,
    pub detail: String,
    pub next_refresh_at: Option<Timestamp>,
    pub deadline: Option<Timestamp>,
    #[serde(skip)]
    pub retry_after: Option<Duration>,
}

/// Failures of the engine itself (not of the token request, which is an outcome).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A store problem: reported; the connection is left as it was.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A rotated token could not be saved: it is held and retried; nothing else refreshes.
    #[error(
        "a rotated refresh token could not be saved yet ({0}); it is kept in memory and spilled, and the save is retried"
    )]
    Unsaved(String),
    /// The daemon is stopping and makes no new claims: ask again after it restarts.
    #[error("acutoken is stopping and starts no new refresh")]
    Stopping,
    /// An operator's refresh of this connection ran moments ago: ask again after the wait.
    #[error(
        "this connection was refreshed on request less than a minute ago; try again in {}s",
        .0.as_secs().max(1)
    )]
    RateLimited(Duration),
}

/// At most one operator refresh per connection this often (API and CLI through the daemon).
pub const MANUAL_REFRESH_EVERY: Duration = Duration::from_secs(60);

/// An outcome the store has not accepted yet (invariant 2).
struct PendingSave {
    basis: claims::Basis,
    /// The outcome applied to the row as claimed: what is spilled and
    /// reported while the store will not take it. The save itself applies
    /// `facts` again to the row as it is then.
    row: ConnectionRow,
    facts: GrantFacts,
    refresh_token: Option<Secret>,
    access_token: Secret,
    detail: String,
}

/// What a successful answer says, enough to apply it to any version of the row.
#[derive(Debug, Clone)]
struct GrantFacts {
    rotated: bool,
    expires_in: Option<Duration>,
    token_type: String,
    received_at: Timestamp,
    jitter: f64,
}

impl GrantFacts {
    /// Applies the success to `row`. A connection an operator turned off (or
    /// otherwise took out of the schedule) while the request was in flight
    /// stays as the operator left it: it keeps the new tokens, and gets no
    /// plan and no served token until it is enabled. Returns the computed
    /// deadline the token outlived, if any.
    fn apply(&self, row: &mut ConnectionRow, policy: &Policy) -> Option<Timestamp> {
        let kept = (!row.conn.state.is_scheduled()).then(|| {
            (
                row.conn.state,
                row.conn.next_refresh_at,
                row.conn.last_error.clone(),
            )
        });
        let update = policy::after_success(
            &row.conn,
            self.rotated,
            self.expires_in,
            self.received_at,
            policy,
            self.jitter,
        );
        update.apply(&mut row.conn);
        row.failures = 0;
        row.failing_since = None;
        row.outcome_unknown = false;
        row.has_access_token = true;
        row.access_lifetime = self.expires_in;
        row.token_type = Some(self.token_type.clone());
        if let Some((state, next, error)) = kept {
            row.conn.state = state;
            row.conn.next_refresh_at = next;
            row.conn.last_error = error;
        }
        update.outlived_deadline
    }
}

/// Applies a failed request to `row` (failure count, backoff, next state);
/// returns the reason recorded.
fn apply_failure(
    row: &mut ConnectionRow,
    err: &TokenError,
    after_unknown: bool,
    policy: &Policy,
    now: Timestamp,
    jitter: f64,
) -> String {
    row.failures = if err.kind == FailureKind::Transient {
        row.failures.saturating_add(1)
    } else {
        0
    };
    if err.kind == FailureKind::Transient && row.failing_since.is_none() {
        row.failing_since = Some(now);
    }
    if !row.conn.state.is_scheduled() {
        // Disabled while the request was in flight: the operator's word stands.
        return format!(
            "{} (the connection was {} meanwhile)",
            err.reason, row.conn.state
        );
    }
    let decision = policy::after_failure(
        &row.conn,
        &Failure {
            kind: err.kind,
            failures: row.failures.max(1),
            retry_after: err.retry_after,
            unknown_outcome: after_unknown,
        },
        now,
        policy,
        jitter,
    );
    decision.apply(&mut row.conn);
    let reason = if err.kind == FailureKind::Transient {
        format!("{}; {}", err.reason, decision.last_error)
    } else {
        format!("{} ({})", decision.last_error, err.reason)
    };
    row.conn.last_error = Some(reason.clone());
    if err.kind != FailureKind::Transient {
        row.failing_since = None;
    }
    if err.sent && err.kind != FailureKind::Transient {
        // A definite answer: the token's fate is known. (Nothing that left the
        // process unanswered clears an unknown outcome.)
        row.outcome_unknown = false;
    }
    reason
}

/// The alerts a row calls for under `policy` at `now`, as the store asks for them.
fn desired(policy: Arc<Policy>, now: Timestamp) -> DesiredAlerts {
    Box::new(move |row| crate::renewal::alert_conditions::desired(row, &policy, now))
}

/// Hooks the daemon gives the engine: raised alerts wake the delivery worker,
/// unsaved tokens are announced directly.
pub trait Hooks: Send + Sync + 'static {
    /// An alert was written to the outbox.
    fn alerts_raised(&self) {}
    /// A rotated token could not be saved (send `store_write_failed` directly).
    fn store_write_failed(&self, _connection: &str, _id: Uuid, _error: &str) {}
    /// A refresh finished (metrics).
    fn refreshed(&self, _outcome: &'static str, _seconds: f64) {}
}

/// No hooks (CLI use).
pub struct NoHooks;
impl Hooks for NoHooks {}

/// The per-connection lock map is swept of idle entries when it reaches this size.
const LOCK_SWEEP_AT: usize = 4096;

/// What an engine is made of.
pub struct EngineParts {
    pub store: StoreHandle,
    pub client: TokenClient,
    pub policy: Policy,
    pub clock: SharedClock,
    /// Who claims: the daemon, or a CLI process.
    pub owner: Owner,
    /// `renewal.http_timeout`: claims outlive any request.
    pub http_timeout: Duration,
    /// Where unsaved tokens are spilled (`$RUNTIME_DIRECTORY/pending`).
    pub spill_dir: Option<PathBuf>,
    pub hooks: Arc<dyn Hooks>,
    /// `renewal.max_concurrent` and `renewal.per_instance_concurrent`.
    pub limits: Arc<Limits>,
}

/// The renewal engine.
pub struct Engine {
    store: StoreHandle,
    client: std::sync::RwLock<TokenClient>,
    policy: Mutex<Arc<Policy>>,
    clock: SharedClock,
    owner: Owner,
    claim_ttl: Duration,
    spill_dir: Option<PathBuf>,
    pending: Mutex<HashMap<Uuid, PendingSave>>,
    blocked: AtomicBool,
    stopping: AtomicBool,
    locks: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<Option<Timestamp>>>>>,
    hooks: Arc<dyn Hooks>,
    limits: Arc<Limits>,
    /// When each connection was last refreshed on an operator's request.
    manual: Mutex<HashMap<Uuid, Timestamp>>,
    /// Opened access tokens, when the daemon turned the cache on.
    tokens: std::sync::OnceLock<TokenCache>,
}

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
struct TokenCache {
    inner: Arc<Mutex<CacheInner>>,
}

struct CacheInner {
    store: Store,
    version: i64,
    entries: HashMap<String, CachedToken>,
}

struct CachedToken {
    token: IssuedToken,
    lifetime: Option<Duration>,
}

impl CacheInner {
    /// Empties the cache when anything was committed since it was filled.
    fn check(&mut self) -> Result<i64, StoreError> {
        let v = self.store.data_version()?;
        if v != self.version {
            self.entries.clear();
            self.version = v;
        }
        Ok(v)
    }
}

impl Engine {
    pub fn new(parts: EngineParts) -> Engine {
        let EngineParts {
            store,
            client,
            policy,
            clock,
            owner,
            http_timeout,
            spill_dir,
            hooks,
            limits,
        } = parts;
        Engine {
            store,
            client: std::sync::RwLock::new(client),
            policy: Mutex::new(Arc::new(policy)),
            clock,
            owner,
            // Longer than any request can take, so a live claim is never taken over.
            claim_ttl: http_timeout * 2 + Duration::from_secs(30),
            spill_dir,
            pending: Mutex::new(HashMap::new()),
            blocked: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            locks: Mutex::new(HashMap::new()),
            hooks,
            limits,
            manual: Mutex::new(HashMap::new()),
            tokens: std::sync::OnceLock::new(),
        }
    }

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

    fn forget_cached_tokens(&self) {
        if let Some(c) = self.tokens.get() {
            c.inner
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entries
                .clear();
        }
    }

    /// A cached token for `name` that is still usable now.
    fn cached_token(&self, name: &str) -> Result<Option<IssuedToken>, StoreError> {
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
    async fn fill_token_cache(&self, name: &str) -> Result<Option<IssuedToken>, EngineError> {
        let Some(cache) = self.tokens.get() else {
            return Ok(None);
        };
        let handle = cache.inner.clone();
        let n = name.to_string();
        let now = self.clock.now();
        let margin = self.policy().access_token_margin;
        let read = tokio::task::spawn_blocking(move || {
            let mut inner = handle.lock().unwrap_or_else(|e| e.into_inner());
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

    pub fn store(&self) -> &StoreHandle {
        &self.store
    }

    /// The token client (cheap clone of a shared client).
    pub fn client(&self) -> TokenClient {
        self.client
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Swaps the token client (SIGHUP: timeout, CA file, address policy, scopes).
    pub fn set_client(&self, client: TokenClient) {
        *self.client.write().unwrap_or_else(|e| e.into_inner()) = client;
        // Cached answers carry the client's base URL.
        self.forget_cached_tokens();
    }

    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Swaps the policy (SIGHUP); refreshes in flight keep the one they started with.
    pub fn set_policy(&self, policy: Policy) {
        *self.policy.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    /// Shutdown: no new claims from now on; refreshes in flight finish and save.
    pub fn stop_claims(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// True while a rotated token waits to be saved: no refresh may start.
    pub fn is_blocked(&self) -> bool {
        self.blocked.load(Ordering::SeqCst)
    }

    /// How many rotated tokens wait to be saved.
    pub fn unsaved(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The per-connection single-flight lock; its value is the last token-driven refresh.
    fn lock_for(&self, id: Uuid) -> Arc<tokio::sync::Mutex<Option<Timestamp>>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        // Sweeping at powers of two keeps the cost amortised when many stay busy.
        if locks.len() >= LOCK_SWEEP_AT && locks.len().is_power_of_two() && !locks.contains_key(&id)
        {
            // Keep only locks someone holds or waits on, and the ones still
            // enforcing the one-token-refresh-a-minute rule.
            let now = self.clock.now();
            locks.retain(|_, l| {
                Arc::strong_count(l) > 1
                    || l.try_lock().map_or(true, |last| {
                        last.is_some_and(|t| now - t < chrono::Duration::minutes(1))
                    })
            });
        }
        locks.entry(id).or_default().clone()
    }

    /// The concurrency limits every request of this engine holds.
    pub fn limits(&self) -> &Arc<Limits> {
        &self.limits
    }

    /// Forgets a removed connection's lock.
    pub fn forget(&self, id: Uuid) {
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// Refreshes connection `id` now, under a claim. One at a time per connection.
    pub async fn refresh(&self, id: Uuid, trigger: Trigger) -> Result<RefreshReport, EngineError> {
        let lock = self.lock_for(id);
        let _guard = lock.lock().await;
        self.refresh_locked(id, trigger).await
    }

    /// An operator's refresh (the API's `POST .../refresh`, `connection
    /// refresh` through the daemon): at most one per connection per
    /// [`MANUAL_REFRESH_EVERY`], so a script in a loop cannot log in to a
    /// customer's instance past its API login limits.
    pub async fn refresh_manual(&self, id: Uuid) -> Result<RefreshReport, EngineError> {
        let now = self.clock.now();
        {
            let mut last = self.manual.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(prev) = last.get(&id) {
                let wait = *prev
                    + chrono::Duration::from_std(MANUAL_REFRESH_EVERY).unwrap_or_default()
                    - now;
                if wait > chrono::Duration::zero() {
                    return Err(EngineError::RateLimited(
                        wait.to_std().unwrap_or(MANUAL_REFRESH_EVERY),
                    ));
                }
            }
            if last.len() >= LOCK_SWEEP_AT {
                let every = chrono::Duration::from_std(MANUAL_REFRESH_EVERY).unwrap_or_default();
                last.retain(|_, t| now - *t < every);
            }
            last.insert(id, now);
        }
        self.refresh(id, Trigger::OnDemand).await
    }

    async fn refresh_locked(
        &self,
        id: Uuid,
        trigger: Trigger,
    ) -> Result<RefreshReport, EngineError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(EngineError::Stopping);
        }
        if self.is_blocked() {
            return Err(EngineError::Unsaved(
                "another connection's rotated token is not saved yet".into(),
            ));
        }
        // The place within the limits is taken before the claim: a claim must
        // never wait in a queue while its expiry runs.
        let instance = self.store.read(move |st| st.get_by_id(id)).await?;
        let Some(instance) = instance.map(|r| r.conn.instance) else {
            return Err(StoreError::UnknownConnection(id.to_string()).into());
        };
        let _permit = self.limits.acquire(&instance).await;
        if self.stopping.load(Ordering::SeqCst) {
            return Err(EngineError::Stopping);
        }
        let now = self.clock.now();
        let owner = self.owner.clone();
        let ttl = self.claim_ttl;
        let policy = self.policy();
        let claim_policy = policy.clone();
        let outcome = self
            .store
            .claim(id, owner, ttl, trigger, now, desired(claim_policy, now))
            .await?;
        let claim = match outcome {
            ClaimOutcome::Claimed(c) => c,
            ClaimOutcome::Busy { owner, until } => {
                return Ok(RefreshReport {
                    connection: String::new(),
                    outcome: "busy".into(),
                    state: State::Active,
                    detail: format!(
                        "{} is refreshing it now (claim until {})",
                        Owner::describe(&owner),
                        fmt_time(until)
                    ),
                    next_refresh_at: None,
                    deadline: None,
                    retry_after: Some(Duration::from_secs(1)),
                });
            }
            ClaimOutcome::NotRefreshable(row) => {
                let c = &row.conn;
                let detail = match c.state {
                    State::Active | State::Retrying => {
                        "no client secret or refresh token is stored".to_string()
                    }
                    s => s.action().unwrap_or("").replace("NAME", &c.name),
                };
                return Ok(report(&row, "refused", detail, None));
            }
            ClaimOutcome::NotDue(row) => {
                return Ok(report(
                    &row,
                    "skipped",
                    "refreshed from elsewhere since it fell due; the plan moved".into(),
                    None,
                ));
            }
            ClaimOutcome::Lost(row) => {
                self.hooks.alerts_raised();
                return Ok(report(&row, "failed", claims::LOST_TOKEN.into(), None));
            }
        };
        let started = std::time::Instant::now();
        let c = &claim.row.conn;
        tracing::debug!(connection = %c.name, instance = %c.instance, "refreshing");
        let result = self
            .client()
            .refresh(
                &c.instance,
                &c.client_id,
                &claim.client_secret,
                &claim.refresh_token,
            )
            .await;
        let seconds = started.elapsed().as_secs_f64();
        let report = match result {
            Ok(grant) => self.succeeded(*claim, grant, &policy).await?,
            Err(err) => self.failed(*claim, err, &policy).await?,
        };
        self.hooks
            .refreshed(outcome_label(&report.outcome), seconds);
        tracing::info!(
            connection = %report.connection,
            outcome = %report.outcome,
            state = %report.state,
            duration_ms = (seconds * 1000.0) as u64,
            next = report.next_refresh_at.map(fmt_time).unwrap_or_default(),
            detail = %report.detail,
            "refresh attempt"
        );
        Ok(report)
    }

    async fn succeeded(
        &self,
        claim: claims::Claim,
        grant: TokenGrant,
        policy: &Policy,
    ) -> Result<RefreshReport, EngineError> {
        let facts = GrantFacts {
            rotated: grant.refresh_token.is_some(),
            expires_in: grant.expires_in,
            token_type: grant.token_type.clone(),
            received_at: self.clock.now(),
            jitter: rand::random(),
        };
        let mut row = claim.row;
        let outlived = facts.apply(&mut row, policy);
        let mut detail = if facts.rotated {
            "refreshed; the refresh token was rotated".to_string()
        } else {
            "refreshed; the server kept the refresh token".to_string()
        };
        if let Some(d) = outlived {
            detail = format!(
                "{detail}; the token outlived its computed deadline {} (the lifetime is longer than configured): deadline now observed",
                fmt_time(d)
            );
            tracing::warn!(connection = %row.conn.name, "refresh token outlived its computed deadline; check the connection's lifetime");
        }
        let pending = PendingSave {
            basis: claim.basis,
            row,
            facts,
            refresh_token: grant.refresh_token,
            access_token: grant.access_token,
            detail,
        };
        self.save(pending, policy.clone()).await
    }

    /// Saves a successful outcome into the row as it is now; on a write
    /// failure, holds and spills it (invariant 2).
    async fn save(&self, p: PendingSave, policy: Policy) -> Result<RefreshReport, EngineError> {
        let now = self.clock.now();
        let basis = p.basis.clone();
        let facts = p.facts.clone();
        let rt = p.refresh_token.clone();
        let at = p.access_token.clone();
        let detail = p.detail.clone();
        let alerts = desired(Arc::new(policy.clone()), now);
        let res = self
            .store
            .settle(
                basis,
                now,
                move |found| match found {
                    Found::Removed => Settlement::Removed,
                    Found::Overtaken { row, reason, .. } => Settlement::Discard {
                        row: Box::new(row),
                        why: format!("{reason}: the token it obtained is discarded"),
                        replan: false,
                    },
                    Found::Current { mut row, ours, .. } => {
                        facts.apply(&mut row, &policy);
                        let detail = if ours {
                            detail
                        } else {
                            // Only possible when this process stalled past the claim's
                            // expiry. The token is still the newest one: keep it.
                            tracing::error!(connection = %row.conn.name, "claim lost before the save; saved the rotated token anyway");
                            format!("{detail}; saved after the claim was taken over")
                        };
                        Settlement::Finish {
                            row: Box::new(row),
                            ours,
                            refresh_token: rt,
                            access_token: Some(at),
                            event: "refreshed",
                            detail,
                            state_event: None,
                        }
                    }
                },
                alerts,
            )
            .await;
        match res {
            Ok(landed) => Ok(self.landed(landed, "refreshed", None, &p.row)),
            Err(e) => {
                let msg = e.to_string();
                self.hold(p, &msg);
                Err(EngineError::Unsaved(msg))
            }
        }
    }

    fn hold(&self, p: PendingSave, error: &str) {
        let name = p.row.conn.name.clone();
        tracing::error!(connection = %name, error, "cannot save a rotated refresh token: holding it in memory and retrying; no other refresh starts");
        self.blocked.store(true, Ordering::SeqCst);
        if let Some(dir) = &self.spill_dir {
            let keyring = self.store.keyring();
            let s = Spilled::new(
                &keyring,
                p.basis.attempt,
                &p.row,
                p.refresh_token.as_ref(),
                &p.access_token,
            );
            match spill::write(dir, &s) {
                Ok(path) => {
                    tracing::warn!(connection = %name, path = %path.display(), "spilled the unsaved token (sealed) for the next start")
                }
                Err(e) => {
                    tracing::error!(connection = %name, error = %e, "cannot spill the unsaved token either; it lives only in memory")
                }
            }
        }
        self.hooks.store_write_failed(&name, p.row.conn.id, error);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p.row.conn.id, p);
    }

    /// Tries to save every held token; true when none is left. Called every few seconds.
    pub async fn retry_unsaved(&self) -> bool {
        let held: Vec<PendingSave> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, p)| p)
            .collect();
        let policy = self.policy();
        for p in held {
            let id = p.row.conn.id;
            let name = p.row.conn.name.clone();
            // `save` re-holds it on failure; a removed or overtaken connection
            // needs it no more.
            if let Ok(r) = self.save(p, (*policy).clone()).await {
                if r.outcome == "refreshed" {
                    tracing::info!(connection = %name, "the held refresh token is saved");
                }
                if let Some(dir) = &self.spill_dir {
                    spill::remove(dir, id);
                }
            }
        }
        let empty = self.unsaved() == 0;
        if empty {
            self.blocked.store(false, Ordering::SeqCst);
        }
        empty
    }

    async fn failed(
        &self,
        claim: claims::Claim,
        err: TokenError,
        policy: &Policy,
    ) -> Result<RefreshReport, EngineError> {
        let now = self.clock.now();
        let basis = claim.basis;
        let after_unknown = claim.after_unknown;
        let claimed = claim.row;
        let policy = policy.clone();
        let jitter: f64 = rand::random();
        let retry_after = err.retry_after;
        let alerts = desired(Arc::new(policy.clone()), now);
        let landed = self
            .store
            .settle(
                basis,
                now,
                move |found| match found {
                    Found::Removed => Settlement::Removed,
                    Found::Overtaken { row, reason, .. } => Settlement::Discard {
                        row: Box::new(row),
                        why: format!("{reason}: its failure ({}) is not applied", err.reason),
                        replan: false,
                    },
                    Found::Current {
                        mut row,
                        secret_changed: true,
                        ..
                    } if err.kind == FailureKind::InvalidClient => {
                        // The refusal was of the old secret; the new one is proven by the next try.
                        let replan = row.conn.state.is_scheduled();
                        if replan {
                            row.conn.next_refresh_at = Some(now);
                        }
                        Settlement::Discard {
                            row: Box::new(row),
                            why: format!(
                                "the instance refused the client secret the request was sent with ({}), but a new secret was entered meanwhile; it is tried next",
                                err.reason
                            ),
                            replan,
                        }
                    }
                    Found::Current { mut row, ours, .. } => {
                        let reason =
                            apply_failure(&mut row, &err, after_unknown, &policy, now, jitter);
                        let event = if err.kind == FailureKind::Transient {
                            "refresh_failed"
                        } else {
                            "refresh_refused"
                        };
                        let state_event = (row.conn.state != State::Retrying)
                            .then(|| row.conn.state.as_str().to_string());
                        Settlement::Finish {
                            row: Box::new(row),
                            ours,
                            refresh_token: None,
                            access_token: None,
                            event,
                            detail: reason,
                            state_event,
                        }
                    }
                },
                alerts,
            )
            .await?;
        Ok(self.landed(landed, "failed", retry_after, &claimed))
    }

    /// The report of an outcome once the store had its say (see [`Settled`]);
    /// `claimed` is the row as claimed, for a connection that is gone.
    fn landed(
        &self,
        landed: Settled,
        outcome: &'static str,
        retry_after: Option<Duration>,
        claimed: &ConnectionRow,
    ) -> RefreshReport {
        match landed {
            Settled::Applied(row, detail) => {
                self.hooks.alerts_raised();
                report(&row, outcome, detail, retry_after)
            }
            Settled::Discarded(row, why) => {
                tracing::warn!(connection = %row.conn.name, reason = %why, "refresh outcome discarded");
                report(&row, "discarded", why, None)
            }
            Settled::Removed => {
                tracing::info!(connection = %claimed.conn.name, "the connection was removed while its refresh was in flight; its outcome is discarded");
                let mut r = report(
                    claimed,
                    "discarded",
                    "the connection was removed while the request was in flight; its outcome is discarded".into(),
                    None,
                );
                r.next_refresh_at = None;
                r
            }
        }
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
        let row = self.store.read(move |st| st.get(&n)).await?;
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
        let row = self.store.read(move |st| st.get_by_id(id)).await?;
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
        let rep = self.refresh_locked(id, Trigger::OnDemand).await?;
        let row = self.store.read(move |st| st.get_by_id(id)).await?;
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

    async fn usable_token(&self, row: &ConnectionRow) -> Result<Option<TokenAnswer>, EngineError> {
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
            .read(move |st| st.secret(id, SecretColumn::AccessToken))
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

fn ser_time<S: serde::Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
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

/// A fixed label for metrics (no unbounded label values).
fn outcome_label(outcome: &str) -> &'static str {
    match outcome {
        "refreshed" => "refreshed",
        "failed" => "failed",
        "busy" => "busy",
        "skipped" => "skipped",
        "discarded" => "discarded",
        _ => "refused",
    }
}

fn report(
    row: &ConnectionRow,
    outcome: &'static str,
    detail: String,
    retry_after: Option<Duration>,
) -> RefreshReport {
    RefreshReport {
        connection: row.conn.name.clone(),
        outcome: outcome.into(),
        state: row.conn.state,
        detail,
        next_refresh_at: row.conn.next_refresh_at,
        deadline: row.conn.deadline,
        retry_after,
    }
}

/// What importing spilled tokens at start came to.
#[derive(Debug, Default)]
pub struct SpillImport {
    /// Tokens saved into the store.
    pub imported: usize,
    /// Files set aside in `rejected/`: (where they are now, why).
    pub rejected: Vec<(PathBuf, String)>,
}

/// Imports tokens spilled by a previous run that could not save them
/// (start-up), from every directory in `dirs`. A file that cannot be read or
/// opened is set aside in `rejected/` beside it and reported, never a reason
/// not to start; a store that cannot be written is (the file stays for the
/// next start).
pub fn import_spilled(
    store: &mut Store,
    dirs: &[PathBuf],
    now: Timestamp,
) -> Result<SpillImport, StoreError> {
    let mut out = SpillImport::default();
    for dir in dirs {
        for (path, read) in spill::read_all(dir) {
            let opened = read.and_then(|s| s.landing(&store.keyring()));
            let landing = match opened {
                Ok(t) => t,
                Err(why) => {
                    let why = format!("the spill file {why}");
                    match spill::set_aside(&path) {
                        Ok(to) => {
                            tracing::error!(path = %path.display(), kept = %to.display(), reason = %why, "a spilled token cannot be imported; set aside");
                            out.rejected.push((to, why));
                        }
                        Err(e) => {
                            tracing::error!(path = %path.display(), reason = %why, error = %e, "a spilled token cannot be imported, nor moved aside; left in place");
                            out.rejected.push((path, why));
                        }
                    }
                    continue;
                }
            };
            let applied = store.land_spilled(&landing, now)?;
            if applied {
                out.imported += 1;
                tracing::info!(path = %path.display(), "imported a spilled refresh token");
            } else {
                tracing::warn!(path = %path.display(), "a spilled token was already superseded; discarded");
            }
            let _ = std::fs::remove_file(&path);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::config::Config;
    use crate::crypto::{Key, Keyring};
    use crate::model::NewConnection;
    use crate::model::{Connection, Mode};
    use crate::store::connections;
    use crate::store::{Create, Store};

    const TOKEN: &str = "access-token-value-1";

    struct Rig {
        _dir: tempfile::TempDir,
        path: PathBuf,
        keyring: Keyring,
        clock: ManualClock,
        engine: Engine,
    }

    impl Rig {
        fn open(&self) -> Store {
            Store::open(&self.path, self.keyring.clone(), Create::No).unwrap()
        }

        async fn answer(&self) -> Option<String> {
            match self.engine.token("acme").await {
                Ok(TokenAnswer::Token(t)) => Some(t.access_token.expose().to_string()),
                _ => None,
            }
        }
    }

    /// A store with connection `acme` holding a valid access token, and an
    /// engine with the token cache on.
    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acutoken.db");
        let keyring = Keyring::new(Key::generate(), Vec::new());
        let now = chrono::Utc::now();
        let clock = ManualClock::new(now);
        let mut st = Store::open(&path, keyring.clone(), Create::Yes).unwrap();
        let conn = Connection {
            id: Uuid::new_v4(),
            name: "acme".into(),
            instance: "erp.example.com".into(),
            client_id: "client@Company".into(),
            labels: Default::default(),
            mode: Mode::Absolute,
            lifetime: Duration::from_secs(30 * 86_400),
            absolute_lifetime: None,
            secret_expires_at: None,
            grant_issued_at: Some(now),
            refresh_token_issued_at: Some(now),
            access_expires_at: None,
            deadline: None,
            deadline_source: None,
            next_refresh_at: Some(now + chrono::Duration::hours(20)),
            last_refresh_at: Some(now),
            last_error: None,
            state: State::Active,
        };
        st.write(|tx, kr| {
            let new = NewConnection {
                conn,
                client_secret: None,
                refresh_token: None,
            };
            connections::insert(tx, kr, &new, now)?;
            let mut row = connections::get_tx(tx, "acme")?;
            row.conn.access_expires_at = Some(now + chrono::Duration::hours(1));
            row.access_lifetime = Some(Duration::from_secs(3600));
            row.token_type = Some("Bearer".into());
            connections::put(tx, &row)?;
            connections::set_secret(
                tx,
                kr,
                row.conn.id,
                SecretColumn::AccessToken,
                Some(&Secret::new(TOKEN)),
            )
        })
        .unwrap();
        let config = Config::default();
        let engine = Engine::new(EngineParts {
            store: crate::store::StoreHandle::from_store(st).unwrap(),
            client: TokenClient::new(crate::renewal::client_settings(&config)).unwrap(),
            policy: config.renewal.policy(),
            clock: Arc::new(clock.clone()),
            owner: Owner::current("test"),
            http_timeout: Duration::from_secs(5),
            spill_dir: None,
            limits: crate::renewal::limits::Limits::new(16, 2),
            hooks: Arc::new(NoHooks),
        });
        let reads = Store::open(&path, keyring.clone(), Create::No).unwrap();
        engine.cache_tokens(reads);
        Rig {
            _dir: dir,
            path,
            keyring,
            clock,
            engine,
        }
    }

    #[tokio::test]
    async fn a_cached_token_is_never_served_for_a_connection_disabled_elsewhere() {
        let r = rig();
        assert_eq!(r.answer().await.as_deref(), Some(TOKEN));
        assert_eq!(r.answer().await.as_deref(), Some(TOKEN), "served again");
        // Another process (the CLI) disables it: the very next request sees it.
        let mut cli = r.open();
        cli.write(|tx, _| {
            let mut row = connections::get_tx(tx, "acme")?;
            row.conn.state = State::Disabled;
            connections::put(tx, &row)
        })
        .unwrap();
        assert_eq!(r.answer().await, None);
    }

    #[tokio::test]
    async fn a_cached_token_is_never_served_for_a_removed_connection() {
        let r = rig();
        assert_eq!(r.answer().await.as_deref(), Some(TOKEN));
        let mut cli = r.open();
        let id = cli.get("acme").unwrap().conn.id;
        cli.write(|tx, _| connections::remove(tx, id)).unwrap();
        assert!(matches!(
            r.engine.token("acme").await,
            Err(EngineError::Store(StoreError::UnknownConnection(_)))
        ));
    }

    #[tokio::test]
    async fn a_cached_token_is_never_served_past_its_expiry_margin() {
        let r = rig();
        assert_eq!(r.answer().await.as_deref(), Some(TOKEN));
        // One hour of lifetime, a five-minute margin: unusable after 55 minutes.
        r.clock.advance(chrono::Duration::minutes(56));
        assert_eq!(r.answer().await, None);
    }

    #[tokio::test]
    async fn a_token_saved_elsewhere_replaces_the_cached_one() {
        let r = rig();
        assert_eq!(r.answer().await.as_deref(), Some(TOKEN));
        let mut cli = r.open();
        cli.write(|tx, kr| {
            let id = connections::get_tx(tx, "acme")?.conn.id;
            connections::set_secret(
                tx,
                kr,
                id,
                SecretColumn::AccessToken,
                Some(&Secret::new("access-token-value-2")),
            )
        })
        .unwrap();
        assert_eq!(r.answer().await.as_deref(), Some("access-token-value-2"));
    }
}
