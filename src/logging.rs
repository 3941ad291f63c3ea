//! Logging: `log.format = text|json|journald`, level changeable on reload.

use tracing_subscriber::layer::Layered;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::{Layer, Registry, reload};

use std::io::IsTerminal as _;

type Output = Box<dyn Layer<Registry> + Send + Sync>;
type Filtered = Layered<Output, Registry>;

use crate::config::{LogConfig, LogFormat};

/// Changes the level of the installed subscriber (SIGHUP).
pub struct LevelHandle(reload::Handle<Targets, Filtered>);

impl LevelHandle {
    pub fn set(&self, level: &str) -> Result<(), String> {
        let filter = filter_for(level)?;
        self.0.reload(filter).map_err(|e| e.to_string())
    }
}

fn filter_for(level: &str) -> Result<Targets, String> {
    // Our events at the configured level; dependencies stay at warn.
    let ours: LevelFilter = level
        .parse()
        .map_err(|_| format!("unknown log level `{level}`"))?;
    Ok(Targets::new()
        .with_default(LevelFilter::WARN)
        .with_target("acutoken", ours))
}

/// Whether log lines on stderr may carry ANSI colour codes: only when stderr
/// is a terminal, and never when `NO_COLOR` is set to anything non-empty
/// (<https://no-color.org>). Files, pipes and journald's capture of stdout and
/// stderr would otherwise store the escape codes verbatim.
pub fn colour() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::stderr().is_terminal()
}

/// Installs the global subscriber for `serve` and `demo`.
pub fn init(cfg: &LogConfig) -> Result<LevelHandle, String> {
    let (filter, handle) = reload::Layer::new(filter_for(&cfg.level)?);
    let fmt_layer: Output = match cfg.format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(colour())
            .with_target(false)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_ansi(false)
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(l) => l.with_syslog_identifier("acutoken".into()).boxed(),
            Err(e) => {
                return Err(format!(
                    "log.format = \"journald\" but the journal is not reachable: {e}"
                ));
            }
        },
    };
    tracing_subscriber::registry()
        .with(fmt_layer)
        .with(filter)
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok(LevelHandle(handle))
}

/// A quiet stderr logger for CLI commands: warnings and errors only.
pub fn init_cli() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(colour())
        .with_target(false)
        .without_time()
        .with_max_level(LevelFilter::WARN)
        .try_init();
}
