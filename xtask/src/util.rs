//! Small helpers shared by the tasks.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_owned()
}

/// Where cargo puts build outputs: `$CARGO_TARGET_DIR` or `<workspace>/target`.
#[cfg(feature = "testbed")]
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The `cargo` that runs us, so the same toolchain builds everything.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Prints a step header.
pub fn step(text: &str) {
    println!("\n==> {text}");
}

/// Runs `cmd` with inherited output; fails unless it exits successfully.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = show(cmd);
    println!("$ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("starting `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout if it succeeded, `None` if it could not start or
/// failed.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command line as a user would type it.
pub fn show(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Whether `path` is on a bpffs mount (`statfs` magic `BPF_FS_MAGIC`).
pub fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: u64 = 0xcafe_4a11;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statfs is a valid value for statfs to overwrite.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is NUL-terminated and `buf` is valid for writes.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut buf) } != 0 {
        return false;
    }
    // f_type's type and signedness differ between targets; the magic fits in 32 bits.
    (buf.f_type as u64 & 0xffff_ffff) == BPF_FS_MAGIC
}

/// Prefix of everything the test bed creates (`lb_userspace::testbed::PREFIX`); repeated here
/// because this crate builds without lb-userspace (see Cargo.toml).
pub const TESTBED_PREFIX: &str = "lbt-";

/// The owner pid in a test-bed name `lbt-<pid>-...`.
pub fn testbed_owner(name: &str) -> Option<u32> {
    name.strip_prefix(TESTBED_PREFIX)?
        .split('-')
        .next()?
        .parse()
        .ok()
}

pub fn process_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}
