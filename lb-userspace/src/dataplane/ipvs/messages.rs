//! The IPVS generic netlink family (`include/uapi/linux/ip_vs.h`): its commands, the
//! attributes of a virtual service and of a real server, and the client that sends them.
//!
//! What the kernel requires (`net/netfilter/ipvs/ip_vs_ctl.c`, `ip_vs_genl_parse_service`
//! and `_dest`): a service is named by family, protocol, address (the 16 bytes of
//! `union nf_inet_addr`, an IPv4 address in the first 4) and port (network order); adding or
//! changing one also needs scheduler, flags, timeout and netmask. A real server is named by
//! address and port; adding or changing one also needs forwarding method, weight and both
//! thresholds.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::genl::{self, Message, Socket, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use super::table::{ServiceAttrs, ServiceKey, Table, VirtualService};
use crate::model::{Endpoint, Protocol};

/// The family's name, for the controller's lookup.
pub const FAMILY: &str = "IPVS";
const VERSION: u8 = 1;

/// Commands (`IPVS_CMD_*`).
pub mod cmd {
    pub const NEW_SERVICE: u8 = 1;
    pub const SET_SERVICE: u8 = 2;
    pub const DEL_SERVICE: u8 = 3;
    pub const GET_SERVICE: u8 = 4;
    pub const NEW_DEST: u8 = 5;
    pub const SET_DEST: u8 = 6;
    pub const DEL_DEST: u8 = 7;
    pub const GET_DEST: u8 = 8;
}

/// Top-level attributes (`IPVS_CMD_ATTR_*`).
const CMD_ATTR_SERVICE: u16 = 1;
const CMD_ATTR_DEST: u16 = 2;

/// Service attributes (`IPVS_SVC_ATTR_*`).
const SVC_AF: u16 = 1;
const SVC_PROTOCOL: u16 = 2;
const SVC_ADDR: u16 = 3;
const SVC_PORT: u16 = 4;
const SVC_FWMARK: u16 = 5;
const SVC_SCHED_NAME: u16 = 6;
const SVC_FLAGS: u16 = 7;
const SVC_TIMEOUT: u16 = 8;
const SVC_NETMASK: u16 = 9;

/// Real-server attributes (`IPVS_DEST_ATTR_*`).
const DEST_ADDR: u16 = 1;
const DEST_PORT: u16 = 2;
const DEST_FWD_METHOD: u16 = 3;
const DEST_WEIGHT: u16 = 4;
const DEST_U_THRESH: u16 = 5;
const DEST_L_THRESH: u16 = 6;
const DEST_ACTIVE_CONNS: u16 = 7;
const DEST_INACT_CONNS: u16 = 8;
const DEST_ADDR_FAMILY: u16 = 11;

/// `IP_VS_SVC_F_PERSISTENT`: connections of one client stick to one real server.
const F_PERSISTENT: u32 = 0x1;
/// `IP_VS_CONN_F_MASQ`: forwarding by NAT.
const FWD_MASQ: u32 = 0;

fn af(addr: IpAddr) -> u16 {
    match addr {
        IpAddr::V4(_) => libc::AF_INET as u16,
        IpAddr::V6(_) => libc::AF_INET6 as u16,
    }
}

/// `union nf_inet_addr`: 16 bytes, an IPv4 address in the first 4.
fn inet_addr(addr: IpAddr) -> [u8; 16] {
    let mut out = [0; 16];
    match addr {
        IpAddr::V4(a) => out[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => out = a.octets(),
    }
    out
}

fn parse_addr(family: u16, bytes: &[u8]) -> Option<IpAddr> {
    match i32::from(family) {
        libc::AF_INET => Some(Ipv4Addr::from(<[u8; 4]>::try_from(bytes.get(..4)?).ok()?).into()),
        libc::AF_INET6 => Some(Ipv6Addr::from(<[u8; 16]>::try_from(bytes.get(..16)?).ok()?).into()),
        _ => None,
    }
}

fn protocol(number: u16) -> Option<Protocol> {
    [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
        .into_iter()
        .find(|p| u16::from(p.number()) == number)
}

/// Appends the attributes naming `key` (inside an open service nest).
fn service_id(m: &mut Message, key: &ServiceKey) {
    m.u16(SVC_AF, af(key.addr))
        .u16(SVC_PROTOCOL, u16::from(key.protocol.number()))
        .bytes(SVC_ADDR, &inet_addr(key.addr))
        .bytes(SVC_PORT, &key.port.to_be_bytes());
}

/// The service nest of a command on the service itself (`full`: with its settings) or on
/// one of its real servers (just its name).
fn service_nest(m: &mut Message, key: &ServiceKey, attrs: Option<&ServiceAttrs>) {
    m.nest(CMD_ATTR_SERVICE);
    service_id(m, key);
    if let Some(attrs) = attrs {
        let flags = if attrs.persistence_s.is_some() {
            F_PERSISTENT
        } else {
            0
        };
        // `struct ip_vs_flags { flags, mask }`: the mask says which bits to set, as ipvsadm
        // sends it (all).
        let mut flag_bytes = flags.to_ne_bytes().to_vec();
        flag_bytes.extend_from_slice(&u32::MAX.to_ne_bytes());
        // Persistence granularity: the whole client address (ipvsadm's default).
        let netmask = match key.addr {
            IpAddr::V4(_) => u32::MAX,
            IpAddr::V6(_) => 128,
        };
        m.string(SVC_SCHED_NAME, &attrs.scheduler)
            .bytes(SVC_FLAGS, &flag_bytes)
            .u32(SVC_TIMEOUT, attrs.persistence_s.unwrap_or(0))
            .u32(SVC_NETMASK, netmask);
    }
    m.end_nest();
}

fn dest_nest(m: &mut Message, ep: &Endpoint, weight: Option<u32>) {
    m.nest(CMD_ATTR_DEST)
        .bytes(DEST_ADDR, &inet_addr(ep.addr))
        .bytes(DEST_PORT, &ep.port.to_be_bytes())
        .u16(DEST_ADDR_FAMILY, af(ep.addr));
    if let Some(weight) = weight {
        m.u32(DEST_FWD_METHOD, FWD_MASQ)
            .u32(DEST_WEIGHT, weight)
            .u32(DEST_U_THRESH, 0)
            .u32(DEST_L_THRESH, 0);
    }
    m.end_nest();
}

/// One change to the kernel's IPVS table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    AddService(ServiceKey, ServiceAttrs),
    SetService(ServiceKey, ServiceAttrs),
    DelService(ServiceKey),
    AddDest(ServiceKey, Endpoint, u32),
    SetDest(ServiceKey, Endpoint, u32),
    DelDest(ServiceKey, Endpoint),
}

impl Op {
    /// The request carrying this change, for family id `family`.
    pub fn message(&self, family: u16) -> Message {
        let new = |cmd| Message::new(family, NLM_F_REQUEST | NLM_F_ACK, cmd, VERSION);
        match self {
            Op::AddService(key, attrs) | Op::SetService(key, attrs) => {
                let cmd = if matches!(self, Op::AddService(..)) {
                    cmd::NEW_SERVICE
                } else {
                    cmd::SET_SERVICE
                };
                let mut m = new(cmd);
                service_nest(&mut m, key, Some(attrs));
                m
            }
            Op::DelService(key) => {
                let mut m = new(cmd::DEL_SERVICE);
                service_nest(&mut m, key, None);
                m
            }
            Op::AddDest(key, ep, weight) | Op::SetDest(key, ep, weight) => {
                let cmd = if matches!(self, Op::AddDest(..)) {
                    cmd::NEW_DEST
                } else {
                    cmd::SET_DEST
                };
                let mut m = new(cmd);
                service_nest(&mut m, key, None);
                dest_nest(&mut m, ep, Some(*weight));
                m
            }
            Op::DelDest(key, ep) => {
                let mut m = new(cmd::DEL_DEST);
                service_nest(&mut m, key, None);
                dest_nest(&mut m, ep, None);
                m
            }
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ep = |e: &Endpoint| std::net::SocketAddr::new(e.addr, e.port);
        match self {
            Op::AddService(k, a) => write!(f, "add service {k} {}", describe(a)),
            Op::SetService(k, a) => write!(f, "change service {k} to {}", describe(a)),
            Op::DelService(k) => write!(f, "delete service {k}"),
            Op::AddDest(k, e, w) => write!(f, "add real server {} weight {w} to {k}", ep(e)),
            Op::SetDest(k, e, w) => write!(f, "set real server {} of {k} to weight {w}", ep(e)),
            Op::DelDest(k, e) => write!(f, "delete real server {} of {k}", ep(e)),
        }
    }
}

fn describe(a: &ServiceAttrs) -> String {
    match a.persistence_s {
        Some(t) => format!("{} persistent {t}", a.scheduler),
        None => a.scheduler.clone(),
    }
}

/// A virtual service as the kernel reports it; `None` for one this code never makes
/// (firewall-mark services, unknown families or protocols).
pub fn parse_service(attrs: &[u8]) -> Option<(ServiceKey, ServiceAttrs)> {
    let svc = genl::attr(attrs, CMD_ATTR_SERVICE)?;
    if genl::attr_u32(svc, SVC_FWMARK).is_some_and(|m| m != 0) {
        return None;
    }
    let family = genl::attr_u16(svc, SVC_AF)?;
    let key = ServiceKey {
        addr: parse_addr(family, genl::attr(svc, SVC_ADDR)?)?,
        protocol: protocol(genl::attr_u16(svc, SVC_PROTOCOL)?)?,
        port: u16::from_be_bytes(genl::attr(svc, SVC_PORT)?.get(..2)?.try_into().ok()?),
    };
    let flags = genl::attr(svc, SVC_FLAGS)
        .and_then(|b| Some(u32::from_ne_bytes(b.get(..4)?.try_into().ok()?)))
        .unwrap_or(0);
    let attrs = ServiceAttrs {
        scheduler: genl::attr_string(svc, SVC_SCHED_NAME).unwrap_or_default(),
        persistence_s: (flags & F_PERSISTENT != 0)
            .then(|| genl::attr_u32(svc, SVC_TIMEOUT).unwrap_or(0)),
    };
    Some((key, attrs))
}

/// A real server as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DestInfo {
    pub endpoint: Endpoint,
    pub weight: u32,
    /// Connections in use, and the ones closing or idle (ipvsadm's ActiveConn, InActConn).
    pub active: u32,
    pub inactive: u32,
}

pub fn parse_dest(attrs: &[u8], service_family: u16) -> Option<DestInfo> {
    let d = genl::attr(attrs, CMD_ATTR_DEST)?;
    let family = genl::attr_u16(d, DEST_ADDR_FAMILY).unwrap_or(service_family);
    Some(DestInfo {
        endpoint: Endpoint {
            addr: parse_addr(family, genl::attr(d, DEST_ADDR)?)?,
            port: u16::from_be_bytes(genl::attr(d, DEST_PORT)?.get(..2)?.try_into().ok()?),
        },
        weight: genl::attr_u32(d, DEST_WEIGHT).unwrap_or(0),
        active: genl::attr_u32(d, DEST_ACTIVE_CONNS).unwrap_or(0),
        inactive: genl::attr_u32(d, DEST_INACT_CONNS).unwrap_or(0),
    })
}

/// A client of the kernel's IPVS table, in the network namespace its socket was opened in.
pub struct Ipvs {
    socket: Socket,
    family: u16,
}

impl Ipvs {
    /// Looks the family up on `socket`; `None` when the kernel has no IPVS (not loaded).
    pub fn new(mut socket: Socket) -> io::Result<Option<Ipvs>> {
        Ok(socket
            .family_id(FAMILY)?
            .map(|family| Ipvs { socket, family }))
    }

    /// Carries out one change.
    pub fn apply(&mut self, op: &Op) -> io::Result<()> {
        self.socket.request(&op.message(self.family))
    }

    /// Every virtual service in the namespace, of every owner.
    pub fn services(&mut self) -> io::Result<Vec<(ServiceKey, ServiceAttrs)>> {
        let m = Message::new(
            self.family,
            NLM_F_REQUEST | NLM_F_DUMP,
            cmd::GET_SERVICE,
            VERSION,
        );
        let mut out = Vec::new();
        self.socket.dump(&m, |_, attrs| {
            out.extend(parse_service(attrs));
        })?;
        Ok(out)
    }

    /// The real servers of `key`.
    pub fn dests(&mut self, key: &ServiceKey) -> io::Result<Vec<DestInfo>> {
        let mut m = Message::new(
            self.family,
            NLM_F_REQUEST | NLM_F_DUMP,
            cmd::GET_DEST,
            VERSION,
        );
        service_nest(&mut m, key, None);
        let mut out = Vec::new();
        let family = af(key.addr);
        self.socket.dump(&m, |_, attrs| {
            out.extend(parse_dest(attrs, family));
        })?;
        Ok(out)
    }

    /// The virtual services `owns` claims, with their real servers and weights, and the
    /// real servers that hold no connection (active or inactive) at all.
    pub fn table(
        &mut self,
        owns: impl Fn(&ServiceKey) -> bool,
    ) -> io::Result<(Table, Vec<(ServiceKey, Endpoint)>)> {
        let mut table = Table::new();
        let mut idle = Vec::new();
        for (key, attrs) in self.services()? {
            if !owns(&key) {
                continue;
            }
            let mut dests = std::collections::BTreeMap::new();
            for d in self.dests(&key)? {
                dests.insert(d.endpoint, d.weight);
                if d.active + d.inactive == 0 {
                    idle.push((key, d.endpoint));
                }
            }
            table.insert(key, VirtualService { attrs, dests });
        }
        Ok((table, idle))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(addr: &str, protocol: Protocol, port: u16) -> ServiceKey {
        ServiceKey {
            addr: addr.parse().unwrap(),
            protocol,
            port,
        }
    }

    /// The attributes of a request as the kernel would read them (after the headers).
    fn body(op: &Op) -> Vec<u8> {
        op.message(0x25).finish(1)[20..].to_vec()
    }

    #[test]
    fn a_new_service_round_trips_through_the_dump_parser() {
        for (k, persistence_s) in [
            (key("10.96.0.10", Protocol::Udp, 53), None),
            (key("fd00:10:96::1", Protocol::Tcp, 443), Some(10800)),
            (key("192.168.0.2", Protocol::Sctp, 30001), None),
        ] {
            let attrs = ServiceAttrs {
                scheduler: "mh".into(),
                persistence_s,
            };
            let b = body(&Op::AddService(k, attrs.clone()));
            assert_eq!(parse_service(&b), Some((k, attrs)), "{k}");
        }
    }

    #[test]
    fn service_attributes_are_laid_out_as_the_kernel_reads_them() {
        let k = key("10.96.0.1", Protocol::Tcp, 443);
        let b = body(&Op::AddService(
            k,
            ServiceAttrs {
                scheduler: "rr".into(),
                persistence_s: Some(300),
            },
        ));
        let svc = genl::attr(&b, CMD_ATTR_SERVICE).unwrap();
        assert_eq!(genl::attr_u16(svc, SVC_AF), Some(libc::AF_INET as u16));
        assert_eq!(genl::attr_u16(svc, SVC_PROTOCOL), Some(6));
        let addr = genl::attr(svc, SVC_ADDR).unwrap();
        assert_eq!(addr.len(), 16, "the whole union nf_inet_addr");
        assert_eq!(&addr[..4], &[10, 96, 0, 1]);
        assert_eq!(
            genl::attr(svc, SVC_PORT),
            Some(&[1u8, 187][..]),
            "443 big-endian"
        );
        let flags = genl::attr(svc, SVC_FLAGS).unwrap();
        assert_eq!(flags.len(), 8, "struct ip_vs_flags");
        assert_eq!(
            u32::from_ne_bytes(flags[..4].try_into().unwrap()),
            F_PERSISTENT
        );
        assert_eq!(genl::attr_u32(svc, SVC_TIMEOUT), Some(300));
        assert_eq!(genl::attr_u32(svc, SVC_NETMASK), Some(u32::MAX));
        // A deletion names the service only.
        let b = body(&Op::DelService(k));
        let svc = genl::attr(&b, CMD_ATTR_SERVICE).unwrap();
        assert!(genl::attr(svc, SVC_SCHED_NAME).is_none());
        assert!(genl::attr(svc, SVC_ADDR).is_some());
    }

    #[test]
    fn real_servers_round_trip() {
        let k = key("fd00:10:96::1", Protocol::Tcp, 80);
        let ep = Endpoint {
            addr: "fd00:10:0:11::2".parse().unwrap(),
            port: 8080,
        };
        for (op, weight) in [
            (Op::AddDest(k, ep, 1), 1),
            (Op::SetDest(k, ep, 0), 0),
            (Op::DelDest(k, ep), 0),
        ] {
            let b = body(&op);
            let d = parse_dest(&b, libc::AF_INET6 as u16).unwrap();
            assert_eq!((d.endpoint, d.weight), (ep, weight), "{op}");
            // Every real-server command names its service too.
            assert_eq!(parse_service(&b).map(|(key, _)| key), Some(k));
        }
        let dest = genl::attr(&body(&Op::AddDest(k, ep, 1)), CMD_ATTR_DEST)
            .unwrap()
            .to_vec();
        assert_eq!(genl::attr_u32(&dest, DEST_FWD_METHOD), Some(FWD_MASQ));
        assert_eq!(genl::attr_u32(&dest, DEST_U_THRESH), Some(0));
    }

    #[test]
    fn commands_are_the_kernels_numbers() {
        let k = key("10.96.0.1", Protocol::Tcp, 80);
        let ep = Endpoint {
            addr: "10.0.11.2".parse().unwrap(),
            port: 80,
        };
        let a = ServiceAttrs {
            scheduler: "rr".into(),
            persistence_s: None,
        };
        for (op, cmd) in [
            (Op::AddService(k, a.clone()), 1),
            (Op::SetService(k, a), 2),
            (Op::DelService(k), 3),
            (Op::AddDest(k, ep, 1), 5),
            (Op::SetDest(k, ep, 1), 6),
            (Op::DelDest(k, ep), 7),
        ] {
            let bytes = op.message(0x25).finish(1);
            assert_eq!(bytes[16], cmd, "{op}");
            assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), 0x25);
        }
    }
}
