//! Where the coordinator may call: the address policy and the optional allowlist
//! (`treaty serve --allow-endpoint PATTERN`, repeatable).
//!
//! A client names the endpoints the coordinator will call, so without a policy the
//! coordinator is a proxy into the network it sits in. Every endpoint a request names goes
//! through [`EndpointPolicy::check`] before anything changes; what is stored and called is
//! the canonical form it returns ([`treaty_sdk::endpoint`]).
//!
//! Invariants:
//! - Only endpoints that parse strictly are accepted, and only in canonical form.
//! - Without an allowlist, every endpoint is accepted except the refused classes:
//!   unspecified (`0.0.0.0/8`, `::`), broadcast, multicast, link-local (`169.254.0.0/16`,
//!   `fe80::/10`) and cloud metadata addresses and names. Loopback and private ranges are
//!   accepted (tests and the demo run on 127.0.0.1).
//! - With an allowlist, an endpoint is accepted only if a pattern matches it.
//! - A refused class is accepted only through a pattern that names it *explicitly*: an
//!   exact endpoint or `host:port`/`host:*` of that very host, or a network lying inside
//!   the class (`169.254.0.0/16:*` admits link-local addresses but not the metadata address
//!   169.254.169.254, which is a class of its own). Wide networks (`0.0.0.0/0:*`) and
//!   subdomain patterns never let a refused class through.
//! - NAT64 addresses (`64:ff9b::/96`) are judged by the IPv4 address they embed.
//!
//! Limits: names are not resolved, so a name that resolves to a refused address is not
//! caught here; an allowlist of names and networks is the control for that.
//!
//! Pattern forms (`host` as in an endpoint: a name, four octets, or `[IPv6]`):
//!
//! | pattern | matches |
//! |---|---|
//! | `http://bank.internal:7001` | that endpoint only (scheme included) |
//! | `bank.internal:7001`, `bank.internal:*` | that host, on that port or any port, either scheme |
//! | `*.bank.internal:7001`, `*.bank.internal:*` | names below `bank.internal` (not `bank.internal` itself) |
//! | `10.0.0.0/8:*`, `[fd00::/8]:7001` | addresses in the network (never names) |

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use treaty_sdk::endpoint::{Endpoint, EndpointError, Host, parse_port, split_host_port};
use treaty_sdk::limits::{FieldError, MAX_ENDPOINT_BYTES, parse_endpoint, quote_input};

/// Most `--allow-endpoint` patterns.
pub const MAX_ALLOW_PATTERNS: usize = 1024;

/// The address policy and the optional allowlist.
#[derive(Debug, Clone, Default)]
pub struct EndpointPolicy {
    allow: Vec<AllowPattern>,
}

impl EndpointPolicy {
    /// A policy from `--allow-endpoint` patterns; none means no allowlist.
    pub fn new(patterns: &[String]) -> Result<Self, PatternError> {
        if patterns.len() > MAX_ALLOW_PATTERNS {
            return Err(PatternError::TooMany {
                count: patterns.len(),
            });
        }
        let allow = patterns
            .iter()
            .enumerate()
            .map(|(index, text)| {
                AllowPattern::parse(text).map_err(|reason| PatternError::Invalid {
                    index,
                    quoted: quote_input(text),
                    reason,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { allow })
    }

    /// The canonical form of `endpoint` if the coordinator may call it; otherwise an
    /// error naming `field`.
    pub fn check(
        &self,
        field: impl std::fmt::Display + Copy,
        endpoint: &str,
    ) -> Result<String, FieldError> {
        let parsed = parse_endpoint(field, endpoint)?;
        self.admit(&parsed).map_err(|refusal| {
            FieldError::new(field, format!("{} {refusal}", quote_input(endpoint)))
        })?;
        Ok(parsed.to_string())
    }

    fn admit(&self, endpoint: &Endpoint) -> Result<(), Refusal> {
        let refused = refused_class(endpoint.host());
        if self.allow.is_empty() {
            return match refused {
                None => Ok(()),
                Some(refused) => Err(Refusal::Class(refused.class)),
            };
        }
        let admitted = self.allow.iter().any(|pattern| {
            pattern.matches(endpoint)
                && refused
                    .as_ref()
                    .is_none_or(|refused| pattern.names_explicitly(refused))
        });
        match (admitted, refused) {
            (true, _) => Ok(()),
            (false, Some(refused)) => Err(Refusal::Class(refused.class)),
            (false, None) => Err(Refusal::NotAllowed),
        }
    }
}

/// Why a valid endpoint may not be called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Class(Class),
    NotAllowed,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Class(class) => write!(
                f,
                "is {class}; the coordinator calls it only if an --allow-endpoint pattern names it"
            ),
            Self::NotAllowed => f.write_str("matches no --allow-endpoint pattern"),
        }
    }
}

/// The classes of hosts refused by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Unspecified,
    Broadcast,
    Multicast,
    LinkLocal,
    Metadata,
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unspecified => "an unspecified address",
            Self::Broadcast => "a broadcast address",
            Self::Multicast => "a multicast address",
            Self::LinkLocal => "a link-local address",
            Self::Metadata => "a cloud metadata service",
        })
    }
}

/// A refused host's class, and the network the class covers (none for names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Refused {
    class: Class,
    range: Option<Network>,
}

/// Names of cloud metadata services (GCP; AWS; the short forms their resolvers answer).
const METADATA_NAMES: [&str; 4] = [
    "metadata",
    "metadata.google.internal",
    "instance-data",
    "instance-data.ec2.internal",
];

/// Refused networks, most specific first (the first match is the class).
const REFUSED: [(Class, Network); 11] = [
    // AWS, GCP, Azure, OpenStack, Oracle, DigitalOcean...
    (
        Class::Metadata,
        Network::v4(Ipv4Addr::new(169, 254, 169, 254), 32),
    ),
    // AWS ECS task metadata.
    (
        Class::Metadata,
        Network::v4(Ipv4Addr::new(169, 254, 170, 2), 32),
    ),
    // Alibaba Cloud.
    (
        Class::Metadata,
        Network::v4(Ipv4Addr::new(100, 100, 100, 200), 32),
    ),
    // AWS's IPv6 metadata address.
    (
        Class::Metadata,
        Network::v6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254), 128),
    ),
    // "This network": 0.0.0.0 reaches the local host on Linux.
    (Class::Unspecified, Network::v4(Ipv4Addr::UNSPECIFIED, 8)),
    (Class::Unspecified, Network::v6(Ipv6Addr::UNSPECIFIED, 128)),
    (Class::Broadcast, Network::v4(Ipv4Addr::BROADCAST, 32)),
    (
        Class::Multicast,
        Network::v4(Ipv4Addr::new(224, 0, 0, 0), 4),
    ),
    (
        Class::Multicast,
        Network::v6(Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8),
    ),
    (
        Class::LinkLocal,
        Network::v4(Ipv4Addr::new(169, 254, 0, 0), 16),
    ),
    (
        Class::LinkLocal,
        Network::v6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
    ),
];

/// The well-known NAT64 prefix `64:ff9b::/96` (RFC 6052).
const NAT64: Network = Network::v6(Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96);

fn refused_class(host: &Host) -> Option<Refused> {
    let address = match host {
        Host::Name(name) => {
            return METADATA_NAMES.contains(&name.as_str()).then_some(Refused {
                class: Class::Metadata,
                range: None,
            });
        }
        Host::Ipv4(address) => IpAddr::V4(*address),
        Host::Ipv6(address) if NAT64.contains(IpAddr::V6(*address)) => {
            let [.., a, b, c, d] = address.octets();
            // The class of the embedded address, over the NAT64 image of its range.
            return refused_address(IpAddr::V4(Ipv4Addr::new(a, b, c, d))).map(|refused| Refused {
                range: refused.range.map(Network::nat64_image),
                ..refused
            });
        }
        Host::Ipv6(address) => IpAddr::V6(*address),
    };
    refused_address(address)
}

fn refused_address(address: IpAddr) -> Option<Refused> {
    REFUSED
        .iter()
        .find(|(_, range)| range.contains(address))
        .map(|&(class, range)| Refused {
            class,
            range: Some(range),
        })
}

/// An IP network: the address with its host bits clear, and the prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Network {
    address: IpAddr,
    prefix: u8,
}

impl Network {
    const fn v4(address: Ipv4Addr, prefix: u8) -> Self {
        Self {
            address: IpAddr::V4(address),
            prefix,
        }
    }

    const fn v6(address: Ipv6Addr, prefix: u8) -> Self {
        Self {
            address: IpAddr::V6(address),
            prefix,
        }
    }

    /// Parses `a.b.c.d/n` or `ipv6/n` (no brackets); host bits must be clear.
    fn parse(text: &str) -> Result<Self, PatternReason> {
        let (address, prefix) = text.split_once('/').ok_or(PatternReason::Network)?;
        let address: IpAddr = address.parse().map_err(|_| PatternReason::Network)?;
        if prefix.is_empty()
            || (prefix.len() > 1 && prefix.starts_with('0'))
            || !prefix.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(PatternReason::Network);
        }
        let prefix: u8 = prefix.parse().map_err(|_| PatternReason::Network)?;
        let network = Self { address, prefix };
        if prefix > network.bits() {
            return Err(PatternReason::Network);
        }
        if network.masked(address) != bits_of(address) {
            return Err(PatternReason::HostBits);
        }
        let mapped = match address {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some() && prefix >= 96,
            IpAddr::V4(_) => false,
        };
        if mapped {
            // Endpoints name these addresses in IPv4 form, so it would never match.
            return Err(PatternReason::MappedNetwork);
        }
        Ok(network)
    }

    fn bits(&self) -> u8 {
        match self.address {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        }
    }

    /// `address`'s bits with everything past this network's prefix cleared.
    fn masked(&self, address: IpAddr) -> u128 {
        let shift = u32::from(self.bits() - self.prefix);
        bits_of(address)
            .checked_shr(shift)
            .and_then(|high| high.checked_shl(shift))
            .unwrap_or(0)
    }

    fn contains(&self, address: IpAddr) -> bool {
        address.is_ipv4() == self.address.is_ipv4() && self.masked(address) == bits_of(self.address)
    }

    /// Whether `inner` lies entirely inside this network.
    fn covers(&self, inner: &Network) -> bool {
        inner.prefix >= self.prefix && self.contains(inner.address)
    }

    /// The IPv6 network NAT64 translates this IPv4 network to.
    fn nat64_image(self) -> Self {
        let bits = bits_of(NAT64.address) | bits_of(self.address);
        Self::v6(Ipv6Addr::from(bits), self.prefix + NAT64.prefix)
    }
}

fn bits_of(address: IpAddr) -> u128 {
    match address {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port {
    Any,
    Exactly(u16),
}

impl Port {
    fn parse(text: &str) -> Result<Self, EndpointError> {
        if text == "*" {
            return Ok(Self::Any);
        }
        parse_port(text).map(Self::Exactly)
    }

    fn matches(self, port: u16) -> bool {
        self == Self::Any || self == Self::Exactly(port)
    }
}

/// One `--allow-endpoint` pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AllowPattern {
    Exact(Endpoint),
    Host {
        host: Host,
        port: Port,
    },
    /// Names strictly below `domain` (`*.domain`).
    Subdomains {
        domain: String,
        port: Port,
    },
    Network {
        network: Network,
        port: Port,
    },
}

impl AllowPattern {
    fn parse(text: &str) -> Result<Self, PatternReason> {
        if text.len() > MAX_ENDPOINT_BYTES {
            return Err(PatternReason::Endpoint(EndpointError::TooLong {
                bytes: text.len(),
            }));
        }
        if text.contains("://") {
            return text
                .parse()
                .map(Self::Exact)
                .map_err(PatternReason::Endpoint);
        }
        let (host, port) = split_host_port(text).map_err(PatternReason::Endpoint)?;
        let port = Port::parse(port).map_err(PatternReason::Endpoint)?;
        if let Some(domain) = host.strip_prefix("*.") {
            return match Host::parse(domain).map_err(PatternReason::Endpoint)? {
                Host::Name(domain) => Ok(Self::Subdomains { domain, port }),
                Host::Ipv4(_) | Host::Ipv6(_) => Err(PatternReason::WildcardAddress),
            };
        }
        let bracketed = host
            .strip_prefix('[')
            .and_then(|inner| inner.strip_suffix(']'));
        let network_text = bracketed.filter(|inner| inner.contains('/')).or_else(|| {
            // An IPv4 network is written bare: 10.0.0.0/8:*.
            host.contains('/').then_some(host)
        });
        if let Some(network_text) = network_text {
            let network = Network::parse(network_text)?;
            if network.address.is_ipv6() && bracketed.is_none() {
                return Err(PatternReason::Network);
            }
            return Ok(Self::Network { network, port });
        }
        if host.contains('*') {
            return Err(PatternReason::Wildcard);
        }
        let host = Host::parse(host).map_err(PatternReason::Endpoint)?;
        Ok(Self::Host { host, port })
    }

    fn matches(&self, endpoint: &Endpoint) -> bool {
        match self {
            Self::Exact(exact) => exact == endpoint,
            Self::Host { host, port } => host == endpoint.host() && port.matches(endpoint.port()),
            Self::Subdomains { domain, port } => {
                let Host::Name(name) = endpoint.host() else {
                    return false;
                };
                name.strip_suffix(domain.as_str())
                    .is_some_and(|below| below.len() > 1 && below.ends_with('.'))
                    && port.matches(endpoint.port())
            }
            Self::Network { network, port } => {
                endpoint.host().ip().is_some_and(|ip| network.contains(ip))
                    && port.matches(endpoint.port())
            }
        }
    }

    /// Whether this pattern, matching a host of a refused class, names it explicitly.
    fn names_explicitly(&self, refused: &Refused) -> bool {
        match self {
            Self::Exact(_) | Self::Host { .. } => true,
            Self::Subdomains { .. } => false,
            Self::Network { network, .. } => {
                refused.range.is_some_and(|range| range.covers(network))
            }
        }
    }
}

/// A bad `--allow-endpoint` list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("{count} patterns; the limit is {MAX_ALLOW_PATTERNS}")]
    TooMany { count: usize },
    #[error(
        "pattern {index} ({quoted}): {reason}; the forms are http(s)://host:port, host:port, host:*, *.domain:port, *.domain:*, a.b.c.d/n:port, [ipv6/n]:port (or :* for any port)"
    )]
    Invalid {
        index: usize,
        quoted: String,
        reason: PatternReason,
    },
}

/// Why one pattern is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternReason {
    #[error("{0}")]
    Endpoint(EndpointError),
    #[error("a network is a.b.c.d/n or [ipv6/n], with n at most 32 or 128")]
    Network,
    #[error("the network's address has bits set past its prefix")]
    HostBits,
    #[error("an IPv4-mapped network is written as the IPv4 network (a.b.c.d/n)")]
    MappedNetwork,
    #[error("`*.` takes a domain name, not an address (use a network: a.b.c.d/n)")]
    WildcardAddress,
    #[error("`*` may only stand for a port, or begin a name as `*.`")]
    Wildcard,
}

#[cfg(test)]
#[path = "endpoint_policy_tests.rs"]
mod tests;
