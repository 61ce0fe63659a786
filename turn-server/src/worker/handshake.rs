//! TLS handshakes, off the relay path: one thread of its own, at a lower scheduling
//! priority than the workers, runs every TLS handshake, so that a flood of ClientHellos
//! (each costs a key exchange and a signature, a few hundred microseconds) takes no time
//! from the workers' UDP relaying. A worker that accepts a TLS connection hands it here;
//! once the handshake is done the connection goes back to that worker's inbox
//! ([`super::Command::Handshaken`]) and lives there as every other connection does.
//!
//! Bounded: at most `max_in_flight` handshakes at once (the oldest is closed to make room
//! for a new one, so a flood cannot keep a real client out for longer than it takes to
//! cycle through them), each with the handshake deadline; every close is counted by its
//! reason and gives the connection's limits back.

use std::{
    collections::VecDeque,
    io::{self, Write},
    net::TcpStream,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use turn_proto::server::FiveTuple;

use super::{Command, Inbox, bump, stream::CloseReason};
use crate::{epoll::Epoll, shared::ConnectionLimits};

/// A connection accepted on a TLS listener, its handshake not begun.
#[derive(Debug)]
pub struct Pending {
    pub stream: TcpStream,
    pub five_tuple: FiveTuple,
    pub accepted_at: Instant,
    /// The worker that accepted it, and gets it back.
    pub worker: usize,
}

/// A connection whose TLS handshake is complete, for its worker.
pub struct Handshaken {
    pub stream: TcpStream,
    pub tls: Box<rustls::ServerConnection>,
    pub five_tuple: FiveTuple,
    pub accepted_at: Instant,
    /// TLS bytes for the client not yet written (session tickets, say).
    pub unwritten: Vec<u8>,
}

impl std::fmt::Debug for Handshaken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshaken").field("five_tuple", &self.five_tuple).finish_non_exhaustive()
    }
}

/// What the handshake thread counts (one writer: that thread).
#[derive(Debug, Default)]
pub struct HandshakeStats {
    /// Handshakes in progress now.
    pub in_flight: AtomicU64,
    /// Handshakes completed and handed to a worker.
    pub completed: AtomicU64,
    /// Connections closed during their handshake, by [`CloseReason`].
    pub closes: [AtomicU64; CloseReason::COUNT],
}

/// The workers' handle on the handshake thread.
#[derive(Clone, Debug)]
pub struct Handshakes {
    tx: SyncSender<Pending>,
    wake: Arc<OwnedFd>,
}

impl Handshakes {
    /// Hands a connection over; gives it back when the thread's queue is full.
    pub fn submit(&self, pending: Pending) -> Result<(), Pending> {
        match self.tx.try_send(pending) {
            Ok(()) => {
                wake(&self.wake);
                Ok(())
            }
            Err(TrySendError::Full(p) | TrySendError::Disconnected(p)) => Err(p),
        }
    }
}

fn wake(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to our eventfd; EAGAIN means a wake-up is
    // pending anyway.
    unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

/// What the handshake thread is given.
pub struct HandshakeSetup {
    pub tls: Arc<rustls::ServerConfig>,
    pub timeout: Duration,
    pub max_in_flight: usize,
    pub limits: Arc<ConnectionLimits>,
    pub inboxes: Arc<[Inbox]>,
    pub stats: Arc<HandshakeStats>,
}

/// How far below the workers the handshake thread runs (a nice value: 10 gets about a
/// tenth of a core that a worker also wants).
const NICE: libc::c_int = 10;
/// Connections waiting to be picked up by the thread, at most.
const QUEUE: usize = 1024;
const WAKE_TOKEN: u64 = u64::MAX;
const SWEEP: Duration = Duration::from_millis(200);

/// Starts the handshake thread. It stops when every [`Handshakes`] handle is dropped
/// (the workers have stopped), closing what is still in progress.
pub fn spawn(setup: HandshakeSetup) -> io::Result<(Handshakes, JoinHandle<()>)> {
    // SAFETY: eventfd(2) with constant flags; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
    let (tx, rx) = sync_channel(QUEUE);
    let epoll = Epoll::new()?;
    epoll.add(wake.as_raw_fd(), WAKE_TOKEN)?;
    let thread_wake = Arc::clone(&wake);
    let handle = std::thread::Builder::new().name("tls-handshakes".into()).spawn(move || {
        // SAFETY: setpriority on this thread's own id (PRIO_PROCESS with a tid names one
        // thread on Linux); raising one's nice value needs no privilege.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, NICE);
        }
        Thread {
            setup,
            epoll,
            rx,
            wake: thread_wake,
            slots: Vec::new(),
            free: Vec::new(),
            order: VecDeque::new(),
            serial: 0,
        }
        .run();
    })?;
    Ok((Handshakes { tx, wake }, handle))
}

struct InProgress {
    stream: TcpStream,
    tls: Box<rustls::ServerConnection>,
    five_tuple: FiveTuple,
    accepted_at: Instant,
    worker: usize,
    /// Which handshake this is (slots are reused).
    serial: u64,
    /// TLS bytes not yet written.
    wbuf: Vec<u8>,
    /// Watched for writability (the socket refused some of `wbuf`).
    writing: bool,
}

struct Thread {
    setup: HandshakeSetup,
    epoll: Epoll,
    rx: Receiver<Pending>,
    wake: Arc<OwnedFd>,
    slots: Vec<Option<InProgress>>,
    free: Vec<usize>,
    /// Slots in the order their handshakes began, with their serial (entries of
    /// handshakes since done or closed are skipped when met).
    order: VecDeque<(usize, u64)>,
    serial: u64,
}

const READ: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
const READ_WRITE: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLOUT) as u32;

impl Thread {
    fn run(mut self) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        let mut next_sweep = Instant::now() + SWEEP;
        loop {
            let timeout = next_sweep.saturating_duration_since(Instant::now());
            let n = self.epoll.wait(&mut events, timeout.as_millis() as i32 + 1).unwrap_or(0);
            for event in &events[..n] {
                let token = event.u64;
                if token == WAKE_TOKEN {
                    let mut buf = [0u8; 8];
                    // SAFETY: reads at most 8 bytes into a live buffer.
                    unsafe { libc::read(self.wake.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
                } else {
                    self.drive(token as usize);
                }
            }
            // New connections, or none ever again (every worker has stopped).
            if !self.take_new() {
                self.close_all();
                return;
            }
            let now = Instant::now();
            if now >= next_sweep {
                self.sweep(now);
                next_sweep = now + SWEEP;
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Takes the connections the workers handed over; false once they are all gone.
    fn take_new(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(pending) => self.start(pending),
                Err(std::sync::mpsc::TryRecvError::Empty) => return true,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn start(&mut self, p: Pending) {
        let ip = p.five_tuple.client.ip();
        // Full: the oldest handshake makes room (a flood cycles, a real client gets in).
        while self.setup.max_in_flight > 0 && self.in_flight() >= self.setup.max_in_flight {
            let Some((slot, _)) = self.oldest() else { break };
            self.order.pop_front();
            self.close(slot, CloseReason::Evicted);
        }
        let tls = match rustls::ServerConnection::new(Arc::clone(&self.setup.tls)) {
            Ok(tls) => Box::new(tls),
            Err(_) => {
                self.setup.limits.release(ip, false);
                self.count(CloseReason::TlsError);
                return;
            }
        };
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        if self.epoll.add_with(p.stream.as_raw_fd(), slot as u64, READ).is_err() {
            self.free.push(slot);
            self.setup.limits.release(ip, false);
            self.count(CloseReason::IoError);
            return;
        }
        self.serial += 1;
        self.slots[slot] = Some(InProgress {
            stream: p.stream,
            tls,
            five_tuple: p.five_tuple,
            accepted_at: p.accepted_at,
            worker: p.worker,
            serial: self.serial,
            wbuf: Vec::new(),
            writing: false,
        });
        self.order.push_back((slot, self.serial));
        self.publish();
        // The ClientHello may be waiting already.
        self.drive(slot);
    }

    /// Reads, handshakes and writes what connection `slot` allows now.
    fn drive(&mut self, slot: usize) {
        let Some(Some(h)) = self.slots.get_mut(slot) else { return };
        let mut closed = false;
        loop {
            match h.tls.read_tls(&mut h.stream) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    closed = true;
                    break;
                }
            }
            if h.tls.process_new_packets().is_err() {
                // The alert rustls queued goes out if the socket takes it.
                while h.tls.wants_write() && h.tls.write_tls(&mut h.wbuf).is_ok_and(|n| n > 0) {}
                let _ = h.stream.write(&h.wbuf);
                self.close(slot, CloseReason::TlsError);
                return;
            }
            if !h.tls.is_handshaking() {
                break;
            }
        }
        while h.tls.wants_write() && h.tls.write_tls(&mut h.wbuf).is_ok_and(|n| n > 0) {}
        let mut written = 0;
        while written < h.wbuf.len() {
            match h.stream.write(&h.wbuf[written..]) {
                Ok(0) => break,
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        h.wbuf.drain(..written);
        if closed {
            self.close(slot, CloseReason::PeerClosed);
            return;
        }
        if !h.tls.is_handshaking() {
            self.hand_over(slot);
            return;
        }
        let want = if h.wbuf.is_empty() { READ } else { READ_WRITE };
        let writing = !h.wbuf.is_empty();
        if writing != h.writing {
            h.writing = writing;
            let _ = self.epoll.modify(h.stream.as_raw_fd(), slot as u64, want);
        }
    }

    /// The handshake of `slot` is done: the connection goes to its worker.
    fn hand_over(&mut self, slot: usize) {
        let Some(h) = self.slots.get_mut(slot).and_then(Option::take) else { return };
        self.free.push(slot);
        let _ = self.epoll.delete(h.stream.as_raw_fd());
        let ip = h.five_tuple.client.ip();
        let worker = h.worker;
        let done = Handshaken {
            stream: h.stream,
            tls: h.tls,
            five_tuple: h.five_tuple,
            accepted_at: h.accepted_at,
            unwritten: h.wbuf,
        };
        let sent = self
            .setup
            .inboxes
            .get(worker)
            .map(|inbox| inbox.try_send(Command::Handshaken(Box::new(done))));
        if matches!(sent, Some(Ok(()))) {
            bump(&self.setup.stats.completed, 1);
        } else {
            // The worker's inbox is full (or it stopped): the connection is dropped.
            self.setup.limits.release(ip, false);
            self.count(CloseReason::IoError);
        }
        self.publish();
    }

    fn close(&mut self, slot: usize, reason: CloseReason) {
        let Some(h) = self.slots.get_mut(slot).and_then(Option::take) else { return };
        self.free.push(slot);
        let _ = self.epoll.delete(h.stream.as_raw_fd());
        self.setup.limits.release(h.five_tuple.client.ip(), false);
        self.count(reason);
        self.publish();
    }

    /// The oldest handshake in progress (at the front of `order`, once the entries of
    /// those done or closed since are dropped): its slot and when it was accepted.
    fn oldest(&mut self) -> Option<(usize, Instant)> {
        while let Some(&(slot, serial)) = self.order.front() {
            match self.slots.get(slot).and_then(Option::as_ref) {
                Some(h) if h.serial == serial => return Some((slot, h.accepted_at)),
                _ => {
                    self.order.pop_front();
                }
            }
        }
        None
    }

    /// Closes the handshakes past their deadline (the oldest first: `order` is by age).
    fn sweep(&mut self, now: Instant) {
        while let Some((slot, accepted_at)) = self.oldest() {
            if now.saturating_duration_since(accepted_at) < self.setup.timeout {
                break;
            }
            self.order.pop_front();
            self.close(slot, CloseReason::HandshakeTimeout);
        }
    }

    fn close_all(&mut self) {
        for slot in 0..self.slots.len() {
            self.close(slot, CloseReason::Shutdown);
        }
        let stats = &self.setup.stats;
        tracing::info!(
            completed = stats.completed.load(Ordering::Relaxed),
            closes = %super::by_reason(
                CloseReason::ALL
                    .iter()
                    .map(|r| r.name())
                    .zip(stats.closes.iter().map(|n| n.load(Ordering::Relaxed)))
            ),
            "handshake thread stopped"
        );
    }

    fn count(&self, reason: CloseReason) {
        if let Some(counter) = self.setup.stats.closes.get(reason as usize) {
            bump(counter, 1);
        }
    }

    fn publish(&self) {
        self.setup.stats.in_flight.store(self.in_flight() as u64, Ordering::Relaxed);
    }
}
