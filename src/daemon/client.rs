//! The CLI's side of the local API: HTTP/1.1 over the daemon's Unix socket.

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// An answer from the daemon.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub body: Vec<u8>,
}

/// Why the daemon could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket is missing or nobody listens: the daemon is not running there.
    #[error("cannot reach the daemon at {path}: {error}")]
    Connect { path: String, error: std::io::Error },
    /// The daemon did not answer in time.
    #[error("the daemon at {0} did not answer in time")]
    Timeout(String),
    /// The connection broke mid-answer.
    #[error("the daemon's answer was cut off: {0}")]
    Http(String),
}

/// Sends one request and reads the whole answer (bounded by `timeout`).
pub async fn call(
    socket: &Path,
    method: &str,
    path: &str,
    timeout: Duration,
) -> Result<Answer, ClientError> {
    call_with_body(socket, method, path, None, timeout).await
}

/// [`call`] with a JSON body.
pub async fn call_with_body(
    socket: &Path,
    method: &str,
    path: &str,
    json: Option<&[u8]>,
    timeout: Duration,
) -> Result<Answer, ClientError> {
    let sock = socket.display().to_string();
    let fut = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|error| ClientError::Connect {
                path: sock.clone(),
                error,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "acutoken");
        if json.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::copy_from_slice(json.unwrap_or_default())))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes()
            .to_vec();
        Ok(Answer {
            status,
            retry_after,
            body,
        })
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ClientError::Timeout(sock.clone()))?
}
