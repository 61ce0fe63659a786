//! A worker: one OS thread, one socket of every listener group, its own
//! `turn_proto::Server` (allocation table), the relay sockets of its allocations, and one
//! epoll set it sleeps on (no task per socket, no async runtime: an eventfd wakes it for
//! its inbox, the epoll timeout is its one timer). A tokio runtime under the epoll set cost
//! two more `epoll_wait` calls per wake-up: at 8 x 2,500 datagrams/s each way it used 14-17
//! us of CPU per forwarded packet where this loop uses 11-12.
//!
//! * `source.rs`: the event sources in the epoll set, by token; with the inbox's eventfd
//!   and the timeout, everything the run loop waits on.
//! * `control.rs`: the inbox (hand-offs and the control thread's commands).
//! * `sendmmsg.rs`: one system call for datagrams to several clients.
//! * `udp.rs`: UDP listener and relay sockets (batched receives, ICMP errors).
//! * `stream.rs`: TCP and TLS listeners and connections (framing, deadlines, limits).
//! * `handshake.rs`: the TLS handshake thread (handshakes off the relay path).
//! * `sink.rs`: the one place outputs are executed (staged datagrams both ways, GSO runs,
//!   sendmmsg to a listener's clients; queued writes to connections; datagrams from one
//!   relay of the daemon to another, handed to the worker that holds the receiver).
//!
//! The per-packet path (receive a batch, hand each datagram to the protocol core, send what
//! it returns) takes no lock, touches no shared map and does not allocate. Shared state is
//! touched only for datagrams of a 5-tuple this worker does not own (the directory) and
//! when allocations come and go (quotas, directory, flow pins).

mod control;
mod fast;
pub mod handshake;
mod sendmmsg;
mod sink;
mod source;
mod stream;
mod udp;

pub use control::{AllocationInfo, Command, Inbox, InboxReceiver};
pub use source::Source;
pub use stream::{CloseReason, StreamSettings};

use std::{
    io,
    net::{SocketAddr, TcpListener, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use quinn_udp::UdpSocketState;
use tokio::sync::watch;
use tracing::{debug, info, info_span, warn};
use turn_common::FlowKey;
use turn_proto::server::{
    DeleteReason, Event, Host, PEER_HEADROOM, PEER_TAILROOM, Server, Transport,
};

use self::{
    sink::Sink,
    stream::{Connections, StreamListener},
    udp::{Listener, UdpFrom},
};
use crate::{
    epoll::Epoll,
    relay::{RelayPool, Relays},
    shared::{ConnectionLimits, Directory, SharedQuota},
    steering::FlowPins,
};

/// Largest datagram (or GRO batch of datagrams) one receive buffer holds.
const RECV_BUFFER_BYTES: usize = 64 * 1024;
/// Batches taken from one socket before the next ready socket gets its turn.
const BATCHES_PER_TURN: usize = 4;
/// Epoll events fetched at once.
const EVENTS: usize = 256;
/// Commands taken from the inbox before the sockets get a turn (more wait for the next).
const INBOX_PER_TURN: usize = 1024;
/// The epoll token of the inbox's eventfd (no [`Source`] uses it).
const WAKE_TOKEN: u64 = u64::MAX;
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
    /// Datagrams one of this worker's relays sent to another, handed over in the worker.
    pub relayed_internally: AtomicU64,
    /// Hand-offs dropped because the owner's inbox was full.
    pub handoff_drops: AtomicU64,
    /// Live allocations of this worker.
    pub allocations: AtomicU64,
    /// Allocations this worker created so far.
    pub allocations_created: AtomicU64,
    /// Allocation pins that could not be written (pin map full).
    pub pin_failures: AtomicU64,
    /// Live allocations whose pin could not be written (yet: retried twice a second).
    pub unpinned: AtomicU64,
    /// The protocol core's failed authentications.
    pub auth_failures: AtomicU64,
    /// Requests the protocol core's per-source limits left unanswered or unverified.
    pub rate_limited: AtomicU64,
    /// TCP and TLS connections accepted so far.
    pub connections_accepted: AtomicU64,
    /// TCP and TLS connections open now.
    pub connections: AtomicU64,
    /// Connections closed (or refused at accept), by [`CloseReason`].
    pub closes: [AtomicU64; CloseReason::COUNT],
    /// Messages to stream clients dropped because the client did not read (write buffer
    /// full).
    pub stream_write_drops: AtomicU64,
    /// What the kernel fast path relayed for this worker's allocations (read from its
    /// counters twice a second): datagrams and payload bytes, each way.
    pub fast_to_peer_packets: AtomicU64,
    pub fast_to_peer_bytes: AtomicU64,
    pub fast_to_client_packets: AtomicU64,
    pub fast_to_client_bytes: AtomicU64,
    /// This worker's bindings in the kernel now.
    pub fast_bindings: AtomicU64,
    /// Bindings left on the userspace path because their entries could not be written.
    pub fast_failures: AtomicU64,
    /// The protocol core's counters and the live allocations, for the metrics endpoint.
    pub metrics: crate::metrics::WorkerMetrics,
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
    /// Handed over by the previous generation of the daemon (a flow it has no allocation
    /// for): not pinned here (no allocation of ours may exist), and routed to the worker
    /// owning its allocation if another one does.
    pub from_previous: bool,
}

/// What a worker is given when it starts.
pub struct WorkerSetup {
    pub index: usize,
    /// One socket per UDP listener group, in group order.
    pub listeners: Vec<UdpSocket>,
    /// One socket per TCP listener group (plain TCP or TLS), in group order.
    pub stream_listeners: Vec<(TcpListener, Transport)>,
    /// How TCP and TLS connections are served.
    pub streams: StreamSettings,
    /// Connection limits shared by the workers.
    pub limits: Arc<ConnectionLimits>,
    /// The TLS handshake thread (when TLS is served).
    pub handshakes: Option<handshake::Handshakes>,
    /// Per listener group: this worker's handle on the group's flow pins (None: no steering).
    pub flow_pins: Vec<Option<FlowPins>>,
    pub server: Server,
    pub relays: RelayPool,
    pub quota: Arc<SharedQuota>,
    pub directory: Arc<Directory>,
    /// Every worker's command channel (hand-offs and the control thread's commands), by
    /// worker index.
    pub inboxes: Arc<[Inbox]>,
    pub inbox: InboxReceiver,
    /// Where the worker publishes its per-user traffic (when `metrics_per_user` is on).
    pub user_traffic: Option<Arc<crate::metrics::UserTraffic>>,
    pub stats: Arc<WorkerStats>,
    pub state: watch::Receiver<RunState>,
    /// User series kept by name in the metrics.
    pub metrics_max_users: usize,
    /// The wait after a small pass when the worker is busy enough (see [`BatchWait`]).
    pub batch_wait: Duration,
    /// This worker's handles on the kernel fast path's bindings (None: fast path off).
    pub fast: Option<crate::fast_path::FastMaps>,
}

/// When a worker waits after an epoll pass before it looks again: only after a pass with
/// fewer than [`BatchWait::SMALL_PASS`] datagrams (a larger one already shares its system
/// calls), and only while the worker's recent rate makes at least
/// [`BatchWait::WORTH_WAITING`] datagrams likely to arrive during the wait. At lower rates
/// a wait would gather next to nothing, and its own wake-up would cost more than it saves.
struct BatchWait {
    wait: Duration,
    /// Datagrams since `since`, and the rate measured over the last window.
    count: u64,
    since: Instant,
    per_sec: f64,
}

impl BatchWait {
    const SMALL_PASS: u64 = quinn_udp::BATCH_SIZE as u64;
    const WORTH_WAITING: f64 = 3.0;
    const WINDOW: Duration = Duration::from_millis(10);

    fn new(wait: Duration) -> BatchWait {
        BatchWait { wait, count: 0, since: Instant::now(), per_sec: 0.0 }
    }

    /// After a pass that received `datagrams` at `now`: how long to wait, if at all.
    fn after_pass(&mut self, datagrams: u64, now: Instant) -> Option<Duration> {
        if self.wait.is_zero() {
            return None;
        }
        self.count += datagrams;
        let elapsed = now.saturating_duration_since(self.since);
        if elapsed >= Self::WINDOW {
            self.per_sec = self.count as f64 / elapsed.as_secs_f64();
            self.count = 0;
            self.since = now;
        }
        let expected = self.per_sec * self.wait.as_secs_f64();
        (datagrams < Self::SMALL_PASS && expected >= Self::WORTH_WAITING).then_some(self.wait)
    }
}

/// Starts a worker thread.
pub fn spawn(setup: WorkerSetup) -> io::Result<JoinHandle<anyhow::Result<()>>> {
    std::thread::Builder::new().name(format!("worker-{}", setup.index)).spawn(move || {
        let span = info_span!("worker", index = setup.index);
        let _enter = span.enter();
        if !setup.batch_wait.is_zero() {
            // The default timer slack (50 us) would stretch a short batch wait by half.
            // SAFETY: prctl(PR_SET_TIMERSLACK) on this thread, with a plain integer.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1_000 as libc::c_ulong) };
        }
        Worker::new(setup)?.run()
    })
}

/// Everything but the receive buffers, so that a datagram borrowed from a buffer can be
/// handled with `&mut Core`.
struct Core {
    index: usize,
    flow_pins: Vec<Option<FlowPins>>,
    server: Server,
    pool: RelayPool,
    quota: Arc<SharedQuota>,
    directory: Arc<Directory>,
    inboxes: Arc<[Inbox]>,
    stats: Arc<WorkerStats>,
    /// Per-user traffic of ended allocations (when `metrics_per_user` is on).
    user_traffic: Option<UserTotals>,
    /// When the protocol core's counters were last copied for the metrics endpoint.
    metrics_published: Instant,
    /// Datagrams and stream messages received in the current epoll pass.
    pass_datagrams: u64,
    epoll: Epoll,
    out: Box<[u8]>,
    scratch: Box<[u8]>,
    /// Where stream bytes are read before they join a connection's buffer.
    read_scratch: Box<[u8]>,
    stream_listeners: Vec<StreamListener>,
    streams: StreamSettings,
    limits: Arc<ConnectionLimits>,
    handshakes: Option<handshake::Handshakes>,
    /// A configuration prepared for a reload, until the control thread says to apply it.
    staged: Option<turn_proto::server::Prepared>,
    sink: Sink,
    /// The bindings of this worker's allocations in the kernel fast path.
    fast: Option<fast::FastBindings>,
    /// The next generation of the daemon, once it serves: datagrams of flows without an
    /// allocation here go to it.
    successor: Option<Arc<crate::daemon::upgrade::Successor>>,
    /// UDP allocations whose pin could not be written (pin map full), with their listener
    /// group: retried at each sweep. (An upgrade waits for none to be left: after the
    /// switch a flow without its pin would reach the new generation.)
    unpinned: std::collections::HashMap<turn_proto::server::FiveTuple, usize>,
}

struct Worker {
    core: Core,
    state: watch::Receiver<RunState>,
    inbox: InboxReceiver,
    buffers: Vec<Box<[u8]>>,
    batch_wait: BatchWait,
}

/// A worker's per-user traffic: what ended allocations relayed, and where it publishes
/// the sums with its live allocations'.
struct UserTotals {
    ended: std::collections::HashMap<Box<str>, [u64; 2]>,
    shared: Arc<crate::metrics::UserTraffic>,
    /// Users kept by name at most (the smallest fold into `_other`).
    bound: usize,
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
            epoll.add(socket.as_raw_fd(), Source::UdpListener(i as u32).token())?;
            let local = socket.local_addr()?;
            listeners.push(Listener { socket, state, local });
        }
        let mut stream_listeners = Vec::with_capacity(setup.stream_listeners.len());
        for (i, (listener, transport)) in setup.stream_listeners.into_iter().enumerate() {
            listener.set_nonblocking(true)?;
            epoll.add(listener.as_raw_fd(), Source::StreamListener(i as u32).token())?;
            stream_listeners.push(StreamListener { listener, transport });
        }
        epoll.add(setup.inbox.wake.as_raw_fd(), WAKE_TOKEN)?;
        Ok(Self {
            core: Core {
                index: setup.index,
                flow_pins: setup.flow_pins,
                server: setup.server,
                pool: setup.relays,
                quota: setup.quota,
                directory: setup.directory,
                inboxes: setup.inboxes,
                stats: setup.stats,
                metrics_published: Instant::now(),
                pass_datagrams: 0,
                user_traffic: setup.user_traffic.map(|shared| UserTotals {
                    ended: Default::default(),
                    shared,
                    bound: 4 * setup.metrics_max_users.max(1),
                }),
                epoll,
                out: vec![0u8; turn_proto::server::RECOMMENDED_OUT_LEN].into_boxed_slice(),
                scratch: vec![0u8; PEER_HEADROOM + RECV_BUFFER_BYTES + PEER_TAILROOM]
                    .into_boxed_slice(),
                read_scratch: vec![0u8; stream::READ_CHUNK].into_boxed_slice(),
                stream_listeners,
                sink: Sink::new(listeners, Connections::new(&setup.streams)),
                streams: setup.streams,
                limits: setup.limits,
                handshakes: setup.handshakes,
                staged: None,
                fast: setup.fast.map(fast::FastBindings::new),
                successor: None,
                unpinned: std::collections::HashMap::new(),
            },
            state: setup.state,
            inbox: setup.inbox,
            batch_wait: BatchWait::new(setup.batch_wait),
            buffers: (0..quinn_udp::BATCH_SIZE)
                .map(|_| {
                    vec![0u8; PEER_HEADROOM + RECV_BUFFER_BYTES + PEER_TAILROOM].into_boxed_slice()
                })
                .collect(),
        })
    }

    /// The worker's loop: sleep in `epoll_wait` until a socket is ready, the inbox's
    /// eventfd is written (a command, or a run-state change), the protocol core's next
    /// timer or the connection sweep is due; handle it; repeat until told to stop.
    fn run(mut self) -> anyhow::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        // Connection deadlines are checked twice a second (they are whole seconds).
        let mut next_sweep = Instant::now() + CONNECTION_SWEEP;
        loop {
            match *self.state.borrow_and_update() {
                RunState::Stop => break,
                RunState::Draining => self.core.pool.draining = true,
                RunState::Running => self.core.pool.draining = false,
            }
            let commands = self.take_commands();
            let now = Instant::now();
            if now >= next_sweep {
                self.core.pin_again();
                self.core.collect_fast_path();
                self.core.sweep_connections(now);
                self.core.publish_user_traffic();
                self.core.after_batch();
                next_sweep = now + CONNECTION_SWEEP;
            }
            let deadline = self.core.server.poll_timeout();
            if deadline.is_some_and(|d| d <= now) {
                let core = &mut self.core;
                let mut relays = Relays { pool: &mut core.pool, epoll: &core.epoll };
                let mut host = Host { relays: &mut relays, quota: &*core.quota };
                core.server.handle_timeout(now, &mut host);
                core.after_batch();
                continue;
            }
            let until = deadline.map_or(next_sweep, |d| d.min(next_sweep));
            // Whole milliseconds, rounded up: never wake before the deadline. Commands
            // left in the inbox: do not sleep.
            let timeout = match commands {
                INBOX_PER_TURN => 0,
                _ => until.saturating_duration_since(now).as_micros().div_ceil(1000),
            };
            let n = self.core.epoll.wait(&mut events, timeout.min(i32::MAX as u128) as i32)?;
            if n == 0 {
                continue;
            }
            self.core.pass_datagrams = 0;
            // Commands before the sockets' events: what the control thread decided (a
            // listener closed at an upgrade, a new configuration) applies to them already.
            if events[..n].iter().any(|e| e.u64 == WAKE_TOKEN) {
                self.inbox.clear_wake();
                self.take_commands();
            }
            let mut ready = false;
            for event in &events[..n] {
                if event.u64 != WAKE_TOKEN {
                    self.on_readable(event.u64, event.events);
                    ready = true;
                }
            }
            if !ready {
                continue;
            }
            self.core.after_batch();
            let pass = self.core.pass_datagrams;
            if let Some(wait) = self.batch_wait.after_pass(pass, Instant::now()) {
                // Let more arrive, so that the next pass shares its system calls and GSO
                // runs among more datagrams; what arrives meanwhile waits in the socket
                // buffers.
                std::thread::sleep(wait);
            }
        }
        let core = &mut self.core;
        let mut relays = Relays { pool: &mut core.pool, epoll: &core.epoll };
        core.server.release_all(&mut Host { relays: &mut relays, quota: &*core.quota });
        let now = Instant::now();
        for slot in core.sink.connections.slots() {
            core.close_connection(slot, CloseReason::Shutdown, now);
        }
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
            drops = %by_reason(c.drops_by_name()),
            handed_off = core.stats.handed_off.load(Ordering::Relaxed),
            handed_in = core.stats.handed_in.load(Ordering::Relaxed),
            relayed_internally = core.stats.relayed_internally.load(Ordering::Relaxed),
            handoff_drops = core.stats.handoff_drops.load(Ordering::Relaxed),
            pin_failures = core.stats.pin_failures.load(Ordering::Relaxed),
            connections_accepted = core.stats.connections_accepted.load(Ordering::Relaxed),
            closes = %by_reason(
                CloseReason::ALL
                    .iter()
                    .map(|r| r.name())
                    .zip(core.stats.closes.iter().map(|n| n.load(Ordering::Relaxed)))
            ),
            stream_write_drops = core.sink.connections.write_drops,
            kernel_to_peer = core.stats.fast_to_peer_packets.load(Ordering::Relaxed),
            kernel_to_client = core.stats.fast_to_client_packets.load(Ordering::Relaxed),
            kernel_failures = core.stats.fast_failures.load(Ordering::Relaxed),
            "worker stopped"
        );
        Ok(())
    }

    /// Carries out the commands waiting in the inbox (at most [`INBOX_PER_TURN`]), then
    /// their book-keeping; returns how many.
    fn take_commands(&mut self) -> usize {
        let mut commands = 0;
        while commands < INBOX_PER_TURN {
            let Ok(command) = self.inbox.rx.try_recv() else { break };
            self.core.on_command(command);
            commands += 1;
        }
        if commands > 0 {
            self.core.after_batch();
        }
        commands
    }

    /// Dispatches one epoll event to the source its token names.
    fn on_readable(&mut self, token: u64, events: u32) {
        match Source::from_token(token) {
            Some(Source::UdpListener(group))
                if (group as usize) < self.core.sink.listeners.len() =>
            {
                self.drain_listener(group as usize);
            }
            Some(Source::Relay(slot)) => {
                if events & libc::EPOLLERR as u32 != 0 {
                    self.core.drain_icmp(slot);
                }
                self.drain_relay(slot);
            }
            Some(Source::StreamListener(index)) => self.core.accept(index as usize),
            Some(Source::Connection(slot)) => {
                if events & libc::EPOLLOUT as u32 != 0 {
                    self.core.on_connection_writable(slot);
                }
                let readable =
                    (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
                if events & readable != 0 {
                    self.core.read_connection(slot);
                }
            }
            _ => {}
        }
    }
}

impl Core {
    /// A datagram another worker received for one of our allocations: pin its flow here
    /// so the next ones come straight to us, then handle it.
    fn on_handoff(&mut self, handoff: Handoff) {
        bump(&self.stats.handed_in, 1);
        bump(&self.stats.packets, 1);
        bump(&self.stats.bytes, handoff.data.len() as u64);
        let from =
            UdpFrom { group: handoff.group, local: handoff.listener, client: handoff.client };
        if handoff.from_previous {
            self.on_client_datagram(Instant::now(), unix_secs(), from, &handoff.data, true);
            return;
        }
        if let Some(Some(pins)) = self.flow_pins.get_mut(handoff.group)
            && pins.pin(&FlowKey::new(handoff.client, handoff.listener.ip())).is_err()
        {
            bump(&self.stats.pin_failures, 1);
        }
        self.on_client_datagram(Instant::now(), unix_secs(), from, &handoff.data, false);
    }

    /// Hands over what the batch's relays sent to other relays of the daemon: this
    /// worker's own at once, each other worker's in one command.
    fn deliver_internal(&mut self) {
        for owner in 0..self.sink.internal.len() {
            if self.sink.internal[owner].items.is_empty() {
                continue;
            }
            let batch = std::mem::take(&mut self.sink.internal[owner]);
            if owner == self.index {
                self.sink.internal[owner] = self.relay_in(batch);
                continue;
            }
            // The receiver counts what it takes in (`relayed_internally`); a full inbox
            // loses the batch, counted like a lost hand-off.
            let count = batch.items.len() as u64;
            let command = Command::Relayed(batch);
            if !matches!(self.inboxes.get(owner).map(|inbox| inbox.try_send(command)), Some(Ok(())))
            {
                bump(&self.stats.handoff_drops, count);
            }
        }
    }

    /// Datagrams relays of the daemon sent to relays of this worker: each reaches the
    /// receiving allocation as if its socket had received it from the sender's address
    /// (its permissions and channels apply as they would). Counted as received datagrams,
    /// so the worker's load still reflects its work; one whose relay is gone meanwhile is
    /// dropped, as the kernel would. Returns the emptied batch for reuse.
    fn relay_in(&mut self, mut batch: sink::Internal) -> sink::Internal {
        let now = Instant::now();
        let mut scratch = std::mem::take(&mut self.scratch);
        let (mut count, mut bytes, mut gone) = (0u64, 0u64, 0u64);
        for &(to, from, start, len) in &batch.items {
            let (Some(id), Some(data), Some(slot)) = (
                self.pool.bound_to(to),
                batch.bytes.get(start..start + len),
                scratch.get_mut(PEER_HEADROOM..PEER_HEADROOM + len),
            ) else {
                gone += 1;
                continue;
            };
            slot.copy_from_slice(data);
            let output = self.server.handle_peer_datagram(now, id, from, &mut scratch, len);
            self.sink.send(&self.pool, output);
            count += 1;
            bytes += len as u64;
        }
        batch.items.clear();
        batch.bytes.clear();
        self.scratch = scratch;
        bump(&self.stats.packets, count);
        bump(&self.stats.bytes, bytes);
        bump(&self.stats.relayed_internally, count);
        bump(&self.stats.handoff_drops, gone);
        batch
    }

    /// Book-keeping after a batch: allocation events (logs, directory, pins, connection
    /// phases, counts), then the batch's writes to stream clients.
    fn after_batch(&mut self) {
        // The fast path's entries first: an ended binding's entries go before the batch's
        // answers (a Refresh 0, a kick) leave, and its last counts reach its allocation's
        // session line below.
        if let Some(fast) = &mut self.fast {
            let pool = &self.pool;
            while let Some(change) = self.server.poll_fast_path() {
                fast.apply(change, &mut self.server, &self.stats, |id| {
                    pool.get(id).map(|r| r.local)
                });
            }
        }
        // Relay to relay inside the worker first: what it makes for clients joins the
        // stage. Then the batch's UDP datagrams, both ways, before anything else.
        self.deliver_internal();
        self.sink.flush(&self.pool);
        let now = Instant::now();
        while let Some(event) = self.server.poll_event() {
            match event {
                Event::AllocationCreated { five_tuple, conn, username, relays, lifetime_secs } => {
                    bump(&self.stats.allocations_created, 1);
                    self.stats.metrics.live_changed(five_tuple.transport, family_of(&relays), true);
                    if five_tuple.transport.is_stream() {
                        // A connection's allocation lives on the worker that accepted it:
                        // no directory entry, no flow pin.
                        if let Some(ip) =
                            self.sink.connections.allocation_created(conn, &self.streams, now)
                        {
                            self.limits.authenticated(ip);
                        }
                    } else {
                        self.directory.insert(five_tuple, self.index);
                        if let Some(Some(pins)) = self.flow_pins.get_mut(conn.0 as usize)
                            && pins
                                .pin(&FlowKey::new(five_tuple.client, five_tuple.listener.ip()))
                                .is_err()
                        {
                            bump(&self.stats.pin_failures, 1);
                            self.unpinned.insert(five_tuple, conn.0 as usize);
                        }
                    }
                    let relayed: Vec<String> =
                        relays.iter().flatten().map(|r| r.addr.to_string()).collect();
                    info!(
                        user = %username,
                        client = %five_tuple.client,
                        listener = %five_tuple.listener,
                        transport = five_tuple.transport.name(),
                        relay = %relayed.join(","),
                        lifetime_secs,
                        "allocation created"
                    );
                }
                Event::AllocationRefreshed { five_tuple, username, lifetime_secs } => {
                    debug!(user = %username, client = %five_tuple.client, lifetime_secs, "allocation refreshed");
                }
                Event::AllocationDeleted {
                    five_tuple,
                    conn,
                    username,
                    quota_key,
                    reason,
                    relays,
                    created_at,
                    mut traffic,
                } => {
                    if let Some(last) = self.fast.as_mut().and_then(|f| f.take_ended(&five_tuple)) {
                        traffic.add(&last);
                    }
                    self.stats.metrics.live_changed(
                        five_tuple.transport,
                        family_of(&relays),
                        false,
                    );
                    if reason == DeleteReason::Shutdown {
                        self.stats.metrics.ended_at_shutdown(1);
                    }
                    if let Some(totals) = &mut self.user_traffic {
                        // By user, not username: REST credentials of one user (a username
                        // per expiry) make one series.
                        totals.add(&quota_key, [traffic.to_peer_bytes, traffic.to_client_bytes]);
                    }
                    if five_tuple.transport.is_stream() {
                        if matches!(reason, DeleteReason::Expired | DeleteReason::ClientRequest) {
                            self.sink.connections.allocation_ended(conn, &self.streams, now);
                        }
                    } else {
                        self.directory.remove(&five_tuple, self.index);
                        self.unpinned.remove(&five_tuple);
                        if let Some(Some(pins)) = self.flow_pins.get_mut(conn.0 as usize) {
                            pins.unpin(&FlowKey::new(five_tuple.client, five_tuple.listener.ip()));
                        }
                    }
                    // The session log: one line per ended allocation.
                    let relayed: Vec<String> =
                        relays.iter().flatten().map(|r| r.addr.to_string()).collect();
                    info!(
                        user = %username,
                        client = %five_tuple.client,
                        listener = %five_tuple.listener,
                        transport = five_tuple.transport.name(),
                        relay = %relayed.join(","),
                        duration_secs = now.saturating_duration_since(created_at).as_secs(),
                        to_peer_packets = traffic.to_peer_packets,
                        to_peer_bytes = traffic.to_peer_bytes,
                        to_client_packets = traffic.to_client_packets,
                        to_client_bytes = traffic.to_client_bytes,
                        reason = reason.name(),
                        "allocation deleted"
                    );
                }
            }
        }
        self.flush_connections();
        // The metrics copy (some 60 counters) at most every 100 ms: live for a scraper,
        // and nothing per packet when batches are small. The sweep tick (500 ms) runs
        // this too, so an idle worker's last numbers are out within half a second.
        if now.saturating_duration_since(self.metrics_published) >= METRICS_PUBLISH_INTERVAL {
            self.stats.metrics.publish(self.server.counters());
            self.metrics_published = now;
        }
        self.stats.connections.store(self.sink.connections.len() as u64, Ordering::Relaxed);
        self.stats.stream_write_drops.store(self.sink.connections.write_drops, Ordering::Relaxed);
        self.stats.allocations.store(self.server.allocation_count() as u64, Ordering::Relaxed);
        self.stats.unpinned.store(self.unpinned.len() as u64, Ordering::Relaxed);
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

/// The relayed families of an allocation, as an index of [`crate::metrics::FAMILIES`].
fn family_of(relays: &[Option<turn_proto::server::RelaySocket>; 2]) -> usize {
    match relays {
        [Some(_), Some(_)] => 2,
        [None, Some(_)] => 1,
        _ => 0,
    }
}

impl UserTotals {
    /// Adds an ended allocation's bytes to its user.
    fn add(&mut self, user: &str, bytes: [u64; 2]) {
        let entry = self.ended.entry(user.into()).or_insert([0, 0]);
        entry[0] += bytes[0];
        entry[1] += bytes[1];
        if self.ended.len() > self.bound {
            // Keep the map bounded: the smallest half of the users fold into `_other`.
            let mut all: Vec<(Box<str>, [u64; 2])> = self.ended.drain().collect();
            all.sort_by_key(|(_, b)| std::cmp::Reverse(b[0] + b[1]));
            let mut other = [0u64; 2];
            for (i, (u, b)) in all.into_iter().enumerate() {
                if i < self.bound / 2 && &*u != "_other" {
                    self.ended.insert(u, b);
                } else {
                    other[0] += b[0];
                    other[1] += b[1];
                }
            }
            self.ended.insert("_other".into(), other);
        }
    }
}

impl Core {
    /// Writes the pins that could not be written before (the map may have room now).
    fn pin_again(&mut self) {
        if self.unpinned.is_empty() {
            return;
        }
        let flow_pins = &mut self.flow_pins;
        self.unpinned.retain(|five_tuple, group| {
            let Some(Some(pins)) = flow_pins.get_mut(*group) else { return false };
            pins.pin(&FlowKey::new(five_tuple.client, five_tuple.listener.ip())).is_err()
        });
    }

    /// Closes the TCP and TLS listeners and takes `listeners` instead.
    fn replace_stream_listeners(
        &mut self,
        listeners: Vec<(TcpListener, Transport)>,
    ) -> io::Result<()> {
        for old in self.stream_listeners.drain(..) {
            let _ = self.epoll.delete(old.listener.as_raw_fd());
        }
        for (i, (listener, transport)) in listeners.into_iter().enumerate() {
            listener.set_nonblocking(true)?;
            self.epoll.add(listener.as_raw_fd(), Source::StreamListener(i as u32).token())?;
            self.stream_listeners.push(StreamListener { listener, transport });
        }
        Ok(())
    }

    /// Brings what the kernel relayed since the last read into the allocations' traffic
    /// and the worker's counters.
    pub(super) fn collect_fast_path(&mut self) {
        if let Some(fast) = &mut self.fast {
            fast.collect(&mut self.server, &self.stats);
        }
    }

    /// Publishes per-user traffic (ended and live allocations), when it is on. Twice a
    /// second, with the connection sweep: a walk over the allocations.
    fn publish_user_traffic(&mut self) {
        let Some(totals) = &self.user_traffic else { return };
        let mut sums = totals.ended.clone();
        for a in self.server.allocations() {
            let entry = sums.entry(a.quota_key.clone()).or_insert([0, 0]);
            entry[0] += a.traffic.to_peer_bytes;
            entry[1] += a.traffic.to_client_bytes;
        }
        if let Ok(mut by_worker) = totals.shared.by_worker.lock() {
            if by_worker.len() <= self.index {
                by_worker.resize_with(self.index + 1, Default::default);
            }
            by_worker[self.index] = sums;
        }
    }
}

/// How often at most a worker copies its protocol core's counters for the metrics.
const METRICS_PUBLISH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// How often the workers look for connections past their deadline.
const CONNECTION_SWEEP: std::time::Duration = std::time::Duration::from_millis(500);

/// Counts by reason for the log, `reason=n` joined by commas, or `none`.
fn by_reason(counts: impl Iterator<Item = (&'static str, u64)>) -> String {
    let text = counts
        .filter(|&(_, n)| n > 0)
        .map(|(name, n)| format!("{name}={n}"))
        .collect::<Vec<_>>()
        .join(",");
    if text.is_empty() { "none".to_owned() } else { text }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_wait_only_when_busy_and_the_pass_was_small() {
        let wait = Duration::from_micros(200);
        let mut w = BatchWait::new(wait);
        let mut now = w.since;
        // 4,000 datagrams/s: under one datagram per 200 us wait, never worth it.
        for _ in 0..100 {
            now += Duration::from_micros(500);
            assert_eq!(w.after_pass(2, now), None);
        }
        // 100,000/s: 20 per wait; small passes wait, full ones do not.
        for _ in 0..100 {
            now += Duration::from_micros(100);
            w.after_pass(10, now);
        }
        assert_eq!(w.after_pass(10, now), Some(wait));
        assert_eq!(w.after_pass(BatchWait::SMALL_PASS, now), None);
        // Turned off.
        let mut off = BatchWait::new(Duration::ZERO);
        assert_eq!(off.after_pass(10, now), None);
    }

    #[test]
    fn per_user_totals_stay_bounded_and_keep_every_byte() {
        let mut totals = UserTotals {
            ended: Default::default(),
            shared: Arc::new(crate::metrics::UserTraffic::default()),
            bound: 4,
        };
        for i in 0..50u64 {
            totals.add(&format!("user{i}"), [i, 1]);
        }
        assert!(totals.ended.len() <= 5, "{:?}", totals.ended);
        let sum = totals.ended.values().fold([0, 0], |a, b| [a[0] + b[0], a[1] + b[1]]);
        assert_eq!(sum, [(0..50).sum::<u64>(), 50]);
        // The busiest users of the last fold are still there by name.
        assert!(totals.ended.contains_key("user49"), "{:?}", totals.ended);
        assert!(totals.ended.contains_key("_other"));
    }
}
