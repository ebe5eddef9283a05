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
    let path = match args.source.parse::<Source>()? {
        Source::Dir(path) => path,
        // The watch source exists (source::kube); running the agent from it is wired separately.
        Source::Kube { .. } => {
            anyhow::bail!("--source kube is not wired into the agent yet; use --source dir:PATH")
        }
    };
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

/// Says so when the node's own sockets may pick ports the datapath allocates for source NAT:
/// a reply to such a socket would be taken for a NATed flow's and sent to a client.
fn warn_if_ephemeral_ports_overlap_snat() {
    let Ok(range) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return;
    };
    let high: Option<u16> = range.split_whitespace().nth(1).and_then(|h| h.parse().ok());
    let reserved =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports").unwrap_or_default();
    if high.is_some_and(|h| h >= lb_common::snat::PORT_MIN) && !snat_ports_reserved(&reserved) {
        warn!(
            "net.ipv4.ip_local_port_range is {:?}: it reaches into the ports used for source NAT ({}-65535); lower its upper end below {}, or reserve them with net.ipv4.ip_local_reserved_ports",
            range.trim(),
            lb_common::snat::PORT_MIN,
            lb_common::snat::PORT_MIN
        );
    }
}

/// True when `reserved` (`ip_local_reserved_ports`: `a,b-c,...`) covers every SNAT port.
fn snat_ports_reserved(reserved: &str) -> bool {
    let ranges: Vec<(u16, u16)> = reserved
        .trim()
        .split(',')
        .filter_map(|r| {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .collect();
    (lb_common::snat::PORT_MIN..=u16::MAX).all(|p| ranges.iter().any(|&(a, b)| a <= p && p <= b))
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

/// `$NODE_NAME` (what a DaemonSet passes from `spec.nodeName`), else the host name.
fn node_name_from_environment() -> Option<String> {
    if let Ok(name) = std::env::var("NODE_NAME") {
        if !name.is_empty() {
            return Some(name);
        }
    }
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    Some(name.trim().to_owned()).filter(|n| !n.is_empty())
}

/// The addresses of this network namespace's interfaces that are up where a NodePort can be
/// reached from outside: IPv4 ones except loopback and link-local, then IPv6 ones of global
/// scope that are usable (see `global_ipv6_addresses`). Within a family, those of the
/// interface its default route leaves by come first: the first is the source-NAT address for
/// externalIP and LoadBalancer flows, and a bridge's (docker0, cni0) would not be routable
/// from other nodes.
fn node_addresses() -> anyhow::Result<Vec<IpAddr>> {
    let (v4, up) = ipv4_addresses()?;
    let default6 = default_route6_interface();
    let mut v6: Vec<(bool, Ipv6Addr)> = match std::fs::read_to_string("/proc/net/if_inet6") {
        Ok(table) => global_ipv6_addresses(&table)
            .into_iter()
            .filter(|(_, iface)| up.contains(iface))
            .map(|(addr, iface)| (default6.as_deref() != Some(&*iface), addr))
            .collect(),
        // No IPv6 in this kernel (or namespace): IPv4 only.
        Err(_) => Vec::new(),
    };
    v6.sort_by_key(|a| a.0);
    v6.dedup_by_key(|a| a.1);
    let v4 = v4.into_iter().map(IpAddr::V4);
    Ok(v4.chain(v6.into_iter().map(|a| IpAddr::V6(a.1))).collect())
}

/// The global-scope IPv6 addresses in `table` (`/proc/net/if_inet6`: address, ifindex, prefix
/// length, scope, flags, interface name, in hex), each with its interface: not loopback,
/// link-local or site-local, and not tentative (duplicate address detection is still
/// running), failed DAD, or deprecated (about to go).
fn global_ipv6_addresses(table: &str) -> Vec<(Ipv6Addr, String)> {
    // `include/net/ipv6.h` and `include/uapi/linux/if_addr.h`.
    const SCOPE_GLOBAL: u32 = 0x00;
    const IFA_F_DADFAILED: u32 = 0x08;
    const IFA_F_DEPRECATED: u32 = 0x20;
    const IFA_F_TENTATIVE: u32 = 0x40;
    table
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let addr = Ipv6Addr::from(u128::from_str_radix(f.first()?, 16).ok()?);
            let scope = u32::from_str_radix(f.get(3)?, 16).ok()?;
            let flags = u32::from_str_radix(f.get(4)?, 16).ok()?;
            let unusable = IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TENTATIVE;
            let usable = scope == SCOPE_GLOBAL
                && flags & unusable == 0
                && !addr.is_loopback()
                && !addr.is_unicast_link_local();
            let iface = f.get(5)?.to_string();
            usable.then_some((addr, iface))
        })
        .collect()
}

/// The IPv4 addresses `node_addresses` describes, and the names of the interfaces that are up.
fn ipv4_addresses() -> anyhow::Result<(Vec<Ipv4Addr>, Vec<String>)> {
    let default_iface = default_route_interface();
    let mut addrs: Vec<(bool, Ipv4Addr)> = Vec::new();
    let mut up_ifaces: Vec<String> = Vec::new();
    let mut ifaddrs: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we walk read-only and free once below.
    if unsafe { libc::getifaddrs(&mut ifaddrs) } != 0 {
        return Err(std::io::Error::last_os_error()).context("listing the node's addresses");
    }
    let mut cur = ifaddrs;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        let up = ifa.ifa_flags & libc::IFF_UP as u32 != 0;
        if up {
            // SAFETY: getifaddrs gives every entry a NUL-terminated name.
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
            if !up_ifaces.iter().any(|n| *n == name) {
                up_ifaces.push(name.into_owned());
            }
        }
        // SAFETY: a non-null ifa_addr points at a sockaddr whose family says its real type.
        if !up
            || ifa.ifa_addr.is_null()
            || unsafe { (*ifa.ifa_addr).sa_family } as i32 != libc::AF_INET
        {
            continue;
        }
        // SAFETY: AF_INET addresses are sockaddr_in.
        let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
        let addr = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
        // SAFETY: getifaddrs gives every entry a NUL-terminated name.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        let on_default_route = default_iface.as_deref() == Some(&*name);
        if !addr.is_loopback() && !addr.is_link_local() && !addrs.iter().any(|a| a.1 == addr) {
            addrs.push((!on_default_route, addr));
        }
    }
    // SAFETY: freeing the list getifaddrs allocated, once.
    unsafe { libc::freeifaddrs(ifaddrs) };
    // Stable: otherwise in interface order.
    addrs.sort_by_key(|a| a.0);
    Ok((addrs.into_iter().map(|a| a.1).collect(), up_ifaces))
}

/// The interface of the IPv6 default route, from /proc/net/ipv6_route.
fn default_route6_interface() -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/ipv6_route").ok()?;
    default_route6_in(&table)
}

/// The interface of the IPv6 default route in `table` (`/proc/net/ipv6_route`).
fn default_route6_in(table: &str) -> Option<String> {
    // Columns: destination, its prefix length, source, its prefix length, next hop, metric,
    // refcount, use count, flags, interface; all hex. A default route has destination ::/0;
    // unreachable routes (RTF_REJECT, on lo) do not count; the lowest metric wins.
    const RTF_REJECT: u32 = 0x0200;
    table
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let default = f.first()?.bytes().all(|b| b == b'0') && *f.get(1)? == "00";
            let metric = u32::from_str_radix(f.get(5)?, 16).ok()?;
            let flags = u32::from_str_radix(f.get(8)?, 16).ok()?;
            let iface = f.get(9)?.to_string();
            (default && flags & RTF_REJECT == 0).then_some((metric, iface))
        })
        .min()
        .map(|(_, iface)| iface)
}

/// The interface of the IPv4 default route, from /proc/net/route.
fn default_route_interface() -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    // Columns: Iface Destination Gateway Flags RefCnt Use Metric Mask ...; a default route
    // has destination and mask 0 (a VPN's 0.0.0.0/1 does not count); the lowest metric wins.
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let default = f.get(1) == Some(&"00000000") && f.get(7) == Some(&"00000000");
            let metric: u32 = f.get(6)?.parse().ok()?;
            default.then(|| (metric, f[0].to_owned()))
        })
        .min()
        .map(|(_, iface)| iface)
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

    #[test]
    fn node_ipv6_addresses_are_global_and_usable() {
        let table = "\
00000000000000000000000000000001 01 80 10 80       lo
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
fd000000000000000000000000000002 04 40 00 82     eth0
20010db8000000000000000000000003 04 40 00 c0     eth0
20010db8000000000000000000000004 04 40 00 20     eth0
20010db8000000000000000000000005 05 40 00 80     eth1
";
        let got = global_ipv6_addresses(table);
        assert_eq!(
            got,
            [
                ("fd00::2".parse().unwrap(), "eth0".to_owned()),
                ("2001:db8::5".parse().unwrap(), "eth1".to_owned()),
            ],
            "not loopback, link-local, tentative (0x40) or deprecated (0x20)"
        );
    }

    #[test]
    fn the_ipv6_default_route_is_found() {
        let table = "\
fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000100 00000002 00000000 00000003     eth1
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
";
        assert_eq!(default_route6_in(table).as_deref(), Some("eth1"));
        assert_eq!(default_route6_in(""), None);
    }

    #[test]
    fn reserved_ports_must_cover_the_whole_snat_range() {
        assert!(snat_ports_reserved("61000-65535\n"));
        assert!(snat_ports_reserved("8080,60000-63000,63001-65535"));
        assert!(!snat_ports_reserved(""));
        assert!(!snat_ports_reserved("61000-65534"));
        assert!(!snat_ports_reserved("30000-32767"));
    }
}
