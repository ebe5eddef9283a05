//! What goes to `iptables-restore --noflush`: the chains that changed since the last sync, or
//! all of them, and the deletion of chains no longer wanted. Pure; `mod.rs` runs it.
//!
//! With `--noflush`, `iptables-restore` leaves every chain it is not told about alone, and a
//! chain declared with `:NAME - [0:0]` is created or flushed. So an incremental sync declares
//! and rewrites only the chains whose rules differ, and declares then deletes (`-X`) the ones
//! that went away, as kube-proxy does. The whole input of one table is one transaction:
//! a chain deleted here is never left referenced, since whatever referenced it changed too.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::rules::{Chain, FamilyRules, Table};

/// How much one restore input writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The `iptables-restore` input; empty when nothing changed.
    pub input: String,
    /// Chains declared and rewritten.
    pub written: usize,
    /// Chains deleted.
    pub deleted: usize,
}

/// The restore input taking the tables from `old` (what the last successful sync wrote; `None`
/// for a full sync) to `new`. `stale` names chains of ours found in the kernel that `new`
/// does not have (a full sync looks them up; an incremental one knows them from `old`).
pub fn plan(
    old: Option<&FamilyRules>,
    new: &FamilyRules,
    stale: &BTreeMap<Table, BTreeSet<String>>,
) -> Plan {
    let mut plan = Plan::default();
    for table in Table::ALL {
        let new_chains = new.table(table);
        let old_chains: Option<BTreeMap<&str, &Chain>> = old.map(|o| {
            o.table(table)
                .iter()
                .map(|c| (c.name.as_str(), c))
                .collect()
        });
        let changed: Vec<&Chain> = new_chains
            .iter()
            .filter(|c| match &old_chains {
                None => true,
                Some(old) => old.get(c.name.as_str()).is_none_or(|o| o.rules != c.rules),
            })
            .collect();
        let new_names: BTreeSet<&str> = new_chains.iter().map(|c| c.name.as_str()).collect();
        let mut deleted: BTreeSet<&str> = BTreeSet::new();
        if let Some(old) = &old_chains {
            deleted.extend(old.keys().filter(|n| !new_names.contains(*n)));
        }
        if let Some(stale) = stale.get(&table) {
            deleted.extend(
                stale
                    .iter()
                    .map(String::as_str)
                    .filter(|n| !new_names.contains(n)),
            );
        }
        if changed.is_empty() && deleted.is_empty() {
            continue;
        }
        let out = &mut plan.input;
        writeln!(out, "*{}", table.as_str()).unwrap();
        for chain in &changed {
            writeln!(out, ":{} - [0:0]", chain.name).unwrap();
        }
        // Declared (flushed) before deletion, so a chain still holding jumps to another
        // deleted one can go in the same transaction.
        for name in &deleted {
            writeln!(out, ":{name} - [0:0]").unwrap();
        }
        for chain in &changed {
            for rule in &chain.rules {
                writeln!(out, "{rule}").unwrap();
            }
        }
        for name in &deleted {
            writeln!(out, "-X {name}").unwrap();
        }
        out.push_str("COMMIT\n");
        plan.written += changed.len();
        plan.deleted += deleted.len();
    }
    plan
}

/// What other modes (or an agent on another back end) left in the tables of one
/// `iptables-save` output, as deletions by table: the rules of built-in chains that jump to a
/// chain starting with `prefix` and that `keep` (given the table, the built-in chain and the
/// target) does not keep, as `-D` lines in the words `iptables-save` printed them with; and
/// the chains starting with `prefix` that no built-in chain reaches once those are gone. A
/// chain nothing reaches sees no packet, so deleting it changes nothing, and the chains of
/// the mode that keeps its jumps are all reached.
pub fn leftovers(
    save: &str,
    prefix: &str,
    keep: impl Fn(Table, &str, &str) -> bool,
) -> (
    BTreeMap<Table, Vec<String>>,
    BTreeMap<Table, BTreeSet<String>>,
) {
    let mut jumps: BTreeMap<Table, Vec<String>> = BTreeMap::new();
    let mut chains: BTreeMap<Table, BTreeSet<String>> = BTreeMap::new();
    for (table, text) in tables_in_save(save) {
        let mut builtin = Vec::new();
        let mut ours = BTreeSet::new();
        let mut edges: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for line in text {
            if let Some(decl) = line.strip_prefix(':') {
                let mut words = decl.split_whitespace();
                let (name, policy) = (words.next().unwrap_or(""), words.next().unwrap_or("-"));
                if policy != "-" {
                    builtin.push(name);
                } else if name.starts_with(prefix) {
                    ours.insert(name);
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let chain = rule.split_whitespace().next().unwrap_or_default();
                let Some(target) = jump_target(rule) else {
                    continue;
                };
                let from_builtin = !chain.starts_with(prefix);
                if from_builtin && target.starts_with(prefix) && !keep(table, chain, target) {
                    jumps.entry(table).or_default().push(format!("-D {rule}"));
                } else {
                    edges.entry(chain).or_default().push(target);
                }
            }
        }
        let mut reached: BTreeSet<&str> = BTreeSet::new();
        let mut todo = builtin;
        while let Some(chain) = todo.pop() {
            for &next in edges.get(chain).into_iter().flatten() {
                if reached.insert(next) {
                    todo.push(next);
                }
            }
        }
        let unreached: BTreeSet<String> = ours
            .into_iter()
            .filter(|c| !reached.contains(c))
            .map(String::from)
            .collect();
        if !unreached.is_empty() {
            chains.insert(table, unreached);
        }
    }
    (jumps, chains)
}

/// The lines of each table in `iptables-save` output.
fn tables_in_save(save: &str) -> Vec<(Table, Vec<&str>)> {
    let mut tables: Vec<(Table, Vec<&str>)> = Vec::new();
    let mut current = false;
    for line in save.lines() {
        if let Some(name) = line.strip_prefix('*') {
            let table = Table::ALL.into_iter().find(|t| t.as_str() == name.trim());
            current = table.is_some();
            tables.extend(table.map(|t| (t, Vec::new())));
        } else if current {
            tables.last_mut().expect("a table").1.push(line);
        }
    }
    tables
}

/// The chain a rule jumps or goes to (`-j`/`-g`), if a chain and not a verdict or extension
/// target such as ACCEPT or DNAT (those are upper-case words that are no chain of ours; the
/// caller only follows names it knows).
fn jump_target(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace();
    let mut target = None;
    while let Some(word) = words.next() {
        if word == "-j" || word == "-g" {
            target = words.next();
        }
    }
    target
}

/// The restore input deleting the jump rules `jumps` (from [`foreign_jumps`]) and then every
/// chain in `chains`: what another mode, or an agent on the other back end, left behind.
pub fn delete_leftovers(
    jumps: &BTreeMap<Table, Vec<String>>,
    chains: &BTreeMap<Table, BTreeSet<String>>,
) -> String {
    let mut out = String::new();
    for table in Table::ALL {
        let rules = jumps.get(&table).map_or(&[][..], Vec::as_slice);
        let names = chains.get(&table);
        if rules.is_empty() && names.is_none_or(BTreeSet::is_empty) {
            continue;
        }
        writeln!(out, "*{}", table.as_str()).unwrap();
        for name in names.into_iter().flatten() {
            writeln!(out, ":{name} - [0:0]").unwrap();
        }
        for rule in rules {
            writeln!(out, "{rule}").unwrap();
        }
        for name in names.into_iter().flatten() {
            writeln!(out, "-X {name}").unwrap();
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// The chains named in `iptables-save` output that start with `prefix`, by table.
pub fn chains_in_save(save: &str, prefix: &str) -> BTreeMap<Table, BTreeSet<String>> {
    let mut found: BTreeMap<Table, BTreeSet<String>> = BTreeMap::new();
    let mut table = None;
    for line in save.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = Table::ALL.into_iter().find(|t| t.as_str() == name.trim());
        } else if let (Some(t), Some(rest)) = (table, line.strip_prefix(':')) {
            let name = rest.split_whitespace().next().unwrap_or_default();
            if name.starts_with(prefix) {
                found.entry(t).or_default().insert(name.to_string());
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(name: &str, rules: &[&str]) -> Chain {
        Chain {
            name: name.into(),
            rules: rules.iter().map(|r| r.to_string()).collect(),
        }
    }

    fn rules(nat: Vec<Chain>) -> FamilyRules {
        FamilyRules {
            filter: vec![chain("LBA-SERVICES", &[])],
            nat,
        }
    }

    #[test]
    fn full_sync_writes_everything_and_deletes_stale_chains() {
        let new = rules(vec![
            chain("LBA-SERVICES", &["-A LBA-SERVICES -j LBA-SVC-A"]),
            chain("LBA-SVC-A", &[]),
        ]);
        let stale = BTreeMap::from([(
            Table::Nat,
            BTreeSet::from(["LBA-SVC-OLD".to_string(), "LBA-SVC-A".to_string()]),
        )]);
        let p = plan(None, &new, &stale);
        assert_eq!(
            p.input,
            "*filter\n:LBA-SERVICES - [0:0]\nCOMMIT\n\
             *nat\n:LBA-SERVICES - [0:0]\n:LBA-SVC-A - [0:0]\n:LBA-SVC-OLD - [0:0]\n\
             -A LBA-SERVICES -j LBA-SVC-A\n-X LBA-SVC-OLD\nCOMMIT\n"
        );
        assert_eq!((p.written, p.deleted), (3, 1));
    }

    #[test]
    fn incremental_sync_writes_only_changed_chains() {
        let old = rules(vec![
            chain(
                "LBA-SERVICES",
                &[
                    "-A LBA-SERVICES -j LBA-SVC-A",
                    "-A LBA-SERVICES -j LBA-SVC-B",
                ],
            ),
            chain("LBA-SVC-A", &["-A LBA-SVC-A -j LBA-SEP-1"]),
            chain("LBA-SVC-B", &[]),
            chain("LBA-SEP-1", &[]),
        ]);
        let new = rules(vec![
            chain("LBA-SERVICES", &["-A LBA-SERVICES -j LBA-SVC-A"]),
            chain("LBA-SVC-A", &["-A LBA-SVC-A -j LBA-SEP-1"]),
            chain("LBA-SEP-1", &[]),
        ]);
        let p = plan(Some(&old), &new, &BTreeMap::new());
        assert_eq!(
            p.input,
            "*nat\n:LBA-SERVICES - [0:0]\n:LBA-SVC-B - [0:0]\n\
             -A LBA-SERVICES -j LBA-SVC-A\n-X LBA-SVC-B\nCOMMIT\n"
        );
        assert_eq!(plan(Some(&new), &new, &BTreeMap::new()), Plan::default());
    }

    #[test]
    fn save_output_is_read_per_table() {
        let save = "# Generated\n*nat\n:PREROUTING ACCEPT [0:0]\n:LBA-SERVICES - [0:0]\n\
                    :KUBE-SERVICES - [0:0]\nCOMMIT\n*filter\n:LBA-PROXY-FIREWALL - [0:0]\nCOMMIT\n";
        let found = chains_in_save(save, "LBA-");
        assert_eq!(
            found[&Table::Nat],
            BTreeSet::from(["LBA-SERVICES".to_string()])
        );
        assert_eq!(
            found[&Table::Filter],
            BTreeSet::from(["LBA-PROXY-FIREWALL".to_string()])
        );
        assert_eq!(
            delete_leftovers(&BTreeMap::new(), &found),
            "*filter\n:LBA-PROXY-FIREWALL - [0:0]\n-X LBA-PROXY-FIREWALL\nCOMMIT\n\
             *nat\n:LBA-SERVICES - [0:0]\n-X LBA-SERVICES\nCOMMIT\n"
        );
    }

    #[test]
    fn leftovers_are_foreign_jumps_and_the_chains_nothing_reaches_once_they_are_gone() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
                    :LBA-SERVICES - [0:0]\n:LBA-SVC-A - [0:0]\n:LBA-PORTALS - [0:0]\n\
                    :LBA-NODEPORT - [0:0]\n:LBA-ORPHAN - [0:0]\n:KUBE-SERVICES - [0:0]\n\
                    -A PREROUTING -m comment --comment \"lb-agent service portals\" -j LBA-SERVICES\n\
                    -A PREROUTING -m comment --comment \"lb-agent portals\" -j LBA-PORTALS\n\
                    -A PREROUTING -j KUBE-SERVICES\n\
                    -A OUTPUT -p tcp -j DNAT --to-destination 10.0.0.1:80\n\
                    -A LBA-SERVICES -p tcp -g LBA-SVC-A\n\
                    -A LBA-PORTALS -j LBA-NODEPORT\n\
                    COMMIT\n";
        let keep = |t: Table, chain: &str, target: &str| {
            (t, chain, target) == (Table::Nat, "PREROUTING", "LBA-SERVICES")
        };
        let (jumps, chains) = leftovers(save, "LBA-", keep);
        assert_eq!(
            jumps,
            BTreeMap::from([(
                Table::Nat,
                vec![
                    "-D PREROUTING -m comment --comment \"lb-agent portals\" -j LBA-PORTALS"
                        .to_string()
                ]
            )]),
            "only the built-in chain's jump to a chain of ours that is not kept"
        );
        assert_eq!(
            chains[&Table::Nat],
            BTreeSet::from(["LBA-NODEPORT", "LBA-ORPHAN", "LBA-PORTALS"].map(String::from)),
            "the kept chain and what it reaches (by -g too) stay; KUBE- is not ours"
        );
        assert_eq!(
            delete_leftovers(&jumps, &chains),
            "*nat\n:LBA-NODEPORT - [0:0]\n:LBA-ORPHAN - [0:0]\n:LBA-PORTALS - [0:0]\n\
             -D PREROUTING -m comment --comment \"lb-agent portals\" -j LBA-PORTALS\n\
             -X LBA-NODEPORT\n-X LBA-ORPHAN\n-X LBA-PORTALS\nCOMMIT\n",
            "chains flushed, then the jumps to them deleted, then the chains"
        );
        let (jumps, chains) = leftovers(save, "LBA-", |_, _, _| false);
        assert_eq!(
            jumps[&Table::Nat].len(),
            2,
            "keeping nothing: every jump of ours"
        );
        assert_eq!(chains[&Table::Nat].len(), 5, "and every chain of ours");
    }
}
