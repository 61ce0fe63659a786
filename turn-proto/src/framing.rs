//! Framing of messages in a TCP or TLS byte stream (RFC 8656 §12.5, RFC 8489 §6.2.2).
//!
//! Over a stream, STUN messages and ChannelData messages follow each other with nothing
//! in between. The first two bits of a frame say which it is (0b00: STUN, 0b01:
//! ChannelData; anything else is not TURN), and its length comes from its header:
//!
//! * a STUN message is its 20-byte header plus the header's length field, which is
//!   always a multiple of four (attributes are padded);
//! * a ChannelData message is its 4-byte header plus the length field, **rounded up
//!   to a multiple of four**: "Over TCP and TLS-over-TCP, the ChannelData message MUST
//!   be padded to a multiple of four bytes in order to ensure the alignment of
//!   subsequent messages. The padding is not reflected in the length field" (§12.5).
//!
//! [`frame_len`] reads that from the first bytes of the stream; the caller waits for the
//! whole frame, hands it to [`Server::handle_client_message`](crate::server::Server::handle_client_message)
//! (which ignores ChannelData padding), and goes on with the bytes after it. A stream
//! whose next bytes cannot start a frame is broken beyond repair (there is no way to
//! find the next frame boundary): the caller closes the connection.

use crate::stun::{HEADER_LEN, MAGIC_COOKIE};

/// Size of a ChannelData header.
const CHANNEL_DATA_HEADER_LEN: usize = crate::channel_data::CHANNEL_DATA_HEADER_LEN;

/// The longest frame there can be: a STUN message of 20 + 65,532 bytes (a ChannelData
/// message is at most 4 + 65,535 bytes, 65,540 with its padding).
pub const MAX_FRAME_LEN: usize = HEADER_LEN + 0xFFFC;

/// Bytes [`frame_len`] needs at most to decide (a STUN header up to its magic cookie).
pub const PREFIX_LEN: usize = 8;

/// What kind of message a frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A STUN message (request, indication, response).
    Stun,
    /// A ChannelData message (with its padding in the frame).
    ChannelData,
}

/// The next bytes of a stream cannot start a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The first two bits are 0b10 or 0b11: neither STUN nor ChannelData.
    #[error("neither a STUN nor a ChannelData message")]
    NotTurn,
    /// A STUN header whose length field is not a multiple of four.
    #[error("STUN message length is not a multiple of 4")]
    UnalignedStunLength,
    /// A STUN header without the magic cookie.
    #[error("STUN header without the magic cookie")]
    NoMagicCookie,
}

/// The next frame's kind and length in bytes (padding included), from the first bytes
/// of `stream`; `Ok(None)` when more bytes are needed to tell (at most [`PREFIX_LEN`]).
///
/// The length may exceed what `stream` holds: the rest of the frame is still to come.
pub fn frame_len(stream: &[u8]) -> Result<Option<(FrameKind, usize)>, FrameError> {
    let Some(&first) = stream.first() else {
        return Ok(None);
    };
    match first >> 6 {
        0b00 => {
            let Some(head) = stream.get(..PREFIX_LEN) else {
                return Ok(None);
            };
            let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
            if len % 4 != 0 {
                return Err(FrameError::UnalignedStunLength);
            }
            if u32::from_be_bytes([head[4], head[5], head[6], head[7]]) != MAGIC_COOKIE {
                return Err(FrameError::NoMagicCookie);
            }
            Ok(Some((FrameKind::Stun, HEADER_LEN + len)))
        }
        0b01 => {
            let Some(head) = stream.get(..CHANNEL_DATA_HEADER_LEN) else {
                return Ok(None);
            };
            let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
            Ok(Some((
                FrameKind::ChannelData,
                crate::stun::message::pad4(CHANNEL_DATA_HEADER_LEN + len),
            )))
        }
        _ => Err(FrameError::NotTurn),
    }
}

/// The complete frames at the start of a stream buffer, in order, without copying or
/// allocating. Stops at the first incomplete frame, or at the first bytes that cannot
/// start a frame ([`Frames::error`]).
#[derive(Debug, Clone)]
pub struct Frames<'a> {
    stream: &'a [u8],
    at: usize,
    error: Option<FrameError>,
}

impl<'a> Frames<'a> {
    /// The frames of `stream`.
    pub fn new(stream: &'a [u8]) -> Frames<'a> {
        Frames { stream, at: 0, error: None }
    }

    /// Bytes taken by the frames returned so far (what the caller may discard).
    pub fn consumed(&self) -> usize {
        self.at
    }

    /// Why the iteration stopped before the end of the complete frames, if it did: the
    /// stream is broken there.
    pub fn error(&self) -> Option<FrameError> {
        self.error
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = (FrameKind, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.stream.get(self.at..)?;
        match frame_len(rest) {
            Ok(Some((kind, len))) => {
                let frame = rest.get(..len)?;
                self.at += len;
                Some((kind, frame))
            }
            Ok(None) => None,
            Err(e) => {
                self.error = Some(e);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::channel_data::{self, ChannelData};
    use crate::stun::{Class, Message, MessageEncoder, Method, TransactionId, attr};

    fn binding() -> Vec<u8> {
        let mut buf = [0u8; 64];
        let mut enc =
            MessageEncoder::new(&mut buf, Method::BINDING, Class::Request, &TransactionId([7; 12]))
                .unwrap();
        enc.raw(attr::SOFTWARE, b"abc").unwrap(); // 3 bytes: padded attribute
        let n = enc.finish();
        buf[..n].to_vec()
    }

    fn channel_data(payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; payload.len() + 8];
        let n = channel_data::encode(&mut buf, 0x4001, payload).unwrap();
        let mut v = buf[..n].to_vec();
        v.resize(crate::stun::message::pad4(n), 0);
        v
    }

    #[test]
    fn stun_and_padded_channel_data_lengths() {
        let b = binding();
        assert_eq!(b.len(), 28);
        assert_eq!(frame_len(&b).unwrap(), Some((FrameKind::Stun, 28)));
        for (payload, framed) in
            [(0usize, 4usize), (1, 8), (3, 8), (4, 8), (5, 12), (0xFFFF, 65_540)]
        {
            let cd = channel_data(&vec![9u8; payload]);
            assert_eq!(cd.len(), framed);
            assert_eq!(
                frame_len(&cd).unwrap(),
                Some((FrameKind::ChannelData, framed)),
                "{payload}"
            );
            // The padded frame is what the server is given; it sees the payload only.
            assert_eq!(ChannelData::parse(&cd).unwrap().payload.len(), payload);
        }
    }

    #[test]
    fn short_prefixes_ask_for_more() {
        let b = binding();
        for n in 0..PREFIX_LEN {
            assert_eq!(frame_len(&b[..n]).unwrap(), None, "{n} bytes of STUN");
        }
        let cd = channel_data(b"hello");
        for n in 0..4 {
            assert_eq!(frame_len(&cd[..n]).unwrap(), None, "{n} bytes of ChannelData");
        }
        assert!(frame_len(&cd[..4]).unwrap().is_some());
    }

    #[test]
    fn garbage_is_an_error() {
        assert_eq!(frame_len(&[0x80, 0, 0, 0]), Err(FrameError::NotTurn));
        // A TLS ClientHello sent to a plain TCP listener: "STUN" without the cookie.
        let hello = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];
        assert!(frame_len(&hello).is_err());
        // HTTP starts with 0b01 bits: it frames as ChannelData (the daemon closes a
        // connection whose first message is not STUN).
        assert_eq!(frame_len(b"GET /").unwrap().map(|f| f.0), Some(FrameKind::ChannelData));
        assert_eq!(frame_len(&[0xC0]), Err(FrameError::NotTurn));
        let mut b = binding();
        b[3] = 9;
        assert_eq!(frame_len(&b), Err(FrameError::UnalignedStunLength));
        let mut b = binding();
        b[4] ^= 1;
        assert_eq!(frame_len(&b), Err(FrameError::NoMagicCookie));
    }

    #[test]
    fn a_stream_splits_into_its_frames() {
        let mut stream = Vec::new();
        stream.extend(binding());
        stream.extend(channel_data(b"abcde"));
        stream.extend(channel_data(b""));
        stream.extend(binding());
        let mut it = Frames::new(&stream);
        let frames: Vec<(FrameKind, &[u8])> = it.by_ref().collect();
        assert_eq!((it.error(), it.consumed()), (None, stream.len()));
        let kinds: Vec<FrameKind> = frames.iter().map(|f| f.0).collect();
        use FrameKind::*;
        assert_eq!(kinds, [Stun, ChannelData, ChannelData, Stun]);
        assert!(Message::parse(frames[3].1).is_ok());
        // A partial last frame is left for later.
        let mut it = Frames::new(&stream[..stream.len() - 1]);
        assert_eq!(it.by_ref().count(), 3);
        assert_eq!((it.error(), it.consumed()), (None, stream.len() - 28));
        // Garbage after two frames: both come out, then the error.
        let mut broken = stream[..28 + 12].to_vec();
        broken.extend([0xff; 8]);
        let mut it = Frames::new(&broken);
        assert_eq!(it.by_ref().count(), 2);
        assert_eq!((it.error(), it.consumed()), (Some(FrameError::NotTurn), 40));
    }
}
