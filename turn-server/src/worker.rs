//! A worker: one OS thread, one current_thread tokio runtime, one socket of every listener
//! group, its own `turn_proto::Server` (allocation table), the relay sockets of its
//! allocations, and one epoll set watched by the runtime (no task per socket).
//!
//! The per-packet path (receive a batch, hand each datagram to the protocol core, send what
//! it returns) takes no lock, touches no shared map and does not allocate. Shared state is
//! touched only for datagrams of a 5-tuple this worker does not own (the directory) and
//! when allocations come and go (quotas, directory, flow pins).

use std::{
    io::{self, IoSliceMut},
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};
use tracing::{debug, info, info_span, warn};
use turn_common::FlowKey;
use turn_proto::server::{
    ClientConn, ClientInput, DropReason, Event, FiveTuple, Host, Output, PEER_HEADROOM,
    PEER_TAILROOM, PeerIcmp, RelayId, Server,
};

use crate::{
    epoll::Epoll,
    relay::{self, RELAY_TOKEN, RelayPool, Relays},
    shared::{Directory, SharedQuota},
    steering::FlowPins,
};

/// Largest datagram (or GRO batch of datagrams) one receive buffer holds.
const RECV_BUFFER_BYTES: usize = 64 * 1024;
/// Batches taken from one socket before the next ready socket gets its turn.
const BATCHES_PER_TURN: usize = 4;
/// Epoll events fetched at once.
const EVENTS: usize = 256;
/// ICMP errors read from one relay socket's error queue before other sockets get a turn.
const ICMP_PER_TURN: usize = 64;
/// Datagrams waiting to be handed to a worker; more are dropped (and counted).
pub const INBOX_CAPACITY: usize = 4096;

/// What the control thread asks of the workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    /// No new allocations (Allocate gets 508); existing ones keep relaying.
    Draining,
    /// Release everything and exit.
    Stop,
}

/// Counters a worker publishes for the control thread. Each field has one writer (its
/// worker), which stores with `Relaxed` once per receive batch; readers sum over workers.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct WorkerStats {
    /// Datagrams received: from clients on listener sockets, from peers on relay sockets,
    /// and from other workers (the load signal, see `load.rs`).
    pub packets: AtomicU64,
    /// Bytes of those datagrams.
    pub bytes: AtomicU64,
    /// Datagrams handed to the worker that owns their allocation.
    pub handed_off: AtomicU64,
    /// Datagrams received from other workers.
    pub handed_in: AtomicU64,
    /// Hand-offs dropped because the owner's inbox was full.
    pub handoff_drops: AtomicU64,
    /// Live allocations of this worker.
    pub allocations: AtomicU64,
    /// Allocations this worker created so far.
    pub allocations_created: AtomicU64,
    /// Allocation pins that could not be written (pin map full).
    pub pin_failures: AtomicU64,
    /// The protocol core's failed authentications.
    pub auth_failures: AtomicU64,
    /// Requests the protocol core's per-source limits left unanswered or unverified.
    pub rate_limited: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    // Single writer: a plain load/store pair, no locked read-modify-write.
    counter.store(counter.load(Ordering::Relaxed).wrapping_add(by), Ordering::Relaxed);
}

/// A datagram that reached a worker which does not own its allocation.
#[derive(Debug)]
pub struct Handoff {
    pub group: usize,
    pub listener: SocketAddr,
    pub client: SocketAddr,
    pub data: Box<[u8]>,
}

/// What a worker is given when it starts.
pub struct WorkerSetup {
    pub index: usize,
    /// One socket per listener group, in group order.
    pub listeners: Vec<UdpSocket>,
    /// Per listener group: this worker's handle on the group's flow pins (None: no steering).
    pub flow_pins: Vec<Option<FlowPins>>,
    pub server: Server,
    pub relays: RelayPool,
    pub quota: Arc<SharedQuota>,
    pub directory: Arc<Directory>,
    /// Every worker's inbox, by worker index.
    pub inboxes: Arc<[mpsc::Sender<Handoff>]>,
    pub inbox: mpsc::Receiver<Handoff>,
    pub stats: Arc<WorkerStats>,
    pub state: watch::Receiver<RunState>,
}

/// Starts a worker thread.
pub fn spawn(setup: WorkerSetup) -> io::Result<JoinHandle<anyhow::Result<()>>> {
    std::thread::Builder::new().name(format!("worker-{}", setup.index)).spawn(move || {
        let span = info_span!("worker", index = setup.index);
        let _enter = span.enter();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async move { Worker::new(setup)?.run().await })
    })
}

struct Listener {
    socket: UdpSocket,
    state: UdpSocketState,
    local: SocketAddr,
}

/// Everything but the receive buffers, so that a datagram borrowed from a buffer can be
/// handled with `&mut Core`.
struct Core {
    index: usize,
    listeners: Vec<Listener>,
    flow_pins: Vec<Option<FlowPins>>,
    server: Server,
    pool: RelayPool,
    quota: Arc<SharedQuota>,
    directory: Arc<Directory>,
    inboxes: Arc<[mpsc::Sender<Handoff>]>,
    stats: Arc<WorkerStats>,
    epoll: Rc<AsyncFd<Epoll>>,
    out: Box<[u8]>,
    scratch: Box<[u8]>,
    /// Client -> peer payloads of the current receive batch, sent grouped by relay socket
    /// and peer so that runs of equal-sized datagrams go out as one GSO send.
    staged: Staged,
    io_errors: RateLimitedLog,
}

struct Worker {
    core: Core,
    state: watch::Receiver<RunState>,
    inbox: mpsc::Receiver<Handoff>,
    buffers: Vec<Box<[u8]>>,
}

/// Token of listener `i` in the epoll set (relay sockets have [`RELAY_TOKEN`] set).
fn listener_token(i: usize) -> u64 {
    i as u64
}

fn unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Worker {
    fn new(setup: WorkerSetup) -> anyhow::Result<Self> {
        let epoll = Epoll::new()?;
        let mut listeners = Vec::with_capacity(setup.listeners.len());
        for (i, socket) in setup.listeners.into_iter().enumerate() {
            socket.set_nonblocking(true)?;
            let state = UdpSocketState::new((&socket).into())?;
            epoll.add(socket.as_raw_fd(), listener_token(i))?;
            let local = socket.local_addr()?;
            listeners.push(Listener { socket, state, local });
        }
        // SAFETY: `Epoll` owns its fd and never replaces or closes it while it lives.
        let epoll = unsafe {
            AsyncFd::register_with_interest(epoll, tokio::io::Interest::READABLE)
                .map_err(|e| e.into_parts().1)?
        };
        Ok(Self {
            core: Core {
                index: setup.index,
                listeners,
                flow_pins: setup.flow_pins,
                server: setup.server,
                pool: setup.relays,
                quota: setup.quota,
                directory: setup.directory,
                inboxes: setup.inboxes,
                stats: setup.stats,
                epoll: Rc::new(epoll),
                out: vec![0u8; turn_proto::server::RECOMMENDED_OUT_LEN].into_boxed_slice(),
                scratch: vec![0u8; PEER_HEADROOM + RECV_BUFFER_BYTES + PEER_TAILROOM]
                    .into_boxed_slice(),
                io_errors: RateLimitedLog::default(),
                staged: Staged::default(),
            },
            state: setup.state,
            inbox: setup.inbox,
            buffers: (0..quinn_udp::BATCH_SIZE)
                .map(|_| {
                    vec![0u8; PEER_HEADROOM + RECV_BUFFER_BYTES + PEER_TAILROOM].into_boxed_slice()
                })
                .collect(),
        })
    }

    async fn run(mut self) -> anyhow::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        let epoll = Rc::clone(&self.core.epoll);
        loop {
            match *self.state.borrow() {
                RunState::Stop => break,
                RunState::Draining => self.core.pool.draining = true,
                RunState::Running => self.core.pool.draining = false,
            }
            let deadline = self.core.server.poll_timeout();
            tokio::select! {
                changed = self.state.changed() => {
                    if changed.is_err() {
                        break; // the control thread is gone
                    }
                }
                guard = epoll.readable() => {
                    let mut guard = guard?;
                    let n = guard.get_inner().poll_ready(&mut events)?;
                    if n == 0 {
                        guard.clear_ready();
                        continue;
                    }
                    for event in &events[..n] {
                        self.on_readable(event.u64, event.events);
                    }
                    self.core.after_batch();
                }
                Some(handoff) = self.inbox.recv() => {
                    self.core.on_handoff(handoff);
                    self.core.after_batch();
                }
                () = sleep_until(deadline) => {
                    let now = Instant::now();
                    let core = &mut self.core;
                    let mut relays = Relays { pool: &mut core.pool, epoll: core.epoll.get_ref() };
                    let mut host = Host { relays: &mut relays, quota: &*core.quota };
                    core.server.handle_timeout(now, &mut host);
                    core.after_batch();
                }
            }
        }
        let core = &mut self.core;
        let mut relays = Relays { pool: &mut core.pool, epoll: core.epoll.get_ref() };
        core.server.release_all(&mut Host { relays: &mut relays, quota: &*core.quota });
        core.after_batch();
        let c = core.server.counters();
        info!(
            allocations_created = c.allocations_created,
            to_peer = c.to_peer,
            to_client = c.channel_data_to_client + c.data_indications_to_client,
            dropped = c.drops.iter().sum::<u64>(),
            auth_failures = c.auth_failures,
            rate_limited = c.rate_limited_responses + c.rate_limited_auth,
            replays_refused = c.replays_refused,
            drops = %DropSummary(c.drops),
            handed_off = core.stats.handed_off.load(Ordering::Relaxed),
            handed_in = core.stats.handed_in.load(Ordering::Relaxed),
            handoff_drops = core.stats.handoff_drops.load(Ordering::Relaxed),
            pin_failures = core.stats.pin_failures.load(Ordering::Relaxed),
            "worker stopped"
        );
        Ok(())
    }

    fn on_readable(&mut self, token: u64, events: u32) {
        if token & RELAY_TOKEN != 0 {
            let slot = (token & 0xffff_ffff) as u32;
            if events & libc::EPOLLERR as u32 != 0 {
                self.core.drain_icmp(slot);
            }
            self.drain_relay(slot);
        } else if (token as usize) < self.core.listeners.len() {
            self.drain_listener(token as usize);
        }
    }

    /// Receives up to `BATCHES_PER_TURN` batches from listener `group` and handles them.
    fn drain_listener(&mut self, group: usize) {
        let mut meta = [RecvMeta::default(); quinn_udp::BATCH_SIZE];
        for _ in 0..BATCHES_PER_TURN {
            let received = {
                let listener = &self.core.listeners[group];
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
                    self.core.io_errors.log("listener receive", &e);
                    return;
                }
            };
            let now = Instant::now();
            let unix = unix_secs();
            let port = self.core.listeners[group].local.port();
            self.core.count_received(&meta[..count]);
            for (m, buf) in meta.iter().zip(self.buffers.iter()).take(count) {
                let local = match m.dst_ip {
                    Some(ip) => SocketAddr::new(ip, port),
                    None => self.core.listeners[group].local,
                };
                for datagram in buf[..m.len].chunks(m.stride.max(1)) {
                    self.core.on_client_datagram(now, unix, group, local, m.addr, datagram, true);
                }
            }
            self.core.flush_staged();
            if count < quinn_udp::BATCH_SIZE {
                return;
            }
        }
    }

    /// Receives up to `BATCHES_PER_TURN` batches from a relay socket and relays them.
    fn drain_relay(&mut self, slot: u32) {
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
                    self.core.io_errors.log("relay receive", &e);
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

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

impl Core {
    /// A datagram from a client. `route`: look up another owner when this worker has no
    /// allocation for its 5-tuple (false for datagrams another worker handed us).
    #[allow(clippy::too_many_arguments)]
    fn on_client_datagram(
        &mut self,
        now: Instant,
        unix: u64,
        group: usize,
        local: SocketAddr,
        client: SocketAddr,
        datagram: &[u8],
        route: bool,
    ) {
        let five_tuple = FiveTuple::udp(client, local);
        if route
            && self.server.allocation(&five_tuple).is_none()
            && let Some(owner) = self.directory.owner(&five_tuple)
            && owner != self.index
        {
            let handoff = Handoff { group, listener: local, client, data: datagram.into() };
            match self.inboxes.get(owner).map(|inbox| inbox.try_send(handoff)) {
                Some(Ok(())) => bump(&self.stats.handed_off, 1),
                _ => bump(&self.stats.handoff_drops, 1),
            }
            return;
        }
        let mut relays = Relays { pool: &mut self.pool, epoll: self.epoll.get_ref() };
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
        match output {
            Output::ToPeer { relay, peer, data, dont_fragment: false }
                if self.staged.room_for(data.len()) =>
            {
                self.staged.push(relay, peer, data);
            }
            output => send(&self.listeners, &self.pool, &mut self.io_errors, output),
        }
    }

    /// Counts a receive batch in the worker's load (one store per counter per batch).
    fn count_received(&self, meta: &[RecvMeta]) {
        let (mut datagrams, mut bytes) = (0u64, 0u64);
        for m in meta {
            datagrams += m.len.div_ceil(m.stride.max(1)).max(1) as u64;
            bytes += m.len as u64;
        }
        bump(&self.stats.packets, datagrams);
        bump(&self.stats.bytes, bytes);
    }

    /// Sends what the batch staged for peers (see [`Staged`]).
    fn flush_staged(&mut self) {
        self.staged.flush(&self.pool, &mut self.io_errors);
    }

    /// A datagram from a peer on relay `id`, at `buf[PEER_HEADROOM..PEER_HEADROOM + len]`.
    fn on_peer_datagram(
        &mut self,
        now: Instant,
        id: RelayId,
        peer: SocketAddr,
        buf: &mut [u8],
        len: usize,
    ) {
        let output = self.server.handle_peer_datagram(now, id, peer, buf, len);
        send(&self.listeners, &self.pool, &mut self.io_errors, output);
    }

    /// Forwards the ICMP errors queued on relay `slot` to the clients whose permissions
    /// cover the peer (RFC 8656 §11.6: a Data indication with an ICMP attribute).
    fn drain_icmp(&mut self, slot: u32) {
        for _ in 0..ICMP_PER_TURN {
            let Some((id, relay)) = self.pool.by_slot(slot) else { return };
            let icmp = match relay::read_icmp(&relay.socket) {
                Ok(Some(icmp)) => icmp,
                Ok(None) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    self.io_errors.log("relay error queue", &e);
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
            send(&self.listeners, &self.pool, &mut self.io_errors, output);
        }
    }

    /// A datagram another worker received for one of our allocations: pin its flow here
    /// so the next ones come straight to us, then handle it.
    fn on_handoff(&mut self, handoff: Handoff) {
        bump(&self.stats.handed_in, 1);
        bump(&self.stats.packets, 1);
        bump(&self.stats.bytes, handoff.data.len() as u64);
        if let Some(Some(pins)) = self.flow_pins.get_mut(handoff.group)
            && pins.pin(&FlowKey::new(handoff.client, handoff.listener.ip())).is_err()
        {
            bump(&self.stats.pin_failures, 1);
        }
        self.on_client_datagram(
            Instant::now(),
            unix_secs(),
            handoff.group,
            handoff.listener,
            handoff.client,
            &handoff.data,
            false,
        );
        self.flush_staged();
    }

    /// Book-keeping after a batch: allocation events (logs, directory, pins, counts).
    fn after_batch(&mut self) {
        while let Some(event) = self.server.poll_event() {
            match event {
                Event::AllocationCreated { five_tuple, conn, username, relays, lifetime_secs } => {
                    self.directory.insert(five_tuple, self.index);
                    bump(&self.stats.allocations_created, 1);
                    if let Some(Some(pins)) = self.flow_pins.get_mut(conn.0 as usize)
                        && pins
                            .pin(&FlowKey::new(five_tuple.client, five_tuple.listener.ip()))
                            .is_err()
                    {
                        bump(&self.stats.pin_failures, 1);
                    }
                    let relayed: Vec<String> =
                        relays.iter().flatten().map(|r| r.addr.to_string()).collect();
                    info!(
                        user = %username,
                        client = %five_tuple.client,
                        listener = %five_tuple.listener,
                        relay = %relayed.join(","),
                        lifetime_secs,
                        "allocation created"
                    );
                }
                Event::AllocationRefreshed { five_tuple, username, lifetime_secs } => {
                    debug!(user = %username, client = %five_tuple.client, lifetime_secs, "allocation refreshed");
                }
                Event::AllocationDeleted { five_tuple, conn, username, reason } => {
                    self.directory.remove(&five_tuple, self.index);
                    if let Some(Some(pins)) = self.flow_pins.get_mut(conn.0 as usize) {
                        pins.unpin(&FlowKey::new(five_tuple.client, five_tuple.listener.ip()));
                    }
                    info!(user = %username, client = %five_tuple.client, reason = reason.name(), "allocation deleted");
                }
            }
        }
        self.stats.allocations.store(self.server.allocation_count() as u64, Ordering::Relaxed);
        let c = self.server.counters();
        self.stats.auth_failures.store(c.auth_failures, Ordering::Relaxed);
        self.stats
            .rate_limited
            .store(c.rate_limited_responses + c.rate_limited_auth, Ordering::Relaxed);
        if self.pool.bind_errors > 0 {
            warn!(count = self.pool.bind_errors, "relay sockets could not be created");
            self.pool.bind_errors = 0;
        }
    }
}

/// Executes the protocol core's output.
fn send(
    listeners: &[Listener],
    pool: &RelayPool,
    io_errors: &mut RateLimitedLog,
    output: Output<'_>,
) {
    match output {
        Output::None => {}
        Output::ToClient { five_tuple, conn, data } => {
            let Some(l) = listeners.get(conn.0 as usize) else { return };
            let transmit = Transmit {
                destination: five_tuple.client,
                ecn: None,
                contents: data,
                segment_size: None,
                // From a wildcard listener, answer from the address the client used.
                src_ip: l.local.ip().is_unspecified().then_some(five_tuple.listener.ip()),
            };
            if let Err(e) = l.state.try_send((&l.socket).into(), &transmit) {
                io_errors.log("send to client", &e);
            }
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
                io_errors.log("send to peer", &e);
            }
        }
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

/// Drop counters by reason, for the log.
struct DropSummary([u64; DropReason::COUNT]);

impl std::fmt::Display for DropSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for (i, count) in self.0.iter().enumerate() {
            if *count > 0 {
                if !first {
                    f.write_str(",")?;
                }
                first = false;
                write!(
                    f,
                    "{:?}={count}",
                    DropReason::ALL.get(i).copied().unwrap_or(DropReason::NotTurn)
                )?;
            }
        }
        Ok(())
    }
}

/// Logs an I/O error at most once per second per worker, with the count suppressed.
#[derive(Default)]
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn log(&mut self, what: &str, error: &io::Error) {
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
    use crate::relay::RelayAddress;
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
