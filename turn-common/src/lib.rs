//! The contract between the kernel programs of `turn-ebpf` and the userspace daemon: here
//! the SK_REUSEPORT steering program's, in [`fast`] the TC fast path's.
//!
//! Everything here is shared verbatim by both sides: map and program names, the
//! `#[repr(C)]` map value types (no implicit padding, so the kernel and userspace agree
//! byte for byte), and [`choose_socket`], the pure selection function the eBPF program
//! runs for a new flow. Keeping the selection pure lets the host test it exhaustively.
//!
//! The kernel side must not panic: this crate avoids `%` and `/` by runtime values and
//! indexing, which would leave panic paths the BPF verifier rejects.
#![no_std]

pub mod fast;

/// The program's function name in the object file (`#[sk_reuseport]` function).
pub const PROGRAM_NAME: &str = "turn_steer";

/// `REUSEPORT_SOCKARRAY` of [`MAX_SOCKETS`] slots. A process puts its workers' sockets in
/// the consecutive slots `first_slot..first_slot + num_sockets` of [`SteeringConfig`]
/// (one generation); a slot number is how every other map names a socket, so a second
/// process that joins the group at other slots can honour the first one's pins.
pub const MAP_SOCKETS: &str = "TURN_SOCKETS";
/// `ARRAY` of [`SocketLoad`], one per slot: written by the process that owns the slot (one
/// entry per worker), only read by the program.
pub const MAP_LOAD: &str = "TURN_LOAD";
/// `HASH` (not LRU, no preallocation) from a [`FlowKey`] to a slot (`u32`): the pins of
/// live allocations. Only the daemon writes it (when an allocation is created, and when it
/// ends); the program reads it first, so nothing a client sends can evict or move a pin.
pub const MAP_ALLOCS: &str = "TURN_ALLOCS";
/// `LRU_HASH` from a [`FlowKey`] to a [`FlowMemo`]: the program's memory of flows that are
/// not (yet) allocations, so that a flow's handshake stays on one worker and is counted as
/// one placement. Bounded (LRU) and short-lived ([`SteeringConfig::memo_ttl_ms`]); it is
/// consulted only when [`MAP_ALLOCS`] has no pin, so it cannot displace one.
pub const MAP_MEMO: &str = "TURN_MEMO";
/// `ARRAY` of `u64`: flows the program placed on each slot so far (a plain, not per-CPU,
/// counter: two CPUs placing at the same instant may lose one increment, which only makes
/// a load estimate a flow lighter until the next [`SocketLoad`] update).
pub const MAP_PLACED: &str = "TURN_PLACED";
/// `ARRAY` with one [`SteeringConfig`], written by the control thread.
pub const MAP_CONFIG: &str = "TURN_CONFIG";
/// `PERCPU_ARRAY` of [`SocketStats`]: slots `0..MAX_SOCKETS` per socket, slot
/// [`STATS_UNSTEERED`] for datagrams the program left to the kernel's hash.
pub const MAP_STATS: &str = "TURN_STATS";

/// Slots of a listener group's socket array (all generations together).
pub const MAX_SOCKETS: u32 = 64;
/// Stats slot for datagrams the program could not steer (kernel hash fallback).
pub const STATS_UNSTEERED: u32 = MAX_SOCKETS;
/// Number of slots in [`MAP_STATS`].
pub const STATS_SLOTS: u32 = MAX_SOCKETS + 1;
/// Default number of entries of [`MAP_MEMO`]; the loader may size it differently.
pub const DEFAULT_MEMO_ENTRIES: u32 = 65_536;
/// Default number of entries of [`MAP_ALLOCS`] in the object file; the daemon sizes it
/// from its quotas and relay ports.
pub const DEFAULT_ALLOC_ENTRIES: u32 = 65_536;
/// How long the program remembers a flow that is not an allocation, by default.
pub const DEFAULT_MEMO_TTL_MS: u32 = 10_000;

/// How the program places a flow it has not seen before.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Select nothing: the kernel's own reuseport hash decides (pins are still honoured).
    Kernel = 0,
    /// Same socket the kernel's hash would pick, but remembered.
    Hash = 1,
    /// Power of two choices: the less loaded of two distinct random sockets.
    P2c = 2,
    /// The least loaded of all the generation's sockets (ties at random).
    Least = 3,
}

impl Mode {
    /// Decodes the raw value stored in [`SteeringConfig::mode`]; unknown values mean `Kernel`.
    #[inline(always)]
    pub const fn from_raw(raw: u32) -> Mode {
        match raw {
            1 => Mode::Hash,
            2 => Mode::P2c,
            3 => Mode::Least,
            _ => Mode::Kernel,
        }
    }
}

/// The one entry of [`MAP_CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteeringConfig {
    /// A [`Mode`] as `u32`.
    pub mode: u32,
    /// Sockets of the generation that takes new flows.
    pub num_sockets: u32,
    /// Its first slot in [`MAP_SOCKETS`]; `first_slot + num_sockets <= MAX_SOCKETS`.
    pub first_slot: u32,
    /// How long a [`FlowMemo`] holds, in milliseconds (0: [`DEFAULT_MEMO_TTL_MS`]).
    pub memo_ttl_ms: u32,
}

impl SteeringConfig {
    /// True when the generation's slots fit the socket array.
    #[inline(always)]
    pub const fn is_valid(&self) -> bool {
        self.num_sockets > 0
            && self.num_sockets <= MAX_SOCKETS
            && self.first_slot <= MAX_SOCKETS - self.num_sockets
    }

    /// The memo lifetime in nanoseconds.
    #[inline(always)]
    pub const fn memo_ttl_ns(&self) -> u64 {
        let ms = if self.memo_ttl_ms == 0 { DEFAULT_MEMO_TTL_MS } else { self.memo_ttl_ms };
        ms as u64 * 1_000_000
    }
}

/// What the program remembers of a flow that is not an allocation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowMemo {
    /// The slot the flow was placed on.
    pub slot: u32,
    /// Always zero.
    pub pad: u32,
    /// `bpf_ktime_get_ns()` after which the memo no longer holds (the flow is placed anew).
    pub expires_ns: u64,
}

/// Load of one slot (one worker), published by the process that owns it.
///
/// The program reads the first four fields. It compares
/// `score + (placed - placed_seen) * flow_weight`, where `placed` is the slot's
/// [`MAP_PLACED`] counter now: flows placed since the last publication count at once, so a
/// burst of new flows between two updates is still spread; on a tie, fewer `allocations`
/// wins. The other fields are the worker's own counters, published for `turn-server load`
/// and the benchmarks; the program ignores them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketLoad {
    /// Load of the socket's worker when published (lower is less loaded), in packets/s:
    /// see `turn-server/src/load.rs`.
    pub score: u64,
    /// Live allocations of the worker.
    pub allocations: u64,
    /// The slot's [`MAP_PLACED`] counter when `score` was computed.
    pub placed_seen: u64,
    /// What one new flow adds to `score` until the next update.
    pub flow_weight: u64,
    /// Datagrams the worker received (listener and relay sockets, hand-offs), monotonic.
    pub packets: u64,
    /// Bytes of those datagrams (UDP payload), monotonic.
    pub bytes: u64,
    /// Datagrams this worker handed to the worker owning their allocation, monotonic.
    pub handed_off: u64,
    /// Datagrams other workers handed to this one, monotonic.
    pub handed_in: u64,
    /// Hand-offs dropped because the owner's inbox was full, monotonic.
    pub handoff_drops: u64,
    /// Hand-offs waiting in this worker's inbox (a gauge).
    pub inbox_queued: u64,
    /// Bytes waiting in the worker's listener sockets' receive queues (a gauge).
    pub rx_queued_bytes: u64,
    /// Datagrams the kernel dropped on the worker's listener sockets (full receive
    /// buffer), monotonic.
    pub rx_drops: u64,
    /// Allocation pins the daemon could not write (pin map full), monotonic.
    pub pin_failures: u64,
    /// Failed authentications (unknown user, wrong password or realm), monotonic.
    pub auth_failures: u64,
    /// Requests a per-source limit left unanswered or unverified, monotonic.
    pub rate_limited: u64,
    /// Datagrams the kernel fast path relayed for the worker's allocations (both ways,
    /// read twice a second), monotonic: not in `packets`, the worker never saw them.
    pub kernel_packets: u64,
}

impl SocketLoad {
    /// The load P2C compares, given the socket's current `placed` counter.
    #[inline(always)]
    pub fn effective(&self, placed: u64) -> u64 {
        let recent = placed.wrapping_sub(self.placed_seen);
        // A counter behind `placed_seen` (userspace raced ahead) counts as no new flow;
        // so does an absurd gap.
        let recent = if recent > u32::MAX as u64 { 0 } else { recent };
        // Both factors fit in 32 bits, so the product fits in 64: no 128-bit multiply,
        // which the BPF target does not have.
        let weight =
            if self.flow_weight > u32::MAX as u64 { u32::MAX as u64 } else { self.flow_weight };
        self.score.saturating_add(recent * weight)
    }
}

/// The key of a pinned flow: the client's address and port and the server address it
/// sent to (the group's port is the same for every flow of a group). Userspace builds the
/// same key from an allocation's 5-tuple with [`FlowKey::new`], so the daemon can pin a
/// live allocation's flow itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Client address: IPv4 in the first 4 bytes (rest zero), or IPv6.
    pub client_ip: [u8; 16],
    /// Server address the client sent to, same layout.
    pub local_ip: [u8; 16],
    /// Client port, network byte order (as on the wire).
    pub client_port: [u8; 2],
    /// 4 or 6.
    pub family: u8,
    /// Always zero.
    pub pad: u8,
}

impl FlowKey {
    /// The key of datagrams from `client` to `local` (both of one family).
    pub fn new(client: core::net::SocketAddr, local: core::net::IpAddr) -> FlowKey {
        fn bytes(ip: core::net::IpAddr) -> [u8; 16] {
            match ip {
                core::net::IpAddr::V4(v4) => {
                    let mut out = [0u8; 16];
                    out[..4].copy_from_slice(&v4.octets());
                    out
                }
                core::net::IpAddr::V6(v6) => v6.octets(),
            }
        }
        FlowKey {
            client_ip: bytes(client.ip()),
            local_ip: bytes(local),
            client_port: client.port().to_be_bytes(),
            family: if client.is_ipv4() { 4 } else { 6 },
            pad: 0,
        }
    }
}

/// Per-CPU counters of one socket slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketStats {
    /// Datagrams steered to this socket.
    pub packets: u64,
    /// Bytes (UDP header included) steered to this socket.
    pub bytes: u64,
    /// New flows placed on this socket (memos created).
    pub new_flows: u64,
    /// Flows whose pinned or remembered socket had closed, re-placed onto this socket.
    pub repaired: u64,
    /// Datagrams steered by an allocation's pin ([`MAP_ALLOCS`]).
    pub allocation_hits: u64,
    /// Datagrams steered by the program's memo ([`MAP_MEMO`]).
    pub memo_hits: u64,
    /// Memos found expired and placed anew (counted in `new_flows` too).
    pub memo_expired: u64,
}

impl SocketStats {
    /// Adds `other` to `self` (summing per-CPU values).
    pub fn add(&mut self, other: &SocketStats) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
        self.new_flows = self.new_flows.wrapping_add(other.new_flows);
        self.repaired = self.repaired.wrapping_add(other.repaired);
        self.allocation_hits = self.allocation_hits.wrapping_add(other.allocation_hits);
        self.memo_hits = self.memo_hits.wrapping_add(other.memo_hits);
        self.memo_expired = self.memo_expired.wrapping_add(other.memo_expired);
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all these types are `#[repr(C)]`, `Copy`, made only of `u32`/`u64` fields
    // laid out without padding (checked by the size assertions below), so every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for super::SteeringConfig {}
    unsafe impl aya::Pod for super::SocketLoad {}
    unsafe impl aya::Pod for super::SocketStats {}
    unsafe impl aya::Pod for super::FlowMemo {}
    // SAFETY: `#[repr(C)]` byte arrays and bytes only: no padding, any bit pattern valid.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::fast::ChannelKey {}
    unsafe impl aya::Pod for super::fast::PeerKey {}
    // SAFETY: `#[repr(C)]`, byte arrays and integers laid out without padding (size
    // assertions in `fast.rs`): any bit pattern is valid.
    unsafe impl aya::Pod for super::fast::Binding {}
    unsafe impl aya::Pod for super::fast::Traffic {}
    unsafe impl aya::Pod for super::fast::FastConfig {}
    unsafe impl aya::Pod for super::fast::Endpoint {}
}

const _: () = assert!(core::mem::size_of::<SteeringConfig>() == 16);
const _: () = assert!(core::mem::size_of::<SocketLoad>() == 16 * 8);
const _: () = assert!(core::mem::size_of::<SocketStats>() == 7 * 8);
const _: () = assert!(core::mem::size_of::<FlowMemo>() == 16);
const _: () = assert!(core::mem::size_of::<FlowKey>() == 36);

/// Maps a uniformly distributed `u32` onto `0..n` without `%` (Lemire's multiply-shift).
///
/// This is also how the kernel maps a reuseport hash onto its socket array
/// (`reciprocal_scale` in `net/core/sock_reuseport.c`), so `scale(hash, n)` is the
/// socket the kernel itself would have chosen. Returns 0 when `n == 0`.
#[inline(always)]
pub const fn scale(value: u32, n: u32) -> u32 {
    ((value as u64 * n as u64) >> 32) as u32
}

/// What a candidate socket weighs when choosing: the effective load, then the number of
/// allocations (so that an idle server still balances allocation counts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Weight {
    pub load: u64,
    pub allocations: u64,
}

/// The random input of one choice: `pick` draws the candidates, `tie` breaks ties.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Draw {
    pub pick: u32,
    pub tie: u32,
}

/// Chooses the socket for a new flow among the generation's slots
/// `first_slot..first_slot + n` of `config`; returns an absolute slot.
///
/// * `Hash`: the kernel's choice, `scale(hash, n)` ([`choose_hash`]).
/// * `P2c`: the lighter of two distinct random sockets ([`choose_p2c`]).
/// * `Least`: the lightest of all `n` sockets ([`LeastScan`]).
/// * `Kernel`: `None`, the caller leaves the choice to the kernel.
///
/// `weight(slot)` is `None` for a slot without a load entry, which counts as idle (a
/// fresh worker). Returns `None` when the configuration is invalid. The eBPF program calls
/// the three parts itself (its `Least` scan runs under `bpf_loop`, which the verifier
/// checks once instead of once per iteration); this function is their reference.
#[inline(always)]
pub fn choose_socket(
    config: &SteeringConfig,
    hash: u32,
    draw: Draw,
    weight: impl Fn(u32) -> Option<Weight>,
) -> Option<u32> {
    if !config.is_valid() {
        return None;
    }
    match Mode::from_raw(config.mode) {
        Mode::Kernel => None,
        Mode::Hash => Some(choose_hash(config, hash)),
        Mode::P2c => Some(choose_p2c(config, draw, weight)),
        Mode::Least => {
            let base = config.first_slot;
            let weigh = |i: u32| weight(base + i).unwrap_or_default();
            let mut scan = LeastScan::new(config.num_sockets, draw);
            scan.best_weight = weigh(scan.best);
            for k in 1..config.num_sockets {
                let i = scan.candidate(k);
                scan.visit(i, weigh(i));
            }
            Some(base + scan.best)
        }
    }
}

/// The kernel's own choice for a flow of this `hash`, as an absolute slot. `config` must
/// be valid.
#[inline(always)]
pub fn choose_hash(config: &SteeringConfig, hash: u32) -> u32 {
    config.first_slot + scale(hash, config.num_sockets)
}

/// Power of two choices: two distinct sockets of the generation drawn from `draw.pick`
/// (the high half picks the first, the low half the second); the lighter [`Weight`] wins,
/// a tie is broken by `draw.tie`. Returns an absolute slot; `config` must be valid.
#[inline(always)]
pub fn choose_p2c(
    config: &SteeringConfig,
    draw: Draw,
    weight: impl Fn(u32) -> Option<Weight>,
) -> u32 {
    let n = config.num_sockets;
    let base = config.first_slot;
    if n <= 1 {
        return base;
    }
    // Spread each 16-bit half over the full u32 range before scaling.
    let rand = draw.pick;
    let first = scale((rand >> 16) << 16 | (rand >> 16), n);
    let mut second = scale(rand << 16 | (rand & 0xffff), n - 1);
    if second >= first {
        second += 1;
    }
    let a = weight(base + first).unwrap_or_default();
    let b = weight(base + second).unwrap_or_default();
    let second_wins = b < a || (b == a && draw.tie & 1 == 1);
    base + if second_wins { second } else { first }
}

/// The scan of `Least` mode: visits every socket of the generation once, from a random
/// start, and keeps the lightest. Indices are relative to the generation's first slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeastScan {
    /// Sockets in the generation.
    pub n: u32,
    /// Where the scan started.
    pub start: u32,
    /// The lightest socket so far, and its weight.
    pub best: u32,
    pub best_weight: Weight,
    /// Random bits for ties, one used per tie.
    pub ties: u32,
}

impl LeastScan {
    /// A scan of `n` sockets starting at a random one; the caller sets `best_weight` to
    /// the start socket's weight.
    #[inline(always)]
    pub fn new(n: u32, draw: Draw) -> LeastScan {
        let start = scale(draw.pick, n);
        LeastScan { n, start, best: start, best_weight: Weight::default(), ties: draw.tie }
    }

    /// The `k`-th socket after the start (`k < n`).
    #[inline(always)]
    pub fn candidate(&self, k: u32) -> u32 {
        let i = self.start + k;
        if i >= self.n { i - self.n } else { i }
    }

    /// Considers socket `i` of weight `w`. On a tie a later socket wins with probability
    /// 1/2: not uniform over all tied sockets, but never the same one every time.
    #[inline(always)]
    pub fn visit(&mut self, i: u32, w: Weight) {
        let tie_wins = w == self.best_weight && self.ties & 1 == 1;
        self.ties = self.ties.rotate_right(1);
        if w < self.best_weight || tie_wins {
            self.best = i;
            self.best_weight = w;
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn cfg(mode: Mode, n: u32) -> SteeringConfig {
        SteeringConfig { mode: mode as u32, num_sockets: n, first_slot: 0, memo_ttl_ms: 0 }
    }

    fn loads(values: &[u64]) -> impl Fn(u32) -> Option<Weight> + '_ {
        move |i| values.get(i as usize).map(|&load| Weight { load, allocations: 0 })
    }

    fn draw(pick: u32, tie: bool) -> Draw {
        Draw { pick, tie: u32::from(tie) }
    }

    #[test]
    fn scale_matches_kernel_reciprocal_scale() {
        // reciprocal_scale(val, ep_ro) = (u32)(((u64) val * ep_ro) >> 32)
        assert_eq!(scale(0, 4), 0);
        assert_eq!(scale(u32::MAX, 4), 3);
        assert_eq!(scale(0x8000_0000, 4), 2);
        assert_eq!(scale(0x4000_0000, 2), 0);
        assert_eq!(scale(0x8000_0000, 2), 1);
        assert_eq!(scale(12345, 0), 0);
    }

    #[test]
    fn hash_mode_is_the_kernel_choice() {
        for hash in [0u32, 1, 0x7fff_ffff, 0x8000_0000, 0xdead_beef, u32::MAX] {
            for n in 1..=8 {
                let got = choose_socket(&cfg(Mode::Hash, n), hash, draw(0, false), loads(&[]));
                assert_eq!(got, Some(scale(hash, n)));
            }
        }
    }

    #[test]
    fn kernel_mode_and_bad_configurations_choose_nothing() {
        let d = draw(1, false);
        assert_eq!(choose_socket(&cfg(Mode::Kernel, 4), 7, d, loads(&[])), None);
        assert_eq!(choose_socket(&cfg(Mode::P2c, 0), 7, d, loads(&[])), None);
        assert_eq!(choose_socket(&cfg(Mode::P2c, MAX_SOCKETS + 1), 7, d, loads(&[])), None);
        let past_the_end = SteeringConfig { first_slot: MAX_SOCKETS - 1, ..cfg(Mode::P2c, 2) };
        assert!(!past_the_end.is_valid());
        assert_eq!(choose_socket(&past_the_end, 7, d, loads(&[])), None);
        let last = SteeringConfig { first_slot: MAX_SOCKETS - 2, ..cfg(Mode::P2c, 2) };
        assert!(last.is_valid());
    }

    #[test]
    fn p2c_candidates_are_distinct_and_in_range() {
        for n in 2..=MAX_SOCKETS {
            // With all loads equal the tie-break reveals each candidate in turn.
            let equal = [5u64; MAX_SOCKETS as usize];
            for step in 0..2000u32 {
                let rand = step.wrapping_mul(0x9e37_79b9);
                let c = cfg(Mode::P2c, n);
                let a = choose_socket(&c, 0, draw(rand, false), loads(&equal)).unwrap();
                let b = choose_socket(&c, 0, draw(rand, true), loads(&equal)).unwrap();
                assert!(a < n && b < n, "n={n} a={a} b={b}");
                assert_ne!(a, b, "n={n} rand={rand:#x}");
            }
        }
    }

    #[test]
    fn p2c_picks_the_less_loaded_of_the_two() {
        let load = [10u64, 3, 7, 1];
        let c = cfg(Mode::P2c, 4);
        for step in 0..5000u32 {
            let rand = step.wrapping_mul(0x9e37_79b9) ^ (step << 7);
            let eq = [0u64; 4];
            let first = choose_socket(&c, 0, draw(rand, false), loads(&eq)).unwrap();
            let second = choose_socket(&c, 0, draw(rand, true), loads(&eq)).unwrap();
            let expected =
                if load[first as usize] <= load[second as usize] { first } else { second };
            let got = choose_socket(&c, 0, draw(rand, false), loads(&load)).unwrap();
            assert_eq!(got, expected);
            // The most loaded socket (0) can never win against another.
            assert_ne!(got, 0);
        }
    }

    #[test]
    fn equal_loads_are_decided_by_allocations() {
        let c = cfg(Mode::P2c, 2);
        let weights = |i: u32| Some(Weight { load: 7, allocations: if i == 0 { 3 } else { 1 } });
        for rand in [0u32, 0xffff_ffff, 0x1234_5678] {
            for tie in [false, true] {
                assert_eq!(choose_socket(&c, 0, draw(rand, tie), weights), Some(1));
            }
        }
    }

    #[test]
    fn p2c_covers_every_pair_uniformly_enough() {
        let n = 4u32;
        let c = cfg(Mode::P2c, n);
        let mut seen = [[0u32; 4]; 4];
        let eq = [0u64; 4];
        let mut x: u32 = 0x1234_5678;
        for _ in 0..120_000 {
            // xorshift32
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let a = choose_socket(&c, 0, draw(x, false), loads(&eq)).unwrap();
            let b = choose_socket(&c, 0, draw(x, true), loads(&eq)).unwrap();
            seen[a as usize][b as usize] += 1;
        }
        let counts: Vec<u32> = (0..4)
            .flat_map(|a| (0..4).filter(move |&b| b != a).map(move |b| (a, b)))
            .map(|(a, b)| seen[a][b])
            .collect();
        // 12 ordered pairs, 10_000 each on average.
        for c in counts {
            assert!((9_000..11_000).contains(&c), "pair count {c}");
        }
    }

    #[test]
    fn p2c_with_one_socket_is_that_socket() {
        let c = cfg(Mode::P2c, 1);
        assert_eq!(choose_socket(&c, 0, draw(0xffff_ffff, true), loads(&[9])), Some(0));
    }

    #[test]
    fn missing_load_counts_as_idle() {
        // Only slot 0 has a load; slot 1 has none and must win.
        for rand in [0u32, 0xffff_ffff, 0x1234_5678] {
            let got = choose_socket(&cfg(Mode::P2c, 2), 0, draw(rand, false), loads(&[4]));
            assert_eq!(got, Some(1));
        }
    }

    #[test]
    fn a_generation_chooses_only_its_own_slots() {
        // Slots 0..4 belong to an older generation; new flows go to 4..7 only.
        let loads_all = [0u64, 0, 0, 0, 9, 5, 7];
        for mode in [Mode::Hash, Mode::P2c, Mode::Least] {
            let c = SteeringConfig { first_slot: 4, ..cfg(mode, 3) };
            for step in 0..3000u32 {
                let d = Draw { pick: step.wrapping_mul(0x9e37_79b9), tie: step };
                let got = choose_socket(&c, step.wrapping_mul(0x85eb_ca6b), d, loads(&loads_all))
                    .unwrap();
                assert!((4..7).contains(&got), "{mode:?} chose slot {got}");
                if mode == Mode::Least {
                    assert_eq!(got, 5);
                }
            }
        }
    }

    #[test]
    fn least_takes_the_minimum_and_spreads_ties() {
        let c = cfg(Mode::Least, 5);
        let mut hits = [0u32; 5];
        let mut x: u32 = 0x9876_5431;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let d = Draw { pick: x, tie: x.rotate_left(11) };
            let got = choose_socket(&c, 0, d, loads(&[4, 2, 9, 2, 2])).unwrap();
            hits[got as usize] += 1;
        }
        assert_eq!(hits[0] + hits[2], 0, "{hits:?}");
        for i in [1, 3, 4] {
            assert!(hits[i] > 20_000 / 3 / 3, "tied slot {i} rarely chosen: {hits:?}");
        }
        for n in 1..=MAX_SOCKETS {
            let mut values = [100u64; MAX_SOCKETS as usize];
            values[(n - 1) as usize] = 1;
            let got = choose_socket(&cfg(Mode::Least, n), 0, draw(n * 77, true), loads(&values));
            assert_eq!(got, Some(n - 1), "n={n}");
        }
    }

    #[test]
    fn flow_key_layout() {
        let k = FlowKey::new("10.1.2.3:4660".parse().unwrap(), "192.0.2.1".parse().unwrap());
        assert_eq!(&k.client_ip[..4], &[10, 1, 2, 3]);
        assert_eq!(&k.client_ip[4..], &[0u8; 12]);
        assert_eq!(&k.local_ip[..4], &[192, 0, 2, 1]);
        assert_eq!(k.client_port, [0x12, 0x34]);
        assert_eq!(k.family, 4);
        let k6 = FlowKey::new("[2001:db8::1]:1".parse().unwrap(), "2001:db8::2".parse().unwrap());
        assert_eq!(k6.family, 6);
        assert_eq!(k6.client_ip[15], 1);
        assert_eq!(k6.local_ip[15], 2);
        assert_ne!(k, k6);
    }

    #[test]
    fn effective_load_counts_flows_placed_since_publication() {
        let load = SocketLoad {
            score: 10,
            allocations: 2,
            placed_seen: 5,
            flow_weight: 3,
            ..Default::default()
        };
        assert_eq!(load.effective(5), 10);
        assert_eq!(load.effective(7), 16);
        // Userspace saw more placements than this read: no negative load.
        assert_eq!(load.effective(4), 10);
        let zero = SocketLoad::default();
        assert_eq!(zero.effective(0), 0);
        let huge = SocketLoad { score: u64::MAX - 1, flow_weight: u64::MAX, ..zero };
        assert_eq!(huge.effective(3), u64::MAX);
        let heavy = SocketLoad { flow_weight: u64::MAX, ..zero };
        assert_eq!(heavy.effective(2), 2 * u32::MAX as u64);
    }

    #[test]
    fn memo_ttl_defaults() {
        assert_eq!(cfg(Mode::P2c, 1).memo_ttl_ns(), u64::from(DEFAULT_MEMO_TTL_MS) * 1_000_000);
        let c = SteeringConfig { memo_ttl_ms: 250, ..cfg(Mode::P2c, 1) };
        assert_eq!(c.memo_ttl_ns(), 250_000_000);
    }

    #[test]
    fn mode_round_trips() {
        for m in [Mode::Kernel, Mode::Hash, Mode::P2c, Mode::Least] {
            assert_eq!(Mode::from_raw(m as u32), m);
        }
        assert_eq!(Mode::from_raw(99), Mode::Kernel);
    }
}
