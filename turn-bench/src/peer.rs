//! The peer side: receives what the relay (or the floor forwarder) delivers, counts it per
//! flow (from the payload) and optionally per source address, and with `echo` sends every
//! datagram back to where it came from (the relayed address, so back through the relay).

use std::{
    collections::HashMap,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    time::Duration,
};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::{
    net::{self, Batch, Dest, SockOpts},
    payload::{Stamp, Window, clock_ns},
    stats,
};

#[derive(Debug, Clone, Copy)]
pub struct PeerOpts {
    pub echo: bool,
    /// Flows to count per flow id (payload ids >= flows count as foreign).
    pub flows: usize,
    /// Packets sent inside this window are counted per flow.
    pub window: Window,
    /// Stop at this benchmark-clock time.
    pub stop_ns: u64,
    pub batch: usize,
    /// Also count per source address (standalone peer).
    pub by_source: bool,
}

#[derive(Debug, Clone, Default)]
pub struct PeerCounts {
    /// Per flow: packets sent inside the window and received here.
    pub per_flow_window: Vec<u64>,
    /// Every datagram received.
    pub received: u64,
    /// Datagrams that are not a benchmark payload of a known flow.
    pub foreign: u64,
    pub echoed: u64,
    pub echo_failed: u64,
    pub by_source: HashMap<SocketAddr, u64>,
}

impl PeerCounts {
    pub fn merge(&mut self, o: PeerCounts) {
        if self.per_flow_window.len() < o.per_flow_window.len() {
            self.per_flow_window.resize(o.per_flow_window.len(), 0);
        }
        for (a, b) in self.per_flow_window.iter_mut().zip(&o.per_flow_window) {
            *a += b;
        }
        self.received += o.received;
        self.foreign += o.foreign;
        self.echoed += o.echoed;
        self.echo_failed += o.echo_failed;
        for (k, v) in o.by_source {
            *self.by_source.entry(k).or_default() += v;
        }
    }
}

/// Bind `threads` peer sockets on `listen` (one SO_REUSEPORT group when more than one).
pub fn bind(listen: SocketAddr, threads: usize, buffer: usize) -> Result<Vec<UdpSocket>> {
    net::require_loopback("peer address", listen)?;
    let opts = SockOpts {
        reuse_port: threads > 1,
        buffer: Some(buffer),
        timeout: Duration::from_millis(50),
    };
    let first =
        net::udp_socket(listen, None, opts).with_context(|| format!("peer socket on {listen}"))?;
    let addr = first.local_addr()?;
    let mut socks = vec![first];
    for _ in 1..threads {
        socks.push(
            net::udp_socket(addr, None, opts).with_context(|| format!("peer socket on {addr}"))?,
        );
    }
    Ok(socks)
}

/// Bind one peer socket per flow on 127.0.0.1, each on a port of its own (for a server
/// that tells allocations apart by the exact peer address: coturn's `--multiplex-peer`
/// refuses a second allocation's permission for an address another one uses).
pub fn bind_per_flow(flows: usize, buffer: usize) -> Result<Vec<UdpSocket>> {
    let opts = SockOpts {
        reuse_port: false,
        buffer: Some(buffer.min(256 << 10)),
        timeout: Duration::ZERO,
    };
    (0..flows)
        .map(|i| {
            let sock = net::udp_socket(SocketAddr::from(([127, 0, 0, 1], 0)), None, opts)
                .with_context(|| format!("peer socket of flow {i}"))?;
            sock.set_nonblocking(true)?;
            Ok(sock)
        })
        .collect()
}

/// Serve several non-blocking peer sockets from one thread (epoll) until `opts.stop_ns`.
pub fn serve_many(socks: &[UdpSocket], opts: &PeerOpts) -> Result<PeerCounts> {
    // SAFETY: epoll_create1 with a constant flag; the fd is checked and owned below.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(std::io::Error::last_os_error()).context("epoll_create1");
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let ep = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(ep) };
    for (i, sock) in socks.iter().enumerate() {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: i as u64 };
        // SAFETY: registers a socket we own, with a valid event.
        let rc = unsafe {
            libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, sock.as_raw_fd(), &mut ev)
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error()).context("epoll_ctl");
        }
    }
    let mut c = PeerCounts { per_flow_window: vec![0; opts.flows], ..PeerCounts::default() };
    let mut batch = Batch::new(opts.batch, net::MAX_DATAGRAM);
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    while clock_ns() < opts.stop_ns {
        // SAFETY: `events` holds as many entries as we pass.
        let n = unsafe {
            libc::epoll_wait(ep.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, 20)
        };
        for ev in events.iter().take(n.max(0) as usize) {
            let Some(sock) = socks.get(ev.u64 as usize) else { continue };
            let fd = sock.as_raw_fd();
            loop {
                let got = batch.recv(fd, libc::MSG_DONTWAIT).context("peer recvmmsg")?;
                if got == 0 {
                    break;
                }
                take(&mut c, &mut batch, fd, got, opts);
            }
        }
    }
    Ok(c)
}

/// Counts a received batch of `n` datagrams on socket `fd` and, with `opts.echo`, sends
/// them back where they came from.
fn take(c: &mut PeerCounts, batch: &mut Batch, fd: std::os::fd::RawFd, n: usize, opts: &PeerOpts) {
    count(c, batch, n, opts);
    if opts.echo {
        let sent = batch.send(fd, n, Dest::Sources);
        c.echoed += sent.ok as u64;
        c.echo_failed += sent.failed as u64;
    }
}

/// Counts a received batch of `n` datagrams.
fn count(c: &mut PeerCounts, batch: &Batch, n: usize, opts: &PeerOpts) {
    c.received += n as u64;
    for i in 0..n {
        match Stamp::read(batch.get(i)) {
            Some(s) if (s.flow as usize) < opts.flows => {
                if opts.window.contains(s.sent_ns) {
                    c.per_flow_window[s.flow as usize] += 1;
                }
            }
            // Standalone: any turn-bench payload is ours.
            Some(_) if opts.flows == 0 => {}
            _ => c.foreign += 1,
        }
        if opts.by_source
            && let Some(src) = batch.source(i)
        {
            *c.by_source.entry(src).or_default() += 1;
        }
    }
}

/// Serve one peer socket until `opts.stop_ns`.
pub fn serve(sock: &UdpSocket, opts: &PeerOpts) -> Result<PeerCounts> {
    let mut c = PeerCounts { per_flow_window: vec![0; opts.flows], ..PeerCounts::default() };
    let mut batch = Batch::new(opts.batch, net::MAX_DATAGRAM);
    let fd = sock.as_raw_fd();
    while clock_ns() < opts.stop_ns {
        let n = batch.recv(fd, 0).context("peer recvmmsg")?;
        if n == 0 {
            continue;
        }
        take(&mut c, &mut batch, fd, n, opts);
    }
    Ok(c)
}

/// Report of the standalone `peer` command.
#[derive(Debug, Serialize)]
pub struct StandaloneReport {
    pub listen: SocketAddr,
    pub echo: bool,
    pub duration_s: f64,
    pub received: u64,
    pub received_pps: f64,
    pub echoed: u64,
    pub echo_failed: u64,
    /// Datagrams that were not turn-bench payloads.
    pub foreign: u64,
    pub sources: usize,
    pub fairness_over_sources: stats::Fairness,
    /// Per source address: datagrams received.
    pub per_source: Vec<(SocketAddr, u64)>,
}

/// `turn-bench peer`: run a peer for `duration`, then report.
pub fn run_standalone(
    listen: SocketAddr,
    echo: bool,
    duration: Duration,
    threads: usize,
    buffer: usize,
    json: bool,
) -> Result<()> {
    let socks = bind(listen, threads.max(1), buffer)?;
    let addr = socks[0].local_addr()?;
    eprintln!(
        "turn-bench peer: listening on {addr} for {:.1} s{}",
        duration.as_secs_f64(),
        if echo { ", echoing" } else { "" }
    );
    let start = clock_ns();
    let stop_ns = start + u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
    let opts = PeerOpts {
        echo,
        flows: 0,
        window: Window { start_ns: start, end_ns: stop_ns },
        stop_ns,
        batch: 64,
        by_source: true,
    };
    let mut total = PeerCounts::default();
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> =
            socks.iter().map(|sock| s.spawn(move || serve(sock, &opts))).collect();
        for h in handles {
            let c = h.join().map_err(|_| anyhow::anyhow!("peer thread panicked"))??;
            total.merge(c);
        }
        Ok(())
    })?;
    let secs = (clock_ns() - start) as f64 / 1e9;
    let mut per_source: Vec<(SocketAddr, u64)> = total.by_source.into_iter().collect();
    per_source.sort();
    let counts: Vec<u64> = per_source.iter().map(|&(_, n)| n).collect();
    let report = StandaloneReport {
        listen: addr,
        echo,
        duration_s: secs,
        received: total.received,
        received_pps: total.received as f64 / secs.max(1e-9),
        echoed: total.echoed,
        echo_failed: total.echo_failed,
        foreign: total.foreign,
        sources: per_source.len(),
        fairness_over_sources: stats::fairness(&counts),
        per_source,
    };
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "peer {}: {} datagrams in {:.2} s ({:.0}/s) from {} sources, {} echoed ({} failed), {} not turn-bench payloads",
            report.listen,
            report.received,
            report.duration_s,
            report.received_pps,
            report.sources,
            report.echoed,
            report.echo_failed,
            report.foreign
        );
        if let Some(j) = report.fairness_over_sources.jain {
            println!(
                "  per source: Jain {j:.4}, min {} / max {}",
                report.fairness_over_sources.min, report.fairness_over_sources.max
            );
        }
        for (src, n) in report.per_source.iter().take(32) {
            println!("  {src}: {n}");
        }
        if report.per_source.len() > 32 {
            println!("  ... {} more sources", report.per_source.len() - 32);
        }
    }
    Ok(())
}
