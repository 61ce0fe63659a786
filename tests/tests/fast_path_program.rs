//! The fast path program (`turn_fast`) on packets built here, through
//! `BPF_PROG_TEST_RUN`: each rewrite checked byte for byte against a datagram built from
//! scratch (checksums computed here, not by the code under test), both directions, IPv4
//! and IPv6, padded frames, and every case that must go up to userspace unchanged.
//!
//! Each test runs in a thread of its own network namespace (only a loopback that is down,
//! no route): the program's decisions depend on no host state.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use aya::programs::{TestRun, TestRunOptions};
use turn_common::fast::Verdict;
use turn_proto::server::{FastBinding, FiveTuple, RelayId, RelaySocket};
use turn_server::fast_path::{FastMaps, FastPath, Interface};

/// TC_ACT_OK: rewritten, up the stack from here (a local destination, from loopback).
const DELIVERED: u32 = 0;
const UP: u32 = u32::MAX; // TC_ACT_UNSPEC (-1): up the stack unchanged, next TCX program runs
const LOOPBACK: u32 = 1;

/// Runs `f` in a new network namespace, on a thread of its own.
fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare on this thread only (CLONE_NEWNET applies to the calling thread).
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET)");
        f()
    })
    .join()
    .unwrap()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// One's complement sum of big-endian words (an odd last byte padded with zero).
fn sum(bytes: &[u8]) -> u32 {
    bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xFFFF {
        s = (s & 0xFFFF) + (s >> 16);
    }
    s as u16
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// An Ethernet frame (zero MACs) with an IP/UDP datagram from `src` to `dst`, its UDP
/// checksum computed from scratch (or `checksum` when given), hop limit `ttl`.
fn frame(
    src: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
    ttl: u8,
    checksum: Option<u16>,
) -> Vec<u8> {
    let udp_len = (payload.len() + 8) as u16;
    let mut udp = Vec::new();
    udp.extend_from_slice(&src.port().to_be_bytes());
    udp.extend_from_slice(&dst.port().to_be_bytes());
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let pseudo = sum(&octets(src.ip())) + sum(&octets(dst.ip())) + 17 + u32::from(udp_len);
    let c = match checksum {
        Some(c) => c,
        None => match !fold(pseudo + sum(&udp)) {
            0 => 0xFFFF,
            c => c,
        },
    };
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    let mut f = vec![0u8; 12];
    if src.is_ipv4() {
        f.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + udp.len()) as u16;
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, ttl, 17, 0, 0];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&octets(src.ip()));
        ip.extend_from_slice(&octets(dst.ip()));
        let c = !fold(sum(&ip));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
    } else {
        f.extend_from_slice(&[0x86, 0xDD]);
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&udp_len.to_be_bytes());
        f.extend_from_slice(&[17, ttl]);
        f.extend_from_slice(&octets(src.ip()));
        f.extend_from_slice(&octets(dst.ip()));
    }
    f.extend_from_slice(&udp);
    f
}

fn channel_data(channel: u16, data: &[u8], padding: &[u8]) -> Vec<u8> {
    let mut out = channel.to_be_bytes().to_vec();
    out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(padding);
    out
}

/// A call's binding: client and listener, relayed address and peer, channel.
struct Call {
    client: SocketAddr,
    listener: SocketAddr,
    relay: SocketAddr,
    peer: SocketAddr,
    channel: u16,
}

impl Call {
    fn binding(&self, expires_at: Instant) -> FastBinding {
        FastBinding {
            five_tuple: FiveTuple::udp(self.client, self.listener),
            channel: self.channel,
            peer: self.peer,
            relay: RelaySocket { id: RelayId(1), addr: self.relay },
            expires_at,
        }
    }
}

struct Rig {
    fast: FastPath,
    maps: FastMaps,
}

impl Rig {
    /// The program loaded; `local` are the host's addresses it is told.
    fn new(local: &[&str]) -> Rig {
        let mut fast = FastPath::load(64).expect("loading turn_fast (the verifier's verdict)");
        let host = Interface {
            name: "test".into(),
            index: 99,
            loopback: false,
            ethernet: false,
            up: false,
            addrs: local.iter().map(|s| s.parse().unwrap()).collect(),
        };
        fast.set_host(&[host]).unwrap();
        let maps = fast.worker_maps().unwrap();
        Rig { fast, maps }
    }

    fn bind(&mut self, call: &Call, lifetime: Duration) -> u32 {
        let slot = self.maps.take_slot().unwrap();
        let now = Instant::now();
        self.maps.write(&call.binding(now + lifetime), slot).unwrap();
        slot
    }

    /// Runs the program on `input` as if it came on loopback: (return value, output).
    fn run(&self, input: &[u8]) -> (u32, Vec<u8>) {
        self.run_on(input, LOOPBACK)
    }

    /// Runs the program on `input` received on interface `ingress`.
    fn run_on(&self, input: &[u8], ingress: u32) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; input.len() + 64];
        // A `struct __sk_buff` with only `ingress_ifindex` (offset 36) set.
        let mut ctx = [0u8; 192];
        ctx[36..40].copy_from_slice(&ingress.to_ne_bytes());
        let program = self.fast.program().unwrap();
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(input),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    fn verdict(&self, v: Verdict) -> u64 {
        self.fast.verdicts().unwrap()[v as usize]
    }

    /// Asserts that `input` goes up unchanged, counted as `v`.
    fn assert_up(&self, input: &[u8], v: Option<Verdict>, what: &str) {
        let before = v.map(|v| self.verdict(v));
        let (rc, out) = self.run(input);
        assert_eq!(rc, UP, "{what}: goes up");
        assert_eq!(out, input, "{what}: unchanged");
        if let (Some(v), Some(before)) = (v, before) {
            assert_eq!(self.verdict(v), before + 1, "{what}: counted as {v:?}");
        }
    }
}

/// A call between addresses of this host on loopback, IPv4 and IPv6 (the host's own
/// addresses 203.0.113.1 and 2001:db8::3478 as listener and relay), on these channels.
fn local_calls(v4_channel: u16, v6_channel: u16) -> [Call; 2] {
    [
        Call {
            client: addr("127.0.0.2:40000"),
            listener: addr("203.0.113.1:3478"),
            relay: addr("203.0.113.1:50000"),
            peer: addr("127.0.0.3:5000"),
            channel: v4_channel,
        },
        Call {
            client: addr("[::1]:40000"),
            listener: addr("[2001:db8::3478]:3478"),
            relay: addr("[2001:db8::3478]:50000"),
            peer: addr("[::1]:5000"),
            channel: v6_channel,
        },
    ]
}

fn require_root(test: &str) -> bool {
    turn_tests::require_root(test)
}

/// Both directions, both families, between addresses of this host on loopback: the output
/// is byte for byte the datagram built from scratch (hop limit kept: it stays here).
#[test]
fn rewrites_both_ways_byte_for_byte_ipv4_and_ipv6() {
    if !require_root("rewrites_both_ways_byte_for_byte_ipv4_and_ipv6") {
        return;
    }
    in_netns(|| {
        let mut rig = Rig::new(&["203.0.113.1", "2001:db8::3478"]);
        for call in local_calls(0x4001, 0x7FFE) {
            let slot = rig.bind(&call, Duration::from_secs(60));
            for len in [0usize, 1, 3, 4, 5, 160, 1200] {
                let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
                // Client -> peer, unpadded and padded to 4 bytes.
                let pads: &[&[u8]] = if len % 4 == 0 { &[&[]] } else { &[&[], &[0xEE; 3]] };
                for pad in pads {
                    let pad = &pad[..if pad.is_empty() { 0 } else { (4 - len % 4) % 4 }];
                    let input = frame(
                        call.client,
                        call.listener,
                        &channel_data(call.channel, &data, pad),
                        64,
                        None,
                    );
                    let (rc, out) = rig.run(&input);
                    assert_eq!(rc, DELIVERED, "client -> peer, {} bytes, pad {}", len, pad.len());
                    let expected = frame(call.relay, call.peer, &data, 64, None);
                    assert_eq!(out, expected, "client -> peer, {} bytes, pad {}", len, pad.len());
                }
                // Peer -> client.
                let input = frame(call.peer, call.relay, &data, 64, None);
                let (rc, out) = rig.run(&input);
                assert_eq!(rc, DELIVERED, "peer -> client, {len} bytes");
                let expected = frame(
                    call.listener,
                    call.client,
                    &channel_data(call.channel, &data, &[]),
                    64,
                    None,
                );
                assert_eq!(out, expected, "peer -> client, {len} bytes");
            }
            // The binding's counters: payload bytes, both ways.
            let t = rig.maps.traffic(slot);
            let sent: u64 = [0u64, 1, 3, 4, 5, 160, 1200].iter().sum();
            let padded_runs: u64 = [1u64, 3, 5, 1200].iter().filter(|l| *l % 4 != 0).count() as u64;
            assert_eq!(t.to_peer_packets, 7 + padded_runs);
            assert_eq!(t.to_client_packets, 7);
            assert_eq!(t.to_client_bytes, sent);
            assert_eq!(t.to_peer_bytes, sent + [1u64, 3, 5].iter().sum::<u64>());
        }
        assert_eq!(rig.verdict(Verdict::ToPeer), 2 * (7 + 3));
        assert_eq!(rig.verdict(Verdict::ToClient), 2 * 7);
    });
}

/// Relay to relay (both ends of a call on this host): a client's ChannelData becomes, in
/// one pass, ChannelData to the other allocation's client, its counters both ways; without
/// the other side's channel (a Send/Data indication peer) it goes up.
#[test]
fn relay_to_relay_in_one_pass() {
    if !require_root("relay_to_relay_in_one_pass") {
        return;
    }
    in_netns(|| {
        let mut rig = Rig::new(&["203.0.113.1", "2001:db8::1"]);
        for (a_client, b_client, listener, a_relay, b_relay) in [
            (
                "127.0.0.2:40000",
                "127.0.0.3:40001",
                "203.0.113.1:3478",
                "203.0.113.1:50000",
                "203.0.113.1:50001",
            ),
            (
                "[::1]:40000",
                "[::1]:40001",
                "[2001:db8::1]:3478",
                "[2001:db8::1]:50000",
                "[2001:db8::1]:50001",
            ),
        ] {
            let a = Call {
                client: addr(a_client),
                listener: addr(listener),
                relay: addr(a_relay),
                peer: addr(b_relay),
                channel: 0x4000,
            };
            let b = Call {
                client: addr(b_client),
                listener: addr(listener),
                relay: addr(b_relay),
                peer: addr(a_relay),
                channel: 0x4ABC,
            };
            let (a_slot, b_slot) =
                (rig.bind(&a, Duration::from_secs(60)), rig.bind(&b, Duration::from_secs(60)));
            let before = rig.verdict(Verdict::RelayToRelay);
            for (data, pad) in [(&b"odd"[..], &[7u8][..]), (&[0x80u8; 172][..], &[][..])] {
                let input =
                    frame(a.client, a.listener, &channel_data(a.channel, data, pad), 64, None);
                let (rc, out) = rig.run(&input);
                assert_eq!(rc, DELIVERED);
                let expected =
                    frame(b.listener, b.client, &channel_data(b.channel, data, &[]), 64, None);
                assert_eq!(out, expected, "{} bytes padded by {}", data.len(), pad.len());
            }
            assert_eq!(rig.verdict(Verdict::RelayToRelay), before + 2);
            let (ta, tb) = (rig.maps.traffic(a_slot), rig.maps.traffic(b_slot));
            assert_eq!((ta.to_peer_packets, ta.to_peer_bytes, ta.to_client_packets), (2, 175, 0));
            assert_eq!((tb.to_client_packets, tb.to_client_bytes, tb.to_peer_packets), (2, 175, 0));
        }
        // A's peer is a relayed address whose allocation has no channel to A: the datagram
        // goes to that relay as a plain datagram (its worker sends a Data indication).
        let a = Call {
            client: addr("127.0.0.2:40002"),
            listener: addr("203.0.113.1:3478"),
            relay: addr("203.0.113.1:50002"),
            peer: addr("203.0.113.1:50009"),
            channel: 0x4000,
        };
        rig.bind(&a, Duration::from_secs(60));
        let input = frame(a.client, a.listener, &channel_data(a.channel, b"x", &[]), 64, None);
        let (rc, out) = rig.run(&input);
        assert_eq!(rc, DELIVERED);
        assert_eq!(out, frame(a.relay, a.peer, b"x", 64, None));
    });
}

/// Everything the program must not rewrite goes up unchanged, each counted.
#[test]
fn everything_unusual_goes_up_unchanged() {
    if !require_root("everything_unusual_goes_up_unchanged") {
        return;
    }
    in_netns(|| {
        let mut rig = Rig::new(&["203.0.113.1"]);
        let local = Call {
            client: addr("127.0.0.2:40000"),
            listener: addr("203.0.113.1:3478"),
            relay: addr("203.0.113.1:50000"),
            peer: addr("127.0.0.3:5000"),
            channel: 0x4001,
        };
        rig.bind(&local, Duration::from_secs(60));
        let cd = channel_data(0x4001, b"hello", &[]);
        let ok = frame(local.client, local.listener, &cd, 64, None);
        assert_eq!(rig.run(&ok).0, DELIVERED, "the reference frame is relayed");

        // Not bound: another channel, another client, a STUN message, a stranger.
        let other = channel_data(0x4002, b"hello", &[]);
        rig.assert_up(
            &frame(local.client, local.listener, &other, 64, None),
            Some(Verdict::NoBinding),
            "unbound channel",
        );
        rig.assert_up(
            &frame(addr("127.0.0.9:40000"), local.listener, &cd, 64, None),
            Some(Verdict::NoBinding),
            "another client",
        );
        let stun = [0u8, 1, 0, 0, 0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
        rig.assert_up(
            &frame(local.client, local.listener, &stun, 64, None),
            Some(Verdict::NoBinding),
            "STUN",
        );
        rig.assert_up(
            &frame(addr("127.0.0.3:5001"), local.relay, b"x", 64, None),
            Some(Verdict::NoBinding),
            "peer port not bound",
        );
        // Trailing bytes beyond the padding, and a length longer than the datagram.
        let trailing = channel_data(0x4001, b"hello", &[0; 4]);
        rig.assert_up(
            &frame(local.client, local.listener, &trailing, 64, None),
            Some(Verdict::Malformed),
            "trailing bytes",
        );
        let mut short = cd.clone();
        short[3] = 9;
        rig.assert_up(
            &frame(local.client, local.listener, &short, 64, None),
            Some(Verdict::Malformed),
            "length beyond the datagram",
        );
        // IPv4 options (IHL 6) and fragments.
        let mut options = ok.clone();
        options[14] = 0x46;
        rig.assert_up(&options, Some(Verdict::Unusual), "IP options");
        for (flags, what) in [(0x20u8, "more fragments"), (0x00, "fragment offset")] {
            let mut frag = ok.clone();
            frag[20] = flags;
            frag[21] = if flags == 0 { 8 } else { 0 };
            rig.assert_up(&frag, Some(Verdict::Unusual), what);
        }
        // A UDP length that disagrees with the IP length.
        let mut bad_len = ok.clone();
        bad_len[14 + 20 + 5] += 1;
        rig.assert_up(&bad_len, Some(Verdict::Unusual), "UDP length");
        // For this host, but not from loopback (its input path would refuse the host's own
        // source address): up, to the workers.
        let before = rig.verdict(Verdict::LocalElsewhere);
        let (rc, out) = rig.run_on(&ok, 0);
        assert_eq!((rc, out == ok), (UP, true), "local destination from another interface");
        assert_eq!(rig.verdict(Verdict::LocalElsewhere), before + 1);
        // A peer that leaves the host: no route in this namespace, then a partial checksum.
        let remote = Call { peer: addr("198.51.100.7:5000"), channel: 0x4003, ..local };
        rig.bind(&remote, Duration::from_secs(60));
        let cd3 = channel_data(0x4003, b"hello", &[]);
        rig.assert_up(
            &frame(remote.client, remote.listener, &cd3, 64, None),
            Some(Verdict::NoRoute),
            "no route",
        );
        let ip = |s: &str| octets(s.parse().unwrap());
        let pseudo = sum(&ip("127.0.0.2")) + sum(&ip("203.0.113.1")) + 17 + (cd3.len() as u32 + 8);
        let partial = frame(remote.client, remote.listener, &cd3, 64, Some(fold(pseudo)));
        rig.assert_up(&partial, Some(Verdict::Unverified), "partial checksum leaving the host");
        // IPv6 without a checksum, and a client of another family than the peer.
        let v6 = Call {
            client: addr("[::1]:40000"),
            listener: addr("[2001:db8::1]:3478"),
            relay: addr("203.0.113.1:50001"),
            peer: addr("127.0.0.3:5000"),
            channel: 0x4004,
        };
        rig.bind(&v6, Duration::from_secs(60));
        let cd4 = channel_data(0x4004, b"hello", &[]);
        rig.assert_up(
            &frame(v6.client, v6.listener, &cd4, 64, None),
            Some(Verdict::CrossFamily),
            "IPv6 client, IPv4 peer",
        );
        let same = Call {
            relay: addr("[2001:db8::1]:50000"),
            peer: addr("[::1]:5000"),
            channel: 0x4005,
            ..v6
        };
        rig.bind(&same, Duration::from_secs(60));
        let cd5 = channel_data(0x4005, b"hello", &[]);
        rig.assert_up(
            &frame(same.client, same.listener, &cd5, 64, Some(0)),
            Some(Verdict::Malformed),
            "IPv6 without checksum",
        );
        assert_eq!(rig.run(&frame(same.client, same.listener, &cd5, 64, None)).0, DELIVERED);
        // A non-UDP frame and an ARP frame go up, uncounted.
        let mut tcp = ok.clone();
        tcp[14 + 9] = 6;
        let (rc, out) = rig.run(&tcp);
        assert_eq!((rc, out == tcp), (UP, true));
        let mut arp = ok.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let (rc, out) = rig.run(&arp);
        assert_eq!((rc, out == arp), (UP, true));
    });
}

/// An entry past its expiry stamp relays nothing, even while it is still in the map; an
/// IPv4 datagram without a checksum leaves without one.
#[test]
fn an_expired_entry_relays_nothing_and_a_missing_ipv4_checksum_stays_missing() {
    if !require_root("an_expired_entry_relays_nothing_and_a_missing_ipv4_checksum_stays_missing") {
        return;
    }
    in_netns(|| {
        let mut rig = Rig::new(&["203.0.113.1"]);
        let call = Call {
            client: addr("127.0.0.2:40000"),
            listener: addr("203.0.113.1:3478"),
            relay: addr("203.0.113.1:50000"),
            peer: addr("127.0.0.3:5000"),
            channel: 0x4001,
        };
        let slot = rig.bind(&call, Duration::from_secs(60));
        let input =
            frame(call.client, call.listener, &channel_data(0x4001, b"abc", &[]), 64, Some(0));
        let (rc, out) = rig.run(&input);
        assert_eq!(rc, DELIVERED);
        let mut expected = frame(call.relay, call.peer, b"abc", 64, None);
        expected[14 + 20 + 6..14 + 20 + 8].copy_from_slice(&[0, 0]);
        assert_eq!(out, expected);
        // The same entry, its stamp now: past by the time the program runs.
        let now = Instant::now();
        rig.maps.write(&call.binding(now), slot).unwrap();
        rig.assert_up(&input, Some(Verdict::Expired), "expired");
        rig.assert_up(
            &frame(call.peer, call.relay, b"x", 64, None),
            Some(Verdict::Expired),
            "expired, peer side",
        );
    });
}

/// A local sender's partial checksum (the folded pseudo-header sum a device would
/// complete): for a datagram delivered on this host the program computes the checksum
/// anew from the data, both ways, both families, at every length up to its limit.
#[test]
fn a_partial_checksum_is_computed_anew_for_local_delivery() {
    if !require_root("a_partial_checksum_is_computed_anew_for_local_delivery") {
        return;
    }
    in_netns(|| {
        let mut rig = Rig::new(&["203.0.113.1", "2001:db8::3478"]);
        let partial = |src: SocketAddr, dst: SocketAddr, udp_len: usize| {
            fold(sum(&octets(src.ip())) + sum(&octets(dst.ip())) + 17 + udp_len as u32)
        };
        for call in local_calls(0x4001, 0x4002) {
            rig.bind(&call, Duration::from_secs(60));
            for len in [1usize, 2, 3, 160, 255, 256, 257, 700, 1200, 1536] {
                let data: Vec<u8> = (0..len).map(|i| (i * 13 + 1) as u8).collect();
                let cd = channel_data(call.channel, &data, &[]);
                let field = partial(call.client, call.listener, cd.len() + 8);
                let input = frame(call.client, call.listener, &cd, 64, Some(field));
                let (rc, out) = rig.run(&input);
                assert_eq!(rc, DELIVERED, "client -> peer, {len} bytes");
                assert_eq!(out, frame(call.relay, call.peer, &data, 64, None), "{len} bytes");
                let field = partial(call.peer, call.relay, data.len() + 8);
                let input = frame(call.peer, call.relay, &data, 64, Some(field));
                let (rc, out) = rig.run(&input);
                assert_eq!(rc, DELIVERED, "peer -> client, {len} bytes");
                let expected = frame(call.listener, call.client, &cd, 64, None);
                assert_eq!(out, expected, "peer -> client, {len} bytes");
            }
            // Beyond what it sums: up, to the workers.
            let data = vec![7u8; 1537];
            let cd = channel_data(call.channel, &data, &[]);
            let field = partial(call.client, call.listener, cd.len() + 8);
            rig.assert_up(
                &frame(call.client, call.listener, &cd, 64, Some(field)),
                Some(Verdict::Unverified),
                "too long to sum",
            );
        }
    });
}
