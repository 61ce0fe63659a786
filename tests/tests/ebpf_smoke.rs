//! The toolchain and kernel path end to end: the embedded SK_REUSEPORT program loads,
//! attaches to a 2-socket group on 127.0.0.1, runs for every datagram (its counters say
//! so, not the kernel's fallback), and the socket it selected is the one that received.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::HashMap, net::UdpSocket, os::fd::AsFd, time::Duration};

use turn_common::{FlowKey, Mode, SocketLoad};
use turn_server::steering::{Steering, SteeringOptions};
use turn_tests::{drain, require_root, reuseport_group};

const FLOWS: usize = 16;

/// Log records forwarded from the program (aya-log), captured for assertions.
static CAPTURED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        CAPTURED.lock().unwrap().push(record.args().to_string());
    }
    fn flush(&self) {}
}

fn capture_logs() {
    static CAPTURE: Capture = Capture;
    if log::set_logger(&CAPTURE).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
    }
}
const PER_FLOW: usize = 5;

/// Sends `PER_FLOW` datagrams from each of `clients` to `to`.
fn send_all(clients: &[UdpSocket], to: std::net::SocketAddr) {
    for (i, client) in clients.iter().enumerate() {
        for j in 0..PER_FLOW {
            client.send_to(format!("flow {i} datagram {j}").as_bytes(), to).unwrap();
        }
    }
}

fn clients(n: usize) -> Vec<UdpSocket> {
    (0..n).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect()
}

#[test]
fn program_steers_every_datagram_and_pins_each_flow() {
    if !require_root("program_steers_every_datagram_and_pins_each_flow") {
        return;
    }
    let (group, addr) = reuseport_group("127.0.0.1", 2).unwrap();
    let steering = Steering::attach(&group, Mode::Hash, SteeringOptions::default()).unwrap();

    let clients = clients(FLOWS);
    send_all(&clients, addr);
    let got = drain(&group, FLOWS * PER_FLOW, Duration::from_secs(5));
    let received: Vec<usize> = got.iter().map(Vec::len).collect();
    assert_eq!(received.iter().sum::<usize>(), FLOWS * PER_FLOW, "lost datagrams: {received:?}");

    // Each flow's datagrams all landed on one socket.
    let mut socket_of: HashMap<std::net::SocketAddr, usize> = HashMap::new();
    for (socket, datagrams) in got.iter().enumerate() {
        for (from, _) in datagrams {
            let first = *socket_of.entry(*from).or_insert(socket);
            assert_eq!(first, socket, "flow {from} split across sockets");
        }
    }
    assert_eq!(socket_of.len(), FLOWS);

    // The program ran for every datagram and selected the socket that received it.
    let stats = steering.maps().stats().unwrap();
    assert_eq!(stats.unsteered.packets, 0, "kernel fallback was used: {stats:?}");
    for (i, s) in stats.sockets.iter().enumerate() {
        assert_eq!(s.packets as usize, received[i], "socket {i}: {stats:?}");
        let flows_here = socket_of.values().filter(|&&s| s == i).count();
        assert_eq!(s.new_flows as usize, flows_here, "socket {i} new flows: {stats:?}");
    }
    // Every flow is pinned, to the socket that received it.
    let pins = steering.maps().pins_per_socket().unwrap();
    for (i, &pinned) in pins.iter().enumerate() {
        assert_eq!(pinned as usize, socket_of.values().filter(|&&s| s == i).count());
    }
    steering.detach(group[0].as_fd()).unwrap();
}

#[test]
fn p2c_places_new_flows_on_the_less_loaded_socket_and_keeps_pins() {
    if !require_root("p2c_places_new_flows_on_the_less_loaded_socket_and_keeps_pins") {
        return;
    }
    let (group, addr) = reuseport_group("127.0.0.1", 2).unwrap();
    let mut steering = Steering::attach(&group, Mode::P2c, SteeringOptions::default()).unwrap();
    steering
        .maps_mut()
        .set_load(0, SocketLoad { score: 0, allocations: 0, ..SocketLoad::default() })
        .unwrap();
    steering
        .maps_mut()
        .set_load(1, SocketLoad { score: 100, allocations: 10, ..SocketLoad::default() })
        .unwrap();

    let first = clients(FLOWS);
    send_all(&first, addr);
    let got = drain(&group, FLOWS * PER_FLOW, Duration::from_secs(5));
    assert_eq!(got[0].len(), FLOWS * PER_FLOW, "all new flows go to the idle socket 0");
    assert!(got[1].is_empty());

    // Socket 0 becomes the loaded one: new flows now go to 1, pinned flows stay on 0.
    steering
        .maps_mut()
        .set_load(0, SocketLoad { score: 200, allocations: 20, ..SocketLoad::default() })
        .unwrap();
    let second = clients(FLOWS);
    send_all(&second, addr);
    send_all(&first, addr);
    let got = drain(&group, 2 * FLOWS * PER_FLOW, Duration::from_secs(5));
    let firsts: Vec<_> = first.iter().map(|c| c.local_addr().unwrap()).collect();
    assert!(got[0].iter().all(|(from, _)| firsts.contains(from)), "only pinned flows on 0");
    assert_eq!(got[0].len(), FLOWS * PER_FLOW);
    assert!(got[1].iter().all(|(from, _)| !firsts.contains(from)), "no pinned flow moved");
    assert_eq!(got[1].len(), FLOWS * PER_FLOW);

    let stats = steering.maps().stats().unwrap();
    assert_eq!(stats.sockets[0].new_flows as usize, FLOWS);
    assert_eq!(stats.sockets[1].new_flows as usize, FLOWS);
    assert_eq!(stats.unsteered.packets, 0);
    steering.detach(group[0].as_fd()).unwrap();
}

#[test]
fn a_userspace_pin_overrides_placement() {
    if !require_root("a_userspace_pin_overrides_placement") {
        return;
    }
    let (group, addr) = reuseport_group("127.0.0.1", 2).unwrap();
    let mut steering = Steering::attach(&group, Mode::P2c, SteeringOptions::default()).unwrap();
    // P2C would put every new flow on the idle socket 0...
    steering
        .maps_mut()
        .set_load(1, SocketLoad { score: 100, allocations: 10, ..SocketLoad::default() })
        .unwrap();
    let clients = clients(4);
    // ...but the daemon pinned the first client to socket 1 (as it does for an allocation).
    let pinned = FlowKey::new(clients[0].local_addr().unwrap(), addr.ip());
    let mut worker1 = steering.flow_pins(1).unwrap();
    worker1.pin(&pinned).unwrap();
    assert_eq!(steering.maps().pinned_socket(&pinned), Some(1));
    send_all(&clients, addr);
    let got = drain(&group, 4 * PER_FLOW, Duration::from_secs(5));
    let first = clients[0].local_addr().unwrap();
    assert!(got[1].iter().all(|(from, _)| *from == first), "{got:?}");
    assert_eq!(got[1].len(), PER_FLOW);
    assert_eq!(got[0].len(), 3 * PER_FLOW);
    // The program's own pins use the same key: every client is pinned where it landed.
    for c in &clients[1..] {
        let key = FlowKey::new(c.local_addr().unwrap(), addr.ip());
        assert_eq!(steering.maps().pinned_socket(&key), Some(0));
    }
    worker1.unpin(&pinned);
    assert_eq!(steering.maps().pinned_socket(&pinned), None);
    steering.detach(group[0].as_fd()).unwrap();
}

#[test]
fn closing_a_socket_repairs_its_flows_and_moves_no_other() {
    if !require_root("closing_a_socket_repairs_its_flows_and_moves_no_other") {
        return;
    }
    capture_logs();
    let (mut group, addr) = reuseport_group("127.0.0.1", 3).unwrap();
    let steering = Steering::attach(&group, Mode::P2c, SteeringOptions::default()).unwrap();
    let clients = clients(FLOWS * 2);
    send_all(&clients, addr);
    let got = drain(&group, clients.len() * PER_FLOW, Duration::from_secs(5));
    let before: HashMap<_, _> = got
        .iter()
        .enumerate()
        .flat_map(|(i, d)| d.iter().map(move |(from, _)| (*from, i)))
        .collect();
    assert_eq!(before.len(), clients.len());
    assert!(got[1].len() >= PER_FLOW, "socket 1 must carry some flow: {before:?}");

    // Socket 1 closes. Its flows are re-pinned on the live sockets; no other flow moves,
    // and nothing is left to the kernel (whose hash was just reshuffled by the close).
    let closed = group.remove(1);
    drop(closed);
    let live = [0usize, 2]; // original slots of group[0] and group[1] now
    send_all(&clients, addr);
    let got = drain(&group, clients.len() * PER_FLOW, Duration::from_secs(5));
    assert_eq!(got.iter().map(Vec::len).sum::<usize>(), clients.len() * PER_FLOW, "datagrams lost");
    for (slot, datagrams) in got.iter().enumerate() {
        for (from, _) in datagrams {
            let was = before[from];
            if was != 1 {
                assert_eq!(was, live[slot], "flow {from} moved from socket {was}");
            }
        }
    }
    let mut steering = steering;
    steering.flush_logs();
    let logged = CAPTURED.lock().unwrap().join("\n");
    assert!(
        logged.contains("re-pinned onto socket"),
        "the program reports repairs through aya-log: {logged:?}"
    );
    let stats = steering.maps().stats().unwrap();
    assert_eq!(stats.unsteered.packets, 0, "{stats:?}");
    let moved = before.values().filter(|&&s| s == 1).count() as u64;
    let repaired: u64 = stats.sockets.iter().map(|s| s.repaired).sum();
    assert_eq!(repaired, moved, "each displaced flow repaired once: {stats:?}");
    steering.detach(group[0].as_fd()).unwrap();
}

#[test]
fn a_pin_map_smaller_than_the_flows_still_steers_every_datagram() {
    if !require_root("a_pin_map_smaller_than_the_flows_still_steers_every_datagram") {
        return;
    }
    let (group, addr) = reuseport_group("127.0.0.1", 2).unwrap();
    let options = SteeringOptions { pin_entries: 4, ..SteeringOptions::default() };
    let steering = Steering::attach(&group, Mode::P2c, options).unwrap();
    let clients = clients(FLOWS * 2);
    send_all(&clients, addr);
    let got = drain(&group, clients.len() * PER_FLOW, Duration::from_secs(5));
    assert_eq!(got.iter().map(Vec::len).sum::<usize>(), clients.len() * PER_FLOW);
    let stats = steering.maps().stats().unwrap();
    assert_eq!(stats.unsteered.packets, 0, "{stats:?}");
    let pinned: u64 = steering.maps().pins_per_socket().unwrap().iter().sum();
    assert!(pinned <= 4, "the LRU map never holds more than its size: {pinned}");
    steering.detach(group[0].as_fd()).unwrap();
}
