//! `cargo xtask <task>`: what cargo cannot do alone.
//!
//! - `setup`: installs the toolchain pieces and system tools the build and tests need.
//! - `test`: runs every test tier (unit, datapath fixtures, end to end, datapath fixtures on
//!   Debian's 6.1 kernel in a VM) and summarises them.
//! - `demo`: a walk through the load balancer in network namespaces, for an operator.
//! - `render-manifests`: renders the Helm chart into `manifests/rendered/lb-agent.yaml`.

mod demo;
mod manifests;
mod setup;
mod tiers;
mod util;
mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "lb-agent project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: Debian tools, nightly rust-src, bpf-linker, helm, virtme-ng
    /// and Debian's 6.1 kernel for the VM tier; mount bpffs.
    Setup,
    /// Run setup, then every test tier, and print a summary (tiers 2 and 3 need root).
    Test,
    /// Run setup, build the agent and show it balancing traffic between namespaces (root).
    Demo {
        /// Skip setup and the agent build (used when the demo re-runs itself).
        #[arg(long, hide = true)]
        prepared: bool,
    },
    /// Render the Helm chart (manifests/charts/lb-agent, default values) into
    /// manifests/rendered/lb-agent.yaml, after `helm lint --strict`.
    RenderManifests,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Test => tiers::run(),
        Task::Demo { prepared } => demo::run(prepared),
        Task::RenderManifests => manifests::render(),
    }
}
