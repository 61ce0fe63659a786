//! Loader for the `turn_steer` SK_REUSEPORT program (see `turn-ebpf` and `turn-common`).
//!
//! One [`Steering`] serves one listener group (IPv4 and IPv6 are separate groups). It loads
//! its own copy of the program and maps, fills the socket array with the group's bound
//! sockets (slot `i` = worker `i`), writes the configuration and attaches once.
//!
//! The program stays attached to the group until [`Steering::detach`] or until the last
//! socket of the group closes: dropping the aya program does not detach it.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, ReusePortSockArray},
    programs::{ProgramError, SkReuseport},
};
use turn_common::{
    FlowKey, MAP_CONFIG, MAP_LOAD, MAP_PINS, MAP_SOCKETS, MAP_STATS, MAX_SOCKETS, Mode,
    PROGRAM_NAME, STATS_UNSTEERED, SocketLoad, SocketStats, SteeringConfig,
};

/// The compiled `turn-ebpf` object, embedded at build time (see `build.rs`).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("TURN_EBPF_OBJECT"));

/// Why steering could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    #[error("loading the eBPF object failed (needs root or CAP_BPF + CAP_NET_ADMIN)")]
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
    #[error("a listener group of {0} sockets cannot be steered (1 to {MAX_SOCKETS} are supported)")]
    GroupSize(usize),
    #[error("steering mode {0:?} cannot be set on an attached program (use hash or p2c)")]
    Mode(Mode),
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> SteeringError {
    move |e| SteeringError::Map {
        map,
        source: Box::new(e),
    }
}

/// Tunables of a steered group.
#[derive(Clone, Copy, Debug)]
pub struct SteeringOptions {
    /// Entries of the LRU pin map (flows remembered). Sized well above the number of live
    /// allocations; an evicted pin of a live allocation is re-inserted by the daemon.
    pub pin_entries: u32,
}

impl Default for SteeringOptions {
    fn default() -> Self {
        Self {
            pin_entries: turn_common::DEFAULT_PIN_ENTRIES,
        }
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

/// A loaded and attached steering program for one listener group.
pub struct Steering {
    _ebpf: Ebpf,
    config: Array<MapData, SteeringConfig>,
    load: Array<MapData, SocketLoad>,
    stats: PerCpuArray<MapData, SocketStats>,
    pins: HashMap<MapData, FlowKey, u32>,
    _sockets: ReusePortSockArray<MapData>,
    num_sockets: u32,
    mode: Mode,
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("num_sockets", &self.num_sockets)
            .field("mode", &self.mode)
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
        let mut config: Array<MapData, SteeringConfig> = take_map(&mut ebpf, MAP_CONFIG)?;
        config
            .set(
                0,
                SteeringConfig {
                    mode: mode as u32,
                    num_sockets,
                },
                0,
            )
            .map_err(map_err(MAP_CONFIG))?;
        let load = take_map(&mut ebpf, MAP_LOAD)?;
        let stats = take_map(&mut ebpf, MAP_STATS)?;
        let pins = take_map(&mut ebpf, MAP_PINS)?;

        let program: &mut SkReuseport = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(SteeringError::Missing(PROGRAM_NAME))?
            .try_into()
            .map_err(|e| SteeringError::Program(Box::new(e)))?;
        program
            .load()
            .map_err(|e| SteeringError::Program(Box::new(e)))?;
        program
            .attach(sockets[0].as_fd())
            .map_err(|e| SteeringError::Program(Box::new(e)))?;

        Ok(Self {
            _ebpf: ebpf,
            config,
            load,
            stats,
            pins,
            _sockets: socket_array,
            num_sockets,
            mode,
        })
    }

    /// Number of sockets in the group.
    pub fn num_sockets(&self) -> u32 {
        self.num_sockets
    }

    /// Current placement mode for new flows.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Changes how new flows are placed; pinned flows keep their socket.
    pub fn set_mode(&mut self, mode: Mode) -> Result<(), SteeringError> {
        self.config
            .set(
                0,
                SteeringConfig {
                    mode: mode as u32,
                    num_sockets: self.num_sockets,
                },
                0,
            )
            .map_err(map_err(MAP_CONFIG))?;
        self.mode = mode;
        Ok(())
    }

    /// Publishes the load of socket `index` (written by the worker that owns it).
    pub fn set_load(&mut self, index: u32, load: SocketLoad) -> Result<(), SteeringError> {
        self.load.set(index, load, 0).map_err(map_err(MAP_LOAD))
    }

    /// Reads the per-socket counters, summed over CPUs.
    pub fn stats(&self) -> Result<GroupStats, SteeringError> {
        let read = |slot: u32| -> Result<SocketStats, SteeringError> {
            let per_cpu = self.stats.get(&slot, 0).map_err(map_err(MAP_STATS))?;
            let mut sum = SocketStats::default();
            for value in per_cpu.iter() {
                sum.add(value);
            }
            Ok(sum)
        };
        let sockets = (0..self.num_sockets)
            .map(read)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(GroupStats {
            sockets,
            unsteered: read(STATS_UNSTEERED)?,
        })
    }

    /// The socket a flow is pinned to, if any.
    pub fn pinned_socket(&self, flow: &FlowKey) -> Option<u32> {
        self.pins.get(flow, 0).ok()
    }

    /// Pins `flow` to socket `index` (replacing any pin): used for live allocations, so
    /// that their datagrams reach the owning worker whatever the program would choose.
    pub fn pin_flow(&mut self, flow: &FlowKey, index: u32) -> Result<(), SteeringError> {
        self.pins.insert(flow, index, 0).map_err(map_err(MAP_PINS))
    }

    /// Forgets the pin of `flow` (its allocation ended); absent pins are fine.
    pub fn unpin_flow(&mut self, flow: &FlowKey) {
        let _ = self.pins.remove(flow);
    }

    /// Number of pinned flows per socket slot (walks the pin map: a cold path).
    pub fn pins_per_socket(&self) -> Vec<u64> {
        let mut per_socket = vec![0u64; self.num_sockets as usize];
        for (_, socket) in self.pins.iter().flatten() {
            if let Some(count) = per_socket.get_mut(socket as usize) {
                *count += 1;
            }
        }
        per_socket
    }

    /// Detaches the program from the group `member` belongs to.
    pub fn detach(self, member: BorrowedFd<'_>) -> Result<(), SteeringError> {
        SkReuseport::detach(member).map_err(|e| SteeringError::Program(Box::new(e)))
    }
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, SteeringError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(SteeringError::Missing(name))?;
    M::try_from(map).map_err(map_err(name))
}
