//! The token client: refresh and code exchange against `/identity/connect/token`.
//!
//! oauth2 builds the form (client_secret_post) and parses the token; the HTTP
//! exchange is ours, so that redirects are never followed, the destination is
//! checked before a byte leaves, bodies are bounded, and every failure is
//! classified (see [`super::classify`]) before oauth2 sees it. oauth2 only ever
//! receives a 200 with a complete JSON body.

use std::borrow::Cow;
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
};
use oauth2::{
    AsyncHttpClient, AuthType, AuthorizationCode, ClientId, ClientSecret, HttpRequest,
    HttpResponse, PkceCodeVerifier, RedirectUrl, RefreshToken, RequestTokenError,
    StandardRevocableToken, TokenResponse, TokenUrl,
};
use reqwest::header::CONTENT_TYPE;
use url::Url;

use super::address::{
    AddressPolicy, GuardedResolver, ResolveError, is_localhost_name, is_loopback,
};
use super::classify::{
    Body, MAX_BODY, TokenError, classify_oauth_error, classify_response, describe,
};
use super::instance;
use super::response::{AcumaticaTokenResponse, ExpiresIn, MAX_ACCESS_LIFETIME};
use crate::secret::Secret;

/// How the token client talks to instances; the `acumatica.*` and
/// `renewal.http_timeout` settings of DESIGN §6.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    /// Whole-request timeout, connect to last body byte (`renewal.http_timeout`).
    pub timeout: Duration,
    /// Plain http for 127.0.0.0/8, ::1 and localhost instances only.
    pub allow_insecure_loopback: bool,
    /// Instances on private addresses (on-premises). Link-local and cloud-metadata
    /// addresses are refused regardless.
    pub allow_private_networks: bool,
    /// An extra trusted root CA (PEM), for on-premises instances with their own CA.
    pub ca_file: Option<PathBuf>,
    /// Scopes requested by [`TokenClient::authorize_url`].
    pub scopes: Vec<String>,
    /// The User-Agent header sent with every request.
    pub user_agent: String,
}

impl Default for ClientSettings {
    /// DESIGN §6 defaults.
    fn default() -> Self {
        ClientSettings {
            timeout: Duration::from_secs(30),
            allow_insecure_loopback: false,
            allow_private_networks: true,
            ca_file: None,
            scopes: vec!["api".into(), "offline_access".into()],
            user_agent: concat!("acutoken/", env!("CARGO_PKG_VERSION")).into(),
        }
    }
}

/// Why the client could not be built. All are configuration errors: report the
/// message (it names the key) and refuse to start or reload.
#[derive(Debug, thiserror::Error)]
pub enum ClientBuildError {
    /// `acumatica.ca_file` could not be read: fix the path or its permissions.
    #[error("cannot read acumatica.ca_file {}: {source}", path.display())]
    CaFileRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `acumatica.ca_file` holds no usable PEM certificate: point it at a PEM file.
    #[error("acumatica.ca_file {} holds no usable PEM certificate{reason}", path.display())]
    CaFilePem { path: PathBuf, reason: String },
    /// `renewal.http_timeout` is zero: every request would time out at once.
    #[error("renewal.http_timeout must be more than 0s")]
    ZeroTimeout,
    /// The TLS backend could not be set up (or rejected the CA): report and stop.
    #[error("cannot build the HTTP client: {0}")]
    Http(#[source] reqwest::Error),
}

/// What a successful token request returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenGrant {
    pub access_token: Secret,
    /// As sent by the server; `Bearer` when it sent none.
    pub token_type: String,
    /// Lifetime of the access token, when the server gave one (number or string).
    pub expires_in: Option<Duration>,
    /// The rotated refresh token: replaces the old one, which must never be sent
    /// again. `None`: keep the old one.
    pub refresh_token: Option<Secret>,
    /// Space-separated granted scopes, when sent.
    pub scope: Option<String>,
}

/// A token client for every instance. Cheap to clone: one shared reqwest client
/// (one connection pool) behind an `Arc`.
#[derive(Debug, Clone)]
pub struct TokenClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    http: reqwest::Client,
    settings: ClientSettings,
    policy: AddressPolicy,
}

type OAuthClient = oauth2::Client<
    BasicErrorResponse,
    AcumaticaTokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointSet,
>;

impl TokenClient {
    /// Builds the shared HTTP client: no redirects, no proxies (the address policy
    /// must judge the real destination), the policy-enforcing resolver, the
    /// whole-request timeout and the extra CA.
    pub fn new(settings: ClientSettings) -> Result<TokenClient, ClientBuildError> {
        if settings.timeout.is_zero() {
            return Err(ClientBuildError::ZeroTimeout);
        }
        let policy = AddressPolicy {
            allow_private_networks: settings.allow_private_networks,
            allow_loopback: settings.allow_insecure_loopback,
        };
        // A connect phase that ends by timing out has certainly sent nothing, which
        // the whole-request timeout cannot tell us; half the budget is ample for
        // TCP plus TLS and leaves the other half for the answer.
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout / 2)
            .no_proxy()
            .user_agent(settings.user_agent.clone())
            .dns_resolver(Arc::new(GuardedResolver { policy }))
            .pool_idle_timeout(Duration::from_secs(30));
        if let Some(path) = &settings.ca_file {
            for cert in read_ca_file(path)? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder.build().map_err(ClientBuildError::Http)?;
        Ok(TokenClient {
            inner: Arc::new(Inner {
                http,
                settings,
                policy,
            }),
        })
    }

    /// The settings this client was built with.
    pub fn settings(&self) -> &ClientSettings {
        &self.inner.settings
    }

    /// `https://{instance}`, or `http://{instance}` for a loopback instance when
    /// `allow_insecure_loopback` is set. `instance` is a stored (normalised) one.
    pub fn base_url(&self, instance: &str) -> String {
        let scheme =
            if self.inner.settings.allow_insecure_loopback && is_loopback_instance(instance) {
                "http"
            } else {
                "https"
            };
        format!("{scheme}://{instance}")
    }

    /// The authorization URL for `instance` with the configured scopes.
    pub fn authorize_url(
        &self,
        instance: &str,
        client_id: &str,
        redirect_uri: &str,
        state: &str,
        pkce_challenge: &str,
    ) -> String {
        super::authorize::authorize_url(
            &self.base_url(instance),
            client_id,
            redirect_uri,
            &self.inner.settings.scopes,
            state,
            pkce_challenge,
        )
    }

    /// Exchanges a refresh token (`grant_type=refresh_token`, client_secret_post).
    ///
    /// On success the grant's `refresh_token`, when present, replaces the one sent.
    /// On failure, `TokenError::sent` says whether the sent token may be consumed.
    pub async fn refresh(
        &self,
        instance: &str,
        client_id: &str,
        client_secret: &Secret,
        refresh_token: &Secret,
    ) -> Result<TokenGrant, TokenError> {
        let oauth = self.oauth_client(instance, client_id, client_secret)?;
        let token = RefreshToken::new(refresh_token.expose().to_string());
        let http = Transport::new(&self.inner);
        let result = oauth
            .exchange_refresh_token(&token)
            .request_async(&http)
            .await;
        finish(result, &http.seen, instance)
    }

    /// Exchanges an authorization code (with its PKCE verifier) for the first grant.
    pub async fn exchange_code(
        &self,
        instance: &str,
        client_id: &str,
        client_secret: &Secret,
        code: &str,
        pkce_verifier: &Secret,
        redirect_uri: &str,
    ) -> Result<TokenGrant, TokenError> {
        let oauth = self.oauth_client(instance, client_id, client_secret)?;
        let redirect = RedirectUrl::new(redirect_uri.to_string()).map_err(|_| {
            TokenError::transient(
                "acumatica.redirect_uri is not an absolute URL; nothing was sent",
                false,
            )
        })?;
        let http = Transport::new(&self.inner);
        let result = oauth
            .exchange_code(AuthorizationCode::new(code.to_string()))
            .set_pkce_verifier(PkceCodeVerifier::new(pkce_verifier.expose().to_string()))
            .set_redirect_uri(Cow::Owned(redirect))
            .request_async(&http)
            .await;
        finish(result, &http.seen, instance)
    }

    fn oauth_client(
        &self,
        instance: &str,
        client_id: &str,
        client_secret: &Secret,
    ) -> Result<OAuthClient, TokenError> {
        let instance = instance::normalize(instance)
            .map_err(|e| TokenError::transient(format!("{e}; nothing was sent"), false))?;
        let token_url = format!("{}/identity/connect/token", self.base_url(&instance));
        let token_url = TokenUrl::new(token_url).map_err(|_| {
            TokenError::transient(
                format!("`{instance}` does not make a valid token URL; nothing was sent"),
                false,
            )
        })?;
        Ok(oauth2::Client::new(ClientId::new(client_id.to_string()))
            .set_client_secret(ClientSecret::new(client_secret.expose().to_string()))
            .set_auth_type(AuthType::RequestBody)
            .set_token_uri(token_url))
    }
}

/// The HTTP function handed to oauth2. A named type owning what its futures use,
/// rather than a closure borrowing it: with borrows the compiler cannot prove the
/// future `Send` for every lifetime oauth2 asks about, and the engine spawns
/// refreshes on a multi-threaded runtime.
struct Transport {
    inner: Arc<Inner>,
    seen: Arc<Mutex<Option<String>>>,
}

impl Transport {
    fn new(inner: &Arc<Inner>) -> Self {
        Transport {
            inner: inner.clone(),
            seen: Arc::new(Mutex::new(None)),
        }
    }
}

impl<'c> AsyncHttpClient<'c> for Transport {
    type Error = TokenError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, TokenError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        let inner = self.inner.clone();
        let seen = self.seen.clone();
        Box::pin(async move { inner.send(request, &seen).await })
    }
}

impl Inner {
    /// Performs one token request and lets only a
    /// complete 200 JSON answer through; `seen` keeps its description for the case
    /// where oauth2 then finds it is not a token.
    async fn send(
        &self,
        request: HttpRequest,
        seen: &Mutex<Option<String>>,
    ) -> Result<HttpResponse, TokenError> {
        let url = Url::parse(&request.uri().to_string()).map_err(|_| {
            TokenError::transient("the token URL is not valid; nothing was sent", false)
        })?;
        self.check_destination(&url)?;
        let request = reqwest::Request::try_from(request).map_err(|_| {
            TokenError::transient(
                "the token request could not be built; nothing was sent",
                false,
            )
        })?;
        let mut response = self
            .http
            .execute(request)
            .await
            .map_err(|e| self.transport_error(&e, &url))?;

        let status = response.status();
        let headers = response.headers().clone();
        let body = read_bounded(&mut response).await;
        // Dropping the response here closes a connection whose body was not read to
        // the end, so an oversized answer is never drained.
        drop(response);
        if let Some(err) = classify_response(status, &headers, &body, &url) {
            tracing::debug!(host = url.host_str(), status = status.as_u16(), reason = %err.reason, "token request failed");
            return Err(err);
        }
        let what = describe(&headers, &body);
        let Body::Complete(bytes) = body else {
            return Err(TokenError::transient(
                format!("token endpoint answered 200 OK ({what}), not a token"),
                true,
            ));
        };
        if let Ok(mut slot) = seen.lock() {
            *slot = Some(what);
        }
        let mut out = http_response(bytes);
        if let Some(ct) = headers.get(CONTENT_TYPE) {
            out.headers_mut().insert(CONTENT_TYPE, ct.clone());
        }
        Ok(out)
    }

    /// The checks that need no DNS: the scheme, literal addresses and metadata
    /// names. Names are checked again, address by address, by the resolver.
    fn check_destination(&self, url: &Url) -> Result<(), TokenError> {
        let refused = |why: String| {
            Err(TokenError::transient(
                format!("refused to send a token request to {why}; nothing was sent"),
                false,
            ))
        };
        let host = match url.host() {
            Some(h) => h,
            None => return refused("a URL without a host".into()),
        };
        let loopback = match &host {
            url::Host::Ipv4(ip) => is_loopback(IpAddr::V4(*ip)),
            url::Host::Ipv6(ip) => is_loopback(IpAddr::V6(*ip)),
            url::Host::Domain(d) => is_localhost_name(d),
        };
        match url.scheme() {
            "https" => {}
            "http" if self.settings.allow_insecure_loopback && loopback => {}
            "http" => {
                return refused(format!(
                    "{host} over plain http: only loopback instances with acumatica.allow_insecure_loopback may use http"
                ));
            }
            other => return refused(format!("a `{other}:` URL")),
        }
        let checked = match &host {
            url::Host::Ipv4(ip) => self.policy.check_ip(IpAddr::V4(*ip)),
            url::Host::Ipv6(ip) => self.policy.check_ip(IpAddr::V6(*ip)),
            url::Host::Domain(d) => self.policy.check_name(d),
        };
        checked.or_else(|e| refused(e.to_string()))
    }

    fn transport_error(&self, e: &reqwest::Error, url: &Url) -> TokenError {
        let host = url.host_str().unwrap_or("the instance");
        if let Some(resolve) = find_source::<ResolveError>(e) {
            return match resolve {
                ResolveError::Refused(r) => TokenError::transient(
                    format!("refused to send a token request to {r}; nothing was sent"),
                    false,
                ),
                ResolveError::Lookup(..) => {
                    TokenError::transient(format!("{resolve}; nothing was sent"), false)
                }
            };
        }
        // A connect error (DNS, refused, unreachable, TLS handshake, connect timeout)
        // happens before the request is written. Anything else, a whole-request
        // timeout included, may have reached the server.
        if e.is_connect() {
            return TokenError::transient(
                format!(
                    "cannot connect to {host}: {}; nothing was sent",
                    root_cause(e)
                ),
                false,
            );
        }
        if e.is_timeout() {
            return TokenError::transient(
                format!(
                    "no answer from {host} within {}; the request may have been received",
                    crate::model::fmt_duration(self.settings.timeout)
                ),
                true,
            );
        }
        TokenError::transient(
            format!(
                "the token request to {host} failed: {}; it may have been received",
                root_cause(e)
            ),
            true,
        )
    }
}

/// Reads at most [`MAX_BODY`] bytes, stopping as soon as more arrive.
async fn read_bounded(response: &mut reqwest::Response) -> Body {
    if response
        .content_length()
        .is_some_and(|n| n > MAX_BODY as u64)
    {
        return Body::TooLarge;
    }
    let mut buf = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > MAX_BODY {
                    return Body::TooLarge;
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Body::Complete(buf),
            Err(_) => return Body::Unreadable,
        }
    }
}

fn http_response(body: Vec<u8>) -> HttpResponse {
    let mut out = HttpResponse::new(body);
    *out.status_mut() = reqwest::StatusCode::OK;
    out
}

/// Turns oauth2's result into ours. oauth2 only saw a complete 200 JSON answer, so
/// its own errors all mean "a 200 that is not a token".
fn finish(
    result: Result<AcumaticaTokenResponse, RequestTokenError<TokenError, BasicErrorResponse>>,
    seen: &Mutex<Option<String>>,
    instance: &str,
) -> Result<TokenGrant, TokenError> {
    match result {
        Ok(token) => {
            warn_about_expires_in(token.expires_in_seen(), instance);
            Ok(grant(token))
        }
        Err(RequestTokenError::Request(e)) => Err(e),
        Err(RequestTokenError::ServerResponse(e)) => {
            let code = e.error().to_string();
            let (kind, meaning) = classify_oauth_error(&code);
            Err(TokenError {
                kind,
                retry_after: None,
                reason: format!("token endpoint answered `{code}`: {meaning}"),
                sent: true,
            })
        }
        Err(RequestTokenError::Parse(..) | RequestTokenError::Other(_)) => {
            let what = seen
                .lock()
                .ok()
                .and_then(|s| s.clone())
                .unwrap_or_else(|| "unknown content".into());
            Err(TokenError::transient(
                format!("token endpoint answered 200 OK ({what}), not a token"),
                true,
            ))
        }
    }
}

fn grant(token: AcumaticaTokenResponse) -> TokenGrant {
    TokenGrant {
        access_token: Secret::new(token.access_token().secret().clone()),
        token_type: token.token_type_str().to_string(),
        expires_in: token.expires_in(),
        refresh_token: token
            .refresh_token()
            .map(|r| Secret::new(r.secret().clone())),
        scope: token.scope_str(),
    }
}

/// Says when the answer's `expires_in` was not believed as sent. Names the
/// instance only: the value itself came from the server and may be any text.
fn warn_about_expires_in(seen: ExpiresIn, instance: &str) {
    match seen {
        ExpiresIn::Clamped => tracing::warn!(
            instance,
            bound = %crate::model::fmt_duration(MAX_ACCESS_LIFETIME),
            "the token endpoint answered an expires_in beyond the bound; the access token is taken to expire after the bound (the grant is kept)"
        ),
        ExpiresIn::Unreadable => tracing::warn!(
            instance,
            "the token endpoint answered an expires_in that is not a number of seconds; the access token's expiry is unknown, so it is not handed out (the grant is kept)"
        ),
        ExpiresIn::Absent | ExpiresIn::Seconds(_) => {}
    }
}

fn read_ca_file(path: &PathBuf) -> Result<Vec<reqwest::Certificate>, ClientBuildError> {
    let pem = std::fs::read(path).map_err(|source| ClientBuildError::CaFileRead {
        path: path.clone(),
        source,
    })?;
    match reqwest::Certificate::from_pem_bundle(&pem) {
        Ok(certs) if !certs.is_empty() => Ok(certs),
        Ok(_) => Err(ClientBuildError::CaFilePem {
            path: path.clone(),
            reason: String::new(),
        }),
        Err(e) => Err(ClientBuildError::CaFilePem {
            path: path.clone(),
            reason: format!(": {e}"),
        }),
    }
}

/// The host part of a stored `host[:port][/dir]`, and whether it is loopback.
fn is_loopback_instance(instance: &str) -> bool {
    let authority = instance.split('/').next().unwrap_or("");
    let host = if let Some(rest) = authority.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        authority.split(':').next().unwrap_or("")
    };
    match host.parse::<IpAddr>() {
        Ok(ip) => is_loopback(ip),
        Err(_) => is_localhost_name(host),
    }
}

fn find_source<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(found) = err.downcast_ref::<T>() {
            return Some(found);
        }
        cur = err.source();
    }
    None
}

/// The innermost cause: "Connection refused (os error 111)", not reqwest's
/// "error sending request for url (...)".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(loopback: bool) -> TokenClient {
        TokenClient::new(ClientSettings {
            allow_insecure_loopback: loopback,
            ..ClientSettings::default()
        })
        .unwrap()
    }

    #[test]
    fn plain_http_only_for_allowed_loopback() {
        let c = client(true);
        assert_eq!(c.base_url("127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(
            c.base_url("127.8.0.1:8080/Acu"),
            "http://127.8.0.1:8080/Acu"
        );
        assert_eq!(c.base_url("[::1]:8080"), "http://[::1]:8080");
        assert_eq!(c.base_url("localhost:8080"), "http://localhost:8080");
        assert_eq!(c.base_url("10.0.0.5"), "https://10.0.0.5");
        assert_eq!(
            c.base_url("localhost.example.com"),
            "https://localhost.example.com"
        );
        assert_eq!(
            c.base_url("erp.example.com/AcumaticaERP"),
            "https://erp.example.com/AcumaticaERP"
        );
        assert_eq!(
            client(false).base_url("127.0.0.1:8080"),
            "https://127.0.0.1:8080"
        );
    }

    #[test]
    fn destination_checks_refuse_before_sending() {
        let c = client(true);
        let check = |u: &str| c.inner.check_destination(&Url::parse(u).unwrap());
        assert!(check("http://127.0.0.1:9/identity/connect/token").is_ok());
        assert!(check("https://acme.acumatica.com/identity/connect/token").is_ok());
        for bad in [
            "http://10.0.0.5/identity/connect/token",
            "http://acme.acumatica.com/identity/connect/token",
            "https://169.254.169.254/identity/connect/token",
            "https://[fd00:ec2::254]/identity/connect/token",
            "https://metadata.google.internal/identity/connect/token",
            "ftp://acme.acumatica.com/x",
        ] {
            let e = check(bad).unwrap_err();
            assert!(!e.sent, "{bad}");
            assert!(e.is_transient());
        }
        let strict = client(false);
        let e = strict
            .inner
            .check_destination(&Url::parse("http://127.0.0.1:9/x").unwrap())
            .unwrap_err();
        assert!(e.reason.contains("plain http"), "{}", e.reason);
    }

    #[test]
    fn request_futures_are_send() {
        fn assert_send<T: Send>(_: &T) {}
        let c = client(true);
        let s = Secret::new("x");
        assert_send(&c.refresh("127.0.0.1:9", "id", &s, &s));
        assert_send(&c.exchange_code("127.0.0.1:9", "id", &s, "code", &s, "https://x/cb"));
    }

    /// A self-signed CA (P-256, valid until 2126) used only to prove a PEM loads.
    const TEST_CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBjDCCATOgAwIBAgIUSdmeGahGG53lw7nMKfGE11+ARLswCgYIKoZIzj0EAwIw\nGzEZMBcGA1UEAwwQYWN1dG9rZW4gdGVzdCBDQTAgFw0yNjExMjkwNTM4MjVaGA8y\nMTI2MTEwNTA1MzgyNVowGzEZMBcGA1UEAwwQYWN1dG9rZW4gdGVzdCBDQTBZMBMG\nByqGSM49AgEGCCqGSM49AwEHA0IABO8D0VV6VRsYDxzHAq8Kml7JQb/0kZ0tZXfe\nchWuUzDDek/9r4U7yHylVVTBx+3wmmZtWHVJJtBSQJfoekF8cMujUzBRMB0GA1Ud\nDgQWBBQbiv70T1ZBtBXBuGkHq1q9lkCK5DAfBgNVHSMEGDAWgBQbiv70T1ZBtBXB\nuGkHq1q9lkCK5DAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0cAMEQCIET2\n/uPH8Ajxb1vkmRdcvHttHUkc4LsOG89AatYhcKT8AiBNg1HTVsXnD6fvztikTnDO\nH2kfJ2mCDpL+32+FYwSD1A==\n-----END CERTIFICATE-----\n";

    #[test]
    fn ca_file_is_added_as_a_root() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, TEST_CA).unwrap();
        let c = TokenClient::new(ClientSettings {
            ca_file: Some(path),
            ..ClientSettings::default()
        });
        assert!(c.is_ok(), "{:?}", c.err());
    }

    #[test]
    fn ca_file_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = TokenClient::new(ClientSettings {
            ca_file: Some(missing),
            ..ClientSettings::default()
        })
        .unwrap_err();
        assert!(matches!(e, ClientBuildError::CaFileRead { .. }));
        assert!(e.to_string().contains("acumatica.ca_file"));
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let e = TokenClient::new(ClientSettings {
            ca_file: Some(junk),
            ..ClientSettings::default()
        })
        .unwrap_err();
        assert!(matches!(e, ClientBuildError::CaFilePem { .. }), "{e}");
        assert!(matches!(
            TokenClient::new(ClientSettings {
                timeout: Duration::ZERO,
                ..ClientSettings::default()
            }),
            Err(ClientBuildError::ZeroTimeout)
        ));
    }
}
