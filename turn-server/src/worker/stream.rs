//! TCP and TLS: the worker's sockets of the TCP listener groups and the connections it
//! accepts on them (RFC 8656 §3.1: TURN over TCP and TLS-over-TCP, relaying to peers over
//! UDP). A connection stays on the worker that accepted it, for its whole life.
//!
//! Bytes read from a connection (decrypted by rustls for TLS) are cut into messages by
//! [`turn_proto::framing`] and handed to the protocol core one by one; what the core
//! sends back to a stream client is queued on its connection ([`Connections::queue`]) and
//! written once per batch. Every connection is bounded:
//!
//! * reads: at most one incomplete message (64 KiB) plus one read waits in its buffer;
//! * writes: at most `stream_write_buffer_bytes` wait; more is dropped and counted (a
//!   client that does not read loses packets, as over UDP, instead of stalling anyone);
//! * time: a TLS handshake, the first valid STUN message, the first allocation, and
//!   silence after an allocation ended each have a deadline;
//! * strangers: a connection that has no allocation yet counts against a budget of its
//!   own (in total and per source address, see [`ConnectionLimits`]); when the total is
//!   spent, the worker closes its oldest such connection to take a new one;
//! * TLS handshakes run on a thread of their own ([`super::handshake`]), not on the
//!   worker that relays UDP; the connection comes back to its worker once it is done;
//! * garbage (bytes that cannot be framed, or a first message that is not STUN) closes
//!   the connection at once.
//!
//! Every close is counted by its [`CloseReason`], and ends the connection's allocation
//! in the protocol core (its relays and quota are released).

use std::{
    collections::VecDeque,
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::Arc,
    time::{Duration, Instant},
};

use turn_proto::{
    framing::{FrameKind, Frames, frame_len},
    server::{ClientConn, ClientInput, FiveTuple, Host, Transport},
    stun::Message,
};

use super::Source;
use crate::{epoll::Epoll, relay::Relays};

/// Why a connection was closed (every close is counted under one of these).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum CloseReason {
    /// The client closed it (FIN, or TLS close_notify).
    PeerClosed,
    /// The client reset it (RST: it closed with data unread, or went away).
    Reset,
    /// A read or write failed otherwise.
    IoError,
    /// Bytes that cannot be framed, or a first message that is not a valid STUN message.
    Garbage,
    /// The TLS handshake or a record failed.
    TlsError,
    /// The TLS handshake did not complete in time.
    HandshakeTimeout,
    /// No valid STUN message in time.
    FirstMessageTimeout,
    /// No allocation in time.
    AllocationTimeout,
    /// Silent too long without an allocation (after its allocation ended).
    IdleTimeout,
    /// `max_connections` reached: refused at accept.
    TooManyConnections,
    /// `max_connections_per_ip` reached for its address: refused at accept.
    TooManyFromAddress,
    /// The budget of connections without an allocation (in total, or for its address) was
    /// spent: refused at accept.
    TooManyUnauthenticated,
    /// Closed, still without an allocation, to make room for a newer connection (the
    /// oldest goes first when the budget of such connections is spent).
    Evicted,
    /// The daemon stopped.
    Shutdown,
    /// The operator ended its allocation (`turn-server kick`).
    Kicked,
}

impl CloseReason {
    /// Number of reasons.
    pub const COUNT: usize = 15;
    /// All reasons, in index order.
    pub const ALL: [CloseReason; CloseReason::COUNT] = [
        CloseReason::PeerClosed,
        CloseReason::Reset,
        CloseReason::IoError,
        CloseReason::Garbage,
        CloseReason::TlsError,
        CloseReason::HandshakeTimeout,
        CloseReason::FirstMessageTimeout,
        CloseReason::AllocationTimeout,
        CloseReason::IdleTimeout,
        CloseReason::TooManyConnections,
        CloseReason::TooManyFromAddress,
        CloseReason::TooManyUnauthenticated,
        CloseReason::Evicted,
        CloseReason::Shutdown,
        CloseReason::Kicked,
    ];

    /// A stable snake_case name for logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            CloseReason::PeerClosed => "peer_closed",
            CloseReason::Reset => "reset",
            CloseReason::IoError => "io_error",
            CloseReason::Garbage => "garbage",
            CloseReason::TlsError => "tls_error",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::FirstMessageTimeout => "first_message_timeout",
            CloseReason::AllocationTimeout => "allocation_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::TooManyConnections => "too_many_connections",
            CloseReason::TooManyFromAddress => "too_many_from_address",
            CloseReason::TooManyUnauthenticated => "too_many_unauthenticated",
            CloseReason::Evicted => "evicted",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Kicked => "kicked",
        }
    }
}

/// How streams are served (from the configuration; shared by the workers).
#[derive(Clone, Debug)]
pub struct StreamSettings {
    /// The TLS configuration (certificate resolver included), when TLS is served.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub handshake_timeout: Duration,
    pub first_message_timeout: Duration,
    pub allocation_timeout: Duration,
    pub idle_timeout: Duration,
    /// Bytes waiting to be written, per connection, at most.
    pub write_buffer: usize,
}

/// The worker's socket of one TCP listener group (plain TCP or TLS).
pub(super) struct StreamListener {
    pub(super) listener: TcpListener,
    pub(super) transport: Transport,
}

/// Where a connection is in its life (what its deadline is for).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the first valid STUN message.
    FirstMessage,
    /// Talking STUN, no allocation yet.
    Unallocated,
    /// Has an allocation: no deadline (the allocation's lifetime rules).
    Allocated,
    /// Its allocation ended: closed after `idle_timeout` of silence.
    Ended,
}

/// One accepted connection.
pub(super) struct Connection {
    stream: TcpStream,
    tls: Option<Box<rustls::ServerConnection>>,
    pub(super) five_tuple: FiveTuple,
    accepted_at: Instant,
    phase: Phase,
    deadline: Option<Instant>,
    /// It had an allocation: it no longer counts as a stranger's.
    authenticated: bool,
    /// Bytes read (plaintext) not yet framed.
    rbuf: Vec<u8>,
    /// Bytes (TLS records, or plaintext over TCP) not yet written, from `wpos`.
    wbuf: Vec<u8>,
    wpos: usize,
    /// Registered for EPOLLOUT (the socket refused some of `wbuf`).
    waiting_writable: bool,
    /// In the dirty list (has bytes to write at the end of the batch).
    dirty: bool,
}

/// Events a connection is watched for while it has nothing to write.
const READ_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
/// ... and while the socket refused some of its bytes.
const READ_WRITE_EVENTS: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLOUT) as u32;
/// Bytes read from a socket at once.
pub(super) const READ_CHUNK: usize = 16 * 1024;
/// Reads from one connection before other sockets get a turn.
pub(super) const READS_PER_TURN: usize = 4;
/// Connections accepted from one listening socket before other sockets get a turn.
pub(super) const ACCEPTS_PER_TURN: usize = 64;
/// TCP keepalive of accepted connections: a client that vanished without a FIN (a crashed
/// host, a NAT that forgot the mapping) is found out within about two minutes, even while
/// its allocation would still live.
const KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(60))
    .with_interval(Duration::from_secs(10))
    .with_retries(5);
/// A buffer this large is given back to the allocator when it empties.
const SHRINK_ABOVE: usize = 64 * 1024;
/// What TLS adds to a record (TLS 1.3 with AES-GCM: 5 + 16 + 1; TLS 1.2: 5 + 8 + 16).
const TLS_RECORD_OVERHEAD: usize = 32;

/// What one read of a connection gave.
pub(super) enum Filled {
    /// Plaintext bytes were added to the read buffer (maybe none, for TLS records that
    /// carried only handshake or alert data). `more`: the read filled all the room it was
    /// given, so the socket may hold more; otherwise it is drained, and another read now
    /// would only cost a syscall to learn so (epoll says when more arrives).
    Data { more: bool },
    /// Nothing to read now.
    WouldBlock,
    /// The client closed its side.
    Closed,
}

impl Connection {
    /// The deadline of the current phase.
    fn phase_deadline(&self, settings: &StreamSettings, now: Instant) -> Option<Instant> {
        match self.phase {
            Phase::FirstMessage => Some(now + settings.first_message_timeout),
            Phase::Unallocated => Some(self.accepted_at + settings.allocation_timeout),
            Phase::Allocated => None,
            Phase::Ended => Some(now + settings.idle_timeout),
        }
    }

    fn enter(&mut self, phase: Phase, settings: &StreamSettings, now: Instant) {
        self.phase = phase;
        self.deadline = self.phase_deadline(settings, now);
    }

    /// Why the connection is closed when its deadline passes.
    fn timeout_reason(&self) -> CloseReason {
        match self.phase {
            Phase::FirstMessage => CloseReason::FirstMessageTimeout,
            Phase::Unallocated | Phase::Allocated => CloseReason::AllocationTimeout,
            Phase::Ended => CloseReason::IdleTimeout,
        }
    }

    /// Bytes waiting to be written.
    fn pending(&self) -> usize {
        self.wbuf.len() - self.wpos
    }

    /// Reads once from the socket into the read buffer (through rustls for TLS).
    pub(super) fn fill(&mut self, scratch: &mut [u8]) -> Result<Filled, CloseReason> {
        let Some(tls) = self.tls.as_mut() else {
            return match self.stream.read(scratch) {
                Ok(0) => Ok(Filled::Closed),
                Ok(n) => {
                    self.rbuf.extend_from_slice(&scratch[..n]);
                    Ok(Filled::Data { more: n == scratch.len() })
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Filled::WouldBlock),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(Filled::Data { more: true }),
                Err(e) => Err(io_close(&e)),
            };
        };
        let mut probe = Probe { stream: &mut self.stream, full: false };
        // Plaintext rustls decrypted before (in the handshake thread, say) may be waiting
        // even when the socket has nothing new.
        let buffered = tls.process_new_packets().is_ok_and(|s| s.plaintext_bytes_to_read() > 0);
        let eof = match tls.read_tls(&mut probe) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && !buffered => {
                return Ok(Filled::WouldBlock);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                return Ok(Filled::Data { more: true });
            }
            Err(e) => return Err(io_close(&e)),
        };
        let more = probe.full;
        if let Err(e) = tls.process_new_packets() {
            tracing::debug!(client = %self.five_tuple.client, error = %e, "TLS error");
            // rustls queued an alert for the client: try to send it, then close.
            while tls.wants_write() && tls.write_tls(&mut self.wbuf).is_ok_and(|n| n > 0) {}
            let _ = self.stream.write(&self.wbuf[self.wpos..]);
            return Err(CloseReason::TlsError);
        }
        let mut closed = eof;
        loop {
            match tls.reader().read(scratch) {
                Ok(0) => {
                    closed = true; // close_notify
                    break;
                }
                Ok(n) => self.rbuf.extend_from_slice(&scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    closed = true; // TCP closed without close_notify
                    break;
                }
            }
        }
        // Post-handshake messages (a KeyUpdate answer, say) to send.
        while tls.wants_write() {
            match tls.write_tls(&mut self.wbuf) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        Ok(if closed { Filled::Closed } else { Filled::Data { more } })
    }
}

/// A socket read that notes whether it filled the buffer it was given.
struct Probe<'a> {
    stream: &'a mut TcpStream,
    full: bool,
}

impl Read for Probe<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.stream.read(buf)?;
        self.full = n == buf.len();
        Ok(n)
    }
}

/// Why a failed read or write closes a connection.
fn io_close(e: &io::Error) -> CloseReason {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => CloseReason::Reset,
        _ => CloseReason::IoError,
    }
}

/// The connections of one worker: a slab whose slot and generation make the
/// `ClientConn` the protocol core names them by.
pub(super) struct Connections {
    slots: Vec<Option<Connection>>,
    generations: Vec<u32>,
    free: Vec<u32>,
    live: usize,
    /// Slots with bytes to write at the end of the batch.
    dirty: Vec<u32>,
    /// Connections without an allocation yet, oldest first, by slot and generation:
    /// those that have not sent a valid STUN message, and those that have (logging in).
    /// Entries of connections closed, authenticated or moved on since are skipped when met.
    silent: VecDeque<(u32, u32)>,
    talking: VecDeque<(u32, u32)>,
    /// Bytes waiting to be written, per connection, at most.
    write_buffer: usize,
    /// Messages dropped because a connection's write buffer was full.
    pub(super) write_drops: u64,
}

/// The `ClientConn` of connection `slot` in generation `generation`.
fn conn_id(slot: u32, generation: u32) -> ClientConn {
    ClientConn(u64::from(generation) << 32 | u64::from(slot))
}

fn slot_of(conn: ClientConn) -> (u32, u32) {
    ((conn.0 & 0xffff_ffff) as u32, (conn.0 >> 32) as u32)
}

impl Connections {
    pub(super) fn new(settings: &StreamSettings) -> Connections {
        Connections {
            slots: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            live: 0,
            dirty: Vec::new(),
            silent: VecDeque::new(),
            talking: VecDeque::new(),
            write_buffer: settings.write_buffer,
            write_drops: 0,
        }
    }

    /// Live connections.
    pub(super) fn len(&self) -> usize {
        self.live
    }

    /// Registers an accepted connection in `epoll` (TCP, or TLS with its handshake done
    /// and the TLS bytes not yet written); returns its slot and `ClientConn`.
    pub(super) fn insert(
        &mut self,
        epoll: &Epoll,
        stream: TcpStream,
        tls: Option<(Box<rustls::ServerConnection>, Vec<u8>)>,
        five_tuple: FiveTuple,
        accepted_at: Instant,
        now: (Instant, &StreamSettings),
    ) -> io::Result<(u32, ClientConn)> {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(None);
                self.generations.push(0);
                (self.slots.len() - 1) as u32
            }
        };
        let (tls, wbuf) = match tls {
            Some((tls, unwritten)) => (Some(tls), unwritten),
            None => (None, Vec::new()),
        };
        let events = if wbuf.is_empty() { READ_EVENTS } else { READ_WRITE_EVENTS };
        if let Err(e) = epoll.add_with(stream.as_raw_fd(), Source::Connection(slot).token(), events)
        {
            self.free.push(slot);
            return Err(e);
        }
        let mut connection = Connection {
            stream,
            tls,
            five_tuple,
            accepted_at,
            phase: Phase::FirstMessage,
            deadline: None,
            authenticated: false,
            rbuf: Vec::new(),
            waiting_writable: !wbuf.is_empty(),
            wbuf,
            wpos: 0,
            dirty: false,
        };
        let (now, settings) = now;
        connection.enter(Phase::FirstMessage, settings, now);
        self.slots[slot as usize] = Some(connection);
        self.live += 1;
        let generation = self.generations[slot as usize];
        self.silent.push_back((slot, generation));
        Ok((slot, conn_id(slot, generation)))
    }

    /// The connection without an allocation to close first when the strangers' budget is
    /// spent (its slot): the oldest of those that have sent nothing valid yet (what a flood
    /// of idle connections is), else the oldest of those logging in (a client that speaks
    /// STUN is kept over one that only holds a socket).
    pub(super) fn oldest_stranger(&mut self) -> Option<u32> {
        let (slots, generations) = (&self.slots, &self.generations);
        let current = |&(slot, generation): &(u32, u32), talking: bool| {
            generations.get(slot as usize) == Some(&generation)
                && slots
                    .get(slot as usize)
                    .and_then(Option::as_ref)
                    .is_some_and(|c| !c.authenticated && c.started() == talking)
        };
        for (queue, talking) in [(&mut self.silent, false), (&mut self.talking, true)] {
            while let Some(entry) = queue.front() {
                if current(entry, talking) {
                    return Some(entry.0);
                }
                queue.pop_front();
            }
        }
        None
    }

    /// Connection `slot` sent its first valid STUN message: it moves to the strangers
    /// logging in.
    pub(super) fn started_talking(&mut self, slot: u32) {
        if let Some(&generation) = self.generations.get(slot as usize) {
            self.talking.push_back((slot, generation));
        }
    }

    /// The connection in `slot`, with its `ClientConn`.
    pub(super) fn by_slot(&mut self, slot: u32) -> Option<(ClientConn, &mut Connection)> {
        let generation = *self.generations.get(slot as usize)?;
        let c = self.slots.get_mut(slot as usize)?.as_mut()?;
        Some((conn_id(slot, generation), c))
    }

    /// The slot of the connection a `ClientConn` names, if it is still open.
    pub(super) fn slot_of(&mut self, conn: ClientConn) -> Option<u32> {
        let (slot, _) = slot_of(conn);
        self.get_mut(conn).map(|_| slot)
    }

    /// The connection a `ClientConn` names, if it is still open.
    pub(super) fn get_mut(&mut self, conn: ClientConn) -> Option<&mut Connection> {
        let (slot, generation) = slot_of(conn);
        if *self.generations.get(slot as usize)? != generation {
            return None;
        }
        self.slots.get_mut(slot as usize)?.as_mut()
    }

    /// Takes connection `slot` out (closing it when dropped); the caller tells the protocol
    /// core and gives back its limits.
    pub(super) fn remove(&mut self, epoll: &Epoll, slot: u32) -> Option<Connection> {
        let c = self.slots.get_mut(slot as usize)?.take()?;
        let _ = epoll.delete(c.stream.as_raw_fd());
        self.generations[slot as usize] = self.generations[slot as usize].wrapping_add(1);
        self.free.push(slot);
        self.live -= 1;
        Some(c)
    }

    /// Slots of every open connection.
    pub(super) fn slots(&self) -> Vec<u32> {
        (0..self.slots.len() as u32).filter(|&s| self.slots[s as usize].is_some()).collect()
    }

    /// Queues `data` (one whole message) for the client of `conn`; dropped and counted
    /// when its write buffer has no room for it.
    pub(super) fn queue(&mut self, conn: ClientConn, data: &[u8]) {
        let limit = self.write_buffer;
        let (slot, _) = slot_of(conn);
        let Some(c) = self.get_mut(conn) else { return };
        if c.pending() + data.len() + TLS_RECORD_OVERHEAD > limit {
            self.write_drops += 1;
            return;
        }
        match c.tls.as_mut() {
            Some(tls) => {
                if tls.writer().write_all(data).is_err() {
                    self.write_drops += 1;
                    return;
                }
                while tls.wants_write() {
                    match tls.write_tls(&mut c.wbuf) {
                        Ok(n) if n > 0 => {}
                        _ => break,
                    }
                }
            }
            None => c.wbuf.extend_from_slice(data),
        }
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(slot);
        }
    }

    /// Marks `slot` as having bytes to write (TLS handshake messages after a read).
    pub(super) fn mark_dirty(&mut self, slot: u32) {
        if let Some(Some(c)) = self.slots.get_mut(slot as usize)
            && !c.dirty
            && c.pending() > 0
        {
            c.dirty = true;
            self.dirty.push(slot);
        }
    }

    /// Writes what every dirty connection has; returns the slots whose socket failed,
    /// with the reason (to be closed by the caller).
    pub(super) fn flush_dirty(&mut self, epoll: &Epoll, failed: &mut Vec<(u32, CloseReason)>) {
        let dirty = std::mem::take(&mut self.dirty);
        for &slot in &dirty {
            if let Some(Some(c)) = self.slots.get_mut(slot as usize) {
                c.dirty = false;
                if let Err(e) = flush(c, epoll, slot) {
                    failed.push((slot, io_close(&e)));
                }
            }
        }
        self.dirty = dirty;
        self.dirty.clear();
    }

    /// The socket of `slot` became writable again.
    pub(super) fn on_writable(&mut self, epoll: &Epoll, slot: u32) -> io::Result<()> {
        match self.slots.get_mut(slot as usize) {
            Some(Some(c)) => flush(c, epoll, slot),
            _ => Ok(()),
        }
    }

    /// Connections whose deadline passed, with the reason to close them.
    pub(super) fn expired(&self, now: Instant) -> Vec<(u32, CloseReason)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(slot, c)| {
                let c = c.as_ref()?;
                let due = c.deadline.is_some_and(|d| d <= now);
                due.then(|| (slot as u32, c.timeout_reason()))
            })
            .collect()
    }

    /// The protocol core created an allocation on `conn`: no deadline while it lives.
    /// Returns the client's address the first time (it no longer counts as a stranger).
    pub(super) fn allocation_created(
        &mut self,
        conn: ClientConn,
        settings: &StreamSettings,
        now: Instant,
    ) -> Option<std::net::IpAddr> {
        let c = self.get_mut(conn)?;
        c.enter(Phase::Allocated, settings, now);
        let first = !c.authenticated;
        c.authenticated = true;
        first.then(|| c.five_tuple.client.ip())
    }

    /// The allocation of `conn` ended (expired, or deleted by the client) while its
    /// connection stays: it may allocate again, or is closed after `idle_timeout` of
    /// silence.
    pub(super) fn allocation_ended(
        &mut self,
        conn: ClientConn,
        settings: &StreamSettings,
        now: Instant,
    ) {
        if let Some(c) = self.get_mut(conn) {
            c.enter(Phase::Ended, settings, now);
        }
    }
}

/// Writes as much of `c`'s buffer as the socket takes; watches for writability while
/// some is left.
fn flush(c: &mut Connection, epoll: &Epoll, slot: u32) -> io::Result<()> {
    while c.wpos < c.wbuf.len() {
        match c.stream.write(&c.wbuf[c.wpos..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => c.wpos += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let token = Source::Connection(slot).token();
    let fd = c.stream.as_raw_fd();
    if c.wpos == c.wbuf.len() {
        c.wbuf.clear();
        c.wpos = 0;
        if c.wbuf.capacity() > SHRINK_ABOVE {
            c.wbuf = Vec::new();
        }
        if c.waiting_writable {
            epoll.modify(fd, token, READ_EVENTS)?;
            c.waiting_writable = false;
        }
    } else {
        if c.wpos > SHRINK_ABOVE {
            c.wbuf.drain(..c.wpos);
            c.wpos = 0;
        }
        if !c.waiting_writable {
            epoll.modify(fd, token, READ_WRITE_EVENTS)?;
            c.waiting_writable = true;
        }
    }
    Ok(())
}

/// A message cut from a connection's stream, checked against its phase.
pub(super) enum Cut<'a> {
    /// Hand it to the protocol core.
    Message(&'a [u8]),
    /// The stream is broken (or its first message is not STUN): close it.
    Garbage,
}

/// Cuts the complete messages at the start of `rbuf`, for a connection in `phase`; calls
/// `each` for every one (stopping at the first garbage), and returns how many bytes they
/// took and whether the stream was garbage.
pub(super) fn cut_messages(
    rbuf: &[u8],
    mut started: bool,
    mut each: impl FnMut(Cut<'_>, bool),
) -> (usize, bool) {
    // A client's first message is STUN: a ChannelData header first (which is what an HTTP
    // request looks like) is garbage at once, without waiting for its claimed length.
    if !started && matches!(frame_len(rbuf), Ok(Some((FrameKind::ChannelData, _)))) {
        each(Cut::Garbage, false);
        return (0, true);
    }
    let mut frames = Frames::new(rbuf);
    for (kind, frame) in frames.by_ref() {
        let valid = match kind {
            FrameKind::Stun => Message::parse(frame).is_ok(),
            // ChannelData needs an allocation, hence an earlier STUN message.
            FrameKind::ChannelData => started,
        };
        if !valid && !started {
            each(Cut::Garbage, false);
            return (frames.consumed(), true);
        }
        let first_stun = !started && kind == FrameKind::Stun;
        started = true;
        each(Cut::Message(frame), first_stun);
    }
    if frames.error().is_some() {
        each(Cut::Garbage, false);
        return (frames.consumed(), true);
    }
    (frames.consumed(), false)
}

impl Connection {
    /// True once the connection sent a valid STUN message.
    pub(super) fn started(&self) -> bool {
        self.phase != Phase::FirstMessage
    }

    /// The first valid STUN message arrived: the allocation deadline starts.
    pub(super) fn first_message(&mut self, settings: &StreamSettings, now: Instant) {
        if self.phase == Phase::FirstMessage {
            self.enter(Phase::Unallocated, settings, now);
        }
    }

    /// Something arrived: silence after an ended allocation starts again.
    pub(super) fn heard(&mut self, settings: &StreamSettings, now: Instant) {
        if self.phase == Phase::Ended {
            self.deadline = self.phase_deadline(settings, now);
        }
    }

    /// Before the server closes the connection: a TLS close_notify, and one last
    /// non-blocking write of what is queued (answers to the messages before a close).
    pub(super) fn finish(&mut self) {
        if let Some(tls) = self.tls.as_mut() {
            tls.send_close_notify();
            while tls.wants_write() && tls.write_tls(&mut self.wbuf).is_ok_and(|n| n > 0) {}
        }
        if self.wpos < self.wbuf.len() {
            let _ = self.stream.write(&self.wbuf[self.wpos..]);
        }
    }

    /// Takes the read buffer (to frame it while the connection is borrowed elsewhere).
    pub(super) fn take_rbuf(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.rbuf)
    }

    /// Gives the read buffer back without its first `used` bytes.
    pub(super) fn put_rbuf(&mut self, mut rbuf: Vec<u8>, used: usize) {
        rbuf.drain(..used.min(rbuf.len()));
        if rbuf.is_empty() && rbuf.capacity() > SHRINK_ABOVE {
            rbuf = Vec::new();
        }
        self.rbuf = rbuf;
    }

    /// Bytes waiting to be written (handshake messages after a read, for instance).
    pub(super) fn has_output(&self) -> bool {
        self.pending() > 0
    }

    /// The client's address.
    pub(super) fn peer(&self) -> SocketAddr {
        self.five_tuple.client
    }
}

impl super::Core {
    /// Accepts the connections waiting on stream listener `index` (a bounded number per
    /// turn), within the connection limits; a TLS connection goes to the handshake thread
    /// first.
    pub(super) fn accept(&mut self, index: usize) {
        let now = Instant::now();
        for _ in 0..ACCEPTS_PER_TURN {
            let Some(listener) = self.stream_listeners.get(index) else { return };
            let transport = listener.transport;
            let (stream, peer) = match listener.listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ECONNABORTED (gone before we took it) and the like: next one.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    // EMFILE and friends: the connection stays queued; try again later.
                    self.sink.io_errors.log("accept", &e);
                    return;
                }
            };
            if let Err(reason) = self.take_slot(peer.ip(), now) {
                self.count_close(reason);
                continue; // dropping the stream closes it
            }
            let local = match stream.local_addr() {
                Ok(local) => local,
                Err(_) => {
                    self.limits.release(peer.ip(), false);
                    self.count_close(CloseReason::IoError);
                    continue;
                }
            };
            let configured = stream
                .set_nonblocking(true)
                .and_then(|()| stream.set_nodelay(true))
                .and_then(|()| socket2::SockRef::from(&stream).set_tcp_keepalive(&KEEPALIVE));
            if configured.is_err() {
                self.limits.release(peer.ip(), false);
                self.count_close(CloseReason::IoError);
                continue;
            }
            let five_tuple = FiveTuple { client: peer, listener: local, transport };
            super::bump(&self.stats.connections_accepted, 1);
            if transport == Transport::Tls {
                let pending = super::handshake::Pending {
                    stream,
                    five_tuple,
                    accepted_at: now,
                    worker: self.index,
                };
                let refused = match &self.handshakes {
                    Some(handshakes) => handshakes.submit(pending).is_err(),
                    None => true,
                };
                if refused {
                    self.limits.release(peer.ip(), false);
                    self.count_close(CloseReason::TooManyUnauthenticated);
                }
                continue;
            }
            let epoll = &self.epoll;
            let inserted = self.sink.connections.insert(
                epoll,
                stream,
                None,
                five_tuple,
                now,
                (now, &self.streams),
            );
            if let Err(e) = inserted {
                self.limits.release(peer.ip(), false);
                self.count_close(CloseReason::IoError);
                self.sink.io_errors.log("new connection", &e);
            }
        }
    }

    /// Takes a connection slot for `ip` within the limits; when the budget of connections
    /// without an allocation is spent, this worker's oldest such connection makes room.
    fn take_slot(&mut self, ip: std::net::IpAddr, now: Instant) -> Result<(), CloseReason> {
        use crate::shared::LimitReached;
        for _ in 0..2 {
            match self.limits.try_acquire(ip) {
                Ok(()) => return Ok(()),
                Err(LimitReached::Unauthenticated) => {
                    let Some(oldest) = self.sink.connections.oldest_stranger() else {
                        return Err(CloseReason::TooManyUnauthenticated);
                    };
                    self.close_connection(oldest, CloseReason::Evicted, now);
                }
                Err(LimitReached::Total) => return Err(CloseReason::TooManyConnections),
                Err(LimitReached::PerAddress) => return Err(CloseReason::TooManyFromAddress),
                Err(LimitReached::UnauthenticatedPerAddress) => {
                    return Err(CloseReason::TooManyUnauthenticated);
                }
            }
        }
        Err(CloseReason::TooManyUnauthenticated)
    }

    /// A TLS connection whose handshake the handshake thread completed: it joins this
    /// worker's connections, and what the client sent with its handshake is read now
    /// (epoll would not tell: it was read off the socket already).
    pub(super) fn on_handshaken(&mut self, done: super::handshake::Handshaken) {
        let now = Instant::now();
        let super::handshake::Handshaken { stream, tls, five_tuple, accepted_at, unwritten } = done;
        let ip = five_tuple.client.ip();
        let inserted = self.sink.connections.insert(
            &self.epoll,
            stream,
            Some((tls, unwritten)),
            five_tuple,
            accepted_at,
            (now, &self.streams),
        );
        match inserted {
            Ok((slot, _)) => self.read_connection(slot),
            Err(e) => {
                self.limits.release(ip, false);
                self.count_close(CloseReason::IoError);
                self.sink.io_errors.log("new connection", &e);
            }
        }
    }

    /// Reads connection `slot` (a bounded number of reads per turn) and hands each
    /// complete message to the protocol core.
    pub(super) fn read_connection(&mut self, slot: u32) {
        let now = Instant::now();
        let unix = super::unix_secs();
        let (mut messages, mut bytes) = (0u64, 0u64);
        let mut close = None;
        for _ in 0..READS_PER_TURN {
            let Some((conn, c)) = self.sink.connections.by_slot(slot) else { return };
            let filled = match c.fill(&mut self.read_scratch) {
                Ok(filled) => filled,
                Err(reason) => {
                    close = Some(reason);
                    break;
                }
            };
            if c.has_output() {
                self.sink.connections.mark_dirty(slot);
            }
            let Some((_, c)) = self.sink.connections.by_slot(slot) else { return };
            let (five_tuple, started) = (c.five_tuple, c.started());
            let rbuf = c.take_rbuf();
            if !rbuf.is_empty() {
                c.heard(&self.streams, now);
            }
            let mut first = false;
            let (used, garbage) = cut_messages(&rbuf, started, |cut, first_stun| {
                let Cut::Message(data) = cut else { return };
                first |= first_stun;
                messages += 1;
                bytes += data.len() as u64;
                let input = ClientInput { now, unix_secs: unix, five_tuple, conn, data };
                let mut relays = Relays { pool: &mut self.pool, epoll: &self.epoll };
                let output = self.server.handle_client_message(
                    input,
                    &mut self.out,
                    &mut Host { relays: &mut relays, quota: &*self.quota },
                );
                self.sink.send(&self.pool, output);
            });
            if let Some((_, c)) = self.sink.connections.by_slot(slot) {
                c.put_rbuf(rbuf, used);
                if first {
                    c.first_message(&self.streams, now);
                    self.sink.connections.started_talking(slot);
                }
            }
            if garbage {
                close = Some(CloseReason::Garbage);
                break;
            }
            match filled {
                Filled::Data { more: true } => {}
                Filled::Data { more: false } | Filled::WouldBlock => break,
                Filled::Closed => {
                    close = Some(CloseReason::PeerClosed);
                    break;
                }
            }
        }
        super::bump(&self.stats.packets, messages);
        self.pass_datagrams += messages;
        super::bump(&self.stats.bytes, bytes);
        if let Some(reason) = close {
            // What the connection sent goes out before its allocation (and relay) ends.
            self.sink.flush(&self.pool);
            self.close_connection(slot, reason, now);
        }
    }

    /// Closes connection `slot`: its allocation ends, its limits are given back, the close
    /// is counted.
    pub(super) fn close_connection(&mut self, slot: u32, reason: CloseReason, now: Instant) {
        let Some(mut c) = self.sink.connections.remove(&self.epoll, slot) else {
            return;
        };
        if !matches!(reason, CloseReason::Reset | CloseReason::IoError | CloseReason::TlsError) {
            c.finish();
        }
        self.limits.release(c.peer().ip(), c.authenticated);
        self.count_close(reason);
        let mut relays = Relays { pool: &mut self.pool, epoll: &self.epoll };
        self.server.handle_connection_closed(
            now,
            &c.five_tuple,
            &mut Host { relays: &mut relays, quota: &*self.quota },
        );
        tracing::debug!(
            client = %c.five_tuple.client,
            transport = c.five_tuple.transport.name(),
            reason = reason.name(),
            "connection closed"
        );
    }

    /// Closes the connections whose deadline passed.
    pub(super) fn sweep_connections(&mut self, now: Instant) {
        for (slot, reason) in self.sink.connections.expired(now) {
            self.close_connection(slot, reason, now);
        }
    }

    /// Writes what the batch queued on connections; closes those whose socket failed.
    pub(super) fn flush_connections(&mut self) {
        let mut failed = Vec::new();
        self.sink.connections.flush_dirty(&self.epoll, &mut failed);
        let now = Instant::now();
        for (slot, reason) in failed {
            self.close_connection(slot, reason, now);
        }
    }

    /// The socket of connection `slot` takes bytes again.
    pub(super) fn on_connection_writable(&mut self, slot: u32) {
        if let Err(e) = self.sink.connections.on_writable(&self.epoll, slot) {
            self.close_connection(slot, io_close(&e), Instant::now());
        }
    }

    fn count_close(&self, reason: CloseReason) {
        if let Some(counter) = self.stats.closes.get(reason as usize) {
            super::bump(counter, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn binding() -> Vec<u8> {
        use turn_proto::stun::{Class, MessageEncoder, Method, TransactionId};
        let mut buf = [0u8; 64];
        let enc =
            MessageEncoder::new(&mut buf, Method::BINDING, Class::Request, &TransactionId([1; 12]))
                .unwrap();
        let n = enc.finish();
        buf[..n].to_vec()
    }

    fn cut(stream: &[u8], started: bool) -> (Vec<String>, usize, bool) {
        let mut seen = Vec::new();
        let (used, garbage) = cut_messages(stream, started, |c, first| {
            seen.push(match c {
                Cut::Message(m) => format!("{}{}", m.len(), if first { "!" } else { "" }),
                Cut::Garbage => "garbage".into(),
            })
        });
        (seen, used, garbage)
    }

    #[test]
    fn the_first_message_must_be_stun() {
        let b = binding();
        let cd = [0x40, 0x00, 0x00, 0x01, 9, 0, 0, 0];
        // STUN first, then ChannelData: both handed on, the first marked.
        let stream = [&b[..], &cd[..]].concat();
        assert_eq!(cut(&stream, false), (vec!["20!".into(), "8".into()], 28, false));
        // ChannelData (or HTTP, which frames like it) first: garbage.
        assert_eq!(cut(b"GET / HTTP/1.1\r\n", false), (vec!["garbage".into()], 0, true));
        assert_eq!(cut(&cd, false), (vec!["garbage".into()], 0, true));
        // Once started, ChannelData is fine.
        assert_eq!(cut(&cd, true), (vec!["8".into()], 8, false));
        // Bytes that cannot be framed, after a good message.
        let broken = [&b[..], &[0xff, 0, 0, 0][..]].concat();
        assert_eq!(cut(&broken, true), (vec!["20".into(), "garbage".into()], 20, true));
        // A partial message waits.
        assert_eq!(cut(&b[..10], false), (vec![], 0, false));
    }

    #[test]
    fn conn_ids_carry_slot_and_generation() {
        assert_eq!(slot_of(conn_id(7, 3)), (7, 3));
        assert_ne!(conn_id(7, 3), conn_id(7, 4));
    }
}
