//! Talking to Acumatica: instance URLs, the token client and its error classes,
//! the authorization URL and the code exchange.

pub mod instance;
