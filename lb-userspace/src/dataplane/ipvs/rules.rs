//! The iptables rules IPVS mode needs beside IPVS itself (pure), as kube-proxy's IPVS mode
//! writes them (`pkg/proxy/ipvs/proxier.go`, `writeIptablesRules`), with plain rules per
//! frontend where kube-proxy matches ipsets, under `LBA-IPVS-` chains and the iptables
//! mode's masquerade mark. Applied with the iptables dataplane's `restore` machinery.
//!
//! nat:
//! - `LBA-IPVS-SERVICES` (from PREROUTING and OUTPUT) marks for masquerade: every external
//!   frontend (NodePort, externalIP, LoadBalancer IP) under externalTrafficPolicy Cluster,
//!   since the endpoint may be on another node and must answer through this one; and the
//!   node's own connections to a ClusterIP that picked the ClusterIP itself as their source
//!   (it is on the dummy interface; kube-proxy's rule for a proxy without a cluster CIDR).
//! - `LBA-IPVS-MARK-MASQ`: sets [`MASQ_MARK`].
//! - `LBA-IPVS-POSTROUTING` (from POSTROUTING): hairpin first (a connection from an
//!   endpoint to itself, after IPVS's DNAT, is masqueraded so the answer comes back through
//!   IPVS; kube-proxy's `KUBE-LOOP-BACK` set), then MASQUERADE of marked packets. IPVS sends
//!   the packets it forwards through LOCAL_OUT and POSTROUTING only with
//!   `net.ipv4.vs.conntrack=1`, which is why that sysctl is set.
//!
//! filter:
//! - `LBA-IPVS-FIREWALL` (from INPUT, new connections): loadBalancerSourceRanges. A
//!   LoadBalancer IP with ranges accepts them (RETURN) and drops the rest, before IPVS (on
//!   LOCAL_IN, after the filter table) sees the packet. The node's own connections never pass
//!   INPUT (IPVS takes them on LOCAL_OUT), so ranges do not restrict the node itself.

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::dataplane::iptables::rules::{
    cidr, masquerade_marked, proto, service_port_string, FamilyRules, JumpRule, Table,
    TableBuilder, MASQ_MARK,
};
use crate::model::{DesiredState, Endpoint, IpFamily, Protocol};

/// Prefix of every chain this mode owns.
pub const CHAIN_PREFIX: &str = "LBA-IPVS-";

pub const SERVICES: &str = "LBA-IPVS-SERVICES";
pub const MARK_MASQ: &str = "LBA-IPVS-MARK-MASQ";
pub const POSTROUTING: &str = "LBA-IPVS-POSTROUTING";
pub const FIREWALL: &str = "LBA-IPVS-FIREWALL";

/// The rules leading into ours from the built-in chains (kube-proxy's `iptablesJumpChain`,
/// less the forwarding and health-check chains).
pub const JUMP_RULES: &[JumpRule] = &[
    JumpRule {
        table: Table::Filter,
        chain: "INPUT",
        new_only: true,
        comment: "lb-agent ipvs load balancer firewall",
        target: FIREWALL,
    },
    JumpRule {
        table: Table::Nat,
        chain: "PREROUTING",
        new_only: false,
        comment: "lb-agent ipvs service portals",
        target: SERVICES,
    },
    JumpRule {
        table: Table::Nat,
        chain: "OUTPUT",
        new_only: false,
        comment: "lb-agent ipvs service portals",
        target: SERVICES,
    },
    JumpRule {
        table: Table::Nat,
        chain: "POSTROUTING",
        new_only: false,
        comment: "lb-agent ipvs postrouting rules",
        target: POSTROUTING,
    },
];

/// Whether a chain is this mode's.
pub fn owns_chain(name: &str) -> bool {
    name.starts_with(CHAIN_PREFIX)
}

/// `family`'s rules for `desired`. Deterministic: services in the desired state's order.
pub fn generate(desired: &DesiredState, family: IpFamily) -> FamilyRules {
    let mut filter = TableBuilder::default();
    let mut nat = TableBuilder::default();
    filter.chain(FIREWALL);
    for chain in [SERVICES, MARK_MASQ, POSTROUTING] {
        nat.chain(chain);
    }
    nat.rule(MARK_MASQ, None, &["-j", "MARK", "--or-mark", MASQ_MARK]);

    let of_family = |a: &IpAddr| IpFamily::of(*a) == family;
    // Hairpin: every endpoint reached through a virtual service, once per protocol.
    let mut hairpins: BTreeSet<(Endpoint, Protocol)> = BTreeSet::new();
    for (name, sp) in &desired.services {
        let spn = service_port_string(name);
        let p = proto(name.protocol);
        for fe in sp.frontends.iter().filter(|f| of_family(&f.addr)) {
            let (addr, port) = (fe.addr.to_string(), fe.port.to_string());
            let comment = format!("{spn} cluster IP, from the node");
            nat.rule(
                SERVICES,
                Some(&comment),
                &[
                    "-m", p, "-p", p, "-s", &addr, "--dport", &port, "-j", MARK_MASQ,
                ],
            );
        }
        let ranges: Vec<&(IpAddr, u8)> = sp
            .source_ranges
            .iter()
            .filter(|(a, _)| of_family(a))
            .collect();
        for (fe, x) in sp
            .external_frontends
            .iter()
            .filter(|(f, _)| of_family(&f.addr))
        {
            let (addr, port) = (fe.addr.to_string(), fe.port.to_string());
            let dest = ["-m", p, "-p", p, "-d", &addr, "--dport", &port];
            if !sp.external_local {
                let comment = format!("{spn} external destination, masqueraded");
                nat.rule(
                    SERVICES,
                    Some(&comment),
                    &[&dest[..], &["-j", MARK_MASQ]].concat(),
                );
            }
            if x.load_balancer && !ranges.is_empty() {
                let comment = format!("{spn} loadbalancer IP source ranges");
                for &&(net, len) in &ranges {
                    let source = cidr(net, len);
                    filter.rule(
                        FIREWALL,
                        Some(&comment),
                        &[&["-s", source.as_str()][..], &dest[..], &["-j", "RETURN"]].concat(),
                    );
                }
                let comment = format!("{spn} loadbalancer IP, other sources dropped");
                filter.rule(
                    FIREWALL,
                    Some(&comment),
                    &[&dest[..], &["-j", "DROP"]].concat(),
                );
            }
        }
        for ep in sp.endpoints.iter().chain(&sp.local_endpoints) {
            if of_family(&ep.addr) {
                hairpins.insert((*ep, name.protocol));
            }
        }
    }
    for (ep, protocol) in hairpins {
        let p = proto(protocol);
        let (addr, port) = (ep.addr.to_string(), ep.port.to_string());
        nat.rule(
            POSTROUTING,
            Some("lb-agent ipvs hairpin"),
            &[
                "-m",
                p,
                "-p",
                p,
                "-s",
                &addr,
                "-d",
                &addr,
                "--dport",
                &port,
                "-j",
                "MASQUERADE",
            ],
        );
    }
    masquerade_marked(&mut nat, POSTROUTING);
    FamilyRules {
        filter: filter.finish(),
        nat: nat.finish(),
    }
}
