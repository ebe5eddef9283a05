//! Which dataplane the agent runs (`--mode`), and how `auto` chooses one: probe what the
//! kernel and the node offer, then take the first mode of [`Mode::PREFERENCE`] whose needs are
//! all met. The probes are cheap and leave nothing behind; the choice is pure, so it is
//! tested without the kernel.

use std::fmt;
use std::process::{Command, Stdio};

use aya::maps::MapType;
use aya::programs::ProgramType;

/// A dataplane, or `Auto` to let the probes choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    Auto,
    /// tc and XDP programs, connection tracking in BPF maps.
    Ebpf,
    /// The kernel's IP Virtual Server, with iptables for masquerade.
    Ipvs,
    /// kube-proxy's iptables rule layout: DNAT chains, conntrack.
    Iptables,
    /// The agent proxies every connection itself; iptables only redirects to it.
    Userspace,
}

impl Mode {
    /// What `auto` prefers, best first: the fastest datapath the node can run.
    pub const PREFERENCE: [Mode; 4] = [Mode::Ebpf, Mode::Ipvs, Mode::Iptables, Mode::Userspace];

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Ebpf => "ebpf",
            Mode::Ipvs => "ipvs",
            Mode::Iptables => "iptables",
            Mode::Userspace => "userspace",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Mode, String> {
        [Mode::Auto]
            .into_iter()
            .chain(Mode::PREFERENCE)
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                format!("{s:?} is not a mode: use auto, ebpf, ipvs, iptables or userspace")
            })
    }
}

/// One kernel or node facility a mode needs: available, or why not and what to do.
pub type Found = Result<(), String>;

/// What the node offers, as the probes found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// tc classifier programs and the map types the datapath uses can be loaded.
    pub bpf: Found,
    /// The kernel's IP Virtual Server answers on generic netlink.
    pub ipvs: Found,
    /// iptables can hold NAT rules (DNAT, REDIRECT, MASQUERADE): every fallback needs it.
    pub iptables_nat: Found,
    /// The `statistic` and `recent` matches the iptables mode spreads and pins flows with.
    pub iptables_matches: Found,
}

impl Probe {
    /// What `mode` needs, as (facility, finding) pairs.
    pub fn needs(&self, mode: Mode) -> Vec<(&'static str, &Found)> {
        match mode {
            Mode::Auto => Vec::new(),
            Mode::Ebpf => vec![("BPF programs and maps", &self.bpf)],
            Mode::Ipvs => vec![("IPVS", &self.ipvs), ("iptables NAT", &self.iptables_nat)],
            Mode::Iptables => vec![
                ("iptables NAT", &self.iptables_nat),
                (
                    "iptables statistic and recent matches",
                    &self.iptables_matches,
                ),
            ],
            Mode::Userspace => vec![("iptables NAT", &self.iptables_nat)],
        }
    }

    /// Why `mode` cannot run here, if it cannot.
    pub fn missing(&self, mode: Mode) -> Option<String> {
        let missing: Vec<String> = self
            .needs(mode)
            .into_iter()
            .filter_map(|(what, found)| found.as_ref().err().map(|why| format!("{what}: {why}")))
            .collect();
        (!missing.is_empty()).then(|| missing.join("; "))
    }

    /// The modes that can run here, best first, with why each one before them cannot.
    pub fn candidates(&self) -> (Vec<Mode>, Vec<(Mode, String)>) {
        let mut usable = Vec::new();
        let mut passed_over = Vec::new();
        for mode in Mode::PREFERENCE {
            match self.missing(mode) {
                None => usable.push(mode),
                Some(why) => passed_over.push((mode, why)),
            }
        }
        (usable, passed_over)
    }

    /// Runs every probe. `iptables` is the iptables program of the back end the fallback
    /// modes would use (its `-restore` and `-save` siblings are found beside it).
    pub fn run(iptables: &IptablesProbe) -> Probe {
        let (iptables_nat, iptables_matches) = iptables.run();
        Probe {
            bpf: probe_bpf(),
            ipvs: crate::dataplane::ipvs::available().map_err(|e| e.to_string()),
            iptables_nat,
            iptables_matches,
        }
    }
}

/// Loads a minimal program of each type the datapath needs and creates a map of each type it
/// uses (aya's feature probes: the kernel's verifier and map allocators answer, nothing stays).
fn probe_bpf() -> Found {
    let programs = [(ProgramType::SchedClassifier, "tc classifier")];
    let maps = [
        (MapType::Hash, "hash"),
        (MapType::LruHash, "LRU hash"),
        (MapType::PerCpuArray, "per-CPU array"),
        (MapType::LpmTrie, "LPM trie"),
        (MapType::HashOfMaps, "hash of maps"),
    ];
    let denied = "the agent needs CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN), and the kernel must allow it (kernel.unprivileged_bpf_disabled does not matter to a privileged agent; a seccomp or LSM policy may)";
    for (program, name) in programs {
        match aya::sys::is_program_supported(program) {
            Ok(true) => {}
            Ok(false) => return Err(format!("the kernel cannot load {name} programs")),
            Err(e) => return Err(format!("loading a {name} program failed: {e}; {denied}")),
        }
    }
    for (map, name) in maps {
        match aya::sys::is_map_supported(map) {
            Ok(true) => {}
            Ok(false) => return Err(format!("the kernel has no {name} maps")),
            Err(e) => return Err(format!("creating a {name} map failed: {e}; {denied}")),
        }
    }
    Ok(())
}

/// The scratch chain the iptables probe creates and deletes again.
const PROBE_CHAIN: &str = "LBA-PROBE";

/// Probes one iptables back end by writing a scratch chain with the rules the fallback modes
/// depend on, then deleting it.
pub struct IptablesProbe {
    /// `iptables`, `iptables-nft` or `iptables-legacy`: `-restore` is appended.
    pub iptables: String,
    /// Makes the command for a program (tests run it in a network namespace).
    pub command: crate::dataplane::iptables::CommandFactory,
}

impl IptablesProbe {
    fn restore(&self, input: &str) -> Found {
        let program = format!("{}-restore", self.iptables);
        let mut child = (self.command)(&program)
            .args(["--noflush", "--wait"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run {program}: {e}; install iptables (Debian: the `iptables` package)"
                )
            })?;
        use std::io::Write as _;
        let _ = child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes());
        let out = child
            .wait_with_output()
            .map_err(|e| format!("running {program}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{program} refused the rules ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Writes the probe rules of `table`, then deletes the chain whatever happened.
    fn try_rules(&self, table: &str, rules: &[&str]) -> Found {
        let mut input = format!("*{table}\n:{PROBE_CHAIN} - [0:0]\n");
        for rule in rules {
            input.push_str(&format!("-A {PROBE_CHAIN} {rule}\n"));
        }
        input.push_str("COMMIT\n");
        let written = self.restore(&input);
        let removed = self.restore(&format!(
            "*{table}\n:{PROBE_CHAIN} - [0:0]\n-X {PROBE_CHAIN}\nCOMMIT\n"
        ));
        written.and(removed)
    }

    /// (NAT rules, the statistic and recent matches).
    fn run(&self) -> (Found, Found) {
        let nat = self.try_rules(
            "nat",
            &[
                "-p tcp -j DNAT --to-destination 127.0.0.1:1",
                "-p tcp -j REDIRECT --to-ports 1",
                "-j MASQUERADE",
            ],
        );
        let matches = self.try_rules(
            "nat",
            &[
                "-m statistic --mode random --probability 0.5000000000 -j RETURN",
                "-m recent --name LBA-PROBE --rcheck --seconds 10 --reap -j RETURN",
            ],
        );
        (nat, matches)
    }

    /// The system's `iptables`, run directly.
    pub fn system() -> IptablesProbe {
        IptablesProbe {
            iptables: "iptables".into(),
            command: std::sync::Arc::new(|program| Command::new(program)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_found() -> Probe {
        Probe {
            bpf: Ok(()),
            ipvs: Ok(()),
            iptables_nat: Ok(()),
            iptables_matches: Ok(()),
        }
    }

    fn first(probe: &Probe) -> Option<Mode> {
        probe.candidates().0.first().copied()
    }

    #[test]
    fn auto_prefers_ebpf_then_ipvs_then_iptables_then_userspace() {
        let mut probe = all_found();
        assert_eq!(first(&probe), Some(Mode::Ebpf));
        probe.bpf = Err("no CAP_BPF".into());
        assert_eq!(first(&probe), Some(Mode::Ipvs));
        probe.ipvs = Err("no ip_vs".into());
        assert_eq!(first(&probe), Some(Mode::Iptables));
        probe.iptables_matches = Err("no xt_recent".into());
        assert_eq!(first(&probe), Some(Mode::Userspace));
        let (usable, passed_over) = probe.candidates();
        assert_eq!(usable, [Mode::Userspace]);
        assert_eq!(
            passed_over,
            [
                (Mode::Ebpf, "BPF programs and maps: no CAP_BPF".to_string()),
                (Mode::Ipvs, "IPVS: no ip_vs".to_string()),
                (
                    Mode::Iptables,
                    "iptables statistic and recent matches: no xt_recent".to_string()
                ),
            ],
            "each mode passed over says what it lacked"
        );
        probe.iptables_nat = Err("no iptables".into());
        assert_eq!(first(&probe), None, "nothing can run without NAT");
        assert_eq!(
            probe.missing(Mode::Ipvs).as_deref(),
            Some("IPVS: no ip_vs; iptables NAT: no iptables"),
            "every missing need is named"
        );
    }

    #[test]
    fn ebpf_needs_nothing_from_iptables() {
        let probe = Probe {
            iptables_nat: Err("no iptables".into()),
            iptables_matches: Err("no iptables".into()),
            ipvs: Err("no ip_vs".into()),
            ..all_found()
        };
        assert_eq!(probe.candidates().0, [Mode::Ebpf]);
    }

    #[test]
    fn modes_parse_by_name_and_only_so() {
        for mode in [Mode::Auto].into_iter().chain(Mode::PREFERENCE) {
            assert_eq!(mode.as_str().parse::<Mode>(), Ok(mode));
        }
        let err = "bpf".parse::<Mode>().unwrap_err();
        assert!(
            err.contains("auto, ebpf, ipvs, iptables or userspace"),
            "{err}"
        );
    }
}
