//! `turn-server load` and `turn-server steering set`: read and change a running daemon's
//! steering through the maps it pinned in bpffs. Nothing here goes through the daemon's
//! threads, so it answers while the daemon is under load; who may use it is decided by
//! the pins' file permissions (root, or root and the configured admin group).

use std::{
    io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use turn_common::Mode;

use crate::{bpffs, steering::GroupMaps};

/// One socket (= one worker) of a listener group.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SocketRow {
    pub worker: u32,
    pub allocations: u64,
    pub pinned_flows: u64,
    pub packets_per_sec: f64,
    pub bytes_per_sec: f64,
    /// Fraction of the group's packets in the interval (0 to 1).
    pub share: f64,
}

/// A listener group.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GroupReport {
    pub listener: String,
    pub mode: String,
    pub sockets: Vec<SocketRow>,
    /// Busiest / mean packets per second (by allocations when there is no traffic);
    /// `None` when there is neither.
    pub imbalance: Option<f64>,
    /// Datagrams per second the program left to the kernel's hash.
    pub unsteered_per_sec: f64,
}

/// A whole daemon.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LoadReport {
    pub pid: u32,
    pub interval_secs: f64,
    pub groups: Vec<GroupReport>,
}

/// Finds the daemon to talk to: `pid` if given, else the only one running.
pub fn find_instance(root: &Path, pid: Option<u32>) -> Result<(u32, PathBuf)> {
    let live = bpffs::live_instances(root);
    if let Some(pid) = pid {
        return live.into_iter().find(|(p, _)| *p == pid).with_context(|| {
            format!(
                "no running turn-server with pid {pid} has steering maps under {}",
                root.display()
            )
        });
    }
    match live.len() {
        0 => bail!(
            "no running turn-server has steering maps under {} (is it running, with steering on? \
             is this the same bpf_pin_root?)",
            root.display()
        ),
        1 => Ok(live.into_iter().next().unwrap_or_default()),
        _ => bail!(
            "several turn-server processes are running ({}): choose one with --pid",
            live.iter().map(|(p, _)| p.to_string()).collect::<Vec<_>>().join(", ")
        ),
    }
}

fn open(group: &Path) -> Result<GroupMaps> {
    GroupMaps::open_pinned(group).map_err(|e| {
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

fn listener_name(group: &Path) -> String {
    let name = group.file_name().and_then(|n| n.to_str()).unwrap_or("?");
    // udp-<ip>-<port>
    match name.strip_prefix("udp-").and_then(|rest| rest.rsplit_once('-')) {
        Some((ip, port)) if ip.contains(':') => format!("[{ip}]:{port}"),
        Some((ip, port)) => format!("{}:{port}", ip.replace('_', ".")),
        None => name.to_owned(),
    }
}

pub fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::P2c => "p2c",
        Mode::Hash => "hash",
        Mode::Kernel => "kernel",
    }
}

/// Samples every group of a daemon twice, `interval` apart.
pub fn sample(pid: u32, instance: &Path, interval: Duration) -> Result<LoadReport> {
    let groups: Vec<(PathBuf, GroupMaps)> = bpffs::groups(instance)
        .into_iter()
        .map(|g| open(&g).map(|m| (g, m)))
        .collect::<Result<_>>()?;
    if groups.is_empty() {
        bail!("turn-server {pid} has no steered listener pinned in {}", instance.display());
    }
    let before: Vec<_> = groups.iter().map(|(_, m)| m.stats()).collect::<Result<_, _>>()?;
    let start = Instant::now();
    std::thread::sleep(interval);
    let mut reports = Vec::with_capacity(groups.len());
    for ((dir, maps), before) in groups.iter().zip(before) {
        let after = maps.stats()?;
        let secs = start.elapsed().as_secs_f64().max(1e-3);
        let config = maps.config()?;
        let loads = maps.loads()?;
        let pins = maps.pins_per_socket()?;
        let packets: Vec<f64> = after
            .sockets
            .iter()
            .zip(&before.sockets)
            .map(|(a, b)| a.packets.saturating_sub(b.packets) as f64 / secs)
            .collect();
        let total: f64 = packets.iter().sum();
        let sockets: Vec<SocketRow> = (0..config.num_sockets as usize)
            .map(|i| SocketRow {
                worker: i as u32,
                allocations: loads.get(i).map_or(0, |l| l.allocations),
                pinned_flows: pins.get(i).copied().unwrap_or(0),
                packets_per_sec: packets.get(i).copied().unwrap_or(0.0),
                bytes_per_sec: after
                    .sockets
                    .get(i)
                    .zip(before.sockets.get(i))
                    .map_or(0.0, |(a, b)| a.bytes.saturating_sub(b.bytes) as f64 / secs),
                share: if total > 0.0 {
                    packets.get(i).copied().unwrap_or(0.0) / total
                } else {
                    0.0
                },
            })
            .collect();
        let allocations: Vec<f64> = sockets.iter().map(|s| s.allocations as f64).collect();
        let imbalance = busiest_over_mean(&packets).or_else(|| busiest_over_mean(&allocations));
        reports.push(GroupReport {
            listener: listener_name(dir),
            mode: mode_name(Mode::from_raw(config.mode)).to_owned(),
            sockets,
            imbalance,
            unsteered_per_sec: after.unsteered.packets.saturating_sub(before.unsteered.packets)
                as f64
                / secs,
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
            out.push_str("worker  allocations  pinned flows   packets/s     bytes/s   share\n");
            for s in &g.sockets {
                out.push_str(&format!(
                    "{:>6}  {:>11}  {:>12}  {:>10.0}  {:>10.0}  {:>5.1}%\n",
                    s.worker,
                    s.allocations,
                    s.pinned_flows,
                    s.packets_per_sec,
                    s.bytes_per_sec,
                    s.share * 100.0
                ));
            }
            match g.imbalance {
                Some(x) => out.push_str(&format!("imbalance (busiest / mean): {x:.2}")),
                None => out.push_str("imbalance (busiest / mean): - (no traffic, no allocations)"),
            }
            out.push_str(&format!("   unsteered: {:.0} packets/s\n\n", g.unsteered_per_sec));
        }
        out
    }
}

/// Sets the placement mode of new flows on every listener of a daemon. Returns, per
/// listener, the mode before.
pub fn set_mode(instance: &Path, mode: Mode) -> Result<Vec<(String, String)>> {
    let mut changed = Vec::new();
    let groups = bpffs::groups(instance);
    if groups.is_empty() {
        bail!("no steered listener pinned in {}", instance.display());
    }
    for group in groups {
        let mut maps = open(&group)?;
        let before = Mode::from_raw(maps.config()?.mode);
        maps.set_mode(mode).map_err(|e| io::Error::other(crate::daemon::error_chain(&e)))?;
        changed.push((listener_name(&group), mode_name(before).to_owned()));
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

    #[test]
    fn listener_names_from_pin_dirs() {
        assert_eq!(listener_name(Path::new("/x/udp-127_0_0_1-3478")), "127.0.0.1:3478");
        assert_eq!(listener_name(Path::new("/x/udp-::1-3478")), "[::1]:3478");
    }

    #[test]
    fn render_shows_every_socket_and_the_summary() {
        let report = LoadReport {
            pid: 7,
            interval_secs: 1.0,
            groups: vec![GroupReport {
                listener: "127.0.0.1:3478".into(),
                mode: "p2c".into(),
                sockets: vec![
                    SocketRow {
                        worker: 0,
                        allocations: 3,
                        pinned_flows: 3,
                        packets_per_sec: 300.0,
                        bytes_per_sec: 3e4,
                        share: 0.75,
                    },
                    SocketRow {
                        worker: 1,
                        allocations: 1,
                        pinned_flows: 1,
                        packets_per_sec: 100.0,
                        bytes_per_sec: 1e4,
                        share: 0.25,
                    },
                ],
                imbalance: Some(1.5),
                unsteered_per_sec: 0.0,
            }],
        };
        let text = report.render();
        assert!(text.contains("listener 127.0.0.1:3478 steering p2c (2 sockets"), "{text}");
        assert!(text.contains("75.0%") && text.contains("25.0%"), "{text}");
        assert!(text.contains("imbalance (busiest / mean): 1.50"), "{text}");
    }
}
