//! The daemon: binds the listener groups, attaches steering, starts the workers, and runs
//! the control loop (signals, load publishing, eBPF logs) until it is told to stop.

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::AsFd,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing::{error, info, warn};
use turn_common::{Mode, SocketLoad};

use crate::{
    config::{Config, SteeringMode},
    listener::{ListenerGroup, bind_group},
    protocol::Protocol,
    steering::{Steering, SteeringOptions},
    worker::{self, RunState, WorkerSetup, WorkerStats},
};

/// How often the control thread publishes worker loads to the steering maps.
const LOAD_PUBLISH_INTERVAL: Duration = Duration::from_millis(50);

/// A listener group with its steering program, if any.
struct SteeredGroup {
    local: SocketAddr,
    steering: Option<Steering>,
    /// A second handle on socket 0, kept to detach the program at shutdown.
    member: UdpSocket,
}

/// Runs the daemon until SIGINT or SIGTERM. Returns once every worker has stopped and
/// every steering program is detached.
pub fn run(config: Config) -> Result<()> {
    let workers = config.worker_count();
    let realm = config.realm();
    // Signal handlers first: a SIGTERM that arrives during startup must still drain.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let signals = {
        let _context = runtime.enter();
        Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        }
    };

    let mut groups = Vec::new();
    let mut worker_sockets: Vec<Vec<UdpSocket>> = (0..workers).map(|_| Vec::new()).collect();
    for ip in &config.listening_ips {
        let addr = SocketAddr::new(*ip, config.listening_port);
        let ListenerGroup { local, sockets } = bind_group(addr, workers)
            .with_context(|| format!("listening on {addr} with {workers} sockets"))?;
        let member = sockets[0].try_clone()?;
        let steering = attach_steering(&config, local, &sockets)?;
        for (i, socket) in sockets.into_iter().enumerate() {
            worker_sockets[i].push(socket);
        }
        groups.push(SteeredGroup {
            local,
            steering,
            member,
        });
    }

    let (state_tx, state_rx) = watch::channel(RunState::Running);
    let mut handles = Vec::with_capacity(workers);
    let mut stats = Vec::with_capacity(workers);
    for (index, listeners) in worker_sockets.into_iter().enumerate() {
        let worker_stats = Arc::new(WorkerStats::default());
        stats.push(Arc::clone(&worker_stats));
        handles.push(worker::spawn(WorkerSetup {
            index,
            listeners,
            protocol: Protocol::new(&config),
            stats: worker_stats,
            state: state_rx.clone(),
        })?);
    }
    for group in &groups {
        let mode = group
            .steering
            .as_ref()
            .map_or("off (kernel hash)", |s| match s.mode() {
                Mode::P2c => "p2c",
                Mode::Hash => "hash",
                Mode::Kernel => "kernel",
            });
        info!(listen = %group.local, workers, steering = mode, %realm, "listening (UDP)");
    }

    let outcome = runtime.block_on(control_loop(signals, &mut groups, &stats, &handles));

    let _ = state_tx.send(RunState::Stop);
    for group in groups.drain(..) {
        if let Some(steering) = group.steering {
            match steering.detach(group.member.as_fd()) {
                Ok(()) => info!(listen = %group.local, "steering program detached"),
                Err(e) => warn!(listen = %group.local, error = %e, "detaching steering failed"),
            }
        }
    }
    for (index, handle) in handles.into_iter().enumerate() {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(worker = index, error = %format!("{e:#}"), "worker failed"),
            Err(_) => error!(worker = index, "worker panicked"),
        }
    }
    outcome
}

fn attach_steering(
    config: &Config,
    local: SocketAddr,
    sockets: &[UdpSocket],
) -> Result<Option<Steering>> {
    let mode = match config.steering {
        SteeringMode::Off => return Ok(None),
        SteeringMode::Auto | SteeringMode::P2c => Mode::P2c,
        SteeringMode::Hash => Mode::Hash,
    };
    let options = SteeringOptions {
        pin_entries: config.steering_pin_entries,
    };
    match Steering::attach(sockets, mode, options) {
        Ok(steering) => Ok(Some(steering)),
        Err(e) if config.steering == SteeringMode::Auto => {
            warn!(
                listen = %local,
                error = %error_chain(&e),
                "eBPF steering unavailable: serving with the kernel's SO_REUSEPORT hash \
                 (set `steering = \"off\"` to silence this, run as root for p2c)"
            );
            Ok(None)
        }
        Err(e) => bail!(
            "steering {:?} was asked for but cannot be set up on {local}: {}",
            config.steering,
            error_chain(&e)
        ),
    }
}

/// Formats an error with its sources, `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

async fn control_loop(
    mut signals: Signals,
    groups: &mut [SteeredGroup],
    stats: &[Arc<WorkerStats>],
    workers: &[std::thread::JoinHandle<Result<()>>],
) -> Result<()> {
    let mut tick = tokio::time::interval(LOAD_PUBLISH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = signals.term.recv() => { info!("SIGTERM: stopping"); return Ok(()); }
            _ = signals.int.recv() => { info!("SIGINT: stopping"); return Ok(()); }
            _ = tick.tick() => {
                if let Some(i) = workers.iter().position(|w| w.is_finished()) {
                    bail!("worker {i} stopped unexpectedly");
                }
                publish_loads(groups, stats);
            }
        }
    }
}

/// Writes each worker's load into its slot of every steered group.
fn publish_loads(groups: &mut [SteeredGroup], stats: &[Arc<WorkerStats>]) {
    for group in groups.iter_mut() {
        let Some(steering) = group.steering.as_mut() else {
            continue;
        };
        for (i, worker) in stats.iter().enumerate() {
            let allocations = worker.allocations.load(Ordering::Relaxed);
            let load = SocketLoad {
                score: allocations,
                allocations,
            };
            if let Err(e) = steering.set_load(i as u32, load) {
                warn!(error = %e, "publishing load failed");
            }
        }
    }
}
