//! The little state workers share, all of it on cold paths: allocation quotas, the
//! directory that says which worker owns a 5-tuple (so that a datagram that reached the
//! wrong worker is handed to its owner instead of being answered with 437), and the
//! connection limits (taken when a TCP or TLS connection is accepted, given back when it
//! closes).

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash},
    net::IpAddr,
    sync::{
        Mutex, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use turn_proto::server::{FiveTuple, Quota, QuotaExceeded};

/// Per-user and total allocation quotas across all workers (0 = unlimited). Called once
/// per allocation created and once per allocation gone.
#[derive(Debug, Default)]
pub struct SharedQuota {
    per_user: AtomicUsize,
    total: AtomicUsize,
    in_use: AtomicUsize,
    users: Mutex<HashMap<String, usize>>,
}

impl SharedQuota {
    pub fn new(per_user: usize, total: usize) -> Self {
        let quota = Self::default();
        quota.set_limits(per_user, total);
        quota
    }

    /// New limits (reload): they apply to the allocations that follow; none held is
    /// taken back.
    pub fn set_limits(&self, per_user: usize, total: usize) {
        self.per_user.store(per_user, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }

    /// Allocations held across all workers.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }
}

impl Quota for SharedQuota {
    fn try_acquire(&self, user: &str) -> Result<(), QuotaExceeded> {
        // A poisoned lock means a worker panicked while counting: refuse rather than guess.
        let mut users = self.users.lock().map_err(|_| QuotaExceeded)?;
        let held = users.get(user).copied().unwrap_or(0);
        let (per_user, total) =
            (self.per_user.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed));
        if (per_user > 0 && held >= per_user)
            || (total > 0 && self.in_use.load(Ordering::Relaxed) >= total)
        {
            return Err(QuotaExceeded);
        }
        users.insert(user.to_owned(), held + 1);
        self.in_use.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn release(&self, user: &str) {
        let Ok(mut users) = self.users.lock() else { return };
        if let Some(held) = users.get_mut(user) {
            *held -= 1;
            if *held == 0 {
                users.remove(user);
            }
            self.in_use.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Why a connection was refused by [`ConnectionLimits`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitReached {
    /// `max_connections` across all workers.
    Total,
    /// `max_connections_per_ip` for this source address.
    PerAddress,
}

/// Connections held at once: in total and per source address (0 = unlimited).
#[derive(Debug, Default)]
pub struct ConnectionLimits {
    max_total: AtomicUsize,
    max_per_address: AtomicUsize,
    total: AtomicUsize,
    per_address: Mutex<HashMap<IpAddr, usize>>,
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_address: usize) -> Self {
        let limits = Self::default();
        limits.set_limits(max_total, max_per_address);
        limits
    }

    /// New limits (reload): they apply to the connections that follow; none open is
    /// closed.
    pub fn set_limits(&self, max_total: usize, max_per_address: usize) {
        self.max_total.store(max_total, Ordering::Relaxed);
        self.max_per_address.store(max_per_address, Ordering::Relaxed);
    }

    /// Takes one connection for `ip`.
    pub fn try_acquire(&self, ip: IpAddr) -> Result<(), LimitReached> {
        // A poisoned lock means a worker panicked while counting: refuse rather than guess.
        let mut map = self.per_address.lock().map_err(|_| LimitReached::Total)?;
        let max_total = self.max_total.load(Ordering::Relaxed);
        if max_total > 0 && self.total.load(Ordering::Relaxed) >= max_total {
            return Err(LimitReached::Total);
        }
        let max_per_address = self.max_per_address.load(Ordering::Relaxed);
        let held = map.entry(ip).or_insert(0);
        if max_per_address > 0 && *held >= max_per_address {
            return Err(LimitReached::PerAddress);
        }
        *held += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Gives back a connection of `ip` taken with [`Self::try_acquire`].
    pub fn release(&self, ip: IpAddr) {
        let Ok(mut map) = self.per_address.lock() else { return };
        if let Some(held) = map.get_mut(&ip) {
            *held -= 1;
            if *held == 0 {
                map.remove(&ip);
            }
            self.total.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Connections held across all workers.
    pub fn held(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

const SHARDS: usize = 16;

/// Which worker owns each live allocation, by 5-tuple. Read only when a worker gets a
/// datagram for a 5-tuple it has no allocation for.
#[derive(Debug)]
pub struct Directory {
    shards: [RwLock<HashMap<FiveTuple, usize>>; SHARDS],
    hasher: std::hash::RandomState,
}

impl Default for Directory {
    fn default() -> Self {
        Self {
            shards: std::array::from_fn(|_| RwLock::default()),
            hasher: std::hash::RandomState::new(),
        }
    }
}

impl Directory {
    fn shard(&self, key: &FiveTuple) -> &RwLock<HashMap<FiveTuple, usize>> {
        let mut h = self.hasher.build_hasher();
        key.hash(&mut h);
        &self.shards[(std::hash::Hasher::finish(&h) as usize) % SHARDS]
    }

    pub fn insert(&self, key: FiveTuple, worker: usize) {
        if let Ok(mut shard) = self.shard(&key).write() {
            shard.insert(key, worker);
        }
    }

    pub fn remove(&self, key: &FiveTuple, worker: usize) {
        if let Ok(mut shard) = self.shard(key).write()
            && shard.get(key) == Some(&worker)
        {
            shard.remove(key);
        }
    }

    pub fn owner(&self, key: &FiveTuple) -> Option<usize> {
        self.shard(key).read().ok()?.get(key).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_per_user_and_total() {
        let q = SharedQuota::new(2, 3);
        assert!(q.try_acquire("a").is_ok());
        assert!(q.try_acquire("a").is_ok());
        assert_eq!(q.try_acquire("a"), Err(QuotaExceeded));
        assert!(q.try_acquire("b").is_ok());
        assert_eq!(q.try_acquire("c"), Err(QuotaExceeded), "total reached");
        q.release("a");
        assert!(q.try_acquire("c").is_ok());
        assert_eq!(q.in_use(), 3);
        q.release("nobody");
        assert_eq!(q.in_use(), 3);
    }

    #[test]
    fn zero_means_unlimited() {
        let q = SharedQuota::new(0, 0);
        for _ in 0..1000 {
            assert!(q.try_acquire("a").is_ok());
        }
    }

    #[test]
    fn connection_limits_total_and_per_address() {
        let limits = ConnectionLimits::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(limits.try_acquire(a), Ok(()));
        assert_eq!(limits.try_acquire(a), Ok(()));
        assert_eq!(limits.try_acquire(a), Err(LimitReached::PerAddress));
        assert_eq!(limits.try_acquire(b), Ok(()));
        assert_eq!(limits.try_acquire(b), Err(LimitReached::Total));
        limits.release(a);
        assert_eq!(limits.held(), 2);
        assert_eq!(limits.try_acquire(b), Ok(()));
        limits.release("192.0.2.9".parse().unwrap()); // never taken: no effect
        assert_eq!(limits.held(), 3);
        let unlimited = ConnectionLimits::new(0, 0);
        for _ in 0..10_000 {
            assert!(unlimited.try_acquire(a).is_ok());
        }
    }

    #[test]
    fn directory_owner_and_guarded_remove() {
        let d = Directory::default();
        let ft = FiveTuple::udp("10.0.0.1:5000".parse().unwrap(), "10.0.0.2:3478".parse().unwrap());
        assert_eq!(d.owner(&ft), None);
        d.insert(ft, 3);
        assert_eq!(d.owner(&ft), Some(3));
        d.remove(&ft, 1); // not the owner: no effect
        assert_eq!(d.owner(&ft), Some(3));
        d.remove(&ft, 3);
        assert_eq!(d.owner(&ft), None);
    }
}
