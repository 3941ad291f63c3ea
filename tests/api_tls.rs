//! Applications on other machines reach the API (issue 14, item 4):
//! `api.listen` on a non-loopback address speaks TLS (rustls) and needs a
//! bearer token; the certificate and key are re-read on SIGHUP without the
//! listener stopping, a pair that does not load keeps the old one; the
//! handshake is bounded like a request head. Run against the real daemon,
//! with certificates made by rcgen and reqwest (rustls) as the client.

mod support_daemon;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use acutoken::daemon::listen::MAX_CONNECTIONS;
use nix::sys::signal::Signal;
use support_daemon::{Daemon, Opts, Rig, SITE, WAIT, free_port};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const TOKEN: &str = "t0ken-for-tls-tests";

/// A generous bound on the server closing a stalled handshake (the header
/// timeout is 10 s); it only keeps a broken build from hanging the test.
const CLOSE_BOUND: Duration = Duration::from_secs(60);

/// A self-signed certificate for `localhost` and 127.0.0.1: its PEM, its
/// key's PEM, its DER.
struct Cert {
    pem: String,
    key_pem: String,
    der: Vec<u8>,
}

fn new_cert() -> Cert {
    let c =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    Cert {
        pem: c.cert.pem(),
        key_pem: c.signing_key.serialize_pem(),
        der: c.cert.der().to_vec(),
    }
}

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A daemon whose `api.listen` is `0.0.0.0:PORT` with TLS from `cert`.
struct Tls {
    rig: Rig,
    port: u16,
}

impl Tls {
    async fn new(cert: &Cert) -> Tls {
        let rig = Rig::new().await;
        rig.add("acme", SITE, true).await;
        let port = free_port();
        let (cert_file, key_file, tokens) = (
            rig.path("api.crt"),
            rig.path("api.key"),
            rig.path("api.tokens"),
        );
        write_private(&tokens, &format!("{TOKEN}\n"));
        write_private(&cert_file, &cert.pem);
        write_private(&key_file, &cert.key_pem);
        let text = rig.config_text(&Opts::default()).replace(
            "[api]\n",
            &format!(
                "[api]\nlisten = \"0.0.0.0:{port}\"\ntoken_file = \"{}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
                tokens.display(),
                cert_file.display(),
                key_file.display()
            ),
        );
        assert!(text.contains("tls_key_file"), "{text}");
        std::fs::write(rig.config_path(), text).unwrap();
        Tls { rig, port }
    }

    async fn serve(&self) -> Daemon {
        let mut d = self.rig.serve(None);
        d.ready().await;
        d
    }

    /// Replaces the certificate and key files (the config stays).
    fn install(&self, cert: &str, key: &str) {
        write_private(&self.rig.path("api.crt"), cert);
        write_private(&self.rig.path("api.key"), key);
    }

    /// `GET path` on a new connection over TLS, trusting `roots`, with the
    /// bearer token when `token`: the status and the certificate served.
    async fn get(&self, roots: &[&Cert], path: &str, token: bool) -> (u16, Vec<u8>) {
        let mut b = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .tls_info(true)
            .pool_max_idle_per_host(0)
            .resolve("localhost", ([127, 0, 0, 1], self.port).into())
            .timeout(WAIT);
        for c in roots {
            b = b.add_root_certificate(reqwest::Certificate::from_pem(c.pem.as_bytes()).unwrap());
        }
        let client = b.build().unwrap();
        let mut req = client.get(format!("https://localhost:{}{path}", self.port));
        if token {
            req = req.bearer_auth(TOKEN);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path} over TLS: {e:?}"));
        let der = resp
            .extensions()
            .get::<reqwest::tls::TlsInfo>()
            .and_then(|i| i.peer_certificate())
            .expect("no peer certificate")
            .to_vec();
        (resp.status().as_u16(), der)
    }
}

/// Reads until the server closes `s` (EOF or reset) or `bound` passes:
/// what it sent, and whether it closed.
async fn read_until_closed(s: &mut TcpStream, bound: Duration) -> (Vec<u8>, bool) {
    let deadline = tokio::time::Instant::now() + bound;
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (out, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_api_listen_speaks_tls_and_needs_the_bearer_token() {
    let cert = new_cert();
    let t = Tls::new(&cert).await;
    let _d = t.serve().await;

    let (status, der) = t.get(&[&cert], "/v1/status", true).await;
    assert_eq!(status, 200, "/v1/status with the token over TLS");
    assert_eq!(der, cert.der, "the configured certificate was not served");
    let (status, _) = t.get(&[&cert], "/v1/status", false).await;
    assert_eq!(status, 401, "/v1/status without a token over TLS");
    let (status, _) = t.get(&[&cert], "/healthz", false).await;
    assert_eq!(status, 200, "/healthz without a token over TLS");

    // Plain HTTP to the TLS port gets no HTTP answer.
    let mut s = TcpStream::connect(("127.0.0.1", t.port)).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (answer, closed) = read_until_closed(&mut s, WAIT).await;
    assert!(closed, "plain HTTP on the TLS port was not closed");
    assert!(
        !String::from_utf8_lossy(&answer).contains("HTTP/"),
        "plain HTTP on the TLS port got an HTTP answer: {:?}",
        String::from_utf8_lossy(&answer)
    );
}

/// Sends SIGHUP and waits for the `n`th line with `needle` in the logs.
async fn hangup_until(d: &mut Daemon, needle: &str, n: usize) {
    d.signal(Signal::SIGHUP);
    let deadline = Instant::now() + WAIT;
    while d.logs().matches(needle).count() < n {
        assert!(
            Instant::now() < deadline,
            "no `{needle}` after SIGHUP; the output:\n{}",
            d.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_serves_the_new_certificate_and_keeps_the_old_one_when_the_new_files_do_not_load() {
    let (first, second) = (new_cert(), new_cert());
    let t = Tls::new(&first).await;
    let mut d = t.serve().await;
    let both = [&first, &second];
    assert_eq!(t.get(&both, "/healthz", false).await.1, first.der);

    // New files, SIGHUP: new connections get the new certificate.
    t.install(&second.pem, &second.key_pem);
    hangup_until(&mut d, "configuration reloaded", 1).await;
    let (status, der) = t.get(&both, "/v1/status", true).await;
    assert_eq!(status, 200);
    assert_eq!(
        der, second.der,
        "a new connection after the reload was not served the new certificate"
    );
    // The same listener served it: it was started once and never again.
    assert_eq!(
        d.logs().matches("API listening with TLS").count(),
        1,
        "{}",
        d.logs()
    );

    // A broken key (half of a real one) and a key that belongs to another
    // certificate: each reload is refused, the error says which file, and
    // the certificate in force stays.
    let third = new_cert();
    let half = &third.key_pem[..third.key_pem.len() / 2];
    t.install(&third.pem, half);
    hangup_until(&mut d, "reload refused", 1).await;
    let refusal = d.log_line("error: reload refused").await;
    assert!(
        refusal.contains("`api.tls_key_file`") && refusal.contains("api.key"),
        "the refusal does not name the key file: {refusal}"
    );
    let (status, der) = t.get(&[&first, &second, &third], "/v1/status", true).await;
    assert_eq!(status, 200);
    assert_eq!(
        der, second.der,
        "a broken key file replaced the certificate"
    );

    t.install(&third.pem, &first.key_pem);
    hangup_until(&mut d, "error: reload refused", 2).await;
    assert!(
        d.logs().contains("is not the key of the certificate"),
        "a key of another certificate was not named as such:\n{}",
        d.logs()
    );
    let (_, der) = t.get(&[&first, &second, &third], "/healthz", false).await;
    assert_eq!(der, second.der, "a mismatched key replaced the certificate");

    // Key material never reaches the logs.
    let logs = d.logs();
    for c in [&first, &second, &third] {
        for line in c.key_pem.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!logs.contains(line), "a key line reached the logs:\n{logs}");
        }
    }

    // Good files again: in force on the next reload.
    t.install(&third.pem, &third.key_pem);
    hangup_until(&mut d, "configuration reloaded", 2).await;
    let (_, der) = t.get(&[&first, &second, &third], "/healthz", false).await;
    assert_eq!(der, third.der);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_no_tls_bytes_holds_nobody_up_and_is_closed() {
    let cert = new_cert();
    let t = Tls::new(&cert).await;
    let _d = t.serve().await;

    let mut silent = Vec::new();
    for _ in 0..16 {
        silent.push(TcpStream::connect(("127.0.0.1", t.port)).await.unwrap());
    }
    // Another client is served while they say nothing.
    let (status, _) = t.get(&[&cert], "/v1/status", true).await;
    assert_eq!(status, 200, "a client was not served beside silent ones");

    // The silent ones are closed by the handshake bound.
    for mut s in silent {
        let (_, closed) = read_until_closed(&mut s, CLOSE_BOUND).await;
        assert!(
            closed,
            "a connection that sent no TLS bytes was still open after {CLOSE_BOUND:?}"
        );
    }
    let (status, _) = t.get(&[&cert], "/healthz", false).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_in_their_handshake_count_against_the_connection_cap() {
    let cert = new_cert();
    let t = Tls::new(&cert).await;
    let mut d = t.serve().await;

    let mut flood = Vec::with_capacity(MAX_CONNECTIONS);
    for _ in 0..MAX_CONNECTIONS {
        flood.push(TcpStream::connect(("127.0.0.1", t.port)).await.unwrap());
    }
    // One more is closed at once, before any handshake (connections are
    // accepted in the order they were made).
    let mut over = TcpStream::connect(("127.0.0.1", t.port)).await.unwrap();
    let (answer, closed) = read_until_closed(&mut over, WAIT).await;
    assert!(
        closed && answer.is_empty(),
        "a connection over the cap of {MAX_CONNECTIONS} was not closed at once"
    );
    // The daemon's log is read as it comes: wait for the line, bounded.
    d.log_line("too many open connections").await;
    drop(flood);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut b = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .resolve("localhost", ([127, 0, 0, 1], t.port).into())
            .timeout(Duration::from_secs(5));
        b = b.add_root_certificate(reqwest::Certificate::from_pem(cert.pem.as_bytes()).unwrap());
        let r = b
            .build()
            .unwrap()
            .get(format!("https://localhost:{}/healthz", t.port))
            .send()
            .await;
        if r.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the API did not answer again after the flood went away"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_certificate_file_stops_the_start_with_one_error_line() {
    let cert = new_cert();
    let t = Tls::new(&cert).await;
    std::fs::remove_file(t.rig.path("api.crt")).unwrap();
    let mut d = t.rig.serve(None);
    let status = d.exit().await;
    assert!(!status.success(), "started without its certificate");
    let logs = d.logs();
    let errors: Vec<&str> = logs.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "not one error line:\n{logs}");
    assert!(
        errors[0].contains("`api.tls_cert_file`") && errors[0].contains("api.crt"),
        "the error does not name the key and the file: {}",
        errors[0]
    );
}
