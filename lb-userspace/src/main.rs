//! `lb-agent`: the node agent. `run` programs the eBPF datapath from Services and
//! EndpointSlices and keeps it in step with them; `dump` shows what the datapath holds.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use log::{info, warn};
use tokio::signal::unix::{signal, SignalKind};

use lb_userspace::{
    dataplane::ebpf::{
        conntrack_gc, inspect, socket_lb, EbpfDataplane, LoadOptions, DEFAULT_PIN_DIR,
    },
    host::{node_addresses, node_name_from_environment, warn_if_ephemeral_ports_overlap_snat},
    model,
    serve::{
        self,
        health::{serve_proxier_health, ProxierHealth},
        metrics::{serve_metrics, Metrics},
        service_health::ServiceHealthServers,
    },
    source::{self, kube::KubeSource, manifest_dir::ManifestDir, Source},
    sync::{self, Feed, Observers, Syncer, Timing},
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
    /// Where Services and EndpointSlices come from: `kube` (the API server: in-cluster, or
    /// `--kubeconfig`), or `dir:PATH` (YAML/JSON manifests, watched).
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
    /// Full resync period in seconds, as a safety net behind change notifications
    /// (kube-proxy's `--iptables-sync-period`). `/healthz` fails when a change waits longer
    /// than twice this.
    #[arg(long, default_value_t = 60)]
    resync_seconds: u64,
    /// The shortest time between two syncs: changes arriving within it of the last sync wait
    /// for its end and are applied together (kube-proxy's `--iptables-min-sync-period`). A
    /// change after a quiet spell is applied at once. E.g. `1s`, `250ms`, `0s`.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    min_sync_period: Duration,
    /// kubeconfig file for `--source kube`; without it, the in-cluster service account.
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// Where to serve `/healthz` and `/livez` (kube-proxy's address); `off` for nowhere.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: BindAddress,
    /// Where to serve Prometheus `/metrics` (kube-proxy's address); `off` for nowhere.
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind_address: BindAddress,
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
        // The owner task runs on this thread; the watches and the HTTP servers on two
        // workers, so a long sync never stalls a health probe or a watch stream.
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
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

/// How long a directory change is left to settle: editors write a file in several steps.
const DIR_SETTLE: Duration = Duration::from_millis(20);

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let started = std::time::SystemTime::now();
    let source = args.source.parse::<Source>()?;
    let (hairpin_addr, hairpin_addr6) = hairpin_addrs(&args.hairpin_ips)?;
    // Given node addresses also confine the health-check node ports, as kube-proxy's
    // --nodeport-addresses does; otherwise they listen on every address.
    let health_check_addrs = (!args.node_ips.is_empty()).then(|| args.node_ips.clone());
    let node = model::Node {
        service_proxy_name: args.service_proxy_name,
        name: args.node_name.or_else(node_name_from_environment),
        addrs: if args.node_ips.is_empty() {
            node_addresses()?
        } else {
            args.node_ips
        },
        ..model::Node::default()
    };
    info!(
        "node {}: NodePorts on {:?}",
        node.name.as_deref().unwrap_or("<unnamed>"),
        node.addrs
    );
    let resync_every = Duration::from_secs(args.resync_seconds.max(1));

    // The servers first: a port another proxy holds is a startup error, not a surprise later.
    // kube-proxy counts itself unhealthy when a change waits longer than twice its sync period.
    let health = ProxierHealth::new(2 * resync_every);
    if let BindAddress(Some(addr)) = args.healthz_bind_address {
        let listener = serve::listen(addr, "health checks (/healthz, /livez)").await?;
        info!("serving /healthz and /livez on {addr}");
        tokio::spawn(serve_proxier_health(listener, health.clone()));
    }
    let mut metrics = Metrics::new();
    let metrics_listener = match args.metrics_bind_address.0 {
        Some(addr) => Some((addr, serve::listen(addr, "metrics").await?)),
        None => None,
    };

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

    register_datapath_counters(&mut metrics, &args.bpffs)?;
    let metrics = Arc::new(metrics);
    if let Some((addr, listener)) = metrics_listener {
        info!("serving metrics on http://{addr}/metrics");
        tokio::spawn(serve_metrics(listener, metrics.clone()));
    }
    let gc_metrics = metrics.clone();
    let conntrack_gc = conntrack_gc::Collector::spawn(
        &args.bpffs,
        CONNTRACK_GC_EVERY,
        conntrack_gauge(move |entries| gc_metrics.set_conntrack_entries(entries)),
    )
    .context("starting conntrack garbage collection")?;

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    // The directory watcher must live as long as the loop: dropping it ends notifications.
    let (feed, mut changes, _dir_watcher, settle) = match source {
        Source::Dir(path) => {
            let (watcher, changes) = source::manifest_dir::watch(&path)
                .with_context(|| format!("watching {}", path.display()))?;
            let feed = Feed::dir(ManifestDir::new(&path)?);
            (feed, changes, Some(watcher), DIR_SETTLE)
        }
        Source::Kube { kubeconfig } => {
            let kubeconfig = kubeconfig.or(args.kubeconfig);
            let client = source::kube::client(kubeconfig.as_deref()).await?;
            let (kube, changes) = KubeSource::start(client, node.name.as_deref());
            info!("waiting for the API server's Services, EndpointSlices and Node to be listed");
            tokio::select! {
                ready = kube.ready() => ready?,
                _ = sigterm.recv() => return Ok(()),
                _ = sigint.recv() => return Ok(()),
            }
            info!("caches ready");
            (Feed::Kube(kube), changes, None, Duration::ZERO)
        }
    };
    let service_health = match health_check_addrs {
        Some(addrs) => ServiceHealthServers::on_addresses(health.clone(), addrs),
        None => ServiceHealthServers::new(health.clone()),
    };
    let observers = Observers {
        service_health,
        health,
        metrics,
        started,
    };
    let mut syncer = Syncer::new(feed, dataplane, node, observers);

    let timing = Timing {
        min_sync_period: args.min_sync_period,
        settle,
        resync_every,
        retry_after: RETRY_AFTER,
    };
    let stop = async {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
    };
    let driven = match syncer.sync() {
        sync::Outcome::SourceStopped => Err(anyhow::anyhow!("the source stopped at startup")),
        _ => sync::drive(&mut syncer, &mut changes, timing, stop).await,
    };

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
    driven
}

/// Exposes the datapath's and socket programs' counters, read from their pinned maps at
/// every scrape.
fn register_datapath_counters(metrics: &mut Metrics, bpffs: &Path) -> anyhow::Result<()> {
    let stats = inspect::open_counters(bpffs)?;
    metrics.register_datapath_counters(move || inspect::sum_counters(&stats));
    let sock_stats = inspect::open_sock_counters(bpffs)?;
    metrics.register_socket_counters(move || inspect::sum_sock_counters(&sock_stats));
    Ok(())
}

/// Adds up the two families' conntrack entries, as each family's pass reports them.
fn conntrack_gauge(
    set: impl Fn(usize) + Send + 'static,
) -> impl Fn(&'static str, conntrack_gc::Sweep) + Send + 'static {
    let by_map = std::sync::Mutex::new(std::collections::BTreeMap::new());
    move |map, sweep| {
        let mut by_map = by_map.lock().unwrap_or_else(|e| e.into_inner());
        by_map.insert(map, sweep.remaining);
        set(by_map.values().sum());
    }
}

/// `1s`, `250ms`, `0s`: a duration as kube-proxy's flags take the common cases.
fn parse_duration(arg: &str) -> Result<Duration, String> {
    let bad = || format!("{arg:?} is not a duration such as 1s or 250ms");
    let (number, unit) = match arg.strip_suffix("ms") {
        Some(n) => (n, Duration::from_millis(1)),
        None => (
            arg.strip_suffix('s').ok_or_else(bad)?,
            Duration::from_secs(1),
        ),
    };
    let n: u32 = number.parse().map_err(|_| bad())?;
    Ok(unit * n)
}

/// An address to listen on, or none (`off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BindAddress(Option<SocketAddr>);

impl std::str::FromStr for BindAddress {
    type Err = String;

    fn from_str(arg: &str) -> Result<BindAddress, String> {
        match arg {
            "off" | "" => Ok(BindAddress(None)),
            _ => arg.parse().map(|a| BindAddress(Some(a))).map_err(|_| {
                format!("{arg:?} is not an address and port such as 0.0.0.0:10256, or off")
            }),
        }
    }
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
    fn a_full_command_line_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "lb-agent",
            "run",
            "--source",
            "kube",
            "--kubeconfig",
            "/k",
            "--iface",
            "eth0",
            "--min-sync-period",
            "250ms",
            "--healthz-bind-address",
            "off",
            "--metrics-bind-address",
            "[::]:9100",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.min_sync_period, Duration::from_millis(250));
        assert_eq!(args.healthz_bind_address, BindAddress(None));
        assert_eq!(
            args.metrics_bind_address,
            BindAddress(Some("[::]:9100".parse().unwrap()))
        );
        assert_eq!(args.kubeconfig.as_deref(), Some(Path::new("/k")));
        let defaults =
            Cli::try_parse_from(["lb-agent", "run", "--source", "dir:/x", "--iface", "e"])
                .unwrap_or_else(|e| panic!("{e}"));
        let Command::Run(args) = defaults.command else {
            panic!("not run")
        };
        assert_eq!(args.min_sync_period, Duration::from_secs(1));
        assert_eq!(
            args.healthz_bind_address,
            BindAddress(Some("0.0.0.0:10256".parse().unwrap())),
            "kube-proxy's health address"
        );
        assert_eq!(
            args.metrics_bind_address,
            BindAddress(Some("127.0.0.1:10249".parse().unwrap())),
            "kube-proxy's metrics address"
        );
        for bad in [
            ["--min-sync-period", "1"],
            ["--healthz-bind-address", "10256"],
        ] {
            let argv = [
                "lb-agent", "run", "--source", "kube", "--iface", "e", bad[0], bad[1],
            ];
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?}");
        }
    }

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
