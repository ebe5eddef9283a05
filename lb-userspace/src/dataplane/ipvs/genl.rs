//! Generic netlink, the little of it IPVS needs: a socket, messages built and parsed as
//! `nlmsghdr` + `genlmsghdr` + attributes, requests acknowledged one at a time, dumps, and the
//! controller's family lookup. Encoded by hand: the layout is a few fixed headers and
//! type-length-value attributes (`include/uapi/linux/netlink.h`, `genetlink.h`), and the
//! encoding is pure, so it is tested here by round trips without privileges.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `struct nlmsghdr`: length, type, flags, sequence number, port id.
const NLMSG_HDRLEN: usize = 16;
/// `struct genlmsghdr`: command, version, two reserved bytes.
const GENL_HDRLEN: usize = 4;
/// `struct nlattr`: length and type; attributes are 4-byte aligned.
const NLA_HDRLEN: usize = 4;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
/// `NLM_F_ROOT | NLM_F_MATCH`.
pub const NLM_F_DUMP: u16 = 0x300;

/// Set on an attribute that holds attributes.
const NLA_F_NESTED: u16 = 0x8000;
/// The attribute type without the nested and byte-order flags.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// The generic netlink controller (`GENL_ID_CTRL`) and what its family lookup uses.
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Builds one request: headers first, attributes appended, lengths filled in by `finish`.
pub struct Message {
    buf: Vec<u8>,
    /// Where each open nest's header starts.
    nests: Vec<usize>,
}

impl Message {
    /// A message to family `family` (its numeric id) carrying command `cmd`.
    pub fn new(family: u16, flags: u16, cmd: u8, version: u8) -> Message {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // sequence, set by finish
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        Message {
            buf,
            nests: Vec::new(),
        }
    }

    /// Appends an attribute holding `value` as is, padded to 4 bytes.
    pub fn bytes(&mut self, kind: u16, value: &[u8]) -> &mut Message {
        let len = u16::try_from(NLA_HDRLEN + value.len()).expect("attribute fits 64 KiB");
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    pub fn u16(&mut self, kind: u16, value: u16) -> &mut Message {
        self.bytes(kind, &value.to_ne_bytes())
    }

    pub fn u32(&mut self, kind: u16, value: u32) -> &mut Message {
        self.bytes(kind, &value.to_ne_bytes())
    }

    /// A NUL-terminated string, as the kernel's `NLA_NUL_STRING` and `NLA_STRING` take it.
    pub fn string(&mut self, kind: u16, value: &str) -> &mut Message {
        let mut v = value.as_bytes().to_vec();
        v.push(0);
        self.bytes(kind, &v)
    }

    /// Opens a nested attribute; what follows goes inside it until `end_nest`.
    pub fn nest(&mut self, kind: u16) -> &mut Message {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub fn end_nest(&mut self) -> &mut Message {
        let start = self.nests.pop().expect("end_nest without nest");
        let len = u16::try_from(self.buf.len() - start).expect("nest fits 64 KiB");
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// The bytes to send, with the total length and `seq` filled in.
    pub fn finish(&self, seq: u32) -> Vec<u8> {
        assert!(self.nests.is_empty(), "unclosed nested attribute");
        let mut out = self.buf.clone();
        let len = out.len() as u32;
        out[0..4].copy_from_slice(&len.to_ne_bytes());
        out[8..12].copy_from_slice(&seq.to_ne_bytes());
        out
    }
}

/// The attributes in `buf`, as (type without flags, payload). Stops at the first malformed
/// one.
pub fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < NLA_HDRLEN {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > rest.len() {
            return None;
        }
        let payload = &rest[NLA_HDRLEN..len];
        rest = &rest[align4(len).min(rest.len())..];
        Some((kind, payload))
    })
}

/// The payload of attribute `kind` in `buf`, if present.
pub fn attr(buf: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(buf).find(|(k, _)| *k == kind).map(|(_, v)| v)
}

pub fn attr_u16(buf: &[u8], kind: u16) -> Option<u16> {
    Some(u16::from_ne_bytes(
        attr(buf, kind)?.get(..2)?.try_into().ok()?,
    ))
}

pub fn attr_u32(buf: &[u8], kind: u16) -> Option<u32> {
    Some(u32::from_ne_bytes(
        attr(buf, kind)?.get(..4)?.try_into().ok()?,
    ))
}

pub fn attr_string(buf: &[u8], kind: u16) -> Option<String> {
    let v = attr(buf, kind)?;
    let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
    Some(String::from_utf8_lossy(&v[..end]).into_owned())
}

/// One message of a reply, split up.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply<'a> {
    /// A generic netlink message: its command and its attributes' bytes.
    Data { cmd: u8, attrs: &'a [u8] },
    /// An acknowledgement (error 0) or an error: a negative errno.
    Error(i32),
    /// The end of a dump.
    Done,
}

/// The messages in one datagram the kernel sent, with their sequence numbers.
pub fn replies(datagram: &[u8]) -> Vec<(u32, Reply<'_>)> {
    let mut out = Vec::new();
    let mut rest = datagram;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
        let seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
        if len < NLMSG_HDRLEN || len > rest.len() {
            break;
        }
        let payload = &rest[NLMSG_HDRLEN..len];
        let reply = match kind {
            NLMSG_ERROR => {
                let errno = payload
                    .get(..4)
                    .map_or(-libc::EIO, |b| i32::from_ne_bytes(b.try_into().unwrap()));
                Reply::Error(errno)
            }
            NLMSG_DONE => Reply::Done,
            _ if payload.len() >= GENL_HDRLEN => Reply::Data {
                cmd: payload[0],
                attrs: &payload[GENL_HDRLEN..],
            },
            _ => Reply::Error(-libc::EPROTO),
        };
        out.push((seq, reply));
        rest = &rest[align4(len).min(rest.len())..];
    }
    out
}

/// A generic netlink socket, in the network namespace of the thread that opened it (for
/// its whole life, whichever thread uses it later).
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl Socket {
    pub fn open() -> io::Result<Socket> {
        // SAFETY: plain socket(2); the descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; all zero means "kernel picks our port id".
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: `addr` is a valid sockaddr_nl of the size passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Socket {
            fd,
            seq: 0,
            // Dumps arrive in datagrams of up to 32 KiB (NLMSG_GOODSIZE and friends).
            buf: vec![0; 64 * 1024],
        })
    }

    fn send(&mut self, msg: &Message) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let bytes = msg.finish(self.seq);
        // SAFETY: `bytes` is valid for reads of its length; the kernel is the destination
        // of an unconnected netlink socket's send.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    fn recv(&mut self) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Sends `msg` (which must ask for an ACK) and waits for its acknowledgement.
    pub fn request(&mut self, msg: &Message) -> io::Result<()> {
        let seq = self.send(msg)?;
        loop {
            let n = self.recv()?;
            for (s, reply) in replies(&self.buf[..n]) {
                if s != seq {
                    continue;
                }
                if let Reply::Error(errno) = reply {
                    return if errno == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-errno))
                    };
                }
            }
        }
    }

    /// Sends `msg` and hands the attributes of every data message of the answer to `each`,
    /// until the answer ends: with `NLMSG_DONE` for a dump (`NLM_F_DUMP`), with the
    /// acknowledgement for a request that asked for one (`NLM_F_ACK`).
    pub fn dump(&mut self, msg: &Message, mut each: impl FnMut(u8, &[u8])) -> io::Result<()> {
        let seq = self.send(msg)?;
        loop {
            let n = self.recv()?;
            let datagram = self.buf[..n].to_vec();
            for (s, reply) in replies(&datagram) {
                if s != seq {
                    continue;
                }
                match reply {
                    Reply::Data { cmd, attrs } => each(cmd, attrs),
                    Reply::Done | Reply::Error(0) => return Ok(()),
                    Reply::Error(errno) => return Err(io::Error::from_raw_os_error(-errno)),
                }
            }
        }
    }

    /// The id of generic netlink family `name`; `None` when the kernel has no such family
    /// (its module is not loaded, or not built).
    pub fn family_id(&mut self, name: &str) -> io::Result<Option<u16>> {
        let mut msg = Message::new(
            GENL_ID_CTRL,
            NLM_F_REQUEST | NLM_F_ACK,
            CTRL_CMD_GETFAMILY,
            1,
        );
        msg.string(CTRL_ATTR_FAMILY_NAME, name);
        let mut id = None;
        match self.dump(&msg, |_, attrs| id = attr_u16(attrs, CTRL_ATTR_FAMILY_ID)) {
            Ok(()) => Ok(id),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_has_headers_lengths_and_padded_attributes() {
        let mut m = Message::new(0x22, NLM_F_REQUEST | NLM_F_ACK, 5, 1);
        m.u16(1, 2).string(6, "rr");
        let bytes = m.finish(7);
        assert_eq!(bytes.len(), 16 + 4 + 8 + 8);
        assert_eq!(u32::from_ne_bytes(bytes[0..4].try_into().unwrap()), 36);
        assert_eq!(u16::from_ne_bytes(bytes[4..6].try_into().unwrap()), 0x22);
        assert_eq!(u16::from_ne_bytes(bytes[6..8].try_into().unwrap()), 5);
        assert_eq!(u32::from_ne_bytes(bytes[8..12].try_into().unwrap()), 7);
        assert_eq!(&bytes[16..20], &[5, 1, 0, 0]);
        // "rr\0" is 3 bytes: length 7, padded to 8.
        assert_eq!(&bytes[28..36], &[7, 0, 6, 0, b'r', b'r', 0, 0]);
    }

    #[test]
    fn nested_attributes_round_trip() {
        let mut m = Message::new(0x22, NLM_F_REQUEST, 1, 1);
        m.nest(1)
            .u16(1, 10)
            .bytes(3, &[1, 2, 3, 4, 5])
            .u32(8, 10800)
            .end_nest()
            .u32(4, 99);
        let bytes = m.finish(1);
        let body = &bytes[NLMSG_HDRLEN + GENL_HDRLEN..];
        let top: Vec<_> = attrs(body).collect();
        assert_eq!(top.len(), 2);
        assert_eq!(top[0].0, 1, "the nested flag is masked off");
        let inner = top[0].1;
        assert_eq!(attr_u16(inner, 1), Some(10));
        assert_eq!(attr(inner, 3), Some(&[1u8, 2, 3, 4, 5][..]));
        assert_eq!(attr_u32(inner, 8), Some(10800));
        assert_eq!(attr_u32(body, 4), Some(99));
        assert_eq!(attr(body, 9), None);
    }

    /// A datagram as the kernel sends it: `(type, seq, payload)` messages back to back.
    fn datagram(msgs: &[(u16, u32, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (kind, seq, payload) in msgs {
            let len = (NLMSG_HDRLEN + payload.len()) as u32;
            out.extend_from_slice(&len.to_ne_bytes());
            out.extend_from_slice(&kind.to_ne_bytes());
            out.extend_from_slice(&0u16.to_ne_bytes());
            out.extend_from_slice(&seq.to_ne_bytes());
            out.extend_from_slice(&0u32.to_ne_bytes());
            out.extend_from_slice(payload);
            out.resize(align4(out.len()), 0);
        }
        out
    }

    #[test]
    fn replies_split_data_errors_and_done() {
        let mut data = vec![4, 1, 0, 0];
        data.extend_from_slice(&[8, 0, 1, 0, 0x22, 0, 0, 0]);
        let mut err = (-libc::ENOENT).to_ne_bytes().to_vec();
        err.extend_from_slice(&[0; 16]); // the echoed request header
        let d = datagram(&[
            (0x22, 3, data),
            (NLMSG_ERROR, 4, err),
            (NLMSG_DONE, 3, 0u32.to_ne_bytes().to_vec()),
        ]);
        let r = replies(&d);
        assert_eq!(r.len(), 3);
        match &r[0] {
            (3, Reply::Data { cmd: 4, attrs }) => assert_eq!(attr_u16(attrs, 1), Some(0x22)),
            other => panic!("{other:?}"),
        }
        assert_eq!(r[1], (4, Reply::Error(-libc::ENOENT)));
        assert_eq!(r[2], (3, Reply::Done));
        // A truncated message ends the parse rather than reading past the datagram.
        assert_eq!(replies(&d[..20]).len(), 0);
    }

    #[test]
    fn strings_stop_at_their_nul() {
        let mut m = Message::new(1, 0, 0, 0);
        m.string(6, "wrr");
        let bytes = m.finish(0);
        assert_eq!(
            attr_string(&bytes[NLMSG_HDRLEN + GENL_HDRLEN..], 6).as_deref(),
            Some("wrr")
        );
    }
}
