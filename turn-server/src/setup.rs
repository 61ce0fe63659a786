//! From the configuration to the pieces a worker runs: the protocol core's configuration,
//! credentials (generated ones when none are configured), relay addresses, and dropping
//! privileges once everything privileged is done.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result, bail};
use rand::{Rng, distr::Alphanumeric};
use turn_proto::{
    credentials::{CredentialsConfig, PasswordAlgorithm, StaticUser, UserSecret},
    policy::PeerPolicy,
    server::{ServerConfig, Transport},
};

use crate::{
    addresses::interface_addresses,
    config::{Config, lookup_id, parse_net, parse_user},
    relay::{RelayAddress, RelayAddresses},
};

/// Credentials generated because none were configured.
#[derive(Debug, Clone)]
pub struct GeneratedUser {
    pub username: String,
    pub password: String,
}

/// The configured credentials, or a generated user when there are none: `generated`
/// when given (a reload keeps the user printed at start), else a new one.
pub fn credentials(
    config: &Config,
    generated: Option<&GeneratedUser>,
) -> Result<(CredentialsConfig, Option<GeneratedUser>)> {
    let users = config.all_users()?.iter().map(|u| parse_user(u)).collect::<Result<Vec<_>>>()?;
    let rest_secrets: Vec<Vec<u8>> =
        config.all_static_auth_secrets()?.iter().map(|s| s.as_bytes().to_vec()).collect();
    let rest_max_ttl_secs = config.rest_max_ttl_secs;
    if !users.is_empty() || !rest_secrets.is_empty() {
        return Ok((CredentialsConfig { users, rest_secrets, rest_max_ttl_secs }, None));
    }
    let generated = generated.cloned().unwrap_or_else(|| {
        let mut rng = rand::rng();
        let suffix: String = (&mut rng).sample_iter(Alphanumeric).take(6).map(char::from).collect();
        let password: String =
            (&mut rng).sample_iter(Alphanumeric).take(20).map(char::from).collect();
        GeneratedUser { username: format!("turn-{}", suffix.to_lowercase()), password }
    });
    let user = StaticUser {
        name: generated.username.clone(),
        secret: UserSecret::Password(generated.password.clone()),
    };
    Ok((CredentialsConfig { users: vec![user], rest_secrets, rest_max_ttl_secs }, Some(generated)))
}

/// The peer policy: safe defaults plus the configured exceptions.
pub fn peer_policy(config: &Config, relays: &RelayAddresses) -> Result<PeerPolicy> {
    let parse = |list: &[String]| list.iter().map(|n| parse_net(n)).collect::<Result<Vec<_>>>();
    Ok(PeerPolicy {
        allow_loopback: config.allow_loopback_peers,
        allow_private: config.allow_private_peers,
        allow_link_local: false,
        own: own_addresses(config, relays),
        allow_own: config.allow_own_address_peers,
        // Other allocations' relayed addresses are peers (relay to relay).
        own_relays: relays
            .iter()
            .flatten()
            .flat_map(|r| [r.bind, r.advertised])
            .filter(|ip| !ip.is_unspecified())
            .collect(),
        relay_ports: Some((config.min_port, config.max_port)),
        allow: parse(&config.allowed_peer_ips).context("allowed_peer_ips")?,
        deny: parse(&config.denied_peer_ips).context("denied_peer_ips")?,
    })
}

/// The server's own addresses: every address of the host's interfaces as they are now
/// (the daemon reads them again when they change, see [`crate::addresses`]), and the
/// listening, relay and external addresses.
pub fn own_addresses(config: &Config, relays: &RelayAddresses) -> Vec<IpAddr> {
    let mut own: Vec<IpAddr> = interface_addresses();
    own.extend(&config.listening_ips);
    for relay in relays.iter().flatten() {
        own.extend([relay.bind, relay.advertised]);
    }
    own.extend(config.relay_ips.iter().chain(&config.external_ips));
    own.retain(|ip| !ip.is_unspecified());
    own.sort();
    own.dedup();
    own
}

/// The password algorithms to offer (RFC 8489 PASSWORD-ALGORITHMS): SHA-256 then MD5,
/// unless a user has only a pre-hashed MD5 key, which cannot verify SHA-256: then MD5
/// only, so that a client preferring SHA-256 is not offered what its key cannot do.
pub fn password_algorithms(credentials: &CredentialsConfig) -> Vec<PasswordAlgorithm> {
    let md5_keys = credentials.users.iter().any(|u| matches!(u.secret, UserSecret::Md5Key(_)));
    if md5_keys {
        vec![PasswordAlgorithm::Md5]
    } else {
        vec![PasswordAlgorithm::Sha256, PasswordAlgorithm::Md5]
    }
}

/// The protocol core's configuration for one worker.
pub fn server_config(
    config: &Config,
    credentials: &CredentialsConfig,
    relays: &RelayAddresses,
    nonce_secret: [u8; 32],
    seed: u64,
) -> Result<ServerConfig> {
    Ok(ServerConfig {
        realm: config.realm(),
        software: (!config.software.is_empty()).then(|| config.software.clone()),
        credentials: credentials.clone(),
        nonce_secret,
        nonce_lifetime_secs: config.nonce_lifetime_secs,
        default_allocation_lifetime_secs: config.default_lifetime_secs,
        max_allocation_lifetime_secs: config.max_lifetime_secs,
        permission_lifetime_secs: config.permission_lifetime_secs,
        channel_lifetime_secs: config.channel_lifetime_secs,
        max_permissions_per_allocation: config.max_permissions_per_allocation,
        password_algorithms: password_algorithms(credentials),
        relay_ipv4: !relays[0].is_empty(),
        relay_ipv6: !relays[1].is_empty(),
        peer_policy: peer_policy(config, relays)?,
        unauthenticated_responses_per_sec: config.unauthenticated_responses_per_sec,
        unauthenticated_responses_burst: config.unauthenticated_responses_per_sec.saturating_mul(2),
        failed_auth_per_sec: config.failed_auth_per_sec,
        failed_auth_burst: config.failed_auth_per_sec.saturating_mul(2).max(10),
        binding_responses_per_sec: config.binding_responses_per_sec,
        binding_responses_burst: config.binding_responses_per_sec.saturating_mul(2),
        seed,
        ..ServerConfig::default()
    })
}

/// Where relays of each family (`[IPv4, IPv6]`) are bound and what clients are told.
///
/// Per family: the configured relay addresses (several are used in turn); else a specific
/// listening address; else, when listening on that family's wildcard, the host's main
/// address of that family. The advertised address is the configured external address of
/// that family: one for a single relay address, or one per relay address, paired in order.
pub fn relay_addresses(config: &Config) -> Result<RelayAddresses> {
    let mut out: RelayAddresses = [Vec::new(), Vec::new()];
    for (slot, v4) in [(0usize, true), (1, false)] {
        let family = |ip: &&IpAddr| ip.is_ipv4() == v4;
        let listening: Vec<&IpAddr> = config.listening_ips.iter().filter(family).collect();
        let configured: Vec<IpAddr> = config.relay_ips.iter().filter(family).copied().collect();
        let binds = if !configured.is_empty() {
            configured
        } else {
            match listening.iter().find(|ip| !ip.is_unspecified()) {
                Some(ip) => vec![**ip],
                None if !listening.is_empty() => main_address(v4).into_iter().collect(),
                None => Vec::new(),
            }
        };
        let external: Vec<IpAddr> = config.external_ips.iter().filter(family).copied().collect();
        if !external.is_empty() && external.len() != binds.len() {
            bail!(
                "external_ips: {} {} address(es) for {} relay address(es) of that family; give \
                 one per relay address (paired in order), or none",
                external.len(),
                if v4 { "IPv4" } else { "IPv6" },
                binds.len()
            );
        }
        for (i, bind) in binds.iter().enumerate() {
            let advertised = external.get(i).copied().unwrap_or(*bind);
            out[slot].push(RelayAddress { bind: *bind, advertised });
        }
    }
    if out.iter().all(Vec::is_empty) {
        bail!("no relay address: set relay_ips (--relay-ip) to an address of this host");
    }
    Ok(out)
}

/// The host's main address of a family: a global one if there is one, else a private one,
/// else loopback (from the interface list; nothing is sent).
fn main_address(v4: bool) -> Option<IpAddr> {
    let mut candidates: Vec<IpAddr> =
        interface_addresses().into_iter().filter(|ip| ip.is_ipv4() == v4).collect();
    let rank = |ip: &IpAddr| -> u8 {
        match ip {
            IpAddr::V4(a) if a.is_loopback() => 3,
            IpAddr::V4(a) if a.is_private() || a.is_link_local() => 1,
            IpAddr::V6(a) if a.is_loopback() => 3,
            // Link-local (fe80::/10) cannot be used without a scope.
            IpAddr::V6(a) if (a.segments()[0] & 0xffc0) == 0xfe80 => 4,
            IpAddr::V6(a) if (a.segments()[0] & 0xfe00) == 0xfc00 => 1,
            _ => 0,
        }
    };
    candidates.retain(|ip| rank(ip) < 4);
    candidates.sort_by_key(rank);
    candidates.first().copied()
}

/// Raises the open-file limit so that every relay port can hold a socket. Returns the limit
/// now and how many descriptors the relays could use.
pub fn raise_fd_limit(relays: &RelayAddresses, config: &Config) -> (u64, u64) {
    let ports = u64::from(config.max_port) - u64::from(config.min_port) + 1;
    let sockets = ports * relays.iter().map(Vec::len).sum::<usize>() as u64;
    let quota = config.total_quota as u64;
    // Two relay sockets at most per allocation (dual-stack), plus listeners and the rest.
    let capped = if quota > 0 { sockets.min(quota * 2) } else { sockets };
    // One descriptor per TCP or TLS connection too (unlimited connections: room for 64k).
    let connections =
        if config.max_connections > 0 { config.max_connections as u64 } else { 65_536 };
    let need = capped + connections + 4096;
    (raise_nofile(need).0, need)
}

/// Raises RLIMIT_NOFILE towards `need`: the soft limit up to the hard one, and (with the
/// privilege, as root) the hard one up to `fs.nr_open`. Returns (soft, hard) now.
pub fn raise_nofile(need: u64) -> (u64, u64) {
    // SAFETY: plain struct out-parameter.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `lim` is a valid rlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return (0, 0);
    }
    if lim.rlim_cur >= need {
        return (lim.rlim_cur, lim.rlim_max);
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(lim.rlim_max);
    for hard in [need.min(nr_open).max(lim.rlim_max), lim.rlim_max] {
        let new = libc::rlimit { rlim_cur: need.min(hard), rlim_max: hard };
        // SAFETY: a valid rlimit; raising the hard limit fails without the privilege, and
        // then the soft limit up to the current hard one is tried.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            return (new.rlim_cur, new.rlim_max);
        }
    }
    (lim.rlim_cur, lim.rlim_max)
}

/// The URL clients use to reach `addr` over `transport` (RFC 7065): `turn:...?transport=udp`,
/// `turn:...?transport=tcp`, or `turns:...?transport=tcp` for TLS.
pub fn turn_url(transport: Transport, addr: SocketAddr) -> String {
    let (scheme, over) = match transport {
        Transport::Udp => ("turn", "udp"),
        Transport::Tcp => ("turn", "tcp"),
        Transport::Tls => ("turns", "tcp"),
    };
    match addr {
        SocketAddr::V4(a) => format!("{scheme}:{}:{}?transport={over}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("{scheme}:[{}]:{}?transport={over}", a.ip(), a.port()),
    }
}

/// What the daemon runs as once [`drop_privileges`] is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningAs {
    pub uid: u32,
    pub gid: u32,
    /// Capabilities still held (none, or CAP_NET_BIND_SERVICE for relay ports below 1024).
    pub capabilities: Vec<String>,
}

/// Drops what the daemon no longer needs once everything privileged is done (binding,
/// BPF, pins) and before any other thread starts, so that no thread that parses network
/// input ever holds it: the supplementary groups always; `proc_group`, or `proc_user`'s
/// own group, and `proc_user`, when configured; then every capability (effective,
/// permitted, inheritable, ambient) but CAP_NET_BIND_SERVICE when relay ports below 1024
/// are still to be bound. The bounding set stays (an upgrade may start the binary again).
pub fn drop_privileges(config: &Config) -> Result<RunningAs> {
    let user = config.proc_user.as_deref().map(user_ids).transpose()?;
    let gid = match (&config.proc_group, user) {
        (Some(group), _) => Some(lookup_id(group, false)?),
        (None, Some((_, primary))) => Some(primary),
        (None, None) => None,
    };
    // SAFETY: getgroups with a zero size only counts; setgroups/setgid/setuid are plain
    // syscalls through glibc's wrappers, which apply them to every thread.
    unsafe {
        if libc::getgroups(0, std::ptr::null_mut()) > 0 && libc::setgroups(0, std::ptr::null()) != 0
        {
            return Err(std::io::Error::last_os_error())
                .context("cannot drop the supplementary groups");
        }
        if let Some(gid) = gid
            && libc::setgid(gid) != 0
        {
            return Err(std::io::Error::last_os_error())
                .context(format!("cannot switch to group {gid}"));
        }
        if let Some((uid, _)) = user
            && libc::setuid(uid) != 0
        {
            return Err(std::io::Error::last_os_error())
                .context(format!("cannot switch to user {uid}"));
        }
    }
    use caps::{CapSet, Capability, CapsHashSet};
    let held = caps::read(None, CapSet::Permitted).context("reading the capabilities")?;
    let mut keep = CapsHashSet::new();
    if config.min_port < 1024 && held.contains(&Capability::CAP_NET_BIND_SERVICE) {
        keep.insert(Capability::CAP_NET_BIND_SERVICE);
    }
    let dropped = caps::clear(None, CapSet::Ambient)
        .and_then(|()| caps::set(None, CapSet::Inheritable, &CapsHashSet::new()))
        .and_then(|()| caps::set(None, CapSet::Effective, &keep))
        .and_then(|()| caps::set(None, CapSet::Permitted, &keep));
    dropped.context("cannot drop the capabilities")?;
    // SAFETY: getuid/getgid have no preconditions and cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut capabilities: Vec<String> = keep.iter().map(ToString::to_string).collect();
    capabilities.sort();
    Ok(RunningAs { uid, gid, capabilities })
}

/// A user's uid and primary gid, by name or number.
fn user_ids(name: &str) -> Result<(u32, u32)> {
    let uid = lookup_id(name, true)?;
    // SAFETY: getpwuid's static result is read at once.
    let gid = unsafe {
        let pw = libc::getpwuid(uid);
        (!pw.is_null()).then(|| (*pw).pw_gid)
    };
    // A bare uid without a passwd entry: its group is the same number.
    Ok((uid, gid.unwrap_or(uid)))
}

/// The uid the daemon will run as (owner of its pins).
pub fn run_as_uid(config: &Config) -> Result<Option<u32>> {
    config.proc_user.as_deref().map(|u| lookup_id(u, true)).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_credentials_only_without_configured_ones() {
        let (creds, first) = credentials(&Config::default(), None).unwrap();
        let first = first.unwrap();
        assert_eq!(creds.users.len(), 1);
        assert_eq!(creds.users[0].name, first.username);
        assert!(first.password.len() >= 16);
        let config = Config { users: vec!["a:b".into()], ..Config::default() };
        let (creds, generated) = credentials(&config, None).unwrap();
        assert!(generated.is_none());
        assert_eq!(creds.users[0].name, "a");
        let config = Config { static_auth_secrets: vec!["s".into()], ..Config::default() };
        assert!(credentials(&config, None).unwrap().1.is_none());
        // A reload keeps the user generated at start.
        let (again, kept) = credentials(&Config::default(), Some(&first)).unwrap();
        assert_eq!(kept.unwrap().password, first.password);
        assert_eq!(again.users, creds_of(&first));
    }

    fn creds_of(user: &GeneratedUser) -> Vec<StaticUser> {
        vec![StaticUser {
            name: user.username.clone(),
            secret: UserSecret::Password(user.password.clone()),
        }]
    }

    #[test]
    fn relay_address_rules() {
        let config =
            Config { listening_ips: vec!["127.0.0.1".parse().unwrap()], ..Config::default() };
        let r = relay_addresses(&config).unwrap();
        assert_eq!(r[0][0].bind, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert!(r[1].is_empty(), "no IPv6 listener, no IPv6 relay");
        let config = Config {
            listening_ips: vec!["127.0.0.1".parse().unwrap()],
            relay_ips: vec!["127.0.0.2".parse().unwrap()],
            external_ips: vec!["203.0.113.9".parse().unwrap()],
            ..Config::default()
        };
        let r = relay_addresses(&config).unwrap();
        assert_eq!(r[0][0].bind, "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(r[0][0].advertised, "203.0.113.9".parse::<IpAddr>().unwrap());
        // The wildcard finds some address of this host.
        let config =
            Config { listening_ips: vec!["0.0.0.0".parse().unwrap()], ..Config::default() };
        assert_eq!(relay_addresses(&config).unwrap()[0].len(), 1);
        // Several relay addresses, each with its external address.
        let ips = |list: &[&str]| list.iter().map(|s| s.parse().unwrap()).collect::<Vec<_>>();
        let config = Config {
            listening_ips: ips(&["127.0.0.1"]),
            relay_ips: ips(&["127.0.0.2", "127.0.0.3", "::1"]),
            external_ips: ips(&["203.0.113.2", "203.0.113.3"]),
            ..Config::default()
        };
        let r = relay_addresses(&config).unwrap();
        let pairs: Vec<_> =
            r[0].iter().map(|a| (a.bind.to_string(), a.advertised.to_string())).collect();
        assert_eq!(
            pairs,
            vec![
                ("127.0.0.2".into(), "203.0.113.2".into()),
                ("127.0.0.3".into(), "203.0.113.3".into())
            ]
        );
        assert_eq!(r[1].len(), 1);
        let config = Config { external_ips: ips(&["203.0.113.2"]), ..config };
        let err = relay_addresses(&config).unwrap_err();
        assert!(format!("{err:#}").contains("one per relay address"), "{err:#}");
    }

    #[test]
    fn own_addresses_cover_listening_relay_external_and_every_interface_address() {
        let config = Config {
            listening_ips: vec!["192.0.2.2".parse().unwrap()],
            relay_ips: vec!["192.0.2.3".parse().unwrap()],
            external_ips: vec!["203.0.113.9".parse().unwrap()],
            ..Config::default()
        };
        let relays = relay_addresses(&config).unwrap();
        let own = own_addresses(&config, &relays);
        for ip in ["192.0.2.2", "192.0.2.3", "203.0.113.9"] {
            assert!(own.contains(&ip.parse().unwrap()), "{ip}: {own:?}");
        }
        let policy = peer_policy(&config, &relays).unwrap();
        assert!(policy.check_ip(&"::ffff:203.0.113.9".parse().unwrap()).is_err());
        assert!(policy.check_ip(&"203.0.113.10".parse().unwrap()).is_ok());
        // Another allocation's relayed address (advertised or bound, a relay port) is a
        // peer; the listener and other ports on those addresses are not.
        let relay_port = format!(":{}", config.min_port);
        for ok in ["203.0.113.9", "192.0.2.3"] {
            let peer = format!("{ok}{relay_port}").parse().unwrap();
            assert_eq!(policy.check_peer(&peer), Ok(()), "{peer}");
        }
        for denied in ["203.0.113.9:3478", "192.0.2.3:22", "192.0.2.2:49152"] {
            assert!(policy.check_peer(&denied.parse().unwrap()).is_err(), "{denied}");
        }
        // Every interface address of the host, whatever the listeners (loopback at least).
        assert!(own.contains(&"127.0.0.1".parse().unwrap()), "{own:?}");
        for ip in crate::addresses::interface_addresses() {
            assert!(own.contains(&ip), "{ip}: {own:?}");
        }
    }

    #[test]
    fn md5_keys_limit_the_offered_algorithms() {
        let with = |users: &[&str]| {
            let config = Config {
                users: users.iter().map(|u| u.to_string()).collect(),
                ..Config::default()
            };
            password_algorithms(&credentials(&config, None).unwrap().0)
        };
        assert_eq!(with(&["a:pw"]), vec![PasswordAlgorithm::Sha256, PasswordAlgorithm::Md5]);
        let md5 = "carol:0x0123456789abcdef0123456789abcdef";
        assert_eq!(with(&["a:pw", md5]), vec![PasswordAlgorithm::Md5]);
    }

    #[test]
    fn urls() {
        let v4: SocketAddr = "192.0.2.1:3478".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:5349".parse().unwrap();
        assert_eq!(turn_url(Transport::Udp, v4), "turn:192.0.2.1:3478?transport=udp");
        assert_eq!(turn_url(Transport::Tcp, v4), "turn:192.0.2.1:3478?transport=tcp");
        assert_eq!(turn_url(Transport::Tls, v6), "turns:[2001:db8::1]:5349?transport=tcp");
    }
}
