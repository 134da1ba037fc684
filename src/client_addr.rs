//! Who sent an HTTP request. The TCP peer, unless that peer is one of
//! `server.trusted_proxies`: a load balancer or reverse proxy in front of
//! the broker makes every request come from its own address, and names the
//! real client in `X-Forwarded-For` instead.
//!
//! Only a trusted peer's header is read. Anyone else could write whatever
//! address they like there, so for them the header is ignored and the peer
//! is the client. Every rule that depends on the source address (the
//! hook's loopback rule and its per-source rate limit) must therefore take
//! it from [`client_ip`], never from the header or the peer alone.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An IP address or a CIDR block (`10.0.0.0/8`, `2001:db8::/32`); a bare
/// address is a block of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpBlock {
    /// The first address of the block (no bits set past the prefix).
    base: IpAddr,
    /// Leading bits every address of the block shares with `base`.
    prefix: u8,
}

impl IpBlock {
    /// Whether `ip` lies in the block. An IPv4-mapped IPv6 address
    /// (`::ffff:10.0.0.1`, what a dual-stack listener reports for an IPv4
    /// peer) counts as the IPv4 address it carries.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.base.is_ipv4() && masked(ip, self.prefix) == self.base
    }
}

/// `ip` with every bit past the first `prefix` cleared.
fn masked(ip: IpAddr, prefix: u8) -> IpAddr {
    let prefix = u32::from(prefix);
    match ip {
        IpAddr::V4(ip) => {
            let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
            IpAddr::V4((u32::from(ip) & mask).into())
        }
        IpAddr::V6(ip) => {
            let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
            IpAddr::V6((u128::from(ip) & mask).into())
        }
    }
}

/// Bits in an address of `ip`'s family.
fn bits(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

impl FromStr for IpBlock {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let base: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR block (e.g. 10.0.0.0/8)"))?;
        let max = bits(base);
        let prefix = match prefix {
            None => max,
            // `u8::from_str` also takes a sign ("+8"): digits only here.
            Some(p) => Some(p)
                .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse::<u8>().ok())
                .filter(|n| *n <= max)
                .ok_or_else(|| {
                    format!("{s:?}: the prefix length must be a number from 0 to {max}")
                })?,
        };
        // Bits past the prefix are a typo more often than not (10.0.0.1/8
        // for 10.0.0.1/32?): refuse rather than guess which was meant.
        let first = masked(base, prefix);
        if first != base {
            return Err(format!(
                "{s:?} has bits set past its /{prefix} prefix (the block is {first}/{prefix})"
            ));
        }
        Ok(IpBlock { base, prefix })
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix == bits(self.base) {
            write!(f, "{}", self.base)
        } else {
            write!(f, "{}/{}", self.base, self.prefix)
        }
    }
}

impl Serialize for IpBlock {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpBlock {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The client's address of a request whose TCP peer is `peer` and whose
/// `X-Forwarded-For` header lines are `forwarded_for` (in the order they
/// came; none when the header is absent).
///
/// From an untrusted peer the header is ignored. From a trusted one, the
/// header is read right to left, the order in which proxies appended to it:
/// the first address that is not itself a trusted proxy is the client
/// (whatever lies left of it was written by someone nobody vouches for).
/// When every address is trusted, the leftmost is the client, as far as the
/// chain of trusted proxies knows. When the header is missing, or an entry
/// that would have to be read is not an address, the peer is the client.
///
/// The answer is canonical (`::ffff:127.0.0.1` is `127.0.0.1`), so a rule
/// such as "loopback only" holds the same on a dual-stack listener.
pub fn client_ip(peer: IpAddr, forwarded_for: &[&str], trusted: &[IpBlock]) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|block| block.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let mut leftmost = None;
    for entry in forwarded_for.iter().rev().flat_map(|line| line.rsplit(',')) {
        let Some(ip) = parse_entry(entry) else {
            return peer;
        };
        if !is_trusted(ip) {
            return ip;
        }
        leftmost = Some(ip);
    }
    leftmost.unwrap_or(peer)
}

/// One `X-Forwarded-For` entry: an address, possibly with a port
/// (`192.0.2.1:4711`, `[2001:db8::1]:4711`) or in brackets, as some
/// proxies write them.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    let ip = entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .and_then(|e| e.parse::<IpAddr>().ok())
        })?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(list: &[&str]) -> Vec<IpBlock> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_parse_and_print() {
        for (text, shown) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("127.0.0.1", "127.0.0.1"),
            ("127.0.0.1/32", "127.0.0.1"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("::1", "::1"),
            ("::/0", "::/0"),
            (" 192.168.0.0/16 ", "192.168.0.0/16"),
        ] {
            let block: IpBlock = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(block.to_string(), shown);
        }
    }

    #[test]
    fn bad_blocks_are_refused_with_a_reason() {
        for (text, says) in [
            ("10.0.0.0/33", "from 0 to 32"),
            ("2001:db8::/129", "from 0 to 128"),
            ("10.0.0.0/", "from 0 to 32"),
            ("10.0.0.0/+8", "from 0 to 32"),
            ("10.0.0.0/x", "from 0 to 32"),
            ("foo", "not an IP address"),
            ("", "not an IP address"),
            ("10.0.0/8", "not an IP address"),
            ("fe80::1%eth0", "not an IP address"),
            ("10.0.0.1/8", "the block is 10.0.0.0/8"),
            ("2001:db8::1/32", "the block is 2001:db8::/32"),
        ] {
            let err = text.parse::<IpBlock>().unwrap_err();
            assert!(err.contains(says), "{text:?}: {err}");
        }
    }

    #[test]
    fn blocks_contain_their_addresses() {
        let net: IpBlock = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains(ip("10.1.255.3")));
        assert!(!net.contains(ip("10.2.0.1")));
        assert!(net.contains(ip("::ffff:10.1.0.9")), "IPv4-mapped");
        let v6: IpBlock = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("10.1.0.1")));
        let all: IpBlock = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.7")));
        assert!(!all.contains(ip("::1")));
    }

    #[test]
    fn an_untrusted_peer_cannot_name_another_client() {
        let trusted = blocks(&["10.0.0.0/8"]);
        let got = client_ip(ip("192.0.2.9"), &["127.0.0.1"], &trusted);
        assert_eq!(got, ip("192.0.2.9"));
        assert_eq!(
            client_ip(ip("127.0.0.1"), &["203.0.113.7"], &[]),
            ip("127.0.0.1")
        );
    }

    #[test]
    fn a_trusted_peer_names_the_client() {
        let trusted = blocks(&["127.0.0.1"]);
        let peer = ip("127.0.0.1");
        assert_eq!(
            client_ip(peer, &["203.0.113.7"], &trusted),
            ip("203.0.113.7")
        );
        assert_eq!(client_ip(peer, &[], &trusted), peer, "no header");
        assert_eq!(
            client_ip(ip("::ffff:127.0.0.1"), &[" 203.0.113.7 "], &trusted),
            ip("203.0.113.7"),
            "a dual-stack listener's mapped peer"
        );
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let trusted = blocks(&["10.0.0.0/8", "127.0.0.1"]);
        let peer = ip("127.0.0.1");
        // The client wrote "1.2.3.4" itself; the first proxy appended the
        // address it saw, the second one its own.
        let header = ["1.2.3.4, 203.0.113.7, 10.0.0.2"];
        assert_eq!(client_ip(peer, &header, &trusted), ip("203.0.113.7"));
        // The same chain, one line per proxy.
        let lines = ["1.2.3.4", "203.0.113.7", "10.0.0.2"];
        assert_eq!(client_ip(peer, &lines, &trusted), ip("203.0.113.7"));
        // Every hop trusted: the farthest one is the client.
        assert_eq!(
            client_ip(peer, &["10.0.0.5, 10.0.0.2"], &trusted),
            ip("10.0.0.5")
        );
        // Ports and brackets, as some proxies write them.
        assert_eq!(
            client_ip(peer, &["203.0.113.7:4711, 10.0.0.2"], &trusted),
            ip("203.0.113.7")
        );
        assert_eq!(
            client_ip(peer, &["[2001:db8::7]:4711"], &trusted),
            ip("2001:db8::7")
        );
    }

    #[test]
    fn ipv6_proxies_and_clients() {
        let trusted = blocks(&["2001:db8:1::/48"]);
        let peer = ip("2001:db8:1::10");
        assert_eq!(
            client_ip(peer, &["2001:db8:2::7, 2001:db8:1::11"], &trusted),
            ip("2001:db8:2::7")
        );
        assert_eq!(
            client_ip(peer, &["[2001:db8:2::7]"], &trusted),
            ip("2001:db8:2::7")
        );
        assert_eq!(
            client_ip(ip("2001:db8:2::10"), &["::1"], &trusted),
            ip("2001:db8:2::10")
        );
    }

    #[test]
    fn a_garbage_header_leaves_the_peer() {
        let trusted = blocks(&["127.0.0.1", "10.0.0.0/8"]);
        let peer = ip("127.0.0.1");
        for header in [
            "unknown",
            "",
            "  ,  ",
            "203.0.113.7 10.0.0.2",
            "not an address",
        ] {
            assert_eq!(client_ip(peer, &[header], &trusted), peer, "{header:?}");
        }
        assert_eq!(
            client_ip(peer, &["203.0.113.7, garbage, 10.0.0.2"], &trusted),
            peer,
            "nothing left of an unreadable hop can be vouched for"
        );
        // Garbage left of the client is never read.
        assert_eq!(
            client_ip(peer, &["garbage, 203.0.113.7"], &trusted),
            ip("203.0.113.7")
        );
    }
}
