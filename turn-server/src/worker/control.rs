//! What reaches a worker through its one command channel besides hand-offs: the control
//! thread's questions and orders (list the allocations, end some, take a new
//! configuration). All rare, all on the cold path.

use std::{net::SocketAddr, time::Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use turn_proto::server::{Allocation, Host, ServerConfig};

use super::{Core, Handoff, stream::CloseReason};
use crate::relay::Relays;

/// A message to a worker.
#[derive(Debug)]
pub enum Command {
    /// A datagram for one of its allocations that another worker received.
    Handoff(Handoff),
    /// List its allocations.
    Allocations(oneshot::Sender<Vec<AllocationInfo>>),
    /// End the allocations of `user` and/or from `client` (at least one is set).
    Kick { user: Option<String>, client: Option<SocketAddr>, reply: oneshot::Sender<usize> },
    /// Take a new configuration (reload); answers with the error, if any.
    Reconfigure(Box<ServerConfig>, oneshot::Sender<Result<(), String>>),
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
}

impl AllocationInfo {
    fn of(worker: usize, a: &Allocation, now: Instant) -> AllocationInfo {
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
        }
    }
}

impl Core {
    /// Carries out one command.
    pub(super) fn on_command(&mut self, command: Command) {
        match command {
            Command::Handoff(handoff) => self.on_handoff(handoff),
            Command::Allocations(reply) => {
                let now = Instant::now();
                let list = self
                    .server
                    .allocations()
                    .map(|a| AllocationInfo::of(self.index, a, now))
                    .collect();
                let _ = reply.send(list);
            }
            Command::Kick { user, client, reply } => {
                let _ = reply.send(self.kick(user.as_deref(), client));
            }
            Command::Reconfigure(mut config, reply) => {
                // The worker keeps its own seed (rate-limiter hashing, decoy keys).
                config.seed = self.server.config().seed;
                let outcome = self.server.reconfigure(*config).map_err(|e| e.to_string());
                let _ = reply.send(outcome);
            }
        }
    }

    /// Ends the allocations of `user` and/or `client`; a TCP or TLS client's connection
    /// is closed too (its allocation lived on it).
    fn kick(&mut self, user: Option<&str>, client: Option<SocketAddr>) -> usize {
        let chosen = |a: &Allocation| {
            (user.is_some() || client.is_some())
                && user.is_none_or(|u| &*a.username == u)
                && client.is_none_or(|c| a.five_tuple.client == c)
        };
        let connections: Vec<_> = self
            .server
            .allocations()
            .filter(|a| chosen(a) && a.five_tuple.transport.is_stream())
            .map(|a| a.conn)
            .collect();
        let now = Instant::now();
        let mut relays = Relays { pool: &mut self.pool, epoll: self.epoll.get_ref() };
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
