//! Per-source rate limits with bounded memory, shared by every worker of a daemon.
//!
//! A [`RateTable`] is a fixed table of token buckets indexed by a keyed hash of the source
//! address (not the port: a reflection victim is an address, and a guesser can change
//! ports; an IPv6 source counts by its /64, which a host usually has whole). However many
//! sources there are, the table does not grow; sources that collide share a bucket, which
//! only makes the limit stricter for them. Each bucket is one `AtomicU64` (refill time and
//! tokens packed together) updated with compare-and-swap, so the workers of a daemon share
//! one table ([`SourceLimits`]) without a lock: a sender that varies its source port, and
//! so lands on every worker, gets the configured rate in total, not once per worker.
//!
//! A 5-tuple that holds an allocation is not limited by these tables at all (see
//! `auth.rs`): its own failures count in its allocation's [`Bucket`], so that nobody
//! else's traffic, spoofed or real, can throttle a live allocation.
//!
//! Time is an argument (the protocol core never reads the clock).

use std::net::IpAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use super::ServerConfig;

/// Bits of a packed bucket that hold the tokens (in thousandths); the rest hold the
/// refill time in milliseconds since the table's origin, plus one (0: never used).
const TOKEN_BITS: u32 = 24;
const TOKEN_MASK: u64 = (1 << TOKEN_BITS) - 1;
/// The largest burst a packed bucket holds.
pub const MAX_BURST: u32 = (TOKEN_MASK / 1000) as u32;

/// What a source address counts as in per-address limits: an IPv4 address itself, an
/// IPv6 address by its /64 (a host, or a home, usually has a whole one; counting each of
/// its 2^64 addresses apart would be no limit at all).
pub fn source_key(ip: &IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => *ip,
        IpAddr::V6(a) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(*a) & !0u128 << 64)),
    }
}

/// One token bucket's arithmetic: `milli_tokens` refilled at `per_sec` tokens a second up
/// to `burst`, from `at_ms` to `now_ms`. `at_ms == 0` marks a bucket never used: full.
fn refilled(milli_tokens: u64, at_ms: u64, now_ms: u64, per_sec: u32, burst: u32) -> u64 {
    let full = u64::from(burst) * 1000;
    if at_ms == 0 {
        return full;
    }
    let elapsed = now_ms.saturating_sub(at_ms);
    milli_tokens.saturating_add(elapsed.saturating_mul(u64::from(per_sec))).min(full)
}

/// A token bucket owned by one allocation (single-threaded, inside its worker).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bucket {
    milli_tokens: u64,
    at_ms: u64,
}

impl Bucket {
    /// Takes one token at `now_ms` (milliseconds since any fixed origin, plus one);
    /// false when the bucket is empty.
    pub(crate) fn take(&mut self, now_ms: u64, per_sec: u32, burst: u32) -> bool {
        let tokens = refilled(self.milli_tokens, self.at_ms, now_ms, per_sec, burst);
        self.at_ms = now_ms.max(1);
        if tokens >= 1000 {
            self.milli_tokens = tokens - 1000;
            true
        } else {
            self.milli_tokens = tokens;
            false
        }
    }

    /// True when the bucket is empty at `now_ms` (takes nothing).
    pub(crate) fn exhausted(&self, now_ms: u64, per_sec: u32, burst: u32) -> bool {
        refilled(self.milli_tokens, self.at_ms, now_ms, per_sec, burst) < 1000
    }
}

/// A fixed table of token buckets keyed by source address, safe to share between threads.
pub struct RateTable {
    buckets: Box<[AtomicU64]>,
    mask: usize,
    key: u64,
    per_sec: AtomicU32,
    burst: AtomicU32,
    origin: OnceLock<Instant>,
}

impl std::fmt::Debug for RateTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateTable")
            .field("slots", &self.buckets.len())
            .field("per_sec", &self.per_sec.load(Ordering::Relaxed))
            .field("burst", &self.burst.load(Ordering::Relaxed))
            .finish()
    }
}

impl RateTable {
    /// `per_sec` tokens a second up to `burst` (at most [`MAX_BURST`]) per source, in a
    /// table of `slots` (rounded up to a power of two) buckets. `per_sec == 0` disables
    /// the limit.
    pub fn new(slots: usize, per_sec: u32, burst: u32, key: u64) -> RateTable {
        let n = slots.max(1).next_power_of_two();
        let table = RateTable {
            buckets: (0..n).map(|_| AtomicU64::new(0)).collect(),
            mask: n - 1,
            key,
            per_sec: AtomicU32::new(0),
            burst: AtomicU32::new(1),
            origin: OnceLock::new(),
        };
        table.set_rate(per_sec, burst);
        table
    }

    /// New rates; what the buckets hold stays (clipped to the new burst when next used).
    pub fn set_rate(&self, per_sec: u32, burst: u32) {
        self.per_sec.store(per_sec, Ordering::Relaxed);
        self.burst.store(burst.clamp(1, MAX_BURST), Ordering::Relaxed);
    }

    /// Memory the table takes, in bytes.
    pub fn table_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.buckets)
    }

    fn slot(&self, ip: &IpAddr) -> &AtomicU64 {
        let bits: u128 = match ip {
            IpAddr::V4(a) => u128::from(u32::from(*a)),
            // The /64 of an IPv6 address.
            IpAddr::V6(a) => u128::from(*a) >> 64 | 1 << 127,
        };
        let mut x = (bits as u64) ^ ((bits >> 64) as u64).rotate_left(17) ^ self.key;
        // splitmix64 finaliser.
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^= x >> 31;
        // The mask keeps the index below the table's length.
        &self.buckets[(x as usize) & self.mask]
    }

    fn now_ms(&self, now: Instant) -> u64 {
        let origin = *self.origin.get_or_init(|| now);
        // Plus one: 0 marks a bucket never used.
        (now.saturating_duration_since(origin).as_millis() as u64 + 1) & (u64::MAX >> TOKEN_BITS)
    }

    /// Takes one token for `ip` at `now`; false when its bucket is empty.
    pub fn allow(&self, ip: &IpAddr, now: Instant) -> bool {
        let per_sec = self.per_sec.load(Ordering::Relaxed);
        if per_sec == 0 {
            return true;
        }
        let burst = self.burst.load(Ordering::Relaxed);
        let now_ms = self.now_ms(now);
        let slot = self.slot(ip);
        let mut old = slot.load(Ordering::Relaxed);
        loop {
            let at_ms = old >> TOKEN_BITS;
            let tokens = refilled(old & TOKEN_MASK, at_ms, now_ms, per_sec, burst);
            if tokens < 1000 {
                return false;
            }
            // A worker whose clock reading is a little older must not move time back.
            let new = now_ms.max(at_ms) << TOKEN_BITS | (tokens - 1000);
            match slot.compare_exchange_weak(old, new, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(current) => old = current,
            }
        }
    }

    /// True when `ip`'s bucket is empty at `now` (takes nothing).
    pub fn exhausted(&self, ip: &IpAddr, now: Instant) -> bool {
        let per_sec = self.per_sec.load(Ordering::Relaxed);
        if per_sec == 0 {
            return false;
        }
        let burst = self.burst.load(Ordering::Relaxed);
        let packed = self.slot(ip).load(Ordering::Relaxed);
        refilled(packed & TOKEN_MASK, packed >> TOKEN_BITS, self.now_ms(now), per_sec, burst) < 1000
    }
}

/// The per-source limits of a daemon, shared by its workers' protocol cores
/// ([`Server::with_limits`](super::Server::with_limits)).
#[derive(Debug)]
pub struct SourceLimits {
    /// Unauthenticated answers (401, 400, 438) per source address.
    pub(crate) unauthenticated: RateTable,
    /// Failed authentications per source address (counted only for requests whose nonce
    /// the source was given, so that a spoofed source costs its owner nothing).
    pub(crate) failed_auth: RateTable,
    /// Binding answers per source address.
    pub(crate) binding: RateTable,
}

impl SourceLimits {
    /// Tables sized and rated from `cfg` (`source_limit_slots` buckets each).
    pub fn new(cfg: &ServerConfig) -> SourceLimits {
        let table = |per_sec, burst, key| {
            RateTable::new(cfg.source_limit_slots, per_sec, burst, cfg.seed ^ key)
        };
        SourceLimits {
            unauthenticated: table(
                cfg.unauthenticated_responses_per_sec,
                cfg.unauthenticated_responses_burst,
                0x51ed_270b_27c1_4a57,
            ),
            failed_auth: table(
                cfg.failed_auth_per_sec,
                cfg.failed_auth_burst,
                0x2545_f491_4f6c_dd1d,
            ),
            binding: table(
                cfg.binding_responses_per_sec,
                cfg.binding_responses_burst,
                0x6a09_e667_f3bc_c908,
            ),
        }
    }

    /// Takes `cfg`'s rates (a reload); the tables and what they hold stay.
    pub fn set_rates(&self, cfg: &ServerConfig) {
        self.unauthenticated
            .set_rate(cfg.unauthenticated_responses_per_sec, cfg.unauthenticated_responses_burst);
        self.failed_auth.set_rate(cfg.failed_auth_per_sec, cfg.failed_auth_burst);
        self.binding.set_rate(cfg.binding_responses_per_sec, cfg.binding_responses_burst);
    }

    /// Memory the tables take, in bytes.
    pub fn table_bytes(&self) -> usize {
        self.unauthenticated.table_bytes()
            + self.failed_auth.table_bytes()
            + self.binding.table_bytes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)]
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn bursts_then_the_rate() {
        // Tests need some Instant as the origin of simulated time.
        let t0 = Instant::now();
        let l = RateTable::new(1024, 10, 20, 7);
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
    fn an_ipv6_source_counts_by_its_64() {
        let t0 = Instant::now();
        let l = RateTable::new(1024, 1, 5, 7);
        for i in 0..5u16 {
            let ip: IpAddr = format!("2001:db8:1:2::{i:x}").parse().unwrap();
            assert!(l.allow(&ip, t0));
        }
        assert!(l.exhausted(&"2001:db8:1:2:ffff::1".parse().unwrap(), t0), "same /64");
        assert!(!l.exhausted(&"2001:db8:1:3::1".parse().unwrap(), t0), "the next /64");
    }

    #[test]
    fn threads_share_one_rate() {
        // Eight threads (eight workers) take from one source's bucket at once: together
        // they get the burst, not eight bursts.
        let t0 = Instant::now();
        let l = Arc::new(RateTable::new(64, 1, 100, 7));
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let taken: usize = (0..8)
            .map(|_| {
                let l = Arc::clone(&l);
                std::thread::spawn(move || (0..1000).filter(|_| l.allow(&ip, t0)).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(taken, 100);
    }

    #[test]
    fn the_table_does_not_grow_with_the_sources() {
        let t0 = Instant::now();
        let l = RateTable::new(4096, 10, 20, 7);
        let before = l.table_bytes();
        for i in 0..200_000u32 {
            l.allow(&IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)), t0);
        }
        assert_eq!(l.table_bytes(), before);
        assert!(before <= 4096 * 8);
    }

    #[test]
    fn a_zero_rate_is_no_limit_and_rates_change_in_place() {
        let t0 = Instant::now();
        let l = RateTable::new(16, 0, 1, 7);
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        assert!((0..1000).all(|_| l.allow(&ip, t0)));
        assert!(!l.exhausted(&ip, t0));
        l.set_rate(1, 2);
        assert_eq!((0..10).filter(|_| l.allow(&ip, t0)).count(), 2);
        // A burst beyond what a packed bucket holds is clipped, not wrapped.
        l.set_rate(1, u32::MAX);
        let other: IpAddr = "192.0.2.10".parse().unwrap();
        assert_eq!((0..20_000).filter(|_| l.allow(&other, t0)).count(), MAX_BURST as usize);
    }

    #[test]
    fn an_allocations_own_bucket() {
        let mut b = Bucket::default();
        assert_eq!((0..20).filter(|_| b.take(1, 1, 10)).count(), 10);
        assert!(b.exhausted(1, 1, 10));
        assert!(b.take(1001, 1, 10), "one token a second");
        assert!(!b.take(1001, 1, 10));
    }
}
