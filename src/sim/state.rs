//! The memory of one simulated site: clients, grants, refresh tokens, codes.
//!
//! Plain data and plain functions with `now` passed in, so the rules of DESIGN §1
//! (rotation, replay revokes the grant, absolute and sliding lifetimes, secret
//! expiry, PKCE) are tested here without HTTP. Every lookup is a hash probe: the
//! benchmark runs 10,000 grants over 500 sites and nothing here scans them.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

use super::{Fault, Lifetime, RecordedRequest};
use crate::model::Timestamp;
use crate::secret::Secret;

/// Authorization codes live this long, as in IdentityServer.
pub(crate) const CODE_LIFETIME: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// Recorded requests kept per site; older ones are dropped so a long benchmark
/// does not grow without bound. Counters are never truncated.
pub const RECORDED_REQUESTS_KEPT: usize = 10_000;

/// Scopes an Acumatica identity server knows.
const KNOWN_SCOPES: [&str; 6] = [
    "api",
    "offline_access",
    "openid",
    "profile",
    "email",
    "api:concurrent_access",
];

/// The OAuth `error` codes the token endpoint answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OAuthError {
    InvalidRequest,
    InvalidClient,
    InvalidGrant,
    InvalidScope,
    UnsupportedGrantType,
}

impl OAuthError {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            OAuthError::InvalidRequest => "invalid_request",
            OAuthError::InvalidClient => "invalid_client",
            OAuthError::InvalidGrant => "invalid_grant",
            OAuthError::InvalidScope => "invalid_scope",
            OAuthError::UnsupportedGrantType => "unsupported_grant_type",
        }
    }
}

/// Per-site behaviour a test can change.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) lifetime: Lifetime,
    pub(crate) expires_in: u64,
    pub(crate) expires_in_as_string: bool,
    pub(crate) rotate: bool,
    pub(crate) latency: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            lifetime: Lifetime::Absolute(Duration::from_secs(30 * 24 * 3600)),
            expires_in: 3600,
            expires_in_as_string: false,
            rotate: true,
            latency: Duration::ZERO,
        }
    }
}

struct Client {
    secret: Secret,
    secret_expires_at: Option<Timestamp>,
    active: bool,
    /// Empty means any absolute http(s) redirect URI is accepted.
    redirect_uris: Vec<String>,
    /// Indexes into `SiteState::grants`, oldest first.
    grants: Vec<usize>,
}

struct Grant {
    client_id: String,
    issued_at: Timestamp,
    scope: String,
    revoked: bool,
    /// The newest refresh token of this grant.
    current: String,
}

struct RefreshToken {
    grant: usize,
    /// When it was issued, or last reused when rotation is off (sliding counts from here).
    issued_at: Timestamp,
    used: bool,
}

struct Code {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    scope: String,
    expires_at: Timestamp,
    redeemed: bool,
    /// The grant the first redemption created, revoked if the code comes back.
    grant: Option<usize>,
}

/// What a successful token request hands out; the server mints the access token.
#[derive(Debug)]
pub(crate) struct Issued {
    pub(crate) grant: Option<usize>,
    pub(crate) client_id: String,
    pub(crate) refresh_token: Option<String>,
    pub(crate) scope: String,
}

/// The answer to one token request, and whether it replayed a used refresh token.
pub(crate) struct Decision {
    pub(crate) result: Result<Issued, OAuthError>,
    pub(crate) replay: bool,
}

impl Decision {
    fn fail(e: OAuthError) -> Self {
        Decision {
            result: Err(e),
            replay: false,
        }
    }
}

/// The answer to an authorization request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AuthorizeOutcome {
    /// The simulated customer approved, or the request failed after the
    /// redirect URI was trusted: send the browser there.
    Redirect(String),
    /// The request cannot be trusted with a redirect: show an error page.
    Page(String),
}

/// A decoded `application/x-www-form-urlencoded` body or query string.
pub(crate) struct Form {
    pairs: Vec<(String, String)>,
}

impl Form {
    pub(crate) fn parse(raw: &[u8]) -> Form {
        Form {
            pairs: url::form_urlencoded::parse(raw).into_owned().collect(),
        }
    }

    /// The value of `key` when it appears exactly once with a non-empty value.
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        let mut found = self.pairs.iter().filter(|(k, _)| k == key);
        match (found.next(), found.next()) {
            (Some((_, v)), None) if !v.is_empty() => Some(v),
            _ => None,
        }
    }

    fn has_duplicates(&self) -> bool {
        let mut seen = std::collections::HashSet::new();
        !self.pairs.iter().all(|(k, _)| seen.insert(k.as_str()))
    }

    /// The keys present, in order, without values (safe to record and print).
    pub(crate) fn keys(&self) -> Vec<String> {
        self.pairs.iter().map(|(k, _)| k.clone()).collect()
    }
}

/// A fault waiting to be served, and how many more times.
struct PendingFault {
    fault: Fault,
    remaining: Option<u32>,
}

/// Everything one site remembers.
#[derive(Default)]
pub(crate) struct SiteState {
    pub(crate) settings: Settings,
    clients: HashMap<String, Client>,
    grants: Vec<Grant>,
    tokens: HashMap<String, RefreshToken>,
    codes: HashMap<String, Code>,
    faults: VecDeque<PendingFault>,
    pub(crate) requests: VecDeque<RecordedRequest>,
    pub(crate) token_requests: u64,
    pub(crate) authorize_requests: u64,
    pub(crate) replays: u64,
}

/// A fresh opaque handle, shaped like IdentityServer's (64 hex digits).
pub(crate) fn new_handle() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode_upper(bytes)
}

fn to_delta(d: Duration) -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(d).unwrap_or(chrono::TimeDelta::MAX)
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add_signed(to_delta(d))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC)
}

/// When a refresh token dies under `lifetime`.
fn deadline(lifetime: &Lifetime, grant: &Grant, token: &RefreshToken) -> Timestamp {
    match *lifetime {
        Lifetime::Absolute(l) => add(grant.issued_at, l),
        Lifetime::Sliding { lifetime, cap } => {
            let slid = add(token.issued_at, lifetime);
            match cap {
                Some(cap) => slid.min(add(grant.issued_at, cap)),
                None => slid,
            }
        }
    }
}

fn scopes(s: &str) -> impl Iterator<Item = &str> {
    s.split(' ').filter(|p| !p.is_empty())
}

/// True when `verifier` is an RFC 7636 verifier whose S256 digest is `challenge`.
fn pkce_matches(verifier: &str, challenge: &str) -> bool {
    let well_formed = (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
    well_formed && URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes())) == challenge
}

impl SiteState {
    /// Adds a client, or redefines one (keeping its grants).
    pub(crate) fn add_client(&mut self, id: &str, secret: &str, expires_at: Option<Timestamp>) {
        let c = self
            .clients
            .entry(id.to_string())
            .or_insert_with(|| Client {
                secret: Secret::new(""),
                secret_expires_at: None,
                active: true,
                redirect_uris: Vec::new(),
                grants: Vec::new(),
            });
        c.secret = Secret::new(secret);
        c.secret_expires_at = expires_at;
        c.active = true;
    }

    /// Replaces a client's secret; `false` when the client is unknown.
    pub(crate) fn replace_secret(
        &mut self,
        id: &str,
        secret: &str,
        expires_at: Option<Timestamp>,
    ) -> bool {
        self.clients
            .get_mut(id)
            .map(|c| {
                c.secret = Secret::new(secret);
                c.secret_expires_at = expires_at;
            })
            .is_some()
    }

    pub(crate) fn set_active(&mut self, id: &str, active: bool) -> bool {
        self.clients
            .get_mut(id)
            .map(|c| c.active = active)
            .is_some()
    }

    pub(crate) fn add_redirect_uri(&mut self, id: &str, uri: &str) -> bool {
        self.clients
            .get_mut(id)
            .map(|c| c.redirect_uris.push(uri.to_string()))
            .is_some()
    }

    /// A grant as if the customer authorized at `issued_at`; its first refresh token.
    pub(crate) fn issue_grant(
        &mut self,
        client_id: &str,
        issued_at: Timestamp,
        scope: &str,
    ) -> Option<String> {
        self.clients.contains_key(client_id).then_some(())?;
        Some(self.new_grant(client_id, issued_at, scope))
    }

    fn new_grant(&mut self, client_id: &str, issued_at: Timestamp, scope: &str) -> String {
        let index = self.grants.len();
        let token = new_handle();
        self.grants.push(Grant {
            client_id: client_id.to_string(),
            issued_at,
            scope: scope.to_string(),
            revoked: false,
            current: token.clone(),
        });
        self.tokens.insert(
            token.clone(),
            RefreshToken {
                grant: index,
                issued_at,
                used: false,
            },
        );
        if let Some(c) = self.clients.get_mut(client_id) {
            c.grants.push(index);
        }
        token
    }

    /// "Revoke Access" on SM303010; the number of grants that were still alive.
    pub(crate) fn revoke(&mut self, client_id: &str) -> Option<usize> {
        let client = self.clients.get(client_id)?;
        let mut n = 0;
        for &g in &client.grants {
            let grant = &mut self.grants[g];
            n += usize::from(!grant.revoked);
            grant.revoked = true;
        }
        Some(n)
    }

    /// Whether this exact refresh token would be accepted now.
    pub(crate) fn token_alive(&self, token: &str, now: Timestamp) -> bool {
        self.tokens.get(token).is_some_and(|t| {
            let g = &self.grants[t.grant];
            !t.used && !g.revoked && now < deadline(&self.settings.lifetime, g, t)
        })
    }

    /// Whether the grant this refresh token (any of its generations) belongs to still works.
    pub(crate) fn grant_alive(&self, token: &str, now: Timestamp) -> bool {
        self.tokens
            .get(token)
            .is_some_and(|t| self.token_alive(&self.grants[t.grant].current, now))
    }

    /// Whether grant `index` is neither revoked nor expired.
    pub(crate) fn grant_index_alive(&self, index: usize, now: Timestamp) -> bool {
        self.grants
            .get(index)
            .is_some_and(|g| self.token_alive(&g.current, now))
    }

    /// The live refresh token of the client's newest grant.
    pub(crate) fn current_refresh_token(&self, client_id: &str, now: Timestamp) -> Option<String> {
        let newest = *self.clients.get(client_id)?.grants.last()?;
        let current = &self.grants[newest].current;
        self.token_alive(current, now).then(|| current.clone())
    }

    pub(crate) fn live_grants(&self, client_id: &str, now: Timestamp) -> usize {
        self.clients.get(client_id).map_or(0, |c| {
            c.grants
                .iter()
                .filter(|&&g| self.grant_index_alive(g, now))
                .count()
        })
    }

    pub(crate) fn inject(&mut self, fault: Fault, times: Option<u32>) {
        if times != Some(0) {
            self.faults.push_back(PendingFault {
                fault,
                remaining: times,
            });
        }
    }

    pub(crate) fn clear_faults(&mut self) {
        self.faults.clear();
    }

    /// The fault the next token request gets, consuming one use of it.
    pub(crate) fn take_fault(&mut self) -> Option<Fault> {
        let front = self.faults.front_mut()?;
        let fault = front.fault.clone();
        if let Some(n) = &mut front.remaining {
            *n -= 1;
            if *n == 0 {
                self.faults.pop_front();
            }
        }
        Some(fault)
    }

    pub(crate) fn record(&mut self, r: RecordedRequest) {
        if self.requests.len() == RECORDED_REQUESTS_KEPT {
            self.requests.pop_front();
        }
        self.requests.push_back(r);
    }

    /// Decides a token request; the caller has already checked the transport.
    pub(crate) fn token(&mut self, now: Timestamp, form: &Form, basic_auth: bool) -> Decision {
        if form.has_duplicates() {
            return Decision::fail(OAuthError::InvalidRequest);
        }
        let client_id = match self.authenticate(now, form, basic_auth) {
            Ok(id) => id.to_string(),
            Err(e) => return Decision::fail(e),
        };
        match form.get("grant_type") {
            Some("refresh_token") => self.refresh(now, &client_id, form),
            Some("authorization_code") => Decision {
                result: self.exchange(now, &client_id, form),
                replay: false,
            },
            Some(_) => Decision::fail(OAuthError::UnsupportedGrantType),
            None => Decision::fail(OAuthError::InvalidRequest),
        }
    }

    /// client_secret_post only: a Basic header is refused so a test proves the body form.
    fn authenticate<'f>(
        &self,
        now: Timestamp,
        form: &'f Form,
        basic_auth: bool,
    ) -> Result<&'f str, OAuthError> {
        if basic_auth {
            return Err(OAuthError::InvalidClient);
        }
        let id = form.get("client_id").ok_or(OAuthError::InvalidClient)?;
        let client = self.clients.get(id).ok_or(OAuthError::InvalidClient)?;
        let secret = form.get("client_secret").ok_or(OAuthError::InvalidClient)?;
        let secret_ok =
            subtle::ConstantTimeEq::ct_eq(client.secret.expose().as_bytes(), secret.as_bytes())
                .into();
        let expired = client.secret_expires_at.is_some_and(|t| t <= now);
        if client.active && secret_ok && !expired {
            Ok(id)
        } else {
            Err(OAuthError::InvalidClient)
        }
    }

    fn refresh(&mut self, now: Timestamp, client_id: &str, form: &Form) -> Decision {
        let Some(value) = form.get("refresh_token") else {
            return Decision::fail(OAuthError::InvalidRequest);
        };
        let Some(token) = self.tokens.get_mut(value) else {
            return Decision::fail(OAuthError::InvalidGrant);
        };
        let grant = &mut self.grants[token.grant];
        if grant.client_id != client_id {
            return Decision::fail(OAuthError::InvalidGrant);
        }
        if token.used {
            // Replay: the token may have leaked, so the whole grant dies.
            grant.revoked = true;
            self.replays += 1;
            return Decision {
                result: Err(OAuthError::InvalidGrant),
                replay: true,
            };
        }
        if grant.revoked || now >= deadline(&self.settings.lifetime, grant, token) {
            return Decision::fail(OAuthError::InvalidGrant);
        }
        let scope = match form.get("scope") {
            Some(asked) if scopes(asked).all(|s| scopes(&grant.scope).any(|g| g == s)) => {
                asked.to_string()
            }
            Some(_) => return Decision::fail(OAuthError::InvalidScope),
            None => grant.scope.clone(),
        };
        let index = token.grant;
        let refresh_token = if self.settings.rotate {
            token.used = true;
            let new = new_handle();
            grant.current = new.clone();
            self.tokens.insert(
                new.clone(),
                RefreshToken {
                    grant: index,
                    issued_at: now,
                    used: false,
                },
            );
            Some(new)
        } else {
            // Reuse mode: the same token stays valid and a sliding lifetime restarts.
            token.issued_at = now;
            None
        };
        Decision {
            result: Ok(Issued {
                grant: Some(index),
                client_id: client_id.to_string(),
                refresh_token,
                scope,
            }),
            replay: false,
        }
    }

    fn exchange(
        &mut self,
        now: Timestamp,
        client_id: &str,
        form: &Form,
    ) -> Result<Issued, OAuthError> {
        let value = form.get("code").ok_or(OAuthError::InvalidRequest)?;
        let code = self.codes.get_mut(value).ok_or(OAuthError::InvalidGrant)?;
        if code.redeemed {
            // A code used twice may have been stolen: kill what the first use made.
            if let Some(g) = code.grant {
                self.grants[g].revoked = true;
            }
            return Err(OAuthError::InvalidGrant);
        }
        // IdentityServer removes the code from its store before validating, so
        // any redemption attempt by an authenticated client consumes it.
        code.redeemed = true;
        let valid = code.client_id == client_id
            && now < code.expires_at
            && form.get("redirect_uri") == Some(code.redirect_uri.as_str())
            && form
                .get("code_verifier")
                .is_some_and(|v| pkce_matches(v, &code.challenge));
        if !valid {
            return Err(OAuthError::InvalidGrant);
        }
        let scope = code.scope.clone();
        let (grant, refresh_token) = if scopes(&scope).any(|s| s == "offline_access") {
            let token = self.new_grant(client_id, now, &scope);
            let g = self.grants.len() - 1;
            if let Some(code) = self.codes.get_mut(value) {
                code.grant = Some(g);
            }
            (Some(g), Some(token))
        } else {
            (None, None)
        };
        Ok(Issued {
            grant,
            client_id: client_id.to_string(),
            refresh_token,
            scope,
        })
    }

    /// The simulated customer approves at once.
    pub(crate) fn authorize(&mut self, now: Timestamp, q: &Form) -> AuthorizeOutcome {
        let client = match q.get("client_id").and_then(|id| self.clients.get(id)) {
            Some(c) if c.active => c,
            Some(_) => return AuthorizeOutcome::Page("The application is not active.".into()),
            None => return AuthorizeOutcome::Page("Unknown client or client not enabled.".into()),
        };
        let Some(redirect_uri) = q.get("redirect_uri") else {
            return AuthorizeOutcome::Page("The redirect_uri parameter is missing.".into());
        };
        let Ok(mut target) = url::Url::parse(redirect_uri) else {
            return AuthorizeOutcome::Page("The redirect_uri is not a URL.".into());
        };
        let registered = client.redirect_uris.is_empty()
            || client.redirect_uris.iter().any(|u| u == redirect_uri);
        if !matches!(target.scheme(), "http" | "https") || !registered {
            return AuthorizeOutcome::Page("Invalid redirect_uri.".into());
        }
        let error = if q.has_duplicates() {
            Some("invalid_request")
        } else if q.get("response_type") != Some("code") {
            Some("unsupported_response_type")
        } else if !q
            .get("scope")
            .is_some_and(|s| scopes(s).all(|s| KNOWN_SCOPES.contains(&s)))
        {
            Some("invalid_scope")
        } else if q.get("code_challenge_method") != Some("S256")
            || !q
                .get("code_challenge")
                .is_some_and(|c| (43..=128).contains(&c.len()))
        {
            Some("invalid_request")
        } else {
            None
        };
        {
            let mut pairs = target.query_pairs_mut();
            match error {
                Some(e) => {
                    pairs.append_pair("error", e);
                }
                None => {
                    let code = new_handle();
                    let scope = q.get("scope").unwrap_or_default().to_string();
                    pairs
                        .append_pair("code", &code)
                        .append_pair("scope", &scope);
                    self.codes.insert(
                        code,
                        Code {
                            client_id: q.get("client_id").unwrap_or_default().to_string(),
                            redirect_uri: redirect_uri.to_string(),
                            challenge: q.get("code_challenge").unwrap_or_default().to_string(),
                            scope,
                            expires_at: now + CODE_LIFETIME,
                            redeemed: false,
                            grant: None,
                        },
                    );
                }
            }
            if let Some(state) = q.get("state") {
                pairs.append_pair("state", state);
            }
            if error.is_none() {
                pairs.append_pair("session_state", &new_handle()[..32]);
            }
        }
        AuthorizeOutcome::Redirect(target.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: &str = "88358B02-A48D-A50E-F710-39C1636C30F6@My Company";

    fn t0() -> Timestamp {
        crate::model::parse_time("2026-01-01T00:00:00Z").unwrap()
    }

    fn days(n: i64) -> chrono::TimeDelta {
        chrono::TimeDelta::days(n)
    }

    fn form(pairs: &[(&str, &str)]) -> Form {
        Form {
            pairs: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn refresh_form(token: &str) -> Form {
        form(&[
            ("grant_type", "refresh_token"),
            ("client_id", CLIENT),
            ("client_secret", "s3cret"),
            ("refresh_token", token),
        ])
    }

    fn site() -> SiteState {
        let mut s = SiteState::default();
        s.add_client(CLIENT, "s3cret", None);
        s
    }

    fn refresh(s: &mut SiteState, now: Timestamp, token: &str) -> Result<Issued, OAuthError> {
        s.token(now, &refresh_form(token), false).result
    }

    #[test]
    fn refresh_rotates_and_replay_kills_the_grant() {
        let mut s = site();
        let first = s.issue_grant(CLIENT, t0(), "api offline_access").unwrap();
        let second = refresh(&mut s, t0(), &first)
            .unwrap()
            .refresh_token
            .unwrap();
        assert_ne!(first, second);
        assert!(!s.token_alive(&first, t0()));
        assert_eq!(s.current_refresh_token(CLIENT, t0()), Some(second.clone()));

        let replay = s.token(t0(), &refresh_form(&first), false);
        assert!(replay.replay);
        assert_eq!(replay.result.unwrap_err(), OAuthError::InvalidGrant);
        assert_eq!(s.replays, 1);
        assert!(!s.grant_alive(&second, t0()));
        assert_eq!(
            refresh(&mut s, t0(), &second).unwrap_err(),
            OAuthError::InvalidGrant
        );
        assert_eq!(s.current_refresh_token(CLIENT, t0()), None);
    }

    #[test]
    fn absolute_lifetime_does_not_move() {
        let mut s = site();
        let mut tok = s.issue_grant(CLIENT, t0(), "api offline_access").unwrap();
        for d in [10, 20, 29] {
            tok = refresh(&mut s, t0() + days(d), &tok)
                .unwrap()
                .refresh_token
                .unwrap();
        }
        assert!(s.token_alive(&tok, t0() + days(30) - chrono::TimeDelta::seconds(1)));
        assert_eq!(
            refresh(&mut s, t0() + days(30), &tok).unwrap_err(),
            OAuthError::InvalidGrant
        );
    }

    #[test]
    fn sliding_lifetime_moves_up_to_the_cap() {
        let mut s = site();
        s.settings.lifetime = Lifetime::Sliding {
            lifetime: Duration::from_secs(10 * 86_400),
            cap: Some(Duration::from_secs(25 * 86_400)),
        };
        let tok = s.issue_grant(CLIENT, t0(), "api offline_access").unwrap();
        let tok = refresh(&mut s, t0() + days(9), &tok)
            .unwrap()
            .refresh_token
            .unwrap();
        // Issued at day 9: alive until day 19.
        assert!(s.token_alive(&tok, t0() + days(18)));
        let tok = refresh(&mut s, t0() + days(18), &tok)
            .unwrap()
            .refresh_token
            .unwrap();
        // Issued at day 18 would live to day 28, but the cap ends it at day 25.
        assert!(s.token_alive(&tok, t0() + days(24)));
        assert!(!s.token_alive(&tok, t0() + days(25)));

        let mut s = site();
        s.settings.lifetime = Lifetime::Sliding {
            lifetime: Duration::from_secs(10 * 86_400),
            cap: None,
        };
        let tok = s.issue_grant(CLIENT, t0(), "api offline_access").unwrap();
        assert_eq!(
            refresh(&mut s, t0() + days(10), &tok).unwrap_err(),
            OAuthError::InvalidGrant
        );
    }

    #[test]
    fn client_authentication() {
        let mut s = site();
        let tok = s.issue_grant(CLIENT, t0(), "api offline_access").unwrap();
        let mut wrong = refresh_form(&tok);
        wrong.pairs[2].1 = "nope".into();
        assert_eq!(
            s.token(t0(), &wrong, false).result.unwrap_err(),
            OAuthError::InvalidClient
        );
        assert_eq!(
            s.token(t0(), &refresh_form(&tok), true).result.unwrap_err(),
            OAuthError::InvalidClient,
            "Basic auth is refused"
        );
        s.replace_secret(CLIENT, "s3cret", Some(t0() + days(1)));
        assert!(refresh(&mut s, t0(), &tok).is_ok());
        let tok = s.current_refresh_token(CLIENT, t0()).unwrap();
        assert_eq!(
            refresh(&mut s, t0() + days(1), &tok).unwrap_err(),
            OAuthError::InvalidClient
        );
        s.replace_secret(CLIENT, "s3cret", None);
        s.set_active(CLIENT, false);
        assert_eq!(
            refresh(&mut s, t0(), &tok).unwrap_err(),
            OAuthError::InvalidClient
        );
        s.set_active(CLIENT, true);
        // Refused requests consumed nothing.
        assert!(refresh(&mut s, t0(), &tok).is_ok());
    }

    #[test]
    fn reuse_mode_keeps_the_token() {
        let mut s = site();
        s.settings.rotate = false;
        let tok = s.issue_grant(CLIENT, t0(), "api offline_access").unwrap();
        assert!(refresh(&mut s, t0(), &tok).unwrap().refresh_token.is_none());
        assert!(refresh(&mut s, t0(), &tok).is_ok());
        assert_eq!(s.replays, 0);
    }

    #[test]
    fn refresh_scope_must_be_granted() {
        let mut s = site();
        let tok = s.issue_grant(CLIENT, t0(), "api offline_access").unwrap();
        let mut f = refresh_form(&tok);
        f.pairs.push(("scope".into(), "api openid".into()));
        assert_eq!(
            s.token(t0(), &f, false).result.unwrap_err(),
            OAuthError::InvalidScope
        );
        f.pairs.last_mut().unwrap().1 = "api".into();
        assert_eq!(s.token(t0(), &f, false).result.unwrap().scope, "api");
    }

    #[test]
    fn duplicated_parameters_are_refused() {
        let mut s = site();
        let tok = s.issue_grant(CLIENT, t0(), "api offline_access").unwrap();
        let mut f = refresh_form(&tok);
        f.pairs.push(("refresh_token".into(), tok.clone()));
        assert_eq!(
            s.token(t0(), &f, false).result.unwrap_err(),
            OAuthError::InvalidRequest
        );
    }

    #[test]
    fn pkce_is_rfc7636() {
        // The example of RFC 7636 appendix B.
        assert!(pkce_matches(
            "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk",
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        ));
        assert!(!pkce_matches(
            "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXX",
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        ));
        assert!(!pkce_matches(
            "short",
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        ));
    }

    #[test]
    fn faults_are_consumed_in_order() {
        let mut s = site();
        s.inject(Fault::Empty502, Some(2));
        s.inject(Fault::Html503, None);
        assert!(matches!(s.take_fault(), Some(Fault::Empty502)));
        assert!(matches!(s.take_fault(), Some(Fault::Empty502)));
        assert!(matches!(s.take_fault(), Some(Fault::Html503)));
        assert!(matches!(s.take_fault(), Some(Fault::Html503)));
        s.clear_faults();
        assert!(s.take_fault().is_none());
    }
}
