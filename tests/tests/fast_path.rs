//! The kernel fast path in the real daemon (`--fast-path tc`), on loopback: coturn's
//! clients relay through it with channels (UDP, IPv4 and IPv6, relay to relay), while Send
//! indications and a TCP client are relayed by the workers in the same run; the kernel's
//! share shows in the metrics and the session log; an entry ends with its permission, with
//! a reload that forbids its peer, and with Refresh 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use turn_proto::client::Request;
use turn_tests::{
    Daemon, free_udp_port,
    ops::{allocations, http_get},
    require_root, require_tool, start_peer,
    stream::UdpTurnClient,
    uclient, uclient_lost,
};

fn coturn_tools(test: &str) -> bool {
    require_root(test)
        && ["turnutils_uclient", "turnutils_peer"].iter().all(|t| require_tool(test, t, "coturn"))
}

/// The value of the sample of `name` whose labels include every one of `labels`, summed
/// over the samples that match.
fn metric(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn scrape(daemon: &Daemon) -> String {
    let (code, text) = http_get(daemon.metrics.unwrap(), "/metrics", &[]).unwrap();
    assert_eq!(code, 200);
    text
}

/// Waits (5 s at most) until `name{labels}` reaches `at_least`; returns the scrape.
fn wait_metric(daemon: &Daemon, name: &str, labels: &[&str], at_least: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = scrape(daemon);
        if metric(&text, name, labels) >= at_least || Instant::now() >= deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn coturn_clients_relay_through_the_kernel_beside_the_workers() {
    let test = "coturn_clients_relay_through_the_kernel_beside_the_workers";
    if !coturn_tools(test) {
        return;
    }
    let root = turn_tests::PinRoot::new("fast");
    let mut daemon = Daemon::start(&[
        "--bpf-pin-root",
        root.arg(),
        "--workers",
        "2",
        "--realm",
        "test",
        "--user",
        "alice:secret",
        "--allow-loopback-peers",
        "--fast-path",
        "tc",
        "--listening-ip",
        "127.0.0.1",
        "--listening-ip",
        "::1",
        "--prometheus",
        "--prometheus-port",
        "0",
    ]);
    assert!(daemon.logs().contains("fast path: ChannelData"), "{}", daemon.logs());
    let udp = daemon.addrs("udp");
    let (v4, v6) = (udp[0], udp[1]);
    assert!(v4.is_ipv4() && v6.is_ipv6(), "{udp:?}");
    // Its maps pinned beside each UDP listener's steering maps.
    for addr in [v4, v6] {
        let dir = turn_server::bpffs::listener_dir(&root.0, addr);
        for map in turn_server::fast_path::PINNED_MAPS {
            assert!(dir.join(map).exists(), "{} in {}", map, dir.display());
        }
    }
    let (peer4_port, peer6_port) = (free_udp_port(), free_udp_port());
    let _peer4 = start_peer(peer4_port);
    let _peer6 = turn_tests::start_peer_on("::1", peer6_port);
    let run = |server: SocketAddr, peer_port: u16, extra: &[&str]| {
        let mut args = vec!["-u", "alice", "-w", "secret", "-n", "50", "-m", "4", "-l", "160"];
        args.extend_from_slice(extra);
        let (ok, out) = uclient(server, peer_port, &args);
        assert!(ok && uclient_lost(&out) == Some(0), "{extra:?}: {out}\n{}", daemon.logs());
    };
    let peer6 = peer6_port.to_string();
    // Channels, IPv4 and IPv6, then relay to relay (both ends of each call on this server).
    run(v4, peer4_port, &[]);
    run(v6, peer6_port, &["-x", "-e", "::1", "-r", &peer6]);
    run(v4, peer4_port, &["-y"]);
    // 4 clients x 50 each way, in two runs; relay to relay 4 x 50 more, each counted to
    // the peer for its sender and to the client for its receiver.
    let kernel = [r#"transport="udp""#, r#"path="kernel""#];
    let to_peer = [kernel.as_slice(), &[r#"direction="to_peer""#]].concat();
    let to_client = [kernel.as_slice(), &[r#"direction="to_client""#]].concat();
    let text = wait_metric(&daemon, "turn_relayed_packets_total", &to_client, 600);
    assert_eq!(metric(&text, "turn_relayed_packets_total", &to_peer), 600, "{text}");
    assert_eq!(metric(&text, "turn_relayed_packets_total", &to_client), 600, "{text}");
    let verdict =
        |v: &str| metric(&text, "turn_fast_path_datagrams_total", &[&format!("verdict=\"{v}\"")]);
    assert_eq!((verdict("to_peer"), verdict("to_client")), (400, 400), "{text}");
    assert_eq!(verdict("relay_to_relay"), 200, "{text}");
    assert_eq!(verdict("failed"), 0, "{text}");
    // The workers relayed none of it.
    let user = [r#"path="user""#, r#"direction="to_peer""#];
    assert_eq!(metric(&text, "turn_relayed_packets_total", &user), 0, "{text}");

    // Send indications and a TCP client: the workers', in the same run.
    run(v4, peer4_port, &["-s"]);
    let tcp = daemon.addrs("tcp")[0];
    run(tcp, peer4_port, &["-t"]);
    let text = wait_metric(&daemon, "turn_relayed_packets_total", &user, 400);
    assert_eq!(
        metric(&text, "turn_relayed_packets_total", &[user[0], user[1], r#"transport="udp""#]),
        200
    );
    assert_eq!(
        metric(&text, "turn_relayed_packets_total", &[user[0], user[1], r#"transport="tcp""#]),
        200
    );
    assert_eq!(metric(&text, "turn_relayed_packets_total", &to_peer), 600, "unchanged: {text}");

    // The session log counts what the kernel relayed: 50 each way for every channel client.
    daemon.stop();
    let logs = daemon.logs();
    let channel_sessions = logs
        .lines()
        .filter(|l| l.contains("allocation deleted") && l.contains(r#""transport":"udp""#))
        .filter(|l| {
            l.contains(r#""to_peer_packets":50"#) && l.contains(r#""to_client_packets":50"#)
        })
        .count();
    assert!(
        channel_sessions >= 16,
        "{channel_sessions} sessions with the kernel's counts:\n{logs}"
    );
    assert!(logs.contains("fast path detached"), "{logs}");
    // Nothing left pinned.
    let left: Vec<_> = std::fs::read_dir(&root.0)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

/// A peer socket of the test.
fn peer_socket() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    s
}

/// Sends `n` datagrams each way: ChannelData from the client, datagrams from the peer to
/// the relayed address. Returns (what the peer got, what the client got).
fn exchange(
    client: &mut UdpTurnClient,
    peer: &UdpSocket,
    relayed: SocketAddr,
    n: usize,
) -> (usize, usize) {
    let (mut to_peer, mut to_client) = (0, 0);
    for i in 0..n {
        client.send_channel_data(0x4000, format!("c{i}").as_bytes());
        let mut buf = [0u8; 256];
        if let Ok((len, from)) = peer.recv_from(&mut buf) {
            assert_eq!(from, relayed);
            assert_eq!(&buf[..len], format!("c{i}").as_bytes());
            to_peer += 1;
        }
        peer.send_to(format!("p{i}").as_bytes(), relayed).unwrap();
        if let Some(d) = client.receive(Duration::from_millis(300)) {
            assert_eq!(&d[..4], &[0x40, 0x00, 0, 2 + (i >= 10) as u8]);
            to_client += 1;
        }
    }
    (to_peer, to_client)
}

fn verdicts(daemon: &Daemon, v: &str) -> u64 {
    metric(&scrape(daemon), "turn_fast_path_datagrams_total", &[&format!("verdict=\"{v}\"")])
}

#[test]
fn the_kernel_path_ends_with_the_permission_a_forbidding_reload_and_refresh_zero() {
    let test = "the_kernel_path_ends_with_the_permission_a_forbidding_reload_and_refresh_zero";
    if !require_root(test) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("turn-fast-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("turn.toml");
    let base = "workers = 2\nrealm = \"test\"\nusers = [\"alice:secret\"]\n\
                allow_loopback_peers = true\nfast_path = \"tc\"\nprometheus = true\n\
                prometheus_port = 0\npermission_lifetime_secs = 3\n";
    std::fs::write(&file, base).unwrap();
    let mut daemon = Daemon::start(&["--config", file.to_str().unwrap()]);
    let peer = peer_socket();
    let mut client = UdpTurnClient::new("127.0.0.1", daemon.addr(), "alice", "secret");
    let relayed = client.request(Request::Allocate).unwrap().relayed.unwrap();
    let bind = |c: &mut UdpTurnClient| {
        c.request(Request::ChannelBind { channel: 0x4000, peer: peer.local_addr().unwrap() })
            .unwrap()
    };
    bind(&mut client);
    let path = |daemon: &Daemon| {
        let list = allocations(daemon);
        list[0]["channels"][0]["path"].as_str().unwrap_or("none").to_owned()
    };
    assert_eq!(path(&daemon), "kernel");
    let before = verdicts(&daemon, "to_peer");
    assert_eq!(exchange(&mut client, &peer, relayed, 20), (20, 20));
    assert_eq!(verdicts(&daemon, "to_peer"), before + 20, "relayed by the kernel");

    // The permission (3 s) ends: neither way relays any more, in the kernel or not; the
    // channel itself is still bound (600 s), relayed by the workers if at all.
    std::thread::sleep(Duration::from_millis(3300));
    assert_eq!(exchange(&mut client, &peer, relayed, 5), (0, 0));
    assert_eq!(path(&daemon), "user");
    // A new ChannelBind installs the permission again: back in the kernel.
    bind(&mut client);
    assert_eq!(path(&daemon), "kernel");
    assert_eq!(exchange(&mut client, &peer, relayed, 5), (5, 5));

    // A reload that forbids the peer: its entry goes at once.
    std::fs::write(&file, format!("{base}denied_peer_ips = [\"127.0.0.1\"]\n")).unwrap();
    // SAFETY: kill(2) on the daemon we started.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !daemon.logs().contains("configuration reloaded") {
        assert!(Instant::now() < deadline, "{}", daemon.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(exchange(&mut client, &peer, relayed, 5), (0, 0));
    let text = scrape(&daemon);
    assert_eq!(metric(&text, "turn_fast_path_bindings", &[]), 0, "{text}");

    // Allowed again, bound again, then Refresh 0: the entries go with the allocation.
    std::fs::write(&file, base).unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while daemon.logs().matches("configuration reloaded").count() < 2 {
        assert!(Instant::now() < deadline, "{}", daemon.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    bind(&mut client);
    assert_eq!(exchange(&mut client, &peer, relayed, 3), (3, 3));
    assert_eq!(metric(&scrape(&daemon), "turn_fast_path_bindings", &[]), 1);
    client.request(Request::Refresh { lifetime: 0 }).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&scrape(&daemon), "turn_fast_path_bindings", &[]) != 0 {
        assert!(Instant::now() < deadline, "the binding outlived its allocation");
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = verdicts(&daemon, "no_binding");
    peer.send_to(b"late", relayed).unwrap();
    assert_eq!(client.receive(Duration::from_millis(300)), None);
    assert!(verdicts(&daemon, "no_binding") > before);
    daemon.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `ip args` (iproute2), asserting success.
fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip").args(args).output().expect("running ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Runs `cmd args` inside namespace `ns`, asserting success.
fn in_ns(ns: &turn_tests::Netns, cmd: &str, args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, cmd])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The count of a verdict in the daemon's last "fast path detached" line.
fn final_verdict(logs: &str, v: &str) -> u64 {
    let line = logs.lines().rev().find(|l| l.contains("fast path detached")).unwrap_or("");
    line.split([',', '"', ' '])
        .find_map(|kv| kv.strip_prefix(&format!("{v}=")))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Across network namespaces joined by veth pairs (client, server, peer, routed through
/// the server): the program routes each rewritten datagram with `bpf_fib_lookup` and sets
/// the next hop's MAC; with forwarding off on a server of two interfaces it leaves every
/// datagram to the workers, and nothing is lost either way.
#[test]
fn across_namespaces_the_kernel_routes_with_the_fib_and_falls_back_without_it() {
    let test = "across_namespaces_the_kernel_routes_with_the_fib_and_falls_back_without_it";
    if !coturn_tools(test) || !require_tool(test, "ethtool", "ethtool") {
        return;
    }
    let client = turn_tests::Netns::new("fc", &[]);
    let server = turn_tests::Netns::new("fs", &[]);
    let peer = turn_tests::Netns::new("fp", &[]);
    // Interface names are per namespace: the same short names in every test run.
    ip(&[
        "link",
        "add",
        "c0",
        "netns",
        &client.name,
        "type",
        "veth",
        "peer",
        "s0",
        "netns",
        &server.name,
    ]);
    ip(&[
        "link",
        "add",
        "p0",
        "netns",
        &peer.name,
        "type",
        "veth",
        "peer",
        "s1",
        "netns",
        &server.name,
    ]);
    for (ns, dev, addr) in [
        (&client, "c0", "10.201.1.2/24"),
        (&server, "s0", "10.201.1.1/24"),
        (&server, "s1", "10.201.2.1/24"),
        (&peer, "p0", "10.201.2.2/24"),
    ] {
        ip(&["-n", &ns.name, "addr", "add", addr, "dev", dev]);
        ip(&["-n", &ns.name, "link", "set", dev, "up"]);
    }
    ip(&["-n", &client.name, "route", "add", "default", "via", "10.201.1.1"]);
    ip(&["-n", &peer.name, "route", "add", "default", "via", "10.201.2.1"]);
    // The senders checksum in software (a partial checksum cannot leave by the fast path).
    in_ns(&client, "ethtool", &["-K", "c0", "tx", "off"]);
    in_ns(&peer, "ethtool", &["-K", "p0", "tx", "off"]);
    in_ns(&server, "sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1"]);

    let peer_port = free_udp_port();
    let _echo = peer.spawn("turnutils_peer", &["-L", "10.201.2.2", "-p", &peer_port.to_string()]);
    let mut daemon = Daemon::start_as(
        &server.exec(),
        &[
            "--workers",
            "2",
            "--realm",
            "test",
            "--user",
            "alice:secret",
            "--allow-private-peers",
            "--fast-path",
            "tc",
            "--listening-ip",
            "10.201.1.1",
            "--relay-ip",
            "10.201.2.1",
        ],
    );
    let attached = daemon
        .logs()
        .lines()
        .find_map(|l| turn_tests::json_field(l, "interfaces"))
        .unwrap_or_default();
    let mut attached: Vec<&str> = attached.split(',').collect();
    attached.sort_unstable();
    assert_eq!(attached, ["lo", "s0", "s1"], "the listener's, the relay's and loopback");
    let port = daemon.addr().port().to_string();
    let run = |n: &str| {
        let peer = peer_port.to_string();
        let args = [
            "netns",
            "exec",
            &client.name,
            "turnutils_uclient",
            "-c",
            "-u",
            "alice",
            "-w",
            "secret",
            "-p",
            &port,
            "-e",
            "10.201.2.2",
            "-r",
            &peer,
            "-n",
            n,
            "-m",
            "4",
            "-l",
            "160",
            "10.201.1.1",
        ];
        let (ok, out) = turn_tests::run_tool("ip", &args, Duration::from_secs(60));
        assert!(ok && uclient_lost(&out) == Some(0), "{out}");
    };
    // Forwarding on: routed by the program (the first datagrams of a flow may go up while
    // the kernel resolves the next hop's MAC).
    run("100");
    // Forwarding off, two interfaces: no route the program may use; the workers relay.
    in_ns(&server, "sysctl", &["-qw", "net.ipv4.conf.all.forwarding=0"]);
    run("100");
    daemon.stop();
    let logs = daemon.logs();
    let (to_peer, to_client) = (final_verdict(&logs, "to_peer"), final_verdict(&logs, "to_client"));
    assert!(
        to_peer >= 390 && to_client >= 390,
        "routed by the program: {to_peer}/{to_client}\n{logs}"
    );
    assert!(to_peer <= 400 && to_client <= 400, "{logs}");
    assert!(final_verdict(&logs, "no_route") >= 800, "forwarding off: {logs}");
    assert_eq!(final_verdict(&logs, "failed"), 0, "{logs}");
}

/// The names of the TCX programs on the ingress of `interface` in namespace `ns`.
fn tcx_programs(ns: &turn_tests::Netns, interface: &'static str) -> Vec<String> {
    let path = format!("/var/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on this thread only, with a namespace file we hold open.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}");
        let (_, programs) = aya::programs::SchedClassifier::query_tcx(
            interface,
            aya::programs::TcAttachType::Ingress,
        )
        .unwrap();
        programs.iter().filter_map(|p| p.name_as_str().map(str::to_owned)).collect()
    })
    .join()
    .unwrap()
}

/// Waits (2 s at most) until `turn_fast` is attached, or not, to `ns`'s loopback.
fn wait_attached(ns: &turn_tests::Netns, attached: bool) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while tcx_programs(ns, "lo").iter().any(|n| n == "turn_fast") != attached {
        assert!(Instant::now() < deadline, "turn_fast attached: {:?}", tcx_programs(ns, "lo"));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The program is attached by links the daemon holds: after SIGKILL nothing stays attached,
/// and a restart attaches it again; a clean stop detaches it.
#[test]
fn kill_9_leaves_no_program_attached_and_a_restart_works() {
    let test = "kill_9_leaves_no_program_attached_and_a_restart_works";
    if !require_root(test) {
        return;
    }
    let ns = turn_tests::Netns::new("fkill", &[]);
    let args = ["--workers", "2", "--fast-path", "tc"];
    let mut first = Daemon::start_as(&ns.exec(), &args);
    wait_attached(&ns, true);
    first.signal_and_wait(libc::SIGKILL, Duration::from_secs(10)).unwrap();
    wait_attached(&ns, false);
    let mut second = Daemon::start_as(&ns.exec(), &args);
    wait_attached(&ns, true);
    assert!(second.stop().is_some_and(|s| s.success()));
    wait_attached(&ns, false);
    assert!(second.logs().contains("fast path detached"), "{}", second.logs());
}
