//! The client's address (SPEC §3.5) and IP allow-lists.

use std::net::IpAddr;

use ipnet::IpNet;

/// The TCP peer, unless the peer is a trusted proxy: then the right-most `X-Forwarded-For`
/// entry that is not itself trusted. `xff` is every `X-Forwarded-For` value in order.
pub fn client_ip<'a>(
    peer: IpAddr,
    xff: impl DoubleEndedIterator<Item = &'a str>,
    trusted: &[IpNet],
) -> IpAddr {
    let peer = peer.to_canonical();
    if !is_in(peer, trusted) {
        return peer;
    }
    let mut candidate = peer;
    for value in xff.rev() {
        for entry in value.rsplit(',') {
            // An entry we cannot read ends the chain: the last hop we could read vouched for it.
            let Ok(ip) = entry.trim().parse::<IpAddr>() else {
                return candidate;
            };
            candidate = ip.to_canonical();
            if !is_in(candidate, trusted) {
                return candidate;
            }
        }
    }
    candidate
}

/// Whether `ip` is inside any of `nets` (an empty allow-list is handled by the caller).
pub fn is_in(ip: IpAddr, nets: &[IpNet]) -> bool {
    let ip = ip.to_canonical();
    nets.iter().any(|n| n.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().filter_map(|n| n.parse().ok()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_xff_says() {
        let got = client_ip(
            ip("203.0.113.9"),
            ["1.2.3.4"].into_iter(),
            &nets(&["10.0.0.0/8"]),
        );
        assert_eq!(got, ip("203.0.113.9"));
    }

    #[test]
    fn trusted_peer_yields_rightmost_untrusted_entry() {
        let trusted = nets(&["10.0.0.0/8"]);
        let got = client_ip(
            ip("10.0.0.1"),
            ["6.6.6.6, 198.51.100.7", "10.0.0.2"].into_iter(),
            &trusted,
        );
        assert_eq!(got, ip("198.51.100.7"));
    }

    #[test]
    fn trusted_peer_without_xff_is_the_client() {
        let got = client_ip(ip("10.0.0.1"), std::iter::empty(), &nets(&["10.0.0.0/8"]));
        assert_eq!(got, ip("10.0.0.1"));
    }

    #[test]
    fn garbage_in_xff_stops_the_walk() {
        let got = client_ip(
            ip("10.0.0.1"),
            ["198.51.100.7, garbage"].into_iter(),
            &nets(&["10.0.0.0/8"]),
        );
        assert_eq!(got, ip("10.0.0.1"));
    }

    #[test]
    fn ipv6_and_mapped_ipv4() {
        let list = nets(&["2001:db8::/32", "192.0.2.0/24"]);
        assert!(is_in(ip("2001:db8::1"), &list));
        assert!(!is_in(ip("2001:db9::1"), &list));
        assert!(is_in(ip("::ffff:192.0.2.10"), &list));
        assert!(is_in(ip("192.0.2.10"), &nets(&["192.0.2.10/32"])));
    }
}
