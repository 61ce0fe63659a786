//! The floor: a bare UDP forwarder. Each thread owns one socket on the listen address
//! (an SO_REUSEPORT group when there are several), receives batches with `recvmmsg` and
//! sends every datagram on to one fixed destination with `sendmmsg`. No TURN work: the
//! cost of the kernel's UDP path with the same batching, the ceiling of any relay here.

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow};
use serde::Serialize;
use socket2::SockAddr;

use crate::net::{self, Batch, Dest, SockOpts};

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ThreadCounts {
    pub received: u64,
    pub forwarded: u64,
    pub failed: u64,
    /// recvmmsg calls that returned data (received / batches = mean batch).
    pub batches: u64,
}

#[derive(Debug, Serialize)]
pub struct FloorReport {
    pub listen: SocketAddr,
    pub to: SocketAddr,
    pub threads: usize,
    pub duration_s: f64,
    pub received: u64,
    pub forwarded: u64,
    pub failed: u64,
    pub forwarded_pps: f64,
    pub mean_batch: f64,
    pub per_thread: Vec<ThreadCounts>,
}

fn forward(
    sock: &UdpSocket,
    to: &SockAddr,
    batch_size: usize,
    until: Instant,
) -> Result<ThreadCounts> {
    let mut c = ThreadCounts::default();
    let mut batch = Batch::new(batch_size, net::MAX_DATAGRAM);
    let fd = sock.as_raw_fd();
    while Instant::now() < until {
        let n = batch.recv(fd, 0).context("floor recvmmsg")?;
        if n == 0 {
            continue;
        }
        c.batches += 1;
        c.received += n as u64;
        let sent = batch.send(fd, n, Dest::Fixed(to));
        c.forwarded += sent.ok as u64;
        c.failed += sent.failed as u64;
    }
    Ok(c)
}

/// `turn-bench floor`: forward from `listen` to `to` for `duration`, then report.
pub fn run(
    listen: SocketAddr,
    to: SocketAddr,
    threads: usize,
    duration: Duration,
    batch: usize,
    buffer: usize,
    json: bool,
) -> Result<()> {
    net::require_loopback("--listen", listen)?;
    net::require_loopback("--to", to)?;
    let threads = threads.max(1);
    let opts = SockOpts {
        reuse_port: threads > 1,
        buffer: Some(buffer),
        timeout: Duration::from_millis(50),
    };
    let first =
        net::udp_socket(listen, None, opts).with_context(|| format!("floor socket on {listen}"))?;
    let addr = first.local_addr()?;
    let mut socks = vec![first];
    for _ in 1..threads {
        socks.push(
            net::udp_socket(addr, None, opts).with_context(|| format!("floor socket on {addr}"))?,
        );
    }
    // The first line on stderr says where it listens (scripts read the port from it).
    eprintln!(
        "turn-bench floor: listening on {addr}, forwarding to {to}, {threads} thread(s), {:.1} s",
        duration.as_secs_f64()
    );
    let to_sa = SockAddr::from(to);
    let started = Instant::now();
    let until = started + duration;
    let per_thread = std::thread::scope(|s| -> Result<Vec<ThreadCounts>> {
        let handles: Vec<_> = socks
            .iter()
            .map(|sock| {
                let to_sa = &to_sa;
                s.spawn(move || forward(sock, to_sa, batch, until))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("floor thread panicked"))?)
            .collect()
    })?;
    let secs = started.elapsed().as_secs_f64();
    let sum = |f: fn(&ThreadCounts) -> u64| per_thread.iter().map(f).sum::<u64>();
    let (received, forwarded, failed, batches) =
        (sum(|c| c.received), sum(|c| c.forwarded), sum(|c| c.failed), sum(|c| c.batches));
    let report = FloorReport {
        listen: addr,
        to,
        threads,
        duration_s: secs,
        received,
        forwarded,
        failed,
        forwarded_pps: forwarded as f64 / secs.max(1e-9),
        mean_batch: if batches == 0 { 0.0 } else { received as f64 / batches as f64 },
        per_thread,
    };
    if json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "floor {} -> {}: {} threads, {:.2} s, received {}, forwarded {} ({:.0} pps), failed {}, mean batch {:.1}",
            report.listen,
            report.to,
            report.threads,
            report.duration_s,
            report.received,
            report.forwarded,
            report.forwarded_pps,
            report.failed,
            report.mean_batch
        );
        for (i, t) in report.per_thread.iter().enumerate() {
            println!("  thread {i}: received {}, forwarded {}", t.received, t.forwarded);
        }
    }
    Ok(())
}
