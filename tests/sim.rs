//! The Acumatica simulator over real HTTP: what acutoken's tests rely on it to do.

use std::sync::Arc;
use std::time::{Duration, Instant};

use acutoken::clock::ManualClock;
use acutoken::model::{Timestamp, parse_time};
use acutoken::sim::{Fault, HUGE_LEN, Lifetime, Simulator};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::StatusCode;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

const CLIENT: &str = "88358B02-A48D-A50E-F710-39C1636C30F6@My Company";
const SECRET: &str = "s3cret-value-7";
const DAY: u64 = 86_400;

fn t0() -> Timestamp {
    parse_time("2026-03-01T08:00:00Z").unwrap()
}

async fn start() -> (Simulator, ManualClock) {
    let clock = ManualClock::new(t0());
    let sim = Simulator::start(Arc::new(clock.clone())).await.unwrap();
    (sim, clock)
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Waits for a condition with a bound; never sleeps to wait for an event by itself.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn post(url: &str, form: &[(&str, &str)]) -> (StatusCode, Value) {
    let r = http().post(url).form(form).send().await.unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

async fn refresh(sim: &Simulator, site: &str, token: &str) -> (StatusCode, Value) {
    post(
        &sim.token_url(site),
        &[
            ("grant_type", "refresh_token"),
            ("client_id", CLIENT),
            ("client_secret", SECRET),
            ("refresh_token", token),
        ],
    )
    .await
}

fn error_of(body: &Value) -> &str {
    body["error"].as_str().unwrap_or("<none>")
}

fn new_refresh_token(body: &Value) -> String {
    body["refresh_token"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn refresh_rotates_and_a_replay_revokes_the_grant() {
    let (sim, _clock) = start().await;
    sim.add_client("", CLIENT, SECRET, None);
    let first = sim.issue_grant("", CLIENT, t0()).unwrap();

    let (status, body) = refresh(&sim, "", &first).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["scope"], "api offline_access");
    assert!(body.get("id_token").is_none());
    let second = new_refresh_token(&body);
    assert_ne!(second, first);
    assert!(sim.access_token_valid("", body["access_token"].as_str().unwrap()));
    assert!(!sim.access_token_valid("", "forged.token.value"));
    assert_eq!(sim.current_refresh_token("", CLIENT), Some(second.clone()));
    assert!(!sim.refresh_token_alive("", &first));
    assert_eq!(sim.total_replays(), 0);

    let (status, body) = refresh(&sim, "", &first).await;
    assert_eq!(
        (status, error_of(&body)),
        (StatusCode::BAD_REQUEST, "invalid_grant")
    );
    assert_eq!(sim.replays(""), 1);
    assert_eq!(sim.total_replays(), 1);
    assert!(
        !sim.grant_alive("", &second),
        "a replay kills the whole grant"
    );
    assert_eq!(sim.current_refresh_token("", CLIENT), None);
    let (_, body) = refresh(&sim, "", &second).await;
    assert_eq!(error_of(&body), "invalid_grant");

    let requests = sim.requests("");
    assert_eq!(requests.len(), 3);
    assert_eq!(sim.token_requests(""), 3);
    assert_eq!(
        requests.iter().map(|r| r.replay).collect::<Vec<_>>(),
        [false, true, false]
    );
    let r = &requests[0];
    assert_eq!(r.grant_type.as_deref(), Some("refresh_token"));
    assert_eq!(
        r.client_id.as_deref(),
        Some(CLIENT),
        "the tenant's space survives form decoding"
    );
    assert_eq!(
        r.form_keys,
        ["grant_type", "client_id", "client_secret", "refresh_token"]
    );
    assert!(!r.basic_auth);
    assert_eq!((r.status, r.at), (200, t0()));
    let printed = format!("{requests:?}");
    for secret in [SECRET, first.as_str(), second.as_str()] {
        assert!(
            !printed.contains(secret),
            "Debug output leaks a secret value"
        );
    }
}

#[tokio::test]
async fn absolute_lifetime_counts_from_the_authorization() {
    let (sim, clock) = start().await;
    sim.add_client("", CLIENT, SECRET, None);
    let mut token = sim.issue_grant("", CLIENT, t0()).unwrap();
    for _ in 0..3 {
        clock.advance(chrono::TimeDelta::days(9));
        let (status, body) = refresh(&sim, "", &token).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        token = new_refresh_token(&body);
    }
    // Day 27 now; refreshing did not move the day-30 deadline.
    clock.set(t0() + chrono::TimeDelta::days(30) - chrono::TimeDelta::seconds(1));
    assert!(sim.refresh_token_alive("", &token));
    clock.set(t0() + chrono::TimeDelta::days(30));
    assert!(!sim.grant_alive("", &token));
    let (status, body) = refresh(&sim, "", &token).await;
    assert_eq!(
        (status, error_of(&body)),
        (StatusCode::BAD_REQUEST, "invalid_grant")
    );
    assert_eq!(sim.total_replays(), 0);
}

#[tokio::test]
async fn sliding_lifetime_moves_with_each_refresh_up_to_the_cap() {
    let (sim, clock) = start().await;
    sim.add_client("", CLIENT, SECRET, None);
    sim.set_lifetime(
        "",
        Lifetime::Sliding {
            lifetime: Duration::from_secs(10 * DAY),
            cap: Some(Duration::from_secs(25 * DAY)),
        },
    );
    let mut token = sim.issue_grant("", CLIENT, t0()).unwrap();
    for _ in 0..2 {
        clock.advance(chrono::TimeDelta::days(9));
        let (status, body) = refresh(&sim, "", &token).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        token = new_refresh_token(&body);
    }
    // Issued on day 18: it would slide to day 28, but the cap ends the grant on day 25.
    clock.set(t0() + chrono::TimeDelta::days(25) - chrono::TimeDelta::seconds(1));
    assert!(sim.refresh_token_alive("", &token));
    clock.set(t0() + chrono::TimeDelta::days(25));
    let (_, body) = refresh(&sim, "", &token).await;
    assert_eq!(error_of(&body), "invalid_grant");

    // Uncapped: a token unused for a whole lifetime dies.
    sim.set_lifetime(
        "",
        Lifetime::Sliding {
            lifetime: Duration::from_secs(10 * DAY),
            cap: None,
        },
    );
    let token = sim.issue_grant("", CLIENT, clock_now(&clock)).unwrap();
    clock.advance(chrono::TimeDelta::days(10));
    let (_, body) = refresh(&sim, "", &token).await;
    assert_eq!(error_of(&body), "invalid_grant");
}

fn clock_now(clock: &ManualClock) -> Timestamp {
    acutoken::clock::Clock::now(clock)
}

#[tokio::test]
async fn revoke_access_kills_every_grant_of_the_client() {
    let (sim, _clock) = start().await;
    sim.add_client("", CLIENT, SECRET, None);
    let a = sim.issue_grant("", CLIENT, t0()).unwrap();
    let b = sim.issue_grant("", CLIENT, t0()).unwrap();
    assert_eq!(sim.live_grants("", CLIENT), 2);
    assert_eq!(sim.revoke("", CLIENT).unwrap(), 2);
    assert_eq!(sim.live_grants("", CLIENT), 0);
    for token in [a, b] {
        let (_, body) = refresh(&sim, "", &token).await;
        assert_eq!(error_of(&body), "invalid_grant");
    }
    assert!(sim.revoke("", "nobody@X").is_err());
}

#[tokio::test]
async fn secrets_expire_are_replaced_and_clients_deactivate() {
    let (sim, clock) = start().await;
    let expires = t0() + chrono::TimeDelta::days(1);
    sim.add_client("", CLIENT, SECRET, Some(expires));
    let token = sim.issue_grant("", CLIENT, t0()).unwrap();

    let (_, body) = post(
        &sim.token_url(""),
        &[
            ("grant_type", "refresh_token"),
            ("client_id", CLIENT),
            ("client_secret", "wrong"),
            ("refresh_token", &token),
        ],
    )
    .await;
    assert_eq!(error_of(&body), "invalid_client");

    clock.set(expires);
    let (status, body) = refresh(&sim, "", &token).await;
    assert_eq!(
        (status, error_of(&body)),
        (StatusCode::BAD_REQUEST, "invalid_client")
    );
    assert!(
        sim.refresh_token_alive("", &token),
        "a refused client consumes nothing"
    );

    sim.replace_secret("", CLIENT, "new-secret", None).unwrap();
    let (_, body) = refresh(&sim, "", &token).await;
    assert_eq!(
        error_of(&body),
        "invalid_client",
        "the old secret stopped working"
    );
    let (status, body) = post(
        &sim.token_url(""),
        &[
            ("grant_type", "refresh_token"),
            ("client_id", CLIENT),
            ("client_secret", "new-secret"),
            ("refresh_token", &token),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let token = new_refresh_token(&body);

    sim.replace_secret("", CLIENT, SECRET, None).unwrap();
    sim.set_client_active("", CLIENT, false).unwrap();
    let (_, body) = refresh(&sim, "", &token).await;
    assert_eq!(error_of(&body), "invalid_client");
    sim.set_client_active("", CLIENT, true).unwrap();
    let (status, _) = refresh(&sim, "", &token).await;
    assert_eq!(status, StatusCode::OK);

    assert!(sim.replace_secret("", "nobody@X", "x", None).is_err());
    assert!(sim.set_client_active("", "nobody@X", true).is_err());
}

#[tokio::test]
async fn basic_authentication_is_refused_and_recorded() {
    let (sim, _clock) = start().await;
    sim.add_client("", CLIENT, SECRET, None);
    let token = sim.issue_grant("", CLIENT, t0()).unwrap();
    let r = http()
        .post(sim.token_url(""))
        .basic_auth(CLIENT, Some(SECRET))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", &token)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: Value = r.json().await.unwrap();
    assert_eq!(error_of(&body), "invalid_client");
    assert!(sim.requests("")[0].basic_auth);
    assert!(sim.refresh_token_alive("", &token));

    // A JSON body is not a form.
    let r = http()
        .post(sim.token_url(""))
        .json(&serde_json::json!({"grant_type": "refresh_token"}))
        .send()
        .await
        .unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(error_of(&body), "invalid_request");
}

#[tokio::test]
async fn response_shape_options() {
    let (sim, _clock) = start().await;
    sim.add_client("", CLIENT, SECRET, None);
    let token = sim.issue_grant("", CLIENT, t0()).unwrap();
    sim.set_expires_in_as_string("", true);
    sim.set_rotate("", false);
    let (status, body) = refresh(&sim, "", &token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["expires_in"], "3600");
    assert!(body.get("refresh_token").is_none());
    let (status, _) = refresh(&sim, "", &token).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "without rotation the token stays valid"
    );
    assert_eq!(sim.total_replays(), 0);

    sim.set_expires_in("", 60);
    sim.set_expires_in_as_string("", false);
    let (_, body) = refresh(&sim, "", &token).await;
    assert_eq!(body["expires_in"], 60);
}

struct Pkce {
    verifier: String,
    challenge: String,
}

fn pkce(seed: char) -> Pkce {
    let verifier: String = std::iter::repeat_n(seed, 50).collect();
    let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    Pkce {
        verifier,
        challenge,
    }
}

const REDIRECT: &str = "https://connector.example.com/settings/acumaticacallback";

async fn authorize(
    sim: &Simulator,
    site: &str,
    client: &str,
    scope: &str,
    state: &str,
    p: &Pkce,
) -> reqwest::Response {
    http()
        .get(sim.authorize_url(site))
        .query(&[
            ("response_type", "code"),
            ("client_id", client),
            ("redirect_uri", REDIRECT),
            ("scope", scope),
            ("state", state),
            ("code_challenge", &p.challenge),
            ("code_challenge_method", "S256"),
        ])
        .send()
        .await
        .unwrap()
}

/// Follows the simulated approval and returns the query of the redirect.
async fn approve(sim: &Simulator, scope: &str, state: &str, p: &Pkce) -> Vec<(String, String)> {
    let r = authorize(sim, "", CLIENT, scope, state, p).await;
    assert_eq!(r.status(), StatusCode::FOUND);
    let location = r.headers()["location"].to_str().unwrap();
    let url = url::Url::parse(location).unwrap();
    assert!(location.starts_with(REDIRECT), "{location}");
    url.query_pairs().into_owned().collect()
}

fn param<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

async fn exchange(
    sim: &Simulator,
    code: &str,
    redirect: &str,
    verifier: &str,
) -> (StatusCode, Value) {
    post(
        &sim.token_url(""),
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect),
            ("code_verifier", verifier),
            ("client_id", CLIENT),
            ("client_secret", SECRET),
        ],
    )
    .await
}

#[tokio::test]
async fn authorization_code_with_pkce() {
    let (sim, clock) = start().await;
    sim.add_client("", CLIENT, SECRET, None);
    let p = pkce('a');
    let state = "st&te=1 +/?%é";
    let q = approve(&sim, "api offline_access openid", state, &p).await;
    assert_eq!(param(&q, "state"), Some(state), "state comes back exactly");
    let code = param(&q, "code").unwrap().to_string();

    clock.advance(chrono::TimeDelta::minutes(1));
    let (status, body) = exchange(&sim, &code, REDIRECT, &p.verifier).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["id_token"].is_string(), "openid was requested");
    assert_eq!(body["scope"], "api offline_access openid");
    let token = new_refresh_token(&body);
    assert_eq!(sim.current_refresh_token("", CLIENT), Some(token.clone()));
    assert!(sim.grant_alive("", &token));

    // The grant was issued at the exchange: absolute 30 days from then.
    clock.advance(chrono::TimeDelta::days(30) - chrono::TimeDelta::seconds(1));
    assert!(sim.grant_alive("", &token));
    clock.set(t0() + chrono::TimeDelta::minutes(1));

    // A code used twice is refused and kills the grant it made.
    let (_, body) = exchange(&sim, &code, REDIRECT, &p.verifier).await;
    assert_eq!(error_of(&body), "invalid_grant");
    assert!(!sim.grant_alive("", &token));

    // A wrong verifier is refused and consumes the code.
    let q = approve(&sim, "api offline_access", "s2", &p).await;
    let code = param(&q, "code").unwrap().to_string();
    let (_, body) = exchange(&sim, &code, REDIRECT, &pkce('b').verifier).await;
    assert_eq!(error_of(&body), "invalid_grant");
    let (_, body) = exchange(&sim, &code, REDIRECT, &p.verifier).await;
    assert_eq!(error_of(&body), "invalid_grant");

    // A different redirect URI is refused.
    let q = approve(&sim, "api offline_access", "s3", &p).await;
    let code = param(&q, "code").unwrap().to_string();
    let (_, body) = exchange(&sim, &code, "https://evil.example.com/cb", &p.verifier).await;
    assert_eq!(error_of(&body), "invalid_grant");

    // Codes die after five minutes.
    let q = approve(&sim, "api offline_access", "s4", &p).await;
    let code = param(&q, "code").unwrap().to_string();
    clock.advance(chrono::TimeDelta::minutes(5));
    let (_, body) = exchange(&sim, &code, REDIRECT, &p.verifier).await;
    assert_eq!(error_of(&body), "invalid_grant");

    // Without offline_access there is no refresh token and no grant.
    let q = approve(&sim, "api", "s5", &p).await;
    let code = param(&q, "code").unwrap().to_string();
    let (status, body) = exchange(&sim, &code, REDIRECT, &p.verifier).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.get("refresh_token").is_none());
    assert_eq!(sim.authorize_requests(""), 5);
}

#[tokio::test]
async fn authorize_refuses_what_it_cannot_trust() {
    let (sim, _clock) = start().await;
    sim.add_client("", CLIENT, SECRET, None);
    let p = pkce('a');
    let r = authorize(&sim, "", "unknown@Tenant", "api offline_access", "s", &p).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.headers().get("location").is_none());

    // Once redirect URIs are registered, others get an error page, not a redirect.
    sim.add_redirect_uri("", CLIENT, "https://other.example.com/cb")
        .unwrap();
    let r = authorize(&sim, "", CLIENT, "api offline_access", "s", &p).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    sim.add_redirect_uri("", CLIENT, REDIRECT).unwrap();
    assert!(sim.add_redirect_uri("", CLIENT, "not a url").is_err());

    // An unknown scope is reported to the (trusted) redirect URI.
    let r = authorize(&sim, "", CLIENT, "api bogus", "s", &p).await;
    assert_eq!(r.status(), StatusCode::FOUND);
    let url = url::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
    let q: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    assert_eq!(param(&q, "error"), Some("invalid_scope"));
    assert_eq!(param(&q, "code"), None);
}

async fn fault_answer(sim: &Simulator, fault: Fault) -> reqwest::Response {
    sim.inject("", fault, Some(1));
    http()
        .post(sim.token_url(""))
        .form(&[("grant_type", "refresh_token"), ("client_id", CLIENT)])
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn faults_answer_as_an_unwell_instance_would() {
    let (sim, _clock) = start().await;
    sim.add_client("", CLIENT, SECRET, None);

    let r = fault_answer(
        &sim,
        Fault::Status {
            code: 429,
            retry_after: Some(7),
            body: String::new(),
        },
    )
    .await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["retry-after"], "7");

    let r = fault_answer(
        &sim,
        Fault::Status {
            code: 500,
            retry_after: None,
            body: r#"{"message":"An error has occurred."}"#.into(),
        },
    )
    .await;
    assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    assert_eq!(
        r.json::<Value>().await.unwrap()["message"],
        "An error has occurred."
    );

    let r = fault_answer(&sim, Fault::Html503).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );

    let r = fault_answer(&sim, Fault::Empty502).await;
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    assert!(r.bytes().await.unwrap().is_empty());

    let r = fault_answer(&sim, Fault::ApiLoginLimit).await;
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.text().await.unwrap().contains("API Login Limit"));

    let r = fault_answer(&sim, Fault::RedirectToErrorAspx).await;
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(r.headers()["location"], "/Frames/Error.aspx");

    let r = fault_answer(&sim, Fault::Garbage200).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(serde_json::from_str::<Value>(&r.text().await.unwrap()).is_err());

    let recorded = sim.requests("");
    let faults: Vec<_> = recorded.iter().map(|r| r.fault.unwrap_or("-")).collect();
    assert_eq!(
        faults,
        [
            "status",
            "status",
            "html503",
            "empty502",
            "api_login_limit",
            "redirect_to_error_aspx",
            "garbage200"
        ]
    );
    assert_eq!(recorded[0].status, 429);

    // Faults are used up: the next request is handled for real.
    let token = sim.issue_grant("", CLIENT, t0()).unwrap();
    let (status, _) = refresh(&sim, "", &token).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn faults_never_consume_a_token_and_last_until_cleared() {
    let (sim, _clock) = start().await;
    sim.add_client("", CLIENT, SECRET, None);
    let token = sim.issue_grant("", CLIENT, t0()).unwrap();
    sim.inject("", Fault::Html503, None);
    for _ in 0..3 {
        let (status, _) = refresh(&sim, "", &token).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert!(sim.refresh_token_alive("", &token));
    sim.clear_faults("");
    let (status, _) = refresh(&sim, "", &token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sim.token_requests(""), 4);
}

#[tokio::test]
async fn delay_answers_normally_afterwards() {
    let (sim, _clock) = start().await;
    sim.add_client("", CLIENT, SECRET, None);
    let token = sim.issue_grant("", CLIENT, t0()).unwrap();
    sim.inject("", Fault::Delay(Duration::from_millis(50)), Some(1));
    sim.set_latency("", Duration::from_millis(10));
    let (status, body) = refresh(&sim, "", &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let r = &sim.requests("")[0];
    assert_eq!((r.fault, r.status), (Some("delay"), 200));
}

#[tokio::test]
async fn hang_never_answers_until_shutdown() {
    let (sim, _clock) = start().await;
    sim.inject("", Fault::Hang, Some(1));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = client
        .post(sim.token_url(""))
        .form(&[("grant_type", "refresh_token")])
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert_eq!(sim.token_requests(""), 1);
    let r = &sim.requests("")[0];
    assert_eq!((r.fault, r.status), (Some("hang"), 0));
    // The client gave up and closed the connection: the request is no longer in flight.
    eventually("the abandoned request to end", || sim.in_flight("") == 0).await;
}

#[tokio::test]
async fn drip_sends_one_byte_at_a_time() {
    let (sim, _clock) = start().await;
    let mut r = fault_answer(&sim, Fault::Drip).await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut got = Vec::new();
    while got.len() < 2 {
        let chunk = r.chunk().await.unwrap().expect("the drip goes on");
        assert_eq!(chunk.len(), 1, "one byte per write");
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, b"{\"");
}

#[tokio::test]
async fn huge_streams_a_hundred_megabytes() {
    let (sim, _clock) = start().await;
    let mut r = fault_answer(&sim, Fault::Huge).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.content_length(), None, "no length announced up front");
    let mut total = 0u64;
    while let Some(chunk) = r.chunk().await.unwrap() {
        total += chunk.len() as u64;
    }
    assert_eq!(total, HUGE_LEN);
}

#[tokio::test]
async fn concurrency_is_counted_per_site() {
    let (sim, _clock) = start().await;
    sim.inject("", Fault::Hang, Some(3));
    sim.inject("AcumaticaERP", Fault::Hang, Some(2));
    let mut tasks = Vec::new();
    for site in ["", "", "", "AcumaticaERP", "AcumaticaERP"] {
        let url = sim.token_url(site);
        tasks.push(tokio::spawn(async move {
            http()
                .post(url)
                .form(&[("grant_type", "refresh_token")])
                .send()
                .await
        }));
    }
    eventually("five requests in flight", || {
        sim.in_flight("") == 3 && sim.in_flight("AcumaticaERP") == 2
    })
    .await;
    assert_eq!(sim.max_concurrency(""), 3);
    assert_eq!(sim.max_concurrency("AcumaticaERP"), 2);
    assert_eq!(sim.max_concurrency_all(), 5);

    sim.shutdown().await;
    for t in tasks {
        // Stopping ends the hanging answers instead of leaving the clients waiting.
        let r = t.await.unwrap();
        assert!(r.is_err() || r.unwrap().status() == StatusCode::SERVICE_UNAVAILABLE);
    }
}

#[tokio::test]
async fn virtual_directories_are_separate_sites() {
    let (sim, _clock) = start().await;
    assert_eq!(sim.instance(""), sim.addr().to_string());
    assert_eq!(
        sim.instance("AcumaticaERP"),
        format!("{}/AcumaticaERP", sim.addr())
    );

    sim.add_client("AcumaticaERP", CLIENT, SECRET, None);
    sim.add_client("Sandbox", CLIENT, "other-secret", None);
    let token = sim.issue_grant("AcumaticaERP", CLIENT, t0()).unwrap();

    // The same client at the root or another directory is a different client.
    let (_, body) = refresh(&sim, "", &token).await;
    assert_eq!(error_of(&body), "invalid_client");
    let (_, body) = refresh(&sim, "Sandbox", &token).await;
    assert_eq!(error_of(&body), "invalid_client");
    let (status, body) = refresh(&sim, "AcumaticaERP", &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(sim.token_requests("AcumaticaERP"), 1);
    assert_eq!(sim.token_requests("Sandbox"), 1);
    assert_eq!(sim.total_token_requests(), 3);

    // IIS matches virtual directories without regard to case.
    let token = new_refresh_token(&body);
    let url = format!("http://{}/acumaticaerp/identity/connect/token", sim.addr());
    let (status, _) = post(
        &url,
        &[
            ("grant_type", "refresh_token"),
            ("client_id", CLIENT),
            ("client_secret", SECRET),
            ("refresh_token", &token),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    let r = http()
        .post(sim.token_url("Nowhere"))
        .form(&[("grant_type", "refresh_token")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    let doc: Value = http()
        .get(format!(
            "{}/identity/.well-known/openid-configuration",
            sim.base_url("AcumaticaERP")
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["token_endpoint"], sim.token_url("AcumaticaERP"));
    assert_eq!(
        doc["authorization_endpoint"],
        sim.authorize_url("AcumaticaERP")
    );
    let root: Value = http()
        .get(format!(
            "{}/identity/.well-known/openid-configuration",
            sim.base_url("")
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(root["token_endpoint"], sim.token_url(""));
}

#[tokio::test]
async fn many_sites_many_requests() {
    let (sim, _clock) = start().await;
    let sim = Arc::new(sim);
    let mut tokens = Vec::new();
    for i in 0..200 {
        let site = format!("site{i}");
        for c in 0..5 {
            let client = format!("{c:08X}-0000-0000-0000-000000000000@Tenant {i}");
            sim.add_client(&site, &client, SECRET, None);
            tokens.push((
                site.clone(),
                client.clone(),
                sim.issue_grant(&site, &client, t0()).unwrap(),
            ));
        }
    }
    let http = http();
    let mut tasks = Vec::new();
    for (site, client, token) in tokens {
        let url = sim.token_url(&site);
        let http = http.clone();
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .form(&[
                    ("grant_type", "refresh_token"),
                    ("client_id", &client),
                    ("client_secret", SECRET),
                    ("refresh_token", &token),
                ])
                .send()
                .await
                .unwrap();
            r.status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(sim.total_token_requests(), 1000);
    assert_eq!(sim.total_replays(), 0);
    assert!(sim.max_concurrency_all() >= 1);
}

async fn refused(addr: std::net::SocketAddr) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_err()
}

#[tokio::test]
async fn shutdown_and_drop_stop_the_server() {
    let (sim, _clock) = start().await;
    let addr = sim.addr();
    assert!(!refused(addr).await);
    sim.shutdown().await;
    assert!(refused(addr).await);

    let (sim, _clock) = start().await;
    let addr = sim.addr();
    drop(sim);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !refused(addr).await {
        assert!(Instant::now() < deadline, "the port stayed open after drop");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
