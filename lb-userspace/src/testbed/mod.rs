//! Test bed shared by the end-to-end tests, the `cargo xtask demo` and the benchmarks: network
//! namespaces wired into a small cluster-like topology, name-answering servers and clients
//! inside them, and a guard around a running `lb-agent`.
//!
//! Everything here needs root (network namespaces, bpffs) and cleans up after itself on drop,
//! also while a test panics. Traffic never leaves the namespaces this module creates: they have
//! no route out (see `topology`). Every name it creates starts with [`PREFIX`] and carries the
//! process id, so parallel runs never collide and leftovers can be traced to their owner.

pub mod agent;
pub mod bed;
pub mod http;
pub mod manifest;
pub mod netns;
pub mod packet;
pub mod servers;
pub mod state;
pub mod topology;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of every network namespace, bpffs directory, temporary directory and log file the
/// test bed creates: `lbt-<pid>-<counter>...`.
pub const PREFIX: &str = "lbt-";

/// What went wrong while building or driving the test bed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the test bed needs root (network namespaces, bpffs); run it through `sudo cargo xtask test` or as root")]
    NotRoot,
    #[error("invalid test-bed request: {0}")]
    Invalid(String),
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not a bpffs mount; mount it with `mount -t bpf bpf {0}` (or run `cargo xtask setup`)")]
    NoBpffs(PathBuf),
    #[error(
        "lb-agent: {what}\n----- agent log ({log_path}) -----\n{log}----- end of agent log -----"
    )]
    Agent {
        what: String,
        log_path: PathBuf,
        log: String,
    },
}

/// Result of test-bed operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a description to an `io::Error`.
pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Fails with [`Error::NotRoot`] unless the effective user is root.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        Ok(())
    } else {
        Err(Error::NotRoot)
    }
}

/// A name unique to this process and call: `lbt-<pid>-<counter>`, followed by `-<tag>` when
/// `tag` is not empty.
pub fn unique_name(tag: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    if tag.is_empty() {
        format!("{PREFIX}{pid}-{n}")
    } else {
        format!("{PREFIX}{pid}-{n}-{tag}")
    }
}

/// The process id encoded in a test-bed name made by [`unique_name`], if it is one.
pub fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

/// Where bpffs is expected to be mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// `statfs` magic number of bpffs (linux/magic.h `BPF_FS_MAGIC`).
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

/// Checks that `path` lies on a bpffs mount.
pub fn check_bpffs(path: &Path) -> Result<()> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::NoBpffs(path.to_owned()))?;
    // SAFETY: statfs writes only into `buf`, which is a valid, writable `statfs`.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a valid NUL-terminated string and `buf` is valid for writes.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut buf) } != 0 {
        return Err(Error::NoBpffs(path.to_owned()));
    }
    // f_type's type and signedness differ between targets; the magic fits in 32 bits.
    if (buf.f_type as u64 & 0xffff_ffff) == BPF_FS_MAGIC {
        Ok(())
    } else {
        Err(Error::NoBpffs(path.to_owned()))
    }
}

/// A fresh bpffs directory path for one agent, `/sys/fs/bpf/lbt-<pid>-<counter>` (not
/// created: the agent creates it, [`agent::Agent`] removes it).
pub fn unique_bpffs_dir() -> Result<PathBuf> {
    check_bpffs(Path::new(BPFFS_ROOT))?;
    Ok(Path::new(BPFFS_ROOT).join(unique_name("")))
}

/// A temporary directory under `std::env::temp_dir()`, removed with its contents on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/lbt-<pid>-<counter>-<tag>`.
    pub fn new(tag: &str) -> Result<TempDir> {
        let path = std::env::temp_dir().join(unique_name(tag));
        std::fs::create_dir_all(&path).map_err(io_err(format!("creating {}", path.display())))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `dir/name` atomically: into a staging file in `dir`'s parent
    /// first (same filesystem, outside the watched directory), then renamed into place, so a
    /// watcher of `dir` never sees a half-written file.
    pub fn write_atomic(dir: &Path, name: &str, contents: &str) -> Result<()> {
        let parent = dir.parent().unwrap_or(dir);
        let staging = parent.join(format!(".{}.staging", unique_name("")));
        std::fs::write(&staging, contents)
            .map_err(io_err(format!("writing {}", staging.display())))?;
        let target = dir.join(name);
        std::fs::rename(&staging, &target).map_err(|source| {
            let _ = std::fs::remove_file(&staging);
            Error::Io {
                what: format!("renaming {} to {}", staging.display(), target.display()),
                source,
            }
        })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                eprintln!("testbed: could not remove {}: {e}", self.path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_carry_prefix_pid_and_differ() {
        let a = unique_name("node");
        let b = unique_name("node");
        assert_ne!(a, b);
        assert!(a.starts_with(PREFIX) && a.ends_with("-node"), "{a}");
        assert_eq!(owner_pid(&a), Some(std::process::id()));
        assert_eq!(owner_pid(&unique_name("")), Some(std::process::id()));
        assert_eq!(owner_pid("other-ns"), None);
        assert_eq!(owner_pid("lbt-x-1"), None);
    }

    #[test]
    fn temp_dir_is_removed_on_drop() {
        let dir = TempDir::new("unit").unwrap();
        let path = dir.path().to_owned();
        let watched = path.join("watched");
        std::fs::create_dir(&watched).unwrap();
        TempDir::write_atomic(&watched, "a.yaml", "x: 1\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(watched.join("a.yaml")).unwrap(),
            "x: 1\n"
        );
        assert_eq!(std::fs::read_dir(&watched).unwrap().count(), 1);
        drop(dir);
        assert!(!path.exists());
    }
}
