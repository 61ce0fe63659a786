//! `cargo xtask bench --bidir`: both directions at once, as media flows. Every flow's
//! datagrams go client -> relay -> peer, and the peer sends each one back through the relay
//! (`turn-bench load --echo`), so the server forwards as much each way. Every cell runs
//! `reps` times with the servers interleaved (a fresh server per run); the report gives the
//! median with the lowest and highest run, and turn-server's CPU per forwarded packet as a
//! ratio of coturn's in the same run. The results go to `target/bench/bidir.jsonl` and into
//! BENCHMARKS.md between the `bench-bidir` markers.

use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::Result;
use serde_json::Value;

use crate::{
    bench::{
        Case, Kind, RunContext, Server, Tools, f, free_port, measure, run_json, start,
        write_section,
    },
    bench_stream::spread,
};

const BEGIN: &str = "<!-- bench-bidir:begin -->";
const END: &str = "<!-- bench-bidir:end -->";
/// `--light`: only the light-flow cells and the ceiling, in a section of their own.
const BEGIN_LIGHT: &str = "<!-- bench-light:begin -->";
const END_LIGHT: &str = "<!-- bench-light:end -->";

/// Which cells a run measures: every one (`--bidir`), or only the traffic relays carry,
/// many light flows, turn-server with and without its fast path beside coturn 4.17.1
/// (`--light`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    All,
    Light,
}
/// The server whose CPU the others are compared with.
const BASELINE: &str = "coturn 4.17.1, 2 threads";
/// The same exchange without a relay: what the generator alone costs the machine.
const DIRECT: &str = "direct (no relay)";
/// turn-server with its kernel fast path (`--fast-path tc`).
pub const FAST: &str = "turn-server 2w, fast path";
/// turn-server relaying in its workers.
const USERSPACE: &str = "turn-server 2w";

/// (flows, packets/s per flow each way, payload bytes). The last is video-like: many
/// light flows of 1,200-byte datagrams.
fn cells(quick: bool, scope: Scope) -> Vec<(u32, u32, u32)> {
    if scope == Scope::Light {
        return if quick {
            vec![(1_000, 40, 160)]
        } else {
            vec![(400, 100, 160), (1_000, 40, 160), (2_000, 25, 160)]
        };
    }
    if quick {
        vec![(8, 10_000, 160)]
    } else {
        vec![
            (8, 500, 160),
            (8, 2_500, 160),
            (8, 5_000, 160),
            (8, 10_000, 160),
            (64, 1_250, 160),
            (200, 150, 1200),
            // The traffic relays carry: many light flows.
            (400, 100, 160),
            (1_000, 40, 160),
            (2_000, 25, 160),
        ]
    }
}

fn cell_name((flows, rate, size): (u32, u32, u32)) -> String {
    format!("{flows} x {rate} pps each way, {size} B")
}

fn servers(tools: &Tools, scope: Scope) -> Vec<Server> {
    let s = |name: &str, kind, extra| Server { name: name.into(), kind, threads: 2, extra };
    let mut list = vec![
        s(FAST, Kind::TurnP2c, vec!["--fast-path", "tc"]),
        s(USERSPACE, Kind::TurnP2c, vec![]),
    ];
    if tools.coturn_current.is_some() {
        list.push(s(BASELINE, Kind::CoturnCurrent, vec![]));
        list.push(s("coturn 4.17.1 fastest, 2 threads", Kind::CoturnFastest, vec![]));
    }
    if scope == Scope::All {
        list.push(s("coturn 4.6.1 (Debian), 2 threads", Kind::Coturn, vec![]));
        if tools.pion.is_some() {
            list.push(s("pion 2 sockets", Kind::Pion, vec![]));
        }
    }
    // No server: `Floor` stands for "none" here (the run goes `turn-bench load --direct`).
    list.push(s(DIRECT, Kind::Floor, vec![]));
    list
}

/// The echo load of `flows` x `rate` packets/s each way, `size`-byte payloads.
fn case((flows, rate, size): (u32, u32, u32), name: String, secs: &str) -> Case {
    let args = ["--echo", "--flows", &flows.to_string(), "--rate", &rate.to_string()]
        .into_iter()
        .chain(["--size", &size.to_string(), "--duration", secs])
        .map(String::from)
        .collect();
    Case { name, args, alloc: false }
}

/// One run of `case` through `server` (a fresh one), or directly.
fn run_case(server: &Server, case: &Case, tools: &Tools) -> Result<Value> {
    if server.name == DIRECT {
        return run_json(
            Command::new(&tools.turn_bench)
                .args(["load", "--direct", "--sender-threads", "1", "--json"])
                .args(&case.args),
        );
    }
    let peer_port = free_port()?;
    start(server, tools, peer_port)
        .and_then(|running| measure(server, case, tools, &running, peer_port))
}

/// The light-flow ceiling: flows of `CEILING_RATE` packets/s each way, more and more of them.
const CEILING_RATE: u32 = 50;

fn ceiling_ladder(quick: bool) -> Vec<u32> {
    if quick { vec![500, 1_000] } else { vec![500, 1_000, 1_500, 2_000, 2_500, 3_000] }
}

fn ceiling_name(flows: u32) -> String {
    format!("ceiling {flows} x {CEILING_RATE}")
}

/// A run held its flows: every datagram there and back, and the generator on target.
fn held(v: &Value) -> bool {
    let on_target = match (f(v, &["offered_pps"]), f(v, &["target_pps"])) {
        (Some(o), Some(t)) => o >= 0.99 * t,
        _ => false,
    };
    on_target
        && f(v, &["loss_pct"]) == Some(0.0)
        && f(v, &["echo_path", "round_trip_loss_pct"]) == Some(0.0)
}

/// Every cell, `reps` times, the servers in turn; then the light-flow ceiling (each server
/// leaves the ladder at its first step most runs do not hold); then the report.
pub fn run(tools: &Tools, quick: bool, reps: usize, report: &Path, scope: Scope) -> Result<()> {
    std::fs::create_dir_all(&tools.out_dir)?;
    let context = RunContext::of(tools);
    let servers = servers(tools, scope);
    let secs = if quick { "3" } else { "5" };
    let mut results: Vec<(String, String, Value)> = Vec::new();
    let mut raw = format!("{}\n", serde_json::json!({ "context": context }));
    let mut record = |server: &Server, case: &Case, rep: usize| -> Option<Value> {
        println!("xtask: bench: bidir rep {}/{reps}: {} / {}", rep + 1, server.name, case.name);
        match run_case(server, case, tools) {
            Ok(v) => {
                let _ = writeln!(
                    raw,
                    "{}",
                    serde_json::json!({"server": server.name, "cell": case.name, "rep": rep, "result": v})
                );
                results.push((server.name.clone(), case.name.clone(), v.clone()));
                Some(v)
            }
            Err(e) => {
                println!("xtask: bench:   failed: {e:#}");
                None
            }
        }
    };
    for rep in 0..reps {
        for &cell in &cells(quick, scope) {
            let case = case(cell, cell_name(cell), secs);
            for server in &servers {
                record(server, &case, rep);
            }
        }
    }
    let mut racing = vec![true; servers.len()];
    for flows in ceiling_ladder(quick) {
        let case = case((flows, CEILING_RATE, 160), ceiling_name(flows), "3");
        let mut held_runs = vec![0; servers.len()];
        for rep in 0..reps {
            for (k, server) in servers.iter().enumerate() {
                if racing[k] && record(server, &case, rep).is_some_and(|v| held(&v)) {
                    held_runs[k] += 1;
                }
            }
        }
        for (k, server) in servers.iter().enumerate() {
            if racing[k] && held_runs[k] * 2 <= reps {
                println!("xtask: bench: {} did not hold {flows} flows", server.name);
                racing[k] = false;
            }
        }
    }
    let (file, begin, end) = match scope {
        Scope::All => ("bidir.jsonl", BEGIN, END),
        Scope::Light => ("light.jsonl", BEGIN_LIGHT, END_LIGHT),
    };
    let raw_path = tools.out_dir.join(file);
    std::fs::write(&raw_path, &raw)?;
    let names: Vec<String> = servers.iter().map(|s| s.name.clone()).collect();
    let markdown = render(&context, &results, &names, reps, quick, scope);
    write_section(report, begin, end, &markdown)?;
    println!("xtask: bench: wrote {} and {}", report.display(), raw_path.display());
    Ok(())
}

fn render(
    context: &RunContext,
    results: &[(String, String, Value)],
    servers: &[String],
    reps: usize,
    quick: bool,
    scope: Scope,
) -> String {
    let values = |server: &str, cell: &str, path: &[&str]| -> Vec<f64> {
        results
            .iter()
            .filter(|(s, c, _)| s == server && c == cell)
            .filter_map(|(_, _, v)| f(v, path))
            .collect()
    };
    let cpu = ["server_cpu", "cpu_us_per_packet"];
    let machine = ["machine_cpu", "cpu_us_per_packet"];
    // Median p50 and p99 of the echo's round trip.
    let rtt = |server: &str, cell: &str| {
        let p = |q: &str| spread(values(server, cell, &["echo_path", "rtt_us", q]), 0).0;
        (p("p50"), p("p99"))
    };
    // Machine CPU per forwarded datagram less the direct exchange's median, per run: the
    // median, and the text.
    let above_of = |server: &str, cell: &str| match spread(values(DIRECT, cell, &machine), 2).0 {
        Some(g) if server != DIRECT => {
            spread(values(server, cell, &machine).iter().map(|m| m - g).collect(), 2)
        }
        _ => (None, "-".into()),
    };
    let above = |server: &str, cell: &str| above_of(server, cell).1;
    // That median as a ratio of coturn 4.17.1's and of turn-server's own userspace path's.
    let above_ratios = |server: &str, cell: &str| {
        let mine = above_of(server, cell).0;
        let ratio = |of: &str| match (mine, above_of(of, cell).0) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        format!("{} / {}", ratio(BASELINE), ratio(USERSPACE))
    };
    let mut md = String::new();
    let quick_flag = if quick { " --quick" } else { "" };
    let _ = match scope {
        Scope::All => writeln!(
            md,
            "## Both directions at once: echo through the relay (`cargo xtask bench --bidir{quick_flag}`)\n"
        ),
        Scope::Light => writeln!(
            md,
            "## The traffic relays carry, with the kernel fast path (`cargo xtask bench --light{quick_flag}`)\n"
        ),
    };
    let _ = writeln!(
        md,
        "Run on {}, Linux {}, {} CPUs, loopback; turn-server at commit {}, coturn {} (built \
         from the release archive) in its default configuration and in its fastest \
         (`--multiplex-peer --udp-gso`), coturn {} (Debian), pion/turn from Debian's Go \
         packages. Each flow is its own client socket and allocation with a channel; \
         `turn-bench load --echo` sends payloads paced per flow, its peer sends every one \
         back through the relay, so the server forwards the rate each way. coturn's fastest \
         mode tells allocations apart by the exact peer address and refuses a second \
         allocation of a thread a permission to an address another one uses (every flow to \
         one peer fails its setup there): for it each flow has a peer socket of its own \
         (`--peer-per-flow`). {reps} run(s) per cell, servers interleaved, a fresh server \
         per run; median (lowest-highest). Server CPU is the process's utime+stime over the \
         measured window divided by the datagrams it forwarded (both directions); machine \
         CPU is every task's (the root cgroup's `cpuacct.usage`: the server, the generator, \
         and the kernel's work for both, softirq included) over the same datagrams, and \
         `above the generator` is that less the median of the same exchange without a relay \
         (`direct`: every flow's socket to the peer and back, `turn-bench load --direct \
         --echo`), per forwarded datagram: what relaying costs the machine; `vs \
         coturn 4.17.1` is the ratio of the server CPU medians. RTT is the echo's round \
         trip (client -> relay -> peer -> relay -> client), medians of the runs' p50 and \
         p99; \"added\" is that less the direct exchange's, per percentile. The load generator shares the 2 cores with the server. \
         turn-server runs twice: relaying in its workers, and with its kernel fast path \
         (`--fast-path tc`), which relays ChannelData in the TC hook of loopback: that work \
         runs in the softirq of the sending socket and is charged to the generator, so the \
         fast path's own server CPU is next to nothing and its cost shows in the machine's \
         CPU above the generator (`above, vs`: that figure's median as a ratio of coturn \
         4.17.1's and of turn-server's userspace path's).\n",
        context.date,
        context.kernel,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        context.commit,
        context.coturn_current,
        context.coturn
    );
    for &cell in &cells(quick, scope) {
        let name = cell_name(cell);
        let _ = writeln!(
            md,
            "### {} flows, {} packets/s each way per flow, {}-byte payloads\n",
            cell.0, cell.1, cell.2
        );
        md.push_str(
            "| server | echoes/s delivered | worst loss | server CPU us per forwarded packet | vs coturn 4.17.1 | machine CPU us per forwarded packet | above the generator | above, vs coturn 4.17.1 / vs turn-server | RTT p50 / p99 us | added by the relay p50 / p99 us |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        );
        let (baseline, _) = spread(values(BASELINE, &name, &cpu), 2);
        let (d50, d99) = rtt(DIRECT, &name);
        for server in servers {
            let (_, delivered) = spread(values(server, &name, &["delivered_pps"]), 0);
            let worst = values(server, &name, &["loss_pct"]).into_iter().reduce(f64::max);
            let loss = worst.map_or("-".into(), |l| format!("{l:.3}%"));
            let (median, per_packet) = spread(values(server, &name, &cpu), 2);
            let ratio = match (median, baseline) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
                _ => "-".into(),
            };
            let (p50, p99) = rtt(server, &name);
            let added = if server == DIRECT {
                "-".into()
            } else {
                pair(p50.zip(d50).map(|(a, b)| a - b), p99.zip(d99).map(|(a, b)| a - b))
            };
            let (rtt, above) = (pair(p50, p99), above(server, &name));
            let (_, machine) = spread(values(server, &name, &machine), 2);
            let ratios = if server == DIRECT { "-".into() } else { above_ratios(server, &name) };
            let _ = writeln!(
                md,
                "| {server} | {delivered} | {loss} | {per_packet} | {ratio} | {machine} | {above} | {ratios} | {rtt} | {added} |"
            );
        }
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "### Light flows: the most held without loss ({CEILING_RATE} packets/s each way per flow, 160-byte payloads)\n\n\
         The number of flows climbs the ladder {}; every server still in runs {reps} time(s) per \
         step (3 s measured), and leaves at the first step most of its runs do not hold (a \
         run holds when no datagram is lost either way and the generator sent at least 99% of \
         its target). Figures at the highest step held.\n",
        ceiling_ladder(quick).iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
    );
    md.push_str(
        "| server | most flows held | vs coturn 4.17.1 | forwarded packets/s | server CPU us per forwarded packet | above the generator | RTT p50 / p99 us |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let most = |server: &str| -> Option<u32> {
        ceiling_ladder(quick)
            .into_iter()
            .take_while(|&flows| {
                let runs: Vec<&Value> = results
                    .iter()
                    .filter(|(s, c, _)| s == server && *c == ceiling_name(flows))
                    .map(|(_, _, v)| v)
                    .collect();
                !runs.is_empty() && runs.iter().filter(|v| held(v)).count() * 2 > runs.len()
            })
            .last()
    };
    let baseline = most(BASELINE);
    for server in servers {
        let Some(flows) = most(server) else {
            let _ = writeln!(md, "| {server} | none | | | | | |");
            continue;
        };
        let name = ceiling_name(flows);
        let ratio = match baseline {
            Some(b) if server != DIRECT => format!("{:.2}x", f64::from(flows) / f64::from(b)),
            _ => "-".into(),
        };
        let forwarded = 2.0 * f64::from(flows) * f64::from(CEILING_RATE);
        let (_, per_packet) = spread(values(server, &name, &cpu), 2);
        let (p50, p99) = rtt(server, &name);
        let (rtt, above) = (pair(p50, p99), above(server, &name));
        let _ = writeln!(
            md,
            "| {server} | {flows} | {ratio} | {forwarded:.0} | {per_packet} | {above} | {rtt} |"
        );
    }
    md.push_str("\nEvery run, with the rates sent and delivered: `target/bench/bidir.jsonl`.\n");
    md
}

/// "p50 / p99", or "-" when either is missing.
fn pair(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{a:.0} / {b:.0}"),
        _ => "-".into(),
    }
}
