//! What a kernel fast path may relay: the channel bindings over which ChannelData flows
//! exactly as [`Server::handle_client_message`] and [`Server::handle_peer_datagram`] would
//! relay it, announced as lossless changes ([`Server::poll_fast_path`]).
//!
//! A binding is relayable while, at once (RFC 8656 §12.4 and §12.6, as `channel.rs` and
//! `data.rs` check them per datagram):
//! * the allocation is live and its client is on UDP (a TCP or TLS client's frames are
//!   a stream's, never a datagram the kernel could rewrite);
//! * the channel is active (not expired, not in hold-down);
//! * a permission for the peer's IP is live;
//! * the allocation has a relayed address of the peer's family;
//! * the peer is allowed by the peer rules themselves, not only as another allocation's
//!   relayed address (`ChannelBinding::relayed`): that exception is checked against the
//!   relays held at each datagram, which a kernel entry cannot follow.
//!
//! Its lifetime is the earliest of the allocation's, the channel's and the permission's
//! expiry. After every change to an allocation the server compares the bindings it has
//! announced with those relayable now and queues an [`FastPathChange::Up`] for each new
//! binding or moved expiry and a [`FastPathChange::Down`] for each that ended, so the
//! caller's kernel maps hold an entry exactly while the userspace path would relay.

use std::net::SocketAddr;
use std::time::Instant;

use super::table::Allocation;
use super::{FiveTuple, RelaySocket, Server, Transport};
use crate::stun::Family;

/// A channel binding the kernel may relay, both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastBinding {
    /// The allocation's 5-tuple (UDP).
    pub five_tuple: FiveTuple,
    /// The channel number.
    pub channel: u16,
    /// The bound peer.
    pub peer: SocketAddr,
    /// The allocation's relayed address of the peer's family.
    pub relay: RelaySocket,
    /// When the userspace path stops relaying it (the earliest of the allocation's, the
    /// channel's and the permission's expiry).
    pub expires_at: Instant,
}

impl FastBinding {
    /// True when `other` is the same binding (same allocation, channel, peer and relay),
    /// whatever its expiry.
    pub fn same(&self, other: &FastBinding) -> bool {
        self.five_tuple == other.five_tuple
            && self.channel == other.channel
            && self.peer == other.peer
            && self.relay == other.relay
    }
}

/// A change the caller applies to its kernel maps, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastPathChange {
    /// The binding began, or its expiry moved: insert or update its entries.
    Up(FastBinding),
    /// The binding ended: remove its entries.
    Down(FastBinding),
}

impl Allocation {
    /// The bindings relayable at `now` (`None`: whatever their expiry, for callers that
    /// have no time; an expired one then goes at the next timeout).
    pub(crate) fn relayable(&self, now: Option<Instant>) -> Vec<FastBinding> {
        let live = |t: Instant| now.is_none_or(|now| t > now);
        if self.five_tuple.transport != Transport::Udp || !live(self.expires_at) {
            return Vec::new();
        }
        let mut out = Vec::new();
        for ch in self.channels.iter().filter(|c| live(c.expires_at) && !c.relayed) {
            let ip = ch.peer.ip();
            let Some(permission) =
                self.permissions.iter().find(|p| p.ip == ip && live(p.expires_at))
            else {
                continue;
            };
            let Some(relay) = self.relay_for(Family::of(&ip)) else {
                continue;
            };
            out.push(FastBinding {
                five_tuple: self.five_tuple,
                channel: ch.number,
                peer: ch.peer,
                relay,
                expires_at: self.expires_at.min(ch.expires_at).min(permission.expires_at),
            });
        }
        out
    }
}

impl Server {
    /// The next change of the kernel fast path's bindings, in order; never dropped.
    /// Queued only with [`ServerConfig::fast_path`](super::ServerConfig::fast_path).
    pub fn poll_fast_path(&mut self) -> Option<FastPathChange> {
        self.fast_changes.pop_front()
    }

    /// Compares allocation `idx`'s announced bindings with those relayable now and queues
    /// the differences.
    pub(super) fn sync_fast_path(&mut self, idx: u32, now: Option<Instant>) {
        if !self.cfg.fast_path {
            return;
        }
        let Some(a) = self.table.get_mut(idx) else {
            return;
        };
        let wanted = a.relayable(now);
        for old in &a.fast {
            if !wanted.iter().any(|w| w.same(old)) {
                self.fast_changes.push_back(FastPathChange::Down(*old));
            }
        }
        for w in &wanted {
            if !a.fast.iter().any(|old| old == w) {
                self.fast_changes.push_back(FastPathChange::Up(*w));
            }
        }
        a.fast = wanted;
    }

    /// Announces the end of every binding of an allocation that is going away.
    pub(super) fn end_fast_path(&mut self, a: &Allocation) {
        for old in &a.fast {
            self.fast_changes.push_back(FastPathChange::Down(*old));
        }
    }
}
