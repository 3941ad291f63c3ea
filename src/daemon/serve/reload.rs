//! SIGHUP: the configuration re-read and, if it is whole, put in force
//! without a restart; if not, refused with an alert while the previous one
//! stays.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use tokio_rustls::rustls::sign::CertifiedKey;

use crate::acumatica::TokenClient;
use crate::alerts::{AlertFacts, AlertKind, Wake};
use crate::clock::SharedClock;
use crate::config::Config;
use crate::daemon::metrics::Metrics;
use crate::daemon::notify;
use crate::daemon::tls::{self, Certificate};
use crate::logging::LevelHandle;
use crate::renewal;
use crate::renewal::engine::Engine;
use crate::renewal::scheduler::Input;
use crate::secret::Secret;
use crate::store::StoreHandle;

/// Everything a reload changes or tells, and the configuration in force.
pub(super) struct Reloader {
    /// The config file named on the command line.
    pub(super) explicit_config: Option<PathBuf>,
    /// The configuration in force.
    pub(super) current: Config,
    pub(super) engine: Arc<Engine>,
    pub(super) sched_tx: mpsc::Sender<Input>,
    /// The log filter, when `serve` installed the logging.
    pub(super) level: Option<LevelHandle>,
    /// The API's bearer tokens.
    pub(super) tokens: Arc<std::sync::RwLock<Vec<Secret>>>,
    /// The certificate `api.listen` serves, when it speaks TLS.
    pub(super) tls: Option<Arc<Certificate>>,
    pub(super) config_tx: watch::Sender<Arc<Config>>,
    pub(super) engine_store: StoreHandle,
    pub(super) wake: Wake,
    pub(super) metrics: Metrics,
    pub(super) clock: SharedClock,
}

impl Reloader {
    /// Re-reads the configuration and puts it in force: the policy, limits,
    /// HTTP client, log level, API tokens and TLS certificate change at once
    /// (connections already open keep the certificate they were served), and settings
    /// that need a restart are named. A configuration that does not load,
    /// validate or build is refused whole: the running one stays, and
    /// `config_reload_failed` fires until a reload succeeds.
    pub(super) async fn on_hangup(&mut self) {
        notify::reloading();
        match reload(&self.explicit_config, &self.current, self.tls.is_some()) {
            Ok(Reloaded {
                config: new,
                client,
                certificate,
            }) => {
                self.engine.set_policy(new.renewal.policy());
                self.engine.limits().set(
                    new.renewal.max_concurrent,
                    new.renewal.per_instance_concurrent,
                );
                self.engine.set_client(client);
                let _ = self
                    .sched_tx
                    .send(Input::Limits {
                        global: new.renewal.max_concurrent,
                        per_instance: new.renewal.per_instance_concurrent,
                    })
                    .await;
                if let Some(l) = &self.level
                    && let Err(e) = l.set(&new.log.level)
                {
                    tracing::warn!(error = %e, "cannot change the log level");
                }
                if let Ok(t) = read_api_tokens(&new) {
                    *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = t;
                }
                if let (Some(tls), Some(key)) = (&self.tls, certificate) {
                    tls.replace(key);
                    tracing::info!(
                        "api.listen serves the certificate re-read from api.tls_cert_file"
                    );
                }
                warn_restart_only(&self.current, &new);
                self.config_tx.send_replace(Arc::new(new.clone()));
                self.current = new;
                let now = self.clock.now();
                let _ = self
                    .engine_store
                    .resolve_global_alert(AlertKind::ConfigReloadFailed, now)
                    .await;
                self.wake.poke();
                self.metrics.reloaded(now);
                tracing::info!("configuration reloaded");
            }
            Err(e) => {
                let msg = format!("{e:#}").replace('\n', " ");
                eprintln!(
                    "{}error: reload refused, still running on the previous configuration: {msg}",
                    crate::logging::stderr_prefix(tracing::Level::ERROR)
                );
                tracing::error!(alert.kind = "config_reload_failed", error = %msg, "reload refused; the previous configuration stays in force");
                let now = self.clock.now();
                let facts = AlertFacts::config_reload_failed(&msg);
                let _ = self.engine_store.raise_alert(facts, now).await;
                self.wake.poke();
            }
        }
        notify::notify("READY=1");
    }
}

/// A configuration read, validated and built, ready to be put in force.
struct Reloaded {
    config: Config,
    client: TokenClient,
    /// The certificate and key re-read for `api.listen`, when it speaks TLS
    /// and the new config still names them.
    certificate: Option<Arc<CertifiedKey>>,
}

/// Parse, validate, build: anything that fails leaves the running config
/// alone. With `tls`, the running `api.listen` speaks TLS and its
/// certificate files are re-read: a pair that does not load refuses the
/// reload and the old certificate stays.
fn reload(explicit: &Option<PathBuf>, current: &Config, tls: bool) -> anyhow::Result<Reloaded> {
    let loaded = Config::load(explicit.as_deref())?;
    let new = loaded.config;
    if new.store_path() != current.store_path() {
        anyhow::bail!("store.path cannot change on reload (restart to switch stores)");
    }
    let client = TokenClient::new(renewal::client_settings(&new))?;
    read_api_tokens(&new)?;
    let certificate = match tls::files(&new) {
        Some((cert, key)) if tls => Some(tls::load(cert, key)?),
        _ => None,
    };
    Ok(Reloaded {
        config: new,
        client,
        certificate,
    })
}

/// Names the settings that changed but are read only at start.
fn warn_restart_only(old: &Config, new: &Config) {
    let changed = [
        ("api.socket", old.api.socket != new.api.socket),
        ("api.listen", old.api.listen != new.api.listen),
        (
            // Whether the listener speaks TLS; the files themselves are re-read.
            "api.tls_cert_file",
            tls::files(old).is_some() != tls::files(new).is_some(),
        ),
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

/// The bearer tokens of `api.listen`, one a line (`#` comments and blank
/// lines skipped); none without `api.token_file`.
pub(super) fn read_api_tokens(config: &Config) -> anyhow::Result<Vec<Secret>> {
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
