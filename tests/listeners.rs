//! The HTTP listeners are bounded (issue 12, item 8): a client that sends
//! half a request line and stalls is closed after the header timeout and
//! keeps nobody else from being answered; connections over the cap are closed
//! at once, and the service is back when they go away. Run against the real
//! daemon's callback listener, the one that faces the internet.

mod support_daemon;

use std::time::{Duration, Instant};

use acutoken::daemon::listen::{HEADER_READ_TIMEOUT, MAX_CONNECTIONS};
use support_daemon::{Rig, SITE, WAIT};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// A generous bound on the server closing a stalled connection: six times
/// the header timeout. It only keeps a broken build from hanging the test.
const CLOSE_BOUND: Duration = Duration::from_secs(60);

/// Sends one complete request for `path` on a new connection and returns what
/// came back (empty when the server closed without answering).
async fn request(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    // A connection closed at once may refuse the write: that is an empty answer.
    if s.write_all(req.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut out = Vec::new();
    match tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await {
        Ok(_) => String::from_utf8_lossy(&out).into_owned(),
        Err(_) => panic!("no answer and no close for {path} within {WAIT:?}"),
    }
}

/// Opens a connection that sends half a request line and stalls.
async fn stalled(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"GET /cb?sta").await.unwrap();
    s
}

/// Reads until the server closes `s` (EOF or reset); `None` if it is still
/// open after `bound`.
async fn closed_within(mut s: TcpStream, bound: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_clients_do_not_stop_the_callback_and_are_closed_after_the_header_timeout() {
    let rig = Rig::new().await;
    rig.add("acme", SITE, true).await;
    let mut d = rig.serve(None);
    d.ready().await;
    let port = rig.callback_port;

    let mut slow = Vec::new();
    for _ in 0..64 {
        slow.push(stalled(port).await);
    }
    // Another client is answered while they stall: the page for a link
    // without its code and state.
    let answer = request(port, "/cb").await;
    assert!(
        answer.starts_with("HTTP/1.1 400") && answer.contains("Not connected"),
        "the callback did not answer while slow clients stalled: {answer:?}"
    );

    // Each stalled connection is closed by the server.
    let mut waits = tokio::task::JoinSet::new();
    for s in slow {
        waits.spawn(closed_within(s, CLOSE_BOUND));
    }
    while let Some(r) = waits.join_next().await {
        r.unwrap().unwrap_or_else(|| {
            panic!(
                "a connection that sent half a request line was still open after {CLOSE_BOUND:?} (header timeout {HEADER_READ_TIMEOUT:?})"
            )
        });
    }
    // And the callback still answers.
    let answer = request(port, "/cb").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_at_once_and_the_service_recovers() {
    let rig = Rig::new().await;
    rig.add("acme", SITE, true).await;
    let mut d = rig.serve(None);
    d.ready().await;
    let port = rig.callback_port;

    // Fill the cap with connections that send nothing (each is held until
    // the header timeout)...
    let mut flood = Vec::with_capacity(MAX_CONNECTIONS);
    for _ in 0..MAX_CONNECTIONS {
        flood.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    // ...then one more, with a whole request, is closed without an answer
    // (connections are accepted in the order they were made).
    let answer = request(port, "/cb").await;
    assert_eq!(
        answer, "",
        "a connection over the cap of {MAX_CONNECTIONS} was served"
    );

    // The flood goes away: the callback answers again.
    drop(flood);
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = request(port, "/cb").await;
        if answer.starts_with("HTTP/1.1 400") && answer.contains("Not connected") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the callback did not answer again after the flood went away: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        d.logs().contains("too many open connections"),
        "the refusal was not logged:\n{}",
        d.logs()
    );
}
