//! `turn_fast`: the TC classifier that relays ChannelData in the kernel, both ways (the
//! contract, and the header rewrites it runs, are in [`turn_common::fast`]).
//!
//! Attached (TCX, ingress) on the interfaces of the listener and relay addresses and on
//! loopback. For each IPv4 or IPv6 UDP datagram:
//! 1. a ChannelData datagram from a client with a bound channel ([`MAP_CHANNELS`]) becomes
//!    a datagram from the relayed address to the peer (header removed, padding trimmed);
//! 2. else a datagram from a peer to a relayed address with a binding ([`MAP_PEERS`])
//!    becomes ChannelData from the listener to the client;
//! 3. a client's ChannelData for another allocation's relayed address on this host goes
//!    on to that allocation's client in the same pass (relay to relay);
//! 4. the new datagram goes out of the route's interface with the next hop's MAC
//!    (`bpf_fib_lookup`), or, for an address of this host, up the stack from here when it
//!    came on loopback (it keeps the local route it came with).
//!
//! Anything else, and anything the program cannot do exactly as the userspace path would
//! (an expired entry, IP options or extension headers, fragments, GSO/GRO super-packets,
//! trailing bytes, a route without a resolved neighbour, a datagram over the MTU, a partial
//! checksum leaving the host, a local destination from another interface), goes up unchanged: `TC_ACT_UNSPEC`, which also lets
//! the next TCX program run. Every decision is counted in [`MAP_VERDICTS`].
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{
        EbpfContext,
        bindings::{
            BPF_CSUM_LEVEL_QUERY, BPF_F_NO_PREALLOC, BPF_F_RECOMPUTE_CSUM,
            BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_SUCCESS,
            BPF_FIB_LOOKUP_OUTPUT, TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_adj_room_mode::BPF_ADJ_ROOM_NET,
            bpf_fib_lookup as FibParams,
        },
        helpers::{
            bpf_csum_diff, bpf_csum_level, bpf_csum_update, bpf_fib_lookup, bpf_ktime_get_ns,
            bpf_loop, bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes,
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
        /// The second binding of a relay-to-relay datagram, and what its first pass made.
        next: Binding,
        relayed: Received,
        channel_key: ChannelKey,
        peer_key: PeerKey,
        rewrite: Rewrite,
        fib: FibParams,
        ip: [u8; 40],
        headers: [u8; 12],
        /// A chunk of data being summed (see `sum_step`).
        chunk: [u64; CHUNK / 8],
    }

    /// Bytes of data summed per `bpf_csum_diff` (a multiple of 4, at most 512).
    const CHUNK: usize = 256;
    /// Chunks summed at most: a datagram with more data and a partial checksum goes up.
    const CHUNKS: u32 = 6;

    #[map(name = "FAST_SCRATCH")]
    static FAST_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

    const ETH_LEN: usize = 14;
    const LOOPBACK_IFINDEX: u32 = 1;
    const TC_ACT_OK: i32 = 0;
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
        /// Rewritten: redirected or delivered, or dropped because a helper failed half-way.
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
        /// An address of this host, and the datagram came on loopback with its local
        /// route: up the stack from here (`TC_ACT_OK`).
        Here,
        /// Out of `ifindex` to the next hop `dmac`.
        Out { ifindex: u32, smac: [u8; 6], dmac: [u8; 6] },
    }

    /// How the datagram changes size.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Shape {
        /// ChannelData to a plain datagram: 4 bytes less (and the padding).
        ToPeer,
        /// A plain datagram to ChannelData: 4 bytes more.
        ToClient,
        /// ChannelData to ChannelData (relay to relay): the same size (less the padding).
        Relayed,
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
        // A GSO or GRO super-packet carries many datagrams; a VLAN tag the device took off
        // would go out with the datagram on another interface.
        // SAFETY: reading fields of this program's context.
        if unsafe { (*ctx.skb.skb).gso_size != 0 || (*ctx.skb.skb).vlan_present != 0 } {
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
                return from_client(ctx, s, head, payload, l4);
            }
        }
        // 2. A datagram from a peer.
        s.peer_key.peer = rx.src;
        s.peer_key.relay = rx.dst;
        if let Some(binding) = FAST_PEERS.get_ptr(&s.peer_key) {
            // SAFETY: as above.
            s.binding = unsafe { *binding };
            return from_peer(ctx, s, payload, l4);
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

    /// A client's ChannelData: to its peer, or through a relayed address of this host on
    /// to that allocation's client.
    #[inline(always)]
    fn from_client(
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
        // A local sender's partial checksum cannot be updated: computed anew from the data
        // (only on this host: one cannot leave it, see `route`).
        let partial = !validated(ctx) && s.rx.checksum == partial_checksum(&s.rx);
        let local = is_local(&s.binding.to);
        let data_sum = if partial && local {
            match sum_data(ctx, l4 + 12, u32::from(data_len)) {
                Some(sum) => Some(sum),
                None => return Action::Up(Some(Verdict::Unverified)),
            }
        } else {
            None
        };
        let hop_limit = s.rx.hop_limit;
        let ip_len = (l4 - ETH_LEN) as u32;
        let mut shape = Shape::ToPeer;
        if local {
            // The peer is this host: another allocation's relayed address?
            s.peer_key.peer = s.binding.from;
            s.peer_key.relay = s.binding.to;
            if let Some(next) = FAST_PEERS.get_ptr(&s.peer_key) {
                // SAFETY: as in `relay`.
                s.next = unsafe { *next };
                // The first pass, as the second one receives it (its hop limit is the
                // second's to set).
                to_peer(
                    &mut s.rewrite,
                    &s.rx,
                    &s.binding,
                    data_len,
                    head,
                    padding,
                    hop_limit,
                    data_sum,
                );
                let r = &mut s.relayed;
                r.family = s.rx.family;
                r.class = s.rx.class;
                r.hop_limit = hop_limit;
                r.src = s.binding.from;
                r.dst = s.binding.to;
                r.udp_len = data_len + 8;
                r.checksum = u16::from_be_bytes([s.rewrite.udp[6], s.rewrite.udp[7]]);
                if let Err(v) = usable(&s.relayed, &s.next) {
                    return Action::Up(Some(v));
                }
                shape = Shape::Relayed;
            }
        }
        let (from, to, l3_len) = match shape {
            Shape::Relayed => (s.next.from, s.next.to, ip_len + 12 + u32::from(data_len)),
            _ => (s.binding.from, s.binding.to, ip_len + 8 + u32::from(data_len)),
        };
        let (route, hop) = match route(ctx, s, &from, &to, l3_len, partial) {
            Ok(r) => r,
            Err(v) => return Action::Up(Some(v)),
        };
        // The headers, once, with the route's hop limit.
        if shape == Shape::Relayed {
            to_client(&mut s.rewrite, &s.relayed, &s.next, data_len, hop, None);
        } else {
            to_peer(&mut s.rewrite, &s.rx, &s.binding, data_len, head, padding, hop, data_sum);
        }
        let new_len = if shape == Shape::Relayed { l4 + 12 } else { l4 + 8 } + data_len as usize;
        if let Err(action) = mutate(ctx, s, shape, l4, new_len as u32, &route) {
            return action;
        }
        add_traffic(s.binding.slot, true, u64::from(data_len));
        if shape == Shape::Relayed {
            add_traffic(s.next.slot, false, u64::from(data_len));
            return send(route, Verdict::RelayToRelay);
        }
        send(route, Verdict::ToPeer)
    }

    /// A peer's datagram: to the client as ChannelData.
    #[inline(always)]
    fn from_peer(ctx: &TcContext, s: &mut Scratch, payload: u32, l4: usize) -> Action {
        if let Err(v) = usable(&s.rx, &s.binding) {
            return Action::Up(Some(v));
        }
        // ChannelData carries at most 65,535 bytes of data in a UDP datagram.
        if payload > 0xFFFF - 12 {
            return Action::Up(Some(Verdict::TooBig));
        }
        let data_len = payload as u16;
        let ip_len = (l4 - ETH_LEN) as u32;
        let (from, to) = (s.binding.from, s.binding.to);
        let partial = !validated(ctx) && s.rx.checksum == partial_checksum(&s.rx);
        let (route, hop) = match route(ctx, s, &from, &to, ip_len + 12 + payload, partial) {
            Ok(r) => r,
            Err(v) => return Action::Up(Some(v)),
        };
        let data_sum = if partial {
            match sum_data(ctx, l4 + 8, payload) {
                Some(sum) => Some(sum),
                None => return Action::Up(Some(Verdict::Unverified)),
            }
        } else {
            None
        };
        to_client(&mut s.rewrite, &s.rx, &s.binding, data_len, hop, data_sum);
        let new_len = (l4 + 12 + payload as usize) as u32;
        if let Err(action) = mutate(ctx, s, Shape::ToClient, l4, new_len, &route) {
            return action;
        }
        add_traffic(s.binding.slot, false, u64::from(data_len));
        send(route, Verdict::ToClient)
    }

    /// Counts one datagram of `bytes` of data for a binding, to its peer or to its client.
    #[inline(always)]
    fn add_traffic(slot: u32, to_peer: bool, bytes: u64) {
        if let Some(t) = FAST_TRAFFIC.get_ptr_mut(slot) {
            // SAFETY: this CPU's slot of a per-CPU array.
            let t = unsafe { &mut *t };
            if to_peer {
                t.to_peer_packets += 1;
                t.to_peer_bytes += bytes;
            } else {
                t.to_client_packets += 1;
                t.to_client_bytes += bytes;
            }
        }
    }

    /// Resizes the datagram for its shape and writes the new headers; on failure, what to
    /// return (up unchanged when nothing changed yet, else dropped).
    #[inline(always)]
    fn mutate(
        ctx: &TcContext,
        s: &mut Scratch,
        shape: Shape,
        l4: usize,
        new_len: u32,
        route: &Route,
    ) -> Result<(), Action> {
        // Room right after the IP header: the new headers then go over what is there.
        let room = match shape {
            Shape::ToPeer => -4,
            Shape::ToClient => 4,
            Shape::Relayed => 0,
        };
        if room != 0 && ctx.adjust_room(room, BPF_ADJ_ROOM_NET, 0).is_err() {
            return Err(Action::Up(Some(Verdict::Failed)));
        }
        if write(ctx, s, l4, shape != Shape::ToPeer, new_len, route).is_err() {
            return Err(Action::Sent(Verdict::Failed, TC_ACT_SHOT as i32));
        }
        Ok(())
    }

    /// Stores the new headers (keeping a complete receive checksum right), trims what
    /// follows the new datagram, and sets the MACs of a datagram that leaves.
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
        if let Route::Out { smac, dmac, .. } = route {
            let mut macs = [0u8; 12];
            macs[..6].copy_from_slice(dmac);
            macs[6..].copy_from_slice(smac);
            store(ctx, 0, &macs, 0)?;
        }
        Ok(())
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
        match route {
            Route::Here => Action::Sent(verdict, TC_ACT_OK),
            // SAFETY: a helper taking plain values.
            Route::Out { ifindex, .. } => {
                Action::Sent(verdict, unsafe { bpf_redirect(ifindex, 0) } as i32)
            }
        }
    }

    /// Where a datagram from `from` to `to` of `l3_len` bytes goes, and its hop limit:
    /// delivered here when `to` is this host's and it came on loopback, else out of the
    /// route's interface.
    #[inline(always)]
    fn route(
        ctx: &TcContext,
        s: &mut Scratch,
        from: &Endpoint,
        to: &Endpoint,
        l3_len: u32,
        partial: bool,
    ) -> Result<(Route, u8), Verdict> {
        // SAFETY: reading a field of this program's context.
        let ingress = unsafe { (*ctx.skb.skb).ingress_ifindex };
        if is_local(to) {
            if ingress != LOOPBACK_IFINDEX {
                return Err(Verdict::LocalElsewhere);
            }
            return Ok((Route::Here, s.rx.hop_limit));
        }
        let rx = &s.rx;
        // A datagram that leaves the host needs a checksum the kernel sends as it is: not a
        // partial one, whose completion the device would start at the old offset.
        if partial {
            return Err(Verdict::Unverified);
        }
        let skb: *mut aya_ebpf::bindings::__sk_buff = ctx.as_ptr().cast();
        if l3_len > 0xFFFF {
            return Err(Verdict::TooBig);
        }
        let p = &mut s.fib;
        // SAFETY: a plain C struct of integers and unions of integers: all zeros is valid.
        *p = unsafe { core::mem::zeroed() };
        p.family = if rx.family == 4 { AF_INET } else { AF_INET6 };
        p.l4_protocol = 17;
        p.sport = u16::from_ne_bytes(from.port);
        p.dport = u16::from_ne_bytes(to.port);
        p.__bindgen_anon_1.tot_len = l3_len as u16;
        p.ifindex = ingress;
        if rx.family == 4 {
            p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(first_4(&from.ip));
            p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(first_4(&to.ip));
        } else {
            p.__bindgen_anon_3.ipv6_src = words(&from.ip);
            p.__bindgen_anon_4.ipv6_dst = words(&to.ip);
        }
        let size = core::mem::size_of::<FibParams>() as i32;
        // As a forwarder would route it (the receiving interface must forward)...
        // SAFETY: `p` is a struct of the size passed.
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

    /// True when the kernel validated the received checksum (`CHECKSUM_UNNECESSARY`) or
    /// holds the datagram's complete sum (`CHECKSUM_COMPLETE`): the field is a checksum.
    #[inline(always)]
    fn validated(ctx: &TcContext) -> bool {
        let skb: *mut aya_ebpf::bindings::__sk_buff = ctx.as_ptr().cast();
        // SAFETY: this program's context; queries that change nothing (csum_update of 0
        // adds nothing to a complete sum, and fails on the other kinds).
        let unnecessary = unsafe { bpf_csum_level(skb, u64::from(BPF_CSUM_LEVEL_QUERY)) } >= 0;
        // SAFETY: as above.
        unnecessary || unsafe { bpf_csum_update(skb, 0) } >= 0
    }

    /// Where `sum_step` is in the data.
    #[repr(C)]
    struct SumLoop {
        skb: *mut aya_ebpf::bindings::__sk_buff,
        offset: u32,
        len: u32,
        done: u32,
        sum: u32,
        failed: u32,
    }

    /// One chunk of `sum_data`, as a `bpf_loop` callback (the verifier checks it once).
    #[inline(never)]
    extern "C" fn sum_step(_index: u64, ctx: *mut core::ffi::c_void) -> i64 {
        // SAFETY: `ctx` is the `SumLoop` on `sum_data`'s stack, alive during the loop.
        let st = unsafe { &mut *ctx.cast::<SumLoop>() };
        if st.done >= st.len {
            return 1;
        }
        let Some(s) = FAST_SCRATCH.get_ptr_mut(0) else {
            st.failed = 1;
            return 1;
        };
        // SAFETY: this CPU's slot, as in `relay`; only `chunk` is touched here.
        let chunk = unsafe { &mut (*s).chunk };
        *chunk = [0; CHUNK / 8];
        let left = st.len - st.done;
        let n = if left > CHUNK as u32 { CHUNK as u32 } else { left };
        // 1 to CHUNK, in a form the verifier follows (left >= 1 here).
        let n = (n.wrapping_sub(1) & (CHUNK as u32 - 1)) + 1;
        // SAFETY: the program's context; `chunk` holds CHUNK >= n bytes.
        let rc = unsafe {
            bpf_skb_load_bytes(st.skb.cast(), st.offset + st.done, chunk.as_mut_ptr().cast(), n)
        };
        if rc != 0 {
            st.failed = 1;
            return 1;
        }
        // SAFETY: `chunk` is CHUNK bytes of map memory (a multiple of 4, at most 512).
        let r = unsafe {
            bpf_csum_diff(core::ptr::null_mut(), 0, chunk.as_mut_ptr().cast(), CHUNK as u32, st.sum)
        };
        if r < 0 {
            st.failed = 1;
            return 1;
        }
        st.sum = r as u32;
        st.done += n;
        0
    }

    /// The one's complement sum (big-endian words) of the `len` bytes of data at `offset`
    /// (an even offset), or None when there are more than `CHUNK * CHUNKS`.
    #[inline(always)]
    fn sum_data(ctx: &TcContext, offset: usize, len: u32) -> Option<u16> {
        if len > CHUNK as u32 * CHUNKS {
            return None;
        }
        let mut st = SumLoop {
            skb: ctx.as_ptr().cast(),
            offset: offset as u32,
            len,
            done: 0,
            sum: 0,
            failed: 0,
        };
        // SAFETY: `st` outlives the loop; the callback takes it as its context.
        unsafe {
            bpf_loop(
                CHUNKS,
                sum_step as *mut core::ffi::c_void,
                (&mut st as *mut SumLoop).cast(),
                0,
            )
        };
        if st.failed != 0 || st.done != len {
            return None;
        }
        // The helper sums little-endian words here: the byte-swapped fold is the sum of
        // big-endian ones (RFC 1071, byte order independence).
        let mut folded = (st.sum & 0xFFFF) + (st.sum >> 16);
        folded = (folded & 0xFFFF) + (folded >> 16);
        Some((folded as u16).swap_bytes())
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
