//! A sans-IO TURN client: the one the project's tests, benchmarks and fuzz targets use.
//!
//! Two layers:
//!
//! * [`Signer`] holds the client's long-term credentials and what it learned from the
//!   server's 401 and 438 answers (REALM, NONCE, PASSWORD-ALGORITHMS), and signs requests
//!   the caller encodes (RFC 8489 §9.2.3: USERNAME or USERHASH, REALM, NONCE,
//!   PASSWORD-ALGORITHM(S), MESSAGE-INTEGRITY or MESSAGE-INTEGRITY-SHA256). Tests that
//!   build odd requests use it directly.
//! * [`Client`] runs one request at a time for one 5-tuple: encodes it, answers 401 and
//!   438 with a signed retry, retransmits on a fixed timer (over UDP), verifies the
//!   response's integrity and reports a [`Reply`] or a [`ClientError`]. The caller owns
//!   the socket or stream: it sends [`Client::request_bytes`] when told to and feeds
//!   every message it receives to [`Client::on_message`].
//!
//! Like the server, the client never reads the clock: `now` is an argument.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::channel_data;
use crate::credentials::{Key, PasswordAlgorithm, long_term_key, opaque_string, user_hash};
use crate::stun::attr::{self, Attribute};
use crate::stun::{Class, EncodeError, Message, MessageEncoder, Method, TransactionId};

/// Retransmission interval of a request over UDP (fixed: the clients run on loopback).
pub const RTO: Duration = Duration::from_millis(500);
/// Transmissions of one request before giving up.
pub const MAX_TRIES: u32 = 5;
/// Authentication rounds (401 / 438 answers) one request may go through.
pub const MAX_AUTH_ROUNDS: u32 = 3;
/// New source ports a flow may try after 437 answers to its Allocate.
pub const MAX_REBINDS: u64 = 3;

/// Long-term credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The username (for REST credentials, `expiry:user`).
    pub username: String,
    /// The password, prepared with OpaqueString (SASLprep).
    pub password: String,
    /// The realm the user expects; a server announcing another one is an error.
    pub realm: Option<String>,
}

impl Credentials {
    /// Credentials with the password prepared (RFC 8265 OpaqueString).
    pub fn new(
        username: &str,
        password: &str,
        realm: Option<&str>,
    ) -> Result<Credentials, ClientError> {
        let password = opaque_string(password).map_err(|_| ClientError::Password)?.into_owned();
        Ok(Credentials { username: username.to_owned(), password, realm: realm.map(str::to_owned) })
    }
}

/// How requests are signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    /// RFC 5389 style: USERNAME, the MD5 key, MESSAGE-INTEGRITY; PASSWORD-ALGORITHMS
    /// ignored (what coturn's clients and most deployed ones do).
    #[default]
    Legacy,
    /// RFC 8489: echo PASSWORD-ALGORITHMS, choose SHA-256 when the server offers it
    /// (else MD5), sign with MESSAGE-INTEGRITY-SHA256.
    Sha256,
    /// [`AuthMode::Sha256`] with USERHASH instead of USERNAME.
    Sha256UserHash,
}

/// Signs requests with long-term credentials, from what the server's 401 and 438
/// answers taught it.
#[derive(Debug, Clone)]
pub struct Signer {
    creds: Arc<Credentials>,
    /// How to sign.
    pub mode: AuthMode,
    /// The realm the server announced.
    pub realm: Option<String>,
    /// The current nonce.
    pub nonce: Option<Vec<u8>>,
    /// The PASSWORD-ALGORITHMS value the server offered (echoed in RFC 8489 modes).
    pub algorithms: Option<Vec<u8>>,
}

impl Signer {
    /// A signer that knows nothing of the server yet (its first request goes unsigned).
    pub fn new(creds: Arc<Credentials>, mode: AuthMode) -> Signer {
        Signer { creds, mode, realm: None, nonce: None, algorithms: None }
    }

    /// The credentials.
    pub fn credentials(&self) -> &Credentials {
        &self.creds
    }

    /// The realm the server announced, if any yet.
    pub fn realm(&self) -> Option<&str> {
        self.realm.as_deref()
    }

    /// The current nonce, if any.
    pub fn nonce(&self) -> Option<&[u8]> {
        self.nonce.as_deref()
    }

    /// True once a realm and a nonce are known: requests are signed.
    pub fn ready(&self) -> bool {
        self.realm.is_some() && self.nonce.is_some()
    }

    /// Forgets what the server said (a new 5-tuple: the nonce may be bound to the old one).
    pub fn forget(&mut self) {
        self.realm = None;
        self.nonce = None;
        self.algorithms = None;
    }

    /// Learns REALM, NONCE and PASSWORD-ALGORITHMS from a response (a 401 or 438).
    pub fn learn(&mut self, msg: &Message<'_>) {
        if let Some(v) = msg.get(attr::REALM) {
            self.realm = Some(String::from_utf8_lossy(v).into_owned());
        }
        if let Some(v) = msg.get(attr::NONCE) {
            self.nonce = Some(v.to_vec());
        }
        if let Some(v) = msg.get(attr::PASSWORD_ALGORITHMS) {
            self.algorithms = Some(v.to_vec());
        }
    }

    /// The password algorithm requests are signed with.
    pub fn algorithm(&self) -> PasswordAlgorithm {
        let sha256 = PasswordAlgorithm::Sha256.code().to_be_bytes();
        let offered = self
            .algorithms
            .as_ref()
            .is_none_or(|list| list.chunks(4).any(|a| a.get(..2) == Some(&sha256[..])));
        match self.mode {
            AuthMode::Sha256 | AuthMode::Sha256UserHash if offered => PasswordAlgorithm::Sha256,
            _ => PasswordAlgorithm::Md5,
        }
    }

    /// The long-term key for the learned (else the expected) realm.
    pub fn key(&self) -> Key {
        let realm = self.realm.as_deref().or(self.creds.realm.as_deref()).unwrap_or_default();
        long_term_key(self.algorithm(), &self.creds.username, realm, &self.creds.password)
    }

    /// Appends the credential attributes and the integrity attribute to a request being
    /// encoded (after its own attributes; FINGERPRINT, if any, goes after). Returns false,
    /// appending nothing, while no realm and nonce are known.
    pub fn sign(&self, enc: &mut MessageEncoder<'_>) -> Result<bool, EncodeError> {
        let (Some(realm), Some(nonce)) = (&self.realm, &self.nonce) else {
            return Ok(false);
        };
        match self.mode {
            AuthMode::Sha256UserHash => {
                enc.raw(attr::USERHASH, &user_hash(&self.creds.username, realm))?
            }
            _ => enc.raw(attr::USERNAME, self.creds.username.as_bytes())?,
        }
        enc.raw(attr::REALM, realm.as_bytes())?;
        enc.raw(attr::NONCE, nonce)?;
        if self.mode != AuthMode::Legacy {
            if let Some(list) = &self.algorithms {
                enc.raw(attr::PASSWORD_ALGORITHMS, list)?;
            }
            Attribute::PasswordAlgorithm(self.algorithm().code(), &[]).encode(enc)?;
        }
        let key = self.key();
        match self.mode {
            AuthMode::Legacy => enc.message_integrity(key.as_bytes())?,
            _ => enc.message_integrity_sha256(key.as_bytes())?,
        }
        Ok(true)
    }

    /// Encodes a message with `attrs`, signed when it is a request and the signer is
    /// ready, with FINGERPRINT last if asked. Returns its length in `out`.
    pub fn encode(
        &self,
        out: &mut [u8],
        method: Method,
        class: Class,
        txid: &TransactionId,
        attrs: &[Attribute<'_>],
        fingerprint: bool,
    ) -> Result<usize, EncodeError> {
        let mut enc = MessageEncoder::new(out, method, class, txid)?;
        for a in attrs {
            a.encode(&mut enc)?;
        }
        if class == Class::Request {
            self.sign(&mut enc)?;
        }
        if fingerprint {
            enc.fingerprint()?;
        }
        Ok(enc.finish())
    }

    /// True when `msg` carries no integrity attribute or one that our key verifies.
    pub fn verify(&self, msg: &Message<'_>) -> bool {
        let key = self.key();
        if msg.has_message_integrity_sha256() {
            msg.verify_message_integrity_sha256(key.as_bytes())
        } else if msg.has_message_integrity() {
            msg.verify_message_integrity(key.as_bytes())
        } else {
            true
        }
    }
}

/// Encodes a ChannelData message into `out`, padded with zeros to a multiple of four
/// bytes when `padded` (mandatory over TCP and TLS, RFC 8656 §12.5). Returns its length.
pub fn channel_data(out: &mut [u8], channel: u16, payload: &[u8], padded: bool) -> Option<usize> {
    let n = channel_data::encode(out, channel, payload)?;
    if !padded {
        return Some(n);
    }
    let framed = crate::stun::message::pad4(n);
    out.get_mut(n..framed)?.fill(0);
    Some(framed)
}

/// The error code and reason phrase of an error response (control characters trimmed:
/// coturn ends its reason phrases with a NUL).
pub fn error_code(msg: &Message<'_>) -> Option<(u16, String)> {
    let (code, reason) = attr::decode_error_code(msg.get(attr::ERROR_CODE)?).ok()?;
    Some((code, reason.trim_matches(|c: char| c.is_control()).to_owned()))
}

/// A TURN request the [`Client`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Allocate a UDP relay (IPv4).
    Allocate,
    /// Allocate a UDP relay with an IPv6 relayed address (REQUESTED-ADDRESS-FAMILY).
    AllocateIpv6,
    /// Install a permission for a peer's address.
    CreatePermission(SocketAddr),
    /// Bind a channel to a peer.
    ChannelBind {
        /// Channel number (0x4000-0x7FFF).
        channel: u16,
        /// The peer.
        peer: SocketAddr,
    },
    /// Refresh the allocation (lifetime 0 deletes it).
    Refresh {
        /// Requested lifetime in seconds.
        lifetime: u32,
    },
}

impl Request {
    /// The method's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Allocate | Request::AllocateIpv6 => "Allocate",
            Request::CreatePermission(_) => "CreatePermission",
            Request::ChannelBind { .. } => "ChannelBind",
            Request::Refresh { .. } => "Refresh",
        }
    }

    /// True for the Allocate requests.
    pub fn is_allocate(&self) -> bool {
        matches!(self, Request::Allocate | Request::AllocateIpv6)
    }

    /// The STUN method.
    pub fn method(&self) -> Method {
        match self {
            Request::Allocate | Request::AllocateIpv6 => Method::ALLOCATE,
            Request::CreatePermission(_) => Method::CREATE_PERMISSION,
            Request::ChannelBind { .. } => Method::CHANNEL_BIND,
            Request::Refresh { .. } => Method::REFRESH,
        }
    }

    fn encode_attributes(&self, enc: &mut MessageEncoder<'_>) -> Result<(), EncodeError> {
        match *self {
            Request::Allocate => Attribute::RequestedTransport(attr::PROTOCOL_UDP).encode(enc),
            Request::AllocateIpv6 => {
                Attribute::RequestedTransport(attr::PROTOCOL_UDP).encode(enc)?;
                Attribute::RequestedAddressFamily(crate::stun::Family::V6).encode(enc)
            }
            Request::CreatePermission(peer) => enc.xor_address(attr::XOR_PEER_ADDRESS, peer),
            Request::ChannelBind { channel, peer } => {
                Attribute::ChannelNumber(channel).encode(enc)?;
                enc.xor_address(attr::XOR_PEER_ADDRESS, peer)
            }
            Request::Refresh { lifetime } => enc.u32(attr::LIFETIME, lifetime),
        }
    }
}

/// What a success response told us.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reply {
    /// XOR-RELAYED-ADDRESS (Allocate).
    pub relayed: Option<SocketAddr>,
    /// XOR-MAPPED-ADDRESS (Allocate).
    pub mapped: Option<SocketAddr>,
    /// LIFETIME (Allocate, Refresh).
    pub lifetime: Option<u32>,
}

impl Reply {
    /// The reply carried by a success response.
    pub fn of(msg: &Message<'_>) -> Reply {
        let tid = msg.transaction_id();
        let xor = |t| msg.get(t).and_then(|v| attr::decode_xor_address(v, &tid).ok());
        Reply {
            relayed: xor(attr::XOR_RELAYED_ADDRESS),
            mapped: xor(attr::XOR_MAPPED_ADDRESS),
            lifetime: msg.get(attr::LIFETIME).and_then(|v| attr::decode_u32(v).ok()),
        }
    }
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClientError {
    /// The password cannot be prepared (SASLprep).
    #[error("password cannot be prepared (SASLprep)")]
    Password,
    /// No answer after every retransmission.
    #[error(
        "no answer to {request} after {tries} transmissions over {secs:.1} s{}",
        if *unreachable { " (the socket got ICMP port unreachable: is the server listening there?)" } else { "" }
    )]
    NoAnswer {
        /// The request.
        request: &'static str,
        /// Transmissions.
        tries: u32,
        /// Seconds waited.
        secs: f64,
        /// An ICMP port unreachable was seen meanwhile.
        unreachable: bool,
    },
    /// 401 to a signed request.
    #[error("{request}: credentials rejected (401): wrong username or password? ({reason})")]
    CredentialsRejected {
        /// The request.
        request: &'static str,
        /// The server's reason phrase.
        reason: String,
    },
    /// 438 again and again.
    #[error("{request}: nonce keeps going stale (438) ({reason})")]
    StaleNonceLoop {
        /// The request.
        request: &'static str,
        /// The server's reason phrase.
        reason: String,
    },
    /// A 401 or 438 without what a client needs to retry.
    #[error("{request}: {code} without {missing}")]
    Incomplete {
        /// The request.
        request: &'static str,
        /// 401 or 438.
        code: u16,
        /// The attribute missing.
        missing: &'static str,
    },
    /// The server's realm is not the one expected.
    #[error("server realm is {server:?}, not the realm {expected:?} given")]
    RealmMismatch {
        /// What the server said.
        server: String,
        /// What the credentials expect.
        expected: String,
    },
    /// A success response whose integrity does not verify with our key.
    #[error("{request} success response fails its integrity check")]
    BadIntegrity {
        /// The request.
        request: &'static str,
    },
    /// An Allocate success without a relayed address.
    #[error("Allocate success without XOR-RELAYED-ADDRESS")]
    NoRelayedAddress,
    /// Any other error response.
    #[error("{request} refused by the server: {code} {reason}")]
    Refused {
        /// The request.
        request: &'static str,
        /// The error code.
        code: u16,
        /// The reason phrase.
        reason: String,
    },
    /// The request does not fit the client's buffer.
    #[error("encoding {request}: {error}")]
    Encode {
        /// The request.
        request: &'static str,
        /// Why.
        error: EncodeError,
    },
    /// No request is in progress.
    #[error("no request in progress")]
    Idle,
}

impl ClientError {
    /// The error code of a refusal, if the server refused.
    pub fn code(&self) -> Option<u16> {
        match self {
            ClientError::Refused { code, .. } => Some(*code),
            ClientError::CredentialsRejected { .. } => Some(401),
            ClientError::StaleNonceLoop { .. } => Some(438),
            _ => None,
        }
    }
}

/// What to do after an input.
#[derive(Debug)]
pub enum Progress {
    /// Nothing for us (another transaction, ChannelData, garbage).
    Ignored,
    /// Send [`Client::request_bytes`] (a retransmission or an authenticated retry).
    Send,
    /// The request succeeded.
    Done(Reply),
    /// The server holds an allocation for this 5-tuple that is not ours (437 to our first
    /// Allocate: typically a source port reused from an earlier run that a server still
    /// remembers). Move to a new socket (a new source port) and call [`Client::restart`].
    Rebind,
    /// The request failed for good.
    Failed(ClientError),
}

/// Counters of one client's control traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ControlStats {
    /// Request messages sent (first transmissions, retries and retransmissions).
    pub sent: u64,
    /// Retransmissions.
    pub retransmits: u64,
    /// 401 and 438 answers followed by a retry.
    pub auth_rounds: u64,
    /// Moves to a new source port after a 437 to Allocate.
    pub rebinds: u64,
}

#[derive(Debug)]
struct Txn {
    req: Request,
    tid: TransactionId,
    tries: u32,
    auth_rounds: u32,
    deadline: Instant,
}

/// The client side of one 5-tuple: one request at a time.
#[derive(Debug)]
pub struct Client {
    index: u32,
    salt: u32,
    counter: u32,
    signer: Signer,
    txn: Option<Txn>,
    buf: Vec<u8>,
    len: usize,
    /// Over a stream: no retransmissions (the transport delivers or the connection dies).
    pub reliable: bool,
    /// An ICMP error (port unreachable) was seen on the socket since the request started.
    pub unreachable: bool,
    /// Control traffic so far.
    pub stats: ControlStats,
}

impl Client {
    /// Client number `index` (it goes into transaction ids, with `salt`, so that clients
    /// of one run never share one).
    pub fn new(index: u32, salt: u32, creds: Arc<Credentials>) -> Client {
        Client {
            index,
            salt,
            counter: 0,
            signer: Signer::new(creds, AuthMode::Legacy),
            txn: None,
            buf: vec![0; 1024],
            len: 0,
            reliable: false,
            unreachable: false,
            stats: ControlStats::default(),
        }
    }

    /// The signer (what the client learned of the server).
    pub fn signer(&self) -> &Signer {
        &self.signer
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

    /// Starts `req`; then send [`Self::request_bytes`].
    pub fn start(&mut self, req: Request, now: Instant) -> Result<(), ClientError> {
        let tid = self.next_tid();
        self.txn = Some(Txn { req, tid, tries: 1, auth_rounds: 0, deadline: self.due(now) });
        self.unreachable = false;
        self.encode()?;
        self.stats.sent += 1;
        Ok(())
    }

    /// Over a stream there is no retransmission: one RTO x MAX_TRIES for the answer.
    fn due(&self, now: Instant) -> Instant {
        if self.reliable { now + RTO * MAX_TRIES } else { now + RTO }
    }

    fn encode(&mut self) -> Result<(), ClientError> {
        let Some(txn) = &self.txn else { return Err(ClientError::Idle) };
        let (req, tid) = (txn.req, txn.tid);
        let e = |error| ClientError::Encode { request: req.name(), error };
        let mut enc =
            MessageEncoder::new(&mut self.buf, req.method(), Class::Request, &tid).map_err(e)?;
        req.encode_attributes(&mut enc).map_err(e)?;
        self.signer.sign(&mut enc).map_err(e)?;
        self.len = enc.finish();
        Ok(())
    }

    /// Retransmits or gives up if the deadline passed.
    pub fn on_timeout(&mut self, now: Instant) -> Progress {
        let Some(txn) = &mut self.txn else { return Progress::Ignored };
        if now < txn.deadline {
            return Progress::Ignored;
        }
        if txn.tries >= MAX_TRIES || self.reliable {
            let req = txn.req;
            let tries = txn.tries;
            self.txn = None;
            return Progress::Failed(ClientError::NoAnswer {
                request: req.name(),
                tries,
                secs: (RTO * MAX_TRIES).as_secs_f64(),
                unreachable: self.unreachable,
            });
        }
        txn.tries += 1;
        txn.deadline = now + RTO;
        self.stats.sent += 1;
        self.stats.retransmits += 1;
        Progress::Send
    }

    /// Starts over on a new socket: forgets the nonce (it may be bound to the old
    /// 5-tuple) and sends `req` again; then send [`Self::request_bytes`].
    pub fn restart(&mut self, req: Request, now: Instant) -> Result<(), ClientError> {
        self.signer.forget();
        self.start(req, now)
    }

    /// Handles a message received from the server (a datagram, or a frame of a stream).
    pub fn on_message(&mut self, data: &[u8], now: Instant) -> Progress {
        let Some(txn) = &self.txn else { return Progress::Ignored };
        let Ok(msg) = Message::parse(data) else { return Progress::Ignored };
        if msg.transaction_id() != txn.tid || msg.method() != txn.req.method() {
            return Progress::Ignored;
        }
        let req = txn.req;
        match msg.class() {
            Class::SuccessResponse => {
                self.txn = None;
                let signed = msg.has_message_integrity() || msg.has_message_integrity_sha256();
                if signed && (!self.signer.ready() || !self.signer.verify(&msg)) {
                    return Progress::Failed(ClientError::BadIntegrity { request: req.name() });
                }
                let reply = Reply::of(&msg);
                if req.is_allocate() && reply.relayed.is_none() {
                    return Progress::Failed(ClientError::NoRelayedAddress);
                }
                Progress::Done(reply)
            }
            Class::ErrorResponse => {
                let (code, reason) =
                    error_code(&msg).unwrap_or_else(|| (0, String::from("(no ERROR-CODE)")));
                self.on_error(req, code, reason, &msg, now)
            }
            _ => Progress::Ignored,
        }
    }

    fn on_error(
        &mut self,
        req: Request,
        code: u16,
        reason: String,
        msg: &Message<'_>,
        now: Instant,
    ) -> Progress {
        let fail = |this: &mut Self, e: ClientError| {
            this.txn = None;
            Progress::Failed(e)
        };
        let request = req.name();
        match code {
            401 | 438 => {
                let rounds = self.txn.as_ref().map_or(0, |t| t.auth_rounds);
                let signed = self.signer.ready();
                if code == 401 && signed && rounds > 0 {
                    return fail(self, ClientError::CredentialsRejected { request, reason });
                }
                if rounds >= MAX_AUTH_ROUNDS {
                    return fail(self, ClientError::StaleNonceLoop { request, reason });
                }
                if msg.get(attr::NONCE).is_none() {
                    return fail(self, ClientError::Incomplete { request, code, missing: "NONCE" });
                }
                if msg.get(attr::REALM).is_none() && self.signer.realm().is_none() {
                    return fail(self, ClientError::Incomplete { request, code, missing: "REALM" });
                }
                self.signer.learn(msg);
                if let (Some(expected), Some(server)) =
                    (&self.signer.credentials().realm, self.signer.realm())
                    && expected != server
                {
                    let e = ClientError::RealmMismatch {
                        server: server.to_owned(),
                        expected: expected.clone(),
                    };
                    return fail(self, e);
                }
                let tid = self.next_tid();
                let due = self.due(now);
                if let Some(t) = &mut self.txn {
                    t.tid = tid;
                    t.tries = 1;
                    t.auth_rounds += 1;
                    t.deadline = due;
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
            437 if req.is_allocate() && self.stats.rebinds < MAX_REBINDS => {
                self.txn = None;
                self.stats.rebinds += 1;
                Progress::Rebind
            }
            _ => fail(self, ClientError::Refused { request, code, reason }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
    use super::*;
    use crate::credentials::{PasswordAlgorithm, long_term_key};

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
        let mut f = Client::new(3, 0, creds());
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
        assert!(matches!(f.on_message(&e401, now), Progress::Send));
        let second = f.request_bytes().to_vec();
        let m = Message::parse(&second).unwrap();
        assert_ne!(m.transaction_id(), first_tid);
        assert_eq!(m.get(attr::USERNAME), Some(&b"bench"[..]));
        assert_eq!(m.get(attr::NONCE), Some(&b"n1"[..]));
        let key = long_term_key(PasswordAlgorithm::Md5, "bench", "bench", "bench");
        assert!(m.verify_message_integrity(key.as_bytes()));
        // A stale answer to the first transaction is ignored.
        assert!(matches!(f.on_message(&e401, now), Progress::Ignored));
        let relayed: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        let ok = answer(&second, Class::SuccessResponse, |e| {
            e.xor_address(attr::XOR_RELAYED_ADDRESS, relayed).unwrap();
            e.u32(attr::LIFETIME, 600).unwrap();
            e.message_integrity(key.as_bytes()).unwrap();
        });
        match f.on_message(&ok, now) {
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
        let mut f = Client::new(0, 0, creds());
        f.start(Request::Allocate, now).unwrap();
        let e401 = |req: &[u8]| {
            answer(req, Class::ErrorResponse, |e| {
                e.error_code(401, "Unauthorized").unwrap();
                e.raw(attr::REALM, b"bench").unwrap();
                e.raw(attr::NONCE, b"n1").unwrap();
            })
        };
        let r = e401(f.request_bytes());
        assert!(matches!(f.on_message(&r, now), Progress::Send));
        let e438 = answer(f.request_bytes(), Class::ErrorResponse, |e| {
            e.error_code(438, "Stale Nonce").unwrap();
            e.raw(attr::REALM, b"bench").unwrap();
            e.raw(attr::NONCE, b"n2").unwrap();
        });
        assert!(matches!(f.on_message(&e438, now), Progress::Send));
        assert_eq!(Message::parse(f.request_bytes()).unwrap().get(attr::NONCE), Some(&b"n2"[..]));
        // 401 to an authenticated request: the credentials are wrong.
        let r = e401(f.request_bytes());
        match f.on_message(&r, now) {
            Progress::Failed(e) => assert!(e.to_string().contains("credentials rejected"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert!(f.current().is_none());
    }

    #[test]
    fn realm_mismatch_is_reported() {
        let now = Instant::now();
        let c = Arc::new(Credentials::new("bench", "bench", Some("other")).unwrap());
        let mut f = Client::new(0, 0, c);
        f.start(Request::Allocate, now).unwrap();
        let r = answer(f.request_bytes(), Class::ErrorResponse, |e| {
            e.error_code(401, "Unauthorized").unwrap();
            e.raw(attr::REALM, b"bench").unwrap();
            e.raw(attr::NONCE, b"n").unwrap();
        });
        match f.on_message(&r, now) {
            Progress::Failed(e) => assert!(e.to_string().contains("realm"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retransmits_then_gives_up_naming_the_step() {
        let t0 = Instant::now();
        let mut f = Client::new(0, 0, creds());
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
        let mut f = Client::new(0, 0, creds());
        f.start(Request::Allocate, now).unwrap();
        let r = answer(f.request_bytes(), Class::ErrorResponse, |e| {
            e.error_code(486, "Allocation Quota Reached").unwrap();
        });
        match f.on_message(&r, now) {
            Progress::Failed(e) => assert!(e.to_string().contains("486"), "{e}"),
            other => panic!("{other:?}"),
        }
        f.start(Request::Refresh { lifetime: 0 }, now).unwrap();
        let r = answer(f.request_bytes(), Class::ErrorResponse, |e| {
            e.error_code(437, "Allocation Mismatch").unwrap();
        });
        assert!(matches!(f.on_message(&r, now), Progress::Done(_)));
        // 437 to Allocate: move to a new source port, a bounded number of times.
        for _ in 0..MAX_REBINDS {
            f.restart(Request::Allocate, now).unwrap();
            let r = answer(f.request_bytes(), Class::ErrorResponse, |e| {
                e.error_code(437, "Mismatched allocation\0").unwrap();
            });
            assert!(matches!(f.on_message(&r, now), Progress::Rebind));
        }
        f.restart(Request::Allocate, now).unwrap();
        let r = answer(f.request_bytes(), Class::ErrorResponse, |e| {
            e.error_code(437, "Mismatched allocation\0").unwrap();
        });
        match f.on_message(&r, now) {
            Progress::Failed(e) => {
                assert!(e.to_string().ends_with("437 Mismatched allocation"), "{e:?}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(f.stats.rebinds, MAX_REBINDS);
        // ChannelData and garbage are ignored.
        f.start(Request::Allocate, now).unwrap();
        assert!(matches!(f.on_message(&[0x40, 0, 0, 0], now), Progress::Ignored));
    }

    #[test]
    fn channel_bind_encoding() {
        let now = Instant::now();
        let mut f = Client::new(0, 0, creds());
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
