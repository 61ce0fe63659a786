//! Support for the end-to-end tests in `tests/tests/`: privilege checks that fail loudly
//! in CI, and small socket helpers. Every resource a helper creates is owned by the value
//! it returns and goes away when that value is dropped.
// Test support: a failed expectation is a failed test, so panicking is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io,
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

pub mod ops;
pub mod stream;

use socket2::{Domain, Protocol, Socket, Type};
pub use turn_launch::{Daemon, PinRoot, json_field, server_bin};

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

/// Sends `per_flow` datagrams of `size` bytes from each of `flows` fresh sockets to `to`,
/// `rounds` times with `pause` between rounds (bounded: stops by itself).
pub fn send_flows(
    to: SocketAddr,
    flows: usize,
    per_flow: usize,
    size: usize,
    rounds: usize,
    pause: Duration,
) {
    let bind = if to.is_ipv4() { "127.0.0.1:0" } else { "[::1]:0" };
    let sockets: Vec<UdpSocket> = (0..flows).map(|_| UdpSocket::bind(bind).unwrap()).collect();
    let payload = vec![0xABu8; size];
    for _ in 0..rounds {
        for socket in &sockets {
            for _ in 0..per_flow {
                let _ = socket.send_to(&payload, to);
            }
        }
        std::thread::sleep(pause);
    }
}

/// A port that was free a moment ago on 127.0.0.1, for UDP and TCP (for tools that cannot
/// bind port 0, and for a daemon's listening port: below its relay range, see
/// [`turn_launch::free_port`]).
pub fn free_udp_port() -> u16 {
    let port = turn_launch::free_port();
    assert_ne!(port, 0, "no free port in 10000-19999 on 127.0.0.1");
    port
}

/// A child process killed (and waited for) when dropped.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts coturn's `turnutils_peer` (a UDP echo peer) on 127.0.0.1:`port`.
pub fn start_peer(port: u16) -> Child {
    start_peer_on("127.0.0.1", port)
}

/// Starts coturn's `turnutils_peer` on `ip`:`port`.
pub fn start_peer_on(ip: &str, port: u16) -> Child {
    let child = std::process::Command::new("turnutils_peer")
        .args(["-L", ip, "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting turnutils_peer");
    // It binds at once; give it a moment before clients send.
    std::thread::sleep(Duration::from_millis(100));
    Child(child)
}

/// Runs a coturn tool to completion (killed after `timeout`), returning its exit status
/// success and everything it printed.
pub fn run_tool(tool: &str, args: &[&str], timeout: Duration) -> (bool, String) {
    use std::io::Read;
    let mut child = std::process::Command::new(tool)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {tool}: {e}"));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = format!("{}{}", out.join().unwrap_or_default(), err.join().unwrap_or_default());
    (status.is_some_and(|s| s.success()), text)
}

/// coturn's `turnutils_uclient` against the TURN server `server` (on 127.0.0.1), relaying
/// to a peer on 127.0.0.1:`peer_port`, with `extra` options (credentials, counts); returns
/// its exit status success and output. `-c`: no RTCP allocations (they would ask for
/// EVEN-PORT reservations, which this server declines with 508 as RFC 8656 allows).
pub fn uclient(server: SocketAddr, peer_port: u16, extra: &[&str]) -> (bool, String) {
    let port = server.port().to_string();
    let peer = peer_port.to_string();
    let host = server.ip().to_string();
    let mut args = vec!["-c", "-p", &port, "-e", "127.0.0.1", "-r", &peer];
    args.extend_from_slice(extra);
    args.push(&host);
    run_tool("turnutils_uclient", &args, Duration::from_secs(60))
}

/// Like [`uclient`], in a thread (for what happens to the daemon meanwhile).
pub fn uclient_in_background(
    server: SocketAddr,
    peer_port: u16,
    extra: &[&str],
) -> std::thread::JoinHandle<(bool, String)> {
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    std::thread::spawn(move || {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        uclient(server, peer_port, &extra)
    })
}

/// What most relay tests give the daemon: 2 workers, realm `test`, user `alice:secret`,
/// peers on loopback allowed.
pub const RELAYING: [&str; 7] =
    ["--workers", "2", "--realm", "test", "--user", "alice:secret", "--allow-loopback-peers"];

/// The daemon most relay tests use: [`RELAYING`], plus `extra`.
pub fn relaying_daemon(extra: &[&str]) -> Daemon {
    let mut args = RELAYING.to_vec();
    args.extend_from_slice(extra);
    Daemon::start(&args)
}

/// The lost-packet figure from turnutils_uclient's summary ("Total lost packets N").
pub fn uclient_lost(output: &str) -> Option<u64> {
    output
        .lines()
        .rev()
        .filter_map(|l| l.split("Total lost packets ").nth(1))
        .find_map(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// What each datagram of a [`spoofed_flood`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flood {
    /// A 20-byte STUN Binding request (answered with the reflexive address).
    Binding,
    /// A 28-byte unauthenticated Allocate request (answered with 401).
    Allocate,
}

/// Sends `count` STUN requests to `to` (IPv4 loopback), each from its own spoofed source:
/// addresses 127.1.0.0 upwards (every 127/8 address is local) and ports spread over
/// 1024-65535, through a raw socket (needs root). At most `per_sec` datagrams a second;
/// stops by itself. Returns how many were sent.
pub fn spoofed_flood(to: SocketAddr, count: u32, per_sec: u32) -> io::Result<u32> {
    spoofed_requests(to, count, per_sec, Flood::Binding)
}

/// [`spoofed_flood`] with the request of your choice.
pub fn spoofed_requests(to: SocketAddr, count: u32, per_sec: u32, kind: Flood) -> io::Result<u32> {
    let SocketAddr::V4(to) = to else {
        return Err(io::Error::other("spoofed_flood sends IPv4 only"));
    };
    let spoofer = Spoofer::new()?;
    let start = Instant::now();
    let mut stun = [0u8; 28];
    let stun = &mut stun[..if kind == Flood::Allocate { 28 } else { 20 }];
    for i in 0..count {
        // Pace: the i-th datagram not before i / per_sec seconds.
        let due = Duration::from_secs_f64(f64::from(i) / f64::from(per_sec.max(1)));
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let src = 0x7f01_0000u32 + i / 64_000;
        let sport = 1024 + (i % 64_000) as u16;
        // STUN request: type, length, magic cookie, transaction id (and for Allocate
        // REQUESTED-TRANSPORT UDP).
        let (typ, body) = if kind == Flood::Allocate { (3u16, 8u16) } else { (1, 0) };
        stun[0..2].copy_from_slice(&typ.to_be_bytes());
        stun[2..4].copy_from_slice(&body.to_be_bytes());
        stun[4..8].copy_from_slice(&0x2112_a442u32.to_be_bytes());
        stun[8..12].copy_from_slice(&i.to_be_bytes());
        if kind == Flood::Allocate {
            stun[20..28].copy_from_slice(&[0x00, 0x19, 0x00, 0x04, 17, 0, 0, 0]);
        }
        spoofer.send(std::net::SocketAddrV4::new(src.into(), sport), to, stun)?;
    }
    Ok(count)
}

/// Sends UDP datagrams with any IPv4 source address and port, through a raw socket
/// (needs root).
pub struct Spoofer(std::os::fd::OwnedFd);

impl Spoofer {
    pub fn new() -> io::Result<Spoofer> {
        // SAFETY: socket(2) with constant arguments; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        Ok(Spoofer(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }))
    }

    /// Sends `payload` (at most 1400 bytes) from `src` to `to`.
    pub fn send(
        &self,
        src: std::net::SocketAddrV4,
        to: std::net::SocketAddrV4,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut storage = [0u8; 1428];
        let len = 28 + payload.len();
        let packet = storage.get_mut(..len).ok_or_else(|| io::Error::other("payload too large"))?;
        // IPv4 header (the kernel fills in the checksum and the total length).
        packet[0] = 0x45;
        packet[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        packet[6] = 0x40; // DF
        packet[8] = 64; // TTL
        packet[9] = libc::IPPROTO_UDP as u8;
        packet[12..16].copy_from_slice(&src.ip().octets());
        packet[16..20].copy_from_slice(&to.ip().octets());
        // UDP header, checksum 0 (none, allowed over IPv4).
        packet[20..22].copy_from_slice(&src.port().to_be_bytes());
        packet[22..24].copy_from_slice(&to.port().to_be_bytes());
        packet[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        packet[28..].copy_from_slice(payload);
        let dst = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: to.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(*to.ip()).to_be() },
            sin_zero: [0; 8],
        };
        // SAFETY: sendto with a buffer of its stated length and a sockaddr_in of its size.
        let rc = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&self.0),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&dst as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }
}

/// The `turn-server` built in release mode (what a user runs), beside the debug one
/// cargo built for the tests (`cargo xtask test` builds both): `TURN_SERVER_RELEASE_BIN`,
/// or `target/release/turn-server`. In CI a missing one fails the test.
pub fn release_server_bin(test: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("TURN_SERVER_RELEASE_BIN").map(std::path::PathBuf::from).or_else(
        || {
            let debug = server_bin();
            let target = debug.parent()?.parent()?;
            Some(target.join("release").join("turn-server"))
        },
    )?;
    if path.is_file() {
        return Some(path);
    }
    let msg = format!("{test} runs the release daemon, and {} is missing", path.display());
    if in_ci() {
        panic!("{msg}: `cargo xtask test` builds it (cargo build --release -p turn-server)");
    }
    eprintln!("SKIPPED: {msg}; build it with `cargo build --release -p turn-server`");
    None
}

/// Starts the release daemon `bin` with `args` (and the launcher's defaults).
pub fn start_release(bin: &std::path::Path, args: &[&str]) -> Daemon {
    start_release_as(bin, &[], args)
}

/// [`start_release`] under `wrapper` (e.g. `ip netns exec NS`).
pub fn start_release_as(bin: &std::path::Path, wrapper: &[&str], args: &[&str]) -> Daemon {
    let mut launch = turn_launch::Launch::new(args);
    launch.bin = bin.to_owned();
    launch.wrapper = wrapper.iter().map(|a| a.to_string()).collect();
    launch.start().unwrap_or_else(|e| panic!("{e:#}"))
}

/// A network namespace of one test, with loopback up and `addresses` on it; deleted (with
/// whatever still runs in it having been killed by its own guards first) when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates the namespace (needs root and `ip` from iproute2).
    pub fn new(tag: &str, addresses: &[&str]) -> Netns {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let netns = Netns { name: format!("turn-{}-{n}-{tag}", std::process::id()) };
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip").args(args).output().expect("running ip");
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        ip(&["netns", "add", &netns.name]);
        ip(&["-n", &netns.name, "link", "set", "lo", "up"]);
        for a in addresses {
            ip(&["-n", &netns.name, "addr", "add", a, "dev", "lo"]);
        }
        netns
    }

    /// The command prefix that runs a program inside the namespace.
    pub fn exec(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }

    /// Starts `program args` inside the namespace, output discarded.
    pub fn spawn(&self, program: &str, args: &[&str]) -> Child {
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program} in {}: {e}", self.name));
        std::thread::sleep(Duration::from_millis(150));
        Child(child)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A TURN client over one UDP socket for abuse tests: requests sent one at a time without
/// waiting (so that a test can replay or flood), answers read when the test wants them.
/// The protocol side is the project's one TURN client ([`turn_proto::client::Signer`]:
/// long-term credentials, MD5 key, MESSAGE-INTEGRITY).
pub struct StunClient {
    pub sock: UdpSocket,
    server: SocketAddr,
    signer: turn_proto::client::Signer,
    next: u32,
    /// The last request sent, as bytes (what an eavesdropper could capture).
    pub last_sent: Vec<u8>,
}

impl StunClient {
    /// A client bound to `ip` (any port), talking to `server`.
    pub fn new(ip: &str, server: SocketAddr, user: &str, password: &str) -> StunClient {
        use turn_proto::client::{AuthMode, Credentials, Signer};
        let sock = UdpSocket::bind(format!("{ip}:0")).unwrap();
        let creds = Credentials::new(user, password, None).unwrap();
        let signer = Signer::new(std::sync::Arc::new(creds), AuthMode::Legacy);
        StunClient { sock, server, signer, next: 0, last_sent: Vec::new() }
    }

    /// Sends a Refresh with `lifetime` (0 deletes the allocation), signed.
    pub fn send_refresh(&mut self, lifetime: u32) {
        use turn_proto::stun::{Class, Method, attr::Attribute};
        self.send(Method::REFRESH, Class::Request, &[Attribute::Lifetime(lifetime)]);
    }

    /// Sends `bytes` as they are, from this client's socket.
    pub fn send_bytes(&self, bytes: &[u8]) {
        let _ = self.sock.send_to(bytes, self.server);
    }

    /// Sends an Allocate, signed once a realm and nonce are known.
    pub fn send_allocate(&mut self) {
        use turn_proto::stun::{Class, Method, attr, attr::Attribute};
        let transport = Attribute::RequestedTransport(attr::PROTOCOL_UDP);
        self.send(Method::ALLOCATE, Class::Request, &[transport]);
    }

    /// Sends a CreatePermission for `peer` (signed).
    pub fn send_create_permission(&mut self, peer: SocketAddr) {
        use turn_proto::stun::{Class, Method, attr::Attribute};
        self.send(Method::CREATE_PERMISSION, Class::Request, &[Attribute::XorPeerAddress(peer)]);
    }

    /// Sends `data` to `peer` in a Send indication.
    pub fn send_indication(&mut self, peer: SocketAddr, data: &[u8]) {
        use turn_proto::stun::{Class, Method, attr::Attribute};
        let attrs = [Attribute::XorPeerAddress(peer), Attribute::Data(data)];
        self.send(Method::SEND, Class::Indication, &attrs);
    }

    /// The next datagram from the server within `timeout`.
    pub fn receive_raw(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        self.sock.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 1500];
        let n = self.sock.recv(&mut buf).ok()?;
        Some(buf[..n].to_vec())
    }

    fn send(
        &mut self,
        method: turn_proto::stun::Method,
        class: turn_proto::stun::Class,
        attrs: &[turn_proto::stun::attr::Attribute<'_>],
    ) {
        use turn_proto::stun::TransactionId;
        self.next += 1;
        let mut tid = [0x5a; 12];
        tid[..4].copy_from_slice(&self.next.to_be_bytes());
        let mut buf = [0u8; 1500];
        let n =
            self.signer.encode(&mut buf, method, class, &TransactionId(tid), attrs, false).unwrap();
        self.last_sent = buf[..n].to_vec();
        let _ = self.sock.send_to(&buf[..n], self.server);
    }

    /// Allocates (the 401 round, then the signed request) and returns the relayed
    /// address, or None when the server refuses or does not answer within `timeout`.
    pub fn allocate_relayed(&mut self, timeout: Duration) -> Option<SocketAddr> {
        use turn_proto::stun::{Class, Message, attr};
        for _ in 0..3 {
            self.send_allocate();
            let bytes = self.receive_raw(timeout)?;
            let msg = Message::parse(&bytes).ok()?;
            if msg.class() == Class::SuccessResponse {
                let tid = msg.transaction_id();
                return attr::decode_xor_address(msg.get(attr::XOR_RELAYED_ADDRESS)?, &tid).ok();
            }
            self.signer.learn(&msg);
        }
        None
    }

    /// The next Data indication within `timeout`: (XOR-PEER-ADDRESS, DATA). Other
    /// datagrams are skipped.
    pub fn receive_data(&mut self, timeout: Duration) -> Option<(SocketAddr, Vec<u8>)> {
        use turn_proto::stun::{Class, Message, Method, attr};
        let until = std::time::Instant::now() + timeout;
        loop {
            let left = until.checked_duration_since(std::time::Instant::now())?;
            let bytes = self.receive_raw(left.max(Duration::from_millis(1)))?;
            let Ok(msg) = Message::parse(&bytes) else { continue };
            if msg.method() != Method::DATA || msg.class() != Class::Indication {
                continue;
            }
            let tid = msg.transaction_id();
            let peer = attr::decode_xor_address(msg.get(attr::XOR_PEER_ADDRESS)?, &tid).ok()?;
            return Some((peer, msg.get(attr::DATA)?.to_vec()));
        }
    }

    /// The next answer's error code (0 for a success) within `timeout`, learning the
    /// realm and nonce from a 401 or 438.
    pub fn receive(&mut self, timeout: Duration) -> Option<u16> {
        use turn_proto::stun::{Class, Message};
        let bytes = self.receive_raw(timeout)?;
        let msg = Message::parse(&bytes).ok()?;
        if msg.class() == Class::SuccessResponse {
            return Some(0);
        }
        let (code, _) = turn_proto::client::error_code(&msg)?;
        self.signer.learn(&msg);
        Some(code)
    }

    /// Allocates: the 401 round, then the signed request. Returns the final code (0 for
    /// a success), or None when an answer does not come within `timeout`.
    pub fn allocate(&mut self, timeout: Duration) -> Option<u16> {
        for _ in 0..3 {
            self.send_allocate();
            match self.receive(timeout)? {
                401 if self.signer.ready() && self.next == 1 => continue,
                438 => continue,
                code => return Some(code),
            }
        }
        None
    }
}

/// The resident memory of process `pid`, in bytes (VmRSS).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A counter the workers log when they stop ("worker stopped"), summed over the workers
/// (the daemon must have stopped).
pub fn worker_total(logs: &str, field: &str) -> u64 {
    logs.lines()
        .filter(|l| l.contains("worker stopped"))
        .filter_map(|l| json_field(l, field)?.parse::<u64>().ok())
        .sum()
}

/// Connection closes by reason, summed over the workers' "worker stopped" lines and the
/// TLS handshake thread's "handshake thread stopped" (the daemon must have stopped).
pub fn closes(logs: &str) -> std::collections::BTreeMap<String, u64> {
    let mut total = std::collections::BTreeMap::new();
    let last_words =
        |l: &&str| l.contains("worker stopped") || l.contains("handshake thread stopped");
    for line in logs.lines().filter(last_words) {
        let Some(summary) = json_field(line, "closes") else { continue };
        for pair in summary.split(',').filter(|p| !p.is_empty()) {
            if let Some((reason, n)) = pair.split_once('=') {
                *total.entry(reason.to_owned()).or_insert(0) += n.parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

/// Raises this process's open-file limit to at least `need` (tests that hold many
/// connections); panics when the machine does not allow it.
pub fn allow_open_files(need: u64) {
    let (soft, _) = turn_server::setup::raise_nofile(need);
    assert!(soft >= need, "this test needs {need} open files, the limit is {soft}");
}

/// The values of `key` in contrib/turn-server.service (every word of every such line).
pub fn unit_values(key: &str) -> Vec<String> {
    let unit = include_str!("../../contrib/turn-server.service");
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .flat_map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

/// A wrapper (a command line to run a program under) that does what systemd does with
/// contrib/turn-server.service, with uid 65534 as the dedicated user: in a mount
/// namespace of its own, /sys/fs/bpf as systemd mounts it (root's, mode 0700), the pin
/// directory `/sys/fs/bpf/turn-server` made by root for the user (ExecStartPre=+), then
/// the program as that user with the unit's ambient capabilities and bounding set, no
/// supplementary group. Needs root, `unshare` and `setpriv` (util-linux).
pub fn as_the_shipped_unit() -> Vec<String> {
    let caps: Vec<String> = unit_values("AmbientCapabilities")
        .iter()
        .map(|c| format!("+{}", c.strip_prefix("CAP_").unwrap_or(c).to_lowercase()))
        .collect();
    let caps = caps.join(",");
    let script = format!(
        "umount -l /sys/fs/bpf 2>/dev/null; mount -t bpf -o mode=0700 bpf /sys/fs/bpf && \
         install -d -o 65534 -g 65534 -m 0700 /sys/fs/bpf/turn-server && \
         exec setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps={caps} \
         --ambient-caps={caps} --bounding-set=-all,{caps} \"$@\""
    );
    ["unshare", "--mount", "--propagation", "private", "sh", "-c", &script, "sh"]
        .iter()
        .map(|a| a.to_string())
        .collect()
}
