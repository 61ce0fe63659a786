//! turn-server: a TURN/STUN server with one socket per worker thread in an SO_REUSEPORT
//! group, steered by an SK_REUSEPORT eBPF program (power of two choices, pinned flows).
//!
//! * [`config`]: the TOML configuration and its defaults.
//! * [`listener`]: SO_REUSEPORT listener groups, one socket per worker.
//! * [`steering`]: loads and attaches the eBPF program to a listener group.
//! * [`fast_path`]: loads and attaches the TC program that relays ChannelData in the
//!   kernel, and the workers' handles on its bindings.
//! * [`load`]: the per-worker load score P2C compares.
//! * [`bpffs`]: where steering maps are pinned, and clean-up after a killed daemon.
//! * [`worker`]: a worker thread: its sockets, its protocol state, its epoll set.
//! * [`relay`]: relay sockets, the worker's share of the port range, and which worker holds
//!   which relayed address (relay-to-relay hand-over).
//! * [`shared`]: cross-worker state on cold paths: quotas, the allocation directory.
//! * [`setup`]: configuration to protocol core, credentials, relay addresses, privileges.
//! * [`addresses`]: the host's own addresses, watched for changes (netlink).
//! * [`daemon`]: startup, control loop (signals, load publishing, reload, drain),
//!   shutdown.
//! * [`metrics`]: the Prometheus endpoint: per-worker counters summed at scrape time.
//! * [`admin`]: the admin API on a Unix socket and its client (`turn-server allocations`,
//!   `kick`, `drain`, `reload`).
//! * [`inspect`]: `turn-server load` and `steering set`, through the pinned maps.

pub mod addresses;
pub mod admin;
pub mod bpffs;
pub mod config;
pub mod daemon;
pub mod epoll;
pub mod fast_path;
pub mod inspect;
pub mod listener;
pub mod load;
pub mod metrics;
pub mod relay;
pub mod setup;
pub mod shared;
pub mod steering;
pub mod tls;
pub mod worker;
