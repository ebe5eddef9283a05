//! `cargo xtask test`: every test tier, then a summary.
//!
//! 1. unit: `cargo test --workspace --no-fail-fast` (no privileges), with `LB_HELM` set to
//!    the helm setup installed, for the manifests test.
//! 2. datapath: BPF_PROG_TEST_RUN fixtures (`lb-userspace/tests/datapath.rs`), root.
//! 3. e2e: network namespaces and the real agent (`lb-userspace/tests/e2e.rs`,
//!    `tests/socket_lb.rs` for the node's own connections, and `tests/iptables.rs` for the
//!    iptables dataplane on both iptables back ends), root.
//! 4. kernel 6.1: in one virtme-ng VM booting Debian's 6.1 kernel (`vm.rs`), tier 2's test
//!    binary, so the oldest kernel we support verifies the programs too, then the IPVS
//!    dataplane's root test (`lb-userspace/tests/ipvs.rs`), which needs a kernel with IPVS
//!    (this host's has none).
//!
//! Tiers 2 and 4 print each program's verified instruction count; the summary compares
//! them. The last line printed is `N passed, M failed`, the totals over the tiers that ran.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::util::{self, cargo, is_root, process_alive, show, step, testbed_owner, TESTBED_PREFIX};
use crate::vm;

const BPFFS: &str = "/sys/fs/bpf";

/// Tier 4 is killed after this long: it takes about 10 minutes (a boot of ~15-20 s, the
/// fixtures ~15 times slower than on the host under emulation, ~1.5 minutes of IPVS test,
/// ~6 minutes of the parity suite's IPVS tests).
const VM_TIMEOUT: Duration = Duration::from_secs(1200);

/// libtest arguments of the datapath fixtures, on the host and in the VM. `--show-output`
/// prints what passing tests printed too: the verified instruction counts and measurements.
/// No colours: the guest's console is a terminal.
const DATAPATH_ARGS: [&str; 4] = [
    "--ignored",
    "--test-threads=1",
    "--show-output",
    "--color=never",
];

/// libtest arguments of the IPVS test in the VM.
const IPVS_ARGS: [&str; 3] = ["--ignored", "--test-threads=1", "--color=never"];

/// libtest arguments of the parity suite in the VM: its ipvs mode, which the host cannot run,
/// and `auto` without BPF, which takes ipvs only where the kernel has it.
const PARITY_ARGS: [&str; 5] = [
    "--ignored",
    "--test-threads=1",
    "--color=never",
    "ipvs::",
    "choosing_a_mode::auto_falls_back",
];

/// The test binaries tier 4 runs in the VM, one boot for all: (cargo target, libtest args).
const VM_TESTS: [(&str, &[&str]); 3] = [
    ("datapath", &DATAPATH_ARGS),
    ("ipvs", &IPVS_ARGS),
    ("parity", &PARITY_ARGS),
];

/// What a tier's run produced.
enum Outcome {
    Ran {
        passed: u64,
        failed: u64,
        ignored: u64,
        /// The command exited successfully (a build failure has no result lines but fails).
        success: bool,
        secs: f64,
        /// What else went wrong, when it did (the tier then fails).
        problem: Option<String>,
    },
    Skipped(String),
}

impl Outcome {
    /// A tier that could not run at all: a failure, never a skip.
    fn broken(problem: String) -> Outcome {
        println!("!!! {problem} !!!");
        Outcome::Ran {
            passed: 0,
            failed: 0,
            ignored: 0,
            success: false,
            secs: 0.0,
            problem: Some(problem),
        }
    }
}

struct Tier {
    name: &'static str,
    outcome: Outcome,
}

impl Tier {
    fn failed(&self) -> bool {
        matches!(&self.outcome, Outcome::Ran { success, failed, problem, .. } if !success || *failed > 0 || problem.is_some())
    }
}

/// One program's verified instruction count on one kernel, from a line the datapath
/// fixtures print: `NAME: N instructions verified, B translated bytes, on kernel K`.
#[derive(Debug, PartialEq)]
struct Verified {
    program: String,
    instructions: String,
    kernel: String,
}

fn parse_verified(line: &str) -> Option<Verified> {
    let (program, rest) = line.trim().split_once(": ")?;
    let (instructions, rest) = rest.split_once(" instructions verified, ")?;
    let kernel = rest.rsplit_once(" on kernel ")?.1;
    (!program.contains(char::is_whitespace)).then(|| Verified {
        program: program.to_owned(),
        instructions: instructions.to_owned(),
        kernel: kernel.trim().to_owned(),
    })
}

/// What the lines of a test run add up to.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
    verified: Vec<Verified>,
}

impl Tally {
    fn line(&mut self, line: &str) {
        if let Some((p, f, i)) = parse_result(line) {
            self.passed += p;
            self.failed += f;
            self.ignored += i;
        } else if let Some(v) = parse_verified(line) {
            self.verified.push(v);
        }
    }

    fn outcome(&self, success: bool, secs: f64, problem: Option<String>) -> Outcome {
        Outcome::Ran {
            passed: self.passed,
            failed: self.failed,
            ignored: self.ignored,
            success,
            secs,
            problem,
        }
    }
}

pub fn run() -> anyhow::Result<()> {
    // Root-only setup pieces missing without root are reported by setup and stop us below,
    // after tier 1, which needs none of them. What tier 4 lacks, it reports itself.
    crate::setup::ensure()?;
    let root = is_root();
    let mut tiers = Vec::new();
    let mut verified = Vec::new();

    step("tier 1: unit tests (unprivileged)");
    // --no-fail-fast: one failing test binary must not hide the others' results.
    let mut unit = cargo();
    unit.args(["test", "--workspace", "--no-fail-fast"]);
    // The manifests test runs helm; it fails saying so when this one does not run.
    if let Ok(helm) = crate::setup::helm_path() {
        unit.env("LB_HELM", helm);
    }
    let (outcome, _) = run_tests(&mut unit)?;
    tiers.push(Tier {
        name: "1 unit",
        outcome,
    });

    if root {
        step("tier 2: datapath fixtures (BPF_PROG_TEST_RUN, root)");
        let datapath = util::workspace_root().join("lb-userspace/tests/datapath.rs");
        let outcome = if datapath.exists() {
            let (outcome, tally) = run_tests(
                cargo()
                    // `--lib`: the dataplane's own root-only tests (maps written and read
                    // back) run with the fixtures.
                    .args([
                        "test",
                        "-p",
                        "lb-userspace",
                        "--lib",
                        "--test",
                        "datapath",
                        "--",
                    ])
                    .args(DATAPATH_ARGS),
            )?;
            with_verified_counts(outcome, tally, &mut verified)
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
        let (outcome, _) = run_tests(cargo().args([
            "test",
            "-p",
            "lb-userspace",
            "--test",
            "e2e",
            "--test",
            "socket_lb",
            "--test",
            "iptables",
            "--test",
            "userspace",
            "--test",
            "parity",
            "--",
            "--ignored",
            "--test-threads=1",
            // This kernel has no IPVS: the parity suite's ipvs mode runs in tier 4's VM.
            "--skip",
            "ipvs::",
        ]))?;
        tiers.push(Tier {
            name: "3 e2e",
            outcome,
        });

        step("tier 4: datapath and IPVS on Debian 6.1 (virtme-ng VM, software emulation)");
        tiers.push(Tier {
            name: "4 kernel 6.1",
            outcome: kernel_in_vm(&mut verified)?,
        });
    } else {
        for name in ["2 datapath", "3 e2e", "4 kernel 6.1"] {
            tiers.push(Tier {
                name,
                outcome: Outcome::Skipped("needs root".into()),
            });
        }
    }

    let leftovers = if root { leftovers()? } else { Vec::new() };

    if !verified.is_empty() {
        step("verified instructions per program and kernel");
        print_verified(&verified);
    }

    step("summary");
    println!(
        "{:<15} {:>7} {:>7} {:>8} {:>8}  status",
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
                problem,
            } => {
                passed += p;
                failed += f;
                let status = match problem {
                    Some(problem) => format!("FAILED: {problem}"),
                    None if !tier.failed() => "ok".into(),
                    None if *f == 0 => "FAILED (did not build or run)".into(),
                    None => "FAILED".into(),
                };
                println!(
                    "{:<15} {p:>7} {f:>7} {ignored:>8} {secs:>8.1}  {status}",
                    tier.name
                );
            }
            Outcome::Skipped(why) => println!(
                "{:<15} {:>7} {:>7} {:>8} {:>8}  SKIPPED: {why}",
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
            "tiers 2 (datapath), 3 (e2e) and 4 (datapath and IPVS on 6.1) need root: run `cargo xtask test` as root".into(),
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

/// A datapath run must report every program's verified instruction count: a run that
/// passed without one is a harness defect, so the tier fails.
fn with_verified_counts(outcome: Outcome, tally: Tally, all: &mut Vec<Verified>) -> Outcome {
    let outcome = match outcome {
        Outcome::Ran {
            passed,
            failed,
            ignored,
            success,
            secs,
            problem: None,
        } if tally.verified.is_empty() && success && failed == 0 => Outcome::Ran {
            passed,
            failed,
            ignored,
            success,
            secs,
            problem: Some("no verified instruction count was printed".into()),
        },
        other => other,
    };
    all.extend(tally.verified);
    outcome
}

/// A table of verified instruction counts: a row per program, a column per kernel.
fn print_verified(verified: &[Verified]) {
    let mut kernels: Vec<&str> = Vec::new();
    let mut programs: Vec<&str> = Vec::new();
    for v in verified {
        if !kernels.contains(&v.kernel.as_str()) {
            kernels.push(&v.kernel);
        }
        if !programs.contains(&v.program.as_str()) {
            programs.push(&v.program);
        }
    }
    print!("{:<20}", "program");
    for k in &kernels {
        print!(" {k:>20}");
    }
    println!();
    for p in &programs {
        print!("{p:<20}");
        for k in &kernels {
            let n = verified
                .iter()
                .find(|v| v.program == *p && v.kernel == *k)
                .map_or("-", |v| v.instructions.as_str());
            print!(" {n:>20}");
        }
        println!();
    }
}

/// Tier 4: builds tier 2's test binary and the IPVS test's (cargo runs neither on the
/// host; here it only builds them) and runs both in one VM booting Debian's 6.1 kernel.
fn kernel_in_vm(verified: &mut Vec<Verified>) -> anyhow::Result<Outcome> {
    let kit = match vm::Kit::find() {
        Ok(kit) => kit,
        Err(missing) => {
            return Ok(Outcome::broken(format!(
                "TIER 4 CANNOT RUN, missing: {} (`cargo xtask setup` as root installs them; see its output for why it did not)",
                missing.join("; ")
            )))
        }
    };
    let binaries = match vm_test_binaries() {
        Ok(b) => b,
        Err(e) => {
            return Ok(Outcome::broken(format!(
                "building the test binaries for the VM: {e:#}"
            )))
        }
    };
    for binary in &binaries {
        if let Err(e) = vm::check_visible_in_guest(binary, "the test binary") {
            return Ok(Outcome::broken(format!("{e:#}")));
        }
        let shown = binary.to_string_lossy();
        if shown.contains('\'') {
            return Ok(Outcome::broken(format!(
                "the test binary's path {shown} has a quote in it, which the guest's command line cannot carry"
            )));
        }
    }
    println!(
        "kernel {} from {}",
        kit.kernel.version,
        kit.kernel.root.display()
    );
    let command = guest_command(&binaries);
    let mut tally = Tally::default();
    let run = kit.run(&command, &util::workspace_root(), VM_TIMEOUT, |line| {
        tally.line(line)
    })?;

    let problem = if run.timed_out {
        Some(format!(
            "the VM was killed after {} s",
            VM_TIMEOUT.as_secs()
        ))
    } else if run.boot_secs.is_none() {
        Some("the guest never started the tests (boot failed?)".into())
    } else if run.exit.is_none() {
        Some("the guest stopped before the test binaries finished (kernel panic?)".into())
    } else if run.guest_kernel.as_deref() != Some(kit.kernel.version.as_str()) {
        Some(format!(
            "the guest ran kernel {:?}, not {}",
            run.guest_kernel, kit.kernel.version
        ))
    } else {
        None
    };
    if problem.is_some() && run.boot_secs.is_none() {
        println!("last console lines before the guest command:");
        for line in &run.boot_tail {
            println!("  {line}");
        }
    }
    match run.boot_secs {
        Some(boot) => println!(
            "VM: booted in {boot:.1} s, the tests took {:.1} s, {:.1} s in all",
            run.secs - boot,
            run.secs
        ),
        None => println!("VM: ran {:.1} s", run.secs),
    }
    let outcome = tally.outcome(run.exit == Some(0), run.secs, problem);
    Ok(with_verified_counts(outcome, tally, verified))
}

/// The guest's command: every binary of [`VM_TESTS`] with its arguments, each run even when
/// an earlier one failed, exiting non-zero when any did. The IPVS tests load `ip_vs`
/// themselves (`modprobe`, from the modules beside the kernel image), through the probe the
/// agent uses.
fn guest_command(binaries: &[PathBuf]) -> String {
    let mut command = String::from("failed=0");
    for (binary, (_, args)) in binaries.iter().zip(VM_TESTS) {
        command += &format!("; '{}' {} || failed=1", binary.display(), args.join(" "));
    }
    command + "; [ $failed -eq 0 ]"
}

/// Builds the binaries of [`VM_TESTS`] and returns their paths, in that order, from cargo's
/// JSON messages (the file names carry a hash).
fn vm_test_binaries() -> anyhow::Result<Vec<PathBuf>> {
    let mut cmd = cargo();
    cmd.args(["test", "-p", "lb-userspace"]);
    for (name, _) in VM_TESTS {
        cmd.args(["--test", name]);
    }
    cmd.args(["--no-run", "--message-format=json-render-diagnostics"]);
    let shown = show(&cmd);
    println!("$ {shown}");
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting `{shown}`"))?;
    anyhow::ensure!(out.status.success(), "`{shown}` failed ({})", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    VM_TESTS
        .iter()
        .map(|(name, _)| {
            test_executable(&stdout, name)
                .with_context(|| format!("`{shown}` named no test executable `{name}`"))
        })
        .collect()
}

/// The executable of test target `name` in cargo's `--message-format=json` output.
fn test_executable(messages: &str, name: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .filter(|m| {
            m["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"))
        })
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
}

/// Runs a `cargo test` command, echoing its output, and adds up its `test result:` lines
/// (and the verified instruction counts it prints).
fn run_tests(cmd: &mut Command) -> anyhow::Result<(Outcome, Tally)> {
    let shown = show(cmd);
    println!("$ {shown}");
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{shown}`"))?;
    let mut tally = Tally::default();
    let stdout = child.stdout.take().expect("stdout is piped");
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading test output")?;
        println!("{line}");
        tally.line(&line);
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;
    let outcome = tally.outcome(status.success(), started.elapsed().as_secs_f64(), None);
    Ok((outcome, tally))
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
    fn parses_verified_instruction_lines() {
        assert_eq!(
            parse_verified("lb_ingress: 6852 instructions verified, 16944 translated bytes, on kernel 6.18.44-fc-v782"),
            Some(Verified {
                program: "lb_ingress".into(),
                instructions: "6852".into(),
                kernel: "6.18.44-fc-v782".into(),
            })
        );
        assert_eq!(
            parse_verified(
                "lb_ingress: ? instructions verified, ? translated bytes, on kernel 6.1.0-56-amd64"
            )
            .map(|v| v.instructions),
            Some("?".into())
        );
        assert_eq!(parse_verified("case: tcp header cut short"), None);
        assert_eq!(
            parse_verified("lb_ingress: not loaded by the fixture, so not verified here"),
            None
        );
    }

    #[test]
    fn finds_the_test_executable_in_cargo_messages() {
        let messages = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"datapath"},"executable":null}
{"reason":"compiler-artifact","target":{"kind":["test"],"name":"e2e"},"executable":"/t/debug/deps/e2e-1"}
{"reason":"compiler-artifact","target":{"kind":["test"],"name":"datapath"},"executable":"/t/debug/deps/datapath-2"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            test_executable(messages, "datapath"),
            Some(PathBuf::from("/t/debug/deps/datapath-2"))
        );
        assert_eq!(test_executable(messages, "other"), None);
    }

    #[test]
    fn the_guest_runs_every_binary_and_fails_if_any_does() {
        let binaries = ["/t/datapath-1", "/t/ipvs-2", "/t/parity-3"].map(PathBuf::from);
        let command = guest_command(&binaries);
        assert_eq!(
            command,
            "failed=0; '/t/datapath-1' --ignored --test-threads=1 --show-output --color=never || failed=1; \
             '/t/ipvs-2' --ignored --test-threads=1 --color=never || failed=1; \
             '/t/parity-3' --ignored --test-threads=1 --color=never ipvs:: \
             choosing_a_mode::auto_falls_back || failed=1; \
             [ $failed -eq 0 ]"
        );
        // The exit status sh reports for it, with stand-ins for the binaries.
        for (a, b, c, ok) in [
            ("true", "true", "true", true),
            ("false", "true", "true", false),
            ("true", "false", "true", false),
            ("true", "true", "false", false),
        ] {
            let status = std::process::Command::new("sh")
                .arg("-c")
                .arg(
                    command
                        .replace("'/t/datapath-1'", a)
                        .replace("'/t/ipvs-2'", b)
                        .replace("'/t/parity-3'", c),
                )
                .status()
                .unwrap();
            assert_eq!(status.success(), ok, "{a}, {b}, {c}");
        }
    }

    #[test]
    fn testbed_names_give_their_owner() {
        assert_eq!(testbed_owner("lbt-1234-0-node"), Some(1234));
        assert_eq!(testbed_owner("lbt-77-3"), Some(77));
        assert_eq!(testbed_owner("other"), None);
    }
}
