//! Renewal: the pure policy, the scheduler and the engine.
pub mod policy;
