//! Endpoints (`http://host:port`, `https://host:port`) parsed strictly into one canonical
//! form.
//!
//! Why strict: the coordinator keys its channels, its address policy and its allowlist by
//! endpoint, so two spellings of one target must not slip past a rule written for the
//! other. Resolvers accept far more than RFC 1123 (`127.1`, `2130706433`, `0x7f.0.0.1` and
//! `0177.0.0.1` all reach 127.0.0.1 through `getaddrinfo`), so rather than teach every
//! rule about them, this parser refuses them.
//!
//! Invariants:
//! - Every accepted input maps to one canonical string, and inputs naming the same
//!   scheme, host and port map to the same one: scheme and name lower-cased, one trailing
//!   dot and one trailing `/` dropped, IPv6 in std's RFC 5952 form, an IPv4-mapped IPv6
//!   address written as the IPv4 address it is.
//! - The canonical form parses to itself, and is never longer than
//!   [`MAX_ENDPOINT_BYTES`] (names only shrink; an IPv6 host is at most 41 bytes).
//! - An accepted endpoint holds only ASCII letters, digits and `.-:/[]`: no control
//!   characters, whitespace, percent-encoding, user information, path, query or fragment.
//! - A host is a DNS name (labels of `[a-z0-9-]`, 1–63 bytes, not starting or ending with
//!   `-`, at most 253 bytes), four decimal octets without leading zeros, or a bracketed
//!   IPv6 address without zone. A name whose last label is numeric is not a name: it must
//!   be four octets.
//!
//! Names are not resolved here: `localhost` and `127.0.0.1` stay two keys.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::limits::MAX_ENDPOINT_BYTES;

/// Longest DNS name, in bytes, without the trailing dot (RFC 1035).
const MAX_NAME_BYTES: usize = 253;
/// Longest DNS label, in bytes.
const MAX_LABEL_BYTES: usize = 63;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

/// Where an endpoint points: a name, or an address. An IPv4-mapped IPv6 address is
/// always `Ipv4`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name, lower-case, without trailing dot.
    Name(String),
    Ipv4(Ipv4Addr),
    Ipv6(Ipv6Addr),
}

impl Host {
    /// Parses a host as it appears in an endpoint: a name, four octets, or `[IPv6]`.
    pub fn parse(text: &str) -> Result<Self, EndpointError> {
        if text.is_empty() {
            return Err(EndpointError::MissingHost);
        }
        if let Some(inner) = text.strip_prefix('[') {
            let inner = inner.strip_suffix(']').ok_or(EndpointError::BadIpv6)?;
            return ipv6_host(inner);
        }
        if text.contains(':') {
            return Err(EndpointError::UnbracketedIpv6);
        }
        let name = text.strip_suffix('.').unwrap_or(text);
        if ends_in_a_number(name) {
            // Only the plain dotted quad, and not with a trailing dot: what a resolver
            // makes of the other spellings is its own business.
            if name.len() != text.len() {
                return Err(EndpointError::NumericHost);
            }
            return Ipv4Addr::from_str(name)
                .map(Self::Ipv4)
                .map_err(|_| EndpointError::NumericHost);
        }
        dns_name(name).map(Self::Name)
    }

    /// The address, if the host is one.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Self::Name(_) => None,
            Self::Ipv4(address) => Some(IpAddr::V4(*address)),
            Self::Ipv6(address) => Some(IpAddr::V6(*address)),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(name) => f.write_str(name),
            Self::Ipv4(address) => write!(f, "{address}"),
            Self::Ipv6(address) => write!(f, "[{address}]"),
        }
    }
}

/// An endpoint in canonical form; `Display` writes it (`http://host:port`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    scheme: Scheme,
    host: Host,
    port: u16,
}

impl Endpoint {
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    pub fn host(&self) -> &Host {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme.as_str(), self.host, self.port)
    }
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() {
            return Err(EndpointError::Empty);
        }
        if text.len() > MAX_ENDPOINT_BYTES {
            return Err(EndpointError::TooLong { bytes: text.len() });
        }
        if let Some(character) = text.chars().find(|&c| !allowed_character(c)) {
            return Err(match character {
                '@' => EndpointError::UserInfo,
                '?' | '#' => EndpointError::PathQueryOrFragment,
                character => EndpointError::Character { character },
            });
        }
        let (scheme, rest) = text.split_once("://").ok_or(EndpointError::Scheme)?;
        let scheme = if scheme.eq_ignore_ascii_case("http") {
            Scheme::Http
        } else if scheme.eq_ignore_ascii_case("https") {
            Scheme::Https
        } else {
            return Err(EndpointError::Scheme);
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('/') {
            return Err(EndpointError::PathQueryOrFragment);
        }
        let (host, port) = split_host_port(authority)?;
        Ok(Self {
            scheme,
            host: Host::parse(host)?,
            port: parse_port(port)?,
        })
    }
}

/// Splits `host:port`, where the host may be a bracketed IPv6 address.
pub fn split_host_port(authority: &str) -> Result<(&str, &str), EndpointError> {
    if authority.starts_with('[') {
        let end = authority.find(']').ok_or(EndpointError::BadIpv6)?;
        let (host, rest) = authority.split_at(end + 1);
        let port = rest.strip_prefix(':').ok_or(EndpointError::MissingPort)?;
        return Ok((host, port));
    }
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or(EndpointError::MissingPort)?;
    if host.contains(':') {
        return Err(EndpointError::UnbracketedIpv6);
    }
    Ok((host, port))
}

/// A port: 1–65535 in decimal, without sign or leading zeros.
pub fn parse_port(text: &str) -> Result<u16, EndpointError> {
    if text.is_empty() {
        return Err(EndpointError::MissingPort);
    }
    if text.starts_with('0') || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(EndpointError::Port);
    }
    text.parse::<u16>().map_err(|_| EndpointError::Port)
}

/// Why an endpoint was refused. The messages do not repeat the input (callers quote it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("must not be empty")]
    Empty,
    #[error("is {bytes} bytes long; the limit is {MAX_ENDPOINT_BYTES}")]
    TooLong { bytes: usize },
    #[error(
        "contains {character:?}; only ASCII letters, digits and . - : / [ ] are allowed (no whitespace, control characters or percent-encoding)"
    )]
    Character { character: char },
    #[error("the scheme must be http:// or https://")]
    Scheme,
    #[error("user information (`user@`) is not allowed")]
    UserInfo,
    #[error("nothing but an optional `/` may follow the port (no path, query or fragment)")]
    PathQueryOrFragment,
    #[error("the host is missing")]
    MissingHost,
    #[error("the port is missing")]
    MissingPort,
    #[error("the port must be a number from 1 to 65535, without sign or leading zeros")]
    Port,
    #[error("an IPv6 address must be written in brackets, as in http://[::1]:7000")]
    UnbracketedIpv6,
    #[error("the brackets hold no IPv6 address (zone ids such as %eth0 are not allowed)")]
    BadIpv6,
    #[error(
        "IPv4-compatible IPv6 addresses (::a.b.c.d) are deprecated and ambiguous; write the IPv4 address"
    )]
    Ipv4CompatibleIpv6,
    #[error(
        "a numeric host must be four decimal octets without leading zeros, such as 127.0.0.1 (127.1, 2130706433, 0x7f.0.0.1 and 0177.0.0.1 are refused spellings of it)"
    )]
    NumericHost,
    #[error("the host is not a DNS name: {0}")]
    Name(&'static str),
}

fn allowed_character(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '/' | '[' | ']')
}

fn ipv6_host(text: &str) -> Result<Host, EndpointError> {
    let address = Ipv6Addr::from_str(text).map_err(|_| EndpointError::BadIpv6)?;
    if let Some(v4) = address.to_ipv4_mapped() {
        return Ok(Host::Ipv4(v4));
    }
    // ::a.b.c.d (not :: or ::1): once meant the IPv4 address, on some stacks still does.
    let segments = address.segments();
    if segments[..6] == [0; 6] && segments[6] != 0 {
        return Err(EndpointError::Ipv4CompatibleIpv6);
    }
    Ok(Host::Ipv6(address))
}

/// Whether a resolver would take `name` for an IPv4 address: its last label is decimal
/// digits or `0x` with hex digits (the WHATWG URL rule; no top-level domain is numeric).
fn ends_in_a_number(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    if !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    let hex = last.strip_prefix("0x").or_else(|| last.strip_prefix("0X"));
    hex.is_some_and(|digits| digits.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn dns_name(name: &str) -> Result<String, EndpointError> {
    if name.len() > MAX_NAME_BYTES {
        return Err(EndpointError::Name("longer than 253 bytes"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(EndpointError::Name("a label is empty"));
        }
        if label.len() > MAX_LABEL_BYTES {
            return Err(EndpointError::Name("a label is longer than 63 bytes"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(EndpointError::Name(
                "labels hold only letters, digits and hyphens",
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(EndpointError::Name("a label starts or ends with a hyphen"));
        }
    }
    Ok(name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(text: &str) -> Result<String, EndpointError> {
        text.parse::<Endpoint>().map(|e| e.to_string())
    }

    #[test]
    fn spellings_of_one_target_map_to_one_canonical_string_or_are_refused() {
        // The spellings of http://127.0.0.1:7000 and of one named host.
        for same in [
            "http://127.0.0.1:7000",
            "HTTP://127.0.0.1:7000",
            "http://127.0.0.1:7000/",
            "http://[::ffff:127.0.0.1]:7000",
            "http://[::FFFF:7F00:1]:7000",
            "http://[0:0:0:0:0:ffff:7f00:0001]:7000/",
        ] {
            assert_eq!(
                canonical(same).as_deref(),
                Ok("http://127.0.0.1:7000"),
                "{same}"
            );
        }
        for same in [
            "https://payments.internal:443",
            "HTTPS://Payments.Internal:443",
            "https://payments.internal.:443",
            "https://PAYMENTS.INTERNAL.:443/",
        ] {
            assert_eq!(
                canonical(same).as_deref(),
                Ok("https://payments.internal:443"),
                "{same}"
            );
        }
        for same in [
            "http://[::1]:7000",
            "http://[0:0::1]:7000",
            "http://[0000::0001]:7000",
        ] {
            assert_eq!(
                canonical(same).as_deref(),
                Ok("http://[::1]:7000"),
                "{same}"
            );
        }
        for (refused, why) in [
            ("http://127.1:7000", EndpointError::NumericHost),
            ("http://2130706433:7000", EndpointError::NumericHost),
            ("http://0x7f.0.0.1:7000", EndpointError::NumericHost),
            ("http://0X7F000001:7000", EndpointError::NumericHost),
            ("http://0177.0.0.1:7000", EndpointError::NumericHost),
            ("http://127.0.0.01:7000", EndpointError::NumericHost),
            ("http://127.0.0.1.:7000", EndpointError::NumericHost),
            ("http://1.2.3.4.5:7000", EndpointError::NumericHost),
            ("http://256.0.0.1:7000", EndpointError::NumericHost),
            ("http://a.0x10:7000", EndpointError::NumericHost),
            ("http://127.0.0.1:07000", EndpointError::Port),
            (
                "http://127.0.0.1:+7000",
                EndpointError::Character { character: '+' },
            ),
            (
                "http://[::127.0.0.1]:7000",
                EndpointError::Ipv4CompatibleIpv6,
            ),
            ("http://[::7f00:1]:7000", EndpointError::Ipv4CompatibleIpv6),
            ("http://[::ffff:127.0.0.01]:7000", EndpointError::BadIpv6),
            (
                "http://127.0.0.1:7000//",
                EndpointError::PathQueryOrFragment,
            ),
            (
                "http://%31%32%37.0.0.1:7000",
                EndpointError::Character { character: '%' },
            ),
        ] {
            assert_eq!(canonical(refused), Err(why), "{refused}");
        }
    }

    #[test]
    fn the_canonical_form_parses_to_itself() {
        for text in [
            "http://127.0.0.1:1",
            "https://a-b.c0.example:65535",
            "http://[fe80::1]:80",
            "http://[2001:db8::8:800:200c:417a]:80",
            "http://[1::2:3:4:5:6:7]:80",
            "http://localhost:7420",
            "http://x:1",
        ] {
            let once = canonical(text).unwrap();
            assert_eq!(canonical(&once).as_deref(), Ok(once.as_str()), "{text}");
            assert!(once.len() <= MAX_ENDPOINT_BYTES);
        }
        // The longest name that fits the endpoint limit with a trailing dot and slash.
        let name_bytes = MAX_ENDPOINT_BYTES - "https://.:65535/".len();
        let name = ["a".repeat(63), "b".repeat(63), "c".repeat(63)].join(".");
        let name = format!("{name}.{}", "d".repeat(name_bytes - name.len() - 1));
        let text = format!("https://{name}.:65535/");
        assert_eq!(text.len(), MAX_ENDPOINT_BYTES);
        let once = canonical(&text).unwrap();
        assert_eq!(once, format!("https://{name}:65535"));
        assert_eq!(canonical(&once), Ok(once.clone()));
    }

    #[test]
    fn each_malformed_part_is_refused_with_its_reason() {
        for (text, why) in [
            ("", EndpointError::Empty),
            ("127.0.0.1:50051", EndpointError::Scheme),
            ("ftp://host:1", EndpointError::Scheme),
            ("http:/host:1", EndpointError::Scheme),
            ("http://host", EndpointError::MissingPort),
            ("http://host:", EndpointError::MissingPort),
            ("http://:80", EndpointError::MissingHost),
            ("http://host:0", EndpointError::Port),
            ("http://host:65536", EndpointError::Port),
            ("http://host:99999", EndpointError::Port),
            ("http://host:-1", EndpointError::Port),
            ("http://host:80/path", EndpointError::PathQueryOrFragment),
            ("http://host:80?q", EndpointError::PathQueryOrFragment),
            ("http://host:80#f", EndpointError::PathQueryOrFragment),
            ("http://user@host:80", EndpointError::UserInfo),
            ("http://::1:80", EndpointError::UnbracketedIpv6),
            ("http://[::1:80", EndpointError::BadIpv6),
            ("http://[::1]80", EndpointError::MissingPort),
            (
                "http://[fe80::1%eth0]:80",
                EndpointError::Character { character: '%' },
            ),
            ("http://[not-v6]:80", EndpointError::BadIpv6),
            (
                "http://ho st:80",
                EndpointError::Character { character: ' ' },
            ),
            (
                "http://host:80\n",
                EndpointError::Character { character: '\n' },
            ),
            (
                "http://ho\u{1b}st:80",
                EndpointError::Character {
                    character: '\u{1b}',
                },
            ),
            (
                "http://hôst:80",
                EndpointError::Character { character: 'ô' },
            ),
            (
                "http://ho_st:80",
                EndpointError::Character { character: '_' },
            ),
            (
                "http://h\\st:80",
                EndpointError::Character { character: '\\' },
            ),
        ] {
            assert_eq!(canonical(text), Err(why), "{text:?}");
        }
        let too_long = format!("http://{}:80", "a".repeat(MAX_ENDPOINT_BYTES));
        assert_eq!(
            canonical(&too_long),
            Err(EndpointError::TooLong {
                bytes: too_long.len()
            })
        );
    }

    #[test]
    fn names_follow_rfc_1123() {
        assert!(
            canonical("http://1password.com:1").is_ok(),
            "labels may start with a digit"
        );
        assert!(
            canonical("http://xn--bcher-kva.example:1").is_ok(),
            "punycode"
        );
        for (text, why) in [
            ("http://a..b:1", "a label is empty"),
            ("http://.a:1", "a label is empty"),
            ("http://a..:1", "a label is empty"),
            ("http://-a.b:1", "a label starts or ends with a hyphen"),
            ("http://a-.b:1", "a label starts or ends with a hyphen"),
        ] {
            assert_eq!(canonical(text), Err(EndpointError::Name(why)), "{text}");
        }
        let long_label = format!("http://{}.b:1", "a".repeat(64));
        assert_eq!(
            canonical(&long_label),
            Err(EndpointError::Name("a label is longer than 63 bytes"))
        );
        // Beyond the endpoint limit already; hosts in allowlist patterns meet this rule.
        let longest = [vec!["a".repeat(63); 3].join("."), "b".repeat(61)].join(".");
        assert_eq!(longest.len(), MAX_NAME_BYTES);
        assert!(Host::parse(&longest).is_ok());
        assert_eq!(
            Host::parse(&format!("{longest}b")),
            Err(EndpointError::Name("longer than 253 bytes"))
        );
        assert!(
            Host::parse(&format!("{longest}.")).is_ok(),
            "a trailing dot is not counted"
        );
    }

    #[test]
    fn hosts_expose_their_address() {
        let endpoint: Endpoint = "http://[::ffff:10.0.0.1]:80".parse().unwrap();
        assert_eq!(
            endpoint.host().ip(),
            Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)))
        );
        assert_eq!(endpoint.scheme(), Scheme::Http);
        assert_eq!(endpoint.port(), 80);
        let named: Endpoint = "https://Bank.Example:7001".parse().unwrap();
        assert_eq!(named.host(), &Host::Name("bank.example".into()));
        assert_eq!(named.host().ip(), None);
    }
}
