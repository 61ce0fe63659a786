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

use turn_proto::server::{FiveTuple, Quota, QuotaExceeded, source_key};

/// Per-user, per-address and total allocation quotas across all workers (0 = unlimited).
/// Called once per allocation created and once per allocation gone.
#[derive(Debug, Default)]
pub struct SharedQuota {
    per_user: AtomicUsize,
    per_address: AtomicUsize,
    total: AtomicUsize,
    in_use: AtomicUsize,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    users: HashMap<String, usize>,
    /// By [`source_key`]: an IPv6 client counts by its /64.
    addresses: HashMap<IpAddr, usize>,
}

impl SharedQuota {
    pub fn new(per_user: usize, per_address: usize, total: usize) -> Self {
        let quota = Self::default();
        quota.set_limits(per_user, per_address, total);
        quota
    }

    /// New limits (reload): they apply to the allocations that follow; none held is
    /// taken back.
    pub fn set_limits(&self, per_user: usize, per_address: usize, total: usize) {
        self.per_user.store(per_user, Ordering::Relaxed);
        self.per_address.store(per_address, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }

    /// Allocations held across all workers.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }
}

impl Quota for SharedQuota {
    fn try_acquire(&self, user: &str, client: IpAddr) -> Result<(), QuotaExceeded> {
        // A poisoned lock means a worker panicked while counting: refuse rather than guess.
        let mut held = self.held.lock().map_err(|_| QuotaExceeded)?;
        let address = source_key(&client);
        let by_user = held.users.get(user).copied().unwrap_or(0);
        let by_address = held.addresses.get(&address).copied().unwrap_or(0);
        let (per_user, per_address, total) = (
            self.per_user.load(Ordering::Relaxed),
            self.per_address.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        );
        if (per_user > 0 && by_user >= per_user)
            || (per_address > 0 && by_address >= per_address)
            || (total > 0 && self.in_use.load(Ordering::Relaxed) >= total)
        {
            return Err(QuotaExceeded);
        }
        held.users.insert(user.to_owned(), by_user + 1);
        held.addresses.insert(address, by_address + 1);
        self.in_use.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn release(&self, user: &str, client: IpAddr) {
        let Ok(mut held) = self.held.lock() else { return };
        let Some(n) = held.users.get_mut(user) else { return };
        *n -= 1;
        if *n == 0 {
            held.users.remove(user);
        }
        let address = source_key(&client);
        if let Some(n) = held.addresses.get_mut(&address) {
            *n -= 1;
            if *n == 0 {
                held.addresses.remove(&address);
            }
        }
        self.in_use.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a connection was refused by [`ConnectionLimits`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitReached {
    /// `max_connections` across all workers.
    Total,
    /// `max_connections_per_ip` for this source address.
    PerAddress,
    /// `max_unauthenticated_connections` across all workers (a worker may close its oldest
    /// connection without an allocation to make room).
    Unauthenticated,
    /// `max_unauthenticated_connections_per_ip` for this source address.
    UnauthenticatedPerAddress,
}

/// The connection caps (0 = unlimited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionCaps {
    /// Connections held at once, across workers.
    pub total: usize,
    /// ... per source address.
    pub per_address: usize,
    /// Connections without an allocation yet, across workers.
    pub unauthenticated: usize,
    /// ... per source address.
    pub unauthenticated_per_address: usize,
}

impl ConnectionCaps {
    /// The caps of a configuration.
    pub fn of(config: &crate::config::Config) -> ConnectionCaps {
        ConnectionCaps {
            total: config.max_connections,
            per_address: config.max_connections_per_ip,
            unauthenticated: config.max_unauthenticated_connections,
            unauthenticated_per_address: config.max_unauthenticated_connections_per_ip,
        }
    }
}

/// Connections held at once, in total and per source address (an IPv6 address counts by
/// its /64: whoever has one address of a /64 usually has them all), with a smaller budget
/// of their own for connections that have no allocation yet: strangers, however many
/// addresses they connect from, hold at most `unauthenticated` of the `total` slots, and
/// clients that logged in keep the rest.
#[derive(Debug, Default)]
pub struct ConnectionLimits {
    caps: Mutex<ConnectionCaps>,
    held: Mutex<HeldConnections>,
}

#[derive(Debug, Default)]
struct HeldConnections {
    total: usize,
    unauthenticated: usize,
    /// Per source key: (all, unauthenticated).
    per_address: HashMap<IpAddr, (usize, usize)>,
}

impl ConnectionLimits {
    pub fn new(caps: ConnectionCaps) -> Self {
        let limits = Self::default();
        limits.set_limits(caps);
        limits
    }

    /// New limits (reload): they apply to the connections that follow; none open is
    /// closed.
    pub fn set_limits(&self, caps: ConnectionCaps) {
        if let Ok(mut current) = self.caps.lock() {
            *current = caps;
        }
    }

    fn caps(&self) -> ConnectionCaps {
        self.caps.lock().map(|c| *c).unwrap_or_default()
    }

    /// Takes one connection for `ip`, without an allocation yet.
    pub fn try_acquire(&self, ip: IpAddr) -> Result<(), LimitReached> {
        let caps = self.caps();
        // A poisoned lock means a worker panicked while counting: refuse rather than guess.
        let mut held = self.held.lock().map_err(|_| LimitReached::Total)?;
        if caps.total > 0 && held.total >= caps.total {
            return Err(LimitReached::Total);
        }
        let (all, unauthenticated) =
            held.per_address.get(&source_key(&ip)).copied().unwrap_or((0, 0));
        if caps.per_address > 0 && all >= caps.per_address {
            return Err(LimitReached::PerAddress);
        }
        if caps.unauthenticated_per_address > 0
            && unauthenticated >= caps.unauthenticated_per_address
        {
            return Err(LimitReached::UnauthenticatedPerAddress);
        }
        if caps.unauthenticated > 0 && held.unauthenticated >= caps.unauthenticated {
            return Err(LimitReached::Unauthenticated);
        }
        held.per_address.insert(source_key(&ip), (all + 1, unauthenticated + 1));
        held.total += 1;
        held.unauthenticated += 1;
        Ok(())
    }

    /// A connection of `ip` taken with [`Self::try_acquire`] got its allocation: it no
    /// longer counts as unauthenticated.
    pub fn authenticated(&self, ip: IpAddr) {
        let Ok(mut held) = self.held.lock() else { return };
        let Some(entry) = held.per_address.get_mut(&source_key(&ip)) else { return };
        if entry.1 > 0 {
            entry.1 -= 1;
            held.unauthenticated = held.unauthenticated.saturating_sub(1);
        }
    }

    /// Gives back a connection of `ip` (`authenticated`: [`Self::authenticated`] was
    /// called for it).
    pub fn release(&self, ip: IpAddr, authenticated: bool) {
        let Ok(mut held) = self.held.lock() else { return };
        let key = source_key(&ip);
        let Some(entry) = held.per_address.get_mut(&key) else { return };
        entry.0 -= 1;
        let unauthenticated = !authenticated && entry.1 > 0;
        if unauthenticated {
            entry.1 -= 1;
        }
        if entry.0 == 0 {
            held.per_address.remove(&key);
        }
        held.total = held.total.saturating_sub(1);
        if unauthenticated {
            held.unauthenticated = held.unauthenticated.saturating_sub(1);
        }
    }

    /// Connections held across all workers, and how many of them have no allocation yet.
    pub fn held(&self) -> (usize, usize) {
        self.held.lock().map_or((0, 0), |h| (h.total, h.unauthenticated))
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
    fn quotas_per_user_per_address_and_total() {
        let q = SharedQuota::new(2, 0, 3);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(q.try_acquire("a", ip).is_ok());
        assert!(q.try_acquire("a", ip).is_ok());
        assert_eq!(q.try_acquire("a", ip), Err(QuotaExceeded));
        assert!(q.try_acquire("b", ip).is_ok());
        assert_eq!(q.try_acquire("c", ip), Err(QuotaExceeded), "total reached");
        q.release("a", ip);
        assert!(q.try_acquire("c", ip).is_ok());
        assert_eq!(q.in_use(), 3);
        q.release("nobody", ip);
        assert_eq!(q.in_use(), 3);
        // Per address: an IPv6 client by its /64, whatever user it names.
        let q = SharedQuota::new(0, 2, 0);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2::2".parse().unwrap();
        assert!(q.try_acquire("1700000000", a).is_ok());
        assert!(q.try_acquire("1700000001", b).is_ok());
        assert_eq!(q.try_acquire("1700000002", b), Err(QuotaExceeded));
        assert!(q.try_acquire("x", "2001:db8:1:3::1".parse().unwrap()).is_ok());
        q.release("1700000000", a);
        assert!(q.try_acquire("1700000002", b).is_ok());
    }

    #[test]
    fn zero_means_unlimited() {
        let q = SharedQuota::new(0, 0, 0);
        for _ in 0..1000 {
            assert!(q.try_acquire("a", "192.0.2.1".parse().unwrap()).is_ok());
        }
    }

    #[test]
    fn connection_limits_total_and_per_address() {
        let caps = ConnectionCaps { total: 3, per_address: 2, ..Default::default() };
        let limits = ConnectionLimits::new(caps);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(limits.try_acquire(a), Ok(()));
        assert_eq!(limits.try_acquire(a), Ok(()));
        assert_eq!(limits.try_acquire(a), Err(LimitReached::PerAddress));
        assert_eq!(limits.try_acquire(b), Ok(()));
        assert_eq!(limits.try_acquire(b), Err(LimitReached::Total));
        limits.release(a, false);
        assert_eq!(limits.held(), (2, 2));
        assert_eq!(limits.try_acquire(b), Ok(()));
        limits.release("192.0.2.9".parse().unwrap(), false); // never taken: no effect
        assert_eq!(limits.held(), (3, 3));
        let unlimited = ConnectionLimits::new(ConnectionCaps::default());
        for _ in 0..10_000 {
            assert!(unlimited.try_acquire(a).is_ok());
        }
    }

    #[test]
    fn strangers_have_a_budget_of_their_own_counted_by_64() {
        let caps = ConnectionCaps {
            total: 10,
            per_address: 10,
            unauthenticated: 4,
            unauthenticated_per_address: 2,
        };
        let limits = ConnectionLimits::new(caps);
        // Every address of one /64 counts as one.
        let net = |i: u16| -> IpAddr { format!("2001:db8:7:1::{i:x}").parse().unwrap() };
        assert_eq!(limits.try_acquire(net(1)), Ok(()));
        assert_eq!(limits.try_acquire(net(2)), Ok(()));
        assert_eq!(limits.try_acquire(net(3)), Err(LimitReached::UnauthenticatedPerAddress));
        // Another /64, then the total budget of strangers is spent.
        let other = |i: u16| -> IpAddr { format!("2001:db8:7:2::{i:x}").parse().unwrap() };
        assert_eq!(limits.try_acquire(other(1)), Ok(()));
        assert_eq!(limits.try_acquire(other(2)), Ok(()));
        assert_eq!(
            limits.try_acquire("192.0.2.1".parse().unwrap()),
            Err(LimitReached::Unauthenticated)
        );
        // Clients that log in leave it, and the slots they hold are not the strangers'.
        for i in [1, 2] {
            limits.authenticated(net(i));
        }
        assert_eq!(limits.held(), (4, 2));
        let c: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(limits.try_acquire(c), Ok(()));
        assert_eq!(limits.try_acquire(c), Ok(()));
        assert_eq!(limits.try_acquire(c), Err(LimitReached::UnauthenticatedPerAddress));
        limits.release(net(1), true);
        limits.release(c, false);
        assert_eq!(limits.held(), (4, 3));
        assert_eq!(limits.try_acquire(net(3)), Ok(()), "its /64 has one stranger now");
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
