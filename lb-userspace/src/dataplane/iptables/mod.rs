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
pub(crate) mod golden;
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

/// One of a back end's programs, per family.
#[derive(Clone, Copy)]
pub(crate) enum Tool {
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

    /// Removes every chain of ours (`LBA-`, less the IPVS mode's `LBA-IPVS-`) and the jump
    /// rules to them, in every configured family.
    pub fn cleanup(&mut self) -> anyhow::Result<()> {
        self.last.clear();
        self.full = true;
        for family in self.config.families.clone() {
            remove_chains(&self.config, family, JUMP_RULES, owns_chain)?;
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
            (None, chains(&self.config, family, owns_chain)?)
        } else {
            (self.last.get(&family), BTreeMap::new())
        };
        let plan = restore::plan(old, &new, &stale);
        // The rules are out of step from here until the restore succeeds.
        self.last.remove(&family);
        if !plan.input.is_empty() {
            run(
                &self.config,
                family,
                Tool::Restore,
                &["--noflush", "--wait"],
                Some(&plan.input),
            )
            .with_context(|| format!("programming the {family} rules"))?;
        }
        if full {
            ensure_jumps(&self.config, family, JUMP_RULES)?;
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
}

/// Whether a chain named `LBA-...` is this dataplane's: the IPVS mode's `LBA-IPVS-` chains
/// are not (each mode removes its own; see `ipvs::remove_leftovers`).
fn owns_chain(name: &str) -> bool {
    name.starts_with(CHAIN_PREFIX) && !name.starts_with(super::ipvs::rules::CHAIN_PREFIX)
}

// What this dataplane and the IPVS mode's masquerade rules share: running a back end's
// programs, finding chains, and the jump rules from the built-in chains.

/// Runs `tool` of `family` with `args` (and `stdin`), returning its stdout.
pub(crate) fn run(
    config: &Config,
    family: IpFamily,
    tool: Tool,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, Error> {
    let program = config.backend.tool(family, tool);
    let mut cmd = (config.command)(program);
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
        backend: config.backend.name.clone(),
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

/// The chains the kernel holds that `owns` claims, from `iptables-save`.
pub(crate) fn chains(
    config: &Config,
    family: IpFamily,
    owns: fn(&str) -> bool,
) -> anyhow::Result<BTreeMap<Table, BTreeSet<String>>> {
    let mut found = BTreeMap::new();
    for table in Table::ALL {
        let save = run(config, family, Tool::Save, &["-t", table.as_str()], None)?;
        let mut ours = restore::chains_in_save(&save, CHAIN_PREFIX);
        for names in ours.values_mut() {
            names.retain(|n| owns(n));
        }
        ours.retain(|_, names| !names.is_empty());
        found.extend(ours);
    }
    Ok(found)
}

/// Inserts the jump rules that are missing (`-C` tells), at the top of their chains.
pub(crate) fn ensure_jumps(
    config: &Config,
    family: IpFamily,
    jumps: &[JumpRule],
) -> Result<(), Error> {
    // Inserted at position 1 each, so insert in reverse to keep the listed order.
    for jump in jumps.iter().rev() {
        let check = jump.command("-C");
        match run(config, family, Tool::Iptables, &check, None) {
            Ok(_) => continue,
            // `-C` exits 1 when the rule is not there; anything else is a real failure.
            Err(Error::Failed { ref status, .. }) if status.ends_with("exit status: 1") => {}
            Err(e) => return Err(e),
        }
        run(config, family, Tool::Iptables, &jump.command("-I"), None)?;
    }
    Ok(())
}

/// Deletes `jumps` and then every chain `owns` claims, in `family`.
pub(crate) fn remove_chains(
    config: &Config,
    family: IpFamily,
    jumps: &[JumpRule],
    owns: fn(&str) -> bool,
) -> anyhow::Result<()> {
    for jump in jumps {
        // `-D` removes one copy; a rule inserted twice (two agents raced) needs more.
        for _ in 0..16 {
            let args = jump.command("-D");
            if run(config, family, Tool::Iptables, &args, None).is_err() {
                break;
            }
        }
    }
    let chains = chains(config, family, owns)?;
    let input = restore::delete_all(&chains);
    if !input.is_empty() {
        run(
            config,
            family,
            Tool::Restore,
            &["--noflush", "--wait"],
            Some(&input),
        )
        .with_context(|| format!("deleting the {family} chains"))?;
    }
    Ok(())
}
