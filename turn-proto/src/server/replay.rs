//! Replay protection for Allocate: a captured authenticated Allocate request, sent again
//! from the same (spoofed) 5-tuple while its nonce is still valid, must not re-create an
//! allocation the client deleted, nor charge the user's quota.
//!
//! Nonces are stateless and bound to the client's address, so the server cannot tell a
//! replay from a new request by the nonce alone. Instead, when an allocation ends the
//! server keeps a tombstone of its 5-tuple with the time it ended, for as long as a nonce
//! issued before that time can be valid; an Allocate on that 5-tuple whose nonce was issued
//! at or before the tombstone gets 438 (Stale Nonce) with a fresh nonce, issued after the
//! tombstone. A real client retries with the fresh nonce (one more round trip, only when it
//! re-allocates on the same 5-tuple within a nonce lifetime); a replay cannot, since it
//! cannot sign with a nonce it never saw.
//!
//! Memory is bounded: at most `capacity` tombstones. When a new one does not fit, the
//! oldest is dropped and its time becomes a floor: every Allocate whose nonce was issued at
//! or before the floor is treated as if it had a tombstone (clients retry once).

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use super::FiveTuple;

pub(crate) struct Tombstones {
    by_tuple: FxHashMap<FiveTuple, u64>,
    order: VecDeque<(FiveTuple, u64)>,
    capacity: usize,
    lifetime_secs: u64,
    floor: u64,
}

impl Tombstones {
    pub(crate) fn new(capacity: usize, nonce_lifetime_secs: u64) -> Self {
        Tombstones {
            by_tuple: FxHashMap::default(),
            order: VecDeque::new(),
            capacity,
            lifetime_secs: nonce_lifetime_secs,
            floor: 0,
        }
    }

    /// Tombstones held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_tuple.len()
    }

    /// An allocation of `ft` ended at wall time `unix_secs`. A nonce this table had
    /// issued ahead of time for `ft` (after an earlier end within the same second) is
    /// covered too.
    pub(crate) fn record(&mut self, ft: FiveTuple, unix_secs: u64) {
        self.prune(unix_secs);
        let unix_secs = self.by_tuple.get(&ft).map_or(unix_secs, |&at| unix_secs.max(at + 1));
        if self.capacity == 0 {
            self.floor = self.floor.max(unix_secs);
            return;
        }
        while self.by_tuple.len() >= self.capacity {
            let Some((old, at)) = self.order.pop_front() else { break };
            if self.by_tuple.get(&old) == Some(&at) {
                self.by_tuple.remove(&old);
                self.floor = self.floor.max(at);
            }
        }
        self.by_tuple.insert(ft, unix_secs);
        self.order.push_back((ft, unix_secs));
    }

    /// Forgets tombstones no valid nonce can predate any more.
    fn prune(&mut self, unix_secs: u64) {
        while let Some(&(ft, at)) = self.order.front() {
            if unix_secs.saturating_sub(at) < self.lifetime_secs {
                break;
            }
            self.order.pop_front();
            if self.by_tuple.get(&ft) == Some(&at) {
                self.by_tuple.remove(&ft);
            }
        }
    }

    /// True when an Allocate on `ft` signed with a nonce issued at `issued` may be a
    /// replay.
    pub(crate) fn refuses(&self, ft: &FiveTuple, issued: u64) -> bool {
        issued <= self.floor || self.by_tuple.get(ft).is_some_and(|&at| issued <= at)
    }

    /// The issue time to put in a fresh nonce for `ft`: after its tombstone and the floor,
    /// so that the retry is accepted (the nonce check tolerates a few seconds ahead).
    pub(crate) fn nonce_time(&self, ft: &FiveTuple, unix_secs: u64) -> u64 {
        let after = self.by_tuple.get(ft).map_or(self.floor, |&at| at.max(self.floor));
        if after >= unix_secs { after + 1 } else { unix_secs }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn ft(port: u16) -> FiveTuple {
        FiveTuple::udp(
            format!("192.0.2.1:{port}").parse().unwrap(),
            "192.0.2.2:3478".parse().unwrap(),
        )
    }

    #[test]
    fn a_nonce_from_before_the_end_is_refused_until_it_expires() {
        let mut t = Tombstones::new(10, 600);
        t.record(ft(1), 1000);
        assert!(t.refuses(&ft(1), 990) && t.refuses(&ft(1), 1000));
        assert!(!t.refuses(&ft(1), 1001), "a nonce issued after the end");
        assert!(!t.refuses(&ft(2), 990), "another 5-tuple");
        // The fresh nonce is issued after the tombstone even within the same second.
        assert_eq!(t.nonce_time(&ft(1), 1000), 1001);
        assert_eq!(t.nonce_time(&ft(1), 1005), 1005);
        assert_eq!(t.nonce_time(&ft(2), 1000), 1000);
        // Ending again within the second covers the nonce issued ahead for the retry.
        let mut again = Tombstones::new(10, 600);
        again.record(ft(1), 1000);
        let issued = again.nonce_time(&ft(1), 1000);
        again.record(ft(1), 1000);
        assert!(again.refuses(&ft(1), issued));
        // Once no nonce from before the end can be valid, the tombstone goes.
        t.record(ft(3), 1600);
        assert_eq!(t.len(), 1);
        assert!(!t.refuses(&ft(1), 990));
    }

    #[test]
    fn a_full_table_raises_the_floor_instead_of_forgetting() {
        let mut t = Tombstones::new(2, 600);
        t.record(ft(1), 1000);
        t.record(ft(2), 1001);
        t.record(ft(3), 1002);
        assert_eq!(t.len(), 2);
        // ft(1)'s tombstone was dropped, but its time is now the floor.
        assert!(t.refuses(&ft(1), 1000));
        assert!(t.refuses(&ft(9), 999), "every nonce from before the floor");
        assert!(!t.refuses(&ft(9), 1001));
        assert_eq!(t.nonce_time(&ft(9), 1000), 1001);
        let mut none = Tombstones::new(0, 600);
        none.record(ft(1), 50);
        assert!(none.refuses(&ft(7), 50) && !none.refuses(&ft(7), 51));
    }
}
