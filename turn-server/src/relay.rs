//! Relay sockets: one UDP socket per relayed address of an allocation, bound in the
//! worker's own slice of the relay port range (workers never contend for a port), kept in
//! a slab and watched by the worker's epoll set.

use std::{
    io,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
};

use quinn_udp::UdpSocketState;
use turn_proto::{
    server::{RelayAllocator, RelayError, RelayId, RelayRequest},
    stun::Family,
};

use crate::{epoll::Epoll, listener::udp_socket};

/// Epoll tokens of relay sockets have this bit set; the rest is the slab slot.
pub const RELAY_TOKEN: u64 = 1 << 63;

/// Where relays of one family are bound and what address clients are told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayAddress {
    /// Local address relay sockets bind to.
    pub bind: IpAddr,
    /// Address put in XOR-RELAYED-ADDRESS (the external address behind NAT).
    pub advertised: IpAddr,
}

/// A live relay socket.
pub struct Relay {
    pub socket: UdpSocket,
    generation: u32,
    port: u16,
}

/// The relay sockets of one worker.
pub struct RelayPool {
    /// quinn-udp's batching state, shared by every relay socket of the worker: its methods
    /// take the socket as an argument, and building one per socket costs two probe sockets
    /// (an IPv6 one with UDP_GRO, which flips a kernel static key: a text patch and an IPI
    /// on every CPU, twice) per allocation.
    pub state: UdpSocketState,
    families: [Option<RelayAddress>; 2],
    first_port: u16,
    /// Ports of this worker's slice that one of its relays holds.
    in_use: Vec<bool>,
    cursor: usize,
    slots: Vec<Option<Relay>>,
    generations: Vec<u32>,
    free: Vec<u32>,
    /// No new relays: the daemon is draining (new Allocate requests get 508).
    pub draining: bool,
    live: usize,
    /// Binds that failed for a reason other than the port being taken (logged by the worker).
    pub bind_errors: u64,
}

fn family_index(family: Family) -> usize {
    match family {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

impl RelayPool {
    /// A pool for worker `index` of `workers`, using its share of `min_port..=max_port`.
    pub fn new(
        families: [Option<RelayAddress>; 2],
        min_port: u16,
        max_port: u16,
        index: usize,
        workers: usize,
    ) -> io::Result<Self> {
        let (first, last) = port_slice(min_port, max_port, index, workers);
        let len = usize::from(last - first) + 1;
        let probe = UdpSocket::bind("127.0.0.1:0").or_else(|_| UdpSocket::bind("[::1]:0"))?;
        let state = UdpSocketState::new((&probe).into())?;
        Ok(Self {
            state,
            families,
            first_port: first,
            in_use: vec![false; len],
            // Start each worker at a different point so restarts do not reuse ports at once.
            cursor: (std::process::id() as usize).wrapping_mul(2_654_435_761) % len,
            slots: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            draining: false,
            live: 0,
            bind_errors: 0,
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

    fn bind(&mut self, ip: IpAddr, even: bool) -> Result<(UdpSocket, u16), RelayError> {
        let len = self.in_use.len();
        for step in 0..len {
            let i = (self.cursor + step) % len;
            let port = self.first_port + i as u16;
            if self.in_use[i] || (even && port % 2 == 1) {
                continue;
            }
            let socket = match udp_socket(SocketAddr::new(ip, port)) {
                Ok(s) => s,
                Err(_) => {
                    self.bind_errors += 1;
                    return Err(RelayError::InsufficientCapacity);
                }
            };
            match socket.bind(&SocketAddr::new(ip, port).into()) {
                Ok(()) => {
                    self.in_use[i] = true;
                    self.cursor = (i + 1) % len;
                    return Ok((socket.into(), port));
                }
                // Someone outside the daemon holds it: try the next one.
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(_) => {
                    self.bind_errors += 1;
                    return Err(RelayError::InsufficientCapacity);
                }
            }
        }
        Err(RelayError::InsufficientCapacity)
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
        let Some(address) = self.families[family_index(request.family)] else {
            return Err(RelayError::FamilyNotSupported);
        };
        let (socket, port) = self.bind(address.bind, request.even_port)?;
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(None);
                self.generations.push(0);
                (self.slots.len() - 1) as u32
            }
        };
        if epoll.add(socket.as_raw_fd(), RELAY_TOKEN | u64::from(slot)).is_err() {
            self.free.push(slot);
            self.release_port(port);
            return Err(RelayError::InsufficientCapacity);
        }
        let generation = self.generations[slot as usize];
        self.slots[slot as usize] = Some(Relay { socket, generation, port });
        self.live += 1;
        Ok((
            RelayId(u64::from(generation) << 32 | u64::from(slot)),
            SocketAddr::new(address.advertised, port),
        ))
    }

    fn release_port(&mut self, port: u16) {
        if let Some(used) = self.in_use.get_mut(usize::from(port.wrapping_sub(self.first_port))) {
            *used = false;
        }
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
            self.release_port(relay.port);
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
}

/// Worker `index`'s share of `min..=max`: contiguous, sizes differing by at most one.
pub fn port_slice(min: u16, max: u16, index: usize, workers: usize) -> (u16, u16) {
    let total = usize::from(max - min) + 1;
    let workers = workers.clamp(1, total);
    let index = index.min(workers - 1);
    let base = total / workers;
    let extra = total % workers;
    let start = index * base + index.min(extra);
    let len = base + usize::from(index < extra);
    (min + start as u16, min + (start + len - 1) as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use turn_proto::server::FiveTuple;

    #[test]
    fn port_slices_cover_the_range_without_overlap() {
        for workers in 1..=7 {
            let mut next = 49152u32;
            for i in 0..workers {
                let (a, b) = port_slice(49152, 65535, i, workers);
                assert_eq!(u32::from(a), next);
                assert!(b >= a);
                next = u32::from(b) + 1;
            }
            assert_eq!(next, 65536);
        }
        assert_eq!(port_slice(5000, 5000, 3, 4), (5000, 5000));
    }

    fn request(family: Family, even: bool) -> RelayRequest<'static> {
        RelayRequest {
            family,
            even_port: even,
            dont_fragment: false,
            five_tuple: FiveTuple {
                client: "127.0.0.1:1".parse().unwrap(),
                listener: "127.0.0.1:2".parse().unwrap(),
            },
            username: "u",
        }
    }

    #[test]
    fn allocates_in_its_slice_registers_and_releases() {
        let epoll = Epoll::new().unwrap();
        let v4 = RelayAddress {
            bind: "127.0.0.1".parse().unwrap(),
            advertised: "192.0.2.7".parse().unwrap(),
        };
        // A private high range for this test, split in 2; this is worker 1.
        let lo = 40_000 + (std::process::id() % 1000) as u16 * 8;
        let hi = lo + 15;
        let mut pool = RelayPool::new([Some(v4), None], lo, hi, 1, 2).unwrap();
        let (first, last) = port_slice(lo, hi, 1, 2);
        let (id, addr) = pool.allocate_in(&epoll, &request(Family::V4, true)).unwrap();
        assert_eq!(addr.ip(), v4.advertised);
        assert!(
            (first..=last).contains(&addr.port()) && addr.port() % 2 == 0,
            "{addr} not in {first}-{last}"
        );
        let relay = pool.get(id).unwrap();
        assert_eq!(relay.socket.local_addr().unwrap().port(), addr.port());
        assert_eq!(pool.len(), 1);
        assert_eq!(
            pool.allocate_in(&epoll, &request(Family::V6, false)).unwrap_err(),
            RelayError::FamilyNotSupported
        );
        pool.release(id);
        assert!(pool.get(id).is_none());
        assert!(pool.is_empty());
        // A stale id is ignored, and the slot is reused under a new generation.
        pool.release(id);
        let (id2, _) = pool.allocate_in(&epoll, &request(Family::V4, false)).unwrap();
        assert_ne!(id2, id);
        pool.draining = true;
        assert_eq!(
            pool.allocate_in(&epoll, &request(Family::V4, false)).unwrap_err(),
            RelayError::InsufficientCapacity
        );
    }

    #[test]
    fn a_full_slice_is_insufficient_capacity() {
        let epoll = Epoll::new().unwrap();
        let v4 = RelayAddress {
            bind: "127.0.0.1".parse().unwrap(),
            advertised: "127.0.0.1".parse().unwrap(),
        };
        let port = 41_000 + (std::process::id() % 1000) as u16 * 4;
        let mut pool = RelayPool::new([Some(v4), None], port, port + 1, 0, 1).unwrap();
        let a = pool.allocate_in(&epoll, &request(Family::V4, false));
        let b = pool.allocate_in(&epoll, &request(Family::V4, false));
        // Ports held by another process are skipped, so at most two succeed.
        let c = pool.allocate_in(&epoll, &request(Family::V4, false));
        assert!(a.is_ok() || b.is_ok());
        assert_eq!(c.unwrap_err(), RelayError::InsufficientCapacity);
    }
}
