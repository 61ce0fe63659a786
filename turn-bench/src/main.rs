//! `turn-bench`: benchmarks for turn-server.
//!
//! * `turn-bench balance --daemon`: busiest/mean per-worker packet rate of the release
//!   daemon driven by TURN clients, in the scenarios of the steering issue, hash vs p2c
//!   (vs least) on the same seeded arrivals.
//! * `turn-bench balance`: the steering program alone on a bare SO_REUSEPORT group, fed
//!   loads the benchmark computes itself (a model of the daemon, not the daemon).
//! * `turn-bench load`: relay load generator (M flows, each its own socket and allocation,
//!   ChannelData or Send indications to an embedded peer, optional echo): delivered
//!   packets/s, loss, fairness, round-trip latency, server CPU per relayed packet. With
//!   `--floor` the same through the bare forwarder.
//! * `turn-bench alloc`: allocations/s, server CPU per allocation, memory per live allocation.
//! * `turn-bench stream`: TURN over TCP or TLS: relay throughput either way, lossless or
//!   not, and server CPU per message. `turn-bench connect`: connection set-up rate (TCP
//!   or TLS, Allocate, Refresh 0, close) and server CPU per connection. `turn-bench
//!   gen-cert`: a certificate for TLS benchmarks on loopback.
//! * `turn-bench media`: calls (two allocations each, audio and video both ways, relay to
//!   relay): calls without loss, server CPU per forwarded packet, one-way latency; with
//!   `--direct` the same exchange without a relay.
//! * `turn-bench peer`: a standalone counting (and echoing) peer.
//! * `turn-bench floor`: the bare UDP forwarder (recvmmsg/sendmmsg, no TURN work).
//!
//! Everything but `balance` sends to loopback addresses only and stops by itself.

mod alloc;
mod balance;
mod daemon_balance;
mod floor;
mod load;
mod media;
mod net;
mod pacing;
mod payload;
mod peer;
mod procfs;
mod report;
mod session;
mod stats;
mod stream;

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// Default socket buffer for the peer and forwarder sockets (forced past rmem_max as root).
const DEFAULT_BUFFER: usize = 4 << 20;

fn secs(v: f64, what: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(v)
        .with_context(|| format!("{what}: {v} is not a valid number of seconds"))
}

/// The long-term credentials `--server` needs (empty without a server).
fn credentials(
    server: Option<SocketAddr>,
    user: Option<String>,
    password: Option<String>,
) -> Result<(String, String)> {
    match (server, user, password) {
        (Some(_), Some(u), Some(p)) => Ok((u, p)),
        (Some(_), _, _) => bail!("--server needs --user and --password"),
        (None, u, p) => Ok((u.unwrap_or_default(), p.unwrap_or_default())),
    }
}

/// The measurement timeline of `load` and `media`.
#[derive(clap::Args, Clone, Copy)]
struct Timing {
    /// Measured interval, seconds.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Traffic before the measured interval, seconds.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Time after the interval for packets in flight to arrive, seconds.
    #[arg(long, default_value_t = 0.5)]
    drain: f64,
}

impl Timing {
    /// (duration, warmup, drain), checked.
    fn durations(self) -> Result<(Duration, Duration, Duration)> {
        Ok((
            secs(self.duration, "--duration")?,
            secs(self.warmup, "--warmup")?,
            bounded(self.drain, "--drain")?,
        ))
    }
}

#[derive(Parser)]
#[command(name = "turn-bench", about = "Benchmarks for turn-server")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Steering balance. With --daemon: the release turn-server driven by TURN clients
    /// (what users run). Without: the program alone on a bare SO_REUSEPORT group with
    /// loads the benchmark publishes itself (a model). Needs root (BPF). Loopback only.
    Balance {
        /// Through the daemon: start target/release/turn-server (or $TURN_SERVER_BIN) per
        /// scenario and mode, drive it with TURN clients, read its per-worker counters.
        #[arg(long)]
        daemon: bool,
        /// --daemon: workers of the daemon.
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// --daemon: steering modes compared, in order.
        #[arg(long, value_delimiter = ',', default_value = "hash,p2c")]
        modes: Vec<String>,
        /// --daemon: only these scenarios (repeat or comma-separate); all when not given.
        #[arg(long, value_enum, value_delimiter = ',')]
        scenario: Vec<daemon_balance::Scenario>,
        /// --daemon: seed of the arrivals, weights and lifetimes (the same for every mode).
        #[arg(long, default_value_t = 9)]
        seed: u64,
        /// Trials per case and mode (--daemon: per scenario; default depends on it).
        #[arg(long)]
        trials: Option<usize>,
        /// Flow arrival relative to load updates; both when not given.
        #[arg(long, value_enum)]
        arrival: Option<balance::Arrival>,
        /// Only this case (1 to 4, in the order of the table); all when not given.
        #[arg(long)]
        case: Option<usize>,
        /// Print JSON lines instead of a markdown table.
        #[arg(long)]
        json: bool,
    },
    /// Relay load: M flows through a TURN server (or the floor forwarder) to an embedded
    /// peer. Loopback only.
    Load {
        /// TURN server (UDP).
        #[arg(long, required_unless_present_any = ["floor", "direct"], conflicts_with_all = ["floor", "direct"])]
        server: Option<SocketAddr>,
        /// Instead of TURN: send raw payloads to this bare forwarder (`turn-bench floor`,
        /// whose --to must be this run's --peer).
        #[arg(long, conflicts_with = "direct")]
        floor: Option<SocketAddr>,
        /// No relay: every flow sends its payloads straight to the peer (which, with --echo,
        /// sends them straight back). What the generator alone costs the machine, to
        /// subtract from a relayed run's whole-machine CPU.
        #[arg(long)]
        direct: bool,
        /// Long-term credentials user (needed with --server).
        #[arg(long, short = 'u')]
        user: Option<String>,
        /// Long-term credentials password (needed with --server).
        #[arg(long, short = 'w')]
        password: Option<String>,
        /// Expected realm (the server's must match); learnt from the server when absent.
        #[arg(long)]
        realm: Option<String>,
        /// Flows: each its own socket (5-tuple) and allocation.
        #[arg(long, default_value_t = 8)]
        flows: usize,
        /// Packets/s per flow (paced by a token bucket per sender thread).
        #[arg(long, required_unless_present = "flat_out", conflicts_with = "flat_out")]
        rate: Option<f64>,
        /// Send as fast as the sender threads can (batches of --batch per flow).
        #[arg(long)]
        flat_out: bool,
        /// The first N flows are heavy: they send at --heavy-rate (on a sender thread of
        /// their own), the others at --rate.
        #[arg(long, default_value_t = 0, requires = "heavy_rate")]
        heavy: usize,
        /// Packets/s per heavy flow.
        #[arg(long, requires = "heavy")]
        heavy_rate: Option<f64>,
        /// Payload bytes (application data, at least 24).
        #[arg(long, default_value_t = 160)]
        size: usize,
        #[command(flatten)]
        timing: Timing,
        /// Send indications instead of ChannelData (no ChannelBind; echoes come back as
        /// Data indications).
        #[arg(long)]
        send_indications: bool,
        /// The peer echoes every datagram back through the relay; adds round-trip latency.
        #[arg(long)]
        echo: bool,
        /// PID of the server (or floor) process: its CPU time per relayed packet.
        #[arg(long)]
        server_pid: Option<u32>,
        #[arg(long)]
        json: bool,
        /// Address of the embedded peer.
        #[arg(long, default_value = "127.0.0.1:0")]
        peer: SocketAddr,
        #[arg(long, default_value_t = 1)]
        peer_threads: usize,
        /// One peer socket (port) per flow, served by --peer-threads threads: for a server
        /// that refuses two allocations the same peer address (coturn's --multiplex-peer).
        #[arg(long)]
        peer_per_flow: bool,
        /// Sender threads (flows are split between them); also the echo receiver threads.
        #[arg(long, default_value_t = 1)]
        sender_threads: usize,
        /// Datagrams per sendmmsg / recvmmsg.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Setup transactions in flight.
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
        /// Peer socket buffer bytes.
        #[arg(long, default_value_t = DEFAULT_BUFFER)]
        buffer: usize,
    },
    /// Allocation rate, server CPU per allocation and memory per live allocation. Loopback only.
    Alloc {
        #[arg(long)]
        server: SocketAddr,
        /// Long-term credentials user.
        #[arg(long, short = 'u')]
        user: String,
        /// Long-term credentials password.
        #[arg(long, short = 'w')]
        password: String,
        #[arg(long)]
        realm: Option<String>,
        /// Allocations (each its own socket, all held at once).
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long)]
        server_pid: Option<u32>,
        /// Transactions in flight.
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
        /// Seconds to wait before reading the server's memory.
        #[arg(long, default_value_t = 0.2)]
        settle: f64,
        /// Seconds to keep the allocations after measuring, before deleting them.
        #[arg(long, default_value_t = 0.0)]
        hold: f64,
        /// Refresh every allocation once after the hold (refreshes/s, CPU per refresh).
        #[arg(long)]
        refresh: bool,
        /// Send indications per second through the held allocations (in turn) to an
        /// embedded peer during the hold; each allocation gets a permission for it.
        #[arg(long, default_value_t = 0.0)]
        trickle: f64,
        #[arg(long)]
        json: bool,
    },
    /// Calls through the relay, as WebRTC makes them: two clients per call, each with its
    /// own allocation, sending audio and video to the other end's relayed address (every
    /// packet crosses the server twice). Loss per call, server CPU per forwarded packet,
    /// one-way latency. With --direct: the same exchange without a relay. Loopback only.
    Media {
        /// TURN server (UDP).
        #[arg(long, required_unless_present = "direct", conflicts_with = "direct")]
        server: Option<SocketAddr>,
        /// The same calls socket to socket, no relay (the latency baseline).
        #[arg(long)]
        direct: bool,
        /// Long-term credentials user (needed with --server).
        #[arg(long, short = 'u')]
        user: Option<String>,
        /// Long-term credentials password (needed with --server).
        #[arg(long, short = 'w')]
        password: Option<String>,
        #[arg(long)]
        realm: Option<String>,
        /// Concurrent calls (two clients, two allocations each).
        #[arg(long, default_value_t = 10)]
        calls: usize,
        /// Audio packets/s each end sends.
        #[arg(long, default_value_t = 50.0)]
        audio_pps: f64,
        #[arg(long, default_value_t = 160)]
        audio_size: usize,
        /// Video packets/s each end sends (100 x 1,200 B is about 1 Mbit/s).
        #[arg(long, default_value_t = 100.0)]
        video_pps: f64,
        #[arg(long, default_value_t = 1200)]
        video_size: usize,
        #[command(flatten)]
        timing: Timing,
        /// PID of the server process: its CPU time per forwarded packet.
        #[arg(long)]
        server_pid: Option<u32>,
        /// Generator threads (each owns whole calls).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Setup transactions in flight.
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
        #[arg(long)]
        json: bool,
    },
    /// TURN over TCP or TLS: M connections, each an allocation with a channel, messages
    /// at a paced total rate to (up) or from (down) an embedded peer. Loopback only.
    Stream {
        #[command(flatten)]
        target: stream::Target,
        #[arg(long, value_enum, default_value = "up")]
        direction: stream::Direction,
        #[arg(long, default_value_t = 8)]
        flows: usize,
        /// Messages per second, all flows together.
        #[arg(long, default_value_t = 20_000.0)]
        rate: f64,
        /// Payload bytes per message.
        #[arg(long, default_value_t = 200)]
        size: usize,
        /// Seconds measured (after the warm-up).
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Seconds to wait for messages still on their way after the window.
        #[arg(long, default_value_t = 1.0)]
        drain: f64,
        #[arg(long)]
        json: bool,
    },
    /// Connection set-up rate over TCP or TLS: connect, handshake, Allocate (with its 401
    /// round), Refresh 0, close; N connections, C at a time. Loopback only.
    Connect {
        #[command(flatten)]
        target: stream::Target,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        #[arg(long)]
        json: bool,
    },
    /// Writes a self-signed certificate for localhost and 127.0.0.1 (cert.pem, key.pem)
    /// into DIR, for the TLS benchmarks.
    GenCert { dir: std::path::PathBuf },
    /// A peer: counts datagrams per source, optionally echoes them back. Loopback only.
    Peer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        echo: bool,
        /// Seconds to run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Sockets (an SO_REUSEPORT group when more than one), one thread each.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(long, default_value_t = DEFAULT_BUFFER)]
        buffer: usize,
        #[arg(long)]
        json: bool,
    },
    /// Bare UDP forwarder (recvmmsg/sendmmsg, no TURN work): the floor. Loopback only.
    Floor {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        to: SocketAddr,
        /// Sockets on --listen (an SO_REUSEPORT group when more than one), one thread each.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Seconds to run.
        #[arg(long, default_value_t = 30.0)]
        duration: f64,
        /// Datagrams per recvmmsg / sendmmsg.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        #[arg(long, default_value_t = DEFAULT_BUFFER)]
        buffer: usize,
        #[arg(long)]
        json: bool,
    },
}

/// Longest a standalone peer or floor runs.
const MAX_STANDALONE: Duration = Duration::from_secs(3600);

/// Prints a report: one JSON line, or its text.
fn emit<T: serde::Serialize>(json: bool, report: &T, text: String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        println!("{text}");
    }
    Ok(())
}

fn bounded(v: f64, what: &str) -> Result<Duration> {
    let d = secs(v, what)?;
    if d > MAX_STANDALONE {
        bail!("{what} is at most {} s", MAX_STANDALONE.as_secs());
    }
    Ok(d)
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Load {
            server,
            floor,
            direct,
            user,
            password,
            realm,
            flows,
            rate,
            flat_out,
            heavy,
            heavy_rate,
            size,
            timing,
            send_indications,
            echo,
            server_pid,
            json,
            peer,
            peer_threads,
            peer_per_flow,
            sender_threads,
            batch,
            in_flight,
            buffer,
        } => {
            let (user, password) = credentials(server, user, password)?;
            let (duration, warmup, drain) = timing.durations()?;
            let args = load::LoadArgs {
                server,
                floor,
                direct,
                user,
                password,
                realm,
                flows,
                rate: if flat_out { None } else { rate },
                heavy,
                heavy_rate,
                size,
                duration,
                warmup,
                drain,
                send_indications,
                echo,
                server_pid,
                peer,
                peer_threads,
                peer_per_flow,
                sender_threads,
                batch,
                in_flight,
                buffer,
            };
            let report = load::run(args)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.text());
            }
            Ok(())
        }
        Cmd::Media {
            server,
            direct: _,
            user,
            password,
            realm,
            calls,
            audio_pps,
            audio_size,
            video_pps,
            video_size,
            timing,
            server_pid,
            threads,
            in_flight,
            json,
        } => {
            let (user, password) = credentials(server, user, password)?;
            let (duration, warmup, drain) = timing.durations()?;
            let report = media::run(media::MediaArgs {
                server,
                user,
                password,
                realm,
                calls,
                audio_pps,
                audio_size,
                video_pps,
                video_size,
                duration,
                warmup,
                drain,
                server_pid,
                threads,
                in_flight,
            })?;
            emit(json, &report, report.text())
        }
        Cmd::Stream { target, direction, flows, rate, size, duration, warmup, drain, json } => {
            let report = stream::run_stream(&stream::StreamArgs {
                target,
                direction,
                flows,
                rate,
                size,
                duration: bounded(duration, "--duration")?,
                warmup: bounded(warmup, "--warmup")?,
                drain: bounded(drain, "--drain")?,
            })?;
            emit(json, &report, report.text())
        }
        Cmd::Connect { target, connections, concurrency, json } => {
            let report =
                stream::run_connect(&stream::ConnectArgs { target, connections, concurrency })?;
            emit(json, &report, report.text())
        }
        Cmd::GenCert { dir } => stream::gen_cert(&dir),
        Cmd::Alloc {
            server,
            user,
            password,
            realm,
            count,
            server_pid,
            in_flight,
            settle,
            hold,
            refresh,
            trickle,
            json,
        } => {
            let report = alloc::run(alloc::AllocArgs {
                server,
                user,
                password,
                realm,
                count,
                server_pid,
                in_flight,
                settle: bounded(settle, "--settle")?,
                hold: bounded(hold, "--hold")?,
                refresh,
                trickle,
            })?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.text());
            }
            Ok(())
        }
        Cmd::Peer { listen, echo, duration, threads, buffer, json } => peer::run_standalone(
            listen,
            echo,
            bounded(duration, "--duration")?,
            threads,
            buffer,
            json,
        ),
        Cmd::Floor { listen, to, threads, duration, batch, buffer, json } => {
            if batch == 0 || batch > 1024 {
                bail!("--batch must be 1 to 1024");
            }
            floor::run(listen, to, threads, bounded(duration, "--duration")?, batch, buffer, json)
        }
        Cmd::Balance { daemon: true, workers, modes, scenario, seed, trials, json, .. } => {
            run_daemon_balance(workers, &modes, &scenario, seed, trials, json)
        }
        Cmd::Balance { trials, arrival, case: only, json, .. } => {
            let trials = trials.unwrap_or(200);
            let arrivals = match arrival {
                Some(a) => vec![a],
                None => vec![balance::Arrival::Sequential, balance::Arrival::Burst],
            };
            if !json {
                println!(
                    "| case | arrival | kernel hash mean / p99 | program hash mean / p99 | p2c mean / p99 | p2c target | hash expected |"
                );
                println!("| --- | --- | --- | --- | --- | --- | --- |");
            }
            for (number, case) in balance::cases().into_iter().enumerate() {
                if only.is_some_and(|n| n != number + 1) {
                    continue;
                }
                for &arrival in &arrivals {
                    let mut row = Vec::new();
                    for steer in [balance::Steer::Kernel, balance::Steer::Hash, balance::Steer::P2c]
                    {
                        let outcome = balance::run(&case, steer, arrival, trials)?;
                        if json {
                            println!("{}", serde_json::to_string(&outcome)?);
                        }
                        row.push(outcome);
                    }
                    if !json {
                        let cell = |o: &balance::Outcome| format!("{:.3} / {:.3}", o.mean, o.p99);
                        println!(
                            "| {} | {:?} | {} | {} | {} | <= {:.2} | about {:.2} |",
                            case.name,
                            arrival,
                            cell(&row[0]),
                            cell(&row[1]),
                            cell(&row[2]),
                            case.p2c_target,
                            case.hash_expected
                        );
                    }
                }
            }
            if !json {
                println!(
                    "\n{trials} trials per cell; busiest / mean of datagrams received per socket."
                );
            }
            Ok(())
        }
    }
}

fn run_daemon_balance(
    workers: usize,
    modes: &[String],
    only: &[daemon_balance::Scenario],
    seed: u64,
    trials: Option<usize>,
    json: bool,
) -> Result<()> {
    for mode in modes {
        if !["hash", "p2c", "least", "off"].contains(&mode.as_str()) {
            bail!("--modes: {mode:?} is not one of hash, p2c, least, off");
        }
    }
    if !(1..=64).contains(&workers) {
        bail!("--workers must be 1 to 64");
    }
    let scenarios: Vec<_> =
        if only.is_empty() { daemon_balance::Scenario::ALL.to_vec() } else { only.to_vec() };
    if !json {
        let header: Vec<String> = modes.iter().map(|m| format!("{m} mean / p90")).collect();
        println!("| scenario | {} | p2c target |", header.join(" | "));
        println!("| --- |{} ---: |", " ---: |".repeat(modes.len()));
    }
    for scenario in scenarios {
        let mut cells = Vec::new();
        for mode in modes {
            let outcome = daemon_balance::run(scenario, mode, workers, trials, seed)?;
            if json {
                println!("{}", serde_json::to_string(&outcome)?);
            } else {
                eprintln!(
                    "turn-bench: {:?} {mode}: mean {:.3} p90 {:.3} max {:.3} over {} trials; last allocations {:?}",
                    scenario,
                    outcome.mean,
                    outcome.p90,
                    outcome.max,
                    outcome.trials,
                    outcome.last_allocations
                );
            }
            cells.push(format!("{:.3} / {:.3}", outcome.mean, outcome.p90));
        }
        if !json {
            println!(
                "| {} | {} | <= {:.2} |",
                scenario.label(),
                cells.join(" | "),
                scenario.target()
            );
        }
    }
    if !json {
        println!(
            "\nbusiest / mean of the {workers} workers' packet rates (the daemon's own counters), seed {seed}; \
             trials: mean over trials, p90 of trials (churn: over 0.5 s windows)."
        );
    }
    Ok(())
}
