//! `store.url`: where a PostgreSQL store lives (DESIGN §10), turned into the
//! plain values the store consumes: the URL its client parses, a name safe to
//! show, the TLS decision and the password.
//!
//! The URL is split here by hand rather than with the `url` crate: a
//! multi-host URL (`postgres://u@a:5432,b:5432/db`) is not a valid URL to
//! it, and rebuilding one would mangle it. Only the parameters acutoken
//! decides itself (`sslmode`, `sslrootcert`) are taken out; every other one
//! is passed on exactly as written. What the URL means (hosts, ports, user)
//! is read with the client's own parser, so the checks here see what the
//! store will connect to.

use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use tokio_postgres::config::Host;

use super::Config;
use super::env::{EnvLookup, first_dir};
use super::error::{ConfigError, invalid};
use super::files::{read_credential_file, read_secret_file};
use crate::secret::Secret;

/// The systemd credential (`LoadCredential=acutoken.pgpass:FILE`) holding the
/// password when `store.password_file` is not set.
pub const PASSWORD_CREDENTIAL: &str = "acutoken.pgpass";

const URL_KEY: &str = "store.url";
const PASSWORD_KEY: &str = "store.password_file";

/// Where the store lives.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreTarget {
    /// The SQLite file ([`Config::store_path`]).
    File(PathBuf),
    /// A PostgreSQL database (`store.url`).
    Postgres(PgTarget),
}

/// A PostgreSQL store, as `store.url`, `store.password_file` and the
/// credential describe it. Its `Debug` shows no password (a [`Secret`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PgTarget {
    /// The URL as given minus the parameters acutoken handles itself
    /// (sslmode, sslrootcert); never holds a password. Passed to
    /// tokio-postgres's `Config::from_str`. It ends with the client's own
    /// `sslmode` matching [`PgTarget::tls`] (`disable`, or `require` for
    /// [`PgTls::Verify`]), so a client configured from it alone can never
    /// fall back to plain text the way its default `prefer` would; the
    /// verification itself is the TLS connector's, built from `tls`.
    pub url: String,
    /// What to show in logs and `status`: `user@host[,host2]:port/db` (no
    /// password, no query). Each host carries its own port; a Unix socket
    /// shows as its directory.
    pub display: String,
    /// Whether and how the connection is encrypted.
    pub tls: PgTls,
    /// From store.password_file, else $CREDENTIALS_DIRECTORY/acutoken.pgpass
    /// when that file exists; None = no password (trust/peer auth).
    pub password: Option<Secret>,
}

/// TLS to PostgreSQL. acutoken never does unverified TLS: `require`,
/// `verify-ca` and `verify-full` all verify the server certificate, host
/// name included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgTls {
    /// Plain text: only to loopback addresses and Unix sockets.
    Disable,
    /// TLS, the server certificate verified against `root_cert` (PEM) when
    /// set, else the system/webpki roots.
    Verify {
        /// `sslrootcert=PATH`; `None` for no parameter or `sslrootcert=system`.
        root_cert: Option<PathBuf>,
    },
}

/// `store.url` taken apart and checked; no file read.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PgUrl {
    pub(super) url: String,
    pub(super) display: String,
    pub(super) tls: PgTls,
}

impl Config {
    /// Where the store lives: [`StoreTarget::File`] with
    /// [`Config::store_path`] when `store.url` is unset, else the PostgreSQL
    /// database with its password read now (from `store.password_file`,
    /// which must be private, else the systemd credential `acutoken.pgpass`),
    /// so a password changed on disk is picked up by the next call.
    pub fn store_target(&self) -> Result<StoreTarget, ConfigError> {
        self.store_target_in(&|name| std::env::var_os(name))
    }

    fn store_target_in(&self, env: EnvLookup<'_>) -> Result<StoreTarget, ConfigError> {
        let Some(raw) = &self.store.url else {
            return Ok(StoreTarget::File(self.store_path_in(env)));
        };
        let PgUrl { url, display, tls } = parse_store_url(raw)?;
        let password = match &self.store.password_file {
            Some(path) => Some(read_secret_file(path, PASSWORD_KEY)?),
            None => match first_dir(env("CREDENTIALS_DIRECTORY")) {
                Some(dir) if dir.join(PASSWORD_CREDENTIAL).exists() => Some(read_credential_file(
                    &dir.join(PASSWORD_CREDENTIAL),
                    "systemd credential acutoken.pgpass",
                )?),
                _ => None,
            },
        };
        Ok(StoreTarget::Postgres(PgTarget {
            url,
            display,
            tls,
            password,
        }))
    }
}

/// Takes `store.url` apart and checks it (DESIGN §10). Every message names
/// `store.url` and never quotes the URL: it may hold a password, which is
/// exactly what is refused here.
pub(super) fn parse_store_url(raw: &str) -> Result<PgUrl, ConfigError> {
    let raw = raw.trim();
    let (scheme, rest) = ["postgres://", "postgresql://"]
        .iter()
        .find_map(|p| raw.strip_prefix(p).map(|rest| (*p, rest)))
        .ok_or_else(|| {
            invalid(
                URL_KEY,
                "must start with postgres:// or postgresql:// (for example postgres://acutoken@db.example.com/acutoken)",
            )
        })?;
    // The client takes everything up to the first `@` as `user:password`;
    // look where it will look.
    if rest.find('@').is_some_and(|at| rest[..at].contains(':')) {
        return Err(holds_password());
    }
    let (base, query) = rest.split_once('?').unwrap_or((rest, ""));

    let mut kept = Vec::new();
    let mut sslmode = None;
    let mut sslrootcert = None;
    for piece in query.split('&').filter(|p| !p.is_empty()) {
        let Some((key, value)) = piece.split_once('=') else {
            return Err(invalid(
                URL_KEY,
                "a query parameter has no `=VALUE`; write `?name=value&name2=value2`",
            ));
        };
        match percent_decode(key)?.as_str() {
            "password" => return Err(holds_password()),
            "sslmode" => sslmode = Some(percent_decode(value)?),
            "sslrootcert" => sslrootcert = Some(percent_decode(value)?),
            _ => kept.push(piece),
        }
    }

    // Parsed without the two parameters the client does not know (or knows
    // differently: its `require` does not verify).
    let mut stripped = format!("{scheme}{base}");
    if !kept.is_empty() {
        stripped.push('?');
        stripped.push_str(&kept.join("&"));
    }
    let parsed = tokio_postgres::Config::from_str(&stripped).map_err(|e| {
        let why = std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string());
        invalid(
            URL_KEY,
            format!("is not a PostgreSQL URL the client accepts: {why}"),
        )
    })?;
    if parsed.get_password().is_some() {
        return Err(holds_password());
    }

    let hosts = parsed.get_hosts();
    let hostaddrs = parsed.get_hostaddrs();
    let ports = parsed.get_ports();
    if hosts.is_empty() && hostaddrs.is_empty() {
        return Err(invalid(
            URL_KEY,
            "names no host; write postgres://USER@HOST/DB (or ?host=/run/postgresql for a Unix socket)",
        ));
    }
    if !hosts.is_empty() && !hostaddrs.is_empty() && hosts.len() != hostaddrs.len() {
        return Err(invalid(
            URL_KEY,
            format!(
                "names {} hosts but {} hostaddrs; give one hostaddr per host or none",
                hosts.len(),
                hostaddrs.len()
            ),
        ));
    }
    let count = hosts.len().max(hostaddrs.len());
    if ports.len() > 1 && ports.len() != count {
        return Err(invalid(
            URL_KEY,
            format!(
                "names {count} hosts but {} ports; give one port per host, or one for all",
                ports.len()
            ),
        ));
    }

    let first_remote = first_remote(hosts, hostaddrs);
    let tls = match sslmode.as_deref() {
        None if first_remote.is_none() && sslrootcert.is_none() => PgTls::Disable,
        None | Some("require" | "verify-ca" | "verify-full") => PgTls::Verify {
            root_cert: sslrootcert.filter(|p| p != "system").map(PathBuf::from),
        },
        Some("disable") => {
            if let Some(host) = first_remote {
                return Err(invalid(
                    URL_KEY,
                    format!(
                        "sslmode=disable sends database traffic in clear to {host}; use sslmode=verify-full"
                    ),
                ));
            }
            if sslrootcert.is_some() {
                return Err(invalid(
                    URL_KEY,
                    "sslrootcert is set but sslmode=disable turns TLS off; remove one of them",
                ));
            }
            PgTls::Disable
        }
        Some(mode @ ("prefer" | "allow")) => {
            return Err(invalid(
                URL_KEY,
                format!(
                    "sslmode={mode} falls back to plain text; use sslmode=verify-full (or sslmode=disable for a loopback host or Unix socket)"
                ),
            ));
        }
        Some(_) => {
            return Err(invalid(
                URL_KEY,
                "sslmode must be one of disable, require, verify-ca, verify-full",
            ));
        }
    };
    if matches!(tls, PgTls::Verify { .. })
        && (hosts.is_empty() || hosts.iter().any(|h| matches!(h, Host::Unix(_))))
    {
        return Err(invalid(
            URL_KEY,
            "TLS needs a host name to verify the server certificate against: name each host (not only a hostaddr, not a Unix socket), or use sslmode=disable for a Unix socket",
        ));
    }

    // The client's own sslmode, matching the decision: never its default
    // `prefer`, which would fall back to plain text.
    let client_mode = match tls {
        PgTls::Disable => "sslmode=disable",
        PgTls::Verify { .. } => "sslmode=require",
    };
    let mut url = stripped;
    url.push(if kept.is_empty() { '?' } else { '&' });
    url.push_str(client_mode);

    Ok(PgUrl {
        url,
        display: display(&parsed),
        tls,
    })
}

fn holds_password() -> ConfigError {
    invalid(
        URL_KEY,
        "holds a password: put it in store.password_file or the systemd credential acutoken.pgpass",
    )
}

/// The first host (or hostaddr) that is neither loopback nor a Unix socket,
/// as written.
fn first_remote(hosts: &[Host], hostaddrs: &[IpAddr]) -> Option<String> {
    let remote_host = hosts.iter().find_map(|h| match h {
        Host::Tcp(name) if !is_loopback_name(name) => Some(name.clone()),
        _ => None,
    });
    remote_host.or_else(|| {
        hostaddrs
            .iter()
            .find(|a| !a.is_loopback())
            .map(ToString::to_string)
    })
}

fn is_loopback_name(name: &str) -> bool {
    name.eq_ignore_ascii_case("localhost")
        || name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `user@host:port[,host2:port2]/db`, from what the client parsed.
fn display(parsed: &tokio_postgres::Config) -> String {
    let ports = parsed.get_ports();
    let port = |i: usize| {
        ports
            .get(i)
            .or_else(|| ports.first())
            .copied()
            .unwrap_or(5432)
    };
    let hosts: Vec<String> = if parsed.get_hosts().is_empty() {
        parsed
            .get_hostaddrs()
            .iter()
            .enumerate()
            .map(|(i, a)| match a {
                IpAddr::V6(v6) => format!("[{v6}]:{}", port(i)),
                IpAddr::V4(v4) => format!("{v4}:{}", port(i)),
            })
            .collect()
    } else {
        parsed
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| match h {
                Host::Tcp(name) if name.contains(':') => format!("[{name}]:{}", port(i)),
                Host::Tcp(name) => format!("{name}:{}", port(i)),
                Host::Unix(dir) => dir.display().to_string(),
            })
            .collect()
    };
    let mut out = String::new();
    if let Some(user) = parsed.get_user() {
        out.push_str(user);
        out.push('@');
    }
    out.push_str(&hosts.join(","));
    if let Some(db) = parsed.get_dbname() {
        out.push('/');
        out.push_str(db);
    }
    out
}

/// Percent-decoding as the client does it: `%XX` becomes the byte, anything
/// else (a lone `%` included) stays, and the result must be UTF-8.
fn percent_decode(s: &str) -> Result<String, ConfigError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| {
        invalid(
            URL_KEY,
            "a query parameter is not UTF-8 once percent-decoded",
        )
    })
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::config::env::fake_env;

    fn ok(url: &str) -> PgUrl {
        parse_store_url(url).unwrap_or_else(|e| panic!("{url}\n=> {e}"))
    }

    fn err(url: &str) -> String {
        let e = parse_store_url(url).expect_err(url);
        let msg = e.to_string();
        assert!(msg.starts_with("`store.url`: "), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        msg
    }

    fn verify(root: Option<&str>) -> PgTls {
        PgTls::Verify {
            root_cert: root.map(PathBuf::from),
        }
    }

    #[test]
    fn remote_hosts_default_to_verified_tls() {
        let u = ok("postgres://acutoken@db.example.com/acutoken");
        assert_eq!(u.tls, verify(None));
        assert_eq!(
            u.url,
            "postgres://acutoken@db.example.com/acutoken?sslmode=require"
        );
        assert_eq!(u.display, "acutoken@db.example.com:5432/acutoken");

        for mode in ["require", "verify-ca", "verify-full"] {
            let u = ok(&format!(
                "postgresql://a@db.example.com:6432/d?sslmode={mode}&application_name=x%20y"
            ));
            assert_eq!(u.tls, verify(None), "{mode}");
            assert_eq!(
                u.url,
                "postgresql://a@db.example.com:6432/d?application_name=x%20y&sslmode=require"
            );
            assert_eq!(u.display, "a@db.example.com:6432/d");
        }
        let u = ok("postgres://a@h.example/d?sslrootcert=%2Fetc%2Fpg%20ca.pem&sslmode=verify-full");
        assert_eq!(u.tls, verify(Some("/etc/pg ca.pem")));
        assert_eq!(u.url, "postgres://a@h.example/d?sslmode=require");
        let u = ok("postgres://a@h.example/d?sslrootcert=system");
        assert_eq!(u.tls, verify(None));
    }

    #[test]
    fn loopback_and_sockets_default_to_plain() {
        for url in [
            "postgres://a@127.0.0.1/d",
            "postgres://a@localhost:5433/d",
            "postgres://a@[::1]:5432/d",
            "postgres://a@localhost,127.0.0.1:5433/d",
            "postgres://a@%2Frun%2Fpostgresql/d",
            "postgres://a@/d?host=/run/postgresql",
            "postgres://a@localhost/d?sslmode=disable",
        ] {
            let u = ok(url);
            assert_eq!(u.tls, PgTls::Disable, "{url}");
            assert!(u.url.ends_with("sslmode=disable"), "{}", u.url);
            tokio_postgres::Config::from_str(&u.url).unwrap();
        }
        assert_eq!(
            ok("postgres://a@/d?host=/run/postgresql").display,
            "a@/run/postgresql/d"
        );
        assert_eq!(ok("postgres://a@[::1]/d").display, "a@[::1]:5432/d");
        // Asking for a CA, or for TLS, on loopback gets TLS.
        assert_eq!(
            ok("postgres://a@localhost/d?sslmode=verify-full").tls,
            verify(None)
        );
        assert_eq!(
            ok("postgres://a@localhost/d?sslrootcert=/ca.pem").tls,
            verify(Some("/ca.pem"))
        );
    }

    #[test]
    fn multi_host_urls_are_kept_as_written() {
        let raw = "postgres://acutoken@a.example:5432,b.example:5433/acutoken?target_session_attrs=read-write&sslmode=verify-full&connect_timeout=5";
        let u = ok(raw);
        assert_eq!(
            u.url,
            "postgres://acutoken@a.example:5432,b.example:5433/acutoken?target_session_attrs=read-write&connect_timeout=5&sslmode=require"
        );
        assert_eq!(u.display, "acutoken@a.example:5432,b.example:5433/acutoken");
        assert_eq!(u.tls, verify(None));
        let c = tokio_postgres::Config::from_str(&u.url).unwrap();
        assert_eq!(c.get_hosts().len(), 2);
        assert_eq!(c.get_ports(), [5432, 5433]);
        assert_eq!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        assert_eq!(
            c.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
    }

    #[test]
    fn passwords_are_refused_and_never_shown() {
        for url in [
            "postgres://acutoken:Hunter2pw@db.example.com/acutoken",
            "postgres://acutoken:Hunter2pw@localhost/acutoken",
            "postgresql://acutoken:Hunter2pw@a,b/acutoken?sslmode=prefer",
            "postgres://acutoken@db.example.com/acutoken?password=Hunter2pw",
            "postgres://acutoken@db.example.com/acutoken?sslmode=disable&pass%77ord=Hunter2pw",
            "postgres://acutoken:Hunter2pw@db.example.com/acutoken?bogus=1",
        ] {
            let msg = err(url);
            assert!(msg.contains("holds a password"), "{url}\n=> {msg}");
            assert!(
                msg.contains("store.password_file") && msg.contains("acutoken.pgpass"),
                "{msg}"
            );
            assert!(!msg.contains("Hunter2pw"), "{msg}");
        }
        // Other errors never quote the URL either.
        for url in [
            "mysql://acutoken:Hunter2pw@db.example.com/acutoken",
            "postgres://acutoken@db.example.com/acutoken?sslmode=bogusHunter2pw",
        ] {
            assert!(!err(url).contains("Hunter2pw"), "{url}");
        }
    }

    #[test]
    fn bad_urls_say_what_to_do() {
        let cases = [
            ("mysql://a@h/d", "must start with postgres://"),
            ("a@h/d", "must start with postgres://"),
            (
                "postgres://a@h.example/d?sslmode=prefer",
                "use sslmode=verify-full",
            ),
            (
                "postgres://a@h.example/d?sslmode=allow",
                "use sslmode=verify-full",
            ),
            ("postgres://a@h.example/d?sslmode=verify", "must be one of"),
            (
                "postgres://a@db.example.com/d?sslmode=disable",
                "sslmode=disable sends database traffic in clear to db.example.com; use sslmode=verify-full",
            ),
            (
                "postgres://a@localhost,10.0.0.7/d?sslmode=disable",
                "in clear to 10.0.0.7",
            ),
            (
                "postgres://a@localhost/d?sslmode=disable&sslrootcert=/c",
                "remove one",
            ),
            (
                "postgres://a@h.example/d?frobnicate=1",
                "unknown option `frobnicate`",
            ),
            ("postgres://a@h.example/d?port=x", "`port`"),
            ("postgres://a@h.example/d?sslmode", "no `=VALUE`"),
            ("postgres:///d", "names no host"),
            ("postgres://a@a,b,c:1,d/d?port=1,2", "ports"),
            (
                "postgres://a@/d?hostaddr=10.0.0.1&sslmode=verify-full",
                "host name",
            ),
            (
                "postgres://a@/d?host=/run/postgresql&sslmode=require",
                "Unix socket",
            ),
        ];
        for (url, want) in cases {
            let msg = err(url);
            assert!(msg.contains(want), "{url}\n=> {msg}");
        }
    }

    #[test]
    fn store_target_reads_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::default();
        let none = fake_env(&[]);
        assert_eq!(
            c.store_target_in(&none).unwrap(),
            StoreTarget::File(PathBuf::from("./acutoken.db"))
        );

        c.store.url = Some("postgres://acutoken@localhost/acutoken".into());
        let StoreTarget::Postgres(t) = c.store_target_in(&none).unwrap() else {
            panic!("postgres")
        };
        assert_eq!(t.password, None);
        assert_eq!(t.display, "acutoken@localhost:5432/acutoken");

        // The systemd credential, when present.
        let creds = dir.path().join("creds");
        fs::create_dir(&creds).unwrap();
        let env = fake_env(&[("CREDENTIALS_DIRECTORY", creds.to_str().unwrap())]);
        let StoreTarget::Postgres(t) = c.store_target_in(&env).unwrap() else {
            panic!("postgres")
        };
        assert_eq!(t.password, None, "no credential file: no password");
        fs::write(creds.join(PASSWORD_CREDENTIAL), "from-cred\n").unwrap();
        fs::set_permissions(
            creds.join(PASSWORD_CREDENTIAL),
            fs::Permissions::from_mode(0o440),
        )
        .unwrap();
        let StoreTarget::Postgres(t) = c.store_target_in(&env).unwrap() else {
            panic!("postgres")
        };
        assert_eq!(t.password.as_ref().map(Secret::expose), Some("from-cred"));
        assert!(!format!("{t:?}").contains("from-cred"));

        // store.password_file wins, must be private, one newline trimmed.
        let file = dir.path().join("pgpass");
        fs::write(&file, "pa ss\n\n").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        c.store.password_file = Some(file.clone());
        let StoreTarget::Postgres(t) = c.store_target_in(&env).unwrap() else {
            panic!("postgres")
        };
        assert_eq!(t.password.as_ref().map(Secret::expose), Some("pa ss\n"));

        fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
        let msg = c.store_target_in(&env).unwrap_err().to_string();
        assert!(msg.contains("chmod 600"), "{msg}");
        fs::write(&file, "\n").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        let msg = c.store_target_in(&env).unwrap_err().to_string();
        assert!(
            msg.contains("`store.password_file`") && msg.contains("empty"),
            "{msg}"
        );

        // An empty credential is an error too, not "no password".
        c.store.password_file = None;
        fs::write(creds.join(PASSWORD_CREDENTIAL), "").unwrap();
        let msg = c.store_target_in(&env).unwrap_err().to_string();
        assert!(
            msg.contains("acutoken.pgpass") && msg.contains("empty"),
            "{msg}"
        );
    }

    #[test]
    fn percent_decoding_matches_the_client() {
        assert_eq!(percent_decode("a%20b%2fc").unwrap(), "a b/c");
        assert_eq!(percent_decode("100%").unwrap(), "100%");
        assert_eq!(percent_decode("%zz").unwrap(), "%zz");
        assert!(percent_decode("%ff").is_err());
    }
}
