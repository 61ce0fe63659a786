//! What the daemon provides to the server: relay sockets and quotas.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};

use rustc_hash::FxHashMap;

use super::FiveTuple;
use crate::stun::Family;

/// Opaque identifier of a relay socket, chosen by the caller. It must be
/// unique among live relays of one [`Server`](super::Server) (e.g. a slab
/// index with a generation, or the socket's fd combined with a counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayId(pub u64);

/// A request for a relay socket (RFC 8656 §7.2, "relayed transport address").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayRequest<'a> {
    /// Address family of the relayed address.
    pub family: Family,
    /// The client asked for an even port (EVEN-PORT with R=0). Reserving
    /// the next port (R=1) is not supported and rejected before this call.
    pub even_port: bool,
    /// The allocation asked for DONT-FRAGMENT (only when the server is
    /// configured to support it).
    pub dont_fragment: bool,
    /// The allocation's 5-tuple.
    pub five_tuple: FiveTuple,
    /// The authenticated username.
    pub username: &'a str,
}

/// Why the caller could not provide a relay socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    /// This family is not available (answered with 440).
    #[error("address family not supported")]
    FamilyNotSupported,
    /// No port or resource available (answered with 508).
    #[error("insufficient capacity")]
    InsufficientCapacity,
}

/// Creates and releases relay sockets, synchronously. The server calls
/// `allocate` while handling an Allocate request and `release` exactly once
/// for every id it accepted (allocation deleted, expired, or
/// [`Server::release_all`](super::Server::release_all)).
pub trait RelayAllocator {
    /// Bind a relay socket and return its id and relayed (advertised)
    /// transport address. Ports should come from 49152-65535 (RFC 8656 §7.2).
    fn allocate(&mut self, request: &RelayRequest<'_>)
    -> Result<(RelayId, SocketAddr), RelayError>;
    /// Close a relay socket.
    fn release(&mut self, id: RelayId);
    /// True when a relay of this server (of any worker) holds `relayed`, its bound or
    /// advertised address and port. Only such an address of the server's own is a peer
    /// (another allocation's relayed address, relay to relay); other ports of the relay
    /// range, free or held by another program, are not.
    fn holds(&self, relayed: SocketAddr) -> bool;
}

/// What the caller lends the server for one call: its relay sockets and its quotas.
pub struct Host<'h, R: RelayAllocator + ?Sized, Q: Quota + ?Sized> {
    /// Creates and releases relay sockets.
    pub relays: &'h mut R,
    /// Allocation quotas.
    pub quota: &'h Q,
}

impl<R: RelayAllocator + ?Sized, Q: Quota + ?Sized> std::fmt::Debug for Host<'_, R, Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host").finish_non_exhaustive()
    }
}

/// A quota refused the allocation (answered with 486).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("allocation quota reached")]
pub struct QuotaExceeded;

/// Allocation quotas shared across workers (the daemon implements this
/// with atomics). `try_acquire` is called once per allocation before relay
/// sockets are requested; `release` once when it goes away, with the same arguments.
/// `user` is the quota key: the static user's name, or the user part of a REST username
/// (`expiry:user` counts as `user`, so that fresh credentials of one user share one
/// quota). `client` is the client's address, for a cap per address (an IPv6 address
/// counts by its /64, see [`source_key`](super::source_key)): REST credentials are handed
/// out freely by web applications, and a bare-expiry REST username is a quota key of its
/// own, so the per-user quota alone does not bound what one client can hold.
pub trait Quota {
    /// Take one allocation for `user` at `client`.
    fn try_acquire(&self, user: &str, client: IpAddr) -> Result<(), QuotaExceeded>;
    /// Give it back.
    fn release(&self, user: &str, client: IpAddr);
}

/// No quota at all.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unlimited;

impl Quota for Unlimited {
    fn try_acquire(&self, _user: &str, _client: IpAddr) -> Result<(), QuotaExceeded> {
        Ok(())
    }

    fn release(&self, _user: &str, _client: IpAddr) {}
}

/// A single-threaded quota: at most `per_user` allocations per user, `per_address` per
/// client address and `total` overall, 0 meaning unlimited (as everywhere in this
/// project). Useful for tests and single-worker deployments.
#[derive(Debug, Default)]
pub struct LocalQuota {
    per_user: usize,
    per_address: usize,
    total: usize,
    state: RefCell<LocalQuotaState>,
}

#[derive(Debug, Default)]
struct LocalQuotaState {
    total: usize,
    users: FxHashMap<String, usize>,
    addresses: FxHashMap<IpAddr, usize>,
}

impl LocalQuota {
    /// New quota, without a cap per address.
    pub fn new(per_user: usize, total: usize) -> Self {
        LocalQuota { per_user, total, ..Default::default() }
    }

    /// The same with at most `per_address` allocations per client address.
    pub fn with_per_address(mut self, per_address: usize) -> Self {
        self.per_address = per_address;
        self
    }

    /// Allocations currently held.
    pub fn in_use(&self) -> usize {
        self.state.borrow().total
    }

    /// Allocations currently held by `user`.
    pub fn in_use_by(&self, user: &str) -> usize {
        self.state.borrow().users.get(user).copied().unwrap_or(0)
    }
}

impl Quota for LocalQuota {
    fn try_acquire(&self, user: &str, client: IpAddr) -> Result<(), QuotaExceeded> {
        let mut st = self.state.borrow_mut();
        let key = super::source_key(&client);
        let by_user = st.users.get(user).copied().unwrap_or(0);
        let by_address = st.addresses.get(&key).copied().unwrap_or(0);
        if (self.total > 0 && st.total >= self.total)
            || (self.per_user > 0 && by_user >= self.per_user)
            || (self.per_address > 0 && by_address >= self.per_address)
        {
            return Err(QuotaExceeded);
        }
        st.total += 1;
        st.users.insert(user.to_owned(), by_user + 1);
        st.addresses.insert(key, by_address + 1);
        Ok(())
    }

    fn release(&self, user: &str, client: IpAddr) {
        let mut st = self.state.borrow_mut();
        let Some(n) = st.users.get_mut(user) else { return };
        *n -= 1;
        if *n == 0 {
            st.users.remove(user);
        }
        st.total = st.total.saturating_sub(1);
        let key = super::source_key(&client);
        if let Some(n) = st.addresses.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                st.addresses.remove(&key);
            }
        }
    }
}
