//! Alerts: the model, one renderer per channel kind, delivery, the digest.
//!
//! How an alert travels (DESIGN §8):
//!
//! 1. [`alert_conditions::desired`](crate::renewal::alert_conditions::desired)
//!    says, as a pure function of a connection and `now`, which
//!    connection-bound conditions hold, and
//!    [`next_change`](crate::renewal::alert_conditions::next_change) when that
//!    answer could change by time passing alone. The alert types and their
//!    words are the model's ([`AlertFacts`]).
//! 2. The renewal engine hands that set to
//!    [`store::alerts::sync_connection`](crate::store::alerts::sync_connection)
//!    in the same transaction as the state change that caused it. The store
//!    keeps one row per (connection, kind) condition; a new condition, an
//!    escalation or a clearing bumps the row's revision. That row is the
//!    outbox: nothing else needs to be queued.
//! 3. The [`worker`] compares each row's revision with what every channel has
//!    accepted, groups what is due per channel and kind, renders it with the
//!    channel's [`render`]er and posts it. A condition that cleared before
//!    its firing went out is simply never sent.
//!
//! No alert, outbox row or log line carries a secret, a token or a webhook
//! URL. The one link an alert may carry, the authorization link of an alert
//! that needs the customer, is read from the store (or opened there, when
//! none is open) at delivery time and exists only in the outgoing body.

pub mod digest;
pub mod http;
pub mod render;
mod text;
pub mod worker;

pub use digest::run_digest;
pub use http::{ChannelResult, send_direct, send_test};
pub use worker::{ChannelHealth, channel_health, reconcile, run};

// The alert types are domain types (model), the wake handle belongs to the
// outbox (store); both are named here too, as the alerts API.
pub use crate::model::{AlertFacts, AlertKind, NO_CONNECTION, Status};
pub use crate::store::alerts::Wake;
