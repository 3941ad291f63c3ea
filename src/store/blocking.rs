//! The one bridge from async code to a store connection that a task keeps
//! for itself (the change watcher, the metrics tally, the token cache, the
//! alert worker and the digest; the daemon's shared store is a
//! [`StoreHandle`](super::StoreHandle)). SQLite calls block: they run on a
//! blocking thread, and what they need comes back with the answer.
//!
//! A panic in `f` comes back as the `JoinError`; the caller decides whether
//! to resume it or to report it.

use std::sync::{Arc, Mutex};

use tokio::task::JoinError;

/// Runs `f` on `value`, which the caller owns alone, off the async threads,
/// and hands `value` back with the answer.
pub async fn with_owned<S, T, F>(value: S, f: F) -> Result<(S, T), JoinError>
where
    S: Send + 'static,
    T: Send + 'static,
    F: FnOnce(&mut S) -> T + Send + 'static,
{
    let mut value = value;
    tokio::task::spawn_blocking(move || {
        let out = f(&mut value);
        (value, out)
    })
    .await
}

/// Runs `f` on the value behind `shared`, off the async threads. A lock
/// poisoned by an earlier panic is taken anyway: the store's state is in
/// SQLite, which rolled back whatever that panic interrupted.
pub async fn with_shared<S, T, F>(shared: &Arc<Mutex<S>>, f: F) -> Result<T, JoinError>
where
    S: Send + 'static,
    T: Send + 'static,
    F: FnOnce(&mut S) -> T + Send + 'static,
{
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        let mut guard = shared.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    })
    .await
}
