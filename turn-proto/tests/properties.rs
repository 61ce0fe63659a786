//! Property tests: encode/parse round trip, and no panic on arbitrary input
//! (codec, ChannelData, and the server's packet handlers).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use common::*;
use proptest::prelude::*;
use turn_proto::channel_data::{self, ChannelData};
use turn_proto::server::{PEER_HEADROOM, PEER_TAILROOM, RelayId};
use turn_proto::stun::attr::{self, AlgorithmList, Attribute, U16List};
use turn_proto::stun::{Class, Family, Message, MessageEncoder, Method, TransactionId};

/// Owned form of the attributes the generator produces.
#[derive(Debug, Clone)]
enum OwnedAttr {
    Addr(u16, SocketAddr),
    Text(u16, String),
    U32(u16, u32),
    Data(Vec<u8>),
    Channel(u16),
    Transport(u8),
    Family(u16, Family),
    EvenPort(bool),
    DontFragment,
    Token([u8; 8]),
    Error(u16, String),
    AddrError(Family, u16, String),
    Icmp(u8, u8, u32),
    UserHash([u8; 32]),
    PasswordAlgorithm(u16, Vec<u8>),
    PasswordAlgorithms(Vec<u8>),
    Unknown(Vec<u8>),
    U64(u16, u64),
    Other(u16, Vec<u8>),
}

impl OwnedAttr {
    fn borrow(&self) -> Attribute<'_> {
        match self {
            OwnedAttr::Addr(t, a) => match *t {
                attr::MAPPED_ADDRESS => Attribute::MappedAddress(*a),
                attr::ALTERNATE_SERVER => Attribute::AlternateServer(*a),
                attr::XOR_MAPPED_ADDRESS => Attribute::XorMappedAddress(*a),
                attr::XOR_PEER_ADDRESS => Attribute::XorPeerAddress(*a),
                _ => Attribute::XorRelayedAddress(*a),
            },
            OwnedAttr::Text(t, s) => match *t {
                attr::USERNAME => Attribute::Username(s),
                attr::REALM => Attribute::Realm(s),
                attr::NONCE => Attribute::Nonce(s),
                attr::ALTERNATE_DOMAIN => Attribute::AlternateDomain(s),
                _ => Attribute::Software(s),
            },
            OwnedAttr::U32(t, v) => match *t {
                attr::LIFETIME => Attribute::Lifetime(*v),
                _ => Attribute::Priority(*v),
            },
            OwnedAttr::Data(d) => Attribute::Data(d),
            OwnedAttr::Channel(n) => Attribute::ChannelNumber(*n),
            OwnedAttr::Transport(p) => Attribute::RequestedTransport(*p),
            OwnedAttr::Family(t, f) => match *t {
                attr::REQUESTED_ADDRESS_FAMILY => Attribute::RequestedAddressFamily(*f),
                _ => Attribute::AdditionalAddressFamily(*f),
            },
            OwnedAttr::EvenPort(r) => Attribute::EvenPort(*r),
            OwnedAttr::DontFragment => Attribute::DontFragment,
            OwnedAttr::Token(t) => Attribute::ReservationToken(*t),
            OwnedAttr::Error(c, r) => Attribute::ErrorCode { code: *c, reason: r },
            OwnedAttr::AddrError(f, c, r) => {
                Attribute::AddressErrorCode { family: *f, code: *c, reason: r }
            }
            OwnedAttr::Icmp(t, c, d) => Attribute::Icmp { typ: *t, code: *c, data: *d },
            OwnedAttr::UserHash(h) => Attribute::UserHash(h),
            OwnedAttr::PasswordAlgorithm(a, p) => Attribute::PasswordAlgorithm(*a, p),
            OwnedAttr::PasswordAlgorithms(raw) => {
                Attribute::PasswordAlgorithms(AlgorithmList::new(raw).unwrap())
            }
            OwnedAttr::Unknown(raw) => Attribute::UnknownAttributes(U16List::new(raw).unwrap()),
            OwnedAttr::U64(t, v) => match *t {
                attr::ICE_CONTROLLED => Attribute::IceControlled(*v),
                _ => Attribute::IceControlling(*v),
            },
            OwnedAttr::Other(t, v) => Attribute::Other { typ: *t, value: v },
        }
    }
}

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, p)| SocketAddr::new(Ipv4Addr::from(ip).into(), p)),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(ip),
            p,
            0,
            0
        ))),
    ]
}

fn family() -> impl Strategy<Value = Family> {
    prop_oneof![Just(Family::V4), Just(Family::V6)]
}

fn owned_attr() -> impl Strategy<Value = OwnedAttr> {
    let addr_t = prop_oneof![
        Just(attr::MAPPED_ADDRESS),
        Just(attr::ALTERNATE_SERVER),
        Just(attr::XOR_MAPPED_ADDRESS),
        Just(attr::XOR_PEER_ADDRESS),
        Just(attr::XOR_RELAYED_ADDRESS),
    ];
    let text_t = prop_oneof![
        Just(attr::USERNAME),
        Just(attr::REALM),
        Just(attr::NONCE),
        Just(attr::SOFTWARE),
        Just(attr::ALTERNATE_DOMAIN),
    ];
    prop_oneof![
        (addr_t, socket_addr()).prop_map(|(t, a)| OwnedAttr::Addr(t, a)),
        (text_t, "\\PC{0,40}").prop_map(|(t, s)| OwnedAttr::Text(t, s)),
        (prop_oneof![Just(attr::LIFETIME), Just(attr::PRIORITY)], any::<u32>())
            .prop_map(|(t, v)| OwnedAttr::U32(t, v)),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(OwnedAttr::Data),
        any::<u16>().prop_map(OwnedAttr::Channel),
        any::<u8>().prop_map(OwnedAttr::Transport),
        (
            prop_oneof![
                Just(attr::REQUESTED_ADDRESS_FAMILY),
                Just(attr::ADDITIONAL_ADDRESS_FAMILY)
            ],
            family()
        )
            .prop_map(|(t, f)| OwnedAttr::Family(t, f)),
        any::<bool>().prop_map(OwnedAttr::EvenPort),
        Just(OwnedAttr::DontFragment),
        any::<[u8; 8]>().prop_map(OwnedAttr::Token),
        (300u16..700, "[a-zA-Z ]{0,30}").prop_map(|(c, r)| OwnedAttr::Error(c, r)),
        (family(), 300u16..700, "[a-z ]{0,20}").prop_map(|(f, c, r)| OwnedAttr::AddrError(f, c, r)),
        (any::<u8>(), any::<u8>(), any::<u32>()).prop_map(|(t, c, d)| OwnedAttr::Icmp(t, c, d)),
        any::<[u8; 32]>().prop_map(OwnedAttr::UserHash),
        (any::<u16>(), proptest::collection::vec(any::<[u8; 4]>(), 0..3))
            .prop_map(|(a, p)| OwnedAttr::PasswordAlgorithm(a, p.concat())),
        proptest::collection::vec(
            (any::<u16>(), proptest::collection::vec(any::<[u8; 4]>(), 0..2)),
            0..4
        )
        .prop_map(|l| {
            let mut raw = Vec::new();
            for (alg, p) in l {
                let p = p.concat();
                raw.extend_from_slice(&alg.to_be_bytes());
                raw.extend_from_slice(&(p.len() as u16).to_be_bytes());
                raw.extend_from_slice(&p);
            }
            OwnedAttr::PasswordAlgorithms(raw)
        }),
        proptest::collection::vec(any::<u16>(), 0..6)
            .prop_map(|l| { OwnedAttr::Unknown(l.iter().flat_map(|t| t.to_be_bytes()).collect()) }),
        (prop_oneof![Just(attr::ICE_CONTROLLED), Just(attr::ICE_CONTROLLING)], any::<u64>())
            .prop_map(|(t, v)| OwnedAttr::U64(t, v)),
        (0xC000u16..0xFFFF, proptest::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(t, v)| OwnedAttr::Other(t, v)),
    ]
}

fn class() -> impl Strategy<Value = Class> {
    prop_oneof![
        Just(Class::Request),
        Just(Class::Indication),
        Just(Class::SuccessResponse),
        Just(Class::ErrorResponse)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn encode_parse_round_trip(
        method in 0u16..0x1000,
        class in class(),
        txid in any::<[u8; 12]>(),
        attrs in proptest::collection::vec(owned_attr(), 0..8),
        mi in any::<bool>(),
        mi256 in any::<bool>(),
        fp in any::<bool>(),
        key in proptest::collection::vec(any::<u8>(), 1..40),
    ) {
        let mut buf = vec![0u8; 8192];
        let tid = TransactionId(txid);
        let mut enc = MessageEncoder::new(&mut buf, Method(method), class, &tid).unwrap();
        for a in &attrs {
            a.borrow().encode(&mut enc).unwrap();
        }
        if mi { enc.message_integrity(&key).unwrap(); }
        if mi256 { enc.message_integrity_sha256(&key).unwrap(); }
        if fp { enc.fingerprint().unwrap(); }
        let n = enc.finish();
        let m = Message::parse(&buf[..n]).unwrap();
        prop_assert_eq!(m.method(), Method(method));
        prop_assert_eq!(m.class(), class);
        prop_assert_eq!(m.transaction_id(), tid);
        let decoded: Vec<Attribute<'_>> = m
            .attributes()
            .map(|a| Attribute::decode(a.typ, a.value, &tid).unwrap())
            .collect();
        let expected: Vec<Attribute<'_>> = attrs.iter().map(|a| a.borrow()).collect();
        prop_assert_eq!(decoded, expected);
        prop_assert_eq!(m.verify_message_integrity(&key), mi);
        prop_assert_eq!(m.verify_message_integrity_sha256(&key), mi256);
        prop_assert_eq!(m.has_fingerprint(), fp);
        if mi { prop_assert!(!m.verify_message_integrity(b"not the key")); }
    }

    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(m) = Message::parse(&bytes) {
            let tid = m.transaction_id();
            for a in m.attributes() {
                let _ = Attribute::decode(a.typ, a.value, &tid);
            }
            let _ = m.verify_message_integrity(b"k");
            let _ = m.verify_message_integrity_sha256(b"k");
            let _ = m.unknown_comprehension_required::<16>();
        }
        let _ = ChannelData::parse(&bytes);
    }

    #[test]
    fn parse_never_panics_on_stun_like_input(
        txid in any::<[u8; 12]>(),
        typ in 0u16..0x4000,
        body in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        // A valid header in front of arbitrary attribute bytes reaches the
        // attribute walker far more often than random bytes.
        let mut v = Vec::new();
        v.extend_from_slice(&typ.to_be_bytes());
        let len = body.len() & !3;
        v.extend_from_slice(&(len as u16).to_be_bytes());
        v.extend_from_slice(&0x2112A442u32.to_be_bytes());
        v.extend_from_slice(&txid);
        v.extend_from_slice(&body[..len]);
        if let Ok(m) = Message::parse(&v) {
            let tid = m.transaction_id();
            for a in m.attributes() {
                let _ = Attribute::decode(a.typ, a.value, &tid);
            }
        }
    }

    #[test]
    fn channel_data_round_trip(channel in 0x4000u16..=0x7FFF, payload in proptest::collection::vec(any::<u8>(), 0..1500), pad in 0usize..4) {
        let mut buf = vec![0u8; payload.len() + 8];
        let n = channel_data::encode(&mut buf, channel, &payload).unwrap();
        let cd = ChannelData::parse(&buf[..n + pad.min(3)]).unwrap();
        prop_assert_eq!(cd.channel, channel);
        prop_assert_eq!(cd.payload, &payload[..]);
    }
}

/// A server with one allocation (permission + channel) to exercise deep paths.
fn primed() -> (Sim, Client, RelayId) {
    let mut sim = Sim::default();
    let mut c = Client::alice("192.0.2.50:40000");
    assert_eq!(c.allocate(&mut sim).class(), Class::SuccessResponse);
    let p: SocketAddr = "198.51.100.20:5000".parse().unwrap();
    assert_eq!(c.channel_bind(&mut sim, 0x4000, p).class(), Class::SuccessResponse);
    let relay = relay_of(&sim, &c, Family::V4);
    (sim, c, relay)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn server_never_panics_on_arbitrary_datagrams(
        datagrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..8),
        from_known_client in any::<bool>(),
        advance in 0u64..1000,
    ) {
        let (mut sim, c, _) = primed();
        let client = if from_known_client { c.addr } else { "192.0.2.99:1".parse().unwrap() };
        for d in &datagrams {
            let _ = sim.client_datagram(client, d);
        }
        sim.advance(advance);
        for d in &datagrams {
            let _ = sim.client_datagram(client, d);
        }
    }

    #[test]
    fn server_never_panics_on_mutated_requests(
        which in 0usize..6,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        truncate in any::<Option<usize>>(),
    ) {
        let (mut sim, mut c, _) = primed();
        let p: SocketAddr = "198.51.100.20:5000".parse().unwrap();
        let txid = c.next_txid();
        let attrs: Vec<Attribute<'_>> = match which {
            0 => vec![Attribute::RequestedTransport(17), Attribute::Lifetime(1000)],
            1 => vec![Attribute::XorPeerAddress(p), Attribute::XorPeerAddress(p)],
            2 => vec![Attribute::ChannelNumber(0x4001), Attribute::XorPeerAddress(p)],
            3 => vec![Attribute::Lifetime(0)],
            _ => vec![Attribute::XorPeerAddress(p), Attribute::Data(b"payload")],
        };
        let (method, class) = match which {
            0 => (Method::ALLOCATE, Class::Request),
            1 => (Method::CREATE_PERMISSION, Class::Request),
            2 => (Method::CHANNEL_BIND, Class::Request),
            3 => (Method::REFRESH, Class::Request),
            4 => (Method::SEND, Class::Indication),
            _ => (Method::BINDING, Class::Request),
        };
        let mut bytes = c.build(method, class, txid, &attrs);
        for (pos, v) in flips {
            let i = pos % bytes.len();
            bytes[i] ^= v;
        }
        if let Some(t) = truncate {
            let t = t % (bytes.len() + 1);
            bytes.truncate(t);
        }
        let _ = sim.client_datagram(c.addr, &bytes);
        let _ = sim.client_datagram(c.addr, &bytes);
    }

    #[test]
    fn peer_path_never_panics(
        payload in proptest::collection::vec(any::<u8>(), 0..2000),
        relay in 0u64..4,
        v6 in any::<bool>(),
        extra in 0usize..4,
        short in any::<bool>(),
    ) {
        let (mut sim, _, _) = primed();
        let peer: SocketAddr = if v6 { "[2606:4700::1]:5000".parse().unwrap() } else { "198.51.100.20:5000".parse().unwrap() };
        let mut buf = vec![0u8; PEER_HEADROOM + payload.len() + PEER_TAILROOM];
        buf[PEER_HEADROOM..PEER_HEADROOM + payload.len()].copy_from_slice(&payload);
        let len = if short { payload.len() + extra + PEER_TAILROOM } else { payload.len() };
        let _ = sim.server.handle_peer_datagram(sim.now, RelayId(relay), peer, &mut buf, len);
        let _ = sim.peer_datagram(RelayId(relay), "198.51.100.20:5001".parse().unwrap(), &payload);
    }
}

#[test]
fn huge_peer_datagram_is_dropped_not_truncated() {
    let (mut sim, mut c, relay) = primed();
    let p: SocketAddr = "198.51.100.20:7777".parse().unwrap();
    assert_eq!(c.create_permission(&mut sim, &[p]).class(), Class::SuccessResponse);
    let payload = vec![7u8; 65_530];
    // Not on a channel (other port): would need a Data indication > 64 KiB.
    assert_eq!(sim.peer_datagram(relay, p, &payload), Out::None);
    assert_eq!(sim.server.counters().dropped(turn_proto::server::DropReason::PayloadTooLarge), 1);
}

/// A frame of a stream: a Binding request with `n` bytes of SOFTWARE, or a padded
/// ChannelData message with `n` bytes of payload.
fn stream_frame(stun: bool, n: usize, fill: u8) -> Vec<u8> {
    if stun {
        let mut buf = vec![0u8; 64 + n];
        let mut enc = MessageEncoder::new(
            &mut buf,
            Method::BINDING,
            Class::Request,
            &TransactionId([fill; 12]),
        )
        .unwrap();
        enc.raw(attr::SOFTWARE, &vec![b'a'; n]).unwrap();
        let len = enc.finish();
        buf.truncate(len);
        buf
    } else {
        let mut buf = vec![0u8; 8 + n];
        let len = channel_data::encode(&mut buf, 0x4000 | u16::from(fill), &vec![fill; n]).unwrap();
        buf.truncate(len.div_ceil(4) * 4);
        buf
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// However a stream of frames is cut into reads, a reader that keeps the unconsumed
    /// bytes and takes the complete frames gets exactly the frames that were sent.
    #[test]
    fn frames_survive_any_split_of_the_stream(
        frames in proptest::collection::vec((any::<bool>(), 0usize..200, any::<u8>()), 1..12),
        cuts in proptest::collection::vec(1usize..64, 1..40),
    ) {
        use turn_proto::framing::{FrameKind, Frames};
        let sent: Vec<Vec<u8>> =
            frames.iter().map(|&(stun, n, fill)| stream_frame(stun, n, fill)).collect();
        let stream: Vec<u8> = sent.concat();
        let mut received: Vec<Vec<u8>> = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        let mut at = 0;
        let mut cut = cuts.iter().cycle();
        while at < stream.len() {
            let n = (*cut.next().unwrap()).min(stream.len() - at);
            pending.extend_from_slice(&stream[at..at + n]);
            at += n;
            let mut it = Frames::new(&pending);
            for (kind, frame) in it.by_ref() {
                prop_assert_eq!(kind == FrameKind::Stun, Message::parse(frame).is_ok());
                if kind == FrameKind::ChannelData {
                    prop_assert!(ChannelData::parse(frame).is_ok());
                }
                received.push(frame.to_vec());
            }
            prop_assert_eq!(it.error(), None);
            let used = it.consumed();
            pending.drain(..used);
        }
        prop_assert!(pending.is_empty());
        prop_assert_eq!(received, sent);
    }

    /// Arbitrary bytes never make the framer panic, claim more than it was given, or
    /// return a frame shorter than a header.
    #[test]
    fn framer_is_total_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let mut it = turn_proto::framing::Frames::new(&bytes);
        let mut total = 0;
        for (_, frame) in it.by_ref() {
            prop_assert!(frame.len() >= 4);
            total += frame.len();
        }
        prop_assert_eq!(total, it.consumed());
        prop_assert!(it.consumed() <= bytes.len());
    }
}
