//! The worker's one output sink: everything the protocol core decides to send goes
//! through [`Sink::send`], whatever input it answers (a client message, a peer
//! datagram, an ICMP error, a hand-off). UDP datagrams both ways are staged and leave when
//! the batch ends ([`Sink::flush`]): client -> peer payloads from the relay socket,
//! datagrams to UDP clients from the worker's listener socket that `ClientConn` names,
//! each flow's run of equal-sized datagrams as one GSO send. Messages to TCP and TLS
//! clients are queued on the connection `ClientConn` names and written once per batch.

use std::{
    io,
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Instant,
};

use quinn_udp::Transmit;
use tracing::warn;
use turn_proto::server::{Output, RelayId, Transport};

use super::{
    sendmmsg::{self, Message},
    stream::Connections,
    udp::Listener,
};
use crate::relay::{self, RelayPool};

/// Where outputs go: the worker's UDP listener sockets (by group index, the
/// `ClientConn` of a UDP client), its TCP and TLS connections, and its relay sockets.
pub(super) struct Sink {
    /// One socket per UDP listener group, in group order.
    pub(super) listeners: Vec<Listener>,
    /// The worker's TCP and TLS connections.
    pub(super) connections: Connections,
    /// UDP datagrams of the current batch, both ways, sent grouped by socket and
    /// destination so that runs of equal-sized datagrams go out as one GSO send.
    staged: Staged,
    /// Datagrams from the worker's relays to other relays of the daemon, by the worker
    /// that holds the receiving relay, for the core to hand over.
    pub(super) internal: Vec<Internal>,
    pub(super) io_errors: RateLimitedLog,
}

/// Datagrams relays of the daemon send to other relays of the daemon: (to, from, start,
/// length) in `bytes`, both addresses the relays' bound ones. Bounded like the stage; past
/// the bound they go through the kernel.
#[derive(Debug, Default)]
pub struct Internal {
    pub(super) bytes: Vec<u8>,
    pub(super) items: Vec<(SocketAddr, SocketAddr, usize, usize)>,
}

impl Internal {
    /// Queues a datagram; false when the queue is full.
    fn push(&mut self, to: SocketAddr, from: SocketAddr, data: &[u8]) -> bool {
        if self.bytes.len() + data.len() > STAGED_BYTES {
            return false;
        }
        self.items.push((to, from, self.bytes.len(), data.len()));
        self.bytes.extend_from_slice(data);
        true
    }
}

impl Sink {
    pub(super) fn new(listeners: Vec<Listener>, connections: Connections) -> Sink {
        Sink {
            listeners,
            connections,
            staged: Staged::default(),
            internal: Vec::new(),
            io_errors: RateLimitedLog::default(),
        }
    }

    /// Executes one output of the protocol core.
    pub(super) fn send(&mut self, pool: &RelayPool, output: Output<'_>) {
        match output {
            Output::None => {}
            Output::ToPeer { relay, peer, data, dont_fragment: false } => {
                // To another relay of this daemon (relay to relay: both ends of a call on
                // this server): handed over at the end of the batch, to the worker that
                // holds it, as the kernel would deliver it, minus a send, a receive and a
                // wake-up per datagram.
                if let Some(owner) = pool.owner_of(peer)
                    && let Some(from) = pool.get(relay).map(|r| r.local)
                {
                    if self.internal.len() <= owner {
                        self.internal.resize_with(owner + 1, Internal::default);
                    }
                    if self.internal[owner].push(peer, from, data) {
                        return;
                    }
                }
                self.stage(pool, Dest::Peer { relay, peer }, data);
            }
            Output::ToPeer { relay, peer, data, .. } => {
                // What was staged before goes first (order per flow).
                self.flush(pool);
                let Some(r) = pool.get(relay) else { return };
                let transmit = Transmit {
                    destination: peer,
                    ecn: None,
                    contents: data,
                    segment_size: None,
                    src_ip: None,
                };
                if let Err(e) = try_send_to_peer(pool, &r.socket, &transmit) {
                    self.io_errors.log("send to peer", &e);
                }
            }
            Output::ToClient { five_tuple, conn, data } => match five_tuple.transport {
                Transport::Udp => {
                    let Some(l) = self.listeners.get(conn.0 as usize) else { return };
                    let dest = Dest::Client {
                        group: conn.0 as u32,
                        client: five_tuple.client,
                        // From a wildcard listener, answer from the address the client used.
                        src_ip: l.local.ip().is_unspecified().then_some(five_tuple.listener.ip()),
                    };
                    self.stage(pool, dest, data);
                }
                Transport::Tcp | Transport::Tls => self.connections.queue(conn, data),
            },
        }
    }

    /// Stages a datagram; when the stage is full, what it holds is sent first.
    fn stage(&mut self, pool: &RelayPool, dest: Dest, data: &[u8]) {
        if !self.staged.room_for(data.len()) {
            self.flush(pool);
        }
        self.staged.push(dest, data);
    }

    /// Sends what the batch staged (see [`Staged`]).
    pub(super) fn flush(&mut self, pool: &RelayPool) {
        self.staged.flush(pool, &self.listeners, &mut self.io_errors);
    }
}

/// Where a staged datagram goes, and from which socket. Ordered so that sorting groups
/// each socket's datagrams by destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Dest {
    /// Client -> peer: from relay socket `relay`.
    Peer { relay: RelayId, peer: SocketAddr },
    /// To a UDP client: from the worker's socket of listener `group`, with source address
    /// `src_ip` when that socket is bound to a wildcard address.
    Client { group: u32, client: SocketAddr, src_ip: Option<IpAddr> },
}

/// Sends on a relay socket; an ICMP error reported by this call concerns an earlier
/// datagram (IP_RECVERR), so the send is tried once more.
fn try_send_to_peer(
    pool: &RelayPool,
    socket: &UdpSocket,
    transmit: &Transmit<'_>,
) -> io::Result<()> {
    match pool.state.try_send(socket.into(), transmit) {
        Err(e) if relay::is_icmp_report(&e) => pool.state.try_send(socket.into(), transmit),
        other => other,
    }
}

/// The UDP datagrams of one batch, copied out of the receive and output buffers.
#[derive(Default)]
struct Staged {
    bytes: Vec<u8>,
    /// (destination, start in `bytes`, length), in the order the core produced them.
    items: Vec<(Dest, usize, usize)>,
    order: Vec<usize>,
    gso: Vec<u8>,
    /// The runs to the clients of one listener socket, sent together.
    to_clients: Vec<ClientRun>,
}

/// A run of datagrams to one client, its bytes a range of [`Staged::gso`].
struct ClientRun {
    client: SocketAddr,
    src_ip: Option<IpAddr>,
    segment_size: Option<usize>,
    range: std::ops::Range<usize>,
}

/// Most bytes staged at once; a fuller stage is sent before more is staged.
const STAGED_BYTES: usize = 64 * 1024;
/// Most bytes one UDP send carries (IPv4: 65,535 less the IP and UDP headers), so also the
/// most a GSO run may hold.
const MAX_UDP_PAYLOAD: usize = 65_507;

impl Staged {
    fn room_for(&self, len: usize) -> bool {
        self.bytes.len() + len <= STAGED_BYTES
    }

    fn push(&mut self, dest: Dest, data: &[u8]) {
        self.items.push((dest, self.bytes.len(), data.len()));
        self.bytes.extend_from_slice(data);
    }

    /// Sends the staged datagrams: grouped by destination with each flow's order kept,
    /// a run of equal-sized datagrams (the last may be shorter) as one GSO send.
    fn flush(&mut self, pool: &RelayPool, listeners: &[Listener], io_errors: &mut RateLimitedLog) {
        if self.items.is_empty() {
            return;
        }
        let Self { bytes, items, order, gso, to_clients } = self;
        order.clear();
        order.extend(0..items.len());
        // Stable, so each flow's order is kept; peers first, then each listener's clients.
        order.sort_by_key(|&i| items[i].0);
        gso.clear();
        let mut i = 0;
        while i < order.len() {
            let (dest, _, segment) = items[order[i]];
            let max_segments = match dest {
                Dest::Peer { .. } => pool.state.max_gso_segments(),
                Dest::Client { group, .. } => {
                    listeners.get(group as usize).map_or(1, |l| l.state.max_gso_segments())
                }
            }
            .clamp(1, 64);
            // The run: same destination, same size, at most max_segments and what one UDP
            // send carries; a shorter datagram may end it.
            let max_segments = max_segments.min(MAX_UDP_PAYLOAD / segment.max(1)).max(1);
            let mut end = i + 1;
            while segment > 0 && end < order.len() && end - i < max_segments {
                let (d, _, len) = items[order[end]];
                // An empty datagram cannot be a GSO segment: it goes out on its own.
                if d != dest || len > segment || len == 0 {
                    break;
                }
                end += 1;
                if len < segment {
                    break;
                }
            }
            let from = gso.len();
            for &k in &order[i..end] {
                let (_, start, len) = items[k];
                gso.extend_from_slice(&bytes[start..start + len]);
            }
            let segment_size = (end - i > 1).then_some(segment);
            match dest {
                Dest::Peer { relay, peer } => {
                    // Each relay socket has its own peers: one send per run.
                    if let Some(r) = pool.get(relay) {
                        let transmit = Transmit {
                            destination: peer,
                            ecn: None,
                            contents: &gso[from..],
                            segment_size,
                            src_ip: None,
                        };
                        if let Err(e) = try_send_to_peer(pool, &r.socket, &transmit) {
                            io_errors.log("send to peer", &e);
                        }
                    }
                    gso.clear();
                }
                Dest::Client { group, client, src_ip } => {
                    // The clients of one listener socket: one sendmmsg for all their runs.
                    to_clients.push(ClientRun {
                        client,
                        src_ip,
                        segment_size,
                        range: from..gso.len(),
                    });
                    let last_of_group = order.get(end).is_none_or(
                        |&k| !matches!(items[k].0, Dest::Client { group: g, .. } if g == group),
                    );
                    if last_of_group {
                        if let Some(l) = listeners.get(group as usize) {
                            send_to_clients(l, gso, to_clients, io_errors);
                        }
                        to_clients.clear();
                        gso.clear();
                    }
                }
            }
            i = end;
        }
        bytes.clear();
        items.clear();
    }
}

/// Sends the runs to the clients of listener `l`: one through quinn-udp, several in one
/// `sendmmsg` ([`sendmmsg`](super::sendmmsg)). A run that call cannot send is sent again
/// through quinn-udp (which knows what to do when GSO is refused) unless the socket's
/// buffer is full, in which case the rest is dropped and the error logged.
fn send_to_clients(
    l: &Listener,
    contents: &[u8],
    runs: &[ClientRun],
    io_errors: &mut RateLimitedLog,
) {
    let message = |run: &ClientRun| Message {
        destination: run.client,
        src_ip: run.src_ip,
        segment_size: run.segment_size,
        contents: &contents[run.range.clone()],
    };
    let send_one = |run: &ClientRun, io_errors: &mut RateLimitedLog| {
        let m = message(run);
        let transmit = Transmit {
            destination: m.destination,
            ecn: None,
            contents: m.contents,
            segment_size: m.segment_size,
            src_ip: m.src_ip,
        };
        if let Err(e) = l.state.try_send((&l.socket).into(), &transmit) {
            io_errors.log("send to client", &e);
        }
    };
    let mut next = 0;
    while next < runs.len() {
        if next + 1 == runs.len() {
            send_one(&runs[next], io_errors);
            return;
        }
        let rest = &runs[next..];
        match sendmmsg::send(&l.socket, rest.len(), |i| message(&rest[i])) {
            (_, Ok(())) => return,
            (_, Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                io_errors.log("send to client", &e);
                return;
            }
            (sent, Err(_)) => {
                let failed = next + sent;
                send_one(&runs[failed], io_errors);
                next = failed + 1;
            }
        }
    }
}

/// Logs an I/O error at most once per second per worker, with the count suppressed.
#[derive(Default)]
pub(super) struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    pub(super) fn log(&mut self, what: &str, error: &io::Error) {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last).as_secs() < 1 => self.suppressed += 1,
            _ => {
                warn!(what, %error, suppressed = self.suppressed, "I/O error");
                self.last = Some(now);
                self.suppressed = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        epoll::Epoll,
        relay::{RelayAddress, Relays},
    };
    use turn_proto::{
        server::{FiveTuple, RelayAllocator, RelayRequest},
        stun::Family,
    };

    /// One listener socket on 127.0.0.1 and a pool with no relay addresses.
    fn one_listener() -> (Vec<Listener>, RelayPool) {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let state = quinn_udp::UdpSocketState::new((&socket).into()).unwrap();
        let local = socket.local_addr().unwrap();
        let pool =
            RelayPool::new(crate::relay::RelayPorts::new(&[vec![], vec![]], 1, 1), 0).unwrap();
        (vec![Listener { socket, state, local }], pool)
    }

    fn receive_all(socket: &UdpSocket, want: usize) -> Vec<Vec<u8>> {
        socket.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while got.len() < want {
            let Ok(n) = socket.recv(&mut buf) else { break };
            got.push(buf[..n].to_vec());
        }
        got
    }

    #[test]
    fn staged_payloads_reach_each_peer_in_order_with_their_sizes() {
        let epoll = Epoll::new().unwrap();
        let v4 = RelayAddress {
            bind: "127.0.0.1".parse().unwrap(),
            advertised: "127.0.0.1".parse().unwrap(),
        };
        let lo = 42_000 + (std::process::id() % 1000) as u16 * 8;
        let ports = crate::relay::RelayPorts::new(&[vec![v4], vec![]], lo, lo + 7);
        let mut pool = RelayPool::new(ports, 0).unwrap();
        let request = RelayRequest {
            family: Family::V4,
            even_port: false,
            dont_fragment: false,
            five_tuple: FiveTuple::udp(
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap(),
            ),
            username: "u",
        };
        let mut relays = Relays { pool: &mut pool, epoll: &epoll };
        let (relay_a, _) = relays.allocate(&request).unwrap();
        let (relay_b, _) = relays.allocate(&request).unwrap();
        let peer1 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer2 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (p1, p2) = (peer1.local_addr().unwrap(), peer2.local_addr().unwrap());

        // Interleaved flows, equal sizes with a shorter tail, a size change, an empty one.
        let mut staged = Staged::default();
        let mut expected1 = Vec::new();
        let mut expected2 = Vec::new();
        for i in 0..40u8 {
            let a = vec![i; 100];
            staged.push(Dest::Peer { relay: relay_a, peer: p1 }, &a);
            expected1.push(a);
            let b = vec![
                i;
                if i == 39 {
                    7
                } else if i >= 30 {
                    60
                } else {
                    100
                }
            ];
            staged.push(Dest::Peer { relay: relay_b, peer: p2 }, &b);
            expected2.push(b);
        }
        staged.push(Dest::Peer { relay: relay_a, peer: p1 }, &[]);
        expected1.push(Vec::new());
        let mut log = RateLimitedLog::default();
        staged.flush(&pool, &[], &mut log);
        assert!(staged.items.is_empty() && staged.bytes.is_empty());
        let summary =
            |v: &[Vec<u8>]| v.iter().map(|d| (d.len(), d.first().copied())).collect::<Vec<_>>();
        assert_eq!(summary(&receive_all(&peer1, expected1.len())), summary(&expected1));
        assert_eq!(summary(&receive_all(&peer2, expected2.len())), summary(&expected2));
        // Sent from the relay socket itself.
        staged.push(Dest::Peer { relay: relay_b, peer: p1 }, b"x");
        staged.flush(&pool, &[], &mut log);
        let mut buf = [0u8; 8];
        let (_, from) = peer1.recv_from(&mut buf).unwrap();
        assert_eq!(from, pool.get(relay_b).unwrap().socket.local_addr().unwrap());
        assert!(staged.room_for(STAGED_BYTES) && !staged.room_for(STAGED_BYTES + 1));
    }

    #[test]
    fn a_run_never_exceeds_what_one_udp_send_can_carry() {
        // 64 equal datagrams of 1,024 bytes fill the stage (64 KiB) exactly, more than one
        // UDP send may carry (65,507 bytes): the run must be split, nothing lost.
        let (listeners, pool) = one_listener();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let dest = Dest::Client { group: 0, client: client.local_addr().unwrap(), src_ip: None };
        let mut staged = Staged::default();
        for i in 0..64u8 {
            assert!(staged.room_for(1024));
            staged.push(dest, &[i; 1024]);
        }
        staged.flush(&pool, &listeners, &mut RateLimitedLog::default());
        let got = receive_all(&client, 64);
        assert_eq!(got.len(), 64);
        assert!(got.iter().enumerate().all(|(i, d)| d.len() == 1024 && d[0] == i as u8));
    }

    #[test]
    fn staged_datagrams_reach_each_client_in_order_from_the_listener_socket() {
        let (listeners, pool) = one_listener();
        let client1 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let client2 = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = |c: &UdpSocket| Dest::Client {
            group: 0,
            client: c.local_addr().unwrap(),
            src_ip: None,
        };
        // Two clients interleaved: a GSO-sized run with a shorter tail, then a size change.
        let mut staged = Staged::default();
        let (mut expected1, mut expected2) = (Vec::new(), Vec::new());
        for i in 0..30u8 {
            let a = vec![i; if i == 29 { 5 } else { 164 }];
            staged.push(to(&client1), &a);
            expected1.push(a);
            let b = vec![i; if i < 10 { 1204 } else { 84 }];
            staged.push(to(&client2), &b);
            expected2.push(b);
        }
        let mut log = RateLimitedLog::default();
        staged.flush(&pool, &listeners, &mut log);
        let summary =
            |v: &[Vec<u8>]| v.iter().map(|d| (d.len(), d.first().copied())).collect::<Vec<_>>();
        assert_eq!(summary(&receive_all(&client1, expected1.len())), summary(&expected1));
        assert_eq!(summary(&receive_all(&client2, expected2.len())), summary(&expected2));
        // From the listener's address.
        staged.push(to(&client1), b"x");
        staged.flush(&pool, &listeners, &mut log);
        let mut buf = [0u8; 8];
        let (_, from) = client1.recv_from(&mut buf).unwrap();
        assert_eq!(from, listeners[0].local);
    }
}
