//! Golden-file tests of the generator, and packet traces through what it generates.
//!
//! The expected rule sets live in `testdata/<case>.rules`. A generator change that alters
//! them fails here with both texts; after checking the difference is intended, regenerate
//! them explicitly with `LB_UPDATE_GOLDEN=1 cargo test -p lb-userspace iptables` and review
//! the diff in git. Nothing is ever written without that variable.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use super::rules::{generate, FamilyRules};
use super::tracer::{Origin, Outcome, Packet, Tracer, Verdict};
use crate::model::{
    DesiredState, Endpoint, External, Frontend, IpFamily, Protocol, ServicePort, ServicePortName,
};

const NODE: &str = "192.168.0.2";
const NODE6: &str = "fd00:192::2";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn name(ns: &str, svc: &str, port: &str, protocol: Protocol) -> ServicePortName {
    ServicePortName {
        namespace: ns.into(),
        name: svc.into(),
        port: port.into(),
        protocol,
    }
}

fn fe(addr: &str, port: u16, protocol: Protocol) -> Frontend {
    Frontend {
        addr: ip(addr),
        port,
        protocol,
    }
}

fn eps(list: &[&str]) -> BTreeSet<Endpoint> {
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

fn ext(snat: &str, load_balancer: bool) -> External {
    External {
        snat_addr: ip(snat),
        load_balancer,
    }
}

fn state(services: Vec<(ServicePortName, ServicePort)>) -> DesiredState {
    DesiredState {
        services: services.into_iter().collect(),
        node_addrs: [ip(NODE), ip(NODE6)].into(),
        health_checks: BTreeMap::new(),
    }
}

/// ns1/svc1:p80: a ClusterIP with three endpoints.
fn cluster_ip_3_endpoints() -> DesiredState {
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
fn no_endpoints() -> DesiredState {
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
fn node_port_local() -> DesiredState {
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
fn affinity() -> DesiredState {
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
fn lb_source_ranges() -> DesiredState {
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
fn ipv6() -> DesiredState {
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
pub(crate) type Case = (&'static str, fn() -> DesiredState);

pub(crate) const CASES: &[Case] = &[
    ("cluster_ip_3_endpoints", cluster_ip_3_endpoints),
    ("no_endpoints", no_endpoints),
    ("node_port_local", node_port_local),
    ("affinity", affinity),
    ("lb_source_ranges", lb_source_ranges),
    ("ipv6", ipv6),
];

fn render_both(desired: &DesiredState) -> String {
    let mut out = String::new();
    for family in [IpFamily::V4, IpFamily::V6] {
        out.push_str(&format!("# {family}: iptables-restore --noflush input\n"));
        out.push_str(&generate(desired, family).render());
    }
    out
}

#[test]
fn generated_rules_match_golden_files() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/dataplane/iptables/testdata");
    let update = std::env::var_os("LB_UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let mut mismatched = Vec::new();
    for (case, build) in CASES {
        let got = render_both(&build());
        let path = dir.join(format!("{case}.rules"));
        if update {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &got).unwrap();
            eprintln!("wrote {}", path.display());
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; generate it with LB_UPDATE_GOLDEN=1 and review it",
                path.display()
            )
        });
        if got != want {
            eprintln!(
                "--- {} (expected)\n{want}--- generated\n{got}",
                path.display()
            );
            mismatched.push(*case);
        }
    }
    assert!(
        mismatched.is_empty(),
        "generated rules differ from the golden files for {mismatched:?} (texts above); if the \
         change is intended, regenerate with LB_UPDATE_GOLDEN=1 and review the diff"
    );
}

#[test]
fn generation_is_deterministic_and_family_separated() {
    for (case, build) in CASES {
        let d = build();
        assert_eq!(render_both(&d), render_both(&d.clone()), "{case}");
        let v4 = generate(&d, IpFamily::V4).render();
        let v6 = generate(&d, IpFamily::V6).render();
        assert!(
            !v4.contains("fd00:"),
            "{case}: IPv6 address in the IPv4 rules"
        );
        assert!(
            !v6.contains("172.30.") && !v6.contains("10.180."),
            "{case}: IPv4 in IPv6 rules"
        );
    }
}

// ------------------------------------------------------------------------------------------
// Traces.

fn tracer(desired: &DesiredState, family: IpFamily) -> Tracer {
    let rules: FamilyRules = generate(desired, family);
    let nodes: Vec<IpAddr> = desired
        .node_addrs
        .iter()
        .copied()
        .filter(|a| IpFamily::of(*a) == family)
        .collect();
    Tracer::new(&rules, &nodes)
}

fn pkt(src: &str, dst: &str, proto: Protocol, dport: u16) -> Packet {
    Packet {
        src: ip(src),
        dst: ip(dst),
        proto,
        dport,
    }
}

/// (verdict, DNAT target, masquerade) of every branch, without the affinity bookkeeping.
type Summary = BTreeSet<(Verdict, Option<String>, bool)>;

fn summary(outcomes: &BTreeSet<Outcome>) -> Summary {
    outcomes
        .iter()
        .map(|o| (o.verdict, o.dnat.map(|d| d.to_string()), o.masquerade))
        .collect()
}

fn accepted(to: &[&str], masquerade: bool) -> Summary {
    to.iter()
        .map(|t| (Verdict::Accept, Some(t.to_string()), masquerade))
        .collect()
}

fn only(verdict: Verdict) -> Summary {
    [(verdict, None, false)].into()
}

const CLIENT: &str = "203.0.113.9";
const OUTSIDER: &str = "198.51.100.1";
const POD: &str = "10.180.9.9";

/// What a packet of a case, in a family, from an origin, should reach.
type Trace = (
    &'static str,
    fn() -> DesiredState,
    IpFamily,
    Origin,
    Packet,
    Summary,
);

#[test]
fn traces() {
    use Protocol::{Sctp, Tcp, Udp};
    let untouched: Summary = [(Verdict::Accept, None, false)].into();
    #[rustfmt::skip]
    let table: Vec<Trace> = vec![
        ("ClusterIP reaches every endpoint", cluster_ip_3_endpoints, IpFamily::V4, Origin::Remote,
         pkt(POD, "172.30.0.41", Tcp, 80), accepted(&["10.180.0.1:80", "10.180.0.2:80", "10.180.0.3:80"], false)),
        ("ClusterIP from the node itself", cluster_ip_3_endpoints, IpFamily::V4, Origin::Local,
         pkt(NODE, "172.30.0.41", Tcp, 80), accepted(&["10.180.0.1:80", "10.180.0.2:80", "10.180.0.3:80"], false)),
        ("another port of the ClusterIP is not ours", cluster_ip_3_endpoints, IpFamily::V4, Origin::Remote,
         pkt(POD, "172.30.0.41", Tcp, 81), untouched.clone()),
        ("another protocol on the ClusterIP's port is not ours", cluster_ip_3_endpoints, IpFamily::V4, Origin::Remote,
         pkt(POD, "172.30.0.41", Udp, 80), untouched.clone()),
        ("hairpin: an endpoint reaching itself is masqueraded", cluster_ip_3_endpoints, IpFamily::V4, Origin::Remote,
         pkt("10.180.0.2", "172.30.0.41", Tcp, 80),
         [(Verdict::Accept, Some("10.180.0.1:80".into()), false), (Verdict::Accept, Some("10.180.0.2:80".into()), true),
          (Verdict::Accept, Some("10.180.0.3:80".into()), false)].into()),
        ("no endpoints: ClusterIP rejected", no_endpoints, IpFamily::V4, Origin::Remote,
         pkt(POD, "172.30.0.42", Tcp, 80), only(Verdict::Reject)),
        ("no endpoints: ClusterIP from the node rejected", no_endpoints, IpFamily::V4, Origin::Local,
         pkt(NODE, "172.30.0.42", Tcp, 80), only(Verdict::Reject)),
        ("no endpoints: NodePort rejected", no_endpoints, IpFamily::V4, Origin::Remote,
         pkt(CLIENT, NODE, Tcp, 30080), only(Verdict::Reject)),
        ("no endpoints: externalIP rejected", no_endpoints, IpFamily::V4, Origin::Remote,
         pkt(CLIENT, "192.168.99.22", Tcp, 80), only(Verdict::Reject)),
        ("Local: NodePort from outside, local endpoint only, client kept", node_port_local, IpFamily::V4, Origin::Remote,
         pkt(CLIENT, NODE, Tcp, 30003), accepted(&["10.180.0.2:80"], false)),
        ("Local: LoadBalancer IP from outside, the same", node_port_local, IpFamily::V4, Origin::Remote,
         pkt(CLIENT, "1.2.3.4", Tcp, 80), accepted(&["10.180.0.2:80"], false)),
        ("Local: the node's own connection goes to every endpoint, masqueraded", node_port_local, IpFamily::V4, Origin::Local,
         pkt(NODE, NODE, Tcp, 30003), accepted(&["10.180.0.1:80", "10.180.0.2:80"], true)),
        ("Local: its ClusterIP uses every endpoint", node_port_local, IpFamily::V4, Origin::Remote,
         pkt(POD, "172.30.0.43", Tcp, 80), accepted(&["10.180.0.1:80", "10.180.0.2:80"], false)),
        ("Local without local endpoints: NodePort dropped", node_port_local, IpFamily::V4, Origin::Remote,
         pkt(CLIENT, NODE, Tcp, 30004), only(Verdict::Drop)),
        ("Local without local endpoints: ClusterIP still served", node_port_local, IpFamily::V4, Origin::Remote,
         pkt(POD, "172.30.0.44", Tcp, 80), accepted(&["10.180.0.5:80"], false)),
        ("internalTrafficPolicy Local without local endpoints: dropped", node_port_local, IpFamily::V4, Origin::Remote,
         pkt(POD, "172.30.0.45", Udp, 53), only(Verdict::Drop)),
        ("Cluster: NodePort from outside is masqueraded", affinity, IpFamily::V4, Origin::Remote,
         pkt(CLIENT, NODE, Tcp, 30046), accepted(&["10.180.0.4:80", "10.180.0.5:80"], true)),
        ("source ranges: a client inside reaches the endpoint", lb_source_ranges, IpFamily::V4, Origin::Remote,
         pkt(CLIENT, "5.6.7.8", Tcp, 80), accepted(&["10.180.0.7:80"], true)),
        ("source ranges: a client outside is dropped", lb_source_ranges, IpFamily::V4, Origin::Remote,
         pkt(OUTSIDER, "5.6.7.8", Tcp, 80), only(Verdict::Drop)),
        ("source ranges: the node itself (its range is listed) gets through", lb_source_ranges, IpFamily::V4, Origin::Local,
         pkt(NODE, "5.6.7.8", Tcp, 80), accepted(&["10.180.0.7:80"], true)),
        ("source ranges do not restrict the NodePort", lb_source_ranges, IpFamily::V4, Origin::Remote,
         pkt(OUTSIDER, NODE, Tcp, 30047), accepted(&["10.180.0.7:80"], true)),
        ("IPv6 ClusterIP reaches the IPv6 endpoints only", ipv6, IpFamily::V6, Origin::Remote,
         pkt("fd00:180::99", "fd00:30::53", Udp, 53), accepted(&["[fd00:180::8]:53", "[fd00:180::9]:53"], false)),
        ("IPv6 NodePort, masqueraded", ipv6, IpFamily::V6, Origin::Remote,
         pkt("2001:db8::1", NODE6, Udp, 30053), accepted(&["[fd00:180::8]:53", "[fd00:180::9]:53"], true)),
        ("the dual-stack service's IPv4 side", ipv6, IpFamily::V4, Origin::Remote,
         pkt(POD, "172.30.0.53", Udp, 53), accepted(&["10.180.0.8:53"], false)),
        ("IPv6 SCTP", ipv6, IpFamily::V6, Origin::Remote,
         pkt("fd00:180::99", "fd00:30::54", Sctp, 3868), accepted(&["[fd00:180::a]:3868"], false)),
    ];
    let mut failures = Vec::new();
    for (what, build, family, origin, packet, want) in table {
        let got = summary(&tracer(&build(), family).trace(origin, &packet));
        if got != want {
            failures.push(format!(
                "{what}: {packet:?}\n  want {want:?}\n  got  {got:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn affinity_checks_and_records_every_endpoint() {
    let d = affinity();
    let outcomes =
        tracer(&d, IpFamily::V4).trace(Origin::Remote, &pkt(POD, "172.30.0.46", Protocol::Tcp, 80));
    // Two ways to each endpoint: the affinity check and the random spread.
    assert_eq!(outcomes.len(), 4, "{outcomes:#?}");
    let mut checked = BTreeSet::new();
    for o in &outcomes {
        assert_eq!(
            o.recent_set.len(),
            1,
            "every DNAT records the client: {o:?}"
        );
        checked.extend(o.recent_checked.iter().cloned());
        // The list a connection is recorded in is the one checked for that endpoint.
        if let Some(list) = o.recent_checked.iter().next() {
            assert!(o.recent_set.contains(list), "{o:?}");
        }
    }
    assert_eq!(checked.len(), 2, "both endpoints' lists are checked");
    let text = generate(&d, IpFamily::V4).render();
    assert_eq!(
        text.matches("--rcheck --seconds 10800 --reap").count(),
        2,
        "{text}"
    );
}

#[test]
fn probabilities_spread_evenly() {
    // 1/n, 1/(n-1), ..., then a rule that always matches: each endpoint gets 1/n.
    let rules = generate(&cluster_ip_3_endpoints(), IpFamily::V4).render();
    let probs: Vec<f64> = rules
        .lines()
        .filter_map(|l| l.split("--probability ").nth(1))
        .map(|s| s.split(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(probs.len(), 2, "{rules}");
    let mut left = 1.0;
    for p in probs.iter().chain([&1.0]) {
        assert!((left * p - 1.0 / 3.0).abs() < 1e-9, "{probs:?}");
        left *= 1.0 - p;
    }
}
