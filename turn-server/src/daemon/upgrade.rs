//! Hitless upgrade: the running process starts the binary now on disk as a new generation
//! that joins every listener group, then hands it new flows and its endpoints.
//!
//! The old process (the parent) starts the child with the same arguments and, through
//! inherited descriptors named in [`HANDOVER_ENV`], gives it:
//! * per listener group, the steering maps (the socket array, configuration, loads,
//!   pins...) and the pin directory, so that it can put its own sockets in free slots of
//!   the same socket array without loading or attaching anything;
//! * the metrics endpoint's and the admin API's listening sockets;
//! * one end of a `SOCK_SEQPACKET` pair on which the old process hands it the client
//!   datagrams of flows it has no allocation for (an Allocate that was on its way at the
//!   switch is answered by the new process);
//! * a pipe on which the child says `joined` once its workers serve, or why it failed.
//!
//! On `joined` the old process points every group's steering at the child's slots, closes
//! its TCP and TLS listeners (the kernel migrates their queued connections through the
//! select-or-migrate program), stops its endpoints, and tells systemd the child is the main
//! process. It then serves its live allocations and connections and exits when the last
//! one ends, or at `drain_timeout_secs`. Should the child die first, it takes every role
//! back ([`super::control`]).

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use turn_proto::server::Transport;

use crate::bpffs::PinnedDir;

/// The environment variable that tells a process it is a new generation: `fd:N`, an
/// inherited pipe holding what it inherits (JSON, see [`Handover`]; not in the
/// environment itself, which holds the nonce secret's readers at bay).
pub const HANDOVER_ENV: &str = "TURN_SERVER_HANDOVER";

/// How long the new process has to join every group and serve.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(20);

/// What a new generation inherits, as written in [`HANDOVER_ENV`]: descriptor numbers.
#[derive(Debug, Serialize, Deserialize)]
struct Handover {
    from_pid: u32,
    nonce_secret: Vec<u8>,
    /// The old process's slots in every group's socket array.
    parent_slots: (u32, u32),
    groups: Vec<GroupHandover>,
    metrics: Option<RawFd>,
    admin: Option<(PathBuf, RawFd)>,
    handoff: RawFd,
    status: RawFd,
}

#[derive(Debug, Serialize, Deserialize)]
struct GroupHandover {
    transport: String,
    local: SocketAddr,
    maps: Vec<(String, RawFd)>,
    /// Path, directory and parent descriptors, directory name.
    pin: Option<(PathBuf, RawFd, RawFd, String)>,
}

/// One listener group, as a new generation inherits it.
#[derive(Debug)]
pub struct InheritedGroup {
    pub transport: Transport,
    pub local: SocketAddr,
    /// The steering maps by name (empty: the group is not steered).
    pub maps: HashMap<String, OwnedFd>,
    pub pinned: Option<(PathBuf, PinnedDir)>,
}

/// What this process inherited from the generation before it.
#[derive(Debug)]
pub struct Inherited {
    pub from_pid: u32,
    pub nonce_secret: [u8; 32],
    pub parent_slots: std::ops::Range<u32>,
    pub groups: Vec<InheritedGroup>,
    pub metrics: Option<std::net::TcpListener>,
    pub admin: Option<(PathBuf, std::os::unix::net::UnixListener)>,
    /// Datagrams the old process hands over.
    pub handoff: Option<OwnedFd>,
    status: Option<std::fs::File>,
}

fn parse_transport(name: &str) -> Result<Transport> {
    match name {
        "udp" => Ok(Transport::Udp),
        "tcp" => Ok(Transport::Tcp),
        "tls" => Ok(Transport::Tls),
        other => bail!("unknown transport {other:?}"),
    }
}

/// Takes ownership of an inherited descriptor and marks it close-on-exec again.
fn take_fd(fd: RawFd) -> Result<OwnedFd> {
    // SAFETY: F_GETFD on an arbitrary number only reads the descriptor table.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        bail!("inherited descriptor {fd} is not open");
    }
    // SAFETY: the previous generation passed this descriptor for us alone (it is open,
    // checked above), and nothing else in this process refers to it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain fcntl on a descriptor we own.
    unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(owned)
}

impl Inherited {
    /// The handover this process was started with, if any (the variable is removed, so
    /// that a later generation started from here does not see it).
    pub fn take_from_env() -> Result<Option<Inherited>> {
        let Some(named) = std::env::var_os(HANDOVER_ENV) else { return Ok(None) };
        // SAFETY: called at start, before any other thread of this process exists.
        unsafe { std::env::remove_var(HANDOVER_ENV) };
        let fd = named
            .to_str()
            .and_then(|n| n.strip_prefix("fd:")?.parse::<RawFd>().ok())
            .context("the handover is not `fd:N`")?;
        let mut text = String::new();
        let mut pipe = std::fs::File::from(take_fd(fd)?);
        loop {
            match pipe.read_to_string(&mut text) {
                Ok(_) => break,
                // Written whole before this process started: only EOF is left to see.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e).context("reading the handover"),
            }
        }
        let h: Handover = serde_json::from_str(&text).context("reading the handover")?;
        let status = Some(std::fs::File::from(take_fd(h.status)?));
        let mut groups = Vec::new();
        for g in h.groups {
            let mut maps = HashMap::new();
            for (name, fd) in g.maps {
                maps.insert(name, take_fd(fd)?);
            }
            let pinned = match g.pin {
                Some((path, dir, parent, name)) => {
                    Some((path, PinnedDir::from_parts(take_fd(dir)?, take_fd(parent)?, &name)?))
                }
                None => None,
            };
            groups.push(InheritedGroup {
                transport: parse_transport(&g.transport)?,
                local: g.local,
                maps,
                pinned,
            });
        }
        let nonce_secret: [u8; 32] =
            h.nonce_secret.try_into().map_err(|_| anyhow::anyhow!("bad nonce secret"))?;
        Ok(Some(Inherited {
            from_pid: h.from_pid,
            nonce_secret,
            parent_slots: h.parent_slots.0..h.parent_slots.0 + h.parent_slots.1,
            groups,
            metrics: h.metrics.map(take_fd).transpose()?.map(std::net::TcpListener::from),
            admin: match h.admin {
                Some((path, fd)) => {
                    Some((path, std::os::unix::net::UnixListener::from(take_fd(fd)?)))
                }
                None => None,
            },
            handoff: Some(take_fd(h.handoff)?),
            status,
        }))
    }

    /// The slots this generation takes: `count` free ones beside the old process's.
    pub fn choose_slots(&self, count: u32) -> Result<std::ops::Range<u32>> {
        let old = &self.parent_slots;
        if count <= old.start {
            return Ok(0..count);
        }
        if old.end + count <= turn_common::MAX_SOCKETS {
            return Ok(old.end..old.end + count);
        }
        bail!(
            "no room for {count} sockets beside the running generation's {} in a group's {} \
             slots: an upgrade needs workers <= {}",
            old.len(),
            turn_common::MAX_SOCKETS,
            turn_common::MAX_SOCKETS / 2
        )
    }

    /// Tells the old process this generation serves (`joined`), or why it could not.
    pub fn report(&mut self, line: &str) {
        if let Some(mut status) = self.status.take() {
            let _ = status.write_all(format!("{line}\n").as_bytes());
        }
    }
}

/// A descriptor the child inherits: a duplicate without close-on-exec, closed in the
/// parent once the child runs.
struct Passed(Vec<OwnedFd>);

impl Passed {
    fn pass(&mut self, fd: BorrowedFd<'_>) -> Result<RawFd> {
        // F_DUPFD (not F_DUPFD_CLOEXEC): the duplicate survives exec.
        // SAFETY: fcntl on a descriptor we borrow; the result is checked and owned.
        let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD, 3) };
        if dup < 0 {
            return Err(std::io::Error::last_os_error()).context("duplicating a descriptor");
        }
        // SAFETY: a fresh descriptor nothing else owns.
        self.0.push(unsafe { OwnedFd::from_raw_fd(dup) });
        Ok(dup)
    }
}

/// One listener group as offered: transport, bound address, the steering maps' (and
/// program's) descriptors by name, the pin directory.
pub type OfferedGroup =
    (Transport, SocketAddr, Vec<(&'static str, OwnedFd)>, Option<(PathBuf, PinnedDir)>);

/// What the old process gives a new generation (see the module's description).
pub struct Offer<'a> {
    pub exe: &'a Path,
    pub nonce_secret: [u8; 32],
    pub slots: std::ops::Range<u32>,
    /// Per group: transport, bound address, maps by name, pin directory.
    pub groups: Vec<OfferedGroup>,
    pub metrics: Option<BorrowedFd<'a>>,
    pub admin: Option<(&'a Path, BorrowedFd<'a>)>,
}

/// A new generation being started.
pub struct Upgrade {
    pub child: Child,
    status: std::fs::File,
    said: Vec<u8>,
    started: Instant,
    /// The old process's end of the hand-over pair.
    pub handoff: OwnedFd,
}

/// Where a new generation's start stands.
#[derive(Debug)]
pub enum Joining {
    Waiting,
    /// Serving, with its sockets at these slots.
    Joined(std::ops::Range<u32>),
    Failed(String),
}

/// Starts the binary at `offer.exe` with this process's arguments as a new generation.
pub fn start(offer: Offer<'_>) -> Result<Upgrade> {
    let mut passed = Passed(Vec::new());
    let mut groups = Vec::new();
    for (transport, local, maps, pin) in offer.groups {
        let maps = maps
            .iter()
            .map(|(name, fd)| Ok(((*name).to_owned(), passed.pass(fd.as_fd())?)))
            .collect::<Result<Vec<_>>>()?;
        let pin = match pin {
            Some((path, dir)) => {
                let (d, p, name) = dir.into_parts();
                Some((path, passed.pass(d.as_fd())?, passed.pass(p.as_fd())?, name))
            }
            None => None,
        };
        groups.push(GroupHandover { transport: transport.name().to_owned(), local, maps, pin });
    }
    let (handoff_ours, handoff_theirs) = seqpacket_pair()?;
    let (status_read, status_write) = pipe()?;
    let handover = Handover {
        from_pid: std::process::id(),
        nonce_secret: offer.nonce_secret.to_vec(),
        parent_slots: (offer.slots.start, offer.slots.len() as u32),
        groups,
        metrics: offer.metrics.map(|fd| passed.pass(fd)).transpose()?,
        admin: match offer.admin {
            Some((path, fd)) => Some((path.to_owned(), passed.pass(fd)?)),
            None => None,
        },
        handoff: passed.pass(handoff_theirs.as_fd())?,
        status: passed.pass(status_write.as_fd())?,
    };
    // What it inherits goes through a pipe, written whole now (far below a pipe's 64 KiB).
    let (description_read, description_write) = pipe()?;
    std::fs::File::from(description_write)
        .write_all(serde_json::to_string(&handover)?.as_bytes())
        .context("writing the handover")?;
    let description = passed.pass(description_read.as_fd())?;
    let child = Command::new(offer.exe)
        .args(std::env::args_os().skip(1))
        .env(HANDOVER_ENV, format!("fd:{description}"))
        .spawn()
        .with_context(|| format!("starting {}", offer.exe.display()))?;
    // The child has its copies; ours close here (with `passed`, `status_write` and the
    // child's end of the pair).
    drop(passed);
    drop((status_write, handoff_theirs));
    Ok(Upgrade {
        child,
        status: std::fs::File::from(status_read),
        said: Vec::new(),
        started: Instant::now(),
        handoff: handoff_ours,
    })
}

impl Upgrade {
    /// What the child has said so far, or whether it died or ran out of time.
    pub fn poll(&mut self) -> Joining {
        let mut buf = [0u8; 4096];
        loop {
            match self.status.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.said.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => break,
            }
        }
        let said = String::from_utf8_lossy(&self.said);
        let line = said.lines().next().filter(|_| said.contains('\n'));
        if let Some(why) = line.and_then(|l| l.strip_prefix("failed: ")) {
            let why = why.to_owned();
            let _ = self.child.kill();
            let _ = self.child.wait();
            return Joining::Failed(why);
        }
        // Dead before its word was taken: whatever it said, it does not serve.
        if let Ok(Some(status)) = self.child.try_wait() {
            return Joining::Failed(format!(
                "the new process exited ({status}) before it took over (its log says why)"
            ));
        }
        if let Some(line) = line {
            let mut n =
                line.strip_prefix("joined ").unwrap_or_default().split(' ').map(str::parse::<u32>);
            return match (n.next(), n.next()) {
                (Some(Ok(first)), Some(Ok(count))) => Joining::Joined(first..first + count),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    Joining::Failed(format!("the new process said {line:?}"))
                }
            };
        }
        if self.started.elapsed() > JOIN_TIMEOUT {
            let _ = self.child.kill();
            let _ = self.child.wait();
            return Joining::Failed(format!(
                "the new process did not join the listener groups within {} s: killed",
                JOIN_TIMEOUT.as_secs()
            ));
        }
        Joining::Waiting
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors, checked and owned below.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(std::io::Error::last_os_error()).context("creating the status pipe");
    }
    // SAFETY: fresh descriptors nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills two descriptors, checked and owned below.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("creating the hand-over pair");
    }
    // SAFETY: fresh descriptors nothing else owns.
    let pair = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    for fd in [&pair.0, &pair.1] {
        // Room for a burst of hand-overs (each up to a datagram's size).
        let size: libc::c_int = 4 << 20;
        // SAFETY: setsockopt with an int of its size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
    Ok(pair)
}

/// Bytes before a handed-over datagram: group (2), listener and client (19 each).
pub const HANDOFF_HEADER: usize = 2 + 19 + 19;

fn put_addr(out: &mut [u8], addr: SocketAddr) {
    let (family, ip) = match addr.ip() {
        IpAddr::V4(v4) => (4u8, v4.to_ipv6_mapped().octets()),
        IpAddr::V6(v6) => (6u8, v6.octets()),
    };
    out[0] = family;
    out[1..17].copy_from_slice(&ip);
    out[17..19].copy_from_slice(&addr.port().to_be_bytes());
}

fn get_addr(data: &[u8]) -> Option<SocketAddr> {
    let ip: [u8; 16] = data.get(1..17)?.try_into().ok()?;
    let ip = std::net::Ipv6Addr::from(ip);
    let ip = match data.first()? {
        4 => IpAddr::V4(ip.to_ipv4_mapped()?),
        6 => IpAddr::V6(ip),
        _ => return None,
    };
    let port = u16::from_be_bytes(data.get(17..19)?.try_into().ok()?);
    Some(SocketAddr::new(ip, port))
}

/// The header of a handed-over datagram.
pub fn handoff_header(
    group: usize,
    listener: SocketAddr,
    client: SocketAddr,
) -> [u8; HANDOFF_HEADER] {
    let mut out = [0u8; HANDOFF_HEADER];
    out[..2].copy_from_slice(&(group as u16).to_be_bytes());
    put_addr(&mut out[2..21], listener);
    put_addr(&mut out[21..40], client);
    out
}

/// Reads a handed-over datagram: group, listener, client and the datagram.
pub fn parse_handoff(message: &[u8]) -> Option<(usize, SocketAddr, SocketAddr, &[u8])> {
    let group = u16::from_be_bytes(message.get(..2)?.try_into().ok()?) as usize;
    let listener = get_addr(message.get(2..21)?)?;
    let client = get_addr(message.get(21..40)?)?;
    Some((group, listener, client, message.get(HANDOFF_HEADER..)?))
}

/// What became of a datagram handed to the new generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handed {
    Sent,
    /// The pair is full: dropped (and counted); the client retransmits.
    Full,
    /// The new generation has gone: handle it here.
    Gone,
}

/// The old process's side of the hand-over pair, shared by its workers: one
/// `sendmsg` per datagram, never blocking (a full pair drops it; the client retries).
#[derive(Debug)]
pub struct Successor {
    fd: OwnedFd,
}

impl Successor {
    pub fn new(fd: OwnedFd) -> Successor {
        Successor { fd }
    }

    /// Hands a client datagram to the new generation.
    pub fn send(
        &self,
        group: usize,
        listener: SocketAddr,
        client: SocketAddr,
        data: &[u8],
    ) -> Handed {
        let header = handoff_header(group, listener, client);
        let mut iov = [
            libc::iovec { iov_base: header.as_ptr() as *mut libc::c_void, iov_len: header.len() },
            libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() },
        ];
        // SAFETY: a zeroed msghdr is valid; it points at two iovecs that outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr();
        msg.msg_iovlen = iov.len();
        // SAFETY: sendmsg reads the buffers the msghdr describes.
        let rc = unsafe {
            libc::sendmsg(self.fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if rc >= 0 {
            return Handed::Sent;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN | libc::ENOBUFS | libc::EINTR) => Handed::Full,
            // The new generation has gone (this process takes its roles back at its next
            // tick): the datagram is this process's again.
            _ => Handed::Gone,
        }
    }
}

/// A process's exit, as a descriptor that becomes readable when it ends (pidfd).
pub fn pidfd(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open with a pid and no flags; the result is checked and owned.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handed_over_datagrams_keep_their_addresses() {
        for (listener, client) in [
            ("127.0.0.1:3478", "192.0.2.7:50000"),
            ("[::1]:3478", "[2001:db8::7]:1"),
            ("0.0.0.0:0", "[::ffff:192.0.2.1]:9"),
        ] {
            let (l, c): (SocketAddr, SocketAddr) =
                (listener.parse().unwrap(), client.parse().unwrap());
            let mut message = handoff_header(3, l, c).to_vec();
            message.extend_from_slice(b"data");
            assert_eq!(parse_handoff(&message), Some((3, l, c, &b"data"[..])));
        }
        assert_eq!(parse_handoff(&[0u8; 39]), None);
        let mut bad =
            handoff_header(0, "127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
        bad[2] = 5;
        assert_eq!(parse_handoff(&bad), None);
    }

    #[test]
    fn a_new_generation_takes_free_slots_beside_the_old_one() {
        let inherited = |start: u32, end: u32| Inherited {
            from_pid: 1,
            nonce_secret: [0; 32],
            parent_slots: start..end,
            groups: Vec::new(),
            metrics: None,
            admin: None,
            handoff: None,
            status: None,
        };
        assert_eq!(inherited(0, 2).choose_slots(2).unwrap(), 2..4);
        assert_eq!(inherited(2, 4).choose_slots(2).unwrap(), 0..2);
        // A generation that grew takes the slots after the old one.
        assert_eq!(inherited(2, 4).choose_slots(3).unwrap(), 4..7);
        let err = inherited(0, 40).choose_slots(40).unwrap_err().to_string();
        assert!(err.contains("workers <= 32"), "{err}");
    }
}
