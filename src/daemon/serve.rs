//! `serve`: start, reload, shutdown.

use std::collections::HashSet;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::api::{self, Api};
use super::lock::StoreLock;
use super::metrics::Metrics;
use super::{callback, listen, notify};
use crate::acumatica::TokenClient;
use crate::alerts::{self, AlertFacts, AlertKind, Wake};
use crate::clock::SharedClock;
use crate::config::Config;
use crate::renewal;
use crate::renewal::engine::{Engine, EngineParts, Hooks, import_spilled};
use crate::renewal::scheduler::{Input, Scheduler};
use crate::secret::Secret;
use crate::store::claims::Owner;
use crate::store::{self, Create, Store};

/// CLI writes are acted on within a second (DESIGN §5). The store watcher
/// looks at the store after every write to its WAL file (see `watch`), and
/// at least this often in case an event was missed...
const WATCH_FALLBACK: Duration = Duration::from_secs(5);
/// ...and at most once per this long, so a burst of commits costs one look.
const WATCH_GAP: Duration = Duration::from_millis(100);

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
    // Before anything is claimed or READY=1 is sent: until these exist, SIGTERM
    // and SIGHUP (whose default is to terminate) would kill the process outright,
    // dropping a refresh in flight. Signals that arrive early wait in the streams.
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;

    let path = config.store_path();
    let keys = store::resolve_keyring(&config, &path, false);
    if !path.exists() {
        match &keys {
            Ok(k) if k.explicit => {}
            _ => anyhow::bail!(
                "no store at {}: add connections first (`acutoken connection add` or `import`), or give serve an explicit key (systemd credential, store.key_file or ACUTOKEN_KEY) to start empty",
                path.display()
            ),
        }
    }
    let keys = keys?;
    if let Some(dir) = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty() && !p.exists())
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let lock = StoreLock::acquire(&path)?;
    // One keyring for every handle: a key rotation switches them all at once.
    let keyring = store::SharedKeyring::new(keys.keyring.clone());
    let open = |create| Store::open_shared(&path, &keyring, create);
    let mut engine_store = open(Create::Yes)?;
    if engine_store.registered_key_ids()?.len() > 1 {
        // Only a rotation that stopped midway leaves two keys registered.
        tracing::warn!(
            "a key rotation did not finish (the store has more than one key): run `acutoken key rotate --new-key-file FILE` again with the same new key; until then a value it re-sealed opens only if that key is in store.previous_key_files"
        );
    }
    let watcher_store = open(Create::No)?;
    let alerts_store = open(Create::No)?;

    let clock = opts.clock.clone();
    let spill_dir = config.spill_dir();
    let spilled = import_spilled(&mut engine_store, &config.spill_dirs(), clock.now())?;
    if spilled.imported > 0 {
        tracing::warn!(
            imported = spilled.imported,
            "imported rotated tokens spilled by a previous run"
        );
    }
    alert_rejected_spills(&mut engine_store, &config, &spilled.rejected, clock.now())?;

    let (config_tx, config_rx) = watch::channel(Arc::new(config.clone()));
    let wake = Wake::new();
    let metrics = Metrics::install()?;
    let client = TokenClient::new(renewal::client_settings(&config))?;
    // The one handle every task writes through (group commit) and reads from.
    let engine_store = store::StoreHandle::from_store(engine_store)?;
    let engine = Arc::new(Engine::new(EngineParts {
        store: engine_store.clone(),
        client: client.clone(),
        policy: config.renewal.policy(),
        clock: clock.clone(),
        owner: Owner::current("serve"),
        http_timeout: config.renewal.http_timeout,
        spill_dir: Some(spill_dir.clone()),
        limits: renewal::limits_from(&config),
        hooks: Arc::new(DaemonHooks {
            wake: wake.clone(),
            config: config_rx.clone(),
            metrics: metrics.clone(),
        }),
    }));

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
    // One streamed pass plans every connection and finds those whose alert
    // conditions hold or whose alerts fire; only these are re-evaluated in the
    // store, before anything is delivered. Nothing secret is read, and a
    // million connections never sit in memory as full rows. A row that does
    // not read is set aside (logged, alerted below) and the pass goes on.
    let (scheduler, to_sync, scheduled, faults) = {
        let st = engine_store.clone();
        let policy = config.renewal.policy();
        let now = clock.now();
        st.read(move |st| -> Result<_, store::StoreError> {
            let mut scheduler = scheduler;
            let firing: HashSet<uuid::Uuid> = store::alerts::firing_connection_ids(st.db())?
                .iter()
                .filter_map(|k| uuid::Uuid::parse_str(k).ok())
                .collect();
            scheduler.reserve(st.count()?);
            let mut to_sync = Vec::new();
            let mut faults = Vec::new();
            let mut n = 0usize;
            st.each_for_planning(
                |row| {
                    n += 1;
                    if firing.contains(&row.conn.id)
                        || !crate::renewal::alert_conditions::desired(row, &policy, now).is_empty()
                    {
                        to_sync.push(row.conn.id);
                    }
                    scheduler.load(row, now);
                },
                |fault| faults.push(fault),
            )?;
            for fault in &faults {
                tracing::error!(
                    connection = %fault.label(),
                    column = fault.column,
                    "{fault}: the connection is set aside; every other connection goes on"
                );
                scheduler.load_fault(fault, now);
            }
            scheduler.finish_load();
            Ok((scheduler, to_sync, n, faults))
        })
        .await?
    };
    {
        let policy = config.renewal.policy();
        let now = clock.now();
        for chunk in to_sync.chunks(500) {
            let (policy, chunk) = (policy.clone(), chunk.to_vec());
            engine_store
                .write(move |tx, _| {
                    for id in chunk {
                        match store::connections::get_by_id_tx(tx, id) {
                            Ok(Some(row)) => {
                                let desired =
                                    crate::renewal::alert_conditions::desired(&row, &policy, now);
                                store::alerts::sync_connection(tx, &row, &desired, now)?;
                            }
                            // Changed under us into a row that does not read:
                            // the scheduler's next look sets it aside.
                            Ok(None) | Err(store::StoreError::Corrupt(_)) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    Ok(())
                })
                .await?;
        }
        // Rows that do not read: one alert each (kept, not repeated, while
        // it fires), and those fixed or removed while no daemon ran resolve.
        engine_store
            .write(move |tx, _| {
                let keys: HashSet<String> = faults.iter().map(|f| f.key.clone()).collect();
                store::alerts::resolve_unreadable_except(tx, &keys, now)?;
                for fault in &faults {
                    store::alerts::raise_faulty(
                        tx,
                        &fault.key,
                        &AlertFacts::row_unreadable(fault),
                        now,
                    )?;
                }
                Ok(())
            })
            .await?;
    }
    // Tokens are served from memory while the store is unchanged.
    engine.cache_tokens(open(Create::No)?);

    let (sched_tx, sched_rx) = mpsc::channel::<Input>(4096);
    let watchdog_on = notify::watchdog_interval().is_some();
    let sched_task = tokio::spawn(scheduler.run(
        sched_rx,
        shutdown.clone(),
        config.serve.shutdown_timeout,
        move || {
            if watchdog_on {
                notify::notify("WATCHDOG=1");
            }
        },
    ));

    let mut tasks = tokio::task::JoinSet::new();
    // CLI writes reach the scheduler through the store's change sequence.
    {
        let tx = sched_tx.clone();
        let shutdown = shutdown.clone();
        let wake = wake.clone();
        let mut st = watcher_store;
        let mut seq = st.change_seq()?;
        let mut version = st.data_version()?;
        let clock = clock.clone();
        let mut watch = super::watch::StoreWatch::new(st.path());
        tasks.spawn(async move {
            let mut last_prune = clock.now();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = watch.wait(WATCH_FALLBACK) => {}
                }
                let now = clock.now();
                let prune = now - last_prune > chrono::Duration::hours(6);
                let (res, back, seen) = tokio::task::spawn_blocking(move || {
                    // data_version moves only when another connection commits:
                    // an idle store costs one in-memory pragma per turn.
                    let seen = st.data_version().unwrap_or(version.wrapping_add(1));
                    let r = if seen == version {
                        Ok(store::connections::Changes {
                            newest: seq,
                            ..Default::default()
                        })
                    } else {
                        st.changes_since(seq)
                    };
                    if prune && let Err(e) = st.prune_events(now) {
                        tracing::warn!(error = %e, "cannot prune old history");
                    }
                    (r, st, seen)
                })
                .await
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
                st = back;
                if prune {
                    last_prune = now;
                }
                match res {
                    Ok(store::connections::Changes {
                        rows,
                        faults,
                        removed,
                        newest,
                    }) => {
                        if !rows.is_empty() || !removed.is_empty() {
                            wake.poke();
                        }
                        for row in rows {
                            let _ = tx.send(Input::Upsert(Box::new(row))).await;
                        }
                        for fault in faults {
                            let _ = tx.send(Input::Faulty(Box::new(fault))).await;
                        }
                        for id in removed {
                            let _ = tx.send(Input::Remove(id)).await;
                        }
                        seq = newest;
                        version = seen;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot read changes from the store"),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(WATCH_GAP) => {}
                }
            }
        });
    }
    // Invariant 2: keep retrying the save of held tokens.
    {
        let engine = engine.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(3)) => {}
                }
                if engine.unsaved() > 0 {
                    engine.retry_unsaved().await;
                }
            }
        });
    }
    {
        let (cfg, clock, shutdown, wake) = (
            config_rx.clone(),
            clock.clone(),
            shutdown.clone(),
            wake.clone(),
        );
        tasks.spawn(async move {
            if let Err(e) = alerts::run(alerts_store, cfg, clock, shutdown, wake).await {
                tracing::error!(error = %e, "the alert delivery worker stopped");
            }
        });
    }
    if config.alerts.digest.is_some() {
        let st = open(Create::No)?;
        let (cfg, shutdown, clock) = (config_rx.clone(), shutdown.clone(), clock.clone());
        tasks.spawn(async move {
            if let Err(e) = alerts::run_digest(st, cfg, clock, shutdown).await {
                tracing::error!(error = %e, "the digest scheduler stopped");
            }
        });
    }
    // The store-derived gauges scan every connection: gathered only when
    // someone can read them.
    if config.metrics.listen.is_some() {
        let m = metrics.clone();
        let st = open(Create::No)?;
        let (clock, shutdown, snap) = (clock.clone(), shutdown.clone(), snapshot.clone());
        let cfg = config_rx.clone();
        tasks.spawn(async move { m.update_loop(st, cfg, clock, snap, shutdown).await });
    }

    let ready = Arc::new(AtomicBool::new(false));
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
    // Every listener is served with the same bounds (see `listen`).
    let api_limits =
        listen::Limits::with_request_timeout(listen::request_timeout(config.renewal.http_timeout));
    let socket = config.socket_path();
    let listener = bind_socket(&socket, config.api.socket_group.as_deref())?;
    {
        let router = api::router(api.clone());
        let shutdown = shutdown.clone();
        tasks.spawn(listen::serve(
            "api.socket",
            listener,
            router,
            api_limits,
            shutdown,
        ));
    }
    if let Some(addr) = config.api.listen {
        if !addr.ip().is_loopback() {
            anyhow::bail!(
                "api.listen {addr} is not a loopback address: this build serves the TCP API on loopback only; put a TLS reverse proxy in front for remote applications"
            );
        }
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on api.listen {addr}"))?;
        let router = api::tcp_router(api.clone());
        let shutdown = shutdown.clone();
        tasks.spawn(listen::serve("api.listen", l, router, api_limits, shutdown));
    }
    if let Some(addr) = config.callback.listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on callback.listen {addr}"))?;
        let router = callback::router(engine.clone(), wake.clone(), &config.callback_path());
        let shutdown = shutdown.clone();
        tracing::info!(%addr, path = %config.callback_path(), "authorization callback listening");
        tasks.spawn(listen::serve(
            "callback.listen",
            l,
            router,
            api_limits,
            shutdown,
        ));
    }
    if let Some(addr) = config.metrics.listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on metrics.listen {addr}"))?;
        let router = metrics.router(ready.clone());
        let shutdown = shutdown.clone();
        let limits = listen::Limits::with_request_timeout(listen::METRICS_REQUEST_TIMEOUT);
        tasks.spawn(listen::serve("metrics.listen", l, router, limits, shutdown));
    }

    ready.store(true, Ordering::SeqCst);
    metrics.reloaded(clock.now());
    notify::notify("READY=1");
    tracing::info!(store = %path.display(), socket = %socket.display(), connections = scheduled, lock = %lock.path().display(), "acutoken is ready");

    let mut current = config;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: stopping"); break }
            _ = int.recv() => { tracing::info!("SIGINT: stopping"); break }
            _ = stop.cancelled() => break,
            _ = hup.recv() => {
                notify::reloading();
                match reload(&opts.explicit_config, &current) {
                    Ok((new, client)) => {
                        engine.set_policy(new.renewal.policy());
                        engine.limits().set(
                            new.renewal.max_concurrent,
                            new.renewal.per_instance_concurrent,
                        );
                        engine.set_client(client);
                        let _ = sched_tx.send(Input::Limits {
                            global: new.renewal.max_concurrent,
                            per_instance: new.renewal.per_instance_concurrent,
                        }).await;
                        if let Some(l) = &level
                            && let Err(e) = l.set(&new.log.level)
                        {
                            tracing::warn!(error = %e, "cannot change the log level");
                        }
                        if let Ok(t) = read_api_tokens(&new) {
                            *tokens.write().unwrap_or_else(|e| e.into_inner()) = t;
                        }
                        warn_restart_only(&current, &new);
                        config_tx.send_replace(Arc::new(new.clone()));
                        current = new;
                        let now = clock.now();
                        let _ = engine_store.write(move |tx, _| store::alerts::resolve_global(tx, AlertKind::ConfigReloadFailed, now)).await;
                        wake.poke();
                        metrics.reloaded(now);
                        tracing::info!("configuration reloaded");
                    }
                    Err(e) => {
                        let msg = format!("{e:#}").replace('\n', " ");
                        eprintln!("error: reload refused, still running on the previous configuration: {msg}");
                        tracing::error!(alert.kind = "config_reload_failed", error = %msg, "reload refused; the previous configuration stays in force");
                        let now = clock.now();
                        let facts = AlertFacts::config_reload_failed(&msg);
                        let _ = engine_store.write(move |tx, _| store::alerts::raise(tx, &facts, now)).await;
                        wake.poke();
                    }
                }
                notify::notify("READY=1");
            }
        }
    }

    notify::notify("STOPPING=1");
    ready.store(false, Ordering::SeqCst);
    // No new claims from here on (scheduler, API, callback); what is in flight
    // finishes and saves.
    engine.stop_claims();
    shutdown.cancel();
    // Refreshes and code exchanges asked for through the API and the callback
    // run inside their handlers: they get the scheduler's bound too, or a
    // rotated token would be dropped mid-request.
    let stop_by = tokio::time::Instant::now() + current.serve.shutdown_timeout;
    let _ = sched_task.await;
    let drained = tokio::time::timeout_at(stop_by + Duration::from_secs(1), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
    }
    if engine.unsaved() > 0 {
        engine.retry_unsaved().await;
    }
    let _ = std::fs::remove_file(&socket);
    let unsaved = engine.unsaved();
    drop(lock);
    if unsaved > 0 {
        eprintln!(
            "error: {unsaved} rotated refresh token(s) could not be saved; they are spilled (sealed) in {} and imported at the next start",
            spill_dir.display()
        );
        return Ok(1);
    }
    tracing::info!("stopped");
    Ok(0)
}

/// Parse, validate, build: anything that fails leaves the running config alone.
fn reload(explicit: &Option<PathBuf>, current: &Config) -> anyhow::Result<(Config, TokenClient)> {
    let loaded = Config::load(explicit.as_deref())?;
    let new = loaded.config;
    if new.store_path() != current.store_path() {
        anyhow::bail!("store.path cannot change on reload (restart to switch stores)");
    }
    let client = TokenClient::new(renewal::client_settings(&new))?;
    read_api_tokens(&new)?;
    Ok((new, client))
}

fn warn_restart_only(old: &Config, new: &Config) {
    let changed = [
        ("api.socket", old.api.socket != new.api.socket),
        ("api.listen", old.api.listen != new.api.listen),
        (
            "callback.listen",
            old.callback.listen != new.callback.listen,
        ),
        ("callback.path", old.callback.path != new.callback.path),
        ("metrics.listen", old.metrics.listen != new.metrics.listen),
        ("log.format", old.log.format != new.log.format),
        ("alerts.digest", old.alerts.digest != new.alerts.digest),
    ];
    for (key, c) in changed {
        if c {
            tracing::warn!(
                key,
                "this setting changed but takes effect only after a restart"
            );
        }
    }
}

fn read_api_tokens(config: &Config) -> anyhow::Result<Vec<Secret>> {
    let Some(p) = &config.api.token_file else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(p)
        .with_context(|| format!("cannot read api.token_file {}", p.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(Secret::new)
        .collect())
}

/// Keeps `store_write_failed` firing while spilled tokens that could not be
/// imported wait in a `rejected/` directory for a human; resolves it once
/// they are dealt with (looked at each start).
fn alert_rejected_spills(
    store: &mut Store,
    config: &Config,
    now_rejected: &[(PathBuf, String)],
    now: crate::model::Timestamp,
) -> Result<(), store::StoreError> {
    let mut waiting: Vec<PathBuf> = Vec::new();
    for dir in config.spill_dirs() {
        if let Ok(entries) = std::fs::read_dir(dir.join("rejected")) {
            waiting.extend(entries.flatten().map(|e| e.path()));
        }
    }
    if waiting.is_empty() {
        return store
            .write(|tx, _| store::alerts::resolve_global(tx, AlertKind::StoreWriteFailed, now));
    }
    let why = now_rejected
        .first()
        .map(|(_, why)| format!(" ({why})"))
        .unwrap_or_default();
    let facts = AlertFacts::global(
        AlertKind::StoreWriteFailed,
        crate::model::Severity::Critical,
        format!(
            "{} spilled refresh token(s) could not be imported into the store{why}; kept in {}",
            waiting.len(),
            waiting
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        "if they were sealed with a key retired since, add that key to store.previous_key_files, move the files back into the spill directory and restart acutoken; otherwise check the connections named in the files with `acutoken connection show` (they may need re-authorization), then delete the files",
    );
    store.write(|tx, _| store::alerts::raise(tx, &facts, now))
}

fn bind_socket(path: &Path, group: Option<&str>) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty() && !p.exists())
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    // We hold the store lock, so a socket file left here belongs to a dead daemon.
    if path.exists() {
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    let l = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on api.socket {}", path.display()))?;
    let mode = if let Some(g) = group {
        let grp = nix::unistd::Group::from_name(g)
            .ok()
            .flatten()
            .ok_or_else(|| {
                anyhow::anyhow!("api.socket_group `{g}` is not a group on this system")
            })?;
        nix::unistd::chown(path, None, Some(grp.gid))
            .with_context(|| format!("cannot give {} to group {g}", path.display()))?;
        0o660
    } else {
        0o600
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(l)
}
