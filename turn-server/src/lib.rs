//! turn-server: a TURN/STUN server with one socket per worker thread in an SO_REUSEPORT
//! group, steered by an SK_REUSEPORT eBPF program (power of two choices, pinned flows).
//!
//! * [`config`]: the TOML configuration and its defaults.
//! * [`listener`]: SO_REUSEPORT listener groups, one socket per worker.
//! * [`steering`]: loads and attaches the eBPF program to a listener group.
//! * [`worker`]: a worker thread: its sockets, its protocol state, its epoll set.
//! * [`protocol`]: the bridge between a worker and `turn-proto`.
//! * [`daemon`]: startup, control loop, shutdown.

pub mod config;
pub mod daemon;
pub mod epoll;
pub mod listener;
pub mod protocol;
pub mod steering;
pub mod worker;
