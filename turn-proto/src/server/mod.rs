//! The TURN server state machine (RFC 8656 over UDP, RFC 8489 long-term
//! credentials).
//!
//! A [`Server`] owns one allocation table and is driven by its caller:
//!
//! * [`Server::handle_client_datagram`] for every datagram a listener
//!   socket receives (STUN or ChannelData);
//! * [`Server::handle_peer_datagram`] for every datagram a relay socket
//!   receives;
//! * [`Server::poll_timeout`] / [`Server::handle_timeout`] for expiry;
//! * [`Server::poll_event`] for log-worthy events.
//!
//! Each handler returns an [`Output`] telling the caller what to send.
//! Relay sockets and quotas are provided by the caller through
//! [`RelayAllocator`] and [`Quota`].

mod cache;
mod config;
mod counters;
mod host;
mod limiter;
mod replay;
mod table;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

pub use config::{ConfigError, ServerConfig};
pub use counters::{Counters, DropReason};
pub use host::{
    LocalQuota, Quota, QuotaExceeded, RelayAllocator, RelayError, RelayId, RelayRequest, Unlimited,
};
pub use table::{Allocation, ChannelBinding, FiveTuple, Permission, RelaySocket};

use crate::channel_data::{self, ChannelData};
use crate::credentials::{CredentialStore, Identity, Key, PasswordAlgorithm};
use crate::nonce::{NonceCheck, NonceMinter, SecurityFeatures};
use crate::stun::attr::{self, Attribute};
use crate::stun::message::pad4;
use crate::stun::{
    AttrList, Class, EncodeError, Family, HEADER_LEN, MAGIC_COOKIE, Message, MessageEncoder,
    Method, TransactionId,
};
use cache::RetransmitCache;
use table::{Table, family_index};

/// Bytes the caller must leave free *before* a peer datagram in the buffer
/// given to [`Server::handle_peer_datagram`]: room for a Data indication
/// header with an IPv6 XOR-PEER-ADDRESS (20 + 24 + 4).
pub const PEER_HEADROOM: usize = 48;
/// Bytes the caller must leave free *after* a peer datagram: padding of the
/// DATA attribute.
pub const PEER_TAILROOM: usize = 3;
/// Recommended size of the `out` buffer of
/// [`Server::handle_client_datagram`]; responses are far smaller.
pub const RECOMMENDED_OUT_LEN: usize = 2048;

/// What the caller must do after a `handle_*` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output<'a> {
    /// Nothing to send (answered nothing, or a counted drop).
    None,
    /// Send `data` to `client` from the listener socket bound to `listener`.
    ToClient {
        /// Destination.
        client: SocketAddr,
        /// Local listener address to send from.
        listener: SocketAddr,
        /// The bytes (in the caller's `out` buffer, or in the peer buffer
        /// for peer data).
        data: &'a [u8],
    },
    /// Send `data` to `peer` from relay socket `relay`. `data` is a
    /// sub-slice of the client datagram (no copy).
    ToPeer {
        /// Relay socket.
        relay: RelayId,
        /// Destination peer.
        peer: SocketAddr,
        /// Payload.
        data: &'a [u8],
        /// Set the DF bit (Send indication with DONT-FRAGMENT).
        dont_fragment: bool,
    },
}

/// Why an allocation went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteReason {
    /// Its lifetime ran out.
    Expired,
    /// Refresh with LIFETIME 0.
    ClientRequest,
    /// [`Server::release_all`].
    Shutdown,
}

/// Log-worthy events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An allocation was created.
    AllocationCreated {
        /// Its 5-tuple.
        five_tuple: FiveTuple,
        /// Username.
        username: Box<str>,
        /// Relayed addresses `[IPv4, IPv6]`.
        relays: [Option<RelaySocket>; 2],
        /// Granted lifetime.
        lifetime_secs: u32,
    },
    /// An allocation was refreshed.
    AllocationRefreshed {
        /// Its 5-tuple.
        five_tuple: FiveTuple,
        /// Username.
        username: Box<str>,
        /// New lifetime.
        lifetime_secs: u32,
    },
    /// An allocation was deleted; its relays and quota were released.
    AllocationDeleted {
        /// Its 5-tuple.
        five_tuple: FiveTuple,
        /// Username.
        username: Box<str>,
        /// Why.
        reason: DeleteReason,
    },
}

/// Which integrity attribute signs a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IntegrityKind {
    Sha1,
    Sha256,
}

/// A successfully authenticated request.
#[derive(Debug, Clone, Copy)]
struct Auth<'a> {
    identity: Identity<'a>,
    key: Key,
    kind: IntegrityKind,
    /// When the request's nonce was issued (UNIX seconds).
    nonce_issued: u64,
}

/// Why authentication failed (RFC 8489 §9.2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rejection {
    /// 401 with REALM, NONCE, PASSWORD-ALGORITHMS.
    Unauthenticated,
    /// 400 without credentials attributes.
    BadRequest,
    /// 438 with a fresh NONCE.
    StaleNonce,
}

/// Successful TURN request outcomes, encoded by `write_reply`.
#[derive(Debug, Clone, Copy)]
enum Reply {
    Allocate {
        relayed: [Option<SocketAddr>; 2],
        lifetime_secs: u32,
        mapped: SocketAddr,
        address_error: Option<(Family, u16)>,
    },
    Refresh {
        lifetime_secs: u32,
    },
    Empty,
}

/// A TURN request failure: an error code, or 420 with the unknown types.
#[derive(Debug, Clone, Copy)]
enum TurnError {
    Code(u16),
    Unknown(AttrList<16>),
}

const BAD_REQUEST: TurnError = TurnError::Code(400);

/// Standard reason phrases.
pub fn reason_phrase(code: u16) -> &'static str {
    match code {
        300 => "Try Alternate",
        400 => "Bad Request",
        401 => "Unauthenticated",
        403 => "Forbidden",
        420 => "Unknown Attribute",
        437 => "Allocation Mismatch",
        438 => "Stale Nonce",
        440 => "Address Family not Supported",
        441 => "Wrong Credentials",
        442 => "Unsupported Transport Protocol",
        443 => "Peer Address Family Mismatch",
        486 => "Allocation Quota Reached",
        500 => "Server Error",
        508 => "Insufficient Capacity",
        _ => "Error",
    }
}

/// How a response is signed.
#[derive(Debug, Clone, Copy)]
struct Signer {
    method: Method,
    txid: TransactionId,
    integrity: Option<(Key, IntegrityKind)>,
    fingerprint: bool,
}

/// The sans-IO TURN server. Single-threaded: each daemon worker owns one.
pub struct Server {
    cfg: ServerConfig,
    creds: CredentialStore,
    nonces: NonceMinter,
    /// Encoded PASSWORD-ALGORITHMS value (empty: negotiation disabled).
    password_algorithms: Vec<u8>,
    /// Key an unknown username is checked against, so that it costs a known one's work.
    decoy_key: Key,
    table: Table,
    cache: RetransmitCache,
    /// 5-tuples whose allocation ended recently (replayed Allocates, see `replay.rs`).
    tombstones: replay::Tombstones,
    /// Unauthenticated responses (401, 400, 438) per source address.
    unauthenticated: limiter::SourceLimiter,
    /// Failed authentications per source address.
    failed_auth: limiter::SourceLimiter,
    /// The last (monotonic, wall) time pair seen, to date events that come without a
    /// wall time (expiry).
    wall: Option<(Instant, u64)>,
    events: VecDeque<Event>,
    counters: Counters,
    rng: u64,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("realm", &self.cfg.realm)
            .field("allocations", &self.table.len())
            .finish_non_exhaustive()
    }
}

fn secs(s: u32) -> Duration {
    Duration::from_secs(u64::from(s))
}

impl Server {
    /// Build a server from a configuration.
    pub fn new(cfg: ServerConfig) -> Result<Server, ConfigError> {
        cfg.validate()?;
        let creds = CredentialStore::new(&cfg.realm, &cfg.credentials)?;
        let mut password_algorithms = Vec::new();
        for alg in &cfg.password_algorithms {
            password_algorithms.extend_from_slice(&alg.code().to_be_bytes());
            password_algorithms.extend_from_slice(&[0, 0]);
        }
        let features = if cfg.password_algorithms.is_empty() && !cfg.username_anonymity {
            None
        } else {
            Some(SecurityFeatures {
                password_algorithms: !cfg.password_algorithms.is_empty(),
                username_anonymity: cfg.username_anonymity,
            })
        };
        let nonces = NonceMinter::new(cfg.nonce_secret, cfg.nonce_lifetime_secs, features);
        Ok(Server {
            table: Table::new(secs(cfg.channel_holddown_secs)),
            cache: RetransmitCache::new(
                cfg.retransmit_cache_entries,
                secs(cfg.retransmit_cache_ttl_secs),
            ),
            tombstones: replay::Tombstones::new(cfg.replay_tombstones, cfg.nonce_lifetime_secs),
            unauthenticated: limiter::SourceLimiter::new(
                cfg.source_limit_slots,
                cfg.unauthenticated_responses_per_sec,
                cfg.unauthenticated_responses_burst,
                cfg.seed ^ 0x51ed_270b_27c1_4a57,
            ),
            failed_auth: limiter::SourceLimiter::new(
                cfg.source_limit_slots,
                cfg.failed_auth_per_sec,
                cfg.failed_auth_burst,
                cfg.seed ^ 0x2545_f491_4f6c_dd1d,
            ),
            wall: None,
            events: VecDeque::new(),
            counters: Counters::default(),
            rng: cfg.seed ^ 0x9E37_79B9_7F4A_7C15,
            creds,
            nonces,
            password_algorithms,
            decoy_key: crate::credentials::long_term_key(
                PasswordAlgorithm::Md5,
                "",
                &cfg.realm,
                &format!("{:x}", cfg.seed),
            ),
            cfg,
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    /// Statistics.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Live allocations.
    pub fn allocation_count(&self) -> usize {
        self.table.len()
    }

    /// Look up the allocation of a 5-tuple (for diagnostics and tests).
    pub fn allocation(&self, five_tuple: &FiveTuple) -> Option<&Allocation> {
        self.table.get(self.table.index_of(five_tuple)?)
    }

    /// Next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be
    /// called: one deadline for the whole table.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.table.next_deadline()
    }

    /// Number of entries in the deadline heap (bounded by live state).
    pub fn timer_entries(&self) -> usize {
        self.table.timer_entries()
    }

    fn push_event(&mut self, e: Event) {
        if self.cfg.event_queue_capacity == 0 {
            self.counters.events_dropped += 1;
            return;
        }
        if self.events.len() >= self.cfg.event_queue_capacity {
            self.events.pop_front();
            self.counters.events_dropped += 1;
        }
        self.events.push_back(e);
    }

    fn next_txid(&mut self) -> TransactionId {
        // splitmix64
        let mut out = [0u8; 12];
        for chunk in out.chunks_mut(6) {
            self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_be_bytes()[..6]);
        }
        TransactionId(out)
    }

    /// Expire allocations, permissions and channels due at `now`; releases
    /// relays and quota of expired allocations.
    pub fn handle_timeout<R, Q>(&mut self, now: Instant, relays: &mut R, quota: &Q)
    where
        R: RelayAllocator + ?Sized,
        Q: Quota + ?Sized,
    {
        let holddown = secs(self.cfg.channel_holddown_secs);
        while let Some(idx) = self.table.pop_due(now) {
            let expired = self.table.get(idx).is_some_and(|a| a.expires_at <= now);
            if expired {
                self.delete_allocation(idx, DeleteReason::Expired, Some(now), relays, quota);
                continue;
            }
            if let Some(a) = self.table.get_mut(idx) {
                a.prune(now, holddown);
            }
            self.table.reschedule(idx);
        }
        self.table.trim_stale();
    }

    /// Delete every allocation, releasing relays and quota (shutdown).
    pub fn release_all<R, Q>(&mut self, relays: &mut R, quota: &Q)
    where
        R: RelayAllocator + ?Sized,
        Q: Quota + ?Sized,
    {
        for idx in self.table.live_indices() {
            self.delete_allocation(idx, DeleteReason::Shutdown, None, relays, quota);
        }
        self.table.trim_stale();
    }

    /// The wall time (UNIX seconds) at monotonic time `now`, from the last pair seen.
    fn wall_at(&self, now: Instant) -> u64 {
        self.wall.map_or(0, |(at, unix)| unix + now.saturating_duration_since(at).as_secs())
    }

    /// Deletes allocation `idx`; `ended` (None at shutdown) dates its tombstone.
    fn delete_allocation<R, Q>(
        &mut self,
        idx: u32,
        reason: DeleteReason,
        ended: Option<Instant>,
        relays: &mut R,
        quota: &Q,
    ) where
        R: RelayAllocator + ?Sized,
        Q: Quota + ?Sized,
    {
        let Some(a) = self.table.remove(idx) else {
            return;
        };
        if let Some(now) = ended {
            let unix = self.wall_at(now);
            self.tombstones.record(a.five_tuple, unix);
        }
        for r in a.relays.iter().flatten() {
            relays.release(r.id);
        }
        quota.release(&a.quota_key);
        match reason {
            DeleteReason::Expired => self.counters.allocations_expired += 1,
            DeleteReason::ClientRequest => self.counters.allocations_deleted += 1,
            DeleteReason::Shutdown => {}
        }
        self.push_event(Event::AllocationDeleted {
            five_tuple: a.five_tuple,
            username: a.username,
            reason,
        });
    }

    /// Handle a datagram received from a client on a listener socket.
    ///
    /// * `now`: monotonic time; `unix_secs`: wall time (nonces, REST expiry).
    /// * `listener`: the local address it arrived on; `client`: its source.
    /// * `out`: where responses are written ([`RECOMMENDED_OUT_LEN`]).
    ///
    /// ChannelData and Send indications produce [`Output::ToPeer`] whose
    /// payload borrows `datagram`; requests produce [`Output::ToClient`]
    /// pointing into `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_client_datagram<'a, R, Q>(
        &mut self,
        now: Instant,
        unix_secs: u64,
        listener: SocketAddr,
        client: SocketAddr,
        datagram: &'a [u8],
        out: &'a mut [u8],
        relays: &mut R,
        quota: &Q,
    ) -> Output<'a>
    where
        R: RelayAllocator + ?Sized,
        Q: Quota + ?Sized,
    {
        let ft = FiveTuple { client, listener };
        match datagram.first().map(|b| b >> 6) {
            Some(0b01) => self.client_channel_data(now, ft, datagram),
            Some(0b00) => match Message::parse(datagram) {
                Ok(msg) => self.client_stun(now, unix_secs, ft, msg, out, relays, quota),
                Err(_) => self.dropped(DropReason::MalformedStun),
            },
            _ => self.dropped(DropReason::NotTurn),
        }
    }

    #[inline]
    fn dropped<'a>(&mut self, reason: DropReason) -> Output<'a> {
        self.counters.drop(reason);
        Output::None
    }

    /// RFC 8656 §12.4 (server receiving ChannelData from the client).
    #[inline]
    fn client_channel_data<'a>(
        &mut self,
        now: Instant,
        ft: FiveTuple,
        datagram: &'a [u8],
    ) -> Output<'a> {
        let Ok(cd) = ChannelData::parse(datagram) else {
            return self.dropped(DropReason::MalformedChannelData);
        };
        let Some(a) = self.table.index_of(&ft).and_then(|i| self.table.get(i)) else {
            return self.dropped(DropReason::NoAllocation);
        };
        if a.expires_at <= now {
            return self.dropped(DropReason::NoAllocation);
        }
        // "If the ChannelData message is received on a channel that is not
        // bound to any peer, then the message is silently discarded."
        let Some(ch) = a.active_channel(cd.channel, now) else {
            return self.dropped(DropReason::NoChannel);
        };
        let peer = ch.peer;
        // Relaying also requires a permission for the peer (RFC 8656 §9).
        if !a.has_permission(&peer.ip(), now) {
            return self.dropped(DropReason::NoPermission);
        }
        let Some(relay) = a.relay_for(Family::of(&peer.ip())) else {
            return self.dropped(DropReason::FamilyMismatch);
        };
        self.counters.to_peer += 1;
        Output::ToPeer { relay: relay.id, peer, data: cd.payload, dont_fragment: false }
    }

    #[allow(clippy::too_many_arguments)]
    fn client_stun<'a, R, Q>(
        &mut self,
        now: Instant,
        unix_secs: u64,
        ft: FiveTuple,
        msg: Message<'a>,
        out: &'a mut [u8],
        relays: &mut R,
        quota: &Q,
    ) -> Output<'a>
    where
        R: RelayAllocator + ?Sized,
        Q: Quota + ?Sized,
    {
        // Wall time for events that come without it (tombstones of expiring allocations):
        // noted on the control path only, not for every ChannelData.
        self.wall = Some((now, unix_secs));
        match (msg.class(), msg.method()) {
            (Class::Request, Method::BINDING) => self.binding(ft, &msg, out),
            (
                Class::Request,
                Method::ALLOCATE
                | Method::REFRESH
                | Method::CREATE_PERMISSION
                | Method::CHANNEL_BIND,
            ) => self.turn_request(now, unix_secs, ft, &msg, out, relays, quota),
            (Class::Request, _) => {
                // Unknown method: 400 (RFC 8489 §6.3.1).
                self.counters.requests += 1;
                let signer = self.unsigned(&msg);
                self.reject(now, unix_secs, ft, &signer, Rejection::BadRequest, out)
            }
            (Class::Indication, Method::SEND) => self.send_indication(now, ft, &msg),
            (Class::Indication, Method::BINDING) => self.dropped(DropReason::BindingIndication),
            (Class::Indication, _) => self.dropped(DropReason::UnknownIndication),
            _ => self.dropped(DropReason::UnexpectedClass),
        }
    }

    fn unsigned(&self, msg: &Message<'_>) -> Signer {
        Signer {
            method: msg.method(),
            txid: msg.transaction_id(),
            integrity: None,
            fingerprint: msg.has_fingerprint(),
        }
    }

    fn respond<'a>(
        &mut self,
        ft: FiveTuple,
        out: &'a mut [u8],
        r: Result<usize, EncodeError>,
    ) -> Output<'a> {
        match r {
            Ok(n) => {
                let out: &'a [u8] = out;
                // Count error responses by their class bits.
                if out.len() >= 2 && out[0] & 0x01 == 0x01 && out[1] & 0x10 == 0x10 {
                    self.counters.error_responses += 1;
                }
                match out.get(..n) {
                    Some(data) => {
                        Output::ToClient { client: ft.client, listener: ft.listener, data }
                    }
                    None => self.dropped(DropReason::BufferTooSmall),
                }
            }
            Err(_) => self.dropped(DropReason::BufferTooSmall),
        }
    }

    /// Encode a response: `body`, then SOFTWARE (authenticated responses only: an
    /// unauthenticated request must not draw a response several times its size, and
    /// strangers need not learn the version), integrity and FINGERPRINT.
    fn write_response(
        &self,
        out: &mut [u8],
        signer: &Signer,
        class: Class,
        body: impl FnOnce(&mut MessageEncoder<'_>) -> Result<(), EncodeError>,
    ) -> Result<usize, EncodeError> {
        let mut enc = MessageEncoder::new(out, signer.method, class, &signer.txid)?;
        body(&mut enc)?;
        if let Some(sw) = &self.cfg.software
            && signer.integrity.is_some()
        {
            enc.raw(attr::SOFTWARE, sw.as_bytes())?;
        }
        match signer.integrity {
            Some((key, IntegrityKind::Sha1)) => enc.message_integrity(key.as_bytes())?,
            Some((key, IntegrityKind::Sha256)) => enc.message_integrity_sha256(key.as_bytes())?,
            None => {}
        }
        if signer.fingerprint {
            enc.fingerprint()?;
        }
        Ok(enc.finish())
    }

    fn write_error(
        &self,
        out: &mut [u8],
        signer: &Signer,
        code: u16,
        extra: impl FnOnce(&mut MessageEncoder<'_>) -> Result<(), EncodeError>,
    ) -> Result<usize, EncodeError> {
        self.write_response(out, signer, Class::ErrorResponse, |enc| {
            enc.error_code(code, reason_phrase(code))?;
            extra(enc)
        })
    }

    /// RFC 8489 §6.3.1: Binding requests are answered without
    /// authentication with the client's reflexive address.
    fn binding<'a>(&mut self, ft: FiveTuple, msg: &Message<'a>, out: &'a mut [u8]) -> Output<'a> {
        self.counters.requests += 1;
        self.counters.binding_requests += 1;
        let signer = self.unsigned(msg);
        let unknown = msg.unknown_comprehension_required::<16>();
        let r = if unknown.is_empty() {
            self.write_response(out, &signer, Class::SuccessResponse, |enc| {
                enc.xor_address(attr::XOR_MAPPED_ADDRESS, ft.client)
            })
        } else {
            self.write_error(out, &signer, 420, |enc| enc.unknown_attributes(unknown.as_slice()))
        };
        self.respond(ft, out, r)
    }

    /// Long-term credential checks, in the order of RFC 8489 §9.2.4.
    fn authenticate<'a>(
        &mut self,
        msg: &Message<'a>,
        client: SocketAddr,
        now: Instant,
        unix_secs: u64,
    ) -> Result<Auth<'a>, Rejection> {
        let has_mi = msg.has_message_integrity();
        let has_mi256 = msg.has_message_integrity_sha256();
        // §9.2.4: "If the message does not contain a MESSAGE-INTEGRITY or
        // MESSAGE-INTEGRITY-SHA256 attribute, the server MUST generate an
        // error response with an error code of 401".
        if !has_mi && !has_mi256 {
            self.counters.auth_challenges += 1;
            return Err(Rejection::Unauthenticated);
        }
        // "... but is missing either the USERNAME or USERHASH, REALM, or
        // NONCE attribute, the server MUST generate ... 400".
        let username = msg.get(attr::USERNAME);
        let userhash = msg.get(attr::USERHASH);
        let (Some(realm), Some(nonce)) = (msg.get(attr::REALM), msg.get(attr::NONCE)) else {
            return Err(Rejection::BadRequest);
        };
        if username.is_none() && userhash.is_none() {
            return Err(Rejection::BadRequest);
        }
        // "If the NONCE attribute starts with the 'nonce cookie' with the
        // STUN Security Feature 'Password algorithms' bit set to 1 ..."
        let mut algorithm = PasswordAlgorithm::Md5;
        let mut negotiated = false;
        if SecurityFeatures::from_nonce(nonce).is_some_and(|f| f.password_algorithms) {
            match (msg.get(attr::PASSWORD_ALGORITHMS), msg.get(attr::PASSWORD_ALGORITHM)) {
                // "... neither ... then the request is processed as though
                // PASSWORD-ALGORITHM were MD5."
                (None, None) => {}
                // "Otherwise, unless (1) both are present, (2)
                // PASSWORD-ALGORITHMS matches the value sent [by us], and (3)
                // PASSWORD-ALGORITHM matches one of the entries ... 400."
                (Some(list), Some(chosen)) => {
                    if list != self.password_algorithms.as_slice() {
                        return Err(Rejection::BadRequest);
                    }
                    let Ok(Attribute::PasswordAlgorithm(code, _)) =
                        Attribute::decode(attr::PASSWORD_ALGORITHM, chosen, &msg.transaction_id())
                    else {
                        return Err(Rejection::BadRequest);
                    };
                    let offered = self.cfg.password_algorithms.iter().any(|a| a.code() == code);
                    match PasswordAlgorithm::from_code(code) {
                        Some(a) if offered => algorithm = a,
                        _ => return Err(Rejection::BadRequest),
                    }
                    negotiated = true;
                }
                _ => return Err(Rejection::BadRequest),
            }
        }
        // A request for another realm cannot be verified: challenge again.
        if realm != self.cfg.realm.as_bytes() {
            self.auth_failed(client, now);
            return Err(Rejection::Unauthenticated);
        }
        // "If the value of the USERNAME or USERHASH attribute is not valid,
        // ... 401".
        let identity = match (username, userhash) {
            (Some(u), _) => std::str::from_utf8(u)
                .ok()
                .filter(|u| u.len() <= attr::MAX_USERNAME_LEN)
                .and_then(|u| self.creds.by_username(u, unix_secs)),
            (None, Some(h)) => self.creds.by_userhash(h),
            (None, None) => None,
        };
        // "If the MESSAGE-INTEGRITY-SHA256 attribute is present, compute
        // [it] ... Otherwise ... MESSAGE-INTEGRITY ... [mismatch:] 401".
        let integrity_checks = &mut self.counters.integrity_checks;
        let mut verify = |k: &[u8]| {
            *integrity_checks += 1;
            if has_mi256 {
                msg.verify_message_integrity_sha256(k)
            } else {
                msg.verify_message_integrity(k)
            }
        };
        let Some(identity) = identity else {
            // An unknown user costs what a known one with a wrong password costs (one
            // key derivation and one integrity check), so that response times do not
            // tell which usernames exist.
            let _ = verify(self.decoy_key.as_bytes());
            self.auth_failed(client, now);
            return Err(Rejection::Unauthenticated);
        };
        let key = self.creds.find_key(identity, algorithm, verify);
        let Some(key) = key else {
            self.auth_failed(client, now);
            return Err(Rejection::Unauthenticated);
        };
        // "If the NONCE is no longer valid, ... 438 (Stale Nonce)."
        let NonceCheck::Valid { issued: nonce_issued } =
            self.nonces.check(nonce, unix_secs, client)
        else {
            self.counters.stale_nonces += 1;
            return Err(Rejection::StaleNonce);
        };
        // "Any response generated by the server MUST include the
        // MESSAGE-INTEGRITY-SHA256 attribute ... unless the request was
        // processed as though PASSWORD-ALGORITHM was MD5 [legacy], [then]
        // MESSAGE-INTEGRITY". A legacy request that only carries
        // MESSAGE-INTEGRITY-SHA256 gets that back (mirroring the client).
        let kind = if negotiated || !has_mi { IntegrityKind::Sha256 } else { IntegrityKind::Sha1 };
        Ok(Auth { identity, key, kind, nonce_issued })
    }

    /// Counts a failed authentication against its source (password guessing).
    fn auth_failed(&mut self, client: SocketAddr, now: Instant) {
        self.counters.auth_failures += 1;
        let _ = self.failed_auth.allow(&client.ip(), now);
    }

    /// Answers an unauthenticated or failed request (401, 400, 438), unless its source
    /// already drew its share of such answers.
    fn reject<'a>(
        &mut self,
        now: Instant,
        unix_secs: u64,
        ft: FiveTuple,
        signer: &Signer,
        rej: Rejection,
        out: &'a mut [u8],
    ) -> Output<'a> {
        if !self.unauthenticated.allow(&ft.client.ip(), now) {
            self.counters.rate_limited_responses += 1;
            return self.dropped(DropReason::RateLimited);
        }
        let r = self.write_rejection(out, signer, rej, ft, unix_secs);
        self.respond(ft, out, r)
    }

    fn write_rejection(
        &self,
        out: &mut [u8],
        signer: &Signer,
        rej: Rejection,
        ft: FiveTuple,
        unix_secs: u64,
    ) -> Result<usize, EncodeError> {
        let code = match rej {
            Rejection::BadRequest => return self.write_error(out, signer, 400, |_| Ok(())),
            Rejection::Unauthenticated => 401,
            Rejection::StaleNonce => 438,
        };
        // After the 5-tuple's tombstone, if any, so that a real client's retry is taken.
        let nonce = self.nonces.issue(self.tombstones.nonce_time(&ft, unix_secs), ft.client);
        self.write_error(out, signer, code, |enc| {
            enc.raw(attr::REALM, self.cfg.realm.as_bytes())?;
            enc.raw(attr::NONCE, nonce.as_bytes())?;
            if !self.password_algorithms.is_empty() {
                enc.raw(attr::PASSWORD_ALGORITHMS, &self.password_algorithms)?;
            }
            Ok(())
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn turn_request<'a, R, Q>(
        &mut self,
        now: Instant,
        unix_secs: u64,
        ft: FiveTuple,
        msg: &Message<'a>,
        out: &'a mut [u8],
        relays: &mut R,
        quota: &Q,
    ) -> Output<'a>
    where
        R: RelayAllocator + ?Sized,
        Q: Quota + ?Sized,
    {
        self.counters.requests += 1;
        let txid = msg.transaction_id();
        // Retransmission: answer with the very same bytes.
        if let Some(bytes) = self.cache.get(&ft, &txid, now) {
            let n = bytes.len();
            if let Some(dst) = out.get_mut(..n) {
                dst.copy_from_slice(bytes);
                self.counters.retransmits_answered += 1;
                return self.respond(ft, out, Ok(n));
            }
            return self.dropped(DropReason::BufferTooSmall);
        }
        let mut signer = self.unsigned(msg);
        // A source that keeps failing authentication is not even verified for a while.
        let signed = msg.has_message_integrity() || msg.has_message_integrity_sha256();
        if signed && self.failed_auth.exhausted(&ft.client.ip(), now) {
            self.counters.rate_limited_auth += 1;
            return self.dropped(DropReason::AuthThrottled);
        }
        let auth = match self.authenticate(msg, ft.client, now, unix_secs) {
            Ok(a) => a,
            Err(rej) => return self.reject(now, unix_secs, ft, &signer, rej, out),
        };
        // A replayed Allocate for a 5-tuple whose allocation ended since its nonce was
        // issued: 438 with a nonce from after the end (see `replay.rs`).
        if msg.method() == Method::ALLOCATE
            && self.table.index_of(&ft).is_none()
            && self.tombstones.refuses(&ft, auth.nonce_issued)
        {
            self.counters.replays_refused += 1;
            return self.reject(now, unix_secs, ft, &signer, Rejection::StaleNonce, out);
        }
        signer.integrity = Some((auth.key, auth.kind));
        // RFC 8489 §6.3.1: unknown comprehension-required attributes -> 420.
        let unknown = msg.unknown_comprehension_required::<16>();
        let result = if !unknown.is_empty() {
            Err(TurnError::Unknown(unknown))
        } else {
            match msg.method() {
                Method::ALLOCATE => self.allocate(now, ft, msg, &auth, relays, quota),
                Method::REFRESH => self.refresh(now, ft, msg, &auth, relays, quota),
                Method::CREATE_PERMISSION => self.create_permission(now, ft, msg, &auth),
                _ => self.channel_bind(now, ft, msg, &auth),
            }
        };
        let r = self.write_reply(out, &signer, result);
        if let Some(bytes) = r.ok().and_then(|n| out.get(..n)) {
            self.cache.insert(ft, txid, now, bytes);
        }
        self.respond(ft, out, r)
    }

    fn write_reply(
        &mut self,
        out: &mut [u8],
        signer: &Signer,
        result: Result<Reply, TurnError>,
    ) -> Result<usize, EncodeError> {
        match result {
            Ok(Reply::Allocate { relayed, lifetime_secs, mapped, address_error }) => self
                .write_response(out, signer, Class::SuccessResponse, |enc| {
                    for r in relayed.iter().flatten() {
                        enc.xor_address(attr::XOR_RELAYED_ADDRESS, *r)?;
                    }
                    enc.u32(attr::LIFETIME, lifetime_secs)?;
                    if let Some((family, code)) = address_error {
                        enc.address_error_code(family, code, reason_phrase(code))?;
                    }
                    enc.xor_address(attr::XOR_MAPPED_ADDRESS, mapped)
                }),
            Ok(Reply::Refresh { lifetime_secs }) => {
                self.write_response(out, signer, Class::SuccessResponse, |enc| {
                    enc.u32(attr::LIFETIME, lifetime_secs)
                })
            }
            Ok(Reply::Empty) => {
                self.write_response(out, signer, Class::SuccessResponse, |_| Ok(()))
            }
            Err(TurnError::Code(code)) => self.write_error(out, signer, code, |_| Ok(())),
            Err(TurnError::Unknown(list)) => {
                self.write_error(out, signer, 420, |enc| enc.unknown_attributes(list.as_slice()))
            }
        }
    }

    /// Lifetime rule of RFC 8656 §7.2 / §7.3: min(requested, max), but at
    /// least the default.
    fn granted_lifetime(&self, requested: Option<u32>) -> u32 {
        let default = self.cfg.default_allocation_lifetime_secs;
        match requested {
            Some(r) => r.min(self.cfg.max_allocation_lifetime_secs).max(default),
            None => default,
        }
    }

    fn family_enabled(&self, f: Family) -> bool {
        match f {
            Family::V4 => self.cfg.relay_ipv4,
            Family::V6 => self.cfg.relay_ipv6,
        }
    }

    /// Find the allocation of an authenticated non-Allocate request:
    /// 437 if none (RFC 8656 §5), 441 if another user created it.
    fn owned_allocation(
        &self,
        ft: &FiveTuple,
        now: Instant,
        auth: &Auth<'_>,
    ) -> Result<u32, TurnError> {
        let idx = self.table.index_of(ft).ok_or(TurnError::Code(437))?;
        let a = self.table.get(idx).ok_or(TurnError::Code(437))?;
        if a.expires_at <= now {
            return Err(TurnError::Code(437));
        }
        if *a.username != *self.creds.name(auth.identity) {
            return Err(TurnError::Code(441));
        }
        Ok(idx)
    }

    /// RFC 8656 §7.2, Receiving an Allocate Request.
    fn allocate<R, Q>(
        &mut self,
        now: Instant,
        ft: FiveTuple,
        msg: &Message<'_>,
        auth: &Auth<'_>,
        relays: &mut R,
        quota: &Q,
    ) -> Result<Reply, TurnError>
    where
        R: RelayAllocator + ?Sized,
        Q: Quota + ?Sized,
    {
        let txid = msg.transaction_id();
        // An allocation whose lifetime ran out but whose timer has not
        // fired yet is gone for every purpose.
        if let Some(idx) = self.table.index_of(&ft)
            && self.table.get(idx).is_some_and(|a| a.expires_at <= now)
        {
            self.delete_allocation(idx, DeleteReason::Expired, Some(now), relays, quota);
        }
        let username = self.creds.name(auth.identity);
        // Step 2: "checks if the 5-tuple is currently in use by an existing
        // allocation. If yes, the server rejects the request with a 437".
        // A retransmission of the request that created it gets the same
        // success back (the cache normally answers it first).
        if let Some(idx) = self.table.index_of(&ft) {
            return match self.table.get(idx) {
                Some(a)
                    if a.allocate_txid == txid
                        && *a.username == *username
                        && a.expires_at > now =>
                {
                    Ok(Reply::Allocate {
                        relayed: [a.relays[0].map(|r| r.addr), a.relays[1].map(|r| r.addr)],
                        lifetime_secs: remaining_secs(a.expires_at, now),
                        mapped: ft.client,
                        address_error: a.address_error,
                    })
                }
                _ => Err(TurnError::Code(437)),
            };
        }
        let tid = msg.transaction_id();
        let decode = |t| msg.get(t).map(|v| Attribute::decode(t, v, &tid));
        // Step 3: REQUESTED-TRANSPORT missing or malformed -> 400; not UDP -> 442.
        match decode(attr::REQUESTED_TRANSPORT) {
            Some(Ok(Attribute::RequestedTransport(attr::PROTOCOL_UDP))) => {}
            Some(Ok(Attribute::RequestedTransport(_))) => return Err(TurnError::Code(442)),
            _ => return Err(BAD_REQUEST),
        }
        // Step 4: DONT-FRAGMENT unsupported -> as an unknown
        // comprehension-required attribute (420).
        let dont_fragment = msg.has(attr::DONT_FRAGMENT);
        if dont_fragment && !self.cfg.dont_fragment {
            let mut l = AttrList::new();
            l.push(attr::DONT_FRAGMENT);
            return Err(TurnError::Unknown(l));
        }
        let even_port = match decode(attr::EVEN_PORT) {
            None => None,
            Some(Ok(Attribute::EvenPort(r))) => Some(r),
            Some(_) => return Err(BAD_REQUEST),
        };
        let requested_family = match decode(attr::REQUESTED_ADDRESS_FAMILY) {
            None => None,
            Some(Ok(Attribute::RequestedAddressFamily(f))) => Some(f),
            Some(_) => return Err(BAD_REQUEST),
        };
        let additional_family = match decode(attr::ADDITIONAL_ADDRESS_FAMILY) {
            None => None,
            Some(Ok(Attribute::AdditionalAddressFamily(f))) => Some(f),
            Some(_) => return Err(BAD_REQUEST),
        };
        // Step 5: RESERVATION-TOKEN with EVEN-PORT, REQUESTED- or
        // ADDITIONAL-ADDRESS-FAMILY -> 400; otherwise the token must be
        // valid, and since this server never hands out reservations no
        // token is: 508.
        if msg.has(attr::RESERVATION_TOKEN) {
            if even_port.is_some() || requested_family.is_some() || additional_family.is_some() {
                return Err(BAD_REQUEST);
            }
            return Err(TurnError::Code(508));
        }
        // Step 6: both REQUESTED- and ADDITIONAL-ADDRESS-FAMILY -> 400.
        if requested_family.is_some() && additional_family.is_some() {
            return Err(BAD_REQUEST);
        }
        // Step 7: unsupported or disabled family -> 440; absent -> IPv4.
        let primary = requested_family.unwrap_or(Family::V4);
        if additional_family.is_none() && !self.family_enabled(primary) {
            return Err(TurnError::Code(440));
        }
        // Step 8: EVEN-PORT with R=1 and ADDITIONAL-ADDRESS-FAMILY -> 400;
        // otherwise "if the server cannot satisfy the request" -> 508. This
        // server does not reserve the next port (R=1).
        if even_port == Some(true) {
            if additional_family.is_some() {
                return Err(BAD_REQUEST);
            }
            return Err(TurnError::Code(508));
        }
        let requested_lifetime = match decode(attr::LIFETIME) {
            None => None,
            Some(Ok(Attribute::Lifetime(l))) => Some(l),
            Some(_) => return Err(BAD_REQUEST),
        };
        // Step 9: ADDITIONAL-ADDRESS-FAMILY must be IPv6 (0x02) -> else 400.
        let dual = match additional_family {
            Some(Family::V4) => return Err(BAD_REQUEST),
            Some(Family::V6) => true,
            None => false,
        };
        if self.table.len() >= self.cfg.max_allocations {
            return Err(TurnError::Code(508));
        }
        // Step 10: "the server MAY choose to reject the request with a 486
        // (Allocation Quota Reached) error".
        let username: Box<str> = username.into();
        let quota_key: Box<str> = self.creds.quota_key(auth.identity).into();
        if quota.try_acquire(&quota_key).is_err() {
            self.counters.quota_rejections += 1;
            return Err(TurnError::Code(486));
        }
        let mut request = RelayRequest {
            family: primary,
            even_port: even_port == Some(false),
            dont_fragment,
            five_tuple: ft,
            username: &username,
        };
        let families: &[Family] =
            if dual { &[Family::V4, Family::V6] } else { std::slice::from_ref(&primary) };
        let mut granted: [Option<RelaySocket>; 2] = [None, None];
        let mut failures: [Option<u16>; 2] = [None, None];
        for &family in families {
            let i = family_index(family);
            if !self.family_enabled(family) {
                failures[i] = Some(440);
                continue;
            }
            request.family = family;
            match relays.allocate(&request) {
                Ok((id, addr)) => {
                    let clash = self.table.relay_in_use(&id)
                        || granted.iter().flatten().any(|r| r.id == id);
                    if clash {
                        // A daemon bug: never release an id we did not get.
                        self.counters.relay_id_collisions += 1;
                        failures[i] = Some(508);
                    } else {
                        granted[i] = Some(RelaySocket { id, addr });
                    }
                }
                Err(e) => {
                    self.counters.relay_failures += 1;
                    failures[i] = Some(match e {
                        RelayError::FamilyNotSupported => 440,
                        RelayError::InsufficientCapacity => 508,
                    });
                }
            }
        }
        if granted.iter().all(Option::is_none) {
            quota.release(&quota_key);
            // Both failed: 440 only if every family was unsupported.
            let code = if failures.iter().flatten().all(|&c| c == 440) { 440 } else { 508 };
            return Err(TurnError::Code(code));
        }
        // Step 9 (partial success): "it includes ADDRESS-ERROR-CODE
        // attribute in the success response".
        let address_error = if dual {
            [Family::V4, Family::V6]
                .into_iter()
                .find_map(|f| failures[family_index(f)].map(|c| (f, c)))
        } else {
            None
        };
        let lifetime_secs = self.granted_lifetime(requested_lifetime);
        let mut alloc = table::Allocation::new(
            ft,
            username.clone(),
            quota_key,
            granted,
            now + secs(lifetime_secs),
            txid,
        );
        alloc.address_error = address_error;
        alloc.dont_fragment = dont_fragment;
        self.table.insert(alloc);
        self.counters.allocations_created += 1;
        self.push_event(Event::AllocationCreated {
            five_tuple: ft,
            username,
            relays: granted,
            lifetime_secs,
        });
        Ok(Reply::Allocate {
            relayed: [granted[0].map(|r| r.addr), granted[1].map(|r| r.addr)],
            lifetime_secs,
            mapped: ft.client,
            address_error,
        })
    }

    /// RFC 8656 §7.3, Receiving a Refresh Request.
    fn refresh<R, Q>(
        &mut self,
        now: Instant,
        ft: FiveTuple,
        msg: &Message<'_>,
        auth: &Auth<'_>,
        relays: &mut R,
        quota: &Q,
    ) -> Result<Reply, TurnError>
    where
        R: RelayAllocator + ?Sized,
        Q: Quota + ?Sized,
    {
        let idx = self.owned_allocation(&ft, now, auth)?;
        let tid = msg.transaction_id();
        let requested_family = match msg.get(attr::REQUESTED_ADDRESS_FAMILY) {
            None => None,
            Some(v) => match Attribute::decode(attr::REQUESTED_ADDRESS_FAMILY, v, &tid) {
                Ok(Attribute::RequestedAddressFamily(f)) => Some(f),
                _ => return Err(BAD_REQUEST),
            },
        };
        let requested = match msg.get(attr::LIFETIME) {
            None => None,
            Some(v) => Some(attr::decode_u32(v).map_err(|_| BAD_REQUEST)?),
        };
        let Some(a) = self.table.get(idx) else {
            return Err(TurnError::Code(437));
        };
        // "If the server receives a Refresh Request with a
        // REQUESTED-ADDRESS-FAMILY attribute and the attribute value does
        // not match the address family of the allocation, the server MUST
        // reply with a 443".
        if let Some(f) = requested_family
            && a.relay_for(f).is_none()
        {
            return Err(TurnError::Code(443));
        }
        // "If the request contains a LIFETIME attribute and the attribute
        // value is zero, then the 'desired lifetime' is zero. Otherwise ...
        // min(requested, max) ... if greater than the default ... else the
        // default."
        let desired = match requested {
            Some(0) => 0,
            r => self.granted_lifetime(r),
        };
        if desired == 0 {
            // "If the 'desired lifetime' is zero, then the request succeeds
            // and the allocation is deleted." With REQUESTED-ADDRESS-FAMILY
            // on a dual allocation only that family's relay goes.
            let other_remains = requested_family
                .is_some_and(|f| a.relays.iter().flatten().any(|r| Family::of(&r.addr.ip()) != f));
            match requested_family {
                Some(f) if other_remains => {
                    if let Some(r) = self.table.remove_relay(idx, f) {
                        relays.release(r.id);
                    }
                }
                _ => self.delete_allocation(
                    idx,
                    DeleteReason::ClientRequest,
                    Some(now),
                    relays,
                    quota,
                ),
            }
            return Ok(Reply::Refresh { lifetime_secs: 0 });
        }
        // "If the 'desired lifetime' is non-zero, then the request succeeds
        // and the allocation's time-to-expiry is set to the 'desired
        // lifetime'."
        let username = a.username.clone();
        if let Some(a) = self.table.get_mut(idx) {
            a.expires_at = now + secs(desired);
        }
        self.table.reschedule(idx);
        self.counters.allocations_refreshed += 1;
        self.push_event(Event::AllocationRefreshed {
            five_tuple: ft,
            username,
            lifetime_secs: desired,
        });
        Ok(Reply::Refresh { lifetime_secs: desired })
    }

    /// RFC 8656 §9.2, Receiving a CreatePermission Request.
    fn create_permission(
        &mut self,
        now: Instant,
        ft: FiveTuple,
        msg: &Message<'_>,
        auth: &Auth<'_>,
    ) -> Result<Reply, TurnError> {
        let idx = self.owned_allocation(&ft, now, auth)?;
        let tid = msg.transaction_id();
        let cap = self.cfg.max_permissions_per_allocation;
        let Some(a) = self.table.get(idx) else {
            return Err(TurnError::Code(437));
        };
        // "The CreatePermission request MUST contain at least one
        // XOR-PEER-ADDRESS attribute ... If no such attribute exists, or if
        // any of these attributes are invalid, then a 400".
        let mut count = 0usize;
        let mut new_ips = 0usize;
        for v in msg.get_all(attr::XOR_PEER_ADDRESS) {
            let peer = attr::decode_xor_address(v, &tid).map_err(|_| BAD_REQUEST)?;
            count += 1;
            // "If an XOR-PEER-ADDRESS attribute contains an address of an
            // address family that is not the same as that of a relayed
            // transport address for the allocation, ... 443".
            if a.relay_for(Family::of(&peer.ip())).is_none() {
                return Err(TurnError::Code(443));
            }
            // "The server MAY impose restrictions on the IP address ... if a
            // value is not allowed, the server rejects the request with a
            // 403".
            if self.cfg.peer_policy.check_ip(&peer.ip()).is_err() {
                return Err(TurnError::Code(403));
            }
            if !a.permissions.iter().any(|p| p.ip == peer.ip()) {
                new_ips += 1;
            }
        }
        if count == 0 {
            return Err(BAD_REQUEST);
        }
        // "If the request is valid, but the server is unable to satisfy the
        // request due to some capacity limit or similar, then a 508". The
        // check is conservative (duplicates in one request count twice), so
        // nothing is installed unless everything fits.
        if a.permissions.len() + new_ips > cap {
            return Err(TurnError::Code(508));
        }
        let expires_at = now + secs(self.cfg.permission_lifetime_secs);
        if let Some(a) = self.table.get_mut(idx) {
            for v in msg.get_all(attr::XOR_PEER_ADDRESS) {
                if let Ok(peer) = attr::decode_xor_address(v, &tid) {
                    // "installs or refreshes a permission for the IP address
                    // ... The port portion of each attribute is ignored".
                    a.install_permission(peer.ip(), expires_at, cap);
                }
            }
        }
        self.table.reschedule(idx);
        Ok(Reply::Empty)
    }

    /// RFC 8656 §12.2, Receiving a ChannelBind Request.
    fn channel_bind(
        &mut self,
        now: Instant,
        ft: FiveTuple,
        msg: &Message<'_>,
        auth: &Auth<'_>,
    ) -> Result<Reply, TurnError> {
        let idx = self.owned_allocation(&ft, now, auth)?;
        let tid = msg.transaction_id();
        // "The request contains both a CHANNEL-NUMBER and an
        // XOR-PEER-ADDRESS attribute" (else 400).
        let number = match msg
            .get(attr::CHANNEL_NUMBER)
            .map(|v| Attribute::decode(attr::CHANNEL_NUMBER, v, &tid))
        {
            Some(Ok(Attribute::ChannelNumber(n))) => n,
            _ => return Err(BAD_REQUEST),
        };
        let peer = match msg.get(attr::XOR_PEER_ADDRESS) {
            Some(v) => attr::decode_xor_address(v, &tid).map_err(|_| BAD_REQUEST)?,
            None => return Err(BAD_REQUEST),
        };
        // "The channel number is in the range 0x4000 through 0x4FFF" (RFC 8656 §12.2);
        // we accept RFC 5766's 0x4000-0x7FFF for deployed clients (see channel_data).
        if !channel_data::is_valid_channel(number) {
            return Err(BAD_REQUEST);
        }
        let Some(a) = self.table.get(idx) else {
            return Err(TurnError::Code(437));
        };
        // Family mismatch with the relayed addresses -> 443.
        if a.relay_for(Family::of(&peer.ip())).is_none() {
            return Err(TurnError::Code(443));
        }
        // "The channel number is not currently bound to a different
        // transport address (same transport address is OK); the transport
        // address is not currently bound to a different channel number."
        // Bindings in their hold-down period still count (RFC 8656 §12).
        if a.channels.iter().any(|c| (c.number == number) != (c.peer == peer)) {
            return Err(BAD_REQUEST);
        }
        // Peer policy -> 403.
        if self.cfg.peer_policy.check_peer(&peer).is_err() {
            return Err(TurnError::Code(403));
        }
        // Capacity -> 508.
        let existing = a.channels.iter().any(|c| c.number == number);
        if !existing && a.channels.len() >= self.cfg.max_channels_per_allocation {
            return Err(TurnError::Code(508));
        }
        let needs_permission = !a.permissions.iter().any(|p| p.ip == peer.ip());
        if needs_permission && a.permissions.len() >= self.cfg.max_permissions_per_allocation {
            return Err(TurnError::Code(508));
        }
        let channel_expiry = now + secs(self.cfg.channel_lifetime_secs);
        let permission_expiry = now + secs(self.cfg.permission_lifetime_secs);
        let cap = self.cfg.max_permissions_per_allocation;
        if let Some(a) = self.table.get_mut(idx) {
            // "creates or refreshes the channel binding".
            match a.channels.iter_mut().find(|c| c.number == number) {
                Some(c) => c.expires_at = c.expires_at.max(channel_expiry),
                None => {
                    a.channels.push(ChannelBinding { number, peer, expires_at: channel_expiry })
                }
            }
            // "also installs or refreshes a permission for the IP address".
            a.install_permission(peer.ip(), permission_expiry, cap);
        }
        self.table.reschedule(idx);
        Ok(Reply::Empty)
    }

    /// RFC 8656 §11.2, Receiving a Send Indication.
    fn send_indication<'a>(
        &mut self,
        now: Instant,
        ft: FiveTuple,
        msg: &Message<'a>,
    ) -> Output<'a> {
        let Some(a) = self.table.index_of(&ft).and_then(|i| self.table.get(i)) else {
            return self.dropped(DropReason::NoAllocation);
        };
        if a.expires_at <= now {
            return self.dropped(DropReason::NoAllocation);
        }
        let (mut peer_v, mut data, mut df) = (None, None, false);
        for at in msg.attributes() {
            match at.typ {
                attr::XOR_PEER_ADDRESS if peer_v.is_none() => peer_v = Some(at.value),
                attr::DATA if data.is_none() => data = Some(at.value),
                attr::DONT_FRAGMENT => df = true,
                t if t < 0x8000 && !attr::is_known(t) => {
                    // Unknown comprehension-required: discard.
                    return self.dropped(DropReason::InvalidSend);
                }
                _ => {}
            }
        }
        // "MUST contain both an XOR-PEER-ADDRESS attribute and a DATA
        // attribute. If one of these attributes is missing or invalid, then
        // the message is discarded."
        let (Some(peer_v), Some(data)) = (peer_v, data) else {
            return self.dropped(DropReason::InvalidSend);
        };
        let Ok(peer) = attr::decode_xor_address(peer_v, &msg.transaction_id()) else {
            return self.dropped(DropReason::InvalidSend);
        };
        // "If the server is unable to set the DF bit ... acts as if the
        // DONT-FRAGMENT attribute is an unknown comprehension-required
        // attribute (and thus the Send indication is discarded)."
        if df && !self.cfg.dont_fragment {
            return self.dropped(DropReason::InvalidSend);
        }
        let Some(relay) = a.relay_for(Family::of(&peer.ip())) else {
            return self.dropped(DropReason::FamilyMismatch);
        };
        // "The server also checks that there is a permission installed for
        // the IP address ... If no such permission exists, the message is
        // discarded. ... a Send indication never causes the server to
        // refresh the permission."
        if !a.has_permission(&peer.ip(), now) {
            return self.dropped(DropReason::NoPermission);
        }
        // "The server MAY impose restrictions on the IP address and port
        // values ... silently discards".
        if self.cfg.peer_policy.check_peer(&peer).is_err() {
            return self.dropped(DropReason::PeerDenied);
        }
        self.counters.to_peer += 1;
        Output::ToPeer { relay: relay.id, peer, data, dont_fragment: df }
    }

    /// Handle a datagram received on relay socket `relay` from `peer`
    /// (RFC 8656 §11.3, §12.6).
    ///
    /// Buffer contract (no copy of the payload): the caller receives the
    /// peer datagram into `buf[PEER_HEADROOM..PEER_HEADROOM + len]`, with
    /// `buf.len() >= PEER_HEADROOM + len + PEER_TAILROOM`. The server writes
    /// the ChannelData header (4 bytes) or the Data indication header (36
    /// or 48 bytes) right in front of the payload and padding behind it,
    /// and returns [`Output::ToClient`] with the framed slice of `buf`.
    pub fn handle_peer_datagram<'a>(
        &mut self,
        now: Instant,
        relay: RelayId,
        peer: SocketAddr,
        buf: &'a mut [u8],
        len: usize,
    ) -> Output<'a> {
        let Some(a) = self.table.index_of_relay(&relay).and_then(|i| self.table.get(i)) else {
            return self.dropped(DropReason::UnknownRelay);
        };
        if a.expires_at <= now {
            return self.dropped(DropReason::NoAllocation);
        }
        let end = PEER_HEADROOM.saturating_add(len);
        if buf.len() < end {
            return self.dropped(DropReason::BufferTooSmall);
        }
        // "checks to see whether the set of permissions for the allocation
        // allow the relaying of the UDP datagram".
        if !a.has_permission(&peer.ip(), now) {
            return self.dropped(DropReason::NoPermission);
        }
        let ft = a.five_tuple;
        // "If relaying is permitted, then the server checks if there is a
        // channel bound to the peer ... [then] ChannelData" (§12.6).
        if let Some(ch) = a.active_channel_for_peer(&peer, now) {
            let number = ch.number;
            let Ok(len16) = u16::try_from(len) else {
                return self.dropped(DropReason::PayloadTooLarge);
            };
            let start = PEER_HEADROOM - channel_data::CHANNEL_DATA_HEADER_LEN;
            let mut head = [0u8; 4];
            channel_data::write_header(&mut head, number, len16);
            buf[start..PEER_HEADROOM].copy_from_slice(&head);
            self.counters.channel_data_to_client += 1;
            let buf: &'a [u8] = buf;
            return Output::ToClient {
                client: ft.client,
                listener: ft.listener,
                data: &buf[start..end],
            };
        }
        // "... no channel is bound to the peer, then the server forms and
        // sends a Data indication" with XOR-PEER-ADDRESS and DATA.
        let addr_len = attr::address_len(&peer);
        let header_len = HEADER_LEN + 4 + addr_len + 4;
        let body_len = 4 + addr_len + 4 + pad4(len);
        if body_len > 0xFFFC {
            return self.dropped(DropReason::PayloadTooLarge);
        }
        let padded_end = PEER_HEADROOM + pad4(len);
        if buf.len() < padded_end {
            return self.dropped(DropReason::BufferTooSmall);
        }
        let txid = self.next_txid();
        let start = PEER_HEADROOM - header_len;
        let h = &mut buf[start..PEER_HEADROOM];
        h[0..2].copy_from_slice(
            &crate::stun::message::message_type(Method::DATA, Class::Indication).to_be_bytes(),
        );
        h[2..4].copy_from_slice(&(body_len as u16).to_be_bytes());
        h[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        h[8..20].copy_from_slice(&txid.0);
        h[20..22].copy_from_slice(&attr::XOR_PEER_ADDRESS.to_be_bytes());
        h[22..24].copy_from_slice(&(addr_len as u16).to_be_bytes());
        attr::write_xor_address(&mut h[24..24 + addr_len], peer, &txid);
        let d = 24 + addr_len;
        h[d..d + 2].copy_from_slice(&attr::DATA.to_be_bytes());
        h[d + 2..d + 4].copy_from_slice(&(len as u16).to_be_bytes());
        buf[end..padded_end].fill(0);
        self.counters.data_indications_to_client += 1;
        let buf: &'a [u8] = buf;
        Output::ToClient { client: ft.client, listener: ft.listener, data: &buf[start..padded_end] }
    }
}

impl Server {
    /// Report an ICMP error the relay socket received for traffic to
    /// `peer` (RFC 8656 §11.5): if a permission exists, the client gets a
    /// Data indication with ICMP and XOR-PEER-ADDRESS (and no DATA),
    /// written into `out`. Optional: daemons that do not read socket error
    /// queues never call it.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_peer_icmp<'a>(
        &mut self,
        now: Instant,
        relay: RelayId,
        peer: SocketAddr,
        icmp_type: u8,
        icmp_code: u8,
        error_data: u32,
        out: &'a mut [u8],
    ) -> Output<'a> {
        let Some(a) = self.table.index_of_relay(&relay).and_then(|i| self.table.get(i)) else {
            return self.dropped(DropReason::UnknownRelay);
        };
        if a.expires_at <= now {
            return self.dropped(DropReason::NoAllocation);
        }
        // "... checks to see whether the set of permissions for the
        // allocation allows the relaying of the ICMP packet".
        if !a.has_permission(&peer.ip(), now) {
            return self.dropped(DropReason::NoPermission);
        }
        let ft = a.five_tuple;
        let txid = self.next_txid();
        let r = (|| {
            let mut enc = MessageEncoder::new(out, Method::DATA, Class::Indication, &txid)?;
            Attribute::Icmp { typ: icmp_type, code: icmp_code, data: error_data }
                .encode(&mut enc)?;
            enc.xor_address(attr::XOR_PEER_ADDRESS, peer)?;
            Ok::<usize, EncodeError>(enc.finish())
        })();
        match r {
            Ok(n) => {
                let out: &'a [u8] = out;
                Output::ToClient { client: ft.client, listener: ft.listener, data: &out[..n] }
            }
            Err(_) => self.dropped(DropReason::BufferTooSmall),
        }
    }
}

fn remaining_secs(expires_at: Instant, now: Instant) -> u32 {
    let d = expires_at.saturating_duration_since(now);
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}
