//! The daemon: binds the listener groups, attaches steering, starts the workers, and runs
//! the control loop (signals, load publishing, eBPF logs) until it is told to stop.

use std::{
    net::{SocketAddr, TcpListener, UdpSocket},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};
use tracing::{error, info, warn};
use turn_common::{Mode, SocketLoad};
use turn_proto::server::Transport;

use crate::{
    bpffs::{self, Protocol},
    config::{Config, SteeringMode},
    listener::{ListenerGroup, TcpGroup, bind_group, bind_tcp_group},
    load::{LoadEstimator, WorkerSample},
    relay::{RelayAddresses, RelayPool, RelayPorts},
    setup,
    shared::{ConnectionLimits, Directory, SharedQuota},
    steering::{Steering, SteeringOptions},
    tls::TlsCerts,
    worker::{self, INBOX_CAPACITY, RunState, StreamSettings, WorkerSetup, WorkerStats},
};

/// How often the control thread publishes worker loads to the steering maps.
const LOAD_PUBLISH_INTERVAL: Duration = Duration::from_millis(50);

/// How often the control thread looks at the TLS certificate files for a change.
const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// A listener group with its steering program, if any.
struct SteeredGroup {
    local: SocketAddr,
    /// UDP, TCP or TLS (a TCP group on the TLS port).
    transport: Transport,
    steering: Option<Steering>,
    /// Second handles on the group's sockets (worker order): socket 0 detaches the program
    /// at shutdown, all of them report their receive queues.
    members: Vec<OwnedFd>,
}

/// What each worker gets of the listener groups.
struct WorkerSockets {
    udp: Vec<UdpSocket>,
    streams: Vec<(TcpListener, Transport)>,
}

/// Runs the daemon until SIGINT or SIGTERM. Returns once every worker has stopped and
/// every steering program is detached.
pub fn run(config: Config) -> Result<()> {
    let workers = config.worker_count();
    let realm = config.realm();
    // Signal handlers first: a SIGTERM that arrives during startup must still drain.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let signals = {
        let _context = runtime.enter();
        Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        }
    };

    let (credentials, generated) = setup::credentials(&config)?;
    if setup::password_algorithms(&credentials).len() == 1 {
        info!(
            "a user has a pre-hashed MD5 key: offering only the MD5 password algorithm \
             (such a key cannot verify SHA-256)"
        );
    }
    let relay_addresses = setup::relay_addresses(&config)?;
    let (fd_limit, fds_wanted) = setup::raise_fd_limit(&relay_addresses, &config);
    if fd_limit < fds_wanted {
        warn!(
            limit = fd_limit,
            wanted = fds_wanted,
            "the open-file limit (RLIMIT_NOFILE) is below what the relay ports can use: \
             allocations beyond it get 508; raise LimitNOFILE or ulimit -n"
        );
    }
    let nonce_secret: [u8; 32] = rand::random();
    // Check the protocol configuration once, before binding anything.
    turn_proto::server::Server::new(setup::server_config(
        &config,
        &credentials,
        &relay_addresses,
        nonce_secret,
        0,
    )?)
    .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;

    // TLS first: a bad certificate is a clear error before anything is bound.
    let tls = match (&config.cert, &config.pkey) {
        (Some(cert), Some(key)) if config.tls_enabled() => Some(TlsCerts::load(cert, key)?),
        _ => None,
    };
    if tls.is_none() && !config.no_tls {
        info!("TLS listener off: no certificate configured (--cert and --pkey)");
    }
    let streams = StreamSettings {
        tls: tls.as_ref().map(TlsCerts::server_config).transpose()?,
        handshake_timeout: Duration::from_secs(config.tls_handshake_timeout_secs),
        first_message_timeout: Duration::from_secs(config.stream_first_message_timeout_secs),
        allocation_timeout: Duration::from_secs(config.stream_allocation_timeout_secs),
        idle_timeout: Duration::from_secs(config.stream_idle_timeout_secs),
        write_buffer: config.stream_write_buffer_bytes,
    };

    let pin_root = prepare_pins(&config);
    let mut groups = Vec::new();
    let mut worker_sockets: Vec<WorkerSockets> =
        (0..workers).map(|_| WorkerSockets { udp: Vec::new(), streams: Vec::new() }).collect();
    for ip in &config.listening_ips {
        let mut wanted = Vec::new();
        if !config.no_udp {
            wanted.push((Transport::Udp, config.listening_port));
        }
        if !config.no_tcp {
            wanted.push((Transport::Tcp, config.listening_port));
        }
        if tls.is_some() {
            wanted.push((Transport::Tls, config.tls_listening_port));
        }
        for (transport, port) in wanted {
            let addr = SocketAddr::new(*ip, port);
            let protocol = if transport == Transport::Udp { Protocol::Udp } else { Protocol::Tcp };
            if let Some(root) = &pin_root
                && addr.port() != 0
            {
                refuse_if_steered(root, protocol, addr)?;
            }
            let what =
                || format!("listening on {} {addr} with {workers} sockets", transport.name());
            let (local, members) = if transport == Transport::Udp {
                let ListenerGroup { local, sockets } =
                    bind_group(addr, workers).with_context(what)?;
                let members = dup_all(&sockets)?;
                for (i, socket) in sockets.into_iter().enumerate() {
                    worker_sockets[i].udp.push(socket);
                }
                (local, members)
            } else {
                let TcpGroup { local, listeners } =
                    bind_tcp_group(addr, workers).with_context(what)?;
                let members = dup_all(&listeners)?;
                for (i, listener) in listeners.into_iter().enumerate() {
                    worker_sockets[i].streams.push((listener, transport));
                }
                (local, members)
            };
            let pin_dir = pin_root.as_deref().map(|root| bpffs::group_dir(root, protocol, local));
            let steering = attach_steering(&config, local, protocol, &members, pin_dir)?;
            groups.push(SteeredGroup { local, transport, steering, members });
        }
    }

    let (uid, gid) = (setup::run_as_uid(&config)?, config.admin_gid()?);
    for dir in groups.iter().filter_map(|g| g.steering.as_ref()?.pin_dir()) {
        if let Err(e) = bpffs::restrict(dir, uid, gid) {
            warn!(dir = %dir.display(), error = %e, "cannot set permissions on the pins");
        }
    }

    setup::drop_privileges(&config)?;

    let (state_tx, state_rx) = watch::channel(RunState::Running);
    let quota = Arc::new(SharedQuota::new(config.user_quota, config.total_quota));
    let relay_ports = RelayPorts::new(&relay_addresses, config.min_port, config.max_port);
    let directory = Arc::new(Directory::default());
    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..workers).map(|_| mpsc::channel(INBOX_CAPACITY)).unzip();
    let inboxes: Arc<[mpsc::Sender<worker::Handoff>]> = senders.into();
    let mut handles = Vec::with_capacity(workers);
    let mut stats = Vec::with_capacity(workers);
    let limits =
        Arc::new(ConnectionLimits::new(config.max_connections, config.max_connections_per_ip));
    for ((index, sockets), inbox) in worker_sockets.into_iter().enumerate().zip(receivers) {
        let worker_stats = Arc::new(WorkerStats::default());
        stats.push(Arc::clone(&worker_stats));
        // Allocation pins exist for UDP groups only (a connection needs none).
        let flow_pins = groups
            .iter()
            .filter(|g| g.transport == Transport::Udp)
            .map(|g| g.steering.as_ref().map(|s| s.flow_pins(index as u32)).transpose())
            .collect::<Result<Vec<_>, _>>()?;
        let server_config = setup::server_config(
            &config,
            &credentials,
            &relay_addresses,
            nonce_secret,
            rand::random(),
        )?;
        let server =
            turn_proto::server::Server::new(server_config).map_err(|e| anyhow::anyhow!("{e}"))?;
        handles.push(worker::spawn(WorkerSetup {
            index,
            listeners: sockets.udp,
            stream_listeners: sockets.streams,
            streams: streams.clone(),
            limits: Arc::clone(&limits),
            flow_pins,
            server,
            relays: RelayPool::new(Arc::clone(&relay_ports))?,
            quota: Arc::clone(&quota),
            directory: Arc::clone(&directory),
            inboxes: Arc::clone(&inboxes),
            inbox,
            stats: worker_stats,
            state: state_rx.clone(),
        })?);
    }
    let relays: Vec<String> = relay_addresses
        .iter()
        .flatten()
        .map(|r| {
            if r.bind == r.advertised {
                r.bind.to_string()
            } else {
                format!("{} (told {})", r.bind, r.advertised)
            }
        })
        .collect();
    for group in &groups {
        let mode = group
            .steering
            .as_ref()
            .map_or("off (kernel hash)", |s| s.mode().map_or("unknown", crate::inspect::mode_name));
        let url = client_url(group, &relay_addresses);
        let fields = (workers, mode, &realm, relays.join(", "));
        let ports = format!("{}-{}", config.min_port, config.max_port);
        macro_rules! listening {
            ($message:literal) => {
                info!(
                    listen = %group.local,
                    %url,
                    workers = fields.0,
                    steering = fields.1,
                    realm = %fields.2,
                    relay = %fields.3,
                    %ports,
                    $message
                )
            };
        }
        match group.transport {
            Transport::Udp => listening!("listening (UDP)"),
            Transport::Tcp => listening!("listening (TCP)"),
            Transport::Tls => listening!("listening (TLS)"),
        }
    }
    if let Some(user) = &generated {
        print_generated(&config, &groups, &relay_addresses, user);
    }
    // Every listener is bound, steering attached and the workers run: scripts (and the
    // test harness) wait for this line.
    info!(workers, "ready");

    let drain = Duration::from_secs(config.drain_timeout_secs);
    let workers_view = WorkersView { stats: &stats, inboxes: &inboxes };
    let outcome = runtime.block_on(control_loop(
        signals,
        &state_tx,
        drain,
        &mut groups,
        &workers_view,
        &handles,
        tls.as_deref(),
    ));

    let _ = state_tx.send(RunState::Stop);
    for group in groups.drain(..) {
        if let (Some(steering), Some(member)) = (group.steering, group.members.first()) {
            let transport = group.transport.name();
            match steering.detach(member.as_fd()) {
                Ok(()) => {
                    info!(listen = %group.local, transport, "steering program detached, pins removed")
                }
                Err(e) => {
                    warn!(listen = %group.local, transport, error = %e, "detaching steering failed")
                }
            }
        }
    }
    for (index, handle) in handles.into_iter().enumerate() {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(worker = index, error = %format!("{e:#}"), "worker failed"),
            Err(_) => error!(worker = index, "worker panicked"),
        }
    }
    outcome
}

/// Prepares the bpffs root for this daemon's pins, removing those of killed daemons.
/// Returns None (steering still works, `turn-server load` does not) when bpffs is unusable.
fn prepare_pins(config: &Config) -> Option<std::path::PathBuf> {
    if config.steering == SteeringMode::Off {
        return None;
    }
    let root = &config.bpf_pin_root;
    if let Err(e) = bpffs::prepare_root(root) {
        // Without privileges steering itself fails next, and says so.
        warn!(root = %root.display(), error = %e, "steering maps will not be pinned: `turn-server load` cannot read them");
        return None;
    }
    for stale in bpffs::remove_stale(root) {
        info!(dir = %stale.display(), "removed the pins of a daemon that is no longer running");
    }
    Some(root.clone())
}

/// Refuses to join a listener group that another live turn-server steers: with
/// SO_REUSEPORT, binding would succeed and split that daemon's clients between the two.
fn refuse_if_steered(root: &std::path::Path, protocol: Protocol, addr: SocketAddr) -> Result<()> {
    let dir = bpffs::group_dir(root, protocol, addr);
    if let Some(other) = bpffs::owners(&dir).into_iter().find(bpffs::Owner::is_alive) {
        bail!(
            "{} {addr} is already served by turn-server pid {} (its steering maps are in {}); \
             stop it first or choose another port",
            protocol.name(),
            other.pid,
            dir.display()
        );
    }
    Ok(())
}

/// Second handles on a group's sockets.
fn dup_all<S: AsFd>(sockets: &[S]) -> Result<Vec<OwnedFd>> {
    sockets
        .iter()
        .map(|s| s.as_fd().try_clone_to_owned().context("duplicating a listener socket"))
        .collect()
}

/// The steering program of one listener group (UDP or TCP: the program reads the source
/// port where both headers keep it; a TCP group is steered once per connection, at its
/// SYN, and needs no allocation pins).
fn attach_steering(
    config: &Config,
    local: SocketAddr,
    protocol: Protocol,
    sockets: &[OwnedFd],
    pin_dir: Option<std::path::PathBuf>,
) -> Result<Option<Steering>> {
    let mode = match config.steering {
        SteeringMode::Off => return Ok(None),
        SteeringMode::Auto | SteeringMode::P2c => Mode::P2c,
        SteeringMode::Least => Mode::Least,
        SteeringMode::Hash => Mode::Hash,
    };
    let alloc_entries = if protocol == Protocol::Udp { config.allocation_pin_entries() } else { 1 };
    let options = SteeringOptions {
        alloc_entries,
        memo_entries: config.steering_memo_entries,
        memo_ttl_ms: config.steering_memo_ttl_ms,
        pin_dir,
    };
    match Steering::attach(sockets, mode, options) {
        Ok(steering) => Ok(Some(steering)),
        Err(e) if config.steering == SteeringMode::Auto => {
            warn!(
                listen = %local,
                error = %error_chain(&e),
                "eBPF steering unavailable: serving with the kernel's SO_REUSEPORT hash \
                 (set `steering = \"off\"` to silence this, run as root for p2c)"
            );
            Ok(None)
        }
        Err(e) => bail!(
            "steering {:?} was asked for but cannot be set up on {local}: {}",
            config.steering,
            error_chain(&e)
        ),
    }
}

/// Formats an error with its sources, `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The URL a client uses for a listener group (RFC 7065): `turn:` over UDP and TCP,
/// `turns:` over TLS. A wildcard listener is named by the relay's advertised address.
fn client_url(group: &SteeredGroup, relays: &RelayAddresses) -> String {
    let ip = if group.local.ip().is_unspecified() {
        let slot = usize::from(group.local.is_ipv6());
        relays[slot].first().map_or(group.local.ip(), |r| r.advertised)
    } else {
        group.local.ip()
    };
    setup::turn_url(group.transport, SocketAddr::new(ip, group.local.port()))
}

/// Prints the generated user with what a client needs, on stdout (and in the log).
fn print_generated(
    config: &Config,
    groups: &[SteeredGroup],
    relays: &RelayAddresses,
    user: &setup::GeneratedUser,
) {
    let urls: Vec<String> = groups.iter().map(|g| client_url(g, relays)).collect();
    warn!(username = %user.username, "no credentials configured: generated a user for this run");
    println!(
        "turn-server: no credentials configured; generated for this run (configure `users` or"
    );
    println!("`static_auth_secrets`, or --user / --static-auth-secret, to choose your own):");
    for url in &urls {
        println!("  url:      {url}");
    }
    println!("  username: {}", user.username);
    println!("  password: {}", user.password);
    println!("  realm:    {}", config.realm());
    if !config.allow_loopback_peers {
        println!(
            "Peers on loopback and private networks are refused by default; to try it on this \
             machine add --allow-loopback-peers."
        );
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

/// What the control thread reads of the workers.
struct WorkersView<'a> {
    stats: &'a [Arc<WorkerStats>],
    inboxes: &'a [mpsc::Sender<worker::Handoff>],
}

async fn control_loop(
    mut signals: Signals,
    state: &watch::Sender<RunState>,
    drain_timeout: Duration,
    groups: &mut [SteeredGroup],
    view: &WorkersView<'_>,
    workers: &[std::thread::JoinHandle<Result<()>>],
    tls: Option<&TlsCerts>,
) -> Result<()> {
    let stats = view.stats;
    let mut estimator = LoadEstimator::new(stats.len());
    let mut tick = tokio::time::interval(LOAD_PUBLISH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cert_check = tokio::time::interval(CERT_CHECK_INTERVAL);
    cert_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain_until: Option<tokio::time::Instant> = None;
    let live = || stats.iter().map(|w| w.allocations.load(Ordering::Relaxed)).sum::<u64>();
    loop {
        tokio::select! {
            _ = signals.term.recv() => {
                if drain_until.is_some() {
                    info!("second SIGTERM: stopping now");
                    return Ok(());
                }
                info!(allocations = live(), timeout_secs = drain_timeout.as_secs(), "SIGTERM: draining (no new allocations)");
                let _ = state.send(RunState::Draining);
                drain_until = Some(tokio::time::Instant::now() + drain_timeout);
            }
            _ = signals.int.recv() => { info!("SIGINT: stopping"); return Ok(()); }
            _ = signals.hup.recv() => {
                match tls {
                    Some(certs) => reload_certificate(certs, "SIGHUP"),
                    None => info!("SIGHUP: nothing to reload (no TLS certificate configured)"),
                }
            }
            _ = cert_check.tick(), if tls.is_some() => {
                if let Some(certs) = tls.filter(|c| c.changed_on_disk()) {
                    reload_certificate(certs, "file change");
                }
            }
            _ = tick.tick() => {
                if let Some(i) = workers.iter().position(|w| w.is_finished()) {
                    bail!("worker {i} stopped unexpectedly");
                }
                publish_loads(&mut estimator, groups, view);
                for steering in groups.iter_mut().filter_map(|g| g.steering.as_mut()) {
                    steering.flush_logs();
                }
                if let Some(until) = drain_until {
                    let left = live();
                    if left == 0 {
                        info!("drained: no allocation left");
                        return Ok(());
                    }
                    if tokio::time::Instant::now() >= until {
                        info!(allocations = left, "drain timeout: closing the remaining allocations");
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Serves the certificate files anew to new handshakes (live connections keep theirs); a
/// bad file leaves the running certificate in place, with the reason in the log.
fn reload_certificate(certs: &TlsCerts, why: &str) {
    match certs.reload() {
        Ok(()) => info!(cert = %certs.cert_path().display(), why, "TLS certificate reloaded"),
        Err(e) => warn!(
            why,
            error = %format!("{e:#}"),
            "TLS certificate not reloaded: keeping the running one"
        ),
    }
}

/// Writes each worker's load into its slot of every steered group.
fn publish_loads(
    estimator: &mut LoadEstimator,
    groups: &mut [SteeredGroup],
    view: &WorkersView<'_>,
) {
    if groups.iter().all(|g| g.steering.is_none()) {
        return;
    }
    let workers = view.stats.len();
    // A worker's placements are those of its socket in every group.
    let mut placed_by_group: Vec<Vec<u64>> = Vec::with_capacity(groups.len());
    let mut placed = vec![0u64; workers];
    for group in groups.iter() {
        let counts = group
            .steering
            .as_ref()
            .map(|s| s.maps().placed())
            .transpose()
            .unwrap_or_else(|e| {
                warn!(error = %e, "reading steering counters failed");
                None
            })
            .unwrap_or_default();
        for (total, n) in placed.iter_mut().zip(&counts) {
            *total += n;
        }
        placed_by_group.push(counts);
    }
    // What each worker reports besides its score (see `SocketLoad`).
    let mut reports: Vec<SocketLoad> = view
        .stats
        .iter()
        .zip(view.inboxes)
        .map(|(w, inbox)| SocketLoad {
            allocations: w.allocations.load(Ordering::Relaxed),
            packets: w.packets.load(Ordering::Relaxed),
            bytes: w.bytes.load(Ordering::Relaxed),
            handed_off: w.handed_off.load(Ordering::Relaxed),
            handed_in: w.handed_in.load(Ordering::Relaxed),
            handoff_drops: w.handoff_drops.load(Ordering::Relaxed),
            inbox_queued: (inbox.max_capacity() - inbox.capacity()) as u64,
            pin_failures: w.pin_failures.load(Ordering::Relaxed),
            auth_failures: w.auth_failures.load(Ordering::Relaxed),
            rate_limited: w.rate_limited.load(Ordering::Relaxed),
            ..SocketLoad::default()
        })
        .collect();
    for group in groups.iter() {
        for (report, socket) in reports.iter_mut().zip(&group.members) {
            if let Some(mem) = socket_meminfo(socket) {
                report.rx_queued_bytes += mem.queued_bytes;
                report.rx_drops += mem.drops;
            }
        }
    }
    let samples: Vec<WorkerSample> = view
        .stats
        .iter()
        .zip(&placed)
        .map(|(w, &placed)| WorkerSample {
            packets: w.packets.load(Ordering::Relaxed),
            allocations: w.allocations.load(Ordering::Relaxed),
            created: w.allocations_created.load(Ordering::Relaxed),
            placed,
        })
        .collect();
    let loads = estimator.update(std::time::Instant::now(), &samples);
    for (group, placed) in groups.iter_mut().zip(&placed_by_group) {
        let Some(steering) = group.steering.as_mut() else { continue };
        for (i, report) in reports.iter().enumerate() {
            let load = SocketLoad {
                score: loads.score(i),
                flow_weight: loads.flow_weight,
                placed_seen: placed.get(i).copied().unwrap_or(0),
                ..*report
            };
            if let Err(e) = steering.maps_mut().set_load(i as u32, load) {
                warn!(error = %e, "publishing load failed");
            }
        }
    }
}

/// A socket's receive queue and drop count (`SO_MEMINFO`).
struct MemInfo {
    queued_bytes: u64,
    drops: u64,
}

fn socket_meminfo(socket: &impl AsRawFd) -> Option<MemInfo> {
    // SK_MEMINFO_RMEM_ALLOC = 0, SK_MEMINFO_DROPS = 8, SK_MEMINFO_VARS = 9 (linux/sock_diag.h).
    let mut info = [0u32; 9];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    (rc == 0).then(|| MemInfo { queued_bytes: u64::from(info[0]), drops: u64::from(info[8]) })
}
