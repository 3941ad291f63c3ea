//! What the alert delivery worker and the digest write, as named operations
//! on their own [`Store`] (they run on blocking threads, off the
//! group-commit writer). Each is one short immediate transaction, so the
//! engine and the CLI, which write too, never wait long behind them.
//!
//! What an alert says and whether the customer must act are decided above
//! the store: the conditions come in as a function of the row
//! (`desired`), and the link an alert opens as a function of the row too
//! ([`Store::link_for_alert`]).

use uuid::Uuid;

use super::{Accepted, Dropped};
use crate::model::{AlertFacts, AlertKind, ConnectionRow, State, Timestamp, fmt_time};
use crate::secret::Secret;
use crate::store::authorizations::{self, Authorization};
use crate::store::{Store, StoreError, connections, events};

/// A link an alert opens (the connection is the one asked about).
#[derive(Debug)]
pub struct LinkToOpen {
    /// The hash of the state the URL carries.
    pub state_hash: String,
    pub verifier: Secret,
    pub redirect_uri: String,
    /// The URL the customer opens.
    pub url: Secret,
    pub expires_at: Timestamp,
    /// The alert kind it is opened for (named in the history line).
    pub kind: AlertKind,
}

/// What [`Store::link_for_alert`] found or did.
#[derive(Debug)]
pub enum AlertLinkFound<T> {
    /// The connection is gone or disabled: no link, not even an open one.
    NoConnection,
    /// The connection's open link, reused.
    Open(Authorization),
    /// A link opened now.
    Opened(Authorization),
    /// No link was open and the decision opened none: what it said instead.
    NotOpened(T),
}

impl Store {
    /// Evaluates again the connections with a firing alert whose ids are
    /// `keys` (the outbox's keys), in one transaction: each connection's
    /// alerts follow what `desired` gives for its row now, a removed
    /// connection's resolve, and a row that does not read keeps its alerts as
    /// they are (it is the scheduler's to set aside and alert on). A key that
    /// is not a connection id is skipped.
    pub fn reevaluate_alerts(
        &mut self,
        keys: &[String],
        now: Timestamp,
        desired: impl Fn(&ConnectionRow) -> Vec<AlertFacts>,
    ) -> Result<(), StoreError> {
        self.write(|tx, _| {
            for key in keys {
                let Ok(id) = Uuid::parse_str(key) else {
                    continue;
                };
                match connections::get_by_id_tx(tx, id) {
                    Ok(Some(row)) => super::sync_connection(tx, &row, &desired(&row), now)?,
                    Ok(None) => super::remove_connection(tx, id, now)?,
                    Err(StoreError::Corrupt(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
    }

    /// The outbox's start-of-run bookkeeping, in one transaction: a
    /// `config_reload_failed` from an earlier run resolves (this config
    /// loaded), the channel table follows `channels` (name, kind), and
    /// resolved alerts nobody still needs are pruned. Returns those dropped
    /// without any channel hearing of them.
    pub fn reconcile_outbox(
        &mut self,
        channels: &[(String, String)],
        send_resolved: bool,
        now: Timestamp,
    ) -> Result<Vec<Dropped>, StoreError> {
        self.write(|tx, _| {
            super::resolve_global(tx, AlertKind::ConfigReloadFailed, now)?;
            super::sync_channels(tx, channels)?;
            super::prune(tx, send_resolved)
        })
    }

    /// Makes the channel table follow the configured channels (name, kind)
    /// after a reload; a channel's health and backoff survive it.
    pub fn sync_alert_channels(&mut self, channels: &[(String, String)]) -> Result<(), StoreError> {
        self.write(|tx, _| super::sync_channels(tx, channels))
    }

    /// Deletes resolved alerts nobody still needs to hear about (see
    /// [`prune`](super::prune)); returns those no channel ever accepted.
    pub fn prune_alerts(&mut self, send_resolved: bool) -> Result<Vec<Dropped>, StoreError> {
        self.write(|tx, _| super::prune(tx, send_resolved))
    }

    /// Records that `channel` accepted a message about `kind` carrying
    /// `accepted`, sent at `sent_at`: those revisions are delivered, the
    /// group's time moves on and the channel's backoff ends.
    pub fn record_delivery(
        &mut self,
        channel: &str,
        kind: AlertKind,
        accepted: &[Accepted],
        sent_at: Timestamp,
    ) -> Result<(), StoreError> {
        self.write(|tx, _| super::record_success(tx, channel, kind, accepted, sent_at))
    }

    /// Records a failed post to `channel`: one more failure in a row, and no
    /// attempt before `retry_at` (kept here, so backoff survives a restart).
    pub fn record_delivery_failure(
        &mut self,
        channel: &str,
        error: &str,
        retry_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.write(|tx, _| super::record_failure(tx, channel, error, retry_at, now))
    }

    /// Records an error on `channel` that does not count towards its backoff
    /// (a digest that was not delivered: it is never retried).
    pub fn record_channel_error(
        &mut self,
        channel: &str,
        error: &str,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.write(|tx, _| super::record_error(tx, channel, error, now))
    }

    /// The authorization link an alert about connection `id` carries, in one
    /// transaction: the open one if there is one (never replaced: the
    /// customer may already have it), else the one `decide` opens, given the
    /// row, with its history line. `decide` says instead why none is opened
    /// (`Err`): whether the customer must act is the caller's policy. A
    /// disabled connection never gets a link, not even its open one.
    pub fn link_for_alert<T>(
        &mut self,
        id: Uuid,
        now: Timestamp,
        decide: impl FnOnce(&ConnectionRow) -> Result<LinkToOpen, T>,
    ) -> Result<AlertLinkFound<T>, StoreError> {
        self.write(|tx, kr| {
            let Some(row) = connections::get_by_id_tx(tx, id)? else {
                return Ok(AlertLinkFound::NoConnection);
            };
            if row.conn.state == State::Disabled {
                return Ok(AlertLinkFound::NoConnection);
            }
            if let Some(open) = authorizations::open(tx, kr, id, now)? {
                return Ok(AlertLinkFound::Open(open));
            }
            let link = match decide(&row) {
                Ok(l) => l,
                Err(why) => return Ok(AlertLinkFound::NotOpened(why)),
            };
            authorizations::create(
                tx,
                kr,
                id,
                &link.state_hash,
                &link.verifier,
                &link.redirect_uri,
                &link.url,
                now,
                link.expires_at,
            )?;
            events::record(
                tx,
                id,
                now,
                "authorize",
                &format!(
                    "authorization link opened for the {} alert, valid until {}",
                    link.kind,
                    fmt_time(link.expires_at)
                ),
            )?;
            Ok(AlertLinkFound::Opened(Authorization {
                url: link.url,
                expires_at: link.expires_at,
            }))
        })
    }
}
