//! # turn-proto: the sans-IO STUN/TURN protocol core
//!
//! This crate decides everything a TURN server says (RFC 8489 STUN,
//! RFC 8656 TURN over UDP, long-term and REST credentials). It never does
//! I/O and never reads the clock: the daemon moves datagrams and time in,
//! and executes the [`server::Output`] that comes back. That makes it
//! deterministic (tests run on simulated time), fuzzable and cheap per
//! packet.
//!
//! ## Layers
//!
//! * [`stun`]: the codec. [`stun::Message::parse`] validates a datagram
//!   and borrows attributes from it (zero copy); [`stun::MessageEncoder`]
//!   writes into a caller buffer. MESSAGE-INTEGRITY(-SHA256) and
//!   FINGERPRINT in [`stun::integrity`]. [`channel_data`] frames
//!   ChannelData; [`framing`] cuts a TCP/TLS stream into messages.
//! * [`credentials`]: long-term keys (MD5 and SHA-256), USERHASH,
//!   SASLprep, and coturn-compatible REST credentials. [`nonce`]: stateless
//!   nonces (an HMAC over time and client address; nothing stored for
//!   unauthenticated clients) with the RFC 8489 nonce cookie.
//! * [`policy`]: which peers may be relayed to (safe defaults + CIDR
//!   allow/deny).
//! * [`server`]: the state machine. One [`server::Server`] per worker
//!   thread owns an allocation table (slab + 5-tuple and relay-id indexes,
//!   permissions and channels per allocation) and a single deadline heap.
//!
//! ## Driving a server
//!
//! ```text
//! loop {
//!     wait for: listener datagram | stream bytes | relay datagram | poll_timeout()
//!     listener datagram  -> handle_client_message(ClientInput { now, unix_secs, five_tuple, conn, data }, out, host)
//!     stream bytes       -> for each complete frame (framing::Frames): handle_client_message(..)
//!     stream closed      -> handle_connection_closed(now, five_tuple, host)
//!     relay datagram     -> handle_peer_datagram(now, relay_id, peer, buf /* payload at PEER_HEADROOM */, len)
//!     deadline           -> handle_timeout(now, host)
//!     execute the Output: ToClient { five_tuple, conn, data } | ToPeer { relay, peer, data, .. } | None
//!     drain poll_event() for logs; export counters()
//! }
//! ```
//!
//! A [`server::FiveTuple`] carries its [`server::Transport`] (UDP, TCP or TLS) and every
//! client message comes with the caller's [`server::ClientConn`]: the socket or
//! connection to answer on, which every [`server::Output::ToClient`] names again. Over
//! TCP and TLS, [`framing`] cuts the byte stream into messages, ChannelData to the client
//! is padded to four bytes, and an allocation ends with its connection.
//!
//! Relay sockets are requested through [`server::RelayAllocator`]
//! (synchronous: bind and return an id and address) and quotas through
//! [`server::Quota`] (shared across workers by the daemon), both lent for one call in a
//! [`server::Host`]. Every input
//! that is not answered is counted in [`server::Counters`] by
//! [`server::DropReason`]; no input from the network can panic the server
//! or grow its memory without bound (caps on allocations, permissions,
//! channels, cached responses and pending events).
//!
//! ## Hot path
//!
//! ChannelData from a client is one FxHash lookup by 5-tuple, a scan of the
//! allocation's (small, capped) channel and permission vectors, and a
//! sub-slice of the input: no allocation, no copy. Peer data is framed in
//! place: the caller reads the peer datagram at offset
//! [`server::PEER_HEADROOM`] and the server writes the 4-byte ChannelData
//! header (or the Data indication header) in front of it.

pub mod channel_data;
pub mod client;
pub mod credentials;
pub mod framing;
pub mod nonce;
pub mod policy;
pub mod server;
pub mod stun;

pub use server::{
    ClientConn, ClientInput, Event, FiveTuple, Host, Output, Quota, RelayAllocator, RelayId,
    Server, ServerConfig, Transport,
};
