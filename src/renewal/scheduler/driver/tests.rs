//! The driver with a real store: panics of refresh tasks, and paused time.

use std::collections::BTreeMap;

use super::super::machine::Phase;
use super::super::{ASIDE_FIRST, AsideKey};
use super::*;
use crate::acumatica::TokenClient;
use crate::config::Config;
use crate::crypto::{Key, Keyring};
use crate::model::NewConnection;
use crate::model::{Connection, Mode, State};
use crate::renewal::engine::{EngineParts, NoHooks};
use crate::secret::Secret;
use crate::store::claims::Owner;
use crate::store::connections;
use crate::store::{Create, Store};

fn add(st: &mut Store, name: &str, now: Timestamp) -> Uuid {
    let id = Uuid::new_v4();
    let conn = Connection {
        id,
        name: name.into(),
        instance: "erp.example.com".into(),
        client_id: "X@T".into(),
        labels: BTreeMap::new(),
        mode: Mode::Absolute,
        lifetime: Duration::from_secs(30 * 86_400),
        absolute_lifetime: None,
        secret_expires_at: None,
        grant_issued_at: Some(now),
        refresh_token_issued_at: Some(now),
        access_expires_at: None,
        deadline: Some(now + chrono::Duration::days(30)),
        deadline_source: None,
        next_refresh_at: Some(now - chrono::Duration::seconds(1)),
        last_refresh_at: None,
        last_error: None,
        state: State::Active,
    };
    let new = NewConnection {
        conn,
        client_secret: Some(Secret::new("s")),
        refresh_token: Some(Secret::new("t")),
    };
    st.write(|tx, kr| connections::insert(tx, kr, &new, now))
        .unwrap();
    id
}

/// Fires the earliest due timer and checks it made its connection
/// ready, as the run loop does.
async fn make_ready(sched: &mut Scheduler, now: Timestamp) {
    let wake = sched.machine.next_wake(now).expect("a timer is due");
    let Wake::Timer(_, s) = wake else {
        panic!("{wake:?}")
    };
    sched.fire(wake).await;
    assert_eq!(sched.machine.entries[s as usize].phase, Phase::Ready);
}

fn running(sched: &Scheduler) -> usize {
    sched.machine.snapshot().running
}

fn with_task<F>(sched: &mut Scheduler, task: impl Fn(Uuid) -> F + Send + Sync + 'static)
where
    F: Future<Output = Done> + Send + 'static,
{
    sched.refresh = Arc::new(move |_, id| Box::pin(task(id)));
}

/// An engine over a fresh store holding `names`, each due now.
fn engine_with(
    clock: crate::clock::SharedClock,
    names: &[&str],
) -> (tempfile::TempDir, Arc<Engine>, Vec<Uuid>) {
    let dir = tempfile::tempdir().unwrap();
    let path = crate::store::testing::target(dir.path());
    let keyring = Keyring::new(Key::generate(), vec![]);
    let mut st = crate::store::testing::open(&path, keyring, Create::Yes).unwrap();
    let now = clock.now();
    let ids = names.iter().map(|n| add(&mut st, n, now)).collect();
    let config = Config::default();
    let engine = Arc::new(Engine::new(EngineParts {
        store: crate::store::StoreHandle::from_store(st).unwrap(),
        client: TokenClient::new(crate::renewal::client_settings(&config)).unwrap(),
        policy: config.renewal.policy(),
        clock,
        owner: Owner::current("test"),
        http_timeout: Duration::from_secs(5),
        spill_dir: None,
        limits: crate::renewal::limits::Limits::new(1, 1),
        hooks: Arc::new(NoHooks),
    }));
    (dir, engine, ids)
}

/// The driver with paused time and a wall clock moved by hand: it
/// sleeps until the machine's next wake (re-reading the clock at least
/// every `max_sleep`), so a set-aside connection is retried once the
/// wall clock passes its backoff, and not before, however long the
/// loop runs; the watchdog is called on every turn.
#[tokio::test(start_paused = true)]
async fn the_driver_retries_a_set_aside_connection_when_the_wall_clock_passes_its_backoff() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let manual = crate::clock::ManualClock::new(chrono::Utc::now());
    let (_dir, engine, ids) = engine_with(Arc::new(manual.clone()), &["acme"]);
    let (mut sched, _snapshot) = Scheduler::new(engine.clone(), 4, 4, Duration::from_secs(60));
    let row = engine
        .store()
        .read(move |st| st.get_by_id(ids[0]))
        .await
        .unwrap()
        .unwrap();
    sched.upsert(&row, engine.clock().now());
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    with_task(&mut sched, move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move { panic!("boom") }
    });
    let turns = Arc::new(AtomicUsize::new(0));
    let watchdog = turns.clone();
    let (_tx, rx) = mpsc::channel::<Input>(4);
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        sched.run(rx, stop.clone(), Duration::from_secs(1), move || {
            watchdog.fetch_add(1, Ordering::SeqCst);
        }),
    );
    // Conditions are waited for by counting steps, not by a time bound:
    // paused time runs ahead whenever the loop waits on a store call
    // (a blocking thread), so virtual time says nothing about progress.
    async fn until(what: &str, cond: impl Fn() -> bool) {
        for _ in 0..200_000 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        panic!("never: {what}");
    }
    until("a first refresh", || calls.load(Ordering::SeqCst) >= 1).await;
    // Many loop turns with the wall clock standing still: the backoff
    // has not passed, nothing is tried again.
    let seen = turns.load(Ordering::SeqCst);
    until("loop turns", || turns.load(Ordering::SeqCst) >= seen + 20).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "retried before its backoff"
    );
    manual.advance(chrono::Duration::seconds(61));
    until("the retry", || calls.load(Ordering::SeqCst) >= 2).await;
    stop.cancel();
    task.await.unwrap();
}

/// Issue 12 item 1: a panic in one connection's refresh task is caught
/// by the scheduler: the connection is set aside with the panic's
/// message and a `connection_faulty` alert, its slot is freed, and the
/// next connection on the same instance (limit 1) starts.
#[tokio::test]
async fn a_refresh_task_that_panics_sets_its_connection_aside_and_frees_its_slot() {
    let clock = crate::clock::system();
    let now = clock.now();
    let (_dir, engine, ids) = engine_with(clock, &["acme", "beta"]);
    let [acme, beta] = ids[..] else {
        unreachable!()
    };
    let (mut sched, _snapshot) = Scheduler::new(engine.clone(), 1, 1, Duration::from_secs(60));
    for id in [acme, beta] {
        let row = engine
            .store()
            .read(move |st| st.get_by_id(id))
            .await
            .unwrap()
            .unwrap();
        sched.upsert(&row, now);
    }
    make_ready(&mut sched, now).await;
    make_ready(&mut sched, now).await;

    let mut tasks = tokio::task::JoinSet::new();
    // Both are on one instance with a limit of one: the first starts alone.
    with_task(&mut sched, |id| async move {
        panic!("attempt to add with overflow (connection {id})");
    });
    sched.dispatch(&mut tasks);
    assert_eq!((running(&sched), tasks.len()), (1, 1));
    let started = *sched.spawned.values().next().unwrap();
    let other = if started == acme { beta } else { acme };

    let joined = tasks.join_next_with_id().await.unwrap();
    assert!(joined.as_ref().is_err_and(|e| e.is_panic()));
    sched.joined(joined).await;
    assert_eq!(running(&sched), 0);
    assert!(
        sched.machine.busy.iter().all(|b| *b == 0),
        "the slot is freed"
    );
    assert!(sched.spawned.is_empty());
    let s = sched.machine.index[&started];
    assert_eq!(sched.machine.entries[s as usize].phase, Phase::Idle);
    assert!(
        !sched.machine.timers.iter().any(|(_, t)| *t == s),
        "not scheduled"
    );
    let aside = sched.machine.aside.get(&AsideKey::Id(started)).unwrap();
    assert!(!aside.unreadable);
    assert_eq!(aside.backoff, ASIDE_FIRST);

    sched.flush_alerts().await;
    let set_aside = engine
        .store()
        .read(crate::store::alerts::set_aside)
        .await
        .unwrap();
    assert_eq!(set_aside.len(), 1);
    assert_eq!(set_aside[0].key, started.to_string());
    let summary = &set_aside[0].facts.summary;
    assert!(
        summary.contains("internal error while refreshing: attempt to add with overflow"),
        "{summary}"
    );

    // The other one goes on.
    with_task(&mut sched, |id| async move {
        Done {
            id,
            fault: None,
            error: None,
            sent: true,
            row: Ok(None),
        }
    });
    sched.dispatch(&mut tasks);
    assert_eq!(sched.spawned.values().copied().collect::<Vec<_>>(), [other]);
    let joined = tasks.join_next_with_id().await.unwrap();
    sched.joined(joined).await;
    assert_eq!(running(&sched), 0);

    // Looked at again after the backoff: it is refreshed again and, if
    // it panics again, waits twice as long, without a second log line.
    let key = AsideKey::Id(started);
    sched.fire(Wake::Aside(key)).await;
    assert_eq!(sched.machine.snapshot().ready, 1);
    with_task(&mut sched, |_| async move { panic!("again") });
    sched.dispatch(&mut tasks);
    let joined = tasks.join_next_with_id().await.unwrap();
    sched.joined(joined).await;
    assert_eq!(
        sched.machine.aside.get(&key).unwrap().backoff,
        ASIDE_FIRST * 2
    );
    assert_eq!(running(&sched), 0);
}
