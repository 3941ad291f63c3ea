//! Wakes the store watcher when the store may have changed, instead of
//! polling it: every commit, from any process, writes the store's WAL file,
//! and inotify reports that write. An idle daemon then does no work between
//! the fallback checks. Where inotify is unavailable (no watches left, an
//! unusual filesystem), the watcher polls as before. A PostgreSQL store has
//! no file: there the store's change notifications (LISTEN) wake it.

use std::ffi::OsString;
use std::os::fd::{AsFd as _, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::sync::Notify;

/// How often the store is looked at when inotify is unavailable.
pub const POLL_EVERY: Duration = Duration::from_millis(400);

/// Reports writes to one SQLite store's WAL file.
pub struct StoreWatch {
    /// Notified by the reading thread; `None` when polling.
    changed: Option<Arc<Notify>>,
    /// Dropping this closes the pipe the reading thread also waits on, so
    /// the thread ends with the watch.
    _stop: Option<OwnedFd>,
    /// A PostgreSQL store's listener, stopped when the watch is dropped.
    _listener: Option<crate::store::postgres::Listener>,
}

impl StoreWatch {
    /// Watches the directory of the store at `db` (so a WAL file that is
    /// removed and made again is still seen) from a thread that sleeps in
    /// `poll` until something happens. Falls back to polling the store, with
    /// a warning, when inotify cannot be set up.
    /// A PostgreSQL store: woken by its change notifications (LISTEN), and
    /// by the fallback interval while the listener cannot connect. Polls
    /// when the listener cannot be started.
    pub fn postgres(st: &crate::store::Store) -> StoreWatch {
        let changed = Arc::new(Notify::new());
        match st.listen_for_changes(changed.clone()) {
            Ok(listener) => StoreWatch {
                changed: Some(changed),
                _stop: None,
                _listener: listener,
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for store changes; looking every {} ms instead", POLL_EVERY.as_millis());
                StoreWatch {
                    changed: None,
                    _stop: None,
                    _listener: None,
                }
            }
        }
    }

    pub fn new(db: &Path) -> StoreWatch {
        let mut wal = db.file_name().unwrap_or_default().to_os_string();
        wal.push("-wal");
        let dir = match db.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        match start(dir, wal) {
            Ok((changed, stop)) => StoreWatch {
                changed: Some(changed),
                _stop: Some(stop),
                _listener: None,
            },
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    dir = %dir.display(),
                    "cannot watch the store directory; looking for CLI changes every {} ms instead",
                    POLL_EVERY.as_millis()
                );
                StoreWatch {
                    changed: None,
                    _stop: None,
                    _listener: None,
                }
            }
        }
    }

    /// True when changes are reported as they happen; false when polling.
    pub fn is_event_driven(&self) -> bool {
        self.changed.is_some()
    }

    /// Returns once the WAL file was written since the last call, or after
    /// `fallback` at the latest (after [`POLL_EVERY`] when polling).
    pub async fn wait(&mut self, fallback: Duration) {
        let Some(changed) = &self.changed else {
            tokio::time::sleep(POLL_EVERY).await;
            return;
        };
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(fallback) => {}
        }
    }
}

fn start(dir: &Path, wal: OsString) -> Result<(Arc<Notify>, OwnedFd), Errno> {
    let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
    ino.add_watch(
        dir,
        AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO,
    )?;
    let (stopped, stop) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let changed = Arc::new(Notify::new());
    let notify = changed.clone();
    std::thread::Builder::new()
        .name("store-watch".into())
        .spawn(move || read_events(&ino, &stopped, &wal, &notify))
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(Errno::EAGAIN as i32)))?;
    Ok((changed, stop))
}

/// Sleeps until inotify has events or the watch is dropped; notifies on
/// every batch that names the WAL file. On an error it notifies once and
/// stops: the watcher's fallback keeps it looking.
fn read_events(ino: &Inotify, stopped: &OwnedFd, wal: &OsString, changed: &Notify) {
    loop {
        let mut fds = [
            PollFd::new(ino.as_fd(), PollFlags::POLLIN),
            PollFd::new(stopped.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "the store watch stopped; looking every few seconds");
                changed.notify_one();
                return;
            }
        }
        if fds[1].any().unwrap_or(true) {
            return; // the StoreWatch is gone
        }
        let mut hit = false;
        loop {
            match ino.read_events() {
                Ok(events) => {
                    hit |= events.iter().any(|e| {
                        e.name.as_deref() == Some(wal.as_os_str())
                            || e.mask.contains(AddWatchFlags::IN_Q_OVERFLOW)
                    });
                }
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "the store watch stopped; looking every few seconds");
                    changed.notify_one();
                    return;
                }
            }
        }
        if hit {
            changed.notify_one();
            // Every commit writes the WAL many times and each write is an
            // event: the watcher looks at most every 100 ms anyway, so let
            // them gather instead of waking for each.
            std::thread::sleep(COALESCE);
        }
    }
}

/// How long the reading thread lets events gather after a batch that named the WAL.
const COALESCE: Duration = Duration::from_millis(50);

#[cfg(test)]
mod tests {
    use super::*;

    /// A write to the WAL file wakes the watch; a write to another file in
    /// the directory does not (only the bound ends that wait).
    #[tokio::test]
    async fn a_wal_write_wakes_it_and_other_files_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("acutoken.db");
        std::fs::write(&db, b"").unwrap();
        let mut watch = StoreWatch::new(&db);
        assert!(watch.is_event_driven());

        std::fs::write(dir.path().join("acutoken.db.lock"), b"x").unwrap();
        let other = tokio::time::timeout(
            Duration::from_millis(500),
            watch.wait(Duration::from_secs(3600)),
        )
        .await;
        assert!(other.is_err(), "a write to another file woke the watch");

        std::fs::write(dir.path().join("acutoken.db-wal"), b"frame").unwrap();
        tokio::time::timeout(
            Duration::from_secs(30),
            watch.wait(Duration::from_secs(3600)),
        )
        .await
        .expect("the WAL write did not wake the watch");
    }
}
