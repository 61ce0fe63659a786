//! The worker's one output sink: everything the protocol core decides to send goes
//! through [`Sink::send`], whatever input it answers (a client message, a peer
//! datagram, an ICMP error, a hand-off). Client -> peer payloads are staged and leave as
//! GSO runs when the batch ends ([`Sink::flush`]); datagrams to UDP clients leave at once
//! from the worker's listener socket that `ClientConn` names; messages to TCP and TLS
//! clients are queued on the connection `ClientConn` names and written once per batch.

use std::{io, net::SocketAddr, net::UdpSocket, time::Instant};

use quinn_udp::Transmit;
use tracing::warn;
use turn_proto::server::{Output, RelayId, Transport};

use super::{stream::Connections, udp::Listener};
use crate::relay::{self, RelayPool};

/// Where outputs go: the worker's UDP listener sockets (by group index, the
/// `ClientConn` of a UDP client), its TCP and TLS connections, and its relay sockets.
pub(super) struct Sink {
    /// One socket per UDP listener group, in group order.
    pub(super) listeners: Vec<Listener>,
    /// The worker's TCP and TLS connections.
    pub(super) connections: Connections,
    /// Client -> peer payloads of the current receive batch, sent grouped by relay socket
    /// and peer so that runs of equal-sized datagrams go out as one GSO send.
    staged: Staged,
    pub(super) io_errors: RateLimitedLog,
}

impl Sink {
    pub(super) fn new(listeners: Vec<Listener>, connections: Connections) -> Sink {
        Sink {
            listeners,
            connections,
            staged: Staged::default(),
            io_errors: RateLimitedLog::default(),
        }
    }

    /// Executes one output of the protocol core.
    pub(super) fn send(&mut self, pool: &RelayPool, output: Output<'_>) {
        match output {
            Output::None => {}
            Output::ToPeer { relay, peer, data, dont_fragment: false }
                if self.staged.room_for(data.len()) =>
            {
                self.staged.push(relay, peer, data);
            }
            Output::ToPeer { relay, peer, data, .. } => {
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
                    let transmit = Transmit {
                        destination: five_tuple.client,
                        ecn: None,
                        contents: data,
                        segment_size: None,
                        // From a wildcard listener, answer from the address the client used.
                        src_ip: l.local.ip().is_unspecified().then_some(five_tuple.listener.ip()),
                    };
                    if let Err(e) = l.state.try_send((&l.socket).into(), &transmit) {
                        self.io_errors.log("send to client", &e);
                    }
                }
                Transport::Tcp | Transport::Tls => self.connections.queue(conn, data),
            },
        }
    }

    /// Sends what the batch staged (see [`Staged`]).
    pub(super) fn flush(&mut self, pool: &RelayPool) {
        self.staged.flush(pool, &mut self.io_errors);
    }
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

/// Client -> peer payloads of one receive batch, copied out of the receive buffers.
#[derive(Default)]
struct Staged {
    bytes: Vec<u8>,
    items: Vec<(RelayId, SocketAddr, usize, usize)>,
    order: Vec<usize>,
    gso: Vec<u8>,
}

/// Most bytes staged per batch (a batch holds at most `BATCH_SIZE` datagrams).
const STAGED_BYTES: usize = 64 * 1024;

impl Staged {
    fn room_for(&self, len: usize) -> bool {
        self.bytes.len() + len <= STAGED_BYTES
    }

    fn push(&mut self, relay: RelayId, peer: SocketAddr, data: &[u8]) {
        self.items.push((relay, peer, self.bytes.len(), data.len()));
        self.bytes.extend_from_slice(data);
    }

    /// Sends the staged payloads: grouped by (relay, peer) with each flow's order kept,
    /// a run of equal-sized payloads (the last may be shorter) as one GSO send.
    fn flush(&mut self, pool: &RelayPool, io_errors: &mut RateLimitedLog) {
        if self.items.is_empty() {
            return;
        }
        let Self { bytes, items, order, gso } = self;
        order.clear();
        order.extend(0..items.len());
        order.sort_by_key(|&i| (items[i].0, items[i].1)); // stable: per-flow order kept
        let max_segments = pool.state.max_gso_segments().clamp(1, 64);
        let mut i = 0;
        while i < order.len() {
            let (relay, peer, _, segment) = items[order[i]];
            // The run: same relay and peer, same size, at most max_segments; a shorter
            // payload may end it.
            let mut end = i + 1;
            while segment > 0 && end < order.len() && end - i < max_segments {
                let (r, p, _, len) = items[order[end]];
                // An empty payload cannot be a GSO segment: it goes out on its own.
                if r != relay || p != peer || len > segment || len == 0 {
                    break;
                }
                end += 1;
                if len < segment {
                    break;
                }
            }
            gso.clear();
            for &k in &order[i..end] {
                let (_, _, start, len) = items[k];
                gso.extend_from_slice(&bytes[start..start + len]);
            }
            if let Some(r) = pool.get(relay) {
                let transmit = Transmit {
                    destination: peer,
                    ecn: None,
                    contents: gso,
                    segment_size: (end - i > 1).then_some(segment),
                    src_ip: None,
                };
                if let Err(e) = try_send_to_peer(pool, &r.socket, &transmit) {
                    io_errors.log("send to peer", &e);
                }
            }
            i = end;
        }
        bytes.clear();
        items.clear();
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
        let mut pool = RelayPool::new(ports).unwrap();
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
            staged.push(relay_a, p1, &a);
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
            staged.push(relay_b, p2, &b);
            expected2.push(b);
        }
        staged.push(relay_a, p1, &[]);
        expected1.push(Vec::new());
        let mut log = RateLimitedLog::default();
        staged.flush(&pool, &mut log);
        assert!(staged.items.is_empty() && staged.bytes.is_empty());
        let summary =
            |v: &[Vec<u8>]| v.iter().map(|d| (d.len(), d.first().copied())).collect::<Vec<_>>();
        assert_eq!(summary(&receive_all(&peer1, expected1.len())), summary(&expected1));
        assert_eq!(summary(&receive_all(&peer2, expected2.len())), summary(&expected2));
        // Sent from the relay socket itself.
        staged.push(relay_b, p1, b"x");
        staged.flush(&pool, &mut log);
        let mut buf = [0u8; 8];
        let (_, from) = peer1.recv_from(&mut buf).unwrap();
        assert_eq!(from, pool.get(relay_b).unwrap().socket.local_addr().unwrap());
        assert!(staged.room_for(STAGED_BYTES) && !staged.room_for(STAGED_BYTES + 1));
    }
}
