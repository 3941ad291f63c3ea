//! acutoken keeps Acumatica OAuth connections alive.
//!
//! See ARCHITECTURE.md for the map: the daemon asks the renewal engine what is
//! due; the engine reads the policy, claims in the store, calls the Acumatica
//! client, saves, and raises alerts into the outbox; the delivery worker sends them.
#![forbid(unsafe_code)]

pub mod acumatica;
pub mod alerts;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod daemon;
pub mod logging;
pub mod model;
pub mod renewal;
pub mod secret;
pub mod service;
pub mod sim;
pub mod status;
pub mod store;
