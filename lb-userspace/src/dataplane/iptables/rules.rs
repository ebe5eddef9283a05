//! The pure generator: a desired state in, the `iptables-restore` rules of one address family
//! out, in the layout kube-proxy's iptables mode uses (`pkg/proxy/iptables/proxier.go`,
//! `syncProxyRules`), under this project's own chain names (`LBA-` where kube-proxy has
//! `KUBE-`) and masquerade mark, so both can share a node's tables without touching each
//! other's rules.
//!
//! nat:
//! - `LBA-SERVICES` (jumped to from PREROUTING and OUTPUT): one rule per ClusterIP,
//!   externalIP and LoadBalancer IP of a service port with endpoints, and last a jump to
//!   `LBA-NODEPORTS` for each node address.
//! - `LBA-NODEPORTS`: one rule per NodePort, to the service's `LBA-EXT-` chain.
//! - `LBA-SVC-<hash>`: every endpoint (policy Cluster), `LBA-SVL-<hash>`: this node's
//!   endpoints (policy Local). Affinity `recent --rcheck` rules first, then the random spread,
//!   with probabilities 1/n, 1/(n-1), ..., 1 printed as kube-proxy does (`%0.10f`).
//! - `LBA-EXT-<hash>`: external frontends; marks for masquerade under policy Cluster, keeps
//!   the client's address under Local (but masquerades and uses every endpoint for the
//!   node's own traffic, `--src-type LOCAL`).
//! - `LBA-FW-<hash>`: LoadBalancer IPs with loadBalancerSourceRanges: only the ranges go on
//!   to `LBA-EXT-`, the rest falls through undeNATed to the filter table's DROP.
//! - `LBA-SEP-<hash>`: one per endpoint: hairpin masquerade, the `recent --set` of affinity,
//!   the DNAT.
//! - `LBA-MARK-MASQ` and `LBA-POSTROUTING` (from POSTROUTING): the mark [`MASQ_MARK`] and the
//!   MASQUERADE of marked packets.
//!
//! filter (only for traffic not DNATed, since the rules match service addresses):
//! - `LBA-SERVICES` (FORWARD and OUTPUT, new connections): ClusterIPs without endpoints
//!   (REJECT) or, under internalTrafficPolicy Local, without local ones (DROP).
//! - `LBA-EXTERNAL-SERVICES` (INPUT and FORWARD, new connections): the same for the external
//!   frontends.
//! - `LBA-PROXY-FIREWALL` (INPUT, FORWARD, OUTPUT, new connections): DROP what
//!   `LBA-FW-` let through undeNATed.
//!
//! What kube-proxy has and this does not: the "local traffic detector" (a cluster CIDR the
//! model does not know), so ClusterIP traffic from outside the cluster is not masqueraded and
//! pod traffic to Local-policy external frontends is not sent to every endpoint; the filter
//! `KUBE-FORWARD` and `KUBE-FIREWALL` (route_localnet) chains, and health-check port ACCEPTs
//! in `KUBE-NODEPORTS` of filter.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use crate::model::{DesiredState, Endpoint, IpFamily, Protocol, ServicePort, ServicePortName};

/// The mark bit that asks `LBA-POSTROUTING` to masquerade. kube-proxy uses 0x4000 (bit 14)
/// and the kubelet's `KUBE-MARK-DROP` used 0x8000 (bit 15); cilium's magic marks sit in
/// 0x0f00 and Calico's in the upper 16 bits by default. Bit 13 is none of theirs, so a node
/// running kube-proxy next to this (during a migration) keeps the two masquerade decisions
/// apart: clearing our bit in `LBA-POSTROUTING` never clears kube-proxy's.
pub const MASQ_MARK: &str = "0x2000";

/// Prefix of every chain this dataplane owns.
pub const CHAIN_PREFIX: &str = "LBA-";

pub const SERVICES: &str = "LBA-SERVICES";
pub const EXTERNAL_SERVICES: &str = "LBA-EXTERNAL-SERVICES";
pub const NODEPORTS: &str = "LBA-NODEPORTS";
pub const PROXY_FIREWALL: &str = "LBA-PROXY-FIREWALL";
pub const MARK_MASQ: &str = "LBA-MARK-MASQ";
pub const POSTROUTING: &str = "LBA-POSTROUTING";

/// The two tables this dataplane writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Filter,
    Nat,
}

impl Table {
    pub const ALL: [Table; 2] = [Table::Filter, Table::Nat];

    pub fn as_str(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Nat => "nat",
        }
    }
}

/// One chain: its name and its rules, each a whole `-A <chain> ...` line as
/// `iptables-restore` reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub name: String,
    pub rules: Vec<String>,
}

/// Everything this dataplane puts into one family's tables, chains in a fixed order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FamilyRules {
    pub filter: Vec<Chain>,
    pub nat: Vec<Chain>,
}

impl FamilyRules {
    pub fn table(&self, table: Table) -> &[Chain] {
        match table {
            Table::Filter => &self.filter,
            Table::Nat => &self.nat,
        }
    }

    /// The whole rule set as `iptables-restore --noflush` input: every chain declared (so
    /// flushed) and written.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for table in Table::ALL {
            let chains = self.table(table);
            writeln!(out, "*{}", table.as_str()).unwrap();
            for chain in chains {
                writeln!(out, ":{} - [0:0]", chain.name).unwrap();
            }
            for chain in chains {
                for rule in &chain.rules {
                    writeln!(out, "{rule}").unwrap();
                }
            }
            out.push_str("COMMIT\n");
        }
        out
    }
}

/// A rule in a built-in chain that leads into ours. These are not part of the restore input
/// (that would flush the built-in chains, and other software's rules with them); they are
/// checked with `iptables -C` and inserted with `-I` at every full sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JumpRule {
    pub table: Table,
    /// The built-in chain.
    pub chain: &'static str,
    /// Only for packets that open a connection (`-m conntrack --ctstate NEW`): the filter
    /// table's jumps, as kube-proxy's.
    pub new_only: bool,
    pub comment: &'static str,
    /// Our chain it jumps to.
    pub target: &'static str,
}

pub(crate) const fn jump(
    table: Table,
    chain: &'static str,
    new_only: bool,
    comment: &'static str,
    target: &'static str,
) -> JumpRule {
    JumpRule {
        table,
        chain,
        new_only,
        comment,
        target,
    }
}

impl JumpRule {
    /// The rule's arguments after the chain, one word each.
    pub fn args(&self) -> Vec<&'static str> {
        let mut args = Vec::with_capacity(10);
        if self.new_only {
            args.extend(["-m", "conntrack", "--ctstate", "NEW"]);
        }
        args.extend([
            "-m",
            "comment",
            "--comment",
            self.comment,
            "-j",
            self.target,
        ]);
        args
    }

    /// The `iptables` arguments that apply `op` (`-C` check, `-D` delete, `-I` insert at
    /// the top) to this rule.
    pub fn command(&self, op: &'static str) -> Vec<&'static str> {
        let mut command = vec!["-w", "-t", self.table.as_str(), op, self.chain];
        if op == "-I" {
            command.push("1");
        }
        command.extend(self.args());
        command
    }

    /// The rule as an `iptables-restore` line (for the tracer and logs).
    pub fn line(&self) -> String {
        let words: Vec<String> = self.args().iter().map(|w| quote(w)).collect();
        format!("-A {} {}", self.chain, words.join(" "))
    }
}

/// The jump rules, in the order they are inserted: kube-proxy's `iptablesJumpChains`, less
/// the health-check and forwarding chains it has and this does not.
pub const JUMP_RULES: &[JumpRule] = &[
    jump(
        Table::Filter,
        "INPUT",
        true,
        "lb-agent load balancer firewall",
        PROXY_FIREWALL,
    ),
    jump(
        Table::Filter,
        "INPUT",
        true,
        "lb-agent externally-visible service portals",
        EXTERNAL_SERVICES,
    ),
    jump(
        Table::Filter,
        "FORWARD",
        true,
        "lb-agent load balancer firewall",
        PROXY_FIREWALL,
    ),
    jump(
        Table::Filter,
        "FORWARD",
        true,
        "lb-agent service portals",
        SERVICES,
    ),
    jump(
        Table::Filter,
        "FORWARD",
        true,
        "lb-agent externally-visible service portals",
        EXTERNAL_SERVICES,
    ),
    jump(
        Table::Filter,
        "OUTPUT",
        true,
        "lb-agent load balancer firewall",
        PROXY_FIREWALL,
    ),
    jump(
        Table::Filter,
        "OUTPUT",
        true,
        "lb-agent service portals",
        SERVICES,
    ),
    jump(
        Table::Nat,
        "PREROUTING",
        false,
        "lb-agent service portals",
        SERVICES,
    ),
    jump(
        Table::Nat,
        "OUTPUT",
        false,
        "lb-agent service portals",
        SERVICES,
    ),
    jump(
        Table::Nat,
        "POSTROUTING",
        false,
        "lb-agent postrouting rules",
        POSTROUTING,
    ),
];

/// kube-proxy's `ServicePortName.String()`: `namespace/name`, then `:port` for a named port.
pub fn service_port_string(name: &ServicePortName) -> String {
    if name.port.is_empty() {
        format!("{}/{}", name.namespace, name.name)
    } else {
        format!("{}/{}:{}", name.namespace, name.name, name.port)
    }
}

pub(crate) fn proto(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// kube-proxy's chain-name hash: the first 16 characters of the base32 (RFC 4648, with the
/// standard alphabet) encoding of the SHA-256 of `input`. Chain names must stay within 28
/// characters; `LBA-SVC-` plus 16 is 24.
fn hash16(input: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = ring::digest::digest(&ring::digest::SHA256, input.as_bytes());
    // 16 characters take 80 bits: the first 10 bytes.
    let mut out = String::with_capacity(16);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &byte in &digest.as_ref()[..10] {
        acc = (acc << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    out
}

/// The per-service-port chains: `LBA-SVC-`, `LBA-SVL-`, `LBA-EXT-`, `LBA-FW-` with one hash,
/// as kube-proxy's `servicePortPolicyClusterChain` and siblings.
fn service_chain(kind: &str, spn: &str, protocol: Protocol) -> String {
    format!(
        "LBA-{kind}-{}",
        hash16(&format!("{spn}{}", proto(protocol)))
    )
}

/// `LBA-SEP-`: kube-proxy's `servicePortEndpointChainName`, the hash over the service port,
/// protocol and endpoint (`ip:port`, `[ip6]:port`).
fn endpoint_chain(spn: &str, protocol: Protocol, ep: &Endpoint) -> String {
    let ep = SocketAddr::new(ep.addr, ep.port);
    format!(
        "LBA-SEP-{}",
        hash16(&format!("{spn}{}{ep}", proto(protocol)))
    )
}

/// A word of a rule, quoted as kube-proxy quotes comments when it holds a space.
fn quote(word: &str) -> String {
    if word.contains(' ') {
        format!("\"{word}\"")
    } else {
        word.to_string()
    }
}

/// kube-proxy's `probability`: `1/n` with ten decimals.
fn probability(n: usize) -> String {
    format!("{:0.10}", 1.0 / n as f64)
}

pub(crate) fn cidr(addr: IpAddr, len: u8) -> String {
    let full = if addr.is_ipv4() { 32 } else { 128 };
    if len == full {
        addr.to_string()
    } else {
        format!("{addr}/{len}")
    }
}

/// Collects the chains of one table in the order they are first named, each with its rules.
#[derive(Default)]
pub(crate) struct TableBuilder {
    order: Vec<String>,
    chains: BTreeMap<String, Vec<String>>,
}

/// The rules of a postrouting chain: masquerade what carries [`MASQ_MARK`], clearing the
/// mark first (a packet re-entering the stack must not be masqueraded twice), as kube-proxy's
/// `KUBE-POSTROUTING`.
pub(crate) fn masquerade_marked(nat: &mut TableBuilder, chain: &str) {
    let mark_mask = format!("{MASQ_MARK}/{MASQ_MARK}");
    nat.rule(
        chain,
        None,
        &["-m", "mark", "!", "--mark", &mark_mask, "-j", "RETURN"],
    );
    nat.rule(chain, None, &["-j", "MARK", "--xor-mark", MASQ_MARK]);
    nat.rule(
        chain,
        Some("lb-agent service traffic requiring SNAT"),
        &["-j", "MASQUERADE", "--random-fully"],
    );
}

impl TableBuilder {
    pub(crate) fn chain(&mut self, name: &str) {
        if !self.chains.contains_key(name) {
            self.order.push(name.to_string());
            self.chains.insert(name.to_string(), Vec::new());
        }
    }

    /// Appends `-A <chain> <words...>`, with `comment` (if any) first, as kube-proxy does.
    pub(crate) fn rule(&mut self, chain: &str, comment: Option<&str>, words: &[&str]) {
        self.chain(chain);
        let mut line = format!("-A {chain}");
        if let Some(comment) = comment {
            write!(line, " -m comment --comment {}", quote(comment)).unwrap();
        }
        for word in words {
            line.push(' ');
            line.push_str(word);
        }
        self.chains.get_mut(chain).unwrap().push(line);
    }

    pub(crate) fn finish(mut self) -> Vec<Chain> {
        self.order
            .into_iter()
            .map(|name| {
                let rules = self.chains.remove(&name).unwrap();
                Chain { name, rules }
            })
            .collect()
    }
}

/// Generates `family`'s rules for `desired`. Deterministic: services in the desired state's
/// order, endpoints in address order.
pub fn generate(desired: &DesiredState, family: IpFamily) -> FamilyRules {
    let mut filter = TableBuilder::default();
    let mut nat = TableBuilder::default();
    for chain in [SERVICES, EXTERNAL_SERVICES, PROXY_FIREWALL] {
        filter.chain(chain);
    }
    for chain in [SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ] {
        nat.chain(chain);
    }
    // Fixed chains' rules.
    nat.rule(MARK_MASQ, None, &["-j", "MARK", "--or-mark", MASQ_MARK]);
    masquerade_marked(&mut nat, POSTROUTING);

    let node_addrs: Vec<IpAddr> = desired
        .node_addrs
        .iter()
        .copied()
        .filter(|a| IpFamily::of(*a) == family)
        .collect();
    for (name, sp) in &desired.services {
        service_rules(&mut filter, &mut nat, name, sp, family, &node_addrs);
    }
    for addr in &node_addrs {
        nat.rule(
            SERVICES,
            Some("lb-agent service nodeports; NOTE: this must be the last rule in this chain"),
            &["-d", &addr.to_string(), "-j", NODEPORTS],
        );
    }
    FamilyRules {
        filter: filter.finish(),
        nat: nat.finish(),
    }
}

fn service_rules(
    filter: &mut TableBuilder,
    nat: &mut TableBuilder,
    name: &ServicePortName,
    sp: &ServicePort,
    family: IpFamily,
    node_addrs: &[IpAddr],
) {
    let of_family = |a: &IpAddr| IpFamily::of(*a) == family;
    let cluster_ips: Vec<_> = sp.frontends.iter().filter(|f| of_family(&f.addr)).collect();
    let externals: Vec<_> = sp
        .external_frontends
        .iter()
        .filter(|(f, _)| of_family(&f.addr))
        .collect();
    if cluster_ips.is_empty() && externals.is_empty() {
        return;
    }
    let all: Vec<Endpoint> = sp
        .endpoints
        .iter()
        .filter(|e| of_family(&e.addr))
        .copied()
        .collect();
    let local: Vec<Endpoint> = sp
        .local_endpoints
        .iter()
        .filter(|e| of_family(&e.addr))
        .copied()
        .collect();
    let protocol = name.protocol;
    let p = proto(protocol);
    let spn = service_port_string(name);
    let svc = service_chain("SVC", &spn, protocol);
    let svl = service_chain("SVL", &spn, protocol);
    let ext = service_chain("EXT", &spn, protocol);
    let fw = service_chain("FW", &spn, protocol);

    // kube-proxy's categories (proxier.go, syncProxyRules).
    let has_endpoints = !all.is_empty() || !local.is_empty();
    let internal_eps = if sp.internal_local { &local } else { &all };
    let external_eps = if sp.external_local { &local } else { &all };
    let externally_accessible = !externals.is_empty();
    // The cluster chain also serves the node's own traffic to Local-policy external frontends.
    let uses_cluster_chain = !all.is_empty() && (!sp.internal_local || externally_accessible);
    let uses_local_chain = !local.is_empty() && (sp.internal_local || sp.external_local);
    let uses_ext_chain = has_endpoints && externally_accessible;
    let internal_chain = if sp.internal_local { &svl } else { &svc };
    let external_policy_chain = if sp.external_local { &svl } else { &svc };

    let no_endpoints = format!("{spn} has no endpoints");
    let no_local = format!("{spn} has no local endpoints");
    let (internal_filter, internal_comment) = if has_endpoints {
        ("DROP", &no_local)
    } else {
        ("REJECT", &no_endpoints)
    };
    let (external_filter, external_comment) = if has_endpoints {
        ("DROP", &no_local)
    } else {
        ("REJECT", &no_endpoints)
    };

    let ranges: Vec<(IpAddr, u8)> = sp
        .source_ranges
        .iter()
        .filter(|(a, _)| of_family(a))
        .copied()
        .collect();
    let lb_ips: Vec<IpAddr> = externals
        .iter()
        .filter(|(_, x)| x.load_balancer)
        .map(|(f, _)| f.addr)
        .collect();
    let uses_fw_chain = !external_eps.is_empty() && !lb_ips.is_empty() && !ranges.is_empty();

    // ClusterIPs.
    for fe in &cluster_ips {
        let (addr, port) = (fe.addr.to_string(), fe.port.to_string());
        let words = ["-m", p, "-p", p, "-d", &addr, "--dport", &port];
        if !internal_eps.is_empty() {
            let comment = format!("{spn} cluster IP");
            nat.rule(
                SERVICES,
                Some(&comment),
                &[&words[..], &["-j", internal_chain]].concat(),
            );
        } else {
            filter.rule(
                SERVICES,
                Some(internal_comment),
                &[&words[..], &["-j", internal_filter]].concat(),
            );
        }
    }

    // External frontends: NodePorts (on a node address), externalIPs, LoadBalancer IPs.
    let mut node_ports = BTreeSet::new();
    for (fe, x) in &externals {
        let (addr, port) = (fe.addr.to_string(), fe.port.to_string());
        let words = ["-m", p, "-p", p, "-d", &addr, "--dport", &port];
        let node_port = !x.load_balancer && node_addrs.contains(&fe.addr);
        if external_eps.is_empty() {
            filter.rule(
                EXTERNAL_SERVICES,
                Some(external_comment),
                &[&words[..], &["-j", external_filter]].concat(),
            );
            continue;
        }
        if node_port {
            node_ports.insert(fe.port);
        } else if x.load_balancer {
            let comment = format!("{spn} loadbalancer IP");
            let target = if uses_fw_chain { &fw } else { &ext };
            nat.rule(
                SERVICES,
                Some(&comment),
                &[&words[..], &["-j", target]].concat(),
            );
            if uses_fw_chain {
                let comment = format!("{spn} traffic not accepted by {fw}");
                filter.rule(
                    PROXY_FIREWALL,
                    Some(&comment),
                    &[&words[..], &["-j", "DROP"]].concat(),
                );
            }
        } else {
            let comment = format!("{spn} external IP");
            nat.rule(
                SERVICES,
                Some(&comment),
                &[&words[..], &["-j", &ext]].concat(),
            );
        }
    }
    for port in node_ports {
        let port = port.to_string();
        nat.rule(
            NODEPORTS,
            Some(&spn),
            &["-m", p, "-p", p, "--dport", &port, "-j", &ext],
        );
    }

    // The chains behind them.
    if uses_cluster_chain {
        nat.chain(&svc);
    }
    if uses_local_chain {
        nat.chain(&svl);
    }
    if uses_ext_chain {
        nat.chain(&ext);
        if !sp.external_local {
            let comment = format!("masquerade traffic for {spn} external destinations");
            nat.rule(&ext, Some(&comment), &["-j", MARK_MASQ]);
        } else if uses_cluster_chain {
            // The node's own connections: their source is a node address, which the backend
            // could not answer directly, and they go to every endpoint.
            let comment = format!("masquerade LOCAL traffic for {spn} external destinations");
            nat.rule(
                &ext,
                Some(&comment),
                &["-m", "addrtype", "--src-type", "LOCAL", "-j", MARK_MASQ],
            );
            let comment = format!("route LOCAL traffic for {spn} external destinations");
            nat.rule(
                &ext,
                Some(&comment),
                &["-m", "addrtype", "--src-type", "LOCAL", "-j", &svc],
            );
        }
        if !external_eps.is_empty() {
            nat.rule(&ext, None, &["-j", external_policy_chain]);
        }
    }
    if uses_fw_chain {
        let comment = format!("{spn} loadbalancer IP");
        let mut allow_from_node = false;
        for &(addr, len) in &ranges {
            nat.rule(&fw, Some(&comment), &["-s", &cidr(addr, len), "-j", &ext]);
            allow_from_node |= node_addrs.iter().any(|n| in_range(*n, addr, len));
        }
        // A VIP-like load balancer's IP is often a local address: the node's own requests to
        // it come from the VIP itself.
        if allow_from_node {
            for ip in &lb_ips {
                nat.rule(&fw, Some(&comment), &["-s", &ip.to_string(), "-j", &ext]);
            }
        }
        let comment = format!("other traffic to {spn} will be dropped by {PROXY_FIREWALL}");
        nat.rule(&fw, Some(&comment), &[]);
    }
    if uses_cluster_chain {
        spread(nat, &svc, &spn, protocol, &all, sp.affinity_timeout_s);
    }
    if uses_local_chain {
        spread(nat, &svl, &spn, protocol, &local, sp.affinity_timeout_s);
    }

    // One chain per endpoint either chain uses.
    let mut used = BTreeSet::new();
    if uses_cluster_chain {
        used.extend(all.iter().copied());
    }
    if uses_local_chain {
        used.extend(local.iter().copied());
    }
    for ep in used {
        let sep = endpoint_chain(&spn, protocol, &ep);
        let ip = ep.addr.to_string();
        let dest = SocketAddr::new(ep.addr, ep.port).to_string();
        nat.rule(&sep, Some(&spn), &["-s", &ip, "-j", MARK_MASQ]);
        let mut words = Vec::new();
        if sp.affinity_timeout_s.is_some() {
            words.extend(["-m", "recent", "--name", &sep, "--set"]);
        }
        words.extend(["-m", p, "-p", p, "-j", "DNAT", "--to-destination", &dest]);
        nat.rule(&sep, Some(&spn), &words);
    }
}

/// kube-proxy's `writeServiceToEndpointRules`: the affinity checks first, then the random
/// spread.
fn spread(
    nat: &mut TableBuilder,
    chain: &str,
    spn: &str,
    protocol: Protocol,
    endpoints: &[Endpoint],
    affinity_timeout_s: Option<u32>,
) {
    if let Some(timeout) = affinity_timeout_s {
        let timeout = timeout.to_string();
        for ep in endpoints {
            let sep = endpoint_chain(spn, protocol, ep);
            let comment = format!("{spn} -> {}", SocketAddr::new(ep.addr, ep.port));
            nat.rule(
                chain,
                Some(&comment),
                &[
                    "-m",
                    "recent",
                    "--name",
                    &sep,
                    "--rcheck",
                    "--seconds",
                    &timeout,
                    "--reap",
                    "-j",
                    &sep,
                ],
            );
        }
    }
    let n = endpoints.len();
    for (i, ep) in endpoints.iter().enumerate() {
        let sep = endpoint_chain(spn, protocol, ep);
        let comment = format!("{spn} -> {}", SocketAddr::new(ep.addr, ep.port));
        if i + 1 < n {
            let prob = probability(n - i);
            nat.rule(
                chain,
                Some(&comment),
                &[
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &prob,
                    "-j",
                    &sep,
                ],
            );
        } else {
            nat.rule(chain, Some(&comment), &["-j", &sep]);
        }
    }
}

/// Whether `addr` lies in `net/len` (same family).
pub fn in_range(addr: IpAddr, net: IpAddr, len: u8) -> bool {
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_hash_as_kube_proxy_does() {
        // kube-proxy's proxier_test.go: ns1/svc1:p80 over tcp is KUBE-SVC-XPGD46QRK7WJZT7O.
        assert_eq!(hash16("ns1/svc1:p80tcp"), "XPGD46QRK7WJZT7O");
        // ... and its endpoint 10.180.0.1:80 is KUBE-SEP-SXIVWICOYRO3J4NJ.
        assert_eq!(hash16("ns1/svc1:p80tcp10.180.0.1:80"), "SXIVWICOYRO3J4NJ");
    }

    #[test]
    fn probabilities_have_ten_decimals() {
        assert_eq!(probability(3), "0.3333333333");
        assert_eq!(probability(2), "0.5000000000");
    }

    #[test]
    fn ranges() {
        let a: IpAddr = "10.0.1.1".parse().unwrap();
        assert!(in_range(a, "10.0.0.0".parse().unwrap(), 16));
        assert!(!in_range(a, "10.1.0.0".parse().unwrap(), 16));
        assert!(in_range(a, "0.0.0.0".parse().unwrap(), 0));
    }
}
