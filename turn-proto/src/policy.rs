//! Peer address policy: which peers a client may reach through a relay.
//!
//! A TURN server is an open proxy for authenticated users; without a
//! filter it lets them reach the server's own loopback, the operator's
//! private networks or cloud metadata services. The default policy denies:
//!
//! * always (not overridable): unspecified (`0.0.0.0`, `::`), multicast
//!   (`224.0.0.0/4`, `ff00::/8`), the reserved block `240.0.0.0/4` (which
//!   holds the broadcast address) and peer port 0;
//! * unless `allow_loopback`: `127.0.0.0/8`, `::1`;
//! * unless `allow_private`: `0.0.0.0/8`, `10.0.0.0/8`, `172.16.0.0/12`,
//!   `192.168.0.0/16`, `100.64.0.0/10` (CGNAT), `192.0.0.0/24`,
//!   `198.18.0.0/15`, `fc00::/7` (ULA), `fec0::/10` (old site-local),
//!   `100::/64` (discard);
//! * unless `allow_link_local`: `169.254.0.0/16`, `fe80::/10`;
//! * unless `allow_own`: the server's own addresses (`own`: every address of the host's
//!   interfaces, and its listening, relay and external addresses), so that a client
//!   cannot reach the services of the TURN host through its public address (which a host
//!   firewall typically opens to the host itself). Own loopback addresses follow
//!   `allow_loopback` instead: allowing loopback peers already means allowing this host.
//!   One exception: another allocation's relayed address (one of `own_relays` with a port
//!   in `relay_ports` that a relay of the server holds, see
//!   [`PeerPolicy::check_peer_held`]) is a peer like any other, so two clients of this
//!   server can talk relay to relay (both with relay-only ICE policies, a common WebRTC
//!   set-up). A permission for such an address is granted by IP; its ports are checked
//!   where a port is known (ChannelBind, each Send indication, and each ChannelData on a
//!   channel bound to one);
//!
//! and applies the same rules to IPv4 addresses embedded in IPv6 ones:
//! IPv4-mapped `::ffff:a.b.c.d`, IPv4-translated `::ffff:0:a.b.c.d`,
//! IPv4-compatible `::a.b.c.d`, 6to4 `2002:AABB:CCDD::/16`, NAT64
//! `64:ff9b::/96` and `64:ff9b:1::/48` (in each RFC 6052 layout it may use: /48, /56,
//! /64 and /96), and both the server and the (obfuscated) client address of Teredo
//! `2001:0::/32`.
//!
//! Operator ranges come on top, coturn style: `deny` ranges are refused,
//! and `allow` ranges are accepted even if a `deny` range or a default rule
//! (other than the "always" ones and the own-address rule) would refuse them.
//! Embedded IPv4 addresses are checked against the IPv4 ranges too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// An IP network in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

/// Invalid CIDR text or prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid CIDR range")]
pub struct IpNetError;

impl IpNet {
    /// Build a network; host bits are cleared.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<IpNet, IpNetError> {
        let max = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if prefix > max {
            return Err(IpNetError);
        }
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(prefix))),
        };
        Ok(IpNet { addr, prefix })
    }

    /// Network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// Prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// True if `ip` is inside (same family only).
    pub fn contains(&self, ip: &IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => u32::from(*a) & mask32(self.prefix) == u32::from(n),
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                u128::from(*a) & mask128(self.prefix) == u128::from(n)
            }
            _ => false,
        }
    }
}

impl FromStr for IpNet {
    type Err = IpNetError;

    /// `"10.0.0.0/8"`, `"fc00::/7"`, or a bare address (host route).
    fn from_str(s: &str) -> Result<IpNet, IpNetError> {
        match s.split_once('/') {
            Some((a, p)) => {
                let addr: IpAddr = a.trim().parse().map_err(|_| IpNetError)?;
                let prefix: u8 = p.trim().parse().map_err(|_| IpNetError)?;
                IpNet::new(addr, prefix)
            }
            None => {
                let addr: IpAddr = s.trim().parse().map_err(|_| IpNetError)?;
                let p = if addr.is_ipv4() { 32 } else { 128 };
                IpNet::new(addr, p)
            }
        }
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

const fn mask32(prefix: u8) -> u32 {
    if prefix == 0 { 0 } else { u32::MAX << (32 - prefix as u32) }
}

const fn mask128(prefix: u8) -> u128 {
    if prefix == 0 { 0 } else { u128::MAX << (128 - prefix as u32) }
}

/// Why a peer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// Unspecified address.
    Unspecified,
    /// Multicast, broadcast or reserved.
    MulticastOrReserved,
    /// Port 0.
    PortZero,
    /// Loopback.
    Loopback,
    /// Private, CGNAT, ULA or other special-purpose non-global range.
    Private,
    /// Link-local.
    LinkLocal,
    /// One of the server's own addresses.
    OwnAddress,
    /// An operator `deny` range.
    Configured,
}

/// The peer policy (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerPolicy {
    /// Permit loopback peers (tests, local development).
    pub allow_loopback: bool,
    /// Permit private/CGNAT/ULA peers.
    pub allow_private: bool,
    /// Permit link-local peers.
    pub allow_link_local: bool,
    /// The server's own addresses, refused unless `allow_own`.
    pub own: Vec<IpAddr>,
    /// Permit the server's own (non-loopback) addresses as peers.
    pub allow_own: bool,
    /// The server's relay addresses (bound and advertised): with a port in
    /// `relay_ports` they are other allocations' relayed addresses, permitted as peers.
    pub own_relays: Vec<IpAddr>,
    /// The relay port range, inclusive (None: no relay-to-relay exception).
    pub relay_ports: Option<(u16, u16)>,
    /// Ranges accepted even if a default rule or `deny` would refuse them.
    pub allow: Vec<IpNet>,
    /// Ranges refused.
    pub deny: Vec<IpNet>,
}

impl PeerPolicy {
    /// Check a peer transport address (port 0 is refused), taking any port of the relay
    /// range on a relay address for another allocation's relayed address. Where the
    /// server knows which ports its relays hold, [`PeerPolicy::check_peer_held`] is exact.
    pub fn check_peer(&self, peer: &SocketAddr) -> Result<(), DenyReason> {
        self.check_peer_held(peer, |_| true)
    }

    /// Check a peer transport address (port 0 is refused). `holds` tells whether a relay
    /// of this server holds an address: only then is one of the server's own relay
    /// addresses with a port in the relay range another allocation's relayed address
    /// (any other port there, held by nobody or by another program, stays refused).
    pub fn check_peer_held(
        &self,
        peer: &SocketAddr,
        holds: impl FnOnce(SocketAddr) -> bool,
    ) -> Result<(), DenyReason> {
        if peer.port() == 0 {
            return Err(DenyReason::PortZero);
        }
        let relayed = self.own_relays.contains(&peer.ip())
            && self.relay_ports.is_some_and(|(lo, hi)| (lo..=hi).contains(&peer.port()))
            && holds(*peer);
        self.check(&peer.ip(), relayed)
    }

    /// Check a peer IP address (CreatePermission ignores the port: one of the server's
    /// relay addresses passes here, its port is checked by [`PeerPolicy::check_peer`]).
    pub fn check_ip(&self, ip: &IpAddr) -> Result<(), DenyReason> {
        self.check(ip, self.own_relays.contains(ip) && self.relay_ports.is_some())
    }

    /// `relayed`: the address is another allocation's relayed address, so the own-address
    /// rule does not apply to it (to its embedded forms it still does).
    fn check(&self, ip: &IpAddr, relayed: bool) -> Result<(), DenyReason> {
        self.check_one(ip, relayed)?;
        if let IpAddr::V6(v6) = ip {
            for embedded in embedded_ipv4(v6).into_iter().flatten() {
                self.check_one(&IpAddr::V4(embedded), false)?;
            }
        }
        Ok(())
    }

    fn check_one(&self, ip: &IpAddr, relayed: bool) -> Result<(), DenyReason> {
        if let Some(r) = always_denied(ip) {
            return Err(r);
        }
        let loopback = default_category(ip) == Some(DenyReason::Loopback);
        if !self.allow_own && !relayed && !loopback && self.own.contains(ip) {
            return Err(DenyReason::OwnAddress);
        }
        if self.allow.iter().any(|n| n.contains(ip)) {
            return Ok(());
        }
        if self.deny.iter().any(|n| n.contains(ip)) {
            return Err(DenyReason::Configured);
        }
        match default_category(ip) {
            Some(DenyReason::Loopback) if !self.allow_loopback => Err(DenyReason::Loopback),
            Some(DenyReason::Private) if !self.allow_private => Err(DenyReason::Private),
            Some(DenyReason::LinkLocal) if !self.allow_link_local => Err(DenyReason::LinkLocal),
            _ => Ok(()),
        }
    }
}

fn always_denied(ip: &IpAddr) -> Option<DenyReason> {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            if a.is_unspecified() {
                Some(DenyReason::Unspecified)
            } else if o[0] >= 224 {
                // 224/4 multicast, 240/4 reserved incl. 255.255.255.255
                Some(DenyReason::MulticastOrReserved)
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            if a.is_unspecified() {
                Some(DenyReason::Unspecified)
            } else if a.segments()[0] & 0xff00 == 0xff00 {
                Some(DenyReason::MulticastOrReserved)
            } else {
                None
            }
        }
    }
}

fn default_category(ip: &IpAddr) -> Option<DenyReason> {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            if o[0] == 127 {
                Some(DenyReason::Loopback)
            } else if o[0] == 169 && o[1] == 254 {
                Some(DenyReason::LinkLocal)
            } else if o[0] == 0                                  // 0/8 "this network"
                || o[0] == 10                                    // 10/8
                || (o[0] == 172 && (16..=31).contains(&o[1]))   // 172.16/12
                || (o[0] == 192 && o[1] == 168)                  // 192.168/16
                || (o[0] == 100 && (64..=127).contains(&o[1]))  // 100.64/10 CGNAT
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)       // 192.0.0/24
                || (o[0] == 198 && (18..=19).contains(&o[1]))
            // 198.18/15
            {
                Some(DenyReason::Private)
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            if a.is_loopback() {
                Some(DenyReason::Loopback)
            } else if s[0] & 0xffc0 == 0xfe80 {
                Some(DenyReason::LinkLocal)
            } else if s[0] & 0xfe00 == 0xfc00        // fc00::/7 ULA
                || s[0] & 0xffc0 == 0xfec0            // fec0::/10 site-local
                || (s[0] == 0x0100 && s[1] == 0 && s[2] == 0 && s[3] == 0)
            // 100::/64
            {
                Some(DenyReason::Private)
            } else {
                None
            }
        }
    }
}

/// IPv4 addresses embedded in an IPv6 address by the well-known transition
/// mechanisms (up to four: Teredo embeds two, and a local-use NAT64 prefix may use any
/// of four layouts).
pub fn embedded_ipv4(a: &Ipv6Addr) -> [Option<Ipv4Addr>; 4] {
    let o = a.octets();
    let s = a.segments();
    let v4 = |i: [usize; 4]| Ipv4Addr::new(o[i[0]], o[i[1]], o[i[2]], o[i[3]]);
    let last = v4([12, 13, 14, 15]);
    // ::ffff:a.b.c.d (mapped) and ::ffff:0:a.b.c.d (translated)
    if s[..5] == [0; 5] && s[5] == 0xffff {
        return [Some(last), None, None, None];
    }
    if s[..4] == [0; 4] && s[4] == 0xffff && s[5] == 0 {
        return [Some(last), None, None, None];
    }
    // ::a.b.c.d (IPv4-compatible, deprecated), excluding :: and ::1
    if s[..6] == [0; 6] && u32::from(last) > 1 {
        return [Some(last), None, None, None];
    }
    // 6to4: 2002:AABB:CCDD::/16
    if s[0] == 0x2002 {
        return [Some(v4([2, 3, 4, 5])), None, None, None];
    }
    // Teredo: 2001:0000:SSSS:SSSS:flags:port:~CCCC:~CCCC
    if s[0] == 0x2001 && s[1] == 0 {
        let server = v4([4, 5, 6, 7]);
        let client = Ipv4Addr::from(!u32::from(last));
        return [Some(server), Some(client), None, None];
    }
    // NAT64 well-known prefix 64:ff9b::/96 (RFC 6052 §2.1: only with /96).
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return [Some(last), None, None, None];
    }
    // NAT64 local-use prefix 64:ff9b:1::/48 (RFC 8215): a network may use it, or a longer
    // prefix inside it, with any RFC 6052 layout of /48 or more, and nothing in the
    // address says which. Every reading a layout allows is checked: /96 always, the
    // shorter ones when the octet after the first 64 bits (u) and their suffix are zero
    // (RFC 6052 §2.2).
    if s[..3] == [0x64, 0xff9b, 1] {
        let zero = |from: usize| o[from..].iter().all(|&b| b == 0);
        let layouts = [([6, 7, 9, 10], 11), ([7, 9, 10, 11], 12), ([9, 10, 11, 12], 13)];
        let mut out = [None, None, None, Some(last)];
        for (slot, (at, suffix)) in out.iter_mut().zip(layouts) {
            *slot = (o[8] == 0 && zero(suffix)).then(|| v4(at));
        }
        // The zero suffix of a shorter layout reads as 0.0.0.0 in /96: not an address.
        if last.is_unspecified() && out[..3].iter().flatten().any(|ip| !ip.is_unspecified()) {
            out[3] = None;
        }
        return out;
    }
    [None, None, None, None]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn denied(p: &PeerPolicy, s: &str) -> bool {
        p.check_ip(&s.parse().unwrap()).is_err()
    }

    #[test]
    fn default_denies_every_form() {
        let p = PeerPolicy::default();
        for s in [
            "0.0.0.0",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:0:127.0.0.1",
            "127.0.0.1",
            "127.255.0.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.254",
            "169.254.169.254",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
            "ff02::1",
            "ff0e::1",
            "::1",
            "::127.0.0.1",
            "::10.0.0.1",
            "2002:7f00:1::",
            "2002:7f00:0001::1",
            "2002:0a00:0001::1",
            "2002:a9fe:a9fe::1",
            // Teredo with server 127.0.0.1
            "2001:0:7f00:1::1",
            // Teredo with obfuscated client 10.0.0.1 (~ = f5ff:fffe)
            "2001:0:0808:0808:0:0:f5ff:fffe",
            "64:ff9b::127.0.0.1",
            "64:ff9b::10.0.0.1",
            "64:ff9b:1::192.168.0.1",
            "0.1.2.3",
            "192.0.0.8",
            "198.18.0.1",
            "100::1",
            "::ffff:0.0.0.0",
            "::ffff:224.0.0.1",
        ] {
            assert!(denied(&p, s), "{s} should be denied");
        }
    }

    #[test]
    fn default_allows_public() {
        let p = PeerPolicy::default();
        for s in [
            "8.8.8.8",
            "1.1.1.1",
            "203.0.113.5",
            "198.51.100.1",
            "172.32.0.1",
            "100.128.0.1",
            "2001:4860:4860::8888",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "2002:0808:0808::1",
            "64:ff9b::8.8.8.8",
        ] {
            assert!(!denied(&p, s), "{s} should be allowed");
        }
        assert_eq!(p.check_peer(&"8.8.8.8:0".parse().unwrap()), Err(DenyReason::PortZero));
        assert_eq!(p.check_peer(&"8.8.8.8:53".parse().unwrap()), Ok(()));
    }

    #[test]
    fn toggles_and_ranges() {
        let p = PeerPolicy { allow_loopback: true, ..Default::default() };
        assert!(!denied(&p, "127.0.0.1"));
        assert!(!denied(&p, "::1"));
        assert!(!denied(&p, "::ffff:127.0.0.1"));
        assert!(denied(&p, "10.0.0.1"));
        assert!(denied(&p, "0.0.0.0"));

        let p = PeerPolicy {
            allow: vec!["10.1.0.0/16".parse().unwrap()],
            deny: vec!["8.8.0.0/16".parse().unwrap(), "2606:4700::/32".parse().unwrap()],
            ..Default::default()
        };
        assert!(!denied(&p, "10.1.2.3"));
        assert!(denied(&p, "10.2.0.1"));
        assert!(denied(&p, "8.8.8.8"));
        assert!(denied(&p, "::ffff:8.8.8.8"));
        assert!(denied(&p, "2002:0808:0808::1"));
        assert!(denied(&p, "2606:4700::1111"));
        assert!(!denied(&p, "::ffff:10.1.0.1"));
        // "always" rules cannot be overridden
        let p = PeerPolicy {
            allow: vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
            ..Default::default()
        };
        assert!(denied(&p, "0.0.0.0"));
        assert!(denied(&p, "::"));
        assert!(denied(&p, "255.255.255.255"));
        assert!(!denied(&p, "127.0.0.1"));
    }

    #[test]
    fn own_addresses_are_denied_in_every_form() {
        let own: Vec<IpAddr> = ["192.0.2.2", "203.0.113.7", "2001:db8::2", "127.0.0.1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let p = PeerPolicy {
            own: own.clone(),
            // Even an operator range that covers them does not open them.
            allow: vec!["192.0.2.0/24".parse().unwrap()],
            ..Default::default()
        };
        for s in [
            "192.0.2.2",
            "203.0.113.7",
            "2001:db8::2",
            "::ffff:192.0.2.2",
            "::ffff:0:192.0.2.2",
            "::192.0.2.2",
            "2002:c000:0202::1",
            "64:ff9b::192.0.2.2",
            "64:ff9b:1::203.0.113.7",
            // Teredo with server 192.0.2.2, and with obfuscated client 203.0.113.7.
            "2001:0:c000:202::1",
            "2001:0:0808:0808:0:0:34ff:8ef8",
        ] {
            assert_eq!(
                p.check_ip(&s.parse().unwrap()),
                Err(DenyReason::OwnAddress),
                "{s} should be denied as the server's own"
            );
        }
        assert!(!denied(&p, "192.0.2.3"), "a neighbour in an allowed range");
        assert!(!denied(&p, "8.8.8.8"));
        // Own loopback addresses follow allow_loopback.
        assert_eq!(p.check_ip(&"127.0.0.1".parse().unwrap()), Err(DenyReason::Loopback));
        let p = PeerPolicy { own: own.clone(), allow_loopback: true, ..Default::default() };
        assert!(!denied(&p, "127.0.0.1"));
        assert!(denied(&p, "192.0.2.2"));
        // The explicit setting opens them.
        let p = PeerPolicy { own, allow_own: true, ..Default::default() };
        assert!(!denied(&p, "192.0.2.2") && !denied(&p, "::ffff:192.0.2.2"));
    }

    #[test]
    fn another_allocations_relayed_address_is_a_peer_on_relay_ports_only() {
        let own: Vec<IpAddr> =
            ["192.0.2.2", "2001:db8::2"].iter().map(|s| s.parse().unwrap()).collect();
        let p = PeerPolicy {
            own: own.clone(),
            own_relays: own.clone(),
            relay_ports: Some((49152, 65535)),
            ..Default::default()
        };
        let peer = |s: &str| p.check_peer(&s.parse().unwrap());
        // Relay to relay: permitted on a relay port, by IP for CreatePermission.
        assert_eq!(peer("192.0.2.2:50000"), Ok(()));
        assert_eq!(peer("[2001:db8::2]:65535"), Ok(()));
        assert_eq!(p.check_ip(&"192.0.2.2".parse().unwrap()), Ok(()));
        // The server's other services on the same address stay out of reach.
        assert_eq!(peer("192.0.2.2:3478"), Err(DenyReason::OwnAddress));
        assert_eq!(peer("192.0.2.2:22"), Err(DenyReason::OwnAddress));
        assert_eq!(peer("[2001:db8::2]:49151"), Err(DenyReason::OwnAddress));
        // Embedded forms are not relayed addresses.
        assert_eq!(peer("[::ffff:192.0.2.2]:50000"), Err(DenyReason::OwnAddress));
        assert_eq!(peer("[64:ff9b::192.0.2.2]:50000"), Err(DenyReason::OwnAddress));
        // An own address that is not a relay address gets no exception.
        let listener_only = PeerPolicy { own_relays: vec![own[1]], ..p.clone() };
        assert_eq!(
            listener_only.check_peer(&"192.0.2.2:50000".parse().unwrap()),
            Err(DenyReason::OwnAddress)
        );
        assert_eq!(
            listener_only.check_ip(&"192.0.2.2".parse().unwrap()),
            Err(DenyReason::OwnAddress)
        );
        // Where the server knows which ports its relays hold, only those are peers.
        let held = |a: SocketAddr| a.port() == 50000;
        assert_eq!(p.check_peer_held(&"192.0.2.2:50000".parse().unwrap(), held), Ok(()));
        assert_eq!(
            p.check_peer_held(&"192.0.2.2:50001".parse().unwrap(), held),
            Err(DenyReason::OwnAddress),
            "a relay port no relay holds (maybe another program's)"
        );
        // Without a relay range, no exception.
        let none = PeerPolicy { relay_ports: None, ..p.clone() };
        assert_eq!(
            none.check_peer(&"192.0.2.2:50000".parse().unwrap()),
            Err(DenyReason::OwnAddress)
        );
    }

    #[test]
    fn nat64_local_use_prefix_in_every_layout() {
        let p = PeerPolicy::default();
        // 10.0.0.1 (0a00:0001) and 192.168.1.1 (c0a8:0101) in the RFC 6052 layouts of a
        // prefix inside 64:ff9b:1::/48.
        for s in [
            // /96
            "64:ff9b:1::10.0.0.1",
            "64:ff9b:1:abcd:0:0:c0a8:101",
            // /64: v4 in octets 9..12, after the zero u octet
            "64:ff9b:1:abcd:a:0:100:0",
            "64:ff9b:1:abcd:c0:a801:100:0",
            // /56: octet 7, then 9..11
            "64:ff9b:1:ab0a:0:1:0:0",
            // /48: octets 6..7, then 9..10
            "64:ff9b:1:a00:0:100::",
            "64:ff9b:1:c0a8:1:100::",
        ] {
            assert!(denied(&p, s), "{s} should be denied");
        }
        for s in [
            "64:ff9b:1::8.8.8.8",
            "64:ff9b:1:abcd:8:808:800:0",
            "64:ff9b:1:808:8:800::",
            // a non-zero u octet: only the /96 reading is a layout
            "64:ff9b:1:a00:ff01:0:808:808",
        ] {
            assert!(!denied(&p, s), "{s} should be allowed");
        }
        // The well-known prefix is /96 only.
        assert!(!denied(&p, "64:ff9b::a00:1:0:808:808"));
        assert!(denied(&p, "64:ff9b::"), "0.0.0.0 in /96");
        assert!(denied(&p, "64:ff9b:1::"), "0.0.0.0 in every layout");
    }

    #[test]
    fn cidr_parsing() {
        let n: IpNet = "192.168.1.77/24".parse().unwrap();
        assert_eq!(n.to_string(), "192.168.1.0/24");
        assert!(n.contains(&"192.168.1.200".parse().unwrap()));
        assert!(!n.contains(&"192.168.2.1".parse().unwrap()));
        assert!(!n.contains(&"::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("fe80::/129".parse::<IpNet>().is_err());
        assert!("nonsense".parse::<IpNet>().is_err());
        let h: IpNet = "2001:db8::1".parse().unwrap();
        assert_eq!(h.prefix(), 128);
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(&"1.2.3.4".parse().unwrap()));
    }
}
