//! Connection rows: insert, read, update, remove, and their sealed secrets.
//!
//! [`decode`] turns rows into [`ConnectionRow`]s (or [`Fault`]s naming the
//! column that does not read), [`write`] inserts, updates and removes them,
//! [`read`] holds the lookups, listings and the change sequence, and
//! [`reseal`] moves their secrets to a new key.
//!
//! [`ConnectionRow`]: crate::model::ConnectionRow
//! [`Fault`]: crate::model::Fault

mod decode;
mod read;
mod reseal;
mod write;

#[cfg(test)]
pub(crate) mod tests;

pub(super) use decode::from_row;
pub use read::{Changes, get_by_id_tx, get_tx, read_by_id_tx};
pub use reseal::ResealCursor;
pub use write::{
    Sealed, insert, insert_many, insert_sealed, put, put_refresh, remove, remove_unreadable,
    set_secret,
};

/// A sealed column. The column name is part of every seal's associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretColumn {
    ClientSecret,
    RefreshToken,
    AccessToken,
}

impl SecretColumn {
    pub fn as_str(self) -> &'static str {
        match self {
            SecretColumn::ClientSecret => "client_secret",
            SecretColumn::RefreshToken => "refresh_token",
            SecretColumn::AccessToken => "access_token",
        }
    }
}

pub(super) const COLUMNS: &str = "id, name, instance, client_id, labels, mode, lifetime_s,
    absolute_lifetime_s, secret_expires_at, grant_issued_at, refresh_token_issued_at,
    access_expires_at, deadline, deadline_source, next_refresh_at, last_refresh_at, last_error,
    state, failures, failing_since, outcome_unknown, client_secret IS NOT NULL,
    refresh_token IS NOT NULL, access_token IS NOT NULL, token_type, access_lifetime_s,
    claim_owner, claim_expires_at, version, change_seq, rowid";
