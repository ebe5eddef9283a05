//! Desired states shared by the rule generators' golden-file tests (iptables and userspace
//! modes render the same cases), and the golden-file check itself.
//!
//! A golden file holds what a generator rendered for one case. A generator change that alters
//! one fails the check with both texts; after checking the difference is intended, regenerate
//! the files explicitly with `LB_UPDATE_GOLDEN=1` and review the diff in git. Nothing is ever
//! written without that variable.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use crate::model::{
    DesiredState, Endpoint, External, Frontend, IpFamily, Protocol, ServicePort, ServicePortName,
};

pub const NODE: &str = "192.168.0.2";
pub const NODE6: &str = "fd00:192::2";

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub fn name(ns: &str, svc: &str, port: &str, protocol: Protocol) -> ServicePortName {
    ServicePortName {
        namespace: ns.into(),
        name: svc.into(),
        port: port.into(),
        protocol,
    }
}

pub fn fe(addr: &str, port: u16, protocol: Protocol) -> Frontend {
    Frontend {
        addr: ip(addr),
        port,
        protocol,
    }
}

pub fn eps(list: &[&str]) -> BTreeSet<Endpoint> {
    list.iter()
        .map(|s| {
            let sa: SocketAddr = s.parse().unwrap();
            Endpoint {
                addr: sa.ip(),
                port: sa.port(),
            }
        })
        .collect()
}

pub fn ext(snat: &str, load_balancer: bool) -> External {
    External {
        snat_addr: ip(snat),
        load_balancer,
    }
}

pub fn state(services: Vec<(ServicePortName, ServicePort)>) -> DesiredState {
    DesiredState {
        services: services.into_iter().collect(),
        node_addrs: [ip(NODE), ip(NODE6)].into(),
        health_checks: BTreeMap::new(),
    }
}

/// ns1/svc1:p80: a ClusterIP with three endpoints.
pub fn cluster_ip_3_endpoints() -> DesiredState {
    state(vec![(
        name("ns1", "svc1", "p80", Protocol::Tcp),
        ServicePort {
            frontends: [fe("172.30.0.41", 80, Protocol::Tcp)].into(),
            endpoints: eps(&["10.180.0.1:80", "10.180.0.2:80", "10.180.0.3:80"]),
            ..Default::default()
        },
    )])
}

/// ns2/svc2: ClusterIP, NodePort and externalIP, no endpoints at all.
pub fn no_endpoints() -> DesiredState {
    state(vec![(
        name("ns2", "svc2", "", Protocol::Tcp),
        ServicePort {
            frontends: [fe("172.30.0.42", 80, Protocol::Tcp)].into(),
            external_frontends: [
                (fe(NODE, 30080, Protocol::Tcp), ext(NODE, false)),
                (fe("192.168.99.22", 80, Protocol::Tcp), ext(NODE, false)),
            ]
            .into(),
            ..Default::default()
        },
    )])
}

/// ns3/svc3: a NodePort and LoadBalancer with externalTrafficPolicy Local, one local endpoint
/// of two; ns3/svc3b: the same with none here (drops); ns3/svc3c: internalTrafficPolicy Local.
pub fn node_port_local() -> DesiredState {
    state(vec![
        (
            name("ns3", "svc3", "p80", Protocol::Tcp),
            ServicePort {
                frontends: [fe("172.30.0.43", 80, Protocol::Tcp)].into(),
                external_frontends: [
                    (fe(NODE, 30003, Protocol::Tcp), ext(NODE, false)),
                    (fe("1.2.3.4", 80, Protocol::Tcp), ext(NODE, true)),
                ]
                .into(),
                external_local: true,
                endpoints: eps(&["10.180.0.1:80", "10.180.0.2:80"]),
                local_endpoints: eps(&["10.180.0.2:80"]),
                ..Default::default()
            },
        ),
        (
            name("ns3", "svc3b", "p80", Protocol::Tcp),
            ServicePort {
                frontends: [fe("172.30.0.44", 80, Protocol::Tcp)].into(),
                external_frontends: [(fe(NODE, 30004, Protocol::Tcp), ext(NODE, false))].into(),
                external_local: true,
                endpoints: eps(&["10.180.0.5:80"]),
                ..Default::default()
            },
        ),
        (
            name("ns3", "svc3c", "p80", Protocol::Udp),
            ServicePort {
                frontends: [fe("172.30.0.45", 53, Protocol::Udp)].into(),
                internal_local: true,
                endpoints: eps(&["10.180.0.6:5353"]),
                ..Default::default()
            },
        ),
    ])
}

/// ns4/svc4: ClientIP affinity with a 10800 s timeout, a NodePort with policy Cluster.
pub fn affinity() -> DesiredState {
    state(vec![(
        name("ns4", "svc4", "p80", Protocol::Tcp),
        ServicePort {
            frontends: [fe("172.30.0.46", 80, Protocol::Tcp)].into(),
            external_frontends: [(fe(NODE, 30046, Protocol::Tcp), ext(NODE, false))].into(),
            endpoints: eps(&["10.180.0.4:80", "10.180.0.5:80"]),
            affinity_timeout_s: Some(10_800),
            ..Default::default()
        },
    )])
}

/// ns5/svc5: a LoadBalancer IP with loadBalancerSourceRanges, one of which holds the node.
pub fn lb_source_ranges() -> DesiredState {
    state(vec![(
        name("ns5", "svc5", "p80", Protocol::Tcp),
        ServicePort {
            frontends: [fe("172.30.0.47", 80, Protocol::Tcp)].into(),
            external_frontends: [
                (fe("5.6.7.8", 80, Protocol::Tcp), ext(NODE, true)),
                (fe(NODE, 30047, Protocol::Tcp), ext(NODE, false)),
            ]
            .into(),
            source_ranges: [(ip("203.0.113.0"), 25), (ip("192.168.0.0"), 16)].into(),
            endpoints: eps(&["10.180.0.7:80"]),
            ..Default::default()
        },
    )])
}

/// ns6/dns: a dual-stack UDP service and an IPv6-only SCTP one.
pub fn ipv6() -> DesiredState {
    state(vec![
        (
            name("ns6", "dns", "dns", Protocol::Udp),
            ServicePort {
                frontends: [
                    fe("172.30.0.53", 53, Protocol::Udp),
                    fe("fd00:30::53", 53, Protocol::Udp),
                ]
                .into(),
                external_frontends: [
                    (fe(NODE, 30053, Protocol::Udp), ext(NODE, false)),
                    (fe(NODE6, 30053, Protocol::Udp), ext(NODE6, false)),
                ]
                .into(),
                endpoints: eps(&["10.180.0.8:53", "[fd00:180::8]:53", "[fd00:180::9]:53"]),
                ..Default::default()
            },
        ),
        (
            name("ns6", "sig", "", Protocol::Sctp),
            ServicePort {
                frontends: [fe("fd00:30::54", 3868, Protocol::Sctp)].into(),
                endpoints: eps(&["[fd00:180::a]:3868"]),
                ..Default::default()
            },
        ),
    ])
}

/// A named desired state.
pub type Case = (&'static str, fn() -> DesiredState);

pub const CASES: &[Case] = &[
    ("cluster_ip_3_endpoints", cluster_ip_3_endpoints),
    ("no_endpoints", no_endpoints),
    ("node_port_local", node_port_local),
    ("affinity", affinity),
    ("lb_source_ranges", lb_source_ranges),
    ("ipv6", ipv6),
];

/// Both families' rules of one desired state, as `render` gives each, under a header line.
pub fn render_both(
    desired: &DesiredState,
    render: impl Fn(&DesiredState, IpFamily) -> String,
) -> String {
    let mut out = String::new();
    for family in [IpFamily::V4, IpFamily::V6] {
        out.push_str(&format!("# {family}: iptables-restore --noflush input\n"));
        out.push_str(&render(desired, family));
    }
    out
}

/// Compares [`render_both`] of every case in [`CASES`] with `<dir>/<case>.rules` (`dir`
/// relative to the crate), or writes the files when `LB_UPDATE_GOLDEN=1`.
pub fn check_golden(dir: &str, render: impl Fn(&DesiredState, IpFamily) -> String) {
    check_golden_files(dir, "rules", |desired| render_both(desired, &render));
}

/// Compares `render` of every case in [`CASES`] with `<dir>/<case>.<extension>` (`dir`
/// relative to the crate), or writes the files when `LB_UPDATE_GOLDEN=1`.
pub fn check_golden_files(dir: &str, extension: &str, render: impl Fn(&DesiredState) -> String) {
    let rendered: Vec<(&str, String)> = CASES
        .iter()
        .map(|(case, build)| (*case, render(&build())))
        .collect();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(dir);
    let update = std::env::var_os("LB_UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let mut mismatched = Vec::new();
    for (case, got) in &rendered {
        let path = dir.join(format!("{case}.{extension}"));
        if update {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, got).unwrap();
            eprintln!("wrote {}", path.display());
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; generate it with LB_UPDATE_GOLDEN=1 and review it",
                path.display()
            )
        });
        if *got != want {
            eprintln!(
                "--- {} (expected)\n{want}--- generated\n{got}",
                path.display()
            );
            mismatched.push(*case);
        }
    }
    assert!(
        mismatched.is_empty(),
        "generated text differs from the golden files for {mismatched:?} (texts above); if the \
         change is intended, regenerate with LB_UPDATE_GOLDEN=1 and review the diff"
    );
}
