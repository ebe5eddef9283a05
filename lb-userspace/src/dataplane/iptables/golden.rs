//! Golden-file tests of the generator, and packet traces through what it generates.
//!
//! The expected rule sets live in `testdata/<case>.rules` (the cases: `dataplane/fixtures.rs`).
//! Regenerate them with `LB_UPDATE_GOLDEN=1 cargo test -p lb-userspace iptables` and review
//! the diff in git.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::rules::{generate, FamilyRules};
use super::tracer::{Origin, Outcome, Packet, Tracer, Verdict};
use crate::dataplane::fixtures::{
    self, affinity, check_golden, cluster_ip_3_endpoints, ip, ipv6, lb_source_ranges, no_endpoints,
    node_port_local, CASES, NODE, NODE6,
};
use crate::model::{DesiredState, IpFamily, Protocol};

fn render_both(desired: &DesiredState) -> String {
    fixtures::render_both(desired, |d, family| generate(d, family).render())
}

#[test]
fn generated_rules_match_golden_files() {
    check_golden("src/dataplane/iptables/testdata", |d, family| {
        generate(d, family).render()
    });
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
