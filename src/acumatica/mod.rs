//! Talking to Acumatica: instance URLs, the token client and its error classes,
//! the authorization URL and the code exchange.
//!
//! - [`instance`]: what people paste, normalised to `host[:port][/virtual-dir]`.
//! - [`client`]: [`TokenClient`] (refresh, code exchange) over one shared reqwest client.
//! - [`classify`]: every way a token request fails, as a [`TokenError`] with a
//!   [`FailureKind`](crate::model::FailureKind) and whether anything was sent.
//! - [`address`]: where requests may go (no metadata, link-local, or, when
//!   configured, private addresses), enforced at DNS resolution.
//! - [`response`]: the lenient token response (`expires_in` as number or string).
//! - [`authorize`]: the authorization URL and the PKCE pair.

pub mod address;
pub mod authorize;
pub mod classify;
pub mod client;
pub mod instance;
pub mod response;

pub use authorize::{authorize_url, pkce_pair};
pub use classify::TokenError;
pub use client::{ClientBuildError, ClientSettings, TokenClient, TokenGrant};
pub use instance::{InstanceError, normalize};
