//! The daemon: serve (start, reload, shutdown), signals, sd_notify, the API,
//! the callback listener, metrics, TLS on `api.listen`.

pub mod api;
pub mod callback;
pub mod client;
pub mod listen;
pub mod lock;
pub mod metrics;
pub mod notify;
pub mod pages;
pub mod rotate;
pub mod serve;
pub mod tls;
pub mod watch;

use crate::config::Config;

/// True when a daemon on this machine serves the configured store.
pub fn running(config: &Config) -> bool {
    match config.store_target() {
        Ok(target) => lock::held_target(&target, &config.socket_path()),
        Err(_) => lock::held(&config.store_path()),
    }
}
