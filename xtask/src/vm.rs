//! The oldest kernel we test, Debian's 6.1, booted with virtme-ng under software emulation
//! (shared/TOOLCHAIN.md, "Other kernels"): `ensure` installs the pieces (from setup), `Kit::find`
//! finds them or says what is missing, `Kit::run` boots the kernel, runs a shell command in the
//! guest and streams its output.
//!
//! Everything downloaded lives in one cache directory (`$XDG_CACHE_HOME/lb-agent`, else
//! `~/.cache/lb-agent`), shared by every clone and worktree: the virtme-ng venv and the kernel
//! unpacked from its Debian package (and helm's venv, from setup). The guest sees the host's filesystem read-only, so that
//! directory, the venv and the test binaries must not be under a path the guest hides.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::setup;
use crate::util::{self, is_root, output};

/// Debian packages virtme-ng needs (qemu, busybox for its initramfs, depmod for the modules)
/// and the venv module of the system's python3, which its venv is made with.
pub const DEBIAN_PACKAGES: [&str; 4] =
    ["qemu-system-x86", "kmod", "busybox-static", "python3-venv"];

/// The virtme-ng release verified here (its console fallback and exit reporting are described
/// in `Kit::run`).
const VIRTME_NG_VERSION: &str = "1.42";

/// The kernel series of the tier; Debian ships it as `linux-image-6.1.0-<abi>-amd64`.
pub const KERNEL_SERIES: &str = "6.1";
const KERNEL_PREFIX: &str = "6.1.0-";
const KERNEL_FLAVOUR: &str = "-amd64";

/// Where virtme-ng 1.42 mounts an empty tmpfs in the guest (or where the host is not visible):
/// files under these are not there for the guest.
const HIDDEN_IN_GUEST: [&str; 10] = [
    "/var/log",
    "/var/tmp",
    "/var/cache",
    "/var/lib/apt",
    "/var/lib/private",
    "/run",
    "/dev",
    "/proc",
    "/sys",
    "/usr/lib/modules",
];

/// The cache directory for what setup downloads: helm, and what the VM tier needs.
pub fn cache_dir() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .context("neither XDG_CACHE_HOME nor HOME is set: no cache directory for helm, virtme-ng and the VM kernel")?,
        )
        .join(".cache"),
    };
    Ok(base.join("lb-agent"))
}

/// Fails if the guest would not see `path` (see `HIDDEN_IN_GUEST`).
pub fn check_visible_in_guest(path: &Path, what: &str) -> anyhow::Result<()> {
    if let Some(hidden) = HIDDEN_IN_GUEST.iter().find(|h| path.starts_with(h)) {
        bail!(
            "{what} {} is under {hidden}, which the virtme-ng guest does not see; move it (XDG_CACHE_HOME, CARGO_TARGET_DIR) elsewhere",
            path.display()
        );
    }
    Ok(())
}

fn venv_dir(cache: &Path) -> PathBuf {
    cache.join(format!("virtme-ng-{VIRTME_NG_VERSION}"))
}

fn kernels_dir(cache: &Path) -> PathBuf {
    cache.join("kernels")
}

/// A kernel unpacked from its Debian package, with its modules indexed.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `uname -r` of the kernel, e.g. `6.1.0-56-amd64`.
    pub version: String,
    /// The folder `dpkg -x` unpacked into (it holds `boot/` and `lib/modules/`).
    pub root: PathBuf,
}

impl Kernel {
    pub fn image(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.version))
    }

    fn complete(&self) -> bool {
        self.image().is_file()
            && self
                .root
                .join("lib/modules")
                .join(&self.version)
                .join("modules.dep")
                .is_file()
    }
}

/// The Debian ABI number of a 6.1 kernel version (`6.1.0-56-amd64` -> 56).
fn abi(version: &str) -> Option<u32> {
    version
        .strip_prefix(KERNEL_PREFIX)?
        .strip_suffix(KERNEL_FLAVOUR)?
        .parse()
        .ok()
}

/// The newest complete 6.1 kernel in the cache.
fn cached_kernel(cache: &Path) -> Option<Kernel> {
    let dir = kernels_dir(cache);
    std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().into_owned();
            abi(&version)?;
            Some(Kernel {
                root: dir.join(&version),
                version,
            })
        })
        .filter(Kernel::complete)
        .max_by_key(|k| abi(&k.version))
}

/// What the tier runs with.
pub struct Kit {
    /// The venv's `bin`, put first on PATH: vng runs `virtme-run` from PATH.
    venv_bin: PathBuf,
    pub kernel: Kernel,
}

/// What the guest printed and how it ended.
pub struct Run {
    /// Seconds from starting vng until the guest command printed its first line.
    pub boot_secs: Option<f64>,
    pub secs: f64,
    /// `uname -r` in the guest.
    pub guest_kernel: Option<String>,
    /// The exit status of the guest command, when it reported one.
    pub exit: Option<i32>,
    pub timed_out: bool,
    /// The last console lines before the guest command started (kernel and virtme-ng-init
    /// messages), to show when it never did.
    pub boot_tail: Vec<String>,
}

/// The guest command's first and last lines, which `Kit::run` adds around it.
const BOOTED: &str = "lb-vm: booted kernel ";
const EXITED: &str = "lb-vm: exit ";

impl Kit {
    /// The installed kit, or what is missing (each with what to do).
    pub fn find() -> Result<Kit, Vec<String>> {
        let mut missing = Vec::new();
        for tool in [
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("busybox", "busybox-static"),
            ("depmod", "kmod"),
        ] {
            if !on_path(tool.0) {
                missing.push(format!("{} (Debian package {})", tool.0, tool.1));
            }
        }
        let cache = match cache_dir() {
            Ok(c) => c,
            Err(e) => {
                missing.push(format!("{e:#}"));
                return Err(missing);
            }
        };
        let venv_bin = venv_dir(&cache).join("bin");
        if !vng_works(&venv_bin) {
            missing.push(format!(
                "virtme-ng {VIRTME_NG_VERSION} in {}",
                venv_dir(&cache).display()
            ));
        }
        let kernel = cached_kernel(&cache);
        if kernel.is_none() {
            missing.push(format!(
                "Debian's linux-image-{KERNEL_PREFIX}*{KERNEL_FLAVOUR} unpacked under {}",
                kernels_dir(&cache).display()
            ));
        }
        if let Err(e) = check_visible_in_guest(&cache, "the cache directory") {
            missing.push(format!("{e:#}"));
        }
        match kernel {
            Some(kernel) if missing.is_empty() => Ok(Kit { venv_bin, kernel }),
            _ => Err(missing),
        }
    }

    /// Boots the kernel (software emulation: nested KVM guests hang at boot on these
    /// machines), runs `command` with `sh` in the guest, in `cwd`, as root, and hands each
    /// line it prints to `on_line`. Kills the VM after `timeout`.
    ///
    /// With Debian's kernel virtme-ng 1.42 finds no virtio-serial ports for the command's
    /// output (its udev rules make them, and there is no udevd), so it falls back to the
    /// serial console: the output arrives only with `--verbose`, on vng's stderr, mixed with
    /// the kernel's messages, and vng exits 255 whatever the command returned. So the command is wrapped
    /// in marker lines (`lb-vm: booted kernel ...`, `lb-vm: exit N`) that give the boot time
    /// and the exit status.
    pub fn run(
        &self,
        command: &str,
        cwd: &Path,
        timeout: Duration,
        mut on_line: impl FnMut(&str),
    ) -> anyhow::Result<Run> {
        let script = format!(
            "echo \"{BOOTED}$(uname -r)\"; mount -t bpf bpf /sys/fs/bpf && {command}; echo \"{EXITED}$?\""
        );
        let path = std::env::join_paths(std::iter::once(self.venv_bin.clone()).chain(
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
        ))
        .context("building PATH for vng")?;
        let mut cmd = Command::new(self.venv_bin.join("vng"));
        cmd.args(["--disable-kvm", "--verbose", "--run"])
            .arg(self.kernel.image())
            .args(["--memory", "1G", "--cpus", "2", "--exec", &script])
            .env("PATH", path)
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so a timeout can kill vng and the qemu it forks together.
            .process_group(0);
        println!("$ {}", util::show(&cmd));
        let started = Instant::now();
        let mut child = cmd.spawn().context("starting vng")?;
        let (tx, rx) = mpsc::channel();
        // The guest's console (kernel messages and, here, the command's output) arrives on
        // stderr; the command's stdout port, when the guest has one, on stdout.
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        forward_lines(stdout, tx.clone());
        forward_lines(stderr, tx);

        let mut run = Run {
            boot_secs: None,
            secs: 0.0,
            guest_kernel: None,
            exit: None,
            timed_out: false,
            boot_tail: Vec::new(),
        };
        let deadline = started + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if run.boot_secs.is_none() {
                        if let Some(kernel) = line.strip_prefix(BOOTED) {
                            run.boot_secs = Some(started.elapsed().as_secs_f64());
                            run.guest_kernel = Some(kernel.trim().to_owned());
                            println!("{line}");
                        } else {
                            run.boot_tail.push(line);
                            if run.boot_tail.len() > 40 {
                                run.boot_tail.remove(0);
                            }
                        }
                        continue;
                    }
                    println!("{line}");
                    if let Some(code) = line.strip_prefix(EXITED) {
                        run.exit = code.trim().parse().ok();
                    }
                    on_line(&line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    run.timed_out = true;
                    // SAFETY: kill has no memory-safety preconditions; the group is the one
                    // made for the child above, so nothing else is signalled.
                    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                    break;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let status = child.wait().context("waiting for vng")?;
        run.secs = started.elapsed().as_secs_f64();
        if run.exit.is_none() && !run.timed_out {
            println!("vng exited ({status}) without the guest command reporting its exit status");
        }
        Ok(run)
    }
}

/// Sends each line read from `from` (lossily decoded, without its line end) to `to`, from
/// a thread of its own, until either side closes.
fn forward_lines(from: impl std::io::Read + Send + 'static, to: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let mut buf = Vec::new();
        while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            let line = String::from_utf8_lossy(&buf);
            if to
                .send(line.trim_end_matches(['\n', '\r']).to_owned())
                .is_err()
            {
                break;
            }
            buf.clear();
        }
    });
}

fn on_path(tool: &str) -> bool {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|d| d.join(tool).is_file())
}

fn vng_works(venv_bin: &Path) -> bool {
    output(Command::new(venv_bin.join("vng")).arg("--version"))
        .is_some_and(|v| v.split_whitespace().any(|w| w == VIRTME_NG_VERSION))
}

/// Installs the VM tier's pieces that are missing. Returns what is still missing, with why,
/// instead of failing: the other tiers do not need any of it.
pub fn ensure() -> Vec<String> {
    // Packages missing without root are reported by `debian_packages` itself.
    let mut missing = match setup::debian_packages("VM tier", &DEBIAN_PACKAGES) {
        Ok(m) => m,
        Err(e) => vec![report_missing(format!(
            "Debian packages {}: {e:#}",
            DEBIAN_PACKAGES.join(" ")
        ))],
    };
    let visible = cache_dir().and_then(|c| {
        check_visible_in_guest(&c, "the cache directory")?;
        Ok(c)
    });
    let cache = match visible {
        Ok(c) => c,
        Err(e) => {
            // Nothing downloaded would be of use.
            missing.push(report_missing(format!("{e:#}")));
            return missing;
        }
    };
    if let Err(e) = virtme_ng(&cache) {
        missing.push(report_missing(format!(
            "virtme-ng {VIRTME_NG_VERSION}: {e:#}"
        )));
    }
    if let Err(e) = kernel(&cache) {
        missing.push(report_missing(format!(
            "Debian {KERNEL_SERIES} kernel: {e:#}"
        )));
    }
    missing
}

/// Reports a missing piece and returns it.
fn report_missing(what: String) -> String {
    println!("setup: MISSING for the VM tier: {what}");
    what
}

/// virtme-ng from PyPI, in a venv of its own (see `setup::pip_venv`).
fn virtme_ng(cache: &Path) -> anyhow::Result<()> {
    let venv = venv_dir(cache);
    let bin = venv.join("bin");
    setup::pip_venv(
        &format!("virtme-ng {VIRTME_NG_VERSION}"),
        &venv,
        &format!("virtme-ng=={VIRTME_NG_VERSION}"),
        || vng_works(&bin),
    )
}

/// Debian's newest 6.1 kernel package, unpacked into the cache with its modules indexed
/// (virtme-ng uses the modules beside the image). A kernel already there is kept, so the
/// tier does not change kernels behind our back when Debian publishes a new ABI.
fn kernel(cache: &Path) -> anyhow::Result<()> {
    if let Some(k) = cached_kernel(cache) {
        println!(
            "setup: skip  kernel {}: unpacked in {}",
            k.version,
            k.root.display()
        );
        return Ok(());
    }
    let mut newest = newest_kernel_package()?;
    if newest.is_none() && is_root() {
        // apt-cache finds nothing before the package lists are fetched.
        util::run(Command::new("apt-get").arg("update"))?;
        newest = newest_kernel_package()?;
    }
    let Some(version) = newest else {
        bail!(
            "apt-cache finds no linux-image-{KERNEL_PREFIX}<abi>{KERNEL_FLAVOUR} package; run `apt-get update` as root (Debian 12 sources needed)"
        );
    };
    let package = format!("linux-image-{version}");
    println!(
        "setup: download {package} and unpack it under {}",
        kernels_dir(cache).display()
    );
    let staging = kernels_dir(cache).join(format!(".staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let result = (|| {
        let mut download = Command::new("apt-get");
        if is_root() {
            // Otherwise apt warns that its sandbox user cannot write here, and works anyway.
            download.args(["-o", "APT::Sandbox::User=root"]);
        }
        util::run(download.args(["download", &package]).current_dir(&staging))?;
        let deb = std::fs::read_dir(&staging)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .context("apt-get download left no .deb")?;
        let root = staging.join("root");
        util::run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
        util::run(Command::new("depmod").arg("-b").arg(&root).arg(&version))?;
        let kernel = Kernel {
            root: kernels_dir(cache).join(&version),
            version: version.clone(),
        };
        let _ = std::fs::remove_dir_all(&kernel.root);
        // Renamed into place only when complete, so a kernel found in the cache is whole.
        std::fs::rename(&root, &kernel.root)
            .with_context(|| format!("moving the kernel to {}", kernel.root.display()))?;
        anyhow::ensure!(
            kernel.complete(),
            "{} is incomplete after unpacking",
            kernel.root.display()
        );
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// The newest `linux-image-6.1.0-<abi>-amd64` apt knows (its version, `6.1.0-<abi>-amd64`).
fn newest_kernel_package() -> anyhow::Result<Option<String>> {
    let pattern = format!(
        "^linux-image-{}[0-9]+{}$",
        KERNEL_PREFIX.replace('.', "\\."),
        KERNEL_FLAVOUR
    );
    let found = output(Command::new("apt-cache").args(["search", "--names-only", &pattern]))
        .context("`apt-cache search` failed: is this Debian?")?;
    Ok(found
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.strip_prefix("linux-image-"))
        .filter(|v| abi(v).is_some())
        .max_by_key(|v| abi(v))
        .map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_numbers_order_kernels() {
        assert_eq!(abi("6.1.0-56-amd64"), Some(56));
        assert_eq!(abi("6.1.0-9-amd64"), Some(9));
        assert_eq!(abi("6.1.0-56-cloud-amd64"), None);
        assert_eq!(abi("6.12.117+deb12-amd64"), None);
    }

    #[test]
    fn guest_hidden_paths_are_refused() {
        assert!(check_visible_in_guest(Path::new("/root/.cache/lb-agent"), "x").is_ok());
        assert!(check_visible_in_guest(Path::new("/tmp/k"), "x").is_ok());
        assert!(check_visible_in_guest(Path::new("/var/tmp/k"), "x").is_err());
        assert!(check_visible_in_guest(Path::new("/var/cache/lb-agent"), "x").is_err());
    }
}
