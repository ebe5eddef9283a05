//! Running a back end's iptables programs (through the configured [`CommandFactory`], so tests
//! can run them in a network namespace): the restore of a rule set, the jump rules from the
//! built-in chains, and reading back which of our chains the kernel holds. Shared by every
//! dataplane that programs iptables: the iptables mode and the userspace proxy's redirects.
//!
//! [`CommandFactory`]: super::CommandFactory

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::process::Stdio;

use super::restore;
use super::rules::{JumpRule, Table};
use super::Config;
use crate::model::IpFamily;

/// Which of a back end's programs to run.
#[derive(Clone, Copy, Debug)]
pub enum Tool {
    Iptables,
    Save,
    Restore,
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

impl Config {
    /// Runs `tool` of `family` with `args`, feeding it `stdin`; returns its stdout.
    pub fn run(
        &self,
        family: IpFamily,
        tool: Tool,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, Error> {
        let program = self.backend.tool(family, tool);
        let mut cmd = (self.command)(program);
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
            backend: self.backend.name.clone(),
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

    /// `iptables-restore --noflush --wait` of `input`; nothing to run when it is empty.
    pub fn restore(&self, family: IpFamily, input: &str) -> Result<(), Error> {
        if input.is_empty() {
            return Ok(());
        }
        self.run(family, Tool::Restore, &["--noflush", "--wait"], Some(input))
            .map(drop)
    }

    /// The chains named `prefix...` the kernel holds, from `iptables-save`.
    pub fn chains_with_prefix(
        &self,
        family: IpFamily,
        prefix: &str,
    ) -> Result<BTreeMap<Table, BTreeSet<String>>, Error> {
        let mut found = BTreeMap::new();
        for table in Table::ALL {
            let save = self.run(family, Tool::Save, &["-t", table.as_str()], None)?;
            found.extend(restore::chains_in_save(&save, prefix));
        }
        Ok(found)
    }

    /// Inserts those of `jumps` that are missing (`-C` tells), at the top of their chains, so
    /// that they end up in the listed order.
    pub fn ensure_jumps(&self, family: IpFamily, jumps: &[JumpRule]) -> Result<(), Error> {
        // Inserted at position 1 each, so insert in reverse to keep the listed order.
        for jump in jumps.iter().rev() {
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

    /// Deletes every copy of `jumps` (best effort: a rule that is not there is no error).
    pub fn remove_jumps(&self, family: IpFamily, jumps: &[JumpRule]) {
        for jump in jumps {
            // `-D` removes one copy; a rule inserted twice (two agents raced) needs more.
            for _ in 0..16 {
                let args = jump.command("-D");
                if self.run(family, Tool::Iptables, &args, None).is_err() {
                    break;
                }
            }
        }
    }
}
