//! The use cases that change a connection's record: add, set, set-secret,
//! enable, disable, remove. Each is one store transaction with its history
//! event.

use std::time::Duration;

use super::Connections;
use super::spec::{Changes, Spec, SpecError};
use crate::model::{Connection, ConnectionRow, NewConnection, State, Timestamp, fmt_time};
use crate::renewal::planning;
use crate::secret::Secret;
use crate::store::StoreError;
use crate::store::claims::Owner;
use crate::store::edits::{self, Change};

/// Why a change to a connection was refused or failed; nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// A field that does not check out.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// `set-secret --secret-expires` with a date already gone.
    #[error("--secret-expires {0} has already passed: enter the Expires On date of the new secret")]
    SecretExpired(String),
    /// A refresh kept its claim past the wait: removing now would race it.
    #[error(
        "`{name}` is being refreshed by {holder} (claim until {until}); nothing was removed: run the command again in a minute"
    )]
    RemoveBusy {
        name: String,
        holder: String,
        until: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What `remove` finds under a name.
pub enum Removal {
    /// A row that reads: removed once no refresh holds it.
    Readable(Box<ConnectionRow>),
    /// A row that does not read (`why`): nothing can refresh it, so it is
    /// removed as it is.
    Unreadable { why: String },
}

/// The Expires On date given to `set-secret`, refused when already passed.
pub fn secret_expiry(given: Option<&str>, now: Timestamp) -> Result<Option<Timestamp>, EditError> {
    let expires = given
        .map(crate::model::parse_date)
        .transpose()
        .map_err(SpecError::Invalid)?;
    if let Some(e) = expires.filter(|e| *e <= now) {
        return Err(EditError::SecretExpired(fmt_time(e)));
    }
    Ok(expires)
}

impl Connections {
    /// The connection named `name` as stored.
    pub async fn get(&self, name: &str) -> Result<ConnectionRow, StoreError> {
        let n = name.to_string();
        self.read(move |st| st.get(&n)).await
    }

    /// `add`: the connection `spec` describes, with its secrets, under a new id.
    pub async fn add(
        &self,
        spec: &Spec,
        client_secret: Secret,
        refresh_token: Option<Secret>,
        now: Timestamp,
    ) -> Result<Connection, EditError> {
        let conn = spec.build(
            uuid::Uuid::new_v4(),
            &self.config,
            now,
            refresh_token.is_some(),
        )?;
        self.insert(
            NewConnection {
                conn,
                client_secret: Some(client_secret),
                refresh_token,
            },
            now,
        )
        .await
    }

    /// Stores a built connection with its `added` event (`add`, `demo`).
    pub async fn insert(
        &self,
        new: NewConnection,
        now: Timestamp,
    ) -> Result<Connection, EditError> {
        Ok(self.edit(edits::add(new, now)).await?)
    }

    /// `set`: applies `changes`; returns the row and the names of the fields
    /// that changed (none: nothing was written). A new instance or client ID
    /// clears the grant, which belonged to the old one.
    pub async fn set(
        &self,
        name: &str,
        changes: Changes,
        now: Timestamp,
    ) -> Result<(ConnectionRow, Vec<&'static str>), EditError> {
        let policy = self.config.renewal.policy();
        let name = name.to_string();
        let decide = move |row: &mut ConnectionRow| {
            let mut changed = Vec::new();
            for (k, v) in changes.labels {
                if v.is_empty() {
                    row.conn.labels.remove(&k);
                } else {
                    row.conn.labels.insert(k, v);
                }
                changed.push("labels");
            }
            let mut replan = false;
            if let Some(m) = changes.mode.filter(|m| *m != row.conn.mode) {
                row.conn.mode = m;
                changed.push("mode");
                replan = true;
            }
            if let Some(l) = changes.lifetime.filter(|l| *l != row.conn.lifetime) {
                row.conn.lifetime = l;
                changed.push("lifetime");
                replan = true;
            }
            if let Some(a) = changes
                .absolute_lifetime
                .filter(|a| *a != row.conn.absolute_lifetime)
            {
                row.conn.absolute_lifetime = a;
                changed.push("absolute_lifetime");
                replan = true;
            }
            if let Some(e) = changes.secret_expires_at {
                row.conn.secret_expires_at = Some(e);
                changed.push("secret_expires_at");
            }
            let mut regrant = false;
            if let Some(i) = changes.instance.filter(|i| *i != row.conn.instance) {
                row.conn.instance = i;
                changed.push("instance");
                regrant = true;
            }
            if let Some(c) = changes.client_id.filter(|c| *c != row.conn.client_id) {
                row.conn.client_id = c;
                changed.push("client_id");
                regrant = true;
            }
            if regrant {
                // The grant belongs to the old instance/application: it
                // cannot be used here (the store drops its tokens and links).
                planning::clear_grant(row);
            } else if replan {
                planning::replan(row, &policy, now);
            }
            Change {
                fields: changed,
                drop_grant: regrant,
            }
        };
        Ok(self.edit(edits::change(name, decide, now)).await?)
    }

    /// `set-secret`: stores a new client secret (and its Expires On date).
    /// A connection waiting for one is planned again; a scheduled one is
    /// made due at once when a daemon runs (`daemon_running`), so the new
    /// secret is proven now rather than at the next planned refresh.
    pub async fn set_secret(
        &self,
        name: &str,
        secret: Secret,
        expires: Option<Timestamp>,
        daemon_running: bool,
        now: Timestamp,
    ) -> Result<ConnectionRow, EditError> {
        let policy = self.config.renewal.policy();
        let name = name.to_string();
        let plan = move |row: &mut ConnectionRow| {
            if expires.is_some() {
                row.conn.secret_expires_at = expires;
            } else if row.conn.secret_expires_at.is_some_and(|e| e <= now) {
                // A passed Expires On belongs to the old secret (a new one with
                // a passed date is refused by `secret_expiry`); kept, it would
                // put the connection straight back into needs_secret.
                row.conn.secret_expires_at = None;
            }
            if row.conn.state == State::NeedsSecret {
                planning::resume(row, &policy, now);
            } else if row.conn.state.is_scheduled() && daemon_running {
                row.conn.next_refresh_at = Some(now);
            }
        };
        Ok(self
            .edit(edits::set_client_secret(name, secret, plan, now))
            .await?)
    }

    /// `disable`: no refreshes, tokens or alerts; open authorization links
    /// are closed so a link sent earlier cannot bring it back. Returns the
    /// row and how many links were closed.
    pub async fn disable(
        &self,
        name: &str,
        now: Timestamp,
    ) -> Result<(ConnectionRow, usize), EditError> {
        Ok(self.edit(edits::disable(name.to_string(), now)).await?)
    }

    /// `enable`: a disabled connection is planned again from what it holds.
    pub async fn enable(&self, name: &str, now: Timestamp) -> Result<ConnectionRow, EditError> {
        let policy = self.config.renewal.policy();
        let name = name.to_string();
        let resume = move |row: &mut ConnectionRow| planning::resume(row, &policy, now);
        Ok(self.edit(edits::enable(name, resume, now)).await?)
    }

    /// What `remove` would remove under `name` (a damaged row is found too).
    pub async fn find_for_removal(&self, name: &str) -> Result<Removal, EditError> {
        match self.get(name).await {
            Ok(row) => Ok(Removal::Readable(Box::new(row))),
            Err(StoreError::Corrupt(why)) => Ok(Removal::Unreadable { why }),
            Err(e) => Err(e.into()),
        }
    }

    /// `remove`: the connection, its secrets and its open alerts. A refresh
    /// in flight finishes within the request timeout: this waits that long
    /// for its claim rather than remove the row under it (were it removed
    /// anyway, the token it obtains would simply be discarded). `waiting` is
    /// told once, with the claim's holder, when it has to wait.
    pub async fn remove(&self, name: &str, mut waiting: impl FnMut(&str)) -> Result<(), EditError> {
        let patience = self.config.renewal.http_timeout + Duration::from_secs(5);
        let give_up = tokio::time::Instant::now() + patience;
        let mut told = false;
        loop {
            let now = crate::clock::Clock::now(&crate::clock::SystemClock);
            let busy = self.edit(edits::remove(name.to_string(), now)).await?;
            let Some((holder, until)) = busy else {
                return Ok(());
            };
            if tokio::time::Instant::now() >= give_up {
                return Err(EditError::RemoveBusy {
                    name: name.to_string(),
                    holder: Owner::describe(&holder),
                    until: fmt_time(until),
                });
            }
            if !told {
                waiting(&Owner::describe(&holder));
                told = true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `remove` of a row that does not read.
    pub async fn remove_unreadable(&self, name: &str, now: Timestamp) -> Result<(), EditError> {
        if !self
            .edit(edits::remove_unreadable(name.to_string(), now))
            .await?
        {
            return Err(StoreError::UnknownConnection(name.to_string()).into());
        }
        Ok(())
    }
}
