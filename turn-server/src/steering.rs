//! Loader for the `turn_steer` SK_REUSEPORT program (see `turn-ebpf` and `turn-common`).
//!
//! One [`Steering`] serves one listener group (IPv4 and IPv6 are separate groups). It loads
//! its own copy of the program and maps, fills the socket array with the group's bound
//! sockets (slot `i` = worker `i`), writes the configuration and attaches once. Its maps
//! may be pinned in bpffs ([`crate::bpffs`]) so that `turn-server load` and
//! `turn-server steering set` can open them from another process.
//!
//! The program stays attached to the group until [`Steering::detach`] or until the last
//! socket of the group closes: dropping the aya program does not detach it.

use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, ReusePortSockArray},
    programs::{ProgramError, SkReuseport},
};
use turn_common::{
    FlowKey, MAP_CONFIG, MAP_LOAD, MAP_PINS, MAP_PLACED, MAP_SOCKETS, MAP_STATS, MAX_SOCKETS, Mode,
    PROGRAM_NAME, STATS_UNSTEERED, SocketLoad, SocketStats, SteeringConfig,
};

/// The compiled `turn-ebpf` object, embedded at build time (see `build.rs`).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("TURN_EBPF_OBJECT"));

/// The maps pinned for other processes, by file name in the group's pin directory.
const PINNED_MAPS: [&str; 5] = [MAP_CONFIG, MAP_LOAD, MAP_PLACED, MAP_STATS, MAP_PINS];

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
    #[error("cannot duplicate the descriptor of map {map}")]
    Dup {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("a listener group of {0} sockets cannot be steered (1 to {MAX_SOCKETS} are supported)")]
    GroupSize(usize),
    #[error("the pinned steering configuration is invalid ({0} sockets)")]
    Config(u32),
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> SteeringError {
    move |e| SteeringError::Map { map, source: Box::new(e) }
}

/// Tunables of a steered group.
#[derive(Clone, Debug)]
pub struct SteeringOptions {
    /// Entries of the LRU pin map (flows remembered). Size it well above the number of
    /// live allocations; a live allocation whose pin was evicted is re-pinned by its worker.
    pub pin_entries: u32,
    /// Directory in bpffs where the maps are pinned for `turn-server load` (none: not pinned).
    pub pin_dir: Option<PathBuf>,
}

impl Default for SteeringOptions {
    fn default() -> Self {
        Self { pin_entries: turn_common::DEFAULT_PIN_ENTRIES, pin_dir: None }
    }
}

/// Counters of a group, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupStats {
    /// One entry per socket slot `0..num_sockets`.
    pub sockets: Vec<SocketStats>,
    /// Datagrams the program left to the kernel's hash.
    pub unsteered: SocketStats,
}

/// Handles on the maps of one group: the daemon's own, or another process's opened from
/// their pins.
pub struct GroupMaps {
    config: Array<MapData, SteeringConfig>,
    load: Array<MapData, SocketLoad>,
    placed: Array<MapData, u64>,
    stats: PerCpuArray<MapData, SocketStats>,
    pins: HashMap<MapData, FlowKey, u32>,
}

impl GroupMaps {
    fn take(ebpf: &mut Ebpf) -> Result<Self, SteeringError> {
        Ok(Self {
            config: take_map(ebpf, MAP_CONFIG)?,
            load: take_map(ebpf, MAP_LOAD)?,
            placed: take_map(ebpf, MAP_PLACED)?,
            stats: take_map(ebpf, MAP_STATS)?,
            pins: take_map(ebpf, MAP_PINS)?,
        })
    }

    /// Opens the maps a running daemon pinned in `dir`.
    pub fn open_pinned(dir: &Path) -> Result<Self, SteeringError> {
        fn open<M>(dir: &Path, name: &'static str) -> Result<M, SteeringError>
        where
            M: TryFrom<Map, Error = MapError>,
        {
            let data = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
            let map = Map::from_map_data(data).map_err(map_err(name))?;
            M::try_from(map).map_err(map_err(name))
        }
        Ok(Self {
            config: open(dir, MAP_CONFIG)?,
            load: open(dir, MAP_LOAD)?,
            placed: open(dir, MAP_PLACED)?,
            stats: open(dir, MAP_STATS)?,
            pins: open(dir, MAP_PINS)?,
        })
    }

    /// The group's configuration (mode and number of sockets).
    pub fn config(&self) -> Result<SteeringConfig, SteeringError> {
        let config = self.config.get(&0, 0).map_err(map_err(MAP_CONFIG))?;
        if config.num_sockets == 0 || config.num_sockets > MAX_SOCKETS {
            return Err(SteeringError::Config(config.num_sockets));
        }
        Ok(config)
    }

    /// Changes how new flows are placed; pinned flows keep their socket.
    pub fn set_mode(&mut self, mode: Mode) -> Result<(), SteeringError> {
        let mut config = self.config()?;
        config.mode = mode as u32;
        self.config.set(0, config, 0).map_err(map_err(MAP_CONFIG))
    }

    /// Publishes the load of socket `index`.
    pub fn set_load(&mut self, index: u32, load: SocketLoad) -> Result<(), SteeringError> {
        self.load.set(index, load, 0).map_err(map_err(MAP_LOAD))
    }

    /// The published load of each socket.
    pub fn loads(&self) -> Result<Vec<SocketLoad>, SteeringError> {
        let n = self.config()?.num_sockets;
        (0..n).map(|i| self.load.get(&i, 0).map_err(map_err(MAP_LOAD))).collect()
    }

    /// Flows the program placed on each socket so far.
    pub fn placed(&self) -> Result<Vec<u64>, SteeringError> {
        let n = self.config()?.num_sockets;
        (0..n).map(|i| self.placed.get(&i, 0).map_err(map_err(MAP_PLACED))).collect()
    }

    /// Per-socket counters, summed over CPUs.
    pub fn stats(&self) -> Result<GroupStats, SteeringError> {
        let n = self.config()?.num_sockets;
        let read = |slot: u32| -> Result<SocketStats, SteeringError> {
            let per_cpu = self.stats.get(&slot, 0).map_err(map_err(MAP_STATS))?;
            let mut sum = SocketStats::default();
            for value in per_cpu.iter() {
                sum.add(value);
            }
            Ok(sum)
        };
        let sockets = (0..n).map(read).collect::<Result<Vec<_>, _>>()?;
        Ok(GroupStats { sockets, unsteered: read(STATS_UNSTEERED)? })
    }

    /// The socket a flow is pinned to, if any.
    pub fn pinned_socket(&self, flow: &FlowKey) -> Option<u32> {
        self.pins.get(flow, 0).ok()
    }

    /// Pinned flows per socket (walks the pin map: a cold path).
    pub fn pins_per_socket(&self) -> Result<Vec<u64>, SteeringError> {
        let n = self.config()?.num_sockets;
        let mut per_socket = vec![0u64; n as usize];
        for (_, socket) in self.pins.iter().flatten() {
            if let Some(count) = per_socket.get_mut(socket as usize) {
                *count += 1;
            }
        }
        Ok(per_socket)
    }
}

/// A worker's own handle on the pin map, to pin the flows of its allocations.
pub struct FlowPins {
    pins: HashMap<MapData, FlowKey, u32>,
    socket: u32,
}

impl FlowPins {
    /// Pins `flow` to this worker's socket (replacing any other pin).
    pub fn pin(&mut self, flow: &FlowKey) -> Result<(), SteeringError> {
        self.pins.insert(flow, self.socket, 0).map_err(map_err(MAP_PINS))
    }

    /// Forgets the pin of `flow`; an absent pin is fine.
    pub fn unpin(&mut self, flow: &FlowKey) {
        let _ = self.pins.remove(flow);
    }

    /// The socket `flow` is pinned to, if any.
    pub fn pinned_socket(&self, flow: &FlowKey) -> Option<u32> {
        self.pins.get(flow, 0).ok()
    }
}

/// A loaded and attached steering program for one listener group.
pub struct Steering {
    /// Rare events the program reports (pin repairs), forwarded to our log.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    _ebpf: Ebpf,
    maps: GroupMaps,
    pins_fd: MapData,
    _sockets: ReusePortSockArray<MapData>,
    num_sockets: u32,
    pin_dir: Option<PathBuf>,
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("num_sockets", &self.num_sockets)
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl Steering {
    /// Loads the program, puts `sockets[i]` in slot `i`, and attaches to their group.
    ///
    /// Every socket must already be bound, with SO_REUSEPORT, to the same address; `mode`
    /// is the placement of new flows (`Hash` or `P2c`; `Kernel` leaves it to the kernel).
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
            .map_max_entries(MAP_PINS, options.pin_entries.max(1))
            .load(EBPF_OBJECT)
            .map_err(|e| SteeringError::Load(Box::new(e)))?;

        let mut socket_array: ReusePortSockArray<MapData> = take_map(&mut ebpf, MAP_SOCKETS)?;
        for (i, socket) in sockets.iter().enumerate() {
            socket_array
                .set(i as u32, &socket.as_fd().as_raw_fd(), 0)
                .map_err(map_err(MAP_SOCKETS))?;
        }
        if let Some(dir) = &options.pin_dir {
            pin_maps(&ebpf, dir)?;
        }
        let pins_fd = dup_map(&ebpf, MAP_PINS)?;
        // The program still works without its log (only rare events go there).
        let logger = aya_log::EbpfLogger::init(&mut ebpf).ok();
        let mut maps = GroupMaps::take(&mut ebpf)?;
        maps.config
            .set(0, SteeringConfig { mode: mode as u32, num_sockets }, 0)
            .map_err(map_err(MAP_CONFIG))?;

        let program: &mut SkReuseport = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(SteeringError::Missing(PROGRAM_NAME))?
            .try_into()
            .map_err(|e| SteeringError::Program(Box::new(e)))?;
        program.load().map_err(|e| SteeringError::Program(Box::new(e)))?;
        program.attach(sockets[0].as_fd()).map_err(|e| SteeringError::Program(Box::new(e)))?;

        Ok(Self {
            logger,
            _ebpf: ebpf,
            maps,
            pins_fd,
            _sockets: socket_array,
            num_sockets,
            pin_dir: options.pin_dir,
        })
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
        let map = Map::from_map_data(dup(&self.pins_fd, MAP_PINS)?).map_err(map_err(MAP_PINS))?;
        Ok(FlowPins { pins: HashMap::try_from(map).map_err(map_err(MAP_PINS))?, socket })
    }

    /// Detaches the program from the group `member` belongs to and removes the pins.
    pub fn detach(self, member: BorrowedFd<'_>) -> Result<(), SteeringError> {
        let detached = SkReuseport::detach(member).map_err(|e| SteeringError::Program(Box::new(e)));
        if let Some(dir) = &self.pin_dir {
            unpin_maps(dir);
        }
        detached
    }
}

fn pin_maps(ebpf: &Ebpf, dir: &Path) -> Result<(), SteeringError> {
    let pin_err = |source| SteeringError::Pin { dir: dir.to_owned(), source };
    std::fs::create_dir_all(dir).map_err(pin_err)?;
    for name in PINNED_MAPS {
        let map = ebpf.map(name).ok_or(SteeringError::Missing(name))?;
        map.pin(dir.join(name)).map_err(|e| pin_err(std::io::Error::other(e)))?;
    }
    Ok(())
}

/// Removes a group's pins and its directory (best effort: what is left is stale and is
/// removed by the next start).
pub fn unpin_maps(dir: &Path) {
    for name in PINNED_MAPS {
        let _ = std::fs::remove_file(dir.join(name));
    }
    let _ = std::fs::remove_dir(dir);
}

fn dup_map(ebpf: &Ebpf, name: &'static str) -> Result<MapData, SteeringError> {
    let map = ebpf.map(name).ok_or(SteeringError::Missing(name))?;
    let data = match map {
        Map::LruHashMap(data) | Map::HashMap(data) | Map::Array(data) => data,
        _ => return Err(SteeringError::Missing(name)),
    };
    dup(data, name)
}

fn dup(data: &MapData, map: &'static str) -> Result<MapData, SteeringError> {
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| SteeringError::Dup { map, source })?;
    MapData::from_fd(fd).map_err(map_err(map))
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, SteeringError>
where
    M: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(SteeringError::Missing(name))?;
    M::try_from(map).map_err(map_err(name))
}
