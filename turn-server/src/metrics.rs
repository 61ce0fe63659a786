//! Prometheus metrics (`--prometheus`, port 9641 on 127.0.0.1 by default, as coturn).
//!
//! Nothing is shared on the packet path: each worker copies its protocol core's counters
//! and its own into [`WorkerMetrics`] (single writer, relaxed stores, once per batch), and
//! a scrape sums the workers ([`Scrape`], a prometheus-client `Collector`). A scrape
//! therefore sees traffic as it flows, not when sessions end. The names are documented in
//! `docs/metrics.md`.
//!
//! The endpoint is a minimal HTTP/1.1 responder for `GET /metrics` on the control
//! thread's runtime: a request head of at most 8 KiB read within 5 s, 16 scrapes at a
//! time, one response, connection closed. (An HTTP framework would bring more code than
//! the one route it would serve.) A scraper that accepts OpenMetrics (Prometheus does)
//! gets prometheus-client's OpenMetrics text; any other client (curl, promtool, older
//! agents) gets the same samples in the Prometheus text format 0.0.4, which names a
//! counter's HELP and TYPE after its `_total` samples ([`text_format`]).

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::{Semaphore, mpsc, oneshot},
};
use turn_proto::server::{
    AuthFailure, Counters, DeleteReason, DropReason, ERROR_CODES, REQUEST_METHODS, Transport,
};

use crate::worker::CloseReason;

/// Relayed addresses of an allocation, for the allocation gauge.
pub const FAMILIES: [&str; 3] = ["ipv4", "ipv6", "dual"];

/// How an allocation ended, for the deletion counter (in `WorkerMetrics::deleted` order).
pub const DELETE_REASONS: [&str; 5] = [
    DeleteReason::Expired.name(),
    DeleteReason::ClientRequest.name(),
    DeleteReason::ConnectionClosed.name(),
    DeleteReason::Kicked.name(),
    DeleteReason::Shutdown.name(),
];

fn bump(counter: &AtomicU64, by: u64) {
    // Single writer: a plain load/store pair, no locked read-modify-write.
    counter.store(counter.load(Ordering::Relaxed).wrapping_add(by), Ordering::Relaxed);
}

fn set(counter: &AtomicU64, value: u64) {
    counter.store(value, Ordering::Relaxed);
}

/// One worker's counters for the metrics endpoint. One writer (the worker); read with
/// relaxed loads at scrape time.
#[derive(Debug, Default)]
pub struct WorkerMetrics {
    requests_by_method: [AtomicU64; REQUEST_METHODS.len()],
    errors_by_code: [AtomicU64; ERROR_CODES.len() + 1],
    auth_failures_by: [AtomicU64; AuthFailure::COUNT],
    drops: [AtomicU64; DropReason::COUNT],
    /// Client -> peer and peer -> client, by transport.
    to_peer_packets: [AtomicU64; 3],
    to_peer_bytes: [AtomicU64; 3],
    to_client_packets: [AtomicU64; 3],
    to_client_bytes: [AtomicU64; 3],
    rate_limited_responses: AtomicU64,
    rate_limited_auth: AtomicU64,
    created: AtomicU64,
    /// Ended allocations, by [`DELETE_REASONS`].
    deleted: [AtomicU64; 5],
    /// Live allocations by transport and [`FAMILIES`].
    live: [[AtomicU64; 3]; 3],
}

impl WorkerMetrics {
    /// Copies the protocol core's counters (once per batch).
    pub fn publish(&self, c: &Counters) {
        let copy = |dst: &[AtomicU64], src: &[u64]| {
            for (d, s) in dst.iter().zip(src) {
                set(d, *s);
            }
        };
        copy(&self.requests_by_method, &c.requests_by_method);
        copy(&self.errors_by_code, &c.errors_by_code);
        copy(&self.auth_failures_by, &c.auth_failures_by);
        copy(&self.drops, &c.drops);
        copy(&self.to_peer_packets, &c.to_peer_traffic.packets);
        copy(&self.to_peer_bytes, &c.to_peer_traffic.bytes);
        copy(&self.to_client_packets, &c.to_client_traffic.packets);
        copy(&self.to_client_bytes, &c.to_client_traffic.bytes);
        set(&self.rate_limited_responses, c.rate_limited_responses);
        set(&self.rate_limited_auth, c.rate_limited_auth);
        set(&self.created, c.allocations_created);
        copy(
            &self.deleted,
            &[
                c.allocations_expired,
                c.allocations_deleted,
                c.allocations_closed,
                c.allocations_kicked,
            ],
        );
    }

    /// An allocation of `transport` with relays of `family` (a [`FAMILIES`] index) came
    /// (`+1`) or went (`-1`).
    pub fn live_changed(&self, transport: Transport, family: usize, came: bool) {
        let Some(gauge) = self.live.get(transport.index()).and_then(|f| f.get(family)) else {
            return;
        };
        let now = gauge.load(Ordering::Relaxed);
        set(gauge, if came { now + 1 } else { now.saturating_sub(1) });
    }

    /// Allocations ended at shutdown (the core does not count those).
    pub fn ended_at_shutdown(&self, n: u64) {
        bump(&self.deleted[4], n);
    }
}

/// Per-user traffic, when `metrics_per_user` is on: what each worker last published.
#[derive(Debug, Default)]
pub struct UserTraffic {
    /// Per worker: user -> [to_peer bytes, to_client bytes].
    pub by_worker: Mutex<Vec<HashMap<Box<str>, [u64; 2]>>>,
}

/// What one scrape reports: a snapshot the control thread takes, encoded through
/// prometheus-client.
#[derive(Debug, Default)]
pub struct Scrape {
    pub workers: Vec<WorkerSnapshot>,
    /// Relay ports no allocation holds, `[IPv4, IPv6]`.
    pub relay_ports_free: [u64; 2],
    /// Per listener group: its steering mode and allocation pins.
    pub groups: Vec<GroupSnapshot>,
    /// Per-user bytes `[to_peer, to_client]`, the top users and `_other`.
    pub users: Vec<(String, [u64; 2])>,
    pub draining: bool,
    /// The TLS handshake thread: in progress, completed, closes by reason.
    pub handshakes: HandshakeSnapshot,
    /// The kernel fast path's verdicts (by [`turn_common::fast::Verdict`]), when it is on.
    pub fast_verdicts: Option<Vec<u64>>,
}

/// The TLS handshake thread in a [`Scrape`].
#[derive(Debug, Default, Clone)]
pub struct HandshakeSnapshot {
    pub in_flight: u64,
    pub completed: u64,
    pub closes: Vec<u64>,
}

impl HandshakeSnapshot {
    /// Reads the thread's counters (relaxed loads).
    pub fn read(stats: &crate::worker::handshake::HandshakeStats) -> HandshakeSnapshot {
        HandshakeSnapshot {
            in_flight: stats.in_flight.load(Ordering::Relaxed),
            completed: stats.completed.load(Ordering::Relaxed),
            closes: stats.closes.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
        }
    }
}

/// One listener group in a [`Scrape`].
#[derive(Debug, Default, Clone)]
pub struct GroupSnapshot {
    /// The bound address.
    pub listener: String,
    /// `udp`, `tcp` or `tls`.
    pub transport: &'static str,
    /// `p2c`, `least`, `hash` or `off` (the kernel's hash).
    pub mode: &'static str,
    /// Allocation pins naming each worker (steered UDP groups only).
    pub pins: Option<Vec<u64>>,
}

/// One worker's numbers in a [`Scrape`].
#[derive(Debug, Default, Clone)]
pub struct WorkerSnapshot {
    pub requests_by_method: Vec<u64>,
    pub errors_by_code: Vec<u64>,
    pub auth_failures_by: Vec<u64>,
    pub drops: Vec<u64>,
    pub traffic: [[u64; 3]; 4],
    pub rate_limited: [u64; 2],
    pub created: u64,
    pub deleted: Vec<u64>,
    pub live: [[u64; 3]; 3],
    /// From `WorkerStats`.
    pub received_packets: u64,
    pub handed_off: u64,
    pub handed_in: u64,
    pub handoff_drops: u64,
    pub relayed_internally: u64,
    pub connections: u64,
    pub connections_accepted: u64,
    pub closes: Vec<u64>,
    pub stream_write_drops: u64,
    pub pin_failures: u64,
    /// What the kernel fast path relayed for the worker's allocations: to-peer packets and
    /// bytes, to-client packets and bytes.
    pub kernel: [u64; 4],
    /// The worker's bindings in the kernel now, and those left in userspace (map full).
    pub fast_bindings: u64,
    pub fast_failures: u64,
    /// From the load estimator.
    pub score: u64,
    pub share: f64,
}

impl WorkerSnapshot {
    /// Reads a worker's metrics (relaxed loads).
    pub fn read(m: &WorkerMetrics) -> WorkerSnapshot {
        let load =
            |a: &[AtomicU64]| a.iter().map(|x| x.load(Ordering::Relaxed)).collect::<Vec<_>>();
        let arr3 = |a: &[AtomicU64; 3]| [0, 1, 2].map(|i| a[i].load(Ordering::Relaxed));
        WorkerSnapshot {
            requests_by_method: load(&m.requests_by_method),
            errors_by_code: load(&m.errors_by_code),
            auth_failures_by: load(&m.auth_failures_by),
            drops: load(&m.drops),
            traffic: [
                arr3(&m.to_peer_packets),
                arr3(&m.to_peer_bytes),
                arr3(&m.to_client_packets),
                arr3(&m.to_client_bytes),
            ],
            rate_limited: [
                m.rate_limited_responses.load(Ordering::Relaxed),
                m.rate_limited_auth.load(Ordering::Relaxed),
            ],
            created: m.created.load(Ordering::Relaxed),
            deleted: load(&m.deleted),
            live: [0, 1, 2].map(|t| arr3(&m.live[t])),
            ..WorkerSnapshot::default()
        }
    }
}

type Labels = Vec<(&'static str, String)>;

/// Writes one metric family of constant samples.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    metric_type: MetricType,
    samples: Vec<(Labels, M)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, metric) in samples {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counters(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: Vec<(Labels, u64)>,
) -> fmt::Result {
    let samples = samples.into_iter().map(|(l, v)| (l, ConstCounter::new(v))).collect();
    family(encoder, name, help, MetricType::Counter, samples)
}

fn gauges(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: Vec<(Labels, f64)>,
) -> fmt::Result {
    let samples = samples.into_iter().map(|(l, v)| (l, ConstGauge::new(v))).collect();
    family(encoder, name, help, MetricType::Gauge, samples)
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> fmt::Result {
        let sum = |f: &dyn Fn(&WorkerSnapshot) -> u64| self.workers.iter().map(f).sum::<u64>();
        let w = |i: usize| vec![("worker", i.to_string())];

        let mut live = Vec::new();
        for t in Transport::ALL {
            for (f, family) in FAMILIES.iter().enumerate() {
                let n = sum(&|s| s.live[t.index()][f]);
                live.push((
                    vec![("transport", t.name().to_owned()), ("family", family.to_string())],
                    n as f64,
                ));
            }
        }
        gauges(
            &mut e,
            "turn_allocations",
            "Live allocations, by client transport and relayed address family",
            live,
        )?;
        counters(
            &mut e,
            "turn_allocations_created",
            "Allocations created",
            vec![(vec![], sum(&|s| s.created))],
        )?;
        let deleted = DELETE_REASONS
            .iter()
            .enumerate()
            .map(|(i, r)| {
                (vec![("reason", r.to_string())], sum(&|s| s.deleted.get(i).copied().unwrap_or(0)))
            })
            .collect();
        counters(&mut e, "turn_allocations_deleted", "Allocations ended, by reason", deleted)?;

        let mut packets = Vec::new();
        let mut bytes = Vec::new();
        for (direction, p, b) in [("to_peer", 0, 1), ("to_client", 2, 3)] {
            for t in Transport::ALL {
                let labels = vec![
                    ("direction", direction.to_owned()),
                    ("transport", t.name().to_owned()),
                    ("path", "user".to_owned()),
                ];
                packets.push((labels.clone(), sum(&|s| s.traffic[p][t.index()])));
                bytes.push((labels, sum(&|s| s.traffic[b][t.index()])));
            }
            // The kernel fast path relays ChannelData of UDP clients only.
            if self.fast_verdicts.is_some() {
                let labels = vec![
                    ("direction", direction.to_owned()),
                    ("transport", Transport::Udp.name().to_owned()),
                    ("path", "kernel".to_owned()),
                ];
                packets.push((labels.clone(), sum(&|s| s.kernel[p])));
                bytes.push((labels, sum(&|s| s.kernel[b])));
            }
        }
        counters(
            &mut e,
            "turn_relayed_packets",
            "Messages relayed, by direction, client transport and path (user: by a worker; \
             kernel: by the fast path)",
            packets,
        )?;
        counters(
            &mut e,
            "turn_relayed_bytes",
            "Payload bytes relayed, by direction, client transport and path",
            bytes,
        )?;
        if let Some(verdicts) = &self.fast_verdicts {
            let samples = turn_common::fast::Verdict::ALL
                .iter()
                .zip(verdicts)
                .map(|(v, n)| (vec![("verdict", v.name().to_owned())], *n))
                .collect();
            counters(
                &mut e,
                "turn_fast_path_datagrams",
                "UDP datagrams the kernel fast path looked at, by what it did with them",
                samples,
            )?;
            gauges(
                &mut e,
                "turn_fast_path_bindings",
                "Channel bindings the kernel relays now",
                vec![(vec![], sum(&|s| s.fast_bindings) as f64)],
            )?;
            counters(
                &mut e,
                "turn_fast_path_failures",
                "Channel bindings left to the workers because the kernel maps were full",
                vec![(vec![], sum(&|s| s.fast_failures))],
            )?;
        }

        let requests = REQUEST_METHODS
            .iter()
            .enumerate()
            .map(|(i, m)| {
                (
                    vec![("method", m.to_string())],
                    sum(&|s| s.requests_by_method.get(i).copied().unwrap_or(0)),
                )
            })
            .collect();
        counters(&mut e, "turn_requests", "STUN/TURN requests, by method", requests)?;
        let mut errors: Vec<(Labels, u64)> = ERROR_CODES
            .iter()
            .enumerate()
            .map(|(i, c)| {
                (
                    vec![("code", c.to_string())],
                    sum(&|s| s.errors_by_code.get(i).copied().unwrap_or(0)),
                )
            })
            .collect();
        errors.push((
            vec![("code", "other".into())],
            sum(&|s| s.errors_by_code.get(ERROR_CODES.len()).copied().unwrap_or(0)),
        ));
        counters(&mut e, "turn_error_responses", "Error responses, by code", errors)?;
        let auth = AuthFailure::ALL
            .iter()
            .map(|r| {
                (
                    vec![("reason", r.name().to_string())],
                    sum(&|s| s.auth_failures_by.get(*r as usize).copied().unwrap_or(0)),
                )
            })
            .collect();
        counters(&mut e, "turn_auth_failures", "Failed authentications (401), by reason", auth)?;
        let limited = vec![
            (vec![("kind", "responses".to_string())], sum(&|s| s.rate_limited[0])),
            (vec![("kind", "auth".to_string())], sum(&|s| s.rate_limited[1])),
        ];
        counters(
            &mut e,
            "turn_rate_limited",
            "Requests a per-source limit left unanswered (responses) or unverified (auth)",
            limited,
        )?;
        let drops = DropReason::ALL
            .iter()
            .map(|r| {
                (
                    vec![("reason", r.name().to_string())],
                    sum(&|s| s.drops.get(*r as usize).copied().unwrap_or(0)),
                )
            })
            .collect();
        counters(&mut e, "turn_drops", "Messages dropped without an answer, by reason", drops)?;

        let ports = vec![
            (vec![("family", "ipv4".to_string())], self.relay_ports_free[0] as f64),
            (vec![("family", "ipv6".to_string())], self.relay_ports_free[1] as f64),
        ];
        gauges(
            &mut e,
            "turn_relay_ports_free",
            "Relay ports no allocation holds, by family",
            ports,
        )?;

        gauges(
            &mut e,
            "turn_connections",
            "TCP and TLS connections open",
            vec![(vec![], sum(&|s| s.connections) as f64)],
        )?;
        counters(
            &mut e,
            "turn_connections_accepted",
            "TCP and TLS connections accepted",
            vec![(vec![], sum(&|s| s.connections_accepted))],
        )?;
        let closes = CloseReason::ALL
            .iter()
            .map(|r| {
                let i = *r as usize;
                let in_handshake = self.handshakes.closes.get(i).copied().unwrap_or(0);
                let by_workers = sum(&|s| s.closes.get(i).copied().unwrap_or(0));
                (vec![("reason", r.name().to_string())], by_workers + in_handshake)
            })
            .collect();
        counters(
            &mut e,
            "turn_connection_closes",
            "TCP and TLS connections closed or refused, by reason",
            closes,
        )?;
        gauges(
            &mut e,
            "turn_tls_handshakes_in_flight",
            "TLS handshakes in progress (on the handshake thread)",
            vec![(vec![], self.handshakes.in_flight as f64)],
        )?;
        counters(
            &mut e,
            "turn_tls_handshakes",
            "TLS handshakes completed",
            vec![(vec![], self.handshakes.completed)],
        )?;
        counters(
            &mut e,
            "turn_stream_write_drops",
            "Messages to TCP/TLS clients dropped because the client did not read",
            vec![(vec![], sum(&|s| s.stream_write_drops))],
        )?;

        let per = |f: &dyn Fn(&WorkerSnapshot) -> u64| -> Vec<(Labels, u64)> {
            self.workers.iter().enumerate().map(|(i, s)| (w(i), f(s))).collect()
        };
        counters(
            &mut e,
            "turn_worker_received_packets",
            "Messages a worker received (listeners, relays, connections, hand-offs): its load",
            per(&|s| s.received_packets),
        )?;
        gauges(
            &mut e,
            "turn_worker_load_score",
            "The load score steering compares, per worker",
            self.workers.iter().enumerate().map(|(i, s)| (w(i), s.score as f64)).collect(),
        )?;
        gauges(
            &mut e,
            "turn_worker_share",
            "A worker's share of the received messages over the last half second",
            self.workers.iter().enumerate().map(|(i, s)| (w(i), s.share)).collect(),
        )?;
        gauges(
            &mut e,
            "turn_worker_allocations",
            "Live allocations, per worker",
            self.workers
                .iter()
                .enumerate()
                .map(|(i, s)| (w(i), s.live.iter().flatten().sum::<u64>() as f64))
                .collect(),
        )?;
        let mut handoffs = Vec::new();
        for (i, s) in self.workers.iter().enumerate() {
            handoffs.push((
                vec![("worker", i.to_string()), ("direction", "out".to_string())],
                s.handed_off,
            ));
            handoffs.push((
                vec![("worker", i.to_string()), ("direction", "in".to_string())],
                s.handed_in,
            ));
        }
        counters(
            &mut e,
            "turn_worker_handoffs",
            "Datagrams handed to (out) or from (in) the worker owning their allocation",
            handoffs,
        )?;
        counters(
            &mut e,
            "turn_worker_handoff_drops",
            "Hand-offs dropped: the owner's inbox was full",
            per(&|s| s.handoff_drops),
        )?;
        counters(
            &mut e,
            "turn_worker_relayed_internally",
            "Relay-to-relay datagrams (one allocation's relay to another's) taken in by the worker without the kernel",
            per(&|s| s.relayed_internally),
        )?;
        counters(
            &mut e,
            "turn_worker_pin_failures",
            "Allocation pins that could not be written (pin map full)",
            per(&|s| s.pin_failures),
        )?;

        let mut pinned = Vec::new();
        let mut modes = Vec::new();
        for g in &self.groups {
            for (i, n) in g.pins.iter().flatten().enumerate() {
                pinned.push((
                    vec![("listener", g.listener.clone()), ("worker", i.to_string())],
                    *n as f64,
                ));
            }
            let labels = vec![
                ("listener", g.listener.clone()),
                ("transport", g.transport.to_owned()),
                ("mode", g.mode.to_owned()),
            ];
            modes.push((labels, 1.0));
        }
        gauges(
            &mut e,
            "turn_worker_pinned_flows",
            "Allocation pins naming a worker, per UDP listener",
            pinned,
        )?;
        gauges(
            &mut e,
            "turn_steering_mode",
            "The steering mode of each listener (1 for the mode in use)",
            modes,
        )?;
        gauges(
            &mut e,
            "turn_draining",
            "1 while the server drains (no new allocations)",
            vec![(vec![], if self.draining { 1.0 } else { 0.0 })],
        )?;
        if !self.users.is_empty() {
            let mut per_user = Vec::new();
            for (user, [up, down]) in &self.users {
                per_user.push((
                    vec![("user", user.clone()), ("direction", "to_peer".to_string())],
                    *up,
                ));
                per_user.push((
                    vec![("user", user.clone()), ("direction", "to_client".to_string())],
                    *down,
                ));
            }
            counters(
                &mut e,
                "turn_user_relayed_bytes",
                "Payload bytes relayed per user (metrics_per_user), the busiest users and _other",
                per_user,
            )?;
        }
        Ok(())
    }
}

/// The exposition text of a scrape (OpenMetrics).
pub fn render(scrape: Scrape) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

/// The Prometheus text format 0.0.4 of an OpenMetrics exposition: a counter family's HELP
/// and TYPE lines take the name of its samples (`name_total`), and `# EOF` goes.
pub fn text_format(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line.strip_prefix("# HELP ").map(|r| ("# HELP ", r));
        let meta = meta.or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match meta.and_then(|(kind, rest)| Some((kind, rest.split_once(' ')?))) {
            Some((kind, (name, rest))) if counters.contains(name) => {
                out.push_str(&format!("{kind}{name}_total {rest}\n"));
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Folds per-user totals into at most `max` series, the busiest first, the rest summed
/// under `_other`.
pub fn top_users(totals: HashMap<Box<str>, [u64; 2]>, max: usize) -> Vec<(String, [u64; 2])> {
    let mut all: Vec<(Box<str>, [u64; 2])> = totals.into_iter().collect();
    all.sort_by(|a, b| (b.1[0] + b.1[1]).cmp(&(a.1[0] + a.1[1])).then_with(|| a.0.cmp(&b.0)));
    let mut out: Vec<(String, [u64; 2])> = Vec::new();
    let mut other = [0u64; 2];
    for (i, (user, bytes)) in all.into_iter().enumerate() {
        if i < max {
            out.push((user.into(), bytes));
        } else {
            other[0] += bytes[0];
            other[1] += bytes[1];
        }
    }
    if other != [0, 0] {
        out.push(("_other".into(), other));
    }
    out
}

/// A scrape request to the control thread: it answers with the exposition text.
pub type ScrapeRequest = oneshot::Sender<String>;

/// Connections still sending their request head, at most: a new one closes the oldest
/// (whoever holds connections open without asking cannot keep a scraper out).
const WAITING: usize = 64;
/// A connection is closed for a newer one only once it had this long to send its request:
/// a scraper that connected during a flood of idle connections sends at once, and its
/// request is read well within it. While every waiting one is younger the queue grows
/// past [`WAITING`], by what arrives in this time at most.
const SILENT_AFTER: Duration = Duration::from_millis(250);
/// Requests being answered at once, at most; more wait for a slot (they asked already).
const CONCURRENT: usize = 8;
/// Longest request head.
const MAX_REQUEST: usize = 8 * 1024;
/// Time to send the request head (a scraper sends it at once).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Time to answer once asked (the control thread renders, the client reads).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` on `listener`, asking the control thread for the text.
///
/// Bounded against idle or slow connections: a connection has [`REQUEST_TIMEOUT`] to send
/// its request head, at most [`WAITING`] connections may be at that stage (a new one
/// closes the oldest), and at most [`CONCURRENT`] requests are answered at once.
pub async fn serve(listener: tokio::net::TcpListener, scrapes: mpsc::Sender<ScrapeRequest>) {
    let slots = Arc::new(Semaphore::new(CONCURRENT));
    type Waiting = (tokio::task::AbortHandle, Arc<AtomicBool>, std::time::Instant);
    let mut waiting: std::collections::VecDeque<Waiting> = std::collections::VecDeque::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        // Forget those that asked (or ended); when full, close the oldest still silent once
        // it had its time to ask.
        waiting.retain(|(task, asked, _)| !task.is_finished() && !asked.load(Ordering::Relaxed));
        while waiting.len() >= WAITING
            && waiting.front().is_some_and(|(_, _, since)| since.elapsed() >= SILENT_AFTER)
        {
            if let Some((task, _, _)) = waiting.pop_front() {
                task.abort();
            }
        }
        let asked = Arc::new(AtomicBool::new(false));
        let (scrapes, slots, flag) = (scrapes.clone(), Arc::clone(&slots), Arc::clone(&asked));
        let task = tokio::spawn(async move {
            let _ = answer(stream, scrapes, slots, flag).await;
        });
        waiting.push_back((task.abort_handle(), asked, std::time::Instant::now()));
    }
}

async fn answer(
    mut stream: tokio::net::TcpStream,
    scrapes: mpsc::Sender<ScrapeRequest>,
    slots: Arc<Semaphore>,
    asked: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return Ok(());
    }
    asked.store(true, Ordering::Relaxed);
    let Ok(_slot) = slots.acquire_owned().await else { return Ok(()) };
    match tokio::time::timeout(ANSWER_TIMEOUT, respond(&mut stream, &head, scrapes)).await {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}

/// Answers the request whose head is `head`.
async fn respond(
    stream: &mut tokio::net::TcpStream,
    head: &[u8],
    scrapes: mpsc::Sender<ScrapeRequest>,
) -> std::io::Result<()> {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    let openmetrics = head
        .split(|&b| b == b'\n')
        .filter(|l| l.len() > 7 && l[..7].eq_ignore_ascii_case(b"accept:"))
        .any(|l| l.windows(19).any(|w| w.eq_ignore_ascii_case(b"application/openmet")));
    let (status, content_type, body) = match (method, path) {
        (b"GET", b"/metrics") => {
            let (tx, rx) = oneshot::channel();
            let text = match scrapes.send(tx).await {
                Ok(()) => rx.await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if openmetrics {
                ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", text)
            } else {
                ("200 OK", "text/plain; version=0.0.4; charset=utf-8", text_format(&text))
            }
        }
        (b"GET", _) => ("404 Not Found", "text/plain", "try /metrics\n".to_owned()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Where the metrics endpoint listens.
pub fn bind_address(ip: std::net::IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_scrape_sums_the_workers_and_names_every_family() {
        let m0 = WorkerMetrics::default();
        let m1 = WorkerMetrics::default();
        let mut c = Counters::default();
        c.to_peer_traffic.packets[Transport::Tcp.index()] = 5;
        c.to_peer_traffic.bytes[Transport::Tcp.index()] = 500;
        c.allocations_expired = 2;
        m0.publish(&c);
        c.to_peer_traffic.packets[Transport::Tcp.index()] = 7;
        m1.publish(&c);
        m1.live_changed(Transport::Udp, 2, true);
        let mut workers = vec![WorkerSnapshot::read(&m0), WorkerSnapshot::read(&m1)];
        workers[0].received_packets = 10;
        let text = render(Scrape { workers, relay_ports_free: [3, 0], ..Scrape::default() });
        assert!(
            text.contains(
                "turn_relayed_packets_total{direction=\"to_peer\",transport=\"tcp\",path=\"user\"} 12"
            ),
            "{text}"
        );
        assert!(text.contains("turn_allocations_deleted_total{reason=\"expired\"} 4"), "{text}");
        assert!(text.contains("turn_allocations{transport=\"udp\",family=\"dual\"} 1"), "{text}");
        assert!(text.contains("turn_relay_ports_free{family=\"ipv4\"} 3"), "{text}");
        assert!(text.contains("turn_worker_received_packets_total{worker=\"0\"} 10"), "{text}");
        assert!(text.ends_with("# EOF\n"));
        let plain = text_format(&text);
        assert!(plain.contains("# TYPE turn_relayed_packets_total counter\n"), "{plain}");
        assert!(plain.contains("# HELP turn_relayed_packets_total Messages"), "{plain}");
        assert!(plain.contains("# TYPE turn_allocations gauge\n"), "{plain}");
        assert!(!plain.contains("# EOF"), "{plain}");
    }

    /// docs/metrics.md names every family the endpoint serves, with its type.
    #[test]
    fn every_family_is_documented() {
        let doc = include_str!("../../docs/metrics.md");
        let scrape = Scrape {
            workers: vec![WorkerSnapshot::read(&WorkerMetrics::default())],
            groups: vec![GroupSnapshot {
                listener: "127.0.0.1:3478".into(),
                transport: "udp",
                mode: "p2c",
                pins: Some(vec![1]),
            }],
            users: vec![("alice".into(), [1, 2])],
            ..Scrape::default()
        };
        let text = text_format(&render(scrape));
        let families: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).collect();
        assert!(families.len() >= 25, "{text}");
        for family in families {
            let (name, kind) = family.split_once(' ').unwrap();
            let row = format!("| `{name}` | {kind} |");
            assert!(doc.contains(&row), "docs/metrics.md misses the row {row}");
        }
    }

    #[test]
    fn users_beyond_the_bound_are_summed_as_other() {
        let mut totals = HashMap::new();
        for (i, user) in ["a", "b", "c", "d"].iter().enumerate() {
            totals.insert(Box::<str>::from(*user), [i as u64 * 10, 1]);
        }
        let top = top_users(totals, 2);
        assert_eq!(
            top,
            vec![
                ("d".to_string(), [30, 1]),
                ("c".to_string(), [20, 1]),
                ("_other".to_string(), [10, 2])
            ]
        );
    }
}
