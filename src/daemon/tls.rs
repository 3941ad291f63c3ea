//! TLS on `api.listen` (DESIGN §7): rustls with the ring provider (the one
//! reqwest already brings), TLS 1.2 and 1.3, no client certificates; the
//! bearer token is the client's credential.
//!
//! The certificate and key are read at start (a file that does not load
//! stops the start naming its key and path) and again on SIGHUP: the listener
//! keeps running and new handshakes get the new certificate, while
//! connections already open keep theirs. A reload whose files do not load is
//! refused with the rest of the configuration and the old certificate stays.
//!
//! Only `api.tls_key_file` must be private (checked with the other `*_file`
//! keys when the config loads): the certificate chain is public, every client
//! receives it.

use std::io;
use std::path::Path;
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use rustls_pki_types::pem::{self, PemObject as _};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::crypto::{CryptoProvider, ring};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ServerConfig, version};
use tokio_rustls::server::TlsStream;
use zeroize::Zeroizing;

use crate::config::Config;
use crate::daemon::listen::Handshake;

const CERT_KEY: &str = "api.tls_cert_file";
const KEY_KEY: &str = "api.tls_key_file";

/// The certificate files a config names, when `api.listen` is set and both
/// TLS keys are (validation refuses one without the other).
pub fn files(config: &Config) -> Option<(&Path, &Path)> {
    config.api.listen?;
    Some((
        config.api.tls_cert_file.as_deref()?,
        config.api.tls_key_file.as_deref()?,
    ))
}

/// Reads the certificate chain and its private key, and checks they belong
/// together. Errors are one line naming the key and the file; they never
/// hold the files' contents.
pub fn load(cert: &Path, key: &Path) -> anyhow::Result<Arc<CertifiedKey>> {
    let cert_pem = std::fs::read(cert)
        .with_context(|| format!("`{CERT_KEY}`: cannot read {}", cert.display()))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            anyhow::anyhow!(
                "`{CERT_KEY}`: {} is not a PEM certificate chain ({})",
                cert.display(),
                pem_error(&e)
            )
        })?;
    if chain.is_empty() {
        anyhow::bail!(
            "`{CERT_KEY}`: {} holds no certificate (expected PEM `BEGIN CERTIFICATE` blocks)",
            cert.display()
        );
    }
    let key_pem = Zeroizing::new(
        std::fs::read(key)
            .with_context(|| format!("`{KEY_KEY}`: cannot read {}", key.display()))?,
    );
    let der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        anyhow::anyhow!(
            "`{KEY_KEY}`: {} is not a PEM private key ({})",
            key.display(),
            pem_error(&e)
        )
    })?;
    match CertifiedKey::from_der(chain, der, &provider()) {
        Ok(k) => Ok(Arc::new(k)),
        Err(rustls::Error::InconsistentKeys(_)) => anyhow::bail!(
            "`{KEY_KEY}`: {} is not the key of the certificate in {}",
            key.display(),
            cert.display()
        ),
        Err(e) => anyhow::bail!("`{KEY_KEY}`: {} cannot be used: {e}", key.display()),
    }
}

/// What went wrong in a PEM file, without echoing any of it (the
/// parser's own messages can quote a line or base64 of the key).
fn pem_error(e: &pem::Error) -> &'static str {
    match e {
        pem::Error::NoItemsFound => "no PEM block of that kind found",
        pem::Error::Io(_) => "unreadable",
        _ => "malformed PEM",
    }
}

/// Only the ring provider: the one reqwest already links (no aws-lc-rs).
fn provider() -> CryptoProvider {
    ring::default_provider()
}

/// The certificate served to new handshakes, swapped on SIGHUP.
#[derive(Debug)]
pub struct Certificate {
    current: RwLock<Arc<CertifiedKey>>,
}

impl Certificate {
    /// Loads the files a config names; `None` when it asks for no TLS.
    pub fn from_config(config: &Config) -> anyhow::Result<Option<Arc<Certificate>>> {
        let Some((cert, key)) = files(config) else {
            return Ok(None);
        };
        Ok(Some(Arc::new(Certificate {
            current: RwLock::new(load(cert, key)?),
        })))
    }

    /// Serves `key` to every handshake from now on.
    pub fn replace(&self, key: Arc<CertifiedKey>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = key;
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// The TLS handshake of `api.listen`, for [`crate::daemon::listen::serve`].
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
}

impl Tls {
    /// TLS 1.2 and 1.3 with the certificate `cert` serves, HTTP/1.1 only.
    pub fn new(cert: Arc<Certificate>) -> anyhow::Result<Tls> {
        let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
            .with_protocol_versions(&[&version::TLS13, &version::TLS12])
            .context("cannot set up TLS for api.listen")?
            .with_no_client_auth()
            .with_cert_resolver(cert);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }
}

impl Handshake<TcpStream> for Tls {
    type Io = TlsStream<TcpStream>;

    fn handshake(&self, io: TcpStream) -> impl Future<Output = io::Result<Self::Io>> + Send {
        self.acceptor.accept(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    /// Loads `cert` and `key` written to files; the error's text on failure.
    fn load_texts(cert: &str, key: &str) -> Result<(), String> {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("api.crt"), dir.path().join("api.key"));
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        load(&c, &k).map(|_| ()).map_err(|e| format!("{e:#}"))
    }

    #[test]
    fn a_matching_pair_loads() {
        let (cert, key) = pair();
        load_texts(&cert, &key).unwrap();
    }

    #[test]
    fn each_bad_file_is_named_by_its_key_without_its_contents() {
        let (cert, key) = pair();
        let (other_cert, other_key) = pair();
        let cases = [
            (
                String::new(),
                key.clone(),
                "`api.tls_cert_file`",
                "holds no certificate",
            ),
            (
                key.clone(),
                key.clone(),
                "`api.tls_cert_file`",
                "holds no certificate",
            ),
            (
                cert.clone(),
                cert.clone(),
                "`api.tls_key_file`",
                "no PEM block",
            ),
            (
                cert.clone(),
                key[..key.len() / 2].to_owned(),
                "`api.tls_key_file`",
                "malformed PEM",
            ),
            (
                other_cert,
                key.clone(),
                "`api.tls_key_file`",
                "is not the key of the certificate",
            ),
        ];
        for (c, k, named, what) in cases {
            let e = load_texts(&c, &k).unwrap_err();
            assert!(e.contains(named) && e.contains(what), "{e}");
            assert!(!e.contains('\n'), "not one line: {e}");
            for line in key
                .lines()
                .chain(other_key.lines())
                .filter(|l| !l.starts_with("-----"))
            {
                assert!(!e.contains(line), "the key reached the error: {e}");
            }
        }
    }
}
