//! Fuzz the STUN and ChannelData parsers and every attribute decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use turn_proto::channel_data::ChannelData;
use turn_proto::stun::{Attribute, Message, MessageEncoder};

fuzz_target!(|data: &[u8]| {
    let _ = ChannelData::parse(data);
    let Ok(m) = Message::parse(data) else {
        return;
    };
    let tid = m.transaction_id();
    let _ = m.verify_message_integrity(b"key");
    let _ = m.verify_message_integrity_sha256(b"key");
    let _ = m.unknown_comprehension_required::<16>();
    // Every attribute that decodes must re-encode to an equivalent value.
    let mut out = vec![0u8; data.len() + 64];
    let mut enc = MessageEncoder::new(&mut out, m.method(), m.class(), &tid).expect("fits");
    let mut decoded = Vec::new();
    for a in m.attributes() {
        if let Ok(attr) = Attribute::decode(a.typ, a.value, &tid) {
            attr.encode(&mut enc).expect("re-encode fits");
            decoded.push(attr);
        }
    }
    let n = enc.finish();
    let again = Message::parse(&out[..n]).expect("re-encoded message parses");
    let redecoded: Vec<Attribute<'_>> = again
        .attributes()
        .map(|a| Attribute::decode(a.typ, a.value, &tid).expect("re-decodes"))
        .collect();
    assert_eq!(decoded, redecoded);
});
