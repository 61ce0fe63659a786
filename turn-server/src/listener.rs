//! Listener groups: one UDP socket per worker on the same address and port
//! (SO_REUSEPORT, set before bind), so the kernel (or our SK_REUSEPORT program) picks a
//! worker per datagram. A socket of a group is never `connect()`ed: that would take it
//! out of reuseport selection.

use std::{
    io,
    net::{SocketAddr, UdpSocket},
};

use socket2::{Domain, Protocol, Socket, Type};

/// Socket buffer size asked for on listener and relay sockets (the kernel caps it at
/// net.core.rmem_max / wmem_max unless we are privileged enough for the FORCE variants).
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// The sockets of one listening address, slot `i` owned by worker `i`.
#[derive(Debug)]
pub struct ListenerGroup {
    /// The bound address (with the real port when 0 was asked for).
    pub local: SocketAddr,
    /// One socket per worker, in worker order.
    pub sockets: Vec<UdpSocket>,
}

/// Binds `workers` SO_REUSEPORT UDP sockets to `addr`. An IPv6 wildcard group is
/// IPv6-only so that it can sit beside an IPv4 wildcard group on the same port.
pub fn bind_group(addr: SocketAddr, workers: usize) -> io::Result<ListenerGroup> {
    let mut local = addr;
    let mut sockets = Vec::with_capacity(workers);
    for _ in 0..workers {
        let socket = udp_socket(local)?;
        socket.set_reuse_port(true)?;
        socket
            .bind(&local.into())
            .map_err(|e| io::Error::new(e.kind(), format!("cannot bind UDP {local}: {e}")))?;
        let socket: UdpSocket = socket.into();
        // With port 0 the first bind chooses the port; the rest join that group.
        local = socket.local_addr()?;
        sockets.push(socket);
    }
    Ok(ListenerGroup { local, sockets })
}

/// A non-blocking UDP socket for `addr`'s family with large buffers (not bound yet).
pub fn udp_socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    // Best effort: a smaller buffer only means earlier drops under bursts.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_shares_one_port() {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        assert_ne!(group.local.port(), 0);
        for socket in &group.sockets {
            assert_eq!(socket.local_addr().unwrap(), group.local);
        }
    }

    #[test]
    fn v4_and_v6_wildcards_coexist_on_one_port() {
        let v4 = bind_group("0.0.0.0:0".parse().unwrap(), 2).unwrap();
        let v6 = bind_group(SocketAddr::new("::".parse().unwrap(), v4.local.port()), 2);
        // A machine without IPv6 cannot bind `::`; that is not what this test checks.
        if let Err(e) = &v6 {
            assert_eq!(e.kind(), io::ErrorKind::AddrNotAvailable, "{e}");
        }
    }

    #[test]
    fn a_taken_port_is_a_clear_error() {
        let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = bind_group(taken.local_addr().unwrap(), 1).unwrap_err();
        assert!(err.to_string().contains("cannot bind UDP"), "{err}");
    }
}
