//! Steering through the real daemon: the load CLI, the runtime mode switch and who may use
//! it, pins left after SIGTERM and after kill -9.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    os::unix::fs::MetadataExt,
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use turn_tests::{Daemon, PinRoot, json_field, require_root, require_tool, send_flows, server_bin};

fn cli(args: &[&str]) -> Output {
    Command::new(server_bin()).args(args).output().unwrap()
}

fn load_json(root: &PinRoot, daemon: &Daemon) -> serde_json::Value {
    let pid = daemon.pid().to_string();
    let out =
        cli(&["load", "--json", "--interval", "0.5", "--pin-root", root.arg(), "--pid", &pid]);
    assert!(out.status.success(), "load failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs the CLI as uid/gid 65534 with no capabilities.
fn as_nobody(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(server_bin())
        .args(args)
        .output()
        .unwrap()
}

/// Where a daemon pins the maps of its listener `addr`.
fn listener_dir(root: &PinRoot, addr: std::net::SocketAddr) -> std::path::PathBuf {
    turn_server::bpffs::listener_dir(&root.0, addr)
}

#[test]
fn load_cli_shows_every_worker_while_traffic_flows() {
    if !require_root("load_cli_shows_every_worker_while_traffic_flows") {
        return;
    }
    let root = PinRoot::new("load");
    let daemon =
        Daemon::start(&["--workers", "2", "--steering", "p2c", "--bpf-pin-root", root.arg()]);
    let to = daemon.addr();
    let traffic = std::thread::spawn(move || {
        send_flows(to, 20, 5, 200, 60, Duration::from_millis(20));
    });
    std::thread::sleep(Duration::from_millis(200));
    let report = load_json(&root, &daemon);
    traffic.join().unwrap();
    let group = &report["groups"][0];
    assert_eq!(group["mode"], "p2c", "{report}");
    let sockets = group["sockets"].as_array().unwrap();
    assert_eq!(sockets.len(), 2, "{report}");
    let remembered: u64 = sockets.iter().map(|s| s["memo_flows"].as_u64().unwrap()).sum();
    assert_eq!(remembered, 20, "every flow is remembered: {report}");
    for s in sockets {
        // The worker's own count and the program's agree: every datagram is a garbage
        // datagram from a client here, counted once by each.
        let worker = s["packets_per_sec"].as_f64().unwrap();
        let steered = s["steered_per_sec"].as_f64().unwrap();
        assert!(worker > 0.0 && steered > 0.0, "{report}");
        assert!(s["bytes_per_sec"].as_f64().unwrap() > 0.0, "{report}");
        assert_eq!(s["pinned_allocations"], 0, "no allocation, no pin: {report}");
        assert_eq!(s["handoff_drops"], 0, "{report}");
    }
    assert_eq!(group["owners"][0].as_u64(), Some(u64::from(daemon.pid())), "{report}");
    let share: f64 = sockets.iter().map(|s| s["share"].as_f64().unwrap()).sum();
    assert!((share - 1.0).abs() < 1e-6, "{report}");
    assert!(group["imbalance"].as_f64().unwrap() >= 1.0, "{report}");
    assert_eq!(group["unsteered_per_sec"].as_f64().unwrap(), 0.0, "{report}");

    // The table for people names the same listener.
    let text = cli(&["load", "--interval", "0.1", "--pin-root", root.arg()]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&format!("listener udp {to} steering p2c (2 sockets")), "{text}");
    assert!(text.contains("imbalance (busiest / mean)"), "{text}");
}

#[test]
fn steering_set_switches_new_flows_and_needs_root() {
    if !require_root("steering_set_switches_new_flows_and_needs_root")
        || !require_tool("steering_set_switches_new_flows_and_needs_root", "setpriv", "util-linux")
    {
        return;
    }
    let root = PinRoot::new("set");
    let daemon =
        Daemon::start(&["--workers", "2", "--steering", "p2c", "--bpf-pin-root", root.arg()]);
    // Someone who is neither root nor in the admin group is refused.
    let denied = as_nobody(&["steering", "set", "hash", "--pin-root", root.arg()]);
    assert!(!denied.status.success());
    assert_eq!(load_json(&root, &daemon)["groups"][0]["mode"], "p2c");

    let out = cli(&["steering", "set", "hash", "--pin-root", root.arg()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("steering p2c -> hash"), "{stdout}");
    assert_eq!(load_json(&root, &daemon)["groups"][0]["mode"], "hash");
}

#[test]
fn admin_group_may_inspect_and_switch() {
    if !require_root("admin_group_may_inspect_and_switch")
        || !require_tool("admin_group_may_inspect_and_switch", "setpriv", "util-linux")
    {
        return;
    }
    let root = PinRoot::new("admin");
    // gid 65534 (nogroup) stands in for an operators' group.
    let _daemon =
        Daemon::start(&["--workers", "2", "--bpf-pin-root", root.arg(), "--admin-group", "65534"]);
    let out = as_nobody(&["steering", "set", "hash", "--pin-root", root.arg()]);
    assert!(
        out.status.success(),
        "admin group member refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sigterm_removes_the_pins() {
    if !require_root("sigterm_removes_the_pins") {
        return;
    }
    let root = PinRoot::new("term");
    let mut daemon = Daemon::start(&["--workers", "2", "--bpf-pin-root", root.arg()]);
    let dir = listener_dir(&root, daemon.addr());
    assert!(dir.is_dir(), "pins while running");
    let status = daemon.signal_and_wait(libc::SIGTERM, Duration::from_secs(10)).unwrap();
    assert!(status.success());
    assert!(!dir.exists(), "pins left behind after SIGTERM: {}", dir.display());
    assert!(!root.0.exists(), "an empty pin root left behind: {}", root.0.display());
    assert!(daemon.logs().contains("steering program detached, pins removed"), "{}", daemon.logs());
}

#[test]
fn restart_after_kill_9_removes_stale_pins_and_serves() {
    if !require_root("restart_after_kill_9_removes_stale_pins_and_serves") {
        return;
    }
    let root = PinRoot::new("kill");
    let mut first = Daemon::start(&["--workers", "2", "--bpf-pin-root", root.arg()]);
    let stale = listener_dir(&root, first.addr());
    let stale_tcp = turn_server::bpffs::group_dir(
        &root.0,
        turn_server::bpffs::Protocol::Tcp,
        first.addrs("tcp")[0],
    );
    first.signal_and_wait(libc::SIGKILL, Duration::from_secs(10)).unwrap();
    assert!(stale.is_dir() && stale_tcp.is_dir(), "kill -9 leaves pins behind");

    let second = Daemon::start(&["--workers", "2", "--bpf-pin-root", root.arg()]);
    assert!(!stale.exists() && !stale_tcp.exists(), "stale pins of the killed daemon are removed");
    let mut removed = second
        .logs()
        .lines()
        .filter(|l| l.contains("removed the pins of a daemon that is no longer running"))
        .filter_map(|l| json_field(l, "dir"))
        .collect::<Vec<_>>();
    removed.sort();
    let mut expected = vec![stale.display().to_string(), stale_tcp.display().to_string()];
    expected.sort();
    assert_eq!(removed, expected);
    assert!(Path::new(&listener_dir(&root, second.addr())).is_dir());
    let report = load_json(&root, &second);
    assert_eq!(report["groups"][0]["sockets"].as_array().unwrap().len(), 2);
}

#[test]
fn after_kill_9_a_restart_on_the_same_port_relays_without_loss() {
    let test = "after_kill_9_a_restart_on_the_same_port_relays_without_loss";
    if !require_root(test) || !coturn_tools(test) {
        return;
    }
    let root = PinRoot::new("kill-relay");
    let peer_port = turn_tests::free_udp_port();
    let _peer = turn_tests::start_peer(peer_port);
    let port = turn_tests::free_udp_port().to_string();
    let mut first = relaying_daemon(&root, &["--listening-port", &port]);
    let addr = first.addr();
    let (ok, out) = relay_with_uclient(&first, peer_port, &["-n", "50", "-m", "2", "-z", "5"]);
    assert!(ok && turn_tests::uclient_lost(&out) == Some(0), "{out}");
    first.signal_and_wait(libc::SIGKILL, Duration::from_secs(10)).unwrap();
    let stale = listener_dir(&root, addr);
    assert!(stale.is_dir(), "kill -9 leaves the pins");

    // Same address and port: the stale maps of the killed daemon are replaced by fresh ones
    // and the new daemon's program steers the new group.
    let second = relaying_daemon(&root, &["--listening-port", &port]);
    assert_eq!(second.addr(), addr);
    assert!(second.logs().contains("removed the pins of a daemon that is no longer running"));
    let owners = turn_server::bpffs::owners(&stale);
    assert_eq!(owners.iter().map(|o| o.pid).collect::<Vec<_>>(), vec![second.pid()]);
    let (ok, out) = relay_with_uclient(&second, peer_port, &["-n", "100", "-m", "4", "-z", "5"]);
    assert!(ok, "{out}");
    assert_eq!(turn_tests::uclient_lost(&out), Some(0), "{out}");
    assert!(!out.contains("error"), "{out}");
    let report = load_json(&root, &second);
    let pinned: u64 = report["groups"][0]["sockets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["pinned_allocations"].as_u64().unwrap())
        .sum();
    assert!(pinned > 0, "the new daemon pins its allocations: {report}");
    assert_eq!(report["groups"][0]["unsteered_per_sec"].as_f64(), Some(0.0), "{report}");
}

/// uclient as alice relaying through `daemon` with `extra` options; returns (ok, output).
fn relay_with_uclient(daemon: &Daemon, peer_port: u16, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["-u", "alice", "-w", "secret"];
    args.extend_from_slice(extra);
    turn_tests::uclient(daemon.addr(), peer_port, &args)
}

/// [`turn_tests::relaying_daemon`] with p2c steering pinned under `root`.
fn relaying_daemon(root: &PinRoot, extra: &[&str]) -> Daemon {
    turn_tests::relaying_daemon(
        &[&["--steering", "p2c", "--bpf-pin-root", root.arg()], extra].concat(),
    )
}

fn coturn_tools(test: &str) -> bool {
    require_tool(test, "turnutils_uclient", "coturn")
        && require_tool(test, "turnutils_peer", "coturn")
}

#[test]
fn mode_switches_mid_traffic_lose_nothing() {
    let test = "mode_switches_mid_traffic_lose_nothing";
    if !require_root(test) || !coturn_tools(test) {
        return;
    }
    let root = PinRoot::new("switch");
    let daemon = relaying_daemon(&root, &[]);
    let peer_port = turn_tests::free_udp_port();
    let _peer = turn_tests::start_peer(peer_port);
    let switcher = {
        let root = root.arg().to_owned();
        std::thread::spawn(move || {
            for mode in ["hash", "p2c", "hash", "p2c"] {
                std::thread::sleep(Duration::from_millis(400));
                let out = cli(&["steering", "set", mode, "--pin-root", &root]);
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            }
        })
    };
    // About 2.5 s of traffic from 8 allocations while the mode flips four times.
    let (ok, out) =
        relay_with_uclient(&daemon, peer_port, &["-n", "250", "-m", "4", "-l", "100", "-z", "10"]);
    switcher.join().unwrap();
    assert!(ok, "{out}");
    assert_eq!(turn_tests::uclient_lost(&out), Some(0), "{out}");
    assert!(!out.contains("error"), "no error, no 437:\n{out}");
}

#[test]
fn a_pin_map_smaller_than_the_allocations_loses_nothing() {
    let test = "a_pin_map_smaller_than_the_allocations_loses_nothing";
    if !require_root(test) || !coturn_tools(test) {
        return;
    }
    let root = PinRoot::new("tiny");
    let mut daemon = relaying_daemon(
        &root,
        &[
            "--steering-pin-entries",
            "2",
            "--steering-memo-entries",
            "2",
            "--steering-memo-ttl-ms",
            "20",
        ],
    );
    let peer_port = turn_tests::free_udp_port();
    let _peer = turn_tests::start_peer(peer_port);
    // 8 allocations, room for 2 allocation pins and 2 memos of 20 ms: the other flows'
    // memos are evicted or expire all the time, their flows are re-placed, and a datagram
    // that lands on the wrong worker is handed to its owner.
    let (ok, out) =
        relay_with_uclient(&daemon, peer_port, &["-n", "200", "-m", "4", "-l", "100", "-z", "5"]);
    assert!(ok, "{out}");
    assert_eq!(turn_tests::uclient_lost(&out), Some(0), "{out}");
    assert!(!out.contains("error"), "no error, no 437:\n{out}");
    daemon.signal_and_wait(libc::SIGINT, Duration::from_secs(10)).unwrap();
    let total = |field: &str| turn_tests::worker_total(&daemon.logs(), field);
    assert!(
        total("handed_off") > 0,
        "evicted pins must have misrouted something:\n{}",
        daemon.logs()
    );
    assert_eq!(total("handed_off"), total("handed_in"), "every hand-off arrived");
    assert_eq!(total("handoff_drops"), 0);
}

#[test]
fn a_flood_of_spoofed_sources_costs_live_allocations_nothing() {
    let test = "a_flood_of_spoofed_sources_costs_live_allocations_nothing";
    if !require_root(test) || !coturn_tools(test) {
        return;
    }
    let root = PinRoot::new("flood");
    // A memo map far smaller than the flood, so that the flood evicts all the time. (With
    // `--steering-pin-entries 1`, so that allocations depend on memos too, this test sees
    // thousands of hand-offs: the pins are what protects them.)
    let mut daemon = relaying_daemon(&root, &["--steering-memo-entries", "4096"]);
    let peer_port = turn_tests::free_udp_port();
    let _peer = turn_tests::start_peer(peer_port);
    let to = daemon.addr();
    let dir = listener_dir(&root, to);
    let maps = turn_server::steering::GroupMaps::open_pinned(&dir).unwrap();
    let new_flows = |maps: &turn_server::steering::GroupMaps| -> u64 {
        maps.stats().unwrap().sockets.iter().map(|s| s.new_flows).sum()
    };
    // 50 allocations relaying for about 8 s; the flood starts once they exist and ends
    // well before them: 200,000 spoofed 4-tuples in about 5 s.
    let flood = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        turn_tests::spoofed_flood(to, 200_000, 40_000)
    });
    let (ok, out) =
        relay_with_uclient(&daemon, peer_port, &["-n", "800", "-m", "25", "-l", "100", "-z", "10"]);
    let sent = flood.join().unwrap().expect("raw socket flood (root)");
    assert_eq!(sent, 200_000);
    assert!(ok, "{out}");
    assert_eq!(turn_tests::uclient_lost(&out), Some(0), "{out}");
    assert!(!out.contains("error"), "{out}");
    // The flood went through the program: every spoofed source was a new flow.
    let placed = new_flows(&maps);
    assert!(placed >= 200_000, "only {placed} new flows: the flood did not reach the program");
    let pins = maps.pin_counts().unwrap();
    assert!(pins.memo_entries <= 4096, "{pins:?}");
    drop(maps);
    daemon.signal_and_wait(libc::SIGINT, Duration::from_secs(10)).unwrap();
    let total = |field: &str| turn_tests::worker_total(&daemon.logs(), field);
    assert_eq!(total("handed_off"), 0, "a live allocation's datagram was misrouted");
    assert_eq!(total("pin_failures"), 0);
    assert_eq!(daemon.logs().matches("allocation created").count(), 50, "{}", daemon.logs());
}

#[test]
fn a_second_daemon_on_a_steered_listener_is_refused() {
    if !require_root("a_second_daemon_on_a_steered_listener_is_refused") {
        return;
    }
    let root = PinRoot::new("second");
    let port = turn_tests::free_udp_port().to_string();
    let first =
        Daemon::start(&["--workers", "2", "--bpf-pin-root", root.arg(), "--listening-port", &port]);
    // With SO_REUSEPORT the second bind would succeed and take half of the first one's
    // new clients; the live owner of the listener's pins says it is taken.
    let out = Command::new(server_bin())
        .args(["--listening-ip", "127.0.0.1", "--listening-port", &port, "--workers", "2"])
        .args(["--bpf-pin-root", root.arg(), "--log-format", "json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("already served by turn-server pid {}", first.pid())), "{err}");
    let owners = turn_server::bpffs::owners(&listener_dir(&root, first.addr()));
    assert_eq!(owners.iter().map(|o| o.pid).collect::<Vec<_>>(), vec![first.pid()]);
}

/// The mode bits of a pin (file or directory).
fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn the_admin_group_reads_every_map_and_writes_only_the_configuration() {
    let test = "the_admin_group_reads_every_map_and_writes_only_the_configuration";
    if !require_root(test) || !require_tool(test, "setpriv", "util-linux") {
        return;
    }
    let root = PinRoot::new("group-modes");
    let daemon =
        Daemon::start(&["--workers", "2", "--bpf-pin-root", root.arg(), "--admin-group", "65534"]);
    let dir = listener_dir(&root, daemon.addr());
    // What the daemon alone writes (sockets, allocation pins, loads...) the group only reads.
    for map in ["TURN_SOCKETS", "TURN_ALLOCS", "TURN_MEMO", "TURN_LOAD", "TURN_PLACED"] {
        assert_eq!(mode_of(&dir.join(map)), 0o640, "{map}");
    }
    assert_eq!(mode_of(&dir.join("TURN_CONFIG")), 0o660, "`steering set` writes it");
    assert_eq!(mode_of(&dir), 0o750);
    // And a member of the group can still look (read-only) and switch the mode.
    let pid = daemon.pid().to_string();
    let out = as_nobody(&[
        "load",
        "--json",
        "--interval",
        "0.2",
        "--pin-root",
        root.arg(),
        "--pid",
        &pid,
    ]);
    assert!(out.status.success(), "load as the group: {}", String::from_utf8_lossy(&out.stderr));
    let out = as_nobody(&["steering", "set", "least", "--pin-root", root.arg()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_pin_root_another_user_planted_is_not_used_and_the_daemon_serves() {
    if !require_root("a_pin_root_another_user_planted_is_not_used_and_the_daemon_serves") {
        return;
    }
    // A local user (uid 65534) created the pin root first, and in it the listener
    // directory of the port the daemon will use, with the owner marker of a live process
    // (pid 1), so that the daemon would take the port for another turn-server's.
    let root = PinRoot::new("planted");
    let port = turn_tests::free_udp_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let planted = listener_dir(&root, addr);
    let pid1 = std::fs::read_to_string("/proc/1/stat").unwrap();
    let start = pid1.rsplit_once(')').unwrap().1.split_whitespace().nth(19).unwrap().to_owned();
    std::fs::create_dir_all(planted.join(format!("owner-1-{start}"))).unwrap();
    for dir in [root.0.clone(), planted.parent().unwrap().to_owned(), planted.clone()] {
        std::os::unix::fs::lchown(&dir, Some(65534), Some(65534)).unwrap();
    }
    let port = port.to_string();
    let daemon = Daemon::start(&[
        "--workers",
        "2",
        "--no-tcp",
        "--steering",
        "p2c",
        "--listening-port",
        &port,
        "--bpf-pin-root",
        root.arg(),
    ]);
    assert_eq!(daemon.addr(), addr);
    let logs = daemon.logs();
    assert!(logs.contains("belongs to uid 65534"), "{logs}");
    assert!(logs.contains("steering p2c") || logs.contains("\"steering\":\"p2c\""), "{logs}");
    // Nothing was pinned, chmodded or chowned there.
    assert!(!planted.join("TURN_LOAD").exists());
    assert_eq!(std::fs::symlink_metadata(&planted).unwrap().uid(), 65534);
    let mut client = turn_tests::StunClient::new("127.0.0.1", addr, "alice", "secret");
    client.send_allocate();
    assert!(client.receive(Duration::from_secs(2)).is_some(), "the daemon answers");
}

#[test]
fn a_pin_root_that_is_a_symbolic_link_is_not_followed() {
    if !require_root("a_pin_root_that_is_a_symbolic_link_is_not_followed") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    // Someone made the pin root a link to another directory of bpffs (another program's
    // private one): the daemon must neither pin there nor chmod or chown it.
    let victim = PinRoot::new("victim");
    std::fs::create_dir_all(victim.0.join("keep")).unwrap();
    std::fs::set_permissions(&victim.0, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = PinRoot::new("link");
    std::os::unix::fs::symlink(&victim.0, &link.0).unwrap();
    let daemon = Daemon::start(&["--workers", "2", "--bpf-pin-root", link.arg()]);
    assert!(daemon.logs().contains("is a symbolic link"), "{}", daemon.logs());
    assert_eq!(mode_of(&victim.0), 0o700);
    let names: Vec<_> =
        std::fs::read_dir(&victim.0).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("keep")], "nothing pinned in the target");
    drop(daemon);
    std::fs::remove_file(&link.0).unwrap();
}

#[test]
fn a_shared_pin_root_keeps_other_programs_pins() {
    if !require_root("a_shared_pin_root_keeps_other_programs_pins") {
        return;
    }
    let root = PinRoot::new("shared");
    let theirs = [root.0.join("other-tool").join("state"), root.0.join("v2").join("xdp-links")];
    for dir in &theirs {
        std::fs::create_dir_all(dir).unwrap();
    }
    let mut daemon = Daemon::start(&["--workers", "2", "--bpf-pin-root", root.arg()]);
    daemon.signal_and_wait(libc::SIGTERM, Duration::from_secs(10)).unwrap();
    for dir in &theirs {
        assert!(dir.is_dir(), "{} is another program's and must stay", dir.display());
    }
    assert!(!listener_dir(&root, daemon.addr()).exists(), "the daemon's own pins are gone");
}

#[test]
fn the_daemon_mounts_bpffs_private() {
    let test = "the_daemon_mounts_bpffs_private";
    if !require_root(test) || !require_tool(test, "unshare", "util-linux") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    // In a mount namespace of its own where nothing is mounted on /sys/fs/bpf, the daemon
    // mounts bpffs itself: mode 0700, not the kernel's default 1777.
    let wrapper = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "umount -l /sys/fs/bpf && exec \"$@\"",
        "sh",
    ];
    let daemon = Daemon::start_as(&wrapper, &["--workers", "2", "--steering", "p2c"]);
    let mount = format!("/proc/{}/root/sys/fs/bpf", daemon.pid());
    let mode = std::fs::metadata(&mount).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "bpffs mounted with mode {:o}", mode & 0o7777);
}
