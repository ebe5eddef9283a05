//! The end-to-end tests' service, as the manifest the agent reads: one place for its shape.

use std::net::Ipv4Addr;

/// The service's ClusterIP and ports.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const TCP_PORT: u16 = 80;
pub const TCP_TARGET: u16 = 8080;
pub const UDP_PORT: u16 = 53;
pub const UDP_TARGET: u16 = 5353;

/// Service `demo` (ClusterIP `VIP`: TCP 80 -> 8080, UDP 53 -> 5353; ClientIP affinity with
/// the given timeout, if any) and one EndpointSlice listing the given backends (1-based, as
/// in the topology) as ready; `&[]` gives an empty slice.
pub fn demo(backends: &[usize], affinity_timeout_s: Option<u64>) -> String {
    let affinity = affinity_timeout_s.map_or(String::new(), |t| {
        format!(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      \
             timeoutSeconds: {t}\n"
        )
    });
    let endpoints = if backends.is_empty() {
        "endpoints: []\n".to_owned()
    } else {
        backends.iter().fold("endpoints:\n".to_owned(), |y, i| {
            y + &format!(
                "  - addresses: [\"10.0.{}.2\"]\n    conditions:\n      ready: true\n",
                10 + i
            )
        })
    };
    format!(
        "\
apiVersion: v1
kind: Service
metadata:
  name: demo
  namespace: default
spec:
  type: ClusterIP
  clusterIP: {VIP}
  clusterIPs: [\"{VIP}\"]
{affinity}  ports:
    - name: http
      protocol: TCP
      port: {TCP_PORT}
      targetPort: {TCP_TARGET}
    - name: dns
      protocol: UDP
      port: {UDP_PORT}
      targetPort: {UDP_TARGET}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: demo-1
  namespace: default
  labels:
    kubernetes.io/service-name: demo
addressType: IPv4
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
