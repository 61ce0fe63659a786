//! `turn-bench balance --daemon`: steering balance of the daemon a user runs.
//!
//! For each steering mode it starts the release `turn-server` with N workers on 127.0.0.1
//! (a fresh daemon per scenario and mode), drives it with TURN clients that do what a
//! WebRTC client does (Allocate with its 401 round, ChannelBind to a peer, a Refresh every
//! few seconds, traffic both ways through the channel, Refresh 0 at the end), and reads
//! the daemon's own per-worker counters (the `packets` each worker publishes in its
//! `TURN_LOAD` slot: every datagram it received, listener and relay sockets). The figure
//! is busiest / mean of the workers' packet rates over a window. The arrivals, weights and
//! lifetimes come from a seeded generator, so every mode sees the same sequence.
//!
//! Everything goes to 127.0.0.1; every loop is bounded in time.

use std::{
    collections::VecDeque,
    io,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};
use serde::Serialize;
use turn_proto::channel_data;
use turn_proto::client::{Client, Credentials, Progress, Request};

use crate::net::{self, Epoll, SockOpts};

const USER: &str = "bench";
const PASSWORD: &str = "bench";
const REALM: &str = "bench";
/// Payload bytes of every relayed datagram.
const PAYLOAD: usize = 100;
/// Refresh period of a live session.
const REFRESH_EVERY: Duration = Duration::from_secs(4);
/// How long closing sessions may take after a trial before the run is declared broken.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// A scenario of the steering issue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// 8 equal flows arriving one after another (300 ms apart).
    Sequential,
    /// Bursts of 8 equal flows within 5 ms, each after the previous burst's sessions ended.
    Bursts,
    /// 64 equal flows arriving within 2 s.
    Flows64,
    /// 4 flows at 10x and 60 light ones in random order (the heavy ones look like any other
    /// when placed).
    Skewed,
    /// 12 flows receiving 10x what they send among 12 sending 10x what they receive.
    ReceiveHeavy,
    /// Sessions arriving at random (Poisson) with random lifetimes (exponential, mean 8 s),
    /// about 32 live; 60 s measured in 0.5 s windows, time-averaged.
    Churn,
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::Sequential,
        Scenario::Bursts,
        Scenario::Flows64,
        Scenario::Skewed,
        Scenario::ReceiveHeavy,
        Scenario::Churn,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Scenario::Sequential => "8 flows arriving one by one",
            Scenario::Bursts => "bursts of 8 flows within 5 ms, after earlier sessions ended",
            Scenario::Flows64 => "64 flows",
            Scenario::Skewed => "skewed: 4 flows at 10x + 60 light",
            Scenario::ReceiveHeavy => "12 receive-heavy (peer -> client 10x) + 12 send-heavy flows",
            Scenario::Churn => "churn: ~32 live sessions, random arrivals and lifetimes, 60 s",
        }
    }

    /// The issue's bound for p2c.
    pub fn target(self) -> f64 {
        match self {
            Scenario::Sequential | Scenario::Bursts => 1.35,
            Scenario::Flows64 => 1.08,
            Scenario::Skewed => 1.25,
            Scenario::ReceiveHeavy => 1.15,
            Scenario::Churn => 1.10,
        }
    }

    fn default_trials(self) -> usize {
        match self {
            Scenario::Sequential => 20,
            Scenario::Bursts => 30,
            Scenario::Flows64 | Scenario::Skewed | Scenario::ReceiveHeavy => 10,
            Scenario::Churn => 1,
        }
    }
}

/// One session: when it starts (from the trial's start), how long it lives (`None`: to
/// the end of the trial) and its packet rates each way.
#[derive(Debug, Clone, Copy)]
struct FlowPlan {
    arrive: Duration,
    life: Option<Duration>,
    up_pps: f64,
    down_pps: f64,
}

/// A set of sessions and the windows in which the workers' rates are compared.
#[derive(Debug, Clone)]
struct Trial {
    flows: Vec<FlowPlan>,
    windows: Vec<(Duration, Duration)>,
    /// Pause after the trial's sessions ended.
    gap: Duration,
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn equal(arrivals: Vec<f64>, pps: f64) -> Vec<FlowPlan> {
    arrivals
        .into_iter()
        .map(|a| FlowPlan { arrive: secs(a), life: None, up_pps: pps, down_pps: pps })
        .collect()
}

fn sorted_uniform(rng: &mut StdRng, n: usize, over: f64) -> Vec<f64> {
    let mut v: Vec<f64> = (0..n).map(|_| rng.random::<f64>() * over).collect();
    v.sort_by(f64::total_cmp);
    v
}

/// The trials of `scenario`, generated from `rng`.
fn trials(scenario: Scenario, count: usize, rng: &mut StdRng) -> Vec<Trial> {
    let window = |from: f64, len: f64| vec![(secs(from), secs(from + len))];
    (0..count)
        .map(|_| match scenario {
            Scenario::Sequential => Trial {
                flows: equal((0..8).map(|i| f64::from(i) * 0.3).collect(), 200.0),
                windows: window(3.1, 2.0),
                gap: secs(1.0),
            },
            Scenario::Bursts => Trial {
                flows: equal(sorted_uniform(rng, 8, 0.005), 200.0),
                windows: window(1.0, 2.0),
                gap: secs(1.0 + 2.0 * rng.random::<f64>()),
            },
            Scenario::Flows64 => Trial {
                flows: equal(sorted_uniform(rng, 64, 2.0), 100.0),
                windows: window(3.0, 2.0),
                gap: secs(1.0),
            },
            Scenario::Skewed => {
                let mut rates = vec![500.0; 4];
                rates.extend(std::iter::repeat_n(50.0, 60));
                rates.shuffle(rng);
                let arrivals = sorted_uniform(rng, rates.len(), 3.0);
                Trial {
                    flows: arrivals
                        .into_iter()
                        .zip(rates)
                        .map(|(a, r)| FlowPlan {
                            arrive: secs(a),
                            life: None,
                            up_pps: r,
                            down_pps: r,
                        })
                        .collect(),
                    windows: window(4.0, 2.0),
                    gap: secs(1.0),
                }
            }
            Scenario::ReceiveHeavy => {
                // 12 flows receive 10x what they send, 12 send 10x what they receive: all
                // cost the same, but a signal that counted only what clients send (the
                // listener sockets) would see 40 against 400.
                let mut rates = vec![(40.0, 400.0); 12];
                rates.extend(std::iter::repeat_n((400.0, 40.0), 12));
                rates.shuffle(rng);
                Trial {
                    flows: rates
                        .into_iter()
                        .enumerate()
                        .map(|(i, (up, down))| FlowPlan {
                            arrive: secs(i as f64 * 0.15),
                            life: None,
                            up_pps: up,
                            down_pps: down,
                        })
                        .collect(),
                    windows: window(4.6, 2.0),
                    gap: secs(1.0),
                }
            }
            Scenario::Churn => {
                // Poisson arrivals at 4/s with exponential lifetimes of mean 8 s: 32 live on
                // average. 15 s of warm-up, then 60 s measured in 0.5 s windows.
                let (rate, mean_life, warmup, measured) = (4.0, 8.0, 15.0, 60.0);
                let mut flows = Vec::new();
                let mut t = 0.0;
                while t < warmup + measured {
                    t += -(1.0 - rng.random::<f64>()).ln() / rate;
                    let life = (-(1.0 - rng.random::<f64>()).ln() * mean_life).clamp(1.0, 60.0);
                    flows.push(FlowPlan {
                        arrive: secs(t),
                        life: Some(secs(life)),
                        up_pps: 100.0,
                        down_pps: 100.0,
                    });
                }
                let windows = (0..120)
                    .map(|k| (secs(warmup + 0.5 * k as f64), secs(warmup + 0.5 * (k + 1) as f64)))
                    .collect();
                Trial { flows, windows, gap: secs(0.0) }
            }
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Allocate, then ChannelBind, in progress.
    Setup,
    /// Relaying (a Refresh may be in progress).
    Active,
    /// Refresh 0 in progress.
    Closing,
    Done,
}

struct Session {
    plan: FlowPlan,
    end: Option<Instant>,
    sock: UdpSocket,
    client: Client,
    state: State,
    script: VecDeque<Request>,
    in_flight: Option<Request>,
    relayed: Option<SocketAddr>,
    channel: u16,
    next_up: Instant,
    next_down: Instant,
    next_refresh: Instant,
    sent_up: u64,
    sent_down: u64,
    received_down: u64,
}

/// What one trial measured.
#[derive(Debug, Clone, Default)]
struct TrialResult {
    /// Busiest / mean of the workers' packet rates, per window.
    ratios: Vec<f64>,
    /// Live allocations per worker at the end of the last window.
    allocations: Vec<u64>,
    sent: u64,
    received: u64,
}

/// The daemon under test and what the client side shares.
struct Bench {
    daemon: turn_launch::Daemon,
    _root: turn_launch::PinRoot,
    maps: turn_server::steering::GroupMaps,
    server: SocketAddr,
    peer: UdpSocket,
    creds: Arc<Credentials>,
    next_index: u32,
}

impl Bench {
    fn start(workers: usize, mode: &str) -> Result<Bench> {
        let root = turn_launch::PinRoot::new("balance");
        let workers = workers.to_string();
        let daemon = turn_launch::Daemon::start(&[
            "--workers",
            &workers,
            "--steering",
            mode,
            "--user",
            &format!("{USER}:{PASSWORD}"),
            "--realm",
            REALM,
            "--allow-loopback-peers",
            "--bpf-pin-root",
            root.arg(),
            "--drain-timeout",
            "0",
            // Every client comes from 127.0.0.1: 64 first requests within 2 s would meet
            // the per-source limit of unauthenticated answers and wait for a retransmission.
            "--unauthenticated-responses-per-sec",
            "0",
        ]);
        let server = daemon.addr();
        let dir = turn_server::bpffs::listener_dir(&root.0, server);
        let maps = turn_server::steering::GroupMaps::open_pinned(&dir)
            .map_err(|e| anyhow::anyhow!("{}", turn_server::daemon::error_chain(&e)))
            .with_context(|| format!("opening the daemon's steering maps in {}", dir.display()))?;
        let peer = net::peer_socket()?;
        Ok(Bench {
            daemon,
            _root: root,
            maps,
            server,
            peer,
            creds: Arc::new(Credentials::new(USER, PASSWORD, Some(REALM))?),
            next_index: 0,
        })
    }

    /// Each worker's received-datagram counter, as the daemon publishes it.
    fn worker_packets(&self) -> Result<(Vec<u64>, Vec<u64>)> {
        let loads = self.maps.loads().map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok((
            loads.iter().map(|l| l.packets).collect(),
            loads.iter().map(|l| l.allocations).collect(),
        ))
    }

    fn stop(mut self) -> String {
        self.daemon.signal_and_wait(libc::SIGINT, Duration::from_secs(10));
        self.daemon.logs()
    }

    fn open_session(&mut self, plan: FlowPlan, now: Instant) -> Result<Session> {
        let sock = net::udp_socket(
            net::any_port_like(self.server),
            Some(self.server),
            SockOpts { buffer: Some(1 << 20), ..SockOpts::default() },
        )?;
        sock.set_nonblocking(true)?;
        self.next_index += 1;
        let mut client = Client::new(self.next_index, rand::random(), Arc::clone(&self.creds));
        client.start(Request::Allocate, now)?;
        let _ = sock.send(client.request_bytes());
        Ok(Session {
            plan,
            end: plan.life.map(|l| now + l),
            sock,
            client,
            state: State::Setup,
            script: VecDeque::new(),
            in_flight: Some(Request::Allocate),
            relayed: None,
            channel: 0x4000 + (self.next_index % 0x3000) as u16,
            next_up: now,
            next_down: now,
            next_refresh: now,
            sent_up: 0,
            sent_down: 0,
            received_down: 0,
        })
    }
}

fn start_request(s: &mut Session, req: Request, now: Instant) -> Result<()> {
    s.client.start(req, now)?;
    s.in_flight = Some(req);
    let _ = s.sock.send(s.client.request_bytes());
    Ok(())
}

/// Advances a session after `progress` of its transaction.
fn on_progress(s: &mut Session, progress: Progress, peer: SocketAddr, now: Instant) -> Result<()> {
    match progress {
        Progress::Ignored => {}
        Progress::Send => {
            let _ = s.sock.send(s.client.request_bytes());
        }
        Progress::Rebind => {
            // 437: a source port an earlier allocation still holds. Take a new one.
            let local = s.sock.local_addr()?;
            let server = s.sock.peer_addr()?;
            let fresh = net::udp_socket(
                SocketAddr::new(local.ip(), 0),
                Some(server),
                SockOpts { buffer: Some(1 << 20), ..SockOpts::default() },
            )?;
            fresh.set_nonblocking(true)?;
            s.sock = fresh;
            s.client.restart(Request::Allocate, now)?;
            let _ = s.sock.send(s.client.request_bytes());
        }
        Progress::Failed(e) => bail!("session {}: {e:#}", s.channel),
        Progress::Done(reply) => {
            let done = s.in_flight.take();
            match (s.state, done) {
                (State::Setup, Some(Request::Allocate)) => {
                    s.relayed = reply.relayed;
                    start_request(s, Request::ChannelBind { channel: s.channel, peer }, now)?;
                }
                (State::Setup, Some(Request::ChannelBind { .. })) => {
                    s.state = State::Active;
                    s.next_up = now;
                    s.next_down = now;
                    s.next_refresh = now + Duration::from_secs(1);
                }
                (State::Closing, _) => s.state = State::Done,
                _ => {
                    if let Some(next) = s.script.pop_front() {
                        start_request(s, next, now)?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Runs one trial against `bench`; returns its measurements.
fn run_trial(bench: &mut Bench, trial: &Trial) -> Result<TrialResult> {
    let start = Instant::now();
    let peer_addr = bench.peer.local_addr()?;
    let last_window = trial.windows.iter().map(|w| w.1).max().unwrap_or_default();
    let hard_stop = start + last_window + CLOSE_GRACE + Duration::from_secs(5);
    let mut epoll = Epoll::new(256)?;
    let peer_token = u64::MAX;
    epoll.add(bench.peer.as_raw_fd(), peer_token)?;
    let mut sessions: Vec<Session> = Vec::with_capacity(trial.flows.len());
    let mut next_flow = 0usize;
    let mut result = TrialResult::default();
    let mut window = 0usize;
    let mut window_start: Option<Vec<u64>> = None;
    let mut frame = vec![0u8; channel_data::CHANNEL_DATA_HEADER_LEN + PAYLOAD];
    let payload = [0x5au8; PAYLOAD];
    let mut buf = vec![0u8; 2048];
    let mut ready = Vec::new();
    let mut closing_all = false;
    loop {
        let now = Instant::now();
        if now > hard_stop {
            bail!(
                "the trial did not finish in time ({} sessions open)",
                sessions.iter().filter(|s| s.state != State::Done).count()
            );
        }
        let elapsed = now - start;
        // Arrivals.
        if next_flow == 0 && std::env::var_os("TURN_BENCH_DEBUG").is_some() {
            let loads = bench.maps.loads().map_err(|e| anyhow::anyhow!("{e}"))?;
            let placed = bench.maps.placed().map_err(|e| anyhow::anyhow!("{e}"))?;
            for (i, l) in loads.iter().enumerate() {
                eprintln!(
                    "  worker {i}: score {} allocations {} flow weight {} placed {}/{}",
                    l.score, l.allocations, l.flow_weight, placed[i], l.placed_seen
                );
            }
        }
        while next_flow < trial.flows.len() && trial.flows[next_flow].arrive <= elapsed {
            let s = bench.open_session(trial.flows[next_flow], now)?;
            epoll.add(s.sock.as_raw_fd(), sessions.len() as u64)?;
            sessions.push(s);
            next_flow += 1;
        }
        // Measurement windows.
        if let Some(&(from, to)) = trial.windows.get(window) {
            if window_start.is_none() && elapsed >= from {
                window_start = Some(bench.worker_packets()?.0);
            }
            if elapsed >= to
                && let Some(before) = window_start.take()
            {
                let (after, allocations) = bench.worker_packets()?;
                let rates: Vec<f64> =
                    after.iter().zip(&before).map(|(a, b)| a.saturating_sub(*b) as f64).collect();
                if let Some(r) = turn_server::inspect::busiest_over_mean(&rates) {
                    result.ratios.push(r);
                }
                if std::env::var_os("TURN_BENCH_DEBUG").is_some() {
                    eprintln!("  window {window}: packets {rates:?} allocations {allocations:?}");
                }
                result.allocations = allocations;
                window += 1;
            }
        }
        let trial_over = window >= trial.windows.len();
        if trial_over && !closing_all {
            closing_all = true;
        }
        // Sessions: ends, refreshes, retransmissions, traffic.
        for s in sessions.iter_mut() {
            if s.state == State::Done {
                continue;
            }
            let ending = closing_all || s.end.is_some_and(|e| now >= e);
            if ending && s.state != State::Closing && s.in_flight.is_none() {
                s.state = State::Closing;
                start_request(s, Request::Refresh { lifetime: 0 }, now)?;
            }
            if s.in_flight.is_some() {
                let progress = s.client.on_timeout(now);
                on_progress(s, progress, peer_addr, now)?;
            }
            if s.state != State::Active {
                continue;
            }
            if now >= s.next_refresh && s.in_flight.is_none() {
                s.next_refresh = now + REFRESH_EVERY;
                start_request(s, Request::Refresh { lifetime: 600 }, now)?;
            }
            pace(&mut s.next_up, s.plan.up_pps, now, || {
                let mut header = [0u8; 4];
                channel_data::write_header(&mut header, s.channel, PAYLOAD as u16);
                frame[..4].copy_from_slice(&header);
                frame[4..].copy_from_slice(&payload);
                if s.sock.send(&frame).is_ok() {
                    s.sent_up += 1;
                }
            });
            if let Some(relayed) = s.relayed {
                pace(&mut s.next_down, s.plan.down_pps, now, || {
                    if bench.peer.send_to(&payload, relayed).is_ok() {
                        s.sent_down += 1;
                    }
                });
            }
        }
        if closing_all
            && next_flow >= trial.flows.len()
            && sessions.iter().all(|s| s.state == State::Done)
        {
            break;
        }
        // Wait for answers, at most until the next due send.
        epoll.wait(Duration::from_millis(1), &mut ready)?;
        let now = Instant::now();
        for &token in &ready {
            if token == peer_token {
                while bench.peer.recv_from(&mut buf).is_ok() {}
                continue;
            }
            let Some(s) = sessions.get_mut(token as usize) else { continue };
            loop {
                match s.sock.recv(&mut buf) {
                    Ok(n) if n >= 4 && (0x40..0x80).contains(&buf[0]) => s.received_down += 1,
                    Ok(n) => {
                        let progress = s.client.on_message(&buf[..n], now);
                        on_progress(s, progress, peer_addr, now)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
                    Err(e) => return Err(e).context("receiving on a client socket"),
                }
            }
        }
    }
    result.sent = sessions.iter().map(|s| s.sent_up + s.sent_down).sum();
    result.received = sessions.iter().map(|s| s.received_down).sum();
    std::thread::sleep(trial.gap);
    Ok(result)
}

/// Calls `send` for every packet due at `now` at `pps`; a sender more than 100 ms late
/// skips ahead rather than bursting.
fn pace(next: &mut Instant, pps: f64, now: Instant, mut send: impl FnMut()) {
    if pps <= 0.0 {
        return;
    }
    let period = Duration::from_secs_f64(1.0 / pps);
    if now.saturating_duration_since(*next) > Duration::from_millis(100) {
        *next = now;
    }
    while *next <= now {
        send();
        *next += period;
    }
}

/// Results of one scenario in one mode.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub scenario: Scenario,
    pub mode: String,
    pub workers: usize,
    pub trials: usize,
    /// Mean over trials (churn: over the 0.5 s windows) of busiest / mean packet rate.
    pub mean: f64,
    pub p90: f64,
    pub max: f64,
    /// Allocations per worker at the end of the last trial.
    pub last_allocations: Vec<u64>,
    /// Datagrams the clients and the peer sent, and how many the clients received back.
    pub sent: u64,
    pub received_by_clients: u64,
    pub seed: u64,
}

/// Runs `scenario` in `mode` against a fresh daemon with `workers` workers.
pub fn run(
    scenario: Scenario,
    mode: &str,
    workers: usize,
    trial_count: Option<usize>,
    seed: u64,
) -> Result<Outcome> {
    let count = trial_count.unwrap_or_else(|| scenario.default_trials()).max(1);
    let mut rng = StdRng::seed_from_u64(seed ^ scenario as u64);
    let plan = trials(scenario, count, &mut rng);
    let mut bench = Bench::start(workers, mode)?;
    let mut ratios = Vec::new();
    let mut per_trial = Vec::new();
    let (mut sent, mut received, mut last_allocations) = (0, 0, Vec::new());
    for trial in &plan {
        let r =
            run_trial(&mut bench, trial).with_context(|| format!("{scenario:?} in {mode} mode"))?;
        if scenario == Scenario::Churn {
            ratios.extend(&r.ratios);
        }
        let mean = r.ratios.iter().sum::<f64>() / r.ratios.len().max(1) as f64;
        per_trial.push(mean);
        sent += r.sent;
        received += r.received;
        last_allocations = r.allocations;
    }
    let logs = bench.stop();
    if logs.contains("\"level\":\"ERROR\"") {
        bail!("the daemon logged errors:\n{logs}");
    }
    let mut values = if scenario == Scenario::Churn { ratios } else { per_trial };
    values.sort_by(f64::total_cmp);
    let at = |q: f64| {
        values
            .get(((values.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(0.0)
    };
    Ok(Outcome {
        scenario,
        mode: mode.to_owned(),
        workers,
        trials: count,
        mean: values.iter().sum::<f64>() / values.len().max(1) as f64,
        p90: at(0.9),
        max: values.last().copied().unwrap_or(0.0),
        last_allocations,
        sent,
        received_by_clients: received,
        seed,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_arrivals() {
        for scenario in Scenario::ALL {
            let a = trials(scenario, 2, &mut StdRng::seed_from_u64(7));
            let b = trials(scenario, 2, &mut StdRng::seed_from_u64(7));
            let key = |t: &[Trial]| {
                t.iter()
                    .flat_map(|t| {
                        t.flows
                            .iter()
                            .map(|f| (f.arrive, f.life, f.up_pps as u64, f.down_pps as u64))
                    })
                    .collect::<Vec<_>>()
            };
            assert_eq!(key(&a), key(&b), "{scenario:?}");
            assert!(a.iter().all(|t| !t.windows.is_empty()));
        }
    }

    #[test]
    fn scenarios_have_the_shapes_of_the_issue() {
        let mut rng = StdRng::seed_from_u64(1);
        let burst = &trials(Scenario::Bursts, 1, &mut rng)[0];
        assert_eq!(burst.flows.len(), 8);
        assert!(burst.flows.iter().all(|f| f.arrive < Duration::from_millis(5)));
        let skewed = &trials(Scenario::Skewed, 1, &mut rng)[0];
        let heavy = skewed.flows.iter().filter(|f| f.up_pps >= 10.0 * 50.0).count();
        assert_eq!((skewed.flows.len(), heavy), (64, 4));
        let rx = &trials(Scenario::ReceiveHeavy, 1, &mut rng)[0];
        assert_eq!(rx.flows.iter().filter(|f| f.down_pps >= 10.0 * f.up_pps).count(), 12);
        assert_eq!(rx.flows.len(), 24);
        let churn = &trials(Scenario::Churn, 1, &mut rng)[0];
        // About 4 arrivals a second for 75 s, about 32 live at a time.
        assert!((220..380).contains(&churn.flows.len()), "{}", churn.flows.len());
        let at = Duration::from_secs(40);
        let live = churn
            .flows
            .iter()
            .filter(|f| f.arrive <= at && f.arrive + f.life.unwrap() > at)
            .count();
        assert!((12..60).contains(&live), "{live} live at 40 s");
        assert_eq!(churn.windows.len(), 120);
    }

    #[test]
    fn pacing_sends_at_the_rate_and_skips_rather_than_bursts() {
        let t0 = Instant::now();
        let mut next = t0;
        let mut sent = 0;
        for ms in 0..=1000 {
            pace(&mut next, 200.0, t0 + Duration::from_millis(ms), || sent += 1);
        }
        assert!((200..=202).contains(&sent), "{sent}");
        let mut late = 0;
        pace(&mut next, 200.0, t0 + Duration::from_secs(5), || late += 1);
        assert_eq!(late, 1, "a stalled sender does not catch up with a burst");
    }
}
