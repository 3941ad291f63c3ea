//! Alerts: the model, one renderer per channel kind, delivery, the digest.
