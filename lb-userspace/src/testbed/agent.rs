//! A running `lb-agent`, inside the node namespace, stopped on drop.
//!
//! The agent enters only the network namespace (via [`NetNs::command`]), never a new mount
//! namespace as `ip netns exec` would create, so it sees the real bpffs. Its stdout and stderr
//! go to a log file under `std::env::temp_dir()`; progress is read from that log, and the log
//! is printed when a wait fails or when the guard drops during a panic.

use std::cell::Cell;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::netns::{check_output, NetNs};
use super::{io_err, unique_name, Error, Result};

/// The marker the agent logs after every successful apply.
const SYNCED: &str = "synced generation=";

/// How long the agent gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// What one `synced generation=<G> service_ports=<N> backends=<M>` log line says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncInfo {
    pub generation: u64,
    pub service_ports: u64,
    pub backends: u64,
}

impl SyncInfo {
    /// Parses a log line if it reports a sync.
    pub fn parse(line: &str) -> Option<SyncInfo> {
        let at = line.find(SYNCED)?;
        let mut info = SyncInfo::default();
        let mut saw_generation = false;
        for field in line[at + "synced ".len()..].split_whitespace() {
            let Some((key, value)) = field.split_once('=') else {
                continue;
            };
            let value = value.trim_end_matches([',', ';']);
            match key {
                "generation" => {
                    info.generation = value.parse().ok()?;
                    saw_generation = true;
                }
                "service_ports" => info.service_ports = value.parse().ok()?,
                "backends" => info.backends = value.parse().ok()?,
                _ => {}
            }
        }
        saw_generation.then_some(info)
    }
}

/// How an agent is started.
#[derive(Clone, Copy, Debug)]
pub struct Launch<'a> {
    /// `--cleanup`: remove everything at exit (default). Without it the agent leaves its
    /// kernel state for the next run, as in production.
    pub cleanup: bool,
    /// More arguments for `run` (`--node-ip`, `--mode`, ...). Without a `--mode`, `ebpf`.
    pub args: &'a [&'a str],
    /// A program (and its arguments) the agent is started through, e.g. `setpriv` to drop
    /// capabilities. It runs inside the node namespace and must exec the agent.
    pub wrapper: &'a [&'a str],
}

impl Default for Launch<'_> {
    fn default() -> Self {
        Launch {
            cleanup: true,
            args: &[],
            wrapper: &[],
        }
    }
}

/// A running agent. Drop sends SIGTERM (SIGKILL after 2 s) and removes its bpffs directory.
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    binary: PathBuf,
    log_path: PathBuf,
    bpffs_dir: PathBuf,
    /// How much of the log an `Error::Agent` already carried, so a panic does not print it twice.
    reported: Cell<usize>,
}

impl Agent {
    /// Starts `binary run --source dir:<manifest_dir> --iface <each> --bpffs <bpffs_dir>
    /// --cleanup --mode ebpf` inside `node_ns` (`start_with` may give another `--mode`).
    pub fn start(
        node_ns: &NetNs,
        manifest_dir: &Path,
        ifaces: &[String],
        bpffs_dir: &Path,
        binary: &Path,
    ) -> Result<Agent> {
        Self::spawn(
            node_ns,
            manifest_dir,
            ifaces,
            bpffs_dir,
            binary,
            &Launch::default(),
        )
    }

    /// As `start`, with more arguments for `run` (`--node-ip`, say).
    pub fn start_with(
        node_ns: &NetNs,
        manifest_dir: &Path,
        ifaces: &[String],
        bpffs_dir: &Path,
        binary: &Path,
        extra_args: &[&str],
    ) -> Result<Agent> {
        let launch = Launch {
            args: extra_args,
            ..Launch::default()
        };
        Self::spawn(node_ns, manifest_dir, ifaces, bpffs_dir, binary, &launch)
    }

    /// As `start`, without `--cleanup`: the agent leaves its maps pinned when it exits (as in
    /// production), for tests of restarts. Drop still removes the bpffs directory.
    pub fn start_keeping_pins(
        node_ns: &NetNs,
        manifest_dir: &Path,
        ifaces: &[String],
        bpffs_dir: &Path,
        binary: &Path,
    ) -> Result<Agent> {
        let launch = Launch {
            cleanup: false,
            ..Launch::default()
        };
        Self::spawn(node_ns, manifest_dir, ifaces, bpffs_dir, binary, &launch)
    }

    /// As `start`, launched as `launch` says.
    pub fn spawn(
        node_ns: &NetNs,
        manifest_dir: &Path,
        ifaces: &[String],
        bpffs_dir: &Path,
        binary: &Path,
        launch: &Launch,
    ) -> Result<Agent> {
        let Launch {
            cleanup,
            args: extra_args,
            wrapper,
        } = *launch;
        if !binary.is_file() {
            return Err(Error::Invalid(format!(
                "agent binary {} does not exist; build it with `cargo build -p lb-userspace`",
                binary.display()
            )));
        }
        let log_path = std::env::temp_dir().join(format!("{}-agent.log", unique_name("")));
        let log =
            File::create(&log_path).map_err(io_err(format!("creating {}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(io_err("duplicating the log file handle"))?;
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = node_ns.command(program);
                cmd.args(args).arg(binary);
                cmd
            }
            None => node_ns.command(binary),
        };
        cmd.arg("run")
            .arg("--source")
            .arg(format!("dir:{}", manifest_dir.display()));
        for iface in ifaces {
            cmd.arg("--iface").arg(iface);
        }
        cmd.arg("--bpffs").arg(bpffs_dir);
        if cleanup {
            cmd.arg("--cleanup");
        }
        // A test names the mode it tests: under `auto` a node lacking something would quietly
        // test another mode.
        if !extra_args.iter().any(|a| a.starts_with("--mode")) {
            cmd.arg("--mode").arg("ebpf");
        }
        cmd.args(extra_args);
        // The node's name, for EndpointSlices that place endpoints on it.
        cmd.env("NODE_NAME", super::topology::NODE_NAME)
            .env("RUST_LOG_STYLE", "never")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let child = cmd
            .spawn()
            .map_err(io_err(format!("starting {}", binary.display())))?;
        Ok(Agent {
            child: Some(child),
            binary: binary.to_owned(),
            log_path,
            bpffs_dir: bpffs_dir.to_owned(),
            reported: Cell::new(0),
        })
    }

    /// The agent's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    /// Everything the agent has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("(unreadable: {e})\n"))
    }

    /// Every sync the agent has logged so far, in order.
    pub fn syncs(&self) -> Vec<SyncInfo> {
        self.log().lines().filter_map(SyncInfo::parse).collect()
    }

    /// The most recent sync, if any.
    pub fn last_sync(&self) -> Option<SyncInfo> {
        self.syncs().pop()
    }

    /// Waits until the agent logs a sync of generation `generation_at_least` or later and
    /// returns the latest sync. Fails, with the log, on timeout or if the agent exits.
    pub fn wait_synced(&mut self, generation_at_least: u64, timeout: Duration) -> Result<SyncInfo> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(last) = self.last_sync() {
                if last.generation >= generation_at_least {
                    return Ok(last);
                }
            }
            if let Some(status) = self.exited()? {
                return Err(self.error(format!(
                    "exited ({status}) before syncing generation {generation_at_least}"
                )));
            }
            if Instant::now() >= deadline {
                return Err(self.error(format!(
                    "no `{SYNCED}{generation_at_least}` (or later) within {timeout:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Runs `lb-agent dump --bpffs <dir>` and returns what it printed.
    pub fn dump(&self) -> Result<String> {
        check_output(
            std::process::Command::new(&self.binary)
                .arg("dump")
                .arg("--bpffs")
                .arg(&self.bpffs_dir),
        )
    }

    /// Stops the agent (SIGTERM, SIGKILL after 2 s) and returns how it exited.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            return Err(Error::Invalid("the agent was already stopped".into()));
        };
        if let Some(status) = child.try_wait().map_err(io_err("waiting for lb-agent"))? {
            return Ok(status);
        }
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().map_err(io_err("waiting for lb-agent"))? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "testbed: lb-agent did not exit within {STOP_GRACE:?} of SIGTERM; sending SIGKILL"
        );
        let _ = child.kill();
        child.wait().map_err(io_err("waiting for lb-agent"))
    }

    /// The exit status if the agent has exited.
    fn exited(&mut self) -> Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => child.try_wait().map_err(io_err("waiting for lb-agent")),
            None => Ok(None),
        }
    }

    fn error(&self, what: String) -> Error {
        let log = self.log();
        self.reported.set(log.len());
        Error::Agent {
            what,
            log_path: self.log_path.clone(),
            log,
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            if let Err(e) = self.stop() {
                eprintln!("testbed: stopping lb-agent: {e}");
            }
        }
        if std::thread::panicking() {
            // Keep the file for inspection and show what no error has shown yet.
            let log = self.log();
            let unseen = log.get(self.reported.get()..).unwrap_or_default();
            if unseen.is_empty() {
                eprintln!("lb-agent log kept at {}", self.log_path.display());
            } else {
                eprintln!(
                    "----- lb-agent log ({}) -----\n{unseen}----- end of lb-agent log -----",
                    self.log_path.display()
                );
            }
        } else {
            let _ = std::fs::remove_file(&self.log_path);
        }
        match std::fs::remove_dir_all(&self.bpffs_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => eprintln!(
                "testbed: could not remove {}: {e}",
                self.bpffs_dir.display()
            ),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sync_lines() {
        let line =
            "[2025-01-01T00:00:00Z INFO  lb_agent] synced generation=7 service_ports=2 backends=6";
        assert_eq!(
            SyncInfo::parse(line),
            Some(SyncInfo {
                generation: 7,
                service_ports: 2,
                backends: 6
            })
        );
        assert_eq!(
            SyncInfo::parse("synced generation=3").map(|s| s.generation),
            Some(3)
        );
        assert_eq!(SyncInfo::parse("watching /tmp/x"), None);
        assert_eq!(SyncInfo::parse("synced generation=x"), None);
    }
}
