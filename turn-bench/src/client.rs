//! The TURN client side of one flow, sans-IO: builds requests with long-term credentials,
//! handles 401 (learn realm and nonce, retry authenticated) and 438 (new nonce, retry),
//! retransmits on a fixed timer, and reads the answers. The socket loop is in
//! [`crate::session`].

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow, bail};
use turn_proto::{
    credentials::{Key, PasswordAlgorithm, long_term_key, opaque_string},
    stun::{
        Class, Message, MessageEncoder, Method, TransactionId,
        attr::{self, Attribute},
    },
};

/// Retransmission interval of a request (fixed, as the benchmark runs on loopback).
pub const RTO: Duration = Duration::from_millis(500);
/// Transmissions of one request before giving up.
pub const MAX_TRIES: u32 = 5;
/// Authentication rounds (401 / 438 answers) one request may go through.
pub const MAX_AUTH_ROUNDS: u32 = 3;
/// New source ports a flow may try after 437 answers to its Allocate.
pub const MAX_REBINDS: u64 = 3;

/// Long-term credentials shared by every flow.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub username: String,
    /// Prepared (OpaqueString) password.
    pub password: String,
    /// The realm the user expects; the server's realm must match when given.
    pub realm: Option<String>,
}

impl Credentials {
    pub fn new(username: &str, password: &str, realm: Option<&str>) -> Result<Credentials> {
        let password = opaque_string(password)
            .map_err(|e| anyhow!("password cannot be prepared (SASLprep): {e}"))?
            .into_owned();
        Ok(Credentials { username: username.to_owned(), password, realm: realm.map(str::to_owned) })
    }
}

/// A TURN request of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Allocate,
    CreatePermission(SocketAddr),
    ChannelBind { channel: u16, peer: SocketAddr },
    Refresh { lifetime: u32 },
}

impl Request {
    pub fn name(&self) -> &'static str {
        match self {
            Request::Allocate => "Allocate",
            Request::CreatePermission(_) => "CreatePermission",
            Request::ChannelBind { .. } => "ChannelBind",
            Request::Refresh { .. } => "Refresh",
        }
    }

    fn method(&self) -> Method {
        match self {
            Request::Allocate => Method::ALLOCATE,
            Request::CreatePermission(_) => Method::CREATE_PERMISSION,
            Request::ChannelBind { .. } => Method::CHANNEL_BIND,
            Request::Refresh { .. } => Method::REFRESH,
        }
    }
}

/// What a success response told us.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reply {
    pub relayed: Option<SocketAddr>,
    pub mapped: Option<SocketAddr>,
    pub lifetime: Option<u32>,
}

/// What to do after an input.
#[derive(Debug)]
pub enum Progress {
    /// Nothing for us (another transaction, ChannelData, garbage).
    Ignored,
    /// Send [`ClientFlow::request_bytes`] (a retransmission or an authenticated retry).
    Send,
    /// The request succeeded.
    Done(Reply),
    /// The server holds an allocation for this 5-tuple that is not ours (437 to our first
    /// Allocate: typically a source port reused from an earlier run that a server still
    /// remembers). Move the flow to a new socket (a new source port) and call
    /// [`ClientFlow::restart`].
    Rebind,
    /// The request failed for good.
    Failed(anyhow::Error),
}

/// Counters of one flow's control traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ControlStats {
    /// Request datagrams sent (first transmissions, retries and retransmissions).
    pub sent: u64,
    pub retransmits: u64,
    /// 401 and 438 answers followed by a retry.
    pub auth_rounds: u64,
    /// Moves to a new source port after a 437 to Allocate.
    pub rebinds: u64,
}

struct Auth {
    realm: String,
    nonce: Vec<u8>,
    key: Key,
}

struct Txn {
    req: Request,
    tid: TransactionId,
    tries: u32,
    auth_rounds: u32,
    deadline: Instant,
}

/// The client state of one flow (one socket, one allocation).
pub struct ClientFlow {
    index: u32,
    salt: u32,
    counter: u32,
    creds: Arc<Credentials>,
    auth: Option<Auth>,
    txn: Option<Txn>,
    buf: Vec<u8>,
    len: usize,
    /// An ICMP error (port unreachable) was seen on the socket since the request started.
    pub unreachable: bool,
    pub stats: ControlStats,
}

impl ClientFlow {
    pub fn new(index: u32, creds: Arc<Credentials>) -> ClientFlow {
        ClientFlow {
            index,
            salt: rand::random(),
            counter: 0,
            creds,
            auth: None,
            txn: None,
            buf: vec![0; 1024],
            len: 0,
            unreachable: false,
            stats: ControlStats::default(),
        }
    }

    /// The request to (re)send.
    pub fn request_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// When the current request needs attention (retransmission or give-up).
    pub fn deadline(&self) -> Option<Instant> {
        self.txn.as_ref().map(|t| t.deadline)
    }

    /// The request in progress.
    #[cfg(test)]
    pub fn current(&self) -> Option<Request> {
        self.txn.as_ref().map(|t| t.req)
    }

    fn next_tid(&mut self) -> TransactionId {
        self.counter = self.counter.wrapping_add(1);
        let mut t = [0u8; 12];
        t[0..4].copy_from_slice(&self.index.to_be_bytes());
        t[4..8].copy_from_slice(&self.counter.to_be_bytes());
        t[8..12].copy_from_slice(&self.salt.to_be_bytes());
        TransactionId(t)
    }

    /// Start `req`; then send [`Self::request_bytes`].
    pub fn start(&mut self, req: Request, now: Instant) -> Result<()> {
        let tid = self.next_tid();
        self.txn = Some(Txn { req, tid, tries: 1, auth_rounds: 0, deadline: now + RTO });
        self.unreachable = false;
        self.encode()?;
        self.stats.sent += 1;
        Ok(())
    }

    fn encode(&mut self) -> Result<()> {
        let Some(txn) = &self.txn else { bail!("no request in progress") };
        let (req, tid) = (txn.req, txn.tid);
        let e = |e: turn_proto::stun::EncodeError| anyhow!("encoding {}: {e}", req.name());
        let mut enc =
            MessageEncoder::new(&mut self.buf, req.method(), Class::Request, &tid).map_err(e)?;
        match req {
            Request::Allocate => {
                Attribute::RequestedTransport(attr::PROTOCOL_UDP).encode(&mut enc).map_err(e)?
            }
            Request::CreatePermission(peer) => {
                enc.xor_address(attr::XOR_PEER_ADDRESS, peer).map_err(e)?
            }
            Request::ChannelBind { channel, peer } => {
                Attribute::ChannelNumber(channel).encode(&mut enc).map_err(e)?;
                enc.xor_address(attr::XOR_PEER_ADDRESS, peer).map_err(e)?;
            }
            Request::Refresh { lifetime } => enc.u32(attr::LIFETIME, lifetime).map_err(e)?,
        }
        if let Some(auth) = &self.auth {
            enc.raw(attr::USERNAME, self.creds.username.as_bytes()).map_err(e)?;
            enc.raw(attr::REALM, auth.realm.as_bytes()).map_err(e)?;
            enc.raw(attr::NONCE, &auth.nonce).map_err(e)?;
            enc.message_integrity(auth.key.as_bytes()).map_err(e)?;
        }
        self.len = enc.finish();
        Ok(())
    }

    /// Retransmit or give up if the deadline passed.
    pub fn on_timeout(&mut self, now: Instant) -> Progress {
        let Some(txn) = &mut self.txn else { return Progress::Ignored };
        if now < txn.deadline {
            return Progress::Ignored;
        }
        if txn.tries >= MAX_TRIES {
            let req = txn.req;
            self.txn = None;
            let hint = if self.unreachable {
                " (the socket got ICMP port unreachable: is the server listening there?)"
            } else {
                ""
            };
            return Progress::Failed(anyhow!(
                "no answer to {} after {} transmissions over {:.1} s{hint}",
                req.name(),
                MAX_TRIES,
                (RTO * MAX_TRIES).as_secs_f64()
            ));
        }
        txn.tries += 1;
        txn.deadline = now + RTO;
        self.stats.sent += 1;
        self.stats.retransmits += 1;
        Progress::Send
    }

    /// Start over on a new socket: forget the nonce (it may be bound to the old 5-tuple)
    /// and send `req` again; then send [`Self::request_bytes`].
    pub fn restart(&mut self, req: Request, now: Instant) -> Result<()> {
        self.auth = None;
        self.start(req, now)
    }

    /// Handle a datagram received on the flow's socket.
    pub fn on_datagram(&mut self, data: &[u8], now: Instant) -> Progress {
        let Some(txn) = &self.txn else { return Progress::Ignored };
        let Ok(msg) = Message::parse(data) else { return Progress::Ignored };
        if msg.transaction_id() != txn.tid || msg.method() != txn.req.method() {
            return Progress::Ignored;
        }
        let req = txn.req;
        match msg.class() {
            Class::SuccessResponse => {
                if msg.has_message_integrity() {
                    match &self.auth {
                        Some(a) if msg.verify_message_integrity(a.key.as_bytes()) => {}
                        _ => {
                            self.txn = None;
                            return Progress::Failed(anyhow!(
                                "{} success response fails MESSAGE-INTEGRITY",
                                req.name()
                            ));
                        }
                    }
                }
                let tid = msg.transaction_id();
                let xor = |t| msg.get(t).and_then(|v| attr::decode_xor_address(v, &tid).ok());
                let reply = Reply {
                    relayed: xor(attr::XOR_RELAYED_ADDRESS),
                    mapped: xor(attr::XOR_MAPPED_ADDRESS),
                    lifetime: msg.get(attr::LIFETIME).and_then(|v| attr::decode_u32(v).ok()),
                };
                self.txn = None;
                if req == Request::Allocate && reply.relayed.is_none() {
                    return Progress::Failed(anyhow!(
                        "Allocate success without XOR-RELAYED-ADDRESS"
                    ));
                }
                Progress::Done(reply)
            }
            Class::ErrorResponse => {
                let (code, reason) = msg
                    .get(attr::ERROR_CODE)
                    .and_then(|v| attr::decode_error_code(v).ok())
                    .map_or((0, String::from("(no ERROR-CODE)")), |(c, r)| {
                        // Some servers (coturn) end the reason phrase with a NUL.
                        (c, r.trim_matches(|ch: char| ch.is_control()).to_owned())
                    });
                self.on_error(req, code, &reason, &msg, now)
            }
            _ => Progress::Ignored,
        }
    }

    fn on_error(
        &mut self,
        req: Request,
        code: u16,
        reason: &str,
        msg: &Message<'_>,
        now: Instant,
    ) -> Progress {
        let fail = |this: &mut Self, e: anyhow::Error| {
            this.txn = None;
            Progress::Failed(e)
        };
        match code {
            401 | 438 => {
                let rounds = self.txn.as_ref().map_or(0, |t| t.auth_rounds);
                let had_auth = self.auth.is_some();
                if rounds >= MAX_AUTH_ROUNDS || (code == 401 && had_auth && rounds > 0) {
                    let what = if code == 401 {
                        "credentials rejected (401): wrong --user/--password?"
                    } else {
                        "nonce keeps going stale (438)"
                    };
                    return fail(self, anyhow!("{}: {what} ({reason})", req.name()));
                }
                let text =
                    |t| msg.get(t).and_then(|v| std::str::from_utf8(v).ok()).map(str::to_owned);
                let Some(nonce) = msg.get(attr::NONCE).map(<[u8]>::to_vec) else {
                    return fail(self, anyhow!("{}: {code} without NONCE", req.name()));
                };
                let realm = match (text(attr::REALM), &self.auth) {
                    (Some(r), _) => r,
                    (None, Some(a)) => a.realm.clone(),
                    (None, None) => {
                        return fail(self, anyhow!("{}: {code} without REALM", req.name()));
                    }
                };
                if let Some(want) = &self.creds.realm
                    && *want != realm
                {
                    return fail(
                        self,
                        anyhow!("server realm is {realm:?}, not the --realm {want:?} given"),
                    );
                }
                let key = match &self.auth {
                    Some(a) if a.realm == realm => a.key,
                    _ => long_term_key(
                        PasswordAlgorithm::Md5,
                        &self.creds.username,
                        &realm,
                        &self.creds.password,
                    ),
                };
                self.auth = Some(Auth { realm, nonce, key });
                let tid = self.next_tid();
                if let Some(t) = &mut self.txn {
                    t.tid = tid;
                    t.tries = 1;
                    t.auth_rounds += 1;
                    t.deadline = now + RTO;
                }
                if let Err(e) = self.encode() {
                    return fail(self, e);
                }
                self.stats.sent += 1;
                self.stats.auth_rounds += 1;
                Progress::Send
            }
            // Deleting an allocation that is already gone is a success for the cleanup.
            437 if matches!(req, Request::Refresh { lifetime: 0 }) => {
                self.txn = None;
                Progress::Done(Reply::default())
            }
            437 if req == Request::Allocate && self.stats.rebinds < MAX_REBINDS => {
                self.txn = None;
                self.stats.rebinds += 1;
                Progress::Rebind
            }
            _ => fail(self, anyhow!("{} refused by the server: {code} {reason}", req.name())),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn creds() -> Arc<Credentials> {
        Arc::new(Credentials::new("bench", "bench", None).unwrap())
    }

    /// A server-side answer to the request in `req` (same transaction).
    fn answer(req: &[u8], class: Class, build: impl FnOnce(&mut MessageEncoder<'_>)) -> Vec<u8> {
        let m = Message::parse(req).unwrap();
        let mut out = vec![0u8; 512];
        let mut enc =
            MessageEncoder::new(&mut out, m.method(), class, &m.transaction_id()).unwrap();
        build(&mut enc);
        let n = enc.finish();
        out.truncate(n);
        out
    }

    #[test]
    fn allocate_with_401_then_success() {
        let now = Instant::now();
        let mut f = ClientFlow::new(3, creds());
        f.start(Request::Allocate, now).unwrap();
        let first = Message::parse(f.request_bytes()).unwrap();
        assert!(first.get(attr::USERNAME).is_none());
        assert!(!first.has_message_integrity());
        let first_tid = first.transaction_id();
        let e401 = answer(f.request_bytes(), Class::ErrorResponse, |e| {
            e.error_code(401, "Unauthorized").unwrap();
            e.raw(attr::REALM, b"bench").unwrap();
            e.raw(attr::NONCE, b"n1").unwrap();
        });
        assert!(matches!(f.on_datagram(&e401, now), Progress::Send));
        let second = f.request_bytes().to_vec();
        let m = Message::parse(&second).unwrap();
        assert_ne!(m.transaction_id(), first_tid);
        assert_eq!(m.get(attr::USERNAME), Some(&b"bench"[..]));
        assert_eq!(m.get(attr::NONCE), Some(&b"n1"[..]));
        let key = long_term_key(PasswordAlgorithm::Md5, "bench", "bench", "bench");
        assert!(m.verify_message_integrity(key.as_bytes()));
        // A stale answer to the first transaction is ignored.
        assert!(matches!(f.on_datagram(&e401, now), Progress::Ignored));
        let relayed: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        let ok = answer(&second, Class::SuccessResponse, |e| {
            e.xor_address(attr::XOR_RELAYED_ADDRESS, relayed).unwrap();
            e.u32(attr::LIFETIME, 600).unwrap();
            e.message_integrity(key.as_bytes()).unwrap();
        });
        match f.on_datagram(&ok, now) {
            Progress::Done(r) => {
                assert_eq!(r.relayed, Some(relayed));
                assert_eq!(r.lifetime, Some(600));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(f.stats, ControlStats { sent: 2, retransmits: 0, auth_rounds: 1, rebinds: 0 });
        // The next request is authenticated from the start.
        f.start(Request::Refresh { lifetime: 0 }, now).unwrap();
        assert!(Message::parse(f.request_bytes()).unwrap().has_message_integrity());
    }

    #[test]
    fn stale_nonce_is_retried_and_bad_password_fails() {
        let now = Instant::now();
        let mut f = ClientFlow::new(0, creds());
        f.start(Request::Allocate, now).unwrap();
        let e401 = |req: &[u8]| {
            answer(req, Class::ErrorResponse, |e| {
                e.error_code(401, "Unauthorized").unwrap();
                e.raw(attr::REALM, b"bench").unwrap();
                e.raw(attr::NONCE, b"n1").unwrap();
            })
        };
        let r = e401(f.request_bytes());
        assert!(matches!(f.on_datagram(&r, now), Progress::Send));
        let e438 = answer(f.request_bytes(), Class::ErrorResponse, |e| {
            e.error_code(438, "Stale Nonce").unwrap();
            e.raw(attr::REALM, b"bench").unwrap();
            e.raw(attr::NONCE, b"n2").unwrap();
        });
        assert!(matches!(f.on_datagram(&e438, now), Progress::Send));
        assert_eq!(Message::parse(f.request_bytes()).unwrap().get(attr::NONCE), Some(&b"n2"[..]));
        // 401 to an authenticated request: the credentials are wrong.
        let r = e401(f.request_bytes());
        match f.on_datagram(&r, now) {
            Progress::Failed(e) => assert!(e.to_string().contains("credentials rejected"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert!(f.current().is_none());
    }

    #[test]
    fn realm_mismatch_is_reported() {
        let now = Instant::now();
        let c = Arc::new(Credentials::new("bench", "bench", Some("other")).unwrap());
        let mut f = ClientFlow::new(0, c);
        f.start(Request::Allocate, now).unwrap();
        let r = answer(f.request_bytes(), Class::ErrorResponse, |e| {
            e.error_code(401, "Unauthorized").unwrap();
            e.raw(attr::REALM, b"bench").unwrap();
            e.raw(attr::NONCE, b"n").unwrap();
        });
        match f.on_datagram(&r, now) {
            Progress::Failed(e) => assert!(e.to_string().contains("realm"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retransmits_then_gives_up_naming_the_step() {
        let t0 = Instant::now();
        let mut f = ClientFlow::new(0, creds());
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        f.start(Request::CreatePermission(peer), t0).unwrap();
        let first = f.request_bytes().to_vec();
        assert!(matches!(f.on_timeout(t0 + RTO / 2), Progress::Ignored));
        let mut t = t0;
        for _ in 1..MAX_TRIES {
            t += RTO;
            assert!(matches!(f.on_timeout(t), Progress::Send));
            assert_eq!(f.request_bytes(), &first[..], "retransmission is identical");
        }
        t += RTO;
        match f.on_timeout(t) {
            Progress::Failed(e) => assert!(e.to_string().contains("CreatePermission"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(f.stats.retransmits, u64::from(MAX_TRIES - 1));
    }

    #[test]
    fn other_errors_fail_and_refresh_437_is_done() {
        let now = Instant::now();
        let mut f = ClientFlow::new(0, creds());
        f.start(Request::Allocate, now).unwrap();
        let r = answer(f.request_bytes(), Class::ErrorResponse, |e| {
            e.error_code(486, "Allocation Quota Reached").unwrap();
        });
        match f.on_datagram(&r, now) {
            Progress::Failed(e) => assert!(e.to_string().contains("486"), "{e}"),
            other => panic!("{other:?}"),
        }
        f.start(Request::Refresh { lifetime: 0 }, now).unwrap();
        let r = answer(f.request_bytes(), Class::ErrorResponse, |e| {
            e.error_code(437, "Allocation Mismatch").unwrap();
        });
        assert!(matches!(f.on_datagram(&r, now), Progress::Done(_)));
        // 437 to Allocate: move to a new source port, a bounded number of times.
        for _ in 0..MAX_REBINDS {
            f.restart(Request::Allocate, now).unwrap();
            let r = answer(f.request_bytes(), Class::ErrorResponse, |e| {
                e.error_code(437, "Mismatched allocation\0").unwrap();
            });
            assert!(matches!(f.on_datagram(&r, now), Progress::Rebind));
        }
        f.restart(Request::Allocate, now).unwrap();
        let r = answer(f.request_bytes(), Class::ErrorResponse, |e| {
            e.error_code(437, "Mismatched allocation\0").unwrap();
        });
        match f.on_datagram(&r, now) {
            Progress::Failed(e) => {
                assert!(e.to_string().ends_with("437 Mismatched allocation"), "{e:?}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(f.stats.rebinds, MAX_REBINDS);
        // ChannelData and garbage are ignored.
        f.start(Request::Allocate, now).unwrap();
        assert!(matches!(f.on_datagram(&[0x40, 0, 0, 0], now), Progress::Ignored));
    }

    #[test]
    fn channel_bind_encoding() {
        let now = Instant::now();
        let mut f = ClientFlow::new(0, creds());
        let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        f.start(Request::ChannelBind { channel: 0x4001, peer }, now).unwrap();
        let m = Message::parse(f.request_bytes()).unwrap();
        assert_eq!(m.method(), Method::CHANNEL_BIND);
        assert_eq!(m.get(attr::CHANNEL_NUMBER), Some(&[0x40, 0x01, 0, 0][..]));
        let tid = m.transaction_id();
        assert_eq!(
            attr::decode_xor_address(m.get(attr::XOR_PEER_ADDRESS).unwrap(), &tid).unwrap(),
            peer
        );
    }
}
