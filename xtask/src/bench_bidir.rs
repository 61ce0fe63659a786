//! `cargo xtask bench --bidir`: both directions at once, as media flows. Every flow's
//! datagrams go client -> relay -> peer, and the peer sends each one back through the relay
//! (`turn-bench load --echo`), so the server forwards as much each way. Every cell runs
//! `reps` times with the servers interleaved (a fresh server per run); the report gives the
//! median with the lowest and highest run, and turn-server's CPU per forwarded packet as a
//! ratio of coturn's in the same run. The results go to `target/bench/bidir.jsonl` and into
//! BENCHMARKS.md between the `bench-bidir` markers.

use std::{fmt::Write as _, path::Path};

use anyhow::Result;
use serde_json::Value;

use crate::{
    bench::{Case, Kind, RunContext, Server, Tools, f, free_port, measure, start, write_section},
    bench_stream::spread,
};

const BEGIN: &str = "<!-- bench-bidir:begin -->";
const END: &str = "<!-- bench-bidir:end -->";
/// The server whose CPU the others are compared with.
const BASELINE: &str = "coturn 4.17.1, 2 threads";

/// (flows, packets/s per flow each way, payload bytes). The last is video-like: many
/// light flows of 1,200-byte datagrams.
fn cells(quick: bool) -> Vec<(u32, u32, u32)> {
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

fn servers(tools: &Tools) -> Vec<Server> {
    let s = |name: &str, kind, extra| Server { name: name.into(), kind, threads: 2, extra };
    let mut list = vec![s("turn-server 2w", Kind::TurnP2c, vec![])];
    if tools.coturn_current.is_some() {
        list.push(s(BASELINE, Kind::CoturnCurrent, vec![]));
        list.push(s("coturn 4.17.1 fastest, 2 threads", Kind::CoturnFastest, vec![]));
    }
    list.push(s("coturn 4.6.1 (Debian), 2 threads", Kind::Coturn, vec![]));
    if tools.pion.is_some() {
        list.push(s("pion 2 sockets", Kind::Pion, vec![]));
    }
    list
}

/// Every cell, `reps` times, the servers in turn; then the report.
pub fn run(tools: &Tools, quick: bool, reps: usize, report: &Path) -> Result<()> {
    std::fs::create_dir_all(&tools.out_dir)?;
    let context = RunContext::of(tools);
    let servers = servers(tools);
    let secs = if quick { "3" } else { "5" };
    let mut results: Vec<(String, String, Value)> = Vec::new();
    let mut raw = format!("{}\n", serde_json::json!({ "context": context }));
    for rep in 0..reps {
        for &cell in &cells(quick) {
            let case = Case {
                name: cell_name(cell),
                args: [
                    "--echo",
                    "--flows",
                    &cell.0.to_string(),
                    "--rate",
                    &cell.1.to_string(),
                    "--size",
                    &cell.2.to_string(),
                    "--duration",
                    secs,
                ]
                .map(String::from)
                .to_vec(),
                alloc: false,
            };
            for server in &servers {
                println!(
                    "xtask: bench: bidir rep {}/{reps}: {} / {}",
                    rep + 1,
                    server.name,
                    case.name
                );
                let peer_port = free_port()?;
                let outcome = start(server, tools, peer_port)
                    .and_then(|running| measure(server, &case, tools, &running, peer_port));
                match outcome {
                    Ok(v) => {
                        let _ = writeln!(
                            raw,
                            "{}",
                            serde_json::json!({"server": server.name, "cell": case.name, "rep": rep, "result": v})
                        );
                        results.push((server.name.clone(), case.name.clone(), v));
                    }
                    Err(e) => println!("xtask: bench:   failed: {e:#}"),
                }
            }
        }
    }
    let raw_path = tools.out_dir.join("bidir.jsonl");
    std::fs::write(&raw_path, &raw)?;
    let names: Vec<String> = servers.iter().map(|s| s.name.clone()).collect();
    let markdown = render(&context, &results, &names, reps, quick);
    write_section(report, BEGIN, END, &markdown)?;
    println!("xtask: bench: wrote {} and {}", report.display(), raw_path.display());
    Ok(())
}

fn render(
    context: &RunContext,
    results: &[(String, String, Value)],
    servers: &[String],
    reps: usize,
    quick: bool,
) -> String {
    let values = |server: &str, cell: &str, path: &[&str]| -> Vec<f64> {
        results
            .iter()
            .filter(|(s, c, _)| s == server && c == cell)
            .filter_map(|(_, _, v)| f(v, path))
            .collect()
    };
    let cpu = ["server_cpu", "cpu_us_per_packet"];
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Both directions at once: echo through the relay (`cargo xtask bench --bidir{}`)\n",
        if quick { " --quick" } else { "" }
    );
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
         and the kernel's work for both, softirq included) over the same datagrams; `vs \
         coturn 4.17.1` is the ratio of the server CPU medians. RTT is the echo's round \
         trip (client -> relay -> peer -> relay -> client), medians of the runs' p50 and \
         p99. The load generator shares the 2 cores with the server.\n",
        context.date,
        context.kernel,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        context.commit,
        context.coturn_current,
        context.coturn
    );
    for &cell in &cells(quick) {
        let name = cell_name(cell);
        let _ = writeln!(
            md,
            "### {} flows, {} packets/s each way per flow, {}-byte payloads\n",
            cell.0, cell.1, cell.2
        );
        md.push_str(
            "| server | echoes/s delivered | worst loss | server CPU us per forwarded packet | vs coturn 4.17.1 | machine CPU us per forwarded packet | RTT p50 / p99 us |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        );
        let (baseline, _) = spread(values(BASELINE, &name, &cpu), 2);
        for server in servers {
            let (_, delivered) = spread(values(server, &name, &["delivered_pps"]), 0);
            let worst = values(server, &name, &["loss_pct"]).into_iter().reduce(f64::max);
            let loss = worst.map_or("-".into(), |l| format!("{l:.3}%"));
            let (median, per_packet) = spread(values(server, &name, &cpu), 2);
            let ratio = match (median, baseline) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
                _ => "-".into(),
            };
            let (p50, _) = spread(values(server, &name, &["echo_path", "rtt_us", "p50"]), 0);
            let (p99, _) = spread(values(server, &name, &["echo_path", "rtt_us", "p99"]), 0);
            let rtt = match (p50, p99) {
                (Some(a), Some(b)) => format!("{a:.0} / {b:.0}"),
                _ => "-".into(),
            };
            let machine = ["machine_cpu", "cpu_us_per_packet"];
            let (_, machine) = spread(values(server, &name, &machine), 2);
            let _ = writeln!(
                md,
                "| {server} | {delivered} | {loss} | {per_packet} | {ratio} | {machine} | {rtt} |"
            );
        }
        md.push('\n');
    }
    md.push_str("Every run, with the rates sent and delivered: `target/bench/bidir.jsonl`.\n");
    md
}
