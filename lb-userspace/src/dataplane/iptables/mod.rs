//! The iptables dataplane: the desired state programmed as kube-proxy's iptables mode would
//! program it (see `rules.rs` for the layout), with `iptables-restore --noflush --wait`,
//! rewriting only the chains that changed since the last sync.
//!
//! Every sync generates the whole rule set of each family (pure and cheap), compares it with
//! what the last successful sync wrote, and sends only the difference (`restore.rs`). A full
//! sync (the first, the one after a failure, and the one after [`IptablesDataplane::full_resync`],
//! which the owner calls periodically) rewrites every chain of ours, deletes any `LBA-` chain
//! the kernel holds that is not wanted, and checks the jump rules from the built-in chains.

pub mod exec;
pub mod restore;
pub mod rules;

#[cfg(test)]
mod golden;
#[cfg(test)]
mod tracer;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::Arc;

use anyhow::Context as _;

use super::{ApplyReport, Dataplane};
use crate::model::{DesiredState, IpFamily};
pub use exec::{Error, Tool};
use rules::{FamilyRules, CHAIN_PREFIX, JUMP_RULES};

/// The iptables programs of one back end, per family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// For messages: `system`, `nft`, `legacy`.
    pub name: String,
    pub iptables: String,
    pub iptables_save: String,
    pub iptables_restore: String,
    pub ip6tables: String,
    pub ip6tables_save: String,
    pub ip6tables_restore: String,
}

impl Backend {
    fn with(name: &str, infix: &str) -> Backend {
        Backend {
            name: name.to_string(),
            iptables: format!("iptables{infix}"),
            iptables_save: format!("iptables{infix}-save"),
            iptables_restore: format!("iptables{infix}-restore"),
            ip6tables: format!("ip6tables{infix}"),
            ip6tables_save: format!("ip6tables{infix}-save"),
            ip6tables_restore: format!("ip6tables{infix}-restore"),
        }
    }

    /// Whatever `iptables` is on the PATH (Debian's alternatives choose nft or legacy).
    pub fn system() -> Backend {
        Backend::with("system", "")
    }

    /// The nf_tables back end (`iptables-nft`, ...).
    pub fn nft() -> Backend {
        Backend::with("nft", "-nft")
    }

    /// The legacy x_tables back end (`iptables-legacy`, ...).
    pub fn legacy() -> Backend {
        Backend::with("legacy", "-legacy")
    }

    /// The other back ends this node may have rules in: for `system`, the one `iptables -V`
    /// says it is not (both when it does not say).
    pub fn others(&self) -> Vec<Backend> {
        let variant = match self.name.as_str() {
            "system" => Command::new(&self.iptables)
                .arg("-V")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default(),
            name => name.to_string(),
        };
        let mut others = Vec::new();
        if !variant.contains("nf_tables") && variant != "nft" {
            others.push(Backend::nft());
        }
        if !variant.contains("legacy") {
            others.push(Backend::legacy());
        }
        others
    }

    fn tool(&self, family: IpFamily, tool: Tool) -> &str {
        match (family, tool) {
            (IpFamily::V4, Tool::Iptables) => &self.iptables,
            (IpFamily::V4, Tool::Save) => &self.iptables_save,
            (IpFamily::V4, Tool::Restore) => &self.iptables_restore,
            (IpFamily::V6, Tool::Iptables) => &self.ip6tables,
            (IpFamily::V6, Tool::Save) => &self.ip6tables_save,
            (IpFamily::V6, Tool::Restore) => &self.ip6tables_restore,
        }
    }
}

/// Makes the `Command` that runs a program: by default the program itself; tests run it in a
/// network namespace (`NetNs::command`).
pub type CommandFactory = Arc<dyn Fn(&str) -> Command + Send + Sync>;

/// How the dataplane runs.
#[derive(Clone)]
pub struct Config {
    pub backend: Backend,
    /// The families to program (both by default; a node without IPv6 leaves out `V6`).
    pub families: Vec<IpFamily>,
    pub command: CommandFactory,
}

impl Config {
    pub fn new(backend: Backend) -> Config {
        Config {
            backend,
            families: vec![IpFamily::V4, IpFamily::V6],
            command: Arc::new(|program| Command::new(program)),
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("backend", &self.backend)
            .field("families", &self.families)
            .finish_non_exhaustive()
    }
}

/// Removes what lb-agent's rules left in one back end's tables, in every family of
/// `config`: the jumps from built-in chains to `LBA-` chains that `keep` does not name, then
/// every `LBA-` chain no built-in chain reaches any more (see [`restore::leftovers`]). With
/// `keep` empty, that is everything; given the jumps of the mode about to program this back
/// end, that mode's chains stay (no gap in service on a restart) and every other mode's go.
/// Returns how many rules and chains went; a back end that is not installed has none.
pub fn remove_leftovers(config: &Config, keep: &[rules::JumpRule]) -> anyhow::Result<usize> {
    let kept = |table, chain: &str, target: &str| {
        keep.iter()
            .any(|j| (j.table, j.chain, j.target) == (table, chain, target))
    };
    let mut removed = 0;
    for &family in &config.families {
        let save = match config.run(family, Tool::Save, &[], None) {
            Ok(save) => save,
            Err(Error::Spawn { .. }) => return Ok(removed),
            Err(e) => return Err(e.into()),
        };
        let (jumps, chains) = restore::leftovers(&save, CHAIN_PREFIX, kept);
        config
            .restore(family, &restore::delete_leftovers(&jumps, &chains))
            .with_context(|| {
                format!(
                    "removing lb-agent's leftover {family} rules from the {} iptables",
                    config.backend.name
                )
            })?;
        removed += jumps.values().map(Vec::len).sum::<usize>()
            + chains.values().map(BTreeSet::len).sum::<usize>();
    }
    Ok(removed)
}

/// The dataplane. Holds what the last successful sync wrote, per family.
pub struct IptablesDataplane {
    config: Config,
    last: BTreeMap<IpFamily, FamilyRules>,
    /// The next apply rewrites everything: set at start, by `full_resync` and after a failure.
    full: bool,
    /// The last apply failed.
    failed: bool,
}

impl IptablesDataplane {
    pub fn new(config: Config) -> IptablesDataplane {
        IptablesDataplane {
            config,
            last: BTreeMap::new(),
            full: true,
            failed: false,
        }
    }

    fn sync_family(
        &mut self,
        family: IpFamily,
        desired: &DesiredState,
        report: &mut ApplyReport,
    ) -> anyhow::Result<()> {
        let new = rules::generate(desired, family);
        let full = self.full || !self.last.contains_key(&family);
        let (old, stale) = if full {
            (None, self.config.chains_with_prefix(family, CHAIN_PREFIX)?)
        } else {
            (self.last.get(&family), BTreeMap::new())
        };
        let plan = restore::plan(old, &new, &stale);
        // The rules are out of step from here until the restore succeeds.
        self.last.remove(&family);
        self.config
            .restore(family, &plan.input)
            .with_context(|| format!("programming the {family} rules"))?;
        if full {
            self.config.ensure_jumps(family, JUMP_RULES)?;
        }
        report.writes += plan.written;
        report.deletes += plan.deleted;
        self.last.insert(family, new);
        Ok(())
    }
}

impl Dataplane for IptablesDataplane {
    fn apply(&mut self, desired: &DesiredState) -> anyhow::Result<ApplyReport> {
        let mut report = ApplyReport::default();
        for family in self.config.families.clone() {
            if let Err(e) = self.sync_family(family, desired, &mut report) {
                self.failed = true;
                self.full = true;
                return Err(e);
            }
        }
        self.failed = false;
        self.full = false;
        report.count(desired);
        Ok(report)
    }

    fn needs_retry(&self) -> bool {
        self.failed
    }

    /// Makes the next apply a full sync: every chain rewritten, strays deleted, jump rules
    /// checked. The owner calls it periodically (kube-proxy's `--iptables-sync-period`), so
    /// rules someone else changed or removed come back.
    fn full_resync(&mut self) -> bool {
        self.full = true;
        true
    }

    /// Removes every `LBA-` chain and the jump rules to them, in every configured family.
    fn cleanup(&mut self) -> anyhow::Result<()> {
        self.last.clear();
        self.full = true;
        remove_leftovers(&self.config, &[]).map(drop)
    }
}
