//! One refresh attempt: claim, request, and the save that applies its
//! outcome to the row as it is then (or discards it).

use super::*;

/// How long a refresh waits for room on an instance that other replicas
/// fill before it gives its place back to the scheduler (which tries again).
const INSTANCE_WAIT_MAX: Duration = Duration::from_secs(30);

/// An outcome the store has not accepted yet (invariant 2).
pub(super) struct PendingSave {
    pub(super) basis: claims::Basis,
    /// The outcome applied to the row as claimed: what is spilled and
    /// reported while the store will not take it. The save itself applies
    /// `facts` again to the row as it is then.
    pub(super) row: ConnectionRow,
    facts: GrantFacts,
    pub(super) refresh_token: Option<Secret>,
    pub(super) access_token: Secret,
    detail: String,
}

/// What a successful answer says, enough to apply it to any version of the row.
#[derive(Debug, Clone)]
pub(super) struct GrantFacts {
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
    pub(super) fn apply(&self, row: &mut ConnectionRow, policy: &Policy) -> Option<Timestamp> {
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
pub(super) fn apply_failure(
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
pub(super) fn desired(policy: Arc<Policy>, now: Timestamp) -> DesiredAlerts {
    Box::new(move |row| crate::renewal::alert_conditions::desired(row, &policy, now))
}

impl Engine {
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

    pub(super) async fn refresh_locked(
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
        let instance = self.store.read_row(move |st| st.get_by_id(id)).await?;
        let Some(instance) = instance.map(|r| r.conn.instance) else {
            return Err(StoreError::UnknownConnection(id.to_string()).into());
        };
        let _permit = self.limits.acquire(&instance).await;
        if self.stopping.load(Ordering::SeqCst) {
            return Err(EngineError::Stopping);
        }
        let replicated = self.lease.get();
        let ttl = replicated.map_or(self.claim_ttl, |(lease, _)| *lease);
        let as_replica = replicated.map(|(lease, contact)| claims::AsReplica {
            instance_limit: self.limits.per_instance(),
            take_over: contact.steady_for() >= *lease,
        });
        let instance_limit = as_replica.map(|r| r.instance_limit);
        let policy = self.policy();
        let mut waited = Duration::ZERO;
        // Set once a claim was refused for room: from then on a read comes
        // first, so waiting while other replicas fill the instance costs no
        // write.
        let mut full = false;
        let outcome = loop {
            let now = self.clock.now();
            if let Some(limit) = instance_limit.filter(|_| full) {
                let (inst, key) = (instance.clone(), id.to_string());
                let running = self
                    .store
                    .read_row(move |st| st.instance_claims(&inst, &key, now))
                    .await?;
                if running >= limit && waited < INSTANCE_WAIT_MAX {
                    waited += self.wait_for_instance_room().await?;
                    continue;
                }
            }
            let outcome = self
                .store
                .claim(
                    id,
                    self.owner.clone(),
                    ttl,
                    trigger,
                    as_replica,
                    now,
                    desired(policy.clone(), now),
                )
                .await?;
            match outcome {
                ClaimOutcome::InstanceFull { .. } if waited < INSTANCE_WAIT_MAX => {
                    full = true;
                    waited += self.wait_for_instance_room().await?;
                }
                other => break other,
            }
        };
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
            ClaimOutcome::InstanceFull { running } => {
                return Ok(RefreshReport {
                    connection: String::new(),
                    outcome: "busy".into(),
                    state: State::Active,
                    detail: format!(
                        "{running} refreshes on its instance are in flight from other replicas (renewal.per_instance_concurrent)"
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

    /// Waits a moment for another replica's request on the same instance
    /// to end (a fraction of a second, jittered so replicas do not ask in
    /// step); returns how long it waited.
    async fn wait_for_instance_room(&self) -> Result<Duration, EngineError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(EngineError::Stopping);
        }
        let wait = Duration::from_millis(50 + rand::random::<u64>() % 150);
        tokio::time::sleep(wait).await;
        Ok(wait)
    }

    pub(super) async fn succeeded(
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
    pub(super) async fn save(
        &self,
        p: PendingSave,
        policy: Policy,
    ) -> Result<RefreshReport, EngineError> {
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

    pub(super) async fn failed(
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
    pub(super) fn landed(
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
}
