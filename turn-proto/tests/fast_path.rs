//! The kernel fast path's bindings ([`Server::poll_fast_path`]): announced exactly while
//! the userspace path relays ChannelData both ways, in the deterministic harness.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use turn_proto::server::{FastBinding, FastPathChange, ServerConfig, Transport};
use turn_proto::stun::attr::Attribute;
use turn_proto::stun::{Class, Family, Method};

const PEER: &str = "198.51.100.20:5000";
const PEER2: &str = "198.51.100.21:6000";

fn fast_config() -> ServerConfig {
    ServerConfig { fast_path: true, ..test_config() }
}

fn allocated(sim: &mut Sim, addr: &str) -> Client {
    let mut c = Client::alice(addr);
    let r = c.allocate(sim);
    assert_eq!(r.class(), Class::SuccessResponse, "{:?}", r.error_code());
    c
}

/// What a kernel map would hold after applying every change so far, keyed by client,
/// channel and peer; an `Up` of a binding already present must only move its expiry.
#[derive(Default)]
struct Kernel {
    entries: HashMap<(SocketAddr, u16, SocketAddr), FastBinding>,
    ups: usize,
    downs: usize,
}

impl Kernel {
    fn apply(&mut self, sim: &mut Sim) {
        while let Some(change) = sim.server.poll_fast_path() {
            match change {
                FastPathChange::Up(b) => {
                    self.ups += 1;
                    let key = (b.five_tuple.client, b.channel, b.peer);
                    if let Some(old) = self.entries.get(&key) {
                        assert!(old.same(&b), "an Up for a key re-binds it: {old:?} -> {b:?}");
                        assert_ne!(old.expires_at, b.expires_at, "an Up that changes nothing");
                    }
                    self.entries.insert(key, b);
                }
                FastPathChange::Down(b) => {
                    self.downs += 1;
                    let key = (b.five_tuple.client, b.channel, b.peer);
                    let old = self.entries.remove(&key);
                    assert_eq!(old, Some(b), "a Down for what was announced");
                }
            }
        }
    }

    /// The binding of (client, channel), when a live entry holds one at `now` (the
    /// program's own expiry check included).
    fn live(&self, client: SocketAddr, channel: u16, now: Instant) -> Option<FastBinding> {
        self.entries
            .values()
            .find(|b| b.five_tuple.client == client && b.channel == channel && b.expires_at > now)
            .copied()
    }
}

/// Asserts that the kernel's entry for (client, channel, peer) exists exactly when the
/// userspace path relays ChannelData both ways, and with the same relay.
fn assert_agrees(
    sim: &mut Sim,
    kernel: &mut Kernel,
    c: &mut Client,
    channel: u16,
    peer: SocketAddr,
) {
    kernel.apply(sim);
    let entry = kernel.live(c.addr, channel, sim.now);
    let to_peer = c.channel_data(sim, channel, b"x");
    let user_relay = match &to_peer {
        Out::ToPeer { relay, peer: p, .. } => {
            assert_eq!(*p, peer);
            Some(*relay)
        }
        _ => None,
    };
    assert_eq!(entry.map(|b| b.relay.id), user_relay, "client -> peer at {:?}", entry);
    if let Some(relay) = user_relay {
        // The other way: ChannelData (not a Data indication) to the client.
        let back = sim.peer_datagram(relay, peer, b"y");
        assert_eq!(&back.client_bytes()[..2], &channel.to_be_bytes());
    }
    kernel.apply(sim);
}

#[test]
fn off_by_default_nothing_is_queued() {
    let mut sim = Sim::default();
    let mut c = allocated(&mut sim, "192.0.2.50:40000");
    assert_eq!(c.channel_bind(&mut sim, 0x4000, peer(PEER)).class(), Class::SuccessResponse);
    assert_eq!(sim.server.poll_fast_path(), None);
}

#[test]
fn a_binding_lives_from_channel_bind_to_the_earliest_expiry_and_moves_with_refreshes() {
    let mut sim = Sim::new(fast_config());
    let mut kernel = Kernel::default();
    let mut c = allocated(&mut sim, "192.0.2.50:40000");
    kernel.apply(&mut sim);
    assert!(kernel.entries.is_empty(), "an allocation alone relays nothing");
    // A permission alone: Send indications only, nothing for the fast path.
    assert_eq!(c.create_permission(&mut sim, &[peer(PEER)]).class(), Class::SuccessResponse);
    kernel.apply(&mut sim);
    assert!(kernel.entries.is_empty());

    let t0 = sim.now;
    assert_eq!(c.channel_bind(&mut sim, 0x4000, peer(PEER)).class(), Class::SuccessResponse);
    kernel.apply(&mut sim);
    let b = kernel.live(c.addr, 0x4000, sim.now).expect("bound");
    assert_eq!(b.five_tuple, sim.five_tuple(c.addr));
    assert_eq!(b.peer, peer(PEER));
    assert_eq!(b.relay.id, relay_of(&sim, &c, Family::V4));
    // Permission 300 s, channel 600 s, allocation 600 s: the permission ends it.
    assert_eq!(b.expires_at, t0 + Duration::from_secs(300));
    assert_agrees(&mut sim, &mut kernel, &mut c, 0x4000, peer(PEER));

    // A CreatePermission 100 s later moves it to 400 s.
    sim.advance(100);
    assert_eq!(c.create_permission(&mut sim, &[peer(PEER)]).class(), Class::SuccessResponse);
    kernel.apply(&mut sim);
    assert_eq!(
        kernel.live(c.addr, 0x4000, sim.now).unwrap().expires_at,
        t0 + Duration::from_secs(400)
    );
    assert_eq!(c.refresh(&mut sim, Some(3600)).class(), Class::SuccessResponse);
    kernel.apply(&mut sim);
    assert_eq!(
        kernel.live(c.addr, 0x4000, sim.now).unwrap().expires_at,
        t0 + Duration::from_secs(400)
    );

    // Just before and just after the permission's end, userspace and kernel agree.
    sim.advance(299);
    assert_agrees(&mut sim, &mut kernel, &mut c, 0x4000, peer(PEER));
    assert!(kernel.live(c.addr, 0x4000, sim.now).is_some());
    sim.advance(1);
    kernel.apply(&mut sim);
    assert!(kernel.entries.is_empty(), "the permission's end removes the entry itself");
    assert_agrees(&mut sim, &mut kernel, &mut c, 0x4000, peer(PEER));
    // A new permission revives the channel (still active until 600 s).
    assert_eq!(c.create_permission(&mut sim, &[peer(PEER)]).class(), Class::SuccessResponse);
    kernel.apply(&mut sim);
    assert_eq!(
        kernel.live(c.addr, 0x4000, sim.now).unwrap().expires_at,
        t0 + Duration::from_secs(600)
    );
    assert_agrees(&mut sim, &mut kernel, &mut c, 0x4000, peer(PEER));
    // The channel's own end (before its hold-down ends) removes the entry at once.
    sim.advance(200);
    kernel.apply(&mut sim);
    assert!(kernel.entries.is_empty(), "the channel's end: {:?}", kernel.entries);
    assert_agrees(&mut sim, &mut kernel, &mut c, 0x4000, peer(PEER));
    // Ups: the bind, the two CreatePermissions that moved it; the Refresh did not move it.
    assert_eq!((kernel.ups, kernel.downs), (3, 2));
}

#[test]
fn the_allocations_lifetime_bounds_a_binding() {
    let cfg = ServerConfig { default_allocation_lifetime_secs: 250, ..fast_config() };
    let mut sim = Sim::new(cfg);
    let mut kernel = Kernel::default();
    let t0 = sim.now;
    let mut c = allocated(&mut sim, "192.0.2.50:40000");
    assert_eq!(c.channel_bind(&mut sim, 0x4000, peer(PEER)).class(), Class::SuccessResponse);
    kernel.apply(&mut sim);
    let b = kernel.live(c.addr, 0x4000, sim.now).unwrap();
    assert_eq!(b.expires_at, t0 + Duration::from_secs(250));
    // A Refresh moves it to the permission's end.
    assert_eq!(c.refresh(&mut sim, Some(3600)).class(), Class::SuccessResponse);
    kernel.apply(&mut sim);
    let b = kernel.live(c.addr, 0x4000, sim.now).unwrap();
    assert_eq!(b.expires_at, t0 + Duration::from_secs(300));
    assert_agrees(&mut sim, &mut kernel, &mut c, 0x4000, peer(PEER));
}

#[test]
fn refresh_zero_kick_reload_and_shutdown_remove_every_entry() {
    let mut sim = Sim::new(fast_config());
    let mut kernel = Kernel::default();
    let mut a = allocated(&mut sim, "192.0.2.50:40000");
    let mut b = allocated(&mut sim, "192.0.2.51:40000");
    for c in [&mut a, &mut b] {
        assert_eq!(c.channel_bind(&mut sim, 0x4000, peer(PEER)).class(), Class::SuccessResponse);
        assert_eq!(c.channel_bind(&mut sim, 0x4001, peer(PEER2)).class(), Class::SuccessResponse);
    }
    kernel.apply(&mut sim);
    assert_eq!(kernel.entries.len(), 4);

    // Refresh 0: A's two entries go.
    assert_eq!(a.refresh(&mut sim, Some(0)).class(), Class::SuccessResponse);
    kernel.apply(&mut sim);
    assert!(kernel.entries.keys().all(|k| k.0 == b.addr), "{:?}", kernel.entries.keys());
    assert_eq!(kernel.entries.len(), 2);

    // A reload that denies PEER2 removes B's entry for it, and userspace agrees.
    let mut cfg = fast_config();
    cfg.peer_policy.deny.push(turn_proto::policy::IpNet::new(ip("198.51.100.21"), 32).unwrap());
    sim.server.reconfigure(cfg).unwrap();
    kernel.apply(&mut sim);
    assert_eq!(kernel.entries.len(), 1);
    assert_agrees(&mut sim, &mut kernel, &mut b, 0x4001, peer(PEER2));
    assert_agrees(&mut sim, &mut kernel, &mut b, 0x4000, peer(PEER));

    // An operator's kick.
    let mut c = allocated(&mut sim, "192.0.2.52:40000");
    assert_eq!(c.channel_bind(&mut sim, 0x4000, peer(PEER)).class(), Class::SuccessResponse);
    kernel.apply(&mut sim);
    assert_eq!(kernel.entries.len(), 2);
    let now = sim.now;
    let kicked = sim.server.end_allocations(
        now,
        |a| a.five_tuple.client == c.addr,
        &mut turn_proto::server::Host { relays: &mut sim.relays, quota: &sim.quota },
    );
    assert_eq!(kicked, 1);
    kernel.apply(&mut sim);
    assert_eq!(kernel.entries.len(), 1);

    // Shutdown: nothing left.
    let mut relays = std::mem::take(&mut sim.relays);
    sim.server
        .release_all(&mut turn_proto::server::Host { relays: &mut relays, quota: &sim.quota });
    kernel.apply(&mut sim);
    assert!(kernel.entries.is_empty());
}

#[test]
fn allocation_expiry_removes_its_entries() {
    let mut sim = Sim::new(fast_config());
    let mut kernel = Kernel::default();
    let mut c = allocated(&mut sim, "192.0.2.50:40000");
    assert_eq!(c.channel_bind(&mut sim, 0x4000, peer(PEER)).class(), Class::SuccessResponse);
    kernel.apply(&mut sim);
    assert_eq!(kernel.entries.len(), 1);
    sim.advance(1000);
    kernel.apply(&mut sim);
    assert!(kernel.entries.is_empty());
    assert_eq!(sim.server.allocation_count(), 0);
}

#[test]
fn dual_allocation_refresh_of_one_family_removes_that_familys_bindings() {
    let mut sim = Sim::new(fast_config());
    let mut kernel = Kernel::default();
    let mut c = Client::alice("192.0.2.50:40000");
    let r = c.request(
        &mut sim,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(17), Attribute::AdditionalAddressFamily(Family::V6)],
    );
    assert_eq!(r.class(), Class::SuccessResponse, "{:?}", r.error_code());
    let v6 = peer("[2001:db8::20]:5000");
    assert_eq!(c.channel_bind(&mut sim, 0x4000, peer(PEER)).class(), Class::SuccessResponse);
    assert_eq!(c.channel_bind(&mut sim, 0x4001, v6).class(), Class::SuccessResponse);
    kernel.apply(&mut sim);
    assert_eq!(kernel.entries.len(), 2);
    let v6_entry = kernel.live(c.addr, 0x4001, sim.now).unwrap();
    assert_eq!(v6_entry.relay.id, relay_of(&sim, &c, Family::V6));
    let r = c.request(
        &mut sim,
        Method::REFRESH,
        &[Attribute::Lifetime(0), Attribute::RequestedAddressFamily(Family::V6)],
    );
    assert_eq!(r.class(), Class::SuccessResponse, "{:?}", r.error_code());
    kernel.apply(&mut sim);
    assert_eq!(kernel.entries.len(), 1);
    assert!(kernel.live(c.addr, 0x4000, sim.now).is_some());
    assert_agrees(&mut sim, &mut kernel, &mut c, 0x4000, peer(PEER));
}

#[test]
fn stream_clients_get_no_fast_path() {
    let mut sim = Sim::new(fast_config());
    sim.transport = Transport::Tcp;
    let mut c = allocated(&mut sim, "192.0.2.50:40000");
    assert_eq!(c.channel_bind(&mut sim, 0x4000, peer(PEER)).class(), Class::SuccessResponse);
    assert_eq!(sim.server.poll_fast_path(), None);
}

#[test]
fn relay_to_relay_bindings_allowed_only_as_a_held_relay_stay_in_userspace() {
    let mut cfg = fast_config();
    let relay_ip = ip("203.0.113.1");
    cfg.peer_policy.own = vec![relay_ip];
    cfg.peer_policy.own_relays = vec![relay_ip];
    cfg.peer_policy.relay_ports = Some((49152, 65535));
    let mut sim = Sim::new(cfg);
    let mut a = allocated(&mut sim, "192.0.2.160:40000");
    let _b = allocated(&mut sim, "192.0.2.161:40000");
    let held: Vec<SocketAddr> = sim.relays.addrs.values().copied().collect();
    assert_eq!(a.channel_bind(&mut sim, 0x4000, held[1]).class(), Class::SuccessResponse);
    assert!(matches!(a.channel_data(&mut sim, 0x4000, b"to b"), Out::ToPeer { .. }));
    assert_eq!(sim.server.poll_fast_path(), None, "checked per datagram in userspace");
}
