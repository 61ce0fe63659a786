//! The contract between the `turn-ebpf` SK_REUSEPORT program and the userspace daemon.
//!
//! Everything here is shared verbatim by both sides: map and program names, the
//! `#[repr(C)]` map value types (no implicit padding, so the kernel and userspace agree
//! byte for byte), and [`choose_socket`], the pure selection function the eBPF program
//! runs for a new flow. Keeping the selection pure lets the host test it exhaustively.
//!
//! The kernel side must not panic: this crate avoids `%` and `/` by runtime values and
//! indexing, which would leave panic paths the BPF verifier rejects.
#![no_std]

/// The program's function name in the object file (`#[sk_reuseport]` function).
pub const PROGRAM_NAME: &str = "turn_steer";

/// `REUSEPORT_SOCKARRAY`: slot `i` holds the listener socket of worker `i`.
pub const MAP_SOCKETS: &str = "TURN_SOCKETS";
/// `ARRAY` of [`SocketLoad`]: slot `i` is written only by worker `i`; BPF only reads it.
pub const MAP_LOAD: &str = "TURN_LOAD";
/// `LRU_HASH` from a [`FlowKey`] (the client's 4-tuple) to a socket index (`u32`).
pub const MAP_PINS: &str = "TURN_PINS";
/// `ARRAY` of `u64`: flows the program placed on each socket so far (a plain, not
/// per-CPU, counter: two CPUs placing at the same instant may lose one increment, which
/// only makes a load estimate a flow lighter until the next [`SocketLoad`] update).
pub const MAP_PLACED: &str = "TURN_PLACED";
/// `ARRAY` with one [`SteeringConfig`], written by the control thread.
pub const MAP_CONFIG: &str = "TURN_CONFIG";
/// `PERCPU_ARRAY` of [`SocketStats`]: slots `0..MAX_SOCKETS` per socket, slot
/// [`STATS_UNSTEERED`] for datagrams the program left to the kernel's hash.
pub const MAP_STATS: &str = "TURN_STATS";

/// Largest listener group the program steers (one socket per worker).
pub const MAX_SOCKETS: u32 = 64;
/// Stats slot for datagrams the program could not steer (kernel hash fallback).
pub const STATS_UNSTEERED: u32 = MAX_SOCKETS;
/// Number of slots in [`MAP_STATS`].
pub const STATS_SLOTS: u32 = MAX_SOCKETS + 1;
/// Default number of entries of [`MAP_PINS`]; the loader may size it differently.
pub const DEFAULT_PIN_ENTRIES: u32 = 65_536;

/// How the program places a flow it has not seen before.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Select nothing: the kernel's own reuseport hash decides (pins are still honoured).
    Kernel = 0,
    /// Same socket the kernel's hash would pick, but pinned.
    Hash = 1,
    /// Power of two choices: the less loaded of two distinct random sockets, pinned.
    P2c = 2,
}

impl Mode {
    /// Decodes the raw value stored in [`SteeringConfig::mode`]; unknown values mean `Kernel`.
    #[inline(always)]
    pub const fn from_raw(raw: u32) -> Mode {
        match raw {
            1 => Mode::Hash,
            2 => Mode::P2c,
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
    /// Number of sockets in the group (slots `0..num_sockets` of [`MAP_SOCKETS`]).
    pub num_sockets: u32,
}

/// Load of one socket, published by userspace; the program only reads it.
///
/// The program compares `score + (placed - placed_seen) * flow_weight`, where `placed` is
/// the socket's [`MAP_PLACED`] counter now: flows placed since userspace last published
/// count at once, so a burst of new flows between two updates is still spread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketLoad {
    /// Load of the socket's worker when published (lower is less loaded): derived from
    /// its live allocations and its recent packet rate.
    pub score: u64,
    /// Live allocations of the worker (shown by `turn-server load`).
    pub allocations: u64,
    /// The socket's [`MAP_PLACED`] counter when `score` was computed.
    pub placed_seen: u64,
    /// What one new flow adds to `score` until the next update.
    pub flow_weight: u64,
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
    /// New flows placed on this socket (pins created).
    pub new_flows: u64,
    /// Pins that pointed at an empty slot and were re-chosen onto this socket.
    pub repaired: u64,
}

impl SocketStats {
    /// Adds `other` to `self` (summing per-CPU values).
    pub fn add(&mut self, other: &SocketStats) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
        self.new_flows = self.new_flows.wrapping_add(other.new_flows);
        self.repaired = self.repaired.wrapping_add(other.repaired);
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all four types are `#[repr(C)]`, `Copy`, made only of `u32`/`u64` fields
    // laid out without padding (checked by the size assertions below), so every bit
    // pattern is a valid value.
    unsafe impl aya::Pod for super::SteeringConfig {}
    unsafe impl aya::Pod for super::SocketLoad {}
    unsafe impl aya::Pod for super::SocketStats {}
    // SAFETY: `#[repr(C)]` byte arrays and bytes only: no padding, any bit pattern valid.
    unsafe impl aya::Pod for super::FlowKey {}
}

const _: () = assert!(core::mem::size_of::<SteeringConfig>() == 8);
const _: () = assert!(core::mem::size_of::<SocketLoad>() == 32);
const _: () = assert!(core::mem::size_of::<SocketStats>() == 32);
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

/// Chooses the socket for a new flow.
///
/// * `Hash`: the kernel's choice, `scale(hash, n)`.
/// * `P2c`: two distinct sockets drawn from `rand` (one 32-bit draw is enough for both:
///   the high half picks the first, the low half the second), the one with the lower
///   `load` score wins; on a tie `tie_break` (any random bit) picks.
/// * `Kernel`: `None`, the caller leaves the choice to the kernel.
///
/// Returns `None` when `n == 0` or `n > MAX_SOCKETS`. The result is always `< n`.
#[inline(always)]
pub fn choose_socket(
    mode: Mode,
    hash: u32,
    n: u32,
    rand: u32,
    tie_break: bool,
    load: impl Fn(u32) -> Option<u64>,
) -> Option<u32> {
    if n == 0 || n > MAX_SOCKETS {
        return None;
    }
    match mode {
        Mode::Kernel => None,
        Mode::Hash => Some(scale(hash, n)),
        Mode::P2c => {
            if n == 1 {
                return Some(0);
            }
            // Spread each 16-bit half over the full u32 range before scaling.
            let first = scale((rand >> 16) << 16 | (rand >> 16), n);
            let mut second = scale(rand << 16 | (rand & 0xffff), n - 1);
            if second >= first {
                second += 1;
            }
            // A slot without a load entry counts as idle: it is a fresh worker.
            let load_first = load(first).unwrap_or(0);
            let load_second = load(second).unwrap_or(0);
            let second_wins = load_second < load_first || (load_second == load_first && tie_break);
            Some(if second_wins { second } else { first })
        }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn loads(values: &[u64]) -> impl Fn(u32) -> Option<u64> + '_ {
        move |i| values.get(i as usize).copied()
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
                let got = choose_socket(Mode::Hash, hash, n, 0, false, loads(&[]));
                assert_eq!(got, Some(scale(hash, n)));
            }
        }
    }

    #[test]
    fn kernel_mode_and_bad_sizes_choose_nothing() {
        assert_eq!(choose_socket(Mode::Kernel, 7, 4, 1, false, loads(&[])), None);
        assert_eq!(choose_socket(Mode::P2c, 7, 0, 1, false, loads(&[])), None);
        assert_eq!(choose_socket(Mode::P2c, 7, MAX_SOCKETS + 1, 1, false, loads(&[])), None);
    }

    #[test]
    fn p2c_candidates_are_distinct_and_in_range() {
        for n in 2..=MAX_SOCKETS {
            // With all loads equal the tie-break reveals each candidate in turn.
            let equal = [5u64; MAX_SOCKETS as usize];
            for step in 0..2000u32 {
                let rand = step.wrapping_mul(0x9e37_79b9);
                let a = choose_socket(Mode::P2c, 0, n, rand, false, loads(&equal)).unwrap();
                let b = choose_socket(Mode::P2c, 0, n, rand, true, loads(&equal)).unwrap();
                assert!(a < n && b < n, "n={n} a={a} b={b}");
                assert_ne!(a, b, "n={n} rand={rand:#x}");
            }
        }
    }

    #[test]
    fn p2c_picks_the_less_loaded_of_the_two() {
        let load = [10u64, 3, 7, 1];
        for step in 0..5000u32 {
            let rand = step.wrapping_mul(0x9e37_79b9) ^ (step << 7);
            let eq = [0u64; 4];
            let first = choose_socket(Mode::P2c, 0, 4, rand, false, loads(&eq)).unwrap();
            let second = choose_socket(Mode::P2c, 0, 4, rand, true, loads(&eq)).unwrap();
            let expected =
                if load[first as usize] <= load[second as usize] { first } else { second };
            let got = choose_socket(Mode::P2c, 0, 4, rand, false, loads(&load)).unwrap();
            assert_eq!(got, expected);
            // The most loaded socket (0) can never win against another.
            assert_ne!(got, 0);
        }
    }

    #[test]
    fn p2c_covers_every_pair_uniformly_enough() {
        let n = 4u32;
        let mut seen = [[0u32; 4]; 4];
        let eq = [0u64; 4];
        let mut x: u32 = 0x1234_5678;
        for _ in 0..120_000 {
            // xorshift32
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let a = choose_socket(Mode::P2c, 0, n, x, false, loads(&eq)).unwrap();
            let b = choose_socket(Mode::P2c, 0, n, x, true, loads(&eq)).unwrap();
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
        assert_eq!(choose_socket(Mode::P2c, 0, 1, 0xffff_ffff, true, loads(&[9])), Some(0));
    }

    #[test]
    fn missing_load_counts_as_idle() {
        // Only slot 0 has a load; slot 1 has none and must win.
        for rand in [0u32, 0xffff_ffff, 0x1234_5678] {
            assert_eq!(choose_socket(Mode::P2c, 0, 2, rand, false, loads(&[4])), Some(1));
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
        let load = SocketLoad { score: 10, allocations: 2, placed_seen: 5, flow_weight: 3 };
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
    fn mode_round_trips() {
        for m in [Mode::Kernel, Mode::Hash, Mode::P2c] {
            assert_eq!(Mode::from_raw(m as u32), m);
        }
        assert_eq!(Mode::from_raw(99), Mode::Kernel);
    }
}
