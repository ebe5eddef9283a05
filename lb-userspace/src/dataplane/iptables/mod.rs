//! The iptables dataplane: the desired state programmed as kube-proxy's iptables mode would
//! program it (see `rules.rs` for the layout), with `iptables-restore --noflush --wait`,
//! rewriting only the chains that changed since the last sync.
//!
//! Every sync generates the whole rule set of each family (pure and cheap), compares it with
//! what the last successful sync wrote, and sends only the difference (`restore.rs`). A full
//! sync (the first, the one after a failure, and the one after [`IptablesDataplane::full_resync`],
//! which the owner calls periodically) rewrites every chain of ours, deletes any `LBA-` chain
//! the kernel holds that is not wanted, and checks the jump rules from the built-in chains.

pub mod restore;
pub mod rules;

#[cfg(test)]
mod golden;
#[cfg(test)]
mod tracer;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;

use anyhow::Context as _;

use super::{ApplyReport, Dataplane};
use crate::model::{DesiredState, IpFamily};
use rules::{FamilyRules, JumpRule, Table, CHAIN_PREFIX, JUMP_RULES};

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

#[derive(Clone, Copy)]
enum Tool {
    Iptables,
    Save,
    Restore,
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

/// What went wrong running an iptables program.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run `{program}`: {source}; is the {backend} iptables back end installed (Debian: the `iptables` package)?")]
    Spawn {
        program: String,
        backend: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{program} {args}` failed ({status}): {stderr}")]
    Failed {
        program: String,
        args: String,
        status: String,
        stderr: String,
    },
}

/// Removes what lb-agent's rules left in one back end's tables (every family of `config`):
/// the jumps from built-in chains to `LBA-` chains that `keep` does not name and, when it
/// names none, every `LBA-` chain. An agent starting in one mode calls it for each back end,
/// keeping the jumps of the mode that programs that back end: its first full sync then
/// deletes the chains it does not want, no longer referenced. Returns how many rules and
/// chains went; a back end that is not installed has nothing to remove.
pub fn remove_leftovers(config: Config, keep: &[JumpRule]) -> anyhow::Result<usize> {
    IptablesDataplane::new(config).remove_leftovers(keep)
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

    /// Removes, in every configured family, the rules in built-in chains that jump to an
    /// `LBA-` chain and are not in `keep`, and, when `keep` is empty, every `LBA-` chain.
    /// Returns how many rules and chains went; a back end that is not installed has none.
    fn remove_leftovers(&self, keep: &[JumpRule]) -> anyhow::Result<usize> {
        let kept = |table, chain: &str, target: &str| {
            keep.iter()
                .any(|j| (j.table, j.chain, j.target) == (table, chain, target))
        };
        let mut removed = 0;
        for &family in &self.config.families {
            let mut jumps = BTreeMap::new();
            for table in Table::ALL {
                let save = match self.run(family, Tool::Save, &["-t", table.as_str()], None) {
                    Ok(save) => save,
                    Err(Error::Spawn { .. }) => return Ok(removed),
                    Err(e) => return Err(e.into()),
                };
                jumps.extend(restore::foreign_jumps(&save, CHAIN_PREFIX, kept));
            }
            let chains = if keep.is_empty() {
                self.our_chains(family)?
            } else {
                BTreeMap::new()
            };
            let input = restore::delete_leftovers(&jumps, &chains);
            if !input.is_empty() {
                self.run(
                    family,
                    Tool::Restore,
                    &["--noflush", "--wait"],
                    Some(&input),
                )
                .with_context(|| {
                    format!(
                        "removing lb-agent's {family} rules from the {} iptables back end",
                        self.config.backend.name
                    )
                })?;
            }
            removed += jumps.values().map(Vec::len).sum::<usize>()
                + chains.values().map(BTreeSet::len).sum::<usize>();
        }
        Ok(removed)
    }

    fn run(
        &self,
        family: IpFamily,
        tool: Tool,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, Error> {
        let program = self.config.backend.tool(family, tool);
        let mut cmd = (self.config.command)(program);
        cmd.args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawn_err = |source| Error::Spawn {
            program: program.to_string(),
            backend: self.config.backend.name.clone(),
            source,
        };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        if let Some(input) = stdin {
            // A write error shows as the program's failure below.
            let _ = child
                .stdin
                .take()
                .expect("piped")
                .write_all(input.as_bytes());
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(Error::Failed {
                program: program.to_string(),
                args: args.join(" "),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    /// Our chains the kernel holds, from `iptables-save`.
    fn our_chains(&self, family: IpFamily) -> anyhow::Result<BTreeMap<Table, BTreeSet<String>>> {
        let mut found = BTreeMap::new();
        for table in Table::ALL {
            let save = self.run(family, Tool::Save, &["-t", table.as_str()], None)?;
            found.extend(restore::chains_in_save(&save, CHAIN_PREFIX));
        }
        Ok(found)
    }

    /// Inserts the jump rules that are missing (`-C` tells), at the top of their chains.
    fn ensure_jumps(&self, family: IpFamily) -> Result<(), Error> {
        // Inserted at position 1 each, so insert in reverse to keep the listed order.
        for jump in JUMP_RULES.iter().rev() {
            let check = jump.command("-C");
            match self.run(family, Tool::Iptables, &check, None) {
                Ok(_) => continue,
                // `-C` exits 1 when the rule is not there; anything else is a real failure.
                Err(Error::Failed { ref status, .. }) if status.ends_with("exit status: 1") => {}
                Err(e) => return Err(e),
            }
            self.run(family, Tool::Iptables, &jump.command("-I"), None)?;
        }
        Ok(())
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
            (None, self.our_chains(family)?)
        } else {
            (self.last.get(&family), BTreeMap::new())
        };
        let plan = restore::plan(old, &new, &stale);
        // The rules are out of step from here until the restore succeeds.
        self.last.remove(&family);
        if !plan.input.is_empty() {
            self.run(
                family,
                Tool::Restore,
                &["--noflush", "--wait"],
                Some(&plan.input),
            )
            .with_context(|| format!("programming the {family} rules"))?;
        }
        if full {
            self.ensure_jumps(family)?;
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
        report.service_ports = desired.services.len();
        let backends: BTreeSet<_> = desired
            .services
            .values()
            .flat_map(|sp| sp.endpoints.iter().chain(&sp.local_endpoints))
            .collect();
        report.backends = backends.len();
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
        self.remove_leftovers(&[]).map(|_| ())
    }
}
