//! Which addresses a token request may go to, and a resolver that enforces it.
//!
//! Instance URLs come from operators and imported files, so a typo or a hostile
//! record must not turn acutoken into a way to reach the cloud metadata service or
//! another host's internals with a client secret in the body. The resolver checks
//! every address a name resolves to and hands reqwest only checked addresses, so the
//! connection goes to exactly what was checked: a second DNS answer cannot rebind it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// A destination refused before any byte was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{host}: {why}")]
pub struct AddressRefused {
    /// The host name or address as it appeared in the URL.
    pub host: String,
    /// Why, in words an operator can act on.
    pub why: String,
}

/// The address rules of DESIGN §7 and the `acumatica.allow_*` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressPolicy {
    /// `acumatica.allow_private_networks`: on-premises instances on RFC 1918 / ULA addresses.
    pub allow_private_networks: bool,
    /// `acumatica.allow_insecure_loopback`: loopback instances (tests, the demo) are wanted.
    pub allow_loopback: bool,
}

/// Names that resolve to a cloud provider's metadata service from inside that cloud.
const METADATA_NAMES: &[&str] = &[
    "metadata.google.internal",
    "metadata.goog",
    "metadata",
    "instance-data",
    "instance-data.ec2.internal",
];

const AWS_METADATA_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);

impl AddressPolicy {
    /// Refuses host names that always mean a metadata service.
    pub fn check_name(&self, host: &str) -> Result<(), AddressRefused> {
        let lower = host.trim_end_matches('.').to_ascii_lowercase();
        if METADATA_NAMES.contains(&lower.as_str()) {
            return Err(AddressRefused {
                host: host.to_string(),
                why: "a cloud metadata service name; requests from acutoken never go there".into(),
            });
        }
        Ok(())
    }

    /// Checks a URL's host: an IP literal against the address rules (no
    /// resolver sees it, so this is its only check), a name against the
    /// metadata names (its addresses are checked when it is resolved).
    pub fn check_host(&self, host: &url::Host<&str>) -> Result<(), AddressRefused> {
        match host {
            url::Host::Ipv4(ip) => self.check_ip(IpAddr::V4(*ip)),
            url::Host::Ipv6(ip) => self.check_ip(IpAddr::V6(*ip)),
            url::Host::Domain(d) => self.check_name(d),
        }
    }

    /// Checks one address against the policy.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), AddressRefused> {
        let refuse = |why: &str| {
            Err(AddressRefused {
                host: ip.to_string(),
                why: why.to_string(),
            })
        };
        match classify(ip) {
            Class::Metadata => {
                refuse("a cloud metadata address; requests from acutoken never go there")
            }
            Class::LinkLocal => {
                refuse("a link-local address; requests from acutoken never go there")
            }
            Class::NotUnicast => refuse(
                "not a single host's address (unspecified, broadcast, multicast or reserved)",
            ),
            Class::Loopback if !(self.allow_private_networks || self.allow_loopback) => refuse(
                "a loopback address, and neither acumatica.allow_private_networks nor acumatica.allow_insecure_loopback is set",
            ),
            Class::Private if !self.allow_private_networks => {
                refuse("a private-network address, and acumatica.allow_private_networks is false")
            }
            Class::Loopback | Class::Private | Class::Public => Ok(()),
        }
    }
}

/// Where webhooks may go (the alerts' HTTP client, and `config check` for
/// the URLs it is given): the token client's rules with loopback and private
/// addresses allowed (webhooks are configured by the operator), so never a
/// cloud metadata service, a link-local address or a non-unicast one.
pub const WEBHOOK_POLICY: AddressPolicy = AddressPolicy {
    allow_private_networks: true,
    allow_loopback: true,
};

/// Checks a webhook URL's host against [`WEBHOOK_POLICY`] before anything is
/// sent. The resolver checks every name's addresses, but a URL whose host is
/// an IP literal is never resolved, so this is its only check. The reason names
/// the host, never the URL's path or query (they carry the webhook's secret).
pub fn check_webhook_destination(url: &url::Url) -> Result<(), String> {
    match url.host() {
        Some(host) => WEBHOOK_POLICY.check_host(&host).map_err(|e| e.to_string()),
        None => Err("the URL has no host".to_string()),
    }
}

/// True for 127.0.0.0/8, ::1 (also IPv4-mapped).
pub fn is_loopback(ip: IpAddr) -> bool {
    classify(ip) == Class::Loopback
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Metadata,
    LinkLocal,
    NotUnicast,
    Loopback,
    Private,
    Public,
}

fn classify(ip: IpAddr) -> Class {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => {
            // An IPv4 address wrapped in IPv6 (mapped, or NAT64's well-known prefix)
            // reaches the IPv4 host, so it is judged as that host.
            if let Some(v4) = v6.to_ipv4_mapped() {
                return classify_v4(v4);
            }
            let s = v6.segments();
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return classify_v4(Ipv4Addr::new(a, b, c, d));
            }
            classify_v6(v6)
        }
    }
}

fn classify_v4(ip: Ipv4Addr) -> Class {
    let o = ip.octets();
    if ip == Ipv4Addr::new(169, 254, 169, 254) || ip == Ipv4Addr::new(100, 100, 100, 200) {
        // AWS/GCP/Azure/OpenStack, and Alibaba Cloud's metadata service.
        return Class::Metadata;
    }
    if ip.is_link_local() {
        return Class::LinkLocal;
    }
    if o[0] == 0 || ip.is_broadcast() || ip.is_multicast() || o[0] >= 240 {
        return Class::NotUnicast;
    }
    if ip.is_loopback() {
        return Class::Loopback;
    }
    let shared = o[0] == 100 && (64..128).contains(&o[1]);
    let benchmarking = o[0] == 198 && (o[1] == 18 || o[1] == 19);
    if ip.is_private() || shared || benchmarking {
        return Class::Private;
    }
    Class::Public
}

fn classify_v6(ip: Ipv6Addr) -> Class {
    let first = ip.segments()[0];
    if ip == AWS_METADATA_V6 {
        return Class::Metadata;
    }
    if first & 0xffc0 == 0xfe80 {
        return Class::LinkLocal;
    }
    if ip.is_unspecified() || ip.is_multicast() {
        return Class::NotUnicast;
    }
    if ip.is_loopback() {
        return Class::Loopback;
    }
    // fc00::/7 unique local, fec0::/10 the deprecated site-local.
    if first & 0xfe00 == 0xfc00 || first & 0xffc0 == 0xfec0 {
        return Class::Private;
    }
    Class::Public
}

/// A reqwest resolver that resolves with the system resolver, refuses the whole
/// name when any of its addresses breaks the policy, and answers `localhost`
/// itself (RFC 6761) so it always means loopback.
#[derive(Debug, Clone, Copy)]
pub struct GuardedResolver {
    pub policy: AddressPolicy,
}

/// True for `localhost` and names under `.localhost`.
pub fn is_localhost_name(host: &str) -> bool {
    let lower = host.trim_end_matches('.').to_ascii_lowercase();
    lower == "localhost" || lower.ends_with(".localhost")
}

impl GuardedResolver {
    /// Resolves and checks `host`; every returned address passed the policy.
    pub async fn resolve_checked(&self, host: &str) -> Result<Vec<SocketAddr>, ResolveError> {
        self.policy
            .check_name(host)
            .map_err(ResolveError::Refused)?;
        let addrs: Vec<SocketAddr> = if is_localhost_name(host) {
            vec![
                SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
                SocketAddr::from((Ipv6Addr::LOCALHOST, 0)),
            ]
        } else {
            tokio::net::lookup_host((host, 0))
                .await
                .map_err(|e| ResolveError::Lookup(host.to_string(), e.to_string()))?
                .collect()
        };
        if addrs.is_empty() {
            return Err(ResolveError::Lookup(
                host.to_string(),
                "no addresses".to_string(),
            ));
        }
        for a in &addrs {
            self.policy.check_ip(a.ip()).map_err(|mut refused| {
                refused.why = format!("resolves to {}, {}", refused.host, refused.why);
                refused.host = host.to_string();
                ResolveError::Refused(refused)
            })?;
        }
        Ok(addrs)
    }
}

/// Why a name gave no usable address. Both mean nothing was sent.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    /// The policy refused the name or one of its addresses: fix the instance URL or
    /// the `acumatica.allow_*` settings; retrying will not help.
    #[error(transparent)]
    Refused(AddressRefused),
    /// DNS gave no answer: transient (or a typo in the instance URL).
    #[error("cannot resolve {0}: {1}")]
    Lookup(String, String),
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let this = *self;
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs = this.resolve_checked(&host).await?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRICT: AddressPolicy = AddressPolicy {
        allow_private_networks: false,
        allow_loopback: false,
    };
    const OPEN: AddressPolicy = AddressPolicy {
        allow_private_networks: true,
        allow_loopback: true,
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn metadata_and_link_local_are_always_refused() {
        for bad in [
            "169.254.169.254",
            "169.254.1.1",
            "fe80::1",
            "febf::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "100.100.100.200",
            "0.0.0.0",
            "::",
            "255.255.255.255",
            "224.0.0.1",
            "ff02::1",
        ] {
            assert!(OPEN.check_ip(ip(bad)).is_err(), "{bad} allowed");
        }
        assert!(OPEN.check_name("metadata.google.internal").is_err());
        assert!(OPEN.check_name("Metadata.Google.Internal.").is_err());
        assert!(OPEN.check_name("acme.acumatica.com").is_ok());
    }

    #[test]
    fn private_addresses_follow_the_setting() {
        for private in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.10",
            "100.64.0.1",
            "fd12:3456::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(STRICT.check_ip(ip(private)).is_err(), "{private}");
            assert!(OPEN.check_ip(ip(private)).is_ok(), "{private}");
        }
        for public in ["52.1.2.3", "172.32.0.1", "2606:4700::1111", "8.8.8.8"] {
            assert!(STRICT.check_ip(ip(public)).is_ok(), "{public}");
        }
    }

    #[test]
    fn loopback_needs_either_setting() {
        let only_loopback = AddressPolicy {
            allow_private_networks: false,
            allow_loopback: true,
        };
        for lo in ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"] {
            assert!(STRICT.check_ip(ip(lo)).is_err(), "{lo}");
            assert!(only_loopback.check_ip(ip(lo)).is_ok(), "{lo}");
            assert!(is_loopback(ip(lo)));
        }
        assert!(!is_loopback(ip("10.0.0.1")));
    }

    #[tokio::test]
    async fn localhost_resolves_to_loopback_and_is_checked() {
        let strict = GuardedResolver { policy: STRICT };
        assert!(matches!(
            strict.resolve_checked("localhost").await,
            Err(ResolveError::Refused(_))
        ));
        let open = GuardedResolver { policy: OPEN };
        let addrs = open.resolve_checked("LocalHost.").await.unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()));
        assert!(matches!(
            open.resolve_checked("metadata.google.internal").await,
            Err(ResolveError::Refused(_))
        ));
    }
}
