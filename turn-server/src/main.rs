//! `turn-server`: the daemon and its command-line tools.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use turn_common::Mode;
use turn_server::{
    admin::{self, AdminRequest},
    config::{Config, DEFAULT_ADMIN_SOCKET, FastPathMode, LogFormat, SteeringMode},
    inspect,
    worker::AllocationInfo,
};

/// A TURN/STUN server whose listeners are balanced across worker threads by an eBPF
/// SO_REUSEPORT program (power of two choices over live load, flows pinned).
///
/// With no options it serves UDP and TCP 3478 on all addresses with an embedded default
/// configuration, and TLS on 5349 once --cert and --pkey are given. Options keep coturn's
/// names where they mean the same thing.
#[derive(Parser, Debug)]
#[command(name = "turn-server", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Parse and validate a configuration file, print the effective configuration.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Show the running daemon's per-worker load: live allocations, pinned allocations and
    /// remembered flows, packets/s (both directions), share, score, new flows/s,
    /// hand-offs, inbox and receive-queue pressure, drops, and the imbalance (busiest / mean).
    Load {
        #[command(flatten)]
        target: Target,
        /// Sampling interval in seconds (packet and byte rates are averaged over it).
        #[arg(long, default_value_t = 1.0, value_name = "SECS")]
        interval: f64,
        /// Refresh every interval until interrupted.
        #[arg(long)]
        watch: bool,
        /// Print JSON (one object per sample) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Inspect or change the running daemon's steering.
    Steering {
        #[command(subcommand)]
        action: SteeringAction,
    },
    /// List the running daemon's allocations: user, client, transport, relayed addresses,
    /// age, lifetime left, packets and bytes each way (admin API).
    Allocations {
        #[command(flatten)]
        admin: AdminSocket,
        /// Print the JSON reply instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// End the allocations of USER, or of one client (--client), at once: their relayed
    /// ports are freed and a TCP/TLS client's connection is closed (admin API). The
    /// client may allocate again unless its credentials are removed too.
    Kick {
        /// The username (for REST credentials, the whole `expiry:user` name).
        #[arg(required_unless_present = "client")]
        user: Option<String>,
        /// Only the allocations of this client address (IP:PORT as `allocations` shows).
        #[arg(long, value_name = "IP:PORT")]
        client: Option<SocketAddr>,
        #[command(flatten)]
        admin: AdminSocket,
    },
    /// Stop taking new allocations (Allocate gets 508 Insufficient Capacity) while the
    /// live ones relay on, e.g. before maintenance; `undrain` ends it (admin API).
    Drain {
        #[command(flatten)]
        admin: AdminSocket,
    },
    /// Take new allocations again after `drain` (admin API).
    Undrain {
        #[command(flatten)]
        admin: AdminSocket,
    },
    /// Reload the configuration file and the TLS certificate, as SIGHUP does: users, REST
    /// secrets, peer rules, quotas, limits and lifetimes change without dropping a live
    /// allocation; a bad file is refused and the running configuration stays (admin API).
    Reload {
        #[command(flatten)]
        admin: AdminSocket,
    },
    /// Show the running daemon's listeners, allocations, connections and drain state
    /// (admin API).
    Status {
        #[command(flatten)]
        admin: AdminSocket,
    },
    /// Upgrade without dropping a call, as SIGUSR2 does: start the binary now on disk, with
    /// the configuration file read anew, as a new generation that joins every listener and
    /// takes new flows, new connections, the metrics endpoint and the admin API; the
    /// running process serves its live allocations and connections until they end (at
    /// most drain_timeout_secs) and exits. Answers once the new process serves, or why it
    /// could not (then the running one keeps every role). See docs/operations.md.
    Upgrade {
        #[command(flatten)]
        admin: AdminSocket,
    },
}

/// Which running daemon's admin API to use.
#[derive(Args, Debug)]
struct AdminSocket {
    /// The daemon's admin_socket.
    #[arg(long = "socket", default_value = DEFAULT_ADMIN_SOCKET, value_name = "PATH")]
    socket: PathBuf,
}

#[derive(Subcommand, Debug)]
enum SteeringAction {
    /// Change how NEW client flows are placed (live flows keep their worker). Root or the
    /// configured admin_group only.
    Set {
        /// p2c: less loaded of two random workers; least: least loaded of all workers;
        /// hash: the kernel's hash choice.
        #[arg(value_enum)]
        mode: RuntimeMode,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum RuntimeMode {
    P2c,
    Least,
    Hash,
}

/// Which running daemon to talk to.
#[derive(Args, Debug)]
struct Target {
    /// The daemon's bpf_pin_root.
    #[arg(long, default_value = turn_server::bpffs::DEFAULT_ROOT, value_name = "DIR")]
    pin_root: PathBuf,
    /// The daemon's process id (needed only when several run).
    #[arg(long)]
    pid: Option<u32>,
}

/// Flags of the daemon; each overrides the configuration file's key of the same meaning.
#[derive(Args, Debug)]
struct ServeArgs {
    /// TOML configuration file (every key optional; see docs/configuration.md).
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Port for STUN/TURN over UDP and TCP [config: listening_port, default 3478].
    #[arg(short = 'p', long = "listening-port", value_name = "PORT")]
    listening_port: Option<u16>,
    /// Port for TURN over TLS [config: tls_listening_port, default 5349].
    #[arg(long = "tls-listening-port", value_name = "PORT")]
    tls_listening_port: Option<u16>,
    /// No UDP listener [config: no_udp].
    #[arg(long = "no-udp")]
    no_udp: bool,
    /// No TCP listener [config: no_tcp].
    #[arg(long = "no-tcp")]
    no_tcp: bool,
    /// No TLS listener [config: no_tls].
    #[arg(long = "no-tls")]
    no_tls: bool,
    /// TLS certificate chain, PEM; with --pkey enables TLS (reloaded on SIGHUP or change)
    /// [config: cert].
    #[arg(long = "cert", value_name = "FILE")]
    cert: Option<PathBuf>,
    /// TLS private key, PEM [config: pkey].
    #[arg(long = "pkey", value_name = "FILE")]
    pkey: Option<PathBuf>,
    /// TCP and TLS connections at once, 0 = unlimited [config: max_connections, default 10000].
    #[arg(long = "max-connections", value_name = "N")]
    max_connections: Option<usize>,
    /// TCP and TLS connections per source address (IPv6: per /64), 0 = unlimited
    /// [config: max_connections_per_ip, default 1000].
    #[arg(long = "max-connections-per-ip", value_name = "N")]
    max_connections_per_ip: Option<usize>,
    /// TCP and TLS connections without an allocation yet (handshake, login), 0 = no cap of
    /// their own [config: max_unauthenticated_connections, default 1000].
    #[arg(long = "max-unauthenticated-connections", value_name = "N")]
    max_unauthenticated_connections: Option<usize>,
    /// ... per source address (IPv6: per /64) [config:
    /// max_unauthenticated_connections_per_ip, default 64].
    #[arg(long = "max-unauthenticated-connections-per-ip", value_name = "N")]
    max_unauthenticated_connections_per_ip: Option<usize>,
    /// Seconds to complete a TLS handshake [config: tls_handshake_timeout_secs, default 10].
    #[arg(long = "tls-handshake-timeout", value_name = "SECS")]
    tls_handshake_timeout: Option<u64>,
    /// Seconds for a connection's first valid STUN message
    /// [config: stream_first_message_timeout_secs, default 10].
    #[arg(long = "stream-first-message-timeout", value_name = "SECS")]
    stream_first_message_timeout: Option<u64>,
    /// Seconds for a connection to allocate [config: stream_allocation_timeout_secs, default 30].
    #[arg(long = "stream-allocation-timeout", value_name = "SECS")]
    stream_allocation_timeout: Option<u64>,
    /// Seconds a connection without allocation may stay silent
    /// [config: stream_idle_timeout_secs, default 60].
    #[arg(long = "stream-idle-timeout", value_name = "SECS")]
    stream_idle_timeout: Option<u64>,
    /// Address to listen on; repeat for several [config: listening_ips, default 0.0.0.0 and ::].
    #[arg(short = 'L', long = "listening-ip", value_name = "IP")]
    listening_ip: Vec<IpAddr>,
    /// Worker threads, one socket each per address [config: workers, default: one per CPU].
    #[arg(long = "workers", value_name = "N")]
    workers: Option<usize>,
    /// Microseconds a busy worker (at least 3 datagrams per wait) waits after a pass with fewer than 32 datagrams before looking again: fewer wake-ups and system calls per packet at paced rates, up to this much added delay per hop; 0 = never [config: batch_wait_us, default 200].
    #[arg(long = "batch-wait-us", value_name = "US")]
    batch_wait_us: Option<u64>,
    /// Relay ChannelData of UDP clients in the kernel (a TC program): off, tc, or auto
    /// (tc when it can be loaded) [config: fast_path, default off].
    #[arg(long = "fast-path", value_enum)]
    fast_path: Option<FastPathMode>,
    /// Placement of new client flows on the workers [config: steering, default auto].
    #[arg(long = "steering", value_enum)]
    steering: Option<SteeringMode>,
    /// Allocation pins per address, 0 = sized from --total-quota and the port range
    /// [config: steering_pin_entries, default 0].
    #[arg(long = "steering-pin-entries", value_name = "N")]
    steering_pin_entries: Option<u32>,
    /// Flows that are not allocations the eBPF program remembers per address (LRU)
    /// [config: steering_memo_entries, default 65536].
    #[arg(long = "steering-memo-entries", value_name = "N")]
    steering_memo_entries: Option<u32>,
    /// How long the program remembers such a flow, ms [config: steering_memo_ttl_ms, default 10000].
    #[arg(long = "steering-memo-ttl-ms", value_name = "MS")]
    steering_memo_ttl_ms: Option<u32>,
    /// Where steering maps are pinned [config: bpf_pin_root, default /sys/fs/bpf/turn-server].
    #[arg(long = "bpf-pin-root", value_name = "DIR")]
    bpf_pin_root: Option<PathBuf>,
    /// Group allowed to use `load` and `steering set` besides root [config: admin_group].
    #[arg(long = "admin-group", value_name = "GROUP")]
    admin_group: Option<String>,
    /// Realm for long-term credentials [config: realm, default: the host name].
    #[arg(short = 'r', long = "realm")]
    realm: Option<String>,
    /// Static user NAME:PASSWORD (or NAME:0xMD5KEY); repeat for several. Anyone on the host
    /// can read a command line (/proc/PID/cmdline): prefer --users-file [config: users].
    #[arg(short = 'u', long = "user", value_name = "NAME:PASS")]
    user: Vec<String>,
    /// File of static users, one NAME:PASS per line, re-read on reload [config: users_file].
    #[arg(long = "users-file", value_name = "FILE")]
    users_file: Option<PathBuf>,
    /// Shared secret of TURN REST credentials; repeat for rotation. Readable by anyone on
    /// the host in /proc/PID/cmdline: prefer --static-auth-secret-file
    /// [config: static_auth_secrets].
    #[arg(long = "static-auth-secret", value_name = "SECRET")]
    static_auth_secret: Vec<String>,
    /// File of REST shared secrets, one per line, re-read on reload
    /// [config: static_auth_secrets_file].
    #[arg(long = "static-auth-secret-file", value_name = "FILE")]
    static_auth_secret_file: Option<PathBuf>,
    /// Local address relay sockets bind to; repeat, several per family are used in turn
    /// [config: relay_ips].
    #[arg(long = "relay-ip", value_name = "IP")]
    relay_ip: Vec<IpAddr>,
    /// Relayed address told to clients (behind NAT), one per relay address of its family
    /// [config: external_ips].
    #[arg(short = 'X', long = "external-ip", value_name = "IP")]
    external_ip: Vec<IpAddr>,
    /// Lowest relay port [config: min_port, default 49152].
    #[arg(long = "min-port", value_name = "PORT")]
    min_port: Option<u16>,
    /// Highest relay port [config: max_port, default 65535].
    #[arg(long = "max-port", value_name = "PORT")]
    max_port: Option<u16>,
    /// Longest allocation lifetime in seconds [config: max_lifetime_secs, default 3600].
    #[arg(long = "max-allocate-lifetime", value_name = "SECS")]
    max_allocate_lifetime: Option<u32>,
    /// Allocations per user across workers, 0 = unlimited [config: user_quota, default 100].
    #[arg(long = "user-quota", value_name = "N")]
    user_quota: Option<usize>,
    /// Allocations per client address (IPv6: per /64) whatever the usernames, 0 = unlimited
    /// [config: address_quota, default 1000].
    #[arg(long = "address-quota", value_name = "N")]
    address_quota: Option<usize>,
    /// 401/400/438 answers per second per source address, 0 = no limit
    /// [config: unauthenticated_responses_per_sec, default 20].
    #[arg(long = "unauthenticated-responses-per-sec", value_name = "N")]
    unauthenticated_responses_per_sec: Option<u32>,
    /// Failed authentications per second per source address, 0 = no limit
    /// [config: failed_auth_per_sec, default 1].
    #[arg(long = "failed-auth-per-sec", value_name = "N")]
    failed_auth_per_sec: Option<u32>,
    /// Binding answers per second per source address, 0 = no limit
    /// [config: binding_responses_per_sec, default 50].
    #[arg(long = "binding-responses-per-sec", value_name = "N")]
    binding_responses_per_sec: Option<u32>,
    /// Longest accepted REST credential lifetime in seconds, 0 = no limit
    /// [config: rest_max_ttl_secs, default 86400].
    #[arg(long = "rest-max-ttl", value_name = "SECS")]
    rest_max_ttl: Option<u64>,
    /// Allocations in total, 0 = unlimited [config: total_quota, default 100000].
    #[arg(long = "total-quota", value_name = "N")]
    total_quota: Option<usize>,
    /// Peer address or CIDR range allowed despite the default rules; repeat [config: allowed_peer_ips].
    #[arg(long = "allowed-peer-ip", value_name = "CIDR")]
    allowed_peer_ip: Vec<String>,
    /// Peer address or CIDR range denied; repeat [config: denied_peer_ips].
    #[arg(long = "denied-peer-ip", value_name = "CIDR")]
    denied_peer_ip: Vec<String>,
    /// Allow loopback peers (tests, local development) [config: allow_loopback_peers].
    #[arg(long = "allow-loopback-peers")]
    allow_loopback_peers: bool,
    /// Allow private, CGNAT and ULA peers [config: allow_private_peers].
    #[arg(long = "allow-private-peers")]
    allow_private_peers: bool,
    /// Allow the server's own addresses as peers [config: allow_own_address_peers].
    #[arg(long = "allow-own-address-peers")]
    allow_own_address_peers: bool,
    /// Seconds live allocations keep relaying after SIGTERM [config: drain_timeout_secs, default 3600; also how long an upgraded process serves what it has].
    #[arg(long = "drain-timeout", value_name = "SECS")]
    drain_timeout: Option<u64>,
    /// User to run as after setup [config: proc_user].
    #[arg(long = "proc-user", value_name = "USER")]
    proc_user: Option<String>,
    /// Group to run as after setup [config: proc_group].
    #[arg(long = "proc-group", value_name = "GROUP")]
    proc_group: Option<String>,
    /// Log format [config: log_format, default text].
    #[arg(long = "log-format", value_enum)]
    log_format: Option<LogFormat>,
    /// Serve Prometheus metrics on http://ADDRESS:PORT/metrics [config: prometheus].
    #[arg(long = "prometheus")]
    prometheus: bool,
    /// Port of the metrics endpoint [config: prometheus_port, default 9641].
    #[arg(long = "prometheus-port", value_name = "PORT")]
    prometheus_port: Option<u16>,
    /// Address of the metrics endpoint [config: prometheus_address, default 127.0.0.1].
    #[arg(long = "prometheus-address", value_name = "IP")]
    prometheus_address: Option<IpAddr>,
    /// Per-user traffic series in the metrics [config: metrics_per_user].
    #[arg(long = "metrics-per-user")]
    metrics_per_user: bool,
    /// Unix socket of the admin API, "" for none
    /// [config: admin_socket, default /run/turn-server/admin.sock].
    #[arg(long = "admin-socket", value_name = "PATH")]
    admin_socket: Option<String>,
}

impl ServeArgs {
    fn config(&self) -> Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(port) = self.listening_port {
            config.listening_port = port;
        }
        if let Some(port) = self.tls_listening_port {
            config.tls_listening_port = port;
        }
        config.no_udp |= self.no_udp;
        config.no_tcp |= self.no_tcp;
        config.no_tls |= self.no_tls;
        if let Some(path) = &self.cert {
            config.cert = Some(path.clone());
        }
        if let Some(path) = &self.pkey {
            config.pkey = Some(path.clone());
        }
        if let Some(n) = self.max_connections {
            config.max_connections = n;
        }
        if let Some(n) = self.max_connections_per_ip {
            config.max_connections_per_ip = n;
        }
        if let Some(n) = self.max_unauthenticated_connections {
            config.max_unauthenticated_connections = n;
        }
        if let Some(n) = self.max_unauthenticated_connections_per_ip {
            config.max_unauthenticated_connections_per_ip = n;
        }
        if let Some(secs) = self.tls_handshake_timeout {
            config.tls_handshake_timeout_secs = secs;
        }
        if let Some(secs) = self.stream_first_message_timeout {
            config.stream_first_message_timeout_secs = secs;
        }
        if let Some(secs) = self.stream_allocation_timeout {
            config.stream_allocation_timeout_secs = secs;
        }
        if let Some(secs) = self.stream_idle_timeout {
            config.stream_idle_timeout_secs = secs;
        }
        if !self.listening_ip.is_empty() {
            config.listening_ips = self.listening_ip.clone();
        }
        if let Some(workers) = self.workers {
            config.workers = workers;
        }
        if let Some(us) = self.batch_wait_us {
            config.batch_wait_us = us;
        }
        if let Some(mode) = self.fast_path {
            config.fast_path = mode;
        }
        if let Some(steering) = self.steering {
            config.steering = steering;
        }
        if let Some(n) = self.steering_pin_entries {
            config.steering_pin_entries = n;
        }
        if let Some(n) = self.steering_memo_entries {
            config.steering_memo_entries = n;
        }
        if let Some(ms) = self.steering_memo_ttl_ms {
            config.steering_memo_ttl_ms = ms;
        }
        if let Some(root) = &self.bpf_pin_root {
            config.bpf_pin_root = root.clone();
        }
        if let Some(group) = &self.admin_group {
            config.admin_group = Some(group.clone());
        }
        if let Some(realm) = &self.realm {
            config.realm = Some(realm.clone());
        }
        if !self.user.is_empty() {
            config.users = self.user.clone();
        }
        if !self.static_auth_secret.is_empty() {
            config.static_auth_secrets = self.static_auth_secret.clone();
        }
        if let Some(path) = &self.users_file {
            config.users_file = Some(path.clone());
        }
        if let Some(path) = &self.static_auth_secret_file {
            config.static_auth_secrets_file = Some(path.clone());
        }
        if !self.relay_ip.is_empty() {
            config.relay_ips = self.relay_ip.clone();
        }
        if !self.external_ip.is_empty() {
            config.external_ips = self.external_ip.clone();
        }
        if let Some(port) = self.min_port {
            config.min_port = port;
        }
        if let Some(port) = self.max_port {
            config.max_port = port;
        }
        if let Some(secs) = self.max_allocate_lifetime {
            config.max_lifetime_secs = secs;
        }
        if let Some(n) = self.user_quota {
            config.user_quota = n;
        }
        if let Some(n) = self.address_quota {
            config.address_quota = n;
        }
        if let Some(n) = self.unauthenticated_responses_per_sec {
            config.unauthenticated_responses_per_sec = n;
        }
        if let Some(n) = self.failed_auth_per_sec {
            config.failed_auth_per_sec = n;
        }
        if let Some(n) = self.binding_responses_per_sec {
            config.binding_responses_per_sec = n;
        }
        if let Some(secs) = self.rest_max_ttl {
            config.rest_max_ttl_secs = secs;
        }
        if let Some(n) = self.total_quota {
            config.total_quota = n;
        }
        if !self.allowed_peer_ip.is_empty() {
            config.allowed_peer_ips = self.allowed_peer_ip.clone();
        }
        if !self.denied_peer_ip.is_empty() {
            config.denied_peer_ips = self.denied_peer_ip.clone();
        }
        config.allow_loopback_peers |= self.allow_loopback_peers;
        config.allow_private_peers |= self.allow_private_peers;
        config.allow_own_address_peers |= self.allow_own_address_peers;
        if let Some(secs) = self.drain_timeout {
            config.drain_timeout_secs = secs;
        }
        if let Some(user) = &self.proc_user {
            config.proc_user = Some(user.clone());
        }
        if let Some(group) = &self.proc_group {
            config.proc_group = Some(group.clone());
        }
        if let Some(format) = self.log_format {
            config.log_format = format;
        }
        config.prometheus |= self.prometheus;
        if let Some(port) = self.prometheus_port {
            config.prometheus_port = port;
        }
        if let Some(ip) = self.prometheus_address {
            config.prometheus_address = ip;
        }
        config.metrics_per_user |= self.metrics_per_user;
        if let Some(path) = &self.admin_socket {
            config.admin_socket = PathBuf::from(path);
        }
        config.validate().context("invalid command-line options")?;
        Ok(config)
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TURN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::CheckConfig { file }) => check_config(&file),
        Some(Command::Load { target, interval, watch, json }) => {
            load(&target, interval, watch, json)
        }
        Some(Command::Steering { action: SteeringAction::Set { mode, target } }) => {
            steering_set(&target, mode)
        }
        Some(Command::Allocations { admin, json }) => allocations(&admin.socket, json),
        Some(Command::Kick { user, client, admin }) => {
            let reply = admin::request(&admin.socket, &AdminRequest::Kick { user, client });
            reply.map(|r| println!("ended {} allocation(s)", r["ended"]))
        }
        Some(Command::Drain { admin }) => admin::request(&admin.socket, &AdminRequest::Drain)
            .map(|_| println!("draining: no new allocations; live ones relay on")),
        Some(Command::Undrain { admin }) => admin::request(&admin.socket, &AdminRequest::Undrain)
            .map(|_| println!("taking new allocations again")),
        Some(Command::Reload { admin }) => reload(&admin.socket),
        Some(Command::Upgrade { admin }) => admin::request(&admin.socket, &AdminRequest::Upgrade)
            .map(|r| {
                println!(
                    "upgraded: pid {} serves new flows; pid {} serves its {} allocation(s) and {} \
                     connection(s) until they end",
                    r["pid"], r["previous"], r["allocations_left"], r["connections_left"]
                )
            }),
        Some(Command::Status { admin }) => admin::request(&admin.socket, &AdminRequest::Status)
            .and_then(|r| serde_json::to_string_pretty(&r).map_err(Into::into))
            .map(|text| println!("{text}")),
        None => {
            let serve = cli.serve;
            serve.config().and_then(|config| {
                init_logging(config.log_format);
                turn_server::daemon::run(config, Box::new(move || serve.config()))
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("turn-server: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: &std::path::Path) -> Result<()> {
    let config = Config::load(file)?;
    println!("{}: valid", file.display());
    print!("{}", toml::to_string(&config).context("printing the configuration")?);
    Ok(())
}

fn load(target: &Target, interval: f64, watch: bool, json: bool) -> Result<()> {
    if !(0.05..=3600.0).contains(&interval) {
        anyhow::bail!("--interval must be between 0.05 and 3600 seconds");
    }
    let (pid, listeners) = inspect::find_listeners(&target.pin_root, target.pid)?;
    loop {
        let report =
            inspect::sample(pid, &listeners, std::time::Duration::from_secs_f64(interval))?;
        if json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            if watch {
                // Clear the screen and go home, like watch(1).
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", report.render());
        }
        if !watch {
            return Ok(());
        }
    }
}

fn steering_set(target: &Target, mode: RuntimeMode) -> Result<()> {
    let (pid, listeners) = inspect::find_listeners(&target.pin_root, target.pid)?;
    let mode = match mode {
        RuntimeMode::P2c => Mode::P2c,
        RuntimeMode::Least => Mode::Least,
        RuntimeMode::Hash => Mode::Hash,
    };
    for (listener, before) in inspect::set_mode(&listeners, mode)? {
        println!(
            "turn-server {pid} listener {listener}: steering {before} -> {} (new flows only)",
            inspect::mode_name(mode)
        );
    }
    Ok(())
}

fn allocations(socket: &std::path::Path, json: bool) -> Result<()> {
    let reply = admin::request(socket, &AdminRequest::Allocations)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reply["allocations"])?);
        return Ok(());
    }
    let list: Vec<AllocationInfo> = serde_json::from_value(reply["allocations"].clone())
        .context("reading the daemon's reply")?;
    print!("{}", admin::render_allocations(&list));
    Ok(())
}

fn reload(socket: &std::path::Path) -> Result<()> {
    let reply = admin::request(socket, &AdminRequest::Reload)?;
    let list = |key: &str| {
        let keys: Vec<&str> =
            reply[key].as_array().into_iter().flatten().filter_map(|k| k.as_str()).collect();
        if keys.is_empty() { "none".to_owned() } else { keys.join(", ") }
    };
    println!("configuration reloaded; changed: {}", list("applied"));
    if reply["certificate"] == true {
        println!("TLS certificate read again");
    }
    if reply["need_restart"].as_array().is_some_and(|a| !a.is_empty()) {
        println!("changed but needing a restart (running values kept): {}", list("need_restart"));
    }
    Ok(())
}
