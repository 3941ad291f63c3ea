//! Signal handling while an import builds a new store: SIGINT or SIGTERM
//! removes the half-built files instead of leaving them behind.

use tokio::signal::unix::Signal;

use crate::store::Leftovers;

/// Removes a store build's files if SIGINT or SIGTERM ends the import
/// (a killed process leaves them to the next import's sweep).
pub(super) struct CleanUpOnSignal(Option<tokio::task::JoinHandle<()>>);

/// SIGINT and SIGTERM, caught from before the build makes its first file
/// (a signal that comes before the handler runs waits for it).
pub(super) struct Interrupts(Option<(tokio::runtime::Handle, Signal, Signal)>);

impl Interrupts {
    pub(super) fn catch() -> Interrupts {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return Interrupts(None);
        };
        let _runtime = handle.enter();
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(int), Ok(term)) => Interrupts(Some((handle.clone(), int, term))),
            _ => Interrupts(None),
        }
    }
}

impl CleanUpOnSignal {
    pub(super) fn install(interrupts: Interrupts, leftovers: Leftovers) -> CleanUpOnSignal {
        let Some((handle, mut int, mut term)) = interrupts.0 else {
            return CleanUpOnSignal(None);
        };
        let task = handle.spawn(async move {
            loop {
                let code = tokio::select! {
                    _ = int.recv() => 130,
                    _ = term.recv() => 143,
                };
                // Nothing to remove: the store is in place, and the import
                // ends in a moment with its usual report.
                if leftovers.remove() {
                    eprintln!("error: interrupted: nothing imported");
                    std::process::exit(code);
                }
            }
        });
        CleanUpOnSignal(Some(task))
    }
}

impl Drop for CleanUpOnSignal {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.abort();
        }
    }
}
