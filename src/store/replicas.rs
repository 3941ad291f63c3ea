//! Several `serve` replicas on one PostgreSQL store (DESIGN §10): who they
//! are, their heartbeats, the leases on their claims, and the duties only
//! one of them does at a time.
//!
//! A replica's claims are leases: a claim runs for `store.lease` and the
//! replica's heartbeat (every third of it) extends every claim it holds. A
//! replica that died, stalled or was cut off stops extending them, and
//! another replica finds them expired and takes them over under the orphan
//! rule of [`super::claims`]. The claim id is the fencing value: a save
//! whose claim was taken over is judged against the row as it is then.
//!
//! Alert delivery is a duty: one replica at a time holds its lease, renewed
//! by the same heartbeat, so each alert goes out once per channel.
//!
//! Times are each replica's own clock, as claim expiries always were: the
//! replicas' clocks must agree (NTP); a skew adds to the takeover time.
//! On SQLite none of this exists: one daemon serves the store.

use std::time::Duration;

use rusqlite::params;

use super::sql::{Db, OptionalExtension, Transaction};
use super::{Store, StoreError, from_ms, to_ms};
use crate::model::Timestamp;

/// The tables of replicas and duties, made when missing (under the write
/// lock, at open). They describe running processes, not the store's
/// content: `store copy` and `backup` leave them out.
pub(super) const SCHEMA: &str = "
CREATE TABLE acutoken_replicas (
    name         TEXT PRIMARY KEY,
    owner        TEXT NOT NULL,
    host         TEXT NOT NULL,
    pid          BIGINT NOT NULL,
    version      TEXT NOT NULL,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    lease_ms     BIGINT NOT NULL
);
CREATE TABLE acutoken_leases (
    duty     TEXT PRIMARY KEY,
    holder   TEXT NOT NULL,
    until_ms BIGINT NOT NULL
);
CREATE INDEX connections_claim_owner ON connections (claim_owner) WHERE claim_id IS NOT NULL;
CREATE INDEX connections_claim_instance ON connections (instance) WHERE claim_id IS NOT NULL;
";

/// The duty of delivering the alert outbox.
pub const ALERTS: &str = "alerts";

/// A duty as this replica knows it: held until a moment on this machine's
/// monotonic clock, counted from the start of the heartbeat that won or
/// kept it, and a quarter of the lease short of what the store records. A
/// replica that stalled past its lease (stopped, swapped out, cut off)
/// finds the duty gone before it acts, whatever the store says.
#[derive(Debug)]
pub struct Duty {
    /// SQLite: one daemon, the duty is always its own.
    always: bool,
    until: std::sync::Mutex<Option<std::time::Instant>>,
    taken: tokio::sync::Notify,
}

impl Duty {
    /// The duty of the only daemon of a store.
    pub fn always() -> std::sync::Arc<Duty> {
        std::sync::Arc::new(Duty {
            always: true,
            until: std::sync::Mutex::new(None),
            taken: tokio::sync::Notify::new(),
        })
    }

    /// A duty that heartbeats win and keep.
    pub fn leased() -> std::sync::Arc<Duty> {
        std::sync::Arc::new(Duty {
            always: false,
            until: std::sync::Mutex::new(None),
            taken: tokio::sync::Notify::new(),
        })
    }

    /// True while this replica holds the duty.
    pub fn held(&self) -> bool {
        self.always
            || self
                .until
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|t| std::time::Instant::now() < t)
    }

    /// What a heartbeat that started at `beat_started` found: held for
    /// `lease` from then, or not held.
    pub fn record(&self, held: bool, beat_started: std::time::Instant, lease: Duration) {
        let was = self.held();
        *self.until.lock().unwrap_or_else(|e| e.into_inner()) =
            held.then(|| beat_started + lease - lease / 4);
        if held && !was {
            self.taken.notify_waiters();
        }
    }

    /// Lets go of the duty now (the replica is stopping).
    pub fn release(&self) {
        *self.until.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Resolves when the duty is won after it was not held.
    pub async fn taken(&self) {
        self.taken.notified().await;
    }
}

/// How long this replica has been in touch with the store without a
/// break, as its heartbeats tell (see [`super::claims::AsReplica`]).
#[derive(Debug, Default)]
pub struct Contact {
    since: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Contact {
    /// A heartbeat that started at `at` was recorded (`ok`) or failed.
    pub fn record(&self, ok: bool, at: std::time::Instant) {
        let mut since = self.since.lock().unwrap_or_else(|e| e.into_inner());
        if ok {
            since.get_or_insert(at);
        } else {
            *since = None;
        }
    }

    /// Since when the beats have gone through, as a duration (zero while
    /// they fail).
    pub fn steady_for(&self) -> Duration {
        self.since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map_or(Duration::ZERO, |s| s.elapsed())
    }
}

/// This replica, as its heartbeat records it.
#[derive(Debug, Clone)]
pub struct Me {
    pub name: String,
    /// The claim owner of this process ([`super::Owner`]).
    pub owner: String,
    pub host: String,
    pub pid: u32,
    pub started_at: Timestamp,
    pub lease: Duration,
}

/// What one heartbeat found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    /// Claims of this replica whose lease was extended.
    pub claims: usize,
    /// This replica holds the alert delivery duty until the next beat is due.
    pub alerts: bool,
    /// The names of the live replicas (this one included), sorted.
    pub live: Vec<String>,
}

/// A replica as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Replica {
    pub name: String,
    pub host: String,
    pub pid: u32,
    pub version: String,
    pub started_at: String,
    pub heartbeat_at: String,
    /// Its last heartbeat is within its lease.
    pub live: bool,
    /// It holds the alert delivery duty.
    pub alerts: bool,
    /// Claims (refreshes in flight) it holds.
    pub claims: u64,
}

/// Records this replica's heartbeat, extends the lease of every claim it
/// holds, and takes or keeps the alert delivery duty when it is free (inside
/// a write transaction: all of it, or nothing).
pub fn beat(tx: &Transaction<'_>, me: &Me, now: Timestamp) -> Result<Beat, StoreError> {
    let until = to_ms(crate::model::add_saturating(now, me.lease));
    let lease_ms = i64::try_from(me.lease.as_millis()).unwrap_or(i64::MAX);
    super::exec(
        tx,
        "INSERT INTO acutoken_replicas
           (name, owner, host, pid, version, started_at, heartbeat_at, lease_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, host = excluded.host,
           pid = excluded.pid, version = excluded.version,
           started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at,
           lease_ms = excluded.lease_ms",
        params![
            me.name,
            me.owner,
            me.host,
            i64::from(me.pid),
            env!("CARGO_PKG_VERSION"),
            to_ms(me.started_at),
            to_ms(now),
            lease_ms
        ],
    )?;
    let claims = super::exec(
        tx,
        "UPDATE connections SET claim_expires_at = ?2
         WHERE claim_id IS NOT NULL AND claim_owner = ?1 AND claim_expires_at < ?2",
        params![me.owner, until],
    )?;
    let alerts = super::exec(
        tx,
        "INSERT INTO acutoken_leases (duty, holder, until_ms) VALUES (?1, ?2, ?3)
         ON CONFLICT (duty) DO UPDATE SET holder = excluded.holder, until_ms = excluded.until_ms
         WHERE acutoken_leases.holder = excluded.holder OR acutoken_leases.until_ms <= ?4",
        params![ALERTS, me.name, until, to_ms(now)],
    )? == 1;
    let mut stmt = tx.prepare_cached(
        "SELECT name FROM acutoken_replicas WHERE heartbeat_at + lease_ms > ?1 ORDER BY name",
    )?;
    let live = stmt
        .query_map([to_ms(now)], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Beat {
        claims,
        alerts,
        live,
    })
}

/// Drops the rows of replicas whose heartbeat stopped a day or more ago:
/// they are not coming back under that name, or write a new row when they do.
pub fn forget_gone(tx: &Transaction<'_>, now: Timestamp) -> Result<usize, StoreError> {
    let before = to_ms(now).saturating_sub(24 * 3600 * 1000);
    Ok(super::exec(
        tx,
        "DELETE FROM acutoken_replicas WHERE heartbeat_at < ?1",
        [before],
    )?)
}

/// A replica stopping cleanly, once its refreshes have ended: its duties
/// are free at once (another replica takes them at its next heartbeat) and
/// it leaves the list.
pub fn leave(tx: &Transaction<'_>, name: &str) -> Result<(), StoreError> {
    super::exec(tx, "DELETE FROM acutoken_leases WHERE holder = ?1", [name])?;
    super::exec(tx, "DELETE FROM acutoken_replicas WHERE name = ?1", [name])?;
    Ok(())
}

impl super::StoreHandle {
    /// Records a heartbeat of replica `me` ([`beat`]); `first` also forgets
    /// replicas gone a day or more ([`forget_gone`]).
    pub async fn heartbeat(&self, me: Me, now: Timestamp, first: bool) -> Result<Beat, StoreError> {
        self.write(move |tx, _| {
            if first {
                forget_gone(tx, now)?;
            }
            beat(tx, &me, now)
        })
        .await
    }

    /// Replica `name` leaves ([`leave`]).
    pub async fn leave_replicas(&self, name: String) -> Result<(), StoreError> {
        self.write(move |tx, _| leave(tx, &name)).await
    }
}

impl Store {
    /// Claims the digest scheduled for `at`: true for the first process to
    /// ask, so of several replicas one sends it. On SQLite (one daemon)
    /// always true: nothing is written.
    pub fn claim_digest(&mut self, at: Timestamp) -> Result<bool, StoreError> {
        if !self.is_postgres() {
            return Ok(true);
        }
        // The schedule is in whole seconds; each replica's time for it may
        // carry the fraction of its own clock when it planned.
        let second = at.timestamp();
        self.write(|tx, _| {
            Ok(super::exec(
                tx,
                "INSERT INTO meta (key, value) VALUES ('digest_sent_for', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value
                 WHERE meta.value < excluded.value",
                [second],
            )? == 1)
        })
    }

    /// The replicas that heartbeat into this store, by name: live ones, and
    /// ones whose heartbeat lapsed (died without leaving) until their rows
    /// are a day old. Empty on SQLite.
    pub fn replicas(&self, now: Timestamp) -> Result<Vec<Replica>, StoreError> {
        if !self.is_postgres() {
            return Ok(Vec::new());
        }
        replicas(&self.db, now)
    }

    /// Live claims on `instance` other than connection `id`, as a read:
    /// what a replica looks at before it asks for a claim that
    /// `renewal.per_instance_concurrent` would refuse.
    pub fn instance_claims(
        &self,
        instance: &str,
        id: &str,
        now: Timestamp,
    ) -> Result<usize, StoreError> {
        instance_claims(&self.db, instance, id, now)
    }
}

fn replicas(db: &Db, now: Timestamp) -> Result<Vec<Replica>, StoreError> {
    let now_ms = to_ms(now);
    let alerts: Option<(String, i64)> = db
        .query_row(
            "SELECT holder, until_ms FROM acutoken_leases WHERE duty = ?1",
            [ALERTS],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let alerts = alerts.filter(|(_, until)| *until > now_ms).map(|(h, _)| h);
    let mut stmt = db.prepare(
        "SELECT r.name, r.host, r.pid, r.version, r.started_at, r.heartbeat_at, r.lease_ms,
           (SELECT COUNT(*) FROM connections c
             WHERE c.claim_id IS NOT NULL AND c.claim_owner = r.owner)
         FROM acutoken_replicas r ORDER BY r.name",
    )?;
    let mut rows = stmt.query(())?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let name: String = r.get(0)?;
        let heartbeat: i64 = r.get(5)?;
        let lease: i64 = r.get(6)?;
        out.push(Replica {
            alerts: alerts.as_deref() == Some(name.as_str()),
            host: r.get(1)?,
            pid: u32::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
            version: r.get(3)?,
            started_at: crate::model::fmt_time(from_ms(r.get(4)?)),
            heartbeat_at: crate::model::fmt_time(from_ms(heartbeat)),
            live: heartbeat.saturating_add(lease) > now_ms,
            claims: u64::try_from(r.get::<_, i64>(7)?).unwrap_or(0),
            name,
        });
    }
    Ok(out)
}

/// Live claims on `instance` other than connection `id` (inside a write
/// transaction): the count `renewal.per_instance_concurrent` bounds across
/// every replica. A claim whose lease ran out does not count.
pub(super) fn instance_claims(
    db: &Db,
    instance: &str,
    id: &str,
    now: Timestamp,
) -> Result<usize, StoreError> {
    let n: i64 = super::row(
        db,
        "SELECT COUNT(*) FROM connections
         WHERE claim_id IS NOT NULL AND instance = ?1 AND id <> ?2 AND claim_expires_at > ?3",
        params![instance, id, to_ms(now)],
        |r| r.get(0),
    )?;
    Ok(usize::try_from(n).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    //! On the PostgreSQL server `.ci/pg` starts, whatever this run's engine:
    //! replicas exist only there. Times are given, not waited for.

    use std::time::Duration;

    use super::*;
    use crate::crypto::{Key, Keyring};
    use crate::model::State;
    use crate::secret::Secret;
    use crate::store::claims::{self, ClaimOutcome, Owner, Trigger};
    use crate::store::connections::{self, tests::new_connection};
    use crate::store::{Create, testing};

    const LEASE: Duration = Duration::from_secs(30);

    fn store() -> Store {
        let keyring = Keyring::new(Key::generate(), vec![]);
        testing::open(&testing::postgres_target(), keyring, Create::Yes).unwrap()
    }

    fn me(name: &str, owner: &str) -> Me {
        Me {
            name: name.into(),
            owner: owner.into(),
            host: "vm".into(),
            pid: 7,
            started_at: chrono::Utc::now(),
            lease: LEASE,
        }
    }

    fn secs(n: i64) -> chrono::Duration {
        chrono::Duration::seconds(n)
    }

    /// Connections on `instances` (one each), active with a refresh token.
    fn add(st: &mut Store, instances: &[&str]) -> Vec<uuid::Uuid> {
        let now = chrono::Utc::now();
        instances
            .iter()
            .enumerate()
            .map(|(i, inst)| {
                let mut new = new_connection(i);
                new.conn.instance = (*inst).into();
                new.conn.state = State::Active;
                new.refresh_token = Some(Secret::new(format!("token-{i}")));
                st.write(|tx, kr| connections::insert(tx, kr, &new, now))
                    .unwrap();
                new.conn.id
            })
            .collect()
    }

    fn claim(
        st: &mut Store,
        id: uuid::Uuid,
        owner: &str,
        limit: Option<usize>,
        now: Timestamp,
    ) -> ClaimOutcome {
        claim_as(
            st,
            id,
            owner,
            limit.map(|instance_limit| claims::AsReplica {
                instance_limit,
                take_over: true,
            }),
            now,
        )
    }

    fn claim_as(
        st: &mut Store,
        id: uuid::Uuid,
        owner: &str,
        replica: Option<claims::AsReplica>,
        now: Timestamp,
    ) -> ClaimOutcome {
        let owner = Owner::current(owner);
        st.write(|tx, kr| {
            claims::claim_within(tx, kr, id, &owner, LEASE, Trigger::OnDemand, replica, now)
        })
        .unwrap()
    }

    /// A claim is a lease: the heartbeat of the replica holding it keeps it
    /// live, and once the beats stop another replica takes it over within
    /// the lease, under the orphan rule (the outcome is unknown).
    #[test]
    fn a_claim_lives_while_its_replica_beats_and_is_taken_over_after() {
        let mut st = store();
        let id = add(&mut st, &["https://a.example.com"])[0];
        let t0 = chrono::Utc::now();
        let ClaimOutcome::Claimed(first) = claim(&mut st, id, "serve", None, t0) else {
            panic!("the first claim is granted")
        };
        let owner = Owner::current("serve").as_str().to_string();
        let a = me("a", &owner);
        let beaten = st.write(|tx, _| beat(tx, &a, t0 + secs(20))).unwrap();
        assert_eq!(beaten.claims, 1, "its one claim was extended");
        // Past the claim's first expiry, within the extended lease: busy.
        let busy = claim(&mut st, id, "other", None, t0 + secs(40));
        assert!(matches!(busy, ClaimOutcome::Busy { .. }), "{busy:?}");
        // No beat since: past the extended lease. A replica just back in
        // touch with the store (after an outage) leaves it to its holder
        // for a while; one in touch for a whole lease takes it over.
        let just_back = Some(claims::AsReplica {
            instance_limit: 10,
            take_over: false,
        });
        let waits = claim_as(&mut st, id, "other", just_back, t0 + secs(51));
        assert!(matches!(waits, ClaimOutcome::Busy { .. }), "{waits:?}");
        let ClaimOutcome::Claimed(second) = claim(&mut st, id, "other", None, t0 + secs(51)) else {
            panic!("a lapsed claim is taken over")
        };
        assert!(
            second.after_unknown,
            "the first request's outcome is unknown"
        );
        assert_ne!(first.attempt, second.attempt, "a new fencing value");
        // The first replica's heartbeat no longer extends what it lost.
        let beaten = st.write(|tx, _| beat(tx, &a, t0 + secs(52))).unwrap();
        assert_eq!(beaten.claims, 0);
    }

    /// `per_instance_concurrent` across replicas: a claim on a full
    /// instance is refused and writes nothing; other instances go on; a
    /// lapsed claim no longer counts.
    #[test]
    fn the_instance_limit_counts_every_replicas_claims() {
        let mut st = store();
        let ids = add(
            &mut st,
            &[
                "https://a.example.com",
                "https://a.example.com",
                "https://b.example.com",
            ],
        );
        let t0 = chrono::Utc::now();
        assert!(matches!(
            claim(&mut st, ids[0], "serve", Some(1), t0),
            ClaimOutcome::Claimed(_)
        ));
        let before = st.get_by_id(ids[1]).unwrap().unwrap();
        let full = claim(&mut st, ids[1], "other", Some(1), t0);
        assert!(
            matches!(full, ClaimOutcome::InstanceFull { running: 1 }),
            "{full:?}"
        );
        let after = st.get_by_id(ids[1]).unwrap().unwrap();
        assert_eq!(after.claim, None);
        assert_eq!(
            after.version, before.version,
            "a refused claim writes nothing"
        );
        assert_eq!(
            st.instance_claims("https://a.example.com", &ids[1].to_string(), t0)
                .unwrap(),
            1
        );
        assert!(matches!(
            claim(&mut st, ids[2], "other", Some(1), t0),
            ClaimOutcome::Claimed(_)
        ));
        // A limit of two has room; so has the instance once the claim lapsed.
        assert!(matches!(
            claim(&mut st, ids[1], "other", Some(2), t0),
            ClaimOutcome::Claimed(_)
        ));
        assert_eq!(
            st.instance_claims("https://a.example.com", "none", t0 + secs(31))
                .unwrap(),
            0
        );
    }

    /// One replica at a time holds the alert duty; it passes on when the
    /// holder's lease runs out, or at once when it leaves.
    #[test]
    fn the_alert_duty_is_held_by_one_replica_at_a_time() {
        let mut st = store();
        let (a, b) = (me("a", "owner-a"), me("b", "owner-b"));
        let t0 = chrono::Utc::now();
        let mut beat_at = |m: &Me, at| st.write(|tx, _| beat(tx, m, at)).unwrap();
        assert!(beat_at(&a, t0).alerts);
        let b_first = beat_at(&b, t0 + secs(1));
        assert!(!b_first.alerts);
        assert_eq!(b_first.live, ["a", "b"], "the live replicas, by name");
        assert!(beat_at(&a, t0 + secs(10)).alerts, "kept by its holder");
        assert!(
            !beat_at(&b, t0 + secs(39)).alerts,
            "a's lease runs to t0+40s"
        );
        let b_alone = beat_at(&b, t0 + secs(41));
        assert!(b_alone.alerts, "taken once a stopped beating");
        assert_eq!(b_alone.live, ["b"], "a's heartbeat lapsed");
        assert!(!beat_at(&a, t0 + secs(42)).alerts);
        st.write(|tx, _| leave(tx, "b")).unwrap();
        assert!(
            st.write(|tx, _| beat(tx, &a, t0 + secs(43)))
                .unwrap()
                .alerts,
            "free at once when its holder leaves"
        );
    }

    /// `status` lists every replica, live or lapsed, with its claims and duty.
    #[test]
    fn replicas_are_listed_live_or_lapsed_with_claims_and_duty() {
        let mut st = store();
        let id = add(&mut st, &["https://a.example.com"])[0];
        let t0 = chrono::Utc::now();
        let owner = Owner::current("serve").as_str().to_string();
        let (a, b) = (me("a", &owner), me("b", "owner-b"));
        st.write(|tx, _| beat(tx, &b, t0 - secs(60))).unwrap();
        st.write(|tx, _| beat(tx, &a, t0)).unwrap();
        assert!(matches!(
            claim(&mut st, id, "serve", None, t0),
            ClaimOutcome::Claimed(_)
        ));
        let list = st.replicas(t0 + secs(1)).unwrap();
        let names: Vec<(&str, bool, bool, u64)> = list
            .iter()
            .map(|r| (r.name.as_str(), r.live, r.alerts, r.claims))
            .collect();
        assert_eq!(names, [("a", true, true, 1), ("b", false, false, 0)]);
        // A day later b's row is forgotten.
        st.write(|tx, _| forget_gone(tx, t0 + secs(24 * 3600)))
            .unwrap();
        let left: Vec<String> = st
            .replicas(t0)
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(left, ["a"]);
    }

    /// The digest due at one time is claimed once, by the first replica.
    #[test]
    fn a_digest_time_is_claimed_once() {
        let mut st = store();
        let at = chrono::Utc::now();
        assert!(st.claim_digest(at).unwrap());
        assert!(
            !st.claim_digest(at).unwrap(),
            "a second replica does not send it"
        );
        assert!(
            st.claim_digest(at + secs(86400)).unwrap(),
            "the next one is sent"
        );
    }
}
