//! Codec benchmarks: parse a Binding request, encode a Binding response,
//! and a full Binding round trip through the server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use turn_proto::stun::attr;
use turn_proto::stun::{Class, Message, MessageEncoder, Method, TransactionId};

/// RFC 5769 §2.1 sample request (SOFTWARE, PRIORITY, ICE-CONTROLLED,
/// USERNAME, MESSAGE-INTEGRITY, FINGERPRINT).
const RFC5769_REQUEST: [u8; 108] = [
    0x00, 0x01, 0x00, 0x58, 0x21, 0x12, 0xa4, 0x42, 0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86,
    0xfa, 0x87, 0xdf, 0xae, 0x80, 0x22, 0x00, 0x10, 0x53, 0x54, 0x55, 0x4e, 0x20, 0x74, 0x65, 0x73,
    0x74, 0x20, 0x63, 0x6c, 0x69, 0x65, 0x6e, 0x74, 0x00, 0x24, 0x00, 0x04, 0x6e, 0x00, 0x01, 0xff,
    0x80, 0x29, 0x00, 0x08, 0x93, 0x2f, 0xf9, 0xb1, 0x51, 0x26, 0x3b, 0x36, 0x00, 0x06, 0x00, 0x09,
    0x65, 0x76, 0x74, 0x6a, 0x3a, 0x68, 0x36, 0x76, 0x59, 0x20, 0x20, 0x20, 0x00, 0x08, 0x00, 0x14,
    0x9a, 0xea, 0xa7, 0x0c, 0xbf, 0xd8, 0xcb, 0x56, 0x78, 0x1e, 0xf2, 0xb5, 0xb2, 0xd3, 0xf2, 0x49,
    0xc1, 0xb5, 0x71, 0xa2, 0x80, 0x28, 0x00, 0x04, 0xe5, 0x7a, 0x3b, 0xcf,
];

fn bench(c: &mut Criterion) {
    let mut plain = [0u8; 20];
    let n =
        MessageEncoder::new(&mut plain, Method::BINDING, Class::Request, &TransactionId([7; 12]))
            .unwrap()
            .finish();
    assert_eq!(n, 20);

    c.bench_function("parse/binding_request_plain_20B", |b| {
        b.iter(|| {
            let m = Message::parse(black_box(&plain)).unwrap();
            black_box(m.method())
        })
    });
    c.bench_function("parse/binding_request_rfc5769_108B_with_fingerprint", |b| {
        b.iter(|| {
            let m = Message::parse(black_box(&RFC5769_REQUEST)).unwrap();
            black_box(m.get(attr::USERNAME))
        })
    });

    let client = "192.0.2.1:32853".parse().unwrap();
    let mut out = [0u8; 256];
    c.bench_function("encode/binding_response_xor_mapped", |b| {
        b.iter(|| {
            let mut e = MessageEncoder::new(
                &mut out,
                Method::BINDING,
                Class::SuccessResponse,
                black_box(&TransactionId([7; 12])),
            )
            .unwrap();
            e.xor_address(attr::XOR_MAPPED_ADDRESS, black_box(client)).unwrap();
            black_box(e.finish())
        })
    });
    c.bench_function("encode/binding_response_xor_mapped_fingerprint", |b| {
        b.iter(|| {
            let mut e = MessageEncoder::new(
                &mut out,
                Method::BINDING,
                Class::SuccessResponse,
                black_box(&TransactionId([7; 12])),
            )
            .unwrap();
            e.xor_address(attr::XOR_MAPPED_ADDRESS, black_box(client)).unwrap();
            e.fingerprint().unwrap();
            black_box(e.finish())
        })
    });
    c.bench_function("encode/response_with_message_integrity", |b| {
        b.iter(|| {
            let mut e = MessageEncoder::new(
                &mut out,
                Method::REFRESH,
                Class::SuccessResponse,
                black_box(&TransactionId([7; 12])),
            )
            .unwrap();
            e.u32(attr::LIFETIME, 600).unwrap();
            e.message_integrity(black_box(&[1u8; 16])).unwrap();
            black_box(e.finish())
        })
    });

    let mut sim = common::Sim::default();
    let mut out = [0u8; 2048];
    c.bench_function("server/binding_request_to_response", |b| {
        b.iter(|| {
            let input = turn_proto::server::ClientInput {
                now: sim.now,
                unix_secs: sim.unix,
                five_tuple: sim.five_tuple(client),
                conn: turn_proto::server::ClientConn(0),
                data: black_box(&plain),
            };
            let o = sim.server.handle_client_message(
                input,
                &mut out,
                &mut turn_proto::server::Host { relays: &mut sim.relays, quota: &sim.quota },
            );
            black_box(matches!(o, turn_proto::Output::ToClient { .. }))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
