//! The token client against real HTTP servers on 127.0.0.1: what it sends, what it
//! makes of every answer Acumatica gives, and that nothing secret leaks into errors.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use acutoken::acumatica::{ClientSettings, TokenClient, TokenError};
use acutoken::model::FailureKind;
use acutoken::secret::Secret;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const CLIENT_ID: &str = "88358B02-A48D-A50E-F710-39C1636C30F6@My Company";
const CLIENT_SECRET: &str = "cs-SECRET+value/=&x";
const REFRESH_TOKEN: &str = "rt-SECRET-old";
/// Put in every answer body so a test can prove no body reaches an error.
const MARKER: &str = "BODY-MARKER";

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: HeaderMap,
    body: String,
}

/// What the test server answers: `None` means never answer.
type Reply = Arc<dyn Fn() -> Option<Response> + Send + Sync>;

struct Server {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Server {
    fn instance(&self) -> String {
        format!("127.0.0.1:{}/AcumaticaERP", self.addr.port())
    }
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve(reply: impl Fn() -> Option<Response> + Send + Sync + 'static) -> Server {
    let reply: Reply = Arc::new(reply);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let reply = reply.clone();
        let record = record.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = axum::body::to_bytes(body, 1 << 20)
                .await
                .unwrap_or_default();
            record.lock().unwrap().push(Seen {
                method: parts.method.to_string(),
                path: parts.uri.path().to_string(),
                headers: parts.headers.clone(),
                body: String::from_utf8_lossy(&body).into_owned(),
            });
            match reply() {
                Some(r) => r,
                None => std::future::pending().await,
            }
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Server { addr, seen }
}

fn settings() -> ClientSettings {
    ClientSettings {
        timeout: Duration::from_secs(10),
        allow_insecure_loopback: true,
        // Loopback is allowed by allow_insecure_loopback alone.
        allow_private_networks: false,
        ca_file: None,
        scopes: vec!["api".into(), "offline_access".into()],
        user_agent: "acutoken-test/1".into(),
    }
}

fn client() -> TokenClient {
    TokenClient::new(settings()).unwrap()
}

fn json(status: StatusCode, body: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body.to_string(),
    )
        .into_response()
}

fn form(body: &str) -> BTreeMap<String, String> {
    url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect()
}

async fn refresh(
    client: &TokenClient,
    instance: &str,
) -> Result<acutoken::acumatica::TokenGrant, TokenError> {
    client
        .refresh(
            instance,
            CLIENT_ID,
            &Secret::new(CLIENT_SECRET),
            &Secret::new(REFRESH_TOKEN),
        )
        .await
}

/// No secret, and nothing from any answer body, in an error's Display or Debug.
fn assert_clean(e: &TokenError) {
    let text = format!("{e} | {e:?}");
    for needle in ["SECRET", MARKER, "<html", "access_token"] {
        assert!(!text.contains(needle), "`{needle}` leaked into: {text}");
    }
}

/// A failure that answered with `reply`, classified; the server saw exactly one request.
async fn failure(reply: impl Fn() -> Response + Send + Sync + 'static) -> TokenError {
    let server = serve(move || Some(reply())).await;
    let e = refresh(&client(), &server.instance()).await.unwrap_err();
    assert_eq!(
        server.seen().len(),
        1,
        "redirects are never followed, nothing is retried"
    );
    assert!(
        e.sent,
        "the server answered, so the request was sent: {e:?}"
    );
    assert_clean(&e);
    e
}

#[tokio::test]
async fn refresh_posts_client_secret_post_form_to_the_virtual_directory() {
    let server = serve(|| {
        Some(json(
            StatusCode::OK,
            r#"{"access_token":"AT-1","token_type":"Bearer","expires_in":3600,
                "refresh_token":"rt-new","scope":"api offline_access","id_token":"a.b.c"}"#,
        ))
    })
    .await;
    let grant = refresh(&client(), &server.instance()).await.unwrap();

    assert_eq!(grant.access_token.expose(), "AT-1");
    assert_eq!(grant.token_type, "Bearer");
    assert_eq!(grant.expires_in, Some(Duration::from_secs(3600)));
    assert_eq!(
        grant.refresh_token.as_ref().map(Secret::expose),
        Some("rt-new")
    );
    assert_eq!(grant.scope.as_deref(), Some("api offline_access"));
    assert!(!format!("{grant:?}").contains("AT-1"));

    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    let req = &seen[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.path, "/AcumaticaERP/identity/connect/token");
    assert!(
        req.headers.get(header::AUTHORIZATION).is_none(),
        "no Basic header"
    );
    assert_eq!(
        req.headers.get(header::CONTENT_TYPE).unwrap(),
        "application/x-www-form-urlencoded"
    );
    assert_eq!(
        req.headers.get(header::USER_AGENT).unwrap(),
        "acutoken-test/1"
    );
    let want: BTreeMap<String, String> = [
        ("grant_type", "refresh_token"),
        ("client_id", CLIENT_ID),
        ("client_secret", CLIENT_SECRET),
        ("refresh_token", REFRESH_TOKEN),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(form(&req.body), want, "exactly these fields, no scope");
    // The tenant, spaces included, is form-encoded whole.
    assert!(
        req.body
            .contains("client_id=88358B02-A48D-A50E-F710-39C1636C30F6%40My+Company"),
        "{}",
        req.body
    );
}

#[tokio::test]
async fn expires_in_as_string_and_no_rotation() {
    let server = serve(|| {
        Some(json(
            StatusCode::OK,
            r#"{"access_token":"AT-2","token_type":"bearer","expires_in":"3600"}"#,
        ))
    })
    .await;
    let grant = refresh(&client(), &server.instance()).await.unwrap();
    assert_eq!(grant.expires_in, Some(Duration::from_secs(3600)));
    assert!(
        grant.refresh_token.is_none(),
        "no refresh token: keep the old one"
    );
    assert!(grant.scope.is_none());
}

#[tokio::test]
async fn exchange_code_sends_code_verifier_and_redirect_uri() {
    let server = serve(|| {
        Some(json(
            StatusCode::OK,
            r#"{"access_token":"AT-3","token_type":"Bearer","expires_in":3600,"refresh_token":"rt-first"}"#,
        ))
    })
    .await;
    let redirect = "https://connect.example.com/settings/acumaticacallback";
    let grant = client()
        .exchange_code(
            &server.instance(),
            CLIENT_ID,
            &Secret::new(CLIENT_SECRET),
            "the-code",
            &Secret::new("verifier-SECRET"),
            redirect,
        )
        .await
        .unwrap();
    assert_eq!(grant.refresh_token.unwrap().expose(), "rt-first");
    let seen = server.seen();
    assert_eq!(seen[0].path, "/AcumaticaERP/identity/connect/token");
    let body = form(&seen[0].body);
    assert_eq!(
        body.get("grant_type").map(String::as_str),
        Some("authorization_code")
    );
    assert_eq!(body.get("code").map(String::as_str), Some("the-code"));
    assert_eq!(
        body.get("code_verifier").map(String::as_str),
        Some("verifier-SECRET")
    );
    assert_eq!(body.get("redirect_uri").map(String::as_str), Some(redirect));
    assert_eq!(body.get("client_id").map(String::as_str), Some(CLIENT_ID));
    assert_eq!(
        body.get("client_secret").map(String::as_str),
        Some(CLIENT_SECRET)
    );
    assert!(seen[0].headers.get(header::AUTHORIZATION).is_none());
}

#[tokio::test]
async fn invalid_client_means_a_new_secret() {
    let e = failure(|| {
        json(
            StatusCode::BAD_REQUEST,
            &format!(
                r#"{{"error":"invalid_client","error_description":"{MARKER} secret {CLIENT_SECRET}"}}"#
            ),
        )
    })
    .await;
    assert_eq!(e.kind, FailureKind::InvalidClient);
    assert!(e.reason.contains("invalid_client"), "{}", e.reason);
}

#[tokio::test]
async fn invalid_grant_means_reauthorization() {
    let e = failure(|| {
        json(
            StatusCode::BAD_REQUEST,
            &format!(
                r#"{{"error":"invalid_grant","error_description":"{MARKER} {REFRESH_TOKEN}"}}"#
            ),
        )
    })
    .await;
    assert_eq!(e.kind, FailureKind::InvalidGrant);
    assert!(e.reason.contains("invalid_grant"));
}

#[tokio::test]
async fn unauthorized_client_is_treated_like_invalid_client() {
    let e = failure(|| {
        json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"unauthorized_client"}"#,
        )
    })
    .await;
    assert_eq!(e.kind, FailureKind::InvalidClient);
}

#[tokio::test]
async fn too_many_requests_honours_retry_after() {
    let e = failure(|| {
        (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "7")],
            MARKER,
        )
            .into_response()
    })
    .await;
    assert_eq!(e.kind, FailureKind::Transient);
    assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
}

#[tokio::test]
async fn api_login_limit_body_is_transient() {
    let e = failure(|| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("API Login Limit exceeded {MARKER}"),
        )
            .into_response()
    })
    .await;
    assert_eq!(e.kind, FailureKind::Transient);
    assert!(e.reason.contains("login limit"), "{}", e.reason);
}

#[tokio::test]
async fn html_503_is_transient() {
    let e = failure(|| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            format!("<html><body>{MARKER} Service Unavailable</body></html>"),
        )
            .into_response()
    })
    .await;
    assert_eq!(e.kind, FailureKind::Transient);
    assert!(e.reason.contains("503"), "{}", e.reason);
    assert!(e.reason.contains("text/html"), "{}", e.reason);
}

#[tokio::test]
async fn empty_502_is_transient() {
    let e = failure(|| StatusCode::BAD_GATEWAY.into_response()).await;
    assert_eq!(e.kind, FailureKind::Transient);
    assert!(e.reason.contains("502"), "{}", e.reason);
    assert!(e.reason.contains("empty"), "{}", e.reason);
}

#[tokio::test]
async fn redirect_to_error_page_is_transient() {
    let e = failure(|| {
        (
            StatusCode::FOUND,
            [(
                header::LOCATION,
                "/AcumaticaERP/Frames/Error.aspx?exceptionID=1",
            )],
            MARKER,
        )
            .into_response()
    })
    .await;
    assert_eq!(e.kind, FailureKind::Transient);
    assert!(e.reason.contains("Error.aspx"), "{}", e.reason);
}

#[tokio::test]
async fn redirect_elsewhere_names_the_host_and_is_not_followed() {
    let e = failure(|| {
        (
            StatusCode::TEMPORARY_REDIRECT,
            [(
                header::LOCATION,
                "https://login.other-host.example/identity/connect/token?x=1",
            )],
        )
            .into_response()
    })
    .await;
    assert_eq!(e.kind, FailureKind::Transient);
    assert!(
        e.reason.contains("login.other-host.example"),
        "{}",
        e.reason
    );
}

#[tokio::test]
async fn a_200_that_is_not_a_token_is_transient() {
    let html = failure(|| {
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html")],
            format!("<html>{MARKER} login page</html>"),
        )
            .into_response()
    })
    .await;
    assert_eq!(html.kind, FailureKind::Transient);
    let not_token = failure(|| json(StatusCode::OK, &format!(r#"{{"hello":"{MARKER}"}}"#))).await;
    assert_eq!(not_token.kind, FailureKind::Transient);
    assert!(
        not_token.reason.contains("not a token"),
        "{}",
        not_token.reason
    );
    let garbage = failure(|| json(StatusCode::OK, &format!("{MARKER} {{{{"))).await;
    assert_eq!(garbage.kind, FailureKind::Transient);
}

#[tokio::test]
async fn timeout_after_sending_counts_as_sent() {
    let server = serve(|| None).await;
    let client = TokenClient::new(ClientSettings {
        timeout: Duration::from_millis(400),
        ..settings()
    })
    .unwrap();
    let e = refresh(&client, &server.instance()).await.unwrap_err();
    assert_eq!(e.kind, FailureKind::Transient);
    assert!(e.sent, "the server has the request: {e:?}");
    assert_eq!(server.seen().len(), 1);
    assert_clean(&e);
}

#[tokio::test]
async fn connection_refused_was_not_sent() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let e = refresh(&client(), &format!("127.0.0.1:{port}"))
        .await
        .unwrap_err();
    assert_eq!(e.kind, FailureKind::Transient);
    assert!(!e.sent, "{e:?}");
    assert!(e.reason.contains("cannot connect"), "{}", e.reason);
    assert_clean(&e);
}

/// Reads one HTTP/1.1 request (headers, then Content-Length bytes of body).
async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&request[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if request.len() >= end + 4 + length {
                return Some(request);
            }
        }
        match sock.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
}

/// A raw server that answers 200 and then streams up to 100 MiB, counting what
/// it managed to write before the client hung up.
async fn flood(declare_length: bool) -> (SocketAddr, tokio::task::JoinHandle<u64>) {
    const TOTAL: u64 = 100 << 20;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        if read_request(&mut sock).await.is_none() {
            return 0;
        }
        let head = if declare_length {
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {TOTAL}\r\n\r\n"
            )
        } else {
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
                .to_string()
        };
        if sock.write_all(head.as_bytes()).await.is_err() {
            return 0;
        }
        let chunk = vec![b' '; 1 << 20];
        let mut written = 0u64;
        while written < TOTAL {
            if sock.write_all(&chunk).await.is_err() {
                break;
            }
            written += chunk.len() as u64;
        }
        written
    });
    (addr, task)
}

#[tokio::test]
async fn a_100_mib_answer_is_not_read_past_the_bound() {
    for declare_length in [false, true] {
        let (addr, task) = flood(declare_length).await;
        let e = refresh(&client(), &format!("127.0.0.1:{}", addr.port()))
            .await
            .unwrap_err();
        assert_eq!(e.kind, FailureKind::Transient);
        assert!(e.sent);
        assert!(e.reason.contains("not read further"), "{}", e.reason);
        let written = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("the server stops writing once the client hangs up")
            .unwrap();
        // Socket buffers absorb a few MiB; reading the answer whole would take 100.
        assert!(
            written < 32 << 20,
            "server wrote {written} bytes (declared length: {declare_length})"
        );
    }
}

#[tokio::test]
async fn metadata_addresses_are_refused_before_sending() {
    let mut settings = settings();
    settings.allow_private_networks = true;
    let client = TokenClient::new(settings).unwrap();
    for instance in [
        "169.254.169.254",
        "169.254.169.254:80/latest",
        "[fd00:ec2::254]",
        "metadata.google.internal",
        "[fe80::1]",
        "169.254.10.10",
    ] {
        let e = refresh(&client, instance).await.unwrap_err();
        assert!(!e.sent, "{instance}: {e:?}");
        assert_eq!(e.kind, FailureKind::Transient);
        assert!(
            e.reason.contains("never go there"),
            "{instance}: {}",
            e.reason
        );
        assert_clean(&e);
    }
}

#[tokio::test]
async fn plain_http_is_never_used_without_the_loopback_setting() {
    let server = serve(|| Some(json(StatusCode::OK, r#"{"access_token":"AT"}"#))).await;
    let client = TokenClient::new(ClientSettings {
        allow_insecure_loopback: false,
        allow_private_networks: true,
        ..settings()
    })
    .unwrap();
    assert!(client.base_url(&server.instance()).starts_with("https://"));
    // https to a plain-http server: the TLS handshake fails before the form is written.
    let e = refresh(&client, &server.instance()).await.unwrap_err();
    assert!(!e.sent, "{e:?}");
    assert!(
        server.seen().is_empty(),
        "the form never reached the server"
    );
    assert_clean(&e);

    let loopback_ok = TokenClient::new(settings()).unwrap();
    assert_eq!(
        loopback_ok.base_url("10.0.0.5:8080"),
        "https://10.0.0.5:8080"
    );
    assert_eq!(
        loopback_ok.base_url("acme.acumatica.com"),
        "https://acme.acumatica.com"
    );
}

#[tokio::test]
async fn resolved_addresses_are_checked_and_refusal_means_not_sent() {
    let server = serve(|| Some(json(StatusCode::OK, r#"{"access_token":"AT"}"#))).await;
    let strict = TokenClient::new(ClientSettings {
        allow_insecure_loopback: false,
        allow_private_networks: false,
        ..settings()
    })
    .unwrap();
    let e = refresh(&strict, &format!("localhost:{}", server.addr.port()))
        .await
        .unwrap_err();
    assert!(!e.sent, "{e:?}");
    assert!(e.reason.contains("loopback"), "{}", e.reason);
    assert!(server.seen().is_empty());

    // The same name with loopback allowed resolves and reaches the server.
    let grant = refresh(&client(), &format!("localhost:{}", server.addr.port())).await;
    assert_eq!(grant.unwrap().access_token.expose(), "AT");
}

#[tokio::test]
async fn bad_instance_is_refused_before_sending() {
    let e = refresh(&client(), "ftp://acme.acumatica.com")
        .await
        .unwrap_err();
    assert!(!e.sent);
    assert_clean(&e);
}

#[tokio::test]
async fn authorize_url_uses_the_base_url_and_settings_scopes() {
    let client = client();
    let (verifier, challenge) = acutoken::acumatica::pkce_pair();
    let u = client.authorize_url(
        "127.0.0.1:8080/AcumaticaERP",
        CLIENT_ID,
        "https://connect.example.com/cb",
        "STATE",
        &challenge,
    );
    assert!(
        u.starts_with(
            "http://127.0.0.1:8080/AcumaticaERP/identity/connect/authorize?response_type=code&"
        ),
        "{u}"
    );
    assert!(u.contains("scope=api+offline_access"));
    assert!(u.contains("code_challenge_method=S256"));
    assert!(!u.contains(verifier.expose()));
}

#[tokio::test]
async fn one_client_serves_many_requests_concurrently() {
    let server = serve(|| {
        Some(json(
            StatusCode::OK,
            r#"{"access_token":"AT","expires_in":3600,"refresh_token":"rt-next"}"#,
        ))
    })
    .await;
    let client = client();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = client.clone();
        let instance = server.instance();
        tasks.push(tokio::spawn(
            async move { refresh(&client, &instance).await },
        ));
    }
    for t in tasks {
        assert!(t.await.unwrap().is_ok());
    }
    assert_eq!(server.seen().len(), 8);
}

/// Against the crate's Acumatica simulator: the same client, a server that keeps
/// state (rotation, replay detection, revocation) and injects Acumatica's faults.
mod simulator {
    use super::*;
    use acutoken::sim::{Fault, Simulator};

    const SITE: &str = "AcumaticaERP";
    const SECRET: &str = "sim-SECRET-1";

    async fn sim() -> (Simulator, String) {
        let sim = Simulator::start(acutoken::clock::system()).await.unwrap();
        sim.add_client(SITE, CLIENT_ID, SECRET, None);
        let rt = sim
            .issue_grant(SITE, CLIENT_ID, chrono::Utc::now())
            .unwrap();
        (sim, rt)
    }

    async fn sim_refresh(
        sim: &Simulator,
        secret: &str,
        rt: &str,
    ) -> Result<acutoken::acumatica::TokenGrant, TokenError> {
        client()
            .refresh(
                &sim.instance(SITE),
                CLIENT_ID,
                &Secret::new(secret),
                &Secret::new(rt),
            )
            .await
    }

    #[tokio::test]
    async fn refresh_rotates_and_the_simulator_sees_client_secret_post() {
        let (sim, rt1) = sim().await;
        let grant = sim_refresh(&sim, SECRET, &rt1).await.unwrap();
        let rt2 = grant.refresh_token.expect("the simulator always rotates");
        assert_ne!(rt2.expose(), rt1);
        assert_eq!(grant.expires_in, Some(Duration::from_secs(3600)));
        assert!(sim.access_token_valid(SITE, grant.access_token.expose()));
        assert!(!sim.refresh_token_alive(SITE, &rt1));
        assert!(sim.refresh_token_alive(SITE, rt2.expose()));

        let req = &sim.requests(SITE)[0];
        assert!(!req.basic_auth);
        assert_eq!(req.client_id.as_deref(), Some(CLIENT_ID));
        let mut keys = req.form_keys.clone();
        keys.sort();
        assert_eq!(
            keys,
            ["client_id", "client_secret", "grant_type", "refresh_token"]
        );

        // The rotated token works; the simulator never saw a replay.
        assert!(sim_refresh(&sim, SECRET, rt2.expose()).await.is_ok());
        assert_eq!(sim.replays(SITE), 0);
    }

    #[tokio::test]
    async fn expires_in_as_string() {
        let (sim, rt) = sim().await;
        sim.set_expires_in_as_string(SITE, true);
        sim.set_expires_in(SITE, 1800);
        let grant = sim_refresh(&sim, SECRET, &rt).await.unwrap();
        assert_eq!(grant.expires_in, Some(Duration::from_secs(1800)));
    }

    #[tokio::test]
    async fn wrong_secret_and_replay() {
        let (sim, rt1) = sim().await;
        let e = sim_refresh(&sim, "sim-SECRET-wrong", &rt1)
            .await
            .unwrap_err();
        assert_eq!(e.kind, FailureKind::InvalidClient);
        assert_clean(&e);

        assert!(sim_refresh(&sim, SECRET, &rt1).await.is_ok());
        let e = sim_refresh(&sim, SECRET, &rt1).await.unwrap_err();
        assert_eq!(e.kind, FailureKind::InvalidGrant, "a used token is dead");
        assert_clean(&e);
    }

    #[tokio::test]
    async fn revoke_access_means_reauthorization() {
        let (sim, rt) = sim().await;
        sim.revoke(SITE, CLIENT_ID).unwrap();
        let e = sim_refresh(&sim, SECRET, &rt).await.unwrap_err();
        assert_eq!(e.kind, FailureKind::InvalidGrant);
        assert_clean(&e);
    }

    #[tokio::test]
    async fn every_fault_is_transient_and_leaves_the_token_alive() {
        let (sim, rt) = sim().await;
        let faults = [
            Fault::Html503,
            Fault::Empty502,
            Fault::ApiLoginLimit,
            Fault::RedirectToErrorAspx,
            Fault::Garbage200,
            Fault::Huge,
            Fault::Status {
                code: 429,
                retry_after: Some(11),
                body: String::new(),
            },
        ];
        for fault in faults {
            let name = fault.name();
            sim.inject(SITE, fault, Some(1));
            let e = sim_refresh(&sim, SECRET, &rt).await.unwrap_err();
            assert_eq!(e.kind, FailureKind::Transient, "{name}: {e:?}");
            assert!(e.sent, "{name}");
            assert_clean(&e);
            match name {
                "api_login_limit" => assert!(e.reason.contains("login limit"), "{}", e.reason),
                "redirect_to_error_aspx" => assert!(e.reason.contains("Error.aspx")),
                "huge" => assert!(e.reason.contains("not read further"), "{}", e.reason),
                "status" => assert_eq!(e.retry_after, Some(Duration::from_secs(11))),
                _ => {}
            }
            assert!(
                sim.refresh_token_alive(SITE, &rt),
                "{name} consumed the token"
            );
        }
        assert!(sim_refresh(&sim, SECRET, &rt).await.is_ok());
    }

    #[tokio::test]
    async fn a_hanging_instance_times_out_as_sent() {
        let (sim, rt) = sim().await;
        sim.inject(SITE, Fault::Hang, Some(1));
        let client = TokenClient::new(ClientSettings {
            timeout: Duration::from_millis(400),
            ..settings()
        })
        .unwrap();
        let e = client
            .refresh(
                &sim.instance(SITE),
                CLIENT_ID,
                &Secret::new(SECRET),
                &Secret::new(rt),
            )
            .await
            .unwrap_err();
        assert!(e.sent);
        assert_eq!(e.kind, FailureKind::Transient);
    }

    #[tokio::test]
    async fn authorization_code_flow_with_pkce() {
        let sim = Simulator::start(acutoken::clock::system()).await.unwrap();
        sim.add_client(SITE, CLIENT_ID, SECRET, None);
        let redirect = "https://connect.example.com/settings/acumaticacallback";
        sim.add_redirect_uri(SITE, CLIENT_ID, redirect).unwrap();

        let client = client();
        let (verifier, challenge) = acutoken::acumatica::pkce_pair();
        let url =
            client.authorize_url(&sim.instance(SITE), CLIENT_ID, redirect, "st-1", &challenge);
        // The simulated customer approves at once: the answer redirects to the callback.
        let browser = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let answer = browser.get(&url).send().await.unwrap();
        assert_eq!(answer.status(), StatusCode::FOUND, "{url}");
        let location = answer.headers()[header::LOCATION]
            .to_str()
            .unwrap()
            .to_string();
        let landed = url::Url::parse(&location).unwrap();
        let q: BTreeMap<String, String> = landed.query_pairs().into_owned().collect();
        assert_eq!(q.get("state").map(String::as_str), Some("st-1"));
        let code = q.get("code").expect("a code");

        let grant = client
            .exchange_code(
                &sim.instance(SITE),
                CLIENT_ID,
                &Secret::new(SECRET),
                code,
                &verifier,
                redirect,
            )
            .await
            .unwrap();
        assert!(grant.refresh_token.is_some());
        assert!(sim.access_token_valid(SITE, grant.access_token.expose()));

        // A code is single-use.
        let e = client
            .exchange_code(
                &sim.instance(SITE),
                CLIENT_ID,
                &Secret::new(SECRET),
                code,
                &verifier,
                redirect,
            )
            .await
            .unwrap_err();
        assert_eq!(e.kind, FailureKind::InvalidGrant);
    }
}
