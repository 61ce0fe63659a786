//! Deterministic in-memory harness: a server, a fake relay allocator, a
//! minimal TURN client and peers, with simulated time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods, dead_code)]

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use std::sync::Arc;

use turn_proto::client::{Credentials, Signer};
use turn_proto::credentials::{
    CredentialsConfig, Key, PasswordAlgorithm, StaticUser, UserSecret, long_term_key, rest_password,
};
use turn_proto::server::{
    ClientConn, ClientInput, Event, FiveTuple, Host, LocalQuota, Output, PEER_HEADROOM,
    PEER_TAILROOM, RelayAllocator, RelayError, RelayId, RelayRequest, Server, ServerConfig,
    Transport,
};
use turn_proto::stun::attr::{self, Attribute};
use turn_proto::stun::{Class, Family, Message, Method, TransactionId};

pub const REALM: &str = "example.org";
pub const UNIX0: u64 = 1_700_000_000;

/// Owned copy of an [`Output`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    None,
    ToClient { client: SocketAddr, data: Vec<u8> },
    ToPeer { relay: RelayId, peer: SocketAddr, data: Vec<u8>, dont_fragment: bool },
}

impl Out {
    pub fn client_bytes(&self) -> &[u8] {
        match self {
            Out::ToClient { data, .. } => data,
            other => panic!("expected ToClient, got {other:?}"),
        }
    }
}

fn own(o: Output<'_>) -> Out {
    match o {
        Output::None => Out::None,
        Output::ToClient { five_tuple, data, .. } => {
            Out::ToClient { client: five_tuple.client, data: data.to_vec() }
        }
        Output::ToPeer { relay, peer, data, dont_fragment } => {
            Out::ToPeer { relay, peer, data: data.to_vec(), dont_fragment }
        }
    }
}

/// Hands out relay sockets with sequential ids and addresses.
#[derive(Debug, Default)]
pub struct FakeRelays {
    pub next: u64,
    pub live: BTreeSet<RelayId>,
    pub released: Vec<RelayId>,
    pub fail_next: Option<RelayError>,
    pub no_v6: bool,
    pub requests: Vec<(Family, bool, bool)>,
    /// The relayed address of each live relay.
    pub addrs: std::collections::BTreeMap<RelayId, SocketAddr>,
}

impl RelayAllocator for FakeRelays {
    fn allocate(&mut self, r: &RelayRequest<'_>) -> Result<(RelayId, SocketAddr), RelayError> {
        self.requests.push((r.family, r.even_port, r.dont_fragment));
        if let Some(e) = self.fail_next.take() {
            return Err(e);
        }
        if r.family == Family::V6 && self.no_v6 {
            return Err(RelayError::FamilyNotSupported);
        }
        self.next += 1;
        let id = RelayId(self.next);
        let port = 49152 + self.next as u16 * 2;
        let addr = match r.family {
            Family::V4 => SocketAddr::new("203.0.113.1".parse().unwrap(), port),
            Family::V6 => SocketAddr::new("2001:db8::1".parse().unwrap(), port),
        };
        assert!(self.live.insert(id));
        self.addrs.insert(id, addr);
        Ok((id, addr))
    }

    fn release(&mut self, id: RelayId) {
        assert!(self.live.remove(&id), "release of unknown relay {id:?}");
        self.addrs.remove(&id);
        self.released.push(id);
    }

    fn holds(&self, relayed: SocketAddr) -> bool {
        self.addrs.values().any(|a| *a == relayed)
    }
}

pub fn test_config() -> ServerConfig {
    ServerConfig {
        realm: REALM.into(),
        software: Some("turn-proto test".into()),
        credentials: CredentialsConfig {
            users: vec![
                StaticUser {
                    name: "alice".into(),
                    secret: UserSecret::Password("alice-pw".into()),
                },
                StaticUser { name: "bob".into(), secret: UserSecret::Password("bob-pw".into()) },
                StaticUser {
                    name: "carol".into(),
                    secret: UserSecret::Md5Key(
                        long_term_key(PasswordAlgorithm::Md5, "carol", REALM, "carol-pw")
                            .as_bytes()
                            .try_into()
                            .unwrap(),
                    ),
                },
            ],
            rest_secrets: vec![b"old-secret".to_vec(), b"new-secret".to_vec()],
            ..CredentialsConfig::default()
        },
        nonce_secret: [42; 32],
        ..ServerConfig::default()
    }
}

/// Server + relays + quota + simulated clock.
pub struct Sim {
    pub server: Server,
    pub relays: FakeRelays,
    pub quota: LocalQuota,
    pub now: Instant,
    pub unix: u64,
    pub listener: SocketAddr,
    /// How clients reach the server (UDP unless a test says otherwise).
    pub transport: Transport,
}

impl Sim {
    pub fn new(cfg: ServerConfig) -> Sim {
        Sim {
            server: Server::new(cfg).unwrap(),
            relays: FakeRelays::default(),
            quota: LocalQuota::new(10, 100),
            // The only clock read: an arbitrary origin for simulated time.
            now: Instant::now(),
            unix: UNIX0,
            listener: "192.0.2.10:3478".parse().unwrap(),
            transport: Transport::Udp,
        }
    }

    pub fn default() -> Sim {
        Sim::new(test_config())
    }

    /// Advance simulated time, firing every timer on the way at its
    /// deadline (as a daemon's event loop would).
    pub fn advance(&mut self, secs: u64) {
        let end = self.now + Duration::from_secs(secs);
        while let Some(d) = self.server.poll_timeout() {
            if d > end {
                break;
            }
            let d = d.max(self.now);
            self.server
                .handle_timeout(d, &mut Host { relays: &mut self.relays, quota: &self.quota });
        }
        self.now = end;
        self.unix += secs;
        self.server
            .handle_timeout(self.now, &mut Host { relays: &mut self.relays, quota: &self.quota });
    }

    pub fn client_datagram(&mut self, client: SocketAddr, datagram: &[u8]) -> Out {
        let mut out = [0u8; 2048];
        let input = ClientInput {
            now: self.now,
            unix_secs: self.unix,
            five_tuple: self.five_tuple(client),
            conn: Sim::conn_of(client),
            data: datagram,
        };
        let o = self.server.handle_client_message(
            input,
            &mut out,
            &mut Host { relays: &mut self.relays, quota: &self.quota },
        );
        if let Output::ToClient { five_tuple, conn, .. } = o {
            assert_eq!(five_tuple, self.five_tuple(client));
            assert_eq!(conn, Sim::conn_of(client), "the client's own connection");
        }
        own(o)
    }

    pub fn peer_datagram(&mut self, relay: RelayId, peer: SocketAddr, payload: &[u8]) -> Out {
        let mut buf = vec![0xEE; PEER_HEADROOM + payload.len() + PEER_TAILROOM];
        buf[PEER_HEADROOM..PEER_HEADROOM + payload.len()].copy_from_slice(payload);
        let o = self.server.handle_peer_datagram(self.now, relay, peer, &mut buf, payload.len());
        own(o)
    }

    /// The 5-tuple of `client` talking to this server.
    pub fn five_tuple(&self, client: SocketAddr) -> FiveTuple {
        FiveTuple { client, listener: self.listener, transport: self.transport }
    }

    /// The connection handle the simulated daemon gives `client` (one per client).
    pub fn conn_of(client: SocketAddr) -> ClientConn {
        ClientConn(u64::from(client.port()) << 8 | 7)
    }

    /// The client's TCP or TLS connection closed.
    pub fn close_connection(&mut self, client: SocketAddr) {
        let ft = self.five_tuple(client);
        self.server.handle_connection_closed(
            self.now,
            &ft,
            &mut Host { relays: &mut self.relays, quota: &self.quota },
        );
    }

    pub fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.server.poll_event()).collect()
    }
}

/// A parsed response for assertions.
#[derive(Debug)]
pub struct Resp {
    pub bytes: Vec<u8>,
}

impl Resp {
    pub fn msg(&self) -> Message<'_> {
        Message::parse(&self.bytes).expect("valid STUN response")
    }

    pub fn class(&self) -> Class {
        self.msg().class()
    }

    pub fn error_code(&self) -> Option<u16> {
        let m = self.msg();
        m.get(attr::ERROR_CODE).map(|v| attr::decode_error_code(v).unwrap().0)
    }

    pub fn attr(&self, t: u16) -> Option<Attribute<'_>> {
        let m = self.msg();
        let tid = m.transaction_id();
        let v = m.get(t)?;
        Some(Attribute::decode(t, v, &tid).unwrap())
    }

    pub fn all_xor(&self, t: u16) -> Vec<SocketAddr> {
        let m = self.msg();
        let tid = m.transaction_id();
        m.get_all(t).map(|v| attr::decode_xor_address(v, &tid).unwrap()).collect()
    }

    pub fn lifetime(&self) -> Option<u32> {
        match self.attr(attr::LIFETIME) {
            Some(Attribute::Lifetime(l)) => Some(l),
            _ => None,
        }
    }
}

pub use turn_proto::client::AuthMode;

/// The test client: the project's one TURN client ([`Signer`]) at one address, building
/// requests with any attributes (negative tests included).
#[derive(Debug, Clone)]
pub struct Client {
    pub addr: SocketAddr,
    pub signer: Signer,
    pub counter: u64,
    pub fingerprint: bool,
}

impl Client {
    pub fn new(addr: &str, username: &str, password: &str) -> Client {
        let creds =
            Credentials { username: username.into(), password: password.into(), realm: None };
        Client {
            addr: addr.parse().unwrap(),
            signer: Signer::new(Arc::new(creds), AuthMode::Legacy),
            counter: 0,
            fingerprint: false,
        }
    }

    pub fn alice(addr: &str) -> Client {
        Client::new(addr, "alice", "alice-pw")
    }

    pub fn next_txid(&mut self) -> TransactionId {
        self.counter += 1;
        let mut t = [0u8; 12];
        t[..8].copy_from_slice(&self.counter.to_be_bytes());
        t[8..10].copy_from_slice(&self.addr.port().to_be_bytes());
        TransactionId(t)
    }

    pub fn key(&self) -> Key {
        self.signer.key()
    }

    /// Build a message; a request is signed once realm and nonce are known.
    pub fn build(
        &self,
        method: Method,
        class: Class,
        txid: TransactionId,
        attrs: &[Attribute<'_>],
    ) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        let n =
            self.signer.encode(&mut buf, method, class, &txid, attrs, self.fingerprint).unwrap();
        buf.truncate(n);
        buf
    }

    /// Learn realm/nonce/algorithms from a 401/438.
    pub fn learn(&mut self, r: &Resp) {
        self.signer.learn(&r.msg());
    }

    /// True when a response carries an integrity attribute that our key verifies.
    pub fn verify(&self, r: &Resp) -> bool {
        let m = r.msg();
        (m.has_message_integrity() || m.has_message_integrity_sha256()) && self.signer.verify(&m)
    }

    /// Send a request, doing the 401/438 dance as a real client would.
    /// Returns the final response.
    pub fn request(&mut self, sim: &mut Sim, method: Method, attrs: &[Attribute<'_>]) -> Resp {
        for _ in 0..3 {
            let txid = self.next_txid();
            let bytes = self.build(method, Class::Request, txid, attrs);
            let out = sim.client_datagram(self.addr, &bytes);
            let r = Resp { bytes: out.client_bytes().to_vec() };
            assert_eq!(r.msg().transaction_id(), txid);
            match r.error_code() {
                Some(401) if self.signer.nonce.is_none() => self.learn(&r),
                Some(438) => self.learn(&r),
                _ => {
                    if r.msg().has_message_integrity() || r.msg().has_message_integrity_sha256() {
                        assert!(self.verify(&r), "response integrity must verify");
                    }
                    return r;
                }
            }
        }
        panic!("authentication loop");
    }

    pub fn allocate(&mut self, sim: &mut Sim) -> Resp {
        self.request(sim, Method::ALLOCATE, &[Attribute::RequestedTransport(attr::PROTOCOL_UDP)])
    }

    pub fn create_permission(&mut self, sim: &mut Sim, peers: &[SocketAddr]) -> Resp {
        let attrs: Vec<Attribute<'_>> =
            peers.iter().map(|p| Attribute::XorPeerAddress(*p)).collect();
        self.request(sim, Method::CREATE_PERMISSION, &attrs)
    }

    pub fn channel_bind(&mut self, sim: &mut Sim, channel: u16, peer: SocketAddr) -> Resp {
        self.request(
            sim,
            Method::CHANNEL_BIND,
            &[Attribute::ChannelNumber(channel), Attribute::XorPeerAddress(peer)],
        )
    }

    pub fn refresh(&mut self, sim: &mut Sim, lifetime: Option<u32>) -> Resp {
        let attrs: Vec<Attribute<'_>> = lifetime.map(Attribute::Lifetime).into_iter().collect();
        self.request(sim, Method::REFRESH, &attrs)
    }

    pub fn send_indication(&mut self, sim: &mut Sim, peer: SocketAddr, data: &[u8]) -> Out {
        let txid = self.next_txid();
        let bytes = self.build(
            Method::SEND,
            Class::Indication,
            txid,
            &[Attribute::XorPeerAddress(peer), Attribute::Data(data)],
        );
        sim.client_datagram(self.addr, &bytes)
    }

    pub fn channel_data(&mut self, sim: &mut Sim, channel: u16, data: &[u8]) -> Out {
        let mut buf = vec![0u8; data.len() + 4];
        let n = turn_proto::channel_data::encode(&mut buf, channel, data).unwrap();
        sim.client_datagram(self.addr, &buf[..n])
    }
}

/// The relay id the fake allocator gave an allocation.
pub fn relay_of(sim: &Sim, client: &Client, family: Family) -> RelayId {
    let ft = sim.five_tuple(client.addr);
    sim.server
        .allocation(&ft)
        .and_then(|a| a.relay_for(family))
        .map(|r| r.id)
        .expect("allocation with relay")
}

pub fn peer(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Decode a Data indication sent to the client: (peer, data).
pub fn data_indication(bytes: &[u8]) -> (SocketAddr, Vec<u8>) {
    let m = Message::parse(bytes).unwrap();
    assert_eq!(m.class(), Class::Indication);
    assert_eq!(m.method(), Method::DATA);
    let p = attr::decode_xor_address(m.get(attr::XOR_PEER_ADDRESS).unwrap(), &m.transaction_id())
        .unwrap();
    (p, m.get(attr::DATA).unwrap().to_vec())
}

pub fn rest_client(addr: &str, expiry: u64, user: &str, secret: &[u8]) -> Client {
    let name = format!("{expiry}:{user}");
    let pw = rest_password(secret, &name);
    Client::new(addr, &name, &pw)
}
