//! Stopping `serve`: no new claims, what is in flight finishes and saves
//! within the shutdown timeout, and tokens that could not be saved are
//! reported (they are spilled, and imported at the next start).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::tasks::Tasks;
use crate::daemon::lock::StoreLock;
use crate::daemon::notify;
use crate::renewal::engine::Engine;

/// What a running daemon holds that stopping lets go of.
pub(super) struct Running {
    /// False from the moment stopping begins (`/readyz`).
    pub(super) ready: Arc<crate::daemon::api::Readiness>,
    pub(super) engine: Arc<Engine>,
    /// Cancels every task.
    pub(super) shutdown: CancellationToken,
    pub(super) sched_task: tokio::task::JoinHandle<()>,
    pub(super) tasks: Tasks,
    /// The API socket, removed at the end.
    pub(super) socket: PathBuf,
    /// Released once nothing more is written.
    pub(super) lock: Arc<StoreLock>,
    /// Where unsaved tokens are spilled (named in the report).
    pub(super) spill_dir: PathBuf,
    /// A replica's heartbeat (PostgreSQL): it keeps the claims of the
    /// refreshes in flight alive, so it stops after them.
    pub(super) heartbeat: Option<super::replica::Heartbeat>,
}

impl Running {
    /// Stops the daemon within `shutdown_timeout` and returns the exit code:
    /// 1 when rotated tokens could not be saved, else 0.
    pub(super) async fn stop(self, shutdown_timeout: Duration) -> i32 {
        let Running {
            ready,
            engine,
            shutdown,
            sched_task,
            mut tasks,
            socket,
            lock,
            spill_dir,
            heartbeat,
        } = self;
        notify::notify("STOPPING=1");
        ready.set_started(false);
        // No new claims from here on (scheduler, API, callback); what is in flight
        // finishes and saves.
        engine.stop_claims();
        shutdown.cancel();
        // Refreshes and code exchanges asked for through the API and the callback
        // run inside their handlers: they get the scheduler's bound too, or a
        // rotated token would be dropped mid-request.
        let stop_by = tokio::time::Instant::now() + shutdown_timeout;
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
        if let Some(h) = heartbeat {
            h.stop().await;
        }
        let _ = std::fs::remove_file(&socket);
        let unsaved = engine.unsaved();
        drop(lock);
        if unsaved > 0 {
            eprintln!(
                "{}error: {unsaved} rotated refresh token(s) could not be saved; they are spilled (sealed) in {} and imported at the next start",
                crate::logging::stderr_prefix(tracing::Level::ERROR),
                spill_dir.display()
            );
            return 1;
        }
        tracing::info!("stopped");
        0
    }
}
