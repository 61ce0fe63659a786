//! End-to-end RFC 8656 scenarios in the deterministic in-memory harness.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use turn_proto::server::{DeleteReason, DropReason, Event, RelayError, ServerConfig, Transport};
use turn_proto::stun::attr::{self, Attribute};
use turn_proto::stun::{Class, Family, Method};

const PEER: &str = "198.51.100.20:5000";
const PEER2: &str = "198.51.100.21:6000";

fn allocated(sim: &mut Sim, addr: &str) -> Client {
    let mut c = Client::alice(addr);
    let r = c.allocate(sim);
    assert_eq!(r.class(), Class::SuccessResponse, "{:?}", r.error_code());
    c
}

#[test]
fn binding_is_answered_without_authentication() {
    let mut sim = Sim::default();
    let mut c = Client::alice("192.0.2.50:40000");
    c.fingerprint = true;
    let txid = c.next_txid();
    let req = c.build(Method::BINDING, Class::Request, txid, &[]);
    let r = Resp { bytes: sim.client_datagram(c.addr, &req).client_bytes().to_vec() };
    assert_eq!(r.class(), Class::SuccessResponse);
    assert_eq!(r.attr(attr::XOR_MAPPED_ADDRESS), Some(Attribute::XorMappedAddress(c.addr)));
    // No SOFTWARE for strangers: a 20-byte request draws 20 + 12 (+ 8 FINGERPRINT).
    assert_eq!(r.attr(attr::SOFTWARE), None);
    assert_eq!(r.bytes.len(), 20 + 12 + 8);
    assert!(r.msg().has_fingerprint(), "FINGERPRINT mirrored");
    assert!(!r.msg().has_message_integrity());

    // An unknown comprehension-required attribute gets 420.
    let req = c.build(
        Method::BINDING,
        Class::Request,
        c.clone().next_txid(),
        &[Attribute::Other { typ: 0x0003, value: &[0, 0, 0, 0] }],
    );
    let r = Resp { bytes: sim.client_datagram(c.addr, &req).client_bytes().to_vec() };
    assert_eq!(r.error_code(), Some(420));
    match r.attr(attr::UNKNOWN_ATTRIBUTES) {
        Some(Attribute::UnknownAttributes(l)) => {
            assert_eq!(l.iter().collect::<Vec<_>>(), vec![0x0003])
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn allocate_401_then_success() {
    let mut sim = Sim::default();
    let mut c = Client::alice("192.0.2.50:40000");
    // First request without credentials: 401 with REALM, NONCE and
    // PASSWORD-ALGORITHMS, no integrity.
    let txid = c.next_txid();
    let req = c.build(Method::ALLOCATE, Class::Request, txid, &[Attribute::RequestedTransport(17)]);
    let r = Resp { bytes: sim.client_datagram(c.addr, &req).client_bytes().to_vec() };
    assert_eq!(r.error_code(), Some(401));
    assert_eq!(r.attr(attr::REALM), Some(Attribute::Realm(REALM)));
    let Some(Attribute::Nonce(nonce)) = r.attr(attr::NONCE) else { panic!() };
    assert!(nonce.starts_with("obMatJos2"));
    assert!(r.attr(attr::PASSWORD_ALGORITHMS).is_some());
    assert!(!r.msg().has_message_integrity());
    assert_eq!(sim.server.allocation_count(), 0);

    let r = c.allocate(&mut sim);
    assert_eq!(r.class(), Class::SuccessResponse);
    assert!(r.msg().has_message_integrity(), "legacy client gets MESSAGE-INTEGRITY");
    let relayed = r.all_xor(attr::XOR_RELAYED_ADDRESS);
    assert_eq!(relayed.len(), 1);
    assert!(relayed[0].is_ipv4());
    assert_eq!(r.lifetime(), Some(600));
    assert_eq!(r.attr(attr::XOR_MAPPED_ADDRESS), Some(Attribute::XorMappedAddress(c.addr)));
    assert_eq!(sim.server.allocation_count(), 1);
    assert_eq!(sim.quota.in_use_by("alice"), 1);
    let ev = sim.events();
    assert!(
        matches!(&ev[..], [Event::AllocationCreated { username, lifetime_secs: 600, .. }] if &**username == "alice")
    );
}

#[test]
fn lifetime_is_clamped() {
    let mut sim = Sim::default();
    for (i, (asked, granted)) in [(10, 600), (1200, 1200), (100_000, 3600)].into_iter().enumerate()
    {
        let mut c = Client::alice(&format!("192.0.2.50:{}", 40000 + i));
        let r = c.request(
            &mut sim,
            Method::ALLOCATE,
            &[Attribute::RequestedTransport(17), Attribute::Lifetime(asked)],
        );
        assert_eq!(r.lifetime(), Some(granted));
        assert_eq!(c.refresh(&mut sim, Some(asked)).lifetime(), Some(granted));
    }
}

#[test]
fn retransmitted_allocate_gets_identical_answer_and_new_transaction_gets_437() {
    let mut sim = Sim::default();
    let mut c = Client::alice("192.0.2.50:40000");
    let _ = c.allocate(&mut sim); // learns the nonce, allocates
    // A second client learns its own nonce (nonces are per client address)...
    let mut c2 = Client::alice("192.0.2.50:40002");
    assert_eq!(c2.refresh(&mut sim, None).error_code(), Some(437));
    // ...then its Allocate is retransmitted.
    let txid = c2.next_txid();
    let req =
        c2.build(Method::ALLOCATE, Class::Request, txid, &[Attribute::RequestedTransport(17)]);
    let first = sim.client_datagram(c2.addr, &req);
    let again = sim.client_datagram(c2.addr, &req);
    assert_eq!(first, again);
    assert_eq!(Resp { bytes: first.client_bytes().to_vec() }.class(), Class::SuccessResponse);
    assert_eq!(sim.server.allocation_count(), 2);
    assert_eq!(sim.server.counters().retransmits_answered, 1);
    // A new Allocate (new transaction) on an existing 5-tuple: 437.
    let r = c.allocate(&mut sim);
    assert_eq!(r.error_code(), Some(437));
    assert!(c.verify(&r), "authenticated errors are signed");
}

#[test]
fn retransmission_after_cache_eviction_is_still_consistent() {
    let mut cfg = test_config();
    cfg.retransmit_cache_entries = 0;
    let mut sim = Sim::new(cfg);
    let mut c = Client::alice("192.0.2.50:40000");
    let _ = c.request(&mut sim, Method::BINDING, &[]);
    // learn the nonce with a failing request
    let r = c.create_permission(&mut sim, &[peer(PEER)]);
    assert_eq!(r.error_code(), Some(437));
    let txid = c.next_txid();
    let req = c.build(Method::ALLOCATE, Class::Request, txid, &[Attribute::RequestedTransport(17)]);
    let a = Resp { bytes: sim.client_datagram(c.addr, &req).client_bytes().to_vec() };
    let b = Resp { bytes: sim.client_datagram(c.addr, &req).client_bytes().to_vec() };
    assert_eq!(a.class(), Class::SuccessResponse);
    assert_eq!(b.class(), Class::SuccessResponse);
    assert_eq!(a.all_xor(attr::XOR_RELAYED_ADDRESS), b.all_xor(attr::XOR_RELAYED_ADDRESS));
    assert_eq!(sim.server.allocation_count(), 1);
}

#[test]
fn refresh_and_delete() {
    let mut sim = Sim::default();
    let mut c = allocated(&mut sim, "192.0.2.50:40000");
    let relay = relay_of(&sim, &c, Family::V4);
    sim.events();
    sim.advance(500);
    let r = c.refresh(&mut sim, Some(900));
    assert_eq!(r.lifetime(), Some(900));
    assert!(matches!(&sim.events()[..], [Event::AllocationRefreshed { lifetime_secs: 900, .. }]));
    sim.advance(800); // 1300 s after creation: alive thanks to the refresh
    assert_eq!(sim.server.allocation_count(), 1);
    // The nonce is stale by now: the helper handles the 438.
    assert_eq!(c.refresh(&mut sim, Some(900)).lifetime(), Some(900));
    sim.events();

    // Refresh with lifetime 0 deletes; its retransmission gets the same
    // success; a new Refresh gets 437.
    let txid = c.next_txid();
    let req = c.build(Method::REFRESH, Class::Request, txid, &[Attribute::Lifetime(0)]);
    let first = sim.client_datagram(c.addr, &req);
    let r = Resp { bytes: first.client_bytes().to_vec() };
    assert_eq!(r.class(), Class::SuccessResponse);
    assert_eq!(r.lifetime(), Some(0));
    assert_eq!(sim.server.allocation_count(), 0);
    assert_eq!(sim.relays.released, vec![relay]);
    assert_eq!(sim.quota.in_use(), 0);
    assert!(matches!(
        &sim.events()[..],
        [Event::AllocationDeleted { reason: DeleteReason::ClientRequest, .. }]
    ));
    assert_eq!(sim.client_datagram(c.addr, &req), first);
    assert_eq!(c.refresh(&mut sim, None).error_code(), Some(437));
}

#[test]
fn allocation_expires_and_releases_everything() {
    let mut sim = Sim::default();
    let mut c = allocated(&mut sim, "192.0.2.50:40000");
    let relay = relay_of(&sim, &c, Family::V4);
    assert_eq!(c.channel_bind(&mut sim, 0x4000, peer(PEER)).class(), Class::SuccessResponse);
    sim.events();
    sim.advance(599);
    assert_eq!(sim.server.allocation_count(), 1);
    sim.advance(1);
    assert_eq!(sim.server.allocation_count(), 0);
    assert_eq!(sim.relays.released, vec![relay]);
    assert!(sim.relays.live.is_empty());
    assert_eq!(sim.quota.in_use(), 0);
    assert!(matches!(
        &sim.events()[..],
        [Event::AllocationDeleted { reason: DeleteReason::Expired, .. }]
    ));
    assert_eq!(sim.server.counters().allocations_expired, 1);
    assert_eq!(c.channel_data(&mut sim, 0x4000, b"x"), Out::None);
    assert_eq!(sim.peer_datagram(relay, peer(PEER), b"x"), Out::None);
    assert_eq!(sim.server.poll_timeout(), None);
    assert_eq!(sim.server.timer_entries(), 0);
}

#[test]
fn permissions_send_and_data_indications() {
    let mut sim = Sim::default();
    let mut c = allocated(&mut sim, "192.0.2.50:40000");
    let relay = relay_of(&sim, &c, Family::V4);

    // No permission yet: Send is dropped, peer data is dropped.
    assert_eq!(c.send_indication(&mut sim, peer(PEER), b"hi"), Out::None);
    assert_eq!(sim.peer_datagram(relay, peer(PEER), b"yo"), Out::None);
    assert_eq!(sim.server.counters().dropped(DropReason::NoPermission), 2);

    // Several XOR-PEER-ADDRESS in one CreatePermission.
    let r = c.create_permission(&mut sim, &[peer(PEER), peer(PEER2)]);
    assert_eq!(r.class(), Class::SuccessResponse);

    for p in [PEER, PEER2] {
        match c.send_indication(&mut sim, peer(p), b"hello peer") {
            Out::ToPeer { relay: r, peer: to, data, dont_fragment } => {
                assert_eq!(r, relay);
                assert_eq!(to, peer(p));
                assert_eq!(data, b"hello peer");
                assert!(!dont_fragment);
            }
            other => panic!("{other:?}"),
        }
    }
    // Permission is by IP: another port of the same peer works too.
    let other_port = peer("198.51.100.20:5999");
    assert!(matches!(c.send_indication(&mut sim, other_port, b"x"), Out::ToPeer { .. }));

    // Peer -> client: Data indication with XOR-PEER-ADDRESS and DATA.
    for payload in [&b""[..], b"a", b"abcd", b"hello client"] {
        let out = sim.peer_datagram(relay, peer(PEER), payload);
        let (from, data) = data_indication(out.client_bytes());
        assert_eq!(from, peer(PEER));
        assert_eq!(data, payload);
    }
    let v6 = "[2001:db8:1::5]:7000".parse().unwrap();
    // Different family than the relay: CreatePermission gets 443.
    assert_eq!(c.create_permission(&mut sim, &[v6]).error_code(), Some(443));
    assert_eq!(c.send_indication(&mut sim, v6, b"x"), Out::None);
}

#[test]
fn denied_peers() {
    let mut sim = Sim::default();
    let mut c = allocated(&mut sim, "192.0.2.50:40000");
    for p in [
        "0.0.0.0:5000",
        "127.0.0.1:5000",
        "10.0.0.1:5000",
        "169.254.169.254:80",
        "255.255.255.255:5000",
        "224.0.0.1:5000",
    ] {
        assert_eq!(c.create_permission(&mut sim, &[peer(p)]).error_code(), Some(403), "{p}");
        assert_eq!(c.channel_bind(&mut sim, 0x4001, peer(p)).error_code(), Some(403), "{p}");
    }
    // One denied peer among allowed ones: 403 and nothing installed.
    let r = c.create_permission(&mut sim, &[peer(PEER), peer("192.168.1.1:1")]);
    assert_eq!(r.error_code(), Some(403));
    assert_eq!(c.send_indication(&mut sim, peer(PEER), b"x"), Out::None);

    // IPv6 allocation for the IPv6 forms.
    let mut c6 = Client::alice("192.0.2.50:40001");
    let r = c6.request(
        &mut sim,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(17), Attribute::RequestedAddressFamily(Family::V6)],
    );
    assert_eq!(r.class(), Class::SuccessResponse);
    assert!(r.all_xor(attr::XOR_RELAYED_ADDRESS)[0].is_ipv6());
    for p in [
        "[::]:5000",
        "[::1]:5000",
        "[::ffff:127.0.0.1]:5000",
        "[::127.0.0.1]:5000",
        "[2002:7f00:1::1]:5000",
        "[2001:0:7f00:1::1]:5000",
        "[fe80::1]:5000",
        "[fd00::1]:5000",
        "[ff02::1]:5000",
        "[64:ff9b::a00:1]:5000",
    ] {
        assert_eq!(c6.create_permission(&mut sim, &[peer(p)]).error_code(), Some(403), "{p}");
    }
    assert_eq!(
        c6.create_permission(&mut sim, &[peer("[2606:4700::1111]:53")]).class(),
        Class::SuccessResponse
    );
    // Port 0 is not a valid destination for a channel.
    assert_eq!(c.channel_bind(&mut sim, 0x4002, peer("198.51.100.9:0")).error_code(), Some(403));
}

#[test]
fn channels_both_ways_and_binding_rules() {
    let mut sim = Sim::default();
    let mut c = allocated(&mut sim, "192.0.2.50:40000");
    let relay = relay_of(&sim, &c, Family::V4);
    assert_eq!(c.channel_bind(&mut sim, 0x4000, peer(PEER)).class(), Class::SuccessResponse);

    // Client -> peer via ChannelData (also installs the permission).
    match c.channel_data(&mut sim, 0x4000, b"over channel") {
        Out::ToPeer { relay: r, peer: p, data, .. } => {
            assert_eq!((r, p), (relay, peer(PEER)));
            assert_eq!(data, b"over channel");
        }
        other => panic!("{other:?}"),
    }
    // Peer -> client is framed as ChannelData now.
    let out = sim.peer_datagram(relay, peer(PEER), b"back");
    assert_eq!(out.client_bytes(), &[0x40, 0x00, 0x00, 0x04, b'b', b'a', b'c', b'k']);
    // Another port of the same IP is not bound: Data indication.
    let out = sim.peer_datagram(relay, peer("198.51.100.20:5001"), b"x");
    assert!(data_indication(out.client_bytes()).1 == b"x");

    // Unbound channel: dropped.
    assert_eq!(c.channel_data(&mut sim, 0x4001, b"x"), Out::None);
    // Refreshing the same pair is fine.
    assert_eq!(c.channel_bind(&mut sim, 0x4000, peer(PEER)).class(), Class::SuccessResponse);
    // Same channel, other peer: 400. Same peer, other channel: 400.
    assert_eq!(c.channel_bind(&mut sim, 0x4000, peer(PEER2)).error_code(), Some(400));
    assert_eq!(c.channel_bind(&mut sim, 0x4001, peer(PEER)).error_code(), Some(400));
    // Out-of-range channel numbers: 400.
    assert_eq!(c.channel_bind(&mut sim, 0x3FFF, peer(PEER2)).error_code(), Some(400));
    assert_eq!(c.channel_bind(&mut sim, 0x8000, peer(PEER2)).error_code(), Some(400));
    // RFC 5766's upper range works (coturn's client binds 0x7xxx).
    assert_eq!(c.channel_bind(&mut sim, 0x7ABC, peer(PEER2)).class(), Class::SuccessResponse);
    // Missing attributes: 400.
    let r = c.request(&mut sim, Method::CHANNEL_BIND, &[Attribute::ChannelNumber(0x4005)]);
    assert_eq!(r.error_code(), Some(400));
}

#[test]
fn permission_and_channel_expiry_and_holddown() {
    let mut sim = Sim::default();
    let mut c = allocated(&mut sim, "192.0.2.50:40000");
    let relay = relay_of(&sim, &c, Family::V4);
    assert_eq!(c.refresh(&mut sim, Some(3600)).lifetime(), Some(3600));
    assert_eq!(c.create_permission(&mut sim, &[peer(PEER2)]).class(), Class::SuccessResponse);
    assert_eq!(c.channel_bind(&mut sim, 0x4000, peer(PEER)).class(), Class::SuccessResponse);

    // Permissions last 300 s and data does not refresh them.
    sim.advance(299);
    assert!(matches!(c.send_indication(&mut sim, peer(PEER2), b"x"), Out::ToPeer { .. }));
    sim.advance(1);
    assert_eq!(c.send_indication(&mut sim, peer(PEER2), b"x"), Out::None);
    assert_eq!(sim.peer_datagram(relay, peer(PEER2), b"x"), Out::None);
    // The channel's permission also expired at 300 s: ChannelData dropped.
    assert_eq!(c.channel_data(&mut sim, 0x4000, b"x"), Out::None);
    // Refresh the permission only (t = 400); the channel (600 s) is still bound.
    sim.advance(100);
    assert_eq!(c.create_permission(&mut sim, &[peer(PEER)]).class(), Class::SuccessResponse);
    assert!(matches!(c.channel_data(&mut sim, 0x4000, b"x"), Out::ToPeer { .. }));
    sim.advance(199); // t = 599
    assert!(matches!(c.channel_data(&mut sim, 0x4000, b"x"), Out::ToPeer { .. }));
    sim.advance(1); // t = 600: channel expired
    assert_eq!(c.channel_data(&mut sim, 0x4000, b"x"), Out::None);
    // The permission (refreshed at 400) is alive: peer data goes as a Data indication.
    let out = sim.peer_datagram(relay, peer(PEER), b"late");
    assert_eq!(data_indication(out.client_bytes()).1, b"late");

    // Hold-down: for 300 s the channel and the peer cannot be re-paired.
    assert_eq!(c.channel_bind(&mut sim, 0x4000, peer(PEER2)).error_code(), Some(400));
    assert_eq!(c.channel_bind(&mut sim, 0x4001, peer(PEER)).error_code(), Some(400));
    sim.advance(300); // t = 900: hold-down over
    assert_eq!(c.channel_bind(&mut sim, 0x4000, peer(PEER2)).class(), Class::SuccessResponse);
    assert_eq!(c.channel_bind(&mut sim, 0x4001, peer(PEER)).class(), Class::SuccessResponse);

    // Re-binding the same pair during hold-down revives it.
    let mut d = allocated(&mut sim, "192.0.2.50:40001");
    assert_eq!(d.refresh(&mut sim, Some(3600)).lifetime(), Some(3600));
    assert_eq!(d.channel_bind(&mut sim, 0x4100, peer(PEER)).class(), Class::SuccessResponse);
    sim.advance(650);
    assert_eq!(d.channel_data(&mut sim, 0x4100, b"x"), Out::None);
    assert_eq!(d.channel_bind(&mut sim, 0x4100, peer(PEER)).class(), Class::SuccessResponse);
    assert!(matches!(d.channel_data(&mut sim, 0x4100, b"x"), Out::ToPeer { .. }));
}

#[test]
fn stale_nonce_gets_438_and_a_fresh_nonce() {
    let mut sim = Sim::default();
    let mut c = allocated(&mut sim, "192.0.2.50:40000");
    let old = c.signer.nonce.clone().unwrap();
    sim.advance(601); // nonce lifetime 600 s; allocation lifetime 600 s too
    let mut d = Client::alice("192.0.2.50:40001");
    d.signer.realm = c.signer.realm.clone();
    d.signer.nonce = Some(old.clone());
    // Nonces are bound to the client address: another client gets 438.
    let txid = d.next_txid();
    let req = d.build(Method::ALLOCATE, Class::Request, txid, &[Attribute::RequestedTransport(17)]);
    let r = Resp { bytes: sim.client_datagram(d.addr, &req).client_bytes().to_vec() };
    assert_eq!(r.error_code(), Some(438));
    assert!(r.attr(attr::REALM).is_some());
    assert!(r.attr(attr::PASSWORD_ALGORITHMS).is_some());
    // The client helper retries with the new nonce.
    let r = c.allocate(&mut sim);
    assert_eq!(r.class(), Class::SuccessResponse);
    assert_ne!(c.signer.nonce.clone().unwrap(), old);
    assert!(sim.server.counters().stale_nonces >= 2);
}

#[test]
fn wrong_password_unknown_user_and_missing_attributes() {
    let mut sim = Sim::default();
    let mut c = Client::new("192.0.2.50:40000", "alice", "wrong");
    let r = c.allocate(&mut sim);
    assert_eq!(r.error_code(), Some(401));
    assert!(r.attr(attr::NONCE).is_some());
    let mut u = Client::new("192.0.2.50:40001", "mallory", "x");
    assert_eq!(u.allocate(&mut sim).error_code(), Some(401));
    assert_eq!(sim.server.allocation_count(), 0);
    assert_eq!(sim.server.counters().auth_failures, 2);

    // MESSAGE-INTEGRITY without REALM/NONCE: 400.
    let mut buf = [0u8; 256];
    let mut enc = turn_proto::stun::MessageEncoder::new(
        &mut buf,
        Method::ALLOCATE,
        Class::Request,
        &turn_proto::stun::TransactionId([3; 12]),
    )
    .unwrap();
    enc.raw(attr::USERNAME, b"alice").unwrap();
    enc.message_integrity(b"k").unwrap();
    let n = enc.finish();
    let r = Resp { bytes: sim.client_datagram(c.addr, &buf[..n]).client_bytes().to_vec() };
    assert_eq!(r.error_code(), Some(400));
    assert!(r.attr(attr::NONCE).is_none());

    // Pre-hashed MD5 key user works with the legacy algorithm...
    let mut carol = Client::new("192.0.2.50:40002", "carol", "carol-pw");
    assert_eq!(carol.allocate(&mut sim).class(), Class::SuccessResponse);
    // ...but cannot do SHA-256 (no password to derive it from) where it is offered.
    let mut carol2 = Client::new("192.0.2.50:40003", "carol", "carol-pw");
    carol2.signer.mode = AuthMode::Sha256;
    assert_eq!(carol2.allocate(&mut sim).error_code(), Some(401));
}

#[test]
fn software_only_in_authenticated_responses_and_unknown_users_cost_a_known_ones_work() {
    let mut sim = Sim::default();
    let mut alice = Client::alice("192.0.2.60:40000");
    let txid = alice.next_txid();
    let req =
        alice.build(Method::ALLOCATE, Class::Request, txid, &[Attribute::RequestedTransport(17)]);
    let challenge = Resp { bytes: sim.client_datagram(alice.addr, &req).client_bytes().to_vec() };
    assert_eq!(challenge.error_code(), Some(401));
    assert_eq!(challenge.attr(attr::SOFTWARE), None, "401 to a stranger");
    let ok = alice.allocate(&mut sim);
    assert_eq!(ok.attr(attr::SOFTWARE), Some(Attribute::Software("turn-proto test")));

    // A wrong password for a known user and any password for an unknown one: both 401,
    // after the same number of integrity computations.
    let checks = |sim: &mut Sim, user: &str| {
        let mut c = Client::new("192.0.2.61:40000", user, "not-the-password");
        let before = sim.server.counters().integrity_checks;
        assert_eq!(c.allocate(sim).error_code(), Some(401));
        sim.server.counters().integrity_checks - before
    };
    let known = checks(&mut sim, "alice");
    let unknown = checks(&mut sim, "mallory");
    assert!(known > 0);
    assert_eq!(known, unknown, "an unknown username must not answer faster");
}

#[test]
fn an_md5_key_user_works_with_a_sha256_first_client_when_only_md5_is_offered() {
    // What the daemon configures when a user has a pre-hashed MD5 key: only what every
    // key can verify is offered, and an RFC 8489 client that prefers SHA-256 picks MD5.
    let mut cfg = test_config();
    cfg.password_algorithms = vec![turn_proto::credentials::PasswordAlgorithm::Md5];
    let mut sim = Sim::new(cfg);
    let mut carol = Client::new("192.0.2.50:40005", "carol", "carol-pw");
    carol.signer.mode = AuthMode::Sha256;
    let r = carol.allocate(&mut sim);
    assert_eq!(r.class(), Class::SuccessResponse, "{:?}", r.error_code());
    assert!(r.attr(attr::MESSAGE_INTEGRITY_SHA256).is_some(), "negotiated, SHA-256 integrity");
}

#[test]
fn sha256_negotiation_and_userhash() {
    let mut sim = Sim::default();
    let mut c = Client::alice("192.0.2.50:40000");
    c.signer.mode = AuthMode::Sha256;
    let r = c.allocate(&mut sim);
    assert_eq!(r.class(), Class::SuccessResponse);
    assert!(r.msg().has_message_integrity_sha256());
    assert!(!r.msg().has_message_integrity());
    assert!(c.verify(&r));

    // USERHASH (static users only).
    let mut h = Client::alice("192.0.2.50:40001");
    h.signer.mode = AuthMode::Sha256UserHash;
    let r = h.allocate(&mut sim);
    assert_eq!(r.class(), Class::SuccessResponse);
    assert!(h.verify(&r));

    // PASSWORD-ALGORITHMS not matching what the server sent: 400.
    let mut m = Client::alice("192.0.2.50:40002");
    m.signer.mode = AuthMode::Sha256;
    let _ = m.allocate(&mut sim);
    m.signer.algorithms = Some(vec![0, 2, 0, 0]);
    let r = m.refresh(&mut sim, None);
    assert_eq!(r.error_code(), Some(400));
    // PASSWORD-ALGORITHM without PASSWORD-ALGORITHMS: 400.
    m.signer.algorithms = None;
    assert_eq!(m.refresh(&mut sim, None).error_code(), Some(400));
}

#[test]
fn negotiation_disabled_uses_plain_nonces() {
    let mut cfg = test_config();
    cfg.password_algorithms.clear();
    let mut sim = Sim::new(cfg);
    let mut c = Client::alice("192.0.2.50:40000");
    let r = c.allocate(&mut sim);
    assert_eq!(r.class(), Class::SuccessResponse);
    assert!(!c.signer.nonce.as_ref().unwrap().starts_with(b"obMatJos2"));
    assert!(c.signer.algorithms.is_none());
}

#[test]
fn rest_credentials() {
    let mut sim = Sim::default();
    let expiry = UNIX0 + 3600;
    let mut c = rest_client("192.0.2.50:40000", expiry, "dave", b"new-secret");
    assert_eq!(c.allocate(&mut sim).class(), Class::SuccessResponse);
    // Rotation: the old secret still works.
    let mut o = rest_client("192.0.2.50:40001", expiry, "erin", b"old-secret");
    assert_eq!(o.allocate(&mut sim).class(), Class::SuccessResponse);
    // Bare expiry form, SHA-256.
    let name = format!("{expiry}");
    let pw = turn_proto::credentials::rest_password(b"new-secret", &name);
    let mut b = Client::new("192.0.2.50:40002", &name, &pw);
    b.signer.mode = AuthMode::Sha256;
    assert_eq!(b.allocate(&mut sim).class(), Class::SuccessResponse);
    // Unknown secret.
    let mut x = rest_client("192.0.2.50:40003", expiry, "eve", b"guess");
    assert_eq!(x.allocate(&mut sim).error_code(), Some(401));
    // Expired username.
    let mut e = rest_client("192.0.2.50:40004", UNIX0 - 1, "frank", b"new-secret");
    assert_eq!(e.allocate(&mut sim).error_code(), Some(401));
    // A live allocation whose REST username expires can no longer refresh.
    sim.advance(3601);
    let mut late = rest_client("192.0.2.50:40005", UNIX0 + 4000, "gina", b"new-secret");
    assert_eq!(late.allocate(&mut sim).class(), Class::SuccessResponse);
    sim.advance(500);
    assert_eq!(late.refresh(&mut sim, None).error_code(), Some(401));
}

#[test]
fn rest_credentials_of_one_user_share_one_quota() {
    let mut sim = Sim::default();
    sim.quota = turn_proto::server::LocalQuota::new(2, 0);
    // Three fresh credentials of "dave" (each a different `expiry:dave` string).
    for (i, expiry) in [UNIX0 + 600, UNIX0 + 601, UNIX0 + 602].into_iter().enumerate() {
        let mut c =
            rest_client(&format!("192.0.2.70:{}", 41000 + i), expiry, "dave", b"new-secret");
        let r = c.allocate(&mut sim);
        if i < 2 {
            assert_eq!(r.class(), Class::SuccessResponse, "credential {i}");
        } else {
            assert_eq!(r.error_code(), Some(486), "the third counts against dave's quota");
        }
    }
    assert_eq!(sim.quota.in_use_by("dave"), 2);
    // Another user is not affected; 0 total means unlimited.
    let mut erin = rest_client("192.0.2.70:42000", UNIX0 + 600, "erin", b"new-secret");
    assert_eq!(erin.allocate(&mut sim).class(), Class::SuccessResponse);
    assert_eq!(sim.quota.in_use(), 3);
}

#[test]
fn quota_and_capacity() {
    let mut sim = Sim::default();
    sim.quota = turn_proto::server::LocalQuota::new(1, 100);
    let _c = allocated(&mut sim, "192.0.2.50:40000");
    let mut c2 = Client::alice("192.0.2.50:40001");
    let r = c2.allocate(&mut sim);
    assert_eq!(r.error_code(), Some(486));
    assert!(c2.verify(&r));
    assert_eq!(sim.server.counters().quota_rejections, 1);
    let mut b = Client::new("192.0.2.50:40002", "bob", "bob-pw");
    assert_eq!(b.allocate(&mut sim).class(), Class::SuccessResponse);

    // Relay allocator out of ports: 508 and quota given back.
    sim.relays.fail_next = Some(RelayError::InsufficientCapacity);
    let mut b3 = Client::new("192.0.2.50:40004", "carol", "carol-pw");
    assert_eq!(b3.allocate(&mut sim).error_code(), Some(508));
    assert_eq!(sim.quota.in_use_by("carol"), 0);

    // Per-server cap.
    let mut cfg = test_config();
    cfg.max_allocations = 1;
    let mut sim = Sim::new(cfg);
    let _ = allocated(&mut sim, "192.0.2.50:40000");
    let mut b = Client::new("192.0.2.50:40002", "bob", "bob-pw");
    assert_eq!(b.allocate(&mut sim).error_code(), Some(508));

    // Permission cap.
    let mut cfg = test_config();
    cfg.max_permissions_per_allocation = 2;
    cfg.max_channels_per_allocation = 1;
    let mut sim = Sim::new(cfg);
    let mut c = allocated(&mut sim, "192.0.2.50:40000");
    assert_eq!(
        c.create_permission(&mut sim, &[peer(PEER), peer(PEER2)]).class(),
        Class::SuccessResponse
    );
    assert_eq!(c.create_permission(&mut sim, &[peer(PEER)]).class(), Class::SuccessResponse);
    assert_eq!(c.create_permission(&mut sim, &[peer("198.51.100.22:1")]).error_code(), Some(508));
    assert_eq!(c.channel_bind(&mut sim, 0x4000, peer(PEER)).class(), Class::SuccessResponse);
    assert_eq!(c.channel_bind(&mut sim, 0x4001, peer(PEER2)).error_code(), Some(508));
}

#[test]
fn mismatches_437_and_441() {
    let mut sim = Sim::default();
    let mut c = Client::alice("192.0.2.50:40000");
    assert_eq!(c.refresh(&mut sim, None).error_code(), Some(437));
    assert_eq!(c.create_permission(&mut sim, &[peer(PEER)]).error_code(), Some(437));
    assert_eq!(c.channel_bind(&mut sim, 0x4000, peer(PEER)).error_code(), Some(437));
    assert_eq!(c.send_indication(&mut sim, peer(PEER), b"x"), Out::None);
    assert_eq!(c.channel_data(&mut sim, 0x4000, b"x"), Out::None);
    assert_eq!(sim.server.counters().dropped(DropReason::NoAllocation), 2);

    let _ = c.allocate(&mut sim);
    // Same 5-tuple, other user: 441.
    let mut b = Client::new("192.0.2.50:40000", "bob", "bob-pw");
    b.counter = 1000;
    let r = b.create_permission(&mut sim, &[peer(PEER)]);
    assert_eq!(r.error_code(), Some(441));
    assert_eq!(b.refresh(&mut sim, None).error_code(), Some(441));
    // Another listener is another 5-tuple.
    sim.listener = "192.0.2.11:3478".parse().unwrap();
    assert_eq!(c.refresh(&mut sim, None).error_code(), Some(437));
}

#[test]
fn allocate_attribute_rules() {
    let mut sim = Sim::default();
    let mut c = Client::alice("192.0.2.50:40000");
    let rt = Attribute::RequestedTransport(17);
    // Missing REQUESTED-TRANSPORT: 400; TCP: 442.
    assert_eq!(c.request(&mut sim, Method::ALLOCATE, &[]).error_code(), Some(400));
    assert_eq!(
        c.request(&mut sim, Method::ALLOCATE, &[Attribute::RequestedTransport(6)]).error_code(),
        Some(442)
    );
    // DONT-FRAGMENT unsupported: 420 listing it.
    let r = c.request(&mut sim, Method::ALLOCATE, &[rt, Attribute::DontFragment]);
    assert_eq!(r.error_code(), Some(420));
    assert!(
        matches!(r.attr(attr::UNKNOWN_ATTRIBUTES), Some(Attribute::UnknownAttributes(l)) if l.iter().eq([0x001A]))
    );
    // Unknown comprehension-required attribute: 420.
    let r =
        c.request(&mut sim, Method::ALLOCATE, &[rt, Attribute::Other { typ: 0x7777, value: b"" }]);
    assert_eq!(r.error_code(), Some(420));
    // Unknown comprehension-optional attribute: ignored.
    // RESERVATION-TOKEN: 508 alone, 400 with EVEN-PORT.
    let tok = Attribute::ReservationToken([1; 8]);
    assert_eq!(c.request(&mut sim, Method::ALLOCATE, &[rt, tok]).error_code(), Some(508));
    assert_eq!(
        c.request(&mut sim, Method::ALLOCATE, &[rt, tok, Attribute::EvenPort(false)]).error_code(),
        Some(400)
    );
    // EVEN-PORT with R=1: 508 (no reservations); with ADDITIONAL-ADDRESS-FAMILY: 400.
    assert_eq!(
        c.request(&mut sim, Method::ALLOCATE, &[rt, Attribute::EvenPort(true)]).error_code(),
        Some(508)
    );
    assert_eq!(
        c.request(
            &mut sim,
            Method::ALLOCATE,
            &[rt, Attribute::EvenPort(true), Attribute::AdditionalAddressFamily(Family::V6)]
        )
        .error_code(),
        Some(400)
    );
    // Both REQUESTED- and ADDITIONAL-ADDRESS-FAMILY: 400.
    assert_eq!(
        c.request(
            &mut sim,
            Method::ALLOCATE,
            &[
                rt,
                Attribute::RequestedAddressFamily(Family::V4),
                Attribute::AdditionalAddressFamily(Family::V6)
            ]
        )
        .error_code(),
        Some(400)
    );
    // ADDITIONAL-ADDRESS-FAMILY IPv4: 400.
    assert_eq!(
        c.request(
            &mut sim,
            Method::ALLOCATE,
            &[rt, Attribute::AdditionalAddressFamily(Family::V4)]
        )
        .error_code(),
        Some(400)
    );
    // Malformed REQUESTED-ADDRESS-FAMILY: 400.
    assert_eq!(
        c.request(
            &mut sim,
            Method::ALLOCATE,
            &[rt, Attribute::Other { typ: attr::REQUESTED_ADDRESS_FAMILY, value: &[9, 0, 0, 0] }]
        )
        .error_code(),
        Some(400)
    );
    assert_eq!(sim.server.allocation_count(), 0);
    // EVEN-PORT with R=0 is passed to the allocator.
    let r = c.request(
        &mut sim,
        Method::ALLOCATE,
        &[rt, Attribute::EvenPort(false), Attribute::Other { typ: 0xC001, value: b"opt" }],
    );
    assert_eq!(r.class(), Class::SuccessResponse);
    assert_eq!(sim.relays.requests.last(), Some(&(Family::V4, true, false)));
}

#[test]
fn dont_fragment_when_supported() {
    let mut cfg = test_config();
    cfg.dont_fragment = true;
    let mut sim = Sim::new(cfg);
    let mut c = Client::alice("192.0.2.50:40000");
    let r = c.request(
        &mut sim,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(17), Attribute::DontFragment],
    );
    assert_eq!(r.class(), Class::SuccessResponse);
    assert_eq!(sim.relays.requests.last(), Some(&(Family::V4, false, true)));
    assert_eq!(c.create_permission(&mut sim, &[peer(PEER)]).class(), Class::SuccessResponse);
    let txid = c.next_txid();
    let req = c.build(
        Method::SEND,
        Class::Indication,
        txid,
        &[Attribute::XorPeerAddress(peer(PEER)), Attribute::DontFragment, Attribute::Data(b"df")],
    );
    assert!(matches!(sim.client_datagram(c.addr, &req), Out::ToPeer { dont_fragment: true, .. }));

    // Unsupported: the Send indication with DONT-FRAGMENT is dropped.
    let mut sim = Sim::default();
    let mut c = allocated(&mut sim, "192.0.2.50:40000");
    assert_eq!(c.create_permission(&mut sim, &[peer(PEER)]).class(), Class::SuccessResponse);
    assert_eq!(sim.client_datagram(c.addr, &req), Out::None);
}

#[test]
fn address_families_and_dual_allocation() {
    // IPv6 relaying disabled: 440 for REQUESTED-ADDRESS-FAMILY IPv6.
    let mut cfg = test_config();
    cfg.relay_ipv6 = false;
    let mut sim = Sim::new(cfg);
    let mut c = Client::alice("192.0.2.50:40000");
    let r = c.request(
        &mut sim,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(17), Attribute::RequestedAddressFamily(Family::V6)],
    );
    assert_eq!(r.error_code(), Some(440));
    // Dual requested with IPv6 disabled: IPv4 only + ADDRESS-ERROR-CODE 440.
    let r = c.request(
        &mut sim,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(17), Attribute::AdditionalAddressFamily(Family::V6)],
    );
    assert_eq!(r.class(), Class::SuccessResponse);
    assert_eq!(r.all_xor(attr::XOR_RELAYED_ADDRESS).len(), 1);
    assert!(matches!(
        r.attr(attr::ADDRESS_ERROR_CODE),
        Some(Attribute::AddressErrorCode { family: Family::V6, code: 440, .. })
    ));

    // Full dual allocation.
    let mut sim = Sim::default();
    let mut d = Client::alice("192.0.2.50:40000");
    let r = d.request(
        &mut sim,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(17), Attribute::AdditionalAddressFamily(Family::V6)],
    );
    assert_eq!(r.class(), Class::SuccessResponse);
    let relayed = r.all_xor(attr::XOR_RELAYED_ADDRESS);
    assert_eq!(relayed.len(), 2);
    assert!(relayed[0].is_ipv4() && relayed[1].is_ipv6());
    let v6peer = peer("[2606:4700::1111]:3478");
    assert_eq!(
        d.create_permission(&mut sim, &[peer(PEER), v6peer]).class(),
        Class::SuccessResponse
    );
    let r4 = relay_of(&sim, &d, Family::V4);
    let r6 = relay_of(&sim, &d, Family::V6);
    assert!(
        matches!(d.send_indication(&mut sim, v6peer, b"6"), Out::ToPeer { relay, .. } if relay == r6)
    );
    assert!(
        matches!(d.send_indication(&mut sim, peer(PEER), b"4"), Out::ToPeer { relay, .. } if relay == r4)
    );
    // Delete only the IPv6 half.
    let r = d.request(
        &mut sim,
        Method::REFRESH,
        &[Attribute::Lifetime(0), Attribute::RequestedAddressFamily(Family::V6)],
    );
    assert_eq!(r.class(), Class::SuccessResponse);
    assert_eq!(sim.relays.released, vec![r6]);
    assert_eq!(sim.server.allocation_count(), 1);
    assert_eq!(d.send_indication(&mut sim, v6peer, b"6"), Out::None);
    assert_eq!(sim.peer_datagram(r6, v6peer, b"x"), Out::None);
    // Now the allocation is IPv4 only: Refresh asking for IPv6 gets 443.
    let r = d.request(&mut sim, Method::REFRESH, &[Attribute::RequestedAddressFamily(Family::V6)]);
    assert_eq!(r.error_code(), Some(443));

    // Allocator without IPv6: dual request degrades with 440 in ADDRESS-ERROR-CODE.
    let mut sim = Sim::default();
    sim.relays.no_v6 = true;
    let mut e = Client::alice("192.0.2.50:40000");
    let r = e.request(
        &mut sim,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(17), Attribute::AdditionalAddressFamily(Family::V6)],
    );
    assert!(matches!(
        r.attr(attr::ADDRESS_ERROR_CODE),
        Some(Attribute::AddressErrorCode { code: 440, .. })
    ));
}

#[test]
fn malformed_input_is_counted_not_answered() {
    let mut sim = Sim::default();
    let c = peer("192.0.2.50:40000");
    assert_eq!(sim.client_datagram(c, b""), Out::None);
    assert_eq!(sim.client_datagram(c, &[0xC0, 0, 0, 0]), Out::None);
    assert_eq!(sim.client_datagram(c, &[0x00, 0x01, 0x00]), Out::None);
    assert_eq!(sim.client_datagram(c, &[0x40, 0x00, 0x00, 0x10, 1]), Out::None);
    let counters = sim.server.counters().clone();
    assert_eq!(counters.dropped(DropReason::NotTurn), 2);
    assert_eq!(counters.dropped(DropReason::MalformedStun), 1);
    assert_eq!(counters.dropped(DropReason::MalformedChannelData), 1);
    // Responses from clients are dropped.
    let mut cl = Client::alice("192.0.2.50:40000");
    let txid = cl.next_txid();
    let resp = cl.build(Method::BINDING, Class::SuccessResponse, txid, &[]);
    assert_eq!(sim.client_datagram(c, &resp), Out::None);
    assert_eq!(sim.server.counters().dropped(DropReason::UnexpectedClass), 1);
    // Unknown method request: 400.
    let req = cl.build(Method(0x0FF), Class::Request, txid, &[]);
    let r = Resp { bytes: sim.client_datagram(c, &req).client_bytes().to_vec() };
    assert_eq!(r.error_code(), Some(400));
    // Unknown relay.
    assert_eq!(sim.peer_datagram(turn_proto::server::RelayId(99), peer(PEER), b"x"), Out::None);
    assert_eq!(sim.server.counters().dropped(DropReason::UnknownRelay), 1);
    // Output buffer too small is a counted drop.
    let mut out = [0u8; 10];
    let input = turn_proto::server::ClientInput {
        now: sim.now,
        unix_secs: sim.unix,
        five_tuple: sim.five_tuple(c),
        conn: Sim::conn_of(c),
        data: &req,
    };
    let o = sim.server.handle_client_message(
        input,
        &mut out,
        &mut turn_proto::server::Host { relays: &mut sim.relays, quota: &sim.quota },
    );
    assert_eq!(o, turn_proto::server::Output::None);
    assert_eq!(sim.server.counters().dropped(DropReason::BufferTooSmall), 1);
}

#[test]
fn timer_heap_stays_bounded() {
    let mut sim = Sim::default();
    let mut c = allocated(&mut sim, "192.0.2.50:40000");
    for i in 0..2000u32 {
        let p = peer(&format!("198.51.100.{}:{}", i % 50 + 1, 1000 + i));
        let _ = c.create_permission(&mut sim, &[p]);
        let _ = c.refresh(&mut sim, Some(600 + i % 7));
        if i % 100 == 0 {
            sim.advance(10);
        }
    }
    assert!(sim.server.timer_entries() <= 2 * sim.server.allocation_count() + 64 + 1);
    sim.advance(4000);
    assert_eq!(sim.server.allocation_count(), 0);
    assert_eq!(sim.server.timer_entries(), 0);
}

#[test]
fn release_all_on_shutdown() {
    let mut sim = Sim::default();
    let _a = allocated(&mut sim, "192.0.2.50:40000");
    let _b = allocated(&mut sim, "192.0.2.50:40001");
    sim.events();
    sim.server
        .release_all(&mut turn_proto::server::Host { relays: &mut sim.relays, quota: &sim.quota });
    assert!(sim.relays.live.is_empty());
    assert_eq!(sim.quota.in_use(), 0);
    assert_eq!(sim.events().len(), 2);
    assert_eq!(sim.server.poll_timeout(), None);
}

#[test]
fn server_config_is_validated() {
    use turn_proto::server::{ConfigError, Server};
    let bad = |f: fn(&mut ServerConfig)| {
        let mut c = test_config();
        f(&mut c);
        Server::new(c).unwrap_err()
    };
    assert_eq!(bad(|c| c.realm.clear()), ConfigError::Realm);
    assert_eq!(bad(|c| c.default_allocation_lifetime_secs = 5000), ConfigError::Lifetimes);
    assert_eq!(
        bad(|c| {
            c.relay_ipv4 = false;
            c.relay_ipv6 = false
        }),
        ConfigError::NoFamily
    );
    assert!(matches!(
        bad(|c| c.credentials.rest_secrets.push(vec![])),
        ConfigError::Credentials(_)
    ));
}

#[test]
fn icmp_from_peer_becomes_data_indication() {
    let mut sim = Sim::default();
    let mut c = allocated(&mut sim, "192.0.2.50:40000");
    let relay = relay_of(&sim, &c, Family::V4);
    let mut out = [0u8; 256];
    let icmp =
        |info| turn_proto::server::PeerIcmp { peer: peer(PEER), icmp_type: 3, icmp_code: 3, info };
    let o = sim.server.handle_peer_icmp(sim.now, relay, icmp(0), &mut out);
    assert_eq!(o, turn_proto::server::Output::None, "no permission yet");
    assert_eq!(c.create_permission(&mut sim, &[peer(PEER)]).class(), Class::SuccessResponse);
    let o = sim.server.handle_peer_icmp(sim.now, relay, icmp(1400), &mut out);
    let turn_proto::server::Output::ToClient { data, .. } = o else { panic!("{o:?}") };
    let r = Resp { bytes: data.to_vec() };
    assert_eq!(r.class(), Class::Indication);
    assert_eq!(r.attr(attr::ICMP), Some(Attribute::Icmp { typ: 3, code: 3, data: 1400 }));
    assert_eq!(r.all_xor(attr::XOR_PEER_ADDRESS), vec![peer(PEER)]);
    assert!(r.attr(attr::DATA).is_none());
}

#[test]
fn a_replayed_allocate_does_not_recreate_a_deleted_allocation() {
    let mut sim = Sim::default();
    let mut alice = Client::alice("192.0.2.80:40000");
    // Learn the nonce (401), then capture the authenticated Allocate an eavesdropper sees.
    let _ = alice.allocate(&mut sim);
    assert_eq!(alice.refresh(&mut sim, Some(0)).lifetime(), Some(0));
    let txid = alice.next_txid();
    let captured = alice.build(
        Method::ALLOCATE,
        Class::Request,
        txid,
        &[Attribute::RequestedTransport(attr::PROTOCOL_UDP)],
    );
    let r = Resp { bytes: sim.client_datagram(alice.addr, &captured).client_bytes().to_vec() };
    // (The nonce predates the deletion, so even this first use is treated as a possible
    // replay: 438 with a nonce from after the deletion.)
    assert_eq!(r.error_code(), Some(438));
    alice.learn(&r);
    let ok = alice.allocate(&mut sim);
    assert_eq!(ok.class(), Class::SuccessResponse);
    // The client deletes it; minutes later (past the retransmission cache, within the
    // nonce's life) an attacker replays the request that created it, from the same
    // (spoofed) 5-tuple.
    let creating = alice.build(
        Method::ALLOCATE,
        Class::Request,
        turn_proto::stun::TransactionId([0x77; 12]),
        &[Attribute::RequestedTransport(attr::PROTOCOL_UDP)],
    );
    assert_eq!(alice.refresh(&mut sim, Some(0)).lifetime(), Some(0));
    let events = sim.events();
    assert!(events.iter().any(|e| matches!(e, Event::AllocationDeleted { .. })), "{events:?}");
    sim.advance(120);
    let before = sim.server.counters().allocations_created;
    for _ in 0..3 {
        let r = Resp { bytes: sim.client_datagram(alice.addr, &creating).client_bytes().to_vec() };
        assert_eq!(r.error_code(), Some(438), "a replay must not allocate");
    }
    assert_eq!(sim.server.counters().allocations_created, before);
    assert_eq!(sim.server.allocation_count(), 0);
    assert_eq!(sim.quota.in_use_by("alice"), 0, "nobody's quota is charged");
    assert!(sim.server.counters().replays_refused >= 3);
    // The real client, with the fresh nonce, allocates again.
    let r = Resp { bytes: sim.client_datagram(alice.addr, &creating).client_bytes().to_vec() };
    alice.learn(&r);
    assert_eq!(alice.allocate(&mut sim).class(), Class::SuccessResponse);
}

#[test]
fn unauthenticated_answers_are_rate_limited_per_source_with_bounded_memory() {
    let mut sim = Sim::default();
    let c = Client::alice("192.0.2.90:40000");
    let unsigned = |c: &mut Client, i: u8| {
        c.build(
            Method::ALLOCATE,
            Class::Request,
            turn_proto::stun::TransactionId([i; 12]),
            &[Attribute::RequestedTransport(attr::PROTOCOL_UDP)],
        )
    };
    let mut c = c;
    let answered = (0..100u8)
        .filter(|&i| {
            let req = unsigned(&mut c, i);
            matches!(sim.client_datagram(c.addr, &req), Out::ToClient { .. })
        })
        .count();
    assert_eq!(answered, 40, "the default burst of 401s per source");
    assert_eq!(sim.server.counters().rate_limited_responses, 60);
    assert_eq!(sim.server.counters().drops[DropReason::RateLimited as usize], 60);
    // Another source is answered; a second later the first has 20 more.
    let mut other = Client::alice("192.0.2.91:40000");
    let req = unsigned(&mut other, 1);
    assert!(matches!(sim.client_datagram(other.addr, &req), Out::ToClient { .. }));
    sim.advance(1);
    let again = (0..100u8)
        .filter(|&i| {
            let req = unsigned(&mut c, i);
            matches!(sim.client_datagram(c.addr, &req), Out::ToClient { .. })
        })
        .count();
    assert_eq!(again, 20);
}

#[test]
fn answers_over_tcp_and_tls_are_not_limited_like_datagrams() {
    // A stream client's address is proven and it does not retransmit: an answer the
    // reflection limit dropped would leave it hanging. 100 unsigned Allocates from one
    // address over TCP all get their 401.
    let mut sim = Sim::default();
    sim.transport = turn_proto::server::Transport::Tcp;
    let c = Client::alice("192.0.2.92:40000");
    let answered = (0..100u8)
        .filter(|&i| {
            let req = c.build(
                Method::ALLOCATE,
                Class::Request,
                turn_proto::stun::TransactionId([i; 12]),
                &[Attribute::RequestedTransport(attr::PROTOCOL_UDP)],
            );
            matches!(sim.client_datagram(c.addr, &req), Out::ToClient { .. })
        })
        .count();
    assert_eq!(answered, 100);
    assert_eq!(sim.server.counters().rate_limited_responses, 0);
}

#[test]
fn password_guessing_is_throttled_per_source() {
    let mut sim = Sim::default();
    let mut guesser = Client::new("192.0.2.95:40000", "alice", "guess");
    let first = guesser.allocate(&mut sim);
    assert_eq!(first.error_code(), Some(401));
    // Ten failures (the burst, the first included), then signed requests from that source
    // are dropped without being verified, whatever the password.
    let mut answered = 1;
    let mut checks = sim.server.counters().integrity_checks;
    for i in 0..50u8 {
        let req = guesser.build(
            Method::ALLOCATE,
            Class::Request,
            turn_proto::stun::TransactionId([i; 12]),
            &[Attribute::RequestedTransport(attr::PROTOCOL_UDP)],
        );
        if matches!(sim.client_datagram(guesser.addr, &req), Out::ToClient { .. }) {
            answered += 1;
        }
    }
    assert_eq!(answered, 10, "the burst of failed authentications");
    checks = sim.server.counters().integrity_checks - checks;
    assert_eq!(checks, 9, "throttled requests are not verified");
    assert_eq!(sim.server.counters().rate_limited_auth, 41);
    // Even the right password from that address waits (its signed request is dropped)...
    let mut right = Client::alice("192.0.2.95:40001");
    let challenge = right.build(
        Method::ALLOCATE,
        Class::Request,
        right.clone().next_txid(),
        &[Attribute::RequestedTransport(attr::PROTOCOL_UDP)],
    );
    right.learn(&Resp {
        bytes: sim.client_datagram(right.addr, &challenge).client_bytes().to_vec(),
    });
    let signed = right.build(
        Method::ALLOCATE,
        Class::Request,
        right.clone().next_txid(),
        &[Attribute::RequestedTransport(attr::PROTOCOL_UDP)],
    );
    assert!(matches!(sim.client_datagram(right.addr, &signed), Out::None));
    assert_eq!(sim.server.allocation_count(), 0);
    // ...one second, for one attempt; other sources are never affected.
    let mut elsewhere = Client::alice("192.0.2.96:40000");
    assert_eq!(elsewhere.allocate(&mut sim).class(), Class::SuccessResponse);
    sim.advance(1);
    let mut later = Client::alice("192.0.2.95:40002");
    assert_eq!(later.allocate(&mut sim).class(), Class::SuccessResponse);
}

#[test]
fn over_tcp_channel_data_to_the_client_is_padded_with_zeros_and_data_indications_stay_aligned() {
    for transport in [Transport::Tcp, Transport::Tls, Transport::Udp] {
        let mut sim = Sim::default();
        sim.transport = transport;
        let mut c = allocated(&mut sim, "192.0.2.50:40000");
        assert_eq!(c.channel_bind(&mut sim, 0x4001, peer(PEER)).class(), Class::SuccessResponse);
        let relay = relay_of(&sim, &c, Family::V4);
        for len in 0..9usize {
            let payload: Vec<u8> = (1..=len as u8).collect();
            let Out::ToClient { data, .. } = sim.peer_datagram(relay, peer(PEER), &payload) else {
                panic!("{transport:?} {len}: not relayed")
            };
            // Header, payload, then (on streams only) zeros up to a multiple of four: the
            // buffer around the payload is 0xEE, so stale bytes would show.
            let mut want = vec![0x40, 0x01, 0, len as u8];
            want.extend(&payload);
            if transport.is_stream() {
                want.resize(want.len().div_ceil(4) * 4, 0);
            }
            assert_eq!(data, want, "{transport:?} {len}");
            // On a stream the frame is exactly what framing expects.
            if transport.is_stream() {
                assert_eq!(turn_proto::framing::frame_len(&data).unwrap().unwrap().1, want.len());
            }
        }
        // Data indications are padded whatever the transport (attribute padding).
        assert_eq!(c.create_permission(&mut sim, &[peer(PEER2)]).class(), Class::SuccessResponse);
        let Out::ToClient { data, .. } = sim.peer_datagram(relay, peer(PEER2), b"abc") else {
            panic!("{transport:?}: Data indication not sent")
        };
        assert_eq!(data.len() % 4, 0);
        assert_eq!(data_indication(&data), (peer(PEER2), b"abc".to_vec()));
    }
}

#[test]
fn over_tcp_padded_channel_data_from_the_client_reaches_the_peer_without_its_padding() {
    let mut sim = Sim::default();
    sim.transport = Transport::Tcp;
    let mut c = allocated(&mut sim, "192.0.2.50:40000");
    assert_eq!(c.channel_bind(&mut sim, 0x4001, peer(PEER)).class(), Class::SuccessResponse);
    let frame = [0x40, 0x01, 0x00, 0x05, b'h', b'e', b'l', b'l', b'o', 0, 0, 0];
    assert_eq!(turn_proto::framing::frame_len(&frame).unwrap().unwrap().1, frame.len());
    match sim.client_datagram(c.addr, &frame) {
        Out::ToPeer { data, peer: to, .. } => {
            assert_eq!(data, b"hello");
            assert_eq!(to, peer(PEER));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_closed_connection_deletes_its_allocation_and_frees_relays_and_quota() {
    let mut sim = Sim::default();
    sim.transport = Transport::Tcp;
    let c = allocated(&mut sim, "192.0.2.50:40000");
    let other = allocated(&mut sim, "192.0.2.50:40001");
    assert_eq!((sim.relays.live.len(), sim.quota.in_use()), (2, 2));
    sim.events();
    sim.close_connection(c.addr);
    assert_eq!(sim.server.allocation_count(), 1);
    assert_eq!((sim.relays.live.len(), sim.quota.in_use()), (1, 1));
    assert!(sim.server.allocation(&sim.five_tuple(c.addr)).is_none());
    assert!(sim.server.allocation(&sim.five_tuple(other.addr)).is_some());
    let events = sim.events();
    assert!(
        matches!(
            events.as_slice(),
            [Event::AllocationDeleted { reason: DeleteReason::ConnectionClosed, conn, .. }]
                if *conn == Sim::conn_of(c.addr)
        ),
        "{events:?}"
    );
    assert_eq!(sim.server.counters().allocations_closed, 1);
    // Closing a connection without an allocation (or twice) changes nothing.
    sim.close_connection(c.addr);
    sim.close_connection("192.0.2.99:1".parse().unwrap());
    assert_eq!(sim.server.allocation_count(), 1);
    assert!(sim.events().is_empty());
}

#[test]
fn the_same_address_over_udp_and_tcp_is_two_five_tuples() {
    let mut sim = Sim::default();
    let udp = allocated(&mut sim, "192.0.2.50:40000");
    sim.transport = Transport::Tcp;
    // Same client address and port, same listener address, other transport: a new
    // allocation, not a 437.
    let tcp = allocated(&mut sim, "192.0.2.50:40000");
    assert_eq!(sim.server.allocation_count(), 2);
    sim.close_connection(tcp.addr);
    sim.transport = Transport::Udp;
    assert!(sim.server.allocation(&sim.five_tuple(udp.addr)).is_some(), "UDP one stays");
}

#[test]
fn traffic_is_counted_per_allocation_and_per_transport_each_way() {
    let mut sim = Sim::default();
    sim.transport = Transport::Tls;
    let mut c = allocated(&mut sim, "192.0.2.50:40000");
    assert_eq!(c.channel_bind(&mut sim, 0x4001, peer(PEER)).class(), Class::SuccessResponse);
    assert!(matches!(c.channel_data(&mut sim, 0x4001, b"12345"), Out::ToPeer { .. }));
    assert!(matches!(c.send_indication(&mut sim, peer(PEER), b"abc"), Out::ToPeer { .. }));
    let relay = relay_of(&sim, &c, Family::V4);
    assert!(matches!(sim.peer_datagram(relay, peer(PEER), b"xy"), Out::ToClient { .. }));
    let a = sim.server.allocation(&sim.five_tuple(c.addr)).unwrap();
    assert_eq!(
        a.traffic,
        turn_proto::server::AllocationTraffic {
            to_peer_packets: 2,
            to_peer_bytes: 8,
            to_client_packets: 1,
            to_client_bytes: 2,
        }
    );
    let counters = sim.server.counters();
    let tls = Transport::Tls.index();
    assert_eq!(
        (counters.to_peer_traffic.packets[tls], counters.to_peer_traffic.bytes[tls]),
        (2, 8)
    );
    assert_eq!(counters.to_client_traffic.packets, [0, 0, 1]);
    // Requests by method and error responses by code: Allocate's 401, then its success,
    // then ChannelBind.
    assert_eq!(counters.requests_by_method, [0, 2, 0, 0, 1, 0]);
    let e401 = turn_proto::server::ERROR_CODES.iter().position(|&c| c == 401).unwrap();
    assert_eq!(counters.errors_by_code[e401], 1);
    assert_eq!(counters.errors_by_code.iter().sum::<u64>(), counters.error_responses);
}

#[test]
fn auth_failures_are_counted_by_reason() {
    use turn_proto::server::AuthFailure;
    let mut sim = Sim::default();
    let mut wrong = Client::new("192.0.2.50:40000", "alice", "not-her-password");
    assert_eq!(wrong.allocate(&mut sim).error_code(), Some(401));
    let mut nobody = Client::new("192.0.2.50:40001", "nobody", "x");
    assert_eq!(nobody.allocate(&mut sim).error_code(), Some(401));
    let by = sim.server.counters().auth_failures_by;
    assert_eq!(by[AuthFailure::BadIntegrity as usize], 1);
    assert_eq!(by[AuthFailure::UnknownUser as usize], 1);
    assert_eq!(by.iter().sum::<u64>(), sim.server.counters().auth_failures);
}

#[test]
fn reconfigure_changes_passwords_and_peer_rules_and_keeps_allocations() {
    let mut sim = Sim::default();
    let mut c = allocated(&mut sim, "192.0.2.50:40000");
    assert_eq!(c.channel_bind(&mut sim, 0x4001, peer(PEER)).class(), Class::SuccessResponse);
    let mut cfg = test_config();
    cfg.credentials.users[0].secret =
        turn_proto::credentials::UserSecret::Password("alice-new".into());
    cfg.peer_policy.deny.push(turn_proto::policy::IpNet::new(ip("198.51.100.21"), 32).unwrap());
    sim.server.reconfigure(cfg).unwrap();
    // The live allocation relays on.
    assert!(matches!(c.channel_data(&mut sim, 0x4001, b"still"), Out::ToPeer { .. }));
    assert_eq!(sim.server.allocation_count(), 1);
    // Its next request is checked against the new password: the old one fails...
    assert_eq!(c.refresh(&mut sim, Some(600)).error_code(), Some(401));
    // ... the new one works, and the new peer rule applies.
    let mut renewed = Client::new("192.0.2.50:40000", "alice", "alice-new");
    renewed.counter = 1000; // other transaction ids than `c`'s (the same 5-tuple)
    assert_eq!(renewed.refresh(&mut sim, Some(600)).class(), Class::SuccessResponse);
    assert_eq!(renewed.create_permission(&mut sim, &[peer(PEER2)]).error_code(), Some(403));
    // A configuration the server refuses changes nothing.
    let mut bad = test_config();
    bad.realm.clear();
    assert!(sim.server.reconfigure(bad).is_err());
    assert_eq!(renewed.refresh(&mut sim, Some(600)).class(), Class::SuccessResponse);
}

#[test]
fn reconfigure_removes_permissions_and_channels_to_peers_now_denied() {
    let mut sim = Sim::default();
    let mut c = allocated(&mut sim, "192.0.2.50:40000");
    assert_eq!(c.channel_bind(&mut sim, 0x4001, peer(PEER)).class(), Class::SuccessResponse);
    assert_eq!(c.create_permission(&mut sim, &[peer(PEER2)]).class(), Class::SuccessResponse);
    let relay = relay_of(&sim, &c, Family::V4);
    assert!(matches!(sim.peer_datagram(relay, peer(PEER2), b"before"), Out::ToClient { .. }));
    let mut cfg = test_config();
    cfg.peer_policy.deny.push(turn_proto::policy::IpNet::new(ip("198.51.100.21"), 32).unwrap());
    sim.server.reconfigure(cfg).unwrap();
    // The denied peer reaches the client no more, and the client reaches it no more...
    assert_eq!(sim.peer_datagram(relay, peer(PEER2), b"after"), Out::None);
    assert_eq!(c.send_indication(&mut sim, peer(PEER2), b"after"), Out::None);
    assert_eq!(sim.server.counters().dropped(DropReason::NoPermission), 2);
    // ... while the allowed peer's channel relays on, both ways.
    assert!(matches!(c.channel_data(&mut sim, 0x4001, b"still"), Out::ToPeer { .. }));
    assert!(matches!(sim.peer_datagram(relay, peer(PEER), b"still"), Out::ToClient { .. }));
}

#[test]
fn end_allocations_kicks_the_chosen_ones_and_frees_their_relays_and_quota() {
    let mut sim = Sim::default();
    let _a1 = allocated(&mut sim, "192.0.2.50:40000");
    let _a2 = allocated(&mut sim, "192.0.2.51:40000");
    let mut bob = Client::new("192.0.2.52:40000", "bob", "bob-pw");
    assert_eq!(bob.allocate(&mut sim).class(), Class::SuccessResponse);
    sim.events();
    let mut host = turn_proto::server::Host { relays: &mut sim.relays, quota: &sim.quota };
    let ended = sim.server.end_allocations(sim.now, |a| &*a.username == "alice", &mut host);
    assert_eq!(ended, 2);
    assert_eq!(sim.server.allocation_count(), 1);
    assert_eq!((sim.relays.live.len(), sim.quota.in_use()), (1, 1));
    let events = sim.events();
    assert_eq!(events.len(), 2);
    assert!(
        events
            .iter()
            .all(|e| matches!(e, Event::AllocationDeleted { reason: DeleteReason::Kicked, .. }))
    );
    assert_eq!(sim.server.counters().allocations_kicked, 2);
}

#[test]
fn creations_and_deletions_are_never_dropped_from_the_event_queue() {
    let mut cfg = test_config();
    cfg.event_queue_capacity = 0;
    let mut sim = Sim::new(cfg);
    let mut c = allocated(&mut sim, "192.0.2.50:40000");
    assert_eq!(c.refresh(&mut sim, Some(700)).class(), Class::SuccessResponse);
    assert_eq!(c.refresh(&mut sim, Some(0)).class(), Class::SuccessResponse);
    let events = sim.events();
    assert!(
        matches!(
            events.as_slice(),
            [
                Event::AllocationCreated { .. },
                Event::AllocationDeleted { reason: DeleteReason::ClientRequest, .. }
            ]
        ),
        "{events:?}"
    );
    assert_eq!(sim.server.counters().events_dropped, 1, "the refresh event");
}

/// A spoofer: it knows neither the victim's password nor a nonce the victim was given
/// (it never sees the answers sent to the address it forges), but it has the realm and a
/// nonce of its own, from an address of its own.
fn spoofer(sim: &mut Sim) -> Client {
    let mut forger = Client::new("198.51.100.66:5000", "alice", "not-the-password");
    let req = forger.build(
        Method::ALLOCATE,
        Class::Request,
        forger.clone().next_txid(),
        &[Attribute::RequestedTransport(attr::PROTOCOL_UDP)],
    );
    forger.learn(&Resp { bytes: sim.client_datagram(forger.addr, &req).client_bytes().to_vec() });
    forger
}

/// The spoofer's `i`-th signed request of `method`.
fn forged(forger: &Client, method: Method, i: u32) -> Vec<u8> {
    let mut txid = [0xF0; 12];
    txid[..4].copy_from_slice(&i.to_be_bytes());
    forger.build(method, Class::Request, turn_proto::stun::TransactionId(txid), &[])
}

/// One password guess as a real guesser makes it: an unsigned Allocate for the 401 and
/// its nonce, then the signed one. Returns whether the signed one was verified.
fn guess(sim: &mut Sim, c: &mut Client) -> bool {
    let alloc = [Attribute::RequestedTransport(attr::PROTOCOL_UDP)];
    c.signer.nonce = None;
    let req = c.build(Method::ALLOCATE, Class::Request, c.clone().next_txid(), &alloc);
    let Out::ToClient { data, .. } = sim.client_datagram(c.addr, &req) else { return false };
    c.learn(&Resp { bytes: data });
    let before = sim.server.counters().integrity_checks;
    let txid = c.next_txid();
    let req = c.build(Method::ALLOCATE, Class::Request, txid, &alloc);
    let _ = sim.client_datagram(c.addr, &req);
    sim.server.counters().integrity_checks > before
}

#[test]
fn spoofed_failures_from_the_victims_address_never_throttle_its_allocation() {
    let mut sim = Sim::default();
    let mut victim = allocated(&mut sim, "192.0.2.100:40000");
    assert_eq!(victim.create_permission(&mut sim, &[peer(PEER)]).class(), Class::SuccessResponse);
    // Someone really behind the same address (a CGNAT neighbour) guesses passwords with
    // nonces it was given: that address's share of failures runs out.
    let mut guesser = Client::new("192.0.2.100:45000", "alice", "guess");
    for _ in 0..30 {
        guess(&mut sim, &mut guesser);
    }
    assert!(sim.server.counters().rate_limited_auth > 0, "the guesser is throttled");
    let failures = sim.server.counters().auth_failures;
    let forger = spoofer(&mut sim);
    // Then, for half an hour, a spoofer keeps sending signed requests in the victim's
    // name from its address (other ports and its very 5-tuple). Each has a nonce the
    // server never gave that source: a 438 (or, beyond the address's share of answers,
    // nothing) and no failure. The victim's allocation counts only its own failures: its
    // Refresh and permissions keep going, and when its nonce goes stale it still gets its
    // 438 (although its address has no unauthenticated answers left) and goes on.
    let mut spoofed = 0u32;
    for _ in 0..8 {
        sim.advance(250);
        for _ in 0..40 {
            let port =
                if spoofed.is_multiple_of(3) { 40000 } else { 41000 + (spoofed % 20000) as u16 };
            let from: std::net::SocketAddr = format!("192.0.2.100:{port}").parse().unwrap();
            let out = sim.client_datagram(from, &forged(&forger, Method::REFRESH, spoofed));
            if let Out::ToClient { data, .. } = out {
                assert_eq!(Resp { bytes: data }.error_code(), Some(438));
            }
            spoofed += 1;
        }
        let r = victim.refresh(&mut sim, Some(600));
        assert_eq!(r.class(), Class::SuccessResponse, "{:?}", r.error_code());
        let r = victim.create_permission(&mut sim, &[peer(PEER)]);
        assert_eq!(r.class(), Class::SuccessResponse, "{:?}", r.error_code());
    }
    assert_eq!(sim.server.counters().auth_failures, failures, "spoofs count as no failure");
    assert!(sim.server.counters().stale_nonces > 0, "the victim's nonce went stale meanwhile");
    let out = victim.send_indication(&mut sim, peer(PEER), b"still here");
    assert!(matches!(out, Out::ToPeer { .. }));
}

#[test]
fn the_workers_of_a_daemon_share_the_per_source_limits() {
    use std::sync::Arc;
    use turn_proto::server::{Server, SourceLimits};
    let cfg = test_config();
    let limits = Arc::new(SourceLimits::new(&cfg));
    let mut workers: Vec<Sim> = (0..4)
        .map(|_| {
            let mut sim = Sim::new(cfg.clone());
            sim.server = Server::with_limits(cfg.clone(), Arc::clone(&limits)).unwrap();
            sim
        })
        .collect();
    // A source that varies its port lands on every worker (the kernel hashes the
    // 4-tuple): the documented rates hold in total, not per worker.
    let mut answered = 0;
    for i in 0..200u32 {
        let c = Client::alice(&format!("192.0.2.120:{}", 20000 + i));
        let req = c.build(
            Method::ALLOCATE,
            Class::Request,
            c.clone().next_txid(),
            &[Attribute::RequestedTransport(attr::PROTOCOL_UDP)],
        );
        if matches!(workers[i as usize % 4].client_datagram(c.addr, &req), Out::ToClient { .. }) {
            answered += 1;
        }
    }
    assert_eq!(answered, 40, "the burst of 401s per source, across all workers");
    // Password guesses from varying ports: the burst of failures in total.
    let mut verified = 0;
    for i in 0..100u32 {
        let mut g = Client::new(&format!("192.0.2.121:{}", 20000 + i), "alice", "guess");
        verified += usize::from(guess(&mut workers[i as usize % 4], &mut g));
    }
    assert_eq!(verified, 10, "ten guesses verified, whatever the worker");
}

#[test]
fn unauthenticated_answers_carry_no_more_than_the_client_needs() {
    let mut sim = Sim::default();
    let c = Client::alice("192.0.2.130:40000");
    // The smallest Allocate a client sends first: header and REQUESTED-TRANSPORT.
    let req = c.build(
        Method::ALLOCATE,
        Class::Request,
        c.clone().next_txid(),
        &[Attribute::RequestedTransport(attr::PROTOCOL_UDP)],
    );
    assert_eq!(req.len(), 28);
    let r = Resp { bytes: sim.client_datagram(c.addr, &req).client_bytes().to_vec() };
    assert_eq!(r.error_code(), Some(401));
    let m = r.msg();
    let ec = m.get(attr::ERROR_CODE).unwrap();
    assert_eq!(ec.len(), 4, "no reason phrase");
    assert!(m.get(attr::SOFTWARE).is_none() && !m.has_fingerprint());
    let nonce = m.get(attr::NONCE).unwrap().len();
    // Header, ERROR-CODE, REALM, NONCE, PASSWORD-ALGORITHMS (two algorithms): nothing else.
    let pad = |n: usize| n.div_ceil(4) * 4;
    assert_eq!(r.bytes.len(), 20 + 8 + 4 + pad(REALM.len()) + 4 + pad(nonce) + 4 + 8);
    assert!(r.bytes.len() <= 4 * req.len(), "{} bytes for a 28-byte request", r.bytes.len());
    // A malformed signed request: a bare 400.
    let bad = c.build(
        Method::ALLOCATE,
        Class::Request,
        c.clone().next_txid(),
        &[Attribute::MessageIntegrity(&[0; 20])],
    );
    let r = Resp { bytes: sim.client_datagram(c.addr, &bad).client_bytes().to_vec() };
    assert_eq!(r.error_code(), Some(400));
    assert_eq!(r.bytes.len(), 20 + 8);
}

#[test]
fn binding_answers_are_limited_per_source_except_to_a_5_tuple_with_an_allocation() {
    let mut sim = Sim::default();
    let binding = |c: &mut Client| {
        let txid = c.next_txid();
        c.build(Method::BINDING, Class::Request, txid, &[])
    };
    let mut stranger = Client::alice("192.0.2.140:40000");
    let answered = (0..300)
        .filter(|_| {
            let req = binding(&mut stranger);
            matches!(sim.client_datagram(stranger.addr, &req), Out::ToClient { .. })
        })
        .count();
    assert_eq!(answered, 100, "the default burst of Binding answers per source");
    // A client with an allocation on that address keeps its keepalives answered.
    let mut client = allocated(&mut sim, "192.0.2.140:40001");
    for _ in 0..300 {
        let req = binding(&mut client);
        assert!(matches!(sim.client_datagram(client.addr, &req), Out::ToClient { .. }));
    }
}

#[test]
fn allocations_per_client_address_are_capped_ipv6_by_its_64() {
    use turn_proto::server::LocalQuota;
    let mut sim = Sim::default();
    sim.quota = LocalQuota::new(0, 0).with_per_address(2);
    for (addr, ok) in [
        ("192.0.2.150:40000", true),
        ("192.0.2.150:40001", true),
        ("192.0.2.150:40002", false),
        ("192.0.2.151:40000", true),
        ("[2001:db8:1:2::1]:40000", true),
        ("[2001:db8:1:2::ffff]:40000", true),
        ("[2001:db8:1:2:8000::1]:40000", false),
        ("[2001:db8:1:3::1]:40000", true),
    ] {
        let mut c = Client::alice(addr);
        let r = c.allocate(&mut sim);
        let expected = if ok { None } else { Some(486) };
        assert_eq!(r.error_code(), expected, "{addr}");
    }
    // REST usernames with a bare expiry are each their own user, yet the same cap holds.
    let expiry = (UNIX0 + 3600).to_string();
    let password = turn_proto::credentials::rest_password(b"new-secret", &expiry);
    let mut rest = Client::new("192.0.2.150:40003", &expiry, &password);
    assert_eq!(rest.allocate(&mut sim).error_code(), Some(486));
    // Deleting one gives the address its place back.
    let mut first = Client::alice("192.0.2.150:40000");
    first.counter = 100; // transaction ids its predecessor did not use
    let r = first.refresh(&mut sim, Some(0));
    assert_eq!(r.class(), Class::SuccessResponse, "{:?}", r.error_code());
    let r = rest.allocate(&mut sim);
    assert_eq!(r.class(), Class::SuccessResponse, "{:?}", r.error_code());
}

#[test]
fn relay_to_relay_reaches_only_ports_this_servers_relays_hold() {
    let mut cfg = test_config();
    let relay_ip = ip("203.0.113.1");
    cfg.peer_policy.own = vec![relay_ip];
    cfg.peer_policy.own_relays = vec![relay_ip];
    cfg.peer_policy.relay_ports = Some((49152, 65535));
    let mut sim = Sim::new(cfg);
    let mut a = allocated(&mut sim, "192.0.2.160:40000");
    let mut b = allocated(&mut sim, "192.0.2.161:40000");
    let held: Vec<std::net::SocketAddr> = sim.relays.addrs.values().copied().collect();
    let b_relay = held[1];
    // B's relayed address: a peer like any other.
    assert_eq!(a.channel_bind(&mut sim, 0x4000, b_relay).class(), Class::SuccessResponse);
    assert!(matches!(a.send_indication(&mut sim, b_relay, b"hi"), Out::ToPeer { .. }));
    // A port of the relay range no relay holds (free, or another program's): refused.
    let unheld = std::net::SocketAddr::new(relay_ip, 60001);
    assert_eq!(a.channel_bind(&mut sim, 0x4001, unheld).error_code(), Some(403));
    assert!(matches!(a.send_indication(&mut sim, unheld, b"hi"), Out::None));
    // While B lives its relayed address takes ChannelData; once B's allocation ended the
    // channel leads nowhere (whatever takes that port next is not a relay of ours).
    assert!(matches!(a.channel_data(&mut sim, 0x4000, b"to b"), Out::ToPeer { .. }));
    assert_eq!(b.refresh(&mut sim, Some(0)).class(), Class::SuccessResponse);
    let denied = sim.server.counters().drops[DropReason::PeerDenied as usize];
    assert!(matches!(a.channel_data(&mut sim, 0x4000, b"to b"), Out::None));
    assert!(matches!(a.send_indication(&mut sim, b_relay, b"hi"), Out::None));
    assert_eq!(sim.server.counters().drops[DropReason::PeerDenied as usize], denied + 2);
}
