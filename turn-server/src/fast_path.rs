//! Loader of `turn_fast`, the TC program that relays ChannelData in the kernel (see
//! `turn-ebpf/src/fast.rs` and [`turn_common::fast`]).
//!
//! One [`FastPath`] per daemon: it loads the program with its maps sized from the daemon's
//! limits, tells it the host's addresses and interfaces, and attaches it (TCX, ingress, so
//! it runs beside other TC programs such as a CNI's) on loopback and the interfaces of the
//! listener and relay addresses. Each worker gets [`FastMaps`], its own handles on the
//! binding maps, and writes the bindings of its allocations as the protocol core announces
//! them ([`turn_proto::server::FastPathChange`]): an entry exists exactly while the
//! userspace path would relay. The links are file descriptors: when the daemon exits, even
//! by SIGKILL, the kernel detaches the program and frees the maps.

use std::{
    net::IpAddr,
    os::fd::{AsFd, OwnedFd},
    sync::{Arc, Mutex},
    time::Instant,
};

use aya::{
    Ebpf, EbpfError, EbpfLoader, Pod,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        tc::{SchedClassifierLinkId, TcAttachOptions},
    },
};
use turn_common::fast::{
    Binding, ChannelKey, Endpoint, FastConfig, MAP_CHANNELS, MAP_CONFIG, MAP_EGRESS, MAP_LOCAL,
    MAP_PEERS, MAP_TRAFFIC, MAP_VERDICTS, PROGRAM_NAME, PeerKey, Traffic, VERDICTS,
};
use turn_proto::server::FastBinding;

/// The compiled fast path, embedded at build time (see `build.rs`).
pub static FAST_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("TURN_FAST_OBJECT"));

/// The maps pinned in each UDP listener's directory beside the steering maps (for
/// inspection; the steering's clean-up removes them with the directory).
pub const PINNED_MAPS: [&str; 4] = [MAP_CHANNELS, MAP_PEERS, MAP_TRAFFIC, MAP_VERDICTS];

/// Why the fast path could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    #[error(
        "loading the fast path's eBPF object failed (needs root, or CAP_BPF and CAP_NET_ADMIN)"
    )]
    Load(#[source] Box<EbpfError>),
    #[error("the fast path's eBPF object has no program or map named {0}")]
    Missing(&'static str),
    #[error("the kernel rejected the fast path program")]
    Program(#[source] Box<ProgramError>),
    #[error("attaching the fast path to interface {interface} failed (TCX needs Linux 6.6)")]
    Attach {
        interface: String,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("BPF map operation on {map} failed")]
    Map {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("no free slot for the binding's counters ({0} bindings at most)")]
    Full(u32),
    #[error("cannot pin the fast path's maps in {dir}")]
    Pin {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the host's interfaces failed")]
    Interfaces(#[source] std::io::Error),
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> FastPathError {
    move |e| FastPathError::Map { map, source: Box::new(e) }
}

pub use crate::addresses::Interface;

/// The host's interfaces, with their link type and addresses.
pub fn interfaces() -> Result<Vec<Interface>, FastPathError> {
    crate::addresses::interfaces().map_err(FastPathError::Interfaces)
}

/// The interfaces the program must see datagrams on: loopback (re-injected datagrams,
/// local clients and peers) and every interface with one of `addresses` (all of them when
/// one is unspecified).
pub fn interfaces_for(all: &[Interface], addresses: &[IpAddr]) -> Vec<Interface> {
    let any = addresses.iter().any(IpAddr::is_unspecified);
    all.iter()
        .filter(|i| {
            i.up && (i.loopback
                || (i.ethernet && (any || i.addrs.iter().any(|a| addresses.contains(a)))))
        })
        .cloned()
        .collect()
}

/// The counters' slots, shared by the workers (a cold path: a binding begins or ends).
#[derive(Debug)]
pub struct Slots {
    free: Mutex<Vec<u32>>,
    capacity: u32,
}

impl Slots {
    fn new(capacity: u32) -> Slots {
        Slots { free: Mutex::new((0..capacity).rev().collect()), capacity }
    }

    fn take(&self) -> Option<u32> {
        self.free.lock().ok()?.pop()
    }

    fn give_back(&self, slot: u32) {
        if let Ok(mut free) = self.free.lock() {
            free.push(slot);
        }
    }
}

/// The loaded and attached fast path.
pub struct FastPath {
    ebpf: Ebpf,
    links: Vec<(String, SchedClassifierLinkId)>,
    slots: Arc<Slots>,
    local: HashMap<MapData, Endpoint, u32>,
    egress: HashMap<MapData, u32, u32>,
    config: Array<MapData, FastConfig>,
}

impl std::fmt::Debug for FastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastPath")
            .field("interfaces", &self.interfaces())
            .field("bindings", &self.slots.capacity)
            .finish_non_exhaustive()
    }
}

impl FastPath {
    /// Loads the program (the verifier checks it here) with room for `bindings` channel
    /// bindings; attaches nothing yet.
    pub fn load(bindings: u32) -> Result<FastPath, FastPathError> {
        let bindings = bindings.max(1);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_CHANNELS, bindings)
            .map_max_entries(MAP_PEERS, bindings)
            .map_max_entries(MAP_TRAFFIC, bindings)
            .load(FAST_OBJECT)
            .map_err(|e| FastPathError::Load(Box::new(e)))?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(FastPathError::Missing(PROGRAM_NAME))?
            .try_into()
            .map_err(|e| FastPathError::Program(Box::new(e)))?;
        program.load().map_err(|e| FastPathError::Program(Box::new(e)))?;
        Ok(FastPath {
            local: take_map(&mut ebpf, MAP_LOCAL)?,
            egress: take_map(&mut ebpf, MAP_EGRESS)?,
            config: take_map(&mut ebpf, MAP_CONFIG)?,
            ebpf,
            links: Vec::new(),
            slots: Arc::new(Slots::new(bindings)),
        })
    }

    /// Tells the program the host's addresses (re-injected on loopback), the interfaces a
    /// datagram may leave by, and the single egress interface if there is one. Replaces
    /// what it was told before.
    pub fn set_host(&mut self, all: &[Interface]) -> Result<(), FastPathError> {
        let old: Vec<Endpoint> = self.local.keys().flatten().collect();
        for key in old {
            let _ = self.local.remove(&key);
        }
        for ip in all.iter().flat_map(|i| i.addrs.iter()) {
            let key = Endpoint::new(std::net::SocketAddr::new(*ip, 0));
            self.local.insert(key, 1, 0).map_err(map_err(MAP_LOCAL))?;
        }
        let old: Vec<u32> = self.egress.keys().flatten().collect();
        for key in old {
            let _ = self.egress.remove(&key);
        }
        for i in all.iter().filter(|i| i.ethernet && !i.loopback) {
            self.egress.insert(i.index, 1, 0).map_err(map_err(MAP_EGRESS))?;
        }
        // The only interface up besides loopback, whatever its kind (a tunnel beside an
        // Ethernet interface carries routes of its own), and only if it is Ethernet-like.
        let up: Vec<&Interface> = all.iter().filter(|i| i.up && !i.loopback).collect();
        let single_egress = match up.as_slice() {
            [only] if only.ethernet => only.index,
            _ => 0,
        };
        self.config.set(0, FastConfig { single_egress, pad: 0 }, 0).map_err(map_err(MAP_CONFIG))
    }

    /// Attaches on the ingress of each interface (TCX, after the programs already there).
    pub fn attach(&mut self, to: &[Interface]) -> Result<(), FastPathError> {
        let program: &mut SchedClassifier = self
            .ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(FastPathError::Missing(PROGRAM_NAME))?
            .try_into()
            .map_err(|e| FastPathError::Program(Box::new(e)))?;
        for interface in to {
            let id = program
                .attach_with_options(
                    &interface.name,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(|e| FastPathError::Attach {
                    interface: interface.name.clone(),
                    source: Box::new(e),
                })?;
            self.links.push((interface.name.clone(), id));
        }
        Ok(())
    }

    /// Pins the binding, counter and verdict maps in `dir` (a listener's pin directory).
    pub fn pin(&self, dir: &std::path::Path) -> Result<(), FastPathError> {
        for name in PINNED_MAPS {
            let map = self.ebpf.map(name).ok_or(FastPathError::Missing(name))?;
            map.pin(dir.join(name)).map_err(|e| FastPathError::Pin {
                dir: dir.to_owned(),
                source: std::io::Error::other(e),
            })?;
        }
        Ok(())
    }

    /// The interfaces it is attached to.
    pub fn interfaces(&self) -> Vec<String> {
        self.links.iter().map(|(name, _)| name.clone()).collect()
    }

    /// Detaches from every interface.
    pub fn detach(&mut self) {
        let Some(program) = self.ebpf.program_mut(PROGRAM_NAME) else { return };
        let Ok(program): Result<&mut SchedClassifier, _> = program.try_into() else { return };
        for (_, id) in self.links.drain(..) {
            let _ = program.detach(id);
        }
    }

    /// A worker's handles on the binding maps.
    pub fn worker_maps(&self) -> Result<FastMaps, FastPathError> {
        Ok(FastMaps {
            channels: typed(self.dup(MAP_CHANNELS)?, MAP_CHANNELS)?,
            peers: typed(self.dup(MAP_PEERS)?, MAP_PEERS)?,
            traffic: {
                let map =
                    Map::from_map_data(self.dup(MAP_TRAFFIC)?).map_err(map_err(MAP_TRAFFIC))?;
                PerCpuArray::try_from(map).map_err(map_err(MAP_TRAFFIC))?
            },
            slots: Arc::clone(&self.slots),
        })
    }

    fn dup(&self, name: &'static str) -> Result<MapData, FastPathError> {
        let map = self.ebpf.map(name).ok_or(FastPathError::Missing(name))?;
        let data = match map {
            Map::HashMap(data) | Map::PerCpuArray(data) | Map::Array(data) => data,
            _ => return Err(FastPathError::Missing(name)),
        };
        let fd: OwnedFd =
            data.fd().as_fd().try_clone_to_owned().map_err(|e| FastPathError::Map {
                map: name,
                source: Box::new(MapError::SyscallError(aya::sys::SyscallError {
                    call: "dup",
                    io_error: e,
                })),
            })?;
        MapData::from_fd(fd).map_err(map_err(name))
    }

    /// What the program did with the datagrams it looked at, by [`turn_common::fast::Verdict`].
    pub fn verdicts(&self) -> Result<[u64; VERDICTS as usize], FastPathError> {
        let map = self.ebpf.map(MAP_VERDICTS).ok_or(FastPathError::Missing(MAP_VERDICTS))?;
        let verdicts: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(map_err(MAP_VERDICTS))?;
        let mut out = [0u64; VERDICTS as usize];
        for (i, total) in out.iter_mut().enumerate() {
            let per_cpu = verdicts.get(&(i as u32), 0).map_err(map_err(MAP_VERDICTS))?;
            *total = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// The loaded program (for `BPF_PROG_TEST_RUN` in tests).
    pub fn program(&self) -> Option<&SchedClassifier> {
        self.ebpf.program(PROGRAM_NAME)?.try_into().ok()
    }
}

impl Drop for FastPath {
    fn drop(&mut self) {
        self.detach();
    }
}

/// A worker's handles on the binding maps.
pub struct FastMaps {
    channels: HashMap<MapData, ChannelKey, Binding>,
    peers: HashMap<MapData, PeerKey, Binding>,
    traffic: PerCpuArray<MapData, Traffic>,
    slots: Arc<Slots>,
}

impl std::fmt::Debug for FastMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastMaps").finish_non_exhaustive()
    }
}

/// The two entries of a binding: client -> peer and peer -> client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entries {
    pub channel_key: ChannelKey,
    pub to_peer: Binding,
    pub peer_key: PeerKey,
    pub to_client: Binding,
}

impl Entries {
    /// The entries of `b`, counting in `slot`, relaying until `expires_ns`.
    pub fn of(b: &FastBinding, slot: u32, expires_ns: u64) -> Entries {
        let client = Endpoint::new(b.five_tuple.client);
        let listener = Endpoint::new(b.five_tuple.listener);
        let relay = Endpoint::new(b.relay.addr);
        let peer = Endpoint::new(b.peer);
        let channel = b.channel.to_be_bytes();
        Entries {
            channel_key: ChannelKey { client, listener, channel, pad: [0; 2] },
            to_peer: Binding { from: relay, to: peer, expires_ns, slot, channel, pad: [0; 2] },
            peer_key: PeerKey { peer, relay },
            to_client: Binding {
                from: listener,
                to: client,
                expires_ns,
                slot,
                channel,
                pad: [0; 2],
            },
        }
    }
}

impl FastMaps {
    /// Takes a counters slot, zeroed.
    pub fn take_slot(&mut self) -> Result<u32, FastPathError> {
        let slot = self.slots.take().ok_or(FastPathError::Full(self.slots.capacity))?;
        let cpus = aya::util::nr_cpus().unwrap_or(1);
        let zero = PerCpuValues::try_from(vec![Traffic::default(); cpus]).map_err(|e| {
            FastPathError::Map {
                map: MAP_TRAFFIC,
                source: Box::new(MapError::SyscallError(aya::sys::SyscallError {
                    call: "zero",
                    io_error: e,
                })),
            }
        })?;
        if let Err(e) = self.traffic.set(slot, zero, 0) {
            self.slots.give_back(slot);
            return Err(map_err(MAP_TRAFFIC)(e));
        }
        Ok(slot)
    }

    /// Returns a slot.
    pub fn give_back(&mut self, slot: u32) {
        self.slots.give_back(slot);
    }

    /// Writes (or moves the expiry of) both entries of `b`, counting in `slot`; on failure
    /// neither is left.
    pub fn write(&mut self, b: &FastBinding, slot: u32) -> Result<(), FastPathError> {
        // Both clocks read together: the stamp is the binding's expiry on the kernel's clock.
        let (now, now_ns) = (Instant::now(), crate::steering::monotonic_ns());
        let expires_ns =
            now_ns.saturating_add(b.expires_at.saturating_duration_since(now).as_nanos() as u64);
        let e = Entries::of(b, slot, expires_ns);
        let written = self
            .channels
            .insert(e.channel_key, e.to_peer, 0)
            .map_err(map_err(MAP_CHANNELS))
            .and_then(|()| {
                self.peers.insert(e.peer_key, e.to_client, 0).map_err(map_err(MAP_PEERS))
            });
        if written.is_err() {
            self.remove(b);
        }
        written
    }

    /// Removes both entries of `b` (absent ones are fine).
    pub fn remove(&mut self, b: &FastBinding) {
        let e = Entries::of(b, 0, 0);
        let _ = self.channels.remove(&e.channel_key);
        let _ = self.peers.remove(&e.peer_key);
    }

    /// What `slot` relayed so far, summed over CPUs.
    pub fn traffic(&self, slot: u32) -> Traffic {
        let mut sum = Traffic::default();
        if let Ok(per_cpu) = self.traffic.get(&slot, 0) {
            for t in per_cpu.iter() {
                sum.add(t);
            }
        }
        sum
    }
}

fn typed<K: Pod, V: Pod>(
    data: MapData,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, FastPathError> {
    let map = Map::from_map_data(data).map_err(map_err(name))?;
    HashMap::try_from(map).map_err(map_err(name))
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, FastPathError>
where
    M: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(FastPathError::Missing(name))?;
    M::try_from(map).map_err(map_err(name))
}

/// Most bindings in the kernel at once: 2^18 (the counters, one slot per binding and CPU,
/// are preallocated: 8 MiB per CPU).
pub const MAX_BINDINGS: u32 = 1 << 18;

/// Entries of each binding map for a daemon that holds `allocations` at most: two
/// channels each (a WebRTC allocation binds one peer, or a few), within [`MAX_BINDINGS`].
/// A binding beyond stays on the userspace path (counted).
pub fn bindings_for(allocations: u32) -> u32 {
    allocations.saturating_mul(2).clamp(1, MAX_BINDINGS)
}
