//! Reports of `load` and `alloc`: serializable for scripts (`--json`, one object per
//! line), and rendered as text for people.

use std::{fmt::Write as _, net::SocketAddr};

use serde::Serialize;

use crate::{
    procfs::CpuDelta,
    session::DriveStats,
    stats::{Fairness, Percentiles},
};

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencyUs {
    pub samples: u64,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl From<Percentiles> for LatencyUs {
    fn from(p: Percentiles) -> Self {
        let us = |ns: u64| (ns as f64 / 100.0).round() / 10.0;
        LatencyUs {
            samples: p.samples,
            min: us(p.min),
            p50: us(p.p50),
            p90: us(p.p90),
            p99: us(p.p99),
            p999: us(p.p999),
            max: us(p.max),
            mean: us(p.mean),
        }
    }
}

/// Control-plane work of a phase.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PhaseReport {
    pub flows: usize,
    pub failed: usize,
    pub wall_ms: f64,
    /// Request datagrams sent, retransmissions and 401/438 rounds included.
    pub requests: u64,
    pub retransmits: u64,
    pub auth_rounds: u64,
    /// Flows moved to a new source port after a 437 to Allocate.
    pub rebinds: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EchoReport {
    /// Echoed packets (sent in the window) back at the clients.
    pub received: u64,
    pub received_pps: f64,
    /// Lost between the peer and the clients, in % of what the peer received.
    pub return_loss_pct: f64,
    /// Lost on the way out or back, in % of what was sent.
    pub round_trip_loss_pct: f64,
    pub rtt_us: Option<LatencyUs>,
    /// Datagrams at the clients that were not an echo of their own flow.
    pub stray: u64,
    pub peer_echo_failed: u64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ServerCpu {
    pub pid: u32,
    #[serde(flatten)]
    pub delta: CpuDelta,
    /// Packets the server relayed in the window: delivered to the peer, plus echoes
    /// delivered back to the clients.
    pub relayed_packets: u64,
    pub cpu_us_per_packet: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// "channel-data", "send-indication" or "floor".
    pub mode: &'static str,
    pub target: SocketAddr,
    pub peer: SocketAddr,
    pub flows: usize,
    pub payload_bytes: usize,
    /// Per-flow rate asked for; `None` when flat out.
    pub rate_per_flow: Option<f64>,
    /// The first `heavy_flows` flows sent at `heavy_rate_per_flow` instead.
    pub heavy_flows: usize,
    pub heavy_rate_per_flow: Option<f64>,
    pub target_pps: Option<f64>,
    pub echo: bool,
    pub sender_threads: usize,
    pub peer_threads: usize,
    pub warmup_s: f64,
    pub window_s: f64,
    pub setup: Option<PhaseReport>,
    /// Packets sent in the window (timestamps inside it).
    pub sent: u64,
    pub send_failed: u64,
    pub offered_pps: f64,
    /// Packets sent in the window that reached the peer.
    pub delivered: u64,
    pub delivered_pps: f64,
    pub loss_pct: f64,
    /// Over per-flow delivered packets.
    pub fairness: Fairness,
    pub echo_path: Option<EchoReport>,
    pub server_cpu: Option<ServerCpu>,
    pub generator_cpu: CpuDelta,
    /// Every task of the machine over the window (the root cgroup's CPU time): what the
    /// server's process CPU does not see (softirq work on its behalf, the load generator's
    /// delivery work on loopback). None where the cgroup file is missing.
    pub machine_cpu: Option<crate::procfs::MachineCpu>,
    /// Datagrams at the peer that were no flow's payload.
    pub peer_foreign: u64,
    pub cleanup: Option<PhaseReport>,
    pub cleanup_first_error: Option<String>,
}

impl PhaseReport {
    pub fn of(st: &DriveStats, flows: usize) -> PhaseReport {
        PhaseReport {
            flows,
            failed: st.failed.len(),
            wall_ms: st.elapsed.as_secs_f64() * 1e3,
            requests: st.control.sent,
            retransmits: st.control.retransmits,
            auth_rounds: st.control.auth_rounds,
            rebinds: st.control.rebinds,
        }
    }
}

pub fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 { 0.0 } else { 100.0 * part as f64 / whole as f64 }
}

/// The server's CPU per packet (`what`: "relayed", "forwarded") and the generator's, as
/// report lines.
pub(crate) fn cpu_lines(server: Option<&ServerCpu>, generator: &CpuDelta, what: &str) -> String {
    let mut s = String::new();
    if let Some(c) = server {
        let per = c.cpu_us_per_packet.map_or("n/a".into(), |v| format!("{v:.3}"));
        let _ = writeln!(
            s,
            "  server CPU pid {}: {:.1}% of a core, {} us over {} {what} packets = {per} us/packet",
            c.pid, c.delta.cpu_pct, c.delta.cpu_us, c.relayed_packets
        );
    }
    let _ = writeln!(s, "  generator  {:.1}% of a core", generator.cpu_pct);
    s
}

pub(crate) fn phase(p: &PhaseReport) -> String {
    format!(
        "{} flows in {:.0} ms ({} requests, {} retransmits, {} auth rounds{}{})",
        p.flows,
        p.wall_ms,
        p.requests,
        p.retransmits,
        p.auth_rounds,
        if p.rebinds > 0 {
            format!(", {} new source ports after 437", p.rebinds)
        } else {
            String::new()
        },
        if p.failed > 0 { format!(", {} FAILED", p.failed) } else { String::new() }
    )
}

impl LoadReport {
    pub fn text(&self) -> String {
        let mut s = String::new();
        let rate = match (self.rate_per_flow, self.heavy_rate_per_flow) {
            (Some(r), Some(h)) => {
                format!("{} flows at {h} pps and the rest at {r} pps each", self.heavy_flows)
            }
            (Some(r), None) => format!("{r} pps per flow"),
            (None, _) => "flat out".into(),
        };
        let _ = writeln!(
            s,
            "turn-bench load: {} via {} -> peer {}, {} flows, {} B payload, {rate}{}",
            self.mode,
            self.target,
            self.peer,
            self.flows,
            self.payload_bytes,
            if self.echo { ", echo" } else { "" }
        );
        if let Some(p) = &self.setup {
            let _ = writeln!(s, "  setup      {}", phase(p));
        }
        let _ = writeln!(
            s,
            "  window     {:.2} s after {:.2} s warmup ({} sender / {} peer threads)",
            self.window_s, self.warmup_s, self.sender_threads, self.peer_threads
        );
        let target = self.target_pps.map(|t| format!("; target {t:.0} pps")).unwrap_or_default();
        let _ = writeln!(
            s,
            "  offered    {:.0} pps ({} sent, {} send errors{target})",
            self.offered_pps, self.sent, self.send_failed
        );
        if let Some(t) = self.target_pps
            && self.offered_pps < 0.95 * t
        {
            let _ = writeln!(s, "  WARNING    the generator fell behind its target rate");
        }
        let _ = writeln!(
            s,
            "  delivered  {:.0} pps ({} at the peer), loss {:.3}%",
            self.delivered_pps, self.delivered, self.loss_pct
        );
        let f = &self.fairness;
        let _ = writeln!(
            s,
            "  fairness   Jain {}, per flow min {} / mean {:.1} / max {}{}",
            f.jain.map_or("n/a".into(), |j| format!("{j:.4}")),
            f.min,
            f.mean,
            f.max,
            if f.starved_flows > 0 {
                format!(", {} flows got nothing", f.starved_flows)
            } else {
                String::new()
            }
        );
        if let Some(e) = &self.echo_path {
            let _ = writeln!(
                s,
                "  echo       {:.0} pps back at the clients ({}), return loss {:.3}%, round trip loss {:.3}%",
                e.received_pps, e.received, e.return_loss_pct, e.round_trip_loss_pct
            );
            if let Some(r) = &e.rtt_us {
                let _ = writeln!(
                    s,
                    "  rtt (us)   p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  ({} samples)",
                    r.p50, r.p90, r.p99, r.p999, r.max, r.samples
                );
            }
        }
        s.push_str(&cpu_lines(self.server_cpu.as_ref(), &self.generator_cpu, "relayed"));
        if self.peer_foreign > 0 {
            let _ = writeln!(
                s,
                "  peer got {} datagrams that were no flow's payload",
                self.peer_foreign
            );
        }
        if let Some(p) = &self.cleanup {
            let _ = writeln!(s, "  cleanup    Refresh(0): {}", phase(p));
        }
        if let Some(e) = &self.cleanup_first_error {
            let _ = writeln!(s, "  cleanup    first error: {e}");
        }
        s
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AllocReport {
    pub server: SocketAddr,
    pub count: usize,
    pub in_flight: usize,
    pub allocate: PhaseReport,
    pub allocated: usize,
    pub allocs_per_s: f64,
    pub first_error: Option<String>,
    pub server_pid: Option<u32>,
    /// Server CPU over the allocation phase.
    pub alloc_cpu: Option<CpuDelta>,
    pub cpu_us_per_alloc: Option<f64>,
    pub rss_before_kb: Option<u64>,
    pub rss_held_kb: Option<u64>,
    pub bytes_per_allocation: Option<f64>,
    pub delete: PhaseReport,
    pub deletes_per_s: f64,
    pub delete_cpu: Option<CpuDelta>,
    pub cpu_us_per_delete: Option<f64>,
    pub rss_after_kb: Option<u64>,
    /// `--refresh`: every allocation refreshed once.
    pub refresh: Option<PhaseReport>,
    pub refreshes_per_s: Option<f64>,
    pub refresh_cpu: Option<CpuDelta>,
    pub cpu_us_per_refresh: Option<f64>,
    /// `--trickle`: Send indications sent during the hold, and how many the peer got.
    pub trickle_sent: u64,
    pub trickle_received: u64,
}

impl AllocReport {
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "turn-bench alloc: {} allocations on {} ({} in flight)",
            self.count, self.server, self.in_flight
        );
        let _ = writeln!(s, "  allocate   {}", phase(&self.allocate));
        let _ = writeln!(
            s,
            "  rate       {:.0} allocations/s ({} held)",
            self.allocs_per_s, self.allocated
        );
        if let Some(e) = &self.first_error {
            let _ = writeln!(s, "  first error: {e}");
        }
        if let (Some(pid), Some(c)) = (self.server_pid, &self.alloc_cpu) {
            let _ = writeln!(
                s,
                "  server CPU pid {pid}: {} us ({:.1}% of a core) = {} us per allocation",
                c.cpu_us,
                c.cpu_pct,
                self.cpu_us_per_alloc.map_or("n/a".into(), |v| format!("{v:.1}"))
            );
        }
        if let (Some(b), Some(h)) = (self.rss_before_kb, self.rss_held_kb) {
            let _ = writeln!(
                s,
                "  server RSS {b} kB before, {h} kB with {} held = {} bytes per live allocation",
                self.allocated,
                self.bytes_per_allocation.map_or("n/a".into(), |v| format!("{v:.0}"))
            );
            let _ = writeln!(
                s,
                "             (user-space memory only, kernel socket memory excluded; meaningful on a freshly started server: freed memory is rarely returned to the OS)"
            );
        }
        if self.trickle_sent > 0 {
            let _ = writeln!(
                s,
                "  trickle    {} Send indications, {} reached the peer ({:.3}% lost)",
                self.trickle_sent,
                self.trickle_received,
                pct(self.trickle_sent.saturating_sub(self.trickle_received), self.trickle_sent)
            );
        }
        if let (Some(r), Some(rate)) = (&self.refresh, self.refreshes_per_s) {
            let _ = writeln!(s, "  refresh    {} ({rate:.0}/s)", phase(r));
            if let Some(c) = &self.refresh_cpu {
                let _ = writeln!(
                    s,
                    "  server CPU {} us = {} us per refresh",
                    c.cpu_us,
                    self.cpu_us_per_refresh.map_or("n/a".into(), |v| format!("{v:.1}"))
                );
            }
        }
        let _ = writeln!(s, "  delete     {} ({:.0}/s)", phase(&self.delete), self.deletes_per_s);
        if let Some(c) = &self.delete_cpu {
            let _ = writeln!(
                s,
                "  server CPU {} us = {} us per delete",
                c.cpu_us,
                self.cpu_us_per_delete.map_or("n/a".into(), |v| format!("{v:.1}"))
            );
        }
        if let Some(a) = self.rss_after_kb {
            let _ = writeln!(s, "  server RSS {a} kB after the deletes");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_and_latency_units() {
        assert_eq!(pct(1, 4), 25.0);
        assert_eq!(pct(1, 0), 0.0);
        let l = LatencyUs::from(Percentiles {
            samples: 3,
            min: 1_000,
            p50: 12_345,
            p90: 20_000,
            p99: 30_000,
            p999: 40_000,
            max: 1_234_567,
            mean: 15_000,
        });
        assert_eq!(l.min, 1.0);
        assert_eq!(l.p50, 12.3);
        assert_eq!(l.max, 1234.6);
    }
}
