//! `cargo xtask bench --media`: calls as WebRTC makes them (`turn-bench media`): two
//! clients per call, each with its own allocation, sending audio (50 pps x 160 B) and
//! video (100 pps x 1,200 B) to the other end's relayed address, so every packet crosses
//! the server twice. The number of calls climbs a ladder; at every step each server still
//! in the race runs `reps` times, interleaved, a fresh server per run. A step is held when
//! most of its runs lost nothing and the generator sent what it should; a server leaves
//! the race at its first step not held. The same calls without a relay (`direct`) give
//! the latency baseline and the generator's own ceiling. The results go to
//! `target/bench/media.jsonl` and into BENCHMARKS.md between the `bench-media` markers.

use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::Result;
use serde_json::Value;

use crate::{
    bench::{
        Kind, PASSWORD, REALM, RunContext, Server, Tools, USER, f, free_port, run_json, start,
        write_section,
    },
    bench_stream::spread,
};

const BEGIN: &str = "<!-- bench-media:begin -->";
const END: &str = "<!-- bench-media:end -->";
/// The server the others are compared with.
const BASELINE: &str = "coturn 4.17.1, 2 threads";
/// The same calls socket to socket.
const DIRECT: &str = "direct (no relay)";
/// Where CPU per packet and latency are compared: a load every server holds.
const REFERENCE_CALLS: u32 = 100;
/// Each end's streams.
const AUDIO_PPS: f64 = 50.0;
const VIDEO_PPS: f64 = 100.0;
/// A run whose generator sent less than this share of its target does not count as held
/// (the machine, not the server, was the limit).
const OFFERED_SHARE: f64 = 0.99;

fn ladder(quick: bool) -> Vec<u32> {
    if quick {
        vec![50, 100, 200]
    } else {
        vec![50, 100, 150, 200, 250, 300, 350, 400, 450, 500, 600]
    }
}

fn servers(tools: &Tools) -> Vec<Server> {
    let s = |name: &str, kind| Server { name: name.into(), kind, threads: 2, extra: vec![] };
    let mut fast = s(crate::bench_bidir::FAST, Kind::TurnP2c);
    fast.extra = vec!["--fast-path", "tc"];
    let mut list = vec![fast, s("turn-server 2w", Kind::TurnP2c)];
    // Not coturn 4.17.1's fastest mode: with `--multiplex-peer` every allocation of a relay
    // thread shares that thread's one relayed address, so the second end of a call through the
    // same server is refused its permission (400 "Peer address already used by another
    // multiplex-peer allocation"): relay-to-relay calls cannot run in that mode.
    if tools.coturn_current.is_some() {
        list.push(s(BASELINE, Kind::CoturnCurrent));
    }
    list.push(s("coturn 4.6.1 (Debian), 2 threads", Kind::Coturn));
    if tools.pion.is_some() {
        list.push(s("pion 2 sockets", Kind::Pion));
    }
    // The direct exchange runs through no server; `Floor` stands for "none" here.
    list.push(s(DIRECT, Kind::Floor));
    list
}

/// One run of `calls` calls through `server` (or directly).
fn run_once(server: &Server, tools: &Tools, calls: u32, secs: &str) -> Result<Value> {
    let calls = calls.to_string();
    let common = ["--calls", &calls, "--duration", secs, "--json"];
    if server.kind == Kind::Floor {
        return run_json(Command::new(&tools.turn_bench).args(["media", "--direct"]).args(common));
    }
    let running = start(server, tools, free_port()?)?;
    let pid = running.pid().to_string();
    run_json(
        Command::new(&tools.turn_bench)
            .args(["media", "--server", &running.addr, "-u", USER, "-w", PASSWORD])
            .args(["--realm", REALM, "--server-pid", &pid])
            .args(common),
    )
}

/// A run held its calls: nothing lost, and the generator sent (nearly) its target.
fn held(v: &Value, calls: u32, secs: f64) -> bool {
    let target = f64::from(calls) * 2.0 * (AUDIO_PPS + VIDEO_PPS) * secs;
    f(v, &["lost"]) == Some(0.0) && f(v, &["sent"]).is_some_and(|s| s >= OFFERED_SHARE * target)
}

/// The ladder, `reps` runs per step and server, interleaved; then the report.
pub fn run(tools: &Tools, quick: bool, reps: usize, report: &Path) -> Result<()> {
    std::fs::create_dir_all(&tools.out_dir)?;
    let context = RunContext::of(tools);
    let servers = servers(tools);
    let (secs, secs_f) = if quick { ("3", 3.0) } else { ("5", 5.0) };
    let mut results: Vec<(String, u32, Value)> = Vec::new();
    let mut raw = format!("{}\n", serde_json::json!({ "context": context }));
    let mut racing: Vec<bool> = vec![true; servers.len()];
    for calls in ladder(quick) {
        if !racing.iter().any(|&r| r) {
            break;
        }
        let mut held_runs = vec![0usize; servers.len()];
        for rep in 0..reps {
            for (k, server) in servers.iter().enumerate() {
                if !racing[k] {
                    continue;
                }
                println!(
                    "xtask: bench: media {calls} calls, rep {}/{reps}: {}",
                    rep + 1,
                    server.name
                );
                match run_once(server, tools, calls, secs) {
                    Ok(v) => {
                        if held(&v, calls, secs_f) {
                            held_runs[k] += 1;
                        }
                        let _ = writeln!(
                            raw,
                            "{}",
                            serde_json::json!({"server": server.name, "calls": calls, "rep": rep, "result": v})
                        );
                        results.push((server.name.clone(), calls, v));
                    }
                    Err(e) => println!("xtask: bench:   failed: {e:#}"),
                }
            }
        }
        for (k, server) in servers.iter().enumerate() {
            if racing[k] && held_runs[k] * 2 <= reps {
                println!("xtask: bench: {} did not hold {calls} calls", server.name);
                racing[k] = false;
            }
        }
    }
    let raw_path = tools.out_dir.join("media.jsonl");
    std::fs::write(&raw_path, &raw)?;
    let markdown = render(&context, &results, &servers, reps, quick, secs_f);
    write_section(report, BEGIN, END, &markdown)?;
    println!("xtask: bench: wrote {} and {}", report.display(), raw_path.display());
    Ok(())
}

fn render(
    context: &RunContext,
    results: &[(String, u32, Value)],
    servers: &[Server],
    reps: usize,
    quick: bool,
    secs: f64,
) -> String {
    let runs = |server: &str, calls: u32| -> Vec<&Value> {
        results.iter().filter(|(s, c, _)| s == server && *c == calls).map(|(_, _, v)| v).collect()
    };
    let values = |server: &str, calls: u32, path: &[&str]| -> Vec<f64> {
        runs(server, calls).into_iter().filter_map(|v| f(v, path)).collect()
    };
    // The most calls a server held (most of its runs at that step).
    let most = |server: &str| -> Option<u32> {
        ladder(quick)
            .into_iter()
            .take_while(|&c| {
                let r = runs(server, c);
                !r.is_empty() && r.iter().filter(|v| held(v, c, secs)).count() * 2 > r.len()
            })
            .last()
    };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Media-like calls through the relay (`cargo xtask bench --media{}`)\n",
        if quick { " --quick" } else { "" }
    );
    let _ = writeln!(
        md,
        "Run on {}, Linux {}, {} CPUs, loopback; turn-server at commit {}, coturn {} (built \
         from the release archive, default configuration; its fastest mode, `--multiplex-peer`, \
         cannot carry these calls: every allocation of a relay thread shares one relayed \
         address, so the second end of a call is refused its permission with 400 \"Peer address \
         already used by another multiplex-peer allocation\"), coturn {} (Debian), pion/turn from Debian's Go packages; every server \
         on 2 threads. `turn-bench media` \
         makes each call two clients, each with its own socket and allocation; each permits \
         and binds a channel to the other's relayed address, and both send audio \
         ({AUDIO_PPS} pps x 160 B) and video ({VIDEO_PPS} pps x 1,200 B) to it, so every packet \
         crosses the server twice (client -> its relay -> the other relay -> the other \
         client): {} packets/s forwarded per call. The number of calls climbs the ladder {}; \
         at each step every server still in runs {reps} time(s), interleaved, a fresh server \
         per run, {secs} s measured after 1 s of warm-up. A run holds its calls when no packet \
         of any call is lost and the generator sent at least {:.0}% of its target; a step is \
         held when most of its runs hold, and a server leaves at its first step not held. \
         `direct` is the same exchange socket to socket: the latency baseline, and the \
         ceiling of the one generator thread, which shares the 2 cores with the server.\n",
        context.date,
        context.kernel,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        context.commit,
        context.coturn_current,
        context.coturn,
        4.0 * (AUDIO_PPS + VIDEO_PPS),
        ladder(quick).iter().map(u32::to_string).collect::<Vec<_>>().join(", "),
        OFFERED_SHARE * 100.0
    );
    md.push_str(
        "| server | most calls held | vs coturn 4.17.1 | server CPU us per forwarded packet at that load | one-way latency p50 / p99 us at that load |\n\
         | --- | ---: | ---: | ---: | ---: |\n",
    );
    let baseline = most(BASELINE);
    for server in servers.iter().map(|s| s.name.as_str()) {
        let best = most(server);
        let ratio = match (best, baseline) {
            (Some(a), Some(b)) if server != DIRECT => {
                format!("{:.2}x", f64::from(a) / f64::from(b))
            }
            _ => "-".into(),
        };
        let (cpu, latency) = match best {
            Some(c) => {
                let (_, cpu) = spread(values(server, c, &["server_cpu", "cpu_us_per_packet"]), 2);
                let (p50, _) = spread(values(server, c, &["latency_us", "all", "p50"]), 0);
                let (p99, _) = spread(values(server, c, &["latency_us", "all", "p99"]), 0);
                let latency = match (p50, p99) {
                    (Some(a), Some(b)) => format!("{a:.0} / {b:.0}"),
                    _ => "-".into(),
                };
                (cpu, latency)
            }
            None => ("-".into(), "-".into()),
        };
        let best = best.map_or("none".into(), |c| c.to_string());
        let _ = writeln!(md, "| {server} | {best} | {ratio} | {cpu} | {latency} |");
    }
    let _ = writeln!(
        md,
        "\n### At {REFERENCE_CALLS} calls ({} packets/s forwarded)\n",
        f64::from(REFERENCE_CALLS) * 4.0 * (AUDIO_PPS + VIDEO_PPS)
    );
    md.push_str(
        "| server | calls without loss (median) | server CPU us per forwarded packet | vs coturn 4.17.1 | machine CPU above the generator, us per forwarded packet | above, vs coturn 4.17.1 / vs turn-server | one-way p50 / p99 us | added by the relay p50 / p99 us |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let at = REFERENCE_CALLS;
    let cpu_path = ["server_cpu", "cpu_us_per_packet"];
    let (base_cpu, _) = spread(values(BASELINE, at, &cpu_path), 2);
    let (d50, _) = spread(values(DIRECT, at, &["latency_us", "all", "p50"]), 0);
    let (d99, _) = spread(values(DIRECT, at, &["latency_us", "all", "p99"]), 0);
    // The machine's CPU per delivered datagram, direct: what the generator alone costs.
    let machine = ["machine_cpu", "cpu_us_per_packet"];
    let (generator, _) = spread(values(DIRECT, at, &machine), 2);
    // Each delivered datagram is forwarded twice through a relay.
    let above_runs = |server: &str| -> Vec<f64> {
        values(server, at, &machine)
            .into_iter()
            .filter_map(|m| generator.map(|g| (m - g) / 2.0))
            .collect()
    };
    for server in servers.iter().map(|s| s.name.as_str()) {
        if runs(server, at).is_empty() {
            continue;
        }
        let (_, lossless) = spread(values(server, at, &["calls_lossless"]), 0);
        let (cpu_median, cpu) = spread(values(server, at, &cpu_path), 2);
        let ratio = match (cpu_median, base_cpu) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        let (p50, _) = spread(values(server, at, &["latency_us", "all", "p50"]), 0);
        let (p99, _) = spread(values(server, at, &["latency_us", "all", "p99"]), 0);
        let pair = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => format!("{a:.0} / {b:.0}"),
            _ => "-".into(),
        };
        let above = if server == DIRECT { "-".into() } else { spread(above_runs(server), 2).1 };
        let ratios = if server == DIRECT {
            "-".into()
        } else {
            let mine = spread(above_runs(server), 2).0;
            let ratio = |of: &str| match (mine, spread(above_runs(of), 2).0) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
                _ => "-".into(),
            };
            format!("{} / {}", ratio(BASELINE), ratio("turn-server 2w"))
        };
        let added = if server == DIRECT {
            "-".into()
        } else {
            pair(p50.zip(d50).map(|(a, b)| a - b), p99.zip(d99).map(|(a, b)| a - b))
        };
        let _ = writeln!(
            md,
            "| {server} | {lossless} | {cpu} | {ratio} | {above} | {ratios} | {} | {added} |",
            pair(p50, p99)
        );
    }
    md.push_str(
        "\nMedians of the runs, (lowest-highest) where there are several. Machine CPU is every \
         task's (the root cgroup's `cpuacct.usage`), per datagram delivered, less the direct \
         exchange's median (the generator alone), halved (a relay forwards each twice). \
         Latency is one way, \
         sender to the other end of the call, on one clock; \"added\" is the relay's median \
         minus the direct exchange's, per percentile. Every run, with what was sent, lost and \
         the generator's CPU: `target/bench/media.jsonl`.\n",
    );
    md
}
