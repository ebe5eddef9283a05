//! The pure model: Kubernetes Services and EndpointSlices in, the desired load-balancer state
//! out. No I/O and no privileges, so kube-proxy's semantics are table-tested here.

use std::collections::{btree_map::Entry, BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// L4 protocol of a service port, as Kubernetes names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The IP protocol number the datapath keys on.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::proto::TCP,
            Protocol::Udp => lb_common::proto::UDP,
            Protocol::Sctp => lb_common::proto::SCTP,
        }
    }
}

/// Identifies one port of one service, the unit that owns a backend set
/// (kube-proxy's `ServicePortName`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    /// The service port's name; empty for a single unnamed port.
    pub port: String,
    pub protocol: Protocol,
}

impl std::fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port.is_empty() {
            write!(f, ":{}", self.port)?;
        }
        write!(f, "/{:?}", self.protocol)
    }
}

/// An IP address family. A dual-stack service is served in both, each on its own: its
/// frontends of one family reach only its endpoints of that family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    /// The family of `addr`.
    pub fn of(addr: IpAddr) -> IpFamily {
        match addr {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }

    /// The name Kubernetes uses (`ipFamilies`, an EndpointSlice's `addressType`).
    pub fn as_str(self) -> &'static str {
        match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        }
    }
}

impl std::fmt::Display for IpFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An address and port the datapath answers for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl Frontend {
    pub fn family(&self) -> IpFamily {
        IpFamily::of(self.addr)
    }
}

/// An endpoint traffic is sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
}

impl Endpoint {
    pub fn family(&self) -> IpFamily {
        IpFamily::of(self.addr)
    }
}

/// Everything the dataplane needs to serve one service port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServicePort {
    /// ClusterIP frontends: reached from inside the cluster, served with every endpoint.
    pub frontends: BTreeSet<Frontend>,
    /// Node-facing frontends: the NodePort on every node address, externalIPs, LoadBalancer
    /// ingress IPs.
    pub external_frontends: BTreeMap<Frontend, External>,
    /// loadBalancerSourceRanges (address, prefix length, host bits cleared): the only
    /// clients the LoadBalancer frontends accept. Ranges of one family constrain only the
    /// frontends of that family, as kube-proxy (one proxier per family, each seeing only
    /// ranges of its own) does: a family with no ranges of its own accepts every client, even
    /// when the other family has ranges. No ranges at all: every client.
    pub source_ranges: BTreeSet<(IpAddr, u8)>,
    /// externalTrafficPolicy Local: external frontends keep the client's address and use only
    /// `local_endpoints`. The node's own connections to them still use `endpoints`, as
    /// kube-proxy sends them (pkg/proxy/iptables/proxier.go, the EXT chain's rule for
    /// `--src-type LOCAL`).
    pub external_local: bool,
    /// internalTrafficPolicy Local: the ClusterIP frontends use only `local_endpoints`.
    pub internal_local: bool,
    /// What policy Cluster uses: the endpoints, de-duplicated across EndpointSlices, of the
    /// families the service has ClusterIPs of, chosen per family as kube-proxy's
    /// `CategorizeEndpoints` (pkg/proxy/topology.go) does: the ready ones, narrowed to this
    /// node or zone when the slices' topology hints say so; with none ready anywhere, every
    /// serving terminating one. Empty for a family exactly when the service has no usable
    /// endpoint of it anywhere (kube-proxy's `hasAnyEndpoints`): its frontends then reject,
    /// where an empty `local_endpoints` with endpoints elsewhere drops.
    pub endpoints: BTreeSet<Endpoint>,
    /// What policy Local uses: the ready endpoints on this node (their EndpointSlice
    /// `nodeName` is the node's); with none, the serving terminating ones on it. Topology
    /// hints do not apply.
    pub local_endpoints: BTreeSet<Endpoint>,
    /// ClientIP session-affinity timeout in seconds; `None` when affinity is off.
    pub affinity_timeout_s: Option<u32>,
    /// How new flows choose a backend, when the service asks for one (`ANNOTATION_ALGORITHM`);
    /// `None` leaves it to the agent's `--lb-algorithm`.
    pub algorithm: Option<Algorithm>,
}

/// How an external frontend is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct External {
    /// The node address its flows are source-NATed to under externalTrafficPolicy Cluster;
    /// always of the frontend's family.
    pub snat_addr: IpAddr,
    /// A LoadBalancer ingress IP: subject to `ServicePort::source_ranges`.
    pub load_balancer: bool,
}

/// How a new flow chooses its backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// Uniformly at random.
    #[default]
    Random,
    /// Maglev consistent hashing of the 5-tuple: the same flow maps to the same backend on
    /// every node, and a backend set change moves few flows.
    Maglev,
}

impl std::str::FromStr for Algorithm {
    type Err = String;

    fn from_str(s: &str) -> Result<Algorithm, String> {
        match s {
            "random" => Ok(Algorithm::Random),
            "maglev" => Ok(Algorithm::Maglev),
            _ => Err(format!(
                "{s:?} is not a load-balancing algorithm: random or maglev"
            )),
        }
    }
}

/// The whole desired state: what every dataplane mode programs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<ServicePortName, ServicePort>,
    /// This node's addresses, of both families: endpoints at one of them are hostNetwork
    /// endpoints, reached by local delivery.
    pub node_addrs: BTreeSet<IpAddr>,
    /// The health-check node ports to serve, as kube-proxy does for every LoadBalancer
    /// service with externalTrafficPolicy Local (`spec.healthCheckNodePort`).
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

/// What a health-check node port answers for: one service, and how many of its endpoints
/// are ready on this node. Load balancers send traffic to the node only while that is above
/// zero.
///
/// The count is kube-proxy's `LocalReadyEndpoints` (pkg/proxy/endpointschangetracker.go):
/// distinct addresses over all the service's ports, ready ones only (a serving terminating
/// endpoint still receives traffic, but does not keep the node healthy). kube-proxy counts
/// per address family, one proxier each; with one number per port here, a dual-stack
/// service's is the larger of its two families' counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    pub local_endpoints: usize,
}

// ------------------------------------------------------------------------------------------------
// Translation from Kubernetes objects, following kube-proxy (pkg/proxy: serviceport.go,
// servicechangetracker.go, endpointslicecache.go).

/// What the model needs to know about the node it programs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    /// This proxy's name: Services labelled `service.kubernetes.io/service-proxy-name` with it
    /// are programmed; `None` skips every labelled Service.
    pub service_proxy_name: Option<String>,
    /// The node's name, to tell its endpoints (EndpointSlice `nodeName`) from the others, and
    /// to find the endpoints hinted for it (`hints.forNodes`).
    pub name: Option<String>,
    /// The node's zone, its `topology.kubernetes.io/zone` label: endpoints hinted for it
    /// (`hints.forZones`) are preferred. `None`: zone hints are ignored.
    pub zone: Option<String>,
    /// The node's addresses, of either family: NodePorts are served on each (of the families
    /// a service has), and the first of each family is the source address for externalIP and
    /// LoadBalancer flows of that family. Empty: no NodePort frontends.
    pub addrs: Vec<IpAddr>,
}

/// Label naming the service proxy that implements a Service instead of the default one.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// Label of a Node that names its zone, for topology-aware routing.
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// Label marking a Service as headless: service proxies leave it alone.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Label linking an EndpointSlice to the Service it holds endpoints for.
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
/// The namespace of an object whose metadata names none.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Annotation choosing a Service's load-balancing algorithm: `random` or `maglev`.
pub const ANNOTATION_ALGORITHM: &str = "lb-agent.io/lb-algorithm";
/// ClientIP affinity timeout when the Service gives none (the API server's default).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The largest ClientIP affinity timeout the API accepts.
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

impl Protocol {
    /// The protocol Kubernetes spells `name` (case-sensitive, as the API is).
    pub fn from_kubernetes(name: &str) -> Option<Protocol> {
        match name {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The name Kubernetes uses for the protocol.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = std::net::SocketAddr::new(self.addr, self.port);
        write!(f, "{at}/{}", self.protocol.as_str())
    }
}

/// The kinds of object the model reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    Service,
    EndpointSlice,
    /// Cluster-scoped: its `ObjectRef` has an empty namespace.
    Node,
}

impl ObjectKind {
    /// The `kind` field of such an object.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Node => "Node",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        self != ObjectKind::Node
    }

    /// The `apiVersion` this agent reads the kind in.
    pub fn api_version(self) -> &'static str {
        match self {
            ObjectKind::Service => "v1",
            ObjectKind::EndpointSlice => "discovery.k8s.io/v1",
            ObjectKind::Node => "v1",
        }
    }
}

impl std::fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Names one Kubernetes object, as `kubectl` would: `Service default/web`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: ObjectKind,
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    /// The object `meta` describes; an absent or empty namespace is `default` (for kinds
    /// that have namespaces).
    pub fn new(kind: ObjectKind, meta: &ObjectMeta) -> ObjectRef {
        ObjectRef {
            kind,
            namespace: match kind.namespaced() {
                true => namespace_of(meta).to_owned(),
                false => String::new(),
            },
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind.namespaced() {
            true => write!(f, "{} {}/{}", self.kind, self.namespace, self.name),
            false => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// Something in a Service or EndpointSlice that the model could not program as written.
/// The rest of the object is still programmed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{object}: {problem}")]
pub struct ModelWarning {
    pub object: ObjectRef,
    pub problem: Problem,
}

/// What was wrong, and what the model did about it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("cluster IP {addr:?} is not an IP address; skipping it")]
    InvalidClusterIp { addr: String },
    #[error("the service has no ports; nothing to program")]
    NoPorts,
    #[error("port {port:?} has protocol {protocol:?}, not TCP, UDP or SCTP; skipping that port")]
    UnknownProtocol { port: String, protocol: String },
    #[error("port {port:?} has number {number}, outside 1-65535; skipping that port")]
    InvalidPortNumber { port: String, number: i32 },
    #[error("port {port:?} has no port number; skipping that port")]
    MissingPortNumber { port: String },
    #[error("{frontend} already belongs to {owner}; skipping it for port {port:?}")]
    FrontendTaken {
        frontend: Frontend,
        owner: ServicePortName,
        port: String,
    },
    #[error("sessionAffinity {given:?} is neither None nor ClientIP; affinity is off")]
    UnknownSessionAffinity { given: String },
    #[error(
        "sessionAffinityConfig.clientIP.timeoutSeconds {given} is outside 1-86400; using {used}"
    )]
    AffinityTimeoutOutOfRange { given: i32, used: u32 },
    #[error(
        "the slice has no {LABEL_SERVICE_NAME} label, so it belongs to no service; ignoring it"
    )]
    NoServiceName,
    #[error("annotation {ANNOTATION_ALGORITHM} is {given:?}, not random or maglev; using the agent's default")]
    UnknownAlgorithm { given: String },
    #[error("endpoint address {addr:?} is not an address of the slice's addressType; skipping that endpoint")]
    InvalidEndpointAddress { addr: String },
    #[error("an endpoint has no addresses; skipping it")]
    EndpointWithoutAddress,
    #[error("external or load-balancer IP {addr:?} is not an IP address; skipping it")]
    InvalidExternalIp { addr: String },
    #[error("loadBalancerSourceRanges entry {range:?} is not a CIDR; skipping it (the other ranges still apply)")]
    InvalidSourceRange { range: String },
    #[error("the node has no {family} address to source-NAT external traffic to; skipping the service's {family} external and load-balancer IPs {addrs:?}")]
    NoNodeAddress {
        family: IpFamily,
        addrs: Vec<String>,
    },
    #[error("external or load-balancer IP {addr:?} is {family}, but the service has no {family} cluster IP; skipping it (a service is served only in the families of its cluster IPs)")]
    FamilyNotServed { addr: String, family: IpFamily },
    #[error("{field} {given:?} is neither Cluster nor Local; using Cluster")]
    UnknownTrafficPolicy { field: &'static str, given: String },
    #[error("load-balancer ingress IP {addr:?} has ipMode {given:?}, neither VIP nor Proxy; skipping it (only VIP-mode ingress IPs are programmed)")]
    UnknownIpMode { addr: String, given: String },
    #[error("a LoadBalancer with externalTrafficPolicy Local needs a healthCheckNodePort, and this one has none; no health check is served for it")]
    MissingHealthCheckNodePort,
    #[error("healthCheckNodePort {number} is outside 1-65535; no health check is served for it")]
    InvalidHealthCheckNodePort { number: i32 },
    #[error("healthCheckNodePort {port} is already the health check of {owner}; none is served for this service")]
    HealthCheckNodePortTaken { port: u16, owner: ObjectRef },
}

/// Translates Services and EndpointSlices into the desired state of `node`, as kube-proxy
/// would, in both address families (a service in those of its ClusterIPs). Never fails: whatever cannot be programmed is skipped and
/// described by a warning, and the rest is programmed.
///
/// Services are skipped, without a warning, when kube-proxy would skip them: `ExternalName`,
/// headless (no ClusterIP, or the headless label), or labelled for another service proxy.
pub fn build<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: &Node,
) -> (DesiredState, Vec<ModelWarning>) {
    let mut warnings = Vec::new();
    let endpoints = EndpointIndex::new(slices, node.name.as_deref(), &mut warnings);

    // Sorted, so that when two services claim one frontend or health-check port the same one
    // always wins.
    let mut services: Vec<&Service> = services.into_iter().collect();
    services.sort_by(|a, b| {
        (namespace_of(&a.metadata), &a.metadata.name)
            .cmp(&(namespace_of(&b.metadata), &b.metadata.name))
    });

    let mut state = DesiredState {
        node_addrs: node.addrs.iter().copied().collect(),
        ..DesiredState::default()
    };
    let mut owners: HashMap<Frontend, ServicePortName> = HashMap::new();
    for service in services {
        add_service(
            service,
            node,
            &endpoints,
            &mut owners,
            &mut state,
            &mut warnings,
        );
    }
    (state, warnings)
}

/// Parses a dotted-quad IPv4 address the way Kubernetes does (Go's `ParseIPSloppy`): each
/// part is decimal even with leading zeros, so `010.096.000.010` is 10.96.0.10. The standard
/// library rejects leading zeros, and reading them as octal, as some resolvers do, would send
/// traffic somewhere the API server never validated (CVE-2021-29923).
pub fn parse_ipv4_sloppy(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() {
            return None;
        }
        let mut value: u32 = 0;
        for b in part.bytes() {
            if !b.is_ascii_digit() {
                return None;
            }
            value = value * 10 + u32::from(b - b'0');
            if value > 255 {
                return None;
            }
        }
        *octet = value as u8;
    }
    match parts.next() {
        None => Some(Ipv4Addr::from(octets)),
        Some(_) => None,
    }
}

/// The object's namespace; an absent or empty one is `default`.
fn namespace_of(meta: &ObjectMeta) -> &str {
    match meta.namespace.as_deref() {
        None | Some("") => DEFAULT_NAMESPACE,
        Some(ns) => ns,
    }
}

fn label<'m>(meta: &'m ObjectMeta, key: &str) -> Option<&'m str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

/// Adds every port of `service` to `state`, unless kube-proxy would leave the service alone.
fn add_service(
    service: &Service,
    node: &Node,
    endpoints: &EndpointIndex<'_>,
    owners: &mut HashMap<Frontend, ServicePortName>,
    state: &mut DesiredState,
    warnings: &mut Vec<ModelWarning>,
) {
    let meta = &service.metadata;
    let Some(spec) = &service.spec else { return };
    if spec.type_.as_deref() == Some("ExternalName") || label(meta, LABEL_HEADLESS).is_some() {
        return;
    }
    if let Some(wanted) = label(meta, LABEL_SERVICE_PROXY_NAME) {
        if node.service_proxy_name.as_deref() != Some(wanted) {
            return;
        }
    }
    let object = ObjectRef::new(ObjectKind::Service, meta);
    let mut warn = |problem| {
        warnings.push(ModelWarning {
            object: object.clone(),
            problem,
        })
    };
    let Some(addrs) = cluster_ips(spec, &mut warn) else {
        return;
    };
    if addrs.is_empty() {
        return;
    }
    // kube-proxy runs one proxier per family, and each serves only the services with a
    // ClusterIP of its family: those are the families served, with everything else
    // (NodePorts, external IPs, endpoints) of another family left out.
    let families: BTreeSet<IpFamily> = addrs.iter().map(|a| IpFamily::of(*a)).collect();
    let ports = spec.ports.as_deref().unwrap_or_default();
    if ports.is_empty() {
        warn(Problem::NoPorts);
        return;
    }
    let affinity_timeout_s = affinity_timeout(spec, &mut warn);
    let algorithm = algorithm(meta, &mut warn);
    let external = ExternalAddrs::of(service, node, &families, &mut warn);
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    let has_node_ports = type_ == "NodePort" || type_ == "LoadBalancer";
    // kube-proxy's `ExternalPolicyLocal` (pkg/api/v1/service/util.go): the policy applies to
    // every externally accessible service, a ClusterIP one with externalIPs included.
    let externally_accessible = has_node_ports
        || (type_ == "ClusterIP"
            && spec
                .external_ips
                .as_ref()
                .is_some_and(|ips| !ips.is_empty()));
    let external_local = local_policy(
        "externalTrafficPolicy",
        spec.external_traffic_policy.as_deref(),
        &mut warn,
    ) && externally_accessible;
    // `InternalPolicyLocal`: whatever the type.
    let internal_local = local_policy(
        "internalTrafficPolicy",
        spec.internal_traffic_policy.as_deref(),
        &mut warn,
    );
    let mut any_port = false;

    for port in ports {
        let port_name = port.name.clone().unwrap_or_default();
        let protocol_name = port.protocol.as_deref().unwrap_or("TCP");
        let Some(protocol) = Protocol::from_kubernetes(protocol_name) else {
            warn(Problem::UnknownProtocol {
                port: port_name,
                protocol: protocol_name.to_owned(),
            });
            continue;
        };
        let Some(number) = port_number(port.port) else {
            warn(Problem::InvalidPortNumber {
                port: port_name,
                number: port.port,
            });
            continue;
        };
        any_port = true;
        let spn = ServicePortName {
            namespace: object.namespace.clone(),
            name: object.name.clone(),
            port: port_name,
            protocol,
        };

        // A frontend belongs to the first service (in name order) that claims it.
        let mut claim = |frontend: Frontend| {
            let owner = owners.entry(frontend).or_insert_with(|| spn.clone());
            if *owner == spn {
                return true;
            }
            warn(Problem::FrontendTaken {
                frontend,
                owner: owner.clone(),
                port: spn.port.clone(),
            });
            false
        };
        let at = |addr| Frontend {
            addr,
            port: number,
            protocol,
        };
        let frontends: BTreeSet<Frontend> =
            addrs.iter().map(|&a| at(a)).filter(|&f| claim(f)).collect();
        let mut external_frontends = BTreeMap::new();
        for &(addr, snat_addr, load_balancer) in &external.addrs {
            if claim(at(addr)) {
                let e = External {
                    snat_addr,
                    load_balancer,
                };
                external_frontends.insert(at(addr), e);
            }
        }
        let node_port = port.node_port.and_then(port_number);
        if let Some(node_port) = node_port.filter(|_| has_node_ports) {
            let node_addrs = node.addrs.iter().copied();
            for addr in node_addrs.filter(|a| families.contains(&IpFamily::of(*a))) {
                let frontend = Frontend {
                    addr,
                    port: node_port,
                    protocol,
                };
                // Flows to a node address are source-NATed to that same address.
                if claim(frontend) {
                    let e = External {
                        snat_addr: addr,
                        load_balancer: false,
                    };
                    external_frontends.insert(frontend, e);
                }
            }
        }
        if frontends.is_empty() && external_frontends.is_empty() {
            continue;
        }

        let (cluster, local) = endpoints.lookup(&spn, &families, node);
        let entry = state.services.entry(spn).or_default();
        entry.frontends.extend(frontends);
        entry.external_frontends.extend(external_frontends);
        entry
            .source_ranges
            .extend(external.source_ranges.iter().copied());
        entry.external_local = external_local;
        entry.internal_local = internal_local;
        entry.endpoints.extend(cluster);
        entry.local_endpoints.extend(local);
        entry.affinity_timeout_s = affinity_timeout_s;
        entry.algorithm = algorithm;
    }

    // kube-proxy serves a health check for a service it has ports of, when `NeedsHealthCheck`
    // (pkg/api/v1/service/util.go): type LoadBalancer and externalTrafficPolicy Local.
    if any_port && type_ == "LoadBalancer" && external_local {
        let checks = &mut state.health_checks;
        add_health_check(spec, &object, &families, endpoints, checks, &mut warn);
    }
}

/// Claims the service's `healthCheckNodePort` (kube-proxy takes it when set: pkg/proxy/
/// serviceport.go, `newBaseServiceInfo`). A port another service holds stays with it: there,
/// kube-proxy's second listener fails to bind.
fn add_health_check(
    spec: &ServiceSpec,
    object: &ObjectRef,
    families: &BTreeSet<IpFamily>,
    endpoints: &EndpointIndex<'_>,
    checks: &mut BTreeMap<u16, HealthCheck>,
    warn: &mut impl FnMut(Problem),
) {
    let number = spec.health_check_node_port.unwrap_or(0);
    if number == 0 {
        return warn(Problem::MissingHealthCheckNodePort);
    }
    let Some(port) = port_number(number) else {
        return warn(Problem::InvalidHealthCheckNodePort { number });
    };
    match checks.entry(port) {
        Entry::Occupied(taken) => warn(Problem::HealthCheckNodePortTaken {
            port,
            owner: ObjectRef {
                kind: ObjectKind::Service,
                namespace: taken.get().namespace.clone(),
                name: taken.get().name.clone(),
            },
        }),
        Entry::Vacant(free) => {
            let per_family = families
                .iter()
                .map(|&f| endpoints.local_ready(&object.namespace, &object.name, f));
            free.insert(HealthCheck {
                namespace: object.namespace.clone(),
                name: object.name.clone(),
                local_endpoints: per_family.max().unwrap_or(0),
            });
        }
    }
}

/// Whether a traffic policy field says Local. Anything but Local is Cluster, as in kube-proxy;
/// a value the API would reject is named.
fn local_policy(field: &'static str, given: Option<&str>, warn: &mut impl FnMut(Problem)) -> bool {
    match given {
        Some("Local") => true,
        None | Some("") | Some("Cluster") => false,
        Some(other) => {
            warn(Problem::UnknownTrafficPolicy {
                field,
                given: other.to_owned(),
            });
            false
        }
    }
}

/// A service's externalIPs and LoadBalancer ingress IPs of the families it is served in, each
/// with the node address its flows are source-NATed to and whether it is a LoadBalancer IP;
/// and the LoadBalancer's source ranges of those families.
struct ExternalAddrs {
    addrs: Vec<(IpAddr, IpAddr, bool)>,
    source_ranges: Vec<(IpAddr, u8)>,
}

impl ExternalAddrs {
    fn of(
        service: &Service,
        node: &Node,
        families: &BTreeSet<IpFamily>,
        warn: &mut impl FnMut(Problem),
    ) -> ExternalAddrs {
        let spec = service.spec.as_ref();
        let mut listed: Vec<(&str, bool)> = spec
            .and_then(|s| s.external_ips.as_deref())
            .unwrap_or_default()
            .iter()
            .map(|ip| (ip.as_str(), false))
            .collect();
        let mut source_ranges = Vec::new();
        if spec.and_then(|s| s.type_.as_deref()) == Some("LoadBalancer") {
            let ingress = service
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_deref())
                .unwrap_or_default();
            for point in ingress {
                // Hostname-only ingress points (some cloud load balancers) carry no address.
                let Some(ip) = point.ip.as_deref().filter(|ip| !ip.is_empty()) else {
                    continue;
                };
                // kube-proxy programs VIP-mode ingress IPs only (pkg/proxy/serviceport.go,
                // `newBaseServiceInfo`; proxyutil.IsVIPMode): with ipMode Proxy the load
                // balancer itself forwards to the nodes, and the address is not to be captured.
                match point.ip_mode.as_deref() {
                    None | Some("VIP") => listed.push((ip, true)),
                    Some("Proxy") => {}
                    Some(other) => warn(Problem::UnknownIpMode {
                        addr: ip.to_owned(),
                        given: other.to_owned(),
                    }),
                }
            }
            let ranges = spec.and_then(|s| s.load_balancer_source_ranges.as_deref());
            for range in ranges.unwrap_or_default() {
                match parse_cidr(range.trim()) {
                    // A range of a family the service is not served in constrains nothing.
                    Some(r) if families.contains(&IpFamily::of(r.0)) => source_ranges.push(r),
                    Some(_) => {}
                    None => warn(Problem::InvalidSourceRange {
                        range: range.clone(),
                    }),
                }
            }
        }
        let mut addrs = Vec::new();
        let mut unnatted: BTreeMap<IpFamily, Vec<String>> = BTreeMap::new();
        for (ip, load_balancer) in listed {
            let Some(addr) = parse_ip_sloppy(ip) else {
                warn(Problem::InvalidExternalIp {
                    addr: ip.to_owned(),
                });
                continue;
            };
            let family = IpFamily::of(addr);
            if !families.contains(&family) {
                warn(Problem::FamilyNotServed {
                    addr: ip.to_owned(),
                    family,
                });
                continue;
            }
            // The first node address of the frontend's family: a packet cannot change family.
            let snat_addr = node.addrs.iter().find(|a| IpFamily::of(**a) == family);
            match snat_addr {
                Some(&snat_addr) => addrs.push((addr, snat_addr, load_balancer)),
                None => unnatted.entry(family).or_default().push(ip.to_owned()),
            }
        }
        for (family, addrs) in unnatted {
            warn(Problem::NoNodeAddress { family, addrs });
        }
        ExternalAddrs {
            addrs,
            source_ranges,
        }
    }
}

/// Parses an address of either family: IPv4 as `parse_ipv4_sloppy` does, IPv6 in any of
/// its standard forms.
pub fn parse_ip_sloppy(s: &str) -> Option<IpAddr> {
    match parse_ipv4_sloppy(s) {
        Some(v4) => Some(IpAddr::V4(v4)),
        None => s.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
    }
}

/// Parses `addr/len` of either family into the range's first address and its length.
fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = s.split_once('/')?;
    let len: u8 = len.parse().ok()?;
    match parse_ip_sloppy(addr)? {
        IpAddr::V4(a) if len <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            Some((IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask)), len))
        }
        IpAddr::V6(a) if len <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            Some((IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask)), len))
        }
        _ => None,
    }
}

/// The service's ClusterIPs of both families, or `None` when it is headless. Invalid
/// addresses are left out with a warning.
fn cluster_ips(spec: &ServiceSpec, warn: &mut impl FnMut(Problem)) -> Option<Vec<IpAddr>> {
    // `clusterIPs` lists one address per entry of `ipFamilies`, in the same order (the API
    // server keeps them consistent), so the addresses alone say which families are served.
    let listed: Vec<&str> = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    // The first address is the primary one, equal to `clusterIP`; kube-proxy looks only at it
    // to tell a headless service.
    if listed
        .first()
        .is_none_or(|ip| ip.is_empty() || *ip == "None")
    {
        return None;
    }
    let mut addrs = Vec::new();
    for ip in listed {
        match parse_ip_sloppy(ip) {
            Some(addr) => addrs.push(addr),
            None => warn(Problem::InvalidClusterIp {
                addr: ip.to_owned(),
            }),
        }
    }
    Some(addrs)
}

/// The ClientIP affinity timeout, or `None` when affinity is off.
fn affinity_timeout(spec: &ServiceSpec, warn: &mut impl FnMut(Problem)) -> Option<u32> {
    match spec.session_affinity.as_deref() {
        None | Some("") | Some("None") => None,
        Some("ClientIP") => {
            let given = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            let Some(given) = given else {
                return Some(DEFAULT_AFFINITY_TIMEOUT_S);
            };
            match u32::try_from(given) {
                Ok(t @ 1..=MAX_AFFINITY_TIMEOUT_S) => Some(t),
                _ => {
                    // Too long is clamped to the longest the API allows; zero or negative is
                    // treated as unset.
                    let used = if given > 0 {
                        MAX_AFFINITY_TIMEOUT_S
                    } else {
                        DEFAULT_AFFINITY_TIMEOUT_S
                    };
                    warn(Problem::AffinityTimeoutOutOfRange { given, used });
                    Some(used)
                }
            }
        }
        Some(other) => {
            warn(Problem::UnknownSessionAffinity {
                given: other.to_owned(),
            });
            None
        }
    }
}

/// The algorithm the service's annotation asks for, if any.
fn algorithm(meta: &ObjectMeta, warn: &mut impl FnMut(Problem)) -> Option<Algorithm> {
    let given = meta.annotations.as_ref()?.get(ANNOTATION_ALGORITHM)?;
    match given.trim().parse() {
        Ok(a) => Some(a),
        Err(_) => {
            warn(Problem::UnknownAlgorithm {
                given: given.clone(),
            });
            None
        }
    }
}

/// A port number from the API's `int32`, if it is one a packet can carry.
fn port_number(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|&p| p != 0)
}

/// Every endpoint of every IPv4 and IPv6 EndpointSlice, grouped by the service it belongs to.
struct EndpointIndex<'a> {
    /// Each service's slices by namespace and service name, sorted by slice name.
    by_service: HashMap<&'a str, HashMap<&'a str, Vec<SliceEndpoints<'a>>>>,
}

/// What one EndpointSlice contributes.
struct SliceEndpoints<'a> {
    /// Where slices disagree about an endpoint, the first by name wins.
    name: &'a str,
    /// The slice's `addressType`, which all its addresses are of.
    family: IpFamily,
    /// (port name, protocol, port number); the number is the service's resolved target port.
    ports: Vec<(String, Protocol, u16)>,
    endpoints: Vec<SliceEndpoint<'a>>,
}

/// One endpoint of a slice, with what kube-proxy reads of it (pkg/proxy/endpointslicecache.go,
/// `addEndpoints`).
struct SliceEndpoint<'a> {
    /// Its first address: kube-proxy uses only that one.
    addr: IpAddr,
    /// Its `nodeName` is this node's.
    local: bool,
    /// `conditions.ready`, true when unset. The EndpointSlice controller sets it for a pod
    /// that is ready and not terminating, or for any pod of a service with
    /// `publishNotReadyAddresses`: kube-proxy reads only this, never the service's field.
    ready: bool,
    /// `conditions.serving` (ready, whether or not terminating), true when unset.
    serving: bool,
    /// `conditions.terminating`, false when unset.
    terminating: bool,
    /// `hints.forZones[].name`: the zones that should use it.
    zones: BTreeSet<&'a str>,
    /// `hints.forNodes[].name`: the nodes that should use it.
    nodes: BTreeSet<&'a str>,
}

impl SliceEndpoint<'_> {
    /// Usable when no endpoint is ready (kube-proxy's fallback for pods shutting down).
    fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }
}

impl<'a> EndpointIndex<'a> {
    fn new(
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
        node_name: Option<&str>,
        warnings: &mut Vec<ModelWarning>,
    ) -> EndpointIndex<'a> {
        let mut by_service: HashMap<_, HashMap<_, Vec<SliceEndpoints>>> = HashMap::new();
        for slice in slices {
            // FQDN slices are for DNS, not for proxies.
            let family = match slice.address_type.as_str() {
                "IPv4" => IpFamily::V4,
                "IPv6" => IpFamily::V6,
                _ => continue,
            };
            let meta = &slice.metadata;
            let object = ObjectRef::new(ObjectKind::EndpointSlice, meta);
            let mut warn = |problem| {
                warnings.push(ModelWarning {
                    object: object.clone(),
                    problem,
                })
            };
            let Some(service) = label(meta, LABEL_SERVICE_NAME).filter(|s| !s.is_empty()) else {
                warn(Problem::NoServiceName);
                continue;
            };
            let endpoints = SliceEndpoints {
                name: meta.name.as_deref().unwrap_or_default(),
                family,
                ports: slice_ports(slice, &mut warn),
                endpoints: slice_endpoints(slice, family, node_name, &mut warn),
            };
            (by_service.entry(namespace_of(meta)).or_default())
                .entry(service)
                .or_default()
                .push(endpoints);
        }
        for slices in by_service.values_mut().flat_map(|s| s.values_mut()) {
            slices.sort_by_key(|s| s.name);
        }
        EndpointIndex { by_service }
    }

    fn slices(&self, namespace: &str, service: &str) -> &[SliceEndpoints<'a>] {
        (self.by_service.get(namespace))
            .and_then(|services| services.get(service))
            .map_or(&[], Vec::as_slice)
    }

    /// The endpoints of one port (by name and protocol) of one service in `family`, merged
    /// across its slices as kube-proxy's `addEndpoints` does: one per address and port (so one
    /// address under two numbers, from two slices resolving a named target port differently,
    /// is two endpoints).
    fn merged<'s>(
        &'s self,
        namespace: &str,
        service: &str,
        port: &str,
        protocol: Protocol,
        family: IpFamily,
    ) -> BTreeMap<Endpoint, &'s SliceEndpoint<'a>> {
        let mut merged = BTreeMap::new();
        let slices = self.slices(namespace, service).iter();
        for slice in slices.filter(|s| s.family == family) {
            let numbers = slice
                .ports
                .iter()
                .filter(|p| p.0 == port && p.1 == protocol);
            for &(_, _, number) in numbers {
                for e in &slice.endpoints {
                    let endpoint = Endpoint {
                        addr: e.addr,
                        port: number,
                    };
                    // kube-proxy 1.33 keeps the first copy it meets, unless a later one is on
                    // this node ("isLocal should not vary between matching endpoints, but if it
                    // does, we favor a true value"), conditions and all. It meets slices in Go
                    // map order, so which of two remote copies wins is unspecified there; here
                    // it is the first slice by name, so a build is reproducible.
                    match merged.entry(endpoint) {
                        Entry::Vacant(v) => drop(v.insert(e)),
                        Entry::Occupied(mut o) if e.local => drop(o.insert(e)),
                        Entry::Occupied(_) => {}
                    }
                }
            }
        }
        merged
    }

    /// The endpoints policy Cluster and policy Local use for one service port, in `families`
    /// (each categorized on its own, as kube-proxy's proxier of that family does). A slice
    /// port belongs to the service port with the same name (both empty when unnamed) and
    /// protocol.
    fn lookup(
        &self,
        spn: &ServicePortName,
        families: &BTreeSet<IpFamily>,
        node: &Node,
    ) -> (BTreeSet<Endpoint>, BTreeSet<Endpoint>) {
        let mut cluster = BTreeSet::new();
        let mut local = BTreeSet::new();
        for &family in families {
            let merged = self.merged(&spn.namespace, &spn.name, &spn.port, spn.protocol, family);
            let (c, l) = categorize(&merged, node);
            cluster.extend(c);
            local.extend(l);
        }
        (cluster, local)
    }

    /// How many endpoints of a service in `family` are ready on this node, as kube-proxy's
    /// `LocalReadyEndpoints` (pkg/proxy/endpointschangetracker.go) counts them for the
    /// health check: distinct addresses over every port its slices name.
    fn local_ready(&self, namespace: &str, service: &str, family: IpFamily) -> usize {
        let slices = self.slices(namespace, service);
        let ports: BTreeSet<(&str, Protocol)> = (slices.iter())
            .filter(|s| s.family == family)
            .flat_map(|s| s.ports.iter().map(|p| (p.0.as_str(), p.1)))
            .collect();
        let mut addrs = BTreeSet::new();
        for (port, protocol) in ports {
            let merged = self.merged(namespace, service, port, protocol, family);
            let here = merged.iter().filter(|(_, e)| e.local && e.ready);
            addrs.extend(here.map(|(endpoint, _)| endpoint.addr));
        }
        addrs.len()
    }
}

/// Splits the merged endpoints of one service port in one family into those policy Cluster
/// and policy Local use, as kube-proxy's `CategorizeEndpoints` (pkg/proxy/topology.go) does.
/// Each falls back to serving terminating endpoints on its own: policy Local may use a
/// terminating endpoint here while policy Cluster uses ready ones elsewhere.
fn categorize(
    endpoints: &BTreeMap<Endpoint, &SliceEndpoint>,
    node: &Node,
) -> (BTreeSet<Endpoint>, BTreeSet<Endpoint>) {
    let pick = |keep: &dyn Fn(&SliceEndpoint) -> bool| -> BTreeSet<Endpoint> {
        let kept = endpoints.iter().filter(|(_, e)| keep(e));
        kept.map(|(endpoint, _)| *endpoint).collect()
    };
    let topology = Topology::from_hints(endpoints.values().copied(), node);
    let mut cluster = pick(&|e| e.ready && topology.admits(e, node));
    // A topology is chosen only when it admits a ready endpoint, so an empty set here means
    // none is ready anywhere: then every serving terminating one, topology aside.
    if cluster.is_empty() {
        cluster = pick(&|e| e.serving_terminating());
    }
    let mut local = pick(&|e| e.local && e.ready);
    if local.is_empty() {
        local = pick(&|e| e.local && e.serving_terminating());
    }
    (cluster, local)
}

/// Which ready endpoints policy Cluster uses, as kube-proxy's `topologyModeFromHints`
/// (pkg/proxy/topology.go) decides from the hints the EndpointSlice controller writes. kube-proxy
/// reads neither `spec.trafficDistribution` nor the `service.kubernetes.io/topology-mode`
/// annotation: both reach it only as hints, and so here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    /// Every ready endpoint.
    Any,
    /// The ones hinted for this node (`hints.forNodes`, from trafficDistribution
    /// PreferSameNode).
    SameNode,
    /// The ones hinted for this node's zone (`hints.forZones`, from PreferClose,
    /// PreferSameZone or the topology-mode annotation).
    SameZone,
}

impl Topology {
    /// A topology is used when every ready endpoint carries a hint of its kind and at least
    /// one is hinted for this node (or zone); node hints first. Not-ready endpoints do not
    /// count either way.
    ///
    /// Node hints are behind kube-proxy's PreferSameTrafficDistribution gate, alpha (off) in
    /// 1.33 and on by default from 1.34; they are honoured here, as the gate is the same for
    /// the API server, which does not store `forNodes` while it is off
    /// (pkg/registry/discovery/endpointslice/strategy.go, `dropDisabledFieldsOnCreate`).
    fn from_hints<'e>(endpoints: impl Iterator<Item = &'e SliceEndpoint<'e>>, node: &Node) -> Self {
        let ready: Vec<&SliceEndpoint> = endpoints.filter(|e| e.ready).collect();
        let (name, zone) = (node.name.as_deref(), node.zone.as_deref());
        let all = |hints: &dyn Fn(&SliceEndpoint) -> bool| ready.iter().all(|e| hints(e));
        let any = |hints: &dyn Fn(&SliceEndpoint) -> bool| ready.iter().any(|e| hints(e));
        if all(&|e| !e.nodes.is_empty()) && any(&|e| hinted(&e.nodes, name)) {
            Topology::SameNode
        } else if all(&|e| !e.zones.is_empty()) && any(&|e| hinted(&e.zones, zone)) {
            Topology::SameZone
        } else {
            Topology::Any
        }
    }

    /// kube-proxy's `availableForTopology`.
    fn admits(self, endpoint: &SliceEndpoint, node: &Node) -> bool {
        match self {
            Topology::Any => true,
            Topology::SameNode => hinted(&endpoint.nodes, node.name.as_deref()),
            Topology::SameZone => hinted(&endpoint.zones, node.zone.as_deref()),
        }
    }
}

/// Whether `hints` name `here`; nothing is hinted for a node without a name or zone (or an
/// empty one: the API accepts no empty hint).
fn hinted(hints: &BTreeSet<&str>, here: Option<&str>) -> bool {
    here.is_some_and(|h| !h.is_empty() && hints.contains(h))
}

fn slice_ports(
    slice: &EndpointSlice,
    warn: &mut impl FnMut(Problem),
) -> Vec<(String, Protocol, u16)> {
    let mut ports = Vec::new();
    for port in slice.ports.iter().flatten() {
        let name = port.name.clone().unwrap_or_default();
        let protocol_name = port.protocol.as_deref().unwrap_or("TCP");
        let Some(protocol) = Protocol::from_kubernetes(protocol_name) else {
            warn(Problem::UnknownProtocol {
                port: name,
                protocol: protocol_name.to_owned(),
            });
            continue;
        };
        match port.port {
            None => warn(Problem::MissingPortNumber { port: name }),
            Some(number) => match port_number(number) {
                Some(number) => ports.push((name, protocol, number)),
                None => warn(Problem::InvalidPortNumber { port: name, number }),
            },
        }
    }
    ports
}

/// The slice's endpoints, whatever their conditions, each with whether it is on `node_name`.
/// Like kube-proxy, only the first address of an endpoint is used, and it must be of the
/// slice's `family`.
fn slice_endpoints<'a>(
    slice: &'a EndpointSlice,
    family: IpFamily,
    node_name: Option<&str>,
    warn: &mut impl FnMut(Problem),
) -> Vec<SliceEndpoint<'a>> {
    let mut endpoints = Vec::new();
    for endpoint in &slice.endpoints {
        let Some(first) = endpoint.addresses.first() else {
            warn(Problem::EndpointWithoutAddress);
            continue;
        };
        let Some(addr) = parse_ip_sloppy(first).filter(|a| IpFamily::of(*a) == family) else {
            warn(Problem::InvalidEndpointAddress {
                addr: first.clone(),
            });
            continue;
        };
        let conditions = endpoint.conditions.as_ref();
        let hints = endpoint.hints.as_ref();
        endpoints.push(SliceEndpoint {
            addr,
            // kube-proxy's `isLocal`: an empty name is no node's.
            local: node_name.is_some_and(|n| !n.is_empty())
                && endpoint.node_name.as_deref() == node_name,
            ready: conditions.and_then(|c| c.ready).unwrap_or(true),
            serving: conditions.and_then(|c| c.serving).unwrap_or(true),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
            zones: (hints
                .and_then(|h| h.for_zones.as_deref())
                .unwrap_or_default())
            .iter()
            .map(|z| z.name.as_str())
            .collect(),
            nodes: (hints
                .and_then(|h| h.for_nodes.as_deref())
                .unwrap_or_default())
            .iter()
            .map(|n| n.name.as_str())
            .collect(),
        });
    }
    endpoints
}

#[cfg(test)]
mod tests {
    use super::*;
    use Protocol::{Sctp, Tcp, Udp};

    /// A Service or EndpointSlice from one line of flow-style YAML.
    fn parse<T: serde::de::DeserializeOwned>(yaml: &str) -> T {
        serde_yaml::from_str(yaml).unwrap_or_else(|err| panic!("{err}: {yaml}"))
    }

    /// `"ns/name"` (or `"name"` in default) with a port name and protocol.
    fn spn(service: &str, port: &str, protocol: Protocol) -> ServicePortName {
        let (namespace, name) = service
            .split_once('/')
            .unwrap_or((DEFAULT_NAMESPACE, service));
        ServicePortName {
            namespace: namespace.into(),
            name: name.into(),
            port: port.into(),
            protocol,
        }
    }

    /// A service port from `"addr:port/PROTO"` frontends and `"addr:port"` endpoints (IPv6
    /// addresses in brackets: `"[fd00::10]:80/TCP"`).
    fn sp(frontends: &[&str], endpoints: &[&str], affinity_timeout_s: Option<u32>) -> ServicePort {
        let frontend = |s: &&str| {
            let (addr_port, protocol) = s.split_once('/').unwrap();
            let at: std::net::SocketAddr = addr_port.parse().unwrap();
            Frontend {
                addr: at.ip(),
                port: at.port(),
                protocol: Protocol::from_kubernetes(protocol).unwrap(),
            }
        };
        let endpoint = |s: &&str| {
            let at: std::net::SocketAddr = s.parse().unwrap();
            Endpoint {
                addr: at.ip(),
                port: at.port(),
            }
        };
        ServicePort {
            frontends: frontends.iter().map(frontend).collect(),
            endpoints: endpoints.iter().map(endpoint).collect(),
            affinity_timeout_s,
            ..ServicePort::default()
        }
    }

    /// The node the tables are built for, unless a case says otherwise.
    fn node(proxy_name: Option<&str>) -> Node {
        Node {
            service_proxy_name: proxy_name.map(str::to_owned),
            ..Node::default()
        }
    }

    /// A warning about `"Kind ns/name"`.
    fn warning(object: &str, problem: Problem) -> ModelWarning {
        let (kind, namespaced) = object.split_once(' ').unwrap();
        let (namespace, name) = namespaced.split_once('/').unwrap();
        let kind = match kind {
            "Service" => ObjectKind::Service,
            "EndpointSlice" => ObjectKind::EndpointSlice,
            other => panic!("kind {other}"),
        };
        ModelWarning {
            object: ObjectRef {
                kind,
                namespace: namespace.into(),
                name: name.into(),
            },
            problem,
        }
    }

    #[derive(Default)]
    struct Case {
        what: &'static str,
        services: &'static [&'static str],
        slices: &'static [&'static str],
        proxy_name: Option<&'static str>,
        want: Vec<(ServicePortName, ServicePort)>,
        warnings: Vec<ModelWarning>,
    }

    const WEB: &str = "{metadata: {name: web}, spec: {clusterIP: 10.96.0.10, \
                       ports: [{port: 80, targetPort: 8080}]}}";
    const WEB_SLICE: &str = "{metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}, \
                             addressType: IPv4, ports: [{port: 8080}], \
                             endpoints: [{addresses: [10.0.0.1]}]}";

    fn run(cases: Vec<Case>) {
        for case in cases {
            let services: Vec<Service> = case.services.iter().map(|s| parse(s)).collect();
            let slices: Vec<EndpointSlice> = case.slices.iter().map(|s| parse(s)).collect();
            let (state, warnings) = build(&services, &slices, &node(case.proxy_name));
            let want: BTreeMap<_, _> = case.want.into_iter().collect();
            assert_eq!(state.services, want, "{}", case.what);
            assert_eq!(warnings, case.warnings, "{}", case.what);
        }
    }

    /// Builds one service with two endpoints, 10.0.0.1 on node-a (this node) and 10.0.0.2
    /// on node-b, for a node with addresses 192.168.0.10 and 192.168.1.10.
    fn external(service: &str) -> (ServicePort, Vec<ModelWarning>) {
        let slice = "{metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}, \
                     addressType: IPv4, ports: [{port: 8080}], \
                     endpoints: [{addresses: [10.0.0.1], nodeName: node-a}, \
                     {addresses: [10.0.0.2], nodeName: node-b}]}";
        let node = Node {
            name: Some("node-a".into()),
            addrs: vec![
                Ipv4Addr::new(192, 168, 0, 10).into(),
                Ipv4Addr::new(192, 168, 1, 10).into(),
            ],
            ..Node::default()
        };
        let (state, warnings) = build(&[parse(service)], &[parse(slice)], &node);
        let port = state
            .services
            .into_values()
            .next()
            .expect("one service port");
        (port, warnings)
    }

    fn frontends_of(port: &ServicePort) -> Vec<(String, String)> {
        let show = |f: &Frontend| format!("{}:{}", f.addr, f.port);
        port.external_frontends
            .iter()
            .map(|(f, e)| (show(f), e.snat_addr.to_string()))
            .collect()
    }

    #[test]
    fn node_ports_external_ips_and_load_balancer_ips_are_external_frontends() {
        let (port, warnings) = external(
            "{metadata: {name: web}, spec: {type: LoadBalancer, clusterIP: 10.96.0.10, \
             externalIPs: [203.0.113.7, 'bogus', '2001:db8::1'], \
             ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}, \
             status: {loadBalancer: {ingress: [{ip: 198.51.100.9}, {hostname: lb.example.com}]}}}",
        );
        let own = |a: &str| (a.to_owned(), "192.168.0.10".to_owned());
        assert_eq!(
            frontends_of(&port),
            vec![
                own("192.168.0.10:30080"),
                ("192.168.1.10:30080".into(), "192.168.1.10".into()),
                own("198.51.100.9:80"),
                own("203.0.113.7:80"),
            ],
            "NodePort on every node address (SNAT to itself); external and LB IPs SNAT to the first"
        );
        assert!(!port.external_local);
        assert_eq!(port.frontends.len(), 1, "the ClusterIP");
        assert_eq!(port.endpoints.len(), 2);
        let problems: Vec<_> = warnings.into_iter().map(|w| w.problem).collect();
        assert_eq!(
            problems,
            vec![
                Problem::InvalidExternalIp {
                    addr: "bogus".into()
                },
                Problem::FamilyNotServed {
                    addr: "2001:db8::1".into(),
                    family: IpFamily::V6,
                },
            ]
        );
    }

    #[test]
    fn load_balancer_source_ranges_are_trimmed_parsed_masked_and_bad_ones_named() {
        let (port, warnings) = external(
            "{metadata: {name: web}, spec: {type: LoadBalancer, clusterIP: 10.96.0.10, \
             loadBalancerSourceRanges: ['10.1.2.3/16', \" 192.0.2.0/24\\t \", '2001:db8::/32', '10.0.0.0/33'], \
             ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}, \
             status: {loadBalancer: {ingress: [{ip: 198.51.100.9}]}}}",
        );
        assert_eq!(
            port.source_ranges,
            [
                (Ipv4Addr::new(10, 1, 0, 0).into(), 16),
                (Ipv4Addr::new(192, 0, 2, 0).into(), 24)
            ]
            .into(),
            "the IPv6 range is left out: the service has no IPv6 ClusterIP"
        );
        let lb = port
            .external_frontends
            .iter()
            .find(|(_, e)| e.load_balancer);
        assert_eq!(
            lb.map(|(f, _)| f.addr),
            Some(Ipv4Addr::new(198, 51, 100, 9).into())
        );
        let problems: Vec<_> = warnings.into_iter().map(|w| w.problem).collect();
        assert_eq!(
            problems,
            vec![Problem::InvalidSourceRange {
                range: "10.0.0.0/33".into()
            }]
        );
    }

    /// A dual-stack node (192.168.0.10, 2001:db8:1::10, 2001:db8:2::10) with the IPv4 and
    /// IPv6 slices of service `web`: 10.0.0.1 and fd00:1::1 on node-a (this node), 10.0.0.2
    /// and fd00:1::2 elsewhere.
    fn dual_stack(service: &str, node_addrs: &[&str]) -> (DesiredState, Vec<Problem>) {
        let slices: [EndpointSlice; 2] = [
            parse(
                "{metadata: {name: web-4, labels: {kubernetes.io/service-name: web}}, \
                 addressType: IPv4, ports: [{port: 8080}], \
                 endpoints: [{addresses: [10.0.0.1], nodeName: node-a}, \
                 {addresses: [10.0.0.2], nodeName: node-b}, {addresses: ['fd00:1::9']}]}",
            ),
            parse(
                "{metadata: {name: web-6, labels: {kubernetes.io/service-name: web}}, \
                 addressType: IPv6, ports: [{port: 8080}], \
                 endpoints: [{addresses: ['fd00:1::1'], nodeName: node-a}, \
                 {addresses: ['fd00:1:0:0::2'], nodeName: node-b}, {addresses: [10.0.0.9]}]}",
            ),
        ];
        let node = Node {
            name: Some("node-a".into()),
            addrs: node_addrs.iter().map(|a| a.parse().unwrap()).collect(),
            ..Node::default()
        };
        let (state, warnings) = build(&[parse(service)], &slices, &node);
        (state, warnings.into_iter().map(|w| w.problem).collect())
    }

    const DUAL_NODE: &[&str] = &["192.168.0.10", "2001:db8:1::10", "2001:db8:2::10"];

    /// Every frontend of `port`, ClusterIP and external, as `addr:port` with its SNAT address
    /// (`-` for a ClusterIP) and `lb` for LoadBalancer IPs.
    fn all_frontends(port: &ServicePort) -> Vec<String> {
        let show = |f: &Frontend| std::net::SocketAddr::new(f.addr, f.port).to_string();
        let cluster = port.frontends.iter().map(|f| format!("{} -", show(f)));
        let external = port.external_frontends.iter().map(|(f, e)| {
            let lb = if e.load_balancer { " lb" } else { "" };
            format!("{} {}{lb}", show(f), e.snat_addr)
        });
        let mut all: Vec<String> = cluster.chain(external).collect();
        all.sort();
        all
    }

    fn endpoint_set(addrs: &[&str]) -> BTreeSet<Endpoint> {
        addrs
            .iter()
            .map(|a| Endpoint {
                addr: a.parse().unwrap(),
                port: 8080,
            })
            .collect()
    }

    #[test]
    fn a_dual_stack_service_is_served_in_both_families_each_with_its_own_node_addresses() {
        let (state, problems) = dual_stack(
            "{metadata: {name: web}, spec: {type: LoadBalancer, clusterIP: 10.96.0.10, \
             clusterIPs: [10.96.0.10, 'fd00:96::10'], ipFamilies: [IPv4, IPv6], \
             ipFamilyPolicy: PreferDualStack, externalIPs: [203.0.113.7, '2001:db8:ff::7'], \
             loadBalancerSourceRanges: ['10.1.0.0/16', '2001:db8:aaaa::1/48'], \
             ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}, \
             status: {loadBalancer: {ingress: [{ip: 198.51.100.9}, {ip: '2001:db8:ee::9'}]}}}",
            DUAL_NODE,
        );
        let port = &state.services[&spn("web", "", Tcp)];
        assert_eq!(
            all_frontends(port),
            [
                "10.96.0.10:80 -",
                "192.168.0.10:30080 192.168.0.10",
                "198.51.100.9:80 192.168.0.10 lb",
                "203.0.113.7:80 192.168.0.10",
                "[2001:db8:1::10]:30080 2001:db8:1::10",
                "[2001:db8:2::10]:30080 2001:db8:2::10",
                "[2001:db8:ee::9]:80 2001:db8:1::10 lb",
                "[2001:db8:ff::7]:80 2001:db8:1::10",
                "[fd00:96::10]:80 -",
            ],
            "NodePorts on every node address of each family, SNAT to itself; external and LB \
             IPs SNAT to the first node address of their own family"
        );
        assert_eq!(
            port.endpoints,
            endpoint_set(&["10.0.0.1", "10.0.0.2", "fd00:1::1", "fd00:1::2"])
        );
        assert_eq!(
            port.local_endpoints,
            endpoint_set(&["10.0.0.1", "fd00:1::1"]),
            "this node's, of both families"
        );
        assert_eq!(
            port.source_ranges,
            [
                ("10.1.0.0".parse().unwrap(), 16),
                ("2001:db8:aaaa::".parse().unwrap(), 48)
            ]
            .into(),
            "ranges of both families, host bits cleared"
        );
        assert_eq!(
            state.node_addrs.len(),
            3,
            "node addresses of both families are known"
        );
        assert_eq!(
            problems,
            [
                Problem::InvalidEndpointAddress {
                    addr: "fd00:1::9".into()
                },
                Problem::InvalidEndpointAddress {
                    addr: "10.0.0.9".into()
                },
            ],
            "an address of the other family in a slice is invalid"
        );
    }

    #[test]
    fn an_ipv6_only_service_uses_only_ipv6_node_addresses_endpoints_and_ranges() {
        let (state, problems) = dual_stack(
            "{metadata: {name: web}, spec: {type: LoadBalancer, clusterIP: 'fd00:96::10', \
             ipFamilies: [IPv6], externalTrafficPolicy: Local, healthCheckNodePort: 32000, \
             externalIPs: [203.0.113.7, '2001:db8:ff::7'], \
             loadBalancerSourceRanges: ['10.1.0.0/16', '2001:db8::/129', '2001:db8:aaaa::/48'], \
             ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}}",
            DUAL_NODE,
        );
        let port = &state.services[&spn("web", "", Tcp)];
        assert_eq!(
            all_frontends(port),
            [
                "[2001:db8:1::10]:30080 2001:db8:1::10",
                "[2001:db8:2::10]:30080 2001:db8:2::10",
                "[2001:db8:ff::7]:80 2001:db8:1::10",
                "[fd00:96::10]:80 -",
            ]
        );
        assert_eq!(port.endpoints, endpoint_set(&["fd00:1::1", "fd00:1::2"]));
        assert_eq!(port.local_endpoints, endpoint_set(&["fd00:1::1"]));
        assert!(port.external_local);
        assert_eq!(
            port.source_ranges,
            [("2001:db8:aaaa::".parse().unwrap(), 48)].into()
        );
        assert_eq!(
            state.health_checks[&32000].local_endpoints, 1,
            "the IPv6 endpoint on this node"
        );
        assert_eq!(
            problems[2..],
            [
                Problem::InvalidSourceRange {
                    range: "2001:db8::/129".into()
                },
                Problem::FamilyNotServed {
                    addr: "203.0.113.7".into(),
                    family: IpFamily::V4
                },
            ]
        );
    }

    #[test]
    fn external_ips_of_a_family_the_node_has_no_address_of_are_skipped_by_name() {
        let (state, problems) = dual_stack(
            "{metadata: {name: web}, spec: {type: NodePort, clusterIP: 10.96.0.10, \
             clusterIPs: [10.96.0.10, 'fd00:96::10'], \
             externalIPs: [203.0.113.7, '2001:db8:ff::7', '2001:db8:ff::8'], \
             ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}}",
            &["192.168.0.10"],
        );
        let port = &state.services[&spn("web", "", Tcp)];
        assert_eq!(
            all_frontends(port),
            [
                "10.96.0.10:80 -",
                "192.168.0.10:30080 192.168.0.10",
                "203.0.113.7:80 192.168.0.10",
                "[fd00:96::10]:80 -",
            ],
            "the IPv6 ClusterIP is still served, with no IPv6 NodePort"
        );
        assert_eq!(
            problems[2..],
            [Problem::NoNodeAddress {
                family: IpFamily::V6,
                addrs: vec!["2001:db8:ff::7".into(), "2001:db8:ff::8".into()],
            }]
        );
        let shown = ModelWarning {
            object: ObjectRef {
                kind: ObjectKind::Service,
                namespace: "default".into(),
                name: "web".into(),
            },
            problem: problems[2].clone(),
        }
        .to_string();
        assert!(
            shown.starts_with("Service default/web: the node has no IPv6 address"),
            "{shown}"
        );
    }

    #[test]
    fn cidrs_of_either_family_are_masked() {
        let cases = [
            ("10.1.2.3/16", Some(("10.1.0.0", 16))),
            ("010.1.2.3/8", Some(("10.0.0.0", 8))),
            ("0.0.0.0/0", Some(("0.0.0.0", 0))),
            ("10.0.0.0/33", None),
            ("2001:db8:aaaa:bbbb::1/48", Some(("2001:db8:aaaa::", 48))),
            ("2001:db8::1/128", Some(("2001:db8::1", 128))),
            ("::/0", Some(("::", 0))),
            ("2001:db8::/129", None),
            ("2001:db8::", None),
            ("2001:db8::/-1", None),
        ];
        for (input, want) in cases {
            let want = want.map(|(a, l)| (a.parse::<IpAddr>().unwrap(), l));
            assert_eq!(parse_cidr(input), want, "{input}");
        }
    }

    #[test]
    fn local_external_traffic_policy_knows_the_local_endpoints() {
        let (port, _) = external(
            "{metadata: {name: web}, spec: {type: NodePort, clusterIP: 10.96.0.10, \
             externalTrafficPolicy: Local, ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}}",
        );
        assert!(port.external_local);
        assert_eq!(
            port.local_endpoints
                .iter()
                .map(|e| e.addr)
                .collect::<Vec<_>>(),
            vec![IpAddr::from([10, 0, 0, 1])]
        );
        assert_eq!(
            port.endpoints.len(),
            2,
            "ClusterIP traffic still uses every endpoint"
        );
    }

    #[test]
    fn a_cluster_ip_service_has_no_node_ports_and_a_load_balancer_ip_needs_type_load_balancer() {
        // A nodePort on a ClusterIP service (left over from a type change) is not served, nor is
        // a stale load-balancer status; externalIPs are served whatever the type.
        let (port, _) = external(
            "{metadata: {name: web}, spec: {clusterIP: 10.96.0.10, externalIPs: [203.0.113.7], \
             externalTrafficPolicy: Local, ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}, \
             status: {loadBalancer: {ingress: [{ip: 198.51.100.9}]}}}",
        );
        assert_eq!(
            frontends_of(&port),
            vec![("203.0.113.7:80".to_owned(), "192.168.0.10".to_owned())]
        );
        assert!(
            port.external_local,
            "the policy applies to every externally accessible service, externalIPs included \
             (kube-proxy's ExternalPolicyLocal)"
        );
    }

    #[test]
    fn services_and_endpoints() {
        run(vec![
            Case {
                what: "single unnamed port",
                services: &[WEB],
                slices: &[
                    "{metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}, \
                     addressType: IPv4, ports: [{name: '', port: 8080, protocol: TCP}], \
                     endpoints: [{addresses: [10.0.0.1], conditions: {ready: true}}, \
                     {addresses: [10.0.0.2], conditions: {ready: true}}]}",
                ],
                want: vec![(
                    spn("web", "", Tcp),
                    sp(
                        &["10.96.0.10:80/TCP"],
                        &["10.0.0.1:8080", "10.0.0.2:8080"],
                        None,
                    ),
                )],
                ..Case::default()
            },
            Case {
                what: "multi-port service, each port's endpoints in its own slice",
                services: &["{metadata: {name: web, namespace: shop}, \
                             spec: {clusterIP: 10.96.0.10, \
                             ports: [{name: http, port: 80}, {name: https, port: 443}]}}"],
                slices: &[
                    "{metadata: {name: web-a, namespace: shop, \
                     labels: {kubernetes.io/service-name: web}}, \
                     addressType: IPv4, ports: [{name: http, port: 8080}], \
                     endpoints: [{addresses: [10.0.0.1]}]}",
                    "{metadata: {name: web-b, namespace: shop, \
                     labels: {kubernetes.io/service-name: web}}, \
                     addressType: IPv4, ports: [{name: https, port: 8443}], \
                     endpoints: [{addresses: [10.0.0.2]}]}",
                ],
                want: vec![
                    (
                        spn("shop/web", "http", Tcp),
                        sp(&["10.96.0.10:80/TCP"], &["10.0.0.1:8080"], None),
                    ),
                    (
                        spn("shop/web", "https", Tcp),
                        sp(&["10.96.0.10:443/TCP"], &["10.0.0.2:8443"], None),
                    ),
                ],
                ..Case::default()
            },
            Case {
                what:
                    "a named targetPort is resolved by the slice, matched on the service port name",
                services: &["{metadata: {name: web}, spec: {clusterIP: 10.96.0.10, \
                             ports: [{name: web, port: 80, targetPort: http}]}}"],
                slices: &[
                    "{metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}, \
                     addressType: IPv4, \
                     ports: [{name: web, port: 8080}, {name: http, port: 9999}], \
                     endpoints: [{addresses: [10.0.0.1]}]}",
                ],
                want: vec![(
                    spn("web", "web", Tcp),
                    sp(&["10.96.0.10:80/TCP"], &["10.0.0.1:8080"], None),
                )],
                ..Case::default()
            },
            Case {
                what: "one port number on TCP and UDP",
                services: &["{metadata: {name: dns, namespace: kube-system}, \
                             spec: {clusterIP: 10.96.0.10, \
                             ports: [{name: dns, port: 53, protocol: UDP}, \
                                     {name: dns-tcp, port: 53, protocol: TCP}, \
                                     {name: sig, port: 53, protocol: SCTP}]}}"],
                slices: &["{metadata: {name: dns-1, namespace: kube-system, \
                           labels: {kubernetes.io/service-name: dns}}, \
                           addressType: IPv4, \
                           ports: [{name: dns, port: 5353, protocol: UDP}, \
                                   {name: dns-tcp, port: 5354, protocol: TCP}, \
                                   {name: sig, port: 5355, protocol: SCTP}], \
                           endpoints: [{addresses: [10.0.0.1]}]}"],
                want: vec![
                    (
                        spn("kube-system/dns", "dns", Udp),
                        sp(&["10.96.0.10:53/UDP"], &["10.0.0.1:5353"], None),
                    ),
                    (
                        spn("kube-system/dns", "dns-tcp", Tcp),
                        sp(&["10.96.0.10:53/TCP"], &["10.0.0.1:5354"], None),
                    ),
                    (
                        spn("kube-system/dns", "sig", Sctp),
                        sp(&["10.96.0.10:53/SCTP"], &["10.0.0.1:5355"], None),
                    ),
                ],
                ..Case::default()
            },
            Case {
                what: "a slice port matches only on the same protocol",
                services: &["{metadata: {name: web}, spec: {clusterIP: 10.96.0.10, \
                             ports: [{port: 80, protocol: UDP}]}}"],
                slices: &[WEB_SLICE],
                want: vec![(spn("web", "", Udp), sp(&["10.96.0.10:80/UDP"], &[], None))],
                ..Case::default()
            },
            Case {
                what: "ready false is left out; ready unset, or no conditions, counts as ready",
                services: &[WEB],
                slices: &[
                    "{metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}, \
                     addressType: IPv4, ports: [{port: 8080}], endpoints: [ \
                       {addresses: [10.0.0.1], \
                        conditions: {ready: true, serving: true, terminating: false}}, \
                       {addresses: [10.0.0.2], \
                        conditions: {ready: false, serving: true, terminating: true}}, \
                       {addresses: [10.0.0.3], conditions: {ready: false}}, \
                       {addresses: [10.0.0.4], conditions: {serving: true}}, \
                       {addresses: [10.0.0.5]}]}",
                ],
                want: vec![(
                    spn("web", "", Tcp),
                    sp(
                        &["10.96.0.10:80/TCP"],
                        &["10.0.0.1:8080", "10.0.0.4:8080", "10.0.0.5:8080"],
                        None,
                    ),
                )],
                ..Case::default()
            },
            Case {
                what: "an endpoint in two slices is one endpoint",
                services: &[WEB],
                slices: &[
                    WEB_SLICE,
                    "{metadata: {name: web-2, labels: {kubernetes.io/service-name: web}}, \
                     addressType: IPv4, ports: [{port: 8080}], \
                     endpoints: [{addresses: [10.0.0.1]}, {addresses: [10.0.0.2]}]}",
                ],
                want: vec![(
                    spn("web", "", Tcp),
                    sp(
                        &["10.96.0.10:80/TCP"],
                        &["10.0.0.1:8080", "10.0.0.2:8080"],
                        None,
                    ),
                )],
                ..Case::default()
            },
            Case {
                what: "slices of another service, of one in another namespace, of a family the \
                       service is not served in, and of FQDNs are ignored",
                services: &[WEB],
                slices: &[
                    "{metadata: {name: db-1, labels: {kubernetes.io/service-name: db}}, \
                     addressType: IPv4, ports: [{port: 8080}], \
                     endpoints: [{addresses: [10.0.0.1]}]}",
                    "{metadata: {name: web-1, namespace: other, \
                     labels: {kubernetes.io/service-name: web}}, \
                     addressType: IPv4, ports: [{port: 8080}], \
                     endpoints: [{addresses: [10.0.0.2]}]}",
                    "{metadata: {name: web-v6, labels: {kubernetes.io/service-name: web}}, \
                     addressType: IPv6, ports: [{port: 8080}], \
                     endpoints: [{addresses: ['fd00::1']}]}",
                    "{metadata: {name: web-fqdn, labels: {kubernetes.io/service-name: web}}, \
                     addressType: FQDN, ports: [{port: 8080}], \
                     endpoints: [{addresses: [db.example.com]}]}",
                ],
                want: vec![(spn("web", "", Tcp), sp(&["10.96.0.10:80/TCP"], &[], None))],
                ..Case::default()
            },
            Case {
                what: "a service without slices has its ports with no endpoints, so they reject",
                services: &[WEB],
                want: vec![(spn("web", "", Tcp), sp(&["10.96.0.10:80/TCP"], &[], None))],
                ..Case::default()
            },
            Case {
                what: "service types other than ExternalName program their ClusterIPs",
                services: &[
                    "{metadata: {name: lb}, spec: {type: LoadBalancer, \
                     clusterIP: 10.96.0.11, \
                     ports: [{port: 80, nodePort: 30080}]}}",
                    "{metadata: {name: np}, spec: {type: NodePort, clusterIP: 10.96.0.12, \
                     ports: [{port: 80, nodePort: 30081}]}}",
                ],
                want: vec![
                    (spn("lb", "", Tcp), sp(&["10.96.0.11:80/TCP"], &[], None)),
                    (spn("np", "", Tcp), sp(&["10.96.0.12:80/TCP"], &[], None)),
                ],
                ..Case::default()
            },
        ]);
    }

    #[test]
    fn services_kube_proxy_leaves_alone() {
        let skipped = [
            (
                "headless",
                "{metadata: {name: web}, spec: {clusterIP: None, ports: [{port: 80}]}}",
            ),
            (
                "headless, dual-stack",
                "{metadata: {name: web}, spec: {clusterIP: None, \
                 clusterIPs: [None], ports: [{port: 80}]}}",
            ),
            (
                "no cluster IP",
                "{metadata: {name: web}, spec: {ports: [{port: 80}]}}",
            ),
            (
                "empty cluster IP",
                "{metadata: {name: web}, spec: {clusterIP: '', ports: [{port: 80}]}}",
            ),
            ("no spec", "{metadata: {name: web}}"),
            (
                "ExternalName",
                "{metadata: {name: web}, spec: {type: ExternalName, \
                 externalName: db.example.com, clusterIP: 10.96.0.10, ports: [{port: 80}]}}",
            ),
            (
                "headless label",
                "{metadata: {name: web, labels: {service.kubernetes.io/headless: ''}}, \
                 spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}}",
            ),
            (
                "another proxy's",
                "{metadata: {name: web, labels: \
                 {service.kubernetes.io/service-proxy-name: other}}, \
                 spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}}",
            ),
        ];
        for (what, service) in skipped {
            for proxy_name in [None, Some("lb-agent")] {
                // With endpoints, to show that they do not matter.
                let (state, warnings) =
                    build(&[parse(service)], &[parse(WEB_SLICE)], &node(proxy_name));
                assert_eq!(
                    state,
                    DesiredState::default(),
                    "{what}, proxy {proxy_name:?}"
                );
                assert_eq!(warnings, [], "{what}");
            }
        }

        const OURS: &str = "{metadata: {name: web, \
                            labels: {service.kubernetes.io/service-proxy-name: lb-agent}}, \
                            spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}}";
        run(vec![
            Case {
                what: "labelled for this agent, by its name",
                services: &[OURS],
                proxy_name: Some("lb-agent"),
                want: vec![(spn("web", "", Tcp), sp(&["10.96.0.10:80/TCP"], &[], None))],
                ..Case::default()
            },
            Case {
                what: "labelled, and this agent has no name",
                services: &[OURS],
                ..Case::default()
            },
        ]);
    }

    #[test]
    fn cluster_ips() {
        run(vec![
            Case {
                what: "leading zeros are decimal, in ClusterIPs and endpoint addresses",
                services: &[
                    "{metadata: {name: web}, spec: {clusterIP: 010.096.000.010, \
                     ports: [{port: 80}]}}",
                ],
                slices: &[
                    "{metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}, \
                     addressType: IPv4, ports: [{port: 8080}], \
                     endpoints: [{addresses: [010.000.000.011]}]}",
                ],
                want: vec![(
                    spn("web", "", Tcp),
                    sp(&["10.96.0.10:80/TCP"], &["10.0.0.11:8080"], None),
                )],
                ..Case::default()
            },
            Case {
                what: "an invalid ClusterIP is skipped with a warning",
                services: &["{metadata: {name: web}, spec: {clusterIP: 10.96.0.300, \
                             ports: [{port: 80}]}}"],
                warnings: vec![warning(
                    "Service default/web",
                    Problem::InvalidClusterIp {
                        addr: "10.96.0.300".into(),
                    },
                )],
                ..Case::default()
            },
            Case {
                what: "clusterIPs wins over clusterIP; a bad one among good ones is skipped",
                services: &["{metadata: {name: web}, spec: {clusterIP: 10.96.0.10, \
                             clusterIPs: [10.96.0.10, bogus, 10.96.0.11], ports: [{port: 80}]}}"],
                want: vec![(
                    spn("web", "", Tcp),
                    sp(&["10.96.0.10:80/TCP", "10.96.0.11:80/TCP"], &[], None),
                )],
                warnings: vec![warning(
                    "Service default/web",
                    Problem::InvalidClusterIp {
                        addr: "bogus".into(),
                    },
                )],
                ..Case::default()
            },
            Case {
                what: "IPv6-only, in any of IPv6's spellings",
                services: &["{metadata: {name: web}, spec: {clusterIP: 'fd00:0::010', \
                             clusterIPs: ['fd00:0::010'], ipFamilies: [IPv6], \
                             ports: [{port: 80}, {port: 81}]}}"],
                want: vec![(
                    spn("web", "", Tcp),
                    sp(&["[fd00::10]:80/TCP", "[fd00::10]:81/TCP"], &[], None),
                )],
                ..Case::default()
            },
            Case {
                what: "dual-stack, IPv6 primary: both families programmed",
                services: &["{metadata: {name: web}, spec: {clusterIP: 'fd00::10', \
                             clusterIPs: ['fd00::10', 10.96.0.10], ipFamilies: [IPv6, IPv4], \
                             ipFamilyPolicy: RequireDualStack, \
                             ports: [{name: a, port: 80}, {name: b, port: 81}]}}"],
                want: vec![
                    (
                        spn("web", "a", Tcp),
                        sp(&["10.96.0.10:80/TCP", "[fd00::10]:80/TCP"], &[], None),
                    ),
                    (
                        spn("web", "b", Tcp),
                        sp(&["10.96.0.10:81/TCP", "[fd00::10]:81/TCP"], &[], None),
                    ),
                ],
                ..Case::default()
            },
            Case {
                what: "two services claiming one frontend: the first by namespace/name keeps it",
                services: &[
                    "{metadata: {name: web2}, spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}}",
                    "{metadata: {name: web1}, spec: {clusterIP: 10.96.0.10, \
                     ports: [{port: 80}, {port: 81}]}}",
                ],
                want: vec![(
                    spn("web1", "", Tcp),
                    sp(&["10.96.0.10:80/TCP", "10.96.0.10:81/TCP"], &[], None),
                )],
                warnings: vec![warning(
                    "Service default/web2",
                    Problem::FrontendTaken {
                        frontend: sp(&["10.96.0.10:80/TCP"], &[], None)
                            .frontends
                            .pop_first()
                            .unwrap(),
                        owner: spn("web1", "", Tcp),
                        port: String::new(),
                    },
                )],
                ..Case::default()
            },
        ]);
    }

    #[test]
    fn load_balancing_algorithm_annotation() {
        let cases = [
            ("", None, None),
            (
                "annotations: {lb-agent.io/lb-algorithm: maglev},",
                Some(Algorithm::Maglev),
                None,
            ),
            (
                "annotations: {lb-agent.io/lb-algorithm: ' random '},",
                Some(Algorithm::Random),
                None,
            ),
            (
                "annotations: {lb-agent.io/lb-algorithm: round-robin},",
                None,
                Some(Problem::UnknownAlgorithm {
                    given: "round-robin".into(),
                }),
            ),
        ];
        for (annotations, want, problem) in cases {
            let service = format!(
                "{{metadata: {{name: web, {annotations}}}, spec: {{clusterIP: 10.96.0.10, \
                 ports: [{{name: a, port: 80}}, {{name: b, port: 81}}]}}}}"
            );
            let (state, warnings) = build(&[parse(&service)], &[], &node(None));
            for port in ["a", "b"] {
                let got = state.services[&spn("web", port, Tcp)].algorithm;
                assert_eq!(got, want, "{annotations:?}, port {port}");
            }
            let want_warnings: Vec<_> = problem
                .into_iter()
                .map(|p| warning("Service default/web", p))
                .collect();
            assert_eq!(warnings, want_warnings, "{annotations:?}: warned once");
        }
    }

    #[test]
    fn session_affinity() {
        // Spec fields, spliced in front of the ClusterIP and ports.
        let cases = [
            ("", None, None),
            ("sessionAffinity: None,", None, None),
            ("sessionAffinity: ClientIP,", Some(10_800), None),
            (
                "sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {}},",
                Some(10_800),
                None,
            ),
            (
                "sessionAffinity: ClientIP, \
                 sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}},",
                Some(600),
                None,
            ),
            (
                "sessionAffinity: ClientIP, \
                 sessionAffinityConfig: {clientIP: {timeoutSeconds: 86400}},",
                Some(86_400),
                None,
            ),
            (
                "sessionAffinity: ClientIP, \
                 sessionAffinityConfig: {clientIP: {timeoutSeconds: 999999}},",
                Some(86_400),
                Some(Problem::AffinityTimeoutOutOfRange {
                    given: 999_999,
                    used: 86_400,
                }),
            ),
            (
                "sessionAffinity: ClientIP, \
                 sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}},",
                Some(10_800),
                Some(Problem::AffinityTimeoutOutOfRange {
                    given: 0,
                    used: 10_800,
                }),
            ),
            (
                "sessionAffinity: Cookie,",
                None,
                Some(Problem::UnknownSessionAffinity {
                    given: "Cookie".into(),
                }),
            ),
        ];
        for (affinity, want, problem) in cases {
            let service = format!(
                "{{metadata: {{name: web}}, spec: {{{affinity} clusterIP: 10.96.0.10, \
                 ports: [{{name: a, port: 80}}, {{name: b, port: 81}}]}}}}"
            );
            let (state, warnings) = build(&[parse(&service)], &[], &node(None));
            for port in ["a", "b"] {
                let got = state.services[&spn("web", port, Tcp)].affinity_timeout_s;
                assert_eq!(got, want, "{affinity:?}, port {port}");
            }
            let want_warnings: Vec<_> = problem
                .into_iter()
                .map(|p| warning("Service default/web", p))
                .collect();
            assert_eq!(
                warnings, want_warnings,
                "{affinity:?}: warned once per service"
            );
        }
    }

    #[test]
    fn bad_ports_are_skipped_with_a_warning() {
        run(vec![
            Case {
                what: "unknown protocol: that port only",
                services: &["{metadata: {name: web}, spec: {clusterIP: 10.96.0.10, \
                             ports: [{name: q, port: 443, protocol: QUIC}, {name: h, port: 80}, \
                                     {name: low, port: 81, protocol: tcp}]}}"],
                want: vec![(spn("web", "h", Tcp), sp(&["10.96.0.10:80/TCP"], &[], None))],
                warnings: vec![
                    warning(
                        "Service default/web",
                        Problem::UnknownProtocol {
                            port: "q".into(),
                            protocol: "QUIC".into(),
                        },
                    ),
                    warning(
                        "Service default/web",
                        Problem::UnknownProtocol {
                            port: "low".into(),
                            protocol: "tcp".into(),
                        },
                    ),
                ],
                ..Case::default()
            },
            Case {
                what: "port numbers outside 1-65535, and no ports at all",
                services: &[
                    "{metadata: {name: web}, spec: {clusterIP: 10.96.0.10, \
                     ports: [{name: z, port: 0}, {name: big, port: 70000}, \
                             {name: ok, port: 65535}]}}",
                    "{metadata: {name: empty}, spec: {clusterIP: 10.96.0.11, ports: []}}",
                ],
                want: vec![(
                    spn("web", "ok", Tcp),
                    sp(&["10.96.0.10:65535/TCP"], &[], None),
                )],
                warnings: vec![
                    warning("Service default/empty", Problem::NoPorts),
                    warning(
                        "Service default/web",
                        Problem::InvalidPortNumber {
                            port: "z".into(),
                            number: 0,
                        },
                    ),
                    warning(
                        "Service default/web",
                        Problem::InvalidPortNumber {
                            port: "big".into(),
                            number: 70_000,
                        },
                    ),
                ],
                ..Case::default()
            },
            Case {
                what: "slice ports without a number, out of range or of an unknown protocol; bad \
                       endpoint addresses; a slice without a service name",
                services: &[WEB],
                slices: &[
                    "{metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}, \
                     addressType: IPv4, \
                     ports: [{name: ''}, {port: 0}, {port: 8080, protocol: ICMP}, {port: 8080}], \
                     endpoints: [{addresses: [10.0.0.1]}, {addresses: [not-an-ip]}, \
                                 {addresses: []}, {addresses: ['fd00::1']}]}",
                    "{metadata: {name: orphan}, addressType: IPv4, ports: [{port: 8080}], \
                     endpoints: [{addresses: [10.0.0.9]}]}",
                ],
                want: vec![(
                    spn("web", "", Tcp),
                    sp(&["10.96.0.10:80/TCP"], &["10.0.0.1:8080"], None),
                )],
                warnings: vec![
                    warning(
                        "EndpointSlice default/web-1",
                        Problem::MissingPortNumber {
                            port: String::new(),
                        },
                    ),
                    warning(
                        "EndpointSlice default/web-1",
                        Problem::InvalidPortNumber {
                            port: String::new(),
                            number: 0,
                        },
                    ),
                    warning(
                        "EndpointSlice default/web-1",
                        Problem::UnknownProtocol {
                            port: String::new(),
                            protocol: "ICMP".into(),
                        },
                    ),
                    warning(
                        "EndpointSlice default/web-1",
                        Problem::InvalidEndpointAddress {
                            addr: "not-an-ip".into(),
                        },
                    ),
                    warning(
                        "EndpointSlice default/web-1",
                        Problem::EndpointWithoutAddress,
                    ),
                    warning(
                        "EndpointSlice default/web-1",
                        Problem::InvalidEndpointAddress {
                            addr: "fd00::1".into(),
                        },
                    ),
                    warning("EndpointSlice default/orphan", Problem::NoServiceName),
                ],
                ..Case::default()
            },
        ]);
    }

    /// One of kube-proxy's rules, shown on service `web` with the endpoints of its IPv4 slice
    /// `web-1` (target port 8080), built for node `node-a` in zone `zone-a`, address
    /// 192.168.0.10. Endpoints on `node-a` are local; `node-b` and `node-c` are elsewhere.
    #[derive(Default)]
    struct Rule {
        /// The rule, as a sentence.
        rule: &'static str,
        services: &'static [&'static str],
        /// The endpoints of slice `web-1` (a flow YAML list's items); empty: no such slice.
        endpoints: &'static str,
        /// Further slices, whole.
        slices: &'static [&'static str],
        /// The node has no zone label.
        unzoned: bool,
        /// The name of the port of `web` checked ("" for an unnamed one); TCP.
        port: &'static str,
        /// The endpoints policy Cluster and policy Local use: `addr` (port 8080) or
        /// `addr:port`.
        cluster: &'static [&'static str],
        local: &'static [&'static str],
        internal_local: bool,
        external_local: bool,
        /// The external frontends (`addr:port`), for the rules about them.
        external: Option<&'static [&'static str]>,
        /// Every health check: (port, service name, local endpoints).
        health_checks: &'static [(u16, &'static str, usize)],
        warnings: Vec<ModelWarning>,
    }

    /// `web`: ClusterIP 10.96.0.10, port 80 to 8080, policies Cluster.
    const PLAIN: &str = WEB;
    const INTERNAL_LOCAL: &str = "{metadata: {name: web}, spec: {clusterIP: 10.96.0.10, \
                                  internalTrafficPolicy: Local, \
                                  ports: [{port: 80, targetPort: 8080}]}}";
    const EXTERNAL_LOCAL: &str = "{metadata: {name: web}, spec: {type: NodePort, \
                                  clusterIP: 10.96.0.10, externalTrafficPolicy: Local, \
                                  ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}}";
    const LB_LOCAL: &str = "{metadata: {name: web}, spec: {type: LoadBalancer, \
                            clusterIP: 10.96.0.10, externalTrafficPolicy: Local, \
                            healthCheckNodePort: 32000, \
                            ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}, \
                            status: {loadBalancer: {ingress: [{ip: 198.51.100.9}]}}}";

    /// An endpoint at `addr:port`, or at `addr` and port 8080.
    fn endpoint(s: &str) -> Endpoint {
        let at = (s.parse::<std::net::SocketAddr>())
            .unwrap_or_else(|_| std::net::SocketAddr::new(s.parse().unwrap(), 8080));
        Endpoint {
            addr: at.ip(),
            port: at.port(),
        }
    }

    fn check(rules: Vec<Rule>) {
        let node = |zoned: bool| Node {
            name: Some("node-a".into()),
            zone: zoned.then(|| "zone-a".into()),
            addrs: vec![Ipv4Addr::new(192, 168, 0, 10).into()],
            ..Node::default()
        };
        for r in rules {
            let what = r.rule;
            let web_1 = (!r.endpoints.is_empty()).then(|| {
                format!(
                    "{{metadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}, \
                     addressType: IPv4, ports: [{{port: 8080}}], endpoints: [{}]}}",
                    r.endpoints
                )
            });
            let slices: Vec<EndpointSlice> = (web_1.iter().map(String::as_str))
                .chain(r.slices.iter().copied())
                .map(parse)
                .collect();
            let services: Vec<Service> = r.services.iter().map(|s| parse(s)).collect();
            let (state, warnings) = build(&services, &slices, &node(!r.unzoned));
            let port = (state.services.get(&spn("web", r.port, Tcp)))
                .unwrap_or_else(|| panic!("{what}: no port {:?}", r.port));
            let set = |list: &[&str]| list.iter().map(|e| endpoint(e)).collect::<BTreeSet<_>>();
            assert_eq!(port.endpoints, set(r.cluster), "{what}: policy Cluster's");
            assert_eq!(port.local_endpoints, set(r.local), "{what}: policy Local's");
            assert_eq!(
                (port.internal_local, port.external_local),
                (r.internal_local, r.external_local),
                "{what}: (internal, external) policy Local"
            );
            if let Some(external) = r.external {
                let got: Vec<String> = (port.external_frontends.keys())
                    .map(|f| std::net::SocketAddr::new(f.addr, f.port).to_string())
                    .collect();
                assert_eq!(got, external, "{what}: external frontends");
            }
            let checks: Vec<(u16, &str, usize)> = (state.health_checks.iter())
                .map(|(p, h)| (*p, h.name.as_str(), h.local_endpoints))
                .collect();
            assert_eq!(checks, r.health_checks, "{what}: health checks");
            assert_eq!(warnings, r.warnings, "{what}: warnings");
        }
    }

    #[test]
    fn endpoint_conditions() {
        check(vec![
            Rule {
                rule: "ready unset means ready (and serving, not terminating)",
                services: &[PLAIN],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-a}, \
                            {addresses: [10.0.0.2], nodeName: node-b, conditions: {}}",
                cluster: &["10.0.0.1", "10.0.0.2"],
                local: &["10.0.0.1"],
                ..Rule::default()
            },
            Rule {
                rule:
                    "while one endpoint is ready, not-ready ones are not used, terminating or not",
                services: &[PLAIN],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-b, conditions: {ready: true}}, \
                            {addresses: [10.0.0.2], nodeName: node-b, \
                             conditions: {ready: false, serving: true, terminating: true}}, \
                            {addresses: [10.0.0.3], nodeName: node-b, conditions: {ready: false}}",
                cluster: &["10.0.0.1"],
                ..Rule::default()
            },
            Rule {
                rule: "policy Cluster, none ready anywhere: every serving terminating endpoint, \
                       on any node",
                services: &[PLAIN],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-a, \
                             conditions: {ready: false, serving: true, terminating: true}}, \
                            {addresses: [10.0.0.2], nodeName: node-b, \
                             conditions: {ready: false, serving: true, terminating: true}}, \
                            {addresses: [10.0.0.3], nodeName: node-b, \
                             conditions: {ready: false, serving: false, terminating: true}}, \
                            {addresses: [10.0.0.4], nodeName: node-b, \
                             conditions: {ready: false, serving: true}}",
                cluster: &["10.0.0.1", "10.0.0.2"],
                local: &["10.0.0.1"],
                ..Rule::default()
            },
            Rule {
                rule: "serving unset means serving: a terminating endpoint is a fallback",
                services: &[PLAIN],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-b, \
                             conditions: {ready: false, terminating: true}}",
                cluster: &["10.0.0.1"],
                ..Rule::default()
            },
            Rule {
                rule: "terminating unset means not terminating: a not-ready endpoint is never \
                       a fallback, serving or not",
                services: &[PLAIN],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-b, \
                             conditions: {ready: false, serving: true}}",
                ..Rule::default()
            },
            Rule {
                rule: "policy Local: the ready endpoints here, not the terminating ones here",
                services: &[EXTERNAL_LOCAL],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-a}, \
                            {addresses: [10.0.0.2], nodeName: node-b}, \
                            {addresses: [10.0.0.3], nodeName: node-a, \
                             conditions: {ready: false, serving: true, terminating: true}}",
                cluster: &["10.0.0.1", "10.0.0.2"],
                local: &["10.0.0.1"],
                external_local: true,
                ..Rule::default()
            },
            Rule {
                rule: "policy Local, none ready here: the serving terminating ones here, even \
                       while ready ones serve elsewhere",
                services: &[EXTERNAL_LOCAL],
                endpoints: "{addresses: [10.0.0.2], nodeName: node-b}, \
                            {addresses: [10.0.0.3], nodeName: node-a, \
                             conditions: {ready: false, serving: true, terminating: true}}, \
                            {addresses: [10.0.0.4], nodeName: node-b, \
                             conditions: {ready: false, serving: true, terminating: true}}",
                cluster: &["10.0.0.2"],
                local: &["10.0.0.3"],
                external_local: true,
                ..Rule::default()
            },
            Rule {
                rule: "policy Local, nothing usable here but endpoints elsewhere: an empty local \
                       set beside a cluster one (drop, not reject)",
                services: &[EXTERNAL_LOCAL],
                endpoints: "{addresses: [10.0.0.2], nodeName: node-b}, \
                            {addresses: [10.0.0.3], nodeName: node-a, conditions: {ready: false}}",
                cluster: &["10.0.0.2"],
                external_local: true,
                ..Rule::default()
            },
            Rule {
                rule: "nothing usable anywhere: both sets empty (reject)",
                services: &[EXTERNAL_LOCAL],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-a, \
                             conditions: {ready: false, serving: false, terminating: true}}, \
                            {addresses: [10.0.0.2], nodeName: node-b, conditions: {ready: false}}",
                external_local: true,
                ..Rule::default()
            },
            Rule {
                rule: "an endpoint without a nodeName is on no node, so never local",
                services: &[EXTERNAL_LOCAL],
                endpoints: "{addresses: [10.0.0.1]}",
                cluster: &["10.0.0.1"],
                external_local: true,
                ..Rule::default()
            },
            Rule {
                rule: "publishNotReadyAddresses: the controller writes a not-ready pod as \
                       ready: true, serving: false, and it is used",
                services: &["{metadata: {name: web}, spec: {clusterIP: 10.96.0.10, \
                             publishNotReadyAddresses: true, \
                             ports: [{port: 80, targetPort: 8080}]}}"],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-a, \
                             conditions: {ready: true, serving: false, terminating: false}}",
                cluster: &["10.0.0.1"],
                local: &["10.0.0.1"],
                ..Rule::default()
            },
            Rule {
                rule: "publishNotReadyAddresses on the service does not override the slice: \
                       only the slice's ready counts",
                services: &["{metadata: {name: web}, spec: {clusterIP: 10.96.0.10, \
                             publishNotReadyAddresses: true, \
                             ports: [{port: 80, targetPort: 8080}]}}"],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-a, \
                             conditions: {ready: false, serving: false, terminating: false}}",
                ..Rule::default()
            },
        ]);
    }

    #[test]
    fn traffic_policies() {
        check(vec![
            Rule {
                rule: "internalTrafficPolicy Local: the ClusterIP uses the local set",
                services: &[INTERNAL_LOCAL],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-a}, \
                            {addresses: [10.0.0.2], nodeName: node-b}",
                cluster: &["10.0.0.1", "10.0.0.2"],
                local: &["10.0.0.1"],
                internal_local: true,
                ..Rule::default()
            },
            Rule {
                rule: "internalTrafficPolicy Local with externalTrafficPolicy Cluster: each \
                       kind of frontend its own set",
                services: &["{metadata: {name: web}, spec: {type: NodePort, \
                             clusterIP: 10.96.0.10, internalTrafficPolicy: Local, \
                             ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}}"],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-a}, \
                            {addresses: [10.0.0.2], nodeName: node-b}",
                cluster: &["10.0.0.1", "10.0.0.2"],
                local: &["10.0.0.1"],
                internal_local: true,
                external: Some(&["192.168.0.10:30080"]),
                ..Rule::default()
            },
            Rule {
                rule: "both policies Local",
                services: &["{metadata: {name: web}, spec: {type: NodePort, \
                             clusterIP: 10.96.0.10, internalTrafficPolicy: Local, \
                             externalTrafficPolicy: Local, \
                             ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}}"],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-a}, \
                            {addresses: [10.0.0.2], nodeName: node-b}",
                cluster: &["10.0.0.1", "10.0.0.2"],
                local: &["10.0.0.1"],
                internal_local: true,
                external_local: true,
                external: Some(&["192.168.0.10:30080"]),
                ..Rule::default()
            },
            Rule {
                rule: "externalTrafficPolicy Local applies to the externalIPs of a ClusterIP \
                       service (externally accessible)",
                services: &["{metadata: {name: web}, spec: {clusterIP: 10.96.0.10, \
                             externalIPs: [203.0.113.7], externalTrafficPolicy: Local, \
                             ports: [{port: 80, targetPort: 8080}]}}"],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-a}",
                cluster: &["10.0.0.1"],
                local: &["10.0.0.1"],
                external_local: true,
                external: Some(&["203.0.113.7:80"]),
                ..Rule::default()
            },
            Rule {
                rule: "externalTrafficPolicy Local on a service nothing reaches from outside: off",
                services: &["{metadata: {name: web}, spec: {clusterIP: 10.96.0.10, \
                             externalTrafficPolicy: Local, \
                             ports: [{port: 80, targetPort: 8080}]}}"],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-a}",
                cluster: &["10.0.0.1"],
                local: &["10.0.0.1"],
                external: Some(&[]),
                ..Rule::default()
            },
            Rule {
                rule: "a traffic policy other than Cluster or Local is Cluster, named",
                services: &["{metadata: {name: web}, spec: {type: NodePort, \
                             clusterIP: 10.96.0.10, internalTrafficPolicy: PreferLocal, \
                             externalTrafficPolicy: local, \
                             ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}}"],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-a}",
                cluster: &["10.0.0.1"],
                local: &["10.0.0.1"],
                warnings: vec![
                    warning(
                        "Service default/web",
                        Problem::UnknownTrafficPolicy {
                            field: "externalTrafficPolicy",
                            given: "local".into(),
                        },
                    ),
                    warning(
                        "Service default/web",
                        Problem::UnknownTrafficPolicy {
                            field: "internalTrafficPolicy",
                            given: "PreferLocal".into(),
                        },
                    ),
                ],
                ..Rule::default()
            },
            Rule {
                rule: "LoadBalancer ingress IPs: ipMode VIP or unset is programmed, Proxy is not",
                services: &["{metadata: {name: web}, spec: {type: LoadBalancer, \
                             clusterIP: 10.96.0.10, \
                             ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}, \
                             status: {loadBalancer: {ingress: [{ip: 198.51.100.9}, \
                             {ip: 198.51.100.10, ipMode: VIP}, \
                             {ip: 198.51.100.11, ipMode: Proxy}]}}}"],
                external: Some(&["192.168.0.10:30080", "198.51.100.9:80", "198.51.100.10:80"]),
                ..Rule::default()
            },
            Rule {
                rule: "an ipMode the API does not define: the ingress IP is skipped, named",
                services: &["{metadata: {name: web}, spec: {type: LoadBalancer, \
                             clusterIP: 10.96.0.10, \
                             ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}, \
                             status: {loadBalancer: {ingress: [{ip: 198.51.100.9, \
                             ipMode: proxy}]}}}"],
                external: Some(&["192.168.0.10:30080"]),
                warnings: vec![warning(
                    "Service default/web",
                    Problem::UnknownIpMode {
                        addr: "198.51.100.9".into(),
                        given: "proxy".into(),
                    },
                )],
                ..Rule::default()
            },
        ]);
    }

    #[test]
    fn topology_hints() {
        check(vec![
            Rule {
                rule: "zone hints on every ready endpoint, one for this zone: policy Cluster \
                       uses those for this zone; policy Local ignores hints",
                services: &[PLAIN],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-b, \
                             hints: {forZones: [{name: zone-a}]}}, \
                            {addresses: [10.0.0.2], nodeName: node-c, \
                             hints: {forZones: [{name: zone-b}]}}, \
                            {addresses: [10.0.0.3], nodeName: node-a, \
                             hints: {forZones: [{name: zone-b}]}}",
                cluster: &["10.0.0.1"],
                local: &["10.0.0.3"],
                ..Rule::default()
            },
            Rule {
                rule: "zone hints: an endpoint hinted for several zones serves each",
                services: &[PLAIN],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-b, \
                             hints: {forZones: [{name: zone-b}, {name: zone-a}]}}, \
                            {addresses: [10.0.0.2], nodeName: node-c, \
                             hints: {forZones: [{name: zone-b}]}}",
                cluster: &["10.0.0.1"],
                ..Rule::default()
            },
            Rule {
                rule: "zone hints: one ready endpoint without any: no topology",
                services: &[PLAIN],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-b, \
                             hints: {forZones: [{name: zone-a}]}}, \
                            {addresses: [10.0.0.2], nodeName: node-c}",
                cluster: &["10.0.0.1", "10.0.0.2"],
                ..Rule::default()
            },
            Rule {
                rule: "zone hints: none for this zone: no topology",
                services: &[PLAIN],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-b, \
                             hints: {forZones: [{name: zone-b}]}}, \
                            {addresses: [10.0.0.2], nodeName: node-c, \
                             hints: {forZones: [{name: zone-c}]}}",
                cluster: &["10.0.0.1", "10.0.0.2"],
                ..Rule::default()
            },
            Rule {
                rule: "zone hints: a not-ready endpoint's missing hint does not matter",
                services: &[PLAIN],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-b, \
                             hints: {forZones: [{name: zone-a}]}}, \
                            {addresses: [10.0.0.2], nodeName: node-c, \
                             hints: {forZones: [{name: zone-b}]}}, \
                            {addresses: [10.0.0.3], nodeName: node-c, \
                             conditions: {ready: false}}",
                cluster: &["10.0.0.1"],
                ..Rule::default()
            },
            Rule {
                rule: "zone hints: only a not-ready endpoint is hinted for this zone: no topology",
                services: &[PLAIN],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-b, \
                             hints: {forZones: [{name: zone-b}]}}, \
                            {addresses: [10.0.0.2], nodeName: node-c, \
                             conditions: {ready: false, serving: true, terminating: true}, \
                             hints: {forZones: [{name: zone-a}]}}",
                cluster: &["10.0.0.1"],
                ..Rule::default()
            },
            Rule {
                rule: "zone hints: a node without a zone label ignores them",
                services: &[PLAIN],
                unzoned: true,
                endpoints: "{addresses: [10.0.0.1], nodeName: node-b, \
                             hints: {forZones: [{name: zone-a}]}}, \
                            {addresses: [10.0.0.2], nodeName: node-c, \
                             hints: {forZones: [{name: zone-b}]}}",
                cluster: &["10.0.0.1", "10.0.0.2"],
                ..Rule::default()
            },
            Rule {
                rule: "none ready: every serving terminating endpoint, hints aside",
                services: &[PLAIN],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-b, \
                             conditions: {ready: false, serving: true, terminating: true}, \
                             hints: {forZones: [{name: zone-a}]}}, \
                            {addresses: [10.0.0.2], nodeName: node-c, \
                             conditions: {ready: false, serving: true, terminating: true}, \
                             hints: {forZones: [{name: zone-b}]}}",
                cluster: &["10.0.0.1", "10.0.0.2"],
                ..Rule::default()
            },
            Rule {
                rule: "node hints on every ready endpoint, one for this node: only those \
                       (PreferSameNode), before zone hints",
                services: &[PLAIN],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-a, \
                             hints: {forNodes: [{name: node-a}], forZones: [{name: zone-a}]}}, \
                            {addresses: [10.0.0.2], nodeName: node-b, \
                             hints: {forNodes: [{name: node-b}], forZones: [{name: zone-a}]}}",
                cluster: &["10.0.0.1"],
                local: &["10.0.0.1"],
                ..Rule::default()
            },
            Rule {
                rule: "node hints, none for this node: zone hints decide",
                services: &[PLAIN],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-b, \
                             hints: {forNodes: [{name: node-b}], forZones: [{name: zone-a}]}}, \
                            {addresses: [10.0.0.2], nodeName: node-c, \
                             hints: {forNodes: [{name: node-c}], forZones: [{name: zone-b}]}}",
                cluster: &["10.0.0.1"],
                ..Rule::default()
            },
            Rule {
                rule: "node hints missing on one ready endpoint: zone hints decide",
                services: &[PLAIN],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-a, \
                             hints: {forNodes: [{name: node-a}], forZones: [{name: zone-b}]}}, \
                            {addresses: [10.0.0.2], nodeName: node-b, \
                             hints: {forZones: [{name: zone-a}]}}",
                cluster: &["10.0.0.2"],
                local: &["10.0.0.1"],
                ..Rule::default()
            },
            Rule {
                rule: "trafficDistribution and the topology-mode annotation do nothing without \
                       hints: kube-proxy reads only the hints",
                services: &["{metadata: {name: web, \
                             annotations: {service.kubernetes.io/topology-mode: Auto}}, \
                             spec: {clusterIP: 10.96.0.10, trafficDistribution: PreferClose, \
                             ports: [{port: 80, targetPort: 8080}]}}"],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-a, zone: zone-a}, \
                            {addresses: [10.0.0.2], nodeName: node-b, zone: zone-b}",
                cluster: &["10.0.0.1", "10.0.0.2"],
                local: &["10.0.0.1"],
                ..Rule::default()
            },
        ]);
    }

    #[test]
    fn health_checks() {
        check(vec![
            Rule {
                rule: "a LoadBalancer with policy Local and a healthCheckNodePort is checked, \
                       counting the ready endpoints here",
                services: &[LB_LOCAL],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-a}, \
                            {addresses: [10.0.0.2], nodeName: node-b}, \
                            {addresses: [10.0.0.3], nodeName: node-a, \
                             conditions: {ready: false, serving: true, terminating: true}}",
                cluster: &["10.0.0.1", "10.0.0.2"],
                local: &["10.0.0.1"],
                external_local: true,
                health_checks: &[(32000, "web", 1)],
                ..Rule::default()
            },
            Rule {
                rule: "only terminating endpoints here: they take the traffic, but count 0",
                services: &[LB_LOCAL],
                endpoints: "{addresses: [10.0.0.2], nodeName: node-b}, \
                            {addresses: [10.0.0.3], nodeName: node-a, \
                             conditions: {ready: false, serving: true, terminating: true}}",
                cluster: &["10.0.0.2"],
                local: &["10.0.0.3"],
                external_local: true,
                health_checks: &[(32000, "web", 0)],
                ..Rule::default()
            },
            Rule {
                rule: "the count is of distinct addresses over all the service's ports",
                services: &["{metadata: {name: web}, spec: {type: LoadBalancer, \
                             clusterIP: 10.96.0.10, externalTrafficPolicy: Local, \
                             healthCheckNodePort: 32000, \
                             ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}, \
                             {name: https, port: 443, targetPort: 8443, nodePort: 30443}]}}"],
                slices: &[
                    "{metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}, \
                           addressType: IPv4, \
                           ports: [{name: http, port: 8080}, {name: https, port: 8443}], \
                           endpoints: [{addresses: [10.0.0.1], nodeName: node-a}, \
                           {addresses: [10.0.0.2], nodeName: node-a}, \
                           {addresses: [10.0.0.3], nodeName: node-b}]}",
                ],
                port: "http",
                cluster: &["10.0.0.1", "10.0.0.2", "10.0.0.3"],
                local: &["10.0.0.1", "10.0.0.2"],
                external_local: true,
                health_checks: &[(32000, "web", 2)],
                ..Rule::default()
            },
            Rule {
                rule: "no health check under policy Cluster, nor for a NodePort service",
                services: &[
                    "{metadata: {name: web}, spec: {type: LoadBalancer, clusterIP: 10.96.0.10, \
                     healthCheckNodePort: 32000, \
                     ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}}",
                    "{metadata: {name: np}, spec: {type: NodePort, clusterIP: 10.96.0.11, \
                     externalTrafficPolicy: Local, healthCheckNodePort: 32001, \
                     ports: [{port: 80, targetPort: 8080, nodePort: 30081}]}}",
                ],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-a}",
                cluster: &["10.0.0.1"],
                local: &["10.0.0.1"],
                ..Rule::default()
            },
            Rule {
                rule: "a LoadBalancer with policy Local and no healthCheckNodePort is named",
                services: &["{metadata: {name: web}, spec: {type: LoadBalancer, \
                             clusterIP: 10.96.0.10, externalTrafficPolicy: Local, \
                             ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}}"],
                external_local: true,
                warnings: vec![warning(
                    "Service default/web",
                    Problem::MissingHealthCheckNodePort,
                )],
                ..Rule::default()
            },
            Rule {
                rule: "a healthCheckNodePort outside 1-65535 is named",
                services: &["{metadata: {name: web}, spec: {type: LoadBalancer, \
                             clusterIP: 10.96.0.10, externalTrafficPolicy: Local, \
                             healthCheckNodePort: 70000, \
                             ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}}"],
                external_local: true,
                warnings: vec![warning(
                    "Service default/web",
                    Problem::InvalidHealthCheckNodePort { number: 70_000 },
                )],
                ..Rule::default()
            },
            Rule {
                rule: "two services claiming one health-check port: the first by namespace/name \
                       keeps it, the other is named",
                services: &[
                    LB_LOCAL,
                    "{metadata: {name: api}, spec: {type: LoadBalancer, clusterIP: 10.96.0.11, \
                     externalTrafficPolicy: Local, healthCheckNodePort: 32000, \
                     ports: [{port: 80, targetPort: 8080, nodePort: 30081}]}}",
                ],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-a}",
                cluster: &["10.0.0.1"],
                local: &["10.0.0.1"],
                external_local: true,
                health_checks: &[(32000, "api", 0)],
                warnings: vec![warning(
                    "Service default/web",
                    Problem::HealthCheckNodePortTaken {
                        port: 32000,
                        owner: ObjectRef {
                            kind: ObjectKind::Service,
                            namespace: "default".into(),
                            name: "api".into(),
                        },
                    },
                )],
                ..Rule::default()
            },
        ]);
    }

    #[test]
    fn endpoints_merged_across_slices() {
        check(vec![
            Rule {
                rule: "an endpoint in two slices is one; the copy on this node wins, with its \
                       conditions",
                services: &[PLAIN],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-b, conditions: {ready: true}}",
                slices: &[
                    "{metadata: {name: web-2, labels: {kubernetes.io/service-name: web}}, \
                           addressType: IPv4, ports: [{port: 8080}], \
                           endpoints: [{addresses: [10.0.0.1], nodeName: node-a, \
                           conditions: {ready: false, serving: true, terminating: true}}]}",
                ],
                cluster: &["10.0.0.1"],
                local: &["10.0.0.1"],
                ..Rule::default()
            },
            Rule {
                rule: "two remote copies that disagree: the first slice by name wins, whatever \
                       order the slices come in",
                services: &[PLAIN],
                slices: &[
                    "{metadata: {name: web-2, labels: {kubernetes.io/service-name: web}}, \
                     addressType: IPv4, ports: [{port: 8080}], \
                     endpoints: [{addresses: [10.0.0.1], nodeName: node-b, \
                     conditions: {ready: true}}]}",
                    "{metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}, \
                     addressType: IPv4, ports: [{port: 8080}], \
                     endpoints: [{addresses: [10.0.0.1], nodeName: node-c, \
                     conditions: {ready: false}}]}",
                ],
                ..Rule::default()
            },
            Rule {
                rule: "an address with leading zeros is the same endpoint",
                services: &[PLAIN],
                endpoints: "{addresses: [10.0.0.1], nodeName: node-b}",
                slices: &[
                    "{metadata: {name: web-2, labels: {kubernetes.io/service-name: web}}, \
                           addressType: IPv4, ports: [{port: 8080}], \
                           endpoints: [{addresses: [010.000.000.001], nodeName: node-a}]}",
                ],
                cluster: &["10.0.0.1"],
                local: &["10.0.0.1"],
                ..Rule::default()
            },
            Rule {
                rule: "a named target port takes each slice's own number: one address under \
                       two numbers is two endpoints",
                services: &["{metadata: {name: web}, spec: {clusterIP: 10.96.0.10, \
                             ports: [{name: http, port: 80, targetPort: web}]}}"],
                slices: &[
                    "{metadata: {name: web-a, labels: {kubernetes.io/service-name: web}}, \
                     addressType: IPv4, ports: [{name: http, port: 8080}], \
                     endpoints: [{addresses: [10.0.0.1], nodeName: node-a}]}",
                    "{metadata: {name: web-b, labels: {kubernetes.io/service-name: web}}, \
                     addressType: IPv4, ports: [{name: http, port: 9090}], \
                     endpoints: [{addresses: [10.0.0.2], nodeName: node-b}, \
                     {addresses: [10.0.0.1], nodeName: node-a}]}",
                ],
                port: "http",
                cluster: &["10.0.0.1:8080", "10.0.0.1:9090", "10.0.0.2:9090"],
                local: &["10.0.0.1:8080", "10.0.0.1:9090"],
                ..Rule::default()
            },
        ]);
    }

    #[test]
    fn changing_the_type_adds_and_withdraws_frontends() {
        // One service edited in place, as the API server keeps it: a nodePort is allocated
        // on the change to NodePort and cleared on the change back to ClusterIP, the
        // load-balancer status is written by the cloud controller.
        let versions = [
            (
                "ClusterIP",
                "{metadata: {name: web}, spec: {clusterIP: 10.96.0.10, \
                 ports: [{port: 80, targetPort: 8080}]}}",
                &[][..],
            ),
            (
                "NodePort",
                "{metadata: {name: web}, spec: {type: NodePort, clusterIP: 10.96.0.10, \
                 ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}}",
                &["192.168.0.10:30080", "192.168.1.10:30080"][..],
            ),
            (
                "LoadBalancer",
                "{metadata: {name: web}, spec: {type: LoadBalancer, clusterIP: 10.96.0.10, \
                 ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}, \
                 status: {loadBalancer: {ingress: [{ip: 198.51.100.9}]}}}",
                &[
                    "192.168.0.10:30080",
                    "192.168.1.10:30080",
                    "198.51.100.9:80",
                ][..],
            ),
            (
                "ClusterIP again",
                "{metadata: {name: web}, spec: {clusterIP: 10.96.0.10, \
                 ports: [{port: 80, targetPort: 8080}]}}",
                &[][..],
            ),
        ];
        for (type_, service, want) in versions {
            let (port, warnings) = external(service);
            let got: Vec<String> = frontends_of(&port).into_iter().map(|(f, _)| f).collect();
            assert_eq!(got, want, "as {type_}");
            assert_eq!(port.frontends.len(), 1, "as {type_}: the ClusterIP stays");
            assert_eq!(warnings, [], "as {type_}");
        }
    }

    #[test]
    fn topology_is_decided_per_family() {
        // As kube-proxy's proxier of each family sees only its own slices: the IPv4 slice is
        // hinted, the IPv6 one not.
        let slices: [EndpointSlice; 2] = [
            parse(
                "{metadata: {name: web-4, labels: {kubernetes.io/service-name: web}}, \
                 addressType: IPv4, ports: [{port: 8080}], \
                 endpoints: [{addresses: [10.0.0.1], nodeName: node-b, \
                 hints: {forZones: [{name: zone-a}]}}, \
                 {addresses: [10.0.0.2], nodeName: node-c, \
                 hints: {forZones: [{name: zone-b}]}}]}",
            ),
            parse(
                "{metadata: {name: web-6, labels: {kubernetes.io/service-name: web}}, \
                 addressType: IPv6, ports: [{port: 8080}], \
                 endpoints: [{addresses: ['fd00:1::1'], nodeName: node-b, \
                 hints: {forZones: [{name: zone-a}]}}, \
                 {addresses: ['fd00:1::2'], nodeName: node-c}]}",
            ),
        ];
        let service = parse(
            "{metadata: {name: web}, spec: {clusterIP: 10.96.0.10, \
             clusterIPs: [10.96.0.10, 'fd00:96::10'], ipFamilies: [IPv4, IPv6], \
             ports: [{port: 80, targetPort: 8080}]}}",
        );
        let node = Node {
            name: Some("node-a".into()),
            zone: Some("zone-a".into()),
            ..Node::default()
        };
        let (state, warnings) = build(&[service], &slices, &node);
        assert_eq!(warnings, []);
        assert_eq!(
            state.services[&spn("web", "", Tcp)].endpoints,
            endpoint_set(&["10.0.0.1", "fd00:1::1", "fd00:1::2"])
        );
    }

    #[test]
    fn a_dual_stack_health_check_counts_the_larger_family() {
        let (state, problems) = dual_stack(
            "{metadata: {name: web}, spec: {type: LoadBalancer, clusterIP: 10.96.0.10, \
             clusterIPs: [10.96.0.10, 'fd00:96::10'], ipFamilies: [IPv4, IPv6], \
             externalTrafficPolicy: Local, healthCheckNodePort: 32000, \
             ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}}",
            DUAL_NODE,
        );
        // 10.0.0.1 and fd00:1::1 are one pod's two addresses: kube-proxy's proxier of each
        // family counts 1, and so does the one number here.
        assert_eq!(
            problems.len(),
            2,
            "the slices' stray addresses: {problems:?}"
        );
        let check = &state.health_checks[&32000];
        assert_eq!((check.name.as_str(), check.local_endpoints), ("web", 1));

        // A second IPv6 endpoint here: the IPv6 family counts 2.
        let slice: EndpointSlice = parse(
            "{metadata: {name: web-6b, labels: {kubernetes.io/service-name: web}}, \
             addressType: IPv6, ports: [{port: 8080}], \
             endpoints: [{addresses: ['fd00:1::3'], nodeName: node-a}]}",
        );
        let service: Service = parse(
            "{metadata: {name: web}, spec: {type: LoadBalancer, clusterIP: 10.96.0.10, \
             clusterIPs: [10.96.0.10, 'fd00:96::10'], ipFamilies: [IPv4, IPv6], \
             externalTrafficPolicy: Local, healthCheckNodePort: 32000, \
             ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}}",
        );
        let node = Node {
            name: Some("node-a".into()),
            ..Node::default()
        };
        let four: EndpointSlice = parse(
            "{metadata: {name: web-4, labels: {kubernetes.io/service-name: web}}, \
             addressType: IPv4, ports: [{port: 8080}], \
             endpoints: [{addresses: [10.0.0.1], nodeName: node-a}]}",
        );
        let six: EndpointSlice = parse(
            "{metadata: {name: web-6, labels: {kubernetes.io/service-name: web}}, \
             addressType: IPv6, ports: [{port: 8080}], \
             endpoints: [{addresses: ['fd00:1::1'], nodeName: node-a}]}",
        );
        let (state, _) = build(&[service], &[four, six, slice], &node);
        assert_eq!(state.health_checks[&32000].local_endpoints, 2);
    }

    #[test]
    fn warnings_read_well() {
        let w = warning(
            "Service shop/web",
            Problem::InvalidClusterIp {
                addr: "1.2.3".into(),
            },
        );
        assert_eq!(
            w.to_string(),
            "Service shop/web: cluster IP \"1.2.3\" is not an IP address; skipping it"
        );
    }

    #[test]
    fn empty_objects_do_not_panic() {
        let services: Vec<Service> = vec![
            Service::default(),
            parse("{spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}}"),
            parse("{spec: {clusterIP: 10.96.0.10, clusterIPs: [], ports: [{port: -1}]}}"),
        ];
        let slices: Vec<EndpointSlice> = vec![
            EndpointSlice::default(),
            parse(
                "{metadata: {labels: {kubernetes.io/service-name: ''}}, addressType: IPv4, \
                 endpoints: []}",
            ),
            parse(
                "{metadata: {labels: {kubernetes.io/service-name: x}}, addressType: IPv4, \
                 endpoints: [{addresses: ['']}]}",
            ),
        ];
        let (state, _) = build(&services, &slices, &node(None));
        // A nameless service is still programmed: rejecting input is the API server's job.
        assert_eq!(state.services.len(), 1);

        // Empty policies, hints, ingress points and names, on a node with an empty name and
        // zone (which nothing empty is taken to name).
        let service: Service = parse(
            "{metadata: {name: e}, spec: {type: LoadBalancer, clusterIP: 10.96.0.10, \
             externalTrafficPolicy: '', \
             internalTrafficPolicy: '', healthCheckNodePort: -5, ports: [{port: 80}]}, \
             status: {loadBalancer: {ingress: [{}, {ip: '', ipMode: ''}, {ipMode: Proxy}]}}}",
        );
        let slice: EndpointSlice = parse(
            "{metadata: {labels: {kubernetes.io/service-name: e}}, addressType: IPv4, \
             ports: [{}, {port: 8080}], endpoints: [{addresses: [10.0.0.1], nodeName: '', conditions: {}, \
             hints: {forNodes: [{name: node-x}]}}, {addresses: [10.0.0.2], \
             hints: {forZones: [], forNodes: [{name: ''}]}}]}",
        );
        let empty = Node {
            name: Some(String::new()),
            zone: Some(String::new()),
            ..Node::default()
        };
        let (state, warnings) = build(&[service], &[slice], &empty);
        assert_eq!(state.services.len(), 1);
        let port = state.services.values().next().unwrap();
        assert_eq!(
            port.local_endpoints,
            [].into(),
            "an empty nodeName is no node's"
        );
        assert_eq!(port.endpoints.len(), 2, "an empty node hint is for no node");
        assert!(state.health_checks.is_empty());
        assert!(!warnings.is_empty());
    }

    #[test]
    fn sloppy_ipv4_parsing() {
        let cases: [(&str, Option<[u8; 4]>); 14] = [
            ("10.96.0.10", Some([10, 96, 0, 10])),
            ("010.096.000.010", Some([10, 96, 0, 10])),
            ("0010.0.0.1", Some([10, 0, 0, 1])),
            ("255.255.255.255", Some([255, 255, 255, 255])),
            ("0.0.0.0", Some([0, 0, 0, 0])),
            ("256.0.0.1", None),
            ("1.2.3", None),
            ("1.2.3.4.5", None),
            ("1..3.4", None),
            ("1.2.3.", None),
            ("+1.2.3.4", None),
            (" 1.2.3.4", None),
            ("0x0a.0.0.1", None),
            ("99999999999999999999.0.0.1", None),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse_ipv4_sloppy(input),
                want.map(Ipv4Addr::from),
                "{input:?}"
            );
        }
    }
}
