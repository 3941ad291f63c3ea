//! The authorization code flow (DESIGN §7): links, the callback's exchange,
//! and `connection authorize` / `connection complete`.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use super::planning;
use super::policy::Policy;
use crate::acumatica::{TokenClient, pkce_pair};
use crate::model::{AlertKind, ConnectionRow};
use crate::model::{State, Timestamp};
use crate::secret::Secret;
use crate::store::alerts::worker_ops::{AlertLinkFound, LinkToOpen};
use crate::store::authorizations::{GrantStored, NewAuthorization};
use crate::store::connections::SecretColumn;
use crate::store::refresh::DesiredAlerts;
use crate::store::{CallbackLookup, Store, StoreError, StoreHandle, authorizations};

/// The hash under which a state is stored: the state itself is never stored.
pub fn hash_state(state: &str) -> String {
    hex::encode(Sha256::digest(state.as_bytes()))
}

/// A new open authorization link.
pub struct Link {
    pub url: Secret,
    pub expires_at: Timestamp,
    /// Older open links of this connection that stopped working.
    pub replaced: usize,
}

/// Why a link could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// `acumatica.redirect_uri` is missing: the operator sets it to the Connected Application's.
    #[error(
        "acumatica.redirect_uri is not set: set it to the Redirect URI registered on the Connected Application (SM303010)"
    )]
    NoRedirectUri,
    /// The connection is disabled: enable it first.
    #[error("`{0}` is disabled: run `acutoken connection enable {0}` first")]
    Disabled(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A link not stored yet: the URL the customer opens, and what the store
/// keeps to complete it (the state only as its hash).
struct NewLink {
    url: Secret,
    state_hash: String,
    verifier: Secret,
}

/// A fresh random state and PKCE pair, and the authorization URL carrying them.
fn new_link(client: &TokenClient, instance: &str, client_id: &str, redirect: &str) -> NewLink {
    let mut raw = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut raw);
    let state = URL_SAFE_NO_PAD.encode(raw);
    let (verifier, challenge) = pkce_pair();
    let url = Secret::new(client.authorize_url(instance, client_id, redirect, &state, &challenge));
    NewLink {
        url,
        state_hash: hash_state(&state),
        verifier,
    }
}

/// Creates (or replaces) the connection's open authorization link.
pub async fn create_link(
    store: &StoreHandle,
    client: &TokenClient,
    redirect_uri: Option<&str>,
    ttl: Duration,
    name: &str,
    now: Timestamp,
) -> Result<Link, LinkError> {
    let redirect = redirect_uri.ok_or(LinkError::NoRedirectUri)?.to_string();
    let n = name.to_string();
    let row = store.read(move |st| st.get(&n)).await?;
    if row.conn.state == State::Disabled {
        return Err(LinkError::Disabled(name.to_string()));
    }
    let NewLink {
        url,
        state_hash: hash,
        verifier,
    } = new_link(client, &row.conn.instance, &row.conn.client_id, &redirect);
    // `callback.state_ttl` comes from a file: a huge one saturates, never panics.
    let expires_at = crate::model::add_saturating(now, ttl);
    let link = NewAuthorization {
        connection: row.conn.id,
        state_hash: hash,
        verifier,
        redirect_uri: redirect,
        url: url.clone(),
    };
    let replaced = store.open_link(link, now, expires_at).await?;
    Ok(Link {
        url,
        expires_at,
        replaced,
    })
}

/// What alerts need to open authorization links, taken from the
/// configuration (the delivery worker builds one per configuration, so a
/// reload takes effect with the next message).
#[derive(Clone)]
pub struct AlertLinks {
    client: TokenClient,
    redirect_uri: Option<String>,
    state_ttl: Duration,
}

impl AlertLinks {
    /// From `config`: `acumatica.redirect_uri`, `acumatica.scopes`,
    /// `callback.state_ttl` and how instances are reached. Fails only as the
    /// token client does (an unreadable `acumatica.ca_file`), which the
    /// daemon refuses at start and reload anyway.
    pub fn from_config(
        config: &crate::config::Config,
    ) -> Result<AlertLinks, crate::acumatica::ClientBuildError> {
        Ok(AlertLinks {
            client: TokenClient::new(super::client_settings(config))?,
            redirect_uri: config.acumatica.redirect_uri.clone(),
            state_ttl: config.callback.state_ttl,
        })
    }
}

/// The authorization link an alert carries.
#[derive(Debug, Clone, PartialEq)]
pub enum AlertLink {
    /// This link is open (it was, or it was opened for this alert): send it.
    Open(authorizations::Authorization),
    /// The customer must act but no redirect URI is configured, so no link
    /// could be opened: the alert says so.
    NoRedirectUri,
    /// Nothing to add: the connection does not (or no longer) need the
    /// customer, or a link cannot be opened (see the log).
    None,
}

/// The link an alert of `kind` about connection `id` carries, read or
/// opened in one store transaction: the open one if there is one (never
/// replaced: the customer may already have it), else, when the customer must
/// act now, a new one valid for `callback.state_ttl`.
///
/// The customer must act for `needs_reauthorization` while the connection
/// is in that state, and for `expiry_approaching` in absolute mode (the
/// re-authorization reminder) while it is active or retrying. A disabled
/// connection never gets a link. `links` is `None` when the configuration's
/// token client could not be built: then only an open link is sent.
pub fn link_for_alert(
    store: &mut Store,
    links: Option<&AlertLinks>,
    kind: AlertKind,
    id: uuid::Uuid,
    now: Timestamp,
) -> Result<AlertLink, StoreError> {
    let found = store.link_for_alert(id, now, |row| {
        let c = &row.conn;
        let must_act = match kind {
            AlertKind::NeedsReauthorization => c.state == State::NeedsReauthorization,
            AlertKind::ExpiryApproaching => {
                c.mode == crate::model::Mode::Absolute
                    && matches!(c.state, State::Active | State::Retrying)
            }
            _ => false,
        };
        let Some(links) = links.filter(|_| must_act) else {
            return Err(AlertLink::None);
        };
        let Some(redirect) = links.redirect_uri.as_deref() else {
            return Err(AlertLink::NoRedirectUri);
        };
        let NewLink {
            url,
            state_hash,
            verifier,
        } = new_link(&links.client, &c.instance, &c.client_id, redirect);
        Ok(LinkToOpen {
            state_hash,
            verifier,
            redirect_uri: redirect.to_string(),
            url,
            expires_at: crate::model::add_saturating(now, links.state_ttl),
            kind,
        })
    })?;
    Ok(match found {
        AlertLinkFound::NoConnection => AlertLink::None,
        AlertLinkFound::Open(a) | AlertLinkFound::Opened(a) => AlertLink::Open(a),
        AlertLinkFound::NotOpened(why) => why,
    })
}

/// How a callback ended; each maps to a page (DESIGN §7).
#[derive(Debug)]
pub enum Completion {
    /// Stored the grant: the connection is active.
    Connected { name: String },
    /// This link was used before: nothing stored.
    AlreadyConnected { name: String },
    /// Unknown or tampered state: nothing stored.
    UnknownState,
    /// The link timed out or was replaced by a newer one.
    Expired,
    /// The customer declined or Acumatica reported an error on the redirect.
    Denied { error: String },
    /// The code exchange failed; the reason is safe to show.
    ExchangeFailed { name: String, reason: String },
    /// The connection is disabled: nothing exchanged, nothing stored.
    Disabled { name: String },
}

/// Exchanges `code` for the connection that `state` belongs to and stores the grant.
pub async fn complete(
    store: &StoreHandle,
    client: &TokenClient,
    policy: &Policy,
    state: &str,
    code: &str,
    expect_connection: Option<&str>,
    now: Timestamp,
) -> Result<Completion, StoreError> {
    let hash = hash_state(state);
    let h = hash.clone();
    let lookup = store.read(move |st| st.lookup_state(&h, now)).await?;
    let (id, verifier, redirect_uri) = match lookup {
        CallbackLookup::Unknown => return Ok(Completion::UnknownState),
        CallbackLookup::Expired => return Ok(Completion::Expired),
        CallbackLookup::Used { connection } => {
            let name = store
                .read(move |st| st.get_by_id(connection))
                .await?
                .map(|r| r.conn.name)
                .unwrap_or_default();
            return Ok(Completion::AlreadyConnected { name });
        }
        CallbackLookup::Open {
            connection,
            verifier,
            redirect_uri,
        } => (connection, verifier, redirect_uri),
    };
    let Some(row) = store.read(move |st| st.get_by_id(id)).await? else {
        return Ok(Completion::UnknownState);
    };
    if let Some(expected) = expect_connection
        && expected != row.conn.name
    {
        return Ok(Completion::UnknownState);
    }
    // An operator turned it off: a link sent before must not turn it back
    // on. The code is not even exchanged, so no grant is issued for nothing.
    if row.conn.state == State::Disabled {
        return Ok(Completion::Disabled {
            name: row.conn.name,
        });
    }
    let secret = store
        .read(move |st| st.secret(id, SecretColumn::ClientSecret))
        .await?;
    let Some(secret) = secret else {
        return Ok(Completion::ExchangeFailed {
            name: row.conn.name,
            reason: "no client secret is stored: run `acutoken connection set-secret`".into(),
        });
    };
    let grant = match client
        .exchange_code(
            &row.conn.instance,
            &row.conn.client_id,
            &secret,
            code,
            &verifier,
            &redirect_uri,
        )
        .await
    {
        Ok(g) => g,
        Err(e) => {
            return Ok(Completion::ExchangeFailed {
                name: row.conn.name,
                reason: e.reason,
            });
        }
    };
    let Some(refresh_token) = grant.refresh_token.clone() else {
        return Ok(Completion::ExchangeFailed {
            name: row.conn.name,
            reason: "the instance returned no refresh token: the Connected Application must allow the offline_access scope".into(),
        });
    };
    let policy = policy.clone();
    let name = row.conn.name.clone();
    let alerts: DesiredAlerts = {
        let policy = policy.clone();
        Box::new(move |row| crate::renewal::alert_conditions::desired(row, &policy, now))
    };
    let (expires_in, token_type) = (grant.expires_in, grant.token_type.clone());
    let plan = move |row: &mut ConnectionRow| {
        planning::granted(row, expires_in, &token_type, &policy, now);
    };
    let stored = store
        .store_grant(
            id,
            hash,
            refresh_token,
            grant.access_token,
            plan,
            now,
            alerts,
        )
        .await?;
    Ok(match stored {
        GrantStored::Granted => Completion::Connected { name },
        GrantStored::AlreadyUsed => Completion::AlreadyConnected { name },
        GrantStored::Disabled => Completion::Disabled { name },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::crypto::{Key, Keyring};
    use crate::model::AlertKind;
    use crate::model::NewConnection;
    use crate::model::{Connection, Mode};
    use crate::store::{Create, Store, connections};
    use uuid::Uuid;

    fn store(dir: &tempfile::TempDir, state: State, mode: Mode) -> (Store, Uuid) {
        let now = chrono::Utc::now();
        let mut st = crate::store::testing::open(
            &crate::store::testing::target(dir.path()),
            Keyring::new(Key::generate(), vec![]),
            Create::Yes,
        )
        .unwrap();
        let id = Uuid::new_v4();
        let conn = Connection {
            id,
            name: "acme".into(),
            instance: "erp.example.com".into(),
            client_id: "client@Company".into(),
            labels: Default::default(),
            mode,
            lifetime: Duration::from_secs(30 * 86_400),
            absolute_lifetime: None,
            secret_expires_at: None,
            grant_issued_at: Some(now),
            refresh_token_issued_at: Some(now),
            access_expires_at: None,
            deadline: None,
            deadline_source: None,
            next_refresh_at: None,
            last_refresh_at: None,
            last_error: None,
            state,
        };
        st.write(|tx, kr| {
            let new = NewConnection {
                conn,
                client_secret: None,
                refresh_token: None,
            };
            connections::insert(tx, kr, &new, now)
        })
        .unwrap();
        (st, id)
    }

    fn links(redirect: Option<&str>) -> AlertLinks {
        let mut c = Config::default();
        c.acumatica.redirect_uri = redirect.map(str::to_string);
        AlertLinks::from_config(&c).unwrap()
    }

    fn link(st: &mut Store, l: Option<&AlertLinks>, kind: AlertKind, id: Uuid) -> AlertLink {
        let now = chrono::Utc::now();
        link_for_alert(st, l, kind, id, now).unwrap()
    }

    fn count(st: &Store) -> i64 {
        st.db()
            .query_row("SELECT COUNT(*) FROM authorizations", (), |r| r.get(0))
            .unwrap()
    }

    const CB: &str = "https://cb.example.com/cb";

    #[test]
    fn reauthorization_opens_one_link_and_reuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut st, id) = store(&dir, State::NeedsReauthorization, Mode::Absolute);
        let l = links(Some(CB));
        let AlertLink::Open(first) = link(&mut st, Some(&l), AlertKind::NeedsReauthorization, id)
        else {
            panic!("no link opened");
        };
        assert!(
            first
                .url
                .expose()
                .starts_with("https://erp.example.com/identity/connect/authorize?")
        );
        let days = (first.expires_at - chrono::Utc::now()).num_days();
        assert!((13..=14).contains(&days), "valid for callback.state_ttl");
        let url = |l: AlertLink| match l {
            AlertLink::Open(a) => a.url.expose().to_string(),
            other => panic!("{other:?}"),
        };
        let again = link(&mut st, Some(&l), AlertKind::NeedsReauthorization, id);
        assert_eq!(url(again), first.url.expose(), "reused");
        // Without the settings (no token client), an open link is still sent.
        let again = link(&mut st, None, AlertKind::NeedsReauthorization, id);
        assert_eq!(url(again), first.url.expose());
        assert_eq!(count(&st), 1);
    }

    #[test]
    fn only_when_the_customer_must_act_and_never_for_a_disabled_connection() {
        let l = links(Some(CB));
        let cases = [
            (
                State::Active,
                Mode::Absolute,
                AlertKind::ExpiryApproaching,
                true,
            ),
            (
                State::Retrying,
                Mode::Absolute,
                AlertKind::ExpiryApproaching,
                true,
            ),
            (
                State::Active,
                Mode::Sliding,
                AlertKind::ExpiryApproaching,
                false,
            ),
            (
                State::Active,
                Mode::Absolute,
                AlertKind::NeedsReauthorization,
                false,
            ),
            (
                State::NeedsSecret,
                Mode::Absolute,
                AlertKind::NeedsSecret,
                false,
            ),
            (
                State::Disabled,
                Mode::Absolute,
                AlertKind::NeedsReauthorization,
                false,
            ),
            (
                State::Disabled,
                Mode::Absolute,
                AlertKind::ExpiryApproaching,
                false,
            ),
        ];
        for (state, mode, kind, opens) in cases {
            let dir = tempfile::tempdir().unwrap();
            let (mut st, id) = store(&dir, state, mode);
            let got = link(&mut st, Some(&l), kind, id);
            assert_eq!(
                matches!(got, AlertLink::Open(_)),
                opens,
                "{state} {mode} {kind}: {got:?}"
            );
            assert_eq!(count(&st), i64::from(opens));
        }
    }

    #[test]
    fn without_a_redirect_uri_nothing_is_opened_and_the_alert_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let (mut st, id) = store(&dir, State::NeedsReauthorization, Mode::Absolute);
        let got = link(
            &mut st,
            Some(&links(None)),
            AlertKind::NeedsReauthorization,
            id,
        );
        assert_eq!(got, AlertLink::NoRedirectUri);
        assert_eq!(count(&st), 0);
        let gone = link(
            &mut st,
            Some(&links(Some(CB))),
            AlertKind::NeedsReauthorization,
            Uuid::new_v4(),
        );
        assert_eq!(gone, AlertLink::None, "a removed connection");
    }
}
