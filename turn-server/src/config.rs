//! Configuration: a TOML file (every key optional, defaults below) overridden by flags.
//! Unknown keys and invalid values are rejected with a message that names the key.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use turn_proto::{
    credentials::{StaticUser, UserSecret},
    policy::IpNet,
};

/// Allocations one user may hold by default: enough for any person's calls, too few for
/// one leaked credential to exhaust the relay ports.
pub const DEFAULT_USER_QUOTA: usize = 100;
/// Allocations the whole server holds by default (about 100 kB of memory per 1,000).
pub const DEFAULT_TOTAL_QUOTA: usize = 100_000;

/// How new client flows are placed on the workers' listener sockets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SteeringMode {
    /// p2c when the eBPF program can be loaded, otherwise the kernel's hash, said in the log.
    #[default]
    Auto,
    /// eBPF: less loaded of two random sockets, flow pinned. An error if BPF is unavailable.
    P2c,
    /// eBPF: the kernel's hash choice, flow pinned. An error if BPF is unavailable.
    Hash,
    /// eBPF: least loaded of all sockets, flow pinned. An error if BPF is unavailable.
    Least,
    /// No program: the kernel's own SO_REUSEPORT hash.
    Off,
}

/// Whether ChannelData is relayed in the kernel (see `fast_path.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FastPathMode {
    /// Every datagram through the workers (userspace).
    #[default]
    Off,
    /// A TC program relays ChannelData of UDP clients both ways in the kernel; everything
    /// else goes up to the workers. An error if it cannot be loaded and attached.
    Tc,
    /// `tc` when the program can be loaded and attached, otherwise off, said in the log.
    Auto,
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Where the admin API listens by default.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/turn-server/admin.sock";

/// A worker's wait after a small pass, by default (see `batch_wait_us`).
pub const DEFAULT_BATCH_WAIT_US: u64 = 200;
/// The longest `batch_wait_us` accepted.
pub const MAX_BATCH_WAIT_US: u64 = 1000;

/// Connections all workers hold at once by default (TCP and TLS together).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Connections one source address holds at once by default: room for a large office
/// behind one NAT address, too few for one address to take the whole server.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 1_000;
/// Connections without an allocation yet (TLS handshake, login) held at once by default:
/// a tenth of the connections, so that however many such connections strangers open,
/// nine tenths stay for clients that logged in.
pub const DEFAULT_MAX_UNAUTHENTICATED_CONNECTIONS: usize = 1_000;
/// ... and per source address by default (an IPv6 address counts by its /64): a client
/// needs one for a few round trips, a large NAT a few dozen at once.
pub const DEFAULT_MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP: usize = 64;
/// Allocations one client address holds at once by default (an IPv6 address counts by
/// its /64), whatever the usernames: as many as the connections a NAT address may hold.
pub const DEFAULT_ADDRESS_QUOTA: usize = 1_000;

/// The whole configuration. Keys are the TOML keys (snake_case).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Port for STUN/TURN over UDP and TCP (default 3478).
    pub listening_port: u16,
    /// Port for TURN over TLS (default 5349; 443 is common where only HTTPS passes).
    pub tls_listening_port: u16,
    /// No UDP listener.
    pub no_udp: bool,
    /// No TCP listener.
    pub no_tcp: bool,
    /// No TLS listener (there is none anyway without `cert` and `pkey`).
    pub no_tls: bool,
    /// TLS certificate chain, PEM (leaf first). With `pkey`, enables the TLS listener.
    pub cert: Option<PathBuf>,
    /// TLS private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub pkey: Option<PathBuf>,
    /// TCP and TLS connections held at once, across workers (0 = unlimited).
    pub max_connections: usize,
    /// TCP and TLS connections one source address holds at once (0 = unlimited); an IPv6
    /// address counts by its /64.
    pub max_connections_per_ip: usize,
    /// TCP and TLS connections that have no allocation yet (in their TLS handshake, or
    /// logging in), held at once across workers (0 = no cap of their own); beyond, a
    /// worker closes one of its own (the oldest that has sent nothing valid yet, else the
    /// oldest logging in) to take the new one, or refuses it.
    pub max_unauthenticated_connections: usize,
    /// ... per source address (an IPv6 address counts by its /64); beyond, refused.
    pub max_unauthenticated_connections_per_ip: usize,
    /// Seconds a TLS client has to complete its handshake.
    pub tls_handshake_timeout_secs: u64,
    /// Seconds a TCP or TLS connection has (after the TLS handshake) to send its first
    /// valid STUN message.
    pub stream_first_message_timeout_secs: u64,
    /// Seconds a TCP or TLS connection has, from its start, to create an allocation.
    pub stream_allocation_timeout_secs: u64,
    /// Seconds a TCP or TLS connection whose allocation ended may stay without one while
    /// it sends nothing.
    pub stream_idle_timeout_secs: u64,
    /// Bytes waiting to be written to one TCP or TLS client at most; more is dropped (a
    /// slow reader loses packets, it does not stall the worker).
    pub stream_write_buffer_bytes: usize,
    /// Addresses to listen on (default: all IPv4 and all IPv6 addresses).
    pub listening_ips: Vec<IpAddr>,
    /// Worker threads, each with one socket per listening address (0 = one per CPU).
    pub workers: usize,
    /// Microseconds a busy worker waits after a pass that found little to do (fewer than
    /// 32 datagrams) before it looks again, so that more datagrams share each system call
    /// and GSO run; a datagram may wait up to this long more. Only while the worker's
    /// rate brings at least 3 datagrams per wait. 0 = never wait.
    pub batch_wait_us: u64,
    /// Placement of new flows: auto, p2c, least, hash or off.
    pub steering: SteeringMode,
    /// Entries of the allocation pin map per listening address (0: sized from
    /// `total_quota` and the relay port range, see [`Config::allocation_pin_entries`]).
    pub steering_pin_entries: u32,
    /// Entries of the program's memo of flows that are not allocations (LRU).
    pub steering_memo_entries: u32,
    /// How long the program remembers a flow that is not an allocation, in milliseconds.
    pub steering_memo_ttl_ms: u32,
    /// Directory in bpffs where the steering maps are pinned for `turn-server load`.
    pub bpf_pin_root: PathBuf,
    /// Relay ChannelData of UDP clients in the kernel: off, tc or auto.
    pub fast_path: FastPathMode,
    /// Group (name or number) allowed to use `turn-server load` and `steering set`
    /// besides root.
    pub admin_group: Option<String>,
    /// Realm for long-term credentials (default: the host name).
    pub realm: Option<String>,
    /// Static users, `name:password` or `name:0x<32 hex digits>` (the MD5 key
    /// MD5(name:realm:password), as coturn's turnadmin prints it).
    pub users: Vec<String>,
    /// Shared secrets of the TURN REST scheme (coturn's static-auth-secret); several are
    /// accepted for rotation.
    pub static_auth_secrets: Vec<String>,
    /// A file of static users, one `name:password` (or `name:0x<md5 key>`) per line (blank
    /// lines and `#` comments skipped), read at start and at every reload: credentials
    /// out of the command line, where every local user could read them.
    pub users_file: Option<PathBuf>,
    /// A file of REST shared secrets, one per line, read at start and at every reload.
    pub static_auth_secrets_file: Option<PathBuf>,
    /// Local addresses relay sockets bind to, at most one per family (default: the
    /// listening address, or the host's main address when listening on a wildcard).
    pub relay_ips: Vec<IpAddr>,
    /// Addresses told to clients as relayed addresses (behind NAT), one per family.
    pub external_ips: Vec<IpAddr>,
    /// Lowest relay port.
    pub min_port: u16,
    /// Highest relay port.
    pub max_port: u16,
    /// Allocation lifetime when the client asks for none or less.
    pub default_lifetime_secs: u32,
    /// Longest allocation lifetime granted.
    pub max_lifetime_secs: u32,
    /// Permission lifetime (RFC 8656: 300).
    pub permission_lifetime_secs: u32,
    /// Channel binding lifetime (RFC 8656: 600).
    pub channel_lifetime_secs: u32,
    /// Nonce lifetime; an older nonce gets 438 Stale Nonce.
    pub nonce_lifetime_secs: u64,
    /// Allocations per user across all workers (0 = unlimited). A REST username
    /// `expiry:user` counts as `user`.
    pub user_quota: usize,
    /// Allocations in total across all workers (0 = unlimited).
    pub total_quota: usize,
    /// Allocations one client address holds across all workers, whatever usernames it
    /// uses (0 = unlimited); an IPv6 address counts by its /64.
    pub address_quota: usize,
    /// Longest accepted lifetime of a REST credential: a username whose expiry is
    /// further in the future is refused (0 = no limit).
    pub rest_max_ttl_secs: u64,
    /// Unauthenticated responses (401, 400, 438) per second per source address, bursts of
    /// twice that (0 = no limit); beyond, requests go unanswered (counted).
    pub unauthenticated_responses_per_sec: u32,
    /// Failed authentications per second per source address, bursts of ten (0 = no
    /// limit); beyond, that address's signed requests are dropped unverified (counted),
    /// except those of a client's 5-tuple that holds an allocation. Only requests with a
    /// nonce the source was given count, so a spoofed source costs its owner nothing.
    pub failed_auth_per_sec: u32,
    /// Binding answers per second per source address, bursts of twice that (0 = no
    /// limit); a 5-tuple that holds an allocation is always answered.
    pub binding_responses_per_sec: u32,
    /// Permissions per allocation.
    pub max_permissions_per_allocation: usize,
    /// Peer addresses allowed even where a default rule denies them (CIDR or address).
    pub allowed_peer_ips: Vec<String>,
    /// Peer addresses denied (CIDR or address).
    pub denied_peer_ips: Vec<String>,
    /// Allow loopback peers (tests and local development only).
    pub allow_loopback_peers: bool,
    /// Allow private, CGNAT and ULA peers (a relay inside a private network).
    pub allow_private_peers: bool,
    /// Allow the server's own addresses as peers (every interface address of the host,
    /// followed as they change, and the listening, relay and external addresses). Off: a
    /// client cannot reach the TURN host's own services through its public address.
    pub allow_own_address_peers: bool,
    /// SOFTWARE attribute in responses ("" for none).
    pub software: String,
    /// After SIGTERM, how long live allocations may go on relaying before the daemon exits.
    pub drain_timeout_secs: u64,
    /// User to run as once sockets are bound and steering is attached.
    pub proc_user: Option<String>,
    /// Group to run as once sockets are bound and steering is attached.
    pub proc_group: Option<String>,
    /// Log format: text or json.
    pub log_format: LogFormat,
    /// Serve Prometheus metrics over HTTP (`GET /metrics`).
    pub prometheus: bool,
    /// Port of the metrics endpoint.
    pub prometheus_port: u16,
    /// Address of the metrics endpoint (loopback by default: metrics tell who uses the
    /// server).
    pub prometheus_address: IpAddr,
    /// Per-user traffic series in the metrics (`turn_user_relayed_bytes`).
    pub metrics_per_user: bool,
    /// Most user series; the other users are summed under `_other`.
    pub metrics_max_users: usize,
    /// The admin API's Unix socket (`turn-server allocations`, `kick`, `drain`, `reload`);
    /// empty for none.
    pub admin_socket: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listening_port: 3478,
            tls_listening_port: 5349,
            no_udp: false,
            no_tcp: false,
            no_tls: false,
            cert: None,
            pkey: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            max_unauthenticated_connections: DEFAULT_MAX_UNAUTHENTICATED_CONNECTIONS,
            max_unauthenticated_connections_per_ip: DEFAULT_MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP,
            tls_handshake_timeout_secs: 10,
            stream_first_message_timeout_secs: 10,
            stream_allocation_timeout_secs: 30,
            stream_idle_timeout_secs: 60,
            stream_write_buffer_bytes: 64 * 1024,
            listening_ips: vec![
                IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            ],
            workers: 0,
            batch_wait_us: DEFAULT_BATCH_WAIT_US,
            steering: SteeringMode::Auto,
            steering_pin_entries: 0,
            steering_memo_entries: turn_common::DEFAULT_MEMO_ENTRIES,
            steering_memo_ttl_ms: turn_common::DEFAULT_MEMO_TTL_MS,
            fast_path: FastPathMode::Off,
            bpf_pin_root: PathBuf::from(crate::bpffs::DEFAULT_ROOT),
            admin_group: None,
            realm: None,
            users: Vec::new(),
            static_auth_secrets: Vec::new(),
            users_file: None,
            static_auth_secrets_file: None,
            relay_ips: Vec::new(),
            external_ips: Vec::new(),
            min_port: 49152,
            max_port: 65535,
            default_lifetime_secs: 600,
            max_lifetime_secs: 3600,
            permission_lifetime_secs: 300,
            channel_lifetime_secs: 600,
            nonce_lifetime_secs: 600,
            user_quota: DEFAULT_USER_QUOTA,
            total_quota: DEFAULT_TOTAL_QUOTA,
            address_quota: DEFAULT_ADDRESS_QUOTA,
            rest_max_ttl_secs: 86_400,
            unauthenticated_responses_per_sec: 20,
            failed_auth_per_sec: 1,
            binding_responses_per_sec: 50,
            max_permissions_per_allocation: 64,
            allowed_peer_ips: Vec::new(),
            denied_peer_ips: Vec::new(),
            allow_loopback_peers: false,
            allow_private_peers: false,
            allow_own_address_peers: false,
            software: concat!("turn-server/", env!("CARGO_PKG_VERSION")).to_owned(),
            drain_timeout_secs: 3600,
            proc_user: None,
            proc_group: None,
            log_format: LogFormat::Text,
            prometheus: false,
            prometheus_port: 9641,
            prometheus_address: IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            metrics_per_user: false,
            metrics_max_users: 100,
            admin_socket: PathBuf::from(DEFAULT_ADMIN_SOCKET),
        }
    }
}

/// The non-blank lines of a credentials file that are not `#` comments, trimmed.
fn read_lines(path: &Path) -> Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

impl Config {
    /// Parses a TOML document; errors name the offending key.
    pub fn from_toml(text: &str) -> Result<Self> {
        let config: Config = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read configuration file {}", path.display()))?;
        Self::from_toml(&text)
            .with_context(|| format!("invalid configuration file {}", path.display()))
    }

    /// Checks values that types alone do not constrain.
    pub fn validate(&self) -> Result<()> {
        if self.listening_ips.is_empty() {
            bail!("listening_ips: at least one address is needed");
        }
        match (&self.cert, &self.pkey) {
            (Some(_), None) => bail!("cert: given without pkey (the certificate's private key)"),
            (None, Some(_)) => bail!("pkey: given without cert (the certificate chain)"),
            _ => {}
        }
        if self.no_udp && self.no_tcp && !self.tls_enabled() {
            bail!(
                "no_udp and no_tcp leave nothing to listen on (TLS needs cert and pkey, \
                 and no_tls unset)"
            );
        }
        if !self.no_tcp
            && self.tls_enabled()
            && self.listening_port != 0
            && self.tls_listening_port == self.listening_port
        {
            bail!(
                "tls_listening_port: {} is also the TCP listening port; give TLS its own port \
                 (or set no_tcp)",
                self.tls_listening_port
            );
        }
        for (key, value) in [
            ("tls_handshake_timeout_secs", self.tls_handshake_timeout_secs),
            ("stream_first_message_timeout_secs", self.stream_first_message_timeout_secs),
            ("stream_allocation_timeout_secs", self.stream_allocation_timeout_secs),
            ("stream_idle_timeout_secs", self.stream_idle_timeout_secs),
        ] {
            if value == 0 {
                bail!("{key}: must be at least 1");
            }
        }
        if self.metrics_per_user && self.metrics_max_users == 0 {
            bail!("metrics_max_users: at least 1 when metrics_per_user is on");
        }
        if self.stream_write_buffer_bytes < 64 * 1024 {
            bail!(
                "stream_write_buffer_bytes: at least 65536 (one message of the largest size \
                 must fit)"
            );
        }
        if self.batch_wait_us > MAX_BATCH_WAIT_US {
            bail!("batch_wait_us: at most {MAX_BATCH_WAIT_US} (a longer wait only adds latency)");
        }
        if self.workers > turn_common::MAX_SOCKETS as usize {
            bail!(
                "workers: {} is more than the {} supported",
                self.workers,
                turn_common::MAX_SOCKETS
            );
        }
        if self.steering_memo_entries == 0 {
            bail!("steering_memo_entries: must be at least 1");
        }
        if self.steering_memo_ttl_ms == 0 {
            bail!("steering_memo_ttl_ms: must be at least 1");
        }
        if self.min_port == 0 || self.min_port > self.max_port {
            bail!(
                "min_port/max_port: need 1 <= min_port <= max_port (got {}-{})",
                self.min_port,
                self.max_port
            );
        }
        // A relay port is a peer (relay to relay); a listening port never is.
        let relay_range = self.min_port..=self.max_port;
        for (key, port) in [
            ("listening_port", self.listening_port),
            ("tls_listening_port", self.tls_listening_port),
        ] {
            if port != 0 && relay_range.contains(&port) {
                bail!(
                    "{key}: {port} is inside the relay port range {}-{} (min_port/max_port); \
                     keep the relay ports apart from the listening ports",
                    self.min_port,
                    self.max_port
                );
            }
        }
        if self.default_lifetime_secs == 0 || self.default_lifetime_secs > self.max_lifetime_secs {
            bail!("default_lifetime_secs: must be at least 1 and at most max_lifetime_secs");
        }
        for (key, value) in [
            ("permission_lifetime_secs", u64::from(self.permission_lifetime_secs)),
            ("channel_lifetime_secs", u64::from(self.channel_lifetime_secs)),
            ("nonce_lifetime_secs", self.nonce_lifetime_secs),
            ("max_permissions_per_allocation", self.max_permissions_per_allocation as u64),
        ] {
            if value == 0 {
                bail!("{key}: must be at least 1");
            }
        }
        for user in &self.all_users()? {
            parse_user(user).context("users")?;
        }
        if self.all_static_auth_secrets()?.iter().any(String::is_empty) {
            bail!("static_auth_secrets: a secret is empty");
        }
        let mut relays = self.relay_ips.clone();
        relays.sort();
        relays.dedup();
        if relays.len() != self.relay_ips.len() {
            bail!("relay_ips: an address is listed twice");
        }
        for ip in &self.relay_ips {
            if ip.is_unspecified() {
                bail!("relay_ips: {ip} is not an address clients can be told");
            }
        }
        for (key, nets) in [
            ("allowed_peer_ips", &self.allowed_peer_ips),
            ("denied_peer_ips", &self.denied_peer_ips),
        ] {
            for net in nets {
                parse_net(net).with_context(|| format!("{key}: {net:?}"))?;
            }
        }
        if self.software.len() > 763 {
            bail!("software: at most 763 bytes");
        }
        for (key, name) in [("proc_user", &self.proc_user), ("proc_group", &self.proc_group)] {
            if let Some(name) = name {
                lookup_id(name, key == "proc_user").with_context(|| format!("{key}: {name}"))?;
            }
        }
        if let Some(group) = &self.admin_group {
            self.admin_gid().with_context(|| format!("admin_group: {group}"))?;
        }
        if let Some(realm) = &self.realm
            && (realm.is_empty() || realm.len() > 763)
        {
            bail!("realm: must be 1 to 763 bytes (RFC 8489 REALM)");
        }
        Ok(())
    }

    /// The static users: `users`, then the lines of `users_file`.
    pub fn all_users(&self) -> Result<Vec<String>> {
        let mut users = self.users.clone();
        if let Some(path) = &self.users_file {
            users.extend(read_lines(path).context("users_file")?);
        }
        Ok(users)
    }

    /// The REST shared secrets: `static_auth_secrets`, then the lines of
    /// `static_auth_secrets_file`.
    pub fn all_static_auth_secrets(&self) -> Result<Vec<String>> {
        let mut secrets = self.static_auth_secrets.clone();
        if let Some(path) = &self.static_auth_secrets_file {
            secrets.extend(read_lines(path).context("static_auth_secrets_file")?);
        }
        Ok(secrets)
    }

    /// The admin group's id, if one is configured.
    pub fn admin_gid(&self) -> Result<Option<u32>> {
        self.admin_group.as_deref().map(|g| lookup_id(g, false)).transpose()
    }

    /// True when the TLS listener is served: a certificate and key are configured and
    /// `no_tls` is not set.
    pub fn tls_enabled(&self) -> bool {
        !self.no_tls && self.cert.is_some() && self.pkey.is_some()
    }

    /// Worker count with 0 resolved to the number of CPUs.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(turn_common::MAX_SOCKETS as usize)
    }

    /// Entries of the allocation pin map: `steering_pin_entries`, or as many allocations
    /// as the daemon can hold: every allocation takes at least one relay port of one
    /// address, so at most a port range per relay address (one per family when none is
    /// configured), and at most `total_quota`.
    pub fn allocation_pin_entries(&self) -> u32 {
        self.pin_entries(1)
    }

    /// Entries of a UDP group's allocation pin map: room for two generations of the daemon
    /// (an upgrade's old and new processes, each within `total_quota`, share the map; the
    /// relay ports they share bound them both).
    pub fn allocation_pin_map_entries(&self) -> u32 {
        self.pin_entries(2)
    }

    fn pin_entries(&self, generations: u32) -> u32 {
        if self.steering_pin_entries > 0 {
            return self.steering_pin_entries;
        }
        let per_family =
            |v4: bool| self.relay_ips.iter().filter(|ip| ip.is_ipv4() == v4).count().max(1);
        let addresses = (per_family(true) + per_family(false)) as u32;
        let ports =
            (u32::from(self.max_port) - u32::from(self.min_port) + 1).saturating_mul(addresses);
        match u32::try_from(self.total_quota) {
            Ok(quota) if quota > 0 => ports.min(quota.saturating_mul(generations)),
            _ => ports,
        }
    }

    /// Realm with the host name as default.
    pub fn realm(&self) -> String {
        self.realm.clone().unwrap_or_else(host_name)
    }
}

/// A static user from `name:password` or `name:0x<hex MD5 key>`.
pub fn parse_user(entry: &str) -> Result<StaticUser> {
    let Some((name, secret)) = entry.split_once(':') else {
        bail!("{entry:?} is not name:password");
    };
    if name.is_empty() || name.len() > 513 {
        bail!("user name {name:?}: 1 to 513 bytes");
    }
    let secret = match secret.strip_prefix("0x") {
        Some(hex) if hex.len() == 32 => {
            let mut key = [0u8; 16];
            for (i, byte) in key.iter_mut().enumerate() {
                *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
                    .with_context(|| format!("user {name}: key 0x{hex} is not hexadecimal"))?;
            }
            UserSecret::Md5Key(key)
        }
        _ if secret.is_empty() => bail!("user {name}: empty password"),
        _ => UserSecret::Password(secret.to_owned()),
    };
    Ok(StaticUser { name: name.to_owned(), secret })
}

/// A peer range: `a.b.c.d/len`, `x::/len`, or a single address.
pub fn parse_net(text: &str) -> Result<IpNet> {
    let (addr, prefix) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix.parse::<u8>().context("bad prefix length")?)),
        None => (text, None),
    };
    let addr: IpAddr = addr.trim().parse().context("not an IP address")?;
    let prefix = prefix.unwrap_or(if addr.is_ipv4() { 32 } else { 128 });
    IpNet::new(addr, prefix).map_err(|_| anyhow::anyhow!("prefix /{prefix} too long for {addr}"))
}

/// The id of a user (`user`) or group by name or number.
pub fn lookup_id(name: &str, user: bool) -> Result<u32> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(id);
    }
    let c_name = std::ffi::CString::new(name.as_bytes()).context("name has a NUL byte")?;
    // SAFETY: valid C string; the static result is read at once.
    let id = unsafe {
        if user {
            let pw = libc::getpwnam(c_name.as_ptr());
            (!pw.is_null()).then(|| (*pw).pw_uid)
        } else {
            let gr = libc::getgrnam(c_name.as_ptr());
            (!gr.is_null()).then(|| (*gr).gr_gid)
        }
    };
    id.with_context(|| {
        format!("no {} named {name:?} on this system", if user { "user" } else { "group" })
    })
}

/// The machine's host name, or "turn-server" when it has none.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "turn-server".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn keys_parse() {
        let c = Config::from_toml(
            "listening_port = 3479\nlistening_ips = [\"127.0.0.1\"]\nworkers = 2\nsteering = \"hash\"\nrealm = \"example.org\"\nlog_format = \"json\"\n",
        )
        .unwrap();
        assert_eq!(c.listening_port, 3479);
        assert_eq!(c.listening_ips, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(c.worker_count(), 2);
        assert_eq!(c.steering, SteeringMode::Hash);
        assert_eq!(c.realm(), "example.org");
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn users_plain_and_hashed() {
        let plain = parse_user("alice:secret:with:colons").unwrap();
        assert_eq!(plain.name, "alice");
        assert_eq!(plain.secret, UserSecret::Password("secret:with:colons".into()));
        let hashed = parse_user("bob:0x0123456789abcdef0123456789ABCDEF").unwrap();
        assert_eq!(
            hashed.secret,
            UserSecret::Md5Key([
                0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab,
                0xcd, 0xef
            ])
        );
        assert!(parse_user("nopassword").is_err());
        assert!(parse_user("carol:").is_err());
        assert!(parse_user("dave:0xZZ23456789abcdef0123456789abcdef").is_err());
        let err = Config::from_toml("users = [\"eve\"]\n").unwrap_err();
        assert!(format!("{err:#}").contains("users"), "{err:#}");
    }

    #[test]
    fn peer_ranges() {
        assert_eq!(parse_net("10.0.0.0/8").unwrap().prefix(), 8);
        assert_eq!(parse_net("192.0.2.1").unwrap().prefix(), 32);
        assert_eq!(parse_net("2001:db8::/32").unwrap().prefix(), 32);
        assert!(parse_net("10.0.0.0/33").is_err());
        assert!(parse_net("example.org").is_err());
        let err = Config::from_toml("denied_peer_ips = [\"10.0.0.0/40\"]\n").unwrap_err();
        assert!(format!("{err:#}").contains("denied_peer_ips"), "{err:#}");
    }

    #[test]
    fn allocation_pins_are_sized_from_ports_and_quota() {
        let c = Config::from_toml("min_port = 50000\nmax_port = 50999\n").unwrap();
        assert_eq!(c.allocation_pin_entries(), 2000);
        let c =
            Config::from_toml("min_port = 50000\nmax_port = 50999\ntotal_quota = 300\n").unwrap();
        assert_eq!(c.allocation_pin_entries(), 300);
        assert_eq!(c.allocation_pin_map_entries(), 600, "two generations' quotas");
        let c = Config::from_toml("steering_pin_entries = 7\ntotal_quota = 300\n").unwrap();
        assert_eq!(c.allocation_pin_entries(), 7);
        assert_eq!(Config::default().allocation_pin_entries(), 2 * 16384);
        let c = Config::from_toml(
            "min_port = 50000\nmax_port = 50999\nrelay_ips = [\"127.0.0.2\", \"127.0.0.3\", \"127.0.0.4\"]\n",
        )
        .unwrap();
        assert_eq!(c.allocation_pin_entries(), 4000, "3 IPv4 relay addresses, 1 IPv6");
    }

    #[test]
    fn port_range_and_lifetimes_are_checked() {
        let err = Config::from_toml("min_port = 60000\nmax_port = 50000\n").unwrap_err();
        assert!(format!("{err:#}").contains("min_port"), "{err:#}");
        let err = Config::from_toml("default_lifetime_secs = 7200\n").unwrap_err();
        assert!(format!("{err:#}").contains("default_lifetime_secs"), "{err:#}");
        let err = Config::from_toml("relay_ips = [\"0.0.0.0\"]\n").unwrap_err();
        assert!(format!("{err:#}").contains("relay_ips"), "{err:#}");
    }

    #[test]
    fn stream_settings_are_checked() {
        let c = Config::from_toml("cert = \"/c.pem\"\npkey = \"/k.pem\"\n").unwrap();
        assert!(c.tls_enabled());
        assert!(!Config::default().tls_enabled(), "no certificate, no TLS");
        let c = Config::from_toml("cert = \"/c\"\npkey = \"/k\"\nno_tls = true\n").unwrap();
        assert!(!c.tls_enabled());
        let err = Config::from_toml("cert = \"/c.pem\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("pkey"), "{err:#}");
        let err = Config::from_toml("pkey = \"/k.pem\"\n").unwrap_err();
        assert!(format!("{err:#}").contains("cert"), "{err:#}");
        let err = Config::from_toml("no_udp = true\nno_tcp = true\n").unwrap_err();
        assert!(format!("{err:#}").contains("nothing to listen on"), "{err:#}");
        let err = Config::from_toml(
            "cert = \"/c\"\npkey = \"/k\"\nlistening_port = 443\ntls_listening_port = 443\n",
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("tls_listening_port"), "{err:#}");
        let err = Config::from_toml("tls_handshake_timeout_secs = 0\n").unwrap_err();
        assert!(format!("{err:#}").contains("tls_handshake_timeout_secs"), "{err:#}");
        let err = Config::from_toml("stream_write_buffer_bytes = 1000\n").unwrap_err();
        assert!(format!("{err:#}").contains("stream_write_buffer_bytes"), "{err:#}");
        let err = Config::from_toml("batch_wait_us = 5000\n").unwrap_err();
        assert!(format!("{err:#}").contains("batch_wait_us: at most 1000"), "{err:#}");
        assert_eq!(Config::from_toml("batch_wait_us = 0\n").unwrap().batch_wait_us, 0);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("listening_prot = 1\n").unwrap_err().to_string();
        assert!(err.contains("listening_prot"), "{err}");
    }

    #[test]
    fn invalid_value_is_named() {
        let err = Config::from_toml("steering = \"round-robin\"\n").unwrap_err().to_string();
        assert!(err.contains("steering"), "{err}");
        let err = Config::from_toml("workers = 1000\n").unwrap_err().to_string();
        assert!(err.contains("workers"), "{err}");
        let err = Config::from_toml("listening_port = 70000\n").unwrap_err().to_string();
        assert!(err.contains("listening_port"), "{err}");
        // A listening port inside the relay range would be a relay-to-relay peer.
        let err = Config::from_toml("listening_port = 50000\n").unwrap_err().to_string();
        assert!(err.contains("listening_port") && err.contains("49152-65535"), "{err}");
        let err = Config::from_toml("min_port = 5000\nmax_port = 6000\n").unwrap_err().to_string();
        assert!(err.contains("tls_listening_port"), "{err}");
    }
}

#[cfg(test)]
mod doc_tests {
    use super::*;

    /// docs/configuration.md lists every key the configuration accepts.
    #[test]
    fn every_key_is_documented() {
        let doc = include_str!("../../docs/configuration.md");
        let keys = toml::to_string(&Config {
            realm: Some("x".into()),
            admin_group: Some("0".into()),
            proc_user: Some("0".into()),
            proc_group: Some("0".into()),
            cert: Some("c".into()),
            pkey: Some("k".into()),
            ..Config::default()
        })
        .unwrap();
        for line in keys.lines() {
            let key = line.split('=').next().unwrap().trim();
            assert!(doc.contains(&format!("`{key}`")), "docs/configuration.md misses `{key}`");
        }
    }
}
