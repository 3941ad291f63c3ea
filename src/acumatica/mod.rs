//! Talking to Acumatica: instance URLs, the token client and its error classes.
