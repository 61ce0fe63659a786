//! Several datagrams to several destinations from one UDP socket in one `sendmmsg(2)`,
//! each with its own GSO segment size (`UDP_SEGMENT`) and source address (`IP_PKTINFO` /
//! `IPV6_PKTINFO`).
//!
//! Written by hand because quinn-udp cannot: its `UdpSocketState::try_send` sends one
//! `Transmit` (one destination) per `sendmsg`, and 0.5 has no multi-destination send. What
//! quinn-udp does handle (a kernel without GSO, and the errors that tell it) stays with
//! it: a message this call cannot send is sent again through quinn-udp by the caller.

use std::{
    io,
    mem::MaybeUninit,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::AsRawFd,
};

use socket2::SockAddr;

/// One datagram (or GSO run) to send.
#[derive(Clone, Copy, Debug)]
pub(super) struct Message<'a> {
    pub(super) destination: SocketAddr,
    /// The source address, for a socket bound to a wildcard address.
    pub(super) src_ip: Option<IpAddr>,
    /// Equal-sized segments of this size (the last may be shorter), or one datagram.
    pub(super) segment_size: Option<usize>,
    pub(super) contents: &'a [u8],
}

/// Messages per call.
const CHUNK: usize = 64;

/// Room for one `UDP_SEGMENT` and one `in6_pktinfo` control message, aligned as
/// `cmsghdr` is.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Control([u8; 64]);

/// Sends `count` messages from `socket`, in order, `message(i)` being the i-th. Returns
/// how many were sent before the first that was not and that error; `Ok` when all were.
/// A caller retries or drops from the failed one. Nothing is allocated: each call of
/// [`CHUNK`] messages is built on the stack.
pub(super) fn send<'a>(
    socket: &UdpSocket,
    count: usize,
    message: impl Fn(usize) -> Message<'a>,
) -> (usize, io::Result<()>) {
    let mut sent = 0;
    while sent < count {
        match send_chunk(socket, sent, count.min(sent + CHUNK), &message) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (sent, Err(e)),
        }
    }
    (sent, Ok(()))
}

/// One `sendmmsg` of messages `from..to` (at most [`CHUNK`]): how many the kernel took
/// (at least 1).
fn send_chunk<'a>(
    socket: &UdpSocket,
    from: usize,
    to: usize,
    message: &impl Fn(usize) -> Message<'a>,
) -> io::Result<usize> {
    let n = to - from;
    let mut addrs: [MaybeUninit<SockAddr>; CHUNK] = [const { MaybeUninit::uninit() }; CHUNK];
    // SAFETY: all-zero iovecs and mmsghdrs are valid (null pointers, zero lengths).
    let mut iovs: [libc::iovec; CHUNK] = unsafe { std::mem::zeroed() };
    let mut headers: [libc::mmsghdr; CHUNK] = unsafe { std::mem::zeroed() };
    let mut controls = [Control([0; 64]); CHUNK];
    for i in 0..n {
        let m = message(from + i);
        let addr = addrs[i].write(SockAddr::from(m.destination));
        iovs[i] = libc::iovec {
            iov_base: m.contents.as_ptr() as *mut libc::c_void,
            iov_len: m.contents.len(),
        };
        let h = &mut headers[i].msg_hdr;
        h.msg_name = addr.as_ptr() as *mut libc::c_void;
        h.msg_namelen = addr.len();
        h.msg_iov = &mut iovs[i];
        h.msg_iovlen = 1;
        let len = fill_control(&mut controls[i], h, &m);
        if len == 0 {
            h.msg_control = std::ptr::null_mut();
        }
        h.msg_controllen = len;
    }
    // SAFETY: the first `n` headers point into `addrs` (written above), `iovs`, `controls`
    // and the messages' contents, all alive and unmoved until the call returns.
    let sent = unsafe { libc::sendmmsg(socket.as_raw_fd(), headers.as_mut_ptr(), n as u32, 0) };
    // SockAddr needs no drop (plain bytes), so the written `addrs` are simply forgotten.
    if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(sent as usize) }
}

/// Writes the control messages `m` needs into `control` and points `hdr` at it; returns
/// the control length (0: none).
fn fill_control(control: &mut Control, hdr: &mut libc::msghdr, m: &Message<'_>) -> usize {
    hdr.msg_control = control.0.as_mut_ptr() as *mut libc::c_void;
    hdr.msg_controllen = control.0.len();
    let mut len = 0;
    // SAFETY: CMSG_FIRSTHDR/NXTHDR walk `control` (64 bytes, cmsghdr-aligned) as
    // msg_control/msg_controllen describe it; the two messages need at most
    // CMSG_SPACE(2) + CMSG_SPACE(20) = 48 bytes, so every pointer written through is in it.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        if let Some(segment) = m.segment_size {
            let space = libc::CMSG_SPACE(size_of::<u16>() as u32) as usize;
            (*cmsg).cmsg_level = libc::SOL_UDP;
            (*cmsg).cmsg_type = libc::UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut u16, segment as u16);
            len += space;
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
        match m.src_ip {
            Some(IpAddr::V4(ip)) => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr { s_addr: u32::from_ne_bytes(ip.octets()) },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                (*cmsg).cmsg_level = libc::IPPROTO_IP;
                (*cmsg).cmsg_type = libc::IP_PKTINFO;
                (*cmsg).cmsg_len = libc::CMSG_LEN(size_of_val(&info) as u32) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut libc::in_pktinfo, info);
                len += libc::CMSG_SPACE(size_of_val(&info) as u32) as usize;
            }
            Some(IpAddr::V6(ip)) => {
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr { s6_addr: ip.octets() },
                    ipi6_ifindex: 0,
                };
                (*cmsg).cmsg_level = libc::IPPROTO_IPV6;
                (*cmsg).cmsg_type = libc::IPV6_PKTINFO;
                (*cmsg).cmsg_len = libc::CMSG_LEN(size_of_val(&info) as u32) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut libc::in6_pktinfo, info);
                len += libc::CMSG_SPACE(size_of_val(&info) as u32) as usize;
            }
            None => {}
        }
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(socket: &UdpSocket, want: usize) -> Vec<(usize, u8, SocketAddr)> {
        socket.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 2048];
        let mut got = Vec::new();
        while got.len() < want {
            let Ok((n, from)) = socket.recv_from(&mut buf) else { break };
            got.push((n, buf[0], from));
        }
        got
    }

    #[test]
    fn sends_to_each_destination_with_segments_and_source_addresses() {
        let sender = UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = sender.local_addr().unwrap().port();
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let run: Vec<u8> = [[1u8; 100], [2u8; 100], [3u8; 100]].concat();
        let tail: Vec<u8> = [[4u8; 100].as_slice(), &[5u8; 30]].concat();
        let messages = [
            Message {
                destination: a.local_addr().unwrap(),
                src_ip: Some("127.0.0.2".parse().unwrap()),
                segment_size: Some(100),
                contents: &run,
            },
            Message {
                destination: b.local_addr().unwrap(),
                src_ip: None,
                segment_size: None,
                contents: &[9u8; 7],
            },
            Message {
                destination: a.local_addr().unwrap(),
                src_ip: Some("127.0.0.3".parse().unwrap()),
                segment_size: Some(100),
                contents: &tail,
            },
        ];
        let (sent, result) = send(&sender, messages.len(), |i| messages[i]);
        assert_eq!(sent, 3);
        result.unwrap();
        let from = |ip: &str| SocketAddr::new(ip.parse().unwrap(), port);
        assert_eq!(
            received(&a, 5),
            vec![
                (100, 1, from("127.0.0.2")),
                (100, 2, from("127.0.0.2")),
                (100, 3, from("127.0.0.2")),
                (100, 4, from("127.0.0.3")),
                (30, 5, from("127.0.0.3")),
            ]
        );
        assert_eq!(received(&b, 1), vec![(7, 9, from("127.0.0.1"))]);
    }

    #[test]
    fn a_message_the_kernel_refuses_stops_the_batch_there() {
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let ok = Message {
            destination: a.local_addr().unwrap(),
            src_ip: None,
            segment_size: None,
            contents: b"ok",
        };
        // IPv6 destination from an IPv4 socket: EAFNOSUPPORT / EINVAL.
        let bad = Message { destination: "[::1]:9".parse().unwrap(), ..ok };
        let batch = [ok, bad, ok];
        let (sent, result) = send(&sender, batch.len(), |i| batch[i]);
        assert_eq!(sent, 1);
        assert!(result.is_err());
        assert_eq!(received(&a, 1).len(), 1);
    }
}
