//! TURN over TCP and TLS through the real daemon: coturn's real client, padding byte for
//! byte, connections that hold a worker hostage, garbage, quotas, steering of
//! connections, and certificates (generated here) rotated under live connections.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::Write,
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use turn_proto::client::Request;
use turn_tests::{
    Daemon, closes, free_udp_port, require_root, require_tool, start_peer,
    stream::{StreamClient, TestCert, closed_by_server, connect_from, trusting, trusting_versions},
    uclient, uclient_lost,
};

fn coturn(test: &str) -> bool {
    ["turnutils_uclient", "turnutils_peer"].iter().all(|tool| require_tool(test, tool, "coturn"))
}

/// A daemon with TCP and TLS (certificate `cert`), loopback peers allowed, two workers
/// unless `extra` says otherwise.
fn daemon(cert: &TestCert, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "--realm",
        "test",
        "--user",
        "alice:secret",
        "--allow-loopback-peers",
        "--tls-listening-port",
        "0",
    ];
    args.extend_from_slice(&cert.args());
    if !extra.contains(&"--workers") {
        args.extend(["--workers", "2"]);
    }
    args.extend_from_slice(extra);
    Daemon::start(&args)
}

fn tcp_addr(d: &Daemon) -> SocketAddr {
    d.addrs("tcp")[0]
}

fn tls_addr(d: &Daemon) -> SocketAddr {
    d.addrs("tls")[0]
}

#[test]
fn coturns_client_relays_over_tcp_and_tls_without_loss() {
    let test = "coturns_client_relays_over_tcp_and_tls_without_loss";
    if !coturn(test) {
        return;
    }
    let cert = TestCert::new("uclient");
    let mut daemon = daemon(&cert, &[]);
    let peer_port = free_udp_port();
    let _peer = start_peer(peer_port);
    let base = ["-u", "alice", "-w", "secret", "-n", "200", "-m", "4", "-l", "120", "-z", "5"];
    for (transport, server, flags) in
        [("tcp", tcp_addr(&daemon), &["-t"][..]), ("tls", tls_addr(&daemon), &["-t", "-S"][..])]
    {
        for (what, extra) in [
            ("channels", &[][..]),
            ("send indications", &["-s"][..]),
            ("client to client", &["-y"][..]),
        ] {
            let mut args = base.to_vec();
            args.extend_from_slice(flags);
            args.extend_from_slice(extra);
            let (ok, out) = uclient(server, peer_port, &args);
            assert!(
                ok,
                "{transport} {what}: uclient failed:\n{out}\n--- daemon:\n{}",
                daemon.logs()
            );
            assert_eq!(uclient_lost(&out), Some(0), "{transport} {what}: loss:\n{out}");
        }
    }
    let logs = daemon.logs();
    assert!(logs.contains("\"transport\":\"tcp\"") && logs.contains("\"transport\":\"tls\""));
    daemon.signal_and_wait(libc::SIGINT, Duration::from_secs(10)).expect("exits");
    // Every connection ended as its client closed (or reset) it, or, for TLS, offered
    // TLS 1.0 or 1.1 (coturn's client tries those before 1.2); none by the server.
    let closes = closes(&daemon.logs());
    let unexpected: u64 = closes
        .iter()
        .filter(|(reason, _)| !matches!(reason.as_str(), "peer_closed" | "reset" | "tls_error"))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(unexpected, 0, "{closes:?}");
    assert!(closes.get("peer_closed").copied().unwrap_or(0) >= 24, "{closes:?}");
}

#[test]
fn channel_data_is_padded_both_ways_byte_for_byte() {
    let cert = TestCert::new("padding");
    let daemon = daemon(&cert, &[]);
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for transport in ["tcp", "tls"] {
        let mut c = match transport {
            "tcp" => StreamClient::tcp(tcp_addr(&daemon), "alice", "secret").unwrap(),
            _ => StreamClient::tls(tls_addr(&daemon), trusting(&cert.der), "alice", "secret")
                .unwrap(),
        };
        let relayed = c.allocate_with_channel(0x4001, peer.local_addr().unwrap()).unwrap();
        for len in 0..=9usize {
            let payload: Vec<u8> = (0..len).map(|i| 0xA0 + i as u8).collect();
            // Client -> peer: the padded frame carries the payload; the padding stays.
            c.send_channel_data(0x4001, &payload).unwrap();
            let mut buf = [0u8; 64];
            let (n, from) = peer.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (&payload[..], relayed), "{transport} {len} to peer");
            // Peer -> client: header, payload, zeros up to a multiple of four.
            peer.send_to(&payload, relayed).unwrap();
            let frame = c.read_frame(Duration::from_secs(5)).expect("frame");
            let mut want = vec![0x40, 0x01, 0, len as u8];
            want.extend(&payload);
            want.resize(want.len().div_ceil(4) * 4, 0);
            assert_eq!(frame, want, "{transport} {len} to client");
        }
        // Two frames in one write, the first with padding: both reach the peer, in order.
        let mut two = vec![0x40, 0x01, 0, 1, b'x', 0, 0, 0];
        two.extend([0x40, 0x01, 0, 2, b'y', b'z', 0, 0]);
        c.send_raw(&two).unwrap();
        let mut buf = [0u8; 16];
        let (n, _) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"x");
        let (n, _) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"yz");
        c.close();
    }
}

#[test]
fn idle_and_half_open_connections_and_a_stalled_handshake_do_not_delay_a_client() {
    let test = "idle_and_half_open_connections_and_a_stalled_handshake_do_not_delay_a_client";
    if !coturn(test) {
        return;
    }
    turn_tests::allow_open_files(4096);
    let cert = TestCert::new("hostage");
    let mut daemon =
        daemon(&cert, &["--stream-first-message-timeout", "3", "--tls-handshake-timeout", "3"]);
    let (tcp, tls) = (tcp_addr(&daemon), tls_addr(&daemon));
    // 500 connections that say nothing, 500 that send half a STUN header and stop, from
    // other addresses than the client's (each 127/8 address is local). Each address holds
    // at most 64 connections without an allocation: the rest are refused at once.
    let mut hostages = Vec::new();
    for i in 0..1000 {
        let from = if i % 2 == 0 { "127.0.0.2" } else { "127.0.0.3" };
        let mut s = connect_from(from, tcp).unwrap();
        if i % 2 == 1 {
            let _ = s.write_all(&[0x00, 0x01, 0x00, 0x00, 0x21, 0x12]);
        }
        hostages.push(s);
    }
    // A TLS handshake that starts (a record header) and stalls.
    let mut stalled = connect_from("127.0.0.4", tls).unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).unwrap();

    let peer_port = free_udp_port();
    let _peer = start_peer(peer_port);
    let args = ["-u", "alice", "-w", "secret", "-n", "100", "-m", "4", "-l", "120", "-z", "5"];
    for (server, flags) in [(tcp, &["-t"][..]), (tls, &["-t", "-S"][..])] {
        let mut all = args.to_vec();
        all.extend_from_slice(flags);
        let (ok, out) = uclient(server, peer_port, &all);
        assert!(ok, "uclient beside 1,000 idle connections:\n{out}\n{}", daemon.logs());
        assert_eq!(uclient_lost(&out), Some(0), "{out}");
    }
    // Past their deadlines the server closed every one of them.
    for (i, s) in hostages.iter_mut().enumerate() {
        assert!(closed_by_server(s, Duration::from_secs(10)), "hostage {i} still open");
    }
    assert!(closed_by_server(&mut stalled, Duration::from_secs(10)), "stalled TLS still open");
    daemon.signal_and_wait(libc::SIGINT, Duration::from_secs(10)).expect("exits");
    let closes = closes(&daemon.logs());
    assert_eq!(closes.get("first_message_timeout"), Some(&128), "{closes:?}");
    assert_eq!(closes.get("too_many_unauthenticated"), Some(&872), "{closes:?}");
    assert_eq!(closes.get("handshake_timeout"), Some(&1), "{closes:?}");
}

#[test]
fn garbage_closes_its_own_connection_and_nothing_else() {
    let test = "garbage_closes_its_own_connection_and_nothing_else";
    if !coturn(test) {
        return;
    }
    let cert = TestCert::new("garbage");
    let mut daemon = daemon(&cert, &[]);
    let tcp = tcp_addr(&daemon);
    let peer_port = free_udp_port();
    let _peer = start_peer(peer_port);
    let running = std::thread::spawn(move || {
        let args =
            ["-t", "-u", "alice", "-w", "secret", "-n", "300", "-m", "2", "-l", "100", "-z", "10"];
        uclient(tcp, peer_port, &args)
    });
    std::thread::sleep(Duration::from_millis(500));
    let binding = {
        use turn_proto::stun::{Class, MessageEncoder, Method, TransactionId};
        let mut buf = [0u8; 20];
        let enc =
            MessageEncoder::new(&mut buf, Method::BINDING, Class::Request, &TransactionId([3; 12]))
                .unwrap();
        let n = enc.finish();
        buf[..n].to_vec()
    };
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        ("bytes that are not TURN", vec![0xff; 64]),
        ("an HTTP request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("a TLS ClientHello", vec![0x16, 0x03, 0x01, 0x00, 0x40, 0x01, 0x00, 0x00, 0x3c]),
        ("a STUN header without the cookie", vec![0, 1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]),
        ("garbage after a valid request", [&binding[..], &[0xC0; 8][..]].concat()),
    ];
    for (what, bytes) in &garbage {
        let mut s = connect_from("127.0.0.1", tcp).unwrap();
        s.write_all(bytes).unwrap();
        assert!(closed_by_server(&mut s, Duration::from_secs(5)), "{what}: not closed");
    }
    let (ok, out) = running.join().unwrap();
    assert!(ok, "{out}");
    assert_eq!(uclient_lost(&out), Some(0), "the client kept relaying:\n{out}");
    daemon.signal_and_wait(libc::SIGINT, Duration::from_secs(10)).expect("exits");
    let closes = closes(&daemon.logs());
    assert_eq!(closes.get("garbage"), Some(&(garbage.len() as u64)), "{closes:?}");
}

#[test]
fn a_closed_connection_frees_its_allocation_and_quota() {
    let cert = TestCert::new("quota");
    let daemon = daemon(&cert, &["--user-quota", "1"]);
    for transport in ["tcp", "tls"] {
        let connect = || match transport {
            "tcp" => StreamClient::tcp(tcp_addr(&daemon), "alice", "secret").unwrap(),
            _ => StreamClient::tls(tls_addr(&daemon), trusting(&cert.der), "alice", "secret")
                .unwrap(),
        };
        let mut first = connect();
        first.request(Request::Allocate).expect("first allocation");
        let mut second = connect();
        let refused = second.request(Request::Allocate).unwrap_err();
        assert_eq!(refused.code(), Some(486), "{transport}: {refused}");
        let client = first.local_addr();
        first.close();
        // The quota comes back as soon as the daemon sees the close.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match second.request(Request::Allocate) {
                Ok(reply) => {
                    assert!(reply.relayed.is_some());
                    break;
                }
                Err(e) if e.code() == Some(486) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("{transport}: after the close: {e}\n{}", daemon.logs()),
            }
        }
        // The session line (the log is read by a thread of its own: wait for it).
        let ended = |logs: &str| {
            logs.lines().any(|l| {
                l.contains("allocation deleted")
                    && l.contains(&format!("\"client\":\"{client}\""))
                    && l.contains("\"reason\":\"connection_closed\"")
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ended(&daemon.logs()) {
            assert!(
                Instant::now() < deadline,
                "{transport}: no deletion logged for {client}:\n{}",
                daemon.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        second.close();
    }
}

#[test]
fn connections_are_placed_on_the_less_loaded_worker_and_count_in_its_load() {
    let test = "connections_are_placed_on_the_less_loaded_worker_and_count_in_its_load";
    if !require_root(test) {
        return;
    }
    let root = turn_tests::PinRoot::new("tcp-place");
    let cert = TestCert::new("place");
    let mut daemon = daemon(&cert, &["--steering", "p2c", "--bpf-pin-root", root.arg()]);
    // With two workers, p2c compares both: each new connection goes to the worker with
    // fewer placements since the last load publication, then fewer allocations. Held
    // connections, each with an allocation, one at a time.
    let mut held = Vec::new();
    for _ in 0..10 {
        let mut c = StreamClient::tcp(tcp_addr(&daemon), "alice", "secret").unwrap();
        c.request(Request::Allocate).expect("allocation");
        held.push(c);
        std::thread::sleep(Duration::from_millis(120));
    }
    let per_worker = |logs: &str| {
        let mut n = [0usize; 2];
        for line in logs.lines().filter(|l| l.contains("allocation created")) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if let Some(i) = v["span"]["index"].as_u64() {
                n[i as usize] += 1;
            }
        }
        n
    };
    assert_eq!(per_worker(&daemon.logs()), [5, 5], "{}", daemon.logs());
    // The program placed every SYN (one memo per connection on the TCP group).
    let out = std::process::Command::new(turn_tests::server_bin())
        .args(["load", "--json", "--interval", "0.2", "--pin-root", root.arg()])
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tcp_group = report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["listener"] == format!("tcp {}", tcp_addr(&daemon)))
        .unwrap_or_else(|| panic!("no tcp group: {report}"));
    let memos: Vec<u64> = tcp_group["sockets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["memo_flows"].as_u64().unwrap())
        .collect();
    assert_eq!(memos, [5, 5], "{report}");

    // A connection's traffic is its worker's load, as UDP traffic is.
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut busy = held.pop().unwrap();
    busy.request(Request::ChannelBind { channel: 0x4005, peer: peer.local_addr().unwrap() })
        .unwrap();
    let client = busy.local_addr();
    let worker = daemon
        .logs()
        .lines()
        .filter(|l| l.contains("allocation created") && l.contains(&format!("\"{client}\"")))
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["span"]["index"].as_u64())
        .expect("the busy connection's worker") as usize;
    let sender = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(1500) {
            busy.send_channel_data(0x4005, &[7; 100]).unwrap();
            std::thread::sleep(Duration::from_micros(500));
        }
        busy
    });
    std::thread::sleep(Duration::from_millis(300));
    let out = std::process::Command::new(turn_tests::server_bin())
        .args(["load", "--json", "--interval", "0.5", "--pin-root", root.arg()])
        .output()
        .unwrap();
    held.push(sender.join().unwrap());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rates: Vec<f64> = report["groups"][0]["sockets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["packets_per_sec"].as_f64().unwrap())
        .collect();
    assert!(rates[worker] > 200.0, "worker {worker} carries the stream: {rates:?}");
    assert!(rates[1 - worker] < rates[worker] / 10.0, "{rates:?}");
    drop(held);
    daemon.signal_and_wait(libc::SIGINT, Duration::from_secs(10)).expect("exits");
}

#[test]
fn certificates_rotate_without_dropping_live_connections() {
    let mut cert = TestCert::new("rotate");
    let mut daemon = daemon(&cert, &[]);
    let tls = tls_addr(&daemon);
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let first_der = cert.der.clone();
    let mut live = StreamClient::tls(tls, trusting(&first_der), "alice", "secret").unwrap();
    let relayed = live.allocate_with_channel(0x4002, peer.local_addr().unwrap()).unwrap();
    let relays = |c: &mut StreamClient, tag: u8| {
        c.send_channel_data(0x4002, &[tag; 8]).unwrap();
        let mut buf = [0u8; 16];
        let (n, _) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[tag; 8]);
        peer.send_to(&[tag; 4], relayed).unwrap();
        let frame = c.read_frame(Duration::from_secs(5)).expect("frame back");
        assert_eq!(frame, [&[0x40, 0x02, 0, 4][..], &[tag; 4][..]].concat());
    };
    relays(&mut live, 1);

    // SIGHUP after a rotation: new handshakes get the new certificate.
    cert.renew();
    let second_der = cert.der.clone();
    // SAFETY: kill(2) on the daemon we started.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match StreamClient::tls(tls, trusting(&second_der), "alice", "secret") {
            Ok(c) => {
                assert_eq!(c.server_certificate(), Some(second_der.clone()));
                break;
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("the new certificate is not served: {e}\n{}", daemon.logs()),
        }
    }
    relays(&mut live, 2);

    // A change on disk alone is seen too (checked every 2 s).
    cert.renew();
    let third_der = cert.der.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while StreamClient::tls(tls, trusting(&third_der), "alice", "secret").is_err() {
        assert!(Instant::now() < deadline, "file change not picked up:\n{}", daemon.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    // A broken file is refused; the running certificate stays.
    std::fs::write(&cert.cert, "not a certificate\n").unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(5);
    // (SIGHUP refuses the whole reload; the file watcher refuses the certificate.)
    while !daemon.logs().contains("configuration not reloaded") {
        assert!(Instant::now() < deadline, "{}", daemon.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let c = StreamClient::tls(tls, trusting(&third_der), "alice", "secret").unwrap();
    assert_eq!(c.server_certificate(), Some(third_der));
    relays(&mut live, 3);
    live.close();
    daemon.signal_and_wait(libc::SIGINT, Duration::from_secs(10)).expect("exits");
}

#[test]
fn a_bad_certificate_or_key_is_a_clear_error_at_start() {
    let good = TestCert::new("bad-a");
    let other = TestCert::new("bad-b");
    let missing = good.dir.join("missing.pem");
    let cases = [
        (good.cert.clone(), other.key.clone(), "does not go with the certificate"),
        (missing.clone(), good.key.clone(), "cannot read the TLS certificate"),
        (good.cert.clone(), missing, "cannot read the TLS private key"),
        (good.key.clone(), good.key.clone(), "no certificate"),
    ];
    for (cert, key, expected) in cases {
        let out = std::process::Command::new(turn_tests::server_bin())
            .args(["-L", "127.0.0.1", "-p", "0", "--tls-listening-port", "0", "--steering", "off"])
            .arg("--cert")
            .arg(&cert)
            .arg("--pkey")
            .arg(&key)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with {cert:?} / {key:?}");
        assert!(stderr.contains(expected), "{expected:?} not in:\n{stderr}");
    }
    // cert without pkey is a configuration error naming the key.
    let out = std::process::Command::new(turn_tests::server_bin())
        .args(["-L", "127.0.0.1", "-p", "0", "--cert"])
        .arg(&good.cert)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pkey"));
}

#[test]
fn a_client_that_does_not_read_loses_packets_and_stalls_nobody() {
    let cert = TestCert::new("slow");
    // One worker: the slow reader and the other client share it.
    let mut daemon = daemon(&cert, &["--workers", "1"]);
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut slow = StreamClient::tcp(tcp_addr(&daemon), "alice", "secret").unwrap();
    let slow_relay = slow.allocate_with_channel(0x4003, peer.local_addr().unwrap()).unwrap();
    let mut other = StreamClient::tcp(tcp_addr(&daemon), "alice", "secret").unwrap();
    let other_relay = other.allocate_with_channel(0x4004, peer.local_addr().unwrap()).unwrap();
    // 20 MB towards a client that reads nothing: far more than its socket buffers and
    // its write buffer hold.
    let chunk = [0x55u8; 1000];
    for _ in 0..20_000 {
        peer.send_to(&chunk, slow_relay).unwrap();
    }
    // Meanwhile the other client relays both ways without a loss.
    for i in 0..200u32 {
        other.send_channel_data(0x4004, &i.to_be_bytes()).unwrap();
        let mut buf = [0u8; 16];
        let (n, _) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &i.to_be_bytes());
        peer.send_to(&i.to_be_bytes(), other_relay).unwrap();
        let frame = other.read_frame(Duration::from_secs(5)).expect("the other client is served");
        assert_eq!(&frame[4..], &i.to_be_bytes());
    }
    drop(slow);
    daemon.signal_and_wait(libc::SIGINT, Duration::from_secs(10)).expect("exits");
    let logs = daemon.logs();
    let drops = turn_tests::worker_total(&logs, "stream_write_drops");
    assert!(drops > 0, "the slow reader's excess is dropped and counted:\n{logs}");
}

#[test]
fn connection_limits_refuse_at_accept_per_address_and_in_total() {
    let cert = TestCert::new("limits");
    let mut daemon = daemon(&cert, &["--max-connections-per-ip", "3", "--max-connections", "5"]);
    let tcp = tcp_addr(&daemon);
    // An open connection answers a Binding request; a refused one is closed at once.
    let answers = |s: &mut std::net::TcpStream| {
        use std::io::Read;
        use turn_proto::stun::{Class, MessageEncoder, Method, TransactionId};
        let mut buf = [0u8; 20];
        let enc =
            MessageEncoder::new(&mut buf, Method::BINDING, Class::Request, &TransactionId([9; 12]))
                .unwrap();
        let n = enc.finish();
        if s.write_all(&buf[..n]).is_err() {
            return false;
        }
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut answer = [0u8; 128];
        matches!(s.read(&mut answer), Ok(n) if n >= 20)
    };
    // Two workers accept in their own order: which connection is refused is not known,
    // how many are is.
    let mut from_a: Vec<_> = (0..4).map(|_| connect_from("127.0.0.2", tcp).unwrap()).collect();
    let served: Vec<bool> = from_a.iter_mut().map(answers).collect();
    assert_eq!(served.iter().filter(|s| **s).count(), 3, "three per address: {served:?}");
    let mut from_b: Vec<_> = (0..3).map(|_| connect_from("127.0.0.3", tcp).unwrap()).collect();
    let served_b: Vec<bool> = from_b.iter_mut().map(answers).collect();
    assert_eq!(served_b.iter().filter(|s| **s).count(), 2, "five in total: {served_b:?}");
    // A closed connection gives its place back.
    let open = served.iter().position(|s| *s).unwrap();
    drop(from_a.remove(open));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = connect_from("127.0.0.4", tcp).unwrap();
        if answers(&mut again) {
            break;
        }
        assert!(Instant::now() < deadline, "the freed place was not given back");
        std::thread::sleep(Duration::from_millis(50));
    }
    daemon.signal_and_wait(libc::SIGINT, Duration::from_secs(10)).expect("exits");
    let closes = closes(&daemon.logs());
    assert_eq!(closes.get("too_many_from_address"), Some(&1), "{closes:?}");
    assert!(closes.get("too_many_connections").copied().unwrap_or(0) >= 1, "{closes:?}");
}

#[test]
fn relays_over_tcp_on_ipv6() {
    if UdpSocket::bind("[::1]:0").is_err() {
        assert!(!turn_tests::in_ci(), "CI machines have IPv6 loopback");
        eprintln!("SKIPPED: relays_over_tcp_on_ipv6: no IPv6 loopback here");
        return;
    }
    let cert = TestCert::new("v6");
    let daemon = daemon(&cert, &["--listening-ip", "::1"]);
    let peer = UdpSocket::bind("[::1]:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let server = tcp_addr(&daemon);
    assert!(server.is_ipv6(), "{server}");
    let mut c = StreamClient::tcp(server, "alice", "secret").unwrap();
    let relayed = {
        let reply = c.request(Request::AllocateIpv6).unwrap();
        c.request(Request::ChannelBind { channel: 0x4006, peer: peer.local_addr().unwrap() })
            .unwrap();
        reply.relayed.unwrap()
    };
    assert!(relayed.is_ipv6(), "{relayed}");
    c.send_channel_data(0x4006, b"over v6").unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"over v6"[..], relayed));
    peer.send_to(b"back", relayed).unwrap();
    assert_eq!(
        c.read_frame(Duration::from_secs(5)).unwrap(),
        [0x40, 0x06, 0, 4, b'b', b'a', b'c', b'k']
    );
}

#[test]
fn tls_1_3_and_1_2_are_served() {
    let cert = TestCert::new("versions");
    let daemon = daemon(&cert, &[]);
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for (versions, expected) in [
        (&[&rustls::version::TLS13][..], rustls::ProtocolVersion::TLSv1_3),
        (&[&rustls::version::TLS12][..], rustls::ProtocolVersion::TLSv1_2),
    ] {
        let config = trusting_versions(&cert.der, versions);
        let mut c = StreamClient::tls(tls_addr(&daemon), config, "alice", "secret").unwrap();
        assert_eq!(c.tls_version(), Some(expected));
        let relayed = c.allocate_with_channel(0x4007, peer.local_addr().unwrap()).unwrap();
        c.send_channel_data(0x4007, b"hello").unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"hello"[..], relayed), "{expected:?}");
        c.close();
    }
}

#[test]
fn accepted_connections_have_tcp_keepalive() {
    let test = "accepted_connections_have_tcp_keepalive";
    if !require_tool(test, "ss", "iproute2") {
        return;
    }
    let cert = TestCert::new("keepalive");
    let daemon = daemon(&cert, &[]);
    let tcp = tcp_addr(&daemon);
    let mut c = StreamClient::tcp(tcp, "alice", "secret").unwrap();
    c.request(Request::Allocate).unwrap();
    // The server's side of the connection (local port: the listener's; peer: us). Once
    // the answer is acknowledged the socket is idle and its timer is keepalive's.
    let filter = format!("( sport = :{} and dport = :{} )", tcp.port(), c.local_addr().port());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = std::process::Command::new("ss")
            .args(["-tnoH", "state", "established", &filter])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("timer:(keepalive") {
            break;
        }
        assert!(Instant::now() < deadline, "no keepalive timer on the server's socket:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
