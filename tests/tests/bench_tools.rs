//! The load generator's modes the benchmarks rely on, against the real daemon on loopback:
//! a mix of heavy and light flows (the capacity benchmark's mixed workload) and the
//! exchange without a relay (what the generator alone costs the machine).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use turn_tests::{relaying_daemon, run_tool};

/// `turn-bench`, beside this test's own build (target/<profile>/deps/bench_tools-*).
fn turn_bench() -> String {
    let exe = std::env::current_exe().unwrap();
    let bench = exe.parent().and_then(|d| d.parent()).unwrap().join("turn-bench");
    assert!(bench.is_file(), "{} is missing: cargo builds it with the workspace", bench.display());
    bench.to_str().unwrap().to_owned()
}

/// `turn-bench load ARGS --json`: its report.
fn load(args: &[&str]) -> serde_json::Value {
    let bench = turn_bench();
    let mut all = vec!["load"];
    all.extend(args);
    all.push("--json");
    let (ok, out) = run_tool(&bench, &all, Duration::from_secs(60));
    assert!(ok, "turn-bench load {args:?}:\n{out}");
    let line = out.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("{out}"));
    serde_json::from_str(line).unwrap()
}

fn num(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

#[test]
fn heavy_flows_send_at_their_own_rate_beside_the_light_ones() {
    let daemon = relaying_daemon(&[]);
    let server = daemon.addr().to_string();
    let common = ["--server", &server, "-u", "alice", "-w", "secret", "--duration", "2"];
    // 2 heavy flows at 1,000 pps and 6 light ones at 50: 2,300 pps in all.
    let mut args = common.to_vec();
    args.extend(["--flows", "8", "--heavy", "2", "--heavy-rate", "1000", "--rate", "50"]);
    let r = load(&args);
    assert_eq!(num(&r, "target_pps"), 2300.0, "{r}");
    assert_eq!(num(&r, "heavy_flows"), 2.0, "{r}");
    let offered = num(&r, "offered_pps");
    assert!((2100.0..=2500.0).contains(&offered), "offered {offered} pps, target 2,300: {r}");
    assert_eq!(num(&r, "loss_pct"), 0.0, "{r}");
    // Without the heavy flows, the same 8 at 50 pps offer 400.
    let mut args = common.to_vec();
    args.extend(["--flows", "8", "--rate", "50"]);
    let r = load(&args);
    let offered = num(&r, "offered_pps");
    assert!((350.0..=450.0).contains(&offered), "offered {offered} pps, target 400: {r}");
}

#[test]
fn the_direct_exchange_echoes_socket_to_socket_and_is_counted_like_a_relayed_one() {
    let r = load(&["--direct", "--echo", "--flows", "4", "--rate", "200", "--duration", "2"]);
    assert_eq!(r["mode"], "direct", "{r}");
    assert_eq!(num(&r, "loss_pct"), 0.0, "{r}");
    let echo = &r["echo_path"];
    assert_eq!(num(echo, "round_trip_loss_pct"), 0.0, "{r}");
    assert_eq!(num(echo, "stray"), 0.0, "{r}");
    // Every datagram went to the peer and came back: both count, as through a relay.
    let delivered = num(&r, "delivered");
    assert!(delivered >= 1400.0, "4 flows x 200 pps x 2 s: {r}");
    let machine = &r["machine_cpu"];
    if !machine.is_null() {
        let packets = delivered + num(echo, "received");
        let per = num(machine, "cpu_us") / packets;
        assert!((num(machine, "cpu_us_per_packet") - per).abs() < 1e-6, "{r}");
    }
    // --direct is alone: no server beside it.
    let bench = turn_bench();
    let (ok, out) = run_tool(
        &bench,
        &["load", "--direct", "--server", "127.0.0.1:3478", "--rate", "10"],
        Duration::from_secs(10),
    );
    assert!(!ok && out.contains("--direct"), "{out}");
}
