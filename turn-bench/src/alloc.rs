//! `turn-bench alloc`: N allocations, each from its own socket, with a bounded number of
//! transactions in flight; allocations/s, the server's CPU per allocation and its resident
//! memory per live allocation while they are all held; optionally a trickle of Send
//! indications through them to an embedded peer while they are held (`--trickle`, with a
//! permission each) and a Refresh of every one (`--refresh`: refreshes/s, CPU per
//! refresh); then deletes them (Refresh 0).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use turn_proto::client::{Client, Credentials, Request};

use crate::{
    net::{self, SockOpts},
    procfs::{self, CpuSample, Proc},
    report::{AllocReport, PhaseReport},
    session::{self, DriveOpts, Endpoint},
};

#[derive(Debug, Clone)]
pub struct AllocArgs {
    pub server: SocketAddr,
    pub user: String,
    pub password: String,
    pub realm: Option<String>,
    pub count: usize,
    pub server_pid: Option<u32>,
    pub in_flight: usize,
    /// Pause before reading the server's memory (lets it settle).
    pub settle: Duration,
    /// Keep the allocations this long after measuring (e.g. to inspect the server).
    pub hold: Duration,
    /// Refresh every allocation once after the hold (measured).
    pub refresh: bool,
    /// Send indications per second, spread over the allocations, during the hold.
    pub trickle: f64,
}

/// Sends Send indications to `peer` from the held flows, `rate` a second in turn, for
/// `hold`; returns (sent, received by the peer).
fn trickle(
    eps: &[Endpoint],
    held: &[usize],
    peer: &std::net::UdpSocket,
    rate: f64,
    hold: Duration,
) -> Result<(u64, u64)> {
    use turn_proto::stun::{Class, MessageEncoder, Method, TransactionId, attr};
    let peer_addr = peer.local_addr()?;
    let start = std::time::Instant::now();
    let (mut sent, mut received, mut k) = (0u64, 0u64, 0usize);
    let mut buf = [0u8; 256];
    let mut rx = [0u8; 2048];
    let e = |e| anyhow::anyhow!("encoding a Send indication: {e}");
    while start.elapsed() < hold {
        let due = (start.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            let ep = &eps[held[k % held.len()]];
            k += 1;
            let mut tid = [7u8; 12];
            tid[..8].copy_from_slice(&sent.to_be_bytes());
            let mut enc =
                MessageEncoder::new(&mut buf, Method::SEND, Class::Indication, &TransactionId(tid))
                    .map_err(e)?;
            enc.xor_address(attr::XOR_PEER_ADDRESS, peer_addr).map_err(e)?;
            enc.raw(attr::DATA, &[0x5a; 32]).map_err(e)?;
            let n = enc.finish();
            let _ = ep.sock.send(&buf[..n]);
            sent += 1;
        }
        while peer.recv(&mut rx).is_ok() {
            received += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let drain = std::time::Instant::now();
    while drain.elapsed() < Duration::from_millis(500) {
        match peer.recv(&mut rx) {
            Ok(_) => received += 1,
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    Ok((sent, received))
}

fn rate(n: usize, d: Duration) -> f64 {
    if d.is_zero() { 0.0 } else { n as f64 / d.as_secs_f64() }
}

pub fn run(a: AllocArgs) -> Result<AllocReport> {
    net::require_loopback("--server", a.server)?;
    if a.count == 0 {
        bail!("--count must be at least 1");
    }
    if a.hold > Duration::from_secs(300) {
        bail!("--hold is at most 300 s");
    }
    if !(a.trickle >= 0.0 && a.trickle.is_finite()) {
        bail!("--trickle must be a number of Send indications per second");
    }
    if a.trickle > 0.0 && a.hold.is_zero() {
        bail!("--trickle needs a --hold to send during");
    }
    net::raise_nofile(a.count as u64 + 64)?;
    if let Some(pid) = a.server_pid {
        procfs::check_pid(pid)?;
    }
    let tck = procfs::clock_ticks_per_sec()?;
    let creds = Arc::new(Credentials::new(&a.user, &a.password, a.realm.as_deref())?);
    let opts = SockOpts { reuse_port: false, buffer: None, timeout: Duration::from_millis(100) };
    let mut eps = Vec::with_capacity(a.count);
    for i in 0..a.count {
        let sock = net::udp_socket(net::any_port_like(a.server), Some(a.server), opts)
            .with_context(|| format!("socket {i} of {}", a.count))?;
        eps.push(Endpoint { sock, client: Client::new(i as u32, rand::random(), creds.clone()) });
    }
    let pid = a.server_pid.map(Proc::Pid);
    let rss = |p: Option<Proc>| p.map(|p| p.rss_kb()).transpose();
    let sample = |p: Option<Proc>| p.map(CpuSample::take).transpose();

    let rss_before = rss(pid)?;
    let all: Vec<usize> = (0..a.count).collect();
    let dopts = DriveOpts {
        in_flight: a.in_flight,
        fail_fast: false,
        time_limit: Duration::from_secs(30) + Duration::from_millis(20) * a.count as u32,
        sock_opts: opts,
    };
    let peer = net::peer_socket()?;
    let peer_addr = peer.local_addr()?;
    let with_permission = a.trickle > 0.0;
    let plan = move |_| {
        if with_permission {
            vec![Request::Allocate, Request::CreatePermission(peer_addr)]
        } else {
            vec![Request::Allocate]
        }
    };
    let c0 = sample(pid)?;
    let st = session::drive(&mut eps, &all, &plan, dopts, &mut |_, _, _| {})?;
    let c1 = sample(pid)?;
    let held = st.completed.clone();
    if held.is_empty() {
        let first = st.failed.first().map_or("no error recorded".into(), |(_, e)| e.clone());
        bail!("no allocation succeeded; first error: {first}");
    }
    std::thread::sleep(a.settle);
    let rss_held = rss(pid)?;
    let (trickle_sent, trickle_received) = if a.trickle > 0.0 {
        trickle(&eps, &held, &peer, a.trickle, a.hold)?
    } else {
        std::thread::sleep(a.hold);
        (0, 0)
    };
    let (mut refresh, mut refresh_cpu) = (None, None);
    if a.refresh {
        let r0 = sample(pid)?;
        let r = session::drive(
            &mut eps,
            &held,
            &|_| vec![Request::Refresh { lifetime: 600 }],
            dopts,
            &mut |_, _, _| {},
        )?;
        let r1 = sample(pid)?;
        refresh_cpu = r0.zip(r1).map(|(x, y)| procfs::cpu_delta(&x, &y, tck));
        refresh = Some(r);
    }

    let c2 = sample(pid)?;
    let del = session::drive(
        &mut eps,
        &held,
        &|_| vec![Request::Refresh { lifetime: 0 }],
        dopts,
        &mut |_, _, _| {},
    )?;
    let c3 = sample(pid)?;
    std::thread::sleep(a.settle);
    let rss_after = rss(pid)?;

    let alloc_cpu = c0.zip(c1).map(|(x, y)| procfs::cpu_delta(&x, &y, tck));
    let delete_cpu = c2.zip(c3).map(|(x, y)| procfs::cpu_delta(&x, &y, tck));
    let n = held.len();
    let bytes_per_allocation =
        rss_before.zip(rss_held).map(|(b, h)| (h as f64 - b as f64) * 1024.0 / n as f64);
    Ok(AllocReport {
        server: a.server,
        count: a.count,
        in_flight: a.in_flight,
        allocate: PhaseReport::of(&st, a.count),
        allocated: n,
        allocs_per_s: rate(n, st.elapsed),
        first_error: st.failed.first().map(|(_, e)| e.clone()),
        server_pid: a.server_pid,
        alloc_cpu,
        cpu_us_per_alloc: alloc_cpu.map(|c| c.cpu_us as f64 / n as f64),
        rss_before_kb: rss_before,
        rss_held_kb: rss_held,
        bytes_per_allocation,
        delete: PhaseReport::of(&del, n),
        deletes_per_s: rate(del.completed.len(), del.elapsed),
        delete_cpu,
        cpu_us_per_delete: delete_cpu.map(|c| c.cpu_us as f64 / n.max(1) as f64),
        rss_after_kb: rss_after,
        refreshes_per_s: refresh.as_ref().map(|r| rate(r.completed.len(), r.elapsed)),
        refresh: refresh.as_ref().map(|r| PhaseReport::of(r, n)),
        cpu_us_per_refresh: refresh_cpu.map(|c| c.cpu_us as f64 / n.max(1) as f64),
        refresh_cpu,
        trickle_sent,
        trickle_received,
    })
}
