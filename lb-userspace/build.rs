//! Builds the eBPF datapath (`lb-ebpf`) so `cargo build` alone yields an agent with its
//! programs embedded. aya-build runs the nightly toolchain with `-Z build-std=core` for
//! `bpfel-unknown-none` and always adds `-C debuginfo=2 -C link-arg=--btf`, which is what
//! gives the pinned maps their BTF field names in `bpftool map dump`.
//! `cargo xtask setup` installs what it needs (nightly rust-src, bpf-linker).

use std::path::Path;

fn main() -> anyhow::Result<()> {
    let manifest_dir = env!("CARGO_MANIFEST_DIR");
    let workspace = Path::new(manifest_dir)
        .parent()
        .ok_or_else(|| anyhow::anyhow!("{manifest_dir} has no parent"))?;
    let ebpf_dir = workspace.join("lb-ebpf");
    let common_dir = workspace.join("lb-common");
    // aya-build watches the eBPF crate; the contract it compiles against matters as much.
    println!("cargo:rerun-if-changed={}", common_dir.display());
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    let package = aya_build::Package {
        name: "lb-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default()).map_err(|e| {
        anyhow::anyhow!(
            "building the eBPF datapath failed: {e:#}\n\
             hint: run `cargo xtask setup` (nightly rust-src and bpf-linker 0.13.0)"
        )
    })
}
