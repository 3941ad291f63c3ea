//! The refresh concurrency limits (`renewal.max_concurrent`,
//! `renewal.per_instance_concurrent`), held by every token request a process
//! sends, whatever asked for it: the scheduler, an application's token
//! request, an operator's refresh. An Acumatica site's API login limits count
//! logins, not who in acutoken made them.
//!
//! The scheduler also keeps its own count to choose what to start (earliest
//! deadline first); this is the bound that holds for everything else too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Counts of requests in flight, globally and per instance, with their bounds.
#[derive(Debug)]
pub struct Limits {
    inner: Mutex<Counts>,
    freed: Notify,
}

#[derive(Debug)]
struct Counts {
    global: usize,
    per_instance: usize,
    running: usize,
    by_instance: HashMap<String, usize>,
}

/// One request's place within the limits; given back on drop.
#[derive(Debug)]
pub struct Permit {
    limits: Arc<Limits>,
    instance: String,
}

impl Limits {
    pub fn new(global: usize, per_instance: usize) -> Arc<Limits> {
        Arc::new(Limits {
            inner: Mutex::new(Counts {
                global: global.max(1),
                per_instance: per_instance.max(1),
                running: 0,
                by_instance: HashMap::new(),
            }),
            freed: Notify::new(),
        })
    }

    /// New bounds (SIGHUP). Requests in flight keep their places; lower bounds
    /// apply to the next ones, higher bounds wake waiters at once.
    pub fn set(&self, global: usize, per_instance: usize) {
        {
            let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            c.global = global.max(1);
            c.per_instance = per_instance.max(1);
        }
        self.freed.notify_waiters();
    }

    /// `renewal.per_instance_concurrent` as it is now.
    pub fn per_instance(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .per_instance
    }

    /// How many requests hold a place now.
    pub fn running(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).running
    }

    fn try_take(&self, instance: &str) -> bool {
        let mut c = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let here = c.by_instance.get(instance).copied().unwrap_or(0);
        if c.running >= c.global || here >= c.per_instance {
            return false;
        }
        c.running += 1;
        *c.by_instance.entry(instance.to_string()).or_default() += 1;
        true
    }

    /// Waits for a place for one request to `instance`.
    pub async fn acquire(self: &Arc<Self>, instance: &str) -> Permit {
        loop {
            // Registered before the check, so a place freed in between still wakes us.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.try_take(instance) {
                return Permit {
                    limits: self.clone(),
                    instance: instance.to_string(),
                };
            }
            freed.await;
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        {
            let mut c = self.limits.inner.lock().unwrap_or_else(|e| e.into_inner());
            c.running = c.running.saturating_sub(1);
            if let Some(n) = c.by_instance.get_mut(&self.instance) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.by_instance.remove(&self.instance);
                }
            }
        }
        self.limits.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_second_request_to_a_full_instance_waits_for_a_place() {
        let limits = Limits::new(4, 1);
        let first = limits.acquire("a.example").await;
        let l = limits.clone();
        let waiter = tokio::spawn(async move { l.acquire("a.example").await });
        // Another instance is not held up by the full one.
        let other = limits.acquire("b.example").await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiter.is_finished(), "the per-instance bound held");
        assert_eq!(limits.running(), 2);
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("a freed place wakes the waiter")
            .unwrap();
        assert_eq!(limits.running(), 2);
        drop((second, other));
        assert_eq!(limits.running(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_global_bound_holds_across_instances_and_follows_a_reload() {
        let limits = Limits::new(2, 2);
        let a = limits.acquire("a").await;
        let b = limits.acquire("b").await;
        let l = limits.clone();
        let waiter = tokio::spawn(async move { l.acquire("c").await });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!waiter.is_finished());
        limits.set(3, 2);
        let c = tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("a higher bound wakes the waiter")
            .unwrap();
        assert_eq!(limits.running(), 3);
        drop((a, b, c));
    }
}
