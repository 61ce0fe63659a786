//! `turn-bench media`: calls as WebRTC makes them through a TURN relay. Every call is two
//! clients, each with its own socket and allocation; each client gives the other's relayed
//! address a permission and a channel, and both send an audio stream (50 packets/s of 160
//! bytes by default) and a video stream (a configurable rate of 1,200-byte packets) to
//! the other, so every packet crosses the server twice: client -> its relay -> the other
//! relay -> the other client. Reports loss per call (how many calls lost nothing), the
//! server's CPU per forwarded packet and the one-way latency. With `--direct` the same
//! calls exchange the same packets socket to socket, without a relay: the baseline for
//! the relay's added latency, and the generator's own ceiling.

use std::{io, net::SocketAddr, os::fd::AsRawFd, sync::Arc, time::Duration};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use turn_proto::{
    channel_data::{self, ChannelData},
    client::{Client, Credentials, Request},
};

use crate::{
    load::MAX_RUN,
    net::{self, Batch, Epoll, SockOpts},
    pacing::{self, TokenBucket},
    payload::{self, Stamp, Window, clock_ns},
    procfs::{self, CpuDelta, CpuSample, Proc},
    report::{LatencyUs, PhaseReport, ServerCpu, pct},
    session::{self, DriveOpts, Endpoint},
    stats::Histogram,
};

/// The channel every client binds to the other end of its call (channels are per
/// allocation, so one number serves all).
const CHANNEL: u16 = channel_data::MIN_CHANNEL;
/// Largest media payload.
pub const MAX_SIZE: usize = 1400;

#[derive(Debug, Clone)]
pub struct MediaArgs {
    /// The TURN server; `None` is the direct exchange (no relay).
    pub server: Option<SocketAddr>,
    pub user: String,
    pub password: String,
    pub realm: Option<String>,
    pub calls: usize,
    pub audio_pps: f64,
    pub audio_size: usize,
    pub video_pps: f64,
    pub video_size: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub drain: Duration,
    pub server_pid: Option<u32>,
    /// Generator threads; each owns whole calls (both ends).
    pub threads: usize,
    pub in_flight: usize,
}

/// The two streams of every client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Audio = 0,
    Video = 1,
}

/// Stream id in the payload header: client index x 2 + kind.
fn stream_id(client: usize, kind: Kind) -> u32 {
    (client * 2 + kind as usize) as u32
}

/// The other end of `client`'s call.
fn partner(client: usize) -> usize {
    client ^ 1
}

fn validate(a: &MediaArgs) -> Result<()> {
    if let Some(s) = a.server {
        net::require_loopback("--server", s)?;
    }
    if a.calls == 0 {
        bail!("--calls must be at least 1");
    }
    for (what, size) in [("--audio-size", a.audio_size), ("--video-size", a.video_size)] {
        if !(payload::HEADER_LEN..=MAX_SIZE).contains(&size) {
            bail!("{what} must be {} to {MAX_SIZE} bytes", payload::HEADER_LEN);
        }
    }
    for (what, pps) in [("--audio-pps", a.audio_pps), ("--video-pps", a.video_pps)] {
        if !(pps >= 0.0 && pps.is_finite()) {
            bail!("{what} must be a number of packets/s, 0 or more");
        }
    }
    if a.audio_pps + a.video_pps <= 0.0 {
        bail!("--audio-pps and --video-pps cannot both be 0");
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
    Ok(())
}

/// What one generator thread counted for its calls.
#[derive(Default)]
struct Counts {
    /// Per stream of the thread's clients (local index x 2 + kind): sent in the window.
    sent: Vec<u64>,
    /// Per stream, by the sender's local index: received in the window.
    received: Vec<u64>,
    send_failed: u64,
    stray: u64,
    latency: [Histogram; 2],
}

/// One thread's clients (whole calls) and how they send.
struct Part<'a> {
    socks: &'a [Endpoint],
    /// Global index of `socks[0]`.
    first: usize,
    relay: bool,
}

impl Part<'_> {
    /// Send one packet of `kind` from local client `i`.
    fn send(&self, c: &mut Counts, buf: &mut [u8], i: usize, kind: Kind, seq: u64, window: Window) {
        let now = clock_ns();
        let stamp = Stamp { flow: stream_id(self.first + i, kind), seq, sent_ns: now };
        let at = if self.relay { channel_data::CHANNEL_DATA_HEADER_LEN } else { 0 };
        stamp.write(&mut buf[at..]);
        match self.socks[i].sock.send(buf) {
            Ok(_) => {
                if window.contains(now) {
                    c.sent[i * 2 + kind as usize] += 1;
                }
            }
            Err(_) => c.send_failed += 1,
        }
    }

    /// Account one received datagram at local client `i`.
    fn receive(&self, c: &mut Counts, i: usize, d: &[u8], now: u64, window: Window) {
        let payload =
            if self.relay { ChannelData::parse(d).ok().map(|cd| cd.payload) } else { Some(d) };
        let Some(s) = payload.and_then(Stamp::read) else {
            c.stray += 1;
            return;
        };
        let from = s.flow as usize / 2;
        if from != partner(self.first + i) {
            c.stray += 1;
            return;
        }
        if window.contains(s.sent_ns) {
            let kind = s.flow as usize % 2;
            c.received[(from - self.first) * 2 + kind] += 1;
            c.latency[kind].record(now.saturating_sub(s.sent_ns));
        }
    }
}

/// A datagram of `size` payload bytes (channel header first when relayed).
fn template(relay: bool, size: usize) -> Vec<u8> {
    if relay {
        let mut b = vec![0x5a; channel_data::CHANNEL_DATA_HEADER_LEN + size];
        let mut h = [0u8; 4];
        channel_data::write_header(&mut h, CHANNEL, size as u16);
        b[..4].copy_from_slice(&h);
        b
    } else {
        vec![0x5a; size]
    }
}

/// One generator thread: paces both streams of its clients from `start_ns` to the end of
/// the window, and receives until `stop_ns`.
fn call_loop(
    part: &Part<'_>,
    a: &MediaArgs,
    start_ns: u64,
    window: Window,
    stop_ns: u64,
) -> Result<Counts> {
    let n = part.socks.len();
    let mut c = Counts { sent: vec![0; n * 2], received: vec![0; n * 2], ..Counts::default() };
    let mut ep = Epoll::new(256)?;
    for (i, e) in part.socks.iter().enumerate() {
        e.sock.set_nonblocking(true).context("set_nonblocking")?;
        ep.add(e.sock.as_raw_fd(), i as u64)?;
    }
    let mut bufs = [template(part.relay, a.audio_size), template(part.relay, a.video_size)];
    let rates = [a.audio_pps * n as f64, a.video_pps * n as f64];
    let mut buckets = rates.map(|r| TokenBucket::new(r, pacing::burst_for(r, n), start_ns));
    let mut cursors = [0usize; 2];
    let mut seqs = vec![[0u64; 2]; n];
    let mut batch = Batch::new(32, net::MAX_DATAGRAM);
    let mut ready = Vec::new();
    while clock_ns() < start_ns {
        std::thread::sleep(Duration::from_micros(200));
    }
    loop {
        let now = clock_ns();
        if now >= stop_ns {
            break;
        }
        let sending = now < window.end_ns;
        let mut next_token_ns = u64::MAX;
        if sending {
            for kind in [Kind::Audio, Kind::Video] {
                let k = kind as usize;
                if rates[k] <= 0.0 {
                    continue;
                }
                let tokens = buckets[k].take(now);
                for t in 0..tokens {
                    let i = (cursors[k] + t as usize) % n;
                    part.send(&mut c, &mut bufs[k], i, kind, seqs[i][k], window);
                    seqs[i][k] += 1;
                }
                cursors[k] = (cursors[k] + tokens as usize) % n;
                next_token_ns = next_token_ns.min(buckets[k].wait_ns());
            }
        }
        // Sleep in epoll until the next token, at least 200 us (the buckets carry what
        // accrues meanwhile, so a busy generator sends in small bursts instead of
        // spinning), at most 1 ms.
        let wait = Duration::from_nanos(next_token_ns.clamp(200_000, 1_000_000));
        ep.wait(wait, &mut ready).context("epoll_wait")?;
        let now = clock_ns();
        for &tok in &ready {
            let i = tok as usize;
            let Some(e) = part.socks.get(i) else { continue };
            for _ in 0..8 {
                let got = batch
                    .recv(e.sock.as_raw_fd(), libc::MSG_DONTWAIT)
                    .context("client recvmmsg")?;
                for k in 0..got {
                    part.receive(&mut c, i, batch.get(k), now, window);
                }
                if got < batch.capacity() {
                    break;
                }
            }
        }
    }
    Ok(c)
}

/// Per-kind latency in the report.
#[derive(Debug, Clone, Serialize)]
pub struct MediaLatency {
    pub audio: Option<LatencyUs>,
    pub video: Option<LatencyUs>,
    pub all: Option<LatencyUs>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MediaReport {
    /// "relay" or "direct".
    pub mode: &'static str,
    pub server: Option<SocketAddr>,
    pub calls: usize,
    pub audio_pps: f64,
    pub audio_size: usize,
    pub video_pps: f64,
    pub video_size: usize,
    pub threads: usize,
    pub warmup_s: f64,
    pub window_s: f64,
    pub setup: Option<PhaseReport>,
    /// Media packets sent in the window, all clients.
    pub sent: u64,
    pub send_failed: u64,
    /// Of those, received by the other end of the call.
    pub delivered: u64,
    pub lost: u64,
    pub loss_pct: f64,
    /// Calls whose four streams lost nothing.
    pub calls_lossless: usize,
    /// Packets/s the server forwarded in the window: each delivered packet twice (client
    /// -> other relay, relay -> other client).
    pub forwarded_pps: f64,
    /// One-way latency, sender to the other end of the call.
    pub latency_us: MediaLatency,
    pub server_cpu: Option<ServerCpu>,
    pub generator_cpu: CpuDelta,
    /// Every task of the machine over the window (the root cgroup's CPU time), per
    /// datagram delivered end to end (a relay forwards each twice; the direct exchange
    /// measures what the generator alone costs per datagram).
    pub machine_cpu: Option<procfs::MachineCpu>,
    /// Datagrams at a client that were not its partner's media.
    pub stray: u64,
    pub cleanup: Option<PhaseReport>,
}

pub fn run(a: MediaArgs) -> Result<MediaReport> {
    validate(&a)?;
    let clients = a.calls * 2;
    net::raise_nofile(clients as u64 + 64)?;
    if let Some(pid) = a.server_pid {
        procfs::check_pid(pid)?;
    }
    let tck = procfs::clock_ticks_per_sec()?;
    let local =
        net::any_port_like(a.server.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))));
    let opts =
        SockOpts { reuse_port: false, buffer: Some(1 << 20), timeout: Duration::from_millis(100) };
    let creds = Arc::new(Credentials::new(&a.user, &a.password, a.realm.as_deref())?);
    let mut eps = Vec::with_capacity(clients);
    for i in 0..clients {
        let sock = net::udp_socket(local, a.server, opts)
            .with_context(|| format!("socket of client {i}"))?;
        eps.push(Endpoint { sock, client: Client::new(i as u32, rand::random(), creds.clone()) });
    }
    let all: Vec<usize> = (0..clients).collect();
    let dopts = |fail_fast| DriveOpts {
        in_flight: a.in_flight,
        fail_fast,
        time_limit: Duration::from_secs(30) + Duration::from_millis(20) * clients as u32,
        sock_opts: opts,
    };
    let setup = if a.server.is_some() {
        // Allocate everywhere, then each end permits and binds the other's relay.
        let mut relayed = vec![None; clients];
        let st1 = session::drive(
            &mut eps,
            &all,
            &|_| vec![Request::Allocate],
            dopts(true),
            &mut |i, _, r| {
                relayed[i] = r.relayed;
            },
        )
        .context("Allocate")?;
        let relayed: Vec<SocketAddr> = relayed
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                r.ok_or_else(|| {
                    anyhow!("client {i}: no XOR-RELAYED-ADDRESS in the Allocate response")
                })
            })
            .collect::<Result<_>>()?;
        let plan = |i: usize| {
            let other = relayed[partner(i)];
            vec![
                Request::CreatePermission(other),
                Request::ChannelBind { channel: CHANNEL, peer: other },
            ]
        };
        let st2 = session::drive(&mut eps, &all, &plan, dopts(true), &mut |_, _, _| {})
            .context("CreatePermission and ChannelBind to the other end's relay")?;
        let (p1, p2) = (PhaseReport::of(&st1, clients), PhaseReport::of(&st2, clients));
        Some(PhaseReport {
            flows: clients,
            failed: p1.failed + p2.failed,
            wall_ms: p1.wall_ms + p2.wall_ms,
            requests: p1.requests + p2.requests,
            retransmits: p1.retransmits + p2.retransmits,
            auth_rounds: p1.auth_rounds + p2.auth_rounds,
            rebinds: p1.rebinds + p2.rebinds,
        })
    } else {
        // Direct: each end's socket talks to the other's.
        let addrs: Vec<SocketAddr> = eps
            .iter()
            .map(|e| e.sock.local_addr())
            .collect::<io::Result<_>>()
            .context("local_addr")?;
        for (i, e) in eps.iter().enumerate() {
            e.sock.connect(addrs[partner(i)]).context("connect to the other end")?;
        }
        None
    };

    let start_ns = clock_ns() + 20_000_000;
    let window = Window {
        start_ns: start_ns + a.warmup.as_nanos() as u64,
        end_ns: start_ns + (a.warmup + a.duration).as_nanos() as u64,
    };
    let stop_ns = window.end_ns + a.drain.as_nanos() as u64;
    let threads = a.threads.clamp(1, a.calls);
    let per = a.calls.div_ceil(threads) * 2;
    let relay = a.server.is_some();
    let (counts, samples) = std::thread::scope(|s| -> Result<_> {
        let handles: Vec<_> = eps
            .chunks(per)
            .enumerate()
            .map(|(k, socks)| {
                let part = Part { socks, first: k * per, relay };
                let a = &a;
                s.spawn(move || call_loop(&part, a, start_ns, window, stop_ns))
            })
            .collect();
        while clock_ns() < window.start_ns {
            std::thread::sleep(Duration::from_millis(1));
        }
        let server_a = a.server_pid.map(|p| CpuSample::take(Proc::Pid(p))).transpose();
        let self_a = CpuSample::take(Proc::SelfProc);
        let machine_a = procfs::machine_cpu_ns();
        while clock_ns() < window.end_ns {
            std::thread::sleep(Duration::from_millis(1));
        }
        let server_b = a.server_pid.map(|p| CpuSample::take(Proc::Pid(p))).transpose();
        let self_b = CpuSample::take(Proc::SelfProc);
        let machine_b = procfs::machine_cpu_ns();
        let mut counts = Vec::new();
        for h in handles {
            counts.push(h.join().map_err(|_| anyhow!("generator thread panicked"))??);
        }
        let server = match (server_a?, server_b?) {
            (Some(x), Some(y)) => Some(procfs::cpu_delta(&x, &y, tck)),
            _ => None,
        };
        Ok((counts, (server, procfs::cpu_delta(&self_a?, &self_b?, tck), (machine_a, machine_b))))
    })?;

    let cleanup = if relay {
        for e in &eps {
            let _ = e.sock.set_nonblocking(false);
        }
        session::drive(
            &mut eps,
            &all,
            &|_| vec![Request::Refresh { lifetime: 0 }],
            dopts(false),
            &mut |_, _, _| {},
        )
        .ok()
        .map(|st| PhaseReport::of(&st, clients))
    } else {
        None
    };

    let (mut sent, mut delivered, mut send_failed, mut stray, mut calls_lossless) = (0, 0, 0, 0, 0);
    let mut latency = [Histogram::new(), Histogram::new()];
    for c in &counts {
        sent += c.sent.iter().sum::<u64>();
        delivered += c.received.iter().sum::<u64>();
        send_failed += c.send_failed;
        stray += c.stray;
        for (h, x) in latency.iter_mut().zip(&c.latency) {
            h.merge(x);
        }
        // A call is four streams: both kinds of both ends.
        calls_lossless +=
            c.sent.chunks(4).zip(c.received.chunks(4)).filter(|(s, r)| s == r).count();
    }
    let mut both = latency[0].clone();
    both.merge(&latency[1]);
    let window_s = a.duration.as_secs_f64();
    let forwarded = if relay { delivered * 2 } else { 0 };
    let (server_delta, generator_cpu, (machine_a, machine_b)) = samples;
    Ok(MediaReport {
        mode: if relay { "relay" } else { "direct" },
        server: a.server,
        calls: a.calls,
        audio_pps: a.audio_pps,
        audio_size: a.audio_size,
        video_pps: a.video_pps,
        video_size: a.video_size,
        threads,
        warmup_s: a.warmup.as_secs_f64(),
        window_s,
        setup,
        sent,
        send_failed,
        delivered,
        lost: sent.saturating_sub(delivered),
        loss_pct: pct(sent.saturating_sub(delivered), sent),
        calls_lossless,
        forwarded_pps: forwarded as f64 / window_s,
        latency_us: MediaLatency {
            audio: latency[0].summary().map(LatencyUs::from),
            video: latency[1].summary().map(LatencyUs::from),
            all: both.summary().map(LatencyUs::from),
        },
        server_cpu: a.server_pid.zip(server_delta).map(|(pid, delta)| ServerCpu {
            pid,
            delta,
            relayed_packets: forwarded,
            cpu_us_per_packet: (forwarded > 0).then(|| delta.cpu_us as f64 / forwarded as f64),
        }),
        generator_cpu,
        machine_cpu: procfs::MachineCpu::of(machine_a, machine_b, generator_cpu.wall_us, delivered),
        stray,
        cleanup,
    })
}

impl MediaReport {
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let via = self.server.map_or("directly, no relay".into(), |a| format!("through {a}"));
        let _ = writeln!(
            s,
            "turn-bench media: {} calls {via}; each end sends audio {} pps x {} B and video {} pps x {} B",
            self.calls, self.audio_pps, self.audio_size, self.video_pps, self.video_size
        );
        if let Some(p) = &self.setup {
            let _ = writeln!(s, "  setup      {}", crate::report::phase(p));
        }
        let _ = writeln!(
            s,
            "  window     {:.2} s after {:.2} s warmup ({} threads)",
            self.window_s, self.warmup_s, self.threads
        );
        let _ = writeln!(
            s,
            "  media      {} sent ({} send errors), {} delivered, loss {:.3}%; {} of {} calls lost nothing",
            self.sent,
            self.send_failed,
            self.delivered,
            self.loss_pct,
            self.calls_lossless,
            self.calls
        );
        for (name, l) in [
            ("audio", &self.latency_us.audio),
            ("video", &self.latency_us.video),
            ("all", &self.latency_us.all),
        ] {
            if let Some(r) = l {
                let _ = writeln!(
                    s,
                    "  one-way {name:5} (us) p50 {:.1}  p99 {:.1}  max {:.1}  ({} samples)",
                    r.p50, r.p99, r.max, r.samples
                );
            }
        }
        s.push_str(&crate::report::cpu_lines(
            self.server_cpu.as_ref(),
            &self.generator_cpu,
            "forwarded",
        ));
        if self.stray > 0 {
            let _ = writeln!(
                s,
                "  {} datagrams at the clients were not their partner's media",
                self.stray
            );
        }
        if let Some(p) = &self.cleanup {
            let _ = writeln!(s, "  cleanup    Refresh(0): {}", crate::report::phase(p));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn args() -> MediaArgs {
        MediaArgs {
            server: None,
            user: String::new(),
            password: String::new(),
            realm: None,
            calls: 3,
            audio_pps: 50.0,
            audio_size: 160,
            video_pps: 100.0,
            video_size: 1200,
            duration: Duration::from_millis(600),
            warmup: Duration::from_millis(200),
            drain: Duration::from_millis(200),
            server_pid: None,
            threads: 2,
            in_flight: 8,
        }
    }

    #[test]
    fn partners_and_stream_ids() {
        assert_eq!((partner(0), partner(1), partner(6), partner(7)), (1, 0, 7, 6));
        assert_eq!(stream_id(3, Kind::Audio), 6);
        assert_eq!(stream_id(3, Kind::Video), 7);
    }

    #[test]
    fn validation() {
        assert!(validate(&args()).is_ok());
        let mut a = args();
        a.server = Some("192.0.2.1:3478".parse().unwrap());
        assert!(validate(&a).is_err(), "not loopback");
        let mut a = args();
        a.video_size = 2000;
        assert!(validate(&a).is_err());
        let mut a = args();
        a.audio_pps = 0.0;
        a.video_pps = 0.0;
        assert!(validate(&a).is_err());
        let mut a = args();
        a.calls = 0;
        assert!(validate(&a).is_err());
    }

    #[test]
    fn relayed_template_is_channel_data() {
        let t = template(true, 160);
        let cd = ChannelData::parse(&t).unwrap();
        assert_eq!((cd.channel, cd.payload.len()), (CHANNEL, 160));
        assert_eq!(template(false, 160).len(), 160);
    }

    /// The direct exchange on loopback: every stream arrives at the other end of its call
    /// and nowhere else, and the counts add up.
    #[test]
    fn direct_calls_deliver_to_the_other_end() {
        let r = run(args()).unwrap();
        assert_eq!(r.mode, "direct");
        // 6 clients x (50 + 100) pps x 0.6 s = 540, give or take the pacing's edges.
        assert!((400..=700).contains(&r.sent), "sent {}", r.sent);
        assert_eq!(r.stray, 0);
        assert!(r.delivered <= r.sent);
        // Loopback without a relay loses nothing at this rate.
        assert_eq!(r.lost, 0, "{}", r.text());
        assert_eq!(r.calls_lossless, 3);
        let all = r.latency_us.all.unwrap();
        assert_eq!(all.samples, r.delivered);
        assert!(r.latency_us.audio.unwrap().samples > 0 && r.latency_us.video.unwrap().samples > 0);
    }
}
