//! A packet tracer over generated rules, as kube-proxy's tests trace packets through theirs
//! (`iptablesTracer` in pkg/proxy/iptables/proxier_test.go): the rules are parsed (only the
//! matches and targets the generator emits; anything else panics, so the tracer cannot
//! silently misread a new rule), and a packet is walked from the built-in chains through
//! nat, filter and nat POSTROUTING. Random (`statistic`) and affinity (`recent --rcheck`)
//! rules fork the walk, so a trace returns every outcome any branch reaches.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use super::rules::{in_range, FamilyRules, Table, JUMP_RULES};
use crate::model::Protocol;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Match {
    Src {
        net: (IpAddr, u8),
        negate: bool,
    },
    Dst {
        net: (IpAddr, u8),
        negate: bool,
    },
    Proto(String),
    DPort(u16),
    SrcLocal,
    DstLocal,
    /// Forks: the rule matches on one branch and not on the other.
    Random,
    /// `recent --rcheck`: forks like `Random`, naming the list.
    RecentCheck(String),
    /// `recent --set`: always matches; records the list.
    RecentSet(String),
    Mark {
        value: u32,
        mask: u32,
        negate: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    None,
    Jump(String),
    Return,
    Accept,
    Drop,
    Reject,
    Dnat(SocketAddr),
    OrMark(u32),
    XorMark(u32),
    Masquerade,
}

#[derive(Clone, Debug)]
struct Rule {
    matches: Vec<Match>,
    target: Target,
    text: String,
}

/// Splits a rule into words, keeping double-quoted ones whole.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn net(s: &str) -> (IpAddr, u8) {
    match s.split_once('/') {
        Some((a, l)) => (a.parse().unwrap(), l.parse().unwrap()),
        None => {
            let a: IpAddr = s.parse().unwrap_or_else(|_| panic!("address {s:?}"));
            (a, if a.is_ipv4() { 32 } else { 128 })
        }
    }
}

fn hex(s: &str) -> u32 {
    u32::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()
}

/// Parses `-A CHAIN ...` into (chain, rule).
fn parse(line: &str) -> (String, Rule) {
    let w = words(line);
    assert_eq!(w[0], "-A", "{line}");
    let chain = w[1].clone();
    let mut matches = Vec::new();
    let mut target = Target::None;
    let mut negate = false;
    let mut i = 2;
    let arg = |i: usize| {
        w.get(i + 1)
            .unwrap_or_else(|| panic!("{line}: missing value"))
            .clone()
    };
    while i < w.len() {
        let word = w[i].as_str();
        let mut next;
        match word {
            "!" => {
                negate = true;
                i += 1;
                continue;
            }
            "-m" => {
                let module = arg(i);
                assert!(
                    [
                        "comment",
                        "tcp",
                        "udp",
                        "sctp",
                        "addrtype",
                        "statistic",
                        "recent",
                        "mark",
                        "conntrack"
                    ]
                    .contains(&module.as_str()),
                    "{line}: module {module} unknown to the tracer"
                );
                next = i + 2;
            }
            "--comment" => next = i + 2,
            "--ctstate" => {
                // Only NEW connections are traced.
                assert_eq!(arg(i), "NEW", "{line}");
                next = i + 2;
            }
            "-s" => {
                matches.push(Match::Src {
                    net: net(&arg(i)),
                    negate,
                });
                next = i + 2;
            }
            "-d" => {
                matches.push(Match::Dst {
                    net: net(&arg(i)),
                    negate,
                });
                next = i + 2;
            }
            "-p" => {
                matches.push(Match::Proto(arg(i)));
                next = i + 2;
            }
            "--dport" => {
                matches.push(Match::DPort(arg(i).parse().unwrap()));
                next = i + 2;
            }
            "--src-type" => {
                assert_eq!(arg(i), "LOCAL");
                matches.push(Match::SrcLocal);
                next = i + 2;
            }
            "--dst-type" => {
                assert_eq!(arg(i), "LOCAL");
                matches.push(Match::DstLocal);
                next = i + 2;
            }
            "--mode" => {
                assert_eq!(arg(i), "random");
                assert_eq!(w[i + 2], "--probability", "{line}");
                let p: f64 = w[i + 3].parse().unwrap();
                assert!(p > 0.0 && p < 1.0, "{line}: probability {p}");
                matches.push(Match::Random);
                next = i + 4;
            }
            "--name" => {
                let name = arg(i);
                match w[i + 2].as_str() {
                    "--set" => {
                        matches.push(Match::RecentSet(name));
                        next = i + 3;
                    }
                    "--rcheck" => {
                        assert_eq!(w[i + 3], "--seconds", "{line}");
                        let _: u32 = w[i + 4].parse().unwrap();
                        assert_eq!(w[i + 5], "--reap", "{line}");
                        matches.push(Match::RecentCheck(name));
                        next = i + 6;
                    }
                    other => panic!("{line}: recent {other}"),
                }
            }
            "--mark" => {
                let (v, m) = arg(i)
                    .split_once('/')
                    .map(|(v, m)| (hex(v), hex(m)))
                    .unwrap();
                matches.push(Match::Mark {
                    value: v,
                    mask: m,
                    negate,
                });
                next = i + 2;
            }
            "-j" => {
                let t = arg(i);
                next = i + 2;
                target = match t.as_str() {
                    "RETURN" => Target::Return,
                    "ACCEPT" => Target::Accept,
                    "DROP" => Target::Drop,
                    "REJECT" => Target::Reject,
                    "MASQUERADE" => {
                        if w.get(next).map(String::as_str) == Some("--random-fully") {
                            next += 1;
                        }
                        Target::Masquerade
                    }
                    "DNAT" => {
                        assert_eq!(w[next], "--to-destination", "{line}");
                        let to = w[next + 1].parse().unwrap();
                        next += 2;
                        Target::Dnat(to)
                    }
                    "MARK" => {
                        let value = hex(&w[next + 1]);
                        let t = match w[next].as_str() {
                            "--or-mark" => Target::OrMark(value),
                            "--xor-mark" => Target::XorMark(value),
                            other => panic!("{line}: MARK {other}"),
                        };
                        next += 2;
                        t
                    }
                    chain if chain.starts_with("LBA-") => Target::Jump(chain.to_string()),
                    other => panic!("{line}: target {other} unknown to the tracer"),
                };
            }
            other => panic!("{line}: {other} unknown to the tracer"),
        }
        negate = false;
        i = next;
    }
    (
        chain,
        Rule {
            matches,
            target,
            text: line.to_string(),
        },
    )
}

/// A packet being traced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Protocol,
    pub dport: u16,
}

/// Where a packet comes from: another host (PREROUTING), or the node itself (OUTPUT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Remote,
    Local,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Accept,
    Drop,
    Reject,
}

/// What one branch of a trace reached.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Outcome {
    pub verdict: Verdict,
    /// Where the packet was DNATed to.
    pub dnat: Option<SocketAddr>,
    pub masquerade: bool,
    /// `recent` lists checked on the way (affinity).
    pub recent_checked: BTreeSet<String>,
    /// `recent` lists the packet was added to.
    pub recent_set: BTreeSet<String>,
}

#[derive(Clone, Debug)]
struct State {
    dst: IpAddr,
    dport: u16,
    mark: u32,
    dnat: Option<SocketAddr>,
    masquerade: bool,
    recent_checked: BTreeSet<String>,
    recent_set: BTreeSet<String>,
}

/// The rules of one family, parsed.
pub struct Tracer {
    chains: BTreeMap<(Table, String), Vec<Rule>>,
    node_addrs: Vec<IpAddr>,
    src: IpAddr,
    proto: &'static str,
}

/// How a walk through one chain ended, per branch.
enum End {
    /// Fell off the end or RETURNed: the caller goes on.
    Continue(State),
    Verdict(State, Verdict),
}

impl Tracer {
    pub fn new(rules: &FamilyRules, node_addrs: &[IpAddr]) -> Tracer {
        let mut chains: BTreeMap<(Table, String), Vec<Rule>> = BTreeMap::new();
        for table in Table::ALL {
            for chain in rules.table(table) {
                let parsed = chain.rules.iter().map(|l| {
                    let (name, rule) = parse(l);
                    assert_eq!(name, chain.name, "{l}");
                    rule
                });
                chains.insert((table, chain.name.clone()), parsed.collect());
            }
        }
        for jump in JUMP_RULES {
            let (name, rule) = parse(&jump.line());
            chains.entry((jump.table, name)).or_default().push(rule);
        }
        Tracer {
            chains,
            node_addrs: node_addrs.to_vec(),
            src: node_addrs[0],
            proto: "",
        }
    }

    fn is_local(&self, addr: IpAddr) -> bool {
        addr.is_loopback() || self.node_addrs.contains(&addr)
    }

    /// Every outcome `packet` can reach.
    pub fn trace(&mut self, origin: Origin, packet: &Packet) -> BTreeSet<Outcome> {
        self.src = packet.src;
        self.proto = match packet.proto {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        };
        let start = State {
            dst: packet.dst,
            dport: packet.dport,
            mark: 0,
            dnat: None,
            masquerade: false,
            recent_checked: BTreeSet::new(),
            recent_set: BTreeSet::new(),
        };
        let nat_chain = match origin {
            Origin::Remote => "PREROUTING",
            Origin::Local => "OUTPUT",
        };
        let mut outcomes = BTreeSet::new();
        for after_nat in self.walk(Table::Nat, nat_chain, start) {
            let st = match after_nat {
                End::Continue(st) | End::Verdict(st, Verdict::Accept) => st,
                End::Verdict(st, v) => {
                    outcomes.insert(outcome(st, v));
                    continue;
                }
            };
            let filter_chain = match origin {
                Origin::Local => "OUTPUT",
                Origin::Remote if self.is_local(st.dst) => "INPUT",
                Origin::Remote => "FORWARD",
            };
            for after_filter in self.walk(Table::Filter, filter_chain, st) {
                let st = match after_filter {
                    End::Continue(st) | End::Verdict(st, Verdict::Accept) => st,
                    End::Verdict(st, v) => {
                        outcomes.insert(outcome(st, v));
                        continue;
                    }
                };
                // Local delivery skips POSTROUTING.
                if origin == Origin::Remote && self.is_local(st.dst) {
                    outcomes.insert(outcome(st, Verdict::Accept));
                    continue;
                }
                for end in self.walk(Table::Nat, "POSTROUTING", st) {
                    let (End::Continue(st) | End::Verdict(st, _)) = end;
                    outcomes.insert(outcome(st, Verdict::Accept));
                }
            }
        }
        outcomes
    }

    fn walk(&self, table: Table, chain: &str, st: State) -> Vec<End> {
        let Some(rules) = self.chains.get(&(table, chain.to_string())) else {
            assert!(
                ["PREROUTING", "OUTPUT", "POSTROUTING", "INPUT", "FORWARD"].contains(&chain),
                "jump to undeclared chain {chain} in {table:?}"
            );
            return vec![End::Continue(st)];
        };
        let mut ends = Vec::new();
        // Branches still walking this chain: (next rule, state).
        let mut live = vec![(0usize, st)];
        while let Some((i, mut st)) = live.pop() {
            let Some(rule) = rules.get(i) else {
                ends.push(End::Continue(st));
                continue;
            };
            let mut matched = true;
            for m in &rule.matches {
                let ok = match m {
                    Match::Src { net, negate } => in_range(self.src, net.0, net.1) != *negate,
                    Match::Dst { net, negate } => in_range(st.dst, net.0, net.1) != *negate,
                    Match::Proto(p) => p == self.proto,
                    Match::DPort(p) => *p == st.dport,
                    Match::SrcLocal => self.is_local(self.src),
                    Match::DstLocal => self.is_local(st.dst),
                    Match::Mark {
                        value,
                        mask,
                        negate,
                    } => (st.mark & mask == *value) != *negate,
                    Match::RecentSet(name) => {
                        st.recent_set.insert(name.clone());
                        true
                    }
                    Match::Random => {
                        live.push((i + 1, st.clone()));
                        true
                    }
                    Match::RecentCheck(name) => {
                        live.push((i + 1, st.clone()));
                        st.recent_checked.insert(name.clone());
                        true
                    }
                };
                if !ok {
                    matched = false;
                    break;
                }
            }
            if !matched {
                live.push((i + 1, st));
                continue;
            }
            match &rule.target {
                Target::None => live.push((i + 1, st)),
                Target::Return => ends.push(End::Continue(st)),
                Target::Accept => ends.push(End::Verdict(st, Verdict::Accept)),
                Target::Drop => ends.push(End::Verdict(st, Verdict::Drop)),
                Target::Reject => ends.push(End::Verdict(st, Verdict::Reject)),
                Target::OrMark(m) => {
                    st.mark |= m;
                    live.push((i + 1, st));
                }
                Target::XorMark(m) => {
                    st.mark ^= m;
                    live.push((i + 1, st));
                }
                Target::Masquerade => {
                    st.masquerade = true;
                    ends.push(End::Verdict(st, Verdict::Accept));
                }
                Target::Dnat(to) => {
                    assert_eq!(table, Table::Nat, "{}", rule.text);
                    st.dnat = Some(*to);
                    st.dst = to.ip();
                    st.dport = to.port();
                    ends.push(End::Verdict(st, Verdict::Accept));
                }
                Target::Jump(sub) => {
                    for end in self.walk(table, sub, st) {
                        match end {
                            End::Continue(st) => live.push((i + 1, st)),
                            verdict => ends.push(verdict),
                        }
                    }
                }
            }
        }
        ends
    }
}

fn outcome(st: State, verdict: Verdict) -> Outcome {
    Outcome {
        verdict,
        dnat: st.dnat,
        masquerade: st.masquerade,
        recent_checked: st.recent_checked,
        recent_set: st.recent_set,
    }
}
