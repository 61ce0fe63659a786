//! A worker: one OS thread, one current_thread tokio runtime, one socket of every listener
//! group, its own protocol state, and one epoll set watched by the runtime.
//!
//! The per-packet path (receive batch, hand each datagram to the protocol core, send what
//! it returns) takes no lock, touches no shared map and does not allocate.

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
    time::Instant,
};

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::{io::unix::AsyncFd, sync::watch};
use tracing::{debug, info_span, warn};

use crate::{epoll::Epoll, protocol::Protocol};

/// Largest datagram (or GRO batch of datagrams) one receive buffer holds.
const RECV_BUFFER_BYTES: usize = 64 * 1024;
/// Datagrams answered per socket before the next ready socket gets its turn.
const BATCHES_PER_TURN: usize = 4;
/// Epoll events fetched at once.
const EVENTS: usize = 64;

/// What the control thread asks of the workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    /// Stop as soon as possible.
    Stop,
}

/// Counters a worker publishes for the control thread. Each field has one writer (its
/// worker), which stores with `Relaxed`; readers sum over workers.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct WorkerStats {
    /// Datagrams received on listener sockets.
    pub client_datagrams: AtomicU64,
    /// Datagrams received on listener sockets that were dropped (malformed, unknown).
    pub client_dropped: AtomicU64,
    /// Live allocations of this worker.
    pub allocations: AtomicU64,
}

impl WorkerStats {
    fn bump(counter: &AtomicU64, by: u64) {
        // Single writer: a plain load/store pair, no locked read-modify-write.
        counter.store(counter.load(Ordering::Relaxed).wrapping_add(by), Ordering::Relaxed);
    }
}

/// What a worker is given when it starts.
pub struct WorkerSetup {
    pub index: usize,
    /// One socket per listener group, in group order.
    pub listeners: Vec<UdpSocket>,
    pub protocol: Protocol,
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

struct Worker {
    listeners: Vec<Listener>,
    protocol: Protocol,
    stats: Arc<WorkerStats>,
    state: watch::Receiver<RunState>,
    epoll: Rc<AsyncFd<Epoll>>,
    recv_buffers: Vec<Box<[u8]>>,
    out: Box<[u8]>,
    io_errors: RateLimitedLog,
}

/// Token of listener `i` in the epoll set (relay sockets use tokens from `1 << 32` up).
fn listener_token(i: usize) -> u64 {
    i as u64
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
        Ok(Self {
            listeners,
            protocol: setup.protocol,
            stats: setup.stats,
            state: setup.state,
            // SAFETY: `Epoll` owns its fd and never replaces or closes it while it lives.
            epoll: Rc::new(unsafe {
                AsyncFd::register_with_interest(epoll, tokio::io::Interest::READABLE)
                    .map_err(|e| e.into_parts().1)?
            }),
            recv_buffers: (0..quinn_udp::BATCH_SIZE)
                .map(|_| vec![0u8; RECV_BUFFER_BYTES].into_boxed_slice())
                .collect(),
            out: vec![0u8; RECV_BUFFER_BYTES].into_boxed_slice(),
            io_errors: RateLimitedLog::default(),
        })
    }

    async fn run(mut self) -> anyhow::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS];
        let epoll = Rc::clone(&self.epoll);
        loop {
            if *self.state.borrow() == RunState::Stop {
                debug!("worker stopping");
                return Ok(());
            }
            tokio::select! {
                changed = self.state.changed() => {
                    if changed.is_err() {
                        // The control thread is gone: nothing will ever stop us otherwise.
                        return Ok(());
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
                        self.on_readable(event.u64);
                    }
                }
            }
        }
    }

    fn on_readable(&mut self, token: u64) {
        let index = token as usize;
        if index < self.listeners.len() {
            self.drain_listener(index);
        }
    }

    /// Receives up to `BATCHES_PER_TURN` batches from listener `index` and answers them.
    fn drain_listener(&mut self, index: usize) {
        let mut meta = [RecvMeta::default(); quinn_udp::BATCH_SIZE];
        for _ in 0..BATCHES_PER_TURN {
            let listener = &self.listeners[index];
            let received = {
                let mut buffers = self.recv_buffers.iter_mut();
                let mut iovs: [IoSliceMut<'_>; quinn_udp::BATCH_SIZE] = std::array::from_fn(|_| {
                    IoSliceMut::new(buffers.next().map_or(&mut [][..], |b| &mut b[..]))
                });
                listener.state.recv((&listener.socket).into(), &mut iovs, &mut meta)
            };
            let count = match received {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    self.io_errors.log("listener receive", &e);
                    return;
                }
            };
            let now = Instant::now();
            for (m, buf) in meta.iter().zip(self.recv_buffers.iter()).take(count) {
                let stride = m.stride.max(1);
                for datagram in buf[..m.len].chunks(stride) {
                    WorkerStats::bump(&self.stats.client_datagrams, 1);
                    let local = match m.dst_ip {
                        Some(ip) => SocketAddr::new(ip, self.listeners[index].local.port()),
                        None => self.listeners[index].local,
                    };
                    let reply = self.protocol.handle_client_datagram(
                        now,
                        local,
                        m.addr,
                        datagram,
                        &mut self.out,
                    );
                    match reply {
                        Some(len) => {
                            let listener = &self.listeners[index];
                            let transmit = Transmit {
                                destination: m.addr,
                                ecn: None,
                                contents: &self.out[..len],
                                segment_size: None,
                                src_ip: m.dst_ip,
                            };
                            if let Err(e) =
                                listener.state.try_send((&listener.socket).into(), &transmit)
                            {
                                self.io_errors.log("listener send", &e);
                            }
                        }
                        None => WorkerStats::bump(&self.stats.client_dropped, 1),
                    }
                }
            }
        }
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
