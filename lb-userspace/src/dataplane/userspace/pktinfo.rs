//! UDP with the local address of each datagram: received with the address it was sent to
//! (`IP_PKTINFO` / `IPV6_RECVPKTINFO`), answered from that same address (`IP_PKTINFO` /
//! `IPV6_PKTINFO` on `sendmsg`).
//!
//! Why: a redirected datagram arrives at whatever address REDIRECT chose (the incoming
//! interface's primary address, or loopback for the node's own traffic). The answer must
//! leave from exactly that address, or conntrack does not see it as the reply of the
//! redirected flow, does not rewrite its source back to the service's address, and the client
//! drops it. A socket bound to the wildcard address would let routing choose the source:
//! for the node's own traffic that is the node's address, not loopback (the reason
//! kube-proxy's userspace mode used DNAT there), and on an interface with several
//! addresses possibly another one.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};

use socket2::SockAddr;
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Room for one pktinfo control message of either family, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct Control([u8; 64]);

/// One received datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Datagram {
    pub len: usize,
    /// The sender.
    pub from: SocketAddr,
    /// The local address it was sent to (after any NAT): where the answer must come from.
    pub to: IpAddr,
}

/// Asks the kernel for each datagram's destination address on `socket`.
pub fn enable(socket: &impl AsRawFd, v6: bool) -> io::Result<()> {
    let (level, name) = if v6 {
        (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)
    } else {
        (libc::IPPROTO_IP, libc::IP_PKTINFO)
    };
    let one: libc::c_int = 1;
    // SAFETY: `one` is a valid c_int for the duration of the call, and its size is given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Receives one datagram into `buf`.
pub async fn recv(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<Datagram> {
    let fd = socket.as_raw_fd();
    socket
        .async_io(Interest::READABLE, || recv_now(fd, buf))
        .await
}

/// Sends `buf` to `to` from the local address `from`.
pub async fn send(socket: &UdpSocket, buf: &[u8], to: SocketAddr, from: IpAddr) -> io::Result<()> {
    let fd = socket.as_raw_fd();
    socket
        .async_io(Interest::WRITABLE, || send_now(fd, buf, to, from))
        .await
}

fn recv_now(fd: RawFd, buf: &mut [u8]) -> io::Result<Datagram> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = Control([0; 64]);
    // SAFETY: every pointer in `msg` points at memory that outlives the call (the address
    // storage try_init provides, `iov` over `buf`, `control`), with its true length; the
    // control messages are read within `msg_controllen` through the CMSG_* helpers.
    let ((len, to), from) = unsafe {
        SockAddr::try_init(|storage, storage_len| {
            let mut msg: libc::msghdr = zeroed();
            msg.msg_name = storage.cast();
            msg.msg_namelen = *storage_len;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.0.as_mut_ptr().cast();
            msg.msg_controllen = control.0.len() as _;
            let n = libc::recvmsg(fd, &mut msg, 0);
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            *storage_len = msg.msg_namelen;
            Ok((n as usize, destination(&msg)))
        })?
    };
    let from = from
        .as_socket()
        .ok_or_else(|| io::Error::other("a datagram from a non-IP address"))?;
    let to = to.ok_or_else(|| {
        io::Error::other("a datagram without its destination address (pktinfo not enabled?)")
    })?;
    Ok(Datagram { len, from, to })
}

/// The destination address in `msg`'s pktinfo control message, if any.
///
/// # Safety
/// `msg` must describe a control buffer the kernel filled in by `recvmsg`.
unsafe fn destination(msg: &libc::msghdr) -> Option<IpAddr> {
    let mut cmsg = libc::CMSG_FIRSTHDR(msg);
    while !cmsg.is_null() {
        let data = libc::CMSG_DATA(cmsg);
        match ((*cmsg).cmsg_level, (*cmsg).cmsg_type) {
            (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                let info: libc::in_pktinfo = std::ptr::read_unaligned(data.cast());
                // ipi_addr is the header's destination; ipi_spec_dst is a routing guess.
                return Some(IpAddr::from(
                    u32::from_be(info.ipi_addr.s_addr).to_be_bytes(),
                ));
            }
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                let info: libc::in6_pktinfo = std::ptr::read_unaligned(data.cast());
                return Some(IpAddr::from(info.ipi6_addr.s6_addr));
            }
            _ => cmsg = libc::CMSG_NXTHDR(msg, cmsg),
        }
    }
    None
}

fn send_now(fd: RawFd, buf: &[u8], to: SocketAddr, from: IpAddr) -> io::Result<()> {
    let to = SockAddr::from(to);
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut control = Control([0; 64]);
    // SAFETY: as in `recv_now`; the one control message is written inside `control`, whose
    // size CMSG_SPACE of the pktinfo never exceeds (64 bytes hold either family's).
    let rc = unsafe {
        let mut msg: libc::msghdr = zeroed();
        msg.msg_name = to.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = to.len();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr().cast();
        let (level, kind, size) = match from {
            IpAddr::V4(_) => (
                libc::IPPROTO_IP,
                libc::IP_PKTINFO,
                size_of::<libc::in_pktinfo>(),
            ),
            IpAddr::V6(_) => (
                libc::IPPROTO_IPV6,
                libc::IPV6_PKTINFO,
                size_of::<libc::in6_pktinfo>(),
            ),
        };
        msg.msg_controllen = libc::CMSG_SPACE(size as u32) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(size as u32) as _;
        let data = libc::CMSG_DATA(cmsg);
        match from {
            IpAddr::V4(a) => {
                let mut info: libc::in_pktinfo = zeroed();
                info.ipi_spec_dst.s_addr = u32::from(a).to_be();
                std::ptr::write_unaligned(data.cast(), info);
            }
            IpAddr::V6(a) => {
                let mut info: libc::in6_pktinfo = zeroed();
                info.ipi6_addr.s6_addr = a.octets();
                std::ptr::write_unaligned(data.cast(), info);
            }
        }
        libc::sendmsg(fd, &msg, 0)
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn datagrams_carry_their_destination_and_answers_leave_from_it() {
        for (any, local) in [("0.0.0.0:0", "127.0.0.3"), ("[::]:0", "::1")] {
            let v6 = any.starts_with('[');
            let server = UdpSocket::bind(any).await.unwrap();
            enable(&server, v6).unwrap();
            let port = server.local_addr().unwrap().port();
            let local: IpAddr = local.parse().unwrap();
            // 127.0.0.3: a loopback address other than the one routing would answer from.
            let client = UdpSocket::bind(SocketAddr::new(local, 0)).await.unwrap();
            client.connect(SocketAddr::new(local, port)).await.unwrap();
            client.send(b"ping").await.unwrap();
            let mut buf = [0u8; 16];
            let d = recv(&server, &mut buf).await.unwrap();
            assert_eq!((&buf[..d.len], d.to), (&b"ping"[..], local));
            assert_eq!(d.from, client.local_addr().unwrap());
            send(&server, b"pong", d.from, d.to).await.unwrap();
            // The client's socket is connected to local:port: it only takes an answer from
            // exactly there.
            let n = tokio::time::timeout(std::time::Duration::from_secs(2), client.recv(&mut buf))
                .await
                .expect("no answer from the datagram's own address")
                .unwrap();
            assert_eq!(&buf[..n], b"pong");
        }
    }
}
