//! Relay sockets: one UDP socket per relayed address of an allocation, kept in the
//! worker's slab and watched by the worker's epoll set.
//!
//! Ports come from [`RelayPorts`], shared by all workers: one port set per relay address,
//! several addresses per family used in turn. An allocation takes a port under a short
//! lock (a cold path, once per allocation), so a worker never answers 508 while any worker
//! could still bind a port, and one machine holds as many allocations as its relay
//! addresses have ports.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, AtomicUsize, Ordering},
    },
};

use quinn_udp::UdpSocketState;
use turn_proto::{
    server::{RelayAllocator, RelayError, RelayId, RelayRequest},
    stun::Family,
};

use crate::{epoll::Epoll, listener::udp_socket, worker::Source};

/// Where relays of one family are bound and what address clients are told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayAddress {
    /// Local address relay sockets bind to.
    pub bind: IpAddr,
    /// Address put in XOR-RELAYED-ADDRESS (the external address behind NAT).
    pub advertised: IpAddr,
}

/// Relay addresses per family: `[IPv4, IPv6]`, each used in turn.
pub type RelayAddresses = [Vec<RelayAddress>; 2];

fn family_index(family: Family) -> usize {
    match family {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

/// What an address is to the daemon's relays ([`RelayPorts::lookup`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayPort {
    /// Not a relay address with a port of the relay range.
    NotRelay,
    /// A relay address and a port of the range that no relay holds (free, or another
    /// program's): never a peer.
    Free,
    /// Held by a relay of `worker`; `bound`: `addr` is the socket's bound address (not
    /// only its advertised one), so a datagram can be handed over inside the daemon.
    Held { worker: usize, bound: bool },
}

/// Which port of which address an allocation holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortLease {
    family: usize,
    address: usize,
    pub port: u16,
}

struct PortSet {
    in_use: Vec<bool>,
    free: usize,
}

struct AddressPorts {
    address: RelayAddress,
    ports: Mutex<PortSet>,
    /// Per port: 1 + the index of the worker whose relay holds it, 0 when none does. Read
    /// on the packet path (relay to relay), so without the lock.
    owners: Box<[AtomicU16]>,
}

/// The relay ports of every relay address, shared by the workers.
pub struct RelayPorts {
    families: [Vec<AddressPorts>; 2],
    /// Next address to try, per family (round robin).
    turn: [AtomicUsize; 2],
    first_port: u16,
}

impl RelayPorts {
    /// Ports `min_port..=max_port` on each of `addresses`.
    pub fn new(addresses: &RelayAddresses, min_port: u16, max_port: u16) -> Arc<RelayPorts> {
        let len = usize::from(max_port.saturating_sub(min_port)) + 1;
        let set = |address: &RelayAddress| AddressPorts {
            address: *address,
            ports: Mutex::new(PortSet { in_use: vec![false; len], free: len }),
            owners: (0..len).map(|_| AtomicU16::new(0)).collect(),
        };
        Arc::new(RelayPorts {
            families: [
                addresses[0].iter().map(set).collect(),
                addresses[1].iter().map(set).collect(),
            ],
            turn: [AtomicUsize::new(0), AtomicUsize::new(0)],
            first_port: min_port,
        })
    }

    /// True when relays of `family` can be made at all.
    pub fn supports(&self, family: Family) -> bool {
        !self.families[family_index(family)].is_empty()
    }

    /// Ports no allocation holds, per family.
    pub fn free_ports(&self) -> [usize; 2] {
        let count = |list: &Vec<AddressPorts>| {
            list.iter().map(|a| a.ports.lock().map_or(0, |p| p.free)).sum()
        };
        [count(&self.families[0]), count(&self.families[1])]
    }

    /// Binds a socket on a free port of the next address of `family` (the others when it
    /// is full). `bind_errors` counts failures other than a port taken by someone else.
    fn bind(
        &self,
        family: Family,
        even: bool,
        bind_errors: &mut u64,
    ) -> Result<(UdpSocket, PortLease, RelayAddress), RelayError> {
        let f = family_index(family);
        let list = &self.families[f];
        if list.is_empty() {
            return Err(RelayError::FamilyNotSupported);
        }
        let first = self.turn[f].fetch_add(1, Ordering::Relaxed);
        for k in 0..list.len() {
            let index = (first + k) % list.len();
            let entry = &list[index];
            // A poisoned lock means a worker panicked while holding it: skip the address.
            let Ok(mut set) = entry.ports.lock() else { continue };
            let len = set.in_use.len();
            if set.free == 0 {
                continue;
            }
            // RFC 8656 §7.2 asks for RFC 6056 behaviour: a port nobody can predict. A
            // random place in the range, then the next free port from there (RFC 6056
            // §3.3.1, "simple port randomization").
            let start = rand::random_range(0..len);
            for step in 0..len {
                let i = (start + step) % len;
                let port = self.first_port + i as u16;
                if set.in_use[i] || (even && port % 2 == 1) {
                    continue;
                }
                let addr = SocketAddr::new(entry.address.bind, port);
                let socket = match udp_socket(addr) {
                    Ok(s) => s,
                    Err(_) => {
                        *bind_errors += 1;
                        return Err(RelayError::InsufficientCapacity);
                    }
                };
                match socket.bind(&addr.into()) {
                    Ok(()) => {
                        // ICMP errors from peers reach the socket's error queue (see
                        // `read_icmp`); best effort: without it they are not forwarded.
                        let _ = enable_recverr(&socket, addr.is_ipv6());
                        set.in_use[i] = true;
                        set.free -= 1;
                        let lease = PortLease { family: f, address: index, port };
                        return Ok((socket.into(), lease, entry.address));
                    }
                    // Someone outside the daemon holds it: try the next one.
                    Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                    Err(_) => {
                        *bind_errors += 1;
                        return Err(RelayError::InsufficientCapacity);
                    }
                }
            }
        }
        Err(RelayError::InsufficientCapacity)
    }

    /// What `addr` is to this daemon: not one of its relay addresses and ports, a port of
    /// its relay range that no relay holds, or a relayed address (with the worker whose
    /// relay holds it). Lock-free: read on the packet path.
    pub fn lookup(&self, addr: SocketAddr) -> RelayPort {
        let f = usize::from(addr.is_ipv6());
        let Some(i) = addr.port().checked_sub(self.first_port).map(usize::from) else {
            return RelayPort::NotRelay;
        };
        let mut ours = RelayPort::NotRelay;
        for e in &self.families[f] {
            let bound = e.address.bind == addr.ip();
            if !bound && e.address.advertised != addr.ip() {
                continue;
            }
            let Some(owner) = e.owners.get(i) else { continue };
            match owner.load(Ordering::Acquire) {
                0 => ours = RelayPort::Free,
                w => return RelayPort::Held { worker: usize::from(w - 1), bound },
            }
        }
        ours
    }

    /// The worker whose relay is bound to `addr` (a relay address and port of this
    /// daemon), if any.
    pub fn owner_of(&self, addr: SocketAddr) -> Option<usize> {
        match self.lookup(addr) {
            RelayPort::Held { worker, bound: true } => Some(worker),
            _ => None,
        }
    }

    /// True when a relay of this daemon holds `addr`: one of the relay addresses (bound or
    /// advertised) and a port of the range that a relay holds now.
    pub fn holds(&self, addr: SocketAddr) -> bool {
        matches!(self.lookup(addr), RelayPort::Held { .. })
    }

    /// Records which worker holds `lease` (`None`: no one).
    fn set_owner(&self, lease: PortLease, worker: Option<u16>) {
        if let Some(entry) = self.families.get(lease.family).and_then(|l| l.get(lease.address))
            && let Some(owner) = entry.owners.get(usize::from(lease.port - self.first_port))
        {
            owner.store(worker.map_or(0, |w| w.saturating_add(1)), Ordering::Release);
        }
    }

    fn release(&self, lease: PortLease) {
        let Some(entry) = self.families.get(lease.family).and_then(|l| l.get(lease.address)) else {
            return;
        };
        if let Ok(mut set) = entry.ports.lock()
            && let Some(used) = set.in_use.get_mut(usize::from(lease.port - self.first_port))
            && *used
        {
            *used = false;
            set.free += 1;
        }
    }
}

fn enable_recverr(socket: &socket2::Socket, v6: bool) -> io::Result<()> {
    let (level, name) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
    } else {
        (libc::IPPROTO_IP, libc::IP_RECVERR)
    };
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with a c_int value of its size on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// An ICMP error a peer (or a router on the way) sent about a datagram we relayed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpError {
    /// The peer the datagram was sent to.
    pub peer: SocketAddr,
    /// ICMP (or ICMPv6) type and code.
    pub icmp_type: u8,
    pub icmp_code: u8,
    /// The error's extra data (the next-hop MTU for "fragmentation needed").
    pub info: u32,
}

/// Reads one entry of `socket`'s error queue (`MSG_ERRQUEUE`): `Ok(None)` for an entry
/// that is not an ICMP error (a local one), `Err(WouldBlock)` when the queue is empty.
///
/// By hand: quinn-udp reads data, not the error queue, and socket2 has no recvmsg with
/// control messages for it.
pub fn read_icmp(socket: &UdpSocket) -> io::Result<Option<IcmpError>> {
    // struct sock_extended_err (linux/errqueue.h).
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct SockExtendedErr {
        ee_errno: u32,
        ee_origin: u8,
        ee_type: u8,
        ee_code: u8,
        ee_pad: u8,
        ee_info: u32,
        ee_data: u32,
    }
    const SO_EE_ORIGIN_ICMP: u8 = 2;
    const SO_EE_ORIGIN_ICMP6: u8 = 3;
    // SAFETY: all-zero bytes are a valid sockaddr_storage.
    let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut control = [0u64; 64];
    let mut data = [0u8; 64];
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
    // SAFETY: all-zero bytes are a valid msghdr; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut name as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: a valid msghdr whose buffers are all live and of the stated sizes.
    let rc = unsafe {
        libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT)
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let Some(peer) = sockaddr_to_std(&name) else { return Ok(None) };
    // SAFETY: CMSG_* walk the control buffer the kernel filled, within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let c = &*cmsg;
            let recverr = (c.cmsg_level == libc::IPPROTO_IP && c.cmsg_type == libc::IP_RECVERR)
                || (c.cmsg_level == libc::IPPROTO_IPV6 && c.cmsg_type == libc::IPV6_RECVERR);
            if recverr
                && c.cmsg_len as usize
                    >= libc::CMSG_LEN(std::mem::size_of::<SockExtendedErr>() as u32) as usize
            {
                let err = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<SockExtendedErr>());
                if err.ee_origin == SO_EE_ORIGIN_ICMP || err.ee_origin == SO_EE_ORIGIN_ICMP6 {
                    return Ok(Some(IcmpError {
                        peer,
                        icmp_type: err.ee_type,
                        icmp_code: err.ee_code,
                        info: err.ee_info,
                    }));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(None)
}

fn sockaddr_to_std(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says it is a sockaddr_in, which fits in the storage.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::new(
                IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Some(SocketAddr::new(
                IpAddr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
            ))
        }
        _ => None,
    }
}

/// True for the errors an ICMP message leaves on a socket with IP_RECVERR: the next call
/// on it reports them once; they say nothing about that call itself.
pub fn is_icmp_report(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNREFUSED
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::EPROTO
                | libc::EMSGSIZE
        )
    )
}

/// A live relay socket.
pub struct Relay {
    pub socket: UdpSocket,
    /// The address the socket is bound to (what a peer on this host sees as the source).
    pub local: SocketAddr,
    generation: u32,
    lease: PortLease,
}

/// The relay sockets of one worker.
pub struct RelayPool {
    /// quinn-udp's batching state, shared by every relay socket of the worker: its methods
    /// take the socket as an argument, and building one per socket costs two probe sockets
    /// (an IPv6 one with UDP_GRO, which flips a kernel static key: a text patch and an IPI
    /// on every CPU, twice) per allocation.
    pub state: UdpSocketState,
    ports: Arc<RelayPorts>,
    slots: Vec<Option<Relay>>,
    generations: Vec<u32>,
    free: Vec<u32>,
    /// No new relays: the daemon is draining (new Allocate requests get 508).
    pub draining: bool,
    live: usize,
    /// Binds that failed for a reason other than the port being taken (logged by the worker).
    pub bind_errors: u64,
    /// The live relays by the address they are bound to: a datagram a relay of the
    /// daemon sends to one of these is handed over without the kernel's round trip.
    by_local: HashMap<SocketAddr, RelayId>,
    /// This worker's index, recorded as the owner of its relays' ports.
    worker: u16,
}

impl RelayPool {
    /// Worker `worker`'s pool, taking its ports from the shared `ports`.
    pub fn new(ports: Arc<RelayPorts>, worker: usize) -> io::Result<Self> {
        let probe = UdpSocket::bind("127.0.0.1:0").or_else(|_| UdpSocket::bind("[::1]:0"))?;
        let state = UdpSocketState::new((&probe).into())?;
        Ok(Self {
            state,
            ports,
            slots: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            draining: false,
            live: 0,
            bind_errors: 0,
            by_local: HashMap::new(),
            worker: u16::try_from(worker).unwrap_or(u16::MAX - 1),
        })
    }

    /// Live relay sockets.
    pub fn len(&self) -> usize {
        self.live
    }

    /// True when no relay socket is live.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// The relay of an epoll token, if it is still live.
    pub fn by_slot(&self, slot: u32) -> Option<(RelayId, &Relay)> {
        let relay = self.slots.get(slot as usize)?.as_ref()?;
        Some((RelayId(u64::from(relay.generation) << 32 | u64::from(slot)), relay))
    }

    /// The relay with this id, if it is still live.
    pub fn get(&self, id: RelayId) -> Option<&Relay> {
        let slot = (id.0 & 0xffff_ffff) as usize;
        let relay = self.slots.get(slot)?.as_ref()?;
        (u64::from(relay.generation) == id.0 >> 32).then_some(relay)
    }

    /// What `addr` is to the daemon's relays (see [`RelayPorts::lookup`]).
    pub fn lookup(&self, addr: SocketAddr) -> RelayPort {
        self.ports.lookup(addr)
    }

    /// The worker whose relay is bound to `addr`, if any (this one included).
    pub fn owner_of(&self, addr: SocketAddr) -> Option<usize> {
        self.ports.owner_of(addr)
    }

    /// The live relay of this pool bound to `addr`, if any.
    pub fn bound_to(&self, addr: SocketAddr) -> Option<RelayId> {
        if self.by_local.is_empty() {
            return None;
        }
        self.by_local.get(&addr).copied()
    }

    /// Creates a relay socket and registers it in `epoll`.
    pub fn allocate_in(
        &mut self,
        epoll: &Epoll,
        request: &RelayRequest<'_>,
    ) -> Result<(RelayId, SocketAddr), RelayError> {
        if self.draining {
            return Err(RelayError::InsufficientCapacity);
        }
        let (socket, lease, address) =
            self.ports.bind(request.family, request.even_port, &mut self.bind_errors)?;
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(None);
                self.generations.push(0);
                (self.slots.len() - 1) as u32
            }
        };
        if epoll.add(socket.as_raw_fd(), Source::Relay(slot).token()).is_err() {
            self.free.push(slot);
            self.ports.release(lease);
            return Err(RelayError::InsufficientCapacity);
        }
        let generation = self.generations[slot as usize];
        let id = RelayId(u64::from(generation) << 32 | u64::from(slot));
        let local = SocketAddr::new(address.bind, lease.port);
        // A wildcard-bound relay has no one address to match.
        if !address.bind.is_unspecified() {
            self.by_local.insert(local, id);
        }
        self.ports.set_owner(lease, Some(self.worker));
        self.slots[slot as usize] = Some(Relay { socket, local, generation, lease });
        self.live += 1;
        Ok((id, SocketAddr::new(address.advertised, lease.port)))
    }

    /// Closes a relay socket (closing removes it from the epoll set).
    pub fn release(&mut self, id: RelayId) {
        let slot = (id.0 & 0xffff_ffff) as usize;
        let live = self
            .slots
            .get(slot)
            .and_then(Option::as_ref)
            .is_some_and(|r| u64::from(r.generation) == id.0 >> 32);
        if !live {
            return;
        }
        if let Some(relay) = self.slots[slot].take() {
            if self.by_local.get(&relay.local) == Some(&id) {
                self.by_local.remove(&relay.local);
            }
            // No longer ours before the port can be someone else's.
            self.ports.set_owner(relay.lease, None);
            drop(relay.socket);
            self.ports.release(relay.lease);
            self.generations[slot] = self.generations[slot].wrapping_add(1);
            self.free.push(slot as u32);
            self.live -= 1;
        }
    }
}

/// `RelayPool` with the worker's epoll set, as the protocol core's `RelayAllocator`.
pub struct Relays<'a> {
    pub pool: &'a mut RelayPool,
    pub epoll: &'a Epoll,
}

impl RelayAllocator for Relays<'_> {
    fn allocate(
        &mut self,
        request: &RelayRequest<'_>,
    ) -> Result<(RelayId, SocketAddr), RelayError> {
        self.pool.allocate_in(self.epoll, request)
    }

    fn release(&mut self, id: RelayId) {
        self.pool.release(id);
    }

    fn holds(&self, relayed: SocketAddr) -> bool {
        self.pool.ports.holds(relayed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use turn_proto::server::FiveTuple;

    fn request(family: Family, even: bool) -> RelayRequest<'static> {
        RelayRequest {
            family,
            even_port: even,
            dont_fragment: false,
            five_tuple: FiveTuple::udp(
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap(),
            ),
            username: "u",
        }
    }

    fn address(bind: &str, advertised: &str) -> RelayAddress {
        RelayAddress { bind: bind.parse().unwrap(), advertised: advertised.parse().unwrap() }
    }

    /// A private range of `n` ports for one test.
    fn range(base: u16, n: u16) -> (u16, u16) {
        let lo = base + (std::process::id() % 1000) as u16 * 16;
        (lo, lo + n - 1)
    }

    #[test]
    fn allocates_registers_and_releases() {
        let epoll = Epoll::new().unwrap();
        let v4 = address("127.0.0.1", "192.0.2.7");
        let (lo, hi) = range(40_000, 16);
        let ports = RelayPorts::new(&[vec![v4], vec![]], lo, hi);
        let mut pool = RelayPool::new(Arc::clone(&ports), 0).unwrap();
        let (id, addr) = pool.allocate_in(&epoll, &request(Family::V4, true)).unwrap();
        assert_eq!(addr.ip(), v4.advertised);
        assert!((lo..=hi).contains(&addr.port()) && addr.port() % 2 == 0, "{addr}");
        let relay = pool.get(id).unwrap();
        assert_eq!(relay.socket.local_addr().unwrap().port(), addr.port());
        assert_eq!(pool.len(), 1);
        assert_eq!(ports.free_ports(), [15, 0]);
        assert_eq!(
            pool.allocate_in(&epoll, &request(Family::V6, false)).unwrap_err(),
            RelayError::FamilyNotSupported
        );
        pool.release(id);
        assert!(pool.get(id).is_none());
        assert!(pool.is_empty());
        assert_eq!(ports.free_ports(), [16, 0]);
        // A stale id is ignored, and the slot is reused under a new generation.
        pool.release(id);
        assert_eq!(ports.free_ports(), [16, 0]);
        let (id2, _) = pool.allocate_in(&epoll, &request(Family::V4, false)).unwrap();
        assert_ne!(id2, id);
        pool.draining = true;
        assert_eq!(
            pool.allocate_in(&epoll, &request(Family::V4, false)).unwrap_err(),
            RelayError::InsufficientCapacity
        );
    }

    #[test]
    fn a_worker_takes_every_free_port_not_just_a_share() {
        let epoll = Epoll::new().unwrap();
        let (lo, hi) = range(41_000, 4);
        let ports = RelayPorts::new(&[vec![address("127.0.0.1", "127.0.0.1")], vec![]], lo, hi);
        let mut busy = RelayPool::new(Arc::clone(&ports), 0).unwrap();
        let mut idle = RelayPool::new(Arc::clone(&ports), 0).unwrap();
        // One worker gets all four ports (ports held by another process are skipped).
        let got: Vec<_> = (0..4)
            .filter_map(|_| busy.allocate_in(&epoll, &request(Family::V4, false)).ok())
            .collect();
        assert!(got.len() >= 3, "{got:?}");
        assert_eq!(
            idle.allocate_in(&epoll, &request(Family::V4, false)).unwrap_err(),
            RelayError::InsufficientCapacity,
            "all taken"
        );
        // A port one worker gives back serves another.
        busy.release(got[0].0);
        assert!(idle.allocate_in(&epoll, &request(Family::V4, false)).is_ok());
    }

    /// RFC 8656 §7.2 / RFC 6056: nobody can tell the next relay port from the last ones.
    #[test]
    fn relay_ports_are_not_handed_out_in_sequence() {
        let epoll = Epoll::new().unwrap();
        let (lo, hi) = range(30_000, 1000);
        let ports = RelayPorts::new(&[vec![address("127.0.0.1", "127.0.0.1")], vec![]], lo, hi);
        let mut pool = RelayPool::new(ports, 0).unwrap();
        let got: Vec<u16> = (0..20)
            .map(|_| pool.allocate_in(&epoll, &request(Family::V4, false)).unwrap().1.port())
            .collect();
        let steps = got.windows(2).filter(|w| w[1] == w[0] + 1).count();
        assert!(steps < 5, "ports in sequence: {got:?}");
        let mut distinct = got.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), got.len());
    }

    /// Which worker holds a relayed address, as relay-to-relay hand-over looks it up:
    /// by the bound address (not the advertised one), and no one once it is released.
    #[test]
    fn the_owner_of_a_relay_address_is_the_worker_holding_it() {
        let epoll = Epoll::new().unwrap();
        let (lo, hi) = range(47_000, 4);
        let ports = RelayPorts::new(&[vec![address("127.0.0.1", "192.0.2.7")], vec![]], lo, hi);
        let mut first = RelayPool::new(Arc::clone(&ports), 0).unwrap();
        let mut second = RelayPool::new(Arc::clone(&ports), 1).unwrap();
        let (a, advertised_a) = first.allocate_in(&epoll, &request(Family::V4, false)).unwrap();
        let (b, _) = second.allocate_in(&epoll, &request(Family::V4, false)).unwrap();
        let (local_a, local_b) = (first.get(a).unwrap().local, second.get(b).unwrap().local);
        assert_eq!(local_a.ip().to_string(), "127.0.0.1");
        assert_eq!(local_a.port(), advertised_a.port());
        assert_eq!(first.owner_of(local_a), Some(0));
        assert_eq!(first.owner_of(local_b), Some(1), "any worker sees the others' relays");
        assert_eq!(first.bound_to(local_a), Some(a));
        assert_eq!(first.bound_to(local_b), None, "only its own by id");
        assert_eq!(second.bound_to(local_b), Some(b));
        // The advertised address is not where the socket is bound, another port is free,
        // and another IP is not ours.
        assert_eq!(first.owner_of(advertised_a), None);
        let free = (lo..=hi).find(|&p| p != local_a.port() && p != local_b.port()).unwrap();
        assert_eq!(first.owner_of(SocketAddr::new(local_a.ip(), free)), None);
        assert_eq!(
            first.owner_of(SocketAddr::new("127.0.0.2".parse().unwrap(), local_a.port())),
            None
        );
        // What relay-to-relay policy and the send path see: held (by its bound or its
        // advertised address), a free port of the range, or not a relay port at all.
        assert_eq!(ports.lookup(local_a), RelayPort::Held { worker: 0, bound: true });
        assert_eq!(ports.lookup(advertised_a), RelayPort::Held { worker: 0, bound: false });
        assert!(ports.holds(advertised_a));
        assert_eq!(ports.lookup(SocketAddr::new(local_a.ip(), free)), RelayPort::Free);
        assert!(!ports.holds(SocketAddr::new(advertised_a.ip(), free)));
        assert_eq!(ports.lookup(SocketAddr::new(local_a.ip(), lo - 1)), RelayPort::NotRelay);
        assert_eq!(ports.lookup(SocketAddr::new(local_a.ip(), hi + 1)), RelayPort::NotRelay);
        first.release(a);
        assert_eq!(second.owner_of(local_a), None);
        assert_eq!(first.bound_to(local_a), None);
        assert_eq!(ports.lookup(advertised_a), RelayPort::Free);
    }

    #[test]
    fn an_unreachable_peer_port_comes_back_as_an_icmp_error() {
        let epoll = Epoll::new().unwrap();
        let (lo, hi) = range(43_000, 2);
        let ports = RelayPorts::new(&[vec![address("127.0.0.1", "127.0.0.1")], vec![]], lo, hi);
        let mut pool = RelayPool::new(ports, 0).unwrap();
        let (id, _) = pool.allocate_in(&epoll, &request(Family::V4, false)).unwrap();
        let relay = pool.get(id).unwrap();
        assert_eq!(read_icmp(&relay.socket).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        // A port nobody listens on (bound, then closed).
        let closed = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        relay.socket.send_to(b"hello", closed).unwrap();
        let mut got = None;
        for _ in 0..100 {
            match read_icmp(&relay.socket) {
                Ok(e) => {
                    got = e;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => panic!("{e}"),
            }
        }
        let icmp = got.expect("ICMP port unreachable");
        assert_eq!((icmp.icmp_type, icmp.icmp_code), (3, 3));
        assert_eq!(icmp.peer, closed);
    }

    #[test]
    fn several_addresses_of_a_family_are_used_in_turn() {
        let epoll = Epoll::new().unwrap();
        let (lo, hi) = range(42_000, 2);
        let a = address("127.0.0.2", "127.0.0.2");
        let b = address("127.0.0.3", "127.0.0.3");
        let ports = RelayPorts::new(&[vec![a, b], vec![]], lo, hi);
        let mut pool = RelayPool::new(ports, 0).unwrap();
        let ips: Vec<IpAddr> = (0..4)
            .map(|_| pool.allocate_in(&epoll, &request(Family::V4, false)).unwrap().1.ip())
            .collect();
        assert_eq!(ips.iter().filter(|ip| **ip == a.advertised).count(), 2, "{ips:?}");
        assert_eq!(ips.iter().filter(|ip| **ip == b.advertised).count(), 2, "{ips:?}");
        assert_ne!(ips[0], ips[1], "in turn: {ips:?}");
        // Two addresses of two ports hold four allocations, then 508.
        assert_eq!(
            pool.allocate_in(&epoll, &request(Family::V4, false)).unwrap_err(),
            RelayError::InsufficientCapacity
        );
    }
}
