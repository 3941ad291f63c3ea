//! `serve`: start, reload, shutdown.
//!
//! [`run`] is the sequence: [`start`] opens and locks the store, imports
//! spilled tokens, plans every connection and syncs alerts; [`tasks`] and
//! [`listeners`] start what runs alongside the scheduler; [`signals`] waits
//! for SIGTERM/SIGINT or SIGHUP, which [`reload`] handles; [`shutdown`]
//! stops in order.

mod listeners;
mod reload;
mod replica;
mod shutdown;
mod signals;
mod start;
mod tasks;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::api::Api;
use super::metrics::Metrics;
use super::notify;
use super::tls::Certificate;
use crate::acumatica::TokenClient;
use crate::alerts::{self, AlertFacts, Wake};
use crate::clock::SharedClock;
use crate::config::Config;
use crate::renewal;
use crate::renewal::engine::{Engine, EngineParts, Hooks};
use crate::renewal::scheduler::{Input, Scheduler};
use crate::store::claims::Owner;
use crate::store::{self, Create};
use reload::{Reloader, read_api_tokens};
use shutdown::Running;
use signals::{Asked, Signals};
use tasks::{Common, Tasks};

/// How `serve` was started.
pub struct ServeOptions {
    pub config: Config,
    /// The config file named on the command line, re-read on SIGHUP.
    pub explicit_config: Option<PathBuf>,
    pub clock: SharedClock,
    /// Logging already installed (demo): do not install again.
    pub logging_installed: bool,
}

/// Engine hooks of the running daemon.
struct DaemonHooks {
    wake: Wake,
    config: watch::Receiver<Arc<Config>>,
    metrics: Metrics,
}

impl Hooks for DaemonHooks {
    fn alerts_raised(&self) {
        self.wake.poke();
    }

    fn store_write_failed(&self, connection: &str, id: uuid::Uuid, error: &str) {
        let config = self.config.borrow().clone();
        let facts = AlertFacts::store_write_failed(Some((connection, id)), error);
        tracing::error!(
            alert.kind = "store_write_failed",
            alert.severity = "critical",
            connection,
            "a rotated refresh token could not be saved"
        );
        tokio::spawn(async move {
            for r in alerts::send_direct(&config, &facts).await {
                match &r.error {
                    None => {
                        tracing::info!(channel = %r.channel, "store_write_failed sent directly")
                    }
                    Some(e) => {
                        tracing::error!(channel = %r.channel, error = %e, "store_write_failed could not be sent")
                    }
                }
            }
        });
    }

    fn refreshed(&self, outcome: &'static str, seconds: f64) {
        self.metrics.refreshed(outcome, seconds);
    }
}

/// Runs the daemon until SIGTERM/SIGINT or `stop` fires. Returns the exit code.
pub async fn run(opts: ServeOptions, stop: CancellationToken) -> anyhow::Result<i32> {
    let config = opts.config;
    let level = if opts.logging_installed {
        None
    } else {
        Some(crate::logging::init(&config.log).map_err(anyhow::Error::msg)?)
    };
    // A core dump would hold decrypted tokens.
    let _ = nix::sys::prctl::set_dumpable(false);
    let mut signals = Signals::install()?;
    // Before the store: a certificate that does not load stops the start at once.
    let tls = Certificate::from_config(&config)?;

    let (opened, handles) = start::open_store(&config)?;
    let mut engine_store = handles.engine;
    let clock = opts.clock.clone();
    let spill_dir = config.spill_dir();
    start::import_spills(&mut engine_store, &config, clock.now())?;

    let (config_tx, config_rx) = watch::channel(Arc::new(config.clone()));
    let wake = Wake::new();
    let metrics = Metrics::install()?;
    let client = TokenClient::new(renewal::client_settings(&config))?;
    // The one handle every task writes through (group commit) and reads from.
    let engine_store = store::StoreHandle::from_store(engine_store)?;
    let owner = Owner::current("serve");
    let engine = Arc::new(Engine::new(EngineParts {
        store: engine_store.clone(),
        client: client.clone(),
        policy: config.renewal.policy(),
        clock: clock.clone(),
        owner: owner.clone(),
        http_timeout: config.renewal.http_timeout,
        spill_dir: Some(spill_dir.clone()),
        limits: renewal::limits_from(&config),
        hooks: Arc::new(DaemonHooks {
            wake: wake.clone(),
            config: config_rx.clone(),
            metrics: metrics.clone(),
        }),
    }));

    // On PostgreSQL this daemon is one replica of any number (DESIGN §10).
    let contact = Arc::new(store::replicas::Contact::default());
    let duty = if opened.is_postgres() {
        engine.share_with_replicas(config.store.lease, contact.clone());
        store::replicas::Duty::leased()
    } else {
        store::replicas::Duty::always()
    };
    let shutdown = CancellationToken::new();
    let max_sleep = notify::watchdog_interval()
        .map(|w| (w / 2).min(Duration::from_secs(60)))
        .unwrap_or(Duration::from_secs(60));
    let (mut scheduler, snapshot) = Scheduler::new(
        engine.clone(),
        config.renewal.max_concurrent,
        config.renewal.per_instance_concurrent,
        max_sleep,
    );
    scheduler.set_wake(wake.clone());
    let planned = start::plan(&engine_store, scheduler, &config, clock.now()).await?;
    start::sync_alerts(
        &engine_store,
        planned.to_sync,
        planned.faults,
        &config,
        clock.now(),
    )
    .await?;
    // Tokens are served from memory while the store is unchanged.
    engine.cache_tokens(opened.open(Create::No)?);

    let (sched_tx, sched_rx) = mpsc::channel::<Input>(4096);
    let watchdog_on = notify::watchdog_interval().is_some();
    let sched_task = tokio::spawn(planned.scheduler.run(
        sched_rx,
        shutdown.clone(),
        config.serve.shutdown_timeout,
        move || {
            if watchdog_on {
                notify::notify("WATCHDOG=1");
            }
        },
    ));

    let heartbeat = if opened.is_postgres() {
        let me = store::replicas::Me {
            name: config.replica_name(),
            owner: owner.as_str().to_string(),
            host: store::claims::hostname(),
            pid: std::process::id(),
            started_at: clock.now(),
            lease: config.store.lease,
        };
        Some(
            replica::Heartbeat::start(
                engine_store.clone(),
                me,
                duty.clone(),
                contact.clone(),
                clock.clone(),
                sched_tx.clone(),
            )
            .await?,
        )
    } else {
        None
    };

    let mut tasks = Tasks::new();
    let common = Common {
        config_rx: config_rx.clone(),
        clock: clock.clone(),
        shutdown: shutdown.clone(),
        wake: wake.clone(),
    };
    tasks::spawn_store_watcher(&mut tasks, handles.watcher, &sched_tx, &common)?;
    tasks::spawn_unsaved_retry(&mut tasks, &engine, &shutdown);
    tasks::spawn_alerts(&mut tasks, handles.alerts, &opened, &config, &common, &duty)?;
    tasks::spawn_metrics(&mut tasks, &metrics, &opened, &config, &snapshot, &common)?;

    let ready = Arc::new(crate::daemon::api::Readiness::default());
    let tokens = Arc::new(std::sync::RwLock::new(read_api_tokens(&config)?));
    let api = Api {
        engine: engine.clone(),
        store: engine_store.clone(),
        config: config_rx.clone(),
        ready: ready.clone(),
        scheduler: snapshot,
        tokens: tokens.clone(),
        rotator: Arc::default(),
    };
    let socket = listeners::spawn_listeners(
        &mut tasks,
        &config,
        tls.as_ref(),
        &api,
        &engine,
        &metrics,
        &ready,
        &common,
    )
    .await?;

    ready.set_started(true);
    tasks::spawn_store_health(&mut tasks, &opened, &ready, &common, &stop);
    metrics.reloaded(clock.now());
    notify::notify("READY=1");
    let (path, lock) = (&opened.path, &opened.lock);
    tracing::info!(store = %path.display(), socket = %socket.display(), connections = planned.scheduled, lock = %lock.path().display(), "acutoken is ready");

    let mut reloader = Reloader {
        explicit_config: opts.explicit_config,
        current: config,
        engine: engine.clone(),
        sched_tx,
        level,
        tokens,
        tls,
        config_tx,
        engine_store,
        wake,
        metrics,
        clock,
    };
    loop {
        match signals.next(&stop).await {
            Asked::Stop => break,
            Asked::Reload => reloader.on_hangup().await,
        }
    }

    let running = Running {
        ready,
        engine,
        shutdown,
        sched_task,
        tasks,
        socket,
        lock: opened.lock,
        spill_dir,
        heartbeat,
    };
    Ok(running.stop(reloader.current.serve.shutdown_timeout).await)
}
