//! The changes that take the kernel's IPVS table from what it holds (what the last apply
//! programmed, or what a full sync read back) to what is wanted. Pure.
//!
//! Real servers that go away are drained as kube-proxy's graceful termination does
//! (`pkg/proxy/ipvs/graceful_termination.go`): a TCP real server first gets weight 0, so it
//! takes no new connections while its established ones carry on, and is deleted by a later
//! apply once it holds no connection. UDP and SCTP ones are deleted at once: with
//! `expire_nodest_conn` their flows move on with the next packet.

use std::collections::BTreeSet;

use super::messages::Op;
use super::table::{ServiceKey, Table, VirtualService};
use crate::model::{Endpoint, Protocol};

/// What an apply does, and the table the kernel holds after it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub ops: Vec<Op>,
    /// `new` plus the real servers still draining (weight 0).
    pub programmed: Table,
}

fn drains(protocol: Protocol) -> bool {
    protocol == Protocol::Tcp
}

/// The changes from `old` to `new`. `idle` names the real servers that hold no
/// connection: a draining one in it is deleted.
pub fn diff(old: &Table, new: &Table, idle: &BTreeSet<(ServiceKey, Endpoint)>) -> Diff {
    let mut ops = Vec::new();
    let mut programmed = Table::new();
    for key in old.keys().filter(|k| !new.contains_key(k)) {
        ops.push(Op::DelService(*key));
    }
    for (key, want) in new {
        let mut now = want.clone();
        let Some(have) = old.get(key) else {
            ops.push(Op::AddService(*key, want.attrs.clone()));
            for (ep, w) in &want.dests {
                ops.push(Op::AddDest(*key, *ep, *w));
            }
            programmed.insert(*key, now);
            continue;
        };
        if have.attrs != want.attrs {
            ops.push(Op::SetService(*key, want.attrs.clone()));
        }
        for (ep, w) in &have.dests {
            if want.dests.contains_key(ep) {
                continue;
            }
            if !drains(key.protocol) || (*w == 0 && idle.contains(&(*key, *ep))) {
                ops.push(Op::DelDest(*key, *ep));
                continue;
            }
            if *w != 0 {
                ops.push(Op::SetDest(*key, *ep, 0));
            }
            now.dests.insert(*ep, 0);
        }
        for (ep, w) in &want.dests {
            match have.dests.get(ep) {
                None => ops.push(Op::AddDest(*key, *ep, *w)),
                Some(old_w) if old_w != w => ops.push(Op::SetDest(*key, *ep, *w)),
                Some(_) => {}
            }
        }
        programmed.insert(*key, now);
    }
    Diff { ops, programmed }
}

/// The real servers of `table` being drained (weight 0): the ones whose connection counts
/// an apply reads, to know whether they can go.
pub fn draining(table: &Table) -> Vec<(ServiceKey, Endpoint)> {
    table
        .iter()
        .flat_map(|(key, vs): (&ServiceKey, &VirtualService)| {
            vs.dests
                .iter()
                .filter(|(_, w)| **w == 0)
                .map(move |(ep, _)| (*key, *ep))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::ipvs::table::ServiceAttrs;

    fn key(addr: &str, protocol: Protocol) -> ServiceKey {
        ServiceKey {
            addr: addr.parse().unwrap(),
            protocol,
            port: 80,
        }
    }

    fn ep(s: &str) -> Endpoint {
        Endpoint {
            addr: s.parse().unwrap(),
            port: 8080,
        }
    }

    fn rr() -> ServiceAttrs {
        ServiceAttrs {
            scheduler: "rr".into(),
            persistence_s: None,
        }
    }

    fn vs(dests: &[(&str, u32)]) -> VirtualService {
        VirtualService {
            attrs: rr(),
            dests: dests.iter().map(|(a, w)| (ep(a), *w)).collect(),
        }
    }

    fn table(entries: &[(ServiceKey, VirtualService)]) -> Table {
        entries.iter().cloned().collect()
    }

    const NONE_IDLE: &BTreeSet<(ServiceKey, Endpoint)> = &BTreeSet::new();

    #[test]
    fn from_nothing_every_service_and_real_server_is_added() {
        let a = key("10.96.0.1", Protocol::Tcp);
        let new = table(&[(a, vs(&[("10.0.11.2", 1), ("10.0.12.2", 1)]))]);
        let d = diff(&Table::new(), &new, NONE_IDLE);
        assert_eq!(
            d.ops,
            vec![
                Op::AddService(a, rr()),
                Op::AddDest(a, ep("10.0.11.2"), 1),
                Op::AddDest(a, ep("10.0.12.2"), 1),
            ]
        );
        assert_eq!(d.programmed, new);
        assert_eq!(diff(&new, &new, NONE_IDLE).ops, vec![], "nothing changed");
    }

    #[test]
    fn only_the_changed_service_is_touched() {
        let (a, b, c) = (
            key("10.96.0.1", Protocol::Tcp),
            key("10.96.0.2", Protocol::Udp),
            key("10.96.0.3", Protocol::Tcp),
        );
        let old = table(&[
            (a, vs(&[("10.0.11.2", 1)])),
            (b, vs(&[("10.0.11.2", 1), ("10.0.12.2", 1)])),
            (c, vs(&[])),
        ]);
        let mut sticky = vs(&[("10.0.11.2", 1)]);
        sticky.attrs.persistence_s = Some(10800);
        let new = table(&[(a, sticky.clone()), (b, vs(&[("10.0.12.2", 1)]))]);
        let d = diff(&old, &new, NONE_IDLE);
        assert_eq!(
            d.ops,
            vec![
                Op::DelService(c),
                Op::SetService(a, sticky.attrs.clone()),
                // UDP: no draining, deleted at once.
                Op::DelDest(b, ep("10.0.11.2")),
            ]
        );
        assert_eq!(d.programmed, new);
    }

    #[test]
    fn a_tcp_real_server_drains_before_it_goes() {
        let a = key("10.96.0.1", Protocol::Tcp);
        let old = table(&[(a, vs(&[("10.0.11.2", 1), ("10.0.12.2", 1)]))]);
        let new = table(&[(a, vs(&[("10.0.12.2", 1)]))]);
        // First: weight 0, kept.
        let d = diff(&old, &new, NONE_IDLE);
        assert_eq!(d.ops, vec![Op::SetDest(a, ep("10.0.11.2"), 0)]);
        let draining_table = table(&[(a, vs(&[("10.0.11.2", 0), ("10.0.12.2", 1)]))]);
        assert_eq!(d.programmed, draining_table);
        assert_eq!(draining(&d.programmed), vec![(a, ep("10.0.11.2"))]);
        // Still holding connections: left alone.
        let d = diff(&draining_table, &new, NONE_IDLE);
        assert_eq!(d.ops, vec![]);
        assert_eq!(d.programmed, draining_table);
        // Idle: deleted.
        let idle = BTreeSet::from([(a, ep("10.0.11.2"))]);
        let d = diff(&draining_table, &new, &idle);
        assert_eq!(d.ops, vec![Op::DelDest(a, ep("10.0.11.2"))]);
        assert_eq!(d.programmed, new);
        // An idle real server in use is not deleted: idleness only matters when draining.
        assert_eq!(diff(&new, &new, &idle).ops, vec![]);
    }

    #[test]
    fn a_draining_real_server_that_comes_back_gets_its_weight_again() {
        let a = key("fd00:10:96::1", Protocol::Tcp);
        let old = table(&[(a, vs(&[("fd00:10:0:11::2", 0)]))]);
        let new = table(&[(a, vs(&[("fd00:10:0:11::2", 1)]))]);
        let d = diff(&old, &new, NONE_IDLE);
        assert_eq!(d.ops, vec![Op::SetDest(a, ep("fd00:10:0:11::2"), 1)]);
        assert_eq!(d.programmed, new);
    }

    #[test]
    fn a_full_sync_repairs_what_the_kernel_lost_or_gained() {
        // What a full sync read back: a service deleted behind our back, a stray real server
        // with a foreign weight, a stray service of ours.
        let (a, b, stray) = (
            key("10.96.0.1", Protocol::Tcp),
            key("10.96.0.2", Protocol::Tcp),
            key("10.96.0.9", Protocol::Udp),
        );
        let kernel = table(&[(b, vs(&[("10.0.11.2", 5)])), (stray, vs(&[]))]);
        let new = table(&[(a, vs(&[("10.0.11.2", 1)])), (b, vs(&[("10.0.11.2", 1)]))]);
        let d = diff(&kernel, &new, NONE_IDLE);
        assert_eq!(
            d.ops,
            vec![
                Op::DelService(stray),
                Op::AddService(a, rr()),
                Op::AddDest(a, ep("10.0.11.2"), 1),
                Op::SetDest(b, ep("10.0.11.2"), 1),
            ]
        );
    }
}
