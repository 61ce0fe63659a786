//! `turn-server load` and `turn-server steering set`: read and change a running daemon's
//! steering through the maps it pinned in bpffs. Nothing here goes through the daemon's
//! threads, so it answers while the daemon is under load; who may use it is decided by
//! the pins' file permissions (root, or root and the configured admin group).

use std::{
    io,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use serde::Serialize;
use turn_common::Mode;

use crate::{
    bpffs::{self, LiveListener},
    steering::GroupMaps,
};

/// One socket (= one worker) of a listener group.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SocketRow {
    /// The process (generation) the socket belongs to, and its worker there.
    pub pid: u32,
    pub worker: u32,
    /// Live allocations of the worker.
    pub allocations: u64,
    /// Allocation pins naming this socket.
    pub pinned_allocations: u64,
    /// Flows the program remembers on this socket that are not allocations (unexpired).
    pub memo_flows: u64,
    /// Datagrams the worker received per second, all its sockets (listeners of every
    /// address, relays, hand-offs): what its load is made of.
    pub packets_per_sec: f64,
    /// Datagrams the kernel fast path relayed per second for the worker's allocations (not
    /// in `packets_per_sec`: the worker never saw them).
    pub kernel_per_sec: f64,
    /// Datagrams the program steered to this socket per second (this listener only).
    pub steered_per_sec: f64,
    /// Bytes the program steered to this socket per second.
    pub bytes_per_sec: f64,
    /// New flows the program placed on this socket per second.
    pub new_flows_per_sec: f64,
    /// Fraction of the workers' packets in the interval (0 to 1).
    pub share: f64,
    /// The load score the program compares, and the weight of one new flow.
    pub score: u64,
    pub flow_weight: u64,
    /// Since start: datagrams handed to / from the worker owning their allocation, and
    /// hand-offs dropped (owner's inbox full).
    pub handed_off: u64,
    pub handed_in: u64,
    pub handoff_drops: u64,
    /// Hand-offs waiting in the worker's inbox now.
    pub inbox_queued: u64,
    /// Bytes waiting in the worker's listener sockets now, and datagrams the kernel
    /// dropped there since start (receive buffer full).
    pub rx_queued_bytes: u64,
    pub rx_drops: u64,
    /// Allocation pins that could not be written (pin map full), since start.
    pub pin_failures: u64,
    /// Failed authentications, and requests per-source limits left unanswered or
    /// unverified, since start.
    pub auth_failures: u64,
    pub rate_limited: u64,
}

/// A listener group.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GroupReport {
    pub listener: String,
    /// Processes steering the group.
    pub owners: Vec<u32>,
    /// The generations of the daemon in the group: two while an upgrade's old process
    /// still serves its allocations.
    pub generations: Vec<GenerationReport>,
    pub mode: String,
    pub sockets: Vec<SocketRow>,
    /// Busiest / mean packets per second (by allocations when there is no traffic);
    /// `None` when there is neither.
    pub imbalance: Option<f64>,
    /// Datagrams per second the program left to the kernel's hash.
    pub unsteered_per_sec: f64,
    /// Memos in the program's map, expired or not.
    pub memo_entries: u64,
}

/// One generation (process) of the daemon in a listener group.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GenerationReport {
    pub pid: u32,
    /// Its first slot and its number of sockets in the group's socket array.
    pub first_slot: u32,
    pub sockets: u32,
    /// Its live allocations (as it published them).
    pub allocations: u64,
    /// True for the generation new flows go to.
    pub takes_new_flows: bool,
}

/// A whole daemon.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LoadReport {
    pub pid: u32,
    pub interval_secs: f64,
    pub groups: Vec<GroupReport>,
}

/// Finds the listeners to talk to: those of daemon `pid` if given, else those of the only
/// daemon running. Returns the daemon's pid and its listeners.
pub fn find_listeners(root: &Path, pid: Option<u32>) -> Result<(u32, Vec<LiveListener>)> {
    let live = bpffs::live_listeners(root);
    // The processes of one daemon share its listener directories (generations, during an
    // upgrade): one daemon per set of directories, named by its newest process.
    let mut daemons: Vec<Vec<bpffs::Owner>> = Vec::new();
    for listener in &live {
        match daemons.iter_mut().find(|d| listener.owners.iter().any(|o| d.contains(o))) {
            Some(daemon) => {
                for o in &listener.owners {
                    if !daemon.contains(o) {
                        daemon.push(*o);
                    }
                }
            }
            None => daemons.push(listener.owners.clone()),
        }
    }
    let newest = |d: &Vec<bpffs::Owner>| d.iter().max_by_key(|o| o.start).map_or(0, |o| o.pid);
    let pid = match (pid, daemons.as_slice()) {
        (Some(pid), _) if daemons.iter().flatten().any(|o| o.pid == pid) => pid,
        (Some(pid), _) => bail!(
            "no running turn-server with pid {pid} has steering maps under {}",
            root.display()
        ),
        (None, []) => bail!(
            "no running turn-server has steering maps under {} (is it running, with steering on? \
             is this the same bpf_pin_root?)",
            root.display()
        ),
        (None, [daemon]) => newest(daemon),
        (None, _) => bail!(
            "several turn-server daemons are running ({}): choose one with --pid",
            daemons.iter().map(|d| newest(d).to_string()).collect::<Vec<_>>().join(", ")
        ),
    };
    let mine = live.into_iter().filter(|l| l.owners.iter().any(|o| o.pid == pid)).collect();
    Ok((pid, mine))
}

/// The generations in a listener group: each live owner's slots (an owner that did not
/// record them holds the configured ones), the generation taking new flows last.
fn generations(
    listener: &LiveListener,
    config: &turn_common::SteeringConfig,
) -> Vec<(u32, std::ops::Range<u32>)> {
    let current = config.first_slot..config.first_slot + config.num_sockets;
    let mut gens: Vec<(u32, std::ops::Range<u32>)> = listener
        .owners
        .iter()
        .map(|o| (o.pid, o.slots.map_or(current.clone(), |(first, n)| first..first + n)))
        .collect();
    gens.sort_by_key(|(_, slots)| *slots == current);
    gens
}

fn open(group: &Path) -> Result<GroupMaps> {
    GroupMaps::open_pinned_as(group, true).map_err(|e| {
        let denied = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<aya::maps::MapError>())
            .is_some_and(|m| format!("{m:?}").contains("PermissionDenied"));
        if denied {
            anyhow::anyhow!(
                "permission denied reading {}: only root or the daemon's admin_group may inspect steering",
                group.display()
            )
        } else {
            anyhow::anyhow!("cannot open steering maps in {}: {}", group.display(), crate::daemon::error_chain(&e))
        }
    })
}

pub fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::P2c => "p2c",
        Mode::Least => "least",
        Mode::Hash => "hash",
        Mode::Kernel => "kernel",
    }
}

/// Samples every listener of a daemon twice, `interval` apart.
pub fn sample(pid: u32, listeners: &[LiveListener], interval: Duration) -> Result<LoadReport> {
    let groups: Vec<(&LiveListener, GroupMaps)> =
        listeners.iter().map(|l| open(&l.dir).map(|m| (l, m))).collect::<Result<_>>()?;
    if groups.is_empty() {
        bail!("turn-server {pid} has no steered listener");
    }
    type Before = Vec<(crate::steering::GroupStats, Vec<turn_common::SocketLoad>)>;
    let before: Vec<Before> = groups
        .iter()
        .map(|(l, m)| {
            let config = m.config()?;
            generations(l, &config)
                .into_iter()
                .map(|(_, slots)| Ok((m.stats_of(slots.clone())?, m.loads_of(slots)?)))
                .collect()
        })
        .collect::<Result<_, crate::steering::SteeringError>>()?;
    let start = Instant::now();
    std::thread::sleep(interval);
    let mut reports = Vec::with_capacity(groups.len());
    for ((listener, maps), before) in groups.iter().zip(before) {
        let config = maps.config()?;
        let secs = start.elapsed().as_secs_f64().max(1e-3);
        let rate = |after: u64, before: u64| after.saturating_sub(before) as f64 / secs;
        let current = config.first_slot..config.first_slot + config.num_sockets;
        let mut sockets = Vec::new();
        let mut generation_reports = Vec::new();
        let mut packets_now = Vec::new();
        let mut memo_entries = 0;
        let mut unsteered = (0, 0);
        for ((gen_pid, slots), (stats_before, loads_before)) in
            generations(listener, &config).into_iter().zip(before)
        {
            let stats = maps.stats_of(slots.clone())?;
            let loads = maps.loads_of(slots.clone())?;
            let pins = maps.pin_counts_of(slots.clone())?;
            memo_entries = pins.memo_entries;
            unsteered = (stats.unsteered.packets, stats_before.unsteered.packets);
            let takes_new_flows = slots == current;
            generation_reports.push(GenerationReport {
                pid: gen_pid,
                first_slot: slots.start,
                sockets: slots.len() as u32,
                allocations: loads.iter().map(|l| l.allocations).sum(),
                takes_new_flows,
            });
            for i in 0..slots.len() {
                let load = loads.get(i).copied().unwrap_or_default();
                let (s, s0) = (
                    stats.sockets.get(i).copied().unwrap_or_default(),
                    stats_before.sockets.get(i).copied().unwrap_or_default(),
                );
                let pps =
                    rate(load.packets, loads_before.get(i).map_or(load.packets, |b| b.packets));
                packets_now.push((takes_new_flows, pps));
                sockets.push(SocketRow {
                    pid: gen_pid,
                    worker: i as u32,
                    allocations: load.allocations,
                    pinned_allocations: pins.allocations.get(i).copied().unwrap_or(0),
                    memo_flows: pins.memos.get(i).copied().unwrap_or(0),
                    packets_per_sec: pps,
                    kernel_per_sec: rate(
                        load.kernel_packets,
                        loads_before.get(i).map_or(load.kernel_packets, |b| b.kernel_packets),
                    ),
                    steered_per_sec: rate(s.packets, s0.packets),
                    bytes_per_sec: rate(s.bytes, s0.bytes),
                    new_flows_per_sec: rate(s.new_flows, s0.new_flows),
                    share: 0.0,
                    score: load.score,
                    flow_weight: load.flow_weight,
                    handed_off: load.handed_off,
                    handed_in: load.handed_in,
                    handoff_drops: load.handoff_drops,
                    inbox_queued: load.inbox_queued,
                    rx_queued_bytes: load.rx_queued_bytes,
                    rx_drops: load.rx_drops,
                    pin_failures: load.pin_failures,
                    auth_failures: load.auth_failures,
                    rate_limited: load.rate_limited,
                });
            }
        }
        let total: f64 = packets_now.iter().map(|(_, p)| p).sum();
        for row in &mut sockets {
            row.share = if total > 0.0 { row.packets_per_sec / total } else { 0.0 };
        }
        // The balance that steering decides: the generation taking new flows.
        let in_current = |rows: &[SocketRow], f: fn(&SocketRow) -> f64| -> Vec<f64> {
            rows.iter()
                .zip(&packets_now)
                .filter(|(_, (current, _))| *current)
                .map(|(r, _)| f(r))
                .collect()
        };
        let packets = in_current(&sockets, |r| r.packets_per_sec);
        let allocations = in_current(&sockets, |r| r.allocations as f64);
        let imbalance = busiest_over_mean(&packets).or_else(|| busiest_over_mean(&allocations));
        reports.push(GroupReport {
            listener: bpffs::listener_name(&listener.dir),
            owners: listener.owners.iter().map(|o| o.pid).collect(),
            generations: generation_reports,
            mode: mode_name(Mode::from_raw(config.mode)).to_owned(),
            sockets,
            imbalance,
            unsteered_per_sec: rate(unsteered.0, unsteered.1),
            memo_entries,
        });
    }
    Ok(LoadReport { pid, interval_secs: interval.as_secs_f64(), groups: reports })
}

/// Busiest / mean of `values`, `None` when they sum to zero.
pub fn busiest_over_mean(values: &[f64]) -> Option<f64> {
    let total: f64 = values.iter().sum();
    if values.is_empty() || total <= 0.0 {
        return None;
    }
    let mean = total / values.len() as f64;
    Some(values.iter().copied().fold(0.0, f64::max) / mean)
}

impl LoadReport {
    /// The report as a table for people.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for g in &self.groups {
            out.push_str(&format!(
                "turn-server {} listener {} steering {} ({} sockets, {:.1} s sample)\n",
                self.pid,
                g.listener,
                g.mode,
                g.sockets.len(),
                self.interval_secs
            ));
            if g.generations.len() > 1 {
                let gens: Vec<String> = g
                    .generations
                    .iter()
                    .map(|g| {
                        format!(
                            "pid {} ({} allocations, {})",
                            g.pid,
                            g.allocations,
                            if g.takes_new_flows {
                                "takes new flows"
                            } else {
                                "serves what it has"
                            }
                        )
                    })
                    .collect();
                out.push_str(&format!("generations (upgrade): {}\n", gens.join(", ")));
            }
            out.push_str(
                "    pid  worker  allocs  pinned  memos  packets/s  kernel/s  share   score  new/s  \
                 handed off/in  hand-off drops  inbox  rx queue B  rx drops  auth fails  \
                 rate-limited\n",
            );
            for s in &g.sockets {
                out.push_str(&format!(
                    "{:>7}  {:>6}  {:>6}  {:>6}  {:>5}  {:>9.0}  {:>8.0}  {:>4.1}%  {:>6}  {:>5.0}  {:>13}  {:>14}  {:>5}  {:>10}  {:>8}  {:>10}  {:>12}\n",
                    s.pid,
                    s.worker,
                    s.allocations,
                    s.pinned_allocations,
                    s.memo_flows,
                    s.packets_per_sec,
                    s.kernel_per_sec,
                    s.share * 100.0,
                    s.score,
                    s.new_flows_per_sec,
                    format!("{}/{}", s.handed_off, s.handed_in),
                    s.handoff_drops,
                    s.inbox_queued,
                    s.rx_queued_bytes,
                    s.rx_drops,
                    s.auth_failures,
                    s.rate_limited,
                ));
            }
            match g.imbalance {
                Some(x) => out.push_str(&format!("imbalance (busiest / mean): {x:.2}")),
                None => out.push_str("imbalance (busiest / mean): - (no traffic, no allocations)"),
            }
            out.push_str(&format!(
                "   unsteered: {:.0} packets/s   flow weight: {}\n\n",
                g.unsteered_per_sec,
                g.sockets.first().map_or(0, |s| s.flow_weight)
            ));
        }
        out
    }
}

/// Sets the placement mode of new flows on every listener given. Returns, per listener,
/// the mode before.
pub fn set_mode(listeners: &[LiveListener], mode: Mode) -> Result<Vec<(String, String)>> {
    let mut changed = Vec::new();
    if listeners.is_empty() {
        bail!("no steered listener");
    }
    for listener in listeners {
        let mut maps = open(&listener.dir)?;
        let before = Mode::from_raw(maps.config()?.mode);
        maps.set_mode(mode).map_err(|e| io::Error::other(crate::daemon::error_chain(&e)))?;
        changed.push((bpffs::listener_name(&listener.dir), mode_name(before).to_owned()));
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imbalance_is_busiest_over_mean() {
        assert_eq!(busiest_over_mean(&[1.0, 1.0, 1.0, 1.0]), Some(1.0));
        assert_eq!(busiest_over_mean(&[3.0, 1.0, 0.0, 0.0]), Some(3.0));
        assert_eq!(busiest_over_mean(&[0.0, 0.0]), None);
        assert_eq!(busiest_over_mean(&[]), None);
    }

    fn row(worker: u32, packets: f64, share: f64) -> SocketRow {
        SocketRow {
            pid: 7,
            worker,
            allocations: 3,
            pinned_allocations: 3,
            memo_flows: 1,
            packets_per_sec: packets,
            kernel_per_sec: 0.0,
            steered_per_sec: packets / 2.0,
            bytes_per_sec: 1e4,
            new_flows_per_sec: 0.0,
            share,
            score: packets as u64,
            flow_weight: 100,
            handed_off: 5,
            handed_in: 2,
            handoff_drops: 0,
            inbox_queued: 0,
            rx_queued_bytes: 0,
            rx_drops: 7,
            pin_failures: 0,
            auth_failures: 3,
            rate_limited: 11,
        }
    }

    #[test]
    fn render_shows_every_socket_and_the_summary() {
        let report = LoadReport {
            pid: 7,
            interval_secs: 1.0,
            groups: vec![GroupReport {
                listener: "127.0.0.1:3478".into(),
                owners: vec![7],
                generations: vec![
                    GenerationReport {
                        pid: 6,
                        first_slot: 0,
                        sockets: 2,
                        allocations: 4,
                        takes_new_flows: false,
                    },
                    GenerationReport {
                        pid: 7,
                        first_slot: 2,
                        sockets: 2,
                        allocations: 6,
                        takes_new_flows: true,
                    },
                ],
                mode: "p2c".into(),
                sockets: vec![row(0, 300.0, 0.75), row(1, 100.0, 0.25)],
                imbalance: Some(1.5),
                unsteered_per_sec: 0.0,
                memo_entries: 2,
            }],
        };
        let text = report.render();
        assert!(text.contains("listener 127.0.0.1:3478 steering p2c (2 sockets"), "{text}");
        assert!(text.contains("75.0%") && text.contains("25.0%"), "{text}");
        assert!(text.contains("5/2"), "hand-offs: {text}");
        assert!(text.contains("imbalance (busiest / mean): 1.50"), "{text}");
        assert!(text.contains("flow weight: 100"), "{text}");
        assert!(
            text.contains("generations (upgrade): pid 6 (4 allocations, serves what it has), pid 7 (6 allocations, takes new flows)"),
            "{text}"
        );
    }
}
