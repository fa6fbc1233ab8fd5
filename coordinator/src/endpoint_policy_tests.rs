//! Tests of the endpoint policy: every refused class in several spellings, each pattern
//! form matching and not matching, and the patterns' parse errors.

use super::*;

fn policy(patterns: &[&str]) -> EndpointPolicy {
    let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
    EndpointPolicy::new(&patterns).unwrap()
}

fn admits(policy: &EndpointPolicy, endpoint: &str) -> bool {
    policy.check("endpoint", endpoint).is_ok()
}

#[test]
fn without_an_allowlist_loopback_private_and_names_are_accepted_in_canonical_form() {
    let open = EndpointPolicy::default();
    for (endpoint, canonical) in [
        ("http://127.0.0.1:7000", "http://127.0.0.1:7000"),
        ("http://[::1]:7000/", "http://[::1]:7000"),
        ("http://10.1.2.3:80", "http://10.1.2.3:80"),
        ("http://192.168.0.1:80", "http://192.168.0.1:80"),
        ("http://[fd12::1]:80", "http://[fd12::1]:80"),
        ("HTTPS://Bank.Example.:443", "https://bank.example:443"),
        ("http://localhost:7420", "http://localhost:7420"),
        ("http://metadata.example:80", "http://metadata.example:80"),
    ] {
        assert_eq!(
            open.check("e", endpoint).as_deref(),
            Ok(canonical),
            "{endpoint}"
        );
    }
}

#[test]
fn every_refused_class_is_refused_by_default_in_every_spelling() {
    let open = EndpointPolicy::default();
    for (endpoint, class) in [
        ("http://0.0.0.0:80", Class::Unspecified),
        ("http://0.1.2.3:80", Class::Unspecified),
        ("http://[::]:80", Class::Unspecified),
        ("http://[::ffff:0.0.0.0]:80", Class::Unspecified),
        ("http://255.255.255.255:80", Class::Broadcast),
        ("http://224.0.0.1:80", Class::Multicast),
        ("http://239.255.255.250:80", Class::Multicast),
        ("http://[ff02::1]:80", Class::Multicast),
        ("http://169.254.1.1:80", Class::LinkLocal),
        ("http://[::ffff:169.254.1.1]:80", Class::LinkLocal),
        ("http://[fe80::1]:80", Class::LinkLocal),
        ("http://[febf::1]:80", Class::LinkLocal),
        ("http://169.254.169.254:80", Class::Metadata),
        ("http://[::ffff:a9fe:a9fe]:80", Class::Metadata),
        ("http://[64:ff9b::169.254.169.254]:80", Class::Metadata),
        ("http://[64:ff9b::a9fe:101]:80", Class::LinkLocal),
        ("http://169.254.170.2:80", Class::Metadata),
        ("http://100.100.100.200:80", Class::Metadata),
        ("http://[fd00:ec2::254]:80", Class::Metadata),
        ("http://metadata.google.internal:80", Class::Metadata),
        ("http://Metadata.Google.Internal.:80", Class::Metadata),
        ("http://metadata:80", Class::Metadata),
        ("http://instance-data:80", Class::Metadata),
    ] {
        let err = open.check("branches[1].endpoint", endpoint).unwrap_err();
        assert_eq!(err.field, "branches[1].endpoint");
        assert!(
            err.message.contains(&format!("is {class};")),
            "{endpoint}: {}",
            err.message
        );
    }
    // Next to, but outside, the refused ranges.
    for endpoint in [
        "http://1.0.0.0:80",
        "http://169.253.255.255:80",
        "http://169.255.0.0:80",
        "http://223.255.255.255:80",
        "http://255.255.255.254:80",
        "http://[fec0::1]:80",
        "http://[64:ff9b::a00:1]:80",
        "http://100.100.100.201:80",
    ] {
        assert!(admits(&open, endpoint), "{endpoint}");
    }
}

#[test]
fn with_an_allowlist_only_matching_endpoints_are_accepted() {
    let allow = policy(&[
        "http://bank.internal:7001",
        "ledger.internal:7002",
        "cache.internal:*",
        "*.shop.internal:8000",
        "*.svc.internal:*",
        "10.0.0.0/8:*",
        "192.168.1.0/24:9000",
        "[fd00::/8]:7000",
    ]);
    for endpoint in [
        "http://bank.internal:7001/",
        "http://ledger.internal:7002",
        "https://ledger.internal:7002",
        "http://cache.internal:1",
        "http://Cache.Internal.:65535",
        "http://pay.shop.internal:8000",
        "http://a.b.shop.internal:8000",
        "https://x.svc.internal:443",
        "http://10.255.0.1:80",
        "http://[::ffff:10.0.0.1]:80",
        "http://192.168.1.77:9000",
        "http://[fd00::1]:7000",
    ] {
        assert!(admits(&allow, endpoint), "{endpoint}");
    }
    for endpoint in [
        "https://bank.internal:7001",
        "http://bank.internal:7002",
        "http://ledger.internal:7003",
        "http://shop.internal:8000",
        "http://pay.shop.internal:8001",
        "http://evilshop.internal:8000",
        "http://svc.internal:80",
        "http://11.0.0.1:80",
        "http://192.168.2.1:9000",
        "http://192.168.1.1:9001",
        "http://[fe00::1]:7000",
        "http://127.0.0.1:7000",
        "http://localhost:7000",
    ] {
        let err = allow.check("e", endpoint).unwrap_err();
        assert!(
            err.message.ends_with("matches no --allow-endpoint pattern"),
            "{endpoint}: {}",
            err.message
        );
    }
}

#[test]
fn refused_classes_pass_only_through_patterns_that_name_them() {
    let wide = policy(&["0.0.0.0/0:*", "[::/0]:*", "*.google.internal:*"]);
    assert!(admits(&wide, "http://8.8.8.8:53"));
    for endpoint in [
        "http://169.254.1.1:80",
        "http://169.254.169.254:80",
        "http://[fe80::1]:80",
        "http://metadata.google.internal:80",
        "http://0.0.0.0:80",
    ] {
        assert!(!admits(&wide, endpoint), "{endpoint}");
    }
    let link_local = policy(&["169.254.0.0/16:*", "[fe80::/10]:*"]);
    assert!(admits(&link_local, "http://169.254.1.1:80"));
    assert!(admits(&link_local, "http://[fe80::1]:80"));
    // The metadata address lies in link-local, but is its own class.
    assert!(!admits(&link_local, "http://169.254.169.254:80"));
    let metadata = policy(&["169.254.169.254:80", "metadata.google.internal:*"]);
    assert!(admits(&metadata, "http://169.254.169.254:80"));
    assert!(admits(&metadata, "http://[::ffff:169.254.169.254]:80"));
    assert!(!admits(&metadata, "http://169.254.169.254:81"));
    assert!(admits(&metadata, "http://metadata.google.internal:80"));
    assert!(admits(
        &policy(&["169.254.169.254/32:*"]),
        "http://169.254.169.254:80"
    ));
    assert!(admits(
        &policy(&["[64:ff9b::a9fe:0/112]:*"]),
        "http://[64:ff9b::a9fe:101]:80"
    ));
    assert!(admits(&policy(&["http://[::]:80"]), "http://[0::0]:80"));
}

#[test]
fn patterns_are_parsed_strictly_and_errors_name_the_pattern() {
    for (pattern, reason) in [
        (
            "bank.internal",
            PatternReason::Endpoint(EndpointError::MissingPort),
        ),
        (
            "bank.internal:",
            PatternReason::Endpoint(EndpointError::MissingPort),
        ),
        (
            "bank.internal:07",
            PatternReason::Endpoint(EndpointError::Port),
        ),
        (
            "bank.internal:**",
            PatternReason::Endpoint(EndpointError::Port),
        ),
        ("*:*", PatternReason::Wildcard),
        ("*bank.internal:*", PatternReason::Wildcard),
        ("a.*.internal:*", PatternReason::Wildcard),
        ("*.10.0.0.1:*", PatternReason::WildcardAddress),
        ("10.0.0.1/8:*", PatternReason::HostBits),
        ("10.0.0.0/33:*", PatternReason::Network),
        ("10.0.0.0/08:*", PatternReason::Network),
        ("10.0.0.0/:*", PatternReason::Network),
        ("10.0/8:*", PatternReason::Network),
        ("[fd00::1/8]:*", PatternReason::HostBits),
        ("[fd00::/129]:*", PatternReason::Network),
        ("[::ffff:10.0.0.0/104]:*", PatternReason::MappedNetwork),
        (
            "127.1:80",
            PatternReason::Endpoint(EndpointError::NumericHost),
        ),
        (
            "http://bank.internal",
            PatternReason::Endpoint(EndpointError::MissingPort),
        ),
        (
            "ftp://bank.internal:1",
            PatternReason::Endpoint(EndpointError::Scheme),
        ),
        (
            &format!("{}:*", "a".repeat(MAX_ENDPOINT_BYTES)),
            PatternReason::Endpoint(EndpointError::TooLong {
                bytes: MAX_ENDPOINT_BYTES + 2,
            }),
        ),
    ] {
        let error = EndpointPolicy::new(&[pattern.to_string()]).unwrap_err();
        assert_eq!(
            error,
            PatternError::Invalid {
                index: 0,
                quoted: quote_input(pattern),
                reason
            },
            "{pattern}"
        );
    }
    let error = EndpointPolicy::new(&["a:1".into(), "b\u{7}:1".into()]).unwrap_err();
    assert!(
        error.to_string().starts_with(r#"pattern 1 ("b\u{7}:1"): "#),
        "{error}"
    );
    let many = vec!["a:1".to_string(); MAX_ALLOW_PATTERNS + 1];
    assert!(matches!(
        EndpointPolicy::new(&many),
        Err(PatternError::TooMany { .. })
    ));
}

#[test]
fn networks_contain_what_their_prefix_says() {
    let net = Network::parse("10.0.0.0/8").unwrap();
    assert!(net.contains("10.255.255.255".parse().unwrap()));
    assert!(!net.contains("11.0.0.0".parse().unwrap()));
    assert!(
        !net.contains("::a00:1".parse().unwrap()),
        "families never mix"
    );
    let all = Network::parse("0.0.0.0/0").unwrap();
    assert!(all.contains("255.255.255.255".parse().unwrap()));
    let host = Network::parse("1.2.3.4/32").unwrap();
    assert!(host.contains("1.2.3.4".parse().unwrap()));
    assert!(!host.contains("1.2.3.5".parse().unwrap()));
    let v6 = Network::parse("fe80::/10").unwrap();
    assert!(v6.contains("febf:ffff::1".parse().unwrap()));
    assert!(!v6.contains("fec0::1".parse().unwrap()));
    assert!(
        Network::parse("::/0")
            .unwrap()
            .contains("::1".parse().unwrap())
    );
    assert!(net.covers(&Network::parse("10.1.0.0/16").unwrap()));
    assert!(!net.covers(&Network::parse("0.0.0.0/0").unwrap()));
}
