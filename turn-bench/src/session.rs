//! Drives many [`Client`]s over their sockets: a bounded number of transactions in
//! flight, `poll` with timeouts, retransmissions; every flow's script of requests runs in
//! order. Terminates by itself: each request is bounded by [`MAX_TRIES`](turn_proto::client::MAX_TRIES) x
//! [`RTO`](turn_proto::client::RTO) per authentication round, and the whole run by `time_limit`.

use std::{
    io,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use turn_proto::client::{Client, ControlStats, Progress, Reply, Request};

use crate::net::{self, SockOpts};

/// One flow's socket (connected to the server) and client state.
pub struct Endpoint {
    pub sock: UdpSocket,
    pub client: Client,
}

#[derive(Debug, Clone, Copy)]
pub struct DriveOpts {
    /// Flows with a transaction in progress at once.
    pub in_flight: usize,
    /// Stop at the first failed flow with its error (setup); otherwise record and go on
    /// (cleanup, allocation counting).
    pub fail_fast: bool,
    /// Upper bound on the whole run.
    pub time_limit: Duration,
    /// Options of a replacement socket (after a 437 to Allocate).
    pub sock_opts: SockOpts,
}

/// Outcome of a run.
#[derive(Debug, Default)]
pub struct DriveStats {
    pub completed: Vec<usize>,
    pub failed: Vec<(usize, String)>,
    pub control: ControlStats,
    pub elapsed: Duration,
}

/// Run `plan(flow)` (a list of requests, in order) for each flow in `which`, calling
/// `on_reply(flow, request, reply)` for every success.
pub fn drive(
    endpoints: &mut [Endpoint],
    which: &[usize],
    plan: &dyn Fn(usize) -> Vec<Request>,
    opts: DriveOpts,
    on_reply: &mut dyn FnMut(usize, Request, Reply),
) -> Result<DriveStats> {
    let started = Instant::now();
    let give_up_at = started + opts.time_limit;
    let before: Vec<ControlStats> = which.iter().map(|&i| endpoints[i].client.stats).collect();
    for &i in which {
        endpoints[i].sock.set_nonblocking(true).context("set_nonblocking")?;
    }
    let result = run(endpoints, which, plan, opts, on_reply, give_up_at);
    for &i in which {
        endpoints[i].sock.set_nonblocking(false).context("set_nonblocking(false)")?;
    }
    let mut stats = result?;
    for (k, &i) in which.iter().enumerate() {
        let (a, b) = (before[k], endpoints[i].client.stats);
        stats.control.sent += b.sent - a.sent;
        stats.control.retransmits += b.retransmits - a.retransmits;
        stats.control.auth_rounds += b.auth_rounds - a.auth_rounds;
        stats.control.rebinds += b.rebinds - a.rebinds;
    }
    stats.elapsed = started.elapsed();
    Ok(stats)
}

struct Active {
    flow: usize,
    plan: Vec<Request>,
    step: usize,
}

fn send(ep: &mut Endpoint) {
    // A failed send is not fatal: the retransmission timer covers it.
    if let Err(e) = ep.sock.send(ep.client.request_bytes())
        && e.kind() == io::ErrorKind::ConnectionRefused
    {
        ep.client.unreachable = true;
    }
}

fn run(
    endpoints: &mut [Endpoint],
    which: &[usize],
    plan: &dyn Fn(usize) -> Vec<Request>,
    opts: DriveOpts,
    on_reply: &mut dyn FnMut(usize, Request, Reply),
    give_up_at: Instant,
) -> Result<DriveStats> {
    let mut stats = DriveStats::default();
    let mut next = 0;
    let mut active: Vec<Active> = Vec::new();
    let mut pollfds: Vec<libc::pollfd> = Vec::new();
    let mut buf = vec![0u8; crate::net::MAX_DATAGRAM];
    while next < which.len() || !active.is_empty() {
        let now = Instant::now();
        if now >= give_up_at {
            bail!(
                "{} of {} flows still unfinished after {:.1} s (time limit)",
                which.len() - stats.completed.len() - stats.failed.len(),
                which.len(),
                opts.time_limit.as_secs_f64()
            );
        }
        // Start flows up to the in-flight bound.
        while active.len() < opts.in_flight.max(1) && next < which.len() {
            let flow = which[next];
            next += 1;
            let steps = plan(flow);
            let Some(&first) = steps.first() else {
                stats.completed.push(flow);
                continue;
            };
            let ep = &mut endpoints[flow];
            ep.client.start(first, now)?;
            send(ep);
            active.push(Active { flow, plan: steps, step: 0 });
        }
        if active.is_empty() {
            continue;
        }
        // Wait for answers or the earliest retransmission deadline.
        let earliest =
            active.iter().filter_map(|a| endpoints[a.flow].client.deadline()).min().unwrap_or(now);
        let wait = earliest.saturating_duration_since(now).min(Duration::from_millis(50));
        pollfds.clear();
        pollfds.extend(active.iter().map(|a| libc::pollfd {
            fd: endpoints[a.flow].sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }));
        crate::net::poll_fds(&mut pollfds, wait).context("poll")?;
        let now = Instant::now();
        let mut k = 0;
        while k < active.len() {
            let readable = pollfds.get(k).is_some_and(|p| p.revents != 0);
            let a = &mut active[k];
            let ep = &mut endpoints[a.flow];
            let mut outcome = None;
            if readable {
                loop {
                    match ep.sock.recv(&mut buf) {
                        Ok(n) => match ep.client.on_message(&buf[..n], now) {
                            Progress::Ignored => {}
                            Progress::Send => send(ep),
                            done @ (Progress::Done(_) | Progress::Failed(_) | Progress::Rebind) => {
                                outcome = Some(done);
                                break;
                            }
                        },
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                            ep.client.unreachable = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e).context("recv on a client socket"),
                    }
                }
            }
            if outcome.is_none() {
                match ep.client.on_timeout(now) {
                    Progress::Send => send(ep),
                    Progress::Ignored | Progress::Done(_) | Progress::Rebind => {}
                    failed @ Progress::Failed(_) => outcome = Some(failed),
                }
            }
            let finished = match outcome {
                None => false,
                Some(Progress::Done(reply)) => {
                    let req = a.plan[a.step];
                    on_reply(a.flow, req, reply);
                    a.step += 1;
                    if let Some(&req) = a.plan.get(a.step) {
                        ep.client.start(req, now)?;
                        send(ep);
                        false
                    } else {
                        stats.completed.push(a.flow);
                        true
                    }
                }
                Some(Progress::Rebind) => {
                    // A new socket first, then the old one closes: the port differs.
                    let local = ep.sock.local_addr().context("local_addr")?;
                    let server = ep.sock.peer_addr().context("peer_addr")?;
                    let fresh = net::udp_socket(
                        SocketAddr::new(local.ip(), 0),
                        Some(server),
                        opts.sock_opts,
                    )
                    .context("replacement socket")?;
                    fresh.set_nonblocking(true).context("set_nonblocking")?;
                    ep.sock = fresh;
                    pollfds[k].fd = ep.sock.as_raw_fd();
                    ep.client.restart(a.plan[a.step], now)?;
                    send(ep);
                    false
                }
                Some(Progress::Failed(e)) => {
                    // The client's error names the request (the step).
                    let local = ep.sock.local_addr().map(|l| l.to_string()).unwrap_or_default();
                    let msg = format!("flow {} (from {local}): {e}", a.flow);
                    if opts.fail_fast {
                        return Err(anyhow!(msg));
                    }
                    stats.failed.push((a.flow, msg));
                    true
                }
                Some(_) => false,
            };
            if finished {
                active.swap_remove(k);
                pollfds.swap_remove(k);
            } else {
                k += 1;
            }
        }
    }
    Ok(stats)
}
