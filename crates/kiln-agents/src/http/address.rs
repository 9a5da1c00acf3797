//! Host parsing and the IP address policy for `http_request`.
//!
//! Invariants: a host that could be read as an IPv4 address by any libc
//! (`inet_aton` forms: `2130706433`, `0177.0.0.1`, `0x7f.0.0.1`, `127.1`) is
//! parsed here as an address and never handed to a resolver as a name; a
//! host that looks numeric but is not a valid address is refused. Every
//! address is judged by [`classify_ip`], which looks through IPv4-mapped,
//! IPv4-compatible, 6to4 and NAT64 IPv6 forms to the IPv4 address inside.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest host name accepted (RFC 1035).
const MAX_NAME_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// A URL host: a DNS name or an IP address literal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// Lower-case ASCII name without a trailing dot.
    Name(String),
    Ip(IpAddr),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
        }
    }
}

/// Parses a URL host (`[v6]` in brackets). The error is a sentence for the
/// model.
pub fn parse_host(raw: &str) -> Result<Host, String> {
    if let Some(inner) = raw.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or_else(|| {
            "an IPv6 host must be written in brackets like [2001:db8::1]".to_owned()
        })?;
        return inner
            .parse::<Ipv6Addr>()
            .map(|ip| Host::Ip(IpAddr::V6(ip)))
            .map_err(|_| {
                "the bracketed host is not a valid IPv6 address (zone ids are not allowed)"
                    .to_owned()
            });
    }
    let lower = raw.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    if name.is_empty() {
        return Err("the URL has no host".to_owned());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(
            "the host may only contain letters, digits, `-`, `_` and `.` (write international names in their xn-- form)"
                .to_owned(),
        );
    }
    let labels: Vec<&str> = name.split('.').collect();
    let last = labels.last().copied().unwrap_or_default();
    if looks_numeric(last) {
        return parse_ipv4_inet_aton(name)
            .map(|ip| Host::Ip(IpAddr::V4(ip)))
            .ok_or_else(|| {
                "the host looks like an IPv4 address but is not a valid one".to_owned()
            });
    }
    if name.len() > MAX_NAME_LEN
        || labels
            .iter()
            .any(|l| l.is_empty() || l.len() > MAX_LABEL_LEN)
    {
        return Err("the host is not a valid DNS name".to_owned());
    }
    Ok(Host::Name(name.to_owned()))
}

/// Whether a label would be read as a number by an IPv4 parser
/// (decimal, octal or `0x` hex, including a bare `0x`).
fn looks_numeric(label: &str) -> bool {
    if let Some(hex) = label.strip_prefix("0x") {
        return hex.bytes().all(|b| b.is_ascii_hexdigit());
    }
    !label.is_empty() && label.bytes().all(|b| b.is_ascii_digit())
}

/// Parses one `inet_aton` part: `0x` hex, leading-zero octal, or decimal.
fn parse_ipv4_part(part: &str) -> Option<u64> {
    let (digits, radix) = if let Some(hex) = part.strip_prefix("0x") {
        (hex, 16)
    } else if part.len() > 1 && part.starts_with('0') {
        (&part[1..], 8)
    } else {
        (part, 10)
    };
    if digits.is_empty() {
        // `0x` alone is zero (as in WHATWG URL and glibc).
        return (radix == 16).then_some(0);
    }
    // from_str_radix accepts a leading `+`; insist on digits only.
    if !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// Parses `a`, `a.b`, `a.b.c` or `a.b.c.d` the way `inet_aton` does: the
/// last part fills all remaining bytes. `s` is already lower-case.
pub fn parse_ipv4_inet_aton(s: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = s.split('.').collect();
    if parts.is_empty() || parts.len() > 4 {
        return None;
    }
    let mut numbers = Vec::with_capacity(parts.len());
    for p in &parts {
        numbers.push(parse_ipv4_part(p)?);
    }
    let (last, leading) = numbers.split_last()?;
    if leading.iter().any(|&n| n > 255) {
        return None;
    }
    let last_bits = 8 * (4 - leading.len() as u32);
    if *last >= 1u64 << last_bits {
        return None;
    }
    let mut value = *last;
    for (i, n) in leading.iter().enumerate() {
        value |= n << (24 - 8 * i as u32);
    }
    u32::try_from(value).ok().map(Ipv4Addr::from)
}

/// What the address policy says about one IP address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpVerdict {
    /// A globally routable address.
    Public,
    /// A special-purpose address (loopback, private, link-local, …), refused
    /// unless the operator sets `allow_private`. The string names the range.
    Private(&'static str),
    /// Never a valid destination (unspecified, multicast, broadcast,
    /// reserved), refused even with `allow_private`.
    Forbidden(&'static str),
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn classify_v4(ip: Ipv4Addr) -> IpVerdict {
    use IpVerdict::{Forbidden, Private, Public};
    let table: &[([u8; 4], u32, IpVerdict)] = &[
        ([0, 0, 0, 0], 8, Forbidden("unspecified (0.0.0.0/8)")),
        ([255, 255, 255, 255], 32, Forbidden("broadcast")),
        ([224, 0, 0, 0], 4, Forbidden("multicast")),
        ([240, 0, 0, 0], 4, Forbidden("reserved (240.0.0.0/4)")),
        ([127, 0, 0, 0], 8, Private("loopback")),
        ([10, 0, 0, 0], 8, Private("private")),
        ([172, 16, 0, 0], 12, Private("private")),
        ([192, 168, 0, 0], 16, Private("private")),
        ([100, 64, 0, 0], 10, Private("shared (CGNAT)")),
        ([169, 254, 0, 0], 16, Private("link-local")),
        ([192, 0, 0, 0], 24, Private("IETF protocol assignment")),
        ([192, 0, 2, 0], 24, Private("documentation")),
        ([198, 51, 100, 0], 24, Private("documentation")),
        ([203, 0, 113, 0], 24, Private("documentation")),
        ([198, 18, 0, 0], 15, Private("benchmarking")),
        ([192, 88, 99, 0], 24, Private("6to4 relay anycast")),
    ];
    table
        .iter()
        .find(|(net, prefix, _)| in_v4(ip, *net, *prefix))
        .map_or(Public, |(_, _, verdict)| *verdict)
}

fn in_v6(ip: Ipv6Addr, net: Ipv6Addr, prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - prefix)
    };
    u128::from(ip) & mask == u128::from(net) & mask
}

fn v6(segments: [u16; 8]) -> Ipv6Addr {
    Ipv6Addr::from(segments)
}

fn embedded_v4(bits: u128, shift: u32) -> Ipv4Addr {
    // Truncation to the 32 bits at `shift` is the point.
    Ipv4Addr::from((bits >> shift) as u32)
}

fn classify_v6(ip: Ipv6Addr) -> IpVerdict {
    use IpVerdict::{Forbidden, Private, Public};
    let bits = u128::from(ip);
    if ip.is_unspecified() {
        return Forbidden("unspecified (::)");
    }
    if ip.is_loopback() {
        return Private("loopback");
    }
    // ::ffff:a.b.c.d — the socket would really talk IPv4 to a.b.c.d.
    if in_v6(ip, v6([0, 0, 0, 0, 0, 0xffff, 0, 0]), 96) {
        return classify_v4(embedded_v4(bits, 0));
    }
    // ::a.b.c.d (deprecated IPv4-compatible): never legitimate, so refused
    // unless allow_private even when the embedded address is public.
    if in_v6(ip, Ipv6Addr::UNSPECIFIED, 96) {
        return match classify_v4(embedded_v4(bits, 0)) {
            Public => Private("IPv4-compatible IPv6 (deprecated)"),
            other => other,
        };
    }
    // NAT64 well-known prefix: the translator connects to the embedded IPv4.
    if in_v6(ip, v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0]), 96) {
        return classify_v4(embedded_v4(bits, 0));
    }
    // 6to4: 2002:AABB:CCDD::/48 embeds AA.BB.CC.DD.
    if in_v6(ip, v6([0x2002, 0, 0, 0, 0, 0, 0, 0]), 16) {
        return classify_v4(embedded_v4(bits, 80));
    }
    let table: &[(Ipv6Addr, u32, IpVerdict)] = &[
        (v6([0xff00, 0, 0, 0, 0, 0, 0, 0]), 8, Forbidden("multicast")),
        (
            v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0]),
            48,
            Private("local-use NAT64"),
        ),
        (
            v6([0x100, 0, 0, 0, 0, 0, 0, 0]),
            64,
            Private("discard-only"),
        ),
        (
            v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0]),
            32,
            Private("documentation"),
        ),
        (
            v6([0x3fff, 0, 0, 0, 0, 0, 0, 0]),
            20,
            Private("documentation"),
        ),
        (v6([0x2001, 0, 0, 0, 0, 0, 0, 0]), 32, Private("Teredo")),
        (
            v6([0x2001, 0, 0, 0, 0, 0, 0, 0]),
            23,
            Private("IETF special-purpose"),
        ),
        (
            v6([0xfc00, 0, 0, 0, 0, 0, 0, 0]),
            7,
            Private("unique-local"),
        ),
        (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0]), 10, Private("link-local")),
        (
            v6([0xfec0, 0, 0, 0, 0, 0, 0, 0]),
            10,
            Private("site-local (deprecated)"),
        ),
    ];
    if let Some((_, _, verdict)) = table
        .iter()
        .find(|(net, prefix, _)| in_v6(ip, *net, *prefix))
    {
        return *verdict;
    }
    // Only 2000::/3 is allocated as global unicast.
    if in_v6(ip, v6([0x2000, 0, 0, 0, 0, 0, 0, 0]), 3) {
        Public
    } else {
        Forbidden("reserved IPv6")
    }
}

/// Judges one address under the `http_request` address policy.
pub fn classify_ip(ip: IpAddr) -> IpVerdict {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn inet_aton_forms_are_addresses() {
        let loopback = Host::Ip(ip("127.0.0.1"));
        for form in [
            "127.0.0.1",
            "2130706433",
            "0177.0.0.1",
            "0x7f.0.0.1",
            "0X7F.0.0.1",
            "127.1",
            "127.0.1",
            "0x7f000001",
            "017700000001",
            "0x7f.1",
            "127.0.0.1.",
            "0177.0.0.0x1",
        ] {
            assert_eq!(parse_host(form), Ok(loopback.clone()), "{form}");
        }
        assert_eq!(parse_host("0"), Ok(Host::Ip(ip("0.0.0.0"))));
        assert_eq!(parse_host("0x"), Ok(Host::Ip(ip("0.0.0.0"))));
        assert_eq!(parse_host("10.1"), Ok(Host::Ip(ip("10.0.0.1"))));
        assert_eq!(parse_host("192.168.257"), Ok(Host::Ip(ip("192.168.1.1"))));
        assert_eq!(
            parse_host("93.184.216.34"),
            Ok(Host::Ip(ip("93.184.216.34")))
        );
    }

    #[test]
    fn invalid_numeric_hosts_are_refused_not_resolved() {
        for bad in [
            "256.0.0.1",
            "1.2.3.4.5",
            "4294967296",
            "08.0.0.1",
            "0x1g.0.0.1",
            "1.2.3.256",
            "1.2.65536",
            "99999999999999999999999999",
            "example.123",
            "1..1",
        ] {
            let err = parse_host(bad).unwrap_err();
            assert!(err.contains("IPv4"), "{bad}: {err}");
        }
    }

    #[test]
    fn names_and_brackets() {
        assert_eq!(
            parse_host("API.Example.COM."),
            Ok(Host::Name("api.example.com".to_owned()))
        );
        assert_eq!(
            parse_host("0x7f.example"),
            Ok(Host::Name("0x7f.example".to_owned()))
        );
        assert_eq!(parse_host("[::1]"), Ok(Host::Ip(ip("::1"))));
        assert_eq!(
            parse_host("[::ffff:127.0.0.1]"),
            Ok(Host::Ip(ip("::ffff:7f00:1")))
        );
        for bad in [
            "",
            ".",
            "[::1",
            "[fe80::1%25eth0]",
            "exa mple.com",
            "a..b",
            "ex%61mple.com",
            "bücher.de",
            "::1",
        ] {
            assert!(parse_host(bad).is_err(), "{bad}");
        }
        let long = "a".repeat(64) + ".com";
        assert!(parse_host(&long).is_err());
    }

    #[test]
    fn v4_policy() {
        use IpVerdict::*;
        for (addr, verdict) in [
            ("93.184.216.34", Public),
            ("8.8.8.8", Public),
            ("127.0.0.2", Private("loopback")),
            ("10.1.2.3", Private("private")),
            ("172.16.0.1", Private("private")),
            ("172.31.255.255", Private("private")),
            ("172.32.0.1", Public),
            ("192.168.1.1", Private("private")),
            ("100.64.0.1", Private("shared (CGNAT)")),
            ("100.128.0.1", Public),
            ("169.254.169.254", Private("link-local")),
            ("192.0.2.1", Private("documentation")),
            ("198.51.100.1", Private("documentation")),
            ("203.0.113.1", Private("documentation")),
            ("198.19.0.1", Private("benchmarking")),
            ("0.0.0.0", Forbidden("unspecified (0.0.0.0/8)")),
            ("0.1.2.3", Forbidden("unspecified (0.0.0.0/8)")),
            ("255.255.255.255", Forbidden("broadcast")),
            ("224.0.0.1", Forbidden("multicast")),
            ("240.0.0.1", Forbidden("reserved (240.0.0.0/4)")),
        ] {
            assert_eq!(classify_ip(ip(addr)), verdict, "{addr}");
        }
    }

    #[test]
    fn v6_policy() {
        use IpVerdict::*;
        for (addr, verdict) in [
            ("2606:2800:220:1:248:1893:25c8:1946", Public),
            ("::1", Private("loopback")),
            ("::", Forbidden("unspecified (::)")),
            ("::ffff:127.0.0.1", Private("loopback")),
            ("::ffff:7f00:1", Private("loopback")),
            ("::ffff:10.0.0.1", Private("private")),
            ("::ffff:93.184.216.34", Public),
            ("::127.0.0.1", Private("loopback")),
            ("::7f00:1", Private("loopback")),
            (
                "::93.184.216.34",
                Private("IPv4-compatible IPv6 (deprecated)"),
            ),
            ("64:ff9b::7f00:1", Private("loopback")),
            ("64:ff9b::169.254.169.254", Private("link-local")),
            ("64:ff9b::93.184.216.34", Public),
            ("64:ff9b:1::1", Private("local-use NAT64")),
            ("2002:7f00:1::", Private("loopback")),
            ("2002:5db8:d822::1", Public),
            ("fc00::1", Private("unique-local")),
            ("fd12:3456::1", Private("unique-local")),
            ("fe80::1", Private("link-local")),
            ("febf::1", Private("link-local")),
            ("fec0::1", Private("site-local (deprecated)")),
            ("ff02::1", Forbidden("multicast")),
            ("2001:db8::1", Private("documentation")),
            ("2001::1", Private("Teredo")),
            ("100::1", Private("discard-only")),
            ("4000::1", Forbidden("reserved IPv6")),
        ] {
            assert_eq!(classify_ip(ip(addr)), verdict, "{addr}");
        }
    }
}
