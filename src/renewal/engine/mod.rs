//! The engine: claim -> request -> save, for one connection at a time.
//!
//! DESIGN §3's invariants live here. A token request is sent only under a
//! durable claim (invariant 1). A rotated refresh token is saved in the same
//! transaction that releases the claim, before the new access token is handed
//! to anyone; when that save fails the token is held in memory, spilled sealed
//! to `$RUNTIME_DIRECTORY/pending/`, no other refresh starts, and the save is
//! retried until it succeeds (invariant 2).
//!
//! `refresh.rs` is one attempt, claim to save; `unsaved.rs` holds and spills
//! what the store would not take and imports spills at start; `tokens.rs`
//! hands out access tokens, from memory while the store is unchanged.

mod refresh;
mod tokens;
mod unsaved;

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

use refresh::PendingSave;
use tokens::TokenCache;
pub use tokens::{IssuedToken, TokenAnswer};
pub use unsaved::{SpillImport, import_spilled};

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
    /// Set when this engine is one replica of several on PostgreSQL: its
    /// claims are leases of this length, which the replica's heartbeat
    /// extends, and `per_instance_concurrent` counts every replica's claims.
    lease: std::sync::OnceLock<(Duration, Arc<crate::store::replicas::Contact>)>,
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
            lease: std::sync::OnceLock::new(),
        }
    }

    /// Makes this engine a replica's (DESIGN §10): claims are leases of
    /// `lease`, kept alive by the replica's heartbeat, so a replica that
    /// stops beating has its claims taken over within `lease`; the
    /// per-instance limit holds across replicas. Set once, before any refresh.
    /// `contact` says how long the replica's heartbeats have gone through:
    /// lapsed claims are taken over only after a whole lease of it.
    pub fn share_with_replicas(
        &self,
        lease: Duration,
        contact: Arc<crate::store::replicas::Contact>,
    ) {
        let _ = self.lease.set((lease, contact));
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

#[cfg(test)]
mod tests;
