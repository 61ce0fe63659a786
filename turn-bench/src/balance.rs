//! Balance of a listener group through the real kernel path.
//!
//! Each trial builds a fresh SO_REUSEPORT group of N sockets on 127.0.0.1, attaches the
//! steering program in the mode under test (or none: the kernel's own hash), and starts
//! the case's flows, each from its own UDP socket (a distinct source port), in a random
//! order. Every flow then sends `weight x PACKETS_PER_WEIGHT` datagrams and each socket
//! counts what it received: the trial's figure is busiest / mean of those counts.
//!
//! Load publication emulates the daemon: in `sequential` arrival the load of each socket
//! is published after every new flow (the weights of the flows it carries, as the daemon's
//! packet rate average reports once a flow has been sending for a while); in `burst`
//! arrival nothing is published while the flows arrive (every flow lands between two
//! updates) and P2C relies on the program's own count of flows placed since.

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use rand::seq::SliceRandom;
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};
use turn_common::{Mode, SocketLoad};
use turn_server::steering::{Steering, SteeringOptions};

/// Datagrams a flow of weight 1 sends in the measured phase.
const PACKETS_PER_WEIGHT: usize = 10;
/// Load units of one packet/s-weight, so integer scores keep precision.
const LOAD_UNIT: u64 = 1000;

/// A workload: sockets in the group and the weight (relative packet rate) of each flow.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: &'static str,
    pub sockets: usize,
    pub weights: Vec<u32>,
    /// Expected busiest/mean with the kernel hash and with P2C (from the issue and theory).
    pub hash_expected: f64,
    pub p2c_target: f64,
}

/// The four cases of the steering issue.
pub fn cases() -> Vec<Case> {
    let mut skewed = vec![10u32; 4];
    skewed.extend(std::iter::repeat_n(1, 60));
    vec![
        Case {
            name: "8 equal flows on 4 sockets",
            sockets: 4,
            weights: vec![1; 8],
            hash_expected: 1.78,
            p2c_target: 1.35,
        },
        Case {
            name: "64 equal flows on 4 sockets",
            sockets: 4,
            weights: vec![1; 64],
            hash_expected: 1.26,
            p2c_target: 1.06,
        },
        Case {
            name: "8 equal flows on 2 sockets",
            sockets: 2,
            weights: vec![1; 8],
            hash_expected: 1.28,
            p2c_target: 1.02,
        },
        Case {
            name: "skewed: 4 flows at 10x + 60 flows, 4 sockets",
            sockets: 4,
            weights: skewed,
            hash_expected: 1.48,
            p2c_target: 1.20,
        },
    ]
}

/// How flows arrive relative to load updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Arrival {
    /// Load published after each new flow.
    Sequential,
    /// No load update while the flows arrive.
    Burst,
}

/// What steers the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Steer {
    /// No program: the kernel's SO_REUSEPORT hash.
    Kernel,
    /// The program in hash mode.
    Hash,
    /// The program in p2c mode.
    P2c,
}

/// Results of one (case, steer, arrival) over all trials.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub case: String,
    pub steer: Steer,
    pub arrival: Arrival,
    pub trials: usize,
    pub mean: f64,
    pub p99: f64,
    pub max: f64,
}

fn bind_group(n: usize) -> Result<(Vec<UdpSocket>, SocketAddr)> {
    let mut addr: SocketAddr = "127.0.0.1:0".parse()?;
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_reuse_port(true)?;
        let _ = socket.set_recv_buffer_size(4 << 20);
        socket.bind(&addr.into())?;
        let socket: UdpSocket = socket.into();
        socket.set_nonblocking(true)?;
        addr = socket.local_addr()?;
        sockets.push(socket);
    }
    Ok((sockets, addr))
}

/// Receives until `want` datagrams arrived; returns the count per socket.
fn receive(group: &[UdpSocket], want: usize) -> Result<Vec<usize>> {
    let mut counts = vec![0usize; group.len()];
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(5);
    while counts.iter().sum::<usize>() < want {
        let mut idle = true;
        for (i, socket) in group.iter().enumerate() {
            while socket.recv_from(&mut buf).is_ok() {
                counts[i] += 1;
                idle = false;
            }
        }
        if idle {
            if Instant::now() > deadline {
                bail!("lost datagrams: {} of {want} arrived", counts.iter().sum::<usize>());
            }
            std::thread::yield_now();
        }
    }
    Ok(counts)
}

fn publish(
    steering: &mut Steering,
    weights_on: &[u64],
    flows_on: &[u64],
    mean_weight: u64,
) -> Result<()> {
    let placed = steering.maps().placed()?;
    for i in 0..weights_on.len() {
        let load = SocketLoad {
            score: weights_on[i] * LOAD_UNIT,
            allocations: flows_on[i],
            placed_seen: placed[i],
            flow_weight: mean_weight.max(1),
            ..SocketLoad::default()
        };
        steering.maps_mut().set_load(i as u32, load)?;
    }
    Ok(())
}

/// One trial: busiest / mean of packets per socket.
pub fn trial(case: &Case, steer: Steer, arrival: Arrival, rng: &mut impl rand::Rng) -> Result<f64> {
    let (group, addr) = bind_group(case.sockets)?;
    let mut steering = match steer {
        Steer::Kernel => None,
        Steer::Hash | Steer::P2c => {
            let mode = if steer == Steer::Hash { Mode::Hash } else { Mode::P2c };
            Some(
                Steering::attach(&group, mode, SteeringOptions::default())
                    .context("attaching steering (root?)")?,
            )
        }
    };
    let mut order = case.weights.clone();
    order.shuffle(rng);
    let mean_weight = LOAD_UNIT * u64::from(order.iter().sum::<u32>()) / order.len() as u64;
    let n = case.sockets;
    let (mut weights_on, mut flows_on) = (vec![0u64; n], vec![0u64; n]);
    if let Some(s) = steering.as_mut() {
        // Nothing has arrived yet: every flow weighs the same until traffic shows.
        publish(s, &weights_on, &flows_on, LOAD_UNIT)?;
    }
    let mut clients = Vec::with_capacity(order.len());
    for &weight in &order {
        let client = UdpSocket::bind("127.0.0.1:0")?;
        client.send_to(b"hello", addr)?;
        let counts = receive(&group, 1)?;
        let socket = counts.iter().position(|&c| c == 1).context("first datagram not received")?;
        weights_on[socket] += u64::from(weight);
        flows_on[socket] += 1;
        if arrival == Arrival::Sequential
            && let Some(s) = steering.as_mut()
        {
            publish(s, &weights_on, &flows_on, mean_weight)?;
        }
        clients.push((client, weight));
    }
    let payload = [0x5au8; 100];
    let mut sent = 0usize;
    for (client, weight) in &clients {
        for _ in 0..(*weight as usize * PACKETS_PER_WEIGHT) {
            client.send_to(&payload, addr)?;
            sent += 1;
        }
    }
    let counts = receive(&group, sent)?;
    if let Some(s) = steering.take() {
        s.detach(Some(std::os::fd::AsFd::as_fd(&group[0])), false)?;
    }
    let mean = sent as f64 / n as f64;
    Ok(counts.iter().copied().max().unwrap_or(0) as f64 / mean)
}

/// Runs `trials` trials of a case and summarizes them.
pub fn run(case: &Case, steer: Steer, arrival: Arrival, trials: usize) -> Result<Outcome> {
    let mut rng = rand::rng();
    let mut values =
        (0..trials).map(|_| trial(case, steer, arrival, &mut rng)).collect::<Result<Vec<f64>>>()?;
    values.sort_by(f64::total_cmp);
    let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
    let p99 = values
        .get(((values.len() as f64 * 0.99).ceil() as usize).saturating_sub(1))
        .copied()
        .unwrap_or(0.0);
    Ok(Outcome {
        case: case.name.to_owned(),
        steer,
        arrival,
        trials,
        mean,
        p99,
        max: values.last().copied().unwrap_or(0.0),
    })
}
