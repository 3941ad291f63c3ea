//! The outbox's doorbell.

/// The outbox's doorbell: whoever commits alert changes (the renewal engine,
/// the scheduler, the callback) pokes it, so the delivery worker looks at the
/// outbox at once instead of at its next wake.
#[derive(Debug, Clone, Default)]
pub struct Wake(std::sync::Arc<tokio::sync::Notify>);

impl Wake {
    /// A new handle; clone it for every writer.
    pub fn new() -> Wake {
        Wake::default()
    }

    /// Asks the worker to look at the outbox now (cheap; coalesces).
    pub fn poke(&self) {
        self.0.notify_one();
    }

    pub(crate) async fn wait(&self) {
        self.0.notified().await;
    }
}
