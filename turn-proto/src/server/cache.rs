//! Bounded cache of recent responses so that a retransmitted request (same
//! 5-tuple and transaction ID) gets byte-identical bytes back (RFC 8489
//! §6.3.1: requests over UDP may be retransmitted; TURN's Allocate and
//! Refresh(0) are not idempotent).
//!
//! A fixed ring of entries; the buffers are reused, so a warmed-up cache
//! does not allocate. Entries older than the TTL are ignored.

use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use super::FiveTuple;
use crate::stun::TransactionId;

type Key = (FiveTuple, TransactionId);

struct Entry {
    key: Option<Key>,
    at: Instant,
    bytes: Vec<u8>,
}

pub(crate) struct RetransmitCache {
    ring: Vec<Entry>,
    capacity: usize,
    next: usize,
    index: FxHashMap<Key, usize>,
    ttl: Duration,
}

impl RetransmitCache {
    pub(crate) fn new(capacity: usize, ttl: Duration) -> Self {
        RetransmitCache { ring: Vec::new(), capacity, next: 0, index: FxHashMap::default(), ttl }
    }

    pub(crate) fn get(&self, ft: &FiveTuple, txid: &TransactionId, now: Instant) -> Option<&[u8]> {
        let i = *self.index.get(&(*ft, *txid))?;
        let e = self.ring.get(i)?;
        if now.saturating_duration_since(e.at) > self.ttl {
            return None;
        }
        Some(&e.bytes)
    }

    pub(crate) fn insert(
        &mut self,
        ft: FiveTuple,
        txid: TransactionId,
        now: Instant,
        bytes: &[u8],
    ) {
        if self.capacity == 0 {
            return;
        }
        let key = (ft, txid);
        if let Some(&i) = self.index.get(&key) {
            if let Some(e) = self.ring.get_mut(i) {
                e.at = now;
                e.bytes.clear();
                e.bytes.extend_from_slice(bytes);
            }
            return;
        }
        let i = self.next;
        self.next = (self.next + 1) % self.capacity;
        if i == self.ring.len() {
            self.ring.push(Entry {
                key: None,
                at: now,
                bytes: Vec::with_capacity(bytes.len().max(128)),
            });
        }
        let Some(e) = self.ring.get_mut(i) else {
            return;
        };
        if let Some(old) = e.key.take() {
            self.index.remove(&old);
        }
        e.key = Some(key);
        e.at = now;
        e.bytes.clear();
        e.bytes.extend_from_slice(bytes);
        self.index.insert(key, i);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
    use super::*;

    #[test]
    fn bounded_and_expiring() {
        // Tests need some Instant as the origin of simulated time.
        let t0 = Instant::now();
        let ft = FiveTuple::udp("192.0.2.1:1".parse().unwrap(), "192.0.2.2:3478".parse().unwrap());
        let mut c = RetransmitCache::new(2, Duration::from_secs(40));
        c.insert(ft, TransactionId([1; 12]), t0, b"one");
        c.insert(ft, TransactionId([2; 12]), t0, b"two");
        assert_eq!(c.get(&ft, &TransactionId([1; 12]), t0), Some(&b"one"[..]));
        c.insert(ft, TransactionId([3; 12]), t0, b"three");
        assert_eq!(c.get(&ft, &TransactionId([1; 12]), t0), None);
        assert_eq!(c.get(&ft, &TransactionId([3; 12]), t0), Some(&b"three"[..]));
        assert_eq!(c.index.len(), 2);
        let later = t0 + Duration::from_secs(41);
        assert_eq!(c.get(&ft, &TransactionId([3; 12]), later), None);
    }
}
