//! The pure generator of the rules that steer service traffic to the portals: kube-proxy's
//! userspace layout (`pkg/proxy/userspace/proxier.go`, `iptablesInit` and the
//! `iptables*PortalArgs` functions) under this project's `LBA-` prefix.
//!
//! nat, one rule per frontend of a portal with endpoints:
//! - `LBA-PORTALS-CONTAINER` (from PREROUTING: other hosts and pods) and `LBA-PORTALS-HOST`
//!   (from OUTPUT: the node's own processes): ClusterIPs, externalIPs and LoadBalancer IPs,
//!   `-j REDIRECT --to-ports <portal port>`.
//! - `LBA-NODEPORT-CONTAINER` and `LBA-NODEPORT-HOST`, jumped to after the portal chains as
//!   kube-proxy orders them: NodePorts, one rule per node address (the model lists them)
//!   where kube-proxy matched `--dst-type LOCAL`.
//!
//! REDIRECT rather than kube-proxy's DNAT to the node's address for OUTPUT: it sends the
//! node's own traffic to the loopback address, and the UDP relay answers from the address a
//! datagram arrived on (`pktinfo.rs`), which is what made kube-proxy give up on REDIRECT there
//! ("the response comes from the eth0 IP, which makes DNS unhappy"). PREROUTING's REDIRECT
//! goes to the incoming interface's primary address, which also serves ClusterIPs that no
//! interface holds.
//!
//! LoadBalancer IPs with loadBalancerSourceRanges are redirected for those sources only.
//!
//! filter, `LBA-PORTALS-FILTER` (from INPUT, FORWARD and OUTPUT, new connections only): the
//! frontends of portals without endpoints are not redirected; their traffic is REJECTed
//! (ICMP port unreachable: TCP clients see ECONNREFUSED, UDP ones an error on their
//! connected socket), as the other modes do, or DROPped when the service port has endpoints
//! on other nodes but policy Local wants this node's (as the iptables mode does). Also the
//! DROP of what reaches a LoadBalancer IP from outside its source ranges (not redirected).

use crate::dataplane::iptables::rules::{
    cidr, jump, proto, service_port_string, FamilyRules, JumpRule, Table, TableBuilder,
};
use crate::model::IpFamily;

use super::portal::{Kind, PortalKey, PortalSpec};

pub const PORTALS_CONTAINER: &str = "LBA-PORTALS-CONTAINER";
pub const PORTALS_HOST: &str = "LBA-PORTALS-HOST";
pub const NODEPORT_CONTAINER: &str = "LBA-NODEPORT-CONTAINER";
pub const NODEPORT_HOST: &str = "LBA-NODEPORT-HOST";
pub const PORTALS_FILTER: &str = "LBA-PORTALS-FILTER";

/// Every chain this dataplane owns. Fixed names (no per-service chains), so a full sync
/// rewrites exactly these and never needs to look for strays.
pub const CHAINS: [(Table, &str); 5] = [
    (Table::Filter, PORTALS_FILTER),
    (Table::Nat, PORTALS_CONTAINER),
    (Table::Nat, PORTALS_HOST),
    (Table::Nat, NODEPORT_CONTAINER),
    (Table::Nat, NODEPORT_HOST),
];

/// The rules leading into ours, in the order they end up at the top of their chains: the
/// portal chains before the NodePort ones (kube-proxy: "this must be before the NodePort
/// rules").
pub const JUMP_RULES: &[JumpRule] = &[
    jump(
        Table::Nat,
        "PREROUTING",
        false,
        "lb-agent userspace portals",
        PORTALS_CONTAINER,
    ),
    jump(
        Table::Nat,
        "PREROUTING",
        false,
        "lb-agent userspace nodeports",
        NODEPORT_CONTAINER,
    ),
    jump(
        Table::Nat,
        "OUTPUT",
        false,
        "lb-agent userspace portals",
        PORTALS_HOST,
    ),
    jump(
        Table::Nat,
        "OUTPUT",
        false,
        "lb-agent userspace nodeports",
        NODEPORT_HOST,
    ),
    jump(
        Table::Filter,
        "INPUT",
        true,
        "lb-agent userspace portals without endpoints",
        PORTALS_FILTER,
    ),
    jump(
        Table::Filter,
        "FORWARD",
        true,
        "lb-agent userspace portals without endpoints",
        PORTALS_FILTER,
    ),
    jump(
        Table::Filter,
        "OUTPUT",
        true,
        "lb-agent userspace portals without endpoints",
        PORTALS_FILTER,
    ),
];

/// `family`'s rules for `portals`, each listening on `port_of(key)`. Deterministic: portals
/// in key order, frontends in the order the portal lists them.
pub fn generate<'a>(
    family: IpFamily,
    portals: impl IntoIterator<Item = (&'a PortalKey, &'a PortalSpec)>,
    port_of: impl Fn(&PortalKey) -> u16,
) -> FamilyRules {
    let mut filter = TableBuilder::default();
    let mut nat = TableBuilder::default();
    for (table, chain) in CHAINS {
        match table {
            Table::Filter => filter.chain(chain),
            Table::Nat => nat.chain(chain),
        }
    }
    for (key, spec) in portals {
        if key.family != family {
            continue;
        }
        let spn = service_port_string(&key.service);
        let p = proto(key.protocol());
        let to_port = port_of(key).to_string();
        for (fe, kind) in &spec.frontends {
            let (addr, port) = (fe.addr.to_string(), fe.port.to_string());
            let matches = ["-m", p, "-p", p, "-d", &addr, "--dport", &port];
            if spec.endpoints.is_empty() {
                let (verdict, comment) = if spec.endpoints_elsewhere {
                    ("DROP", format!("{spn} has no local endpoints"))
                } else {
                    ("REJECT", format!("{spn} has no endpoints"))
                };
                filter.rule(
                    PORTALS_FILTER,
                    Some(&comment),
                    &[&matches[..], &["-j", verdict]].concat(),
                );
                continue;
            }
            let (container, host_chain) = match kind {
                Kind::Portal | Kind::LoadBalancer => (PORTALS_CONTAINER, PORTALS_HOST),
                Kind::NodePort => (NODEPORT_CONTAINER, NODEPORT_HOST),
            };
            let redirect = ["-j", "REDIRECT", "--to-ports", &to_port];
            let ranges: Vec<String> = match kind {
                Kind::LoadBalancer => spec
                    .source_ranges
                    .iter()
                    .map(|&(a, l)| cidr(a, l))
                    .collect(),
                _ => Vec::new(),
            };
            if ranges.is_empty() {
                let rule = [&matches[..], &redirect].concat();
                nat.rule(container, Some(&spn), &rule);
                nat.rule(host_chain, Some(&spn), &rule);
                continue;
            }
            // Only the ranges are redirected; the rest keeps its destination, and the filter
            // rule drops it (the iptables mode's LBA-FW- and LBA-PROXY-FIREWALL).
            for range in &ranges {
                let rule = [&["-s", range.as_str()], &matches[..], &redirect].concat();
                nat.rule(container, Some(&spn), &rule);
                nat.rule(host_chain, Some(&spn), &rule);
            }
            let comment = format!("{spn} loadbalancer IP, from outside its source ranges");
            filter.rule(
                PORTALS_FILTER,
                Some(&comment),
                &[&matches[..], &["-j", "DROP"]].concat(),
            );
        }
    }
    FamilyRules {
        filter: filter.finish(),
        nat: nat.finish(),
    }
}
