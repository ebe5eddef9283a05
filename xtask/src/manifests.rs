//! `cargo xtask render-manifests`: renders the Helm chart (`manifests/charts/lb-agent`) with
//! its default values into the plain manifests `kubectl apply -f` takes,
//! `manifests/rendered/lb-agent.yaml`. The manifests test (`lb-userspace/tests/manifests.rs`,
//! tier 1) runs the same command and fails when its output and the committed file differ.

use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::setup;
use crate::util::{self, show, step};

const CHART: &str = "manifests/charts/lb-agent";
const RENDERED: &str = "manifests/rendered/lb-agent.yaml";
/// The release name and namespace the plain manifests are rendered for (the test uses the
/// same).
const RELEASE: &str = "lb-agent";
const NAMESPACE: &str = "kube-system";

pub fn render() -> anyhow::Result<()> {
    step("render the Helm chart into plain manifests");
    let helm = setup::ensure_helm()?;
    let root = util::workspace_root();
    util::run(
        Command::new(&helm)
            .args(["lint", "--strict", CHART])
            .current_dir(&root),
    )?;
    let mut template = Command::new(&helm);
    template
        .args(["template", RELEASE, CHART, "--namespace", NAMESPACE])
        .current_dir(&root)
        .stderr(Stdio::inherit());
    let shown = show(&template);
    println!("$ {shown}");
    let out = template
        .output()
        .with_context(|| format!("starting `{shown}`"))?;
    if !out.status.success() {
        bail!("`{shown}` failed ({})", out.status);
    }
    let path = root.join(RENDERED);
    std::fs::create_dir_all(path.parent().expect("RENDERED is in a directory"))
        .with_context(|| format!("creating the directory of {}", path.display()))?;
    std::fs::write(&path, &out.stdout).with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {RENDERED} ({} bytes)", out.stdout.len());
    Ok(())
}
