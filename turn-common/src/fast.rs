//! The contract of the kernel fast path (`turn_fast`, a TC classifier): map names, the
//! `#[repr(C)]` keys and values the daemon writes, and the pure header rewrites the
//! program runs, tested on the host byte for byte.
//!
//! A channel binding (RFC 8656 §12) that userspace would relay gets two entries, written
//! by the worker that owns its allocation from the core's lossless changes:
//! * [`MAP_CHANNELS`]: a ChannelData datagram from the client to the listener
//!   ([`ChannelKey`]) becomes a datagram from the relayed address to the peer;
//! * [`MAP_PEERS`]: a datagram from the peer to the relayed address ([`PeerKey`]) becomes
//!   ChannelData from the listener to the client.
//!
//! Both values are a [`Binding`]: the new source and destination, the channel, an expiry
//! stamp (`bpf_ktime_get_ns`, the same clock as `CLOCK_MONOTONIC`) after which the program
//! leaves the datagram to userspace even if the entry was not removed, and the binding's
//! slot in [`MAP_TRAFFIC`]. Every datagram the program does not relay goes up unchanged.

/// The classifier's function name in the object file.
pub const PROGRAM_NAME: &str = "turn_fast";
/// `HASH` (no LRU, no preallocation) from [`ChannelKey`] to [`Binding`].
pub const MAP_CHANNELS: &str = "FAST_CHANNELS";
/// `HASH` (no LRU, no preallocation) from [`PeerKey`] to [`Binding`].
pub const MAP_PEERS: &str = "FAST_PEERS";
/// `PERCPU_ARRAY` of [`Traffic`], one slot per binding ([`Binding::slot`]).
pub const MAP_TRAFFIC: &str = "FAST_TRAFFIC";
/// `PERCPU_ARRAY` of `u64`, one per [`Verdict`]: what the program did with each datagram
/// it looked at.
pub const MAP_VERDICTS: &str = "FAST_VERDICTS";

/// `HASH` from an [`Endpoint`] (port zero) to `u32` 1: this host's addresses. A datagram
/// for one of them (or for 127.0.0.0/8 or ::1) that arrived on loopback is delivered on
/// the spot (it keeps the local route it came with); one that arrived elsewhere goes up.
pub const MAP_LOCAL: &str = "FAST_LOCAL";
/// `HASH` from an interface index (`u32`) to `u32` 1: the Ethernet-like interfaces a
/// rewritten datagram may leave by (others go up to userspace).
pub const MAP_EGRESS: &str = "FAST_EGRESS";
/// `ARRAY` with one [`FastConfig`].
pub const MAP_CONFIG: &str = "FAST_CONFIG";
/// Entries of [`MAP_LOCAL`] and [`MAP_EGRESS`].
pub const MAX_INTERFACE_ENTRIES: u32 = 1024;

/// What the daemon tells the program about the host.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastConfig {
    /// The host's only non-loopback interface, or 0. A route lookup as a forwarder needs
    /// forwarding enabled on the receiving interface; when it is not, the program looks
    /// the route up as the host's own output, which is the kernel's choice only when
    /// every route leaves by this one interface.
    pub single_egress: u32,
    /// Always zero.
    pub pad: u32,
}

/// Entries of [`MAP_CHANNELS`] and [`MAP_PEERS`] and slots of [`MAP_TRAFFIC`] in the object
/// file; the daemon sizes them from its quotas and relay ports.
pub const DEFAULT_BINDINGS: u32 = 65_536;

/// An IP address and UDP port as on the wire: IPv4 in the first 4 bytes (rest zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The address.
    pub ip: [u8; 16],
    /// The port, network byte order.
    pub port: [u8; 2],
    /// 4 or 6.
    pub family: u8,
    /// Always zero.
    pub pad: u8,
}

impl Endpoint {
    /// The endpoint of `addr`.
    pub fn new(addr: core::net::SocketAddr) -> Endpoint {
        let mut ip = [0u8; 16];
        let family = match addr.ip() {
            core::net::IpAddr::V4(v4) => {
                ip[..4].copy_from_slice(&v4.octets());
                4
            }
            core::net::IpAddr::V6(v6) => {
                ip = v6.octets();
                6
            }
        };
        Endpoint { ip, port: addr.port().to_be_bytes(), family, pad: 0 }
    }
}

/// The key of a ChannelData datagram from a client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ChannelKey {
    /// The client (the datagram's source).
    pub client: Endpoint,
    /// The listener (its destination).
    pub listener: Endpoint,
    /// The channel number, network byte order (as on the wire).
    pub channel: [u8; 2],
    /// Always zero.
    pub pad: [u8; 2],
}

/// The key of a datagram from a peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// The peer (the datagram's source).
    pub peer: Endpoint,
    /// The relayed address (its destination).
    pub relay: Endpoint,
}

/// What to send instead: in [`MAP_CHANNELS`] from the relayed address to the peer, in
/// [`MAP_PEERS`] from the listener to the client on `channel`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Binding {
    /// The new source.
    pub from: Endpoint,
    /// The new destination.
    pub to: Endpoint,
    /// Past this `bpf_ktime_get_ns` the entry relays nothing.
    pub expires_ns: u64,
    /// The binding's slot in [`MAP_TRAFFIC`].
    pub slot: u32,
    /// The channel number, network byte order.
    pub channel: [u8; 2],
    /// Always zero.
    pub pad: [u8; 2],
}

/// Datagrams and payload bytes one binding relayed in the kernel (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Client -> peer datagrams.
    pub to_peer_packets: u64,
    /// Their payload bytes (without the ChannelData header).
    pub to_peer_bytes: u64,
    /// Peer -> client datagrams.
    pub to_client_packets: u64,
    /// Their payload bytes.
    pub to_client_bytes: u64,
}

impl Traffic {
    /// Adds `other` to `self` (summing per-CPU values).
    pub fn add(&mut self, other: &Traffic) {
        self.to_peer_packets = self.to_peer_packets.wrapping_add(other.to_peer_packets);
        self.to_peer_bytes = self.to_peer_bytes.wrapping_add(other.to_peer_bytes);
        self.to_client_packets = self.to_client_packets.wrapping_add(other.to_client_packets);
        self.to_client_bytes = self.to_client_bytes.wrapping_add(other.to_client_bytes);
    }
}

/// What the program did with a UDP datagram it looked at ([`MAP_VERDICTS`] index).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A client's ChannelData relayed to its peer.
    ToPeer = 0,
    /// A peer's datagram relayed to the client as ChannelData.
    ToClient = 1,
    /// A client's ChannelData relayed to a peer that is another allocation's relayed
    /// address on this host, and on to that allocation's client, in one pass.
    RelayToRelay = 2,
    /// No binding for it: not ours, STUN, a Send or Data indication, an unbound peer.
    NoBinding = 3,
    /// Its binding's expiry stamp had passed (userspace removes the entry).
    Expired = 4,
    /// Not a datagram the program rewrites: IP options, extension headers, a fragment, a
    /// GSO/GRO super-packet, a length that disagrees with the frame.
    Unusual = 5,
    /// ChannelData with trailing bytes beyond its padding, or no checksum over IPv6.
    Malformed = 6,
    /// The route lookup did not give a next hop with its MAC (the kernel path resolves the
    /// neighbour), or the route's interface is not one a datagram may leave by.
    NoRoute = 7,
    /// Larger than the route's MTU.
    TooBig = 8,
    /// A checksum the program cannot update for a datagram leaving the host (the kernel did
    /// not validate it: a local sender's partial checksum).
    Unverified = 9,
    /// The client and the peer are of different address families.
    CrossFamily = 10,
    /// Bound for an address of this host, but it did not arrive on loopback (the host's
    /// input path would take a datagram from its own address for a spoofed one).
    LocalElsewhere = 11,
    /// A helper failed after the datagram was changed: dropped (counted).
    Failed = 12,
}

/// Entries of [`MAP_VERDICTS`].
pub const VERDICTS: u32 = 13;

impl Verdict {
    /// Every verdict, in index order.
    pub const ALL: [Verdict; VERDICTS as usize] = [
        Verdict::ToPeer,
        Verdict::ToClient,
        Verdict::RelayToRelay,
        Verdict::NoBinding,
        Verdict::Expired,
        Verdict::Unusual,
        Verdict::Malformed,
        Verdict::NoRoute,
        Verdict::TooBig,
        Verdict::Unverified,
        Verdict::CrossFamily,
        Verdict::LocalElsewhere,
        Verdict::Failed,
    ];

    /// A snake_case name for metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::ToPeer => "to_peer",
            Verdict::ToClient => "to_client",
            Verdict::RelayToRelay => "relay_to_relay",
            Verdict::NoBinding => "no_binding",
            Verdict::Expired => "expired",
            Verdict::Unusual => "unusual",
            Verdict::Malformed => "malformed",
            Verdict::NoRoute => "no_route",
            Verdict::TooBig => "too_big",
            Verdict::Unverified => "unverified",
            Verdict::CrossFamily => "cross_family",
            Verdict::LocalElsewhere => "local_elsewhere",
            Verdict::Failed => "failed",
        }
    }

    /// True for the verdicts of a relayed datagram.
    pub const fn relayed(self) -> bool {
        matches!(self, Verdict::ToPeer | Verdict::ToClient | Verdict::RelayToRelay)
    }
}

/// The hop limit of a datagram the program sends on a route (a new datagram from the relay,
/// as a relay socket sends it); one delivered on this host keeps the one it came with.
pub const HOP_LIMIT: u8 = 64;

/// The IP and UDP header fields of a received datagram the rewrite needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// 4 or 6.
    pub family: u8,
    /// IPv4 TOS, or the first 4 bytes of the IPv6 header (version, traffic class, flow
    /// label) as they are.
    pub class: [u8; 4],
    /// TTL or hop limit.
    pub hop_limit: u8,
    /// Source address and port.
    pub src: Endpoint,
    /// Destination address and port.
    pub dst: Endpoint,
    /// The UDP length field (header included).
    pub udp_len: u16,
    /// The UDP checksum field as received.
    pub checksum: u16,
}

/// The new IP and UDP headers, and for a datagram to a client its ChannelData header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rewrite {
    /// The IP header: 20 bytes for IPv4, 40 for IPv6 (the rest zero).
    pub ip: [u8; 40],
    /// The UDP header.
    pub udp: [u8; 8],
    /// The ChannelData header (to a client only).
    pub channel_data: [u8; 4],
    /// The new UDP payload length.
    pub payload_len: u16,
}

impl Default for Rewrite {
    fn default() -> Rewrite {
        Rewrite { ip: [0; 40], udp: [0; 8], channel_data: [0; 4], payload_len: 0 }
    }
}

/// A one's complement sum of 16-bit words, folded at the end (RFC 1071; incremental
/// updates as in RFC 1624: subtracting a word is adding its complement).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Csum(u64);

impl Csum {
    /// Adds a big-endian 16-bit word.
    #[inline(always)]
    pub const fn add(self, word: u16) -> Csum {
        Csum(self.0 + word as u64)
    }

    /// Subtracts a word.
    #[inline(always)]
    pub const fn sub(self, word: u16) -> Csum {
        Csum(self.0 + (!word) as u64)
    }

    /// Adds the words of an endpoint's address (4 or 16 bytes).
    #[inline(always)]
    pub const fn add_ip(self, e: &Endpoint) -> Csum {
        let mut s = self;
        let words = if e.family == 4 { 2 } else { 8 };
        let mut i = 0;
        while i < 8 {
            if i < words {
                s = s.add(u16::from_be_bytes([e.ip[2 * i], e.ip[2 * i + 1]]));
            }
            i += 1;
        }
        s
    }

    /// Subtracts the words of an endpoint's address.
    #[inline(always)]
    pub const fn sub_ip(self, e: &Endpoint) -> Csum {
        let mut s = self;
        let words = if e.family == 4 { 2 } else { 8 };
        let mut i = 0;
        while i < 8 {
            if i < words {
                s = s.sub(u16::from_be_bytes([e.ip[2 * i], e.ip[2 * i + 1]]));
            }
            i += 1;
        }
        s
    }

    /// The folded 16-bit sum.
    #[inline(always)]
    pub const fn fold(self) -> u16 {
        let mut s = self.0;
        s = (s & 0xFFFF) + (s >> 16);
        s = (s & 0xFFFF) + (s >> 16);
        s = (s & 0xFFFF) + (s >> 16);
        s as u16
    }
}

/// The UDP pseudo-header and header words of a datagram from `src` to `dst` of UDP length
/// `udp_len` (the checksum field excluded).
#[inline(always)]
const fn udp_words(sum: Csum, src: &Endpoint, dst: &Endpoint, udp_len: u16, add: bool) -> Csum {
    let sport = u16::from_be_bytes(src.port);
    let dport = u16::from_be_bytes(dst.port);
    if add {
        // Pseudo-header: addresses, protocol, UDP length; then ports and length.
        sum.add_ip(src).add_ip(dst).add(17).add(udp_len).add(sport).add(dport).add(udp_len)
    } else {
        sum.sub_ip(src).sub_ip(dst).sub(17).sub(udp_len).sub(sport).sub(dport).sub(udp_len)
    }
}

/// Writes the IP header of a datagram from `src` to `dst` carrying `udp_len` bytes of UDP
/// (20 bytes for IPv4, 40 for IPv6).
#[inline(always)]
fn ip_header(
    ip: &mut [u8; 40],
    family: u8,
    class: [u8; 4],
    hop_limit: u8,
    src: &Endpoint,
    dst: &Endpoint,
    udp_len: u16,
) {
    if family == 4 {
        let total = (udp_len as u32 + 20) as u16;
        let t = total.to_be_bytes();
        // Version 4, IHL 5, TOS; total length; identification 0, DF; TTL, UDP.
        ip[..10].copy_from_slice(&[0x45, class[0], t[0], t[1], 0, 0, 0x40, 0, hop_limit, 17]);
        ip[10] = 0;
        ip[11] = 0;
        ip[12..16].copy_from_slice(&[src.ip[0], src.ip[1], src.ip[2], src.ip[3]]);
        ip[16..20].copy_from_slice(&[dst.ip[0], dst.ip[1], dst.ip[2], dst.ip[3]]);
        let mut sum = Csum(0);
        let mut w = 0;
        while w < 10 {
            sum = sum.add(u16::from_be_bytes([ip[2 * w], ip[2 * w + 1]]));
            w += 1;
        }
        let c = (!sum.fold()).to_be_bytes();
        ip[10] = c[0];
        ip[11] = c[1];
    } else {
        let l = udp_len.to_be_bytes();
        // Version, traffic class and flow label as received; payload length; UDP; hops.
        ip[..8]
            .copy_from_slice(&[class[0], class[1], class[2], class[3], l[0], l[1], 17, hop_limit]);
        ip[8..24].copy_from_slice(&src.ip);
        ip[24..40].copy_from_slice(&dst.ip);
    }
}

/// The UDP checksum after replacing `removed` with `added`, from the received one (RFC
/// 1624); a received 0 over IPv4 (no checksum) stays 0, and a result of 0 is sent as
/// 0xFFFF (RFC 768).
#[inline(always)]
const fn update_checksum(received: u16, family: u8, delta: Csum) -> u16 {
    if received == 0 && family == 4 {
        return 0;
    }
    let c = !delta.add(!received).fold();
    if c == 0 { 0xFFFF } else { c }
}

/// The ChannelData frame of a client's datagram: `(channel, data length)` when the UDP
/// payload of `udp_payload` bytes starting with `head` is ChannelData (channel 0x4000 to
/// 0x7FFF) whose data fills it exactly or with its padding to a multiple of four.
#[inline(always)]
pub const fn channel_data(head: [u8; 4], udp_payload: u32) -> Option<(u16, u16)> {
    let channel = u16::from_be_bytes([head[0], head[1]]);
    if channel & 0xC000 != 0x4000 {
        return None;
    }
    let len = u16::from_be_bytes([head[2], head[3]]);
    let framed = 4 + len as u32;
    let padded = (framed + 3) & !3;
    if udp_payload == framed || udp_payload == padded { Some((channel, len)) } else { None }
}

/// Writes the headers of the datagram to the peer for a client's ChannelData: from
/// `binding.from` (the relayed address) to `binding.to` (the peer), `data_len` bytes of
/// data; `padding` holds the received padding bytes (zero beyond the padding), which leave
/// with the ChannelData header. The data starts at an even offset in both datagrams.
///
/// The checksum is the received one updated, or, given `data_sum` (the one's complement
/// sum of the data's words, when the received field is not a checksum to update: a local
/// sender's partial one), computed anew.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn to_peer(
    out: &mut Rewrite,
    rx: &Received,
    binding: &Binding,
    data_len: u16,
    channel_head: [u8; 4],
    padding: [u8; 3],
    hop_limit: u8,
    data_sum: Option<u16>,
) {
    let udp_len = data_len + 8;
    if let Some(sum) = data_sum {
        let total = udp_words(Csum(0), &binding.from, &binding.to, udp_len, true).add(sum);
        let c = !total.fold();
        let checksum = if c == 0 { 0xFFFF } else { c };
        ip_header(&mut out.ip, rx.family, rx.class, hop_limit, &binding.from, &binding.to, udp_len);
        udp_header(&mut out.udp, binding, udp_len, checksum);
        out.channel_data = [0; 4];
        out.payload_len = data_len;
        return;
    }
    let mut delta = udp_words(Csum(0), &rx.src, &rx.dst, rx.udp_len, false);
    delta = delta
        .sub(u16::from_be_bytes([channel_head[0], channel_head[1]]))
        .sub(u16::from_be_bytes([channel_head[2], channel_head[3]]));
    // Padding byte i of the data sits at data offset len + i: the high byte of a word when
    // that offset is even.
    let mut i = 0;
    while i < 3 {
        let offset = data_len as u32 + i as u32;
        let word = if offset & 1 == 0 { (padding[i] as u16) << 8 } else { padding[i] as u16 };
        delta = delta.sub(word);
        i += 1;
    }
    delta = udp_words(delta, &binding.from, &binding.to, udp_len, true);
    let checksum = update_checksum(rx.checksum, rx.family, delta);
    ip_header(&mut out.ip, rx.family, rx.class, hop_limit, &binding.from, &binding.to, udp_len);
    udp_header(&mut out.udp, binding, udp_len, checksum);
    out.channel_data = [0; 4];
    out.payload_len = data_len;
}

/// Writes the headers of the ChannelData datagram to the client for a peer's datagram of
/// `data_len` bytes: from `binding.from` (the listener) to `binding.to` (the client), on
/// `binding.channel`, without padding (RFC 8656 §12.5: optional over UDP). The checksum:
/// as in [`to_peer`].
#[inline(always)]
pub fn to_client(
    out: &mut Rewrite,
    rx: &Received,
    binding: &Binding,
    data_len: u16,
    hop_limit: u8,
    data_sum: Option<u16>,
) {
    let payload_len = data_len + 4;
    let udp_len = payload_len + 8;
    let len = data_len.to_be_bytes();
    let head = [binding.channel[0], binding.channel[1], len[0], len[1]];
    let new = udp_words(Csum(0), &binding.from, &binding.to, udp_len, true)
        .add(u16::from_be_bytes([head[0], head[1]]))
        .add(data_len);
    let checksum = match data_sum {
        Some(sum) => match !new.add(sum).fold() {
            0 => 0xFFFF,
            c => c,
        },
        None => update_checksum(
            rx.checksum,
            rx.family,
            udp_words(new, &rx.src, &rx.dst, rx.udp_len, false),
        ),
    };
    ip_header(&mut out.ip, rx.family, rx.class, hop_limit, &binding.from, &binding.to, udp_len);
    udp_header(&mut out.udp, binding, udp_len, checksum);
    out.channel_data = head;
    out.payload_len = payload_len;
}

#[inline(always)]
fn udp_header(udp: &mut [u8; 8], binding: &Binding, udp_len: u16, checksum: u16) {
    let (l, c) = (udp_len.to_be_bytes(), checksum.to_be_bytes());
    *udp = [
        binding.from.port[0],
        binding.from.port[1],
        binding.to.port[0],
        binding.to.port[1],
        l[0],
        l[1],
        c[0],
        c[1],
    ];
}

const _: () = assert!(core::mem::size_of::<Endpoint>() == 20);
const _: () = assert!(core::mem::size_of::<ChannelKey>() == 44);
const _: () = assert!(core::mem::size_of::<PeerKey>() == 40);
const _: () = assert!(core::mem::size_of::<Binding>() == 56);
const _: () = assert!(core::mem::size_of::<Traffic>() == 32);
const _: () = assert!(core::mem::size_of::<FastConfig>() == 8);

/// The UDP checksum field a local sender leaves for the device to complete
/// (`CHECKSUM_PARTIAL`): the folded pseudo-header sum, not inverted. A received field equal
/// to it is treated as such (it may, once in 65,536, be a real checksum: that datagram only
/// goes up to userspace).
#[inline(always)]
pub const fn partial_checksum(rx: &Received) -> u16 {
    Csum(0).add_ip(&rx.src).add_ip(&rx.dst).add(17).add(rx.udp_len).fold()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    extern crate std;
    use std::vec::Vec;

    use super::*;

    /// The UDP checksum of a datagram computed from scratch (RFC 768, RFC 8200 §8.1).
    fn full_checksum(src: &Endpoint, dst: &Endpoint, udp: &[u8]) -> u16 {
        let mut s = Csum(0).add_ip(src).add_ip(dst).add(17).add(udp.len() as u16);
        for (i, chunk) in udp.chunks(2).enumerate() {
            if i == 3 {
                continue; // the checksum field
            }
            let w = if chunk.len() == 2 { [chunk[0], chunk[1]] } else { [chunk[0], 0] };
            s = s.add(u16::from_be_bytes(w));
        }
        let c = !s.fold();
        if c == 0 { 0xFFFF } else { c }
    }

    fn datagram(src: &Endpoint, dst: &Endpoint, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() + 8) as u16;
        let mut udp = Vec::new();
        udp.extend_from_slice(&src.port);
        udp.extend_from_slice(&dst.port);
        udp.extend_from_slice(&len.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(payload);
        let c = full_checksum(src, dst, &udp);
        udp[6..8].copy_from_slice(&c.to_be_bytes());
        udp
    }

    fn endpoint(s: &str) -> Endpoint {
        Endpoint::new(s.parse().unwrap())
    }

    fn received(src: &Endpoint, dst: &Endpoint, udp: &[u8]) -> Received {
        Received {
            family: src.family,
            class: if src.family == 4 { [0; 4] } else { [0x60, 0, 0, 0] },
            hop_limit: 64,
            src: *src,
            dst: *dst,
            udp_len: udp.len() as u16,
            checksum: u16::from_be_bytes([udp[6], udp[7]]),
        }
    }

    fn check_ip(ip: &[u8]) {
        let mut s = Csum(0);
        for w in ip.chunks(2) {
            s = s.add(u16::from_be_bytes([w[0], w[1]]));
        }
        assert_eq!(s.fold(), 0xFFFF, "IPv4 header checksum");
    }

    #[test]
    fn channel_data_framing_matches_the_padding_rule() {
        assert_eq!(channel_data([0x40, 0x01, 0, 5], 9), Some((0x4001, 5)));
        assert_eq!(channel_data([0x40, 0x01, 0, 5], 12), Some((0x4001, 5)));
        assert_eq!(channel_data([0x7F, 0xFF, 0, 4], 8), Some((0x7FFF, 4)));
        assert_eq!(channel_data([0x40, 0x01, 0, 5], 10), None, "neither exact nor padded");
        assert_eq!(channel_data([0x40, 0x01, 0, 5], 13), None, "beyond the padding");
        assert_eq!(channel_data([0x40, 0x01, 0, 5], 8), None, "short");
        assert_eq!(channel_data([0x00, 0x01, 0, 0], 4), None, "STUN");
        assert_eq!(channel_data([0x80, 0x01, 0, 0], 4), None);
    }

    /// Every length (odd and even, padded or not), both families: the rewritten datagram
    /// carries exactly the data, and its checksum is the one computed from scratch.
    #[test]
    fn to_peer_rewrites_headers_and_checksum_for_every_length_and_family() {
        for (client, listener, relay, peer) in [
            ("192.0.2.1:40000", "203.0.113.1:3478", "203.0.113.1:50000", "198.51.100.7:5000"),
            (
                "[2001:db8::1]:40000",
                "[2001:db8::3478]:3478",
                "[2001:db8::3478]:50000",
                "[2001:db8:7::9]:5000",
            ),
        ] {
            let (client, listener, relay, peer) =
                (endpoint(client), endpoint(listener), endpoint(relay), endpoint(peer));
            let binding = Binding {
                from: relay,
                to: peer,
                expires_ns: 1,
                slot: 3,
                channel: [0x40, 0x07],
                pad: [0; 2],
            };
            for len in 0..70u16 {
                for padded in [false, true] {
                    let data: Vec<u8> =
                        (0..len).map(|i| (i as u8).wrapping_mul(37).wrapping_add(11)).collect();
                    let pad_len = if padded { (4 - len as usize % 4) % 4 } else { 0 };
                    let padding = [0xA5u8, 0x5A, 0xC3];
                    let mut payload = std::vec![0x40, 0x07, (len >> 8) as u8, len as u8];
                    payload.extend_from_slice(&data);
                    payload.extend_from_slice(&padding[..pad_len]);
                    let udp = datagram(&client, &listener, &payload);
                    let rx = received(&client, &listener, &udp);
                    let head: [u8; 4] = payload[..4].try_into().unwrap();
                    assert_eq!(channel_data(head, payload.len() as u32), Some((0x4007, len)));
                    let mut pad = [0u8; 3];
                    pad[..pad_len].copy_from_slice(&padding[..pad_len]);
                    let mut out = Rewrite::default();
                    to_peer(&mut out, &rx, &binding, len, head, pad, 64, None);
                    // From the data's own sum, as for a partial checksum: the same.
                    let mut sum = Csum(0);
                    for w in data.chunks(2) {
                        sum = sum.add(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
                    }
                    let mut fresh = Rewrite::default();
                    to_peer(&mut fresh, &rx, &binding, len, head, pad, 64, Some(sum.fold()));
                    assert_eq!(fresh, out, "len {len} padded {padded}, from the data's sum");
                    let expected = datagram(&relay, &peer, &data);
                    assert_eq!(&out.udp[..], &expected[..8], "len {len} padded {padded}");
                    assert_eq!(out.payload_len, len);
                    if relay.family == 4 {
                        assert_eq!(out.ip[..2], [0x45, 0]);
                        assert_eq!(u16::from_be_bytes([out.ip[2], out.ip[3]]), 28 + len);
                        assert_eq!(&out.ip[12..16], &relay.ip[..4]);
                        assert_eq!(&out.ip[16..20], &peer.ip[..4]);
                        check_ip(&out.ip[..20]);
                    } else {
                        assert_eq!(u16::from_be_bytes([out.ip[4], out.ip[5]]), 8 + len);
                        assert_eq!((out.ip[6], out.ip[7]), (17, 64));
                        assert_eq!(&out.ip[8..24], &relay.ip);
                        assert_eq!(&out.ip[24..40], &peer.ip);
                    }
                }
            }
        }
    }

    #[test]
    fn to_client_frames_channel_data_with_the_right_checksum() {
        for (peer, relay, listener, client) in [
            ("198.51.100.7:5000", "203.0.113.1:50000", "203.0.113.1:3478", "192.0.2.1:40000"),
            (
                "[2001:db8:7::9]:5000",
                "[2001:db8::3478]:50000",
                "[2001:db8::3478]:3478",
                "[2001:db8::1]:40000",
            ),
        ] {
            let (peer, relay, listener, client) =
                (endpoint(peer), endpoint(relay), endpoint(listener), endpoint(client));
            let binding = Binding {
                from: listener,
                to: client,
                expires_ns: 1,
                slot: 0,
                channel: [0x7A, 0xBC],
                pad: [0; 2],
            };
            for len in 0..70u16 {
                let data: Vec<u8> = (0..len).map(|i| (i as u8) ^ 0x5C).collect();
                let udp = datagram(&peer, &relay, &data);
                let rx = received(&peer, &relay, &udp);
                let mut out = Rewrite::default();
                to_client(&mut out, &rx, &binding, len, 64, None);
                let mut sum = Csum(0);
                for w in data.chunks(2) {
                    sum = sum.add(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
                }
                let mut fresh = Rewrite::default();
                to_client(&mut fresh, &rx, &binding, len, 64, Some(sum.fold()));
                assert_eq!(fresh, out, "len {len}, from the data's sum");
                let mut framed = std::vec![0x7A, 0xBC, (len >> 8) as u8, len as u8];
                framed.extend_from_slice(&data);
                let expected = datagram(&listener, &client, &framed);
                assert_eq!(&out.udp[..], &expected[..8], "len {len}");
                assert_eq!(&out.channel_data[..], &expected[8..12]);
                assert_eq!(out.payload_len, len + 4);
                if listener.family == 4 {
                    check_ip(&out.ip[..20]);
                    assert_eq!(out.ip[8], 64);
                }
            }
        }
    }

    #[test]
    fn an_ipv4_datagram_without_checksum_stays_without() {
        let (client, listener) = (endpoint("192.0.2.1:40000"), endpoint("203.0.113.1:3478"));
        let binding = Binding {
            from: endpoint("203.0.113.1:50000"),
            to: endpoint("198.51.100.7:5000"),
            ..Binding::default()
        };
        let mut udp = datagram(&client, &listener, &[0x40, 0, 0, 1, 9]);
        udp[6..8].copy_from_slice(&[0, 0]);
        let rx = received(&client, &listener, &udp);
        let mut out = Rewrite::default();
        to_peer(&mut out, &rx, &binding, 1, [0x40, 0, 0, 1], [0; 3], 64, None);
        assert_eq!(&out.udp[6..8], &[0, 0]);
    }
}
