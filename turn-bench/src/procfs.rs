//! CPU time and resident memory of a process from `/proc` (Linux).

use std::time::Instant;

use anyhow::{Context, Result, bail};

/// CPU time of a process (all its threads), in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTicks {
    pub utime: u64,
    pub stime: u64,
}

impl CpuTicks {
    pub fn total(&self) -> u64 {
        self.utime + self.stime
    }
}

/// Parse `utime` and `stime` (fields 14 and 15) from the content of `/proc/PID/stat`.
/// The command name (field 2) is in parentheses and may itself contain spaces and
/// parentheses, so fields are counted after the last `)`.
pub fn parse_stat(content: &str) -> Result<CpuTicks> {
    let close = content.rfind(')').context("no ')' after the command name")?;
    // After ") " comes field 3 (state): field N is at index N - 3.
    let fields: Vec<&str> = content[close + 1..].split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .with_context(|| format!("field {n} missing"))?
            .parse::<u64>()
            .with_context(|| format!("field {n} is not a number"))
    };
    Ok(CpuTicks { utime: field(14)?, stime: field(15)? })
}

/// Parse `VmRSS` (in kB) from the content of `/proc/PID/status`.
pub fn parse_vm_rss_kb(content: &str) -> Result<u64> {
    for line in content.lines() {
        if let Some(rest) = line.strip_prefix("VmRSS:") {
            let mut it = rest.split_whitespace();
            let n: u64 = it.next().context("VmRSS has no value")?.parse().context("VmRSS value")?;
            match it.next() {
                Some("kB") => return Ok(n),
                other => bail!("VmRSS unit {other:?}, expected kB"),
            }
        }
    }
    bail!("no VmRSS line (a kernel thread or a zombie?)")
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn clock_ticks_per_sec() -> Result<u64> {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t <= 0 {
        bail!("sysconf(_SC_CLK_TCK) failed");
    }
    Ok(t as u64)
}

/// Which process to read: a PID or this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proc {
    Pid(u32),
    SelfProc,
}

impl Proc {
    fn path(&self, file: &str) -> String {
        match self {
            Proc::Pid(p) => format!("/proc/{p}/{file}"),
            Proc::SelfProc => format!("/proc/self/{file}"),
        }
    }

    pub fn cpu(&self) -> Result<CpuTicks> {
        let path = self.path("stat");
        let s = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        parse_stat(&s).with_context(|| format!("parsing {path}"))
    }

    pub fn rss_kb(&self) -> Result<u64> {
        let path = self.path("status");
        let s = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        parse_vm_rss_kb(&s).with_context(|| format!("parsing {path}"))
    }
}

/// A CPU sample with the wall time it was taken at.
#[derive(Debug, Clone, Copy)]
pub struct CpuSample {
    pub at: Instant,
    pub ticks: CpuTicks,
}

impl CpuSample {
    pub fn take(p: Proc) -> Result<CpuSample> {
        Ok(CpuSample { at: Instant::now(), ticks: p.cpu()? })
    }
}

/// CPU used between two samples: microseconds of CPU and the share of one core.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CpuDelta {
    pub cpu_us: u64,
    pub wall_us: u64,
    /// CPU time / wall time, in percent of one core (200 = two cores busy).
    pub cpu_pct: f64,
}

pub fn cpu_delta(a: &CpuSample, b: &CpuSample, ticks_per_sec: u64) -> CpuDelta {
    let ticks = b.ticks.total().saturating_sub(a.ticks.total());
    let cpu_us = ticks_to_us(ticks, ticks_per_sec);
    let wall_us = u64::try_from(b.at.saturating_duration_since(a.at).as_micros()).unwrap_or(0);
    let cpu_pct = if wall_us == 0 { 0.0 } else { 100.0 * cpu_us as f64 / wall_us as f64 };
    CpuDelta { cpu_us, wall_us, cpu_pct }
}

pub fn ticks_to_us(ticks: u64, ticks_per_sec: u64) -> u64 {
    ticks.saturating_mul(1_000_000) / ticks_per_sec.max(1)
}

/// CPU time every task of the machine has used, in nanoseconds: the root cgroup's
/// `cpuacct.usage` (cgroup v1), or `usage_usec` of the unified hierarchy's `cpu.stat`.
/// Exact, unlike /proc/stat's tick samples (measured far off on this VM), and it sees
/// the kernel's work done in softirq on anyone's behalf. None where neither exists.
pub fn machine_cpu_ns() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    if let Some(v1) = read("/sys/fs/cgroup/cpuacct/cpuacct.usage") {
        return v1.trim().parse().ok();
    }
    let stat =
        read("/sys/fs/cgroup/cpu.stat").or_else(|| read("/sys/fs/cgroup/unified/cpu.stat"))?;
    let usec: u64 =
        stat.lines().find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok())?;
    Some(usec.saturating_mul(1000))
}

/// Whole-machine CPU over a measured window, per forwarded packet.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct MachineCpu {
    /// CPU time of every task on the machine over the window, in microseconds.
    pub cpu_us: u64,
    /// In percent of one core.
    pub cpu_pct: f64,
    /// `cpu_us` over the datagrams forwarded (the same count as the server's figure).
    pub cpu_us_per_packet: Option<f64>,
}

impl MachineCpu {
    /// From two [`machine_cpu_ns`] readings `wall_us` apart, for `packets` forwarded.
    pub fn of(a: Option<u64>, b: Option<u64>, wall_us: u64, packets: u64) -> Option<MachineCpu> {
        let cpu_us = b?.saturating_sub(a?) / 1000;
        Some(MachineCpu {
            cpu_us,
            cpu_pct: if wall_us == 0 { 0.0 } else { 100.0 * cpu_us as f64 / wall_us as f64 },
            cpu_us_per_packet: (packets > 0).then(|| cpu_us as f64 / packets as f64),
        })
    }
}

/// Check that a PID names a live process we can read, for a clear early error.
pub fn check_pid(pid: u32) -> Result<()> {
    Proc::Pid(pid)
        .cpu()
        .with_context(|| format!("--server-pid {pid}: cannot read its CPU time"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    // A real line of /proc/PID/stat (turn-server, 2 workers), with a command name
    // modified to contain a space and parentheses.
    const STAT: &str = "12345 (turn (srv) x) S 1 12345 12345 0 -1 4194560 1234 0 0 0 \
                        1500 320 0 0 20 0 4 0 987654 123456789 2345 18446744073709551615 \
                        1 1 0 0 0 0 0 4096 17663 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";

    #[test]
    fn stat_fields() {
        let t = parse_stat(STAT).unwrap();
        assert_eq!(t, CpuTicks { utime: 1500, stime: 320 });
        assert_eq!(t.total(), 1820);
    }

    #[test]
    fn stat_errors() {
        assert!(parse_stat("12345 turn S 1").is_err());
        assert!(parse_stat("12345 (turn) S 1 2 3").is_err());
        let bad = STAT.replace(" 1500 ", " x ");
        assert!(parse_stat(&bad).is_err());
    }

    #[test]
    fn own_stat_parses() {
        let t = Proc::SelfProc.cpu().unwrap();
        assert!(t.total() < u64::MAX);
        assert!(Proc::SelfProc.rss_kb().unwrap() > 0);
        assert!(clock_ticks_per_sec().unwrap() > 0);
    }

    #[test]
    fn rss() {
        let status =
            "Name:\tturn-server\nVmPeak:\t  200000 kB\nVmRSS:\t   10240 kB\nRssAnon:\t 5000 kB\n";
        assert_eq!(parse_vm_rss_kb(status).unwrap(), 10240);
        assert!(parse_vm_rss_kb("Name:\tkthreadd\n").is_err());
        assert!(parse_vm_rss_kb("VmRSS:\t 12 MB\n").is_err());
    }

    #[test]
    fn ticks() {
        assert_eq!(ticks_to_us(250, 100), 2_500_000);
        assert_eq!(ticks_to_us(1, 100), 10_000);
        let now = Instant::now();
        let a = CpuSample { at: now, ticks: CpuTicks { utime: 100, stime: 50 } };
        let b = CpuSample {
            at: now + std::time::Duration::from_secs(2),
            ticks: CpuTicks { utime: 250, stime: 100 },
        };
        let d = cpu_delta(&a, &b, 100);
        assert_eq!(d.cpu_us, 2_000_000);
        assert_eq!(d.wall_us, 2_000_000);
        assert!((d.cpu_pct - 100.0).abs() < 1e-9);
    }
}
