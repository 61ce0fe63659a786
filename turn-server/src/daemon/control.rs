//! The control thread's loop: signals, load publishing to the steering maps, eBPF logs,
//! metrics scrapes, admin requests, reload and drain. Everything here is off the packet
//! path: workers are reached through their command channels and read through their
//! single-writer counters.

use std::{
    os::fd::AsRawFd,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::{Result, bail};
use serde_json::{Value, json};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};
use tracing::{info, warn};
use turn_common::{Mode, SocketLoad};
use turn_proto::server::Transport;

use super::{SteeredGroup, reload::Reloader, socket_meminfo, upgrade};
use crate::{
    addresses::AddressWatch,
    admin::{self, AdminCall, AdminRequest},
    inspect::mode_name,
    load::{LoadEstimator, WorkerLoads, WorkerSample},
    metrics::{self, GroupSnapshot, Scrape, ScrapeRequest, UserTraffic, WorkerSnapshot},
    relay::RelayPorts,
    worker::{AllocationInfo, Command, Inbox, RunState, WorkerStats},
};

/// How long an old generation stays after handing over, even with nothing left to serve
/// (the answer to the admin call that asked for the upgrade is on its way).
const HANDOVER_GRACE: Duration = Duration::from_millis(500);

/// How often the control thread publishes worker loads to the steering maps.
const LOAD_PUBLISH_INTERVAL: Duration = Duration::from_millis(50);

/// How long a count of the allocation pins serves scrapes (a walk of every pin map).
const PIN_COUNT_TTL: Duration = Duration::from_secs(1);

/// How often the control thread looks at the TLS certificate files for a change.
const CERT_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// The signals the daemon handles, registered before anything is bound.
pub struct Signals {
    pub term: tokio::signal::unix::Signal,
    pub int: tokio::signal::unix::Signal,
    pub hup: tokio::signal::unix::Signal,
    /// SIGUSR2: upgrade (start the binary on disk as a new generation).
    pub usr2: tokio::signal::unix::Signal,
}

/// Requests that reach the control thread from its endpoints.
pub struct Requests {
    /// Scrapes of the metrics endpoint (none when it is off).
    pub scrapes: mpsc::Receiver<ScrapeRequest>,
    /// Admin API calls (none when it is off).
    pub admin: mpsc::Receiver<AdminCall>,
}

/// What the control thread holds of the running daemon.
pub struct Control<'a> {
    pub groups: &'a mut [SteeredGroup],
    pub stats: &'a [Arc<WorkerStats>],
    pub inboxes: Arc<[Inbox]>,
    pub workers: &'a [std::thread::JoinHandle<Result<()>>],
    pub state: &'a watch::Sender<RunState>,
    pub reloader: Reloader,
    pub relay_ports: Arc<RelayPorts>,
    pub user_traffic: Option<Arc<UserTraffic>>,
    /// The TLS handshake thread's counters.
    pub handshakes: Arc<crate::worker::handshake::HandshakeStats>,
    /// Allocation pins per group and worker, and when they were counted (see `scrape`).
    pub pin_counts: Option<(Instant, Vec<Option<Vec<u64>>>)>,
    pub metrics_max_users: usize,
    /// The readiness status (`serving ...`), restored after an undrain.
    pub status: String,
    /// The kernel fast path, when it is on.
    pub fast: Option<&'a mut crate::fast_path::FastPath>,
    /// Whether this process pinned the fast path's maps (it removes them at exit).
    pub fast_pinned: bool,
    /// The metrics endpoint and the admin API.
    pub endpoints: Endpoints,
    /// The generations of the daemon this process knows of (upgrade).
    pub generations: Generations,
    /// The binary as started (an upgrade runs what is at this path now).
    pub exe: std::path::PathBuf,
    /// The nonce secret, which a new generation keeps.
    pub nonce_secret: [u8; 32],
    /// This process's slots in every steered group's socket array.
    pub slots: std::ops::Range<u32>,
    pub workers_count: usize,
    /// Why this process cannot be upgraded, if it cannot.
    pub upgrade_blocked: Option<String>,
}

/// The metrics endpoint's and the admin API's listening sockets, and the tasks serving
/// them (stopped when a new generation takes them over, started again if it dies).
pub struct Endpoints {
    metrics: Option<std::net::TcpListener>,
    admin: Option<(std::path::PathBuf, std::os::unix::net::UnixListener)>,
    scrapes: mpsc::Sender<ScrapeRequest>,
    calls: mpsc::Sender<admin::AdminCall>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Endpoints {
    pub fn new(
        metrics: Option<std::net::TcpListener>,
        admin: Option<(std::path::PathBuf, std::os::unix::net::UnixListener)>,
        scrapes: mpsc::Sender<ScrapeRequest>,
        calls: mpsc::Sender<admin::AdminCall>,
    ) -> Endpoints {
        Endpoints { metrics, admin, scrapes, calls, tasks: Vec::new() }
    }

    /// Serves both endpoints (inside the runtime).
    pub fn start(&mut self) -> Result<()> {
        self.stop();
        if let Some(listener) = &self.metrics {
            let listener = listener.try_clone()?;
            listener.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            self.tasks.push(tokio::spawn(metrics::serve(listener, self.scrapes.clone())));
        }
        if let Some((_, listener)) = &self.admin {
            let listener = listener.try_clone()?;
            listener.set_nonblocking(true)?;
            let listener = tokio::net::UnixListener::from_std(listener)?;
            self.tasks.push(tokio::spawn(admin::serve(listener, self.calls.clone())));
        }
        Ok(())
    }

    /// True while the endpoints are served by this process (or there are none).
    pub fn running(&self) -> bool {
        !self.tasks.is_empty() || (self.metrics.is_none() && self.admin.is_none())
    }

    /// Stops accepting (the sockets stay open, for whoever serves them next).
    pub fn stop(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

/// The other generations of the daemon this process knows of.
#[derive(Default)]
pub struct Generations {
    /// An upgrade under way, and the admin calls waiting for its outcome.
    pub pending: Option<(upgrade::Upgrade, Vec<oneshot::Sender<Value>>)>,
    /// The generation this process handed new flows to (this one is the old one), its
    /// slots, and since when.
    pub successor: Option<(upgrade::Upgrade, std::ops::Range<u32>, Instant)>,
    /// The generation before this one, while it lives.
    pub predecessor: Option<Predecessor>,
}

/// The previous generation, watched until it exits.
pub struct Predecessor {
    pub pid: u32,
    pub slots: std::ops::Range<u32>,
    /// Readable once it has exited (taken by the control loop).
    exited: Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>,
}

impl Predecessor {
    /// Watches `pid` (inside the runtime); None when it is already gone.
    pub fn watch(pid: u32, slots: std::ops::Range<u32>) -> Option<Predecessor> {
        let fd = upgrade::pidfd(pid).ok()?;
        // SAFETY: as in `receive_handoffs`.
        let exited = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .ok()?;
        Some(Predecessor { pid, slots, exited: Some(exited) })
    }
}

/// Receives the datagrams the previous generation hands over and gives each to a worker
/// (by its client's address), until that generation closes its end.
pub async fn receive_handoffs(
    fd: std::os::fd::OwnedFd,
    inboxes: Arc<[Inbox]>,
    mut routers: Vec<Option<crate::steering::FlowRouter>>,
) {
    use std::os::fd::AsRawFd;
    // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it (and returns its
    // descriptor) for its whole life.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    };
    let Ok(fd) = registered else { return };
    let mut buf = vec![0u8; upgrade::HANDOFF_HEADER + 65_536];
    loop {
        let Ok(mut guard) = fd.readable().await else { return };
        loop {
            // SAFETY: recv into a live buffer of the length given.
            let n = unsafe {
                libc::recv(
                    fd.get_ref().as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n == 0 {
                return; // the previous generation has gone
            }
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock {
                    guard.clear_ready();
                    break;
                }
                return;
            }
            let Some((group, listener, client, data)) = upgrade::parse_handoff(&buf[..n as usize])
            else {
                continue;
            };
            if group >= routers.len() || inboxes.is_empty() {
                continue;
            }
            use std::hash::{BuildHasher, BuildHasherDefault};
            let hash = BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
                .hash_one(client);
            let pick = (hash % inboxes.len() as u64) as u32;
            // The worker the flow's next datagrams will reach, so that a retransmission
            // that comes straight from the kernel meets the same worker (never two
            // allocations for one 5-tuple).
            let worker = match routers[group].as_mut() {
                Some(router) => router.worker_for(client, listener.ip(), pick) as usize,
                None => pick as usize,
            };
            let Some(inbox) = inboxes.get(worker) else { continue };
            let handoff = crate::worker::Handoff {
                group,
                listener,
                client,
                data: data.into(),
                from_previous: true,
            };
            let _ = inbox.try_send(Command::Handoff(handoff));
        }
    }
}

/// Where the loop is in its life.
#[derive(Default)]
struct Phase {
    /// SIGTERM: draining until this instant, then stopping.
    stopping: Option<Instant>,
    /// Draining because the operator asked (admin API), until undrained.
    drained: bool,
}

/// Tells systemd (Type=notify) where the daemon is; a no-op without `NOTIFY_SOCKET`.
pub fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "cannot notify the service manager");
    }
}

impl Control<'_> {
    /// Tells the workers to run, drain or stop, and wakes them to see it.
    fn set_state(&self, state: RunState) {
        let _ = self.state.send(state);
        self.inboxes.iter().for_each(Inbox::wake);
    }

    fn live(&self) -> u64 {
        self.stats.iter().map(|w| w.allocations.load(Ordering::Relaxed)).sum()
    }

    /// Runs until SIGINT, a second SIGTERM, or the end of a drain.
    pub async fn run(&mut self, mut signals: Signals, mut requests: Requests) -> Result<()> {
        let mut estimator = LoadEstimator::new(self.stats.len());
        let mut loads: Option<WorkerLoads> = None;
        let mut tick = tokio::time::interval(LOAD_PUBLISH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cert_check = tokio::time::interval(CERT_CHECK_INTERVAL);
        cert_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut phase = Phase::default();
        let has_tls = self.reloader.tls().is_some();
        // The host's addresses, watched: the peer rules follow them (the server's own).
        let registered = AddressWatch::new().and_then(|w| {
            // SAFETY: an AddressWatch owns its descriptor (an OwnedFd) for its whole life
            // and always returns that one from as_raw_fd.
            unsafe {
                tokio::io::unix::AsyncFd::register_with_interest(w, tokio::io::Interest::READABLE)
            }
            .map_err(|e| e.into_parts().1)
        });
        let watch = match registered {
            Ok(watch) => Some(watch),
            Err(e) => {
                warn!(error = %e, "cannot watch the host's addresses: the server's own addresses are those at start");
                None
            }
        };
        let mut own = self.own_addresses();
        let mut predecessor_exit =
            self.generations.predecessor.as_mut().and_then(|p| p.exited.take());
        if self.generations.predecessor.is_some() && predecessor_exit.is_none() {
            // Gone already (or not watchable): take over now.
            self.predecessor_gone();
        }
        loop {
            tokio::select! {
                // The load publication first whenever it is due: a flood of scrapes or admin
                // calls must not delay what steering places new flows by.
                biased;
                _ = tick.tick() => {
                    if let Some(i) = self.workers.iter().position(|w| w.is_finished()) {
                        bail!("worker {i} stopped unexpectedly");
                    }
                    loads = Some(self.publish_loads(&mut estimator));
                    for steering in self.groups.iter_mut().filter_map(|g| g.steering.as_mut()) {
                        steering.flush_logs();
                    }
                    if let Some(done) = self.generations_tick(&phase).await {
                        return done;
                    }
                    if let Some(until) = phase.stopping {
                        let left = self.live();
                        if left == 0 {
                            info!("drained: no allocation left");
                            return Ok(());
                        }
                        if Instant::now() >= until {
                            info!(allocations = left, "drain timeout: closing the remaining allocations");
                            return Ok(());
                        }
                    }
                }
                ready = async { watch.as_ref()?.readable().await.ok() }, if watch.is_some() => {
                    if let Some(mut guard) = ready {
                        let changed = guard.get_inner().drain();
                        guard.clear_ready();
                        if changed {
                            self.addresses_changed(&mut own).await;
                        }
                    }
                }
                _ = signals.term.recv() => {
                    self.cancel_upgrade("SIGTERM: the server stops");
                    if phase.stopping.is_some() {
                        info!("second SIGTERM: stopping now");
                        return Ok(());
                    }
                    let timeout = Duration::from_secs(self.reloader.running().drain_timeout_secs);
                    let live = self.live();
                    info!(allocations = live, timeout_secs = timeout.as_secs(), "SIGTERM: draining (no new allocations)");
                    self.set_state(RunState::Draining);
                    let status = format!("STATUS=stopping: draining {live} allocations");
                    notify(&[sd_notify::NotifyState::Stopping, sd_notify::NotifyState::Custom(&status)]);
                    phase.stopping = Some(Instant::now() + timeout);
                }
                _ = signals.int.recv() => {
                    info!("SIGINT: stopping");
                    self.cancel_upgrade("SIGINT: the server stops");
                    return Ok(());
                }
                _ = signals.hup.recv() => { let _ = self.reload("SIGHUP").await; }
                _ = signals.usr2.recv() => self.start_upgrade("SIGUSR2", None, &phase),
                _ = async { predecessor_exit.as_ref()?.readable().await.ok() }, if predecessor_exit.is_some() => {
                    predecessor_exit = None;
                    self.predecessor_gone();
                }
                _ = cert_check.tick(), if has_tls => {
                    if let Some(certs) = self.reloader.tls().filter(|c| c.changed_on_disk()) {
                        match certs.reload() {
                            Ok(()) => info!(cert = %certs.cert_path().display(), "TLS certificate changed on disk: reloaded"),
                            Err(e) => warn!(error = %format!("{e:#}"), "TLS certificate changed on disk but not reloaded: keeping the running one"),
                        }
                    }
                }
                Some(reply) = requests.scrapes.recv() => {
                    let _ = reply.send(metrics::render(self.scrape(loads.as_ref(), &phase)));
                }
                Some((request, reply)) = requests.admin.recv() => {
                    self.admin(request, reply, &mut phase).await;
                }
            }
        }
    }
}

impl Control<'_> {
    /// The server's own addresses now (every interface address, listening, relay and
    /// external addresses).
    fn own_addresses(&self) -> Vec<std::net::IpAddr> {
        crate::setup::own_addresses(self.reloader.running(), self.reloader.relays())
    }

    /// The kernel announced an address change: when the server's own addresses differ
    /// from `own`, every worker's peer rules take the new list.
    async fn addresses_changed(&mut self, own: &mut Vec<std::net::IpAddr>) {
        let now = self.own_addresses();
        if now == *own {
            return;
        }
        let added: Vec<String> =
            now.iter().filter(|ip| !own.contains(ip)).map(ToString::to_string).collect();
        let removed: Vec<String> =
            own.iter().filter(|ip| !now.contains(ip)).map(ToString::to_string).collect();
        info!(
            added = %added.join(","),
            removed = %removed.join(","),
            "the host's addresses changed: peer rules updated"
        );
        let shared = Arc::new(now.clone());
        for inbox in self.inboxes.iter() {
            let _ = inbox.send(Command::OwnAddresses(Arc::clone(&shared))).await;
        }
        // The fast path delivers on this host what is for its addresses: the new list.
        if let Some(fast) = self.fast.as_deref_mut() {
            let updated = crate::fast_path::interfaces().and_then(|all| fast.set_host(&all));
            if let Err(e) = updated {
                warn!(error = %super::error_chain(&e), "the fast path keeps the old addresses");
            }
        }
        *own = now;
    }

    /// Reads the configuration again and applies it; the outcome goes to the log (and to
    /// the admin API's caller).
    async fn reload(&mut self, why: &str) -> Result<super::reload::Reloaded, String> {
        // systemd wants the time with RELOADING=1 (Type=notify-reload); plain notify
        // services take it too.
        let mut states = vec![sd_notify::NotifyState::Reloading];
        states.extend(sd_notify::NotifyState::monotonic_usec_now().ok());
        notify(&states);
        let outcome = self.reloader.reload(&self.inboxes).await;
        notify(&[sd_notify::NotifyState::Ready]);
        match outcome {
            Ok(done) => {
                info!(
                    why,
                    applied = %done.applied.join(","),
                    certificate = done.certificate,
                    "configuration reloaded"
                );
                if !done.need_restart.is_empty() {
                    warn!(
                        keys = %done.need_restart.join(","),
                        "changed keys that take effect only at restart: their running values stay"
                    );
                }
                Ok(done)
            }
            Err(e) => {
                let e = format!("{e:#}");
                warn!(why, error = %e, "configuration not reloaded: the running one stays");
                Err(e)
            }
        }
    }

    /// Answers an admin request; those that ask the workers are answered by a task, so
    /// that the loop goes on publishing loads meanwhile.
    async fn admin(
        &mut self,
        request: AdminRequest,
        reply: oneshot::Sender<Value>,
        phase: &mut Phase,
    ) {
        let answer = match request {
            AdminRequest::Allocations => {
                let inboxes = Arc::clone(&self.inboxes);
                tokio::spawn(async move {
                    let _ = reply.send(match list_allocations(&inboxes).await {
                        Ok(list) => json!({ "ok": true, "allocations": list }),
                        Err(e) => admin::error(e),
                    });
                });
                return;
            }
            AdminRequest::Kick { user, client } => {
                if user.is_none() && client.is_none() {
                    admin::error("kick needs a user, a client address, or both")
                } else {
                    let inboxes = Arc::clone(&self.inboxes);
                    tokio::spawn(async move {
                        let _ = reply.send(match kick(&inboxes, user.clone(), client).await {
                            Ok(ended) => {
                                let user = user.as_deref().unwrap_or("any");
                                let client = client.map_or("any".to_owned(), |c| c.to_string());
                                info!(user, client, ended, "admin: allocations ended (kick)");
                                json!({ "ok": true, "ended": ended })
                            }
                            Err(e) => admin::error(e),
                        });
                    });
                    return;
                }
            }
            AdminRequest::Drain => {
                if phase.stopping.is_none() && !phase.drained {
                    phase.drained = true;
                    self.set_state(RunState::Draining);
                    info!(
                        allocations = self.live(),
                        "admin: draining (no new allocations) until undrained"
                    );
                    notify(&[sd_notify::NotifyState::Status("draining: no new allocations")]);
                }
                json!({ "ok": true, "draining": true })
            }
            AdminRequest::Undrain => {
                if phase.stopping.is_some() {
                    admin::error(
                        "the server is stopping (SIGTERM): it cannot take new allocations again",
                    )
                } else {
                    if phase.drained {
                        phase.drained = false;
                        self.set_state(RunState::Running);
                        info!("admin: undrained, taking new allocations again");
                        notify(&[sd_notify::NotifyState::Status(&self.status)]);
                    }
                    json!({ "ok": true, "draining": false })
                }
            }
            AdminRequest::Steering { mode } => self.set_steering(&mode),
            AdminRequest::Upgrade => {
                // Answered once the new generation serves, or failed.
                self.start_upgrade("admin API", Some(reply), phase);
                return;
            }
            AdminRequest::Reload => match self.reload("admin API").await {
                Ok(done) => json!({
                    "ok": true,
                    "applied": done.applied,
                    "need_restart": done.need_restart,
                    "certificate": done.certificate,
                }),
                Err(e) => admin::error(e),
            },
            AdminRequest::Status => {
                let listeners: Vec<Value> = self
                    .groups
                    .iter()
                    .map(|g| json!({ "transport": g.transport.name(), "listen": g.local.to_string(), "steering": group_mode(g) }))
                    .collect();
                json!({
                    "ok": true,
                    "pid": std::process::id(),
                    "workers": self.stats.len(),
                    "allocations": self.live(),
                    "connections": self.stats.iter().map(|w| w.connections.load(Ordering::Relaxed)).sum::<u64>(),
                    "draining": phase.stopping.is_some() || phase.drained,
                    "stopping": phase.stopping.is_some(),
                    "listeners": listeners,
                    "generation": self.generation_status(),
                })
            }
        };
        let _ = reply.send(answer);
    }

    /// Sets the steering mode of every steered listener (new flows only).
    fn set_steering(&mut self, mode: &str) -> Value {
        let mode = match mode {
            "p2c" => Mode::P2c,
            "least" => Mode::Least,
            "hash" => Mode::Hash,
            other => {
                return admin::error(format!(
                    "unknown steering mode {other:?}: p2c, least or hash"
                ));
            }
        };
        let mut changed = Vec::new();
        for group in self.groups.iter_mut() {
            let (local, transport) = (group.local, group.transport.name());
            let Some(steering) = group.steering.as_mut() else { continue };
            let before = steering.mode().map_or("unknown", mode_name);
            if let Err(e) = steering.maps_mut().set_mode(mode) {
                return admin::error(format!("setting the mode of {transport} {local}: {e}"));
            }
            info!(listen = %local, transport, before, after = mode_name(mode), "admin: steering mode changed (new flows only)");
            changed.push(json!({ "transport": transport, "listen": local.to_string(), "before": before, "after": mode_name(mode) }));
        }
        if changed.is_empty() {
            return admin::error("no listener is steered (steering is off or unavailable)");
        }
        json!({ "ok": true, "listeners": changed })
    }

    /// One scrape's numbers.
    fn scrape(&mut self, loads: Option<&WorkerLoads>, phase: &Phase) -> Scrape {
        let total_rate: f64 = loads.map_or(0.0, |l| l.packet_rates.iter().sum());
        let workers = self
            .stats
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let read = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
                WorkerSnapshot {
                    received_packets: read(&w.packets),
                    handed_off: read(&w.handed_off),
                    handed_in: read(&w.handed_in),
                    handoff_drops: read(&w.handoff_drops),
                    relayed_internally: read(&w.relayed_internally),
                    connections: read(&w.connections),
                    connections_accepted: read(&w.connections_accepted),
                    closes: w.closes.iter().map(read).collect(),
                    stream_write_drops: read(&w.stream_write_drops),
                    pin_failures: read(&w.pin_failures),
                    kernel: [
                        read(&w.fast_to_peer_packets),
                        read(&w.fast_to_peer_bytes),
                        read(&w.fast_to_client_packets),
                        read(&w.fast_to_client_bytes),
                    ],
                    fast_bindings: read(&w.fast_bindings),
                    fast_failures: read(&w.fast_failures),
                    score: loads.map_or(0, |l| l.score(i)),
                    share: match loads.and_then(|l| l.packet_rates.get(i)) {
                        Some(rate) if total_rate > 0.0 => rate / total_rate,
                        _ => 0.0,
                    },
                    ..WorkerSnapshot::read(&w.metrics)
                }
            })
            .collect();
        // The pin maps are walked at most once a second, however often scrapers ask.
        let fresh = self.pin_counts.as_ref().is_some_and(|(at, _)| at.elapsed() < PIN_COUNT_TTL);
        if !fresh {
            let counts = self
                .groups
                .iter()
                .map(|g| match (&g.steering, g.transport) {
                    (Some(s), Transport::Udp) => match s.maps().pin_counts() {
                        Ok(counts) => Some(counts.allocations),
                        Err(e) => {
                            warn!(error = %e, "reading the allocation pins failed");
                            None
                        }
                    },
                    _ => None,
                })
                .collect();
            self.pin_counts = Some((Instant::now(), counts));
        }
        let pin_counts = self.pin_counts.as_ref().map(|(_, c)| c.as_slice()).unwrap_or_default();
        let groups = self
            .groups
            .iter()
            .enumerate()
            .map(|(i, g)| GroupSnapshot {
                listener: g.local.to_string(),
                transport: g.transport.name(),
                mode: group_mode(g),
                pins: pin_counts.get(i).cloned().flatten(),
            })
            .collect();
        let users = match &self.user_traffic {
            Some(traffic) => {
                let mut totals = std::collections::HashMap::new();
                if let Ok(by_worker) = traffic.by_worker.lock() {
                    for (user, bytes) in by_worker.iter().flatten() {
                        let t: &mut [u64; 2] = totals.entry(user.clone()).or_default();
                        t[0] += bytes[0];
                        t[1] += bytes[1];
                    }
                }
                metrics::top_users(totals, self.metrics_max_users)
            }
            None => Vec::new(),
        };
        let free = self.relay_ports.free_ports();
        Scrape {
            workers,
            relay_ports_free: [free[0] as u64, free[1] as u64],
            groups,
            users,
            draining: phase.stopping.is_some() || phase.drained,
            handshakes: metrics::HandshakeSnapshot::read(&self.handshakes),
            fast_verdicts: self.fast.as_ref().and_then(|f| f.verdicts().ok()).map(|v| v.to_vec()),
        }
    }

    /// Computes each worker's load and writes it into its slot of every steered group.
    fn publish_loads(&mut self, estimator: &mut LoadEstimator) -> WorkerLoads {
        let workers = self.stats.len();
        // A worker's placements are those of its socket in every group.
        let mut placed_by_group: Vec<Vec<u64>> = Vec::with_capacity(self.groups.len());
        let mut placed = vec![0u64; workers];
        for group in self.groups.iter() {
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
        let samples: Vec<WorkerSample> = self
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
        if self.groups.iter().all(|g| g.steering.is_none()) {
            return loads;
        }
        // What each worker reports besides its score (see `SocketLoad`).
        let mut reports: Vec<SocketLoad> = self
            .stats
            .iter()
            .zip(self.inboxes.iter())
            .map(|(w, inbox)| SocketLoad {
                allocations: w.allocations.load(Ordering::Relaxed),
                packets: w.packets.load(Ordering::Relaxed),
                bytes: w.bytes.load(Ordering::Relaxed),
                handed_off: w.handed_off.load(Ordering::Relaxed),
                handed_in: w.handed_in.load(Ordering::Relaxed),
                handoff_drops: w.handoff_drops.load(Ordering::Relaxed),
                inbox_queued: inbox.queued() as u64,
                pin_failures: w.pin_failures.load(Ordering::Relaxed),
                auth_failures: w.auth_failures.load(Ordering::Relaxed),
                rate_limited: w.rate_limited.load(Ordering::Relaxed),
                kernel_packets: w.fast_to_peer_packets.load(Ordering::Relaxed)
                    + w.fast_to_client_packets.load(Ordering::Relaxed),
                ..SocketLoad::default()
            })
            .collect();
        for group in self.groups.iter() {
            for (report, socket) in reports.iter_mut().zip(&group.members) {
                if let Some(mem) = socket_meminfo(socket) {
                    report.rx_queued_bytes += mem.queued_bytes;
                    report.rx_drops += mem.drops;
                }
            }
        }
        for (group, placed) in self.groups.iter_mut().zip(&placed_by_group) {
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
        loads
    }
}

/// The steering mode of a group, as metrics and the admin API name it.
fn group_mode(group: &SteeredGroup) -> &'static str {
    group.steering.as_ref().map_or("off", |s| s.mode().map_or("unknown", mode_name))
}

/// Waits until every worker said it carried out a command (at most 5 s in all).
async fn wait_all(waits: Vec<oneshot::Receiver<()>>) {
    let all = async {
        for wait in waits {
            let _ = wait.await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), all).await;
}

/// Every worker's allocations.
async fn list_allocations(inboxes: &[Inbox]) -> Result<Vec<AllocationInfo>, &'static str> {
    let mut replies = Vec::with_capacity(inboxes.len());
    for inbox in inboxes {
        let (tx, rx) = oneshot::channel();
        inbox.send(Command::Allocations(tx)).await.map_err(|_| "a worker has stopped")?;
        replies.push(rx);
    }
    let mut all = Vec::new();
    for reply in replies {
        all.extend(reply.await.map_err(|_| "a worker has stopped")?);
    }
    Ok(all)
}

/// Ends the allocations of `user` and/or `client` on every worker.
async fn kick(
    inboxes: &[Inbox],
    user: Option<String>,
    client: Option<std::net::SocketAddr>,
) -> Result<usize, &'static str> {
    let mut replies = Vec::with_capacity(inboxes.len());
    for inbox in inboxes {
        let (reply, rx) = oneshot::channel();
        let command = Command::Kick { user: user.clone(), client, reply };
        inbox.send(command).await.map_err(|_| "a worker has stopped")?;
        replies.push(rx);
    }
    let mut ended = 0;
    for reply in replies {
        ended += reply.await.map_err(|_| "a worker has stopped")?;
    }
    Ok(ended)
}

/// Hitless upgrade: starting a new generation, handing it over, taking every role back
/// if it dies, and the previous generation's exit (see [`upgrade`]).
impl Control<'_> {
    /// Connections open now, TLS handshakes in progress included.
    fn connections(&self) -> u64 {
        self.stats.iter().map(|w| w.connections.load(Ordering::Relaxed)).sum::<u64>()
            + self.handshakes.in_flight.load(Ordering::Relaxed)
    }

    /// Stops an upgrade under way (the server stops): the new process is killed.
    fn cancel_upgrade(&mut self, why: &str) {
        let Some((mut upgrade, replies)) = self.generations.pending.take() else { return };
        let _ = upgrade.child.kill();
        let _ = upgrade.child.wait();
        self.forget_failed_generation();
        warn!(pid = upgrade.child.id(), "upgrade cancelled: {why}");
        for reply in replies {
            let _ = reply.send(admin::error(format!("upgrade cancelled: {why}")));
        }
    }

    /// Removes what a new generation that never served left in the pin directories (its
    /// record; its sockets left the socket arrays with it).
    fn forget_failed_generation(&self) {
        for steering in self.groups.iter().filter_map(|g| g.steering.as_ref()) {
            steering.remove_leftovers(&[]);
        }
    }

    /// Starts the binary on disk as a new generation, unless one is starting or a
    /// previous one still serves; `reply` gets the outcome once it is known.
    fn start_upgrade(&mut self, why: &str, reply: Option<oneshot::Sender<Value>>, phase: &Phase) {
        let refusal = if let Some((upgrade, _)) = &self.generations.pending {
            Some(format!(
                "an upgrade is already in progress: the new process (pid {}) is starting",
                upgrade.child.id()
            ))
        } else if let Some((upgrade, _, _)) = &self.generations.successor {
            Some(format!(
                "this process has already handed over to pid {}: it only serves its remaining \
                 allocations (upgrade through that process's admin socket)",
                upgrade.child.id()
            ))
        } else if let Some(previous) = &self.generations.predecessor {
            Some(format!(
                "an upgrade is in progress: the previous generation (pid {}) still serves {} \
                 allocation(s); upgrade again once it has exited (when its last allocation \
                 ends, at most drain_timeout_secs after the last upgrade)",
                previous.pid,
                self.allocations_of(previous.slots.clone())
            ))
        } else if phase.stopping.is_some() {
            Some("the server is stopping (SIGTERM)".to_owned())
        } else if let Some(why) = &self.upgrade_blocked {
            Some(why.clone())
        } else if self.groups.iter().any(|g| g.steering.is_none()) {
            Some(
                "an upgrade needs eBPF steering on every listener (it is off or unavailable \
                 here): without it the kernel's hash would move live allocations' datagrams to \
                 the new process, and the TCP connections queued at the switch would be reset"
                    .to_owned(),
            )
        } else if let n @ 1.. =
            self.stats.iter().map(|w| w.unpinned.load(Ordering::Relaxed)).sum::<u64>()
        {
            Some(format!(
                "{n} live allocation(s) have no pin in the steering map (it was full): after the \
                 switch their datagrams would reach the new process; try again once they have \
                 one (retried twice a second) or have ended"
            ))
        } else {
            None
        };
        if let Some(refusal) = refusal {
            warn!(why, "upgrade refused: {refusal}");
            if let Some(reply) = reply {
                let _ = reply.send(admin::error(refusal));
            }
            return;
        }
        match self.offer_and_start() {
            Ok(upgrade) => {
                info!(
                    why,
                    pid = upgrade.child.id(),
                    exe = %self.exe.display(),
                    "upgrade: started a new generation; this process serves until it has joined"
                );
                self.generations.pending = Some((upgrade, reply.into_iter().collect()));
            }
            Err(e) => {
                let e = format!("upgrade failed: {e:#}; this process keeps serving");
                warn!(why, "{e}");
                if let Some(reply) = reply {
                    let _ = reply.send(admin::error(e));
                }
            }
        }
    }

    fn offer_and_start(&mut self) -> Result<upgrade::Upgrade> {
        use std::os::fd::AsFd;
        let mut groups = Vec::new();
        for g in self.groups.iter() {
            let (maps, pin) = match &g.steering {
                Some(s) => {
                    let (maps, pinned) = s.handover()?;
                    let pin = match (s.pin_dir(), pinned) {
                        (Some(dir), Some(handle)) => Some((dir.to_owned(), handle)),
                        _ => None,
                    };
                    (maps, pin)
                }
                None => (Vec::new(), None),
            };
            groups.push((g.transport, g.local, maps, pin));
        }
        let offer = upgrade::Offer {
            exe: &self.exe,
            nonce_secret: self.nonce_secret,
            slots: self.slots.clone(),
            groups,
            metrics: self.endpoints.metrics.as_ref().map(|l| l.as_fd()),
            admin: self.endpoints.admin.as_ref().map(|(path, l)| (path.as_path(), l.as_fd())),
        };
        upgrade::start(offer)
    }

    /// Sends every worker the command `make` builds; the receivers say when each has
    /// carried it out ([`wait_all`]).
    async fn send_workers(
        &self,
        mut make: impl FnMut(usize, oneshot::Sender<()>) -> Command,
    ) -> Vec<oneshot::Receiver<()>> {
        let mut waits = Vec::new();
        for (i, inbox) in self.inboxes.iter().enumerate() {
            let (done, wait) = oneshot::channel();
            if inbox.send(make(i, done)).await.is_ok() {
                waits.push(wait);
            }
        }
        waits
    }

    /// [`Control::send_workers`], then waits until each worker has carried it out (at
    /// most 5 s).
    async fn tell_workers(&self, make: impl FnMut(usize, oneshot::Sender<()>) -> Command) {
        wait_all(self.send_workers(make).await).await;
    }

    /// Once a second: the upgrade under way, the new generation's health, and (in the old
    /// generation) whether the last allocation and connection have ended. Some: stop.
    async fn generations_tick(&mut self, phase: &Phase) -> Option<Result<()>> {
        if self.generations.predecessor.is_some()
            && !self.endpoints.running()
            && self.groups.iter().filter_map(|g| g.steering.as_ref()).all(|s| s.takes_new_flows())
        {
            self.start_endpoints_once();
        }
        if let Some((upgrade, _)) = &mut self.generations.pending {
            match upgrade.poll() {
                upgrade::Joining::Waiting => {}
                upgrade::Joining::Joined(slots) => {
                    let (upgrade, replies) = self.generations.pending.take()?;
                    self.hand_over(upgrade, slots, replies).await;
                }
                upgrade::Joining::Failed(why) => {
                    let (_, replies) = self.generations.pending.take()?;
                    self.forget_failed_generation();
                    let e = format!("upgrade failed: {why}; this process keeps serving");
                    warn!("{e}");
                    for reply in replies {
                        let _ = reply.send(admin::error(&e));
                    }
                }
            }
        }
        let (upgrade, _, since) = self.generations.successor.as_mut()?;
        if let Ok(Some(status)) = upgrade.child.try_wait() {
            let pid = upgrade.child.id();
            if phase.stopping.is_some() {
                // Both stop (systemctl stop): nothing to take back.
                info!(new = pid, %status, "the new generation has exited");
                self.generations.successor = None;
                self.forget_failed_generation();
                return None;
            }
            self.resume(pid, status).await;
            return None;
        }
        let since = *since;
        let (live, connections) = (self.live(), self.connections());
        // (Not at once: the admin call that asked for the upgrade is still being answered.)
        if live == 0 && connections == 0 && since.elapsed() >= HANDOVER_GRACE {
            info!("previous generation: its last allocation and connection have ended; exiting");
            return Some(Ok(()));
        }
        let timeout = Duration::from_secs(self.reloader.running().drain_timeout_secs);
        if since.elapsed() >= timeout && phase.stopping.is_none() {
            info!(
                allocations = live,
                connections,
                timeout_secs = timeout.as_secs(),
                "previous generation: drain timeout; closing what is left and exiting"
            );
            return Some(Ok(()));
        }
        None
    }

    /// The new generation serves: hand it new flows, new connections and the endpoints.
    async fn hand_over(
        &mut self,
        upgrade: upgrade::Upgrade,
        slots: std::ops::Range<u32>,
        replies: Vec<oneshot::Sender<Value>>,
    ) {
        let pid = upgrade.child.id();
        // Steering first: new flows and new connections to the new generation's sockets.
        for g in self.groups.iter_mut() {
            if let Some(steering) = g.steering.as_mut()
                && let Err(e) = steering.maps_mut().set_generation(slots.clone())
            {
                warn!(listen = %g.local, error = %e, "cannot point the group's new flows at the new generation");
            }
        }
        // Then the workers, both commands at once (a worker takes them together, before
        // any socket event): a datagram of a flow without an allocation here goes to the
        // new generation, whichever way it still reaches this process; and our TCP and
        // TLS listeners close, so that the kernel migrates the connections queued on them
        // to the new generation's listeners (select-or-migrate program) rather than a
        // worker accepting them. Connections we hold stay.
        let mut waits = match upgrade.handoff.try_clone() {
            Ok(fd) => {
                let successor = Arc::new(upgrade::Successor::new(fd));
                self.send_workers(|_, done| Command::Successor(Some(Arc::clone(&successor)), done))
                    .await
            }
            Err(e) => {
                warn!(error = %e, "cannot hand datagrams to the new generation");
                Vec::new()
            }
        };
        waits.extend(self.send_workers(|_, done| Command::StreamListeners(Vec::new(), done)).await);
        // The listening sockets stop listening at once (the workers' handles close when
        // they take the command): shutdown(SHUT_RD) takes a listener out of its group and
        // migrates its queue, while this process keeps the socket, bound, to listen again
        // should the new generation die (no bind, no privilege needed then).
        for g in self.groups.iter().filter(|g| g.transport != Transport::Udp) {
            for member in &g.members {
                // SAFETY: shutdown on a socket descriptor this process owns.
                unsafe { libc::shutdown(member.as_raw_fd(), libc::SHUT_RD) };
            }
        }
        wait_all(waits).await;
        self.endpoints.stop();
        let status = format!("STATUS=handed over to pid {pid}");
        notify(&[sd_notify::NotifyState::Custom(&status), sd_notify::NotifyState::MainPid(pid)]);
        let (live, connections) = (self.live(), self.connections());
        info!(
            new = pid,
            allocations = live,
            connections,
            timeout_secs = self.reloader.running().drain_timeout_secs,
            "upgrade: the new generation serves new flows, connections, metrics and the admin \
             API; this process serves what it has until it ends (at most drain_timeout_secs)"
        );
        for reply in replies {
            let _ = reply.send(json!({
                "ok": true,
                "pid": pid,
                "previous": std::process::id(),
                "allocations_left": live,
                "connections_left": connections,
            }));
        }
        self.generations.successor = Some((upgrade, slots, Instant::now()));
    }

    /// The new generation died while this one still serves: take every role back.
    async fn resume(&mut self, pid: u32, status: std::process::ExitStatus) {
        let Some((_, slots, _)) = self.generations.successor.take() else { return };
        warn!(new = pid, %status, "the new generation exited: this process takes every role back");
        // First the workers keep what they would have handed over.
        self.tell_workers(|_, done| Command::Successor(None, done)).await;
        let workers = self.workers_count;
        let mut listeners: Vec<Vec<(std::net::TcpListener, Transport)>> =
            (0..workers).map(|_| Vec::new()).collect();
        for g in self.groups.iter_mut() {
            if g.transport != Transport::Udp {
                // The sockets kept since the hand-over listen again (they rejoin the
                // group), then take their slots back. One that lost its port (bound to
                // port 0, the kernel released it when it stopped listening) or cannot
                // listen makes the group bind anew, as at start.
                let relisten = g.members.iter().all(|member| {
                    // SAFETY: listen on a bound socket descriptor this process owns.
                    let rc =
                        unsafe { libc::listen(member.as_raw_fd(), crate::listener::TCP_BACKLOG) };
                    rc == 0
                        && socket2::SockRef::from(member)
                            .local_addr()
                            .ok()
                            .and_then(|a| a.as_socket())
                            .is_some_and(|a| a.port() == g.local.port())
                });
                if !relisten {
                    match crate::listener::bind_tcp_group(g.local, workers) {
                        Ok(group) => match super::dup_all(&group.listeners) {
                            Ok(members) => g.members = members,
                            Err(e) => {
                                warn!(listen = %g.local, error = %format!("{e:#}"), "cannot listen again")
                            }
                        },
                        Err(e) => {
                            warn!(listen = %g.local, error = %format!("{e:#}"), "cannot listen again: new connections are refused")
                        }
                    }
                }
                if let Some(steering) = g.steering.as_mut()
                    && let Err(e) = steering.replace_sockets(&g.members)
                {
                    warn!(listen = %g.local, error = %super::error_chain(&e), "cannot steer the listeners again");
                }
                for (i, member) in g.members.iter().enumerate() {
                    match member.try_clone() {
                        Ok(fd) => listeners[i].push((std::net::TcpListener::from(fd), g.transport)),
                        Err(e) => {
                            warn!(listen = %g.local, error = %e, "cannot give a listener back to its worker")
                        }
                    }
                }
            }
            if let Some(steering) = g.steering.as_mut() {
                if let Err(e) = steering.take_new_flows() {
                    warn!(listen = %g.local, error = %e, "cannot point new flows at this process again");
                }
                if g.transport == Transport::Udp {
                    match steering.maps_mut().clear_slots(slots.clone()) {
                        Ok(0) => {}
                        Ok(n) => {
                            info!(listen = %g.local, pins = n, "removed the allocation pins the new generation left")
                        }
                        Err(e) => {
                            warn!(listen = %g.local, error = %e, "cannot remove the new generation's pins")
                        }
                    }
                }
                // Its record in the pin directory (it could not remove it).
                steering.remove_leftovers(&[]);
            }
        }
        let mut per_worker = listeners.into_iter();
        self.tell_workers(|_, done| {
            Command::StreamListeners(per_worker.next().unwrap_or_default(), done)
        })
        .await;
        if let Err(e) = self.endpoints.start() {
            warn!(error = %e, "cannot serve the metrics endpoint and the admin API again");
        }
        notify(&[
            sd_notify::NotifyState::MainPid(std::process::id()),
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&self.status),
        ]);
    }

    /// The previous generation has exited: forget what it may have left (a killed
    /// process could not remove its pins), and pin this process's fast path maps.
    fn predecessor_gone(&mut self) {
        let Some(previous) = self.generations.predecessor.take() else { return };
        info!(previous = previous.pid, "the previous generation has exited");
        for g in self.groups.iter_mut() {
            let Some(steering) = g.steering.as_mut() else { continue };
            // It died before it handed over: new flows come here now.
            if !steering.takes_new_flows()
                && let Err(e) = steering.take_new_flows()
            {
                warn!(listen = %g.local, error = %e, "cannot point new flows at this process");
            }
            if g.transport == Transport::Udp {
                match steering.maps_mut().clear_slots(previous.slots.clone()) {
                    Ok(0) => {}
                    Ok(n) => {
                        warn!(listen = %g.local, pins = n, "removed the allocation pins the previous generation left")
                    }
                    Err(e) => {
                        warn!(listen = %g.local, error = %e, "cannot remove the previous generation's pins")
                    }
                }
                steering.remove_leftovers(&crate::fast_path::PINNED_MAPS);
            } else {
                steering.remove_leftovers(&[]);
            }
        }
        if let Some(fast) = self.fast.as_deref() {
            let udp = self.groups.iter().filter(|g| g.transport == Transport::Udp);
            for dir in udp.filter_map(|g| g.steering.as_ref()?.pin_dir()) {
                match fast.pin(dir) {
                    Ok(()) => self.fast_pinned = true,
                    Err(e) => {
                        warn!(dir = %dir.display(), error = %super::error_chain(&e), "fast path maps not pinned")
                    }
                }
            }
        }
        self.start_endpoints_once();
        // The main process now, whatever it was told (a predecessor that died before it
        // handed over never said so).
        notify(&[
            sd_notify::NotifyState::MainPid(std::process::id()),
            sd_notify::NotifyState::Status(&self.status),
        ]);
    }

    /// A new generation serves the endpoints from the hand-over on (before it, an admin
    /// call must reach the process that serves): started once new flows come here.
    fn start_endpoints_once(&mut self) {
        if self.endpoints.running() {
            return;
        }
        if let Err(e) = self.endpoints.start() {
            warn!(error = %e, "cannot serve the metrics endpoint and the admin API");
        }
    }

    /// The live allocations the generation at `slots` published (every UDP group gets the
    /// same per-worker numbers: the first one's).
    fn allocations_of(&self, slots: std::ops::Range<u32>) -> u64 {
        let group = self.groups.iter().find(|g| g.transport == Transport::Udp);
        group
            .and_then(|g| g.steering.as_ref())
            .and_then(|s| s.maps().loads_of(slots).ok())
            .map_or(0, |loads| loads.iter().map(|l| l.allocations).sum())
    }

    /// This process's place among the generations, for `status`.
    fn generation_status(&self) -> Value {
        let takes_new_flows =
            self.groups.iter().filter_map(|g| g.steering.as_ref()).all(|s| s.takes_new_flows());
        json!({
            "slots": [self.slots.start, self.slots.len()],
            "takes_new_flows": takes_new_flows && self.generations.successor.is_none(),
            "upgrading": self.generations.pending.as_ref().map(|(u, _)| u.child.id()),
            "successor": self.generations.successor.as_ref().map(|(u, _, _)| u.child.id()),
            "predecessor": self.generations.predecessor.as_ref().map(|p| json!({
                "pid": p.pid,
                "slots": [p.slots.start, p.slots.len()],
                "allocations": self.allocations_of(p.slots.clone()),
            })),
        })
    }
}
