//! `cargo xtask test`: every test tier, then a summary.
//!
//! 1. unit: `cargo test --workspace --no-fail-fast` (no privileges).
//! 2. datapath: BPF_PROG_TEST_RUN fixtures (`lb-userspace/tests/datapath.rs`), root.
//! 3. e2e: network namespaces and the real agent (`lb-userspace/tests/e2e.rs`, and
//!    `tests/socket_lb.rs` for the node's own connections), root.
//!
//! The last line printed is `N passed, M failed`, the totals over the tiers that ran.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::Context;

use crate::util::{self, cargo, is_root, process_alive, show, step, testbed_owner, TESTBED_PREFIX};

const BPFFS: &str = "/sys/fs/bpf";

/// What a tier's run produced.
enum Outcome {
    Ran {
        passed: u64,
        failed: u64,
        ignored: u64,
        /// The command exited successfully (a build failure has no result lines but fails).
        success: bool,
        secs: f64,
    },
    Skipped(String),
}

struct Tier {
    name: &'static str,
    outcome: Outcome,
}

impl Tier {
    fn failed(&self) -> bool {
        matches!(self.outcome, Outcome::Ran { success, failed, .. } if !success || failed > 0)
    }
}

pub fn run() -> anyhow::Result<()> {
    // Root-only setup pieces missing without root are reported by setup and stop us below,
    // after tier 1, which needs none of them.
    crate::setup::ensure()?;
    let root = is_root();
    let mut tiers = Vec::new();

    step("tier 1: unit tests (unprivileged)");
    // --no-fail-fast: one failing test binary must not hide the others' results.
    tiers.push(Tier {
        name: "1 unit",
        outcome: run_tests(cargo().args(["test", "--workspace", "--no-fail-fast"]))?,
    });

    if root {
        step("tier 2: datapath fixtures (BPF_PROG_TEST_RUN, root)");
        let datapath = util::workspace_root().join("lb-userspace/tests/datapath.rs");
        let outcome = if datapath.exists() {
            run_tests(cargo().args([
                "test",
                "-p",
                "lb-userspace",
                "--test",
                "datapath",
                "--",
                "--ignored",
                "--test-threads=1",
            ]))?
        } else {
            let why = format!("{} does not exist", datapath.display());
            println!("!!! SKIPPING TIER 2: {why} !!!");
            Outcome::Skipped(why)
        };
        tiers.push(Tier {
            name: "2 datapath",
            outcome,
        });

        step("tier 3: end to end in network namespaces (root)");
        tiers.push(Tier {
            name: "3 e2e",
            outcome: run_tests(cargo().args([
                "test",
                "-p",
                "lb-userspace",
                "--test",
                "e2e",
                "--test",
                "socket_lb",
                "--",
                "--ignored",
                "--test-threads=1",
            ]))?,
        });
    } else {
        for name in ["2 datapath", "3 e2e"] {
            tiers.push(Tier {
                name,
                outcome: Outcome::Skipped("needs root".into()),
            });
        }
    }

    let leftovers = if root { leftovers()? } else { Vec::new() };

    step("summary");
    println!(
        "{:<12} {:>7} {:>7} {:>8} {:>8}  status",
        "tier", "passed", "failed", "ignored", "seconds"
    );
    let (mut passed, mut failed) = (0, 0);
    for tier in &tiers {
        match &tier.outcome {
            Outcome::Ran {
                passed: p,
                failed: f,
                ignored,
                success: _,
                secs,
            } => {
                passed += p;
                failed += f;
                let status = if tier.failed() {
                    if *f == 0 {
                        "FAILED (did not build or run)"
                    } else {
                        "FAILED"
                    }
                } else {
                    "ok"
                };
                println!(
                    "{:<12} {p:>7} {f:>7} {ignored:>8} {secs:>8.1}  {status}",
                    tier.name
                );
            }
            Outcome::Skipped(why) => println!(
                "{:<12} {:>7} {:>7} {:>8} {:>8}  SKIPPED: {why}",
                tier.name, "-", "-", "-", "-"
            ),
        }
    }

    let mut problems = Vec::new();
    let failed_tiers: Vec<&str> = tiers
        .iter()
        .filter(|t| t.failed())
        .map(|t| t.name)
        .collect();
    if !failed_tiers.is_empty() {
        problems.push(format!("tier(s) failed: {}", failed_tiers.join(", ")));
    }
    if !root {
        problems.push(
            "tiers 2 (datapath) and 3 (e2e) need root: run `cargo xtask test` as root".into(),
        );
    }
    if !leftovers.is_empty() {
        problems.push(format!(
            "the tests left behind: {} (remove with `ip netns del NAME` / `rm -r DIR`)",
            leftovers.join(", ")
        ));
    }
    for p in &problems {
        println!("FAILED: {p}");
    }
    // The totals go last, alone on their line, where CI looks for them.
    println!("{passed} passed, {failed} failed");
    if !problems.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

/// Runs a `cargo test` command, echoing its output, and adds up its `test result:` lines.
fn run_tests(cmd: &mut Command) -> anyhow::Result<Outcome> {
    let shown = show(cmd);
    println!("$ {shown}");
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{shown}`"))?;
    let (mut passed, mut failed, mut ignored) = (0, 0, 0);
    let stdout = child.stdout.take().expect("stdout is piped");
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading test output")?;
        println!("{line}");
        if let Some((p, f, i)) = parse_result(&line) {
            passed += p;
            failed += f;
            ignored += i;
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;
    Ok(Outcome::Ran {
        passed,
        failed,
        ignored,
        success: status.success(),
        secs: started.elapsed().as_secs_f64(),
    })
}

/// `(passed, failed, ignored)` from a libtest line such as
/// `test result: ok. 5 passed; 0 failed; 4 ignored; 0 measured; 0 filtered out; ...`.
fn parse_result(line: &str) -> Option<(u64, u64, u64)> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let words: Vec<&str> = rest.split_whitespace().collect();
    let count = |what: &str| {
        words
            .windows(2)
            .find(|w| w[1].trim_end_matches([';', ',', '.']) == what)
            .and_then(|w| w[0].parse().ok())
            .unwrap_or(0)
    };
    Some((count("passed"), count("failed"), count("ignored")))
}

/// The test bed's directories under /sys/fs/bpf (`lbt-*`).
fn testbed_pin_dirs() -> BTreeSet<String> {
    std::fs::read_dir(BPFFS)
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(TESTBED_PREFIX))
                .collect()
        })
        .unwrap_or_default()
}

/// The socket-LB tests' cgroup v2 directories (`<cgroup2 root>/lbt-*`).
fn testbed_cgroups() -> Vec<String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // `... <mount point> <options> [optional...] - cgroup2 ...`; test-bed paths need no
    // unescaping to be found.
    let Some(root) = mountinfo.lines().find_map(|l| {
        let (before, after) = l.split_once(" - ")?;
        (after.split_whitespace().next()? == "cgroup2").then(|| before.split_whitespace().nth(4))?
    }) else {
        return Vec::new();
    };
    std::fs::read_dir(root)
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(TESTBED_PREFIX))
                .map(|n| format!("{root}/{n}"))
                .collect()
        })
        .unwrap_or_default()
}

/// Test-bed namespaces and bpffs directories whose owning process is gone. Those of live
/// processes (a run in progress elsewhere) are mentioned but not counted.
fn leftovers() -> anyhow::Result<Vec<String>> {
    step("checking for leftover namespaces, bpffs directories and cgroups");
    let mut names: Vec<String> = util::output(Command::new("ip").args(["netns", "list"]))
        .context("`ip netns list` failed")?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(TESTBED_PREFIX))
        .map(|n| format!("netns {n}"))
        .collect();
    names.extend(
        testbed_pin_dirs()
            .into_iter()
            .map(|n| format!("{BPFFS}/{n}")),
    );
    names.extend(testbed_cgroups());
    let mut left = Vec::new();
    for name in names {
        let base = name.rsplit([' ', '/']).next().unwrap_or(&name);
        match testbed_owner(base) {
            Some(pid) if process_alive(pid) => {
                println!("note: {name} belongs to running process {pid}; not counted")
            }
            _ => left.push(name),
        }
    }
    if left.is_empty() {
        println!("none left behind");
    }
    Ok(left)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libtest_result_lines() {
        assert_eq!(
            parse_result("test result: ok. 5 passed; 0 failed; 4 ignored; 0 measured; 0 filtered out; finished in 0.00s"),
            Some((5, 0, 4))
        );
        assert_eq!(
            parse_result("test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 3 filtered out; finished in 1.2s"),
            Some((1, 2, 0))
        );
        assert_eq!(parse_result("running 4 tests"), None);
    }

    #[test]
    fn testbed_names_give_their_owner() {
        assert_eq!(testbed_owner("lbt-1234-0-node"), Some(1234));
        assert_eq!(testbed_owner("lbt-77-3"), Some(77));
        assert_eq!(testbed_owner("other"), None);
    }
}
