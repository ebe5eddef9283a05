//! `lb-agent`: the node agent. `run` programs a dataplane (eBPF, or a fallback: IPVS,
//! iptables, userspace) from Services and EndpointSlices and keeps it in step with them;
//! `dump` shows what the eBPF datapath holds.

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
    dataplane::{
        ebpf::{conntrack_gc, inspect, socket_lb, EbpfDataplane, LoadOptions, DEFAULT_PIN_DIR},
        iptables::{self, IptablesDataplane},
        ipvs::{self, IpvsDataplane},
        userspace::{self, UserspaceDataplane},
        Dataplane,
    },
    host::{node_addresses, node_name_from_environment, warn_if_ephemeral_ports_overlap_snat},
    mode::{IptablesProbe, Mode, Probe},
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
    about = "Kubernetes service load balancer for Linux nodes (eBPF datapath, with IPVS, iptables and userspace fallbacks)"
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
    /// The dataplane: `ebpf`, `ipvs`, `iptables`, `userspace`, or `auto` to probe the node
    /// and take the first of those that can run here (in that order), saying why.
    #[arg(long, default_value = "auto")]
    mode: Mode,
    /// eBPF mode: interface to attach the datapath to at tc ingress (repeatable; at least
    /// one): every interface that carries traffic from clients or replies from backends.
    #[arg(long = "iface")]
    ifaces: Vec<String>,
    /// The iptables the ipvs, iptables and userspace modes program: `system` (whatever
    /// `iptables` is), `nft` or `legacy`. Rules they left in the other back end are removed.
    #[arg(long, default_value = "system")]
    iptables_backend: IptablesBackend,
    /// The ipvs mode's scheduler: `rr`, `wrr`, `lc`, `sh` (source hashing) or `mh` (Maglev
    /// hashing). ClientIP affinity uses IPVS persistence whatever the scheduler.
    #[arg(long, default_value = "rr")]
    ipvs_scheduler: ipvs::Scheduler,
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
        service_proxy_name: args.service_proxy_name.clone(),
        name: args.node_name.clone().or_else(node_name_from_environment),
        addrs: if args.node_ips.is_empty() {
            node_addresses()?
        } else {
            args.node_ips.clone()
        },
        ..model::Node::default()
    };
    let node_addrs = node.addrs.clone();
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

    let running = start_dataplane(&args, hairpin_addr, hairpin_addr6, &mut metrics)?;
    let mode = running.mode;
    let metrics = Arc::new(metrics);
    if let Some((addr, listener)) = metrics_listener {
        info!("serving metrics on http://{addr}/metrics");
        tokio::spawn(serve_metrics(listener, metrics.clone()));
    }
    let conntrack_gc = match mode {
        Mode::Ebpf => {
            let gc_metrics = metrics.clone();
            Some(
                conntrack_gc::Collector::spawn(
                    &args.bpffs,
                    CONNTRACK_GC_EVERY,
                    conntrack_gauge(move |entries| gc_metrics.set_conntrack_entries(entries)),
                )
                .context("starting conntrack garbage collection")?,
            )
        }
        _ => None,
    };

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
            let kubeconfig = kubeconfig.or(args.kubeconfig.clone());
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
    let mut syncer = Syncer::new(feed, running.dataplane, node, observers);

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
    // Before the first sync: the mode's own full sync must not meet another mode's chains
    // still referenced. What this mode left itself stays until then, so a restart in the same
    // mode keeps serving throughout; a switch of modes has a gap of one sync.
    remove_leftovers(mode, &args, &node_addrs);
    let driven = match syncer.sync() {
        sync::Outcome::SourceStopped => Err(anyhow::anyhow!("the source stopped at startup")),
        _ => sync::drive(&mut syncer, &mut changes, timing, stop).await,
    };

    drop(conntrack_gc);
    if args.cleanup {
        syncer
            .dataplane_mut()
            .cleanup()
            .with_context(|| format!("cleaning up the {mode} dataplane"))?;
    }
    // Dropping the dataplane releases the program links (eBPF: the datapath detaches) and
    // the sockets (userspace: the proxy stops).
    drop(syncer);
    info!("{}", exit_summary(mode, args.cleanup, &args.bpffs));
    driven
}

/// What the agent leaves behind when it exits, in one line.
fn exit_summary(mode: Mode, cleanup: bool, bpffs: &Path) -> String {
    match (mode, cleanup) {
        (Mode::Ebpf, true) => format!(
            "detached; removed the pinned maps under {}",
            bpffs.display()
        ),
        (Mode::Ebpf, false) => format!(
            "detached; maps stay pinned under {} for the next run",
            bpffs.display()
        ),
        (_, true) => format!("stopped; removed everything the {mode} mode programmed"),
        (_, false) => format!(
            "stopped; the {mode} mode's kernel state stays for the next run (--cleanup removes it)"
        ),
    }
}

/// The dataplane the agent runs.
struct Running {
    mode: Mode,
    dataplane: Box<dyn Dataplane>,
}

/// Starts the mode asked for or, under `auto`, the first the probes allow that starts.
fn start_dataplane(
    args: &RunArgs,
    hairpin_addr: Ipv4Addr,
    hairpin_addr6: Ipv6Addr,
    metrics: &mut Metrics,
) -> anyhow::Result<Running> {
    let modes = match args.mode {
        Mode::Auto => auto_candidates(args)?,
        mode => vec![mode],
    };
    let mut failures = Vec::new();
    for mode in modes {
        let started = match mode {
            Mode::Ebpf => start_ebpf(args, hairpin_addr, hairpin_addr6, metrics),
            Mode::Iptables => {
                Ok(Box::new(IptablesDataplane::new(iptables_config(args))) as Box<dyn Dataplane>)
            }
            Mode::Userspace => Ok(Box::new(UserspaceDataplane::new(userspace::Config::new(
                iptables_config(args),
            ))) as Box<dyn Dataplane>),
            Mode::Ipvs => start_ipvs(args),
            Mode::Auto => unreachable!("auto is not a dataplane"),
        };
        match started {
            Ok(dataplane) => {
                info!("running the {mode} dataplane");
                return Ok(Running { mode, dataplane });
            }
            Err(e) if args.mode == Mode::Auto => {
                warn!("the {mode} mode could not start: {e:#}; trying the next");
                failures.push(format!("{mode}: {e:#}"));
            }
            Err(e) => return Err(e.context(format!("starting the {mode} mode"))),
        }
    }
    anyhow::bail!("no mode could start: {}", failures.join("; "))
}

/// Probes the node and returns the modes that can run, best first, logging what was found
/// and why each better mode was passed over.
fn auto_candidates(args: &RunArgs) -> anyhow::Result<Vec<Mode>> {
    let mut probe = Probe::run(&IptablesProbe {
        iptables: args.iptables_backend.0.iptables.clone(),
        command: Arc::new(|program| std::process::Command::new(program)),
    });
    if args.ifaces.is_empty() && probe.bpf.is_ok() {
        probe.bpf = Err("no --iface given to attach the datapath to".into());
    }
    for mode in Mode::PREFERENCE {
        match probe.missing(mode) {
            None => info!("auto: the {mode} mode can run here"),
            Some(why) => info!("auto: the {mode} mode cannot run here: {why}"),
        }
    }
    let (usable, passed_over) = probe.candidates();
    let Some(first) = usable.first() else {
        let why: Vec<String> = passed_over
            .iter()
            .map(|(mode, why)| format!("{mode}: {why}"))
            .collect();
        anyhow::bail!("no mode can run on this node: {}", why.join("; "));
    };
    let passed: Vec<String> = passed_over
        .iter()
        .take_while(|(mode, _)| mode < first)
        .map(|(mode, why)| format!("{mode} ({why})"))
        .collect();
    if passed.is_empty() {
        info!("auto: chose the {first} mode, the preferred one");
    } else {
        info!(
            "auto: chose the {first} mode, passing over {}",
            passed.join(", ")
        );
    }
    Ok(usable)
}

/// Loads the eBPF datapath, attaches it to the interfaces and the socket programs to the
/// cgroup, and exposes its counters.
fn start_ebpf(
    args: &RunArgs,
    hairpin_addr: Ipv4Addr,
    hairpin_addr6: Ipv6Addr,
    metrics: &mut Metrics,
) -> anyhow::Result<Box<dyn Dataplane>> {
    anyhow::ensure!(
        !args.ifaces.is_empty(),
        "the ebpf mode needs at least one --iface to attach the datapath to"
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
    register_datapath_counters(metrics, &args.bpffs)?;
    Ok(Box::new(dataplane))
}

/// Checks that IPVS is there (loading `ip_vs` if need be) and makes the dataplane.
fn start_ipvs(args: &RunArgs) -> anyhow::Result<Box<dyn Dataplane>> {
    let iptables = iptables_config(args);
    let config = ipvs::Config {
        families: iptables.families,
        iptables: iptables.backend,
        ..ipvs::Config::new(args.ipvs_scheduler)
    };
    ipvs::probe(&config)?;
    Ok(Box::new(IpvsDataplane::new(config)))
}

/// The iptables the rule-based modes program: the chosen back end, for IPv6 too when its
/// `ip6tables` works.
fn iptables_config(args: &RunArgs) -> iptables::Config {
    let mut config = iptables::Config::new(args.iptables_backend.0.clone());
    let ip6 = &config.backend.ip6tables_save;
    let works = std::process::Command::new(ip6)
        .args(["-t", "nat"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        warn!("`{ip6} -t nat` does not work here: IPv6 services are not programmed");
        config.families.retain(|f| *f == model::IpFamily::V4);
    }
    config
}

/// Removes what other modes left behind: a node switching modes must not keep the old
/// mode's rules or pins. Failures are logged, not fatal: the chosen mode can serve anyway.
fn remove_leftovers(mode: Mode, args: &RunArgs, node_addrs: &[IpAddr]) {
    if mode != Mode::Ebpf && args.bpffs.exists() {
        match EbpfDataplane::remove_pins(&args.bpffs) {
            Ok(()) => info!(
                "removed the ebpf mode's pins under {}",
                args.bpffs.display()
            ),
            Err(e) => warn!(
                "could not remove the ebpf mode's pins under {}: {e}",
                args.bpffs.display()
            ),
        }
    }
    if mode != Mode::Ipvs {
        let node_addrs = node_addrs.iter().copied().collect();
        let config = ipvs::Config {
            iptables: args.iptables_backend.0.clone(),
            ..ipvs::Config::default()
        };
        if let Err(e) = ipvs::remove_leftovers(&config, &node_addrs) {
            warn!("could not remove what the ipvs mode left: {e:#}");
        }
    }
    let in_use = &args.iptables_backend.0;
    let keep: &[iptables::rules::JumpRule] = match mode {
        Mode::Iptables => iptables::rules::JUMP_RULES,
        Mode::Userspace => userspace::rules::JUMP_RULES,
        Mode::Ipvs => ipvs::rules::JUMP_RULES,
        Mode::Ebpf | Mode::Auto => &[],
    };
    let backends = std::iter::once((in_use.clone(), keep))
        .chain(in_use.others().into_iter().map(|b| (b, &[][..])));
    for (backend, keep) in backends {
        let name = backend.name.clone();
        match iptables::remove_leftovers(&iptables::Config::new(backend), keep) {
            Ok(0) => {}
            Ok(n) => info!("removed {n} rules and chains other modes left in the {name} iptables"),
            Err(e) => warn!("could not remove what other modes left in the {name} iptables: {e:#}"),
        }
    }
}

/// `--iptables-backend`.
#[derive(Clone, Debug)]
struct IptablesBackend(iptables::Backend);

impl std::str::FromStr for IptablesBackend {
    type Err = String;

    fn from_str(arg: &str) -> Result<IptablesBackend, String> {
        match arg {
            "system" => Ok(IptablesBackend(iptables::Backend::system())),
            "nft" => Ok(IptablesBackend(iptables::Backend::nft())),
            "legacy" => Ok(IptablesBackend(iptables::Backend::legacy())),
            _ => Err(format!(
                "{arg:?} is not an iptables back end: use system, nft or legacy"
            )),
        }
    }
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
            "--mode",
            "iptables",
            "--iptables-backend",
            "legacy",
            "--ipvs-scheduler",
            "mh",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.min_sync_period, Duration::from_millis(250));
        assert_eq!(args.mode, Mode::Iptables);
        assert_eq!(args.iptables_backend.0, iptables::Backend::legacy());
        assert_eq!(args.ipvs_scheduler, ipvs::Scheduler::Mh);
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
        assert_eq!(args.mode, Mode::Auto);
        assert_eq!(args.iptables_backend.0, iptables::Backend::system());
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
            ["--mode", "bpf"],
            ["--iptables-backend", "nf_tables"],
            ["--ipvs-scheduler", "dh"],
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
