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
/// `peer`:3480, with `extra` options.
fn uclient_in(
    ns: &Netns,
    daemon: &Daemon,
    server: &str,
    peer: &str,
    extra: &[&str],
) -> (bool, String) {
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
    ]);
    args.extend(extra);
    args.push(server);
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
    let (_, out) = uclient_in(&ns, &daemon, "192.0.2.2", "192.0.2.2", &[]);
    assert!(out.contains("403"), "relaying to the server's own address must be refused:\n{out}");
    assert!(!out.contains("Total lost packets 0 "), "{out}");
    // (The embedded forms, ::ffff:192.0.2.2, 6to4, Teredo, NAT64, are refused by the same
    // rule: see turn-proto's policy tests.)
    drop(daemon);

    // Listening on the wildcard with another relay address: the host's interface
    // addresses are the server's own.
    let daemon = daemon_in(&ns, "0.0.0.0", &["--relay-ip", "192.0.2.3"]);
    let (_, out) = uclient_in(&ns, &daemon, "192.0.2.3", "192.0.2.2", &[]);
    assert!(out.contains("403"), "wildcard listener relayed to an interface address:\n{out}");
    drop(daemon);

    // The explicit setting opens them, and then the same exchange relays without loss.
    let daemon = daemon_in(&ns, "192.0.2.2", &["--allow-own-address-peers"]);
    let (ok, out) = uclient_in(&ns, &daemon, "192.0.2.2", "192.0.2.2", &[]);
    assert!(ok, "{out}");
    assert_eq!(turn_tests::uclient_lost(&out), Some(0), "{out}");
}

#[test]
fn two_clients_of_one_server_talk_relay_to_relay_by_default() {
    let test = "two_clients_of_one_server_talk_relay_to_relay_by_default";
    if !tools(test) {
        return;
    }
    // The relay addresses are the server's own "public" 192.0.2.2: the own-address rule
    // must let another allocation's relayed address through (relay-only WebRTC on both
    // sides), while the host's service on a port outside the relay range stays refused.
    let ns = Netns::new("r2r", &["192.0.2.2/32"]);
    let _service = ns.spawn("turnutils_peer", &["-L", "192.0.2.2", "-p", "3480"]);
    let daemon = daemon_in(&ns, "192.0.2.2", &[]);
    // -y: uclient's clients send to each other's relayed addresses.
    let (ok, out) = uclient_in(&ns, &daemon, "192.0.2.2", "192.0.2.2", &["-y"]);
    assert!(ok, "relay to relay must work with the default rules:\n{out}");
    assert!(!out.contains("403"), "{out}");
    assert_eq!(turn_tests::uclient_lost(&out), Some(0), "{out}");
    let (_, out) = uclient_in(&ns, &daemon, "192.0.2.2", "192.0.2.2", &[]);
    assert!(out.contains("403"), "the host's service must stay refused:\n{out}");
}

#[test]
fn a_relay_port_no_relay_holds_is_not_a_peer() {
    let test = "a_relay_port_no_relay_holds_is_not_a_peer";
    if !tools(test) {
        return;
    }
    // A service of the host on its "public" relay address, on a port inside the relay
    // range that no relay holds (another program took it first): relay to relay is for
    // other allocations' relayed addresses only.
    let ns = Netns::new("unheld", &["192.0.2.2/32"]);
    let _service = ns.spawn("turnutils_peer", &["-L", "192.0.2.2", "-p", "60000"]);
    let daemon = daemon_in(&ns, "192.0.2.2", &[]);
    let port = daemon.addr().port().to_string();
    let mut args: Vec<&str> = ns.exec()[1..].to_vec();
    args.extend(["turnutils_uclient", "-c", "-p", &port, "-e", "192.0.2.2", "-r", "60000"]);
    args.extend(["-u", "alice", "-w", "secret", "-n", "20", "-m", "1", "-z", "5", "192.0.2.2"]);
    let (_, out) = run_tool("ip", &args, UCLIENT);
    assert!(out.contains("403"), "a relay port held by another program must be refused:\n{out}");
    assert!(!out.contains("Total lost packets 0 "), "{out}");
}

#[test]
fn every_host_address_is_own_even_one_added_after_start() {
    let test = "every_host_address_is_own_even_one_added_after_start";
    if !tools(test) {
        return;
    }
    // The server listens on 192.0.2.2 only; the host has 192.0.2.3 too, and gets 192.0.2.9
    // once the server runs. Services on either are the host's, not peers.
    let ns = Netns::new("own-later", &["192.0.2.2/32", "192.0.2.3/32"]);
    let daemon = daemon_in(&ns, "192.0.2.2", &[]);
    let _service = ns.spawn("turnutils_peer", &["-L", "192.0.2.3", "-p", "3480"]);
    let (_, out) = uclient_in(&ns, &daemon, "192.0.2.2", "192.0.2.3", &[]);
    assert!(out.contains("403"), "another address of the host is its own:\n{out}");
    let added = std::process::Command::new("ip")
        .args(["-n", &ns.name, "addr", "add", "192.0.2.9/32", "dev", "lo"])
        .status()
        .unwrap();
    assert!(added.success());
    let _later = ns.spawn("turnutils_peer", &["-L", "192.0.2.9", "-p", "3480"]);
    // The kernel announces the address; the workers take it within moments.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !daemon.logs().contains("addresses changed") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, out) = uclient_in(&ns, &daemon, "192.0.2.2", "192.0.2.9", &[]);
    assert!(out.contains("403"), "an address added after start is the host's own:\n{out}");
    assert!(!out.contains("Total lost packets 0 "), "{out}");
}

/// [`turn_tests::relaying_daemon`] with a second user, `bob:builder`.
fn relaying_daemon(extra: &[&str]) -> Daemon {
    turn_tests::relaying_daemon(&[&["--user", "bob:builder"], extra].concat())
}

fn uclient(daemon: &Daemon, peer_port: u16, user: &str, extra: &[&str]) -> (bool, String) {
    let (name, password) = user.split_once(':').unwrap();
    let mut args = vec!["-u", name, "-w", password];
    args.extend_from_slice(extra);
    turn_tests::uclient(daemon.addr(), peer_port, &args)
}

#[test]
fn a_flood_of_unauthenticated_requests_keeps_memory_bounded_and_relaying_lossless() {
    let test = "a_flood_of_unauthenticated_requests_keeps_memory_bounded_and_relaying_lossless";
    if !require_root(test) || !require_tool(test, "turnutils_uclient", "coturn") {
        return;
    }
    let daemon = relaying_daemon(&[]);
    let peer_port = turn_tests::free_udp_port();
    let _peer = turn_tests::start_peer(peer_port);
    // Warm up (first allocations, buffers), then take the baseline.
    let (ok, out) =
        uclient(&daemon, peer_port, "alice:secret", &["-n", "20", "-m", "2", "-z", "5"]);
    assert!(ok && turn_tests::uclient_lost(&out) == Some(0), "{out}");
    let before = turn_tests::rss_bytes(daemon.pid());
    // 100,000 unauthenticated Allocates, each from its own spoofed source address and
    // port, in about 4 s, while a real client relays.
    let to = daemon.addr();
    let flood = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        turn_tests::spoofed_requests(to, 100_000, 25_000, turn_tests::Flood::Allocate)
    });
    let (ok, out) = uclient(
        &daemon,
        peer_port,
        "alice:secret",
        &["-n", "500", "-m", "4", "-l", "100", "-z", "10"],
    );
    assert_eq!(flood.join().unwrap().expect("raw socket (root)"), 100_000);
    assert!(ok, "{out}");
    assert_eq!(turn_tests::uclient_lost(&out), Some(0), "{out}");
    let after = turn_tests::rss_bytes(daemon.pid());
    // Nothing is kept per source: 100,000 sources may not cost 100 bytes each.
    let grown = after.saturating_sub(before);
    eprintln!("RSS {before} -> {after} bytes over 100,000 sources");
    assert!(grown < 10 << 20, "RSS grew by {grown} bytes ({before} -> {after})");
}

#[test]
fn password_guessing_is_throttled_and_others_are_served() {
    let test = "password_guessing_is_throttled_and_others_are_served";
    if !require_root(test) {
        return;
    }
    let daemon = relaying_daemon(&[]);
    let mut guesser = turn_tests::StunClient::new("127.0.0.1", daemon.addr(), "alice", "guess");
    assert_eq!(guesser.allocate(Duration::from_secs(2)), Some(401));
    // 40 more guesses at once: at most the burst (10 failures, the first included) are
    // even answered; the rest are dropped unverified.
    for _ in 0..40 {
        guesser.send_allocate();
    }
    let mut answered = 0;
    while guesser.receive(Duration::from_millis(300)).is_some() {
        answered += 1;
    }
    eprintln!("{answered} of 40 guesses answered");
    assert!(answered <= 10, "{answered} guesses answered");
    assert!(answered >= 5, "the burst is answered: {answered}");
    // Someone else (another address) is served at once, with the right password.
    let mut bob = turn_tests::StunClient::new("127.0.0.2", daemon.addr(), "bob", "builder");
    assert_eq!(bob.allocate(Duration::from_secs(2)), Some(0));
    let mut alice = turn_tests::StunClient::new("127.0.0.3", daemon.addr(), "alice", "secret");
    assert_eq!(alice.allocate(Duration::from_secs(2)), Some(0));
}

#[test]
fn one_users_quota_leaves_the_others_served() {
    let test = "one_users_quota_leaves_the_others_served";
    if !require_root(test) {
        return;
    }
    let daemon = relaying_daemon(&["--user-quota", "3"]);
    let mut alices: Vec<_> = (0..5)
        .map(|_| turn_tests::StunClient::new("127.0.0.1", daemon.addr(), "alice", "secret"))
        .collect();
    let codes: Vec<_> = alices.iter_mut().map(|c| c.allocate(Duration::from_secs(2))).collect();
    assert_eq!(codes, vec![Some(0), Some(0), Some(0), Some(486), Some(486)]);
    let mut bobs: Vec<_> = (0..3)
        .map(|_| turn_tests::StunClient::new("127.0.0.2", daemon.addr(), "bob", "builder"))
        .collect();
    for bob in &mut bobs {
        assert_eq!(bob.allocate(Duration::from_secs(2)), Some(0), "bob is not alice");
    }
}

#[test]
fn one_workers_allocations_may_take_every_relay_port() {
    let test = "one_workers_allocations_may_take_every_relay_port";
    if !require_root(test) {
        return;
    }
    // Six relay ports below the ephemeral range (no other test or process takes them).
    let lo = 20_000 + (std::process::id() % 1000) as u16 * 8;
    let (lo_s, hi_s) = (lo.to_string(), (lo + 5).to_string());
    let root = turn_tests::PinRoot::new("ports");
    let daemon = relaying_daemon(&[
        "--min-port",
        &lo_s,
        "--max-port",
        &hi_s,
        "--bpf-pin-root",
        root.arg(),
        "--steering",
        "p2c",
    ]);
    let dir = turn_server::bpffs::listener_dir(&root.0, daemon.addr());
    let maps = turn_server::steering::GroupMaps::open_pinned(&dir).unwrap();
    // Find clients the program placed on worker 0: their first request is remembered there.
    let mut on_worker: [Vec<turn_tests::StunClient>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..200 {
        if on_worker[0].len() >= 7 && !on_worker[1].is_empty() {
            break;
        }
        let mut c = turn_tests::StunClient::new("127.0.0.1", daemon.addr(), "alice", "secret");
        c.send_allocate();
        assert_eq!(c.receive(Duration::from_secs(2)), Some(401));
        let key = turn_common::FlowKey::new(c.sock.local_addr().unwrap(), daemon.addr().ip());
        let slot = maps.memo(&key).expect("every first request is remembered").slot as usize;
        on_worker[slot].push(c);
    }
    assert!(on_worker[0].len() >= 7, "not enough clients placed on worker 0");
    // Worker 0 alone takes all six ports (with a fixed share per worker it had three)...
    for (i, c) in on_worker[0].iter_mut().take(6).enumerate() {
        assert_eq!(c.allocate(Duration::from_secs(2)), Some(0), "allocation {i} on worker 0");
    }
    // ...and then there are none left for anyone: 508.
    assert_eq!(on_worker[0][6].allocate(Duration::from_secs(2)), Some(508));
    assert_eq!(on_worker[1][0].allocate(Duration::from_secs(2)), Some(508));
}

#[test]
fn icmp_errors_from_peers_reach_the_client_as_data_indications() {
    let test = "icmp_errors_from_peers_reach_the_client_as_data_indications";
    if !require_root(test) {
        return;
    }
    use turn_proto::stun::{Class, Message, Method, attr};
    let daemon = relaying_daemon(&[]);
    let mut c = turn_tests::StunClient::new("127.0.0.1", daemon.addr(), "alice", "secret");
    assert_eq!(c.allocate(Duration::from_secs(2)), Some(0));
    // A peer port nobody listens on: the kernel answers ICMP port unreachable.
    let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    c.send_create_permission(closed);
    assert_eq!(c.receive(Duration::from_secs(2)), Some(0));
    c.send_indication(closed, b"anyone there?");
    let bytes = c.receive_raw(Duration::from_secs(2)).expect("a Data indication with ICMP");
    let msg = Message::parse(&bytes).unwrap();
    assert_eq!((msg.class(), msg.method()), (Class::Indication, Method::DATA));
    let icmp = msg.get(attr::ICMP).expect("ICMP attribute");
    // RFC 8656 §18.13: 2 reserved bytes, type, code, 4 bytes of error data.
    assert_eq!((icmp[2], icmp[3]), (3, 3), "destination/port unreachable: {icmp:?}");
    let tid = msg.transaction_id();
    let peer = attr::decode_xor_address(msg.get(attr::XOR_PEER_ADDRESS).unwrap(), &tid).unwrap();
    assert_eq!(peer, closed);
    assert!(msg.get(attr::DATA).is_none(), "an ICMP report carries no data");
    // The relay keeps working after it: a real peer gets the next datagram.
    let live = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    live.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    c.send_create_permission(live.local_addr().unwrap());
    assert_eq!(c.receive(Duration::from_secs(2)), Some(0));
    c.send_indication(live.local_addr().unwrap(), b"hello");
    let mut buf = [0u8; 64];
    let n = live.recv(&mut buf).expect("relayed after the ICMP error");
    assert_eq!(&buf[..n], b"hello");
}

#[test]
fn a_replayed_allocate_neither_recreates_nor_charges() {
    let test = "a_replayed_allocate_neither_recreates_nor_charges";
    if !require_root(test) {
        return;
    }
    let root = turn_tests::PinRoot::new("replay");
    let daemon = relaying_daemon(&["--user-quota", "1", "--bpf-pin-root", root.arg()]);
    let mut alice = turn_tests::StunClient::new("127.0.0.1", daemon.addr(), "alice", "secret");
    assert_eq!(alice.allocate(Duration::from_secs(2)), Some(0));
    let captured = alice.last_sent.clone();
    alice.send_refresh(0);
    assert_eq!(alice.receive(Duration::from_secs(2)), Some(0), "deleted");
    // An attacker replays the captured Allocate from the client's own 5-tuple, several
    // times. Within the retransmission window the server repeats its old answer; later
    // (tested with simulated time in turn-proto's scenarios) it answers 438. Either way
    // no allocation comes back and nobody's quota is charged.
    for _ in 0..3 {
        alice.send_bytes(&captured);
        let _ = alice.receive(Duration::from_millis(500));
    }
    let mut other = turn_tests::StunClient::new("127.0.0.2", daemon.addr(), "alice", "secret");
    assert_eq!(other.allocate(Duration::from_secs(2)), Some(0), "alice's one allocation is free");
    let dir = turn_server::bpffs::listener_dir(&root.0, daemon.addr());
    let maps = turn_server::steering::GroupMaps::open_pinned(&dir).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let live: u64 = maps.loads().unwrap().iter().map(|l| l.allocations).sum();
    assert_eq!(live, 1, "only the new allocation lives");
}

#[test]
fn idle_connections_to_the_metrics_endpoint_do_not_keep_scrapes_out_nor_delay_steering() {
    let test =
        "idle_connections_to_the_metrics_endpoint_do_not_keep_scrapes_out_nor_delay_steering";
    if !require_root(test) {
        return;
    }
    use std::sync::atomic::{AtomicBool, Ordering};
    let root = turn_tests::PinRoot::new("metrics-abuse");
    let daemon = relaying_daemon(&[
        "--prometheus",
        "--prometheus-port",
        "0",
        "--steering",
        "p2c",
        "--bpf-pin-root",
        root.arg(),
    ]);
    let metrics = daemon.metrics.expect("metrics endpoint");
    // The control thread publishes the workers' load every 50 ms: with datagrams flowing,
    // each publication moves the published packet count. Counted for 2 s, quiet first.
    let dir = turn_server::bpffs::listener_dir(&root.0, daemon.addr());
    let maps = turn_server::steering::GroupMaps::open_pinned(&dir).unwrap();
    let to = daemon.addr();
    let publications = || {
        let traffic = std::thread::spawn(move || {
            turn_tests::send_flows(to, 8, 2, 100, 150, Duration::from_millis(10));
        });
        let (mut changes, mut last) = (0u32, 0u64);
        let window = std::time::Instant::now();
        while window.elapsed() < Duration::from_secs(2) {
            let packets: u64 = maps.loads().unwrap().iter().map(|l| l.packets).sum();
            if packets != last {
                changes += 1;
                last = packets;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        traffic.join().unwrap();
        changes
    };
    let quiet = publications();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    // 300 connections that never send a request, reopened as they are closed, for the
    // whole test.
    let holder = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut held: Vec<std::net::TcpStream> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                // Still open: nothing to read yet (the server closes the ones it drops).
                held.retain(|s| {
                    let mut b = [0u8; 1];
                    let _ = s.set_nonblocking(true);
                    matches!(
                        std::io::Read::read(&mut &*s, &mut b),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
                    )
                });
                while held.len() < 300 {
                    match std::net::TcpStream::connect(metrics) {
                        Ok(s) => held.push(s),
                        Err(_) => break,
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // Scrapers in tight loops besides.
    let scrapers: Vec<_> = (0..4)
        .map(|_| {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = turn_tests::ops::http_get(metrics, "/metrics", &[]);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // A real scrape gets its answer at once.
    for i in 0..5 {
        let asked = std::time::Instant::now();
        let (code, text) = turn_tests::ops::http_get(metrics, "/metrics", &[]).expect("an answer");
        let took = asked.elapsed();
        eprintln!("scrape {i}: {code} in {took:?}");
        assert_eq!(code, 200);
        assert!(text.contains("turn_allocations"), "{text}");
        assert!(took < Duration::from_secs(3), "scrape {i} took {took:?}");
    }
    // Meanwhile the load publication keeps its pace.
    let flooded = publications();
    stop.store(true, Ordering::Relaxed);
    holder.join().unwrap();
    for s in scrapers {
        s.join().unwrap();
    }
    eprintln!("load publications seen in 2 s: {quiet} quiet, {flooded} under the flood");
    assert!(quiet >= 20, "{quiet} load publications in 2 s without a flood");
    assert!(4 * flooded >= 3 * quiet, "{flooded} publications under the flood, {quiet} without");
}

/// A signed request of `method` in `user`'s name as someone who knows neither the
/// password nor a nonce the server gave the address it forges: any realm, any nonce, any
/// MESSAGE-INTEGRITY.
fn forged_request(method: turn_proto::stun::Method, i: u32) -> Vec<u8> {
    use turn_proto::client::{AuthMode, Credentials, Signer};
    use turn_proto::stun::{Class, TransactionId, attr::Attribute};
    let creds = Credentials::new("alice", "not-the-password", None).unwrap();
    let mut signer = Signer::new(std::sync::Arc::new(creds), AuthMode::Legacy);
    signer.realm = Some("test".into());
    signer.nonce = Some(format!("forged-nonce-{i:08}").into_bytes());
    let mut tid = [0xF0; 12];
    tid[..4].copy_from_slice(&i.to_be_bytes());
    let mut buf = [0u8; 512];
    let attrs = [Attribute::Lifetime(600)];
    let n = signer
        .encode(&mut buf, method, Class::Request, &TransactionId(tid), &attrs, false)
        .unwrap();
    buf[..n].to_vec()
}

#[test]
fn spoofed_failures_in_a_victims_name_cost_it_no_refresh_and_no_datagram() {
    let test = "spoofed_failures_in_a_victims_name_cost_it_no_refresh_and_no_datagram";
    if !require_root(test) {
        return;
    }
    let Some(bin) = turn_tests::release_server_bin(test) else { return };
    let daemon = turn_tests::start_release(&bin, &turn_tests::RELAYING);
    let std::net::SocketAddr::V4(server) = daemon.addr() else { panic!("IPv4 listener") };
    // The victim: an allocation from 127.0.0.5 with a permission for its peer.
    let mut victim = turn_tests::StunClient::new("127.0.0.5", daemon.addr(), "alice", "secret");
    assert_eq!(victim.allocate(Duration::from_secs(2)), Some(0));
    let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    victim.send_create_permission(peer.local_addr().unwrap());
    assert_eq!(victim.receive(Duration::from_secs(2)), Some(0));
    let std::net::SocketAddr::V4(victim_addr) = victim.sock.local_addr().unwrap() else { panic!() };
    // For 6 s, 2,000 signed requests a second in the victim's name, from its address:
    // a third from its very 5-tuple, the rest from other ports of it.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let spoofer = turn_tests::Spoofer::new().expect("raw socket (root)");
            let mut sent = 0u32;
            let start = std::time::Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let port = if sent.is_multiple_of(3) {
                    victim_addr.port()
                } else {
                    20_000 + (sent % 20_000) as u16
                };
                let from = std::net::SocketAddrV4::new(*victim_addr.ip(), port);
                let method = if sent.is_multiple_of(2) {
                    turn_proto::stun::Method::REFRESH
                } else {
                    turn_proto::stun::Method::CREATE_PERMISSION
                };
                spoofer.send(from, server, &forged_request(method, sent)).unwrap();
                sent += 1;
                let due = Duration::from_secs_f64(f64::from(sent) / 2000.0);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            sent
        })
    };
    // Meanwhile the victim refreshes, renews its permission and relays, every 100 ms.
    let (mut refreshes, mut relayed) = (0u32, 0u32);
    let until = std::time::Instant::now() + Duration::from_secs(6);
    let mut buf = [0u8; 64];
    while std::time::Instant::now() < until {
        victim.send_refresh(600);
        // Answers to the spoofed requests from its 5-tuple come to the victim too: skip
        // them (438s) until its own Refresh's answer.
        let mut answered = false;
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !answered && std::time::Instant::now() < deadline {
            let Some(bytes) = victim.receive_raw(Duration::from_millis(200)) else { continue };
            let msg = turn_proto::stun::Message::parse(&bytes).unwrap();
            answered = msg.class() == turn_proto::stun::Class::SuccessResponse
                && msg.method() == turn_proto::stun::Method::REFRESH;
        }
        assert!(answered, "Refresh {refreshes} unanswered under the spoofed flood");
        refreshes += 1;
        victim.send_indication(peer.local_addr().unwrap(), b"still here");
        let n = peer.recv(&mut buf).expect("a datagram lost under the spoofed flood");
        assert_eq!(&buf[..n], b"still here");
        relayed += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = flood.join().unwrap();
    eprintln!(
        "{refreshes} Refreshes answered, {relayed} datagrams relayed, {sent} spoofed requests"
    );
    assert!(sent > 5_000, "the flood ran: {sent}");
}

#[test]
fn a_source_that_varies_its_port_gets_the_documented_rate_in_total() {
    let test = "a_source_that_varies_its_port_gets_the_documented_rate_in_total";
    if !require_root(test) {
        return;
    }
    let Some(bin) = turn_tests::release_server_bin(test) else { return };
    let args = [&turn_tests::RELAYING[..], &["--steering", "hash"]].concat();
    let mut daemon = turn_tests::start_release(&bin, &args);
    // 300 sockets of one address, one unauthenticated Allocate each, within a few tens of
    // milliseconds: the kernel's hash spreads them over both workers; the default of 20
    // answers a second, bursts of 40, holds for the address.
    let sockets: Vec<std::net::UdpSocket> =
        (0..300).map(|_| std::net::UdpSocket::bind("127.0.0.7:0").unwrap()).collect();
    let allocate: [u8; 28] = [
        0, 3, 0, 8, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0, 0x19, 0, 4,
        17, 0, 0, 0,
    ];
    let started = std::time::Instant::now();
    for s in &sockets {
        s.send_to(&allocate, daemon.addr()).unwrap();
    }
    let sent_in = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let mut answered = 0;
    let mut buf = [0u8; 512];
    for s in &sockets {
        s.set_nonblocking(true).unwrap();
        while s.recv(&mut buf).is_ok() {
            answered += 1;
        }
    }
    let allowed = 40 + (20.0 * (sent_in.as_secs_f64() + 0.3)).ceil() as usize;
    eprintln!("{answered} of 300 answered (sent in {sent_in:?}, at most {allowed})");
    assert!(answered >= 40, "the burst is answered: {answered}");
    assert!(answered <= allowed, "{answered} answers, the address's rate allows {allowed}");

    // Password guesses from as many ports (each with the nonce its own 401 gave it, the
    // answers to strangers lifted for this part): ten failures (the burst) verified in
    // all, then dropped unverified, whichever worker each reaches.
    daemon.signal_and_wait(libc::SIGINT, Duration::from_secs(10)).unwrap();
    let relaxed = [&args[..], &["--unauthenticated-responses-per-sec", "0"]].concat();
    let mut daemon = turn_tests::start_release(&bin, &relaxed);
    let mut guessers: Vec<_> = (0..100)
        .map(|_| turn_tests::StunClient::new("127.0.0.8", daemon.addr(), "alice", "guess"))
        .collect();
    for g in &mut guessers {
        g.send_allocate();
        assert_eq!(g.receive(Duration::from_secs(2)), Some(401));
    }
    for g in &mut guessers {
        g.send_allocate();
    }
    std::thread::sleep(Duration::from_millis(500));
    daemon.signal_and_wait(libc::SIGINT, Duration::from_secs(10)).unwrap();
    let logs = daemon.logs();
    let failures = turn_tests::worker_total(&logs, "auth_failures");
    let throttled = turn_tests::worker_total(&logs, "rate_limited");
    eprintln!("{failures} guesses verified, {throttled} dropped unverified");
    assert!(failures <= 11, "{failures} failures verified for one address");
    assert!(failures + throttled >= 100, "every guess was counted: {failures} + {throttled}");
}
