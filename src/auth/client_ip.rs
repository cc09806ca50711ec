//! The client's address (SPEC §3.5) and IP allow-lists.

use std::net::IpAddr;

use ipnet::IpNet;

/// An `X-Forwarded-For` from a trusted proxy that cannot be read entirely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("X-Forwarded-For from a trusted proxy must be a list of IP addresses")]
pub struct BadForwardedFor;

/// The TCP peer, unless the peer is a trusted proxy: then the right-most `X-Forwarded-For`
/// entry that is not itself trusted. `xff` is every `X-Forwarded-For` value in order, as bytes.
///
/// A trusted peer vouches for the whole list it sends, so any entry that is not an IP address
/// (non-ASCII bytes, `unknown`, a port, an empty entry) refuses the request: falling back to
/// the proxy's own address would let a client pick which allow-list applies.
pub fn client_ip<'a>(
    peer: IpAddr,
    xff: impl DoubleEndedIterator<Item = &'a [u8]>,
    trusted: &AllowList,
) -> Result<IpAddr, BadForwardedFor> {
    let peer = peer.to_canonical();
    if !trusted.contains(peer) {
        return Ok(peer);
    }
    let mut candidate = peer;
    let mut client = None;
    for value in xff.rev() {
        let text = std::str::from_utf8(value).map_err(|_| BadForwardedFor)?;
        for entry in text.rsplit(',') {
            let ip = entry
                .trim()
                .parse::<IpAddr>()
                .map_err(|_| BadForwardedFor)?
                .to_canonical();
            // Once the client is found, the rest is still read: the whole list must parse.
            if client.is_none() {
                candidate = ip;
                if !trusted.contains(ip) {
                    client = Some(ip);
                }
            }
        }
    }
    Ok(client.unwrap_or(candidate))
}

/// Why an allow-list or config entry is not a network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    #[error("{0:?} is not an IP address or CIDR")]
    Invalid(String),
    /// Host bits set beyond the prefix: `10.9.9.9/0` would silently mean `0.0.0.0/0`, every
    /// address, which is almost never what was meant.
    #[error("{given:?} has host bits set beyond its prefix; write {network} for the whole network or {given_host} for the one address")]
    HostBits {
        given: String,
        network: IpNet,
        given_host: IpNet,
    },
}

/// One address (as a /32 or /128) or a CIDR whose address is its network's first: the one
/// reading of every allow-list entry and every CIDR in the config.
pub fn parse_net(text: &str) -> Result<IpNet, NetError> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    let net = text
        .parse::<IpNet>()
        .map_err(|_| NetError::Invalid(text.to_owned()))?;
    if net.trunc() != net {
        return Err(NetError::HostBits {
            given: text.to_owned(),
            network: net.trunc(),
            given_host: IpNet::from(net.addr()),
        });
    }
    Ok(net)
}

/// A set of networks as sorted, merged address ranges: membership is a binary search, so a
/// key with 1,000 CIDRs costs about what a key with one does. IPv4 and IPv6 are kept apart, as
/// `IpNet::contains` keeps them; an IPv4-mapped IPv6 address is checked as IPv4.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    v4: Vec<(u128, u128)>,
    v6: Vec<(u128, u128)>,
}

impl AllowList {
    pub fn new(nets: &[IpNet]) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for net in nets {
            match net {
                IpNet::V4(n) => v4.push((
                    u128::from(u32::from(n.network())),
                    u128::from(u32::from(n.broadcast())),
                )),
                IpNet::V6(n) => v6.push((u128::from(n.network()), u128::from(n.broadcast()))),
            }
        }
        Self {
            v4: merged(v4),
            v6: merged(v6),
        }
    }

    /// How many separate ranges the networks merged into.
    pub fn ranges(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// No networks at all (for an allow-list: any address may use the key).
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// Whether every address of `net` is in the list (one merged range must hold all of it).
    pub fn covers(&self, net: &IpNet) -> bool {
        let (ranges, start, end) = match net {
            IpNet::V4(n) => (
                &self.v4,
                u128::from(u32::from(n.network())),
                u128::from(u32::from(n.broadcast())),
            ),
            IpNet::V6(n) => (&self.v6, u128::from(n.network()), u128::from(n.broadcast())),
        };
        let after = ranges.partition_point(|&(s, _)| s <= start);
        after > 0 && ranges[after - 1].1 >= end
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let (ranges, x) = match ip.to_canonical() {
            IpAddr::V4(a) => (&self.v4, u128::from(u32::from(a))),
            IpAddr::V6(a) => (&self.v6, u128::from(a)),
        };
        // The last range starting at or below x is the only one that can hold it.
        let after = ranges.partition_point(|&(start, _)| start <= x);
        after > 0 && ranges[after - 1].1 >= x
    }
}

/// Sorted, with overlapping and adjacent ranges joined.
fn merged(mut ranges: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    ranges.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match out.last_mut() {
            Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cidr_with_host_bits_is_refused_not_widened() {
        use super::{parse_net, NetError};
        for ok in [
            "10.9.9.9",
            "10.9.9.9/32",
            "10.0.0.0/8",
            "0.0.0.0/0",
            "::1",
            "2001:db8::1/128",
            "2001:db8::/32",
        ] {
            assert!(parse_net(ok).is_ok(), "{ok}");
        }
        for bad in [
            "10.9.9.9/0",
            "10.9.9.9/8",
            "192.168.1.1/24",
            "2001:db8::1/64",
        ] {
            assert!(
                matches!(parse_net(bad), Err(NetError::HostBits { .. })),
                "{bad}"
            );
        }
        let e = parse_net("10.9.9.9/0")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("\"10.9.9.9/0\"") && e.contains("0.0.0.0/0") && e.contains("10.9.9.9/32"),
            "{e}"
        );
        assert!(matches!(parse_net("nope"), Err(NetError::Invalid(_))));
    }

    use super::*;

    fn nets(s: &[&str]) -> AllowList {
        AllowList::new(
            &s.iter()
                .filter_map(|n| n.parse().ok())
                .collect::<Vec<IpNet>>(),
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_xff_says() {
        let got = client_ip(
            ip("203.0.113.9"),
            [b"1.2.3.4".as_slice(), b"\xff"].into_iter(),
            &nets(&["10.0.0.0/8"]),
        );
        assert_eq!(got, Ok(ip("203.0.113.9")));
    }

    #[test]
    fn trusted_peer_yields_rightmost_untrusted_entry() {
        let trusted = nets(&["10.0.0.0/8"]);
        let got = client_ip(
            ip("10.0.0.1"),
            [b"6.6.6.6, 198.51.100.7".as_slice(), b"10.0.0.2"].into_iter(),
            &trusted,
        );
        assert_eq!(got, Ok(ip("198.51.100.7")));
        let all_trusted = client_ip(
            ip("10.0.0.1"),
            [b"10.0.0.3, 10.0.0.2".as_slice()].into_iter(),
            &trusted,
        );
        assert_eq!(all_trusted, Ok(ip("10.0.0.3")));
    }

    #[test]
    fn trusted_peer_without_xff_is_the_client() {
        let got = client_ip(ip("10.0.0.1"), std::iter::empty(), &nets(&["10.0.0.0/8"]));
        assert_eq!(got, Ok(ip("10.0.0.1")));
    }

    /// A trusted proxy vouches for its whole list: anything unreadable in it refuses the
    /// request instead of falling back to the proxy's own address.
    #[test]
    fn garbage_from_a_trusted_proxy_is_refused() {
        let trusted = nets(&["127.0.0.0/8"]);
        for bad in [
            b"\xff, 203.0.113.7".as_slice(),
            b"203.0.113.7, bogus",
            b"bogus, 203.0.113.7",
            b"203.0.113.7,,10.0.0.1",
            b"",
            b"unknown",
            b"203.0.113.7:443",
        ] {
            let got = client_ip(ip("127.0.0.1"), [bad].into_iter(), &trusted);
            assert_eq!(
                got,
                Err(BadForwardedFor),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let ok = client_ip(
            ip("127.0.0.1"),
            [b" 203.0.113.7 ".as_slice()].into_iter(),
            &trusted,
        );
        assert_eq!(ok, Ok(ip("203.0.113.7")));
    }

    #[test]
    fn ipv6_and_mapped_ipv4() {
        let list = nets(&["2001:db8::/32", "192.0.2.0/24"]);
        assert!(list.contains(ip("2001:db8::1")));
        assert!(!list.contains(ip("2001:db9::1")));
        assert!(list.contains(ip("::ffff:192.0.2.10")));
        assert!(nets(&["192.0.2.10/32"]).contains(ip("192.0.2.10")));
        assert!(
            !nets(&["::/0"]).contains(ip("192.0.2.10")),
            "v6 nets never hold v4"
        );
        assert!(nets(&[]).is_empty());
        assert_eq!(
            nets(&["10.0.0.0/25", "10.0.0.128/25", "10.0.1.0/24"]).ranges(),
            1
        );
        assert_eq!(
            nets(&["10.0.0.0/24", "10.0.2.0/24", "10.0.0.0/8"]).ranges(),
            1
        );
    }

    #[test]
    fn covers_whole_networks_only() {
        let list = nets(&["10.0.0.0/24", "10.0.1.0/24", "2001:db8::/32"]);
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert!(list.covers(&net("10.0.0.0/23")), "two adjacent /24s merge");
        assert!(list.covers(&net("10.0.1.7/32")));
        assert!(!list.covers(&net("10.0.0.0/22")));
        assert!(!list.covers(&net("0.0.0.0/0")));
        assert!(list.covers(&net("2001:db8:1::/48")));
        assert!(!list.covers(&net("2001:db9::/48")));
        assert!(!nets(&[]).covers(&net("10.0.0.1/32")));
    }

    /// The ranges answer exactly what a scan of `IpNet::contains` answers: overlapping,
    /// nested and adjacent networks of both families, addresses on and around every edge.
    #[test]
    fn ranges_agree_with_a_linear_scan() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..200 {
            let count = 1 + (next() % 40) as usize;
            let list: Vec<IpNet> = (0..count)
                .map(|_| {
                    let r = next();
                    if r % 3 == 0 {
                        // Concentrated in 2001:db8::/120 so ranges overlap.
                        let a =
                            std::net::Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(r >> 56));
                        IpNet::V6(ipnet::Ipv6Net::new(a, 120 + (r % 9) as u8).unwrap().trunc())
                    } else {
                        let a = std::net::Ipv4Addr::from(0x0a00_0000 | ((r >> 40) as u32 & 0xffff));
                        IpNet::V4(ipnet::Ipv4Net::new(a, 16 + (r % 17) as u8).unwrap().trunc())
                    }
                })
                .collect();
            let allow = AllowList::new(&list);
            let mut probes: Vec<IpAddr> = Vec::new();
            for n in &list {
                for edge in [n.network(), n.broadcast()] {
                    probes.push(edge);
                    match edge {
                        IpAddr::V4(a) => {
                            let x = u32::from(a);
                            probes.push(IpAddr::from(x.wrapping_sub(1).to_be_bytes()));
                            probes.push(IpAddr::from(x.wrapping_add(1).to_be_bytes()));
                        }
                        IpAddr::V6(a) => {
                            let x = u128::from(a);
                            probes.push(IpAddr::from(x.wrapping_sub(1).to_be_bytes()));
                            probes.push(IpAddr::from(x.wrapping_add(1).to_be_bytes()));
                        }
                    }
                }
            }
            for p in probes {
                let scan = list.iter().any(|n| n.contains(&p.to_canonical()));
                assert_eq!(allow.contains(p), scan, "round {round}: {p} in {list:?}");
            }
        }
    }
}
