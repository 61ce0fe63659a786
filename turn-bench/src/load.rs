//! `turn-bench load`: M flows, each its own UDP socket (its own 5-tuple) and allocation,
//! relay timestamped payloads to an embedded peer at a paced or flat-out rate, optionally
//! echoed back through the relay; delivered rate, loss, fairness, round-trip latency and
//! the server's CPU per relayed packet. With `--floor` the same flows go through the bare
//! UDP forwarder instead of a TURN server; with `--direct` they go socket to socket, no
//! relay at all (what the generator alone costs the machine).

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use turn_proto::client::{Client, Credentials, Request};
use turn_proto::{
    channel_data::{self, ChannelData},
    stun::{Class, Message, MessageEncoder, Method, TransactionId, attr},
};

use crate::{
    net::{self, Batch, Dest, Epoll, SockOpts},
    pacing::{self, TokenBucket},
    payload::{self, Stamp, Window, clock_ns},
    peer::{self, PeerCounts, PeerOpts},
    procfs::{self, CpuSample, Proc},
    report::{EchoReport, LatencyUs, LoadReport, PhaseReport, ServerCpu, pct},
    session::{self, DriveOpts, Endpoint},
    stats::{self, Histogram},
};

/// Largest payload (fits one datagram with any framing, below the loopback MTU concerns).
pub const MAX_PAYLOAD: usize = 1400;
/// Allocations last 600 s and permissions 300 s by default; the benchmark does not refresh.
pub const MAX_RUN: Duration = Duration::from_secs(240);

#[derive(Debug, Clone)]
pub struct LoadArgs {
    pub server: Option<SocketAddr>,
    pub floor: Option<SocketAddr>,
    /// Neither: every flow sends straight to the peer (which echoes straight back).
    pub direct: bool,
    pub user: String,
    pub password: String,
    pub realm: Option<String>,
    pub flows: usize,
    /// Per-flow packets/s; `None` is flat out.
    pub rate: Option<f64>,
    /// The first `heavy` flows send at `heavy_rate` instead (their own sender thread): a mix
    /// of a few heavy flows among many light ones.
    pub heavy: usize,
    pub heavy_rate: Option<f64>,
    pub size: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub drain: Duration,
    pub send_indications: bool,
    pub echo: bool,
    pub server_pid: Option<u32>,
    pub peer: SocketAddr,
    pub peer_threads: usize,
    /// One peer socket (port) per flow instead of one peer address for all (what coturn's
    /// `--multiplex-peer` needs); served by `peer_threads` threads.
    pub peer_per_flow: bool,
    pub sender_threads: usize,
    pub batch: usize,
    pub in_flight: usize,
    pub buffer: usize,
}

#[derive(Debug, Clone, Copy)]
enum Framing {
    ChannelData,
    SendIndication(SocketAddr),
    /// Bare payloads to the floor forwarder.
    Raw,
    /// Bare payloads straight to the peer.
    Direct,
}

impl Framing {
    fn name(&self) -> &'static str {
        match self {
            Framing::ChannelData => "channel-data",
            Framing::SendIndication(_) => "send-indication",
            Framing::Raw => "floor",
            Framing::Direct => "direct",
        }
    }
}

fn validate(a: &LoadArgs) -> Result<()> {
    match (a.server, a.floor) {
        (Some(_), _) | (_, Some(_)) if a.direct => {
            bail!("--direct sends to the peer itself: no --server or --floor")
        }
        (None, None) if a.direct => {
            if a.send_indications {
                bail!("--send-indications makes no sense with --direct (no TURN)");
            }
        }
        (Some(s), None) => net::require_loopback("--server", s)?,
        (None, Some(f)) => {
            net::require_loopback("--floor", f)?;
            if a.echo {
                bail!(
                    "--echo is not supported with --floor: a bare forwarder to one fixed destination has no return path"
                );
            }
            if a.send_indications {
                bail!("--send-indications makes no sense with --floor (no TURN)");
            }
            if a.peer.port() == 0 {
                bail!(
                    "--floor needs --peer 127.0.0.1:PORT: the floor forwards to a fixed address (its --to), which must be this peer"
                );
            }
        }
        _ => bail!("give exactly one of --server, --floor or --direct"),
    }
    net::require_loopback("--peer", a.peer)?;
    if a.peer_per_flow && (a.floor.is_some() || a.send_indications) {
        bail!(
            "--peer-per-flow works with ChannelData through a TURN server (--server, no --send-indications) or --direct"
        );
    }
    if a.flows == 0 {
        bail!("--flows must be at least 1");
    }
    if !(payload::HEADER_LEN..=MAX_PAYLOAD).contains(&a.size) {
        bail!(
            "--size must be {} to {MAX_PAYLOAD} bytes (the payload carries a {}-byte header)",
            payload::HEADER_LEN,
            payload::HEADER_LEN
        );
    }
    if let Some(r) = a.rate
        && !(r > 0.0 && r.is_finite())
    {
        bail!("--rate must be a positive number of packets/s per flow");
    }
    if a.heavy > 0 {
        if a.heavy >= a.flows {
            bail!("--heavy must be fewer than --flows (the rest are the light flows)");
        }
        match (a.rate, a.heavy_rate) {
            (Some(_), Some(h)) if h > 0.0 && h.is_finite() => {}
            (None, _) => bail!("--heavy needs paced flows (--rate), not --flat-out"),
            _ => bail!("--heavy needs --heavy-rate, a positive number of packets/s per flow"),
        }
    } else if a.heavy_rate.is_some() {
        bail!("--heavy-rate needs --heavy (how many flows send at it)");
    }
    if a.duration.is_zero() {
        bail!("--duration must be positive");
    }
    if a.warmup + a.duration > MAX_RUN {
        bail!(
            "--warmup + --duration must be at most {} s (permissions are not refreshed)",
            MAX_RUN.as_secs()
        );
    }
    if a.batch == 0 || a.batch > 1024 {
        bail!("--batch must be 1 to 1024");
    }
    Ok(())
}

/// Per-flow sending state, owned by one sender thread.
struct Tx<'a> {
    sock: &'a UdpSocket,
    flow: u32,
    channel: u16,
    seq: u64,
    sent_window: u64,
    failed: u64,
}

/// Write packet `seq` of `tx` into a batch slot; returns its length.
fn frame(
    slot: &mut [u8],
    framing: Framing,
    tx: &Tx<'_>,
    seq: u64,
    sent_ns: u64,
    size: usize,
) -> Result<usize> {
    let stamp = Stamp { flow: tx.flow, seq, sent_ns };
    match framing {
        Framing::ChannelData => {
            let body = slot
                .get_mut(..channel_data::CHANNEL_DATA_HEADER_LEN + size)
                .context("slot too small")?;
            let (head, payload) = body.split_at_mut(channel_data::CHANNEL_DATA_HEADER_LEN);
            let mut h = [0u8; 4];
            channel_data::write_header(&mut h, tx.channel, size as u16);
            head.copy_from_slice(&h);
            stamp.write(payload);
            Ok(channel_data::CHANNEL_DATA_HEADER_LEN + size)
        }
        Framing::Raw | Framing::Direct => {
            stamp.write(slot.get_mut(..size).context("slot too small")?);
            Ok(size)
        }
        Framing::SendIndication(peer) => {
            let mut t = [0u8; 12];
            t[0..4].copy_from_slice(&tx.flow.to_be_bytes());
            t[4..12].copy_from_slice(&seq.to_be_bytes());
            let e = |e| anyhow!("encoding a Send indication: {e}");
            let mut enc =
                MessageEncoder::new(slot, Method::SEND, Class::Indication, &TransactionId(t))
                    .map_err(e)?;
            enc.xor_address(attr::XOR_PEER_ADDRESS, peer).map_err(e)?;
            stamp.write(enc.reserve(attr::DATA, size).map_err(e)?);
            Ok(enc.finish())
        }
    }
}

struct Sender {
    framing: Framing,
    size: usize,
    window: Window,
    batch: Batch,
}

impl Sender {
    /// Send `count` packets on `tx` in batches; false once the window is over.
    fn burst(&mut self, tx: &mut Tx<'_>, mut count: u64) -> Result<bool> {
        while count > 0 {
            let now = clock_ns();
            if now >= self.window.end_ns {
                return Ok(false);
            }
            let k = count.min(self.batch.capacity() as u64) as usize;
            for i in 0..k {
                let len = frame(
                    self.batch.slot_mut(i),
                    self.framing,
                    tx,
                    tx.seq + i as u64,
                    now,
                    self.size,
                )?;
                self.batch.set_len(i, len);
            }
            let sent = self.batch.send(tx.sock.as_raw_fd(), k, Dest::Connected);
            tx.seq += k as u64;
            if self.window.contains(now) {
                tx.sent_window += sent.ok as u64;
            }
            tx.failed += sent.failed as u64;
            count -= k as u64;
        }
        Ok(true)
    }
}

fn sleep_until_ns(t: u64) {
    let now = clock_ns();
    if t > now {
        std::thread::sleep(Duration::from_nanos(t - now));
    }
}

/// One sender thread: its flows from `start_ns` until the window ends.
fn send_loop(
    txs: &mut [Tx<'_>],
    framing: Framing,
    size: usize,
    rate: Option<f64>,
    batch: usize,
    start_ns: u64,
    window: Window,
) -> Result<()> {
    let mut s = Sender { framing, size, window, batch: Batch::new(batch, net::MAX_DATAGRAM) };
    sleep_until_ns(start_ns);
    let n = txs.len();
    if n == 0 {
        return Ok(());
    }
    match rate {
        None => loop {
            for tx in txs.iter_mut() {
                if !s.burst(tx, batch as u64)? {
                    return Ok(());
                }
            }
        },
        Some(per_flow) => {
            let total = per_flow * n as f64;
            let mut bucket = TokenBucket::new(total, pacing::burst_for(total, n), clock_ns());
            let mut cursor = 0;
            loop {
                let now = clock_ns();
                if now >= window.end_ns {
                    return Ok(());
                }
                let tokens = bucket.take(now);
                if tokens == 0 {
                    let wait = bucket.wait_ns().min(window.end_ns - now).clamp(20_000, 2_000_000);
                    std::thread::sleep(Duration::from_nanos(wait));
                    continue;
                }
                let (each, extra) = pacing::split(tokens, n);
                if each > 0 {
                    for tx in txs.iter_mut() {
                        if !s.burst(tx, each)? {
                            return Ok(());
                        }
                    }
                }
                for k in 0..extra {
                    if !s.burst(&mut txs[(cursor + k) % n], 1)? {
                        return Ok(());
                    }
                }
                cursor = (cursor + extra) % n;
            }
        }
    }
}

/// The benchmark payload inside what a client receives from the server (or, direct, from
/// the peer itself).
fn echo_payload(d: &[u8], framing: Framing) -> Option<&[u8]> {
    if matches!(framing, Framing::Direct) {
        return Some(d);
    }
    if d.first()? & 0xC0 == 0x40 {
        return ChannelData::parse(d).ok().map(|c| c.payload);
    }
    let m = Message::parse(d).ok()?;
    if m.method() == Method::DATA && m.class() == Class::Indication {
        m.get(attr::DATA)
    } else {
        None
    }
}

#[derive(Default)]
struct EchoCounts {
    per_flow_window: Vec<u64>,
    stray: u64,
    rtt: Histogram,
}

/// Receive the echoes on the sockets of flows `first..first + socks.len()`.
fn echo_loop(
    socks: &[Endpoint],
    first: usize,
    flows: usize,
    window: Window,
    stop_ns: u64,
    batch: usize,
    framing: Framing,
) -> Result<EchoCounts> {
    let mut c = EchoCounts { per_flow_window: vec![0; flows], ..EchoCounts::default() };
    let mut ep = Epoll::new(256)?;
    for (k, s) in socks.iter().enumerate() {
        ep.add(s.sock.as_raw_fd(), (first + k) as u64)?;
    }
    let mut b = Batch::new(batch, net::MAX_DATAGRAM);
    let mut ready = Vec::new();
    while clock_ns() < stop_ns {
        ep.wait(Duration::from_millis(20), &mut ready).context("epoll_wait")?;
        for &tok in &ready {
            let flow = tok as usize;
            let Some(sock) = socks.get(flow - first).map(|e| &e.sock) else { continue };
            // Drain what is queued, a bounded number of batches per wake-up.
            for _ in 0..16 {
                let n = b.recv(sock.as_raw_fd(), libc::MSG_DONTWAIT).context("client recvmmsg")?;
                let now = clock_ns();
                for i in 0..n {
                    match echo_payload(b.get(i), framing).and_then(Stamp::read) {
                        Some(s) if s.flow as usize == flow => {
                            if window.contains(s.sent_ns) {
                                c.per_flow_window[flow] += 1;
                                c.rtt.record(now.saturating_sub(s.sent_ns));
                            }
                        }
                        _ => c.stray += 1,
                    }
                }
                if n < b.capacity() {
                    break;
                }
            }
        }
    }
    Ok(c)
}

/// Chunk boundaries: `n` items over `parts` threads.
fn chunk_len(n: usize, parts: usize) -> usize {
    n.div_ceil(parts.max(1)).max(1)
}

pub fn run(a: LoadArgs) -> Result<LoadReport> {
    validate(&a)?;
    let turn = a.server.is_some();
    net::raise_nofile(a.flows as u64 + 64)?;
    if let Some(pid) = a.server_pid {
        procfs::check_pid(pid)?;
    }
    let tck = procfs::clock_ticks_per_sec()?;

    // The embedded peer: one address for every flow, or one per flow.
    let peer_socks = if a.peer_per_flow {
        peer::bind_per_flow(a.flows, a.buffer)?
    } else {
        peer::bind(a.peer, a.peer_threads.max(1), a.buffer)?
    };
    let peer_addr = peer_socks[0].local_addr()?;
    let peer_addrs: Vec<SocketAddr> = if a.peer_per_flow {
        peer_socks.iter().map(UdpSocket::local_addr).collect::<std::io::Result<_>>()?
    } else {
        vec![peer_addr]
    };
    let peer_of = |i: usize| peer_addrs[i % peer_addrs.len()];
    // Where the flows send: the server, the floor, or (direct) the peer.
    let target = a.server.or(a.floor).unwrap_or(peer_addr);

    // One socket per flow, connected to the server (or the floor).
    let creds = Arc::new(Credentials::new(&a.user, &a.password, a.realm.as_deref())?);
    let opts = SockOpts {
        reuse_port: false,
        buffer: Some(a.buffer.min(1 << 20)),
        timeout: Duration::from_millis(100),
    };
    let mut eps = Vec::with_capacity(a.flows);
    for i in 0..a.flows {
        let to = if a.direct { peer_of(i) } else { target };
        let sock = net::udp_socket(net::any_port_like(to), Some(to), opts)
            .with_context(|| format!("socket of flow {i}"))?;
        eps.push(Endpoint { sock, client: Client::new(i as u32, rand::random(), creds.clone()) });
    }
    let channel_of = |i: usize| channel_data::MIN_CHANNEL + (i % 0x4000) as u16;
    let framing = match (turn, a.send_indications) {
        (false, _) if a.direct => Framing::Direct,
        (false, _) => Framing::Raw,
        (true, false) => Framing::ChannelData,
        (true, true) => Framing::SendIndication(peer_addr),
    };

    // Setup: Allocate, CreatePermission, ChannelBind (not with Send indications).
    let setup = if turn {
        let with_channel = !a.send_indications;
        let plan = |i: usize| {
            let mut p = vec![Request::Allocate, Request::CreatePermission(peer_of(i))];
            if with_channel {
                p.push(Request::ChannelBind { channel: channel_of(i), peer: peer_of(i) });
            }
            p
        };
        let all: Vec<usize> = (0..a.flows).collect();
        let dopts = DriveOpts {
            in_flight: a.in_flight,
            fail_fast: true,
            time_limit: Duration::from_secs(30) + Duration::from_millis(20) * a.flows as u32,
            sock_opts: opts,
        };
        let st = session::drive(&mut eps, &all, &plan, dopts, &mut |_, _, _| {})
            .with_context(|| format!("TURN setup against {target}"))?;
        Some(PhaseReport::of(&st, a.flows))
    } else {
        None
    };

    // Timeline on the benchmark clock.
    let start_ns = clock_ns() + 20_000_000;
    let window = Window {
        start_ns: start_ns + a.warmup.as_nanos() as u64,
        end_ns: start_ns + (a.warmup + a.duration).as_nanos() as u64,
    };
    let stop_ns = window.end_ns + a.drain.as_nanos() as u64;
    let popts =
        PeerOpts { echo: a.echo, flows: a.flows, window, stop_ns, batch: 64, by_source: false };

    let socks: &[Endpoint] = &eps;
    let mut txs: Vec<Tx<'_>> = socks
        .iter()
        .enumerate()
        .map(|(i, ep)| Tx {
            sock: &ep.sock,
            flow: i as u32,
            channel: channel_of(i),
            seq: 0,
            sent_window: 0,
            failed: 0,
        })
        .collect();
    let senders = a.sender_threads.clamp(1, a.flows);
    let chunk = chunk_len(a.flows, senders);
    let light_chunk = chunk_len(a.flows - a.heavy, senders.min(a.flows - a.heavy));

    let (peer_counts, echo_counts, samples) = std::thread::scope(|s| -> Result<_> {
        let peers: Vec<_> = if a.peer_per_flow {
            let per = chunk_len(peer_socks.len(), a.peer_threads.max(1));
            peer_socks
                .chunks(per)
                .map(|part| s.spawn(move || peer::serve_many(part, &popts)))
                .collect()
        } else {
            peer_socks.iter().map(|sock| s.spawn(move || peer::serve(sock, &popts))).collect()
        };
        let echoes: Vec<_> = if a.echo {
            socks
                .chunks(chunk)
                .enumerate()
                .map(|(k, part)| {
                    s.spawn(move || {
                        echo_loop(part, k * chunk, a.flows, window, stop_ns, 64, framing)
                    })
                })
                .collect()
        } else {
            Vec::new()
        };
        // The heavy flows (if any) on a sender thread of their own, at their own rate.
        let (heavy, light) = txs.split_at_mut(a.heavy);
        let groups = heavy
            .chunks_mut(a.heavy.max(1))
            .map(|part| (part, a.heavy_rate))
            .chain(light.chunks_mut(light_chunk).map(|part| (part, a.rate)));
        let sends: Vec<_> = groups
            .map(|(part, rate)| {
                s.spawn(move || send_loop(part, framing, a.size, rate, a.batch, start_ns, window))
            })
            .collect();

        // CPU samples at the window edges.
        sleep_until_ns(window.start_ns);
        let server_a = a.server_pid.map(|p| CpuSample::take(Proc::Pid(p))).transpose();
        let self_a = CpuSample::take(Proc::SelfProc);
        let machine_a = procfs::machine_cpu_ns();
        sleep_until_ns(window.end_ns);
        let server_b = a.server_pid.map(|p| CpuSample::take(Proc::Pid(p))).transpose();
        let self_b = CpuSample::take(Proc::SelfProc);
        let machine_b = procfs::machine_cpu_ns();

        for h in sends {
            h.join().map_err(|_| anyhow!("sender thread panicked"))??;
        }
        let mut pc = PeerCounts::default();
        for h in peers {
            pc.merge(h.join().map_err(|_| anyhow!("peer thread panicked"))??);
        }
        let mut ec = EchoCounts { per_flow_window: vec![0; a.flows], ..EchoCounts::default() };
        for h in echoes {
            let c = h.join().map_err(|_| anyhow!("echo receiver panicked"))??;
            for (x, y) in ec.per_flow_window.iter_mut().zip(&c.per_flow_window) {
                *x += y;
            }
            ec.stray += c.stray;
            ec.rtt.merge(&c.rtt);
        }
        let server = match (server_a?, server_b?) {
            (Some(x), Some(y)) => Some(procfs::cpu_delta(&x, &y, tck)),
            _ => None,
        };
        let (self_a, self_b) = (self_a?, self_b?);
        let own = procfs::cpu_delta(&self_a, &self_b, tck);
        Ok((pc, ec, (server, own, (machine_a, machine_b))))
    })?;
    let sent: u64 = txs.iter().map(|t| t.sent_window).sum();
    let send_failed: u64 = txs.iter().map(|t| t.failed).sum();
    drop(txs);

    // Cleanup: delete the allocations (best effort).
    let (cleanup, cleanup_first_error) = if turn {
        let all: Vec<usize> = (0..a.flows).collect();
        let dopts = DriveOpts {
            in_flight: a.in_flight,
            fail_fast: false,
            time_limit: Duration::from_secs(30),
            sock_opts: opts,
        };
        match session::drive(
            &mut eps,
            &all,
            &|_| vec![Request::Refresh { lifetime: 0 }],
            dopts,
            &mut |_, _, _| {},
        ) {
            Ok(st) => {
                let first = st.failed.first().map(|(_, e)| e.clone());
                (Some(PhaseReport::of(&st, a.flows)), first)
            }
            Err(e) => (None, Some(format!("{e:#}"))),
        }
    } else {
        (None, None)
    };

    let window_s = a.duration.as_secs_f64();
    let delivered: u64 = peer_counts.per_flow_window.iter().sum();
    let echoed: u64 = echo_counts.per_flow_window.iter().sum();
    let (server_delta, own, (machine_a, machine_b)) = samples;
    let relayed = delivered + if a.echo { echoed } else { 0 };
    Ok(LoadReport {
        mode: framing.name(),
        target,
        peer: peer_addr,
        flows: a.flows,
        payload_bytes: a.size,
        rate_per_flow: a.rate,
        heavy_flows: a.heavy,
        heavy_rate_per_flow: a.heavy_rate,
        target_pps: a
            .rate
            .map(|r| r * (a.flows - a.heavy) as f64 + a.heavy_rate.unwrap_or(0.0) * a.heavy as f64),
        echo: a.echo,
        sender_threads: senders + usize::from(a.heavy > 0),
        peer_threads: peer_socks.len(),
        warmup_s: a.warmup.as_secs_f64(),
        window_s,
        setup,
        sent,
        send_failed,
        offered_pps: sent as f64 / window_s,
        delivered,
        delivered_pps: delivered as f64 / window_s,
        loss_pct: pct(sent.saturating_sub(delivered), sent),
        fairness: stats::fairness(&peer_counts.per_flow_window),
        echo_path: a.echo.then(|| EchoReport {
            received: echoed,
            received_pps: echoed as f64 / window_s,
            return_loss_pct: pct(delivered.saturating_sub(echoed), delivered),
            round_trip_loss_pct: pct(sent.saturating_sub(echoed), sent),
            rtt_us: echo_counts.rtt.summary().map(LatencyUs::from),
            stray: echo_counts.stray,
            peer_echo_failed: peer_counts.echo_failed,
        }),
        server_cpu: a.server_pid.zip(server_delta).map(|(pid, delta)| ServerCpu {
            pid,
            delta,
            relayed_packets: relayed,
            cpu_us_per_packet: (relayed > 0).then(|| delta.cpu_us as f64 / relayed as f64),
        }),
        generator_cpu: own,
        machine_cpu: procfs::MachineCpu::of(machine_a, machine_b, own.wall_us, relayed),
        peer_foreign: peer_counts.foreign,
        cleanup,
        cleanup_first_error,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn tx(sock: &UdpSocket) -> Tx<'_> {
        Tx { sock, flow: 5, channel: 0x4005, seq: 0, sent_window: 0, failed: 0 }
    }

    #[test]
    fn framings_carry_the_stamp() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let t = tx(&sock);
        let mut slot = vec![0u8; net::MAX_DATAGRAM];
        let want = Stamp { flow: 5, seq: 9, sent_ns: 1234 };

        let n = frame(&mut slot, Framing::ChannelData, &t, 9, 1234, 100).unwrap();
        assert_eq!(n, 104);
        let cd = ChannelData::parse(&slot[..n]).unwrap();
        assert_eq!(cd.channel, 0x4005);
        assert_eq!(Stamp::read(cd.payload), Some(want));
        assert_eq!(echo_payload(&slot[..n], Framing::ChannelData).map(<[u8]>::len), Some(100));

        let n = frame(&mut slot, Framing::Raw, &t, 9, 1234, 64).unwrap();
        assert_eq!(n, 64);
        assert_eq!(Stamp::read(&slot[..n]), Some(want));
        // Direct, the peer's echo is the bare payload.
        assert_eq!(echo_payload(&slot[..n], Framing::Direct).and_then(Stamp::read), Some(want));

        let peer: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let n = frame(&mut slot, Framing::SendIndication(peer), &t, 9, 1234, 50).unwrap();
        let m = Message::parse(&slot[..n]).unwrap();
        assert_eq!((m.method(), m.class()), (Method::SEND, Class::Indication));
        let tid = m.transaction_id();
        assert_eq!(
            attr::decode_xor_address(m.get(attr::XOR_PEER_ADDRESS).unwrap(), &tid).unwrap(),
            peer
        );
        assert_eq!(Stamp::read(m.get(attr::DATA).unwrap()), Some(want));
        // A Send indication is not something a client receives: no echo payload.
        assert_eq!(echo_payload(&slot[..n], Framing::ChannelData), None);
    }

    #[test]
    fn data_indication_payload() {
        let mut buf = vec![0u8; 256];
        let mut enc =
            MessageEncoder::new(&mut buf, Method::DATA, Class::Indication, &TransactionId([1; 12]))
                .unwrap();
        enc.xor_address(attr::XOR_PEER_ADDRESS, "127.0.0.1:9".parse().unwrap()).unwrap();
        enc.raw(attr::DATA, b"hello").unwrap();
        let n = enc.finish();
        assert_eq!(echo_payload(&buf[..n], Framing::ChannelData), Some(&b"hello"[..]));
        assert_eq!(echo_payload(&[], Framing::ChannelData), None);
        assert_eq!(echo_payload(&[0xFF, 0, 0, 0], Framing::ChannelData), None);
    }

    #[test]
    fn chunks() {
        assert_eq!(chunk_len(10, 2), 5);
        assert_eq!(chunk_len(11, 2), 6);
        assert_eq!(chunk_len(1, 2), 1);
        assert_eq!(chunk_len(0, 2), 1);
    }

    fn args() -> LoadArgs {
        LoadArgs {
            server: Some("127.0.0.1:3478".parse().unwrap()),
            floor: None,
            direct: false,
            user: "u".into(),
            password: "p".into(),
            realm: None,
            flows: 4,
            rate: Some(100.0),
            heavy: 0,
            heavy_rate: None,
            size: 160,
            duration: Duration::from_secs(2),
            warmup: Duration::from_secs(1),
            drain: Duration::from_millis(500),
            send_indications: false,
            peer_per_flow: false,
            echo: false,
            server_pid: None,
            peer: "127.0.0.1:0".parse().unwrap(),
            peer_threads: 1,
            sender_threads: 1,
            batch: 32,
            in_flight: 64,
            buffer: 1 << 20,
        }
    }

    #[test]
    fn validation() {
        assert!(validate(&args()).is_ok());
        let mut a = args();
        a.server = Some("192.0.2.1:3478".parse().unwrap());
        assert!(validate(&a).is_err(), "not loopback");
        let mut a = args();
        a.size = 10;
        assert!(validate(&a).is_err());
        let mut a = args();
        a.server = None;
        a.floor = Some("127.0.0.1:5000".parse().unwrap());
        assert!(validate(&a).unwrap_err().to_string().contains("--peer"));
        a.peer = "127.0.0.1:5001".parse().unwrap();
        assert!(validate(&a).is_ok());
        a.echo = true;
        assert!(validate(&a).is_err());
        // Direct: to the peer itself, nothing else.
        let mut a = args();
        a.direct = true;
        assert!(validate(&a).unwrap_err().to_string().contains("no --server"));
        a.server = None;
        a.echo = true;
        assert!(validate(&a).is_ok());
        let mut a = args();
        a.duration = Duration::from_secs(300);
        assert!(validate(&a).is_err());
        let mut a = args();
        a.rate = Some(0.0);
        assert!(validate(&a).is_err());
        // A mix: heavy flows need their rate, paced light flows, and at least one light flow.
        let mut a = args();
        a.heavy = 1;
        assert!(validate(&a).unwrap_err().to_string().contains("--heavy-rate"));
        a.heavy_rate = Some(1000.0);
        assert!(validate(&a).is_ok());
        a.heavy = 4;
        assert!(validate(&a).unwrap_err().to_string().contains("fewer than --flows"));
        a.heavy = 1;
        a.rate = None;
        assert!(validate(&a).unwrap_err().to_string().contains("--flat-out"));
        let mut a = args();
        a.heavy_rate = Some(1000.0);
        assert!(validate(&a).unwrap_err().to_string().contains("needs --heavy"));
    }
}
