//! The per-packet hot path through `Server`: ChannelData client -> peer
//! (parse + allocation lookup + channel/permission check + forward
//! decision), peer -> client framing (ChannelData and Data indication), and
//! Send indications. The table holds 10 000 allocations so the 5-tuple
//! lookup is a realistic hash-map hit, not a one-entry map.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::net::SocketAddr;

use common::{Client, Sim};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use turn_proto::Output;
use turn_proto::server::{ClientConn, ClientInput, Host, LocalQuota, PEER_HEADROOM, PEER_TAILROOM};
use turn_proto::stun::attr::Attribute;
use turn_proto::stun::{Class, Family, Method};

const PAYLOAD: usize = 160; // a typical audio RTP packet

fn setup() -> (Sim, Client, SocketAddr) {
    let mut sim = Sim::default();
    sim.quota = LocalQuota::new(100_000, 100_000);
    for i in 0..10_000u32 {
        let addr = format!(
            "10.{}.{}.{}:{}",
            (i >> 16) & 0xff,
            (i >> 8) & 0xff,
            i & 0xff,
            40000 + (i % 1000)
        );
        let mut c = Client::alice(&addr);
        assert_eq!(c.allocate(&mut sim).class(), Class::SuccessResponse);
    }
    let mut c = Client::alice("192.0.2.50:40000");
    assert_eq!(c.allocate(&mut sim).class(), Class::SuccessResponse);
    let peer: SocketAddr = "198.51.100.20:5000".parse().unwrap();
    // A few permissions and channels, as a browser would have.
    for (i, p) in ["198.51.100.21:1", "198.51.100.22:1", "198.51.100.23:1"].iter().enumerate() {
        let p: SocketAddr = p.parse().unwrap();
        assert_eq!(c.channel_bind(&mut sim, 0x4001 + i as u16, p).class(), Class::SuccessResponse);
    }
    assert_eq!(c.channel_bind(&mut sim, 0x4000, peer).class(), Class::SuccessResponse);
    (sim, c, peer)
}

fn bench(c: &mut Criterion) {
    let (mut sim, client, peer) = setup();
    let five_tuple = sim.five_tuple(client.addr);
    let relay = common::relay_of(&sim, &client, Family::V4);
    let payload = vec![0xABu8; PAYLOAD];

    // Client -> peer: ChannelData.
    let mut cd = vec![0u8; PAYLOAD + 4];
    turn_proto::channel_data::encode(&mut cd, 0x4000, &payload).unwrap();
    let mut out = [0u8; 2048];
    let mut g = c.benchmark_group("hot_path");
    g.throughput(Throughput::Elements(1));
    g.bench_function("channel_data_client_to_peer_decision", |b| {
        b.iter(|| {
            let input = ClientInput {
                now: sim.now,
                unix_secs: sim.unix,
                five_tuple,
                conn: ClientConn(0),
                data: black_box(&cd),
            };
            let o = sim.server.handle_client_message(
                input,
                &mut out,
                &mut Host { relays: &mut sim.relays, quota: &sim.quota },
            );
            match o {
                Output::ToPeer { relay, peer, data, .. } => black_box((relay, peer, data.len())),
                _ => panic!("not forwarded"),
            }
        })
    });

    // Peer -> client: ChannelData framing in place.
    let mut buf = vec![0u8; PEER_HEADROOM + PAYLOAD + PEER_TAILROOM];
    buf[PEER_HEADROOM..PEER_HEADROOM + PAYLOAD].copy_from_slice(&payload);
    g.bench_function("channel_data_peer_to_client_framing", |b| {
        b.iter(|| {
            let o = sim.server.handle_peer_datagram(
                sim.now,
                black_box(relay),
                black_box(peer),
                &mut buf,
                PAYLOAD,
            );
            match o {
                Output::ToClient { data, .. } => black_box(data.len()),
                _ => panic!("not framed"),
            }
        })
    });

    // Peer without a channel (permission only): Data indication.
    let other: SocketAddr = "198.51.100.21:9999".parse().unwrap();
    g.bench_function("data_indication_peer_to_client_framing", |b| {
        b.iter(|| {
            let o = sim.server.handle_peer_datagram(
                sim.now,
                black_box(relay),
                black_box(other),
                &mut buf,
                PAYLOAD,
            );
            match o {
                Output::ToClient { data, .. } => black_box(data.len()),
                _ => panic!("not framed"),
            }
        })
    });

    // Client -> peer: Send indication.
    let mut cl = client.clone();
    let txid = cl.next_txid();
    let send = cl.build(
        Method::SEND,
        Class::Indication,
        txid,
        &[Attribute::XorPeerAddress(peer), Attribute::Data(&payload)],
    );
    g.bench_function("send_indication_client_to_peer_decision", |b| {
        b.iter(|| {
            let input = ClientInput {
                now: sim.now,
                unix_secs: sim.unix,
                five_tuple,
                conn: ClientConn(0),
                data: black_box(&send),
            };
            let o = sim.server.handle_client_message(
                input,
                &mut out,
                &mut Host { relays: &mut sim.relays, quota: &sim.quota },
            );
            match o {
                Output::ToPeer { data, .. } => black_box(data.len()),
                _ => panic!("not forwarded"),
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
