//! Logging: `log.format = text|json|journald`, level changeable on reload.

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::Layered;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry, reload};

use std::io::IsTerminal as _;
use std::os::fd::AsFd as _;
use std::os::unix::fs::MetadataExt as _;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::registry::LookupSpan;

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

/// Whether stderr is the journal's stream: systemd (`StandardError=journal`,
/// the default for services) sets `JOURNAL_STREAM=<device>:<inode>` of the
/// stream it connected, and a process must compare it with the descriptor it
/// writes to, since a redirected stderr (`2>file`) inherits the variable
/// (sd_journal_stream_fd(3), systemd.exec(5) "JOURNAL_STREAM").
fn stderr_is_journal() -> bool {
    static ON_JOURNAL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON_JOURNAL.get_or_init(journal_stream_matches_stderr)
}

fn journal_stream_matches_stderr() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // fstat(2) of our own stderr, through a duplicate of the descriptor.
    std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map(std::fs::File::from)
        .and_then(|f| f.metadata())
        .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// The `text` format as journald wants it: journald stamps every line itself,
/// so no timestamp of ours, and each line begins with the sd-daemon(3)
/// priority prefix (`<3>` error ... `<7>` debug) that journald turns into the
/// entry's PRIORITY (SyslogLevelPrefix=yes, the default), so that
/// `journalctl -p warning` finds our warnings and errors.
struct Prioritized<F>(F);

impl<S, N, F> FormatEvent<S, N> for Prioritized<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        writer.write_str(priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// sd-daemon(3)'s prefix for a line at `level`.
fn priority(level: Level) -> &'static str {
    match level {
        Level::ERROR => "<3>",
        Level::WARN => "<4>",
        Level::INFO => "<6>",
        _ => "<7>",
    }
}

/// The priority prefix for a line written straight to stderr rather than
/// through the logger (the final `error:` line, `warning:` lines before
/// logging starts) when stderr is the journal's stream; empty anywhere else.
pub fn stderr_prefix(level: Level) -> &'static str {
    if stderr_is_journal() {
        priority(level)
    } else {
        ""
    }
}

/// Installs the global subscriber for `serve` and `demo`.
pub fn init(cfg: &LogConfig) -> Result<LevelHandle, String> {
    let (filter, handle) = reload::Layer::new(filter_for(&cfg.level)?);
    let fmt_layer: Output = match cfg.format {
        LogFormat::Text if stderr_is_journal() => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .event_format(Prioritized(
                format::format()
                    .without_time()
                    .with_target(false)
                    .with_ansi(false),
            ))
            .boxed(),
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
