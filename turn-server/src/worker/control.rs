//! What reaches a worker through its one command channel besides hand-offs: the control
//! thread's questions and orders (list the allocations, end some, take a new
//! configuration). All rare, all on the cold path.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::Arc,
    time::Instant,
};

use serde::{Deserialize, Serialize};
use tokio::sync::{
    mpsc::{self, error::TrySendError},
    oneshot,
};
use turn_proto::server::{Allocation, Host, Server, ServerConfig};

use super::{Core, Handoff, stream::CloseReason};
use crate::relay::Relays;

/// A message to a worker.
#[derive(Debug)]
pub enum Command {
    /// A datagram for one of its allocations that another worker received.
    Handoff(Handoff),
    /// Datagrams relays of another worker sent to relays of this one (relay to relay).
    Relayed(super::sink::Internal),
    /// List its allocations.
    Allocations(oneshot::Sender<Vec<AllocationInfo>>),
    /// End the allocations of `user` and/or from `client` (at least one is set).
    Kick { user: Option<String>, client: Option<SocketAddr>, reply: oneshot::Sender<usize> },
    /// Check and stage a new configuration (reload, first half); answers with the error,
    /// if any. Nothing changes until [`Command::Commit`].
    Prepare(Box<ServerConfig>, oneshot::Sender<Result<(), String>>),
    /// Apply the staged configuration (every worker prepared it).
    Commit,
    /// Forget the staged configuration (some worker could not prepare it).
    Abort,
    /// A TLS connection this worker accepted, its handshake done.
    Handshaken(Box<super::handshake::Handshaken>),
    /// The host's own addresses changed: the peer rules take the new list.
    OwnAddresses(Arc<Vec<std::net::IpAddr>>),
    /// A new generation serves (Some): hand it the client datagrams of flows this worker
    /// has no allocation for. None: this process serves new flows again. Answered once
    /// in effect.
    Successor(Option<Arc<crate::daemon::upgrade::Successor>>, oneshot::Sender<()>),
    /// Replace the TCP and TLS listeners (none: stop accepting; the kernel migrates
    /// their queued connections once every handle on them is closed). Answered once done.
    StreamListeners(
        Vec<(std::net::TcpListener, turn_proto::server::Transport)>,
        oneshot::Sender<()>,
    ),
}

/// A worker's command channel, and the eventfd in its epoll set that wakes it: every
/// send is followed by a wake-up, since the worker sleeps in `epoll_wait`, not in an async
/// runtime.
#[derive(Clone, Debug)]
pub struct Inbox {
    tx: mpsc::Sender<Command>,
    wake: Arc<OwnedFd>,
}

/// The worker's side of its [`Inbox`].
pub struct InboxReceiver {
    pub(super) rx: mpsc::Receiver<Command>,
    pub(super) wake: Arc<OwnedFd>,
}

impl Inbox {
    /// A channel holding at most `capacity` commands.
    pub fn channel(capacity: usize) -> io::Result<(Inbox, InboxReceiver)> {
        // SAFETY: eventfd(2) with constant flags; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let (tx, rx) = mpsc::channel(capacity);
        Ok((Inbox { tx, wake: Arc::clone(&wake) }, InboxReceiver { rx, wake }))
    }

    /// Sends, waiting for room.
    pub async fn send(&self, command: Command) -> Result<(), mpsc::error::SendError<Command>> {
        self.tx.send(command).await?;
        self.wake();
        Ok(())
    }

    /// Sends if there is room.
    pub fn try_send(&self, command: Command) -> Result<(), TrySendError<Command>> {
        self.tx.try_send(command)?;
        self.wake();
        Ok(())
    }

    /// Commands waiting.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Wakes the worker (to look at its inbox and its run state).
    pub fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd. A full counter
        // (EAGAIN) means the worker has a wake-up pending anyway.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

impl InboxReceiver {
    /// Clears the pending wake-up (before the worker looks at its inbox).
    pub(super) fn clear_wake(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live buffer; EAGAIN (nothing pending) is
        // fine.
        unsafe { libc::read(self.wake.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    }
}

/// One allocation as the admin API lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AllocationInfo {
    pub worker: usize,
    pub user: String,
    pub client: String,
    pub listener: String,
    pub transport: String,
    pub relayed: Vec<String>,
    pub age_secs: u64,
    pub lifetime_left_secs: u64,
    pub to_peer_packets: u64,
    pub to_peer_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
    /// Its active channels, and which path relays each.
    #[serde(default)]
    pub channels: Vec<ChannelInfo>,
}

/// An active channel of an allocation, as the admin API lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChannelInfo {
    pub channel: u16,
    pub peer: String,
    /// `kernel` (the fast path relays its ChannelData) or `user` (the worker does).
    pub path: String,
}

impl AllocationInfo {
    fn of(
        worker: usize,
        a: &Allocation,
        now: Instant,
        in_kernel: impl Fn(u16) -> bool,
    ) -> AllocationInfo {
        AllocationInfo {
            worker,
            user: a.username.to_string(),
            client: a.five_tuple.client.to_string(),
            listener: a.five_tuple.listener.to_string(),
            transport: a.five_tuple.transport.name().to_owned(),
            relayed: a.relays.iter().flatten().map(|r| r.addr.to_string()).collect(),
            age_secs: now.saturating_duration_since(a.created_at).as_secs(),
            lifetime_left_secs: a.expires_at.saturating_duration_since(now).as_secs(),
            to_peer_packets: a.traffic.to_peer_packets,
            to_peer_bytes: a.traffic.to_peer_bytes,
            to_client_packets: a.traffic.to_client_packets,
            to_client_bytes: a.traffic.to_client_bytes,
            channels: a
                .channels
                .iter()
                .filter(|c| c.expires_at > now)
                .map(|c| ChannelInfo {
                    channel: c.number,
                    peer: c.peer.to_string(),
                    path: if in_kernel(c.number) { "kernel" } else { "user" }.to_owned(),
                })
                .collect(),
        }
    }
}

impl Core {
    /// Carries out one command.
    pub(super) fn on_command(&mut self, command: Command) {
        match command {
            Command::Handoff(handoff) => self.on_handoff(handoff),
            Command::Successor(successor, done) => {
                self.successor = successor;
                let _ = done.send(());
            }
            Command::StreamListeners(listeners, done) => {
                if let Err(e) = self.replace_stream_listeners(listeners) {
                    tracing::warn!(error = %e, "replacing the TCP/TLS listeners failed");
                }
                let _ = done.send(());
            }
            Command::Relayed(batch) => {
                self.relay_in(batch);
            }
            Command::Allocations(reply) => {
                // What the kernel relayed up to now, in the traffic listed.
                self.collect_fast_path();
                let now = Instant::now();
                let fast = self.fast.as_ref();
                let list = self
                    .server
                    .allocations()
                    .map(|a| {
                        let ft = a.five_tuple;
                        AllocationInfo::of(self.index, a, now, |channel| {
                            fast.is_some_and(|f| f.relays(&ft, channel))
                        })
                    })
                    .collect();
                let _ = reply.send(list);
            }
            Command::Kick { user, client, reply } => {
                let _ = reply.send(self.kick(user.as_deref(), client));
            }
            Command::Prepare(mut config, reply) => {
                // The worker keeps its own seed (decoy keys, transaction ids).
                config.seed = self.server.config().seed;
                let outcome = match Server::prepare(*config) {
                    Ok(prepared) => {
                        self.staged = Some(prepared);
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                };
                let _ = reply.send(outcome);
            }
            Command::Commit => {
                if let Some(prepared) = self.staged.take() {
                    self.server.apply(prepared);
                }
            }
            Command::Abort => self.staged = None,
            Command::Handshaken(done) => self.on_handshaken(*done),
            Command::OwnAddresses(own) => self.server.set_own_addresses(own.to_vec()),
        }
    }

    /// Ends the allocations of `user` and/or `client`; a TCP or TLS client's connection
    /// is closed too (its allocation lived on it).
    fn kick(&mut self, user: Option<&str>, client: Option<SocketAddr>) -> usize {
        // A user's allocations are those under its name and those it is charged for (REST
        // usernames `expiry:user`, as quotas and metrics count them).
        let chosen = |a: &Allocation| {
            (user.is_some() || client.is_some())
                && user.is_none_or(|u| &*a.username == u || &*a.quota_key == u)
                && client.is_none_or(|c| a.five_tuple.client == c)
        };
        let connections: Vec<_> = self
            .server
            .allocations()
            .filter(|a| chosen(a) && a.five_tuple.transport.is_stream())
            .map(|a| a.conn)
            .collect();
        let now = Instant::now();
        let mut relays = Relays { pool: &mut self.pool, epoll: &self.epoll };
        let ended = self.server.end_allocations(
            now,
            chosen,
            &mut Host { relays: &mut relays, quota: &*self.quota },
        );
        for conn in connections {
            if let Some(slot) = self.sink.connections.slot_of(conn) {
                self.close_connection(slot, CloseReason::Kicked, now);
            }
        }
        ended
    }
}
