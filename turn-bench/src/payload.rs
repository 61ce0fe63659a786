//! The benchmark payload: what every generated datagram carries at the start of its
//! application data, so the peer and the client can attribute it to a flow and time it.
//!
//! ```text
//! 0        4        8                16               24
//! | magic  | flow   | sequence (u64)  | sent at (u64)  | filler ...
//! ```
//!
//! All fields big-endian. "Sent at" is nanoseconds since the process's benchmark epoch
//! ([`clock_ns`]): the sender, the embedded peer and the echo receiver live in the same
//! process, so they share the clock.

use std::{sync::OnceLock, time::Instant};

/// Marks a benchmark payload ("TBNC").
pub const MAGIC: u32 = 0x5442_4E43;
/// Bytes of the header; the smallest payload.
pub const HEADER_LEN: usize = 24;

/// One payload header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Index of the flow that sent it.
    pub flow: u32,
    /// Per-flow sequence number, from 0.
    pub seq: u64,
    /// Send time, nanoseconds since [`clock_ns`]'s epoch.
    pub sent_ns: u64,
}

impl Stamp {
    /// Write the header into the first [`HEADER_LEN`] bytes of `buf`. False if `buf` is too short.
    pub fn write(&self, buf: &mut [u8]) -> bool {
        let Some(h) = buf.get_mut(..HEADER_LEN) else {
            return false;
        };
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&self.flow.to_be_bytes());
        h[8..16].copy_from_slice(&self.seq.to_be_bytes());
        h[16..24].copy_from_slice(&self.sent_ns.to_be_bytes());
        true
    }

    /// Read a header; `None` if `buf` is too short or is not a benchmark payload.
    pub fn read(buf: &[u8]) -> Option<Stamp> {
        let h = buf.get(..HEADER_LEN)?;
        let be32 = |at: usize| u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let be64 = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[at..at + 8]);
            u64::from_be_bytes(b)
        };
        if be32(0) != MAGIC {
            return None;
        }
        Some(Stamp { flow: be32(4), seq: be64(8), sent_ns: be64(16) })
    }
}

/// Nanoseconds since the benchmark epoch (the first call in the process); monotonic.
pub fn clock_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A measurement window on the benchmark clock: `[start_ns, end_ns)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start_ns: u64,
    pub end_ns: u64,
}

impl Window {
    /// True if a packet sent at `t` belongs to the measured interval.
    #[inline]
    pub fn contains(&self, t: u64) -> bool {
        t >= self.start_ns && t < self.end_ns
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn round_trip() {
        let s = Stamp { flow: 7, seq: 0x0102_0304_0506_0708, sent_ns: u64::MAX - 3 };
        let mut buf = [0xAAu8; 100];
        assert!(s.write(&mut buf));
        assert_eq!(&buf[..4], b"TBNC");
        assert_eq!(buf[HEADER_LEN], 0xAA, "filler untouched");
        assert_eq!(Stamp::read(&buf), Some(s));
        assert_eq!(Stamp::read(&buf[..HEADER_LEN]), Some(s));
    }

    #[test]
    fn rejects_short_and_foreign() {
        let s = Stamp { flow: 1, seq: 2, sent_ns: 3 };
        let mut small = [0u8; HEADER_LEN - 1];
        assert!(!s.write(&mut small));
        let mut buf = [0u8; HEADER_LEN];
        assert!(s.write(&mut buf));
        assert_eq!(Stamp::read(&buf[..HEADER_LEN - 1]), None);
        buf[0] ^= 1;
        assert_eq!(Stamp::read(&buf), None);
    }

    #[test]
    fn window_is_half_open() {
        let w = Window { start_ns: 10, end_ns: 20 };
        assert!(!w.contains(9));
        assert!(w.contains(10));
        assert!(w.contains(19));
        assert!(!w.contains(20));
    }

    #[test]
    fn clock_is_monotonic() {
        let a = clock_ns();
        let b = clock_ns();
        assert!(b >= a);
    }
}
