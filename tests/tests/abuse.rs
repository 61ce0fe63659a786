//! What an attacker on the network can try against the real daemon, and what it must not
//! get: relaying to the TURN host's own services, and the rest of the hardening issue.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use turn_tests::{Daemon, Netns, require_root, require_tool, run_tool};

const UCLIENT: Duration = Duration::from_secs(60);

fn tools(test: &str) -> bool {
    require_root(test)
        && require_tool(test, "ip", "iproute2")
        && require_tool(test, "turnutils_uclient", "coturn")
        && require_tool(test, "turnutils_peer", "coturn")
}

/// turnutils_uclient inside `ns` against `server` (an address in `ns`), relaying to
/// `peer`:3480.
fn uclient_in(ns: &Netns, daemon: &Daemon, server: &str, peer: &str) -> (bool, String) {
    let port = daemon.addr().port().to_string();
    let mut args: Vec<&str> = ns.exec()[1..].to_vec();
    args.extend([
        "turnutils_uclient",
        "-c",
        "-p",
        &port,
        "-e",
        peer,
        "-r",
        "3480",
        "-u",
        "alice",
        "-w",
        "secret",
        "-n",
        "20",
        "-m",
        "1",
        "-z",
        "5",
        server,
    ]);
    run_tool("ip", &args, UCLIENT)
}

fn daemon_in(ns: &Netns, listen: &str, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "--listening-ip",
        listen,
        "--workers",
        "2",
        "--steering",
        "off",
        "--realm",
        "test",
        "--user",
        "alice:secret",
    ];
    args.extend_from_slice(extra);
    Daemon::start_as(&ns.exec(), &args)
}

#[test]
fn the_servers_own_addresses_are_not_peers_by_default() {
    let test = "the_servers_own_addresses_are_not_peers_by_default";
    if !tools(test) {
        return;
    }
    // A host with a "public" address 192.0.2.2 (and 192.0.2.3) running a UDP service that
    // only the host itself should reach; the default peer rules consider 192.0.2.0/24
    // public, so only the own-address rule stands between a client and that service.
    let ns = Netns::new("own", &["192.0.2.2/32", "192.0.2.3/32"]);
    let _service = ns.spawn("turnutils_peer", &["-L", "192.0.2.2", "-p", "3480"]);

    // Listening on the address itself, the peer is that address: 403.
    let daemon = daemon_in(&ns, "192.0.2.2", &[]);
    let (_, out) = uclient_in(&ns, &daemon, "192.0.2.2", "192.0.2.2");
    assert!(out.contains("403"), "relaying to the server's own address must be refused:\n{out}");
    assert!(!out.contains("Total lost packets 0 "), "{out}");
    // (The embedded forms, ::ffff:192.0.2.2, 6to4, Teredo, NAT64, are refused by the same
    // rule: see turn-proto's policy tests.)
    drop(daemon);

    // Listening on the wildcard with another relay address: the host's interface
    // addresses are the server's own.
    let daemon = daemon_in(&ns, "0.0.0.0", &["--relay-ip", "192.0.2.3"]);
    let (_, out) = uclient_in(&ns, &daemon, "192.0.2.3", "192.0.2.2");
    assert!(out.contains("403"), "wildcard listener relayed to an interface address:\n{out}");
    drop(daemon);

    // The explicit setting opens them, and then the same exchange relays without loss.
    let daemon = daemon_in(&ns, "192.0.2.2", &["--allow-own-address-peers"]);
    let (ok, out) = uclient_in(&ns, &daemon, "192.0.2.2", "192.0.2.2");
    assert!(ok, "{out}");
    assert_eq!(turn_tests::uclient_lost(&out), Some(0), "{out}");
}
