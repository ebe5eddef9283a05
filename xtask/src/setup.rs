//! `cargo xtask setup`: installs what the build and the tests need, skipping what is there.
//! Idempotent: a second run only checks. See shared/TOOLCHAIN.md for why each piece is pinned.

use std::path::Path;
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
