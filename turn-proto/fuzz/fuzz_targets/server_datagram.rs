//! Fuzz the server's packet handlers with sequences of inputs.
//!
//! Each iteration builds a server, creates one authenticated allocation
//! (with a channel and a permission) for client A, then replays records
//! from the input: `[kind] [len_hi] [len_lo] [len bytes]`:
//!
//! * 0 / 1: raw datagram from client A (has an allocation) / client B;
//! * 2: peer datagram (`bytes[0]` picks relay and peer);
//! * 3: advance time by `bytes[0] * 8` seconds and fire timers;
//! * 4 / 5: request from A (alice) / C (bob) whose attributes are the
//!   fuzzer's bytes, correctly authenticated by this harness so that the
//!   TURN handlers behind authentication are reached;
//! * 6: A's connection closes (its allocation must go).
//!
//! Inputs of odd length run with every client on TCP (ChannelData to clients padded,
//! allocations tied to connections), even ones on UDP.
//!
//! Afterwards every relay and quota unit must be released exactly once.
#![no_main]
#![allow(clippy::disallowed_methods)]

use std::cell::Cell;
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

use turn_proto::client::{AuthMode, Credentials, Signer};
use turn_proto::credentials::{CredentialsConfig, StaticUser, UserSecret};
use turn_proto::server::{
    ClientConn, ClientInput, FiveTuple, Host, Output, PEER_HEADROOM, PEER_TAILROOM, Quota,
    QuotaExceeded, RelayAllocator, RelayError, RelayId, RelayRequest, Server, ServerConfig,
    Transport,
};
use turn_proto::stun::attr;
use turn_proto::stun::{Class, Family, Message, MessageEncoder, Method, TransactionId};

const REALM: &str = "fuzz.example";

#[derive(Default)]
struct Relays {
    next: u64,
    live: BTreeSet<RelayId>,
}

impl RelayAllocator for Relays {
    fn allocate(&mut self, r: &RelayRequest<'_>) -> Result<(RelayId, SocketAddr), RelayError> {
        self.next += 1;
        if self.next % 7 == 0 {
            return Err(RelayError::InsufficientCapacity);
        }
        let id = RelayId(self.next);
        let addr = match r.family {
            Family::V4 => SocketAddr::new([203, 0, 113, 1].into(), 49152 + self.next as u16),
            Family::V6 => "[2001:db8::1]:50000".parse().expect("addr"),
        };
        self.live.insert(id);
        Ok((id, addr))
    }

    fn release(&mut self, id: RelayId) {
        assert!(self.live.remove(&id), "relay released twice or never allocated");
    }

    fn holds(&self, relayed: SocketAddr) -> bool {
        relayed.port() % 2 == 0
    }
}

#[derive(Default)]
struct CountQuota {
    held: Cell<i64>,
}

impl Quota for CountQuota {
    fn try_acquire(&self, _user: &str, _client: IpAddr) -> Result<(), QuotaExceeded> {
        if self.held.get() >= 3 {
            return Err(QuotaExceeded);
        }
        self.held.set(self.held.get() + 1);
        Ok(())
    }

    fn release(&self, _user: &str, _client: IpAddr) {
        self.held.set(self.held.get() - 1);
        assert!(self.held.get() >= 0, "quota released more than acquired");
    }
}

struct Peer {
    addr: SocketAddr,
    /// The project's TURN client signer (its realm and nonce start wrong on purpose:
    /// the first request draws a 438 that teaches the real ones).
    signer: Signer,
    counter: u32,
}

impl Peer {
    fn new(addr: &str, user: &str, password: &str) -> Peer {
        let creds = Credentials { username: user.into(), password: password.into(), realm: None };
        let mut signer = Signer::new(Arc::new(creds), AuthMode::Legacy);
        signer.realm = Some(REALM.into());
        signer.nonce = Some(b"x".to_vec());
        Peer { addr: addr.parse().expect("addr"), signer, counter: 0 }
    }
}

struct World {
    server: Server,
    relays: Relays,
    quota: CountQuota,
    now: Instant,
    unix: u64,
    listener: SocketAddr,
    transport: Transport,
    out: Vec<u8>,
}

impl World {
    fn client(&mut self, from: SocketAddr, d: &[u8]) -> Option<Vec<u8>> {
        let five_tuple = self.five_tuple(from);
        let input = ClientInput {
            now: self.now,
            unix_secs: self.unix,
            five_tuple,
            conn: ClientConn(u64::from(from.port())),
            data: d,
        };
        let mut host = Host { relays: &mut self.relays, quota: &self.quota };
        match self.server.handle_client_message(input, &mut self.out, &mut host) {
            Output::ToClient { five_tuple: to, conn, data } => {
                assert_eq!((to, conn), (five_tuple, ClientConn(u64::from(from.port()))));
                let m = Message::parse(data).expect("server output parses");
                assert!(matches!(m.class(), Class::SuccessResponse | Class::ErrorResponse));
                Some(data.to_vec())
            }
            Output::ToPeer { data, .. } => {
                assert!(data.len() <= d.len());
                None
            }
            Output::None => None,
        }
    }

    fn five_tuple(&self, client: SocketAddr) -> FiveTuple {
        FiveTuple { client, listener: self.listener, transport: self.transport }
    }

    /// Send a request with `body` as attributes, authenticated as `p`.
    fn signed(
        &mut self,
        p: &mut Peer,
        method: Method,
        body: &[u8],
        sha256: bool,
    ) -> Option<Vec<u8>> {
        p.counter += 1;
        let mut tid = [0u8; 12];
        tid[..4].copy_from_slice(&p.counter.to_be_bytes());
        tid[4..6].copy_from_slice(&p.addr.port().to_be_bytes());
        let mut buf = vec![0u8; body.len() + 512];
        let mut enc =
            MessageEncoder::new(&mut buf, method, Class::Request, &TransactionId(tid)).ok()?;
        enc.append_encoded(body).ok()?;
        p.signer.mode = if sha256 { AuthMode::Sha256 } else { AuthMode::Legacy };
        p.signer.sign(&mut enc).ok()?;
        let n = enc.finish();
        let resp = self.client(p.addr, &buf[..n]);
        if let Some(r) = &resp {
            let m = Message::parse(r).expect("parses");
            if m.get(attr::NONCE).is_some() {
                p.signer.learn(&m);
            }
        }
        resp
    }
}

/// An encoded XOR-PEER-ADDRESS attribute. For IPv4 the XOR does not
/// involve the transaction ID, so the attribute fits any request.
fn xor_peer(addr: SocketAddr) -> Vec<u8> {
    let mut v = vec![0u8; 12];
    v[0..2].copy_from_slice(&attr::XOR_PEER_ADDRESS.to_be_bytes());
    v[2..4].copy_from_slice(&8u16.to_be_bytes());
    let mut val = [0u8; 8];
    attr::write_xor_address(&mut val, addr, &TransactionId([0; 12]));
    v[4..].copy_from_slice(&val);
    v
}

fuzz_target!(|data: &[u8]| {
    let cfg = ServerConfig {
        realm: REALM.into(),
        software: Some("fuzz".into()),
        credentials: CredentialsConfig {
            users: vec![
                StaticUser { name: "alice".into(), secret: UserSecret::Password("pw".into()) },
                StaticUser { name: "bob".into(), secret: UserSecret::Password("pw2".into()) },
            ],
            rest_secrets: vec![b"secret".to_vec()],
            ..CredentialsConfig::default()
        },
        nonce_secret: [1; 32],
        max_permissions_per_allocation: 4,
        max_channels_per_allocation: 4,
        retransmit_cache_entries: 8,
        event_queue_capacity: 8,
        ..ServerConfig::default()
    };
    let mut w = World {
        server: Server::new(cfg).expect("config"),
        relays: Relays::default(),
        quota: CountQuota::default(),
        now: Instant::now(),
        unix: 1_700_000_000,
        listener: "192.0.2.10:3478".parse().expect("addr"),
        transport: if data.len() % 2 == 1 { Transport::Tcp } else { Transport::Udp },
        out: vec![0u8; 2048],
    };
    let peer1: SocketAddr = "198.51.100.20:5000".parse().expect("addr");
    let peer2: SocketAddr = "198.51.100.21:6000".parse().expect("addr");
    let mut a = Peer::new("192.0.2.50:40000", "alice", "pw");
    let mut c = Peer::new("192.0.2.51:40000", "bob", "pw2");
    let b_addr: SocketAddr = "192.0.2.52:40000".parse().expect("addr");

    // Prime: 438 (bad nonce) teaches the nonce, then Allocate, ChannelBind, CreatePermission.
    let rt = [0x00, 0x19, 0x00, 0x04, 17, 0, 0, 0];
    let _ = w.signed(&mut a, Method::ALLOCATE, &rt, false);
    let _ = w.signed(&mut a, Method::ALLOCATE, &rt, false);
    let mut cb = vec![0x00, 0x0C, 0x00, 0x04, 0x40, 0x00, 0, 0];
    cb.extend(xor_peer(peer1));
    let _ = w.signed(&mut a, Method::CHANNEL_BIND, &cb, false);
    let _ = w.signed(&mut a, Method::CREATE_PERMISSION, &xor_peer(peer2), true);
    let _ = w.signed(&mut c, Method::BINDING, &[], false);

    let mut rest = data;
    while rest.len() >= 3 {
        let kind = rest[0];
        let len = (usize::from(rest[1]) << 8 | usize::from(rest[2])).min(rest.len() - 3);
        let chunk = &rest[3..3 + len];
        rest = &rest[3 + len..];
        match kind % 7 {
            0 => {
                let _ = w.client(a.addr, chunk);
            }
            1 => {
                let _ = w.client(b_addr, chunk);
            }
            2 => {
                let sel = chunk.first().copied().unwrap_or(0);
                let relay = RelayId(u64::from(sel % 4));
                let peer = match sel >> 6 {
                    0 => peer1,
                    1 => peer2,
                    2 => "198.51.100.20:5001".parse().expect("addr"),
                    _ => "[2606:4700::1]:53".parse().expect("addr"),
                };
                let payload = chunk.get(1..).unwrap_or(&[]);
                let mut buf = vec![0u8; PEER_HEADROOM + payload.len() + PEER_TAILROOM];
                buf[PEER_HEADROOM..PEER_HEADROOM + payload.len()].copy_from_slice(payload);
                if let Output::ToClient { five_tuple, data, .. } =
                    w.server.handle_peer_datagram(w.now, relay, peer, &mut buf, payload.len())
                {
                    assert!(!five_tuple.transport.is_stream() || data.len() % 4 == 0, "unpadded");
                }
            }
            3 => {
                let secs = u64::from(chunk.first().copied().unwrap_or(1)) * 8;
                w.now += Duration::from_secs(secs);
                w.unix += secs;
                w.server
                    .handle_timeout(w.now, &mut Host { relays: &mut w.relays, quota: &w.quota });
                if let Some(d) = w.server.poll_timeout() {
                    assert!(d > w.now, "timer left in the past");
                }
            }
            6 => {
                let ft = w.five_tuple(a.addr);
                let mut host = Host { relays: &mut w.relays, quota: &w.quota };
                w.server.handle_connection_closed(w.now, &ft, &mut host);
                assert!(w.server.allocation(&ft).is_none(), "allocation outlived its connection");
            }
            k => {
                let sel = chunk.first().copied().unwrap_or(0);
                let method = [
                    Method::ALLOCATE,
                    Method::REFRESH,
                    Method::CREATE_PERMISSION,
                    Method::CHANNEL_BIND,
                    Method::BINDING,
                    Method(0x0FF),
                ][usize::from(sel % 6)];
                let body = chunk.get(1..).unwrap_or(&[]);
                let p = if k == 4 { &mut a } else { &mut c };
                let _ = w.signed(p, method, body, sel & 0x80 != 0);
            }
        }
        while w.server.poll_event().is_some() {}
    }
    assert!(w.server.timer_entries() <= 2 * w.server.allocation_count() + 65);
    w.server.release_all(&mut Host { relays: &mut w.relays, quota: &w.quota });
    assert!(w.relays.live.is_empty(), "relay leaked");
    assert_eq!(w.quota.held.get(), 0, "quota leaked");
    assert_eq!(w.server.allocation_count(), 0);
});
