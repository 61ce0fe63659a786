//! TURN over TCP and TLS: relay throughput (`turn-bench stream`) and connection set-up
//! rate (`turn-bench connect`), against any TURN server (turn-server, coturn).
//!
//! `stream`: M connections, each an allocation with a channel to the embedded UDP peer,
//! driven by the project's TURN client (turn-tests' `StreamClient`). Direction `up`: one
//! thread writes stamped ChannelData to every connection at a paced total rate, the peer
//! counts what arrives; `down`: the peer sends stamped datagrams to every relayed address
//! at the paced rate, one thread per connection reads the frames and counts them. TCP
//! never loses a message on its own: a server that cannot keep up either pushes back (the
//! writer falls behind the target rate) or drops (counted as loss), so a rate is *held*
//! when at least 99% of the target was sent and less than 0.1% lost.
//!
//! `connect`: N connections, C at a time: connect, TLS handshake, Allocate (with its 401
//! round), Refresh 0, close. Connections per second and the server's CPU per connection.
//!
//! Loopback only; everything stops by itself.

use std::{
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use turn_proto::client::Request;
use turn_tests::stream::{StreamClient, trusting};

use crate::{
    net,
    pacing::TokenBucket,
    payload::{Stamp, Window, clock_ns},
    peer::{self, PeerOpts},
    procfs::{self, CpuDelta, CpuSample, Proc},
};

/// Plain TCP or TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Tls,
}

/// Client -> peer (`up`) or peer -> client (`down`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Up,
    Down,
}

/// How to reach the server (the options `stream` and `connect` share).
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    #[arg(long)]
    pub server: SocketAddr,
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: Transport,
    /// Certificate to trust for TLS (PEM), e.g. from `turn-bench gen-cert`.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    #[arg(long, short = 'u')]
    pub user: String,
    #[arg(long, short = 'w')]
    pub password: String,
    /// The server's pid, to read its CPU time.
    #[arg(long)]
    pub server_pid: Option<u32>,
}

impl Target {
    fn tls_config(&self) -> Result<Option<Arc<rustls::ClientConfig>>> {
        if self.transport == Transport::Tcp {
            return Ok(None);
        }
        let path = self.ca.as_ref().context("--transport tls needs --ca CERT.pem")?;
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let cert = CertificateDer::pem_slice_iter(&pem)
            .next()
            .with_context(|| format!("{}: no certificate", path.display()))?
            .with_context(|| format!("{}: bad PEM", path.display()))?;
        Ok(Some(trusting(&cert)))
    }

    fn connect(&self, tls: &Option<Arc<rustls::ClientConfig>>) -> Result<StreamClient> {
        let c = match tls {
            Some(config) => {
                StreamClient::tls(self.server, Arc::clone(config), &self.user, &self.password)
            }
            None => StreamClient::tcp(self.server, &self.user, &self.password),
        };
        c.with_context(|| format!("connecting to {}", self.server))
    }
}

#[derive(Debug, Clone)]
pub struct StreamArgs {
    pub target: Target,
    pub direction: Direction,
    pub flows: usize,
    /// Total messages per second over all flows.
    pub rate: f64,
    pub size: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub drain: Duration,
}

/// What `turn-bench stream` reports.
#[derive(Debug, Serialize)]
pub struct StreamReport {
    pub transport: Transport,
    pub direction: Direction,
    pub flows: usize,
    pub size: usize,
    pub target_pps: f64,
    /// Messages sent per second in the window.
    pub sent_pps: f64,
    /// Messages delivered per second in the window.
    pub delivered_pps: f64,
    pub sent: u64,
    pub delivered: u64,
    pub loss_pct: f64,
    /// At least 99% of the target sent and less than 0.1% lost.
    pub held: bool,
    pub server_cpu: Option<CpuDelta>,
    /// Server CPU per delivered message, microseconds.
    pub server_us_per_packet: Option<f64>,
}

/// The channel of flow `i`.
fn channel_of(i: usize) -> u16 {
    0x4000 + i as u16
}

pub fn run_stream(a: &StreamArgs) -> Result<StreamReport> {
    net::require_loopback("--server", a.target.server)?;
    if a.flows == 0 || a.flows > 1000 {
        bail!("--flows must be 1 to 1000");
    }
    if a.size < crate::payload::HEADER_LEN || a.size > 1400 {
        bail!("--size must be {} to 1400", crate::payload::HEADER_LEN);
    }
    if let Some(pid) = a.target.server_pid {
        procfs::check_pid(pid)?;
    }
    let ticks = procfs::clock_ticks_per_sec()?;
    let tls = a.target.tls_config()?;
    let peer_socks = peer::bind("127.0.0.1:0".parse()?, 1, crate::DEFAULT_BUFFER)?;
    let peer_addr = peer_socks[0].local_addr()?;
    let mut clients = Vec::with_capacity(a.flows);
    let mut relayed = Vec::with_capacity(a.flows);
    for i in 0..a.flows {
        let mut c = a.target.connect(&tls)?;
        let relay = c
            .allocate_with_channel(channel_of(i), peer_addr)
            .map_err(|e| anyhow!("flow {i}: {e}"))?;
        clients.push(c);
        relayed.push(relay);
    }

    let start_ns = clock_ns() + 20_000_000;
    let window = Window {
        start_ns: start_ns + a.warmup.as_nanos() as u64,
        end_ns: start_ns + (a.warmup + a.duration).as_nanos() as u64,
    };
    let stop_ns = window.end_ns + a.drain.as_nanos() as u64;
    let sent = AtomicU64::new(0);
    let (delivered, cpu) = std::thread::scope(|s| -> Result<(u64, Option<CpuDelta>)> {
        let (receivers, sender) = match a.direction {
            Direction::Up => {
                let popts = PeerOpts {
                    echo: false,
                    flows: a.flows,
                    window,
                    stop_ns,
                    batch: 64,
                    by_source: false,
                };
                let sock = &peer_socks[0];
                let receivers = vec![s.spawn(move || {
                    peer::serve(sock, &popts).map(|c| c.per_flow_window.iter().sum::<u64>())
                })];
                let (clients, sent) = (&mut clients, &sent);
                (receivers, s.spawn(move || send_up(clients, a, start_ns, window, sent)))
            }
            Direction::Down => {
                let receivers = clients
                    .iter_mut()
                    .map(|c| s.spawn(move || read_frames(c, window, stop_ns)))
                    .collect();
                let (sock, relayed, sent) = (&peer_socks[0], &relayed, &sent);
                (receivers, s.spawn(move || send_down(sock, relayed, a, start_ns, window, sent)))
            }
        };
        sleep_until_ns(window.start_ns);
        let server_a = a.target.server_pid.map(|p| CpuSample::take(Proc::Pid(p))).transpose()?;
        sleep_until_ns(window.end_ns);
        let server_b = a.target.server_pid.map(|p| CpuSample::take(Proc::Pid(p))).transpose()?;
        sender.join().map_err(|_| anyhow!("sender panicked"))??;
        let mut delivered = 0;
        for r in receivers {
            delivered += r.join().map_err(|_| anyhow!("receiver panicked"))??;
        }
        let cpu = match (server_a, server_b) {
            (Some(x), Some(y)) => Some(procfs::cpu_delta(&x, &y, ticks)),
            _ => None,
        };
        Ok((delivered, cpu))
    })?;
    for c in clients {
        c.close();
    }
    let sent = sent.load(Ordering::Relaxed);
    let secs = a.duration.as_secs_f64();
    let loss_pct = crate::report::pct(sent.saturating_sub(delivered), sent);
    let sent_pps = sent as f64 / secs;
    Ok(StreamReport {
        transport: a.target.transport,
        direction: a.direction,
        flows: a.flows,
        size: a.size,
        target_pps: a.rate,
        sent_pps,
        delivered_pps: delivered as f64 / secs,
        sent,
        delivered,
        loss_pct,
        held: sent_pps >= 0.99 * a.rate && loss_pct < 0.1,
        server_us_per_packet: cpu.map(|c| c.cpu_us as f64 / delivered.max(1) as f64),
        server_cpu: cpu,
    })
}

fn sleep_until_ns(t: u64) {
    let now = clock_ns();
    if t > now {
        std::thread::sleep(Duration::from_nanos(t - now));
    }
}

/// Calls `send(flow, stamped payload)` round robin over `flows` at the paced total rate,
/// from `start_ns` to the end of the window; returns how many were sent inside the window.
fn paced(
    a: &StreamArgs,
    flows: usize,
    start_ns: u64,
    window: Window,
    mut send: impl FnMut(usize, &[u8]) -> Result<()>,
) -> Result<u64> {
    sleep_until_ns(start_ns);
    let mut bucket = TokenBucket::new(a.rate, crate::pacing::burst_for(a.rate, flows), start_ns);
    let mut payload = vec![0u8; a.size];
    let mut seq = vec![0u64; flows];
    let (mut next, mut in_window) = (0usize, 0u64);
    loop {
        let now = clock_ns();
        if now >= window.end_ns {
            return Ok(in_window);
        }
        let tokens = bucket.take(now);
        if tokens == 0 {
            let wait = bucket.wait_ns().clamp(10_000, 1_000_000);
            std::thread::sleep(Duration::from_nanos(wait));
            continue;
        }
        for _ in 0..tokens {
            let flow = next;
            next = (next + 1) % flows;
            let t = clock_ns();
            Stamp { flow: flow as u32, seq: seq[flow], sent_ns: t }.write(&mut payload);
            seq[flow] += 1;
            send(flow, &payload)?;
            if window.contains(t) {
                in_window += 1;
            }
        }
    }
}

/// Up: stamped ChannelData written to every connection in turn.
fn send_up(
    clients: &mut [StreamClient],
    a: &StreamArgs,
    start_ns: u64,
    window: Window,
    sent: &AtomicU64,
) -> Result<()> {
    let n = paced(a, clients.len(), start_ns, window, |flow, payload| {
        clients[flow]
            .send_channel_data(channel_of(flow), payload)
            .with_context(|| format!("writing to flow {flow}"))
    })?;
    sent.store(n, Ordering::Relaxed);
    Ok(())
}

/// Down: stamped datagrams from the peer to every relayed address in turn.
fn send_down(
    sock: &UdpSocket,
    relayed: &[SocketAddr],
    a: &StreamArgs,
    start_ns: u64,
    window: Window,
    sent: &AtomicU64,
) -> Result<()> {
    let n = paced(a, relayed.len(), start_ns, window, |flow, payload| {
        // A full socket buffer is the sender's own limit: retry, do not count a loss.
        loop {
            match sock.send_to(payload, relayed[flow]) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e).context("peer send"),
            }
        }
    })?;
    sent.store(n, Ordering::Relaxed);
    Ok(())
}

/// Reads one connection's frames until `stop_ns`; counts stamped messages sent inside
/// the window.
fn read_frames(c: &mut StreamClient, window: Window, stop_ns: u64) -> Result<u64> {
    let mut got = 0;
    while clock_ns() < stop_ns {
        let Some(frame) = c.read_frame(Duration::from_millis(50)) else { continue };
        if let Some(stamp) = frame.get(4..).and_then(Stamp::read)
            && window.contains(stamp.sent_ns)
        {
            got += 1;
        }
    }
    Ok(got)
}

#[derive(Debug, Clone)]
pub struct ConnectArgs {
    pub target: Target,
    pub connections: usize,
    pub concurrency: usize,
}

/// What `turn-bench connect` reports.
#[derive(Debug, Serialize)]
pub struct ConnectReport {
    pub transport: Transport,
    pub connections: usize,
    pub concurrency: usize,
    pub failed: usize,
    pub first_error: Option<String>,
    pub elapsed_secs: f64,
    /// Connections set up (connect, handshake, Allocate, Refresh 0, close) per second.
    pub per_sec: f64,
    pub server_cpu: Option<CpuDelta>,
    /// Server CPU per connection, microseconds.
    pub server_us_per_connection: Option<f64>,
}

pub fn run_connect(a: &ConnectArgs) -> Result<ConnectReport> {
    net::require_loopback("--server", a.target.server)?;
    if a.connections == 0 || a.concurrency == 0 {
        bail!("--connections and --concurrency must be at least 1");
    }
    if let Some(pid) = a.target.server_pid {
        procfs::check_pid(pid)?;
    }
    let ticks = procfs::clock_ticks_per_sec()?;
    let tls = a.target.tls_config()?;
    let next = AtomicU64::new(0);
    let started = Instant::now();
    let cpu_a = a.target.server_pid.map(|p| CpuSample::take(Proc::Pid(p))).transpose()?;
    let outcomes: Vec<(usize, Option<String>)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..a.concurrency)
            .map(|_| {
                let (next, tls) = (&next, &tls);
                s.spawn(move || {
                    let (mut failed, mut first) = (0usize, None);
                    while next.fetch_add(1, Ordering::Relaxed) < a.connections as u64 {
                        if let Err(e) = one_connection(&a.target, tls) {
                            failed += 1;
                            first.get_or_insert_with(|| format!("{e:#}"));
                        }
                    }
                    (failed, first)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or((1, Some("panicked".into())))).collect()
    });
    let cpu_b = a.target.server_pid.map(|p| CpuSample::take(Proc::Pid(p))).transpose()?;
    let elapsed = started.elapsed().as_secs_f64();
    let failed = outcomes.iter().map(|o| o.0).sum::<usize>();
    let first_error = outcomes.into_iter().find_map(|o| o.1);
    let cpu = match (cpu_a, cpu_b) {
        (Some(x), Some(y)) => Some(procfs::cpu_delta(&x, &y, ticks)),
        _ => None,
    };
    let done = a.connections - failed.min(a.connections);
    Ok(ConnectReport {
        transport: a.target.transport,
        connections: a.connections,
        concurrency: a.concurrency,
        failed,
        first_error,
        elapsed_secs: elapsed,
        per_sec: done as f64 / elapsed.max(1e-9),
        server_us_per_connection: cpu.map(|c| c.cpu_us as f64 / done.max(1) as f64),
        server_cpu: cpu,
    })
}

fn one_connection(target: &Target, tls: &Option<Arc<rustls::ClientConfig>>) -> Result<()> {
    let mut c = target.connect(tls)?;
    c.request(Request::Allocate).map_err(|e| anyhow!("Allocate: {e}"))?;
    c.request(Request::Refresh { lifetime: 0 }).map_err(|e| anyhow!("Refresh: {e}"))?;
    c.close();
    Ok(())
}

/// Writes a self-signed certificate for `localhost` and 127.0.0.1 (`cert.pem`, `key.pem`)
/// into `dir`, for TLS benchmarks on loopback.
pub fn gen_cert(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(names).context("generating a certificate")?;
    std::fs::write(dir.join("cert.pem"), cert.pem())?;
    std::fs::write(dir.join("key.pem"), signing_key.serialize_pem())?;
    Ok(())
}

impl StreamReport {
    pub fn text(&self) -> String {
        format!(
            "{:?} {:?}, {} flows x {} B: target {:.0}/s, sent {:.0}/s, delivered {:.0}/s, loss {:.3}%{}{}",
            self.transport,
            self.direction,
            self.flows,
            self.size,
            self.target_pps,
            self.sent_pps,
            self.delivered_pps,
            self.loss_pct,
            if self.held { " (held)" } else { " (not held)" },
            self.server_us_per_packet
                .map(|us| format!(", server {us:.2} us CPU per message"))
                .unwrap_or_default()
        )
    }
}

impl ConnectReport {
    pub fn text(&self) -> String {
        format!(
            "{:?}: {} connections ({} at a time) in {:.2} s: {:.0}/s, {} failed{}{}",
            self.transport,
            self.connections,
            self.concurrency,
            self.elapsed_secs,
            self.per_sec,
            self.failed,
            self.first_error.as_ref().map(|e| format!(" (first: {e})")).unwrap_or_default(),
            self.server_us_per_connection
                .map(|us| format!(", server {us:.0} us CPU per connection"))
                .unwrap_or_default()
        )
    }
}
