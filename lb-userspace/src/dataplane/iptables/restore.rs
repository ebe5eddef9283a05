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

/// The rules of built-in chains in `iptables-save` output that jump to a chain starting with
/// `prefix` and that `keep` (given the table, the built-in chain and the target) does not
/// keep, as `-D` lines by table: `iptables-restore --noflush` deletes a rule given in the
/// words `iptables-save` prints it with, quoting included.
pub fn foreign_jumps(
    save: &str,
    prefix: &str,
    keep: impl Fn(Table, &str, &str) -> bool,
) -> BTreeMap<Table, Vec<String>> {
    let mut found: BTreeMap<Table, Vec<String>> = BTreeMap::new();
    let mut table = None;
    for line in save.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = Table::ALL.into_iter().find(|t| t.as_str() == name.trim());
            continue;
        }
        let (Some(t), Some(rule)) = (table, line.strip_prefix("-A ")) else {
            continue;
        };
        let mut words = rule.split_whitespace();
        let chain = words.next().unwrap_or_default();
        let target = rule.rsplit_once(" -j ").map_or("", |(_, t)| t.trim());
        if !chain.starts_with(prefix) && target.starts_with(prefix) && !keep(t, chain, target) {
            found.entry(t).or_default().push(format!("-D {rule}"));
        }
    }
    found
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
    fn leftover_jumps_are_deleted_in_the_words_save_printed_them_unless_kept() {
        let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:LBA-PORTALS - [0:0]\n\
                    -A PREROUTING -m comment --comment \"lb-agent service portals\" -j LBA-SERVICES\n\
                    -A PREROUTING -m comment --comment \"lb-agent portals\" -j LBA-PORTALS\n\
                    -A PREROUTING -j KUBE-SERVICES\n\
                    -A LBA-PORTALS -j LBA-SEP-X\n\
                    COMMIT\n";
        let keep = |t: Table, chain: &str, target: &str| {
            (t, chain, target) == (Table::Nat, "PREROUTING", "LBA-SERVICES")
        };
        let jumps = foreign_jumps(save, "LBA-", keep);
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
        let chains = chains_in_save(save, "LBA-");
        assert_eq!(
            delete_leftovers(&jumps, &chains),
            "*nat\n:LBA-PORTALS - [0:0]\n\
             -D PREROUTING -m comment --comment \"lb-agent portals\" -j LBA-PORTALS\n\
             -X LBA-PORTALS\nCOMMIT\n",
            "jumps go before the chains they reference"
        );
    }
}
