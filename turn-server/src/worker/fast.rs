//! A worker's share of the kernel fast path: it writes the bindings of its allocations as
//! the protocol core announces them, and brings what the kernel relayed for them back into
//! the allocations' traffic (session log, `turn-server allocations`, per-user metrics) and
//! the worker's counters.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use tracing::debug;
use turn_common::fast::Traffic;
use turn_proto::server::{AllocationTraffic, FastBinding, FastPathChange, FiveTuple, Server};

use super::{WorkerStats, bump};
use crate::fast_path::FastMaps;

/// A binding with its entries in the kernel.
struct Live {
    binding: FastBinding,
    slot: u32,
    /// Its counters when last read.
    seen: Traffic,
}

/// The bindings of one worker's allocations in the kernel maps.
pub struct FastBindings {
    maps: FastMaps,
    live: HashMap<(FiveTuple, u16), Live>,
    /// What ended bindings relayed since their counters were last read, for allocations
    /// already deleted (their session line is written after).
    ended: HashMap<FiveTuple, AllocationTraffic>,
    /// Slots of ended bindings, returned at the next read of the counters: a program run
    /// that still holds the old entry (an RCU grace period) counts in the old slot, not in
    /// a new binding's.
    retiring: Vec<u32>,
}

fn delta(now: &Traffic, seen: &Traffic) -> AllocationTraffic {
    AllocationTraffic {
        to_peer_packets: now.to_peer_packets.wrapping_sub(seen.to_peer_packets),
        to_peer_bytes: now.to_peer_bytes.wrapping_sub(seen.to_peer_bytes),
        to_client_packets: now.to_client_packets.wrapping_sub(seen.to_client_packets),
        to_client_bytes: now.to_client_bytes.wrapping_sub(seen.to_client_bytes),
    }
}

impl FastBindings {
    pub fn new(maps: FastMaps) -> FastBindings {
        FastBindings { maps, live: HashMap::new(), ended: HashMap::new(), retiring: Vec::new() }
    }

    /// Applies one change of the core's bindings. `bound` gives a relay's bound address: a
    /// binding whose relay is bound elsewhere than its advertised address (behind a NAT,
    /// or to a wildcard) stays with the workers, since the kernel sees the bound one.
    pub fn apply(
        &mut self,
        change: FastPathChange,
        server: &mut Server,
        stats: &WorkerStats,
        bound: impl Fn(turn_proto::server::RelayId) -> Option<std::net::SocketAddr>,
    ) {
        match change {
            FastPathChange::Up(b) if bound(b.relay.id) != Some(b.relay.addr) => {
                if let Some(old) = self.live.remove(&(b.five_tuple, b.channel)) {
                    self.maps.remove(&old.binding);
                    self.settle(old, server, stats);
                }
            }
            FastPathChange::Up(b) => {
                let key = (b.five_tuple, b.channel);
                let (slot, fresh) = match self.live.get(&key) {
                    Some(live) => (live.slot, false),
                    None => match self.maps.take_slot() {
                        Ok(slot) => (slot, true),
                        Err(e) => {
                            // The binding stays on the userspace path.
                            bump(&stats.fast_failures, 1);
                            debug!(error = %e, client = %b.five_tuple.client, "fast path: no slot");
                            return;
                        }
                    },
                };
                match self.maps.write(&b, slot) {
                    Ok(()) => {
                        let seen = if fresh {
                            Traffic::default()
                        } else {
                            self.live.get(&key).map_or_else(Traffic::default, |l| l.seen)
                        };
                        self.live.insert(key, Live { binding: b, slot, seen });
                    }
                    Err(e) => {
                        bump(&stats.fast_failures, 1);
                        debug!(error = %e, client = %b.five_tuple.client, "fast path: entry not written");
                        if let Some(old) = self.live.remove(&key) {
                            self.settle(old, server, stats);
                        } else {
                            self.retiring.push(slot);
                        }
                    }
                }
            }
            FastPathChange::Down(b) => {
                if let Some(live) = self.live.remove(&(b.five_tuple, b.channel)) {
                    self.maps.remove(&live.binding);
                    self.settle(live, server, stats);
                }
            }
        }
        stats.fast_bindings.store(self.live.len() as u64, Ordering::Relaxed);
    }

    /// A binding whose entries are gone: its last counts go to its allocation (or, when
    /// that is already deleted, wait for its session line), its slot back to the pool.
    fn settle(&mut self, live: Live, server: &mut Server, stats: &WorkerStats) {
        let last = delta(&self.maps.traffic(live.slot), &live.seen);
        account(stats, &last);
        if !server.add_kernel_traffic(&live.binding.five_tuple, last) {
            self.ended.entry(live.binding.five_tuple).or_default().add(&last);
        }
        self.retiring.push(live.slot);
    }

    /// Reads the counters of every live binding and adds what they relayed since the last
    /// read to their allocations and the worker's counters.
    pub fn collect(&mut self, server: &mut Server, stats: &WorkerStats) {
        // Half a second after their bindings ended: no program run holds their entries.
        for slot in self.retiring.drain(..) {
            self.maps.give_back(slot);
        }
        for live in self.live.values_mut() {
            let now = self.maps.traffic(live.slot);
            let d = delta(&now, &live.seen);
            if d == AllocationTraffic::default() {
                continue;
            }
            live.seen = now;
            account(stats, &d);
            server.add_kernel_traffic(&live.binding.five_tuple, d);
        }
    }

    /// True when the kernel relays `channel` of `five_tuple`'s allocation.
    pub fn relays(&self, five_tuple: &FiveTuple, channel: u16) -> bool {
        self.live.contains_key(&(*five_tuple, channel))
    }

    /// What the kernel relayed for a deleted allocation after its last read.
    pub fn take_ended(&mut self, five_tuple: &FiveTuple) -> Option<AllocationTraffic> {
        self.ended.remove(five_tuple)
    }
}

fn account(stats: &WorkerStats, d: &AllocationTraffic) {
    bump(&stats.fast_to_peer_packets, d.to_peer_packets);
    bump(&stats.fast_to_peer_bytes, d.to_peer_bytes);
    bump(&stats.fast_to_client_packets, d.to_client_packets);
    bump(&stats.fast_to_client_bytes, d.to_client_bytes);
}
