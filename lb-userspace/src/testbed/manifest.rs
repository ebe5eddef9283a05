//! The end-to-end tests' service, as the manifest the agent reads: one place for its shape,
//! for IPv4 ([`demo`]), IPv6 ([`demo6`]) and dual-stack ([`demo_dual`]).

use std::net::{Ipv4Addr, Ipv6Addr};

use super::topology::{backend_ip, backend_ip6};

/// The service's ClusterIP and ports.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The service's IPv6 ClusterIP (in `topology::SERVICE_CIDR6`, mirroring `VIP`).
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 0x10);
pub const TCP_PORT: u16 = 80;
pub const TCP_TARGET: u16 = 8080;
pub const UDP_PORT: u16 = 53;
pub const UDP_TARGET: u16 = 5353;

/// The address families of a test service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    /// IPv4 only, as a cluster without dual-stack writes it (no `ipFamilies`).
    V4,
    /// IPv6 only: `ipFamilies: [IPv6]`, ClusterIP `VIP6`, an IPv6 EndpointSlice.
    V6,
    /// `RequireDualStack`, `ipFamilies: [IPv4, IPv6]`, ClusterIPs `VIP` and `VIP6`, and one
    /// EndpointSlice per family, as the EndpointSlice controller writes them.
    Dual,
}

/// Service `demo` (ClusterIP `VIP`: TCP 80 -> 8080, UDP 53 -> 5353; ClientIP affinity with
/// the given timeout, if any) and one EndpointSlice listing the given backends (1-based, as
/// in the topology) as ready; `&[]` gives an empty slice.
pub fn demo(backends: &[usize], affinity_timeout_s: Option<u64>) -> String {
    service(Stack::V4, backends, affinity_timeout_s)
}

/// [`demo`] over IPv6 only: ClusterIP `VIP6`, the backends' IPv6 addresses.
pub fn demo6(backends: &[usize], affinity_timeout_s: Option<u64>) -> String {
    service(Stack::V6, backends, affinity_timeout_s)
}

/// [`demo`] dual-stack: ClusterIPs `VIP` and `VIP6`, an IPv4 and an IPv6 EndpointSlice
/// listing the same backends.
pub fn demo_dual(backends: &[usize], affinity_timeout_s: Option<u64>) -> String {
    service(Stack::Dual, backends, affinity_timeout_s)
}

/// The NodePorts of [`demo_node_port`].
pub const TCP_NODE_PORT: u16 = 30080;
pub const UDP_NODE_PORT: u16 = 30053;

/// [`demo`] as a NodePort service: TCP on `TCP_NODE_PORT`, UDP on `UDP_NODE_PORT` of every
/// node address, besides the ClusterIP.
pub fn demo_node_port(backends: &[usize], affinity_timeout_s: Option<u64>) -> String {
    let yaml = demo(backends, affinity_timeout_s);
    let edits = [
        ("  type: ClusterIP\n", "  type: NodePort\n".to_string()),
        (
            "      targetPort: 8080\n",
            format!("      targetPort: 8080\n      nodePort: {TCP_NODE_PORT}\n"),
        ),
        (
            "      targetPort: 5353\n",
            format!("      targetPort: 5353\n      nodePort: {UDP_NODE_PORT}\n"),
        ),
    ];
    edits.into_iter().fold(yaml, |yaml, (from, to)| {
        assert_eq!(
            yaml.matches(from).count(),
            1,
            "{from:?} in the demo manifest"
        );
        yaml.replace(from, &to)
    })
}

/// Service `demo` of the given `stack` with its EndpointSlices (see [`demo`]).
pub fn service(stack: Stack, backends: &[usize], affinity_timeout_s: Option<u64>) -> String {
    let affinity = affinity_timeout_s.map_or(String::new(), |t| {
        format!(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      \
             timeoutSeconds: {t}\n"
        )
    });
    let families = match stack {
        Stack::V4 => format!("  clusterIP: {VIP}\n  clusterIPs: [\"{VIP}\"]\n"),
        Stack::V6 => format!(
            "  ipFamilyPolicy: SingleStack\n  ipFamilies: [IPv6]\n  clusterIP: {VIP6}\n  \
             clusterIPs: [\"{VIP6}\"]\n"
        ),
        Stack::Dual => format!(
            "  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  \
             clusterIP: {VIP}\n  clusterIPs: [\"{VIP}\", \"{VIP6}\"]\n"
        ),
    };
    let mut yaml = format!(
        "\
apiVersion: v1
kind: Service
metadata:
  name: demo
  namespace: default
spec:
  type: ClusterIP
{families}{affinity}  ports:
    - name: http
      protocol: TCP
      port: {TCP_PORT}
      targetPort: {TCP_TARGET}
    - name: dns
      protocol: UDP
      port: {UDP_PORT}
      targetPort: {UDP_TARGET}
"
    );
    if stack != Stack::V6 {
        yaml += &endpoint_slice("demo-1", "IPv4", backends, |i| backend_ip(i).to_string());
    }
    if stack != Stack::V4 {
        yaml += &endpoint_slice("demo-ipv6-1", "IPv6", backends, |i| {
            backend_ip6(i).to_string()
        });
    }
    yaml
}

/// An EndpointSlice document (with its leading `---`) of service `demo`, listing `backends`
/// as ready at the addresses `addr` gives.
fn endpoint_slice(
    name: &str,
    address_type: &str,
    backends: &[usize],
    addr: impl Fn(usize) -> String,
) -> String {
    let endpoints = if backends.is_empty() {
        "endpoints: []\n".to_owned()
    } else {
        backends.iter().fold("endpoints:\n".to_owned(), |y, &i| {
            y + &format!(
                "  - addresses: [\"{}\"]\n    conditions:\n      ready: true\n",
                addr(i)
            )
        })
    };
    format!(
        "\
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}
  namespace: default
  labels:
    kubernetes.io/service-name: demo
addressType: {address_type}
ports:
  - name: http
    protocol: TCP
    port: {TCP_TARGET}
  - name: dns
    protocol: UDP
    port: {UDP_TARGET}
{endpoints}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::manifest_dir::{ManifestDir, Scan};
    use crate::testbed::TempDir;

    /// Loads `yaml` the way the agent does.
    fn load(yaml: &str) -> Scan {
        let dir = TempDir::new("manifest-unit").unwrap();
        std::fs::write(dir.path().join("demo.yaml"), yaml).unwrap();
        let scan = ManifestDir::new(dir.path()).unwrap().scan();
        assert!(scan.errors.is_empty(), "{:?}\n{yaml}", scan.errors);
        scan
    }

    /// (address type, addresses) of every slice.
    fn slices(scan: &Scan) -> Vec<(String, Vec<String>)> {
        scan.endpoint_slices
            .iter()
            .map(|s| {
                let addrs = s.endpoints.iter().flat_map(|e| e.addresses.clone());
                (s.address_type.clone(), addrs.collect())
            })
            .collect()
    }

    #[test]
    fn every_stack_parses_as_kubernetes_objects() {
        let v4 = load(&demo(&[1, 2], Some(30)));
        let spec = v4.services[0].spec.as_ref().unwrap();
        assert_eq!(spec.cluster_ips, Some(vec![VIP.to_string()]));
        assert_eq!(spec.ip_families, None);
        assert_eq!(
            slices(&v4),
            [("IPv4".into(), vec!["10.0.11.2".into(), "10.0.12.2".into()])]
        );

        let v6 = load(&demo6(&[1, 2], None));
        let spec = v6.services[0].spec.as_ref().unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("fd00:10:96::10"));
        assert_eq!(spec.ip_families, Some(vec!["IPv6".into()]));
        assert_eq!(spec.ip_family_policy.as_deref(), Some("SingleStack"));
        assert_eq!(
            slices(&v6),
            [(
                "IPv6".into(),
                vec!["fd00:10:0:11::2".into(), "fd00:10:0:12::2".into()]
            )]
        );

        let dual = load(&demo_dual(&[3], Some(10)));
        let spec = dual.services[0].spec.as_ref().unwrap();
        assert_eq!(
            spec.cluster_ips,
            Some(vec![VIP.to_string(), VIP6.to_string()])
        );
        assert_eq!(spec.ip_families, Some(vec!["IPv4".into(), "IPv6".into()]));
        assert_eq!(spec.ip_family_policy.as_deref(), Some("RequireDualStack"));
        assert_eq!(spec.session_affinity.as_deref(), Some("ClientIP"));
        let mut got = slices(&dual);
        got.sort();
        assert_eq!(
            got,
            [
                ("IPv4".into(), vec!["10.0.13.2".into()]),
                ("IPv6".into(), vec!["fd00:10:0:13::2".into()]),
            ]
        );
        for s in &dual.endpoint_slices {
            let labels = s.metadata.labels.as_ref().unwrap();
            assert_eq!(labels["kubernetes.io/service-name"], "demo");
        }

        let empty = load(&demo_dual(&[], None));
        assert_eq!(empty.endpoint_slices.len(), 2);
        assert!(empty.endpoint_slices.iter().all(|s| s.endpoints.is_empty()));
    }
}
