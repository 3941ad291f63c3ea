//! Instance URLs: turning what people paste into the stored `host[:port][/virtual-dir]`.
//!
//! People copy the address bar: a scheme, a login page, a query with the screen ID,
//! sometimes a session segment such as `/(W(3))/`. Only the part that names the site
//! matters, and it is also the key for per-instance concurrency, so two pastes of the
//! same site must normalise to the same string.

use std::net::Ipv6Addr;

/// Why a pasted instance URL was refused. Every variant is an input mistake: the
/// caller shows the message (it carries an example) and asks again; nothing is stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstanceError {
    /// Nothing was given. Ask for the address the browser shows.
    #[error(
        "the instance URL is empty: paste the address your browser shows, e.g. https://acme.acumatica.com/Main"
    )]
    Empty,
    /// Blanks or control characters inside the address: it is not one URL.
    /// The input is shown with control characters escaped, so a pasted
    /// escape sequence cannot reach the terminal.
    #[error(
        "the instance URL `{0}` contains blanks or control characters: paste one address, e.g. https://acme.acumatica.com"
    )]
    Whitespace(String),
    /// A scheme other than http(s): not a web address of an Acumatica site.
    #[error(
        "`{scheme}:` is not a web address: use the https address of the site, e.g. https://acme.acumatica.com"
    )]
    Scheme {
        /// The scheme that was given, lower-cased.
        scheme: String,
    },
    /// `user@host` or `user:password@host`: credentials never belong in the URL. The
    /// input is deliberately not echoed because it may hold a password.
    #[error(
        "the instance URL contains a user name or password (`...@`): give only the site, e.g. https://erp.example.com/AcumaticaERP"
    )]
    UserInfo,
    /// No host before the path, e.g. `https:///Main`.
    #[error("`{0}` has no host name: give the site, e.g. https://acme.acumatica.com")]
    MissingHost(String),
    /// The host is not a valid DNS name or IP address.
    #[error(
        "`{host}` is not a valid host name or IP address: give the site, e.g. acme.acumatica.com, 10.0.0.5 or [2001:db8::5]"
    )]
    BadHost {
        /// The host part as given.
        host: String,
    },
    /// The port is not a number from 1 to 65535.
    #[error(
        "`{port}` is not a valid port: use a number from 1 to 65535, e.g. erp.example.com:8443"
    )]
    BadPort {
        /// The port part as given.
        port: String,
    },
    /// A virtual directory with characters IIS site paths do not use here.
    #[error(
        "`{segment}` is not a usable virtual directory name: use letters, digits, `-`, `_`, `.` or `~`, e.g. erp.example.com/AcumaticaERP"
    )]
    BadPath {
        /// The offending path segment.
        segment: String,
    },
}

/// Normalises a pasted instance URL to `host[:port][/virtual-dir]`.
///
/// Drops the scheme, query, fragment, trailing `/` and everything from the first
/// path segment that belongs to the Acumatica application itself (`/Main`,
/// `/Frames/...`, `/(W(3))/...`, `/identity/...`, any `*.aspx`); keeps ports (except
/// the https default `443`) and virtual directories; lower-cases the host, converts
/// international names to their ASCII form and brackets IPv6 literals.
///
/// ```
/// use acutoken::acumatica::instance::normalize;
/// assert_eq!(
///     normalize("https://ERP.example.com/AcumaticaERP/Main?ScreenId=00000000").unwrap(),
///     "erp.example.com/AcumaticaERP"
/// );
/// ```
pub fn normalize(input: &str) -> Result<String, InstanceError> {
    let trimmed = input.trim();
    if trimmed.is_empty() {
        return Err(InstanceError::Empty);
    }
    if trimmed.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(InstanceError::Whitespace(
            trimmed.escape_debug().to_string(),
        ));
    }

    let rest = strip_scheme(trimmed)?;
    // Query and fragment never name the site; cut them before splitting the path so
    // a `/` inside `?ReturnUrl=/x` cannot be taken for a segment.
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    if authority.contains('@') {
        return Err(InstanceError::UserInfo);
    }
    if authority.is_empty() {
        return Err(InstanceError::MissingHost(trimmed.to_string()));
    }

    let (host, port) = split_host_port(authority)?;
    let host = normalize_host(host)?;

    let mut out = host;
    if let Some(port) = port
        && port != 443
    {
        out.push(':');
        out.push_str(&port.to_string());
    }
    // A host named `http` or `https` with a port would be stored as
    // `https:8443`, which reads back as a mangled scheme: refuse it now rather
    // than store what the token client cannot use.
    // The same for the schemes refused on input (`mailto.:6886` would be
    // stored as `mailto:6886`, which reads back as a `mailto:` link).
    let reads_as_scheme = ["http", "https"]
        .iter()
        .chain(NOT_WEB)
        .any(|scheme| out.strip_prefix(scheme).is_some_and(|r| r.starts_with(':')));
    if reads_as_scheme {
        return Err(InstanceError::MissingHost(trimmed.to_string()));
    }
    for segment in virtual_dir(path)? {
        out.push('/');
        out.push_str(segment);
    }
    Ok(out)
}

/// Schemes people paste by accident.
const NOT_WEB: &[&str] = &[
    "ftp",
    "ftps",
    "sftp",
    "ssh",
    "file",
    "mailto",
    "smb",
    "ldap",
    "ldaps",
    "tel",
    "javascript",
    "data",
    "ws",
    "wss",
];

/// Removes `scheme://` (http or https only). A bare `host:port` is not a scheme.
fn strip_scheme(s: &str) -> Result<&str, InstanceError> {
    // `//host/...` names the host that follows: judge that, as it is what is stored.
    let s = s.strip_prefix("//").unwrap_or(s);
    // A colon after a `/`, `?` or `#` belongs to the path, query or fragment
    // (`erp.example.com/Main?ReturnUrl=https://...`), never to a scheme.
    let Some((before, after)) = s
        .split_once(':')
        .filter(|(before, _)| !before.contains(['/', '?', '#']))
    else {
        return Ok(s);
    };
    let scheme = before.to_ascii_lowercase();
    let web = matches!(scheme.as_str(), "http" | "https");
    if let Some(rest) = after.strip_prefix("//") {
        let looks_like_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        return match (web, looks_like_scheme) {
            (true, _) => Ok(rest),
            (false, true) => Err(InstanceError::Scheme { scheme }),
            (false, false) => Err(InstanceError::MissingHost(s.to_string())),
        };
    }
    if web {
        // `https:acme.com`: too mangled to guess which part is the host.
        return Err(InstanceError::MissingHost(s.to_string()));
    }
    // Anything else before a colon is a host followed by a port, which the
    // port check judges.
    if NOT_WEB.contains(&scheme.as_str()) {
        return Err(InstanceError::Scheme { scheme });
    }
    Ok(s)
}

/// Splits `host[:port]`, `[v6][:port]` or a bare IPv6 literal.
fn split_host_port(authority: &str) -> Result<(&str, Option<u16>), InstanceError> {
    if let Some(rest) = authority.strip_prefix('[') {
        let Some(end) = rest.find(']') else {
            return Err(InstanceError::BadHost {
                host: authority.to_string(),
            });
        };
        let host = &authority[..end + 2];
        let after = &rest[end + 1..];
        return match after.strip_prefix(':') {
            Some(p) => Ok((host, Some(parse_port(p)?))),
            None if after.is_empty() => Ok((host, None)),
            None => Err(InstanceError::BadHost {
                host: authority.to_string(),
            }),
        };
    }
    if authority.matches(':').count() > 1 {
        // An unbracketed IPv6 literal; with a port it would be ambiguous, so only the
        // whole string is accepted as an address.
        return Ok((authority, None));
    }
    match authority.split_once(':') {
        Some((host, port)) => Ok((host, Some(parse_port(port)?))),
        None => Ok((authority, None)),
    }
}

fn parse_port(p: &str) -> Result<u16, InstanceError> {
    let bad = || InstanceError::BadPort {
        port: p.to_string(),
    };
    if p.is_empty() || !p.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad()),
        Ok(n) => Ok(n),
    }
}

/// Lower-cases and validates a host, returning it as it goes into a URL.
fn normalize_host(host: &str) -> Result<String, InstanceError> {
    let bad = || InstanceError::BadHost {
        host: host.to_string(),
    };
    if host.is_empty() {
        return Err(bad());
    }
    if host.contains(':') && !host.starts_with('[') {
        return host
            .parse::<Ipv6Addr>()
            .map(|ip| format!("[{ip}]"))
            .map_err(|_| bad());
    }
    let parsed = url::Host::parse(host).map_err(|_| bad())?;
    match parsed {
        url::Host::Ipv4(ip) => Ok(ip.to_string()),
        url::Host::Ipv6(ip) => Ok(format!("[{ip}]")),
        url::Host::Domain(d) => {
            let d = d.strip_suffix('.').unwrap_or(&d).to_string();
            if valid_dns_name(&d) {
                Ok(d)
            } else {
                Err(bad())
            }
        }
    }
}

/// A DNS name as hosts are really named: labels of letters, digits, `-` and `_`.
fn valid_dns_name(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        })
}

/// The virtual-directory segments: everything before the first application segment.
fn virtual_dir(path: &str) -> Result<Vec<&str>, InstanceError> {
    let mut kept = Vec::new();
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        if is_app_segment(segment) {
            break;
        }
        let usable = segment != "."
            && segment != ".."
            && segment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~'));
        if !usable {
            return Err(InstanceError::BadPath {
                segment: segment.to_string(),
            });
        }
        kept.push(segment);
    }
    Ok(kept)
}

/// Path segments that belong to the Acumatica application (pages, scripts, APIs),
/// never to the IIS virtual directory in front of it.
const APP_SEGMENTS: &[&str] = &[
    "main",
    "frames",
    "pages",
    "scripts",
    "identity",
    "entity",
    "odata",
    "odatav4",
    "soap",
    "api",
    "content",
    "controls",
    "app_themes",
    "icons",
    "wiki",
    "ui",
    "signin-oidc",
    ".well-known",
];

fn is_app_segment(segment: &str) -> bool {
    let lower = segment.to_ascii_lowercase();
    // `(W(3))`: the cookieless session segment ASP.NET inserts for screens in tabs.
    if lower.starts_with('(') {
        return true;
    }
    if [".aspx", ".ashx", ".asmx", ".axd", ".svc", ".html", ".htm"]
        .iter()
        .any(|ext| lower.ends_with(ext))
    {
        return true;
    }
    APP_SEGMENTS.contains(&lower.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(input: &str) -> String {
        match normalize(input) {
            Ok(s) => s,
            Err(e) => panic!("`{input}` refused: {e}"),
        }
    }

    #[test]
    fn real_pastes_normalise() {
        let cases = [
            ("acme.acumatica.com", "acme.acumatica.com"),
            ("https://acme.acumatica.com", "acme.acumatica.com"),
            ("https://acme.acumatica.com/", "acme.acumatica.com"),
            (
                "https://acme.acumatica.com/Main?ScreenId=00000000",
                "acme.acumatica.com",
            ),
            (
                "https://acme.acumatica.com/Main.aspx?ScreenId=SO301000&OrderNbr=SO004512",
                "acme.acumatica.com",
            ),
            (
                "https://erp.example.com/AcumaticaERP/",
                "erp.example.com/AcumaticaERP",
            ),
            (
                "https://erp.example.com/AcumaticaERP/Main?CompanyID=Acme%20Corp&ScreenId=00000000",
                "erp.example.com/AcumaticaERP",
            ),
            (
                "https://erp.example.com/AcumaticaERP/(W(3))/Main?ScreenId=AR301000",
                "erp.example.com/AcumaticaERP",
            ),
            (
                "https://erp.example.com/AcumaticaERP/Frames/Login.aspx?ReturnUrl=%2fAcumaticaERP%2fMain",
                "erp.example.com/AcumaticaERP",
            ),
            (
                "https://acme.acumatica.com/Pages/SM/SM303010.aspx",
                "acme.acumatica.com",
            ),
            (
                "https://acme.acumatica.com/Scripts/ui.js",
                "acme.acumatica.com",
            ),
            (
                "https://acme.acumatica.com/identity/connect/token",
                "acme.acumatica.com",
            ),
            (
                "https://erp.example.com/AcumaticaERP/identity/.well-known/openid-configuration",
                "erp.example.com/AcumaticaERP",
            ),
            (
                "https://acme.acumatica.com/entity/Default/23.200.001/SalesOrder",
                "acme.acumatica.com",
            ),
            (
                "erp.example.com/AcumaticaERP/Main.aspx",
                "erp.example.com/AcumaticaERP",
            ),
            ("HTTPS://ACME.Acumatica.COM/Main", "acme.acumatica.com"),
            (
                "  https://acme.acumatica.com/Main  \n",
                "acme.acumatica.com",
            ),
            (
                "https://acme.acumatica.com/#/dashboard",
                "acme.acumatica.com",
            ),
            ("https://acme.acumatica.com?x=1", "acme.acumatica.com"),
            ("acme.acumatica.com.", "acme.acumatica.com"),
            ("//acme.acumatica.com/Main", "acme.acumatica.com"),
            ("https://acme.acumatica.com:443/Main", "acme.acumatica.com"),
            (
                "https://erp.example.com:8443/AcumaticaERP/Main",
                "erp.example.com:8443/AcumaticaERP",
            ),
            ("http://192.168.1.10:8080/Acu/", "192.168.1.10:8080/Acu"),
            ("localhost:5000", "localhost:5000"),
            ("http://127.0.0.1:39111/", "127.0.0.1:39111"),
            ("[::1]:8443", "[::1]:8443"),
            ("https://[2001:DB8::1]/Main", "[2001:db8::1]"),
            ("2001:db8::1", "[2001:db8::1]"),
            (
                "https://erp.example.com/Acu/ERP2024/Main",
                "erp.example.com/Acu/ERP2024",
            ),
            (
                "erp_internal.corp.local/AcumaticaERP",
                "erp_internal.corp.local/AcumaticaERP",
            ),
            ("https://bücher.example/Main", "xn--bcher-kva.example"),
        ];
        for (input, want) in cases {
            assert_eq!(ok(input), want, "input {input:?}");
        }
    }

    #[test]
    fn normalising_is_idempotent() {
        for input in [
            "https://erp.example.com:8443/AcumaticaERP/Main",
            "https://[2001:DB8::1]/Main",
            "acme.acumatica.com",
        ] {
            let once = ok(input);
            assert_eq!(ok(&once), once);
        }
    }

    #[test]
    fn found_by_fuzzing_stored_values_read_back_the_same() {
        // `//http:44480` was stored as `http:44480`, which reads back as a
        // mangled scheme: the token client could never use it.
        for input in ["//http:44480", "https://http:8443/ERP", "//ftp:21"] {
            assert!(normalize(input).is_err(), "{input}");
        }
        assert_eq!(normalize("https://https").unwrap(), "https");
        // A scheme inside the query is not the URL's scheme.
        assert_eq!(
            normalize("erp.example.com/AcumaticaERP/Main?ReturnUrl=https://x.example/").unwrap(),
            "erp.example.com/AcumaticaERP"
        );
        assert_eq!(
            normalize("//acme.acumatica.com:8443").unwrap(),
            "acme.acumatica.com:8443"
        );
    }

    #[test]
    fn what_is_not_a_host_is_refused() {
        assert_eq!(normalize(""), Err(InstanceError::Empty));
        assert_eq!(normalize("   \n"), Err(InstanceError::Empty));
        assert!(matches!(
            normalize("acme acumatica.com"),
            Err(InstanceError::Whitespace(_))
        ));
        assert!(matches!(
            normalize("https://acme.acumatica.com/Main?ScreenId=1 2"),
            Err(InstanceError::Whitespace(_))
        ));
        let shown = normalize("acme\u{1b}[2J.com").unwrap_err().to_string();
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(shown.contains("acme\\u{1b}[2J.com"), "{shown}");
        assert_eq!(
            normalize("ftp://acme.acumatica.com"),
            Err(InstanceError::Scheme {
                scheme: "ftp".into()
            })
        );
        assert_eq!(
            normalize("mailto:ops@acme.com"),
            Err(InstanceError::Scheme {
                scheme: "mailto".into()
            })
        );
        assert_eq!(normalize("file:///etc/passwd").map_err(|_| ()), Err(()));
        assert_eq!(
            normalize("https://admin:hunter2@acme.acumatica.com/Main"),
            Err(InstanceError::UserInfo)
        );
        assert_eq!(
            normalize("admin@acme.acumatica.com"),
            Err(InstanceError::UserInfo)
        );
        for bad_port in [
            "acme.acumatica.com:99999",
            "acme.acumatica.com:0",
            "acme.acumatica.com:",
            "https://acme.acumatica.com:https/Main",
            "[::1]:x",
        ] {
            assert!(
                matches!(normalize(bad_port), Err(InstanceError::BadPort { .. })),
                "{bad_port}: {:?}",
                normalize(bad_port)
            );
        }
        for bad_host in [
            "https://-acme.example.com",
            "acme..example.com",
            "exa$mple.com",
            "[::1",
            "[zz::1]",
            "[::1]x",
            "2001:db8::zz",
            r"\\fileserver\share",
        ] {
            assert!(
                matches!(normalize(bad_host), Err(InstanceError::BadHost { .. })),
                "{bad_host}: {:?}",
                normalize(bad_host)
            );
        }
        assert!(matches!(
            normalize("https:///Main"),
            Err(InstanceError::MissingHost(_))
        ));
        assert!(matches!(
            normalize("https:acme.acumatica.com"),
            Err(InstanceError::MissingHost(_))
        ));
        assert!(matches!(
            normalize("erp.example.com/../Main"),
            Err(InstanceError::BadPath { .. })
        ));
        assert!(matches!(
            normalize("erp.example.com/Acu%20ERP/Main"),
            Err(InstanceError::BadPath { .. })
        ));
    }

    #[test]
    fn errors_give_an_example_and_hide_passwords() {
        let e = normalize("https://admin:hunter2@acme.acumatica.com").unwrap_err();
        assert!(!e.to_string().contains("hunter2"));
        assert!(!format!("{e:?}").contains("hunter2"));
        for input in [
            "",
            "a b",
            "ftp://x",
            "x:0",
            "a..b",
            "https:///Main",
            "x/../y",
        ] {
            let msg = normalize(input).unwrap_err().to_string();
            assert!(msg.contains("e.g."), "{input}: {msg}");
        }
    }

    #[test]
    fn virtual_directory_case_is_kept_host_case_is_not() {
        assert_eq!(
            ok("https://ERP.Example.com/AcumaticaERP/main"),
            "erp.example.com/AcumaticaERP"
        );
    }

    /// Found by fuzzing: `mailto.:6886` was stored as `mailto:6886`, which
    /// then read back as a `mailto:` scheme: refused, as `http:PORT` is.
    #[test]
    fn a_host_named_like_a_scheme_with_a_port_reads_back_the_same() {
        for input in ["mailto.:6886/", "ftp.:2121/Erp", "ssh.:22", "//MAILTO.:25"] {
            assert!(normalize(input).is_err(), "{input}");
        }
        assert_eq!(
            normalize("mailto.example.com:6886").unwrap(),
            "mailto.example.com:6886"
        );
        assert!(matches!(
            normalize("mailto:ops@example.com"),
            Err(InstanceError::Scheme { .. })
        ));
        assert!(matches!(
            normalize("ftp://erp.example.com"),
            Err(InstanceError::Scheme { .. })
        ));
    }
}
