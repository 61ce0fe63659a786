//! `turn_steer`: the SK_REUSEPORT program that places each new client 4-tuple on a socket
//! of the listener group and pins it there.
//!
//! A flow is the client's address and port plus the server address it sent to
//! ([`turn_common::FlowKey`]), read from the packet, so that the daemon can compute the
//! same key from an allocation and pin it itself.
//!
//! For every datagram on the group (unconnected UDP runs the program per datagram):
//! 1. a pinned flow goes to its socket;
//! 2. a pin whose socket has gone (`-ENOENT`) is re-chosen and repaired;
//! 3. a new flow is placed by [`turn_common::choose_socket`] (P2C or the kernel's hash) and
//!    pinned with `BPF_NOEXIST`; if another CPU pinned it first, that pin wins.
//!
//! Every error path returns `SK_PASS` without a selection (the kernel's hash decides);
//! `SK_DROP` would make the kernel answer ICMP port-unreachable.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{
        EbpfContext,
        bindings::{
            BPF_ANY, BPF_NOEXIST, bpf_hdr_start_off::BPF_HDR_START_NET, sk_action::SK_PASS,
        },
        helpers::{bpf_get_prandom_u32, bpf_skb_load_bytes, bpf_skb_load_bytes_relative},
        macros::{map, sk_reuseport},
        maps::{Array, LruHashMap, PerCpuArray, ReusePortSockArray},
        programs::SkReuseportContext,
    };
    use aya_log_ebpf::warn;
    use turn_common::{
        DEFAULT_PIN_ENTRIES, FlowKey, MAX_SOCKETS, Mode, STATS_SLOTS, STATS_UNSTEERED, SocketLoad,
        SocketStats, SteeringConfig, choose_socket,
    };

    #[map(name = "TURN_SOCKETS")]
    static TURN_SOCKETS: ReusePortSockArray = ReusePortSockArray::with_max_entries(MAX_SOCKETS, 0);

    #[map(name = "TURN_LOAD")]
    static TURN_LOAD: Array<SocketLoad> = Array::with_max_entries(MAX_SOCKETS, 0);

    #[map(name = "TURN_PINS")]
    static TURN_PINS: LruHashMap<FlowKey, u32> =
        LruHashMap::with_max_entries(DEFAULT_PIN_ENTRIES, 0);

    #[map(name = "TURN_PLACED")]
    static TURN_PLACED: Array<u64> = Array::with_max_entries(MAX_SOCKETS, 0);

    #[map(name = "TURN_CONFIG")]
    static TURN_CONFIG: Array<SteeringConfig> = Array::with_max_entries(1, 0);

    #[map(name = "TURN_STATS")]
    static TURN_STATS: PerCpuArray<SocketStats> = PerCpuArray::with_max_entries(STATS_SLOTS, 0);

    #[sk_reuseport]
    pub fn turn_steer(ctx: SkReuseportContext) -> u32 {
        steer(&ctx);
        SK_PASS
    }

    /// What happened to a datagram, for the per-socket counters.
    #[derive(Clone, Copy)]
    enum Placed {
        Pinned,
        New,
        Repaired,
    }

    #[inline(always)]
    fn steer(ctx: &SkReuseportContext) {
        let Some(cfg) = TURN_CONFIG.get(0) else {
            return count(ctx, STATS_UNSTEERED, Placed::Pinned);
        };
        let n = cfg.num_sockets;
        let mode = Mode::from_raw(cfg.mode);
        if n == 0 || n > MAX_SOCKETS {
            return count(ctx, STATS_UNSTEERED, Placed::Pinned);
        }
        let hash = ctx.hash();
        let Some(key) = flow_key(ctx) else {
            return count(ctx, STATS_UNSTEERED, Placed::Pinned);
        };

        // 1. A pinned flow goes where it was placed, whatever the mode is now.
        let mut repair = false;
        if let Some(pinned) = TURN_PINS.get_ptr(&key) {
            // SAFETY: the pointer comes from a successful map lookup; the value is a u32
            // that the verifier lets us read. A concurrent update can only change it to
            // another u32.
            let idx = unsafe { *pinned };
            if idx < n && TURN_SOCKETS.select_reuseport(ctx, idx).is_ok() {
                return count(ctx, idx, Placed::Pinned);
            }
            // 2. The pinned socket has gone (or the group shrank): re-choose below.
            repair = true;
        }

        if mode == Mode::Kernel && !repair {
            return count(ctx, STATS_UNSTEERED, Placed::Pinned);
        }
        // A repair in kernel mode still needs a live socket: use the kernel's hash choice.
        let mode = if mode == Mode::Kernel { Mode::Hash } else { mode };
        // SAFETY: bpf_get_prandom_u32 has no preconditions.
        let rand = unsafe { bpf_get_prandom_u32() };
        let load = |i: u32| {
            let placed = TURN_PLACED.get(i).copied().unwrap_or(0);
            TURN_LOAD.get(i).map(|l| l.effective(placed))
        };
        let Some(mut idx) = choose_socket(mode, hash, n, rand, rand & 1 == 1, load) else {
            return count(ctx, STATS_UNSTEERED, Placed::Pinned);
        };

        // 3. Pin it. BPF_NOEXIST: if another CPU pinned this flow first, follow its pin.
        let mut placed_here = Placed::New;
        if repair {
            placed_here = Placed::Repaired;
            let _ = TURN_PINS.insert(&key, idx, u64::from(BPF_ANY));
        } else if TURN_PINS.insert(&key, idx, u64::from(BPF_NOEXIST)).is_err() {
            placed_here = Placed::Pinned;
            if let Some(pinned) = TURN_PINS.get_ptr(&key) {
                // SAFETY: as above.
                idx = unsafe { *pinned };
            }
        }
        if idx >= n || TURN_SOCKETS.select_reuseport(ctx, idx).is_err() {
            // The chosen slot is empty too (a socket of the group closed): take the next
            // live slot after it and pin the flow there.
            let Some(live) = next_live_socket(ctx, idx, n) else {
                return count(ctx, STATS_UNSTEERED, Placed::Pinned);
            };
            idx = live;
            placed_here = Placed::Repaired;
            let _ = TURN_PINS.insert(&key, idx, u64::from(BPF_ANY));
        }
        match placed_here {
            Placed::Pinned => {}
            Placed::Repaired => {
                warn!(
                    ctx,
                    "turn_steer: a pinned flow's socket closed; re-pinned onto socket {}", idx
                );
            }
            Placed::New => {
                if let Some(placed) = TURN_PLACED.get_ptr_mut(idx) {
                    // SAFETY: pointer from a successful lookup of a u64 slot. Not atomic: a
                    // lost increment only under-weights one flow until the next update.
                    unsafe { *placed += 1 };
                }
            }
        }
        count(ctx, idx, placed_here)
    }

    /// Slots tried after an empty one. A few: each try multiplies the paths the verifier
    /// walks, and a group that lost this many neighbouring sockets is a dying daemon.
    const REPAIR_TRIES: u32 = 4;

    /// The first slot after `from` (wrapping, `from` excluded, at most [`REPAIR_TRIES`])
    /// whose socket accepts the selection.
    #[inline(always)]
    fn next_live_socket(ctx: &SkReuseportContext, from: u32, n: u32) -> Option<u32> {
        let mut candidate = if from >= n { 0 } else { from };
        for _ in 0..REPAIR_TRIES {
            candidate += 1;
            if candidate >= n {
                candidate = 0;
            }
            if candidate == from {
                return None;
            }
            if TURN_SOCKETS.select_reuseport(ctx, candidate).is_ok() {
                return Some(candidate);
            }
        }
        None
    }

    const ETH_P_IP: u16 = 0x0800;
    const ETH_P_IPV6: u16 = 0x86dd;

    /// Reads the flow's key: addresses from the IP header, client port from the UDP header
    /// (where `data` starts for this program type).
    #[inline(always)]
    fn flow_key(ctx: &SkReuseportContext) -> Option<FlowKey> {
        let mut key = FlowKey::default();
        let skb = ctx.as_ptr().cast_const();
        let proto = ctx.eth_protocol();
        // SAFETY (all three helper calls): `skb` is this program's context, each buffer is
        // a stack array of exactly the length passed, and the helper checks the offsets.
        let rc = if proto == u32::from(ETH_P_IP.to_be()) {
            key.family = 4;
            let mut addrs = [0u8; 8];
            // IPv4 source and destination: offsets 12..20 of the IP header.
            let rc = unsafe {
                bpf_skb_load_bytes_relative(
                    skb,
                    12,
                    addrs.as_mut_ptr().cast(),
                    8,
                    BPF_HDR_START_NET,
                )
            };
            key.client_ip[..4].copy_from_slice(&addrs[..4]);
            key.local_ip[..4].copy_from_slice(&addrs[4..]);
            rc
        } else if proto == u32::from(ETH_P_IPV6.to_be()) {
            key.family = 6;
            // IPv6 source and destination: offsets 8..40 of the IP header.
            let mut addrs = [0u8; 32];
            let rc = unsafe {
                bpf_skb_load_bytes_relative(
                    skb,
                    8,
                    addrs.as_mut_ptr().cast(),
                    32,
                    BPF_HDR_START_NET,
                )
            };
            key.client_ip.copy_from_slice(&addrs[..16]);
            key.local_ip.copy_from_slice(&addrs[16..]);
            rc
        } else {
            return None;
        };
        if rc != 0 {
            return None;
        }
        let rc = unsafe { bpf_skb_load_bytes(skb, 0, key.client_port.as_mut_ptr().cast(), 2) };
        if rc != 0 {
            return None;
        }
        Some(key)
    }

    #[inline(always)]
    fn count(ctx: &SkReuseportContext, slot: u32, placed: Placed) {
        if let Some(stats) = TURN_STATS.get_ptr_mut(slot) {
            // SAFETY: per-CPU slot from a successful lookup; only this CPU writes it and
            // the program is not preempted while it runs.
            let stats = unsafe { &mut *stats };
            stats.packets += 1;
            stats.bytes += ctx.len() as u64;
            match placed {
                Placed::Pinned => {}
                Placed::New => stats.new_flows += 1,
                Placed::Repaired => stats.repaired += 1,
            }
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        // The verifier rejects any reachable panic path; this is never linked into a program.
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("turn-ebpf is an eBPF program: build it with `cargo xtask build-ebpf`");
}
