//! `cargo xtask bench --upgrade`: an upgrade under the traffic relays carry, through the
//! release daemon as a user runs it. `FLOWS` light flows (`turn-bench load`, each its own
//! allocation, `RATE` packets/s each way through the relay, echoed by the peer) run for
//! `SECS`; once every one is allocated and relaying, `turn-server upgrade` starts the binary
//! on disk as the new generation, and `NEW_FLOWS` more flows allocate right after it
//! answers. Reported per run: what the live flows sent and lost each way, how long the
//! upgrade took to answer, whether every new flow was allocated and lost nothing, and
//! whether the old process exited by itself once the live flows ended. With and without
//! the kernel fast path. The results go to `target/bench/upgrade.jsonl` and into
//! BENCHMARKS.md between the `bench-upgrade` markers.

use std::{
    fmt::Write as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::bench::{
    Kind, PASSWORD, REALM, RunContext, Server, Tools, USER, f, free_port, run_json, start,
    write_section,
};

const BEGIN: &str = "<!-- bench-upgrade:begin -->";
const END: &str = "<!-- bench-upgrade:end -->";
/// Live flows through the upgrade, and each one's packets/s each way.
const FLOWS: u32 = 1000;
const RATE: u32 = 40;
/// Flows that allocate right after the upgrade answered.
const NEW_FLOWS: u32 = 500;

fn servers() -> Vec<Server> {
    let s = |name: &str, extra: Vec<&'static str>| Server {
        name: name.into(),
        kind: Kind::TurnP2c,
        threads: 2,
        extra,
    };
    vec![
        s(crate::bench_bidir::FAST, vec!["--fast-path", "tc", "--drain-timeout", "3600"]),
        s("turn-server 2w", vec!["--drain-timeout", "3600"]),
    ]
}

/// The daemon's status through its admin API.
fn status(tools: &Tools, socket: &Path) -> Result<Value> {
    let out = Command::new(&tools.turn_server)
        .args(["status", "--socket"])
        .arg(socket)
        .output()
        .context("turn-server status")?;
    if !out.status.success() {
        bail!("turn-server status: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// True while `pid` runs (not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')))
}

/// One run: the live flows, the upgrade, the new flows; then both generations stopped.
fn run_once(server: &Server, tools: &Tools, quick: bool) -> Result<Value> {
    let secs: u32 = if quick { 12 } else { 20 };
    let flows = if quick { FLOWS / 2 } else { FLOWS };
    let running = start(server, tools, free_port()?)?;
    let crate::bench::Process::TurnServer { daemon, .. } = &running.process else {
        bail!("not a turn-server");
    };
    let socket = daemon.admin_socket.clone();
    let old_pid = running.pid();
    let load = |flows: u32, secs: u32| {
        let mut cmd = Command::new(&tools.turn_bench);
        cmd.args(["load", "--server", &running.addr, "-u", USER, "-w", PASSWORD])
            .args(["--realm", REALM, "--echo", "--size", "160", "--json"])
            .args(["--flows", &flows.to_string(), "--rate", &RATE.to_string()])
            .args(["--duration", &secs.to_string(), "--warmup", "1", "--drain", "1"]);
        cmd
    };
    let live = std::thread::spawn({
        let mut cmd = load(flows, secs);
        move || run_json(&mut cmd)
    });
    // Every live flow allocated and relaying, then a third of the run: the upgrade.
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(tools, &socket)?["allocations"].as_u64().unwrap_or(0) < u64::from(flows) {
        if Instant::now() > deadline {
            bail!("the live flows were not all allocated");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(u64::from(secs) / 3));
    let asked = Instant::now();
    let out = Command::new(&tools.turn_server)
        .args(["upgrade", "--socket"])
        .arg(&socket)
        .output()
        .context("turn-server upgrade")?;
    let upgrade_ms = asked.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        bail!("upgrade failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let new_pid: u32 = status(tools, &socket)?["pid"].as_u64().unwrap_or(0) as u32;
    let fresh = run_json(&mut load(NEW_FLOWS, 3));
    let live = live.join().map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
    // The live flows have ended (their allocations released): the old process goes.
    let ended = Instant::now();
    while alive(old_pid) && ended.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let old_exited = !alive(old_pid);
    let old_exit_ms = ended.elapsed().as_secs_f64() * 1e3;
    if new_pid != 0 && new_pid != old_pid {
        // SAFETY: kill(2) on the generation this run caused to start.
        unsafe { libc::kill(new_pid as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(new_pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    drop(running);
    let fresh = fresh.unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
    Ok(json!({
        "server": server.name,
        "flows": flows,
        "rate": RATE,
        "secs": secs,
        "live": live,
        "upgrade_ms": upgrade_ms,
        "new_pid_differs": new_pid != old_pid && new_pid != 0,
        "fresh": fresh,
        "old_exited": old_exited,
        "old_exit_ms": old_exit_ms,
    }))
}

/// `reps` runs per configuration, interleaved; then the report.
pub fn run(tools: &Tools, quick: bool, reps: usize, report: &Path) -> Result<()> {
    std::fs::create_dir_all(&tools.out_dir)?;
    let context = RunContext::of(tools);
    let servers = servers();
    let mut raw = format!("{}\n", json!({ "context": context }));
    let mut rows = Vec::new();
    for rep in 0..reps {
        for server in &servers {
            println!("xtask: bench: upgrade, rep {}/{reps}: {}", rep + 1, server.name);
            let v = run_once(server, tools, quick)
                .unwrap_or_else(|e| json!({ "server": server.name, "error": format!("{e:#}") }));
            let _ = writeln!(raw, "{v}");
            rows.push(v);
        }
    }
    std::fs::write(tools.out_dir.join("upgrade.jsonl"), raw)?;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Measured {} on Linux {} (2 cores), commit {}: `sudo cargo xtask bench --upgrade{}`. \
         Release daemon, 2 workers, p2c, `--drain-timeout 3600`. Each run: {} live flows \
         (`turn-bench load`, one allocation each, {RATE} packets/s of 160 bytes each way, \
         echoed through the relay), then `turn-server upgrade` once every one relays, then \
         {NEW_FLOWS} new flows allocating as soon as it answered; raw runs in \
         `target/bench/upgrade.jsonl`.\n",
        context.date,
        context.kernel,
        context.commit,
        if quick { " --quick" } else { "" },
        if quick { FLOWS / 2 } else { FLOWS },
    );
    md.push_str(
        "| server | run | live flows: sent | lost to peer | lost back | upgrade answered | \
         new flows allocated | new flows: lost | old process exited after the last flow |\n",
    );
    md.push_str("| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for (i, v) in rows.iter().enumerate() {
        let server = v["server"].as_str().unwrap_or("?");
        if let Some(e) = v["error"].as_str() {
            let _ =
                writeln!(md, "| {server} | {} | failed: {e} | | | | | | |", i / servers.len() + 1);
            continue;
        }
        let num = |path: &[&str]| f(v, path).unwrap_or(f64::NAN);
        let sent = num(&["live", "sent"]);
        let lost = sent - num(&["live", "delivered"]);
        let back = num(&["live", "echo_path", "return_loss_pct"]);
        let fresh_flows = num(&["fresh", "setup", "flows"]);
        let fresh_lost = num(&["fresh", "sent"]) - num(&["fresh", "delivered"]);
        let exited = if v["old_exited"].as_bool() == Some(true) {
            format!("yes, {:.0} ms", num(&["old_exit_ms"]))
        } else {
            "no".to_owned()
        };
        let _ = writeln!(
            md,
            "| {server} | {} | {sent:.0} | {lost:.0} | {back:.2} % | {:.0} ms | {fresh_flows:.0} of {NEW_FLOWS} | {fresh_lost:.0} | {exited} |",
            i / servers.len() + 1,
            num(&["upgrade_ms"]),
        );
    }
    md.push_str(
        "\n\"Upgrade answered\": from `turn-server upgrade` to its answer (the new process \
         started, joined every listener group and took new flows; the old one handed over). \
         \"Old process exited\": from the end of the live flows (their allocations released \
         by `turn-bench`) to the old process's exit.\n",
    );
    write_section(report, BEGIN, END, &md)?;
    println!("{md}");
    Ok(())
}
