//! Support for the end-to-end tests in `tests/tests/`: privilege checks that fail loudly
//! in CI, and small socket helpers. Every resource a helper creates is owned by the value
//! it returns and goes away when that value is dropped.

use std::{
    io,
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};

/// True when this process runs in CI (`CI=true`), where nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Returns true when the test can use BPF (we are root). Otherwise: in CI, panics with a
/// clear message; elsewhere prints why the test is skipped and returns false.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let msg = format!("{test} needs root (BPF program loading and attaching)");
    if in_ci() {
        panic!("{msg}, and CI=true: run the tests as root (`cargo xtask test` in CI runs as root)");
    }
    eprintln!("SKIPPED: {msg}; run as root to include it");
    false
}

/// Returns true when `tool` is on PATH. In CI, panics when it is missing.
pub fn require_tool(test: &str, tool: &str, package: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false);
    if found {
        return true;
    }
    let msg = format!("{test} needs `{tool}` from Debian's `{package}` package");
    if in_ci() {
        panic!("{msg}, and CI=true: `cargo xtask setup` installs it");
    }
    eprintln!("SKIPPED: {msg}; install it with `cargo xtask setup`");
    false
}

/// A SO_REUSEPORT group of `n` UDP sockets bound to the same ephemeral port on `ip`.
pub fn reuseport_group(ip: &str, n: usize) -> io::Result<(Vec<UdpSocket>, SocketAddr)> {
    let mut addr: SocketAddr = format!("{ip}:0").parse().map_err(io::Error::other)?;
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        let socket: UdpSocket = socket.into();
        addr = socket.local_addr()?;
        socket.set_nonblocking(true)?;
        sockets.push(socket);
    }
    Ok((sockets, addr))
}

/// Drains every socket until `expected` datagrams arrived in total or `timeout` passed.
/// Returns, per socket, the (source, payload) of each datagram received.
pub fn drain(
    sockets: &[UdpSocket],
    expected: usize,
    timeout: Duration,
) -> Vec<Vec<(SocketAddr, Vec<u8>)>> {
    let mut got: Vec<Vec<(SocketAddr, Vec<u8>)>> = vec![Vec::new(); sockets.len()];
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 2048];
    while got.iter().map(Vec::len).sum::<usize>() < expected && Instant::now() < deadline {
        let mut idle = true;
        for (i, socket) in sockets.iter().enumerate() {
            while let Ok((len, from)) = socket.recv_from(&mut buf) {
                got[i].push((from, buf[..len].to_vec()));
                idle = false;
            }
        }
        if idle {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    got
}
