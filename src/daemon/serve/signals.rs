//! The signals `serve` answers: SIGTERM and SIGINT stop it, SIGHUP reloads.

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// What the daemon was asked to do next.
pub(super) enum Asked {
    /// Stop: SIGTERM, SIGINT, or the caller's `stop` token.
    Stop,
    /// Re-read the configuration: SIGHUP.
    Reload,
}

/// The daemon's signal streams, installed once at start.
pub(super) struct Signals {
    hup: Signal,
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Installs the handlers. Called before anything is claimed or READY=1
    /// is sent: until these exist, SIGTERM and SIGHUP (whose default is to
    /// terminate) would kill the process outright, dropping a refresh in
    /// flight. Signals that arrive early wait in the streams.
    pub(super) fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next signal, or for `stop`, and says what it asks for.
    pub(super) async fn next(&mut self, stop: &CancellationToken) -> Asked {
        tokio::select! {
            _ = self.term.recv() => { tracing::info!("SIGTERM: stopping"); Asked::Stop }
            _ = self.int.recv() => { tracing::info!("SIGINT: stopping"); Asked::Stop }
            _ = stop.cancelled() => Asked::Stop,
            _ = self.hup.recv() => Asked::Reload,
        }
    }
}
