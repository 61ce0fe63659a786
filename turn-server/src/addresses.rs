//! The host's own addresses, as they are now and as they change.
//!
//! A client must not reach the TURN host's own services through the relay (see
//! `turn_proto::policy`): every local address is the server's own, not only the ones it
//! listens on, and addresses come and go (DHCP, a VPN, an operator's `ip addr add`). The
//! daemon reads them at start and again whenever the kernel announces an address change on
//! a netlink socket ([`AddressWatch`]); the workers' peer rules follow within moments.

use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

/// The addresses of the host's interfaces that are up, both families.
pub fn interface_addresses() -> Vec<IpAddr> {
    let mut found = Vec::new();
    let _ = each_ifaddr(|_, flags, ip| {
        if flags & libc::IFF_UP as u32 != 0
            && let Some(ip) = ip
        {
            found.push(ip);
        }
    });
    found
}

/// A network interface of the host, with its addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    /// Loopback.
    pub loopback: bool,
    /// Ethernet-like (`ARPHRD_ETHER`, from sysfs): a datagram may leave by it with MAC
    /// addresses.
    pub ethernet: bool,
    /// Up.
    pub up: bool,
    pub addrs: Vec<IpAddr>,
}

/// The host's interfaces, each with its addresses (both families).
pub fn interfaces() -> io::Result<Vec<Interface>> {
    let mut out: Vec<Interface> = Vec::new();
    each_ifaddr(|name, flags, ip| {
        let i = match out.iter().position(|i| i.name == name) {
            Some(i) => i,
            None => {
                let index = std::ffi::CString::new(name)
                    // SAFETY: a NUL-terminated name.
                    .map_or(0, |c| unsafe { libc::if_nametoindex(c.as_ptr()) });
                let kind = std::fs::read_to_string(format!("/sys/class/net/{name}/type"))
                    .ok()
                    .and_then(|t| t.trim().parse::<u32>().ok());
                out.push(Interface {
                    name: name.to_owned(),
                    index,
                    loopback: flags & libc::IFF_LOOPBACK as u32 != 0,
                    ethernet: kind == Some(1),
                    up: flags & libc::IFF_UP as u32 != 0,
                    addrs: Vec::new(),
                });
                out.len() - 1
            }
        };
        if let Some(ip) = ip
            && !out[i].addrs.contains(&ip)
        {
            out[i].addrs.push(ip);
        }
    })?;
    out.retain(|i| i.index != 0);
    Ok(out)
}

/// Calls `f` with the name, flags and address (IPv4 or IPv6, if it is one) of every entry
/// `getifaddrs` lists, in its order.
fn each_ifaddr(mut f: impl FnMut(&str, u32, Option<IpAddr>)) -> io::Result<()> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, which we walk read-only and free once; every
    // sockaddr is read as the family it states.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cursor = list;
        while !cursor.is_null() {
            let entry = &*cursor;
            cursor = entry.ifa_next;
            if entry.ifa_name.is_null() {
                continue;
            }
            let name = std::ffi::CStr::from_ptr(entry.ifa_name).to_string_lossy();
            let ip = if entry.ifa_addr.is_null() {
                None
            } else {
                match i32::from((*entry.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(entry.ifa_addr as *const libc::sockaddr_in);
                        Some(IpAddr::from(u32::from_be(sin.sin_addr.s_addr).to_be_bytes()))
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(entry.ifa_addr as *const libc::sockaddr_in6);
                        Some(IpAddr::from(sin6.sin6_addr.s6_addr))
                    }
                    _ => None,
                }
            };
            f(&name, entry.ifa_flags, ip);
        }
        libc::freeifaddrs(list);
    }
    Ok(())
}

/// A netlink socket subscribed to the kernel's address announcements (IPv4 and IPv6
/// addresses added or removed). Readable when something changed; the messages themselves
/// are not parsed: the daemon reads the whole list again ([`interface_addresses`]).
#[derive(Debug)]
pub struct AddressWatch(OwnedFd);

impl AddressWatch {
    pub fn new() -> io::Result<AddressWatch> {
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: all-zero bytes are a valid sockaddr_nl.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = (libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
        // SAFETY: bind with a sockaddr_nl of its own size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(AddressWatch(fd))
    }

    /// Reads and discards what is queued; true if there was anything (a change). A full
    /// socket buffer (ENOBUFS: announcements were lost) counts as a change too.
    pub fn drain(&self) -> bool {
        let mut buf = [0u8; 8192];
        let mut changed = false;
        loop {
            // SAFETY: reads at most `buf.len()` bytes into a live buffer.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                changed = true;
                continue;
            }
            if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOBUFS) {
                changed = true;
                continue;
            }
            return changed;
        }
    }
}

impl AsRawFd for AddressWatch {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
