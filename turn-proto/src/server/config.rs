//! Server configuration.

use crate::credentials::{CredentialsConfig, CredentialsError, PasswordAlgorithm};
use crate::policy::PeerPolicy;

/// Everything a [`Server`](super::Server) needs to know. All workers of a
/// daemon should share the same configuration (in particular
/// `nonce_secret`, so that a nonce minted by one worker validates on
/// another).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The REALM (RFC 8489 §14.9), e.g. the provider's domain name.
    pub realm: String,
    /// SOFTWARE attribute added to every response, if set.
    pub software: Option<String>,
    /// Static users and REST secrets.
    pub credentials: CredentialsConfig,
    /// Key for stateless nonces: random, shared by all workers.
    pub nonce_secret: [u8; 32],
    /// Nonce validity; older nonces get 438 (Stale Nonce). Default 600 s.
    pub nonce_lifetime_secs: u64,
    /// Password algorithms offered in PASSWORD-ALGORITHMS, in order of
    /// preference (RFC 8489 §9.2.4). Empty disables the "nonce cookie" and
    /// algorithm negotiation (clients then use MD5 and MESSAGE-INTEGRITY).
    /// Default: SHA-256, then MD5.
    pub password_algorithms: Vec<PasswordAlgorithm>,
    /// Set the "Username anonymity" feature bit, which makes RFC 8489
    /// clients send USERHASH instead of USERNAME. USERHASH only works for
    /// static users (not REST names), so this defaults to false. USERHASH
    /// from a client is accepted either way.
    pub username_anonymity: bool,
    /// Allocation lifetime when the client asks for less or nothing
    /// (RFC 8656 §7.2). Default 600 s.
    pub default_allocation_lifetime_secs: u32,
    /// Maximum allocation lifetime. Default 3600 s.
    pub max_allocation_lifetime_secs: u32,
    /// Permission lifetime (RFC 8656 §9: 300 s).
    pub permission_lifetime_secs: u32,
    /// Channel binding lifetime (RFC 8656 §12: 600 s).
    pub channel_lifetime_secs: u32,
    /// How long an expired channel number and peer stay reserved for the
    /// same pairing (RFC 8656 §12: 300 s).
    pub channel_holddown_secs: u32,
    /// Cap on permissions per allocation (508 beyond). Default 64.
    pub max_permissions_per_allocation: usize,
    /// Cap on channel bindings per allocation, counting those in
    /// hold-down (508 beyond). Default 64.
    pub max_channels_per_allocation: usize,
    /// Cap on allocations held by this server (one worker); 508 beyond.
    /// Cross-worker limits go through [`Quota`](super::Quota).
    pub max_allocations: usize,
    /// Offer IPv4 relayed addresses.
    pub relay_ipv4: bool,
    /// Offer IPv6 relayed addresses.
    pub relay_ipv6: bool,
    /// The daemon can send with the DF bit set. When false, DONT-FRAGMENT
    /// is treated as an unknown comprehension-required attribute (420 in
    /// Allocate, Send indication dropped), per RFC 8656 §7.2 step 4 and §11.2.
    pub dont_fragment: bool,
    /// Which peers may be reached.
    pub peer_policy: PeerPolicy,
    /// Responses remembered for retransmitted requests (bounded ring).
    pub retransmit_cache_entries: usize,
    /// How long a remembered response is replayed (RFC 8489 transactions
    /// last at most 39.5 s). Default 40 s.
    pub retransmit_cache_ttl_secs: u32,
    /// Pending [`Event`](super::Event)s kept before the oldest are dropped.
    pub event_queue_capacity: usize,
    /// 5-tuples of recently ended allocations remembered against replayed Allocate
    /// requests (bounded; see `replay.rs`). Default 16384.
    pub replay_tombstones: usize,
    /// Unauthenticated responses (401, 400, 438) per second and source address, and the
    /// burst allowed (0: no limit). Default 20 and 40.
    pub unauthenticated_responses_per_sec: u32,
    pub unauthenticated_responses_burst: u32,
    /// Failed authentications per second and source address, and the burst; beyond,
    /// signed requests from that source's 5-tuples that hold no allocation are dropped
    /// unverified (0: no limit). Only requests with a nonce the source was given count, so
    /// a spoofed source costs its owner nothing; a 5-tuple that holds an allocation counts
    /// its own failures, at the same rate, apart from everyone else's. Default 1 and 10.
    pub failed_auth_per_sec: u32,
    pub failed_auth_burst: u32,
    /// Binding answers per second and source address, and the burst (0: no limit); a
    /// 5-tuple that holds an allocation is not limited. Default 50 and 100.
    pub binding_responses_per_sec: u32,
    pub binding_responses_burst: u32,
    /// Buckets of each per-source limiter (a fixed table, whatever the number of
    /// sources; colliding sources share one). Default 16384.
    pub source_limit_slots: usize,
    /// Seed for the transaction IDs of Data indications (not security
    /// relevant; give each worker a different random value).
    pub seed: u64,
    /// Announce the channel bindings a kernel fast path may relay
    /// ([`Server::poll_fast_path`](super::Server::poll_fast_path)); off, nothing is queued.
    /// Fixed for a server's life: [`Server::apply`](super::Server::apply) keeps its own.
    pub fast_path: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            realm: "turn.invalid".into(),
            software: None,
            credentials: CredentialsConfig::default(),
            nonce_secret: [0; 32],
            nonce_lifetime_secs: 600,
            password_algorithms: vec![PasswordAlgorithm::Sha256, PasswordAlgorithm::Md5],
            username_anonymity: false,
            default_allocation_lifetime_secs: 600,
            max_allocation_lifetime_secs: 3600,
            permission_lifetime_secs: 300,
            channel_lifetime_secs: 600,
            channel_holddown_secs: 300,
            max_permissions_per_allocation: 64,
            max_channels_per_allocation: 64,
            max_allocations: 100_000,
            relay_ipv4: true,
            relay_ipv6: true,
            dont_fragment: false,
            peer_policy: PeerPolicy::default(),
            retransmit_cache_entries: 4096,
            retransmit_cache_ttl_secs: 40,
            event_queue_capacity: 4096,
            replay_tombstones: 16_384,
            unauthenticated_responses_per_sec: 20,
            unauthenticated_responses_burst: 40,
            failed_auth_per_sec: 1,
            failed_auth_burst: 10,
            binding_responses_per_sec: 50,
            binding_responses_burst: 100,
            source_limit_slots: 16_384,
            seed: 0x5eed,
            fast_path: false,
        }
    }
}

/// An unusable configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Empty realm or longer than 763 bytes.
    #[error("realm must be 1..=763 bytes")]
    Realm,
    /// SOFTWARE longer than 763 bytes.
    #[error("software must be at most 763 bytes")]
    Software,
    /// A lifetime is zero or default > max.
    #[error("lifetimes must be non-zero and default <= max")]
    Lifetimes,
    /// Nonce lifetime is zero.
    #[error("nonce lifetime must be non-zero")]
    NonceLifetime,
    /// Neither IPv4 nor IPv6 relaying is enabled.
    #[error("at least one relay address family must be enabled")]
    NoFamily,
    /// Credential problem.
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
}

impl ServerConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.realm.is_empty() || self.realm.len() > crate::stun::attr::MAX_TEXT_LEN {
            return Err(ConfigError::Realm);
        }
        if self.software.as_ref().is_some_and(|s| s.len() > crate::stun::attr::MAX_TEXT_LEN) {
            return Err(ConfigError::Software);
        }
        if self.default_allocation_lifetime_secs == 0
            || self.max_allocation_lifetime_secs < self.default_allocation_lifetime_secs
            || self.permission_lifetime_secs == 0
            || self.channel_lifetime_secs == 0
        {
            return Err(ConfigError::Lifetimes);
        }
        if self.nonce_lifetime_secs == 0 {
            return Err(ConfigError::NonceLifetime);
        }
        if !self.relay_ipv4 && !self.relay_ipv6 {
            return Err(ConfigError::NoFamily);
        }
        Ok(())
    }
}
