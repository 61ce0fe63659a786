//! Thin, safe wrappers over the Linux socket calls the benchmark needs: batched receive
//! and send (`recvmmsg`/`sendmmsg`), `epoll`, `poll`, socket options, `RLIMIT_NOFILE`.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    ptr,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Largest datagram the benchmark handles.
pub const MAX_DATAGRAM: usize = 2048;

/// Refuse anything but loopback: the benchmark never sends off the machine.
pub fn require_loopback(what: &str, addr: SocketAddr) -> Result<()> {
    if !addr.ip().is_loopback() {
        bail!(
            "{what} {addr} is not a loopback address; turn-bench only sends to 127.0.0.0/8 or ::1"
        );
    }
    Ok(())
}

/// Options for a benchmark UDP socket.
#[derive(Debug, Clone, Copy)]
pub struct SockOpts {
    pub reuse_port: bool,
    /// Requested receive and send buffer size (forced past `rmem_max` when root).
    pub buffer: Option<usize>,
    /// Blocking-call timeout (every receive and send is bounded).
    pub timeout: Duration,
}

impl Default for SockOpts {
    fn default() -> Self {
        SockOpts { reuse_port: false, buffer: None, timeout: Duration::from_millis(100) }
    }
}

/// A UDP socket bound to `bind`, optionally connected to `connect`.
pub fn udp_socket(
    bind: SocketAddr,
    connect: Option<SocketAddr>,
    opts: SockOpts,
) -> Result<UdpSocket> {
    let sock = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))
        .context("socket(UDP)")?;
    if opts.reuse_port {
        sock.set_reuse_port(true).context("SO_REUSEPORT")?;
    }
    if let Some(size) = opts.buffer {
        set_buffers(&sock, size);
    }
    sock.bind(&bind.into()).with_context(|| format!("bind {bind}"))?;
    if let Some(to) = connect {
        sock.connect(&to.into()).with_context(|| format!("connect {to}"))?;
    }
    sock.set_read_timeout(Some(opts.timeout)).context("SO_RCVTIMEO")?;
    sock.set_write_timeout(Some(opts.timeout)).context("SO_SNDTIMEO")?;
    Ok(sock.into())
}

/// Ask for `size`-byte socket buffers; as root past the sysctl maxima (`SO_*BUFFORCE`),
/// otherwise up to them. Best effort: a smaller buffer only means earlier drops.
fn set_buffers(sock: &Socket, size: usize) {
    let v = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    for (force, plain) in
        [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)]
    {
        if setsockopt_int(sock.as_raw_fd(), libc::SOL_SOCKET, force, v).is_err() {
            let _ = setsockopt_int(sock.as_raw_fd(), libc::SOL_SOCKET, plain, v);
        }
    }
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `v` lives across the call and the length matches its type.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// A non-blocking peer socket on 127.0.0.1 (any port) with large buffers.
pub fn peer_socket() -> Result<UdpSocket> {
    let peer = udp_socket(
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
        None,
        SockOpts { buffer: Some(8 << 20), ..SockOpts::default() },
    )?;
    peer.set_nonblocking(true)?;
    Ok(peer)
}

/// Raise this process's open-file limit so that `need` descriptors fit (the daemon's own
/// rule: soft up to hard, hard up to fs.nr_open with the privilege). Returns the new soft
/// limit; an error if `need` cannot fit.
pub fn raise_nofile(need: u64) -> Result<u64> {
    let (soft, hard) = turn_server::setup::raise_nofile(need);
    if soft < need {
        bail!(
            "need about {need} open files but RLIMIT_NOFILE is {soft} (hard {hard}); raise it (ulimit -Hn) or use fewer sockets"
        );
    }
    Ok(soft)
}

fn storage_to_addr(s: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    match libc::c_int::from(s.ss_family) {
        libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says it is a sockaddr_in and the storage is large enough.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Where a batch of datagrams goes.
#[derive(Clone, Copy)]
pub enum Dest<'a> {
    /// The socket's connected peer.
    Connected,
    /// One fixed address for all.
    Fixed(&'a SockAddr),
    /// Each back to the source it was received from.
    Sources,
}

/// Result of a batched send.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    pub ok: usize,
    pub failed: usize,
}

/// `n` datagram slots of `slot` bytes for `recvmmsg` / `sendmmsg`. Pointers into the
/// buffers are rebuilt before every call, so the struct may move freely between calls.
pub struct Batch {
    buf: Vec<u8>,
    slot: usize,
    lens: Vec<usize>,
    addrs: Vec<libc::sockaddr_storage>,
    addr_lens: Vec<libc::socklen_t>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl Batch {
    pub fn new(n: usize, slot: usize) -> Batch {
        let n = n.max(1);
        Batch {
            buf: vec![0; n * slot],
            slot,
            lens: vec![0; n],
            // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C structs for which all
            // zero bytes are valid (null pointers, zero lengths).
            addrs: vec![unsafe { zeroed() }; n],
            addr_lens: vec![0; n],
            iovs: vec![unsafe { zeroed() }; n],
            hdrs: vec![unsafe { zeroed() }; n],
        }
    }

    pub fn capacity(&self) -> usize {
        self.lens.len()
    }

    /// The datagram in slot `i` (its current length).
    pub fn get(&self, i: usize) -> &[u8] {
        &self.buf[i * self.slot..i * self.slot + self.lens[i]]
    }

    /// The whole slot `i`, to fill before a send; set its length with [`Self::set_len`].
    pub fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.buf[i * self.slot..(i + 1) * self.slot]
    }

    pub fn set_len(&mut self, i: usize, len: usize) {
        self.lens[i] = len.min(self.slot);
    }

    /// Source of the datagram received in slot `i`.
    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        storage_to_addr(&self.addrs[i], self.addr_lens[i])
    }

    /// Receive up to `capacity` datagrams: waits for the first (bounded by the socket's
    /// receive timeout, or not at all with `flags` = `MSG_DONTWAIT`), then takes what else
    /// is queued. Returns how many; `Ok(0)` on timeout
    /// or when nothing is queued.
    pub fn recv(&mut self, fd: RawFd, flags: libc::c_int) -> io::Result<usize> {
        let n = self.capacity();
        for i in 0..n {
            self.iovs[i] = libc::iovec {
                // SAFETY: in bounds of `buf` (n * slot bytes).
                iov_base: unsafe { self.buf.as_mut_ptr().add(i * self.slot) }.cast(),
                iov_len: self.slot,
            };
            let h = &mut self.hdrs[i];
            h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = ptr::null_mut();
            h.msg_hdr.msg_controllen = 0;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        loop {
            // SAFETY: every header points into buffers owned by `self`, alive and not
            // otherwise borrowed during the call; `n` headers exist.
            let r = unsafe {
                libc::recvmmsg(
                    fd,
                    self.hdrs.as_mut_ptr(),
                    n as libc::c_uint,
                    flags | libc::MSG_WAITFORONE,
                    ptr::null_mut(),
                )
            };
            if r >= 0 {
                let got = r as usize;
                for i in 0..got {
                    self.lens[i] = self.hdrs[i].msg_len as usize;
                    self.addr_lens[i] = self.hdrs[i].msg_hdr.msg_namelen;
                }
                return Ok(got);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => return Ok(0),
                // An ICMP error queued on the socket (e.g. port unreachable): not data.
                io::ErrorKind::ConnectionRefused => return Ok(0),
                _ => return Err(e),
            }
        }
    }

    /// Send the datagrams in slots `0..count` (their current lengths) to `dest`.
    /// A datagram the kernel refuses is skipped and counted in `failed`; a send that
    /// times out (socket buffer full past the send timeout) fails the rest of the batch.
    pub fn send(&mut self, fd: RawFd, count: usize, dest: Dest<'_>) -> Sent {
        let count = count.min(self.capacity());
        for i in 0..count {
            self.iovs[i] = libc::iovec {
                // SAFETY: in bounds of `buf`.
                iov_base: unsafe { self.buf.as_mut_ptr().add(i * self.slot) }.cast(),
                iov_len: self.lens[i],
            };
            let h = &mut self.hdrs[i];
            match dest {
                Dest::Connected => {
                    h.msg_hdr.msg_name = ptr::null_mut();
                    h.msg_hdr.msg_namelen = 0;
                }
                Dest::Fixed(a) => {
                    h.msg_hdr.msg_name = a.as_ptr() as *mut libc::c_void;
                    h.msg_hdr.msg_namelen = a.len();
                }
                Dest::Sources => {
                    h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
                    h.msg_hdr.msg_namelen = self.addr_lens[i];
                }
            }
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = ptr::null_mut();
            h.msg_hdr.msg_controllen = 0;
            h.msg_hdr.msg_flags = 0;
        }
        let mut out = Sent::default();
        let mut start = 0;
        while start < count {
            // SAFETY: headers `start..count` point into buffers owned by `self` (or into
            // `dest`, borrowed for the call), all alive during the call.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs.as_mut_ptr().add(start),
                    (count - start) as libc::c_uint,
                    0,
                )
            };
            if r > 0 {
                out.ok += r as usize;
                start += r as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    out.failed += count - start;
                    break;
                }
                _ => {
                    out.failed += 1;
                    start += 1;
                }
            }
        }
        out
    }
}

/// Wait until `fd` is readable or `timeout` passes; true if readable.
pub fn poll_fds(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<usize> {
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: `fds` is a valid slice of pollfd for the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A level-triggered epoll set of readable sockets, each with a u64 token.
pub struct Epoll {
    fd: OwnedFd,
    events: Vec<libc::epoll_event>,
}

impl Epoll {
    pub fn new(capacity: usize) -> Result<Epoll> {
        // SAFETY: no pointers involved.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("epoll_create1");
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: epoll_event is plain data.
        Ok(Epoll { fd, events: vec![unsafe { zeroed() }; capacity.max(1)] })
    }

    pub fn add(&self, sock: RawFd, token: u64) -> Result<()> {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: token };
        // SAFETY: valid descriptors and event struct.
        let r = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, sock, &mut ev) };
        if r != 0 {
            return Err(io::Error::last_os_error()).context("epoll_ctl(ADD)");
        }
        Ok(())
    }

    /// Wait up to `timeout` (to the microsecond: `epoll_pwait2`); returns the tokens of
    /// ready sockets.
    pub fn wait(&mut self, timeout: Duration, ready: &mut Vec<u64>) -> io::Result<()> {
        ready.clear();
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
        };
        // SAFETY: `events` is a valid buffer of the given length; `ts` lives across the
        // call; a null signal mask leaves the mask alone.
        let r = unsafe {
            libc::epoll_pwait2(
                self.fd.as_raw_fd(),
                self.events.as_mut_ptr(),
                self.events.len() as libc::c_int,
                &ts,
                ptr::null(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(()) } else { Err(e) };
        }
        for ev in &self.events[..r as usize] {
            let token = ev.u64;
            ready.push(token);
        }
        Ok(())
    }
}

/// The loopback address of `addr`'s family, port 0 (for binding a client socket).
pub fn any_port_like(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
        IpAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn batch_echo_over_loopback() {
        let opts = SockOpts::default();
        let a = udp_socket("127.0.0.1:0".parse().unwrap(), None, opts).unwrap();
        let a_addr = a.local_addr().unwrap();
        let b = udp_socket("127.0.0.1:0".parse().unwrap(), Some(a_addr), opts).unwrap();
        let b_addr = b.local_addr().unwrap();
        let mut tx = Batch::new(4, 64);
        for i in 0..3 {
            tx.slot_mut(i)[..3].copy_from_slice(&[i as u8; 3]);
            tx.set_len(i, 3);
        }
        assert_eq!(tx.send(b.as_raw_fd(), 3, Dest::Connected), Sent { ok: 3, failed: 0 });
        let mut rx = Batch::new(8, 64);
        let mut got = 0;
        for _ in 0..10 {
            got += rx.recv(a.as_raw_fd(), 0).unwrap();
            if got == 3 {
                break;
            }
        }
        assert_eq!(got, 3);
        assert_eq!(rx.get(2), &[2, 2, 2]);
        assert_eq!(rx.source(0), Some(b_addr));
        // Echo them back to their source.
        assert_eq!(rx.send(a.as_raw_fd(), 3, Dest::Sources).ok, 3);
        let mut back = Batch::new(8, 64);
        let mut got = 0;
        for _ in 0..10 {
            got += back.recv(b.as_raw_fd(), 0).unwrap();
            if got == 3 {
                break;
            }
        }
        assert_eq!(got, 3);
        assert_eq!(back.source(1), Some(a_addr));
        // Nothing more: a non-blocking receive returns 0.
        assert_eq!(back.recv(b.as_raw_fd(), libc::MSG_DONTWAIT).unwrap(), 0);
    }

    #[test]
    fn loopback_only() {
        assert!(require_loopback("x", "127.0.0.1:1".parse().unwrap()).is_ok());
        assert!(require_loopback("x", "[::1]:1".parse().unwrap()).is_ok());
        assert!(require_loopback("x", "192.0.2.1:1".parse().unwrap()).is_err());
    }
}
