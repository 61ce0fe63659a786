//! Per-source rate limits with bounded memory: a fixed table of token buckets indexed by
//! a keyed hash of the source IP address (not the port: a reflection victim is an address,
//! and a guesser can change ports). However many sources there are, the table does not
//! grow; sources that collide share a bucket, which only makes the limit stricter for
//! them.
//!
//! Time is an argument (the protocol core never reads the clock).

use std::net::IpAddr;
use std::time::Instant;

#[derive(Clone, Copy, Default)]
struct Bucket {
    /// Tokens, in thousandths.
    milli_tokens: u32,
    /// When the bucket was last refilled, in milliseconds since the limiter's origin.
    at_ms: u64,
}

pub(crate) struct SourceLimiter {
    buckets: Box<[Bucket]>,
    mask: usize,
    key: u64,
    per_sec: u32,
    burst: u32,
    origin: Option<Instant>,
}

impl SourceLimiter {
    /// `per_sec` tokens a second up to `burst`, in a table of `slots` (rounded up to a
    /// power of two) buckets. `per_sec == 0` disables the limit.
    pub(crate) fn new(slots: usize, per_sec: u32, burst: u32, key: u64) -> Self {
        let n = if per_sec == 0 { 1 } else { slots.max(1).next_power_of_two() };
        SourceLimiter {
            buckets: vec![Bucket::default(); n].into_boxed_slice(),
            mask: n - 1,
            key,
            per_sec,
            burst: burst.max(1),
            origin: None,
        }
    }

    /// Memory the table takes, in bytes.
    #[cfg(test)]
    pub(crate) fn table_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.buckets)
    }

    fn slot(&self, ip: &IpAddr) -> usize {
        let bits: u128 = match ip {
            IpAddr::V4(a) => u128::from(u32::from(*a)),
            // /64 of an IPv6 address: a host usually has a whole one.
            IpAddr::V6(a) => {
                u128::from(a.octets()[..8].iter().fold(0u64, |h, b| h << 8 | u64::from(*b)))
                    | 1 << 127
            }
        };
        let mut x = (bits as u64) ^ ((bits >> 64) as u64).rotate_left(17) ^ self.key;
        // splitmix64 finaliser.
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        (x as usize) & self.mask
    }

    /// Refills `ip`'s bucket to `now` and returns it (None: limit disabled).
    fn refill(&mut self, ip: &IpAddr, now: Instant) -> Option<&mut Bucket> {
        if self.per_sec == 0 {
            return None;
        }
        let origin = *self.origin.get_or_insert(now);
        // Plus one: 0 marks a bucket never used.
        let now_ms = now.saturating_duration_since(origin).as_millis() as u64 + 1;
        let full = self.burst.saturating_mul(1000);
        let (per_sec, slot) = (self.per_sec, self.slot(ip));
        let b = self.buckets.get_mut(slot)?;
        if b.at_ms == 0 {
            // Never used: starts full.
            *b = Bucket { milli_tokens: full, at_ms: now_ms };
        } else {
            let elapsed = now_ms.saturating_sub(b.at_ms);
            let refill = elapsed.saturating_mul(u64::from(per_sec)).min(u64::from(full)) as u32;
            b.milli_tokens = b.milli_tokens.saturating_add(refill).min(full);
            b.at_ms = now_ms;
        }
        Some(b)
    }

    /// Takes one token for `ip` at `now`; false when its bucket is empty.
    pub(crate) fn allow(&mut self, ip: &IpAddr, now: Instant) -> bool {
        match self.refill(ip, now) {
            None => true,
            Some(b) if b.milli_tokens >= 1000 => {
                b.milli_tokens -= 1000;
                true
            }
            Some(_) => false,
        }
    }

    /// True when `ip`'s bucket is empty at `now` (takes nothing).
    pub(crate) fn exhausted(&mut self, ip: &IpAddr, now: Instant) -> bool {
        self.refill(ip, now).is_some_and(|b| b.milli_tokens < 1000)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
    use super::*;
    use std::time::Duration;

    #[test]
    fn bursts_then_the_rate() {
        // Tests need some Instant as the origin of simulated time.
        let t0 = Instant::now();
        let mut l = SourceLimiter::new(1024, 10, 20, 7);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(!l.exhausted(&a, t0));
        let allowed = (0..100).filter(|_| l.allow(&a, t0)).count();
        assert_eq!(allowed, 20, "the burst");
        assert!(l.exhausted(&a, t0) && l.exhausted(&a, t0), "looking takes nothing");
        assert!(l.allow(&b, t0), "another source has its own bucket");
        // One second later: ten more.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..100).filter(|_| l.allow(&a, t1)).count(), 10);
        // Idle for long: back to the burst, no more.
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!((0..100).filter(|_| l.allow(&a, t2)).count(), 20);
    }

    #[test]
    fn the_table_does_not_grow_with_the_sources() {
        let t0 = Instant::now();
        let mut l = SourceLimiter::new(4096, 10, 20, 7);
        let before = l.table_bytes();
        for i in 0..200_000u32 {
            l.allow(&IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)), t0);
        }
        assert_eq!(l.table_bytes(), before);
        assert!(before <= 4096 * 16);
        let off = SourceLimiter::new(4096, 0, 20, 7);
        assert!(off.table_bytes() <= 16);
    }
}
