//! The daemon: binds the listener groups, attaches steering, opens the metrics and admin
//! endpoints, starts the workers, says it is ready, and runs the control loop
//! ([`control`]: signals, load publishing, eBPF logs, scrapes, admin requests, reload
//! ([`reload`]), drain) until it is told to stop.

mod control;
mod reload;
pub mod upgrade;

pub use reload::RELOADABLE;

use std::{
    net::{SocketAddr, TcpListener, UdpSocket},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};
use tracing::{error, info, warn};
use turn_common::Mode;
use turn_proto::server::{SourceLimits, Transport};

use self::{
    control::{Control, Requests, Signals, notify},
    reload::{ReloadSetup, Reloader},
};
use crate::{
    admin,
    bpffs::{self, Protocol},
    config::{Config, DEFAULT_ADMIN_SOCKET, FastPathMode, SteeringMode},
    fast_path::{self, FastPath},
    listener::{ListenerGroup, TcpGroup, bind_group, bind_tcp_group},
    metrics::UserTraffic,
    relay::{RelayAddresses, RelayPool, RelayPorts},
    setup,
    shared::{ConnectionCaps, ConnectionLimits, Directory, SharedQuota},
    steering::{Detach, Steering, SteeringOptions},
    tls::TlsCerts,
    worker::{
        self, INBOX_CAPACITY, RunState, StreamSettings, WorkerSetup, WorkerStats,
        handshake::{self, HandshakeSetup, HandshakeStats},
    },
};

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

/// Reads the configuration again (the file, then the command line on top), for reloads.
pub type ReadConfig = Box<dyn Fn() -> Result<Config>>;

/// Runs the daemon until SIGINT or SIGTERM (or, after an upgrade, until its last
/// allocation ends). Returns once every worker has stopped and every steering program is
/// detached. `read` gives the configuration anew on reload.
///
/// A process started by an upgrade ([`upgrade::HANDOVER_ENV`]) joins the listener groups
/// of the one before it instead of binding them anew, and tells it whether it serves.
pub fn run(config: Config, read: ReadConfig) -> Result<()> {
    let mut inherited = upgrade::Inherited::take_from_env()?;
    let result = serve(config, read, inherited.as_mut());
    if let (Err(e), Some(inherited)) = (&result, inherited.as_mut()) {
        inherited.report(&format!("failed: {e:#}"));
    }
    result
}

fn serve(
    config: Config,
    read: ReadConfig,
    mut inherited: Option<&mut upgrade::Inherited>,
) -> Result<()> {
    let workers = config.worker_count();
    // The binary as started: an upgrade starts whatever is at this path then.
    let exe = std::env::current_exe().context("finding this program's path")?;
    let realm = config.realm();
    // Signal handlers first: a SIGTERM that arrives during startup must still drain.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let signals = {
        let _context = runtime.enter();
        Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr2: signal(SignalKind::user_defined2())?,
        }
    };

    let (credentials, generated) = setup::credentials(&config, None)?;
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
    // A new generation keeps the nonces of the one before valid.
    let nonce_secret: [u8; 32] = inherited.as_ref().map_or_else(rand::random, |i| i.nonce_secret);
    let slots = match &inherited {
        Some(i) => i.choose_slots(workers as u32)?,
        None => 0..workers as u32,
    };
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

    // A new generation uses the previous one's pins through the descriptors it was
    // given: it neither prepares nor cleans the root (it may not reach it by path).
    let pin_root = match &inherited {
        Some(_) => Some(config.bpf_pin_root.clone()).filter(|root| root.is_dir()),
        None => prepare_pins(&config),
    };
    let mut groups = Vec::new();
    let mut worker_sockets: Vec<WorkerSockets> =
        (0..workers).map(|_| WorkerSockets { udp: Vec::new(), streams: Vec::new() }).collect();
    // The listener groups: those of the configuration, or a previous generation's (with
    // their bound ports and steering maps).
    let mut wanted: Vec<(Transport, SocketAddr, Option<upgrade::InheritedGroup>)> = Vec::new();
    match inherited.as_mut() {
        Some(i) => {
            for g in std::mem::take(&mut i.groups) {
                if g.transport == Transport::Tls && tls.is_none() {
                    bail!(
                        "the running generation serves TLS on {} but this configuration has \
                         no certificate (cert and pkey)",
                        g.local
                    );
                }
                wanted.push((g.transport, g.local, Some(g)));
            }
        }
        None => {
            for ip in &config.listening_ips {
                if !config.no_udp {
                    wanted.push((
                        Transport::Udp,
                        SocketAddr::new(*ip, config.listening_port),
                        None,
                    ));
                }
                if !config.no_tcp {
                    wanted.push((
                        Transport::Tcp,
                        SocketAddr::new(*ip, config.listening_port),
                        None,
                    ));
                }
                if tls.is_some() {
                    wanted.push((
                        Transport::Tls,
                        SocketAddr::new(*ip, config.tls_listening_port),
                        None,
                    ));
                }
            }
        }
    }
    for (transport, addr, previous) in wanted {
        let protocol = if transport == Transport::Udp { Protocol::Udp } else { Protocol::Tcp };
        if let Some(root) = &pin_root
            && addr.port() != 0
            && previous.is_none()
        {
            refuse_if_steered(root, protocol, addr)?;
        }
        let what = || format!("listening on {} {addr} with {workers} sockets", transport.name());
        let (local, members) = if transport == Transport::Udp {
            let ListenerGroup { local, sockets } = bind_group(addr, workers).with_context(what)?;
            let members = dup_all(&sockets)?;
            for (i, socket) in sockets.into_iter().enumerate() {
                worker_sockets[i].udp.push(socket);
            }
            (local, members)
        } else {
            let TcpGroup { local, listeners } = bind_tcp_group(addr, workers).with_context(what)?;
            let members = dup_all(&listeners)?;
            for (i, listener) in listeners.into_iter().enumerate() {
                worker_sockets[i].streams.push((listener, transport));
            }
            (local, members)
        };
        let steering = match previous {
            Some(mut g) if !g.maps.is_empty() => {
                let adopted = Steering::adopt(&members, slots.start, &mut g.maps, g.pinned)
                    .with_context(|| {
                        format!("joining the steered group of {} {local}", transport.name())
                    })?;
                Some(adopted)
            }
            Some(_) => None,
            None => {
                let pin_dir =
                    pin_root.as_deref().map(|root| bpffs::group_dir(root, protocol, local));
                attach_steering(&config, local, protocol, &members, pin_dir)?
            }
        };
        groups.push(SteeredGroup { local, transport, steering, members });
    }

    // The kernel fast path, while the daemon may still load and attach programs; its maps
    // pinned beside each UDP listener's steering maps.
    // (A new generation pins its own once the previous one, whose maps are pinned
    // there, has exited.)
    let mut fast = setup_fast_path(&config, &relay_addresses)?;
    let mut fast_pinned = false;
    if let Some(fast) = &fast
        && inherited.is_none()
    {
        let udp = groups.iter().filter(|g| g.transport == Transport::Udp);
        for dir in udp.filter_map(|g| g.steering.as_ref()?.pin_dir()) {
            match fast.pin(dir) {
                Ok(()) => fast_pinned = true,
                Err(e) => {
                    warn!(dir = %dir.display(), error = %error_chain(&e), "fast path maps not pinned")
                }
            }
        }
    }

    let (uid, gid) = (setup::run_as_uid(&config)?, config.admin_gid()?);
    if inherited.is_none() {
        for dir in groups.iter().filter_map(|g| g.steering.as_ref()?.pin_dir()) {
            if let Err(e) = bpffs::restrict(dir, uid, gid) {
                warn!(dir = %dir.display(), error = %e, "cannot set permissions on the pins");
            }
        }
    }

    // The endpoints, while the daemon may still bind privileged ports and create
    // /run/turn-server (a new generation takes the previous one's).
    let metrics_listener = match inherited.as_mut().and_then(|i| i.metrics.take()) {
        Some(listener) => Some(listener),
        None => bind_metrics(&config)?,
    };
    let admin_listener = match inherited.as_mut().and_then(|i| i.admin.take()) {
        Some(admin) => Some(admin),
        None => bind_admin(&config, uid, gid)?,
    };

    // SAFETY: geteuid has no preconditions and cannot fail.
    let started_as = unsafe { libc::geteuid() };
    let running_as = setup::drop_privileges(&config)?;
    // The listeners belong to the user that bound them: a process of another user cannot
    // join their groups (the kernel refuses SO_REUSEPORT across users).
    let upgrade_blocked = (running_as.uid != started_as).then(|| {
        format!(
            "this process bound its listeners as uid {started_as} and then switched to uid {} \
             (proc_user): a new process of that user cannot join the listener groups of uid \
             {started_as}; run the daemon as a dedicated user from the start \
             (contrib/turn-server.service) to upgrade it without a restart",
            running_as.uid
        )
    });
    let capabilities = if running_as.capabilities.is_empty() {
        "none".to_owned()
    } else {
        running_as.capabilities.join(",")
    };
    if running_as.uid == 0 {
        warn!(
            capabilities = %capabilities,
            "running as root: network input is parsed by uid 0 (without capabilities); set \
             proc_user, or run the daemon as a dedicated user (contrib/turn-server.service)"
        );
    } else {
        info!(uid = running_as.uid, gid = running_as.gid, capabilities = %capabilities, "privileges dropped");
    }

    let (state_tx, state_rx) = watch::channel(RunState::Running);
    let quota =
        Arc::new(SharedQuota::new(config.user_quota, config.address_quota, config.total_quota));
    let user_traffic = config.metrics_per_user.then(|| Arc::new(UserTraffic::default()));
    let relay_ports = RelayPorts::new(&relay_addresses, config.min_port, config.max_port);
    let directory = Arc::new(Directory::default());
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..workers)
        .map(|_| worker::Inbox::channel(INBOX_CAPACITY))
        .collect::<std::io::Result<Vec<_>>>()
        .context("creating the workers' inboxes")?
        .into_iter()
        .unzip();
    let inboxes: Arc<[worker::Inbox]> = senders.into();
    let mut handles = Vec::with_capacity(workers);
    let mut stats = Vec::with_capacity(workers);
    let limits = Arc::new(ConnectionLimits::new(ConnectionCaps::of(&config)));
    // TLS handshakes on a thread of their own, off the workers' relay path. At most half
    // the budget of connections without an allocation is in handshakes at once.
    let handshake_stats = Arc::new(HandshakeStats::default());
    let mut handshake_thread = None;
    let handshakes = match &streams.tls {
        Some(tls) => {
            let (handle, thread) = handshake::spawn(HandshakeSetup {
                tls: Arc::clone(tls),
                timeout: streams.handshake_timeout,
                // 0: no budget of their own, no bound of its own (max_connections holds).
                max_in_flight: match config.max_unauthenticated_connections {
                    0 => 0,
                    n => (n / 2).max(1),
                },
                limits: Arc::clone(&limits),
                inboxes: Arc::clone(&inboxes),
                stats: Arc::clone(&handshake_stats),
            })
            .context("starting the TLS handshake thread")?;
            handshake_thread = Some(thread);
            Some(handle)
        }
        None => None,
    };
    // The per-source limits (answers to strangers, failed logins, Binding answers), one
    // table for every worker: a source that varies its port reaches every worker.
    let source_limits = Arc::new(SourceLimits::new(&setup::server_config(
        &config,
        &credentials,
        &relay_addresses,
        nonce_secret,
        rand::random(),
    )?));
    for ((index, sockets), inbox) in worker_sockets.into_iter().enumerate().zip(receivers) {
        let worker_stats = Arc::new(WorkerStats::default());
        stats.push(Arc::clone(&worker_stats));
        // Allocation pins exist for UDP groups only (a connection needs none).
        let flow_pins = groups
            .iter()
            .filter(|g| g.transport == Transport::Udp)
            .map(|g| g.steering.as_ref().map(|s| s.flow_pins(index as u32)).transpose())
            .collect::<Result<Vec<_>, _>>()?;
        let mut server_config = setup::server_config(
            &config,
            &credentials,
            &relay_addresses,
            nonce_secret,
            rand::random(),
        )?;
        server_config.fast_path = fast.is_some();
        debug_assert!(index < slots.len());
        let server =
            turn_proto::server::Server::with_limits(server_config, Arc::clone(&source_limits))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        handles.push(worker::spawn(WorkerSetup {
            index,
            listeners: sockets.udp,
            stream_listeners: sockets.streams,
            streams: streams.clone(),
            limits: Arc::clone(&limits),
            handshakes: handshakes.clone(),
            flow_pins,
            server,
            relays: RelayPool::new(Arc::clone(&relay_ports), index)?,
            quota: Arc::clone(&quota),
            directory: Arc::clone(&directory),
            inboxes: Arc::clone(&inboxes),
            inbox,
            user_traffic: user_traffic.clone(),
            stats: worker_stats,
            state: state_rx.clone(),
            metrics_max_users: config.metrics_max_users,
            batch_wait: Duration::from_micros(config.batch_wait_us),
            fast: fast.as_ref().map(FastPath::worker_maps).transpose()?,
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
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    if let Some(addr) = metrics_addr {
        info!(%addr, "metrics: http://{addr}/metrics");
    }
    let (scrape_tx, scrapes) = mpsc::channel(16);
    let (admin_tx, admin_calls) = mpsc::channel(16);
    let admin_path = admin_listener.as_ref().map(|(path, _)| path.clone());
    let mut endpoints =
        control::Endpoints::new(metrics_listener, admin_listener, scrape_tx, admin_tx);
    // (A new generation serves them once it takes new flows: until the hand-over, the
    // previous one answers.)
    if inherited.is_none() {
        let _context = runtime.enter();
        endpoints.start()?;
    }
    // Every listener is bound, steering attached, the endpoints open and the workers
    // run: tell systemd (Type=notify) and the log. The status names every listener (the
    // test harness reads its addresses there). A new generation tells the previous one,
    // which makes it the main process once it has handed it new flows.
    let status = ready_status(&groups, metrics_addr);
    info!(workers, status = %status, slots = %format!("{}-{}", slots.start, slots.end - 1), "ready");
    let mut generations = control::Generations::default();
    match inherited.as_mut() {
        Some(i) => {
            let _context = runtime.enter();
            let routers = groups
                .iter()
                .filter(|g| g.transport == Transport::Udp)
                .map(|g| g.steering.as_ref().and_then(|s| s.flow_router().ok()))
                .collect();
            if let Some(handoff) = i.handoff.take() {
                tokio::spawn(control::receive_handoffs(handoff, Arc::clone(&inboxes), routers));
            }
            generations.predecessor =
                control::Predecessor::watch(i.from_pid, i.parent_slots.clone());
            i.report(&format!("joined {} {}", slots.start, slots.len()));
            info!(
                previous = i.from_pid,
                "upgrade: joined the listener groups of the previous generation"
            );
        }
        None => notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]),
    }

    let reloader = Reloader::new(ReloadSetup {
        read,
        running: config.clone(),
        generated,
        relays: relay_addresses.clone(),
        nonce_secret,
        quota: Arc::clone(&quota),
        limits: Arc::clone(&limits),
        tls: tls.clone(),
    });
    let mut control = Control {
        groups: &mut groups,
        stats: &stats,
        inboxes: Arc::clone(&inboxes),
        workers: &handles,
        state: &state_tx,
        reloader,
        relay_ports: Arc::clone(&relay_ports),
        user_traffic,
        handshakes: Arc::clone(&handshake_stats),
        pin_counts: None,
        metrics_max_users: config.metrics_max_users,
        status,
        fast: fast.as_mut(),
        fast_pinned,
        endpoints,
        generations,
        exe,
        nonce_secret,
        slots: slots.clone(),
        workers_count: workers,
        upgrade_blocked,
    };
    let outcome = runtime.block_on(control.run(signals, Requests { scrapes, admin: admin_calls }));
    let handed_over = control.generations.successor.is_some();
    let predecessor_alive = control.generations.predecessor.is_some();
    let fast_pinned = control.fast_pinned;
    control.endpoints.stop();
    drop(control);
    // The admin socket serves the other generation, when there is one.
    if let Some(path) = &admin_path
        && !handed_over
        && !predecessor_alive
    {
        let _ = std::fs::remove_file(path);
    }

    let _ = state_tx.send(RunState::Stop);
    inboxes.iter().for_each(worker::Inbox::wake);
    for group in groups.drain(..) {
        if let Some(steering) = group.steering {
            let transport = group.transport.name();
            let member = group.members.first().map(|m| m.as_fd());
            let fast_pins = fast_pinned && group.transport == Transport::Udp;
            match steering.detach(member, fast_pins) {
                Ok(Detach::Removed) => {
                    info!(listen = %group.local, transport, "steering program detached, pins removed")
                }
                Ok(Detach::PinsLeft) => {
                    warn!(listen = %group.local, transport, "steering program detached; some pins could not be removed (the next start removes them)")
                }
                Ok(Detach::Stayed(pid)) => {
                    info!(listen = %group.local, transport, generation = pid, "left the group to the other generation (its steering and pins stay)")
                }
                Err(e) => {
                    warn!(listen = %group.local, transport, error = %e, "detaching steering failed")
                }
            }
        }
    }
    if let Some(root) = &pin_root {
        bpffs::remove_if_empty(root);
    }
    for (index, handle) in handles.into_iter().enumerate() {
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(worker = index, error = %format!("{e:#}"), "worker failed"),
            Err(_) => error!(worker = index, "worker panicked"),
        }
    }
    // The workers removed their bindings as their allocations ended: now the program.
    if let Some(mut fast) = fast {
        let verdicts = fast.verdicts().unwrap_or_default();
        fast.detach();
        info!(
            verdicts = %by_verdict(&verdicts),
            "fast path detached"
        );
    }
    // The workers' handles on the handshake thread are gone with them: it stops.
    drop(handshakes);
    if let Some(thread) = handshake_thread
        && thread.join().is_err()
    {
        error!("the TLS handshake thread panicked");
    }
    outcome
}

/// The metrics endpoint's socket, when `prometheus` is on.
fn bind_metrics(config: &Config) -> Result<Option<TcpListener>> {
    if !config.prometheus {
        return Ok(None);
    }
    let addr = SocketAddr::new(config.prometheus_address, config.prometheus_port);
    let listener = TcpListener::bind(addr)
        .with_context(|| format!("metrics endpoint (prometheus): cannot listen on {addr}"))?;
    listener.set_nonblocking(true)?;
    Ok(Some(listener))
}

/// The admin API's socket. An explicitly configured path that cannot be created is an
/// error; the default one is skipped with a warning (a daemon run by a user who cannot
/// write /run, or a second daemon on this host).
fn bind_admin(
    config: &Config,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<Option<(PathBuf, std::os::unix::net::UnixListener)>> {
    let path = &config.admin_socket;
    if path.as_os_str().is_empty() {
        return Ok(None);
    }
    match admin::bind(path, uid, gid) {
        Ok(listener) => {
            info!(socket = %path.display(), "admin API listening");
            Ok(Some((path.clone(), listener)))
        }
        Err(e) if path.as_os_str() == DEFAULT_ADMIN_SOCKET => {
            warn!(
                error = %format!("{e:#}"),
                "admin API off: `turn-server allocations`, `kick`, `drain` and `reload` will not \
                 reach this daemon (set admin_socket, or --admin-socket \"\" to silence this)"
            );
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// What the daemon serves, for its readiness notification and log line:
/// `serving udp 127.0.0.1:3478, tcp 127.0.0.1:3478, metrics 127.0.0.1:9641`.
fn ready_status(groups: &[SteeredGroup], metrics: Option<SocketAddr>) -> String {
    let mut parts: Vec<String> =
        groups.iter().map(|g| format!("{} {}", g.transport.name(), g.local)).collect();
    parts.extend(metrics.map(|addr| format!("metrics {addr}")));
    format!("serving {}", parts.join(", "))
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
    let alloc_entries =
        if protocol == Protocol::Udp { config.allocation_pin_map_entries() } else { 1 };
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

/// Loads and attaches the kernel fast path as `fast_path` asks: None when off, or when
/// `auto` and it cannot be set up (said in the log); an error when `tc` cannot be.
fn setup_fast_path(config: &Config, relays: &RelayAddresses) -> Result<Option<FastPath>> {
    if config.fast_path == FastPathMode::Off {
        return Ok(None);
    }
    let mut addresses: Vec<std::net::IpAddr> = config.listening_ips.clone();
    addresses.extend(relays.iter().flatten().map(|r| r.bind));
    let bindings = fast_path::bindings_for(config.allocation_pin_entries());
    let attempt = || -> Result<FastPath, fast_path::FastPathError> {
        let all = fast_path::interfaces()?;
        let mut fast = FastPath::load(bindings)?;
        fast.set_host(&all)?;
        fast.attach(&fast_path::interfaces_for(&all, &addresses))?;
        Ok(fast)
    };
    match attempt() {
        Ok(fast) => {
            info!(
                interfaces = %fast.interfaces().join(","),
                bindings,
                "fast path: ChannelData of UDP clients relayed in the kernel (TC)"
            );
            Ok(Some(fast))
        }
        Err(e) if config.fast_path == FastPathMode::Auto => {
            warn!(
                error = %error_chain(&e),
                "fast path unavailable: relaying in userspace (set `fast_path = \"off\"` to \
                 silence this)"
            );
            Ok(None)
        }
        Err(e) => bail!("fast_path \"tc\" was asked for but cannot be set up: {}", error_chain(&e)),
    }
}

/// The fast path's verdict counts, `name=n` joined by commas (non-zero ones), or `none`.
fn by_verdict(counts: &[u64]) -> String {
    let text: Vec<String> = turn_common::fast::Verdict::ALL
        .iter()
        .zip(counts)
        .filter(|(_, n)| **n > 0)
        .map(|(v, n)| format!("{}={n}", v.name()))
        .collect();
    if text.is_empty() { "none".into() } else { text.join(",") }
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
