//! The real daemon driven by coturn's real TURN client (turnutils_uclient), its peer
//! (turnutils_peer) and its STUN client, all on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{net::UdpSocket, time::Duration};

use turn_tests::{
    Daemon, free_udp_port, json_field, relaying_daemon, require_tool, run_tool, start_peer,
    uclient_in_background, uclient_lost,
};

const UCLIENT: Duration = Duration::from_secs(60);

/// Every test needs the coturn tools; in CI their absence is a failure.
fn tools(test: &str) -> bool {
    ["turnutils_uclient", "turnutils_peer", "turnutils_stunclient"]
        .iter()
        .all(|tool| require_tool(test, tool, "coturn"))
}

fn port_args(daemon: &Daemon) -> String {
    daemon.addr().port().to_string()
}

/// turnutils_uclient against `daemon` with `extra` options, relaying to the peer.
fn uclient(daemon: &Daemon, peer_port: u16, extra: &[&str]) -> (bool, String) {
    turn_tests::uclient(daemon.addr(), peer_port, extra)
}

#[test]
fn stun_binding_answers_the_real_stun_client() {
    if !tools("stun_binding_answers_the_real_stun_client") {
        return;
    }
    let daemon = Daemon::start(&["--workers", "2"]);
    let (ok, out) =
        run_tool("turnutils_stunclient", &["-p", &port_args(&daemon), "127.0.0.1"], UCLIENT);
    assert!(ok, "{out}");
    assert!(out.contains("UDP reflexive addr: 127.0.0.1:"), "{out}");
}

#[test]
fn relays_channels_send_indications_and_client_to_client_without_loss() {
    if !tools("relays_channels_send_indications_and_client_to_client_without_loss") {
        return;
    }
    let daemon = relaying_daemon(&[]);
    let peer_port = free_udp_port();
    let _peer = start_peer(peer_port);
    let base = ["-u", "alice", "-w", "secret", "-n", "200", "-m", "4", "-l", "120", "-z", "5"];
    for (what, extra) in [
        ("channels", &[][..]),
        ("send indications", &["-s"][..]),
        ("client to client", &["-y"][..]),
    ] {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let (ok, out) = uclient(&daemon, peer_port, &args);
        assert!(ok, "{what}: uclient failed:\n{out}\n--- daemon:\n{}", daemon.logs());
        assert_eq!(uclient_lost(&out), Some(0), "{what}: loss:\n{out}");
        assert!(!out.contains("error"), "{what}:\n{out}");
    }
    assert!(daemon.logs().contains("allocation created"));
}

/// Relay to relay on one daemon (both ends of a call use it): a datagram from one
/// allocation's relay to another's is handed over inside the daemon, to the worker that
/// holds the receiving relay, and the receiving allocation's permissions apply as they
/// would to a datagram from the network.
#[test]
fn relay_to_relay_is_handed_over_inside_the_daemon_under_the_permission_rules() {
    let test = "relay_to_relay_is_handed_over_inside_the_daemon_under_the_permission_rules";
    if !turn_tests::require_root(test) {
        return;
    }
    let mut daemon = relaying_daemon(&[]);
    let wait = Duration::from_secs(2);
    // Four clients from four addresses: on 2 workers, some pairs share a worker and some
    // do not (the steering spreads them), so both hand-over paths carry traffic.
    let mut clients: Vec<_> = (0..4)
        .map(|i| {
            turn_tests::StunClient::new(
                &format!("127.0.0.{}", 11 + i),
                daemon.addr(),
                "alice",
                "secret",
            )
        })
        .collect();
    let relays: Vec<_> = clients.iter_mut().map(|c| c.allocate_relayed(wait).unwrap()).collect();
    // Without a permission at the receiver, nothing arrives (the sender has one).
    clients[0].send_create_permission(relays[1]);
    assert_eq!(clients[0].receive(wait), Some(0));
    clients[0].send_indication(relays[1], b"not permitted");
    assert_eq!(clients[1].receive_data(Duration::from_millis(300)), None);
    // Every client permits every other's relay; then each sends to each.
    for (i, c) in clients.iter_mut().enumerate() {
        for (j, &r) in relays.iter().enumerate() {
            if i != j {
                c.send_create_permission(r);
                assert_eq!(c.receive(wait), Some(0), "permission {i} -> {j}");
            }
        }
    }
    let mut delivered = 0;
    for i in 0..4 {
        for j in (0..4).filter(|&j| j != i) {
            let text = format!("{i} to {j}");
            clients[i].send_indication(relays[j], text.as_bytes());
            let (from, data) =
                clients[j].receive_data(wait).unwrap_or_else(|| panic!("{text}: nothing arrived"));
            assert_eq!(from, relays[i], "{text}: the sender's relayed address is the source");
            assert_eq!(data, text.as_bytes());
            delivered += 1;
        }
    }
    daemon.stop();
    let logs = daemon.logs();
    // Every datagram, the unpermitted one too: handed over, then dropped by the receiver.
    assert_eq!(
        turn_tests::worker_total(&logs, "relayed_internally"),
        delivered + 1,
        "every relay-to-relay datagram is handed over inside the daemon:\n{logs}"
    );
    assert_eq!(turn_tests::worker_total(&logs, "handoff_drops"), 0, "{logs}");
    assert!(
        turn_tests::worker_total(&logs, "dropped") >= 1,
        "the unpermitted datagram is a counted drop"
    );
}

#[test]
fn rest_secret_credentials_work() {
    if !tools("rest_secret_credentials_work") {
        return;
    }
    let daemon = Daemon::start(&[
        "--workers",
        "2",
        "--realm",
        "test",
        "--static-auth-secret",
        "old-secret",
        "--static-auth-secret",
        "new-secret",
        "--allow-loopback-peers",
    ]);
    let peer_port = free_udp_port();
    let _peer = start_peer(peer_port);
    for secret in ["new-secret", "old-secret"] {
        let (ok, out) = uclient(
            &daemon,
            peer_port,
            &["-W", secret, "-n", "100", "-m", "2", "-l", "100", "-z", "5"],
        );
        assert!(ok, "{secret}: {out}");
        assert_eq!(uclient_lost(&out), Some(0), "{secret}:\n{out}");
    }
    let (_, out) = uclient(&daemon, peer_port, &["-W", "wrong-secret", "-n", "10", "-m", "1"]);
    assert!(
        out.contains("401") || uclient_lost(&out).is_none(),
        "a wrong secret must not relay:\n{out}"
    );
}

#[test]
fn quotas_refuse_with_486() {
    if !tools("quotas_refuse_with_486") {
        return;
    }
    let peer_port = free_udp_port();
    let _peer = start_peer(peer_port);
    // uclient -m 1 makes two allocations for one user.
    for quota in [["--user-quota", "2"], ["--total-quota", "2"]] {
        let daemon = relaying_daemon(&quota);
        let (ok, out) = uclient(
            &daemon,
            peer_port,
            &["-u", "alice", "-w", "secret", "-n", "20", "-m", "1", "-z", "5"],
        );
        assert!(ok && uclient_lost(&out) == Some(0), "{quota:?}: within quota:\n{out}");
        let (_, out) = uclient(
            &daemon,
            peer_port,
            &["-u", "alice", "-w", "secret", "-n", "20", "-m", "2", "-z", "5"],
        );
        assert!(out.contains("error 486"), "{quota:?}: over quota:\n{out}");
    }
}

#[test]
fn loopback_peer_is_refused_with_403_by_default() {
    if !tools("loopback_peer_is_refused_with_403_by_default") {
        return;
    }
    let daemon = Daemon::start(&["--workers", "2", "--realm", "test", "--user", "alice:secret"]);
    let peer_port = free_udp_port();
    let _peer = start_peer(peer_port);
    let (_, out) =
        uclient(&daemon, peer_port, &["-u", "alice", "-w", "secret", "-n", "10", "-m", "1"]);
    assert!(out.contains("error 403"), "{out}");
}

#[test]
fn allocations_land_on_both_workers() {
    if !tools("allocations_land_on_both_workers") {
        return;
    }
    let daemon = relaying_daemon(&[]);
    let peer_port = free_udp_port();
    let _peer = start_peer(peer_port);
    let (ok, out) = uclient(
        &daemon,
        peer_port,
        &["-u", "alice", "-w", "secret", "-n", "20", "-m", "8", "-z", "5"],
    );
    assert!(ok && uclient_lost(&out) == Some(0), "{out}");
    let workers: std::collections::BTreeSet<String> = daemon
        .logs()
        .lines()
        .filter(|l| l.contains("allocation created"))
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some(v["span"]["index"].to_string())
        })
        .collect();
    assert_eq!(workers.len(), 2, "allocations by worker: {workers:?}\n{}", daemon.logs());
}

#[test]
fn sigterm_drains_live_allocations_and_refuses_new_ones() {
    if !tools("sigterm_drains_live_allocations_and_refuses_new_ones") {
        return;
    }
    let mut daemon = relaying_daemon(&["--drain-timeout", "20"]);
    let peer_port = free_udp_port();
    let _peer = start_peer(peer_port);
    // About 3 s of traffic; SIGTERM arrives after 1 s.
    let running = uclient_in_background(
        daemon.addr(),
        peer_port,
        &["-u", "alice", "-w", "secret", "-n", "300", "-m", "1", "-l", "100", "-z", "10"],
    );
    std::thread::sleep(Duration::from_millis(1000));
    // SAFETY: kill(2) on the daemon we started.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(300));
    let (_, refused) =
        uclient(&daemon, peer_port, &["-u", "alice", "-w", "secret", "-n", "5", "-m", "1"]);
    assert!(refused.contains("error 508"), "a new allocation while draining gets 508:\n{refused}");
    let (ok, out) = running.join().unwrap();
    assert!(ok, "{out}\n--- daemon:\n{}", daemon.logs());
    assert_eq!(uclient_lost(&out), Some(0), "the live allocation kept relaying:\n{out}");
    let status = daemon.wait_exit(Duration::from_secs(30)).expect("daemon exits after the drain");
    assert!(status.success(), "{status}");
    assert!(daemon.logs().contains("SIGTERM: draining"), "{}", daemon.logs());
}

#[test]
fn garbage_is_dropped_and_counted_while_a_client_relays() {
    if !tools("garbage_is_dropped_and_counted_while_a_client_relays") {
        return;
    }
    let mut daemon = relaying_daemon(&[]);
    let peer_port = free_udp_port();
    let _peer = start_peer(peer_port);
    let running = uclient_in_background(
        daemon.addr(),
        peer_port,
        &["-u", "alice", "-w", "secret", "-n", "200", "-m", "2", "-l", "100", "-z", "10"],
    );
    // Wait for a relay address to attack too.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let relay = loop {
        let found = daemon
            .logs()
            .lines()
            .filter(|l| l.contains("allocation created"))
            .find_map(|l| json_field(l, "relay"))
            .and_then(|r| r.split(',').next()?.parse::<std::net::SocketAddr>().ok());
        if let Some(relay) = found {
            break relay;
        }
        assert!(std::time::Instant::now() < deadline, "no allocation: {}", daemon.logs());
        std::thread::sleep(Duration::from_millis(20));
    };
    let attacker = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut sent = 0u64;
    for i in 0..300u32 {
        let junk: Vec<u8> = match i % 3 {
            0 => vec![0xff; (i % 200) as usize + 1], // neither STUN nor ChannelData
            1 => [&[0x00, 0x01, 0x00, 0x08][..], &i.to_be_bytes(), &[0; 8]].concat(), // bad STUN header
            _ => [&[0x40, 0x07, 0x00, 0x04][..], &[1, 2, 3, 4]].concat(), // unbound channel
        };
        attacker.send_to(&junk, daemon.addr()).unwrap();
        attacker.send_to(&junk, relay).unwrap(); // from a peer with no permission
        sent += 2;
    }
    let (ok, out) = running.join().unwrap();
    assert!(ok, "{out}");
    assert_eq!(uclient_lost(&out), Some(0), "the client kept working:\n{out}");
    daemon.signal_and_wait(libc::SIGINT, Duration::from_secs(10)).expect("exits");
    let dropped = turn_tests::worker_total(&daemon.logs(), "dropped");
    assert!(dropped >= sent, "dropped {dropped} of {sent} garbage datagrams:\n{}", daemon.logs());
}

#[test]
fn relays_over_ipv6() {
    if !tools("relays_over_ipv6") {
        return;
    }
    if UdpSocket::bind("[::1]:0").is_err() {
        assert!(!turn_tests::in_ci(), "CI machines have IPv6 loopback");
        eprintln!("SKIPPED: relays_over_ipv6: no IPv6 loopback here");
        return;
    }
    let daemon = relaying_daemon(&["--listening-ip", "::1"]);
    let peer_port = free_udp_port();
    let peer = turn_tests::Child(
        std::process::Command::new("turnutils_peer")
            .args(["-L", "::1", "-p", &peer_port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(100));
    let port = port_args(&daemon);
    let peer_port = peer_port.to_string();
    let args = ["-c", "-u", "alice", "-w", "secret", "-p", &port, "-e", "::1", "-r", &peer_port];
    let args = [&args[..], &["-n", "100", "-m", "2", "-l", "100", "-z", "5", "::1"]].concat();
    let (ok, out) = run_tool("turnutils_uclient", &args, UCLIENT);
    drop(peer);
    assert!(ok, "{out}");
    assert_eq!(uclient_lost(&out), Some(0), "{out}");
    assert!(daemon.logs().contains("\"relay\":\"[::1]:"), "{}", daemon.logs());
}

#[test]
fn drops_privileges_after_setup_and_still_cleans_up() {
    if !turn_tests::require_root("drops_privileges_after_setup_and_still_cleans_up")
        || !tools("drops_privileges_after_setup_and_still_cleans_up")
    {
        return;
    }
    let root = turn_tests::PinRoot::new("privs");
    let mut daemon = Daemon::start(&[
        "--workers",
        "2",
        "--proc-user",
        "65534",
        "--proc-group",
        "65534",
        "--bpf-pin-root",
        root.arg(),
    ]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(uid_line.split_whitespace().skip(1).all(|id| id == "65534"), "{uid_line}");
    let (ok, out) =
        run_tool("turnutils_stunclient", &["-p", &port_args(&daemon), "127.0.0.1"], UCLIENT);
    assert!(ok && out.contains("UDP reflexive addr"), "{out}");
    let instance = turn_server::bpffs::listener_dir(&root.0, daemon.addr());
    assert!(instance.is_dir());
    let exit = daemon.signal_and_wait(libc::SIGTERM, Duration::from_secs(10)).unwrap();
    assert!(exit.success(), "{exit}\n{}", daemon.logs());
    // The maps are unpinned; the emptied directory itself sits in a root-owned parent, so
    // an unprivileged daemon leaves it for the next start to remove.
    let left: Vec<_> = walk(&instance);
    assert!(left.iter().all(|p| p.is_dir()), "pins left behind: {left:?}");
    let next = Daemon::start(&["--workers", "1", "--bpf-pin-root", root.arg()]);
    assert!(!instance.exists(), "the next start removes the empty directory:\n{}", next.logs());
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}
