//! The TURN server state machine (RFC 8656 with clients over UDP, TCP or TLS, relays
//! over UDP; RFC 8489 long-term credentials).
//!
//! A [`Server`] owns one allocation table and is driven by its caller:
//!
//! * [`Server::handle_client_message`] for every datagram a listener
//!   socket receives and every frame of a TCP or TLS stream (STUN or ChannelData);
//! * [`Server::handle_connection_closed`] when a client's TCP or TLS connection ends;
//! * [`Server::handle_peer_datagram`] for every datagram a relay socket
//!   receives;
//! * [`Server::poll_timeout`] / [`Server::handle_timeout`] for expiry;
//! * [`Server::poll_event`] for log-worthy events;
//! * [`Server::poll_fast_path`] for the channel bindings a kernel fast path may relay
//!   (with [`ServerConfig::fast_path`]).
//!
//! Each handler returns an [`Output`] telling the caller what to send.
//! Relay sockets and quotas are provided by the caller through
//! [`RelayAllocator`] and [`Quota`].
//!
//! ## Where each part of the RFCs is
//!
//! | file | what |
//! | --- | --- |
//! | `mod.rs` | dispatch of client input, Binding (RFC 8489 §6.3.1), the authenticated request pipeline, timers |
//! | `auth.rs` | long-term credentials (RFC 8489 §9.2.4): 401, 400, 438 |
//! | `allocate.rs` | Allocate (RFC 8656 §7.2) and Refresh (§7.3) |
//! | `permission.rs` | CreatePermission (RFC 8656 §9.2) |
//! | `channel.rs` | ChannelBind (RFC 8656 §12.2) and ChannelData from the client (§12.4) |
//! | `fast.rs` | the bindings a kernel fast path may relay (ChannelData both ways), as lossless changes |
//! | `data.rs` | Send indications (RFC 8656 §11.2), data from peers (§11.3, §12.6), ICMP (§11.5) |
//! | `responses.rs` | encoding and signing responses, error codes by name ([`code`]) |
//! | `table.rs` | allocations, permissions, channels and the deadline heap |
//! | `host.rs` | what the caller provides: relay sockets and quotas |
//! | `cache.rs`, `replay.rs`, `limiter.rs` | retransmissions, replayed Allocates, per-source limits |

mod cache;
mod config;
mod counters;
mod host;
mod limiter;
mod replay;
mod table;

mod allocate;
mod auth;
mod channel;
mod data;
mod fast;
mod permission;
mod responses;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use config::{ConfigError, ServerConfig};
pub use counters::{
    AuthFailure, Counters, DropReason, ERROR_CODES, REQUEST_METHODS, TrafficCounters,
};
pub use fast::{FastBinding, FastPathChange};
pub use host::{
    Host, LocalQuota, Quota, QuotaExceeded, RelayAllocator, RelayError, RelayId, RelayRequest,
    Unlimited,
};
pub use limiter::{RateTable, SourceLimits, source_key};
pub use table::{
    Allocation, AllocationTraffic, ChannelBinding, ClientConn, FiveTuple, Permission, RelaySocket,
    Transport,
};

use crate::credentials::{CredentialStore, Key, PasswordAlgorithm};
use crate::nonce::{NonceMinter, SecurityFeatures};
use crate::stun::attr;
use crate::stun::{Class, Message, Method, TransactionId};
use auth::Rejection;
use cache::RetransmitCache;
use responses::TurnError;
pub use responses::code;
pub use responses::reason_phrase;
use table::Table;

/// Bytes the caller must leave free *before* a peer datagram in the buffer
/// given to [`Server::handle_peer_datagram`]: room for a Data indication
/// header with an IPv6 XOR-PEER-ADDRESS (20 + 24 + 4).
pub const PEER_HEADROOM: usize = 48;
/// Bytes the caller must leave free *after* a peer datagram: padding of the
/// DATA attribute.
pub const PEER_TAILROOM: usize = 3;
/// Recommended size of the `out` buffer of
/// [`Server::handle_client_message`]; responses are far smaller.
pub const RECOMMENDED_OUT_LEN: usize = 2048;

/// What the caller must do after a `handle_*` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output<'a> {
    /// Nothing to send (answered nothing, or a counted drop).
    None,
    /// Send `data` to the client of `five_tuple`, through `conn`: over UDP from the
    /// listener socket (from `five_tuple.listener`'s address when that socket is bound to
    /// a wildcard), over TCP and TLS as the next bytes of the connection's stream.
    ToClient {
        /// The client's 5-tuple.
        five_tuple: FiveTuple,
        /// The caller's handle on its socket or connection (as it gave it).
        conn: ClientConn,
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
    /// The client's TCP or TLS connection closed ([`Server::handle_connection_closed`]):
    /// an allocation over a stream lives as long as its connection (RFC 8656 §3.1).
    ConnectionClosed,
    /// The operator ended it ([`Server::end_allocations`]).
    Kicked,
}

impl DeleteReason {
    /// A stable snake_case name for logs and metrics (the session line's `reason`,
    /// `turn_allocations_deleted_total{reason}`).
    pub const fn name(self) -> &'static str {
        match self {
            DeleteReason::Expired => "expired",
            DeleteReason::ClientRequest => "client",
            DeleteReason::Shutdown => "shutdown",
            DeleteReason::ConnectionClosed => "connection_closed",
            DeleteReason::Kicked => "kicked",
        }
    }
}

/// A message from a client: one UDP datagram, or one frame of a TCP or TLS stream (a STUN
/// message, or a ChannelData message with its padding; see [`crate::framing`]).
#[derive(Debug, Clone, Copy)]
pub struct ClientInput<'a> {
    /// Monotonic time.
    pub now: Instant,
    /// Wall time in UNIX seconds (nonces, REST credential expiry).
    pub unix_secs: u64,
    /// Who sent it, to which local address, over which transport.
    pub five_tuple: FiveTuple,
    /// The caller's handle on the socket or connection it came in on.
    pub conn: ClientConn,
    /// The message.
    pub data: &'a [u8],
}

/// An ICMP error a relay socket received about a datagram sent to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerIcmp {
    /// The peer the datagram was sent to.
    pub peer: SocketAddr,
    /// ICMP (or ICMPv6) type.
    pub icmp_type: u8,
    /// ICMP (or ICMPv6) code.
    pub icmp_code: u8,
    /// The error's extra data (the next-hop MTU for "fragmentation needed").
    pub info: u32,
}

/// Log-worthy events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An allocation was created.
    AllocationCreated {
        /// Its 5-tuple.
        five_tuple: FiveTuple,
        /// The caller's handle on its socket or connection.
        conn: ClientConn,
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
        /// The caller's handle on its socket or connection.
        conn: ClientConn,
        /// Its relayed addresses `[IPv4, IPv6]` (already released).
        relays: [Option<RelaySocket>; 2],
        /// When it was created.
        created_at: Instant,
        /// What it relayed.
        traffic: AllocationTraffic,
        /// Username.
        username: Box<str>,
        /// The user it counted against: the user part of a REST username (`expiry:user`),
        /// else the username (quotas; per-user metrics).
        quota_key: Box<str>,
        /// Why.
        reason: DeleteReason,
    },
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
    /// Per-source limits (unauthenticated answers, failed authentications, Binding
    /// answers), shared with the daemon's other workers.
    limits: Arc<SourceLimits>,
    /// The origin of the millisecond clock of the allocations' own buckets.
    epoch: Option<Instant>,
    /// The last (monotonic, wall) time pair seen, to date events that come without a
    /// wall time (expiry).
    wall: Option<(Instant, u64)>,
    events: VecDeque<Event>,
    /// Changes of the kernel fast path's bindings (lossless; see `fast.rs`).
    fast_changes: VecDeque<FastPathChange>,
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

/// A configuration [`Server::prepare`] checked, for [`Server::apply`].
pub struct Prepared {
    cfg: ServerConfig,
    derived: Derived,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared").field("realm", &self.cfg.realm).finish_non_exhaustive()
    }
}

/// What the credentials configuration derives.
struct Derived {
    creds: CredentialStore,
    nonces: NonceMinter,
    /// Encoded PASSWORD-ALGORITHMS value (empty: negotiation disabled).
    password_algorithms: Vec<u8>,
}

impl Derived {
    fn of(cfg: &ServerConfig) -> Result<Derived, ConfigError> {
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
        Ok(Derived { creds, nonces, password_algorithms })
    }
}

/// The context of one client message, passed down the handlers.
#[derive(Debug, Clone, Copy)]
struct Ctx {
    now: Instant,
    unix_secs: u64,
    ft: FiveTuple,
    conn: ClientConn,
}

fn secs(s: u32) -> Duration {
    Duration::from_secs(u64::from(s))
}

impl Server {
    /// Build a server from a configuration, with per-source limits of its own.
    pub fn new(cfg: ServerConfig) -> Result<Server, ConfigError> {
        let limits = Arc::new(SourceLimits::new(&cfg));
        Server::with_limits(cfg, limits)
    }

    /// Build a server that shares `limits` (made with [`SourceLimits::new`]) with the other
    /// workers of a daemon, so that a source that varies its port, and so reaches every
    /// worker, gets the configured rates in total, not once per worker.
    pub fn with_limits(
        cfg: ServerConfig,
        limits: Arc<SourceLimits>,
    ) -> Result<Server, ConfigError> {
        cfg.validate()?;
        let Derived { creds, nonces, password_algorithms } = Derived::of(&cfg)?;
        Ok(Server {
            table: Table::new(secs(cfg.channel_holddown_secs)),
            cache: RetransmitCache::new(
                cfg.retransmit_cache_entries,
                secs(cfg.retransmit_cache_ttl_secs),
            ),
            tombstones: replay::Tombstones::new(cfg.replay_tombstones, cfg.nonce_lifetime_secs),
            limits,
            epoch: None,
            wall: None,
            events: VecDeque::new(),
            fast_changes: VecDeque::new(),
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

    /// Takes a new configuration without dropping anything live: credentials, peer rules,
    /// lifetimes and limits apply to the requests that follow; allocations, permissions
    /// and channels stay as they are (a changed password does not end the allocations made
    /// with the old one; their next request is checked against the new one), except that
    /// permissions and channels to peers the new peer rules deny are removed at once, so
    /// that nothing is relayed where the rules now forbid. On error nothing changes.
    ///
    /// Keep `nonce_secret` (or nonces already issued turn stale: clients see one 438) and
    /// the table and cache sizes (changes to them apply only to a new `Server`).
    pub fn reconfigure(&mut self, cfg: ServerConfig) -> Result<(), ConfigError> {
        let prepared = Server::prepare(cfg)?;
        self.apply(prepared);
        Ok(())
    }

    /// Checks a configuration and derives what [`Server::apply`] needs, without touching
    /// any server: the first half of [`Server::reconfigure`], for a daemon that changes
    /// every worker or none (each worker prepares; only when all succeeded do they apply).
    pub fn prepare(cfg: ServerConfig) -> Result<Prepared, ConfigError> {
        cfg.validate()?;
        let derived = Derived::of(&cfg)?;
        Ok(Prepared { cfg, derived })
    }

    /// Takes a configuration [`Server::prepare`] accepted; cannot fail.
    pub fn apply(&mut self, prepared: Prepared) {
        let Prepared { cfg, derived: Derived { creds, nonces, password_algorithms } } = prepared;
        // Shared with the other workers: each applies the same rates, the buckets stay.
        self.limits.set_rates(&cfg);
        self.decoy_key = crate::credentials::long_term_key(
            PasswordAlgorithm::Md5,
            "",
            &cfg.realm,
            &format!("{:x}", cfg.seed),
        );
        self.creds = creds;
        self.nonces = nonces;
        self.password_algorithms = password_algorithms;
        // Whether the fast path's changes are announced is the server's for its life: a
        // caller whose kernel maps follow them must go on hearing of every end.
        let fast_path = self.cfg.fast_path;
        self.cfg = cfg;
        self.cfg.fast_path = fast_path;
        self.prune_denied_peers();
    }

    /// The server's own addresses changed (an interface address came or went): the peer
    /// rules take the new list at once, and permissions and channels to an address that is
    /// now the server's own are removed.
    pub fn set_own_addresses(&mut self, own: Vec<std::net::IpAddr>) {
        self.cfg.peer_policy.own = own;
        self.prune_denied_peers();
    }

    /// Removes the permissions and channels the peer rules deny (after they changed).
    fn prune_denied_peers(&mut self) {
        let policy = &self.cfg.peer_policy;
        let live = self.table.live_indices();
        for &idx in &live {
            if let Some(a) = self.table.get_mut(idx) {
                a.permissions.retain(|p| policy.check_ip(&p.ip).is_ok());
                a.channels.retain(|c| policy.check_peer(&c.peer).is_ok());
            }
        }
        for idx in live {
            self.sync_fast_path(idx, None);
            self.table.reschedule(idx);
        }
    }

    /// Adds what the kernel fast path relayed for `five_tuple`'s allocation to its traffic
    /// (the caller reads the fast path's counters); false when it has no allocation.
    pub fn add_kernel_traffic(&mut self, five_tuple: &FiveTuple, t: AllocationTraffic) -> bool {
        let Some(a) = self.table.index_of(five_tuple).and_then(|i| self.table.get_mut(i)) else {
            return false;
        };
        a.traffic.add(&t);
        true
    }

    /// Every live allocation (for an operator's listing).
    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.table.iter()
    }

    /// Ends every allocation `which` selects (an operator's decision): relays and quota
    /// are released and an [`Event::AllocationDeleted`] with [`DeleteReason::Kicked`]
    /// follows for each. Returns how many ended.
    pub fn end_allocations<R, Q>(
        &mut self,
        now: Instant,
        which: impl Fn(&Allocation) -> bool,
        host: &mut Host<'_, R, Q>,
    ) -> usize
    where
        R: RelayAllocator + ?Sized,
        Q: Quota + ?Sized,
    {
        let chosen: Vec<u32> = self
            .table
            .live_indices()
            .into_iter()
            .filter(|&i| self.table.get(i).is_some_and(&which))
            .collect();
        for &idx in &chosen {
            self.delete_allocation(idx, DeleteReason::Kicked, Some(now), host);
        }
        self.table.trim_stale();
        chosen.len()
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

    /// Queues an event. Creations and deletions are state changes the caller acts on
    /// (directory, pins, connections, session log): never dropped, and bounded anyway by
    /// the allocations there are. Refreshes are log events: dropped, and counted, beyond
    /// `event_queue_capacity`.
    fn push_event(&mut self, e: Event) {
        let droppable = matches!(e, Event::AllocationRefreshed { .. });
        if droppable && self.events.len() >= self.cfg.event_queue_capacity {
            self.counters.events_dropped += 1;
            return;
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
    pub fn handle_timeout<R, Q>(&mut self, now: Instant, host: &mut Host<'_, R, Q>)
    where
        R: RelayAllocator + ?Sized,
        Q: Quota + ?Sized,
    {
        let holddown = secs(self.cfg.channel_holddown_secs);
        while let Some(idx) = self.table.pop_due(now) {
            let expired = self.table.get(idx).is_some_and(|a| a.expires_at <= now);
            if expired {
                self.delete_allocation(idx, DeleteReason::Expired, Some(now), host);
                continue;
            }
            if let Some(a) = self.table.get_mut(idx) {
                a.prune(now, holddown);
            }
            self.sync_fast_path(idx, Some(now));
            self.table.reschedule(idx);
        }
        self.table.trim_stale();
    }

    /// Delete every allocation, releasing relays and quota (shutdown).
    pub fn release_all<R, Q>(&mut self, host: &mut Host<'_, R, Q>)
    where
        R: RelayAllocator + ?Sized,
        Q: Quota + ?Sized,
    {
        for idx in self.table.live_indices() {
            self.delete_allocation(idx, DeleteReason::Shutdown, None, host);
        }
        self.table.trim_stale();
    }

    /// The client's TCP or TLS connection of `five_tuple` closed: its allocation, if it
    /// has one, is deleted and its relays and quota released (RFC 8656 §3.1: over a
    /// stream, the allocation lives as long as the connection). Call it once per closed
    /// connection, whatever the reason.
    pub fn handle_connection_closed<R, Q>(
        &mut self,
        now: Instant,
        five_tuple: &FiveTuple,
        host: &mut Host<'_, R, Q>,
    ) where
        R: RelayAllocator + ?Sized,
        Q: Quota + ?Sized,
    {
        if let Some(idx) = self.table.index_of(five_tuple) {
            self.delete_allocation(idx, DeleteReason::ConnectionClosed, Some(now), host);
        }
        self.table.trim_stale();
    }

    /// The index of `ft`'s allocation if it is live at `now`.
    fn live_allocation(&self, ft: &FiveTuple, now: Instant) -> Option<u32> {
        let idx = self.table.index_of(ft)?;
        self.table.get(idx).is_some_and(|a| a.expires_at > now).then_some(idx)
    }

    /// Milliseconds since the server's first use, plus one (the clock of the allocations'
    /// own buckets).
    fn millis(&mut self, now: Instant) -> u64 {
        let epoch = *self.epoch.get_or_insert(now);
        now.saturating_duration_since(epoch).as_millis() as u64 + 1
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
        host: &mut Host<'_, R, Q>,
    ) where
        R: RelayAllocator + ?Sized,
        Q: Quota + ?Sized,
    {
        let Some(a) = self.table.remove(idx) else {
            return;
        };
        self.end_fast_path(&a);
        if let Some(now) = ended {
            let unix = self.wall_at(now);
            self.tombstones.record(a.five_tuple, unix);
        }
        for r in a.relays.iter().flatten() {
            host.relays.release(r.id);
        }
        host.quota.release(&a.quota_key, a.five_tuple.client.ip());
        match reason {
            DeleteReason::Expired => self.counters.allocations_expired += 1,
            DeleteReason::ClientRequest => self.counters.allocations_deleted += 1,
            DeleteReason::ConnectionClosed => self.counters.allocations_closed += 1,
            DeleteReason::Kicked => self.counters.allocations_kicked += 1,
            DeleteReason::Shutdown => {}
        }
        self.push_event(Event::AllocationDeleted {
            five_tuple: a.five_tuple,
            conn: a.conn,
            relays: a.relays,
            created_at: a.created_at,
            traffic: a.traffic,
            username: a.username,
            quota_key: a.quota_key,
            reason,
        });
    }

    /// Handle a message from a client: a datagram received on a listener socket, or one
    /// frame of a TCP or TLS stream.
    ///
    /// `out` is where responses are written ([`RECOMMENDED_OUT_LEN`]). ChannelData and
    /// Send indications produce [`Output::ToPeer`] whose payload borrows `input.data`;
    /// requests produce [`Output::ToClient`] pointing into `out`.
    pub fn handle_client_message<'a, R, Q>(
        &mut self,
        input: ClientInput<'a>,
        out: &'a mut [u8],
        host: &mut Host<'_, R, Q>,
    ) -> Output<'a>
    where
        R: RelayAllocator + ?Sized,
        Q: Quota + ?Sized,
    {
        let ClientInput { now, unix_secs, five_tuple: ft, conn, data } = input;
        match data.first().map(|b| b >> 6) {
            Some(0b01) => self.client_channel_data(now, ft, data, &*host.relays),
            Some(0b00) => match Message::parse(data) {
                Ok(msg) => self.client_stun(Ctx { now, unix_secs, ft, conn }, msg, out, host),
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

    fn client_stun<'a, R, Q>(
        &mut self,
        cx: Ctx,
        msg: Message<'a>,
        out: &'a mut [u8],
        host: &mut Host<'_, R, Q>,
    ) -> Output<'a>
    where
        R: RelayAllocator + ?Sized,
        Q: Quota + ?Sized,
    {
        // Wall time for events that come without it (tombstones of expiring allocations):
        // noted on the control path only, not for every ChannelData.
        self.wall = Some((cx.now, cx.unix_secs));
        match (msg.class(), msg.method()) {
            (Class::Request, Method::BINDING) => self.binding(&cx, &msg, out),
            (
                Class::Request,
                Method::ALLOCATE
                | Method::REFRESH
                | Method::CREATE_PERMISSION
                | Method::CHANNEL_BIND,
            ) => self.turn_request(&cx, &msg, out, host),
            (Class::Request, _) => {
                // Unknown method: 400 (RFC 8489 §6.3.1).
                self.counters.requests += 1;
                self.counters.requests_by_method[5] += 1;
                let signer = self.unsigned(&msg);
                let held = self.live_allocation(&cx.ft, cx.now);
                self.reject(&cx, &signer, Rejection::BadRequest, held, out)
            }
            (Class::Indication, Method::SEND) => {
                self.send_indication(cx.now, cx.ft, &msg, &*host.relays)
            }
            (Class::Indication, Method::BINDING) => self.dropped(DropReason::BindingIndication),
            (Class::Indication, _) => self.dropped(DropReason::UnknownIndication),
            _ => self.dropped(DropReason::UnexpectedClass),
        }
    }

    /// RFC 8489 §6.3.1: Binding requests are answered without
    /// authentication with the client's reflexive address.
    /// Answers are limited per source address like those to unauthenticated requests (a
    /// spoofed source must not turn the server into a reflector), except to a 5-tuple
    /// that holds an allocation (a client's keepalives on its own 5-tuple) and over TCP
    /// and TLS (a proven source).
    fn binding<'a>(&mut self, cx: &Ctx, msg: &Message<'a>, out: &'a mut [u8]) -> Output<'a> {
        self.counters.requests += 1;
        self.counters.requests_by_method[0] += 1;
        self.counters.binding_requests += 1;
        if self.live_allocation(&cx.ft, cx.now).is_none()
            && !cx.ft.transport.is_stream()
            && !self.limits.binding.allow(&cx.ft.client.ip(), cx.now)
        {
            self.counters.rate_limited_responses += 1;
            return self.dropped(DropReason::RateLimited);
        }
        let signer = self.unsigned(msg);
        let unknown = msg.unknown_comprehension_required::<16>();
        let r = if unknown.is_empty() {
            self.write_response(out, &signer, Class::SuccessResponse, |enc| {
                enc.xor_address(attr::XOR_MAPPED_ADDRESS, cx.ft.client)
            })
        } else {
            self.write_error(out, &signer, code::UNKNOWN_ATTRIBUTE, |enc| {
                enc.unknown_attributes(unknown.as_slice())
            })
        };
        self.respond(cx, out, r)
    }

    fn turn_request<'a, R, Q>(
        &mut self,
        cx: &Ctx,
        msg: &Message<'a>,
        out: &'a mut [u8],
        host: &mut Host<'_, R, Q>,
    ) -> Output<'a>
    where
        R: RelayAllocator + ?Sized,
        Q: Quota + ?Sized,
    {
        let (now, ft) = (cx.now, cx.ft);
        self.counters.requests += 1;
        let method_index = match msg.method() {
            Method::ALLOCATE => 1,
            Method::REFRESH => 2,
            Method::CREATE_PERMISSION => 3,
            _ => 4,
        };
        self.counters.requests_by_method[method_index] += 1;
        let txid = msg.transaction_id();
        // Retransmission: answer with the very same bytes.
        if let Some(bytes) = self.cache.get(&ft, &txid, now) {
            let n = bytes.len();
            if let Some(dst) = out.get_mut(..n) {
                dst.copy_from_slice(bytes);
                self.counters.retransmits_answered += 1;
                return self.respond(cx, out, Ok(n));
            }
            return self.dropped(DropReason::BufferTooSmall);
        }
        let mut signer = self.unsigned(msg);
        // The 5-tuple's live allocation, if it has one: it is limited by its own failures
        // only, never by other 5-tuples' (see `auth.rs`).
        let held = self.live_allocation(&ft, now);
        let auth = match self.authenticate(msg, cx, held) {
            Ok(a) => a,
            Err(Rejection::Throttled) => {
                self.counters.rate_limited_auth += 1;
                return self.dropped(DropReason::AuthThrottled);
            }
            Err(rej) => return self.reject(cx, &signer, rej, held, out),
        };
        // A replayed Allocate for a 5-tuple whose allocation ended since its nonce was
        // issued: 438 with a nonce from after the end (see `replay.rs`).
        if msg.method() == Method::ALLOCATE
            && self.table.index_of(&ft).is_none()
            && self.tombstones.refuses(&ft, auth.nonce_issued)
        {
            self.counters.replays_refused += 1;
            return self.reject(cx, &signer, Rejection::StaleNonce, held, out);
        }
        signer.integrity = Some((auth.key, auth.kind));
        // RFC 8489 §6.3.1: unknown comprehension-required attributes -> 420.
        let unknown = msg.unknown_comprehension_required::<16>();
        let result = if !unknown.is_empty() {
            Err(TurnError::Unknown(unknown))
        } else {
            match msg.method() {
                Method::ALLOCATE => self.allocate(cx, msg, &auth, host),
                Method::REFRESH => self.refresh(now, ft, msg, &auth, host),
                Method::CREATE_PERMISSION => self.create_permission(now, ft, msg, &auth),
                _ => self.channel_bind(now, ft, msg, &auth, &*host.relays),
            }
        };
        let r = self.write_reply(out, &signer, result);
        if let Some(bytes) = r.ok().and_then(|n| out.get(..n)) {
            self.cache.insert(ft, txid, now, bytes);
        }
        self.respond(cx, out, r)
    }
}
