//! Renewal: the pure policy and alert conditions, the scheduler and the engine.

pub mod alert_conditions;
pub mod authorize;
pub mod engine;
pub mod limits;
pub mod planning;
pub mod policy;
pub mod scheduler;
pub mod spill;

use crate::acumatica::ClientSettings;
use crate::config::Config;
/// The token client settings the configuration asks for.
pub fn client_settings(config: &Config) -> ClientSettings {
    ClientSettings {
        timeout: config.renewal.http_timeout,
        allow_insecure_loopback: config.acumatica.allow_insecure_loopback,
        allow_private_networks: config.acumatica.allow_private_networks,
        ca_file: config.acumatica.ca_file.clone(),
        scopes: config.acumatica.scopes.clone(),
        ..ClientSettings::default()
    }
}

/// The concurrency limits the configuration asks for.
pub fn limits_from(config: &Config) -> std::sync::Arc<limits::Limits> {
    limits::Limits::new(
        config.renewal.max_concurrent,
        config.renewal.per_instance_concurrent,
    )
}
