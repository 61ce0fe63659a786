//! Loader for the `turn_steer` SK_REUSEPORT program (see `turn-ebpf` and `turn-common`).
//!
//! One [`Steering`] serves one listener group (IPv4 and IPv6 are separate groups). It loads
//! its own copy of the program and maps, fills the socket array with the group's bound
//! sockets (slot `i` = worker `i`), writes the configuration and attaches once. Only then
//! are the maps pinned in the listener's bpffs directory ([`crate::bpffs`]), so that a
//! program the verifier rejects or an attach that fails leaves nothing behind, and
//! `turn-server load` and `turn-server steering set` can open them from another process.
//!
//! The program stays attached to the group until [`Steering::detach`] or until the last
//! socket of the group closes: dropping the aya program does not detach it.

use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader, Pod,
    maps::{Array, HashMap, IterableMap, Map, MapData, MapError, PerCpuArray, ReusePortSockArray},
    programs::{ProgramError, SkReuseport},
};
use turn_common::{
    FlowKey, FlowMemo, MAP_ALLOCS, MAP_CONFIG, MAP_LOAD, MAP_MEMO, MAP_PLACED, MAP_SOCKETS,
    MAP_STATS, MAX_SOCKETS, Mode, PROGRAM_NAME, STATS_UNSTEERED, SocketLoad, SocketStats,
    SteeringConfig,
};

use crate::bpffs;

/// The compiled `turn-ebpf` object, embedded at build time (see `build.rs`).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("TURN_EBPF_OBJECT"));

/// The maps pinned for other processes (and a later generation), by file name in the
/// listener's pin directory.
const PINNED_MAPS: [&str; 7] =
    [MAP_SOCKETS, MAP_CONFIG, MAP_LOAD, MAP_PLACED, MAP_STATS, MAP_ALLOCS, MAP_MEMO];

/// Why steering could not be set up, changed or read.
#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    #[error("loading the eBPF object failed (needs root, or CAP_BPF and CAP_NET_ADMIN)")]
    Load(#[source] Box<EbpfError>),
    #[error("the eBPF object has no program or map named {0}")]
    Missing(&'static str),
    #[error("the kernel rejected the steering program")]
    Program(#[source] Box<ProgramError>),
    #[error("BPF map operation on {map} failed")]
    Map {
        map: &'static str,
        #[source]
        source: Box<MapError>,
    },
    #[error("cannot pin the steering maps in {dir}")]
    Pin {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading map {map} in batches failed")]
    Batch {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot duplicate the descriptor of map {map}")]
    Dup {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("a listener group of {0} sockets cannot be steered (1 to {MAX_SOCKETS} are supported)")]
    GroupSize(usize),
    #[error("the pinned steering configuration is invalid ({0:?})")]
    Config(SteeringConfig),
    #[error("{dir} is in use by turn-server pid {pid}")]
    InUse { dir: PathBuf, pid: u32 },
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> SteeringError {
    move |e| SteeringError::Map { map, source: Box::new(e) }
}

/// Tunables of a steered group.
#[derive(Clone, Debug)]
pub struct SteeringOptions {
    /// Entries of the allocation pin map: size it for every allocation the daemon may hold.
    pub alloc_entries: u32,
    /// Entries of the program's memo of flows that are not allocations (LRU).
    pub memo_entries: u32,
    /// How long a memo holds, in milliseconds.
    pub memo_ttl_ms: u32,
    /// The listener's directory in bpffs where the maps are pinned once attached (none:
    /// not pinned).
    pub pin_dir: Option<PathBuf>,
}

impl Default for SteeringOptions {
    fn default() -> Self {
        Self {
            alloc_entries: turn_common::DEFAULT_ALLOC_ENTRIES,
            memo_entries: turn_common::DEFAULT_MEMO_ENTRIES,
            memo_ttl_ms: turn_common::DEFAULT_MEMO_TTL_MS,
            pin_dir: None,
        }
    }
}

/// Counters of a group, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupStats {
    /// One entry per socket of the generation (worker `i` at index `i`).
    pub sockets: Vec<SocketStats>,
    /// Datagrams the program left to the kernel's hash.
    pub unsteered: SocketStats,
}

/// Pins and memos per socket of the generation (worker `i` at index `i`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PinCounts {
    /// Allocation pins naming each socket.
    pub allocations: Vec<u64>,
    /// Unexpired memos naming each socket.
    pub memos: Vec<u64>,
    /// Memos in the map, expired or not.
    pub memo_entries: u64,
}

/// Handles on the maps of one group: the daemon's own, or another process's opened from
/// their pins.
pub struct GroupMaps {
    config: Array<MapData, SteeringConfig>,
    load: Array<MapData, SocketLoad>,
    placed: Array<MapData, u64>,
    stats: PerCpuArray<MapData, SocketStats>,
    allocs: HashMap<MapData, FlowKey, u32>,
    memo: HashMap<MapData, FlowKey, FlowMemo>,
    /// Second descriptors of the two hash maps, for batched reads.
    allocs_fd: OwnedFd,
    memo_fd: OwnedFd,
    /// The slots of the process that holds these maps (its generation); None when read
    /// from another process (`turn-server load`): then the configured generation's.
    own: Option<std::ops::Range<u32>>,
}

impl GroupMaps {
    fn take(ebpf: &mut Ebpf) -> Result<Self, SteeringError> {
        let allocs_fd = dup_map(ebpf, MAP_ALLOCS)?;
        let memo_fd = dup_map(ebpf, MAP_MEMO)?;
        Ok(Self {
            config: take_map(ebpf, MAP_CONFIG)?,
            load: take_map(ebpf, MAP_LOAD)?,
            placed: take_map(ebpf, MAP_PLACED)?,
            stats: take_map(ebpf, MAP_STATS)?,
            allocs: take_map(ebpf, MAP_ALLOCS)?,
            memo: take_map(ebpf, MAP_MEMO)?,
            allocs_fd,
            memo_fd,
            own: None,
        })
    }

    /// Opens the maps pinned in a listener directory, every one for reading and writing.
    pub fn open_pinned(dir: &Path) -> Result<Self, SteeringError> {
        Self::open_pinned_as(dir, false)
    }

    /// Opens the maps pinned in a listener directory; `inspect`: every map read-only but
    /// the configuration (what `turn-server load` and `steering set` need, and all the
    /// admin group may have).
    pub fn open_pinned_as(dir: &Path, inspect: bool) -> Result<Self, SteeringError> {
        Self::from_fds(&mut |name| {
            let read_only = inspect && name != MAP_CONFIG;
            obj_get(&dir.join(name), read_only).map_err(|e| SteeringError::Map {
                map: name,
                source: Box::new(MapError::PinError {
                    name: Some(name.to_owned()),
                    error: aya::pin::PinError::SyscallError(aya::sys::SyscallError {
                        call: "BPF_OBJ_GET",
                        io_error: e,
                    }),
                }),
            })
        })
    }

    /// The maps from descriptors `fd` gives by map name (pinned maps, or descriptors a
    /// previous generation handed over).
    fn from_fds(
        fd: &mut dyn FnMut(&'static str) -> Result<OwnedFd, SteeringError>,
    ) -> Result<Self, SteeringError> {
        let mut data = |name: &'static str| -> Result<MapData, SteeringError> {
            MapData::from_fd(fd(name)?).map_err(map_err(name))
        };
        fn cast<M: TryFrom<Map, Error = MapError>>(
            data: MapData,
            name: &'static str,
        ) -> Result<M, SteeringError> {
            M::try_from(Map::from_map_data(data).map_err(map_err(name))?).map_err(map_err(name))
        }
        let allocs = data(MAP_ALLOCS)?;
        let memo = data(MAP_MEMO)?;
        Ok(Self {
            config: cast(data(MAP_CONFIG)?, MAP_CONFIG)?,
            load: cast(data(MAP_LOAD)?, MAP_LOAD)?,
            placed: cast(data(MAP_PLACED)?, MAP_PLACED)?,
            stats: cast(data(MAP_STATS)?, MAP_STATS)?,
            allocs_fd: clone_fd(&allocs, MAP_ALLOCS)?,
            memo_fd: clone_fd(&memo, MAP_MEMO)?,
            allocs: typed(allocs, MAP_ALLOCS)?,
            memo: typed(memo, MAP_MEMO)?,
            own: None,
        })
    }

    pub fn config(&self) -> Result<SteeringConfig, SteeringError> {
        let config = self.config.get(&0, 0).map_err(map_err(MAP_CONFIG))?;
        if !config.is_valid() {
            return Err(SteeringError::Config(config));
        }
        Ok(config)
    }

    /// Changes how new flows are placed; pinned and remembered flows keep their socket.
    pub fn set_mode(&mut self, mode: Mode) -> Result<(), SteeringError> {
        let mut config = self.config()?;
        config.mode = mode as u32;
        self.config.set(0, config, 0).map_err(map_err(MAP_CONFIG))
    }

    /// The generation's slots, in worker order.
    /// This process's slots, or (read from outside) those of the generation that takes
    /// new flows.
    fn slots(&self) -> Result<std::ops::Range<u32>, SteeringError> {
        if let Some(own) = &self.own {
            return Ok(own.clone());
        }
        let c = self.config()?;
        Ok(c.first_slot..c.first_slot + c.num_sockets)
    }

    /// The published loads of the slots `range` (another generation's, for `load`).
    pub fn loads_of(&self, range: std::ops::Range<u32>) -> Result<Vec<SocketLoad>, SteeringError> {
        range.map(|i| self.load.get(&i, 0).map_err(map_err(MAP_LOAD))).collect()
    }

    /// Makes the generation at `slots` the one that takes new flows (and new connections).
    pub fn set_generation(&mut self, slots: std::ops::Range<u32>) -> Result<(), SteeringError> {
        let mut config = self.config()?;
        config.first_slot = slots.start;
        config.num_sockets = slots.len() as u32;
        if !config.is_valid() {
            return Err(SteeringError::Config(config));
        }
        self.config.set(0, config, 0).map_err(map_err(MAP_CONFIG))
    }

    /// Forgets what a generation that is gone left at `slots`: its allocation pins (a
    /// process killed before it could remove them) and its published loads. Returns the
    /// pins removed.
    pub fn clear_slots(&mut self, slots: std::ops::Range<u32>) -> Result<usize, SteeringError> {
        let mut stale = Vec::new();
        for_each_entry::<FlowKey, u32>(self.allocs_fd.as_fd(), &mut |key, slot| {
            if slots.contains(slot) {
                stale.push(*key);
            }
        })
        .map_err(|e| SteeringError::Batch { map: MAP_ALLOCS, source: e })?;
        for key in &stale {
            let _ = self.allocs.remove(key);
        }
        for slot in slots {
            let _ = self.load.set(slot, SocketLoad::default(), 0);
        }
        Ok(stale.len())
    }

    /// Publishes the load of worker `index` of the generation.
    pub fn set_load(&mut self, index: u32, load: SocketLoad) -> Result<(), SteeringError> {
        let slot = self.slots()?.start + index;
        self.load.set(slot, load, 0).map_err(map_err(MAP_LOAD))
    }

    /// The published load of each worker.
    pub fn loads(&self) -> Result<Vec<SocketLoad>, SteeringError> {
        self.slots()?.map(|i| self.load.get(&i, 0).map_err(map_err(MAP_LOAD))).collect()
    }

    /// Flows the program placed on each worker's socket so far.
    pub fn placed(&self) -> Result<Vec<u64>, SteeringError> {
        self.slots()?.map(|i| self.placed.get(&i, 0).map_err(map_err(MAP_PLACED))).collect()
    }

    /// Per-socket counters, summed over CPUs.
    pub fn stats(&self) -> Result<GroupStats, SteeringError> {
        self.stats_of(self.slots()?)
    }

    /// The counters of the slots `range` (a generation's), and the unsteered ones.
    pub fn stats_of(&self, range: std::ops::Range<u32>) -> Result<GroupStats, SteeringError> {
        let read = |slot: u32| -> Result<SocketStats, SteeringError> {
            let per_cpu = self.stats.get(&slot, 0).map_err(map_err(MAP_STATS))?;
            let mut sum = SocketStats::default();
            for value in per_cpu.iter() {
                sum.add(value);
            }
            Ok(sum)
        };
        let sockets = range.map(read).collect::<Result<Vec<_>, _>>()?;
        Ok(GroupStats { sockets, unsteered: read(STATS_UNSTEERED)? })
    }

    pub fn allocation_pin(&self, flow: &FlowKey) -> Option<u32> {
        self.allocs.get(flow, 0).ok()
    }

    /// What the program remembers of `flow`, if anything.
    pub fn memo(&self, flow: &FlowKey) -> Option<FlowMemo> {
        self.memo.get(flow, 0).ok()
    }

    /// Allocation pins and live memos per worker, read in batches (a cold path, but one
    /// that stays fast with 100k pins).
    pub fn pin_counts(&self) -> Result<PinCounts, SteeringError> {
        self.pin_counts_of(self.slots()?)
    }

    /// [`GroupMaps::pin_counts`] for the slots `slots` (a generation's).
    pub fn pin_counts_of(&self, slots: std::ops::Range<u32>) -> Result<PinCounts, SteeringError> {
        let per_worker = |slot: u32| slot.checked_sub(slots.start).map(|i| i as usize);
        let n = slots.len();
        let mut counts = PinCounts { allocations: vec![0; n], memos: vec![0; n], memo_entries: 0 };
        for_each_entry::<FlowKey, u32>(self.allocs_fd.as_fd(), &mut |_, &slot| {
            if let Some(c) = per_worker(slot).and_then(|i| counts.allocations.get_mut(i)) {
                *c += 1;
            }
        })
        .map_err(|e| SteeringError::Batch { map: MAP_ALLOCS, source: e })?;
        let now = monotonic_ns();
        for_each_entry::<FlowKey, FlowMemo>(self.memo_fd.as_fd(), &mut |_, memo| {
            counts.memo_entries += 1;
            if memo.expires_ns > now
                && let Some(c) = per_worker(memo.slot).and_then(|i| counts.memos.get_mut(i))
            {
                *c += 1;
            }
        })
        .map_err(|e| SteeringError::Batch { map: MAP_MEMO, source: e })?;
        Ok(counts)
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec we pass; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// `bpf(2)` command numbers and attribute layout of the batched lookup (Linux 5.6+),
/// which aya 0.14 does not wrap: one syscall per chunk of entries instead of two per
/// entry (`get_next_key` + lookup), so counting 100k pins takes milliseconds.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BATCH_CHUNK: usize = 4096;

#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Calls `f` for every entry of the hash map `fd` (keys `K`, values `V`), in batches.
/// Falls back to key-by-key iteration on a kernel without batched lookups.
fn for_each_entry<K: Pod + Default, V: Pod + Default>(
    fd: BorrowedFd<'_>,
    f: &mut dyn FnMut(&K, &V),
) -> std::io::Result<()> {
    let mut keys = vec![K::default(); BATCH_CHUNK];
    let mut values = vec![V::default(); BATCH_CHUNK];
    // The batch token of a hash map is a bucket index (u32); 8 bytes leaves room.
    let mut token_in = [0u8; 8];
    let mut token_out = [0u8; 8];
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH_CHUNK as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: the attribute points at buffers of `count` keys and values of the map's
        // key and value types (K and V are the map's Pod types) and at 8-byte tokens; the
        // kernel writes at most `count` entries and the token, and `count` back.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as u32,
            )
        };
        let got = (attr.count as usize).min(BATCH_CHUNK);
        let error = (rc < 0).then(std::io::Error::last_os_error);
        for (k, v) in
            keys.iter().zip(&values).take(if error.is_some() && got == 0 { 0 } else { got })
        {
            f(k, v);
        }
        match error.and_then(|e| e.raw_os_error()) {
            None => {}
            // The end of the map (the last chunk may carry entries too).
            Some(libc::ENOENT) => return Ok(()),
            Some(libc::EINVAL | libc::ENOTSUP | libc::EOPNOTSUPP) if first => {
                return for_each_entry_slowly(fd, f);
            }
            Some(errno) => return Err(std::io::Error::from_raw_os_error(errno)),
        }
        token_in = token_out;
        first = false;
    }
}

fn for_each_entry_slowly<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    f: &mut dyn FnMut(&K, &V),
) -> std::io::Result<()> {
    let data = MapData::from_fd(fd.try_clone_to_owned()?).map_err(std::io::Error::other)?;
    let map = Map::from_map_data(data).map_err(std::io::Error::other)?;
    let map: HashMap<MapData, K, V> = HashMap::try_from(map).map_err(std::io::Error::other)?;
    for (k, v) in map.iter().flatten() {
        f(&k, &v);
    }
    Ok(())
}

/// A worker's own handle on the allocation pin map, to pin its allocations' flows.
pub struct FlowPins {
    pins: HashMap<MapData, FlowKey, u32>,
    slot: u32,
}

impl FlowPins {
    /// Pins `flow` to this worker's socket (replacing any other pin). Fails when the map
    /// is full.
    pub fn pin(&mut self, flow: &FlowKey) -> Result<(), SteeringError> {
        self.pins.insert(flow, self.slot, 0).map_err(map_err(MAP_ALLOCS))
    }

    /// Forgets the pin of `flow`; an absent pin is fine.
    pub fn unpin(&mut self, flow: &FlowKey) {
        let _ = self.pins.remove(flow);
    }

    /// The slot `flow` is pinned to, if any.
    pub fn pinned_socket(&self, flow: &FlowKey) -> Option<u32> {
        self.pins.get(flow, 0).ok()
    }
}

/// Where a datagram the previous generation handed over goes among this process's
/// workers: where the group's maps send the flow (its allocation's pin, or the program's
/// memo of it in this generation), else a worker chosen here and remembered in the memo,
/// so that the flow's next datagrams, straight from the kernel, reach the same worker.
pub struct FlowRouter {
    allocs: HashMap<MapData, FlowKey, u32>,
    memo: HashMap<MapData, FlowKey, FlowMemo>,
    slots: std::ops::Range<u32>,
    memo_ttl_ns: u64,
}

impl FlowRouter {
    /// The worker (index in this generation) for the flow of `client` to `local`;
    /// `pick` is the worker to take when the maps name none.
    pub fn worker_for(
        &mut self,
        client: std::net::SocketAddr,
        local: std::net::IpAddr,
        pick: u32,
    ) -> u32 {
        let key = FlowKey::new(client, local);
        let mine = |slot: u32| self.slots.contains(&slot).then(|| slot - self.slots.start);
        if let Some(worker) = self.allocs.get(&key, 0).ok().and_then(mine) {
            return worker;
        }
        let now = monotonic_ns();
        if let Some(worker) =
            self.memo.get(&key, 0).ok().filter(|m| m.expires_ns > now).and_then(|m| mine(m.slot))
        {
            return worker;
        }
        let worker = pick % self.slots.len().max(1) as u32;
        let memo = FlowMemo {
            slot: self.slots.start + worker,
            pad: 0,
            expires_ns: now.saturating_add(self.memo_ttl_ns),
        };
        let _ = self.memo.insert(key, memo, 0);
        worker
    }
}

/// A loaded and attached steering program for one listener group.
pub struct Steering {
    /// Rare events the program reports (pin repairs), forwarded to our log.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// The loaded object (None in a process that joined a group another one steers).
    _ebpf: Option<Ebpf>,
    maps: GroupMaps,
    allocs_fd: MapData,
    /// The group's socket array, to hand over to a new generation.
    sockets_fd: OwnedFd,
    /// The program, to attach again to a group bound anew (and to hand over).
    program_fd: Option<OwnedFd>,
    num_sockets: u32,
    /// This process's first slot in the socket array (its generation).
    first_slot: u32,
    pin_dir: Option<PathBuf>,
    /// The pin directory by descriptor, to remove the pins at exit.
    pinned: Option<bpffs::PinnedDir>,
    owner: Option<bpffs::Owner>,
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("num_sockets", &self.num_sockets)
            .field("first_slot", &self.first_slot)
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl Steering {
    /// Loads the program, puts `sockets[i]` in slot `i`, attaches to their group, then
    /// pins the maps in `options.pin_dir` (if any).
    ///
    /// Every socket must already be bound, with SO_REUSEPORT, to the same address; `mode`
    /// is the placement of new flows (`Kernel` leaves it to the kernel).
    pub fn attach<S: AsFd>(
        sockets: &[S],
        mode: Mode,
        options: SteeringOptions,
    ) -> Result<Self, SteeringError> {
        if sockets.is_empty() || sockets.len() > MAX_SOCKETS as usize {
            return Err(SteeringError::GroupSize(sockets.len()));
        }
        let num_sockets = sockets.len() as u32;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_ALLOCS, options.alloc_entries.max(1))
            .map_max_entries(MAP_MEMO, options.memo_entries.max(1))
            .load(EBPF_OBJECT)
            .map_err(|e| SteeringError::Load(Box::new(e)))?;

        {
            let map = ebpf.map_mut(MAP_SOCKETS).ok_or(SteeringError::Missing(MAP_SOCKETS))?;
            let mut socket_array: ReusePortSockArray<&mut MapData> =
                ReusePortSockArray::try_from(map).map_err(map_err(MAP_SOCKETS))?;
            for (i, socket) in sockets.iter().enumerate() {
                socket_array
                    .set(i as u32, &socket.as_fd().as_raw_fd(), 0)
                    .map_err(map_err(MAP_SOCKETS))?;
            }
        }
        {
            let map = ebpf.map_mut(MAP_CONFIG).ok_or(SteeringError::Missing(MAP_CONFIG))?;
            let mut config: Array<&mut MapData, SteeringConfig> =
                Array::try_from(map).map_err(map_err(MAP_CONFIG))?;
            let value = SteeringConfig {
                mode: mode as u32,
                num_sockets,
                first_slot: 0,
                memo_ttl_ms: options.memo_ttl_ms,
            };
            config.set(0, value, 0).map_err(map_err(MAP_CONFIG))?;
        }
        // The program still works without its log (only rare events go there).
        let logger = aya_log::EbpfLogger::init(&mut ebpf).ok();

        let program: &mut SkReuseport = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(SteeringError::Missing(PROGRAM_NAME))?
            .try_into()
            .map_err(|e| SteeringError::Program(Box::new(e)))?;
        program.load().map_err(|e| SteeringError::Program(Box::new(e)))?;
        program.attach(sockets[0].as_fd()).map_err(|e| SteeringError::Program(Box::new(e)))?;
        let program_fd = program.fd().ok().and_then(|fd| fd.as_fd().try_clone_to_owned().ok());

        // Attached: now the maps may be shown to other processes.
        let mut owner = None;
        let mut pinned_dir = None;
        if let Some(dir) = &options.pin_dir {
            let pinned = bpffs::Owner::current()
                .map(|me| me.with_slots(0, num_sockets))
                .map_err(|source| SteeringError::Pin { dir: dir.clone(), source })
                .and_then(|me| {
                    pin_maps(&ebpf, dir, me)?;
                    let handle = bpffs::PinnedDir::open(dir).map_err(|source| {
                        unpin_maps(dir, Some(me));
                        SteeringError::Pin { dir: dir.clone(), source }
                    })?;
                    Ok((me, handle))
                });
            match pinned {
                Ok((me, handle)) => {
                    owner = Some(me);
                    pinned_dir = Some(handle);
                }
                Err(e) => {
                    let _ = SkReuseport::detach(sockets[0].as_fd());
                    return Err(e);
                }
            }
        }
        let allocs_fd =
            MapData::from_fd(dup_map(&ebpf, MAP_ALLOCS)?).map_err(map_err(MAP_ALLOCS))?;
        let sockets_fd = dup_map(&ebpf, MAP_SOCKETS)?;
        let mut maps = GroupMaps::take(&mut ebpf)?;
        maps.own = Some(0..num_sockets);
        Ok(Self {
            logger,
            _ebpf: Some(ebpf),
            maps,
            allocs_fd,
            sockets_fd,
            program_fd,
            num_sockets,
            first_slot: 0,
            pin_dir: options.pin_dir,
            pinned: pinned_dir,
            owner,
        })
    }

    /// Joins a group another process of this daemon steers (a hitless upgrade): puts
    /// `sockets[i]` in slot `first_slot + i` of the group's socket array, from the maps'
    /// descriptors that process handed over (by map name), and records this process in
    /// the pin directory. New flows keep going to the other process until
    /// [`Steering::take_new_flows`].
    pub fn adopt<S: AsFd>(
        sockets: &[S],
        first_slot: u32,
        fds: &mut std::collections::HashMap<String, OwnedFd>,
        pinned: Option<(PathBuf, bpffs::PinnedDir)>,
    ) -> Result<Self, SteeringError> {
        let n = sockets.len() as u32;
        if sockets.is_empty() || first_slot.saturating_add(n) > MAX_SOCKETS {
            return Err(SteeringError::GroupSize(sockets.len()));
        }
        let mut take = |name: &'static str| fds.remove(name).ok_or(SteeringError::Missing(name));
        let sockets_fd = take(MAP_SOCKETS)?;
        let program_fd = fds.remove(PROGRAM_NAME);
        let mut take = |name: &'static str| fds.remove(name).ok_or(SteeringError::Missing(name));
        {
            let data = MapData::from_fd(
                sockets_fd
                    .try_clone()
                    .map_err(|source| SteeringError::Dup { map: MAP_SOCKETS, source })?,
            )
            .map_err(map_err(MAP_SOCKETS))?;
            let mut socket_array: ReusePortSockArray<MapData> =
                ReusePortSockArray::try_from(Map::ReusePortSockArray(data))
                    .map_err(map_err(MAP_SOCKETS))?;
            for (i, socket) in sockets.iter().enumerate() {
                socket_array
                    .set(first_slot + i as u32, &socket.as_fd().as_raw_fd(), 0)
                    .map_err(map_err(MAP_SOCKETS))?;
            }
        }
        let mut maps = GroupMaps::from_fds(&mut take)?;
        maps.own = Some(first_slot..first_slot + n);
        let allocs_fd = MapData::from_fd(clone_fd_raw(&maps.allocs_fd, MAP_ALLOCS)?)
            .map_err(map_err(MAP_ALLOCS))?;
        let (pin_dir, pinned) = match pinned {
            Some((dir, handle)) => (Some(dir), Some(handle)),
            None => (None, None),
        };
        let owner = match (&pinned, bpffs::Owner::current()) {
            (Some(handle), Ok(me)) => {
                let me = me.with_slots(first_slot, n);
                match handle.add_owner(me) {
                    Ok(()) => Some(me),
                    Err(e) => {
                        log::warn!("cannot record this process in the pin directory: {e}");
                        None
                    }
                }
            }
            _ => None,
        };
        Ok(Self {
            logger: None,
            _ebpf: None,
            maps,
            allocs_fd,
            sockets_fd,
            program_fd,
            num_sockets: n,
            first_slot,
            pin_dir,
            pinned,
            owner,
        })
    }

    /// Descriptors of the group's maps, by name, and of its pin directory, for a new
    /// generation of the daemon ([`Steering::adopt`]).
    pub fn handover(&self) -> Result<(NamedFds, Option<bpffs::PinnedDir>), SteeringError> {
        let dup = |fd: &OwnedFd, name: &'static str| clone_fd_raw(fd, name).map(|fd| (name, fd));
        let m = &self.maps;
        let mut fds = vec![
            dup(&self.sockets_fd, MAP_SOCKETS)?,
            (MAP_CONFIG, clone_fd(IterableMap::map(&m.config), MAP_CONFIG)?),
            (MAP_LOAD, clone_fd(IterableMap::map(&m.load), MAP_LOAD)?),
            (MAP_PLACED, clone_fd(IterableMap::map(&m.placed), MAP_PLACED)?),
            (MAP_STATS, clone_fd(IterableMap::map(&m.stats), MAP_STATS)?),
            dup(&m.allocs_fd, MAP_ALLOCS)?,
            dup(&m.memo_fd, MAP_MEMO)?,
        ];
        if let Some(program) = &self.program_fd {
            fds.push(dup(program, PROGRAM_NAME)?);
        }
        let pinned = match &self.pinned {
            Some(p) => Some(p.try_clone().map_err(|source| SteeringError::Pin {
                dir: self.pin_dir.clone().unwrap_or_default(),
                source,
            })?),
            None => None,
        };
        Ok((fds, pinned))
    }

    /// Puts `sockets` in this process's slots again (listeners bound anew).
    pub fn replace_sockets<S: AsFd>(&mut self, sockets: &[S]) -> Result<(), SteeringError> {
        let fd = clone_fd_raw(&self.sockets_fd, MAP_SOCKETS)?;
        let data = MapData::from_fd(fd).map_err(map_err(MAP_SOCKETS))?;
        let mut socket_array: ReusePortSockArray<MapData> =
            ReusePortSockArray::try_from(Map::ReusePortSockArray(data))
                .map_err(map_err(MAP_SOCKETS))?;
        for (i, socket) in sockets.iter().enumerate().take(self.num_sockets as usize) {
            socket_array
                .set(self.first_slot + i as u32, &socket.as_fd().as_raw_fd(), 0)
                .map_err(map_err(MAP_SOCKETS))?;
        }
        // A group whose every socket had closed is a new group, without the program.
        if let (Some(program), Some(first)) = (&self.program_fd, sockets.first()) {
            let fd: libc::c_int = program.as_raw_fd();
            // SAFETY: setsockopt with an int (the program's descriptor) of its size.
            let rc = unsafe {
                libc::setsockopt(
                    first.as_fd().as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_ATTACH_REUSEPORT_EBPF,
                    (&fd as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(SteeringError::Program(Box::new(ProgramError::SyscallError(
                    aya::sys::SyscallError {
                        call: "setsockopt(SO_ATTACH_REUSEPORT_EBPF)",
                        io_error: std::io::Error::last_os_error(),
                    },
                ))));
            }
        }
        Ok(())
    }

    /// Removes what another generation, now gone, left in the pin directory: the
    /// markers of dead processes and the pins named `pins`.
    pub fn remove_leftovers(&self, pins: &[&str]) {
        if let Some(p) = &self.pinned {
            p.remove_dead_owners();
            p.remove(pins, None);
        }
    }

    /// A [`FlowRouter`] for this process's slots.
    pub fn flow_router(&self) -> Result<FlowRouter, SteeringError> {
        let data =
            |fd: &OwnedFd, name| MapData::from_fd(clone_fd_raw(fd, name)?).map_err(map_err(name));
        let config = self.maps.config()?;
        Ok(FlowRouter {
            allocs: typed(data(&self.maps.allocs_fd, MAP_ALLOCS)?, MAP_ALLOCS)?,
            memo: typed(data(&self.maps.memo_fd, MAP_MEMO)?, MAP_MEMO)?,
            slots: self.slots(),
            memo_ttl_ns: config.memo_ttl_ns(),
        })
    }

    /// This process's slots in the group's socket array.
    pub fn slots(&self) -> std::ops::Range<u32> {
        self.first_slot..self.first_slot + self.num_sockets
    }

    /// Points new flows (new connections, for a TCP group) at this process's sockets.
    pub fn take_new_flows(&mut self) -> Result<(), SteeringError> {
        let slots = self.slots();
        self.maps.set_generation(slots)
    }

    /// True when this process's sockets take new flows.
    pub fn takes_new_flows(&self) -> bool {
        self.maps.config().is_ok_and(|c| c.first_slot == self.first_slot)
    }

    /// Other live processes steering this group (a generation before or after this one).
    pub fn other_owners(&self) -> Vec<bpffs::Owner> {
        self.pinned.as_ref().map(|p| p.other_live_owners(std::process::id())).unwrap_or_default()
    }

    /// Forwards what the program logged (pin repairs) to the `log`/`tracing` output.
    pub fn flush_logs(&mut self) {
        if let Some(logger) = self.logger.as_mut() {
            logger.flush();
        }
    }

    /// Number of sockets in the group.
    pub fn num_sockets(&self) -> u32 {
        self.num_sockets
    }

    /// Where the maps are pinned, if they are.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// Current placement mode for new flows (read from the map: `turn-server steering set`
    /// may have changed it).
    pub fn mode(&self) -> Result<Mode, SteeringError> {
        Ok(Mode::from_raw(self.maps.config()?.mode))
    }

    /// The group's maps.
    pub fn maps(&self) -> &GroupMaps {
        &self.maps
    }

    /// The group's maps, to write.
    pub fn maps_mut(&mut self) -> &mut GroupMaps {
        &mut self.maps
    }

    /// A handle for worker `socket` to pin its allocations' flows.
    pub fn flow_pins(&self, socket: u32) -> Result<FlowPins, SteeringError> {
        let fd = clone_fd(&self.allocs_fd, MAP_ALLOCS)?;
        let data = MapData::from_fd(fd).map_err(map_err(MAP_ALLOCS))?;
        let slot = self.first_slot + socket;
        Ok(FlowPins { pins: typed(data, MAP_ALLOCS)?, slot })
    }

    /// Detaches the program from the group `member` belongs to and removes the pins (by
    /// descriptor: the daemon may no longer be able to reach them by path). Returns
    /// whether the pin directory is gone (it always is but for a failure worth a warning).
    ///
    /// When another generation of the daemon still steers the group, the program and the
    /// maps stay: only this process's record goes, with the fast path's pins when
    /// `fast_pins` (this process pinned them), and `Ok(Detach::Stayed(pid))` says so.
    pub fn detach(
        self,
        member: Option<BorrowedFd<'_>>,
        fast_pins: bool,
    ) -> Result<Detach, SteeringError> {
        if let Some(other) = self.other_owners().first() {
            let fast: &[&str] = if fast_pins { &crate::fast_path::PINNED_MAPS } else { &[] };
            if let Some(p) = &self.pinned {
                p.remove(fast, self.owner);
            }
            return Ok(Detach::Stayed(other.pid));
        }
        // No socket of ours left in the group (its last sockets close with this process,
        // and the program with them).
        let detached = member.map_or(Ok(()), |m| {
            SkReuseport::detach(m).map_err(|e| SteeringError::Program(Box::new(e)))
        });
        // The fast path's maps are pinned beside the group's (`FastPath::pin`).
        let pins: Vec<&str> =
            PINNED_MAPS.iter().chain(crate::fast_path::PINNED_MAPS.iter()).copied().collect();
        let removed = self.pinned.as_ref().is_none_or(|p| p.remove(&pins, self.owner));
        detached.map(|()| if removed { Detach::Removed } else { Detach::PinsLeft })
    }
}

/// Descriptors of a group's maps (and program), by name.
pub type NamedFds = Vec<(&'static str, OwnedFd)>;

/// What [`Steering::detach`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detach {
    /// Program detached, pins removed.
    Removed,
    /// Program detached; some pins could not be removed (the next start removes them).
    PinsLeft,
    /// Another generation (this pid) still steers the group: program and maps stay.
    Stayed(u32),
}

/// Pins every map of the group in `dir` (a fresh directory) and records `owner`; on
/// failure removes what it made.
fn pin_maps(ebpf: &Ebpf, dir: &Path, owner: bpffs::Owner) -> Result<(), SteeringError> {
    let pin_err = |source| SteeringError::Pin { dir: dir.to_owned(), source };
    if let Some(other) = bpffs::owners(dir).into_iter().find(bpffs::Owner::is_alive) {
        return Err(SteeringError::InUse { dir: dir.to_owned(), pid: other.pid });
    }
    // Whatever is left there belongs to nobody (remove_stale ran at start).
    let _ = std::fs::remove_dir_all(dir);
    let result = (|| {
        std::fs::create_dir_all(dir).map_err(pin_err)?;
        for name in PINNED_MAPS {
            let map = ebpf.map(name).ok_or(SteeringError::Missing(name))?;
            map.pin(dir.join(name)).map_err(|e| pin_err(std::io::Error::other(e)))?;
        }
        bpffs::add_owner(dir, owner).map_err(pin_err)
    })();
    if result.is_err() {
        unpin_maps(dir, Some(owner));
    }
    result
}

/// Removes a group's pins, its owner marker and its directory (best effort: what is left
/// is stale and is removed by the next start).
pub fn unpin_maps(dir: &Path, owner: Option<bpffs::Owner>) {
    for name in PINNED_MAPS {
        let _ = std::fs::remove_file(dir.join(name));
    }
    if let Some(owner) = owner {
        bpffs::remove_owner(dir, owner);
    }
    let _ = std::fs::remove_dir(dir);
}

fn dup_map(ebpf: &Ebpf, name: &'static str) -> Result<OwnedFd, SteeringError> {
    let map = ebpf.map(name).ok_or(SteeringError::Missing(name))?;
    let data = match map {
        Map::LruHashMap(data)
        | Map::HashMap(data)
        | Map::Array(data)
        | Map::ReusePortSockArray(data) => data,
        _ => return Err(SteeringError::Missing(name)),
    };
    clone_fd(data, name)
}

/// BPF_OBJ_GET on a pinned object, read-only or read-write (aya 0.14's `from_pin` asks for
/// both, which a group allowed only to read is refused).
fn obj_get(path: &Path, read_only: bool) -> std::io::Result<OwnedFd> {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_F_RDONLY: u32 = 1 << 3;
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    let attr = ObjAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: if read_only { BPF_F_RDONLY } else { 0 },
    };
    // SAFETY: bpf(2) with a BPF_OBJ_GET attribute of its stated size, whose path pointer
    // outlives the call; the kernel zero-extends the rest of `union bpf_attr`.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjAttr,
            std::mem::size_of::<ObjAttr>() as u32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

fn clone_fd(data: &MapData, map: &'static str) -> Result<OwnedFd, SteeringError> {
    data.fd().as_fd().try_clone_to_owned().map_err(|source| SteeringError::Dup { map, source })
}

fn clone_fd_raw(fd: &OwnedFd, map: &'static str) -> Result<OwnedFd, SteeringError> {
    fd.try_clone().map_err(|source| SteeringError::Dup { map, source })
}

fn typed<K: Pod, V: Pod>(
    data: MapData,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, SteeringError> {
    let map = Map::from_map_data(data).map_err(map_err(name))?;
    HashMap::try_from(map).map_err(map_err(name))
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, SteeringError>
where
    M: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(SteeringError::Missing(name))?;
    M::try_from(map).map_err(map_err(name))
}
