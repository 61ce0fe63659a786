//! The allocation table: allocations in a slab, indexed by 5-tuple and by
//! relay id, and one deadline heap for the whole table.
//!
//! Each allocation has at most one *current* heap entry: the earliest of
//! its own expiry, its permissions' expiries and its channels' expiry or
//! hold-down end. Entries are invalidated lazily: an entry whose slot
//! generation or deadline no longer matches is skipped when popped. An
//! entry is pushed only when an allocation's next deadline moves earlier
//! than the scheduled one, and the heap is rebuilt from live allocations if
//! stale entries ever outnumber them, so its size stays bounded by live
//! state.
//!
//! The hash maps use FxHash: their keys (5-tuples, relay ids) are only
//! inserted after a successful authenticated Allocate, so an attacker
//! cannot flood them with chosen keys.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use super::host::RelayId;
use crate::stun::{Family, TransactionId};

/// The transport between a client and the server (RFC 8656 §3.1: UDP, TCP, or TLS over
/// TCP). Relaying to peers is always UDP here; this is only how the client talks to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Transport {
    /// Datagrams on a listener socket.
    #[default]
    Udp,
    /// A TCP connection (a stream of framed messages, RFC 8656 §12.5 padding).
    Tcp,
    /// TLS over TCP.
    Tls,
}

impl Transport {
    /// True for TCP and TLS: messages are framed in a byte stream, ChannelData is padded
    /// to a multiple of four bytes, and the allocation ends with its connection.
    #[inline]
    pub const fn is_stream(self) -> bool {
        !matches!(self, Transport::Udp)
    }

    /// Every transport, in [`Transport::index`] order.
    pub const ALL: [Transport; 3] = [Transport::Udp, Transport::Tcp, Transport::Tls];

    /// 0, 1, 2 for UDP, TCP, TLS (for per-transport counters).
    #[inline]
    pub const fn index(self) -> usize {
        match self {
            Transport::Udp => 0,
            Transport::Tcp => 1,
            Transport::Tls => 2,
        }
    }

    /// A lowercase name (`udp`, `tcp`, `tls`) for logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }
}

/// The 5-tuple of an allocation (RFC 8656 §2): client address, server (listener) address,
/// and the transport between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FiveTuple {
    /// Client's transport address as seen by the server.
    pub client: SocketAddr,
    /// Server's local transport address the client talks to.
    pub listener: SocketAddr,
    /// UDP, TCP or TLS.
    pub transport: Transport,
}

impl FiveTuple {
    /// A UDP 5-tuple.
    pub const fn udp(client: SocketAddr, listener: SocketAddr) -> FiveTuple {
        FiveTuple { client, listener, transport: Transport::Udp }
    }
}

/// The caller's handle on how a client is reached: for UDP the listener socket a
/// datagram came in on, for TCP and TLS the connection. Opaque to the server: it is
/// given with every client message, kept with the allocation, and returned in every
/// [`Output::ToClient`](super::Output::ToClient), so the caller finds the socket or
/// connection to send on without a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ClientConn(pub u64);

/// Messages and bytes relayed by one allocation, each way (payload bytes: what the peer
/// sent or received).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocationTraffic {
    /// Client -> peer.
    pub to_peer_packets: u64,
    pub to_peer_bytes: u64,
    /// Peer -> client.
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
}

impl AllocationTraffic {
    /// Adds `other` to `self`.
    pub fn add(&mut self, other: &AllocationTraffic) {
        self.to_peer_packets += other.to_peer_packets;
        self.to_peer_bytes += other.to_peer_bytes;
        self.to_client_packets += other.to_client_packets;
        self.to_client_bytes += other.to_client_bytes;
    }
}

/// A relayed transport address of an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelaySocket {
    /// Caller's id.
    pub id: RelayId,
    /// Relayed transport address (advertised).
    pub addr: SocketAddr,
}

/// A permission (RFC 8656 §9): peer IP and expiry. Ports are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permission {
    /// Peer IP.
    pub ip: IpAddr,
    /// Expiry.
    pub expires_at: Instant,
}

/// A channel binding (RFC 8656 §12). Active while `now < expires_at`; then
/// in hold-down (reserved for the same pairing, not relaying) until
/// `expires_at + channel_holddown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelBinding {
    /// Channel number 0x4000-0x7FFF.
    pub number: u16,
    /// Peer transport address.
    pub peer: SocketAddr,
    /// End of the active period.
    pub expires_at: Instant,
    /// The peer is another allocation's relayed address on this server, a peer only while
    /// a relay holds it (the relay-to-relay exception of the own-address rule): each
    /// ChannelData checks that one still does.
    pub relayed: bool,
}

/// An allocation (RFC 8656 §2.2, §6).
#[derive(Debug, Clone)]
pub struct Allocation {
    /// Its 5-tuple.
    pub five_tuple: FiveTuple,
    /// How the client is reached (the connection, for TCP and TLS).
    pub conn: ClientConn,
    /// Username that created it (later requests must use the same, 441).
    pub username: Box<str>,
    /// What its quota was charged under (the user part of a REST username).
    pub quota_key: Box<str>,
    /// Relayed addresses: `[IPv4, IPv6]`.
    pub relays: [Option<RelaySocket>; 2],
    /// Allocation expiry.
    pub expires_at: Instant,
    /// Permissions (at most `max_permissions_per_allocation`).
    pub permissions: Vec<Permission>,
    /// Channels, active or in hold-down (at most `max_channels_per_allocation`).
    pub channels: Vec<ChannelBinding>,
    /// Transaction of the Allocate that created it (retransmissions are
    /// answered with the same success instead of 437).
    pub allocate_txid: TransactionId,
    /// ADDRESS-ERROR-CODE of a partially granted dual allocation.
    pub address_error: Option<(Family, u16)>,
    /// DONT-FRAGMENT was requested.
    pub dont_fragment: bool,
    /// When it was created.
    pub created_at: Instant,
    /// What it relayed so far.
    pub traffic: AllocationTraffic,
    /// Its 5-tuple's failed authentications (counted apart from its address's).
    pub(crate) strikes: super::limiter::Bucket,
    /// The bindings announced to the kernel fast path (see `fast.rs`).
    pub(crate) fast: Vec<super::fast::FastBinding>,
    scheduled: Option<Instant>,
}

pub(crate) const fn family_index(f: Family) -> usize {
    match f {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

impl Allocation {
    /// A new allocation, reached through `ClientConn::default()` until the caller sets
    /// `conn`.
    pub(crate) fn new(
        five_tuple: FiveTuple,
        username: Box<str>,
        quota_key: Box<str>,
        relays: [Option<RelaySocket>; 2],
        created_at: Instant,
        expires_at: Instant,
        allocate_txid: TransactionId,
    ) -> Self {
        Allocation {
            five_tuple,
            conn: ClientConn::default(),
            username,
            quota_key,
            relays,
            expires_at,
            permissions: Vec::new(),
            channels: Vec::new(),
            allocate_txid,
            address_error: None,
            dont_fragment: false,
            created_at,
            traffic: AllocationTraffic::default(),
            strikes: super::limiter::Bucket::default(),
            fast: Vec::new(),
            scheduled: None,
        }
    }

    /// The relay for a peer of this family, if the allocation has one.
    #[inline]
    pub fn relay_for(&self, family: Family) -> Option<RelaySocket> {
        self.relays[family_index(family)]
    }

    /// True if a live permission exists for `ip`.
    #[inline]
    pub fn has_permission(&self, ip: &IpAddr, now: Instant) -> bool {
        self.permissions.iter().any(|p| p.ip == *ip && p.expires_at > now)
    }

    /// Active channel by number.
    #[inline]
    pub fn active_channel(&self, number: u16, now: Instant) -> Option<&ChannelBinding> {
        self.channels.iter().find(|c| c.number == number && c.expires_at > now)
    }

    /// Active channel bound to `peer`.
    #[inline]
    pub fn active_channel_for_peer(
        &self,
        peer: &SocketAddr,
        now: Instant,
    ) -> Option<&ChannelBinding> {
        self.channels.iter().find(|c| c.peer == *peer && c.expires_at > now)
    }

    /// Install or refresh a permission. Returns false if the cap is hit.
    pub(crate) fn install_permission(
        &mut self,
        ip: IpAddr,
        expires_at: Instant,
        cap: usize,
    ) -> bool {
        if let Some(p) = self.permissions.iter_mut().find(|p| p.ip == ip) {
            p.expires_at = p.expires_at.max(expires_at);
            return true;
        }
        if self.permissions.len() >= cap {
            return false;
        }
        self.permissions.push(Permission { ip, expires_at });
        true
    }

    /// Earliest state change: allocation expiry, a permission expiry, the end of a
    /// channel's hold-down (a channel's own expiry needs no action: the data path checks
    /// `expires_at` itself), or the end of a binding announced to the kernel fast path.
    fn next_deadline(&self, holddown: Duration) -> Instant {
        let mut d = self.expires_at;
        for f in &self.fast {
            d = d.min(f.expires_at);
        }
        for p in &self.permissions {
            d = d.min(p.expires_at);
        }
        for c in &self.channels {
            d = d.min(c.expires_at + holddown);
        }
        d
    }

    /// Drop expired permissions and channels whose hold-down ended.
    pub(crate) fn prune(&mut self, now: Instant, holddown: Duration) {
        self.permissions.retain(|p| p.expires_at > now);
        self.channels.retain(|c| c.expires_at + holddown > now);
    }
}

struct Slot {
    generation: u32,
    alloc: Option<Allocation>,
}

/// The allocation table.
pub(crate) struct Table {
    slots: Vec<Slot>,
    free: Vec<u32>,
    by_tuple: FxHashMap<FiveTuple, u32>,
    by_relay: FxHashMap<RelayId, u32>,
    timers: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    live: usize,
    holddown: Duration,
}

impl Table {
    pub(crate) fn new(holddown: Duration) -> Self {
        Table {
            slots: Vec::new(),
            free: Vec::new(),
            by_tuple: FxHashMap::default(),
            by_relay: FxHashMap::default(),
            timers: BinaryHeap::new(),
            live: 0,
            holddown,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.live
    }

    /// Every live allocation.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Allocation> {
        self.slots.iter().filter_map(|s| s.alloc.as_ref())
    }

    #[inline]
    pub(crate) fn index_of(&self, ft: &FiveTuple) -> Option<u32> {
        self.by_tuple.get(ft).copied()
    }

    #[inline]
    pub(crate) fn index_of_relay(&self, id: &RelayId) -> Option<u32> {
        self.by_relay.get(id).copied()
    }

    pub(crate) fn relay_in_use(&self, id: &RelayId) -> bool {
        self.by_relay.contains_key(id)
    }

    #[inline]
    pub(crate) fn get(&self, idx: u32) -> Option<&Allocation> {
        self.slots.get(idx as usize)?.alloc.as_ref()
    }

    #[inline]
    pub(crate) fn get_mut(&mut self, idx: u32) -> Option<&mut Allocation> {
        self.slots.get_mut(idx as usize)?.alloc.as_mut()
    }

    pub(crate) fn insert(&mut self, alloc: Allocation) -> u32 {
        let ft = alloc.five_tuple;
        let relays = alloc.relays;
        let idx = match self.free.pop() {
            Some(i) => {
                if let Some(slot) = self.slots.get_mut(i as usize) {
                    slot.alloc = Some(alloc);
                }
                i
            }
            None => {
                self.slots.push(Slot { generation: 0, alloc: Some(alloc) });
                (self.slots.len() - 1) as u32
            }
        };
        self.by_tuple.insert(ft, idx);
        for r in relays.iter().flatten() {
            self.by_relay.insert(r.id, idx);
        }
        self.live += 1;
        self.reschedule(idx);
        idx
    }

    /// Forget one relay of an allocation (dual allocation, one family
    /// deleted by Refresh).
    pub(crate) fn remove_relay(&mut self, idx: u32, family: Family) -> Option<RelaySocket> {
        let a = self.get_mut(idx)?;
        let r = a.relays[family_index(family)].take()?;
        self.by_relay.remove(&r.id);
        Some(r)
    }

    pub(crate) fn remove(&mut self, idx: u32) -> Option<Allocation> {
        let slot = self.slots.get_mut(idx as usize)?;
        let alloc = slot.alloc.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(idx);
        self.by_tuple.remove(&alloc.five_tuple);
        for r in alloc.relays.iter().flatten() {
            self.by_relay.remove(&r.id);
        }
        self.live -= 1;
        if self.timers.len() > 2 * self.live + 64 {
            self.compact();
        }
        Some(alloc)
    }

    /// Push a heap entry if the allocation's next deadline moved earlier.
    pub(crate) fn reschedule(&mut self, idx: u32) {
        let holddown = self.holddown;
        let Some(slot) = self.slots.get_mut(idx as usize) else {
            return;
        };
        let generation = slot.generation;
        let Some(a) = slot.alloc.as_mut() else {
            return;
        };
        let d = a.next_deadline(holddown);
        if a.scheduled.is_none_or(|s| d < s) {
            a.scheduled = Some(d);
            self.timers.push(Reverse((d, idx, generation)));
            if self.timers.len() > 2 * self.live + 64 {
                self.compact();
            }
        }
    }

    fn compact(&mut self) {
        let mut entries = Vec::with_capacity(self.live);
        for (i, slot) in self.slots.iter().enumerate() {
            if let Some(d) = slot.alloc.as_ref().and_then(|a| a.scheduled) {
                entries.push(Reverse((d, i as u32, slot.generation)));
            }
        }
        self.timers = BinaryHeap::from(entries);
    }

    /// Earliest deadline (possibly of a stale entry, which only causes an
    /// early, harmless wake-up).
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((d, _, _))| *d)
    }

    /// Pop the next due allocation index whose entry is current.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<u32> {
        while let Some(Reverse((d, idx, generation))) = self.timers.peek().copied() {
            if d > now {
                return None;
            }
            self.timers.pop();
            let Some(slot) = self.slots.get_mut(idx as usize) else {
                continue;
            };
            if slot.generation != generation {
                continue;
            }
            let Some(a) = slot.alloc.as_mut() else {
                continue;
            };
            if a.scheduled != Some(d) {
                continue;
            }
            a.scheduled = None;
            return Some(idx);
        }
        None
    }

    /// Drop stale entries at the top of the heap so `next_deadline` is exact.
    pub(crate) fn trim_stale(&mut self) {
        while let Some(Reverse((d, idx, generation))) = self.timers.peek().copied() {
            let current = self
                .slots
                .get(idx as usize)
                .filter(|s| s.generation == generation)
                .and_then(|s| s.alloc.as_ref())
                .is_some_and(|a| a.scheduled == Some(d));
            if current {
                return;
            }
            self.timers.pop();
        }
    }

    pub(crate) fn timer_entries(&self) -> usize {
        self.timers.len()
    }

    /// Indices of all live allocations.
    pub(crate) fn live_indices(&self) -> Vec<u32> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.alloc.is_some())
            .map(|(i, _)| i as u32)
            .collect()
    }
}
