//! `turn_fast`: the TC classifier that relays ChannelData in the kernel, both ways (the
//! contract, and the header rewrites it runs, are in [`turn_common::fast`]).
//!
//! Attached (TCX, ingress) on the interfaces of the listener and relay addresses and on
//! loopback. For each IPv4 or IPv6 UDP datagram:
//! 1. a ChannelData datagram from a client with a bound channel ([`MAP_CHANNELS`]) becomes
//!    a datagram from the relayed address to the peer (header removed, padding trimmed);
//! 2. else a datagram from a peer to a relayed address with a binding ([`MAP_PEERS`])
//!    becomes ChannelData from the listener to the client;
//! 3. the new datagram goes to a local address by re-injection on loopback (where this
//!    program sees it again: relay to relay), or out of the route's interface with the
//!    next hop's MAC (`bpf_fib_lookup`).
//!
//! Anything else, and anything the program cannot do exactly as the userspace path would
//! (an expired entry, IP options or extension headers, fragments, GSO/GRO super-packets,
//! trailing bytes, a route without a resolved neighbour, a datagram over the MTU, a partial
//! checksum leaving the host, a loop), goes up unchanged: `TC_ACT_UNSPEC`, which also lets
//! the next TCX program run. Every decision is counted in [`MAP_VERDICTS`].
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{
        EbpfContext,
        bindings::{
            BPF_CSUM_LEVEL_QUERY, BPF_F_INGRESS, BPF_F_NO_PREALLOC, BPF_F_RECOMPUTE_CSUM,
            BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_SUCCESS,
            BPF_FIB_LOOKUP_OUTPUT, TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_adj_room_mode::BPF_ADJ_ROOM_NET,
            bpf_fib_lookup as FibParams,
        },
        helpers::{
            bpf_csum_level, bpf_csum_update, bpf_fib_lookup, bpf_ktime_get_ns, bpf_redirect,
            bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes,
        },
        macros::{classifier, map},
        maps::{Array, HashMap, PerCpuArray},
        programs::TcContext,
    };
    use turn_common::fast::{
        Binding, ChannelKey, DEFAULT_BINDINGS, Endpoint, FastConfig, HOP_LIMIT,
        MAX_INTERFACE_ENTRIES, PeerKey, Received, Rewrite, Traffic, VERDICTS, Verdict,
        channel_data, partial_checksum, to_client, to_peer,
    };

    #[map(name = "FAST_CHANNELS")]
    static FAST_CHANNELS: HashMap<ChannelKey, Binding> =
        HashMap::with_max_entries(DEFAULT_BINDINGS, BPF_F_NO_PREALLOC);

    #[map(name = "FAST_PEERS")]
    static FAST_PEERS: HashMap<PeerKey, Binding> =
        HashMap::with_max_entries(DEFAULT_BINDINGS, BPF_F_NO_PREALLOC);

    #[map(name = "FAST_TRAFFIC")]
    static FAST_TRAFFIC: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(DEFAULT_BINDINGS, 0);

    #[map(name = "FAST_VERDICTS")]
    static FAST_VERDICTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(VERDICTS, 0);

    #[map(name = "FAST_LOCAL")]
    static FAST_LOCAL: HashMap<Endpoint, u32> = HashMap::with_max_entries(MAX_INTERFACE_ENTRIES, 0);

    #[map(name = "FAST_EGRESS")]
    static FAST_EGRESS: HashMap<u32, u32> = HashMap::with_max_entries(MAX_INTERFACE_ENTRIES, 0);

    #[map(name = "FAST_CONFIG")]
    static FAST_CONFIG: Array<FastConfig> = Array::with_max_entries(1, 0);

    /// The program's working memory: too much for the 512-byte BPF stack.
    struct Scratch {
        rx: Received,
        binding: Binding,
        channel_key: ChannelKey,
        peer_key: PeerKey,
        rewrite: Rewrite,
        fib: FibParams,
        ip: [u8; 40],
        headers: [u8; 12],
    }

    #[map(name = "FAST_SCRATCH")]
    static FAST_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

    const ETH_LEN: usize = 14;
    const LOOPBACK_IFINDEX: u32 = 1;
    const AF_INET: u8 = 2;
    const AF_INET6: u8 = 10;

    #[classifier]
    pub fn turn_fast(ctx: TcContext) -> i32 {
        match relay(&ctx) {
            Action::Up(verdict) => {
                if let Some(v) = verdict {
                    count(v);
                }
                TC_ACT_UNSPEC
            }
            Action::Sent(verdict, action) => {
                count(verdict);
                action
            }
        }
    }

    /// What became of a datagram.
    enum Action {
        /// Up the stack unchanged (counted when it was UDP).
        Up(Option<Verdict>),
        /// Rewritten: redirected, or dropped because a helper failed half-way.
        Sent(Verdict, i32),
    }

    #[inline(always)]
    fn count(verdict: Verdict) {
        if let Some(n) = FAST_VERDICTS.get_ptr_mut(verdict as u32) {
            // SAFETY: a per-CPU array slot of this CPU, only written by this program here.
            unsafe { *n += 1 };
        }
    }

    /// Where the rewritten datagram goes.
    enum Route {
        /// An address of this host: re-injected on loopback.
        Local,
        /// Out of `ifindex` to the next hop `dmac`.
        Out { ifindex: u32, smac: [u8; 6], dmac: [u8; 6] },
    }

    #[inline(always)]
    fn relay(ctx: &TcContext) -> Action {
        let Ok(ethertype) = ctx.load::<[u8; 2]>(12) else {
            return Action::Up(None);
        };
        let ethertype = u16::from_be_bytes(ethertype);
        if ethertype != 0x0800 && ethertype != 0x86DD {
            return Action::Up(None);
        }
        let Some(s) = FAST_SCRATCH.get_ptr_mut(0) else {
            return Action::Up(None);
        };
        // SAFETY: this CPU's only slot of a per-CPU array; a TC program is not re-entered on
        // one CPU while it runs.
        let s = unsafe { &mut *s };
        let rx = &mut s.rx;
        *rx = Received::default();
        let ip_len: usize;
        if ethertype == 0x0800 {
            if load(ctx, ETH_LEN, &mut s.ip[..20]).is_err() {
                return Action::Up(None);
            }
            let ip = &s.ip;
            if ip[9] != 17 {
                return Action::Up(None);
            }
            let total = u16::from_be_bytes([ip[2], ip[3]]);
            // IP options, or a fragment (MF set or an offset).
            if ip[0] != 0x45 || (ip[6] & 0x3F) != 0 || ip[7] != 0 {
                return Action::Up(Some(Verdict::Unusual));
            }
            ip_len = 20;
            rx.family = 4;
            rx.class = [ip[1], 0, 0, 0];
            rx.hop_limit = ip[8];
            rx.src.ip[..4].copy_from_slice(&ip[12..16]);
            rx.dst.ip[..4].copy_from_slice(&ip[16..20]);
            rx.udp_len = total.wrapping_sub(20);
        } else {
            if load(ctx, ETH_LEN, &mut s.ip).is_err() {
                return Action::Up(None);
            }
            let ip = &s.ip;
            // UDP right after the fixed header (an extension header goes up, uncounted:
            // it may not be UDP at all).
            if ip[6] != 17 {
                return Action::Up(None);
            }
            ip_len = 40;
            rx.family = 6;
            rx.class = [ip[0], ip[1], ip[2], ip[3]];
            rx.hop_limit = ip[7];
            rx.src.ip.copy_from_slice(&ip[8..24]);
            rx.dst.ip.copy_from_slice(&ip[24..40]);
            rx.udp_len = u16::from_be_bytes([ip[4], ip[5]]);
        }
        rx.src.family = rx.family;
        rx.dst.family = rx.family;
        let l4 = ETH_LEN + ip_len;
        let Ok(udp) = ctx.load::<[u8; 8]>(l4) else {
            return Action::Up(Some(Verdict::Unusual));
        };
        rx.src.port = [udp[0], udp[1]];
        rx.dst.port = [udp[2], udp[3]];
        rx.checksum = u16::from_be_bytes([udp[6], udp[7]]);
        // The UDP length must be the IP payload's, and the frame must hold it (a trailer
        // beyond it, such as Ethernet padding, is trimmed).
        if u16::from_be_bytes([udp[4], udp[5]]) != rx.udp_len
            || rx.udp_len < 8
            || (ctx.len() as usize) < l4 + rx.udp_len as usize
        {
            return Action::Up(Some(Verdict::Unusual));
        }
        // A GSO or GRO super-packet carries many datagrams.
        // SAFETY: reading a field of this program's context.
        if unsafe { (*ctx.skb.skb).gso_size } != 0 {
            return Action::Up(Some(Verdict::Unusual));
        }
        let payload = u32::from(rx.udp_len) - 8;

        // 1. ChannelData from a client.
        if payload >= 4
            && let Ok(head) = ctx.load::<[u8; 4]>(l4 + 8)
            && head[0] & 0xC0 == 0x40
        {
            s.channel_key.client = rx.src;
            s.channel_key.listener = rx.dst;
            s.channel_key.channel = [head[0], head[1]];
            s.channel_key.pad = [0; 2];
            if let Some(binding) = FAST_CHANNELS.get_ptr(&s.channel_key) {
                // SAFETY: a successful lookup in a map without preallocation: the entry is
                // freed after an RCU grace period, not while this program runs.
                s.binding = unsafe { *binding };
                return client_to_peer(ctx, s, head, payload, l4);
            }
        }
        // 2. A datagram from a peer.
        s.peer_key.peer = rx.src;
        s.peer_key.relay = rx.dst;
        if let Some(binding) = FAST_PEERS.get_ptr(&s.peer_key) {
            // SAFETY: as above.
            s.binding = unsafe { *binding };
            return peer_to_client(ctx, s, payload, l4);
        }
        Action::Up(Some(Verdict::NoBinding))
    }

    #[inline(always)]
    fn usable(rx: &Received, binding: &Binding) -> Result<(), Verdict> {
        // SAFETY: a helper without arguments.
        if unsafe { bpf_ktime_get_ns() } >= binding.expires_ns {
            return Err(Verdict::Expired);
        }
        if binding.to.family != rx.family || binding.from.family != rx.family {
            return Err(Verdict::CrossFamily);
        }
        // No checksum is not allowed over IPv6 (the kernel drops it).
        if rx.family == 6 && rx.checksum == 0 {
            return Err(Verdict::Malformed);
        }
        Ok(())
    }

    #[inline(always)]
    fn client_to_peer(
        ctx: &TcContext,
        s: &mut Scratch,
        head: [u8; 4],
        payload: u32,
        l4: usize,
    ) -> Action {
        if let Err(v) = usable(&s.rx, &s.binding) {
            return Action::Up(Some(v));
        }
        let Some((_, data_len)) = channel_data(head, payload) else {
            return Action::Up(Some(Verdict::Malformed));
        };
        let pad_len = payload - 4 - u32::from(data_len);
        let mut padding = [0u8; 3];
        let pad_at = l4 + 12 + data_len as usize;
        let mut i = 0;
        while i < 3 {
            if (i as u32) < pad_len {
                let Ok(b) = ctx.load::<u8>(pad_at + i) else {
                    return Action::Up(Some(Verdict::Unusual));
                };
                padding[i] = b;
            }
            i += 1;
        }
        let l3_len = (l4 - ETH_LEN) as u32 + 8 + u32::from(data_len);
        let (route, hop_limit) = match route(ctx, s, l3_len) {
            Ok(r) => r,
            Err(v) => return Action::Up(Some(v)),
        };
        to_peer(&mut s.rewrite, &s.rx, &s.binding, data_len, head, padding, hop_limit);
        // The ChannelData header goes: 4 bytes less right after the IP header, then the
        // new headers over what is left of the old UDP header and the ChannelData header.
        if ctx.adjust_room(-4, BPF_ADJ_ROOM_NET, 0).is_err() {
            return Action::Up(Some(Verdict::Failed));
        }
        let new_len = (l4 + 8 + data_len as usize) as u32;
        if write(ctx, s, l4, false, new_len, &route).is_err() {
            return Action::Sent(Verdict::Failed, TC_ACT_SHOT as i32);
        }
        if let Some(t) = FAST_TRAFFIC.get_ptr_mut(s.binding.slot) {
            // SAFETY: this CPU's slot of a per-CPU array.
            unsafe {
                (*t).to_peer_packets += 1;
                (*t).to_peer_bytes += u64::from(data_len);
            }
        }
        send(route, Verdict::ToPeer)
    }

    #[inline(always)]
    fn peer_to_client(ctx: &TcContext, s: &mut Scratch, payload: u32, l4: usize) -> Action {
        if let Err(v) = usable(&s.rx, &s.binding) {
            return Action::Up(Some(v));
        }
        // ChannelData carries at most 65,535 bytes of data in a UDP datagram.
        if payload > 0xFFFF - 12 {
            return Action::Up(Some(Verdict::TooBig));
        }
        let data_len = payload as u16;
        let l3_len = (l4 - ETH_LEN) as u32 + 12 + payload;
        let (route, hop_limit) = match route(ctx, s, l3_len) {
            Ok(r) => r,
            Err(v) => return Action::Up(Some(v)),
        };
        to_client(&mut s.rewrite, &s.rx, &s.binding, data_len, hop_limit);
        // 4 zero bytes after the IP header; the new UDP and ChannelData headers over them
        // and the old UDP header.
        if ctx.adjust_room(4, BPF_ADJ_ROOM_NET, 0).is_err() {
            return Action::Up(Some(Verdict::Failed));
        }
        let new_len = (l4 + 12 + payload as usize) as u32;
        if write(ctx, s, l4, true, new_len, &route).is_err() {
            return Action::Sent(Verdict::Failed, TC_ACT_SHOT as i32);
        }
        if let Some(t) = FAST_TRAFFIC.get_ptr_mut(s.binding.slot) {
            // SAFETY: this CPU's slot of a per-CPU array.
            unsafe {
                (*t).to_client_packets += 1;
                (*t).to_client_bytes += u64::from(data_len);
            }
        }
        send(route, Verdict::ToClient)
    }

    /// Stores the new headers (keeping a complete receive checksum right), trims what
    /// follows the new datagram, and sets the MACs.
    #[inline(always)]
    fn write(
        ctx: &TcContext,
        s: &mut Scratch,
        l4: usize,
        channel_data: bool,
        new_len: u32,
        route: &Route,
    ) -> Result<(), ()> {
        let flags = u64::from(BPF_F_RECOMPUTE_CSUM);
        let ip_len = if s.rx.family == 4 { 20 } else { 40 };
        store(ctx, ETH_LEN, &s.rewrite.ip[..ip_len], flags)?;
        s.headers[..8].copy_from_slice(&s.rewrite.udp);
        s.headers[8..].copy_from_slice(&s.rewrite.channel_data);
        let n = if channel_data { 12 } else { 8 };
        store(ctx, l4, &s.headers[..n], flags)?;
        if ctx.len() != new_len {
            // SAFETY: this program's context; the helper checks the length.
            if unsafe { bpf_skb_change_tail(ctx.as_ptr().cast(), new_len, 0) } != 0 {
                return Err(());
            }
        }
        let mut macs = [0u8; 12];
        if let Route::Out { smac, dmac, .. } = route {
            macs[..6].copy_from_slice(dmac);
            macs[6..].copy_from_slice(smac);
        }
        store(ctx, 0, &macs, 0)
    }

    /// `bpf_skb_load_bytes` into `dst`.
    #[inline(always)]
    fn load(ctx: &TcContext, offset: usize, dst: &mut [u8]) -> Result<(), ()> {
        // SAFETY: this program's context; `dst` is writable memory of the length passed.
        let rc = unsafe {
            bpf_skb_load_bytes(
                ctx.as_ptr().cast(),
                offset as u32,
                dst.as_mut_ptr().cast(),
                dst.len() as u32,
            )
        };
        if rc == 0 { Ok(()) } else { Err(()) }
    }

    /// `bpf_skb_store_bytes` from `src`.
    #[inline(always)]
    fn store(ctx: &TcContext, offset: usize, src: &[u8], flags: u64) -> Result<(), ()> {
        // SAFETY: this program's context; `src` is readable memory of the length passed.
        let rc = unsafe {
            bpf_skb_store_bytes(
                ctx.as_ptr().cast(),
                offset as u32,
                src.as_ptr().cast(),
                src.len() as u32,
                flags,
            )
        };
        if rc == 0 { Ok(()) } else { Err(()) }
    }

    #[inline(always)]
    fn send(route: Route, verdict: Verdict) -> Action {
        // SAFETY: helpers taking plain values.
        let action = match route {
            Route::Local => unsafe { bpf_redirect(LOOPBACK_IFINDEX, u64::from(BPF_F_INGRESS)) },
            Route::Out { ifindex, .. } => unsafe { bpf_redirect(ifindex, 0) },
        };
        let verdict = if matches!(route, Route::Local) { Verdict::Local } else { verdict };
        Action::Sent(verdict, action as i32)
    }

    /// Where the datagram from `binding.from` to `binding.to` of `l3_len` bytes goes, and
    /// its hop limit.
    #[inline(always)]
    fn route(ctx: &TcContext, s: &mut Scratch, l3_len: u32) -> Result<(Route, u8), Verdict> {
        let (rx, binding) = (&s.rx, &s.binding);
        if is_local(&binding.to) {
            // Each pass through this host's own relays costs a hop: a loop ends.
            if rx.hop_limit <= 1 {
                return Err(Verdict::HopLimit);
            }
            return Ok((Route::Local, rx.hop_limit - 1));
        }
        // A datagram that leaves the host needs a checksum the kernel can send as it is.
        let skb: *mut aya_ebpf::bindings::__sk_buff = ctx.as_ptr().cast();
        // SAFETY: this program's context; a query that changes nothing (csum_update of 0
        // adds nothing to a complete checksum and fails on others).
        let validated = unsafe { bpf_csum_level(skb, u64::from(BPF_CSUM_LEVEL_QUERY)) } >= 0
            || unsafe { bpf_csum_update(skb, 0) } >= 0;
        if !validated && rx.checksum == partial_checksum(rx) {
            return Err(Verdict::Unverified);
        }
        if l3_len > 0xFFFF {
            return Err(Verdict::TooBig);
        }
        let p = &mut s.fib;
        // SAFETY: a plain C struct of integers and unions of integers: all zeros is valid.
        *p = unsafe { core::mem::zeroed() };
        p.family = if rx.family == 4 { AF_INET } else { AF_INET6 };
        p.l4_protocol = 17;
        p.sport = u16::from_ne_bytes(binding.from.port);
        p.dport = u16::from_ne_bytes(binding.to.port);
        p.__bindgen_anon_1.tot_len = l3_len as u16;
        // SAFETY: reading a field of this program's context.
        p.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
        if rx.family == 4 {
            p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(first_4(&binding.from.ip));
            p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(first_4(&binding.to.ip));
        } else {
            p.__bindgen_anon_3.ipv6_src = words(&binding.from.ip);
            p.__bindgen_anon_4.ipv6_dst = words(&binding.to.ip);
        }
        let size = core::mem::size_of::<FibParams>() as i32;
        // As a forwarder would route it (the receiving interface must forward)...
        // SAFETY: `p` is a stack struct of the size passed.
        let mut rc = unsafe { bpf_fib_lookup(skb.cast(), p, size, 0) } as u32;
        if rc == BPF_FIB_LKUP_RET_FWD_DISABLED {
            // ...else as the host's own output, when one interface carries every route.
            let single = FAST_CONFIG.get(0).map_or(0, |c| c.single_egress);
            if single == 0 {
                return Err(Verdict::NoRoute);
            }
            p.ifindex = single;
            // SAFETY: as above.
            rc = unsafe { bpf_fib_lookup(skb.cast(), p, size, BPF_FIB_LOOKUP_OUTPUT) } as u32;
        }
        if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED {
            return Err(Verdict::TooBig);
        }
        if rc != BPF_FIB_LKUP_RET_SUCCESS || FAST_EGRESS.get_ptr(&p.ifindex).is_none() {
            return Err(Verdict::NoRoute);
        }
        Ok((Route::Out { ifindex: p.ifindex, smac: p.smac, dmac: p.dmac }, HOP_LIMIT))
    }

    #[inline(always)]
    fn first_4(ip: &[u8; 16]) -> [u8; 4] {
        [ip[0], ip[1], ip[2], ip[3]]
    }

    #[inline(always)]
    fn words(ip: &[u8; 16]) -> [u32; 4] {
        [
            u32::from_ne_bytes([ip[0], ip[1], ip[2], ip[3]]),
            u32::from_ne_bytes([ip[4], ip[5], ip[6], ip[7]]),
            u32::from_ne_bytes([ip[8], ip[9], ip[10], ip[11]]),
            u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        ]
    }

    /// An address of this host: loopback, or one the daemon listed.
    #[inline(always)]
    fn is_local(e: &Endpoint) -> bool {
        if e.family == 4 && e.ip[0] == 127 {
            return true;
        }
        if e.family == 6 && e.ip == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1] {
            return true;
        }
        let key = Endpoint { ip: e.ip, port: [0; 2], family: e.family, pad: 0 };
        FAST_LOCAL.get_ptr(&key).is_some()
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
    eprintln!("turn-fast is an eBPF program: build it with `cargo xtask build-ebpf`");
}
