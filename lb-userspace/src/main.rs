//! `lb-agent`: the node agent. `run` programs the eBPF datapath from Services and
//! EndpointSlices and keeps it in step with them; `dump` shows what the datapath holds.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use log::{error, info, warn};
use tokio::signal::unix::{signal, SignalKind};

use lb_userspace::{
    dataplane::{
        ebpf::{conntrack_gc, inspect, socket_lb, EbpfDataplane, LoadOptions, DEFAULT_PIN_DIR},
        Dataplane,
    },
    host::{node_addresses, node_name_from_environment, warn_if_ephemeral_ports_overlap_snat},
    model,
    source::{
        self,
        manifest_dir::{ManifestDir, ManifestError},
        Source,
    },
};

#[derive(Parser)]
#[command(
    name = "lb-agent",
    version,
    about = "Kubernetes service load balancer for Linux nodes (eBPF datapath)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Program the datapath from a source of Services and EndpointSlices and keep it in step.
    Run(Box<RunArgs>),
    /// Print what the pinned maps hold: frontends, their backends, connections, counters.
    Dump {
        /// Directory on a bpffs mount where the agent pins its maps.
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        bpffs: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Where Services and EndpointSlices come from: `dir:PATH` (YAML/JSON manifests, watched).
    #[arg(long)]
    source: String,
    /// Interface to attach the datapath to at tc ingress (repeatable): every interface that
    /// carries traffic from clients or replies from backends.
    #[arg(long = "iface", required = true)]
    ifaces: Vec<String>,
    /// Interface external clients arrive on (repeatable): NodePort, externalIP and
    /// LoadBalancer traffic is handled there by XDP in native mode, at the earliest point.
    /// Where XDP cannot attach, the tc program handles it, with a warning. Also gets the tc
    /// programs, as an --iface.
    #[arg(long = "xdp-iface")]
    xdp_ifaces: Vec<String>,
    /// Directory on a bpffs mount to pin maps under; maps already there are adopted.
    #[arg(long, default_value = DEFAULT_PIN_DIR)]
    bpffs: PathBuf,
    /// On exit, also remove the pinned maps (default: keep them for the next run).
    #[arg(long)]
    cleanup: bool,
    /// Only program services whose `service.kubernetes.io/service-proxy-name` label is this
    /// (services without the label are always programmed).
    #[arg(long)]
    service_proxy_name: Option<String>,
    /// How new flows choose a backend when the Service does not say (annotation
    /// `lb-agent.io/lb-algorithm`): `random`, or `maglev` consistent hashing.
    #[arg(long, default_value = "random")]
    lb_algorithm: model::Algorithm,
    /// An address of this node, IPv4 or IPv6, to serve NodePorts on (repeatable); the first
    /// of each family is also the source address of source-NATed externalIP and LoadBalancer
    /// flows of that family. Default: every IPv4 address on the node's interfaces except
    /// loopback and link-local ones, and every global-scope IPv6 address that is neither
    /// tentative nor deprecated (those of the default route's interface first).
    #[arg(long = "node-ip")]
    node_ips: Vec<IpAddr>,
    /// This node's name, to tell its endpoints (EndpointSlice `nodeName`) for
    /// externalTrafficPolicy: Local. Default: `$NODE_NAME`, else the host name.
    #[arg(long)]
    node_name: Option<String>,
    /// Address hairpin flows (a backend reaching its own service) are source-NATed to; pods
    /// must route it to the node (a default route via the node does). Repeatable, at most
    /// once per family: an IPv4 address sets IPv4's (default 169.254.42.1), an IPv6 one
    /// IPv6's (default fd00:a9fe:2a01::1).
    #[arg(long = "hairpin-ip")]
    hairpin_ips: Vec<IpAddr>,
    /// Full rescan period in seconds, as a safety net behind file notifications.
    #[arg(long, default_value_t = 60)]
    resync_seconds: u64,
    /// cgroup v2 directory to attach the socket programs to, which balance connections made
    /// by processes on this node (those in the directory and below, and only in the agent's
    /// network namespace). Default: the cgroup2 root, found in /proc/self/mountinfo.
    #[arg(long, value_name = "PATH", conflicts_with = "no_socket_lb")]
    cgroup: Option<PathBuf>,
    /// Do not attach the socket programs: processes on this node then reach services only if
    /// their packets cross an --iface interface.
    #[arg(long)]
    no_socket_lb: bool,
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match Cli::parse().command {
        Command::Run(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(run(*args)),
        Command::Dump { bpffs } => {
            print!("{}", inspect::read(&bpffs)?.render());
            Ok(())
        }
    }
}

/// How often finished flows' connection-tracking entries are deleted: the shortest lifetime
/// (10 s for closed TCP), so a closed flow is gone within twice that.
const CONNTRACK_GC_EVERY: Duration = Duration::from_secs(10);

/// Attaches the socket programs, or says why not: the tc datapath works without them.
fn attach_socket_lb(dataplane: &mut EbpfDataplane, cgroup: Option<&std::path::Path>) {
    let attached = match cgroup {
        Some(path) => Ok(path.to_owned()),
        None => socket_lb::cgroup2_root(),
    }
    .and_then(|path| dataplane.attach_socket_lb(&path));
    match attached {
        Ok(a) => {
            let programs: Vec<String> = a
                .programs
                .iter()
                .map(|(name, verified)| match verified {
                    Some(n) => format!("{name} ({n} instructions verified)"),
                    None => name.to_string(),
                })
                .collect();
            info!(
                "socket-level load balancing on: {} attached to cgroup {} for network namespace cookie {}",
                programs.join(", "),
                a.cgroup.display(),
                a.netns_cookie
            );
        }
        Err(e) => warn!(
            "socket-level load balancing unavailable: {e}. Continuing with the tc datapath only: connections from processes on this node are not balanced unless their packets cross an --iface interface"
        ),
    }
}

/// How soon a failed apply is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// Owns the dataplane and applies every change to it, one at a time.
struct Syncer {
    dir: ManifestDir,
    dataplane: EbpfDataplane,
    node: model::Node,
    generation: u64,
    /// The manifest errors last reported: a standing error is logged once, not every scan.
    reported_errors: Vec<ManifestError>,
    /// Whether the "no endpoint is on this node" warning was given.
    warned_node_name: bool,
}

impl Syncer {
    /// Warns, once, when endpoints are placed on nodes but none on this one by name: the
    /// likeliest cause is a wrong node name, under which externalTrafficPolicy Local finds no
    /// local endpoints and drops every external packet.
    fn check_node_name(&mut self, slices: &[k8s_openapi::api::discovery::v1::EndpointSlice]) {
        let Some(name) = self.node.name.as_deref() else {
            return;
        };
        let placed: Vec<&str> = slices
            .iter()
            .flat_map(|s| &s.endpoints)
            .filter_map(|e| e.node_name.as_deref())
            .collect();
        if !self.warned_node_name && !placed.is_empty() && !placed.contains(&name) {
            warn!(
                "no endpoint is on node {name:?} (they name nodes such as {:?}); if this node is one of them, set --node-name or NODE_NAME, or externalTrafficPolicy: Local services drop all their external traffic here",
                placed[0]
            );
            self.warned_node_name = true;
        }
    }

    /// Rescans the source and, if anything changed, applies the new desired state.
    fn sync(&mut self) {
        let started = std::time::Instant::now();
        let scan = self.dir.scan();
        if scan.errors != self.reported_errors {
            for e in &scan.errors {
                error!("{e}");
            }
            self.reported_errors = scan.errors.clone();
        }
        if !scan.changed && self.generation > 0 && !self.dataplane.needs_retry() {
            return;
        }
        let (desired, warnings) = model::build(&scan.services, &scan.endpoint_slices, &self.node);
        for w in &warnings {
            warn!("{w}");
        }
        self.check_node_name(&scan.endpoint_slices);
        match self.dataplane.apply(&desired) {
            Ok(r) => {
                self.generation += 1;
                info!(
                    "synced generation={} service_ports={} backends={} writes={} deletes={} in {:?}",
                    self.generation,
                    r.service_ports,
                    r.backends,
                    r.writes,
                    r.deletes,
                    started.elapsed()
                );
            }
            Err(e) => error!("applying the desired state failed: {e:#}"),
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let Source::Dir(path) = args.source.parse::<Source>()?;
    let (hairpin_addr, hairpin_addr6) = hairpin_addrs(&args.hairpin_ips)?;
    let node = model::Node {
        service_proxy_name: args.service_proxy_name,
        name: args.node_name.or_else(node_name_from_environment),
        addrs: if args.node_ips.is_empty() {
            node_addresses()?
        } else {
            args.node_ips
        },
    };
    info!(
        "node {}: NodePorts on {:?}",
        node.name.as_deref().unwrap_or("<unnamed>"),
        node.addrs
    );
    let options = LoadOptions {
        hairpin_addr,
        hairpin_addr6,
        ..LoadOptions::default()
    };
    warn_if_ephemeral_ports_overlap_snat();
    let mut dataplane = EbpfDataplane::load_with(&args.bpffs, &options)?;
    dataplane.set_default_algorithm(args.lb_algorithm);
    for iface in &args.ifaces {
        dataplane.attach(iface)?;
    }
    for iface in &args.xdp_ifaces {
        if !args.ifaces.contains(iface) {
            dataplane.attach(iface)?;
        }
        if let Err(e) = dataplane.attach_xdp(iface) {
            warn!("XDP fast path unavailable on {iface}: {e}. Its NodePort, externalIP and LoadBalancer traffic is handled by the tc program there instead (same behaviour, later in the stack)");
        }
    }
    if args.no_socket_lb {
        info!("socket-level load balancing off (--no-socket-lb): connections from processes on this node are not balanced unless their packets cross an --iface interface");
    } else {
        attach_socket_lb(&mut dataplane, args.cgroup.as_deref());
    }
    info!("maps pinned under {}", args.bpffs.display());
    let (_watcher, mut changes) = source::manifest_dir::watch(&path)
        .with_context(|| format!("watching {}", path.display()))?;
    let mut syncer = Syncer {
        dir: ManifestDir::new(&path)?,
        dataplane,
        node,
        generation: 0,
        warned_node_name: false,
        reported_errors: Vec::new(),
    };
    syncer.sync();

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut resync = tokio::time::interval(Duration::from_secs(args.resync_seconds.max(1)));
    resync.tick().await;
    let conntrack_gc = conntrack_gc::Collector::spawn(&args.bpffs, CONNTRACK_GC_EVERY)
        .context("starting conntrack garbage collection")?;
    loop {
        tokio::select! {
            Some(()) = changes.recv() => {
                // Editors write a file in several steps: let the burst settle, then sync once.
                tokio::time::sleep(Duration::from_millis(20)).await;
                while changes.try_recv().is_ok() {}
                syncer.sync();
            }
            _ = resync.tick() => syncer.sync(),
            // A failed apply (a full map, say) is retried soon, not only at the next resync.
            _ = tokio::time::sleep(RETRY_AFTER), if syncer.dataplane.needs_retry() => syncer.sync(),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }

    // Dropping the dataplane releases the program links, which detaches the datapath.
    drop(conntrack_gc);
    drop(syncer);
    if args.cleanup {
        EbpfDataplane::remove_pins(&args.bpffs)
            .with_context(|| format!("removing pins under {}", args.bpffs.display()))?;
        info!(
            "detached; removed the pinned maps under {}",
            args.bpffs.display()
        );
    } else {
        info!(
            "detached; maps stay pinned under {} for the next run",
            args.bpffs.display()
        );
    }
    Ok(())
}

/// The hairpin addresses of both families: those given (`--hairpin-ip`, at most one per
/// family), else the defaults.
fn hairpin_addrs(given: &[IpAddr]) -> anyhow::Result<(Ipv4Addr, Ipv6Addr)> {
    let mut v4 = None;
    let mut v6 = None;
    for addr in given {
        let (slot, family) = match addr {
            IpAddr::V4(a) => (v4.replace(*a).map(IpAddr::V4), "IPv4"),
            IpAddr::V6(a) => (v6.replace(*a).map(IpAddr::V6), "IPv6"),
        };
        if let Some(earlier) = slot {
            anyhow::bail!(
                "--hairpin-ip is given twice for {family} ({earlier} and {addr}): give at most one IPv4 and one IPv6 address"
            );
        }
    }
    Ok((
        v4.unwrap_or(Ipv4Addr::from(lb_common::snat::HAIRPIN_ADDR)),
        v6.unwrap_or(Ipv6Addr::from(lb_common::snat::HAIRPIN_ADDR6)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hairpin_addresses_at_most_one_per_family() {
        let default = hairpin_addrs(&[]).unwrap();
        assert_eq!(default.0, Ipv4Addr::new(169, 254, 42, 1));
        assert_eq!(default.1, "fd00:a9fe:2a01::1".parse::<Ipv6Addr>().unwrap());
        let six: IpAddr = "fd00:ffff::1".parse().unwrap();
        let four: IpAddr = "169.254.7.7".parse().unwrap();
        assert_eq!(
            hairpin_addrs(&[six]).unwrap(),
            (default.0, "fd00:ffff::1".parse().unwrap())
        );
        assert_eq!(
            hairpin_addrs(&[six, four]).unwrap(),
            (
                Ipv4Addr::new(169, 254, 7, 7),
                "fd00:ffff::1".parse().unwrap()
            )
        );
        let err = hairpin_addrs(&[four, six, four]).unwrap_err().to_string();
        assert!(err.contains("twice for IPv4"), "{err}");
    }

}
