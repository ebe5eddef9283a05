//! The two address families at the map boundary: the plan's entries carry an `IpAddr`
//! (`plan::AnyFrontendKey` and so on), each family's maps hold its own address bytes
//! (`lb_common::V4`, `V6`). These narrow one to the other and widen back.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{Backend, FrontendKey, Service, SourceRange, VipKey, V4, V6};

use super::plan::{AnyBackend, AnyFrontendKey, AnyService, AnyVipKey};
use crate::model::IpFamily;

/// An address type of the maps: `V4` or `V6`.
pub trait Family: lb_common::Addr {
    const FAMILY: IpFamily;
    /// The family's bytes of `addr`; the all-zero address when `addr` is of the other family
    /// (callers pick the family by the address, so that is only ever an unused SNAT address).
    fn narrow(addr: IpAddr) -> Self;
    fn widen(self) -> IpAddr;
}

impl Family for V4 {
    const FAMILY: IpFamily = IpFamily::V4;
    fn narrow(addr: IpAddr) -> V4 {
        match addr {
            IpAddr::V4(a) => a.octets(),
            IpAddr::V6(_) => V4::default(),
        }
    }
    fn widen(self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(self))
    }
}

impl Family for V6 {
    const FAMILY: IpFamily = IpFamily::V6;
    fn narrow(addr: IpAddr) -> V6 {
        match addr {
            IpAddr::V6(a) => a.octets(),
            IpAddr::V4(_) => V6::default(),
        }
    }
    fn widen(self) -> IpAddr {
        IpAddr::V6(Ipv6Addr::from(self))
    }
}

pub fn frontend_key<A: Family>(k: &AnyFrontendKey) -> FrontendKey<A> {
    FrontendKey {
        addr: A::narrow(k.addr),
        port_be: k.port_be,
        proto: k.proto,
        scope: k.scope,
    }
}

pub fn any_frontend_key<A: Family>(k: &FrontendKey<A>) -> AnyFrontendKey {
    FrontendKey {
        addr: k.addr.widen(),
        port_be: k.port_be,
        proto: k.proto,
        scope: k.scope,
    }
}

pub fn service<A: Family>(s: &AnyService) -> Service<A> {
    Service {
        svc_id: s.svc_id,
        backend_count: s.backend_count,
        flags: s.flags,
        algorithm: s.algorithm,
        affinity_timeout_s: s.affinity_timeout_s,
        snat_addr: A::narrow(s.snat_addr),
    }
}

pub fn any_service<A: Family>(s: &Service<A>) -> AnyService {
    Service {
        svc_id: s.svc_id,
        backend_count: s.backend_count,
        flags: s.flags,
        algorithm: s.algorithm,
        affinity_timeout_s: s.affinity_timeout_s,
        snat_addr: s.snat_addr.widen(),
    }
}

pub fn backend<A: Family>(b: &AnyBackend) -> Backend<A> {
    Backend {
        addr: A::narrow(b.addr),
        port_be: b.port_be,
        proto: b.proto,
        state: b.state,
    }
}

pub fn any_backend<A: Family>(b: &Backend<A>) -> AnyBackend {
    Backend {
        addr: b.addr.widen(),
        port_be: b.port_be,
        proto: b.proto,
        state: b.state,
    }
}

pub fn vip_key<A: Family>(k: &AnyVipKey) -> VipKey<A> {
    VipKey {
        addr: A::narrow(k.addr),
    }
}

pub fn any_vip_key<A: Family>(k: &VipKey<A>) -> AnyVipKey {
    VipKey {
        addr: k.addr.widen(),
    }
}

/// The bits of a `SOURCE_RANGES` key that precede the address: the service id's.
const SVC_ID_BITS: u32 = 32;

/// The `SOURCE_RANGES`/`SOURCE_RANGES6` key of range `addr/len` of service `svc_id`: the
/// service id always matches in full (see `SourceRange`).
pub fn source_range_key<A: Family>(
    svc_id: u32,
    addr: IpAddr,
    len: u8,
) -> aya::maps::lpm_trie::Key<SourceRange<A>>
where
    SourceRange<A>: aya::Pod,
{
    let data = SourceRange {
        svc_id_be: svc_id.to_be(),
        addr: A::narrow(addr),
    };
    aya::maps::lpm_trie::Key::new(SVC_ID_BITS + u32::from(len), data)
}

/// (service id, range start, prefix length) of a source-range key.
pub fn source_range<A: Family>(k: &aya::maps::lpm_trie::Key<SourceRange<A>>) -> (u32, IpAddr, u8)
where
    SourceRange<A>: aya::Pod,
{
    let d = k.data();
    let len = k.prefix_len().saturating_sub(SVC_ID_BITS) as u8;
    (u32::from_be(d.svc_id_be), d.addr.widen(), len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_through_either_family() {
        let six: IpAddr = "fd00::10".parse().unwrap();
        let four: IpAddr = "10.96.0.10".parse().unwrap();
        for addr in [four, six] {
            let key = FrontendKey {
                addr,
                port_be: 80u16.to_be(),
                proto: 6,
                scope: 1,
            };
            let widened = match IpFamily::of(addr) {
                IpFamily::V4 => any_frontend_key(&frontend_key::<V4>(&key)),
                IpFamily::V6 => any_frontend_key(&frontend_key::<V6>(&key)),
            };
            assert_eq!(widened, key);
        }
        let k = source_range_key::<V6>(7, "2001:db8::".parse().unwrap(), 48);
        assert_eq!(k.prefix_len(), 80);
        assert_eq!(source_range(&k), (7, "2001:db8::".parse().unwrap(), 48));
        // A SNAT address of the other family narrows to nothing rather than to garbage.
        assert_eq!(V6::narrow(four), [0; 16]);
    }
}
