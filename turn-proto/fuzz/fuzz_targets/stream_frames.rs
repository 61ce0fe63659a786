//! Fuzz the stream framer (TCP/TLS): arbitrary bytes, read in arbitrary pieces, as the
//! daemon reads a connection. The framer must never panic, never claim bytes it was not
//! given, and cut the same frames whatever the pieces; every frame it cuts must go
//! through the message parsers without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use turn_proto::channel_data::ChannelData;
use turn_proto::framing::{FrameKind, Frames};
use turn_proto::stun::Message;

fuzz_target!(|data: &[u8]| {
    // First byte: the size of each read (1..=64); the rest is the stream.
    let Some((&step, stream)) = data.split_first() else { return };
    let step = usize::from(step % 64) + 1;
    let whole: Vec<Vec<u8>> = {
        let mut it = Frames::new(stream);
        let frames = it.by_ref().map(|(_, f)| f.to_vec()).collect();
        assert!(it.consumed() <= stream.len());
        frames
    };
    let mut pieces: Vec<Vec<u8>> = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    for chunk in stream.chunks(step) {
        pending.extend_from_slice(chunk);
        let mut it = Frames::new(&pending);
        for (kind, frame) in it.by_ref() {
            assert!(frame.len() >= 4);
            match kind {
                FrameKind::Stun => {
                    let _ = Message::parse(frame);
                }
                FrameKind::ChannelData => {
                    let _ = ChannelData::parse(frame);
                }
            }
            pieces.push(frame.to_vec());
        }
        let (used, broken) = (it.consumed(), it.error().is_some());
        pending.drain(..used);
        if broken {
            break;
        }
    }
    assert_eq!(pieces, whole, "the frames depend on how the stream was read");
});
