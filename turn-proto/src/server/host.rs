//! What the daemon provides to the server: relay sockets and quotas.

use std::cell::RefCell;
use std::net::SocketAddr;

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
/// sockets are requested; `release` once when it goes away. `user` is the
/// quota key: the static user's name, or the user part of a REST username
/// (`expiry:user` counts as `user`, so that fresh credentials of one user
/// share one quota).
pub trait Quota {
    /// Take one allocation for `user`.
    fn try_acquire(&self, user: &str) -> Result<(), QuotaExceeded>;
    /// Give it back.
    fn release(&self, user: &str);
}

/// No quota at all.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unlimited;

impl Quota for Unlimited {
    fn try_acquire(&self, _user: &str) -> Result<(), QuotaExceeded> {
        Ok(())
    }

    fn release(&self, _user: &str) {}
}

/// A single-threaded quota: at most `per_user` allocations per user and
/// `total` overall, 0 meaning unlimited (as everywhere in this project).
/// Useful for tests and single-worker deployments.
#[derive(Debug, Default)]
pub struct LocalQuota {
    per_user: usize,
    total: usize,
    state: RefCell<(usize, FxHashMap<String, usize>)>,
}

impl LocalQuota {
    /// New quota.
    pub fn new(per_user: usize, total: usize) -> Self {
        LocalQuota { per_user, total, state: RefCell::new((0, FxHashMap::default())) }
    }

    /// Allocations currently held.
    pub fn in_use(&self) -> usize {
        self.state.borrow().0
    }

    /// Allocations currently held by `user`.
    pub fn in_use_by(&self, user: &str) -> usize {
        self.state.borrow().1.get(user).copied().unwrap_or(0)
    }
}

impl Quota for LocalQuota {
    fn try_acquire(&self, user: &str) -> Result<(), QuotaExceeded> {
        let mut st = self.state.borrow_mut();
        let (total, per_user) = &mut *st;
        let cur = per_user.get(user).copied().unwrap_or(0);
        if (self.total > 0 && *total >= self.total) || (self.per_user > 0 && cur >= self.per_user) {
            return Err(QuotaExceeded);
        }
        *total += 1;
        per_user.insert(user.to_owned(), cur + 1);
        Ok(())
    }

    fn release(&self, user: &str) {
        let mut st = self.state.borrow_mut();
        let (total, per_user) = &mut *st;
        if let Some(n) = per_user.get_mut(user) {
            *n -= 1;
            *total = total.saturating_sub(1);
            if *n == 0 {
                per_user.remove(user);
            }
        }
    }
}
