//! UDP: the worker's listener sockets (client datagrams, received in batches through
//! quinn-udp, GRO included) and its relay sockets (peer datagrams, framed in place, and
//! the ICMP errors of their error queues).

use std::{
    io::{self, IoSliceMut},
    net::{SocketAddr, UdpSocket},
    time::Instant,
};

use quinn_udp::{RecvMeta, UdpSocketState};
use turn_proto::server::{
    ClientConn, ClientInput, FiveTuple, Host, PEER_HEADROOM, PeerIcmp, RelayId,
};

use super::{
    BATCHES_PER_TURN, Core, Handoff, ICMP_PER_TURN, RECV_BUFFER_BYTES, Worker, bump, unix_secs,
};
use crate::relay::{self, Relays};

/// The worker's socket of one UDP listener group.
pub(super) struct Listener {
    pub(super) socket: UdpSocket,
    pub(super) state: UdpSocketState,
    pub(super) local: SocketAddr,
}

/// Where a client datagram came from: the listener group (the `ClientConn` of a UDP
/// client), the local address it was sent to, and the client's address.
#[derive(Clone, Copy, Debug)]
pub(super) struct UdpFrom {
    pub(super) group: usize,
    pub(super) local: SocketAddr,
    pub(super) client: SocketAddr,
}

impl Worker {
    /// Receives up to `BATCHES_PER_TURN` batches from listener `group` and handles them.
    pub(super) fn drain_listener(&mut self, group: usize) {
        let mut meta = [RecvMeta::default(); quinn_udp::BATCH_SIZE];
        for _ in 0..BATCHES_PER_TURN {
            let received = {
                let listener = &self.core.sink.listeners[group];
                let mut buffers = self.buffers.iter_mut();
                let mut iovs: [IoSliceMut<'_>; quinn_udp::BATCH_SIZE] = std::array::from_fn(|_| {
                    IoSliceMut::new(
                        buffers.next().map_or(&mut [][..], |b| &mut b[..RECV_BUFFER_BYTES]),
                    )
                });
                listener.state.recv((&listener.socket).into(), &mut iovs, &mut meta)
            };
            let count = match received {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    self.core.sink.io_errors.log("listener receive", &e);
                    return;
                }
            };
            let now = Instant::now();
            let unix = unix_secs();
            let port = self.core.sink.listeners[group].local.port();
            self.core.count_received(&meta[..count]);
            for (m, buf) in meta.iter().zip(self.buffers.iter()).take(count) {
                let local = match m.dst_ip {
                    Some(ip) => SocketAddr::new(ip, port),
                    None => self.core.sink.listeners[group].local,
                };
                let from = UdpFrom { group, local, client: m.addr };
                for datagram in buf[..m.len].chunks(m.stride.max(1)) {
                    self.core.on_client_datagram(now, unix, from, datagram, true);
                }
            }
            if count < quinn_udp::BATCH_SIZE {
                return;
            }
        }
    }

    /// Receives up to `BATCHES_PER_TURN` batches from a relay socket and relays them.
    pub(super) fn drain_relay(&mut self, slot: u32) {
        let mut meta = [RecvMeta::default(); quinn_udp::BATCH_SIZE];
        for _ in 0..BATCHES_PER_TURN {
            let Some((id, relay)) = self.core.pool.by_slot(slot) else { return };
            let received = {
                let mut buffers = self.buffers.iter_mut();
                let mut iovs: [IoSliceMut<'_>; quinn_udp::BATCH_SIZE] = std::array::from_fn(|_| {
                    IoSliceMut::new(buffers.next().map_or(&mut [][..], |b| {
                        &mut b[PEER_HEADROOM..PEER_HEADROOM + RECV_BUFFER_BYTES]
                    }))
                });
                self.core.pool.state.recv((&relay.socket).into(), &mut iovs, &mut meta)
            };
            let count = match received {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // An ICMP error reported once on the next call (IP_RECVERR): the error
                // queue has it; the data behind it is still there.
                Err(e) if relay::is_icmp_report(&e) => {
                    self.core.drain_icmp(slot);
                    continue;
                }
                Err(e) => {
                    self.core.sink.io_errors.log("relay receive", &e);
                    return;
                }
            };
            let now = Instant::now();
            self.core.count_received(&meta[..count]);
            for (m, buf) in meta.iter().zip(self.buffers.iter_mut()).take(count) {
                if m.stride >= m.len {
                    // The usual case: one datagram, framed in place.
                    self.core.on_peer_datagram(now, id, m.addr, buf, m.len);
                } else {
                    // A GRO batch: frame each segment in the scratch buffer.
                    let batch = &buf[PEER_HEADROOM..PEER_HEADROOM + m.len];
                    for segment in batch.chunks(m.stride.max(1)) {
                        let mut scratch = std::mem::take(&mut self.core.scratch);
                        scratch[PEER_HEADROOM..PEER_HEADROOM + segment.len()]
                            .copy_from_slice(segment);
                        self.core.on_peer_datagram(now, id, m.addr, &mut scratch, segment.len());
                        self.core.scratch = scratch;
                    }
                }
            }
            if count < quinn_udp::BATCH_SIZE {
                return;
            }
        }
    }
}

impl Core {
    /// A datagram from a client. `route`: look up another owner when this worker has no
    /// allocation for its 5-tuple (false for datagrams another worker handed us).
    pub(super) fn on_client_datagram(
        &mut self,
        now: Instant,
        unix: u64,
        from: UdpFrom,
        datagram: &[u8],
        route: bool,
    ) {
        let UdpFrom { group, local, client } = from;
        let five_tuple = FiveTuple::udp(client, local);
        if route && self.server.allocation(&five_tuple).is_none() {
            let owner = self.directory.owner(&five_tuple);
            if let Some(owner) = owner
                && owner != self.index
            {
                let handoff = Handoff {
                    group,
                    listener: local,
                    client,
                    data: datagram.into(),
                    from_previous: false,
                };
                let command = super::Command::Handoff(handoff);
                match self.inboxes.get(owner).map(|inbox| inbox.try_send(command)) {
                    Some(Ok(())) => bump(&self.stats.handed_off, 1),
                    _ => bump(&self.stats.handoff_drops, 1),
                }
                return;
            }
            // A flow this process has no allocation for, after an upgrade: the new
            // generation answers it (an Allocate on its way at the switch included).
            if owner.is_none()
                && let Some(next) = &self.successor
            {
                use crate::daemon::upgrade::Handed;
                match next.send(group, local, client, datagram) {
                    Handed::Sent => {
                        bump(&self.stats.handed_off, 1);
                        return;
                    }
                    Handed::Full => {
                        bump(&self.stats.handoff_drops, 1);
                        return;
                    }
                    Handed::Gone => {}
                }
            }
        }
        let mut relays = Relays { pool: &mut self.pool, epoll: &self.epoll };
        let input = ClientInput {
            now,
            unix_secs: unix,
            five_tuple,
            conn: ClientConn(group as u64),
            data: datagram,
        };
        let output = self.server.handle_client_message(
            input,
            &mut self.out,
            &mut Host { relays: &mut relays, quota: &*self.quota },
        );
        self.sink.send(&self.pool, output);
    }

    /// Counts a receive batch in the worker's load (one store per counter per batch).
    pub(super) fn count_received(&mut self, meta: &[RecvMeta]) {
        let (mut datagrams, mut bytes) = (0u64, 0u64);
        for m in meta {
            datagrams += m.len.div_ceil(m.stride.max(1)).max(1) as u64;
            bytes += m.len as u64;
        }
        self.pass_datagrams += datagrams;
        bump(&self.stats.packets, datagrams);
        bump(&self.stats.bytes, bytes);
    }

    /// A datagram from a peer on relay `id`, at `buf[PEER_HEADROOM..PEER_HEADROOM + len]`.
    pub(super) fn on_peer_datagram(
        &mut self,
        now: Instant,
        id: RelayId,
        peer: SocketAddr,
        buf: &mut [u8],
        len: usize,
    ) {
        let output = self.server.handle_peer_datagram(now, id, peer, buf, len);
        self.sink.send(&self.pool, output);
    }

    /// Forwards the ICMP errors queued on relay `slot` to the clients whose permissions
    /// cover the peer (RFC 8656 §11.6: a Data indication with an ICMP attribute).
    pub(super) fn drain_icmp(&mut self, slot: u32) {
        for _ in 0..ICMP_PER_TURN {
            let Some((id, relay)) = self.pool.by_slot(slot) else { return };
            let icmp = match relay::read_icmp(&relay.socket) {
                Ok(Some(icmp)) => icmp,
                Ok(None) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    self.sink.io_errors.log("relay error queue", &e);
                    return;
                }
            };
            let report = PeerIcmp {
                peer: icmp.peer,
                icmp_type: icmp.icmp_type,
                icmp_code: icmp.icmp_code,
                info: icmp.info,
            };
            let output = self.server.handle_peer_icmp(Instant::now(), id, report, &mut self.out);
            self.sink.send(&self.pool, output);
        }
    }
}
