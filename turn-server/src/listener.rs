//! Listener groups: one socket per worker on the same address and port (SO_REUSEPORT,
//! set before bind), so the kernel (or our SK_REUSEPORT program) picks a worker: per
//! datagram for UDP, per connection (at its SYN) for TCP. A UDP socket of a group is
//! never `connect()`ed: that would take it out of reuseport selection.

use std::{
    io,
    net::{SocketAddr, TcpListener, UdpSocket},
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

/// Connections waiting to be accepted, per listening socket.
pub const TCP_BACKLOG: i32 = 1024;

/// The TCP sockets of one listening address, slot `i` owned by worker `i`.
#[derive(Debug)]
pub struct TcpGroup {
    /// The bound address (with the real port when 0 was asked for).
    pub local: SocketAddr,
    /// One listening socket per worker, in worker order.
    pub listeners: Vec<TcpListener>,
}

/// Binds and listens on `workers` SO_REUSEPORT TCP sockets at `addr` (non-blocking; an
/// IPv6 wildcard group is IPv6-only, as for UDP). A socket joins the reuseport group when
/// it listens, so the group is complete (and can be steered) when this returns.
pub fn bind_tcp_group(addr: SocketAddr, workers: usize) -> io::Result<TcpGroup> {
    let mut local = addr;
    let mut listeners = Vec::with_capacity(workers);
    for _ in 0..workers {
        let socket = Socket::new(Domain::for_address(local), Type::STREAM, Some(Protocol::TCP))?;
        if local.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.set_reuse_port(true)?;
        // A restart must not wait for the old connections' TIME_WAIT.
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket
            .bind(&local.into())
            .map_err(|e| io::Error::new(e.kind(), format!("cannot bind TCP {local}: {e}")))?;
        socket.listen(TCP_BACKLOG)?;
        let listener: TcpListener = socket.into();
        local = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(TcpGroup { local, listeners })
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
    fn tcp_group_shares_one_port_and_accepts() {
        let group = bind_tcp_group("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        assert_ne!(group.local.port(), 0);
        let _client = std::net::TcpStream::connect(group.local).unwrap();
        // One of the two listeners has the connection.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut accepted = 0;
        while accepted == 0 && std::time::Instant::now() < deadline {
            accepted = group.listeners.iter().filter(|l| l.accept().is_ok()).count();
        }
        assert_eq!(accepted, 1);
        let taken = bind_tcp_group(group.local, 1);
        // SO_REUSEPORT by the same user joins the group: the port is shared, not refused.
        assert!(taken.is_ok());
    }

    #[test]
    fn a_taken_port_is_a_clear_error() {
        let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
        let err = bind_group(taken.local_addr().unwrap(), 1).unwrap_err();
        assert!(err.to_string().contains("cannot bind UDP"), "{err}");
    }
}
