//! turn-server: a TURN/STUN server with one socket per worker thread in an SO_REUSEPORT
//! group, steered by an SK_REUSEPORT eBPF program (power of two choices, pinned flows).
//!
//! * [`steering`] loads and attaches the eBPF program to a listener group.

pub mod steering;
