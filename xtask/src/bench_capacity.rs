//! `cargo xtask bench --capacity`: what steering buys when the busiest worker saturates.
//!
//! A 2-core machine cannot show what 4 or 16 cores would, so every thread of the server gets
//! a cgroup of its own (cgroup v1 `cpu` controller, the TID in `tasks`) capped at a tenth of
//! a core (`cpu.cfs_quota_us` 1 ms per 10 ms `cpu.cfs_period_us`): 4 workers are then 4
//! small cores with room left for the load generator. The summed capacity is calibrated
//! first (the highest rate one capped worker carries without loss, times the number of
//! workers); then the load is stepped as a share of it, hash, p2c and least side
//! by side with coturn 4.17.1 capped the same way, each step several trials with fresh client
//! sockets (fresh 4-tuples) against a fresh server. The results go to
//! `target/bench/capacity.jsonl` and into BENCHMARKS.md between the `bench-capacity` markers.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{
    bench::{
        Kind, PASSWORD, REALM, RunContext, Server, Tools, USER, f, free_port, run_json, start,
        write_section,
    },
    bench_stream::spread,
};

const BEGIN: &str = "<!-- bench-capacity:begin -->";
const END: &str = "<!-- bench-capacity:end -->";
/// Workers (relay threads), each capped: the emulated cores.
const WORKERS: usize = 4;
/// CFS bandwidth of every server thread: `QUOTA_US` of CPU per `PERIOD_US`.
const QUOTA_US: u64 = 1_000;
const PERIOD_US: u64 = 10_000;
/// Where the cgroup v1 `cpu` controller is mounted.
const CPU_CGROUP: &str = "/sys/fs/cgroup/cpu";
/// The generator must send at least this share of its target for a run to count.
const OFFERED_SHARE: f64 = 0.97;

/// The traffic: `flows` flows, the first `heavy` of them sending `weight` times as fast as
/// each of the others.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Workload {
    flows: usize,
    heavy: usize,
    weight: f64,
}

/// 8 heavy flows.
const HEAVY: Workload = Workload { flows: 8, heavy: 0, weight: 1.0 };
/// 64 mixed flows: 4 heavy at ten times the rate of each of 60 light ones (40% of the
/// packets in 4 flows).
const MIXED: Workload = Workload { flows: 64, heavy: 4, weight: 10.0 };

impl Workload {
    fn name(self) -> String {
        if self.heavy == 0 {
            format!("{} heavy flows", self.flows)
        } else {
            format!(
                "{} mixed flows ({} heavy at {}x the rate of each of {} light)",
                self.flows,
                self.heavy,
                self.weight,
                self.flows - self.heavy
            )
        }
    }

    /// A worker's fair share of the flows: what each of `workers` workers holds when the
    /// placement is perfect.
    fn share(self, workers: usize) -> Workload {
        Workload { flows: self.flows / workers, heavy: self.heavy / workers, ..self }
    }

    /// `turn-bench load` arguments for `total` packets/s.
    fn args(self, total: f64) -> Vec<String> {
        let s = |x: f64| format!("{x:.0}");
        let light = (self.flows - self.heavy) as f64;
        let unit = total / (self.heavy as f64 * self.weight + light);
        let mut args = vec!["--flows".into(), self.flows.to_string(), "--rate".into(), s(unit)];
        if self.heavy > 0 {
            args.extend(["--heavy".into(), self.heavy.to_string()]);
            args.extend(["--heavy-rate".into(), s(self.weight * unit)]);
        }
        args
    }
}

/// Every thread of one process in a cgroup of its own, capped; undone when dropped (the
/// threads go back to the root cgroup, the directories are removed).
struct Caps {
    dir: PathBuf,
    groups: Vec<PathBuf>,
}

impl Caps {
    fn apply(pid: u32) -> Result<Caps> {
        let base = Path::new(CPU_CGROUP);
        if !base.join("cpu.cfs_quota_us").is_file() {
            bail!(
                "the capacity benchmark caps each server thread with the cgroup v1 cpu controller, \
                 and {CPU_CGROUP}/cpu.cfs_quota_us is missing (mount it: mount -t cgroup -o cpu,cpuacct cgroup {CPU_CGROUP})"
            );
        }
        let dir = base.join(format!("turn-xtask-capacity-{}-{pid}", std::process::id()));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut caps = Caps { dir, groups: Vec::new() };
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .with_context(|| format!("threads of process {pid}"))?;
        for tid in tasks.filter_map(|e| e.ok()?.file_name().into_string().ok()) {
            let group = caps.dir.join(format!("t{tid}"));
            std::fs::create_dir(&group)?;
            caps.groups.push(group.clone());
            let write = |file: &str, value: String| {
                std::fs::write(group.join(file), value)
                    .with_context(|| format!("writing {}", group.join(file).display()))
            };
            write("cpu.cfs_period_us", PERIOD_US.to_string())?;
            write("cpu.cfs_quota_us", QUOTA_US.to_string())?;
            // A thread that exited meanwhile cannot move: ignore it.
            let _ = std::fs::write(group.join("tasks"), &tid);
        }
        Ok(caps)
    }

    /// Threads now capped (those that still live).
    fn threads(&self) -> usize {
        self.groups
            .iter()
            .filter_map(|g| std::fs::read_to_string(g.join("tasks")).ok())
            .map(|t| t.lines().count())
            .sum()
    }
}

impl Drop for Caps {
    fn drop(&mut self) {
        let root_tasks = Path::new(CPU_CGROUP).join("tasks");
        for group in &self.groups {
            if let Ok(tasks) = std::fs::read_to_string(group.join("tasks")) {
                for tid in tasks.lines() {
                    let _ = std::fs::write(&root_tasks, tid);
                }
            }
            let _ = std::fs::remove_dir(group);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn servers(tools: &Tools) -> Vec<Server> {
    let s = |name: &str, kind| Server { name: name.into(), kind, threads: WORKERS, extra: vec![] };
    let mut list = vec![
        s("turn-server hash", Kind::TurnHash),
        s("turn-server p2c", Kind::TurnP2c),
        s("turn-server least", Kind::TurnLeast),
    ];
    if tools.coturn_current.is_some() {
        list.push(s("coturn 4.17.1", Kind::CoturnCurrent));
        list.push(s("coturn 4.17.1 fastest", Kind::CoturnFastest));
    }
    list
}

/// One run: a fresh server, its threads capped, `total` packets/s of `workload`.
fn run_once(server: &Server, tools: &Tools, workload: Workload, total: f64) -> Result<Value> {
    let running = start(server, tools, free_port()?)?;
    let caps = Caps::apply(running.pid())?;
    if caps.threads() == 0 {
        bail!("no thread of {} could be capped", server.name);
    }
    let mut cmd = Command::new(&tools.turn_bench);
    cmd.args(["load", "--server", &running.addr, "-u", USER, "-w", PASSWORD, "--realm", REALM])
        .args(workload.args(total))
        .args(["--duration", "2", "--warmup", "1", "--sender-threads", "2", "--json"])
        .args(server.kind.load_args());
    if !server.kind.load_args().contains(&"--peer-threads") {
        cmd.args(["--peer-threads", "2"]);
    }
    let result = run_json(&mut cmd);
    // The server stops before its cgroups go (an empty cgroup can be removed).
    drop(running);
    drop(caps);
    result
}

/// The highest rate one capped worker carries without losing a packet when it holds its
/// fair share of `workload` (a quarter of the flows with 4 workers): offered 10,000
/// packets/s, then 10% more each probe until one loses.
fn calibrate(tools: &Tools, workload: Workload) -> Result<f64> {
    let workload = workload.share(WORKERS);
    let one = Server {
        name: "turn-server 1 worker".into(),
        kind: Kind::TurnHash,
        threads: 1,
        extra: vec![],
    };
    let mut held = None;
    let mut offered: f64 = 10_000.0;
    while offered < 400_000.0 {
        println!("xtask: bench: capacity: calibrating {}: {offered:.0} pps", workload.name());
        let v = run_once(&one, tools, workload, offered)?;
        if !lossless(&v) {
            return held.with_context(|| {
                format!("one capped worker lost packets at {offered:.0} pps of {}", workload.name())
            });
        }
        held = Some(offered);
        offered = (offered * 1.1).round();
    }
    bail!(
        "one capped worker carried {offered:.0} pps of {}: are the caps applied?",
        workload.name()
    )
}

/// The offered loads, as shares of the summed capacity.
fn steps(quick: bool) -> Vec<f64> {
    if quick { vec![0.5, 0.9] } else { vec![0.4, 0.55, 0.7, 0.85, 1.0] }
}

struct Outcome {
    workload: Workload,
    step: f64,
    server: String,
    result: std::result::Result<Value, String>,
}

pub fn run(tools: &Tools, quick: bool, reps: usize, report: &Path) -> Result<()> {
    std::fs::create_dir_all(&tools.out_dir)?;
    let context = RunContext::of(tools);
    let workloads = [HEAVY, MIXED];
    let servers = servers(tools);
    let mut capacity = Vec::new();
    for w in workloads {
        let one = calibrate(tools, w)?;
        println!(
            "xtask: bench: capacity: one capped worker carries {one:.0} pps of {}",
            w.share(WORKERS).name()
        );
        capacity.push((w, one * WORKERS as f64));
    }
    let mut raw = format!("{}\n", serde_json::json!({ "context": context }));
    let mut outcomes = Vec::new();
    for trial in 0..reps {
        for &(workload, total) in &capacity {
            for step in steps(quick) {
                for server in &servers {
                    println!(
                        "xtask: bench: capacity {}, {:.0}%, trial {}/{reps}: {}",
                        workload.name(),
                        step * 100.0,
                        trial + 1,
                        server.name
                    );
                    let result = run_once(server, tools, workload, step * total)
                        .map_err(|e| format!("{e:#}"));
                    if let Err(e) = &result {
                        println!("xtask: bench:   failed: {e}");
                    }
                    let _ = writeln!(
                        raw,
                        "{}",
                        serde_json::json!({
                            "workload": workload.name(), "share": step, "offered_target": step * total,
                            "trial": trial, "server": server.name,
                            "result": result.as_ref().ok(), "error": result.as_ref().err(),
                        })
                    );
                    outcomes.push(Outcome { workload, step, server: server.name.clone(), result });
                }
            }
        }
    }
    let raw_path = tools.out_dir.join("capacity.jsonl");
    std::fs::write(&raw_path, &raw)?;
    let markdown = render(&context, &capacity, &servers, &outcomes, reps, quick);
    write_section(report, BEGIN, END, &markdown)?;
    println!("xtask: bench: wrote {} and {}", report.display(), raw_path.display());
    Ok(())
}

/// A trial without loss, its generator on target.
fn lossless(v: &Value) -> bool {
    let sent = f(v, &["sent"]).unwrap_or(0.0);
    let on_target = match f(v, &["target_pps"]) {
        Some(t) => f(v, &["offered_pps"]).is_some_and(|o| o >= OFFERED_SHARE * t),
        None => true,
    };
    sent > 0.0 && f(v, &["delivered"]).is_some_and(|d| d >= sent) && on_target
}

fn render(
    context: &RunContext,
    capacity: &[(Workload, f64)],
    servers: &[Server],
    outcomes: &[Outcome],
    reps: usize,
    quick: bool,
) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Capacity at {WORKERS} emulated cores (`cargo xtask bench --capacity{}{}`)\n",
        if quick { " --quick" } else { "" },
        if reps == 3 { String::new() } else { format!(" --reps {reps}") }
    );
    let _ = writeln!(
        md,
        "Run on {}, Linux {}, {} CPUs, loopback; turn-server at commit {} (release daemon, \
         {WORKERS} workers), coturn {} (built from the release archive, `--relay-threads={WORKERS}`, \
         in its default configuration and in its fastest, `--multiplex-peer --udp-gso`, where \
         each flow gets a peer socket of its own). Every thread of the server runs in a cgroup of its own \
         (cgroup v1 `cpu` controller) capped at {:.2} of a core: `cpu.cfs_quota_us` {QUOTA_US} \
         per `cpu.cfs_period_us` {PERIOD_US}. The summed capacity is {WORKERS} times the highest \
         rate one capped worker carries without losing a packet while it holds its fair share \
         of the flows (calibrated at the start of the run, in steps of 10% from 10,000 \
         packets/s, one trial each: {}): 100% is what perfect placement would carry. Each step offers a share of it with `turn-bench load` (160-byte \
         ChannelData, client -> relay -> peer, 1 s warm-up, 2 s measured), {reps} trial(s) \
         per step, the servers interleaved, a fresh server and fresh client sockets (new \
         4-tuples, so a new draw of the kernel's hash) every trial. Cells: delivered packets/s \
         (median, lowest-highest), median loss, and the trials without a single lost packet.\n",
        context.date,
        context.kernel,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        context.commit,
        context.coturn_current,
        QUOTA_US as f64 / PERIOD_US as f64,
        capacity
            .iter()
            .map(|(w, c)| format!("{:.0} pps of {}", c / WORKERS as f64, w.share(WORKERS).name()))
            .collect::<Vec<_>>()
            .join(", "),
    );
    for &(workload, total) in capacity {
        let _ = writeln!(md, "### {}\n", workload.name());
        let mut head = "| offered | pps |".to_string();
        let mut rule = "| ---: | ---: |".to_string();
        for s in servers {
            let _ = write!(head, " {} |", s.name);
            rule.push_str(" --- |");
        }
        let _ = writeln!(md, "{head}\n{rule}");
        // The highest step up to which every trial of a server was lossless.
        let mut holds: Vec<Option<f64>> = vec![None; servers.len()];
        let mut broken = vec![false; servers.len()];
        for step in steps(quick) {
            let _ = write!(md, "| {:.0}% | {:.0} |", step * 100.0, step * total);
            for (k, server) in servers.iter().enumerate() {
                let runs: Vec<&Outcome> = outcomes
                    .iter()
                    .filter(|o| o.workload == workload && o.step == step && o.server == server.name)
                    .collect();
                let ok: Vec<&Value> = runs.iter().filter_map(|o| o.result.as_ref().ok()).collect();
                let failed = runs.len() - ok.len();
                let delivered: Vec<f64> =
                    ok.iter().filter_map(|v| f(v, &["delivered_pps"])).map(|x| x / 1e3).collect();
                let delivered = match spread(delivered.clone(), 1).0 {
                    Some(median) if delivered.len() > 1 => {
                        let (lo, hi) = delivered
                            .iter()
                            .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
                        format!("{median:.1}k ({lo:.1}-{hi:.1})")
                    }
                    Some(median) => format!("{median:.1}k"),
                    None => "-".into(),
                };
                let (_, loss) = spread(ok.iter().filter_map(|v| f(v, &["loss_pct"])).collect(), 2);
                let loss = loss.split(' ').next().unwrap_or("-").to_owned();
                let clean = ok.iter().filter(|v| lossless(v)).count();
                if clean == runs.len() && !runs.is_empty() && !broken[k] {
                    holds[k] = Some(step);
                } else {
                    broken[k] = true;
                }
                let failed = if failed > 0 { format!(", {failed} failed") } else { String::new() };
                let _ =
                    write!(md, " {delivered}, {loss}%, {clean}/{} lossless{failed} |", runs.len());
            }
            md.push('\n');
        }
        let _ = write!(md, "| **held without loss** | |");
        for h in &holds {
            match h {
                Some(step) => {
                    let _ =
                        write!(md, " **{:.0}%** ({:.0}k pps) |", step * 100.0, step * total / 1e3);
                }
                None => md.push_str(" **none** |"),
            }
        }
        md.push_str("\n\n");
    }
    md.push_str(
        "What the caps do and do not cover. CFS bandwidth control throttles a capped thread \
         for the rest of a 10 ms period once it has run 1 ms, so a worker serves its socket in \
         bursts and its receive buffer must hold the packets that arrive while it is throttled \
         (up to 9 ms); 10 ms is the shortest period that allows a 1 ms quota (the kernel's \
         minimum). The kernel counts softirq work against the thread it interrupts (this \
         kernel has no IRQ time accounting), so what a worker's own sends cost in loopback \
         delivery is inside its cap, but the delivery of the generator's datagrams into the \
         server's sockets, the SK_REUSEPORT program included, is charged to the generator and \
         is outside every cap. coturn's main thread relays too (in an uncapped run of 8 \
         flows at 5,000 packets/s its CPU time was 43 ticks against 51-63 for each busy relay \
         thread): it is capped like the others, so coturn runs on five small cores to \
         turn-server's four. The calibration is one trial per rate, and a capped worker's \
         capacity moves from trial to trial (the throttling is bursty), so 100% is nominal: \
         compare the modes with each other at the same offered load, which is what the table \
         is for. Every run, with its offered and delivered counts: \
         `target/bench/capacity.jsonl`.\n"
            .replace("{WORKERS}", &WORKERS.to_string())
            .as_str(),
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value after `flag` in `args`.
    fn arg(args: &[String], flag: &str) -> Option<f64> {
        let at = args.iter().position(|a| a == flag)?;
        args.get(at + 1)?.parse().ok()
    }

    #[test]
    fn a_workload_offers_its_total_in_its_proportions() {
        let a = HEAVY.args(80_000.0);
        assert_eq!(arg(&a, "--flows"), Some(8.0));
        assert_eq!(arg(&a, "--rate"), Some(10_000.0));
        assert_eq!(arg(&a, "--heavy"), None);
        // 4 heavy flows at 10 units and 60 light at 1: 100 units.
        let a = MIXED.args(100_000.0);
        assert_eq!(arg(&a, "--flows"), Some(64.0));
        assert_eq!(arg(&a, "--heavy"), Some(4.0));
        assert_eq!(arg(&a, "--heavy-rate"), Some(10_000.0));
        assert_eq!(arg(&a, "--rate"), Some(1_000.0));
        // A worker's fair share keeps the proportions: 1 heavy and 15 light (25 units).
        let one = MIXED.share(4);
        assert_eq!((one.flows, one.heavy), (16, 1));
        let a = one.args(25_000.0);
        assert_eq!(arg(&a, "--heavy-rate"), Some(10_000.0));
        assert_eq!(arg(&a, "--rate"), Some(1_000.0));
        assert_eq!(HEAVY.share(4).flows, 2);
    }

    fn report(sent: f64, delivered: f64, offered: f64, target: f64) -> Value {
        serde_json::json!({
            "sent": sent, "delivered": delivered, "offered_pps": offered, "target_pps": target
        })
    }

    #[test]
    fn a_trial_is_lossless_only_with_every_packet_delivered_at_the_target_rate() {
        assert!(lossless(&report(1000.0, 1000.0, 500.0, 500.0)));
        assert!(!lossless(&report(1000.0, 999.0, 500.0, 500.0)), "one packet lost");
        assert!(!lossless(&report(1000.0, 1000.0, 400.0, 500.0)), "generator behind");
        assert!(!lossless(&report(0.0, 0.0, 0.0, 500.0)), "nothing sent");
    }
}
