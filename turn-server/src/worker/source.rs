//! The worker's event sources in its epoll set: every socket a worker reads is named by a
//! [`Source`], registered under [`Source::token`] and dispatched by
//! [`Source::from_token`]. Besides these, the worker waits on its inbox (datagrams other
//! workers hand it) and on one timer (the protocol core's next deadline).

/// What an epoll token names. The token holds the kind in its top byte and an index (a
/// listener group, or a slot of the worker's relay or connection table) in its low 32
/// bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The worker's socket of UDP listener group `i`.
    UdpListener(u32),
    /// The relay socket in slot `s` of the worker's relay pool.
    Relay(u32),
    /// The worker's socket of TCP listener group `i` (plain TCP or TLS).
    StreamListener(u32),
    /// The TCP or TLS connection in slot `s` of the worker's connection table.
    Connection(u32),
}

const KIND_SHIFT: u32 = 56;
const UDP_LISTENER: u64 = 1;
const RELAY: u64 = 2;
const STREAM_LISTENER: u64 = 3;
const CONNECTION: u64 = 4;

impl Source {
    /// The epoll token of this source.
    pub const fn token(self) -> u64 {
        let (kind, index) = match self {
            Source::UdpListener(i) => (UDP_LISTENER, i),
            Source::Relay(s) => (RELAY, s),
            Source::StreamListener(i) => (STREAM_LISTENER, i),
            Source::Connection(s) => (CONNECTION, s),
        };
        kind << KIND_SHIFT | index as u64
    }

    /// The source a token names (None for a token no source has).
    pub const fn from_token(token: u64) -> Option<Source> {
        let index = (token & 0xffff_ffff) as u32;
        match token >> KIND_SHIFT {
            UDP_LISTENER => Some(Source::UdpListener(index)),
            RELAY => Some(Source::Relay(index)),
            STREAM_LISTENER => Some(Source::StreamListener(index)),
            CONNECTION => Some(Source::Connection(index)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_name_their_source() {
        for source in [
            Source::UdpListener(0),
            Source::UdpListener(63),
            Source::Relay(0),
            Source::Relay(u32::MAX),
        ] {
            assert_eq!(Source::from_token(source.token()), Some(source));
        }
        assert_ne!(Source::UdpListener(3).token(), Source::Relay(3).token());
        assert_eq!(Source::from_token(0), None);
        assert_eq!(Source::from_token(u64::MAX), None);
    }
}
