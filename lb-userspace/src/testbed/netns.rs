//! A network namespace owned by the test bed, deleted when its guard drops (also on panic).
//!
//! Code runs inside it in two ways, neither of which touches the mount namespace (so bpffs
//! under /sys/fs/bpf stays visible, unlike with `ip netns exec`):
//! - [`NetNs::run`] runs a closure on a fresh thread that has `setns(CLONE_NEWNET)`-ed into the
//!   namespace. Sockets created there belong to the namespace for their whole life, so they
//!   can be handed back and used from any thread afterwards.
//! - [`NetNs::command`] prepares a child process that enters the namespace before `exec`.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{io_err, require_root, unique_name, Error, Result};

/// Where `ip netns add` bind-mounts named namespaces.
const NETNS_RUN_DIR: &str = "/run/netns";

/// Runs `cmd`, returning its stdout, or an [`Error::Command`] carrying its stderr.
pub fn check_output(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .output()
        .map_err(io_err(format!("starting `{shown}`")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Command {
            command: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// A named network namespace (`lbt-<pid>-<counter>-<tag>`), deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace with `ip netns add` and brings its `lo` up.
    pub fn new(tag: &str) -> Result<NetNs> {
        require_root()?;
        let name = unique_name(tag);
        check_output(Command::new("ip").args(["netns", "add", &name]))?;
        // From here on the guard owns it: any error below deletes it again.
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mounted namespace file, `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.name)
    }

    /// Runs `f` on a fresh thread inside the namespace and returns its result. A panic in `f`
    /// is re-raised on the calling thread, so assertions inside work as usual.
    pub fn run<F, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let path = self.path();
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name(format!("in-{}", self.name))
                .spawn_scoped(scope, move || -> Result<T> {
                    enter(&path)?;
                    Ok(f())
                })
                .map_err(io_err("spawning a thread"))?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// A multi-thread tokio runtime whose every thread (workers and blocking pool) lives in
    /// the namespace, so the sockets its tasks open belong to it. `block_on` runs on the
    /// caller's thread, outside: code that opens sockets outside a task (a dataplane's
    /// apply) runs inside with [`NetNs::run`] and `runtime.enter()`.
    pub fn tokio_runtime(&self) -> Result<tokio::runtime::Runtime> {
        let path = self.path();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(move || {
                if let Err(e) = enter(&path) {
                    // Nothing to return it to; a thread outside would open sockets in the
                    // wrong namespace, which must not go unnoticed.
                    panic!("{e}");
                }
            })
            .build()
            .map_err(io_err(format!("building a tokio runtime in {}", self.name)))
    }

    /// A command that runs `program` inside the namespace (network namespace only: mounts,
    /// and so bpffs, stay the caller's). Entering can fail only at spawn time, as its error.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.commands()(program.as_ref())
    }

    /// What [`NetNs::command`] does, as a function that outlives `self`'s borrow (for a
    /// dataplane's `CommandFactory`). Only while the namespace exists can its commands run.
    pub fn commands(&self) -> impl Fn(&OsStr) -> Command + Send + Sync + 'static {
        let path = self.path();
        move |program| in_namespace(&path, program)
    }

    /// Runs `program args...` inside the namespace, returning its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        check_output(self.command(program).args(args))
    }

    /// Runs `ip -n <name> args...`, returning its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        check_output(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Writes a sysctl inside the namespace; `key` is dotted (`net.ipv4.ip_forward`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = sysctl_path(key);
        let value = value.to_owned();
        self.run(move || std::fs::write(&path, value.as_bytes()))?
            .map_err(io_err(format!("writing sysctl {key} in {}", self.name)))
    }

    /// Reads a sysctl inside the namespace, trimmed.
    pub fn read_sysctl(&self, key: &str) -> Result<String> {
        let path = sysctl_path(key);
        let value = self
            .run(move || std::fs::read_to_string(&path))?
            .map_err(io_err(format!("reading sysctl {key} in {}", self.name)))?;
        Ok(value.trim().to_owned())
    }
}

/// A command that runs `program` inside the network namespace at `path`.
fn in_namespace(path: &Path, program: &OsStr) -> Command {
    let mut cmd = Command::new(program);
    let path =
        CString::new(path.as_os_str().as_encoded_bytes()).expect("namespace paths contain no NUL");
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
    // functions (open, setns, close); `path` was allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let rc = libc::setns(fd, libc::CLONE_NEWNET);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if rc != 0 {
                return Err(err);
            }
            Ok(())
        });
    }
    cmd
}

/// Moves the calling thread into the network namespace at `path`, for the rest of its life.
fn enter(path: &Path) -> Result<()> {
    let file = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    // SAFETY: setns only reads the descriptor, which `file` keeps open.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(Error::Io {
            what: format!("entering network namespace {}", path.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// `/proc/sys/...` for a dotted sysctl key. /proc/sys/net shows the namespace of the thread
/// that opens it, which is why the sysctl helpers go through [`NetNs::run`].
fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Interfaces inside go with it; a veth's peer in another namespace goes too.
        if let Err(e) = check_output(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!(
                "testbed: could not delete network namespace {}: {e}",
                self.name
            );
        }
    }
}
