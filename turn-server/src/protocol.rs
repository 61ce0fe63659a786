//! The worker's protocol state (temporary scaffold while turn-proto lands).
use std::{net::SocketAddr, time::Instant};

use crate::config::Config;

pub struct Protocol;

impl Protocol {
    pub fn new(_config: &Config) -> Self {
        Protocol
    }

    pub fn handle_client_datagram(
        &mut self,
        _now: Instant,
        _local: SocketAddr,
        _client: SocketAddr,
        _datagram: &[u8],
        _out: &mut [u8],
    ) -> Option<usize> {
        None
    }
}
