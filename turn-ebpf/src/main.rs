//! `turn_steer`: the SK_REUSEPORT program that places each new client 4-tuple on a socket
//! of the listener group and keeps it there.
//!
//! A flow is the client's address and port plus the server address it sent to
//! ([`turn_common::FlowKey`]), read from the packet, so that the daemon can compute the
//! same key from an allocation and pin it itself.
//!
//! For every datagram on the group (unconnected UDP runs the program per datagram):
//! 1. a flow with an allocation pin (`TURN_ALLOCS`, written only by the daemon) goes to
//!    its slot;
//! 2. else a flow the program remembers (`TURN_MEMO`, bounded LRU, entries expire) goes to
//!    the slot it was placed on;
//! 3. else the flow is new (or its memo expired): it is placed by
//!    [`turn_common::choose_socket`] on the generation's slots and remembered with
//!    `BPF_NOEXIST`; if another CPU placed it first, that placement wins.
//!
//! A pin or memo whose socket has gone (`-ENOENT`) is re-placed and remembered (logged).
//! Every error path returns `SK_PASS` without a selection (the kernel's hash decides);
//! `SK_DROP` would make the kernel answer ICMP port-unreachable.
//!
//! Generations (a hitless upgrade): the configuration names the slots of the process that
//! takes new flows. Allocation pins hold whatever slot they name (an older process still
//! serves them); a memo outside the current generation is placed anew, so a flow that is
//! not yet an allocation follows the switch at once. The program is of the
//! select-or-migrate kind: when a TCP listener closes, the kernel asks it where each
//! queued connection goes, and it places them on the current generation like new flows.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{
        EbpfContext,
        bindings::{
            BPF_ANY, BPF_F_NO_PREALLOC, BPF_NOEXIST, bpf_hdr_start_off::BPF_HDR_START_NET,
            sk_action::SK_PASS,
        },
        helpers::{
            bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_loop, bpf_skb_load_bytes,
            bpf_skb_load_bytes_relative,
        },
        macros::{map, sk_reuseport},
        maps::{Array, HashMap, LruHashMap, PerCpuArray, ReusePortSockArray},
        programs::SkReuseportContext,
    };
    use aya_log_ebpf::warn;
    use turn_common::{
        DEFAULT_ALLOC_ENTRIES, DEFAULT_MEMO_ENTRIES, Draw, FlowKey, FlowMemo, LeastScan,
        MAX_SOCKETS, Mode, STATS_SLOTS, STATS_UNSTEERED, SocketLoad, SocketStats, SteeringConfig,
        Weight, choose_hash, choose_p2c,
    };

    #[map(name = "TURN_SOCKETS")]
    static TURN_SOCKETS: ReusePortSockArray = ReusePortSockArray::with_max_entries(MAX_SOCKETS, 0);

    #[map(name = "TURN_LOAD")]
    static TURN_LOAD: Array<SocketLoad> = Array::with_max_entries(MAX_SOCKETS, 0);

    #[map(name = "TURN_ALLOCS")]
    static TURN_ALLOCS: HashMap<FlowKey, u32> =
        HashMap::with_max_entries(DEFAULT_ALLOC_ENTRIES, BPF_F_NO_PREALLOC);

    #[map(name = "TURN_MEMO")]
    static TURN_MEMO: LruHashMap<FlowKey, FlowMemo> =
        LruHashMap::with_max_entries(DEFAULT_MEMO_ENTRIES, 0);

    #[map(name = "TURN_PLACED")]
    static TURN_PLACED: Array<u64> = Array::with_max_entries(MAX_SOCKETS, 0);

    #[map(name = "TURN_CONFIG")]
    static TURN_CONFIG: Array<SteeringConfig> = Array::with_max_entries(1, 0);

    #[map(name = "TURN_STATS")]
    static TURN_STATS: PerCpuArray<SocketStats> = PerCpuArray::with_max_entries(STATS_SLOTS, 0);

    #[sk_reuseport(migrate)]
    pub fn turn_steer(ctx: SkReuseportContext) -> u32 {
        steer(&ctx);
        SK_PASS
    }

    /// What happened to a datagram, for the per-socket counters.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Placed {
        /// Selected by an allocation's pin.
        Allocation,
        /// Selected by the program's memo.
        Memo,
        /// Left to the kernel.
        Unsteered,
        /// A new flow, placed and remembered.
        New,
        /// A flow whose memo had expired, placed anew.
        Renewed,
        /// A flow whose pinned or remembered socket had gone, placed anew.
        Repaired,
    }

    /// Selects `slot` for this datagram; false when the slot is out of range or empty.
    #[inline(always)]
    fn select(ctx: &SkReuseportContext, slot: u32) -> bool {
        slot < MAX_SOCKETS && TURN_SOCKETS.select_reuseport(ctx, slot).is_ok()
    }

    #[inline(always)]
    fn steer(ctx: &SkReuseportContext) {
        let Some(cfg) = TURN_CONFIG.get(0) else {
            return count(ctx, STATS_UNSTEERED, Placed::Unsteered);
        };
        let cfg = *cfg;
        if !cfg.is_valid() {
            return count(ctx, STATS_UNSTEERED, Placed::Unsteered);
        }
        let hash = ctx.hash();
        if ctx.migrating_sk().is_some() {
            // A closing listener's queued connection: onto the current generation.
            return migrate(ctx, &cfg, hash);
        }
        let Some(key) = flow_key(ctx) else {
            return count(ctx, STATS_UNSTEERED, Placed::Unsteered);
        };

        // 1. An allocation's pin: its flow goes to its worker, whatever the mode is now.
        let mut repair = false;
        if let Some(pinned) = TURN_ALLOCS.get_ptr(&key) {
            // SAFETY: the pointer comes from a successful lookup in a map without
            // preallocation (entries are freed after an RCU grace period, not reused while
            // this program runs); the value is a u32 the verifier lets us read.
            let slot = unsafe { *pinned };
            if select(ctx, slot) {
                return count(ctx, slot, Placed::Allocation);
            }
            // Its socket has gone: re-place the flow below (in the memo: only the daemon
            // writes allocation pins).
            repair = true;
        }

        // 2. A flow the program placed before and still remembers.
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        let mut renew = false;
        if !repair && let Some(memo) = TURN_MEMO.get_ptr(&key) {
            // SAFETY: pointer from a successful lookup; the value is plain data. A
            // concurrent update can only make us read another placement of this flow.
            let memo = unsafe { *memo };
            if now < memo.expires_ns && in_generation(memo.slot, &cfg) {
                if select(ctx, memo.slot) {
                    return count(ctx, memo.slot, Placed::Memo);
                }
                repair = true;
            } else {
                renew = true;
            }
        }

        let mode = Mode::from_raw(cfg.mode);
        if mode == Mode::Kernel && !repair {
            return count(ctx, STATS_UNSTEERED, Placed::Unsteered);
        }
        // A repair in kernel mode still needs a live socket: use the kernel's hash choice.
        let choose = if mode == Mode::Kernel {
            SteeringConfig { mode: Mode::Hash as u32, ..cfg }
        } else {
            cfg
        };
        // SAFETY: bpf_get_prandom_u32 has no preconditions.
        let draw = unsafe { Draw { pick: bpf_get_prandom_u32(), tie: bpf_get_prandom_u32() } };
        let mut slot = match Mode::from_raw(choose.mode) {
            Mode::P2c => choose_p2c(&choose, draw, weight),
            Mode::Least => least_loaded(&choose, draw),
            _ => choose_hash(&choose, hash),
        };

        // 3. Remember it. BPF_NOEXIST for a new flow: if another CPU placed it first,
        // follow that placement.
        let expires_ns = now.wrapping_add(cfg.memo_ttl_ns());
        let mut placed = if repair {
            Placed::Repaired
        } else if renew {
            Placed::Renewed
        } else {
            Placed::New
        };
        let memo = FlowMemo { slot, pad: 0, expires_ns };
        if placed != Placed::New {
            let _ = TURN_MEMO.insert(&key, &memo, u64::from(BPF_ANY));
        } else if TURN_MEMO.insert(&key, &memo, u64::from(BPF_NOEXIST)).is_err() {
            placed = Placed::Memo;
            if let Some(other) = TURN_MEMO.get_ptr(&key) {
                // SAFETY: as above.
                slot = unsafe { (*other).slot };
            }
        }
        if !select(ctx, slot) {
            // The chosen slot is empty too (a socket of the group closed): take the next
            // live slot of the generation and remember the flow there.
            let Some(live) = next_live_socket(ctx, slot, &cfg) else {
                return count(ctx, STATS_UNSTEERED, Placed::Unsteered);
            };
            slot = live;
            placed = Placed::Repaired;
            let memo = FlowMemo { slot, pad: 0, expires_ns };
            let _ = TURN_MEMO.insert(&key, &memo, u64::from(BPF_ANY));
        }
        match placed {
            Placed::Repaired => {
                warn!(
                    ctx,
                    "turn_steer: a pinned flow's socket closed; re-pinned onto socket {}", slot
                );
            }
            Placed::New | Placed::Renewed => {
                if let Some(counter) = TURN_PLACED.get_ptr_mut(slot) {
                    // SAFETY: pointer from a successful lookup of a u64 slot. Not atomic: a
                    // lost increment only under-weights one flow until the next update.
                    unsafe { *counter += 1 };
                }
            }
            Placed::Allocation | Placed::Memo | Placed::Unsteered => {}
        }
        count(ctx, slot, placed)
    }

    /// True when `slot` belongs to the generation that takes new flows.
    #[inline(always)]
    fn in_generation(slot: u32, cfg: &SteeringConfig) -> bool {
        slot >= cfg.first_slot && slot - cfg.first_slot < cfg.num_sockets
    }

    /// Places a connection a closing listener had queued (its SYN or its accept-queue
    /// entry) on a socket of the current generation, as a new flow; without a live one
    /// the kernel's hash picks among the listeners left.
    #[inline(always)]
    fn migrate(ctx: &SkReuseportContext, cfg: &SteeringConfig, hash: u32) {
        // SAFETY: bpf_get_prandom_u32 has no preconditions.
        let draw = unsafe { Draw { pick: bpf_get_prandom_u32(), tie: bpf_get_prandom_u32() } };
        let mut slot = match Mode::from_raw(cfg.mode) {
            Mode::P2c => choose_p2c(cfg, draw, weight),
            Mode::Least => least_loaded(cfg, draw),
            _ => choose_hash(cfg, hash),
        };
        if !select(ctx, slot) {
            let Some(live) = next_live_socket(ctx, slot, cfg) else {
                return count(ctx, STATS_UNSTEERED, Placed::Unsteered);
            };
            slot = live;
        }
        if let Some(counter) = TURN_PLACED.get_ptr_mut(slot) {
            // SAFETY: as in `steer`.
            unsafe { *counter += 1 };
        }
        count(ctx, slot, Placed::New)
    }

    /// The weight P2C and Least compare for `slot`: its published load plus the flows
    /// placed on it since, then its allocations.
    #[inline(always)]
    fn weight(slot: u32) -> Option<Weight> {
        let placed = TURN_PLACED.get(slot).copied().unwrap_or(0);
        TURN_LOAD
            .get(slot)
            .map(|l| Weight { load: l.effective(placed), allocations: l.allocations })
    }

    /// State of the Least scan under `bpf_loop`.
    #[repr(C)]
    struct LeastLoop {
        base: u32,
        scan: LeastScan,
    }

    /// One step of the Least scan: the verifier checks this callback once, however many
    /// sockets the loop visits (an open-coded loop is walked once per iteration and per
    /// branch, which exceeds its budget for 64 sockets).
    #[inline(never)]
    extern "C" fn least_step(index: u64, ctx: *mut core::ffi::c_void) -> i64 {
        // SAFETY: `ctx` is the `LeastLoop` on `least_loaded`'s stack that bpf_loop passes
        // back to us unchanged, and nothing else refers to it while the loop runs.
        let state = unsafe { &mut *ctx.cast::<LeastLoop>() };
        let k = index as u32 + 1;
        if k >= state.scan.n {
            return 1;
        }
        let i = state.scan.candidate(k);
        state.scan.visit(i, weight(state.base + i).unwrap_or_default());
        0
    }

    /// The least loaded socket of the generation (see [`LeastScan`]); `cfg` is valid.
    #[inline(always)]
    fn least_loaded(cfg: &SteeringConfig, draw: Draw) -> u32 {
        let mut state =
            LeastLoop { base: cfg.first_slot, scan: LeastScan::new(cfg.num_sockets, draw) };
        state.scan.best_weight = weight(cfg.first_slot + state.scan.best).unwrap_or_default();
        // SAFETY: the callback has the signature bpf_loop expects and `state` outlives the
        // call. On failure (not supported) the scan's start socket stands.
        unsafe {
            bpf_loop(
                cfg.num_sockets.saturating_sub(1),
                least_step as *mut core::ffi::c_void,
                (&mut state as *mut LeastLoop).cast(),
                0,
            );
        }
        cfg.first_slot + state.scan.best
    }

    /// Slots tried after an empty one. A few: each try multiplies the paths the verifier
    /// walks, and a group that lost this many neighbouring sockets is a dying daemon.
    const REPAIR_TRIES: u32 = 4;

    /// The first slot of the generation after `from` (wrapping, `from` excluded, at most
    /// [`REPAIR_TRIES`]) whose socket accepts the selection.
    #[inline(always)]
    fn next_live_socket(ctx: &SkReuseportContext, from: u32, cfg: &SteeringConfig) -> Option<u32> {
        let n = cfg.num_sockets;
        let from = from.wrapping_sub(cfg.first_slot);
        let mut candidate = if from >= n { 0 } else { from };
        for _ in 0..REPAIR_TRIES {
            candidate += 1;
            if candidate >= n {
                candidate = 0;
            }
            if candidate == from {
                return None;
            }
            if select(ctx, cfg.first_slot + candidate) {
                return Some(cfg.first_slot + candidate);
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
                Placed::Allocation => stats.allocation_hits += 1,
                Placed::Memo => stats.memo_hits += 1,
                Placed::Unsteered => {}
                Placed::New => stats.new_flows += 1,
                Placed::Renewed => {
                    stats.new_flows += 1;
                    stats.memo_expired += 1;
                }
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
