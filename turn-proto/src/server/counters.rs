//! Counters the daemon can export: traffic, drops by reason, auth and
//! allocation outcomes. Plain `u64`s (a `Server` is single-threaded).

/// Why an input produced nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum DropReason {
    /// Empty datagram or first bits neither STUN (0b00) nor ChannelData (0b01).
    NotTurn,
    /// STUN framing/header/fingerprint error.
    MalformedStun,
    /// ChannelData framing error.
    MalformedChannelData,
    /// A response (or unexpected class) received from a client.
    UnexpectedClass,
    /// Binding indication (keepalive): nothing to answer.
    BindingIndication,
    /// Indication with a method other than Send.
    UnknownIndication,
    /// ChannelData or Send indication without a live allocation.
    NoAllocation,
    /// ChannelData on an unbound channel.
    NoChannel,
    /// No permission for the peer.
    NoPermission,
    /// Send indication to a peer refused by the peer policy.
    PeerDenied,
    /// Send indication missing/invalid XOR-PEER-ADDRESS or DATA, or with an
    /// unknown comprehension-required attribute.
    InvalidSend,
    /// Peer family does not match any relayed address of the allocation.
    FamilyMismatch,
    /// Peer datagram for a relay id the server does not know.
    UnknownRelay,
    /// Peer datagram too large for a Data indication.
    PayloadTooLarge,
    /// The caller's buffer is too small for the output.
    BufferTooSmall,
    /// An unauthenticated response (401, 400, 438) its source had no share left for.
    RateLimited,
    /// A signed request from a source that failed authentication too often lately.
    AuthThrottled,
}

impl DropReason {
    /// Number of reasons.
    pub const COUNT: usize = 17;
    /// All reasons, in index order.
    pub const ALL: [DropReason; DropReason::COUNT] = [
        DropReason::NotTurn,
        DropReason::MalformedStun,
        DropReason::MalformedChannelData,
        DropReason::UnexpectedClass,
        DropReason::BindingIndication,
        DropReason::UnknownIndication,
        DropReason::NoAllocation,
        DropReason::NoChannel,
        DropReason::NoPermission,
        DropReason::PeerDenied,
        DropReason::InvalidSend,
        DropReason::FamilyMismatch,
        DropReason::UnknownRelay,
        DropReason::PayloadTooLarge,
        DropReason::BufferTooSmall,
        DropReason::RateLimited,
        DropReason::AuthThrottled,
    ];

    /// A stable snake_case name for metrics.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::NotTurn => "not_turn",
            DropReason::MalformedStun => "malformed_stun",
            DropReason::MalformedChannelData => "malformed_channel_data",
            DropReason::UnexpectedClass => "unexpected_class",
            DropReason::BindingIndication => "binding_indication",
            DropReason::UnknownIndication => "unknown_indication",
            DropReason::NoAllocation => "no_allocation",
            DropReason::NoChannel => "no_channel",
            DropReason::NoPermission => "no_permission",
            DropReason::PeerDenied => "peer_denied",
            DropReason::InvalidSend => "invalid_send",
            DropReason::FamilyMismatch => "family_mismatch",
            DropReason::UnknownRelay => "unknown_relay",
            DropReason::PayloadTooLarge => "payload_too_large",
            DropReason::BufferTooSmall => "buffer_too_small",
            DropReason::RateLimited => "rate_limited",
            DropReason::AuthThrottled => "auth_throttled",
        }
    }
}

/// Why an authentication failed (401), for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum AuthFailure {
    /// No such user (or a REST credential that expired or lives too long).
    UnknownUser,
    /// MESSAGE-INTEGRITY(-SHA256) does not verify: a wrong password.
    BadIntegrity,
    /// The request names another realm.
    WrongRealm,
}

impl AuthFailure {
    /// Number of reasons.
    pub const COUNT: usize = 3;
    /// All reasons, in index order.
    pub const ALL: [AuthFailure; AuthFailure::COUNT] =
        [AuthFailure::UnknownUser, AuthFailure::BadIntegrity, AuthFailure::WrongRealm];

    /// A stable snake_case name for metrics.
    pub const fn name(self) -> &'static str {
        match self {
            AuthFailure::UnknownUser => "unknown_user",
            AuthFailure::BadIntegrity => "bad_integrity",
            AuthFailure::WrongRealm => "wrong_realm",
        }
    }
}

/// The methods requests are counted by ([`Counters::requests_by_method`]), in index order.
pub const REQUEST_METHODS: [&str; 6] =
    ["binding", "allocate", "refresh", "create_permission", "channel_bind", "other"];

/// The error codes responses are counted by ([`Counters::errors_by_code`]), in index
/// order; a last slot counts any other code.
pub const ERROR_CODES: [u16; 13] =
    [400, 401, 403, 420, 437, 438, 440, 441, 442, 443, 486, 500, 508];

/// Messages and payload bytes relayed one way, by the client's transport (index:
/// [`Transport::index`](super::Transport::index)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrafficCounters {
    pub packets: [u64; 3],
    pub bytes: [u64; 3],
}

impl TrafficCounters {
    #[inline]
    pub(crate) fn add(&mut self, transport: super::Transport, bytes: usize) {
        let i = transport.index();
        self.packets[i] += 1;
        self.bytes[i] += bytes as u64;
    }
}

/// Statistics of one [`Server`](super::Server).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Drops by [`DropReason`] index.
    pub drops: [u64; DropReason::COUNT],
    /// STUN requests received.
    pub requests: u64,
    /// Binding requests answered.
    pub binding_requests: u64,
    /// Error responses sent (all codes).
    pub error_responses: u64,
    /// Requests by method ([`REQUEST_METHODS`] order).
    pub requests_by_method: [u64; 6],
    /// Error responses by code ([`ERROR_CODES`] order, then any other code).
    pub errors_by_code: [u64; ERROR_CODES.len() + 1],
    /// Failed authentications by [`AuthFailure`] index.
    pub auth_failures_by: [u64; AuthFailure::COUNT],
    /// Client -> peer messages and payload bytes, by client transport.
    pub to_peer_traffic: TrafficCounters,
    /// Peer -> client messages and payload bytes, by client transport.
    pub to_client_traffic: TrafficCounters,
    /// 401 challenges to requests without integrity.
    pub auth_challenges: u64,
    /// 401 for unknown users, wrong realm or bad MESSAGE-INTEGRITY.
    pub auth_failures: u64,
    /// MESSAGE-INTEGRITY(-SHA256) computations while authenticating.
    pub integrity_checks: u64,
    /// Unauthenticated responses not sent: the source had no share left.
    pub rate_limited_responses: u64,
    /// Signed requests dropped unverified: the source failed authentication too often.
    pub rate_limited_auth: u64,
    /// Allocates refused as possible replays (438 with a fresh nonce).
    pub replays_refused: u64,
    /// 438 answers.
    pub stale_nonces: u64,
    /// Requests answered from the retransmission cache.
    pub retransmits_answered: u64,
    /// Allocations created.
    pub allocations_created: u64,
    /// Allocations refreshed with a non-zero lifetime.
    pub allocations_refreshed: u64,
    /// Allocations deleted by the client (Refresh lifetime 0).
    pub allocations_deleted: u64,
    /// Allocations expired.
    pub allocations_expired: u64,
    /// Allocations ended by the operator ([`Server::end_allocations`](super::Server::end_allocations)).
    pub allocations_kicked: u64,
    /// Allocations deleted because their TCP or TLS connection closed.
    pub allocations_closed: u64,
    /// 486 (quota) answers.
    pub quota_rejections: u64,
    /// Relay socket requests the caller refused.
    pub relay_failures: u64,
    /// Caller returned a RelayId already in use (a daemon bug).
    pub relay_id_collisions: u64,
    /// Packets relayed client -> peer (ChannelData and Send).
    pub to_peer: u64,
    /// ChannelData messages sent peer -> client.
    pub channel_data_to_client: u64,
    /// Data indications sent peer -> client.
    pub data_indications_to_client: u64,
    /// Events dropped because the queue was full.
    pub events_dropped: u64,
}

impl Counters {
    /// Count for one drop reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    /// Total drops.
    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// (name, count) for every drop reason.
    pub fn drops_by_name(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        DropReason::ALL.iter().map(move |r| (r.name(), self.drops[*r as usize]))
    }

    #[inline]
    pub(crate) fn drop(&mut self, reason: DropReason) {
        self.drops[reason as usize] += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_indexed_in_order() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        let mut c = Counters::default();
        c.drop(DropReason::NoPermission);
        assert_eq!(c.dropped(DropReason::NoPermission), 1);
        assert_eq!(c.total_drops(), 1);
        assert_eq!(c.drops_by_name().count(), DropReason::COUNT);
    }
}
