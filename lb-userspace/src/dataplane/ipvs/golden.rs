//! Golden-file tests of what IPVS mode programs for the iptables dataplane's desired states
//! (the same cases, so the modes can be compared), and of the operations an incremental
//! change produces.
//!
//! The expected state lives in `testdata/<case>.ipvs`: the virtual services in
//! `ipvsadm -Ln`'s layout, the dummy interface's addresses and the iptables rules of both
//! families. After checking a difference is intended, regenerate them explicitly with
//! `LB_UPDATE_GOLDEN=1 cargo test -p lb-userspace ipvs` and review the diff in git.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::diff::diff;
use super::messages::Op;
use super::rules::generate;
use super::table::{self, plan, ServiceAttrs, ServiceKey};
use crate::dataplane::fixtures::{check_golden_files, render_both, CASES};
use crate::model::{DesiredState, Endpoint, IpFamily, Protocol};

const BOTH: &[IpFamily] = &[IpFamily::V4, IpFamily::V6];

fn render_case(desired: &DesiredState) -> String {
    let planned = plan(desired, BOTH, "rr");
    let mut out = String::new();
    out.push_str("# IPVS virtual services (ipvsadm -Ln layout)\n");
    out.push_str(&table::render(&planned.services, &planned.comments));
    out.push_str("# lba-ipvs0 addresses\n");
    out.push_str(&table::render_bound(&planned.bound));
    out + &render_both(desired, |d, family| generate(d, family).render())
}

#[test]
fn planned_state_matches_golden_files() {
    check_golden_files("src/dataplane/ipvs/testdata", "ipvs", render_case);
}

#[test]
fn families_stay_apart_and_plans_are_deterministic() {
    for (case, build) in CASES {
        let d = build();
        assert_eq!(render_case(&d), render_case(&d.clone()), "{case}");
        let v4 = plan(&d, &[IpFamily::V4], "rr");
        for (key, vs) in &v4.services {
            assert!(key.addr.is_ipv4(), "{case}: {key}");
            assert!(vs.dests.keys().all(|e| e.addr.is_ipv4()), "{case}: {key}");
        }
        assert!(v4.bound.iter().all(IpAddr::is_ipv4), "{case}");
        let v6 = plan(&d, &[IpFamily::V6], "rr");
        for (key, vs) in &v6.services {
            assert!(key.addr.is_ipv6(), "{case}: {key}");
            assert!(vs.dests.keys().all(|e| e.addr.is_ipv6()), "{case}: {key}");
        }
    }
}

fn case(name: &str) -> DesiredState {
    CASES.iter().find(|(n, _)| *n == name).unwrap().1()
}

fn key(addr: &str, protocol: Protocol, port: u16) -> ServiceKey {
    ServiceKey {
        addr: addr.parse().unwrap(),
        protocol,
        port,
    }
}

fn ep(s: &str) -> Endpoint {
    let sa: std::net::SocketAddr = s.parse().unwrap();
    Endpoint {
        addr: sa.ip(),
        port: sa.port(),
    }
}

/// The operations taking the kernel from `before` (as programmed) to `after`.
fn ops(before: &DesiredState, after: &DesiredState) -> Vec<Op> {
    let old = plan(before, BOTH, "rr").services;
    let new = plan(after, BOTH, "rr").services;
    diff(&old, &new, &BTreeSet::new()).ops
}

#[test]
fn incremental_changes_produce_only_their_operations() {
    let base = case("cluster_ip_3_endpoints");
    let vip = key("172.30.0.41", Protocol::Tcp, 80);
    let spn = base.services.keys().next().unwrap().clone();

    // An endpoint goes away: it drains (TCP), nothing else is touched.
    let mut fewer = base.clone();
    let sp = fewer.services.get_mut(&spn).unwrap();
    sp.endpoints.remove(&ep("10.180.0.2:80"));
    assert_eq!(
        ops(&base, &fewer),
        vec![Op::SetDest(vip, ep("10.180.0.2:80"), 0)]
    );

    // An endpoint arrives.
    let mut more = base.clone();
    more.services
        .get_mut(&spn)
        .unwrap()
        .endpoints
        .insert(ep("10.180.0.4:80"));
    assert_eq!(
        ops(&base, &more),
        vec![Op::AddDest(vip, ep("10.180.0.4:80"), 1)]
    );

    // Affinity switched on: the service changes, its real servers do not.
    let mut sticky = base.clone();
    sticky.services.get_mut(&spn).unwrap().affinity_timeout_s = Some(60);
    assert_eq!(
        ops(&base, &sticky),
        vec![Op::SetService(
            vip,
            ServiceAttrs {
                scheduler: "rr".into(),
                persistence_s: Some(60),
            }
        )]
    );

    // The service goes: one deletion takes its real servers with it.
    let mut gone = base.clone();
    gone.services.clear();
    assert_eq!(ops(&base, &gone), vec![Op::DelService(vip)]);

    // A second service appears beside it: only it is added.
    let mut both = base.clone();
    both.services.extend(case("ipv6").services);
    let added = ops(&base, &both);
    assert!(
        added
            .iter()
            .all(|op| matches!(op, Op::AddService(..) | Op::AddDest(..))),
        "{added:?}"
    );
    assert!(
        added
            .iter()
            .all(|op| !format!("{op}").contains("172.30.0.41")),
        "the first service was touched: {added:?}"
    );
    assert_eq!(
        added
            .iter()
            .filter(|op| matches!(op, Op::AddService(..)))
            .count(),
        5,
        "dns: 2 ClusterIPs and 2 NodePorts; sig: 1 ClusterIP: {added:?}"
    );
}

#[test]
fn policies_choose_the_real_servers() {
    let planned = plan(&case("node_port_local"), BOTH, "rr");
    let dests =
        |k: ServiceKey| -> Vec<Endpoint> { planned.services[&k].dests.keys().copied().collect() };
    // svc3: externalTrafficPolicy Local; its ClusterIP still uses every endpoint.
    assert_eq!(
        dests(key("192.168.0.2", Protocol::Tcp, 30003)),
        vec![ep("10.180.0.2:80")]
    );
    assert_eq!(
        dests(key("1.2.3.4", Protocol::Tcp, 80)),
        vec![ep("10.180.0.2:80")]
    );
    assert_eq!(
        dests(key("172.30.0.43", Protocol::Tcp, 80)),
        vec![ep("10.180.0.1:80"), ep("10.180.0.2:80")]
    );
    // svc3b: Local without local endpoints: the NodePort has no real server (IPVS rejects).
    assert_eq!(dests(key("192.168.0.2", Protocol::Tcp, 30004)), vec![]);
    // svc3c: internalTrafficPolicy Local without local endpoints.
    assert_eq!(dests(key("172.30.0.45", Protocol::Udp, 53)), vec![]);
    // The node address is not bound to the dummy interface; the LoadBalancer IP is.
    assert!(!planned
        .bound
        .contains(&"192.168.0.2".parse::<IpAddr>().unwrap()));
    assert!(planned
        .bound
        .contains(&"1.2.3.4".parse::<IpAddr>().unwrap()));
}
