//! ChannelData framing (RFC 8656 §12.5).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |         Channel Number        |            Length             |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! /                       Application Data                        /
//! ```
//!
//! RFC 8656 narrowed channel numbers to 0x4000-0x4FFF, but RFC 5766 allowed
//! 0x4000-0x7FFF and deployed clients still use the upper part (coturn's own
//! `turnutils_uclient` binds 0x7xxx), as does coturn the server. For those
//! clients to work we accept the whole RFC 5766 range. Over UDP the padding to a multiple of four is optional: a
//! datagram may carry up to 3 padding bytes after the data; anything longer
//! or shorter than `4 + length` (+ at most 3) is rejected.

/// Size of the ChannelData header.
pub const CHANNEL_DATA_HEADER_LEN: usize = 4;
/// Lowest valid channel number.
pub const MIN_CHANNEL: u16 = 0x4000;
/// Highest valid channel number (RFC 5766; RFC 8656 says 0x4FFF, see above).
pub const MAX_CHANNEL: u16 = 0x7FFF;

/// True if `n` is a valid channel number (0x4000-0x7FFF, see the module docs).
#[inline]
pub const fn is_valid_channel(n: u16) -> bool {
    n >= MIN_CHANNEL && n <= MAX_CHANNEL
}

/// Why a datagram is not a valid ChannelData message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChannelDataError {
    /// Shorter than 4 bytes.
    #[error("shorter than a ChannelData header")]
    TooShort,
    /// First two bits are not 0b01.
    #[error("not a ChannelData message")]
    NotChannelData,
    /// The length field disagrees with the datagram size.
    #[error("length field does not match the datagram")]
    LengthMismatch,
}

/// A ChannelData message borrowing the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelData<'a> {
    /// The channel number.
    pub channel: u16,
    /// The application data (without padding).
    pub payload: &'a [u8],
}

impl<'a> ChannelData<'a> {
    /// Parse a datagram.
    #[inline]
    pub fn parse(buf: &'a [u8]) -> Result<ChannelData<'a>, ChannelDataError> {
        let Some(head) = buf.get(..CHANNEL_DATA_HEADER_LEN) else {
            return Err(ChannelDataError::TooShort);
        };
        let channel = u16::from_be_bytes([head[0], head[1]]);
        if channel & 0xC000 != 0x4000 {
            return Err(ChannelDataError::NotChannelData);
        }
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let rest = &buf[CHANNEL_DATA_HEADER_LEN..];
        if rest.len() < len || rest.len() - len > 3 {
            return Err(ChannelDataError::LengthMismatch);
        }
        Ok(ChannelData { channel, payload: &rest[..len] })
    }
}

/// Write a ChannelData header for `payload_len` bytes.
#[inline]
pub fn write_header(head: &mut [u8; 4], channel: u16, payload_len: u16) {
    let c = channel.to_be_bytes();
    let l = payload_len.to_be_bytes();
    *head = [c[0], c[1], l[0], l[1]];
}

/// Encode a full ChannelData message (no padding, as allowed over UDP)
/// into `out`; returns the length, or `None` if `out` is too small or the
/// payload longer than 65535 bytes.
pub fn encode(out: &mut [u8], channel: u16, payload: &[u8]) -> Option<usize> {
    let len = u16::try_from(payload.len()).ok()?;
    let total = CHANNEL_DATA_HEADER_LEN + payload.len();
    let dst = out.get_mut(..total)?;
    let (head, body) = dst.split_at_mut(CHANNEL_DATA_HEADER_LEN);
    let mut h = [0u8; 4];
    write_header(&mut h, channel, len);
    head.copy_from_slice(&h);
    body.copy_from_slice(payload);
    Some(total)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn parse_and_padding_rules() {
        let mut buf = [0u8; 16];
        let n = encode(&mut buf, 0x4001, b"hello").unwrap();
        assert_eq!(n, 9);
        let cd = ChannelData::parse(&buf[..n]).unwrap();
        assert_eq!(cd.channel, 0x4001);
        assert_eq!(cd.payload, b"hello");
        // padded to 12 bytes (3 padding bytes) is fine
        assert_eq!(ChannelData::parse(&buf[..12]).unwrap().payload, b"hello");
        // 4 trailing bytes is not padding
        assert_eq!(ChannelData::parse(&buf[..13]).unwrap_err(), ChannelDataError::LengthMismatch);
        // truncated
        assert_eq!(ChannelData::parse(&buf[..8]).unwrap_err(), ChannelDataError::LengthMismatch);
        assert_eq!(ChannelData::parse(&buf[..3]).unwrap_err(), ChannelDataError::TooShort);
        // zero-length payload
        let n = encode(&mut buf, 0x4FFF, b"").unwrap();
        assert_eq!(ChannelData::parse(&buf[..n]).unwrap().payload, b"");
    }

    #[test]
    fn channel_ranges() {
        // The RFC 5766 upper range is accepted (deployed clients use it).
        assert_eq!(ChannelData::parse(&[0x50, 0, 0, 0]).unwrap().channel, 0x5000);
        assert_eq!(ChannelData::parse(&[0x7F, 0xFF, 0, 0]).unwrap().channel, 0x7FFF);
        assert_eq!(
            ChannelData::parse(&[0x00, 0x01, 0, 0]).unwrap_err(),
            ChannelDataError::NotChannelData
        );
        assert_eq!(
            ChannelData::parse(&[0x80, 0x01, 0, 0]).unwrap_err(),
            ChannelDataError::NotChannelData
        );
        assert!(is_valid_channel(0x4000) && is_valid_channel(0x4FFF) && is_valid_channel(0x7FFF));
        assert!(!is_valid_channel(0x3FFF) && !is_valid_channel(0x8000));
    }
}
